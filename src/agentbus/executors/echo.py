"""`echo`: a deterministic agent that repeats the input back, word by word.

The default agent of `agentbus up` and the demos: it exercises the whole pipeline (queue,
worker, live output, the outbound message) with no model behind it.

It also demonstrates approvals without a model: the input `/tool <name> <JSON object>` (e.g.
`/tool shell {"command": "ls"}`) asks approval to call tool `<name>` with those arguments, and
replies `tool shell approved: {"command": "ls"}` or `tool shell denied: <why>`. Nothing is
executed: agentbus has no tool runtime."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from agentbus.executors.executor import ExecutorError, RunOutput, RunRequest

TOOL_TRIGGER = "/tool "


class EchoExecutor:
    name = "echo"

    def __init__(self, word_delay: float = 0.02) -> None:
        self._word_delay = word_delay

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        delay = float(request.options.get("word_delay", self._word_delay))
        words = request.input.split() or ["(empty)"]
        if request.input.startswith(TOOL_TRIGGER):
            reply = await _tool_call(request.input.removeprefix(TOOL_TRIGGER), output)
        else:
            reply = f"echo: {' '.join(words)}"
        pieces = reply.split(" ")
        for index, word in enumerate(pieces):
            await output.delta(word if index == 0 else f" {word}")
            if delay:
                await asyncio.sleep(delay)
        await output.usage("echo", len(words), len(pieces))
        return reply


async def _tool_call(command: str, output: RunOutput) -> str:
    tool, _, text = command.strip().partition(" ")
    try:
        arguments: Any = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        arguments = None
    if not tool or not isinstance(arguments, dict):
        raise ExecutorError(
            "executor",
            'usage: /tool <name> <JSON object>, e.g. /tool shell {"command": "ls"}',
            retryable=False,
        )
    decision = await output.request_approval(tool, arguments, f"the echo agent calls {tool}")
    if decision.granted:
        return f"tool {tool} approved: {orjson.dumps(arguments).decode()}"
    return f"tool {tool} denied: {decision.explain()}"
