"""The executors against local stand-ins: an OpenAI-compatible streaming server, an agent
service, and a JSON-RPC child process (tests/executors/)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentbus.executors.catalog import make_executor
from agentbus.executors.command import CommandExecutor
from agentbus.executors.echo import EchoExecutor
from agentbus.executors.executor import ApprovalDecision, ChatTurn, ExecutorError, RunRequest
from agentbus.executors.http import HttpExecutor
from agentbus.executors.openai import OpenAIExecutor
from agentbus.settings import AgentConfig
from tests.executors.stand_ins import STAND_IN_MODEL, LocalServer, agent_service_app, openai_app

CHILD = Path(__file__).parent / "executors" / "jsonrpc_child.py"
HISTORY = (ChatTurn("user", "hi"), ChatTurn("assistant", "hello, how can I help?"))


@dataclass
class Recorder:
    """A `RunOutput` that keeps what it was given."""

    deltas: list[str] = field(default_factory=list)
    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    usages: list[tuple[str, int, int]] = field(default_factory=list)

    async def delta(self, text: str) -> None:
        self.deltas.append(text)

    async def progress(self, kind: str, data: Mapping[str, Any]) -> None:
        self.steps.append((kind, dict(data)))

    async def usage(self, model: str, tokens_in: int, tokens_out: int) -> None:
        self.usages.append((model, tokens_in, tokens_out))

    async def request_approval(
        self, tool: str, arguments: Mapping[str, Any], reason: str | None
    ) -> ApprovalDecision:
        # None of these executors is configured to ask (tests/test_approvals.py covers asking).
        pytest.fail(f"unexpected approval request for {tool} {dict(arguments)}")


def run_request(options: Mapping[str, Any], **fields: Any) -> RunRequest:
    return RunRequest(
        workspace="acme",
        run_id=fields.pop("run_id", "run_1"),
        attempt=1,
        agent="helper",
        input=fields.pop("input", "what is the weather?"),
        session_id="sess_1",
        history=fields.pop("history", HISTORY),
        options=options,
        **fields,
    )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gone(pid: int, within: float = 3.0) -> bool:
    """True once `pid` has exited (a zombie counts: it runs nothing) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


async def failure(executor: Any, request: RunRequest, output: Recorder | None = None) -> Any:
    with pytest.raises(ExecutorError) as caught:
        await executor.execute(request, output or Recorder())
    return caught.value


def test_the_catalog_builds_each_executor() -> None:
    built = {
        name: type(make_executor(AgentConfig(executor=name)))
        for name in ("echo", "openai", "http", "command")
    }
    assert built == {
        "echo": EchoExecutor,
        "openai": OpenAIExecutor,
        "http": HttpExecutor,
        "command": CommandExecutor,
    }
    assert all(make_executor(AgentConfig(executor=name)).name == name for name in built)


# --- openai ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_received() -> list[dict[str, Any]]:
    return []


@pytest.fixture(scope="module")
def openai_url(openai_received: list[dict[str, Any]]) -> Iterator[str]:
    with LocalServer(openai_app(openai_received)) as server:
        yield f"{server.url}/v1"


def openai_options(base_url: str, model: str, **more: Any) -> dict[str, Any]:
    return {"base_url": base_url, "model": model, "timeout": 2, **more}


