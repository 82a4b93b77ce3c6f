"""Legal ring traffic: wrap-around at every position, full and empty rings, multi-buflet
packets, purge on close, delivery back-pressure, statistics."""

from __future__ import annotations

import pytest

from vdev.skywalk import Channel, KillReason, Pbufpool, Port, SyncKind
from vdev.skywalk.stats import RingStats, ewma
from vdev.skywalk.validate import rx_validate, tx_validate

from . import hostile as H
from .conftest import assert_no_leak

# Every test here runs against both validate.py backends (python and compiled C).
pytestmark = pytest.mark.usefixtures("backend")

N = 8


def _frames(k: int, size: int = 64, tag: int = 0) -> list[bytes]:
    return [bytes([(tag + i) & 0xFF]) * size for i in range(k)]


@pytest.mark.parametrize("start", range(N))
def test_wraparound_every_position(start: int) -> None:
    pool = Pbufpool(num_packets=128)
    port = Port.loopback(pool, ring_slots=N)
    a, b = port.open_channel(), port.open_channel()
    for i in range(start):  # move every ring's indices to `start`
        assert a.send([bytes([i]) * 10]) == 1
        assert b.recv(max=1) == [bytes([i]) * 10]
    b.sync(SyncKind.RX)  # give the released slots back to the kernel
    assert a.tx_ring.head == start and b.rx_ring.head == start == b.rx_ring.khead
    frames = _frames(N - 1, tag=start)
    assert a.send(frames) == N - 1  # a full ring's worth, crossing the wrap
    assert b.rx_ring.available() == 0  # not synced yet: nothing visible
    b.sync(SyncKind.RX)
    assert b.available_slot_count(b.rx_ring) == N - 1  # RX ring full
    assert b.rx_ring.ready_slots == N - 1
    got = b.recv(max=100)
    assert got == frames
    assert b.recv() == []  # empty ring
    a.close()
    b.close()
    assert_no_leak(pool)


def test_full_tx_ring_by_hand() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port(pool, ring_slots=N)
    ch = port.open_channel()
    ring = ch.tx_ring
    assert ch.available_slot_count(ring) == N - 1
    s = ch.get_next_slot(ring)
    for i in range(N - 1):
        assert s is not None
        H.stage_tx(ch, bytes([i]) * 20)
        ch.advance_slot(ring, s)
        s = ch.get_next_slot(ring, s) if i < N - 2 else None
    assert ch.available_slot_count(ring) == 0
    assert ring.head == ring.tail and ch.get_next_slot(ring) is None
    assert ch.pending(ring)
    ch.sync(SyncKind.TX)
    assert not ch.pending(ring)
    stats = port.channels[0].tx.stats
    assert port.stats.tx_dropped == N - 1  # on_transmit None: freed and counted
    assert (stats.total_slots, stats.max_slots, stats.total_bytes) == (N - 1, N - 1, 20 * (N - 1))
    ch.close()
    assert_no_leak(pool)


def test_loopback_overflow_drops_and_counts() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port.loopback(pool, ring_slots=N)
    a, b = port.open_channel(), port.open_channel()
    assert a.send(_frames(N + 2)) == N + 2
    assert len(b.recv(max=100)) == N - 1
    assert port.stats.tx_dropped == 3
    port.close()
    assert_no_leak(pool)


def test_deliver_backpressure_caller_frees_rest() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port(pool, ring_slots=N)
    ch = port.open_channel()
    pkts = [pool.packet_from_bytes(bytes([i]) * 30) for i in range(12)]
    ok = [p for p in pkts if p is not None]
    taken = port.deliver(ok)
    assert taken == N - 1
    pool.free_packets(ok[taken:])
    got = ch.recv(max=100)
    assert got == [bytes([i]) * 30 for i in range(N - 1)]
    assert port.deliver([]) == 0
    ch.close()
    assert port.deliver(pool.alloc_packets(1)) == 0  # no channel: nothing taken
    pool.free_packets([i for i in range(64) if pool.pkt_state[i]])
    assert_no_leak(pool)


