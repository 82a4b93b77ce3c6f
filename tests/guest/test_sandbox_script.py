"""One script drives both ends (issue 13, parts 3 and 4): ``host``/``fault`` lines act on the
device, ``&``/``wait`` overlap them with guest commands, the device is watched after every
line (a killed queue, a refused ring or a dropped connection ends the run with status 4 and
the reason), ``quit 0`` reads as a quit, and a scenario report follows the transcript."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host.cli_sandbox import Sandbox
from host.sandbox_script import (
    EXIT_DEVICE,
    EXIT_ERR,
    EXIT_OK,
    EXIT_SCENARIO,
    ScriptResult,
    ScriptRunner,
    exit_status,
)
from host.script_peer import ScriptPeer
from tests.guest.sandbox_support import require_tools, sandbox_fixture
from vdev.faults import FaultEngine

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def cli(
    tmp_path: Path, script: str, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    elf = require_tools()
    path = tmp_path / "script.txt"
    path.write_text(script)
    cmd = [sys.executable, "-m", "host.cli", "sandbox", "--elf", str(elf), "--script", str(path)]
    cmd += ["--ctl", str(tmp_path / "ctl.sock"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def status_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(("OK ", "ERR "))]


# ---------------------------------------------------------------- one sandbox, many scripts


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from sandbox_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def peer(sandbox: Sandbox) -> Iterator[ScriptPeer]:
    p = sandbox.script_peer()
    yield p
    p.close()


@contextlib.contextmanager
def fresh_sandbox(factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox of its own (these tests break it), always stopped."""
    gen = sandbox_fixture(factory)
    try:
        yield next(gen)
    finally:
        gen.close()


def run(sb: Sandbox, peer: ScriptPeer, script: str) -> tuple[ScriptResult, list[str]]:
    out = io.StringIO()
    res = sb.run_script(script.splitlines(), out, timeout=60, peer=peer)
    return res, status_lines(out.getvalue())


def test_rx_fed_by_the_host(sandbox: Sandbox, peer: ScriptPeer) -> None:
    res, lines = run(sandbox, peer, "host send 40 300\nrx 40 5000\n")
    assert res.errors == 0 and exit_status(res) == EXIT_OK, lines
    assert lines == [
        "OK host-send sent=40 bytes=12000",
        "OK rx received=40 bytes=12000 pattern=40 bad=0 min=300 max=300",
    ]


def test_big_rx_overlaps_the_host_send(sandbox: Sandbox, peer: ScriptPeer) -> None:
    """More than the guest's ring and the NIC's backlog hold: receive in the background."""
    res, lines = run(sandbox, peer, "rx 2000 30000 &\nhost send 2000 200\nwait\n")
    assert res.errors == 0, lines
    assert lines[-1].startswith("OK rx received=2000 bytes=400000 pattern=2000 bad=0")


def test_flood_overruns_an_idle_guest_by_exactly_the_backlog(
    sandbox: Sandbox, peer: ScriptPeer
) -> None:
    """`flood` does not wait for the guest: with the driver idle at its prompt, its 256 RX
    buffers and the NIC's 512-frame backlog take 768 frames and the device drops the rest
    (rx_backlog_full). The default (paced) send would have waited for room instead."""
    assert sandbox.device is not None
    nic = sandbox.device.nics[0]
    d0 = nic.stats[0].drop_reasons.get("rx_backlog_full", 0)
    res, lines = run(sandbox, peer, "host send 1200 100 flood\nrx 1200 3000\n")
    assert res.errors == 1
    assert lines[0] == "OK host-send sent=1200 bytes=120000"
    assert lines[1].startswith("ERR rx timeout received=768 ")
    assert nic.stats[0].drop_reasons.get("rx_backlog_full", 0) - d0 == 1200 - 768


def test_echo_round_trip_checked_by_the_host(sandbox: Sandbox, peer: ScriptPeer) -> None:
    script = "host clear\necho 50 20000 &\nhost send 50 120\nwait\nhost expect 50 10 pattern\n"
    res, lines = run(sandbox, peer, script)
    assert res.errors == 0, lines
    assert "OK echo echoed=50 bytes=6000 stop=count" in lines
    assert lines[-1] == "OK host-expect received=50 bytes=6000 bad=0 in_order=1"


