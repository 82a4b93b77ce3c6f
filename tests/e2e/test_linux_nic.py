"""The stock Linux virtio_net driver against vdev: one booted guest shared by the module.

The guest has 2 vCPUs and a NIC with 2 queue pairs and a 9000-byte MTU (host_mtu), the
device runs in this process with a host channel on its switch, and every count is exact.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vdev.net.device import Device
from vdev.net.nic import VirtioNet
from vdev.skywalk import Channel
from vdev.testing.frames import ETH_TEST, tools_payload, udp

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_MAC = "52:54:00:12:34:56"
HOST_MAC = "02:00:00:00:00:aa"
GUEST_IP = "10.0.2.15"
HOST_IP = bytes([10, 0, 2, 3])


@dataclass
class Rig:
    device: Device
    nic: VirtioNet
    host: Channel
    machine: object  # host.machine.Machine
    pcap: Path

    def sh(self, cmd: str, timeout: float = 60) -> str:
        out, status = self.machine.run(cmd, timeout=timeout)  # type: ignore[attr-defined]
        assert status == 0, f"guest command failed ({status}): {cmd}\n{out}"
        return str(out)

    def queues(self) -> dict[str, dict[str, object]]:
        return self.device.stats()["nics"][0]["queues"]  # type: ignore[index,no-any-return]


@pytest.fixture(scope="module")
def rig(linux_image: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from host.machine import Machine, Nic

    d = tmp_path_factory.mktemp("linux-nic")
    sock = d / "nic0.sock"
    device = Device(pcap=str(d / "capture.pcapng"))
    try:
        nic = device.add_nic(str(sock), mac=GUEST_MAC, queue_pairs=2, mtu=9000)
        device.start()
        host = device.open_channel("host", ring_slots=2048, alloc_nbufs=5)
        machine = Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[Nic.vhost_user(sock, mac=GUEST_MAC, queues=2, mtu=9000)],
            kernel_args=f"vdev.ip={GUEST_IP}/24 vdev.gw=10.0.2.2",
            cpus=2,
        )
        with machine:
            yield Rig(device, nic, host, machine, d / "capture.pcapng")
        host.close()
    finally:
        device.close()


def host_frames(ch: Channel, want: int, src: bytes, timeout: float = 20) -> list[bytes]:
    """Test-ethertype frames from ``src`` received on the host channel."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for f in ch.recv(512, timeout=0.05):
            if f[6:12] == src and f[12:14] == ETH_TEST.to_bytes(2, "big"):
                got.append(f)
    return got


def sink_count(rig: Rig, count: int, frames: list[bytes], port: int) -> int:
    """Start the guest sink, send ``frames`` from the host channel, return what it counted."""
    console = rig.machine.console  # type: ignore[attr-defined]
    console.sendline(f"vdev-sink --udp {port} --count {count} --timeout-ms 15000")
    console.expect("sink ready", timeout=10)
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(frames) and time.monotonic() < deadline:
        sent += rig.host.send(frames[sent : sent + 32])
        time.sleep(0.001)
    assert sent == len(frames)
    m = console.expect(r"sink rx_packets=(\d+) rx_bytes=(\d+)", timeout=30)
    console.expect(re.escape("vdev-guest# "), timeout=10)
    return int(m.group(1))


def to_guest(port: int, payload: bytes, sport: int = 40000) -> bytes:
    return udp(
        port,
        payload,
        sport=sport,
        dst_mac=bytes.fromhex(GUEST_MAC.replace(":", "")),
        src_mac=bytes.fromhex(HOST_MAC.replace(":", "")),
        src_ip=HOST_IP,
        dst_ip=bytes(map(int, GUEST_IP.split("."))),
    )


def test_link_up_and_features(rig: Rig) -> None:
    assert rig.sh("cat /sys/class/net/eth0/carrier").strip().endswith("1")
    assert rig.sh("cat /sys/class/net/eth0/mtu").strip().endswith("9000")
    negotiated = rig.nic.negotiated
    for bit in (32, 15, 29):  # VERSION_1, MRG_RXBUF, EVENT_IDX
        assert negotiated & (1 << bit), f"feature bit {bit} not negotiated: {negotiated:#x}"


def test_ping_responder_no_loss(rig: Rig) -> None:
    out = rig.sh("ping -c 10 -i 0.1 -W 2 10.0.2.2", timeout=30)
    assert "10 packets received, 0% packet loss" in out


def test_guest_to_host_channel_exact(rig: Rig) -> None:
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    rig.sh(f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 1000 --size 200")
    got = host_frames(rig.host, 1000, src)
    assert len(got) == 1000
    assert all(len(f) == 200 for f in got)
    assert host_frames(rig.host, 1, src, timeout=0.3) == []  # and not one more


def test_host_channel_to_guest_exact(rig: Rig) -> None:
    frames = [to_guest(5000, tools_payload(i, 256)) for i in range(800)]
    assert sink_count(rig, 800, frames, 5000) == 800


def test_jumbo_frames_both_ways_use_mergeable_rx(rig: Rig) -> None:
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    rig.sh(f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 20 --size 9014")
    got = host_frames(rig.host, 20, src)
    assert [len(f) for f in got] == [9014] * 20
    merged_before = sum(int(q["merged"]) for q in rig.queues().values())  # type: ignore[call-overload]
    big = [to_guest(5001, tools_payload(i, 8972)) for i in range(30)]  # IP total 9000 = MTU
    small = [to_guest(5001, tools_payload(30 + i, 1472)) for i in range(30)]  # 1500-byte IP
    assert sink_count(rig, 60, big + small, 5001) == 60
    merged = sum(int(q["merged"]) for q in rig.queues().values()) - merged_before  # type: ignore[call-overload]
    assert merged >= 30, "9000-byte frames should span several mergeable RX buffers"


def test_two_queue_pairs_carry_traffic(rig: Rig) -> None:
    assert rig.sh("ls /sys/class/net/eth0/queues/").count("tx-") == 2
    before = {name: int(q["frames"]) for name, q in rig.queues().items()}  # type: ignore[call-overload]
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    rig.sh(
        f"taskset -c 0 vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 300 --size 128 & "
        f"taskset -c 1 vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 300 --size 128; wait"
    )
    assert len(host_frames(rig.host, 600, src)) == 600
    flows = [to_guest(5002, tools_payload(i, 64), sport=20000 + i) for i in range(200)]
    assert sink_count(rig, 200, flows, 5002) == 200
    after = {name: int(q["frames"]) for name, q in rig.queues().items()}  # type: ignore[call-overload]
    delta = {name: after[name] - before[name] for name in after}
    assert delta["tx0"] > 0 and delta["tx1"] > 0, delta
    assert delta["rx0"] > 0 and delta["rx1"] > 0, delta
    assert delta["rx0"] + delta["rx1"] >= 200


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_capture_has_both_directions(rig: Rig) -> None:
    rig.sh("ping -c 3 -i 0.2 10.0.2.2", timeout=30)
    assert rig.device.capture is not None
    rig.device.capture.flush()
    out = subprocess.run(
        ["tshark", "-r", str(rig.pcap), "-Y", "icmp", "-T", "fields", "-e", "icmp.type",
         "-e", "frame.packet_flags_direction"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    rows = [line.split("\t") for line in out.splitlines() if line]
    requests = [r for r in rows if r[0] == "8"]
    replies = [r for r in rows if r[0] == "0"]
    assert len(requests) >= 3 and len(replies) >= 3
    assert {int(r[1], 0) for r in requests} == {1}  # from the guest: inbound to the device
    assert {int(r[1], 0) for r in replies} == {2}  # to the guest: outbound
