"""Every scenario in scenarios/ played against a booted Linux guest, as `vdev run --scenario`
does: the guest pings the responder in the background while the timeline runs.

One VM serves the module. ``hostile-device`` runs last: it feeds the stock Linux driver
bogus used entries, after which Linux marks the virtqueue broken and does not recover
(the guest can stop servicing its shell), which the test checks on the console.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdev.faults import FaultEngine
from vdev.faults.scenario import play
from vdev.net.device import Device

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
ORDER = ["flaky-link", "bursty-loss", "pool-exhaustion", "backend-crash", "hostile-device"]


@dataclass
class Guest:
    device: Device
    machine: object


@pytest.fixture(scope="module")
def guest(linux_image: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    from host.machine import Machine, Nic

    d = tmp_path_factory.mktemp("scenarios")
    device = Device()
    try:
        device.add_nic(str(d / "nic0.sock"))
        device.start()
        with Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[Nic.vhost_user(d / "nic0.sock", reconnect=True)],
            kernel_args="vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2",
        ) as m:
            m.run("ping -i 0.1 10.0.2.2 > /dev/null 2>&1 &", timeout=10)
            yield Guest(device, m)
    finally:
        device.close()


def test_library_is_what_this_module_plays() -> None:
    assert sorted(p.stem for p in SCENARIOS.glob("*.toml")) == sorted(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_scenario_plays_against_linux(guest: Guest, name: str) -> None:
    m = guest.machine
    engine = FaultEngine.for_device(guest.device, seed=1)
    report = play(SCENARIOS / f"{name}.toml", guest.device, m.console, m.qmp, engine=engine)  # type: ignore[attr-defined]
    assert report.ok, report.format()
    engine.clear()
    if name == "hostile-device":
        # Linux's virtio_ring refuses the bogus used ids and marks the queue broken; the
        # stock driver does not recover (the guest may stop servicing its shell), so read
        # the kernel's complaint straight off the console instead of running a command.
        match = m.console.expect(  # type: ignore[attr-defined]
            r"virtio_net \S+: (input|output)\.\d+:id \d+ (is not a head|out of range)",
            timeout=60,
            fail_patterns=[],
        )
        assert match is not None
    else:
        out, status = m.run("ping -c 3 -W 2 10.0.2.2", timeout=30)  # type: ignore[attr-defined]
        assert status == 0, f"guest did not recover after {name}:\n{out}"


def test_vdev_run_scenario_cli_exit_status(tmp_path: Path) -> None:
    """`vdev run --scenario` exits 2 on an invalid file (before booting anything)."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nname = "x"\nduration = 1\n[[rule]]\naction = "explode"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--scenario", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "bad.toml" in proc.stderr and "explode" in proc.stderr