def test_multi_buflet_channel_to_device_and_back() -> None:
    pool = Pbufpool(num_packets=64, max_frags=4, num_large_bufs=4, large_buf_size=16384)
    seen: list[tuple[bytes, int, bytes | None]] = []

    def on_tx(port: Port, pkts: list[int]) -> None:
        for i in pkts:
            seen.append((pool.packet_bytes(i), pool.packet_nbufs(i), pool.packet_vnet(i)))
        pool.free_packets(pkts)

    port = Port(pool, ring_slots=N, on_transmit=on_tx)
    ch = port.open_channel(alloc_nbufs=4)
    frame = bytes(range(256)) * 30  # 7680 bytes: four buflets
    assert ch.send([frame, b"small"]) == 2
    assert seen[0][:2] == (frame, 4) and seen[1][0] == b"small"
    # vnet header set by the client reaches the device.
    p = ch.packet_alloc()
    assert p is not None
    ch.packet_write(p, b"v" * 70, vnet=bytes(range(12)))
    s = ch.tx_ring.head
    ch.slot_attach_packet(ch.tx_ring, s, p)
    ch.advance_slot(ch.tx_ring, s)
    ch.sync(SyncKind.TX)
    assert seen[-1] == (b"v" * 70, 4, bytes(range(12)))
    with pytest.raises(ValueError):
        ch.send([b"x" * 9000])  # larger than an ALLOC-ring packet
    # Device -> channel: a 64 KiB large-buffer packet and a chained default one.
    big = bytes(range(256)) * 256
    i1 = pool.packet_from_bytes(big)
    i2 = pool.packet_from_bytes(b"q" * 5000, vnet=bytes(12))
    assert i1 is not None and i2 is not None
    assert port.deliver([i1, i2]) == 2
    got = ch.recv(max=10)
    assert got == [big, b"q" * 5000]
    ch.sync(SyncKind.RX)  # release: the kernel's byte count is exact even for 64 KiB
    hdr = H.ring_hdr(ch, ch.rx_ring)
    assert (hdr.ready_slots, hdr.ready_bytes) == (0, 0)
    ch.close()
    assert_no_leak(pool)


def test_purge_on_close_reclaims_everything() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port(pool, ring_slots=N)
    ch = port.open_channel()
    held = [ch.packet_alloc() for _ in range(3)]  # held by the client, never returned
    assert None not in held
    port.deliver(
        [p for p in (pool.packet_from_bytes(b"a" * 10) for _ in range(3)) if p is not None]
    )
    ch.sync(SyncKind.RX)  # published: now client-held
    port.deliver(
        [p for p in (pool.packet_from_bytes(b"b" * 10) for _ in range(2)) if p is not None]
    )
    assert pool.stats.in_use > 0
    owner = port.channels[0].owner
    assert pool.owner_count(owner) >= 6
    ch.close()
    assert pool.stats.in_use == 0
    assert pool.owner_count(owner) == 0
    assert_no_leak(pool)


def test_defunct_channel_does_not_disturb_others() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port.loopback(pool, ring_slots=N)
    a, b, c = port.open_channel(), port.open_channel(), port.open_channel()
    H.ring_hdr(c, c.tx_ring).ring_head = 99
    with pytest.raises(Exception) as ei:
        c.sync(SyncKind.TX)
    assert getattr(ei.value, "reason", None) is KillReason.BASIC_SANITY
    assert a.send([b"still works"]) == 1
    assert b.recv() == [b"still works"]
    port.close()
    assert_no_leak(pool)


def test_ring_stats_and_ewma() -> None:
    t = [100.0]
    st = RingStats(clock=lambda: t[0])
    st.update(4, 400)
    st.update(0, 0)
    st.update(2, 200)
    assert (st.syncs, st.transfers, st.total_slots, st.total_bytes) == (3, 2, 6, 600)
    assert (st.min_slots, st.max_slots) == (2, 4)
    t[0] += 2.0
    st.update(1, 100)  # interval over: 600 bytes / 6 slots in 2 s
    assert (st.bytes_per_second, st.slots_per_second) == (300, 3)
    assert st.bytes_per_second_ma == 300
    t[0] += 2.0
    st.update(1, 100)  # 100 bytes in 2 s -> 50/s; EWMA moves a quarter of the way
    assert st.bytes_per_second == 50
    assert st.bytes_per_second_ma == ewma(300, 50) == (300 * 4 - 300 + 50) >> 2
    assert (st.min_slots, st.max_slots) == (1, 1)


