"""Every scenario in scenarios/ played against one booted Linux guest through the Python
API, exactly as `vdev run --scenario` plays it: the file's own [traffic] and [liveness]
through the shared implementation (host.scenario_guest.play_on_linux), so these verdicts
and the CLI's cannot differ (tests/e2e/test_scenario_cli.py plays the same files through
the CLI).

One VM serves the module.  ``hostile-device`` breaks the stock Linux driver on purpose
(the file declares it: [liveness] expect = "breaks"), so it runs last but one; the last
test then plays a harmless scenario on the broken guest and checks that the liveness
check fails it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from host.scenario_guest import play_on_linux
from vdev.faults import FaultEngine
from vdev.net.device import Device

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "scenarios"
ORDER = [
    "flaky-link",
    "bursty-loss",
    "pool-exhaustion",
    "backend-crash",
    "crash-in-flight",
    "hostile-device",
]

# The same traffic through the API and through the CLI must give the same counts for
# seeded rules: exactly 30 echo replies and 60 host frames reach the RX hook, whoever plays.
SAME_TRAFFIC = """\
# same-traffic: seeded rules over exactly counted traffic (tests/e2e/test_scenarios.py)
[scenario]
name = "same-traffic"
seed = 4

[[traffic]]
kind = "ping"
rate = 20
count = 30

[[traffic]]
kind = "frames"
direction = "rx"
rate = 50
count = 60

[[rule]]
id = "icmp-loss"
action = "drop"
queue = "rx"
ip_proto = "icmp"
p = 0.3
seed = 5

[[rule]]
id = "raw-loss"
action = "drop"
queue = "rx"
ethertype = 0x88b5
p = 0.25
seed = 9
"""


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
        device.add_nic(str(d / "nic0.sock"), mac="52:54:00:12:34:56")
        device.start()
        with Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[Nic.vhost_user(d / "nic0.sock", mac="52:54:00:12:34:56", reconnect=True)],
            kernel_args="vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2",
            console_log=d / "console.log",
        ) as m:
            yield Guest(device, m)
    finally:
        FaultEngine.for_device(device).close()
        device.close()


def test_library_is_what_this_module_plays() -> None:
    assert sorted(p.stem for p in SCENARIOS.glob("*.toml")) == sorted(ORDER)


def seeded_hits(seed: int | str, p: float, candidates: int) -> int:
    """An independent count: rules draw once per candidate from random.Random(str(seed))."""
    rng = random.Random(str(seed))
    return sum(rng.random() < p for _ in range(candidates))


def test_same_traffic_same_counts_api(guest: Guest, tmp_path: Path) -> None:
    path = tmp_path / "same-traffic.toml"
    path.write_text(SAME_TRAFFIC)
    report = play_on_linux(path, guest.device, guest.machine)  # type: ignore[arg-type]
    assert report.ok, report.format()
    rules = {r["id"]: (r["seen"], r["hits"]) for r in report.rules}
    assert rules == {
        "icmp-loss": (30, seeded_hits(5, 0.3, 30)),
        "raw-loss": (60, seeded_hits(9, 0.25, 60)),
    }, report.format()
    ping, frames = report.traffic
    assert ping["guest_sent"] == 30 and ping["host_received"] == 30
    assert ping["guest_received"] == 30 - rules["icmp-loss"][1]
    assert frames["host_sent"] == 60 and frames["guest_received"] == 60 - rules["raw-loss"][1]


def test_same_traffic_same_counts_cli(linux_image: object, tmp_path: Path) -> None:
    """The CLI path (its own device and guest) counts exactly what the API path counts."""
    path = tmp_path / "same-traffic.toml"
    path.write_text(SAME_TRAFFIC)
    proc = subprocess.run(
        [sys.executable, "-m", "host.cli", "run", "--scenario", str(path), "--json"],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    rules = {r["id"]: (r["seen"], r["hits"]) for r in report["rules"]}
    assert rules == {
        "icmp-loss": (30, seeded_hits(5, 0.3, 30)),
        "raw-loss": (60, seeded_hits(9, 0.25, 60)),
    }


@pytest.mark.parametrize("name", ORDER)
def test_scenario_plays_against_linux(guest: Guest, name: str) -> None:
    m = guest.machine
    report = play_on_linux(SCENARIOS / f"{name}.toml", guest.device, m)  # type: ignore[arg-type]
    assert report.ok, report.format()
    fired = {e.name: e.ok for e in report.expects if e.name.endswith(" fired")}
    assert fired == {f"rule {r['id']} fired": True for r in report.rules if "seen" in r}
    assert report.liveness is not None and report.liveness.checked
    if name == "hostile-device":
        assert report.liveness.expect == "breaks", report.format()
    else:
        assert report.liveness.expect == "recovers"
        # An oracle of its own: the guest's own ping to the responder works afterwards.
        out, status = m.run("ping -c 3 -W 2 10.0.2.2", timeout=30)  # type: ignore[attr-defined]
        assert status == 0, f"guest did not recover after {name}:\n{out}"


def test_liveness_fails_on_the_broken_guest(guest: Guest, tmp_path: Path) -> None:
    """After hostile-device the stock driver's queues are broken: a harmless scenario that
    expects the guest to answer must now FAIL on liveness (before, it passed)."""
    path = tmp_path / "harmless.toml"
    path.write_text('[scenario]\nname = "harmless"\n[liveness]\nwithin = 3.0\n')
    report = play_on_linux(path, guest.device, guest.machine)  # type: ignore[arg-type]
    assert report.liveness is not None and report.liveness.checked
    assert not report.liveness.ok and not report.ok and report.exit_code == 1
    assert "0 of 3 probe answers" in report.liveness.detail


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
