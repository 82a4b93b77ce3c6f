"""`vdev run --scenario FILE` as a user runs it, for every file in scenarios/: a subprocess
with its own device and Linux guest, the verdict read back from ``--json``.

Each file must pass, every rule in it must fire, its traffic must have run, its liveness
must have been checked as declared, and the device's counters must show what the file
says it exercises.  Also: Ctrl-C during a run prints the partial report, exits 130 and
leaves no QEMU behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LIBRARY = sorted((REPO / "scenarios").glob("*.toml"))


def run_cli(path: Path, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--scenario", str(path), "--json"],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    try:
        report = json.loads(proc.stdout)  # stdout is the report and nothing else
    except json.JSONDecodeError:
        pytest.fail(f"stdout is not pure JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.returncode, report, proc.stderr


@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
def test_library_scenario_passes_honestly(linux_image: object, path: Path) -> None:
    status, report, stderr = run_cli(path)
    summary = json.dumps({k: report[k] for k in ("expects", "liveness", "traffic", "error")})
    assert status == 0 and report["ok"], summary + stderr[-2000:]
    assert report["name"] == path.stem and not report["interrupted"]
    rules = [r for r in report["rules"] if "seen" in r]  # fault rules (not device faults)
    for rule in rules:
        assert rule["hits"] >= 1 or rule.get("optional"), f"rule {rule['id']} never fired"
    fired = [e for e in report["expects"] if e["name"].endswith(" fired")]
    assert len(fired) == len(rules) and all(e["ok"] for e in fired)
    assert report["traffic"] and all(t["started"] for t in report["traffic"])
    live = report["liveness"]
    assert live["checked"] and live["ok"], live
    nic = report["device"]["nics"][0]
    assert nic["queues"]["tx0"]["frames"] > 0 and nic["queues"]["rx0"]["frames"] > 0
    assert {"in_use", "high_water", "alloc_failures"} <= set(report["device"]["pool"])
    assert "vdev run: t=" in stderr  # progress while it ran
    name = path.stem
    if name == "pool-exhaustion":
        assert nic["queues"]["tx0"]["drop_reasons"].get("pool_exhausted", 0) > 0, nic
        assert report["device"]["pool"]["alloc_failures"] > 0
    if name == "bursty-loss":
        assert {r["id"]: r["hits"] for r in rules}["bursts"] >= 3
    if name == "backend-crash":
        assert nic["connections"] >= 1  # QEMU reconnected (reconnect=1)
    if name == "crash-in-flight":
        assert nic["connections"] >= 1, nic  # connected again after the crash point
    if name == "hostile-device":
        assert live["expect"] == "breaks", live
        assert re.search(r"id \d+ (out of range|is not a head)", live["detail"]), live
        assert [s["ok"] for s in report["steps"] if s["do"] == "alive"] == [True]
    else:
        assert live["expect"] == "recovers"


def _tagged_processes(tag: str) -> list[int]:
    """Live processes started with VDEV_TEST_TAG=tag in their environment (QEMU inherits it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"VDEV_TEST_TAG={tag}".encode() in env.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def test_ctrl_c_prints_the_partial_report_and_cleans_up(linux_image: object) -> None:
    tag = uuid.uuid4().hex
    env = dict(os.environ, VDEV_TEST_TAG=tag)
    proc = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "run", "--scenario",
         str(REPO / "scenarios" / "flaky-link.toml")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    err: list[str] = []
    progress = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if "vdev run: t=" in line:
                progress.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert progress.wait(180), "no progress line: " + "".join(err)[-2000:]
        assert _tagged_processes(tag), "QEMU should be running with the test's tag"
        proc.send_signal(signal.SIGINT)
        # Not communicate(): it would read stderr too, racing the reader thread for the
        # very line this test looks for. stdout is read on its own thread, bounded by wait.
        chunks: list[str] = []
        assert proc.stdout is not None
        stdout = proc.stdout
        out_reader = threading.Thread(target=lambda: chunks.append(stdout.read()), daemon=True)
        out_reader.start()
        proc.wait(timeout=90)
        out_reader.join(10)
        out = "".join(chunks)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    reader.join(10)
    stderr = "".join(err)
    assert proc.returncode == 130, stderr[-2000:]
    assert out.startswith("scenario flaky-link: INTERRUPTED"), out
    assert "interrupted at t=" in out and "rules:" in out and "device (this run):" in out
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr
    deadline = time.monotonic() + 10
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tagged_processes(tag) == []  # QEMU and every helper are gone
