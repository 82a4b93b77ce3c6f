"""The device's data path on both ring formats: every test that does not depend on the
format runs once on split rings (2.7) and once on packed rings (2.8) (the ``mode``
fixture: the QEMU-free frontend negotiates VIRTIO_F_RING_PACKED with ``packed=True`` or
masks it with ``packed=False`` against a NIC that offers it); packed-only cases follow.
Split-only device behaviour is in test_device.py."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.abi import lib
from vdev.net.device import Device
from vdev.net.nic import DEFAULT_FEATURES
from vdev.testing.frames import (
    GUEST_MAC,
    HOST_MAC,
    RESPONDER_IP,
    arp_request,
    icmp_echo,
    numbered,
    seq_of,
    udp,
)
from vdev.testing.frontend import VirtioNetFrontend
from vdev.vhost.connection import connect
from vdev.vhost.frontend import VhostUserFrontend
from vdev.virtio.packed import F_INDIRECT, F_NEXT, F_WRITE
from vdev.virtio.packed_driver import PackedDriverQueue
from vdev.virtio.queue import F_RING_PACKED

from .conftest import drain_channel, kills, open_fds, still_receives, wait_for_kill

MODES = ["split", "packed"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def add_nic(device: Device, path: str, queue_pairs: int = 1) -> None:
    nic = device.add_nic(path, queue_pairs=queue_pairs)
    nic.offered |= F_RING_PACKED  # whatever the default, this NIC offers packed rings


@pytest.fixture
def sock(tmp_path: Path, device: Device) -> str:
    path = str(tmp_path / "nic0.sock")
    add_nic(device, path)
    device.start()
    return path


@pytest.fixture
def fe(sock: str, mode: str) -> Iterator[VirtioNetFrontend]:
    f = VirtioNetFrontend(sock, packed=mode == "packed")
    assert f.packed == (mode == "packed")
    try:
        yield f
    finally:
        f.close()


def test_negotiation_follows_the_option(sock: str, device: Device) -> None:
    with VirtioNetFrontend(sock) as default:
        assert not default.packed  # QEMU 7.2's default: packed=off
    with VirtioNetFrontend(sock, features=DEFAULT_FEATURES) as explicit:
        assert DEFAULT_FEATURES & F_RING_PACKED
        assert not explicit.packed  # only packed=True takes it
    with VirtioNetFrontend(sock, packed=True) as forced:
        assert forced.packed
    with VirtioNetFrontend(sock, packed=False) as split:
        assert not split.packed
        assert not split.features & F_RING_PACKED


def test_arp_icmp_and_udp_echo(fe: VirtioNetFrontend, device: Device) -> None:
    """The built-in responder: ARP reply, ICMP echo replies in order, UDP echo, UDP sink."""
    assert fe.send([arp_request()]) == 1
    (reply,) = fe.recv(1, timeout=2)
    assert reply[12:14] == b"\x08\x06" and struct.unpack_from("!H", reply, 20)[0] == 2
    assert reply[28:32] == RESPONDER_IP and reply[0:6] == GUEST_MAC
    for burst in range(3):  # several bursts: the rings wrap (256 entries, 300 frames)
        fe.send_all([icmp_echo(100 * burst + i) for i in range(100)])
        replies = fe.recv(100, timeout=3)
        assert [r[34] for r in replies] == [0] * 100  # ICMP echo reply type
        assert [struct.unpack_from("!H", r, 40)[0] for r in replies] == [
            100 * burst + i for i in range(100)
        ]
    fe.send([udp(7, b"echo me")])
    (echo,) = fe.recv(1, timeout=2)
    assert echo.endswith(b"echo me") and struct.unpack_from("!H", echo, 34)[0] == 7
    fe.send([udp(9, b"x" * 100) for _ in range(20)])
    deadline = time.monotonic() + 2
    while device.responder.stats.udp_sink_packets < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.responder.stats.udp_sink_packets == 20
    assert device.responder.stats.udp_sink_bytes == 2000


def test_exact_counts_both_ways(sock: str, device: Device, mode: str) -> None:
    _exact_counts_both_ways(sock, device, mode, 256)


def test_exact_counts_packed_ring_of_any_size(sock: str, device: Device) -> None:
    """2.8: packed ring sizes need not be powers of two (split ones must, 2.7)."""
    _exact_counts_both_ways(sock, device, "packed", 100)


def _exact_counts_both_ways(sock: str, device: Device, mode: str, ring_size: int) -> None:
    ch = device.open_channel("host", ring_slots=1024)
    with VirtioNetFrontend(sock, packed=mode == "packed", ring_size=ring_size) as f:
        frames = [numbered(HOST_MAC, GUEST_MAC, i, 60 + i % 1400) for i in range(2000)]
        sent = 0
        got: list[bytes] = []
        deadline = time.monotonic() + 20
        while (sent < len(frames) or len(got) < len(frames)) and time.monotonic() < deadline:
            if sent < len(frames):
                sent += f.send(frames[sent : sent + 128])
            got += ch.recv(512, timeout=0.01)
        assert sent == 2000
        assert [seq_of(f) for f in got] == list(range(2000))
        assert got == frames

        back = [numbered(GUEST_MAC, HOST_MAC, i, 1514) for i in range(1500)]
        sent = 0
        rx: list[bytes] = []
        deadline = time.monotonic() + 20
        while len(rx) < len(back) and time.monotonic() < deadline:
            if sent < len(back):
                sent += ch.send(back[sent : sent + 64])
            rx += f.recv(timeout=0.01)
        assert rx == back
        q = device.stats()["nics"][0]["queues"]  # type: ignore[index]
        assert q["rx0"]["drops"] == 0 and q["tx0"]["frames"] == 2000
        assert q["rx0"]["frames"] == 1500
    ch.close()


@pytest.mark.parametrize("size", [1514, 2100, 9014, 65000])
def test_mergeable_rx_spans_buffers(sock: str, device: Device, mode: str, size: int) -> None:
    ch = device.open_channel("host", alloc_nbufs=4)
    with VirtioNetFrontend(sock, packed=mode == "packed", rx_buf_size=2048) as fe:
        assert fe.has(lib.VIRTIO_NET_F_MRG_RXBUF)
        for n in range(40):  # enough frames to wrap the 256-entry RX ring several times
            frame = numbered(GUEST_MAC, HOST_MAC, n, size)
            if size <= 8192 and n % 2 == 0:
                assert ch.send([frame]) == 1  # from a host channel's ALLOC-ring packet
            else:
                # Larger than one ALLOC-ring packet: through the switch, as a guest would.
                pkt = device.pool.packet_from_bytes(frame)
                assert pkt is not None
                with device.lock:
                    device.forward("host", [pkt])
            ((hdr, got),) = fe.recv_with_hdr(1, timeout=3)
            assert got == frame
            assert struct.unpack_from("<H", hdr, 10)[0] == -(-(size + 12) // 2048)  # num_buffers
    ch.close()


def test_two_queue_pairs(tmp_path: Path, device: Device, mode: str) -> None:
    path = str(tmp_path / "mq.sock")
    add_nic(device, path, queue_pairs=2)
    device.start()
    ch = device.open_channel("host", ring_slots=1024)
    with VirtioNetFrontend(path, queue_pairs=2, packed=mode == "packed") as f:
        assert f.has(lib.VIRTIO_NET_F_MQ) and f.packed == (mode == "packed")
        a = [numbered(HOST_MAC, GUEST_MAC, i) for i in range(100)]
        b = [numbered(HOST_MAC, GUEST_MAC, 1000 + i) for i in range(100)]
        assert f.send(a, pair=0) == 100 and f.send(b, pair=1) == 100
        got = drain_channel(ch, 200)
        assert sorted(seq_of(x) for x in got) == list(range(100)) + list(range(1000, 1100))
        flows = [udp(10000 + i, b"flow", dst_mac=GUEST_MAC, src_mac=HOST_MAC) for i in range(64)]
        assert ch.send(flows) == 64
        rx = f.recv(64, timeout=3)
        assert sorted(rx) == sorted(flows)
        q = device.stats()["nics"][0]["queues"]  # type: ignore[index]
        assert q["tx0"]["frames"] == 100 and q["tx1"]["frames"] == 100
        assert q["rx0"]["frames"] > 0 and q["rx1"]["frames"] > 0
        assert q["rx0"]["frames"] + q["rx1"]["frames"] == 64
    ch.close()


@pytest.mark.parametrize(
    "hostile",
    [
        "outside_memory",
        "writable_on_tx",
        "id_out_of_range",
        "chain_entry_not_available",
        "indirect_and_next",
        "indirect_table_outside_memory",
    ],
)
def test_hostile_packed_descriptor_kills_tx_only(sock: str, device: Device, hostile: str) -> None:
    with VirtioNetFrontend(sock, packed=True) as f:
        # Move the TX ring off index 0 and past a wrap first, so the hostile entry is checked
        # against a real (index, wrap counter) position.
        for _ in range(3):
            assert f.send_all([icmp_echo(i) for i in range(100)]) == 100
            assert len(f.recv(100, timeout=3)) == 100
        f.reap_tx()
        tx = f.txq(0)
        drv = tx.driver
        assert isinstance(drv, PackedDriverQueue)
        buf = f.mem.alloc(4096)
        i = drv.next_avail
        j = (i + 1) % drv.size
        avail = drv.avail_flags()
        if hostile == "outside_memory":
            drv.write_desc(i, 0x7000_0000_0000, 64, 0, avail)
        elif hostile == "writable_on_tx":
            drv.write_desc(i, buf, 64, 0, avail | F_WRITE)
        elif hostile == "id_out_of_range":
            drv.write_desc(i, buf, 64, drv.size + 3, avail)
        elif hostile == "chain_entry_not_available":
            drv.write_desc(j, buf, 64, 0, drv.avail_flags(drv.avail_wrap ^ 1))
            drv.write_desc(i, buf, 64, 0, avail | F_NEXT)
        elif hostile == "indirect_and_next":
            drv.write_desc(j, buf, 64, 0, avail)
            drv.write_desc(i, buf, 32, 0, avail | F_INDIRECT | F_NEXT)
        else:
            drv.write_desc(i, 0x7000_0000_0000, 64, 0, avail | F_INDIRECT)
        f.kick(tx, force=True)
        assert wait_for_kill(device) == {"INTERNALIZE_FAILED": 1}
        assert kills(device)["rx0"] == {}
        still_receives(device, f)


def _reconnect(f: VirtioNetFrontend, path: str, bases: dict[int, int]) -> VhostUserFrontend:
    """QEMU's restart on a new connection with the same guest rings and driver state: the
    handshake, features, memory, then every ring with the base GET_VRING_BASE returned."""
    vhost = VhostUserFrontend(connect(path, timeout=5.0))
    vhost.handshake()
    vhost.set_features(f.features)
    vhost.share_memory(f.mem)
    for index, q in sorted(f.queues.items()):
        setup = f.vhost.vrings[index]
        vhost.setup_vring(
            index,
            setup.num,
            setup.desc_gpa,
            setup.avail_gpa,
            setup.used_gpa,
            q.kick_fd,
            q.call_fd,
            bases[index],
        )
    vhost.driver_ok()
    return vhost


def test_reconnect_restores_position_and_wrap(sock: str, device: Device, mode: str) -> None:
    fds_before = open_fds()
    f = VirtioNetFrontend(sock, packed=mode == "packed", ring_size=8)
    try:
        for k in range(13):  # 13 frames through 8-entry rings: the packed wrap counter flips
            assert f.send([icmp_echo(k)]) == 1
            assert len(f.recv(1, timeout=2)) == 1
            f.reap_tx()
        bases = f.stop()
        if mode == "packed":
            # GET_VRING_BASE, packed: avail idx 13 % 8 = 5 with wrap 1 ^ 1 = 0 in bits 0-15,
            # the used idx/wrap (the same: nothing in flight) in bits 16-31.
            assert bases[1] == 5 | 5 << 16
            assert bases[0] == 5 | 5 << 16  # RX: 13 single-buffer frames too
        else:
            assert bases[1] == 13 and bases[0] == 13
        f.vhost.close()
        time.sleep(0.2)
        f.vhost = _reconnect(f, sock, bases)
        for k in range(13, 30):  # and on across the next wraps
            assert f.send([icmp_echo(k)]) == 1
            (reply,) = f.recv(1, timeout=2)
            assert struct.unpack_from("!H", reply, 40)[0] == k
            f.reap_tx()
        assert kills(device) == {"rx0": {}, "tx0": {}}
        assert device.stats()["nics"][0]["connections"] == 2  # type: ignore[index]
    finally:
        f.close()
    time.sleep(0.2)
    assert open_fds() - fds_before == set()


def test_rx_backlog_waits_for_buffers(sock: str, device: Device, mode: str) -> None:
    """More mergeable frames than posted buffers: the device rewinds partial pops and waits
    for the kick (2.8.10 device event suppression), then delivers everything in order."""
    ch = device.open_channel("host", alloc_nbufs=4)
    with VirtioNetFrontend(sock, packed=mode == "packed", ring_size=16, rx_buf_size=2048) as f:
        frames = [numbered(GUEST_MAC, HOST_MAC, i, 5000) for i in range(20)]  # 3 bufs each
        sent = 0
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < len(frames) and time.monotonic() < deadline:
            if sent < len(frames):
                sent += ch.send(frames[sent : sent + 8])
            got += f.recv(timeout=0.02)
        assert got == frames
        assert kills(device) == {"rx0": {}, "tx0": {}}
    ch.close()


@pytest.mark.parametrize("fault", ["drop", "stall_and_delay", "bad_used_len", "bad_used_id"])
def test_fault_engine_on_packed_rings(tmp_path: Path, device: Device, fault: str) -> None:
    """The fault engine's ring actions (push/push_raw/patch_last_used/inflight_writable) on a packed
    queue: data faults and delays are survivable, lying used descriptors are caught by the
    driver (PackedDriverQueue checks every id and length it is handed back)."""
    from vdev.faults import FaultEngine

    path = str(tmp_path / "f.sock")
    add_nic(device, path)
    device.start()
    engine = FaultEngine(device, seed=1, log=str(tmp_path / "faults.jsonl"))
    try:
        with VirtioNetFrontend(path, packed=True, ring_size=64) as f:
            nf = engine.nic(0)
            if fault == "drop":
                with nf.drop(queue="rx", every=2) as rule:
                    f.send_all([icmp_echo(i) for i in range(10)])
                    got = f.recv(5, timeout=2)
                assert sorted(struct.unpack_from("!H", r, 40)[0] for r in got) == [0, 2, 4, 6, 8]
                assert rule.hits == 5
            elif fault == "stall_and_delay":
                with nf.stall(queue="tx", seconds=0.3):
                    f.send([icmp_echo(1)])
                    time.sleep(0.1)
                    assert f.reap_tx() == 0
                    assert len(f.recv(1, timeout=3)) == 1  # resumed by the stall end
                with nf.delay_used(queue="tx", ms=300, nth=1):
                    f.send([icmp_echo(2)])
                    time.sleep(0.1)
                    assert f.reap_tx() == 0  # consumed, used descriptor not yet written
                    deadline = time.monotonic() + 3
                    done = 0
                    while not done and time.monotonic() < deadline:
                        done = f.reap_tx()
                        time.sleep(0.01)
                    assert done == 1
                assert len(f.recv(1, timeout=2)) == 1
            elif fault == "bad_used_len":
                with nf.bad_used_len(queue="rx", nth=1), pytest.raises(RuntimeError, match="len"):
                    f.send_all([icmp_echo(1)])
                    f.recv(1, timeout=2)
            else:
                with (
                    nf.bad_used_id(queue="rx", nth=1),
                    pytest.raises(RuntimeError, match="not in flight"),
                ):
                    f.send_all([icmp_echo(1)])
                    f.recv(1, timeout=2)
            assert kills(device) == {"rx0": {}, "tx0": {}}
    finally:
        engine.clear()
        engine.log.close()
