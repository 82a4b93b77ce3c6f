"""Bring your own driver (issue 13, part 6): guest/template builds warning-free against
vdev/abi/*.h and, booted with `vdev sandbox --elf`, gets the console protocol, host-side
script lines, `inspect` by ELF symbols and fault scenarios without any extra code."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from host.cli_sandbox import Sandbox
from tests.guest.sandbox_support import require_tools

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "guest" / "template"


@pytest.fixture(scope="module")
def my_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tools()
    if shutil.which("make") is None:
        pytest.skip("make not installed (apt-get install make)")
    out = tmp_path_factory.mktemp("template")
    res = subprocess.run(
        ["make", "-C", str(TEMPLATE), f"OUT={out}"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    # -Wall -Wextra -Werror: nothing but the commands themselves on the output.
    noise = [
        ln
        for ln in (res.stdout + res.stderr).splitlines()
        if not ln.startswith(("gcc ", "ld ", "make"))
    ]
    assert noise == []
    elf = out / "mydriver.elf"
    assert elf.read_bytes()[:5] == b"\x7fELF\x01"  # 32-bit
    return elf


def sandbox_cli(
    tmp_path: Path, elf: Path, script: str, *args: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.txt"
    path.write_text(script)
    cmd = [sys.executable, "-m", "host.cli", "sandbox", "--elf", str(elf), "--script", str(path)]
    cmd += ["--ctl", str(tmp_path / "ctl.sock"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_template_boots_and_both_ends_are_scriptable(my_elf: Path, tmp_path: Path) -> None:
    script = (
        "host send 20 100\n"
        "rx 20 5000\n"
        "host clear\n"
        "tx 30 100\n"
        "host expect 30 5 pattern\n"
        "stats\n"
        "quit 7\n"
    )
    res = sandbox_cli(tmp_path, my_elf, script)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "OK rx received=20 bytes=2000" in res.stdout
    assert "OK host-expect received=30 bytes=3000 bad=0 in_order=1" in res.stdout
    assert "tx_packets=30" in res.stdout and "(guest quit with code 7)" in res.stdout


def test_inspect_finds_the_templates_globals(my_elf: Path, tmp_path: Path) -> None:
    with Sandbox(elf=my_elf, ctl=tmp_path / "ctl.sock", console_log=tmp_path / "c.log") as sb:
        assert sb.cmd("tx 12 64").ok
        snap = sb.introspect()
        assert snap["globals"]["my_tx_packets"] == 12
        assert snap["globals"]["my_tx_kicks"] >= 1
        assert snap["stats"] == {} and snap["queues"] == []  # it exports none of vdev's own
        cmd = [sys.executable, "-m", "host.cli", "inspect", "--socket", str(tmp_path / "ctl.sock")]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "my_tx_packets=12" in out.stdout
        assert "device tx0: last_avail_idx=12 used_idx=12" in out.stdout


def test_fault_scenario_acts_on_the_template(my_elf: Path, tmp_path: Path) -> None:
    """The template has no `echo`, so the scenario declares no liveness probe (its verdict
    rests on the rule firing); the script's traffic runs inside the scenario's window."""
    scen = tmp_path / "drop.toml"
    scen.write_text(
        '[scenario]\nname = "template-drop"\nduration = 3.0\n\n'
        '[[rule]]\nid = "d"\naction = "drop"\nqueue = "tx"\nnth = [5]\n\n'
        '[[expect]]\nrule = "d"\nmin_hits = 1\n\n'
        '[liveness]\nexpect = "none"\n'
    )
    res = sandbox_cli(
        tmp_path,
        my_elf,
        "sleep 0.5\ntx 20 100\nhost expect 19 5 pattern\n",
        "--scenario",
        str(scen),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK host-expect received=19 bytes=1900 bad=0 in_order=1" in res.stdout
    out = res.stdout.splitlines()
    report = [i for i, ln in enumerate(out) if "template-drop" in ln]
    assert report and min(report) > max(i for i, ln in enumerate(out) if ln.startswith("OK "))
