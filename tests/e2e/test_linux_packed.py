"""The stock Linux virtio_net driver on packed virtqueues (virtio 1.x 2.8): QEMU 7.2's
``virtio-net-pci,packed=on`` with a vhost-user backend, against a NIC that offers
VIRTIO_F_RING_PACKED.  One booted guest shared by the module; every count is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from test_linux_nic import GUEST_MAC, HOST_MAC, host_frames, sink_count, to_guest

from vdev.net.device import Device
from vdev.net.nic import VirtioNet
from vdev.skywalk import Channel
from vdev.testing.frames import ETH_TEST, tools_payload
from vdev.virtio.packed import PackedQueue
from vdev.virtio.queue import F_RING_PACKED

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_IP = "10.0.2.15"


@dataclass
class Rig:
    device: Device
    nic: VirtioNet
    host: Channel
    machine: object  # host.machine.Machine

    def sh(self, cmd: str, timeout: float = 60) -> str:
        out, status = self.machine.run(cmd, timeout=timeout)  # type: ignore[attr-defined]
        assert status == 0, f"guest command failed ({status}): {cmd}\n{out}"
        return str(out)

    def queues(self) -> dict[str, dict[str, object]]:
        return self.device.stats()["nics"][0]["queues"]  # type: ignore[index,no-any-return]


@pytest.fixture(scope="module")
def rig(linux_image: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from host.machine import Machine, Nic

    d = tmp_path_factory.mktemp("linux-packed")
    sock = d / "nic0.sock"
    device = Device()
    try:
        nic = device.add_nic(str(sock), mac=GUEST_MAC, queue_pairs=2, mtu=9000)
        nic.offered |= F_RING_PACKED
        device.start()
        host = device.open_channel("host", ring_slots=2048, alloc_nbufs=5)
        machine = Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[
                Nic.vhost_user(sock, mac=GUEST_MAC, queues=2, mtu=9000, device_props=",packed=on")
            ],
            kernel_args=f"vdev.ip={GUEST_IP}/24 vdev.gw=10.0.2.2",
            cpus=2,
        )
        with machine:
            yield Rig(device, nic, host, machine)
        host.close()
    finally:
        device.close()


def test_packed_rings_negotiated(rig: Rig) -> None:
    """QEMU 7.2 with packed=on and Linux negotiate RING_PACKED: a regression there is a
    failure, not a skip (the module's other tests would silently test split rings).
    Mutation killed (it was a skip): RING_PACKED masked out of GET_FEATURES
    (tools/mutants/section5-qemu.toml ``e2e-packed-not-offered``)."""
    negotiated = rig.nic.negotiated
    assert negotiated & F_RING_PACKED, f"RING_PACKED not negotiated (features {negotiated:#x})"
    assert rig.sh("cat /sys/class/net/eth0/carrier").strip().endswith("1")
    # Linux exposes the negotiated feature bits as a string of 0/1 per bit.
    bits = rig.sh("cat /sys/class/net/eth0/device/features").strip().splitlines()[-1]
    assert bits[34] == "1", bits
    kinds = {type(v.queue).__name__ for v in rig.nic.vrings.values()}
    assert kinds == {PackedQueue.__name__}, kinds


def test_ping_responder_no_loss(rig: Rig) -> None:
    out = rig.sh("ping -c 20 -i 0.05 -W 2 10.0.2.2", timeout=30)
    assert "20 packets received, 0% packet loss" in out


def test_guest_to_host_channel_exact(rig: Rig) -> None:
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    # 1000 frames: the 256-entry TX ring wraps (its wrap counter flips) several times.
    rig.sh(f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 1000 --size 200")
    got = host_frames(rig.host, 1000, src)
    assert len(got) == 1000
    assert all(len(f) == 200 and f[12:14] == ETH_TEST.to_bytes(2, "big") for f in got)
    assert host_frames(rig.host, 1, src, timeout=0.3) == []  # and not one more


def test_host_channel_to_guest_exact(rig: Rig) -> None:
    frames = [to_guest(5000, tools_payload(i, 256)) for i in range(800)]
    assert sink_count(rig, 800, frames, 5000) == 800  # type: ignore[arg-type]


def test_jumbo_frames_use_mergeable_rx(rig: Rig) -> None:
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    rig.sh(f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 20 --size 9014")
    assert [len(f) for f in host_frames(rig.host, 20, src)] == [9014] * 20
    merged_before = int(rig.queues()["rx0"]["merged"])  # type: ignore[call-overload]
    big = [to_guest(5001, tools_payload(i, 8972)) for i in range(30)]
    assert sink_count(rig, 30, big, 5001) == 30  # type: ignore[arg-type]
    merged = int(rig.queues()["rx0"]["merged"]) - merged_before  # type: ignore[call-overload]
    assert merged >= 30
    kills = {name: q["kills"] for name, q in rig.queues().items()}
    assert all(k == {} for k in kills.values()), kills


def test_two_queue_pairs_carry_traffic(rig: Rig) -> None:
    """The guest enabling its second pair makes QEMU 7.2 restart the device: GET_VRING_BASE
    then SET_VRING_BASE with the packed encoding (index and wrap counters) on every ring."""
    assert rig.sh("ls /sys/class/net/eth0/queues/").count("tx-") == 2
    before = {name: int(q["frames"]) for name, q in rig.queues().items()}  # type: ignore[call-overload]
    src = bytes.fromhex(GUEST_MAC.replace(":", ""))
    rig.sh(
        f"taskset -c 0 vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 300 --size 128 & "
        f"taskset -c 1 vdev-pktgen --raw eth0 --dst-mac {HOST_MAC} --count 300 --size 128; wait"
    )
    assert len(host_frames(rig.host, 600, src)) == 600
    flows = [to_guest(5002, tools_payload(i, 64), sport=20000 + i) for i in range(200)]
    assert sink_count(rig, 200, flows, 5002) == 200  # type: ignore[arg-type]
    after = {name: int(q["frames"]) for name, q in rig.queues().items()}  # type: ignore[call-overload]
    delta = {name: after[name] - before[name] for name in after}
    assert delta["tx0"] > 0 and delta["tx1"] > 0, delta
    assert delta["rx0"] > 0 and delta["rx1"] > 0, delta
    kinds = {type(v.queue).__name__ for v in rig.nic.vrings.values()}
    assert kinds == {PackedQueue.__name__}, kinds
