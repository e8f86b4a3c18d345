"""Logging, configured once: JSON when not on a terminal, readable on one.

Context such as workspace, trace and ids is bound with `structlog.contextvars.bind_contextvars`
and shows up in every line logged within that context.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


class _Stderr:
    """`sys.stderr` as it is at each write, not as it was at configuration time: test
    runners and daemonisers swap it, and a handler bound to a closed stream fails later."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: Literal["debug", "info", "warning", "error"] = "info",
) -> None:
    """Set up structlog (and route stdlib logging through it). Idempotent."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # Libraries (uvicorn, alembic, nats) log through the stdlib: render them the same way.
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # Libraries that narrate routine steps at INFO: agentbus reports those steps itself.
    for noisy in ("uvicorn.access", "uvicorn.error", "alembic", "pgserver"):
        logging.getLogger(noisy).setLevel(max(_LEVELS[level], logging.WARNING))
