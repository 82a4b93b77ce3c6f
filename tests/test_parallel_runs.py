"""pytest-xdist execnet workers (``--tx``) run a slice of the suite: the path past one core
and, with ``--tx ssh=HOST//python=python3``, past one machine (docs/testing.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Two fast files with no QEMU: the point is the workers, not the tests.
SLICE = ("tests/skywalk/test_abi_sizes.py", "tests/vhost/test_codec_connection.py")


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment for the inner run: an outer xdist worker's variables must not
    # leak into it (they would make it think it is a worker).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTEST_XDIST"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
    )


def test_two_popen_workers_run_and_pass_a_slice() -> None:
    pytest.importorskip("xdist", reason="pytest-xdist not installed (pip install -e .[dev])")
    collected = _pytest("--collect-only", "-q", *SLICE)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    want = {line for line in collected.stdout.splitlines() if "::" in line}
    assert len(want) >= 4

    run = _pytest("--tx", "2*popen", "--dist", "load", "-v", *SLICE)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    per_worker: dict[str, set[str]] = {}
    for worker, outcome, test in re.findall(
        r"^\[(gw\d+)\] \[\s*\d+%\] (\w+) (\S+)", run.stdout, re.M
    ):
        assert outcome == "PASSED", f"{test} {outcome} on {worker}"
        per_worker.setdefault(worker, set()).add(test)
    assert sorted(per_worker) == ["gw0", "gw1"], run.stdout[-3000:]
    assert all(per_worker.values())  # both workers ran tests
    ran = set().union(*per_worker.values())
    assert ran == want  # every collected test ran, on exactly the workers listed
    assert sum(len(t) for t in per_worker.values()) == len(want)  # each one once
    assert re.search(rf"\b{len(want)} passed\b", run.stdout)
