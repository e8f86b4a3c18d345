"""A JSON-RPC child for the `command` executor tests: `python jsonrpc_child.py <mode>`.

It reads the `run` request from stdin and behaves as `mode` says (see `MODES` below)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any


def send(message: dict[str, Any]) -> None:
    print(json.dumps({"jsonrpc": "2.0", **message}), flush=True)


def notify(method: str, params: dict[str, Any]) -> None:
    send({"method": method, "params": params})


def answer(output: str) -> None:
    send({"id": 1, "result": {"output": output}})


def hang() -> None:
    while True:
        time.sleep(60)


def main(mode: str) -> None:
    request = json.loads(sys.stdin.readline())
    params = request["params"]
    match mode:
        case "chat":
            notify("progress", {"kind": "params", "data": params})
            notify("delta", {"text": "you said: "})
            notify("thinking", {"text": "a notification agentbus does not know"})
            notify("delta", {"text": params["input"]})
            notify("usage", {"model": "child-model", "tokens_in": 11, "tokens_out": 4})
            answer(f"you said: {params['input']}")
        case "silent":
            answer("all at once")
        case "env":
            answer(json.dumps({"cwd": os.getcwd(), "var": os.environ.get("AGENT_VAR")}))
        case "big":
            answer("x" * 200_000)
        case "error":
            send({"id": 1, "error": {"code": 7, "message": "the model refused"}})
        case "error-retryable":
            send(
                {
                    "id": 1,
                    "error": {"code": 8, "message": "overloaded", "data": {"retryable": True}},
                }
            )
        case "malformed":
            notify("delta", {"text": "partial"})
            print("this is not JSON", flush=True)
            hang()
        case "bad-params":
            notify("delta", {"txt": "no text field"})
            hang()
        case "ask":
            send({"id": "q1", "method": "approve", "params": {"tool": "rm"}})
            reply = json.loads(sys.stdin.readline())
            answer(f"{reply['id']}: {reply['error']['code']} {reply['error']['message']}")
        case "exit":
            for n in range(30):
                print(f"log line {n}", file=sys.stderr)
            print("fatal: cannot reach the model", file=sys.stderr, flush=True)
            sys.exit(3)
        case "hang":
            notify("progress", {"kind": "pids", "data": {"pids": [os.getpid()]}})
            hang()
        case "hang-family":
            grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            notify("progress", {"kind": "pids", "data": {"pids": [os.getpid(), grandchild.pid]}})
            hang()
        case "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            notify("progress", {"kind": "pids", "data": {"pids": [os.getpid()]}})
            hang()
        case _:
            sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1])
