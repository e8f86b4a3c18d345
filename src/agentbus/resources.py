"""Where the project's data files are: streams/, migrations/, schemas/, nats.conf.

In a source checkout (editable install) they are at the repository root; in a wheel they are
bundled under `agentbus/_bundled/`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_BUNDLED = _PACKAGE / "_bundled"
_CHECKOUT = _PACKAGE.parent.parent  # src/agentbus -> repository root


def resource(name: str) -> Path:
    """Path of a top-level project resource (`streams`, `migrations`, `schemas`, `nats.conf`)."""
    for base in (_CHECKOUT, _BUNDLED):
        candidate = base / name
        if candidate.exists() and (base is _BUNDLED or (base / "pyproject.toml").exists()):
            return candidate
    raise FileNotFoundError(f"agentbus resource {name!r} is missing from this installation")
