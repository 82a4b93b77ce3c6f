"""Device faults in front of the stock Linux virtio_net driver (one guest for the module)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vdev.faults import FaultEngine
from vdev.net.device import Device

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@dataclass
class Rig:
    device: Device
    machine: object
    engine: FaultEngine

    def sh(self, cmd: str, timeout: float = 60) -> tuple[str, int]:
        return self.machine.run(cmd, timeout=timeout)  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
def rig(linux_image: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from host.machine import Machine, Nic

    d = tmp_path_factory.mktemp("faults-linux")
    device = Device()
    try:
        device.add_nic(str(d / "nic0.sock"))
        device.start()
        engine = FaultEngine.for_device(device, seed=3, log=str(d / "faults.jsonl"))
        with Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[Nic.vhost_user(d / "nic0.sock")],
            kernel_args="vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2",
        ) as m:
            yield Rig(device, m, engine)
        engine.close()
    finally:
        device.close()


def ping_received(out: str) -> int:
    m = re.search(r"(\d+) packets received", out)
    assert m, out
    return int(m.group(1))


def snmp(rig: Rig, proto: str, field: str) -> int:
    out, status = rig.sh(f"grep '^{proto}:' /proc/net/snmp")
    assert status == 0, out
    header, values = (line.split()[1:] for line in out.strip().splitlines()[-2:])
    return int(values[header.index(field)])


def test_seeded_loss_matches_guest_ping_loss(rig: Rig) -> None:
    count = 60
    with rig.engine.nic(0).drop(p=0.1, queue="rx", ip_proto="icmp", seed=11) as rule:
        out, _ = rig.sh(f"ping -c {count} -i 0.05 -W 1 10.0.2.2", timeout=60)
    assert rule.hits > 0
    assert ping_received(out) == count - rule.hits  # every dropped reply is a lost ping


def test_same_seed_same_losses(rig: Rig) -> None:
    hits = []
    for _ in range(2):
        with rig.engine.nic(0).drop(p=0.2, queue="rx", ip_proto="icmp", seed=5) as rule:
            rig.sh("ping -c 30 -i 0.05 -W 1 10.0.2.2", timeout=60)
        hits.append(rule.hits)
    assert hits[0] == hits[1] > 0


def test_corruption_is_caught_by_guest_checksums(rig: Rig) -> None:
    before = snmp(rig, "Icmp", "InCsumErrors")
    # Flip a bit inside the ICMP payload of every echo reply (eth 14 + IP 20 + ICMP 8).
    with rig.engine.nic(0).corrupt(queue="rx", ip_proto="icmp", offsets=[50], mask=0x01) as rule:
        rig.sh("ping -c 5 -i 0.1 -W 1 10.0.2.2", timeout=30)
    assert rule.hits == 5
    # icmp_rcv() verifies the checksum and counts each bad reply.  (busybox ping reads a raw
    # socket, which gets a copy before that check, so its own count proves nothing here.)
    assert snmp(rig, "Icmp", "InCsumErrors") - before == 5


def test_stalled_tx_trips_the_netdev_watchdog_and_recovers(rig: Rig) -> None:
    console = rig.machine.console  # type: ignore[attr-defined]
    rule = rig.engine.nic(0).stall(queue="tx", seconds=40)  # removed once the watchdog fired
    try:
        # Fill the 256-entry TX ring while the device consumes nothing.  One sender stalls
        # at ~170 frames (its socket send buffer is full of uncompleted skbs), so use three.
        console.sendline(
            "for i in 1 2 3; do vdev-pktgen --raw eth0 --dst-mac 02:00:00:00:00:aa "
            "--count 1000 --size 200 > /tmp/pg$i.log 2>&1 & done"
        )
        # Linux 6.1 (Debian): "virtio_net virtio0 eth0: NETDEV WATCHDOG: CPU: 0: transmit
        # queue 0 timed out 5216 ms", then virtnet_tx_timeout logs the queue.
        console.expect(
            r"NETDEV WATCHDOG: .*transmit queue 0 timed out",
            timeout=30,
            fail_patterns=[],
        )
        console.expect(r"TX timeout on queue: 0", timeout=15, fail_patterns=[])
    finally:
        rig.engine.remove(rule.id)
    # Recovery: the device consumes again, the queue restarts, traffic flows.
    deadline = time.monotonic() + 60
    out = ""
    while time.monotonic() < deadline:
        out, status = rig.sh("cat /tmp/pg1.log /tmp/pg2.log /tmp/pg3.log; ping -c 2 -W 1 10.0.2.2")
        if out.count("pktgen tx_packets=1000 ") == 3 and status == 0:
            break
        time.sleep(1)
    assert out.count("pktgen tx_packets=1000 ") == 3 and " 0% packet loss" in out, out
    timeouts, _ = rig.sh("cat /sys/class/net/eth0/queues/tx-0/tx_timeout")
    assert int(timeouts.strip().splitlines()[-1]) >= 1


def test_qmp_link_down_and_up(rig: Rig) -> None:
    m = rig.machine
    with rig.engine.nic(0).link_down(qmp=m.qmp, qmp_name="nic0"):  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        carrier = ""
        while time.monotonic() < deadline:
            carrier, _ = rig.sh("cat /sys/class/net/eth0/carrier")
            if carrier.strip().endswith("0"):
                break
            time.sleep(0.2)
        assert carrier.strip().endswith("0")
        out, _ = rig.sh("ping -c 2 -W 1 10.0.2.2", timeout=30)
        assert ping_received(out) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        carrier, _ = rig.sh("cat /sys/class/net/eth0/carrier")
        if carrier.strip().endswith("1"):
            break
        time.sleep(0.2)
    out, status = rig.sh("ping -c 3 -W 2 10.0.2.2", timeout=30)
    assert status == 0, out
