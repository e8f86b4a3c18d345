"""`echo`: a deterministic agent that repeats the input back, word by word.

The default agent of `agentbus up` and the demos: it exercises the whole pipeline (queue,
worker, live output, the outbound message) with no model behind it."""

from __future__ import annotations

import asyncio

from agentbus.executors.executor import RunOutput, RunRequest


class EchoExecutor:
    name = "echo"

    def __init__(self, word_delay: float = 0.02) -> None:
        self._word_delay = word_delay

    async def execute(self, request: RunRequest, output: RunOutput) -> str:
        delay = float(request.options.get("word_delay", self._word_delay))
        words = request.input.split() or ["(empty)"]
        reply = f"echo: {' '.join(words)}"
        pieces = reply.split(" ")
        for index, word in enumerate(pieces):
            await output.delta(word if index == 0 else f" {word}")
            if delay:
                await asyncio.sleep(delay)
        await output.usage("echo", len(words), len(pieces))
        return reply