async def test_openai_streams_deltas_and_records_the_final_usage(
    openai_url: str, openai_received: list[dict[str, Any]]
) -> None:
    output = Recorder()
    options = openai_options(
        openai_url, "chat", system="Be brief.", api_key="sk-test", temperature=0.2
    )

    reply = await OpenAIExecutor().execute(run_request(options), output)

    assert reply == "Hello, world"
    assert output.deltas == ["Hello", ",", " world"]
    assert output.usages == [(STAND_IN_MODEL, 40, 3)]  # 4 messages, as the stand-in counts
    sent = openai_received[-1]
    assert sent["headers"]["authorization"] == "Bearer sk-test"
    assert sent["body"] == {
        "model": "chat",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello, how can I help?"},
            {"role": "user", "content": "what is the weather?"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }


async def test_openai_reads_the_api_key_from_the_environment(
    openai_url: str, openai_received: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_KEY", "sk-from-env")
    options = openai_options(openai_url, "chat", api_key_env="STAND_IN_KEY")

    await OpenAIExecutor().execute(run_request(options, history=()), Recorder())

    sent = openai_received[-1]
    assert sent["headers"]["authorization"] == "Bearer sk-from-env"
    assert [m["role"] for m in sent["body"]["messages"]] == ["user"]
    assert "temperature" not in sent["body"]


async def test_openai_caps_the_output_at_the_tokens_the_budget_reserved(
    openai_url: str, openai_received: list[dict[str, Any]]
) -> None:
    options = openai_options(openai_url, "chat")

    await OpenAIExecutor().execute(run_request(options, max_tokens=512), Recorder())

    assert openai_received[-1]["body"]["max_tokens"] == 512


async def test_openai_records_no_usage_when_the_server_sends_none(openai_url: str) -> None:
    output = Recorder()

    reply = await OpenAIExecutor().execute(
        run_request(openai_options(openai_url, "no-usage")), output
    )

    assert reply == "Hello, world"
    assert output.usages == []


async def test_openai_reports_each_tool_call_once_and_whole(openai_url: str) -> None:
    output = Recorder()

    reply = await OpenAIExecutor().execute(run_request(openai_options(openai_url, "tools")), output)

    assert reply == "Let me check."
    assert output.steps == [
        ("tool_call", {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}),
        ("tool_call", {"id": "call_2", "name": "get_time", "arguments": "{}"}),
    ]
    assert output.usages == [(STAND_IN_MODEL, 20, 9)]


async def test_openai_reads_a_completion_that_was_not_streamed(openai_url: str) -> None:
    output = Recorder()

    reply = await OpenAIExecutor().execute(run_request(openai_options(openai_url, "json")), output)

    assert reply == "not streamed"
    assert output.deltas == ["not streamed"]
    assert output.usages == [(STAND_IN_MODEL, 5, 2)]


@pytest.mark.parametrize(
    ("model", "retryable"),
    [("error-500", True), ("error-503", True), ("error-429", True), ("error-408", True),
     ("error-400", False), ("error-401", False), ("error-404", False)],
)  # fmt: skip
async def test_openai_maps_error_statuses(openai_url: str, model: str, retryable: bool) -> None:
    error = await failure(OpenAIExecutor(), run_request(openai_options(openai_url, model)))

    status = model.removeprefix("error-")
    assert (error.error_class, error.retryable) == ("http_status", retryable)
    assert f"HTTP {status}" in str(error)
    assert f"stand-in refuses with {status}" in str(error)  # the server's error.message


async def test_openai_read_timeout_is_a_retryable_timeout(openai_url: str) -> None:
    output = Recorder()
    options = openai_options(openai_url, "slow", timeout=0.3)

    error = await failure(OpenAIExecutor(), run_request(options), output)

    assert (error.error_class, error.retryable) == ("timeout", True)
    assert output.deltas == ["Hel"]


async def test_openai_refused_connection_is_a_retryable_network_error() -> None:
    options = openai_options(f"http://127.0.0.1:{closed_port()}/v1", "chat")

    error = await failure(OpenAIExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("network", True)


@pytest.mark.parametrize("model", ["malformed", "truncated"])
async def test_openai_malformed_stream_is_a_protocol_error(openai_url: str, model: str) -> None:
    error = await failure(OpenAIExecutor(), run_request(openai_options(openai_url, model)))

    assert (error.error_class, error.retryable) == ("protocol", False)


async def test_openai_error_in_the_stream_fails_the_attempt(openai_url: str) -> None:
    error = await failure(OpenAIExecutor(), run_request(openai_options(openai_url, "stream-error")))

    assert (error.error_class, error.retryable) == ("executor", True)
    assert "the model is overloaded" in str(error)


@pytest.mark.parametrize(
    ("options", "mentions"),
    [
        ({"model": "chat"}, "base_url"),
        ({"base_url": "http://127.0.0.1:1/v1"}, "model"),
        ({"base_url": "http://127.0.0.1:1/v1", "model": "m", "temprature": 1}, "temprature"),
        (
            {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": "UNSET_KEY_X"},
            "UNSET",
        ),
        ({"base_url": "127.0.0.1:1/v1", "model": "m"}, "URL"),
    ],
)
async def test_openai_bad_options_fail_without_retry(
    options: dict[str, Any], mentions: str
) -> None:
    error = await failure(OpenAIExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("executor", False)
    assert mentions in str(error)


# --- http -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service_received() -> dict[str, list[dict[str, Any]]]:
    return defaultdict(list)


@pytest.fixture(scope="module")
def service_url(service_received: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    with LocalServer(agent_service_app(service_received)) as server:
        yield server.url


def http_options(url: str, **more: Any) -> dict[str, Any]:
    return {"url": url, "backoff": 0.01, **more}


async def test_http_posts_the_run_and_returns_the_output(
    service_url: str, service_received: dict[str, list[dict[str, Any]]]
) -> None:
    output = Recorder()

    reply = await HttpExecutor().execute(
        run_request(http_options(f"{service_url}/reply", token="s3cret"), max_tokens=500),
        output,
    )

    assert reply == "agent says: what is the weather?"
    assert output.deltas == [reply]  # the live output shows the reply, in one piece
    assert output.usages == [("service-model", 7, 3)]
    assert service_received["/reply"][-1]["body"] == {
        "run_id": "run_1",
        "attempt": 1,
        "workspace": "acme",
        "agent": "helper",
        "input": "what is the weather?",
        "session_id": "sess_1",
        "history": [
            {"role": "user", "text": "hi"},
            {"role": "assistant", "text": "hello, how can I help?"},
        ],
        "max_tokens": 500,
    }


async def test_http_reads_the_token_from_the_environment(
    service_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SERVICE_TOKEN", "s3cret")
    options = http_options(f"{service_url}/reply", token_env="AGENT_SERVICE_TOKEN")

    reply = await HttpExecutor().execute(run_request(options), Recorder())

    assert reply.startswith("agent says:")


async def test_http_retries_a_5xx_inside_the_attempt(
    service_url: str, service_received: dict[str, list[dict[str, Any]]]
) -> None:
    request = run_request(http_options(f"{service_url}/flaky"), run_id="run_flaky")

    reply = await HttpExecutor().execute(request, Recorder())

    assert reply == "second time lucky"
    assert [r["body"]["run_id"] for r in service_received["/flaky"]] == ["run_flaky"] * 2


async def test_http_fails_fast_on_a_4xx(
    service_url: str, service_received: dict[str, list[dict[str, Any]]]
) -> None:
    error = await failure(HttpExecutor(), run_request(http_options(f"{service_url}/bad")))

    assert (error.error_class, error.retryable) == ("http_status", False)
    assert "HTTP 400" in str(error)
    assert "input must not be empty" in str(error)
    assert len(service_received["/bad"]) == 1


async def test_http_gives_up_on_a_5xx_after_its_retries(
    service_url: str, service_received: dict[str, list[dict[str, Any]]]
) -> None:
    options = http_options(f"{service_url}/down", retries=2)

    error = await failure(HttpExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("http_status", True)
    assert "HTTP 503" in str(error)
    assert "upstream is down for maintenance" in str(error)
    assert len(service_received["/down"]) == 3


async def test_http_too_slow_is_a_retryable_timeout(
    service_url: str, service_received: dict[str, list[dict[str, Any]]]
) -> None:
    options = http_options(f"{service_url}/slow", timeout=0.3, retries=1)

    started = time.monotonic()
    error = await failure(HttpExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("timeout", True)
    assert time.monotonic() - started < 1.5
    assert len(service_received["/slow"]) == 2


async def test_http_refused_connection_is_a_retryable_network_error() -> None:
    options = http_options(f"http://127.0.0.1:{closed_port()}/agent")

    error = await failure(HttpExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("network", True)


async def test_http_reply_without_output_is_a_protocol_error(service_url: str) -> None:
    error = await failure(HttpExecutor(), run_request(http_options(f"{service_url}/garbage")))

    assert (error.error_class, error.retryable) == ("protocol", False)
    assert "not JSON" in str(error)


async def test_http_missing_token_variable_fails_without_retry(service_url: str) -> None:
    options = http_options(f"{service_url}/reply", token_env="UNSET_TOKEN_VARIABLE_X")

    error = await failure(HttpExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("executor", False)
    assert "UNSET_TOKEN_VARIABLE_X" in str(error)


async def test_http_messages_do_not_leak_credentials_in_the_url(service_url: str) -> None:
    url = service_url.replace("http://", "http://user:pw@") + "/bad?key=secret"

    error = await failure(HttpExecutor(), run_request(http_options(url)))

    assert "pw" not in str(error)
    assert "secret" not in str(error)


# --- command --------------------------------------------------------------------------------


def child(mode: str, **more: Any) -> dict[str, Any]:
    return {"command": [sys.executable, str(CHILD), mode], **more}


async def pids_of(output: Recorder, task: asyncio.Task[str]) -> list[int]:
    """The pids a hanging child reported, once it has."""
    for _ in range(500):
        for kind, data in output.steps:
            if kind == "pids":
                return list(data["pids"])
        assert not task.done(), task
        await asyncio.sleep(0.01)
    raise AssertionError("the child did not report its pid")


async def test_command_streams_notifications_and_returns_the_result() -> None:
    output = Recorder()

    reply = await CommandExecutor().execute(run_request(child("chat")), output)

    assert reply == "you said: what is the weather?"
    assert output.deltas == ["you said: ", "what is the weather?"]
    assert output.usages == [("child-model", 11, 4)]
    (kind, params), *rest = output.steps
    assert kind == "params"
    assert rest == []  # the unknown "thinking" notification was ignored
    assert params == {
        "run_id": "run_1",
        "attempt": 1,
        "workspace": "acme",
        "agent": "helper",
        "input": "what is the weather?",
        "session_id": "sess_1",
        "history": [
            {"role": "user", "text": "hi"},
            {"role": "assistant", "text": "hello, how can I help?"},
        ],
        "max_tokens": None,  # no budget applies to this run
    }


async def test_command_sends_an_unstreamed_result_as_one_delta() -> None:
    output = Recorder()

    assert await CommandExecutor().execute(run_request(child("silent")), output) == "all at once"
    assert output.deltas == ["all at once"]


async def test_command_runs_in_cwd_with_env_additions(tmp_path: Path) -> None:
    options = child("env", cwd=str(tmp_path), env={"AGENT_VAR": "forty-two"})

    reply = json.loads(await CommandExecutor().execute(run_request(options), Recorder()))

    assert reply == {"cwd": str(tmp_path), "var": "forty-two"}


async def test_command_reads_long_lines() -> None:
    reply = await CommandExecutor().execute(run_request(child("big")), Recorder())

    assert reply == "x" * 200_000


async def test_command_answers_requests_from_the_child_with_method_not_found() -> None:
    reply = await CommandExecutor().execute(run_request(child("ask")), Recorder())

    assert reply == "q1: -32601 unknown method approve"


@pytest.mark.parametrize(("mode", "retryable"), [("error", False), ("error-retryable", True)])
async def test_command_error_response_fails_the_attempt(mode: str, retryable: bool) -> None:
    error = await failure(CommandExecutor(), run_request(child(mode)))

    assert (error.error_class, error.retryable) == ("executor", retryable)
    assert str(error) in ("the model refused (code 7)", "overloaded (code 8)")


@pytest.mark.parametrize("mode", ["malformed", "bad-params"])
async def test_command_malformed_line_is_a_protocol_error(mode: str) -> None:
    error = await failure(CommandExecutor(stop_grace=0.5), run_request(child(mode)))

    assert (error.error_class, error.retryable) == ("protocol", False)


async def test_command_exit_without_answer_reports_code_and_stderr() -> None:
    error = await failure(CommandExecutor(stderr_lines=5), run_request(child("exit")))

    assert (error.error_class, error.retryable) == ("executor", False)
    message = str(error)
    assert "exited with code 3" in message
    assert message.endswith("log line 29\nfatal: cannot reach the model")
    assert "log line 25" not in message  # only the last lines are kept


async def test_command_that_cannot_start_fails_without_retry(tmp_path: Path) -> None:
    options = {"command": [str(tmp_path / "no-such-agent")]}

    error = await failure(CommandExecutor(), run_request(options))

    assert (error.error_class, error.retryable) == ("executor", False)
    assert "no-such-agent" in str(error)


async def test_command_as_a_string_is_refused() -> None:
    error = await failure(CommandExecutor(), run_request({"command": "python agent.py"}))

    assert (error.error_class, error.retryable) == ("executor", False)
    assert "command" in str(error)


async def test_cancelling_the_run_stops_the_child_and_its_children() -> None:
    output = Recorder()
    task = asyncio.create_task(CommandExecutor().execute(run_request(child("hang-family")), output))
    pids = await pids_of(output, task)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert all(gone(pid) for pid in pids)


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    output = Recorder()
    executor = CommandExecutor(stop_grace=0.3)
    task = asyncio.create_task(executor.execute(run_request(child("stubborn")), output))
    [pid] = await pids_of(output, task)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert gone(pid, within=0.5)


async def test_command_timeout_is_retryable_and_stops_the_child() -> None:
    output = Recorder()

    error = await failure(CommandExecutor(), run_request(child("hang", timeout=0.5)), output)

    assert (error.error_class, error.retryable) == ("timeout", True)
    [(_, data)] = output.steps
    assert gone(data["pids"][0])


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from agentbus.executors.command import CommandExecutor
    from agentbus.executors.executor import RunRequest

    class Output:
        async def delta(self, text): pass
        async def usage(self, model, tokens_in, tokens_out): pass
        async def progress(self, kind, data): print(json.dumps(data), flush=True)

    request = RunRequest("acme", "run_1", 1, "helper", "hi", options={"command": sys.argv[1:]})
    asyncio.run(CommandExecutor().execute(request, Output()))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")
def test_the_child_dies_with_a_killed_worker() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, sys.executable, str(CHILD), "hang"],
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stdout is not None
            [pid] = json.loads(worker.stdout.readline())["pids"]
            assert not gone(pid, within=0.1)

            os.kill(worker.pid, signal.SIGKILL)

            assert gone(pid)
        finally:
            worker.kill()
