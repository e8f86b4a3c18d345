"""An app served by uvicorn in a process of its own, for scenarios that measure a server
(`http_ingest`, `sse`): the benchmark process is the client, the OS puts the two on different
cores, and the server's CPU is read from its process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.env import Env

START_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Server:
    port: int
    process: psutil.Process

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)


@contextlib.asynccontextmanager
async def served(module: str, kind: str, env: Env, database_url: str) -> AsyncIterator[Server]:
    """Run `python -m <module> <kind> <nats url> <database url> <port file>` (the module
    serves its app `kind` and writes the port it got to the port file) until the block ends;
    its log goes to a file in the run's directory."""
    name = f"{module.rsplit('.', 1)[-1]}-{kind}"
    port_file = env.directory / f"{name}.port"
    log_path = env.directory / f"{name}.log"
    log = log_path.open("wb")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        kind,
        env.nats_url,
        database_url,
        str(port_file),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if child.returncode is not None or time.monotonic() > deadline:
                log.flush()
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {kind} server of {module} did not start:\n{tail}")
            await asyncio.sleep(0.05)
        yield Server(int(port_file.read_text()), psutil.Process(child.pid))
    finally:
        if child.returncode is None:
            child.terminate()
            try:
                async with asyncio.timeout(10):
                    await child.wait()
            except TimeoutError:
                child.kill()
                await child.wait()
        log.close()