def test_ready_counters_published() -> None:
    pool = Pbufpool(num_packets=64)
    port = Port(pool, ring_slots=N)
    ch = port.open_channel()
    port.deliver(
        [p for p in (pool.packet_from_bytes(b"r" * 100) for _ in range(3)) if p is not None]
    )
    ch.sync(SyncKind.RX)
    hdr = H.ring_hdr(ch, ch.rx_ring)
    assert (hdr.ready_slots, hdr.ready_bytes) == (3, 300)
    ch.recv()
    ch.sync(SyncKind.RX)
    assert (hdr.ready_slots, hdr.ready_bytes) == (0, 0)
    assert H.ring_hdr(ch, ch.tx_ring).ready_slots == N - 1
    ch.close()
    assert_no_leak(pool)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((8, 0, 7, 0, 7, 8, 7), KillReason.BASIC_SANITY),
        ((8, 9, 7, 0, 7, 0, 7), KillReason.BASIC_SANITY),
        ((8, 2, 7, 3, 6, 1, 6), KillReason.HEAD_OOB),
        ((8, 2, 7, 3, 6, 7, 6), KillReason.HEAD_OOB),
        ((8, 5, 3, 5, 2, 4, 2), KillReason.HEAD_OOB_WRAPPED),
        ((8, 5, 3, 5, 2, 6, 3), KillReason.TAIL_MISMATCH),
        ((8, 5, 3, 5, 2, 1, 2), None),
    ],
)
def test_tx_validate_rules(args: tuple[int, ...], reason: KillReason | None) -> None:
    """TX rule on states a kernel that completes lazily could reach (rtail >= rhead)."""
    res = tx_validate(*args)
    assert (res[0] if res else None) is reason


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((8, 2, 5, 5, 1, 5), KillReason.HEAD_OOB),
        ((8, 2, 5, 5, 6, 5), KillReason.HEAD_OOB),
        ((8, 6, 2, 2, 4, 2), KillReason.HEAD_OOB_WRAPPED),
        ((8, 6, 2, 2, 7, 2), None),
        ((8, 6, 2, 2, 1, 2), None),
        ((8, 6, 2, 2, 1, 3), KillReason.TAIL_MISMATCH),
    ],
)
def test_rx_validate_rules(args: tuple[int, ...], reason: KillReason | None) -> None:
    res = rx_validate(*args)
    assert (res[0] if res else None) is reason


def test_channel_info_json_round_trip(pool: Pbufpool) -> None:
    from vdev.skywalk import ChannelInfo

    port = Port(pool, ring_slots=N)
    h = port.open_kernel_channel()
    info = h.info()
    assert ChannelInfo.from_json(info.to_json()) == info
    ch = Channel(pool.arena, info, h.sync, closer=h.close)
    assert ch.send([b"x"]) == 1
    ch.close()


def test_failing_on_transmit_leaves_ring_consistent() -> None:
    pool = Pbufpool(num_packets=64)
    calls: list[list[int]] = []

    def on_tx(port: Port, pkts: list[int]) -> None:
        calls.append(pkts)
        pool.free_packets(pkts)
        if len(calls) == 1:
            raise RuntimeError("device bug")

    port = Port(pool, ring_slots=N, on_transmit=on_tx)
    ch = port.open_channel()
    with pytest.raises(RuntimeError):
        ch.send([b"a", b"b"])
    assert not ch.pending(ch.tx_ring)  # finalize ran: khead caught up
    assert ch.send([b"c"]) == 1  # the channel is not defunct: the fault was the device's
    assert [len(c) for c in calls] == [2, 1]
    ch.close()
    assert_no_leak(pool)


def test_legal_offload_fields_pass_internalize() -> None:
    from vdev.abi import lib

    pool = Pbufpool(num_packets=32)
    seen: list[tuple[bytes | None, int]] = []

    def on_tx(port: Port, pkts: list[int]) -> None:
        seen.extend((pool.packet_vnet(i), pool.pkt_cstart[i]) for i in pkts)
        pool.free_packets(pkts)

    port = Port(pool, ring_slots=N, on_transmit=on_tx)
    ch = port.open_channel()
    p, s = H.stage_tx(ch, b"o" * 70)
    q = H.pkt(ch.arena, p)
    q.pflags = lib.SK_PKT_VNET_HDR | lib.SK_PKT_CSUM_PARTIAL
    q.csum_start, q.csum_stuff = 34, 50
    q.vnet.flags, q.vnet.csum_start, q.vnet.csum_offset = 1, 34, 16  # ends at 52 <= 70
    q.l2_len = 14
    ch.advance_slot(ch.tx_ring, s)
    ch.sync(SyncKind.TX)
    vnet = seen[0][0]
    assert vnet is not None and vnet[0] == 1 and seen[0][1] == 34
    ch.close()
    assert_no_leak(pool)