def test_guest_tx_counted_by_the_host(sandbox: Sandbox, peer: ScriptPeer) -> None:
    res, lines = run(sandbox, peer, "host clear\ntx 500 100 32\nhost expect 500 10 pattern\n")
    assert res.errors == 0, lines
    assert lines[-1] == "OK host-expect received=500 bytes=50000 bad=0 in_order=1"


def test_inline_fault_takes_effect_and_is_removed(sandbox: Sandbox, peer: ScriptPeer) -> None:
    script = (
        "fault add action=drop queue=rx nth=[2,4] id=inline\n"
        "host send 10 100\n"
        "rx 10 1500\n"
        "fault list\n"
        "fault remove inline\n"
        "host send 10 100\n"
        "rx 10 5000\n"
    )
    res, lines = run(sandbox, peer, script)
    assert lines[0] == "OK fault-add id=inline action=drop queue=rx"
    assert lines[2].startswith("ERR rx timeout received=8 ")  # the 2nd and 4th were dropped
    assert lines[4] == "OK fault-remove id=inline hits=2"
    assert lines[6].startswith("OK rx received=10 ")
    assert res.errors == 1 and exit_status(res) == EXIT_ERR
    stats = peer.execute("host stats")
    assert any("drop_reasons=fault:2" in ln for ln in stats.lines), stats.lines


def test_host_expect_shortfall_is_an_error(sandbox: Sandbox, peer: ScriptPeer) -> None:
    res, lines = run(sandbox, peer, "host clear\ntx 3 60\nhost expect 5 0.5 pattern\n")
    assert lines[-1] == "ERR host-expect timeout received=3 bytes=180 bad=0 in_order=1"
    assert exit_status(res) == EXIT_ERR


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("host send ten 60", "ERR host-send COUNT and SIZE are numbers"),
        ("host send 5 10", "ERR host-send size 10: 26..16000"),
        ("host frobnicate", "ERR host-frobnicate unknown host command 'frobnicate'"),
        ("fault add queue=rx", "ERR fault-add fault add: action=... is required"),
        ("fault add action=explode", "ERR fault-add"),
        ("fault remove nope", "ERR fault-remove no rule or device fault 'nope'"),
        ("wait", "ERR wait nothing is running in the background"),
    ],
)
def test_bad_peer_lines_name_the_problem(
    sandbox: Sandbox, peer: ScriptPeer, line: str, error: str
) -> None:
    res, lines = run(sandbox, peer, line)
    assert len(lines) == 1 and lines[0].startswith(error), lines
    assert res.errors == 1


def test_guest_busy_while_a_background_command_runs(sandbox: Sandbox, peer: ScriptPeer) -> None:
    res, lines = run(sandbox, peer, "rx 2 5000 &\nstats\nhost send 2 100\nwait\n")
    assert res.errors == 1
    assert lines[0].startswith("ERR guest busy with 'rx 2 5000'")
    assert lines[-1].startswith("OK rx received=2 ")


