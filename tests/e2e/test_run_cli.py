"""`vdev run --script`: device and Linux guest together, commands from a file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")
def test_run_script_prints_output_and_returns_status(linux_image: object, tmp_path: Path) -> None:
    script = tmp_path / "cmds.txt"
    script.write_text(
        "# the guest is up with eth0 on vdev\n"
        "cat /sys/class/net/eth0/carrier\n"
        "\n"
        "ping -c 2 -W 2 10.0.2.2\n"
        "sh -c 'exit 3'\n"
    )
    pcap = tmp_path / "run.pcapng"
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--script", str(script), "--pcap", str(pcap)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]  # the script's own status: its last command
    out = proc.stdout
    # One shell script (host/run_script.py): the output of each command in order, no
    # per-line echo; comments are the shell's, never printed.
    assert out.index("1\n") < out.index("2 packets received")
    assert "[exit 3]" in out and "# the guest" not in out
    assert pcap.stat().st_size > 200  # the capture has the pings


def test_run_refuses_script_and_scenario_together(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("true\n")
    scen = Path(__file__).resolve().parents[2] / "scenarios" / "flaky-link.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--script", str(f), "--scenario", str(scen)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_run_interactive_console_on_a_terminal(linux_image: object) -> None:
    """With no script, `vdev run` bridges the terminal to the guest console; Ctrl-] leaves
    and everything shuts down."""
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "host.cli", "run"], encoding="utf-8", timeout=90)
    try:
        child.expect("console attached")
        child.expect("vdev-guest# ")
        child.sendline("echo $((6*7))")
        child.expect("42")
        child.sendcontrol("]")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
