"""The benchmarks still run against the code: every scenario, tiny, in one process, as
`python -m benchmarks` runs them all. The figures are not checked (benchmarks assert nothing,
tests do not time anything): a scenario that fails, or a peer whose rows no longer fit the
tables, is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"append", "projection", "runs", "http_ingest", "sse", "audit"}


@pytest.mark.timeout(600)
def test_every_scenario_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            *("--events", "200", "--rounds", "1", "--warmup", "10", "--json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert set(report["scenarios"]) == SCENARIOS
    for name, scenario in report["scenarios"].items():
        figures = scenario["figures"]
        assert figures, name
        assert all(f["value"] > 0 for f in figures), (name, figures)
    # the peer ran too (the test extra installs the bench extra)
    peer = [f["ceiling_name"] for f in report["scenarios"]["projection"]["figures"]]
    assert any("eventsourcing" in (name or "") for name in peer), peer
