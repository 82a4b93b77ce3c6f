"""``vdev sandbox --script`` end to end in a subprocess: replies, exit codes, machines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guest.sandbox_support import require_tools

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def sandbox(
    tmp_path: Path, script: str, *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    elf = require_tools()
    path = tmp_path / "script.txt"
    path.write_text(script)
    cmd = [sys.executable, "-m", "host.cli", "sandbox", "--elf", str(elf), "--script", str(path)]
    cmd += ["--ctl", str(tmp_path / "ctl.sock"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("code", [0, 5, 42])
def test_exit_code_is_the_scripts_quit_code(tmp_path: Path, code: int) -> None:
    script = f"# a comment\n\nfeatures\ntx 100 60 32\n   \nstats\nquit {code}\nstats\n"
    res = sandbox(tmp_path, script)
    assert res.returncode == code, res.stdout + res.stderr
    assert "OK tx sent=100 bytes=6000" in res.stdout
    assert "OK stats tx_packets=100" in res.stdout
    assert res.stdout.count("vdev> stats") == 1  # nothing after quit runs
    # The start-up time is reported (how fast it is belongs in benchmarks/, not here).
    m = re.search(r"guest ready in (\d+) ms \(driver kmain-to-prompt (\d+) ms\)", res.stderr)
    assert m is not None and int(m.group(1)) > 0 and int(m.group(2)) > 0, res.stderr


def test_err_without_quit_is_nonzero(tmp_path: Path) -> None:
    res = sandbox(tmp_path, "tx 1 5\nstats\n")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "ERR tx bad size 5" in res.stdout and "OK stats" in res.stdout


def test_script_without_quit_ok(tmp_path: Path) -> None:
    res = sandbox(tmp_path, "tx 10 60\n")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(("machine", "transport"), [("q35", "modern"), ("microvm", "mmio")])
def test_machines(tmp_path: Path, machine: str, transport: str) -> None:
    """pc is the default; q35 (PCIe) and microvm (virtio-mmio, vhost-user works in 7.2)."""
    res = sandbox(tmp_path, "features\ntx 300 1000 32\nrx 0\nquit 3\n", "--machine", machine)
    assert res.returncode == 3, res.stdout + res.stderr
    assert f"OK features transport={transport}" in res.stdout
    assert "OK tx sent=300 bytes=300000" in res.stdout


def test_scenario_plays_during_the_run(tmp_path: Path) -> None:
    scen = tmp_path / "drop.toml"
    scen.write_text(
        '[scenario]\nname = "sandbox-drop"\nduration = 0.5\n\n'
        '[[rule]]\nid = "d"\naction = "drop"\nqueue = "tx"\nnth = 1\n\n'
        '[[expect]]\nrule = "d"\nmin_hits = 1\n'
    )
    res = sandbox(tmp_path, "tx 20 60 1\nrx 0\n", "--scenario", str(scen))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sandbox-drop" in res.stdout and "OK tx sent=20" in res.stdout


def test_bad_scenario_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario]\nname = 1\nbogus = 2\n")
    res = sandbox(tmp_path, "quit 0\n", "--scenario", str(bad))
    assert res.returncode == 2 and "--scenario" in res.stderr


@pytest.mark.parametrize("leave", ["quit", "escape"])
def test_interactive_console(tmp_path: Path, leave: str) -> None:
    """On a terminal: the console is bridged raw; `quit 6` -> exit 6, Ctrl-] -> exit 0."""
    import pexpect

    elf = require_tools()
    argv = ["-m", "host.cli", "sandbox", "--elf", str(elf), "--ctl", str(tmp_path / "c.sock")]
    child = pexpect.spawn(sys.executable, argv, cwd=str(REPO), encoding="utf-8", timeout=30)
    try:
        child.expect_exact("vdev> ")
        child.send("tx 10 60\r")
        child.expect_exact("OK tx sent=10")
        child.expect_exact("vdev> ")
        if leave == "quit":
            child.send("quit 6\r")
            want = 6
        else:
            child.send("\x1d")
            want = 0
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == want, child.before
    finally:
        if child.isalive():
            child.close(force=True)


def test_interactive_console_ends_on_a_device_failure(tmp_path: Path) -> None:
    """The device drops the vhost-user connection under an interactive session (`vdev ctl
    crash`): the bridge ends, the reason is printed and the status is 4."""
    import pexpect

    elf = require_tools()
    ctl = tmp_path / "c.sock"
    argv = ["-m", "host.cli", "sandbox", "--elf", str(elf), "--ctl", str(ctl)]
    child = pexpect.spawn(sys.executable, argv, cwd=str(REPO), encoding="utf-8", timeout=30)
    try:
        child.expect_exact("vdev> ")
        crash = subprocess.run(
            [sys.executable, "-m", "host.cli", "ctl", "--socket", str(ctl), "crash", "--nic", "0"],
            cwd=REPO, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert crash.returncode == 0, crash.stderr
        child.expect_exact("device failure: the device dropped its vhost-user connection")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 4, child.before
    finally:
        if child.isalive():
            child.close(force=True)
