"""Building an executor from an agent's configuration."""

from __future__ import annotations

from agentbus.executors.echo import EchoExecutor
from agentbus.executors.executor import Executor
from agentbus.settings import AgentConfig


def make_executor(config: AgentConfig) -> Executor:
    """The executor named by `config.executor`; its options are read per run."""
    match config.executor:
        case "echo":
            return EchoExecutor()
        case "openai":
            from agentbus.executors.openai import OpenAIExecutor

            return OpenAIExecutor()
        case "http":
            from agentbus.executors.http import HttpExecutor

            return HttpExecutor()
        case "command":
            from agentbus.executors.command import CommandExecutor

            return CommandExecutor()
    raise ValueError(f"unknown executor {config.executor!r}")