def test_killed_queue_ends_the_script(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A driver bug the device catches (an avail idx far past what was posted: HEAD_OOB)
    stops the script at once with the device's named reason. The bug is planted in guest
    RAM while the device holds the chain (stalled), after the driver published it."""
    from tests.guest.sandbox_support import wait_for

    with fresh_sandbox(tmp_path_factory) as sb:
        assert sb.device is not None
        stall = FaultEngine.for_device(sb.device).nic(0).stall(queue="tx")

        def tx_queue() -> dict[str, Any]:
            return next(q for q in sb.introspect()["queues"] if q["kind"] == "tx")

        def script() -> Iterator[str]:
            yield "tx 1 60 1 &"
            assert wait_for(lambda: tx_queue()["driver"]["in_flight"] == 1)
            view = sb.guest_memory().gpa_view(tx_queue()["driver"]["driver"] + 2, 2)
            view[:2] = (9999).to_bytes(2, "little")  # the published avail idx, corrupted
            view.release()
            stall.remove()  # the device looks at the ring again
            yield "wait"
            yield "stats"

        out, err = io.StringIO(), io.StringIO()
        res = ScriptRunner(sb, out, watch=sb.watch, err=err).run(script())
        assert res.failure is not None and "killed queue 1 (tx0)" in res.failure
        assert "HEAD_OOB" in res.failure, res.failure
        assert exit_status(res) == EXIT_DEVICE
        assert "vdev> stats" not in out.getvalue()  # nothing ran after the failure
        assert err.getvalue().startswith("vdev sandbox: device failure: the device killed")


def test_dropped_connection_ends_the_script(tmp_path_factory: pytest.TempPathFactory) -> None:
    with fresh_sandbox(tmp_path_factory) as sb:
        assert sb.device is not None
        assert sb.watch is not None and sb.watch.check() is None
        FaultEngine.for_device(sb.device).crash_backend(0)
        out, err = io.StringIO(), io.StringIO()
        res = ScriptRunner(sb, out, watch=sb.watch, err=err).run(["tx 10 60", "quit 0"])
        assert res.failure is not None
        assert "dropped its vhost-user connection" in res.failure
        assert exit_status(res) == EXIT_DEVICE and res.quit_code is None


# ---------------------------------------------------------------- the CLI end to end


def test_refused_ring_exits_4_naming_the_reason(tmp_path: Path) -> None:
    res = cli(tmp_path, "tx 10 60\nquit 0\n", "--append", "qsize=7")
    assert res.returncode == EXIT_DEVICE, res.stdout + res.stderr
    assert "device failure" in res.stderr and "7 is not a power of 2" in res.stderr
    assert "OK tx" not in res.stdout  # the driver never got to talk to nobody


def test_quit_0_reads_as_a_quit(tmp_path: Path) -> None:
    res = cli(tmp_path, "host send 3 100\nrx 3\nquit 0\n")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("(guest quit with code 0)")
    assert "QEMU exited with status" not in res.stdout


def test_scenario_report_follows_the_transcript(tmp_path: Path) -> None:
    scen = tmp_path / "s.toml"
    scen.write_text(
        '[scenario]\nname = "after-transcript"\nduration = 0.3\n\n'
        '[[rule]]\nid = "d"\naction = "drop"\nqueue = "tx"\nnth = 1\n\n'
        '[[expect]]\nrule = "d"\nmin_hits = 1\n'
    )
    res = cli(tmp_path, "tx 10 60 1\nsleep 0.5\ntx 10 60\nrx 0\n", "--scenario", str(scen))
    assert res.returncode == EXIT_OK, res.stdout + res.stderr
    out = res.stdout.splitlines()
    last_transcript = max(i for i, ln in enumerate(out) if ln.startswith(("vdev> ", "OK ", "ERR ")))
    report = [i for i, ln in enumerate(out) if "after-transcript" in ln]
    assert report and min(report) > last_transcript, res.stdout
    assert not any(re.search(r"vdev> .*scenario", ln) for ln in out)


def test_failing_scenario_exits_5(tmp_path: Path) -> None:
    scen = tmp_path / "never.toml"
    scen.write_text(
        '[scenario]\nname = "never"\nduration = 0.2\n\n'
        '[[rule]]\nid = "d"\naction = "drop"\nqueue = "rx"\nnth = 1000\n\n'
        '[[expect]]\nrule = "d"\nmin_hits = 1\n'
    )
    res = cli(tmp_path, "tx 5 60\nsleep 0.4\n", "--scenario", str(scen))
    assert res.returncode == EXIT_SCENARIO, res.stdout + res.stderr


def test_bad_append_is_a_usage_error(tmp_path: Path) -> None:
    res = cli(tmp_path, "quit 0\n", "--append", "mq=9")
    assert res.returncode == 2 and res.stderr.strip() == (
        "vdev sandbox: --append mq=9: mq is 1..8 queue pairs"
    )
