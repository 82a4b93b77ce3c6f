"""Every KillReason, provoked the way a buggy or hostile client would: by writing the
shared ring header, slots or packet metadata directly, then syncing.

After each violation the channel is defunct (DefunctError, nothing crashes) and the pool has
every packet back.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vdev.abi import lib
from vdev.skywalk import (
    Channel,
    DefunctError,
    KillReason,
    Pbufpool,
    Port,
    SyncError,
    SyncKind,
)

from . import hostile as H
from .conftest import assert_no_leak

# Every test here runs against both validate.py backends (python and compiled C).
pytestmark = pytest.mark.usefixtures("backend")


def _setup(alloc_nbufs: int = 1) -> tuple[Pbufpool, Port, Channel, list[bytes]]:
    pool = Pbufpool(num_packets=128, max_frags=4)
    sent: list[bytes] = []

    def on_tx(port: Port, pkts: list[int]) -> None:
        sent.extend(pool.packet_bytes(i) for i in pkts)
        pool.free_packets(pkts)

    port = Port(pool, ring_slots=8, on_transmit=on_tx)
    ch = port.open_channel(alloc_nbufs=alloc_nbufs)
    return pool, port, ch, sent


def _deliver(pool: Pbufpool, port: Port, n: int, size: int = 100) -> None:
    pkts = [pool.packet_from_bytes(bytes([i]) * size) for i in range(n)]
    ok = [p for p in pkts if p is not None]
    taken = port.deliver(ok)
    pool.free_packets(ok[taken:])


def _expect_kill(
    pool: Pbufpool, port: Port, ch: Channel, kind: SyncKind, reason: KillReason
) -> SyncError:

    with pytest.raises(SyncError) as ei:
        ch.sync(kind)
    err = ei.value
    assert err.reason is reason, err
    assert err.sync is kind
    assert err.detail
    # Defunct from now on, for every kind of call.
    for k in SyncKind:
        with pytest.raises(DefunctError, match="defunct"):
            ch.sync(k)
    with pytest.raises(DefunctError):
        ch.send([b"late"])
    with pytest.raises(DefunctError):
        ch.recv()
    assert ch.available_slot_count(ch.tx_ring) == 0
    # The pool got everything back.
    assert pool.stats.in_use == 0, pool.leaks()
    ch.close()
    port.close()
    assert_no_leak(pool)
    return err


# ---------------------------------------------------------------- ring index violations
def test_basic_sanity_tx_head_beyond_ring() -> None:
    pool, port, ch, _ = _setup()
    H.stage_tx(ch)
    H.ring_hdr(ch, ch.tx_ring).ring_head = 8 + 3
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.BASIC_SANITY)
    assert "head 11" in err.detail


def test_basic_sanity_rx_head_beyond_ring() -> None:
    pool, port, ch, _ = _setup()
    H.ring_hdr(ch, ch.rx_ring).ring_head = 0xFFFFFFFF
    _expect_kill(pool, port, ch, SyncKind.RX, KillReason.BASIC_SANITY)


def test_head_oob_rx_head_past_tail() -> None:
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 3)
    ch.sync(SyncKind.RX)  # khead 0, ktail 3
    H.ring_hdr(ch, ch.rx_ring).ring_head = 5
    _expect_kill(pool, port, ch, SyncKind.RX, KillReason.HEAD_OOB)


def test_head_oob_rx_fresh_channel() -> None:
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 2)
    ch.sync(SyncKind.RX)
    H.ring_hdr(ch, ch.rx_ring).ring_head = 3  # khead 0, ktail 2
    _expect_kill(pool, port, ch, SyncKind.RX, KillReason.HEAD_OOB)


def _alloc_channel(ws: int) -> tuple[Pbufpool, Port, Channel]:
    pool = Pbufpool(num_packets=64)
    port = Port(pool, ring_slots=8)
    return pool, port, port.open_channel(alloc_ws=ws)


def test_head_oob_alloc() -> None:
    pool, port, ch = _alloc_channel(3)
    ch.sync(SyncKind.ALLOC)  # khead 0, ktail 3
    H.ring_hdr(ch, ch.alloc_ring).ring_head = 5
    _expect_kill(pool, port, ch, SyncKind.ALLOC, KillReason.HEAD_OOB)


def test_head_oob_wrapped_alloc() -> None:
    pool, port, ch = _alloc_channel(3)
    held = [ch.packet_alloc() for _ in range(6)]  # two refills: khead 6, ktail 1
    assert None not in held
    ch.sync(SyncKind.ALLOC)
    assert (ch.alloc_ring.khead, ch.alloc_ring.tail) == (6, 1)
    H.ring_hdr(ch, ch.alloc_ring).ring_head = 4
    _expect_kill(pool, port, ch, SyncKind.ALLOC, KillReason.HEAD_OOB_WRAPPED)


def _wrap_rx(pool: Pbufpool, port: Port, ch: Channel) -> None:
    """Leave the RX ring with khead 6 and ktail 2 (wrapped), packets in 6, 7, 0, 1."""
    for _ in range(2):
        _deliver(pool, port, 3)
        ch.recv(max=3)  # consume and release them
    ch.sync(SyncKind.RX)  # khead 6
    _deliver(pool, port, 4)
    ch.sync(SyncKind.RX)
    assert (ch.rx_ring.khead, ch.rx_ring.tail) == (6, 2)


def test_head_oob_wrapped_rx() -> None:
    pool, port, ch, _ = _setup()
    _wrap_rx(pool, port, ch)
    H.ring_hdr(ch, ch.rx_ring).ring_head = 4
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.HEAD_OOB_WRAPPED)
    assert "head 4" in err.detail


def test_tail_mismatch_tx() -> None:
    pool, port, ch, _ = _setup()
    H.stage_tx(ch)
    ch.advance_slot(ch.tx_ring, ch.tx_ring.head)
    H.ring_hdr(ch, ch.tx_ring).ring_tail = 3
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.TAIL_MISMATCH)


def test_tail_mismatch_free() -> None:
    pool, port, ch, _ = _setup()
    H.ring_hdr(ch, ch.free_ring).ring_tail = 2
    _expect_kill(pool, port, ch, SyncKind.FREE, KillReason.TAIL_MISMATCH)


# ---------------------------------------------------------------- slot / packet violations
def test_qum_idx_mismatch() -> None:
    pool, port, ch, _ = _setup()
    p, s = H.stage_tx(ch)
    H.pkt(ch.arena, p).idx = p + 1
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.QUM_IDX_MISMATCH)


Corrupt = Callable[[Channel, int], None]


def _set_buf0(field: str, value: int) -> Corrupt:
    def f(ch: Channel, p: int) -> None:
        setattr(H.pkt(ch.arena, p).buf0, field, value)

    return f


def _set_pkt(field: str, value: int) -> Corrupt:
    def f(ch: Channel, p: int) -> None:
        setattr(H.pkt(ch.arena, p), field, value)

    return f


def _csum(start: int, stuff: int) -> Corrupt:
    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        q.pflags = lib.SK_PKT_CSUM_PARTIAL
        q.csum_start = start
        q.csum_stuff = stuff

    return f


def _redzone(ch: Channel, p: int) -> None:
    H.md(ch.arena, p).pre.redzone ^= 1


def _vnet_csum(ch: Channel, p: int) -> None:
    q = H.pkt(ch.arena, p)
    q.pflags = lib.SK_PKT_VNET_HDR
    q.vnet.flags = 1
    q.vnet.csum_start = 50
    q.vnet.csum_offset = 16


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(_set_buf0("buf_idx", 3), id="buflet-index"),
        pytest.param(_set_buf0("buf_idx", 0xFFFFFFFF), id="buflet-index-huge"),
        pytest.param(_set_buf0("dlen", 2049), id="dlen-over-dlim"),
        pytest.param(_set_buf0("doff", 0xFFFFFFF0), id="doff-overflow"),
        pytest.param(_set_buf0("dlim", 65536), id="dlim-changed"),
        pytest.param(_set_buf0("flags", lib.SK_BUFLET_LARGE), id="large-flag"),
        pytest.param(_set_pkt("len", 61), id="len-not-sum"),
        pytest.param(_set_pkt("bufs_cnt", 0), id="bufs-cnt-zero"),
        pytest.param(_set_pkt("bufs_cnt", 5), id="bufs-cnt-over-max"),
        pytest.param(_set_pkt("bufs_max", 9), id="bufs-max-changed"),
        pytest.param(_set_pkt("headroom", 4), id="headroom-not-doff"),
        pytest.param(_set_pkt("l2_len", 2048), id="l2-len-beyond-buffer"),
        pytest.param(_set_pkt("pflags", 0x80), id="unknown-pflags"),
        pytest.param(_csum(60, 0), id="csum-start-outside"),
        pytest.param(_csum(0, 59), id="csum-stuff-outside"),
        pytest.param(_vnet_csum, id="vnet-csum-outside"),
        pytest.param(_redzone, id="redzone"),
    ],
)
def test_internalize_failed(corrupt: Corrupt) -> None:
    pool, port, ch, sent = _setup()
    p, s = H.stage_tx(ch, b"y" * 60)
    corrupt(ch, p)
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.INTERNALIZE_FAILED)
    assert sent == []  # the bad packet was dropped, never transmitted


def test_unallocated_pkt_not_held() -> None:
    pool, port, ch, _ = _setup()
    other = port.open_channel()
    theirs = other.packet_alloc()
    assert theirs is not None
    s = ch.tx_ring.head
    slot = H.slot(ch, ch.tx_ring, s)
    slot.sd_md_idx = theirs  # a packet another channel holds
    slot.sd_flags = lib.SK_SD_VALID
    ch.advance_slot(ch.tx_ring, s)
    with pytest.raises(SyncError) as ei:
        ch.sync(SyncKind.TX)
    assert ei.value.reason is KillReason.UNALLOCATED_PKT
    other.close()
    _expect_kill_after(pool, port, ch)


def _expect_kill_after(pool: Pbufpool, port: Port, ch: Channel) -> None:
    with pytest.raises(DefunctError):
        ch.sync(SyncKind.TX)
    assert pool.stats.in_use == 0
    ch.close()
    port.close()
    assert_no_leak(pool)


@pytest.mark.parametrize("idx", [0xFFFFFFFF, 128, 5])
def test_unallocated_pkt_bogus_index(idx: int) -> None:
    pool, port, ch, _ = _setup()
    s = ch.tx_ring.head
    slot = H.slot(ch, ch.tx_ring, s)
    slot.sd_md_idx = idx
    slot.sd_flags = lib.SK_SD_VALID
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.UNALLOCATED_PKT)


def test_unallocated_pkt_empty_slot_sent() -> None:
    pool, port, ch, _ = _setup()
    ch.advance_slot(ch.tx_ring, ch.tx_ring.head)  # hands over a slot with no packet
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.UNALLOCATED_PKT)


def test_unallocated_pkt_double_free() -> None:
    pool, port, ch, _ = _setup()
    p = ch.packet_alloc()
    assert p is not None
    ch.packet_free(p)
    ch.packet_free(p)
    _expect_kill(pool, port, ch, SyncKind.FREE, KillReason.UNALLOCATED_PKT)


def test_bad_buflet_chain_relinked() -> None:
    pool, port, ch, _ = _setup(alloc_nbufs=3)
    p, s = H.stage_tx(ch, b"z" * 3000)
    q = H.pkt(ch.arena, p)
    second = q.buf0.next_idx
    q.buf0.next_idx = H.buflet(ch.arena, second).next_idx  # skip the middle buflet
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.BAD_BUFLET_CHAIN)


def test_bad_buflet_chain_count() -> None:
    pool, port, ch, _ = _setup(alloc_nbufs=2)
    p, s = H.stage_tx(ch, b"z" * 100)
    H.pkt(ch.arena, p).bufs_cnt = 1
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.BAD_BUFLET_CHAIN)


def test_bad_buflet_chain_foreign_buflet() -> None:
    pool, port, ch, _ = _setup(alloc_nbufs=2)
    p, s = H.stage_tx(ch, b"z" * 100)
    q = H.pkt(ch.arena, p)
    q.buf0.next_idx = (q.buf0.next_idx + 1) % ch.arena.cfg.resolved_buflets()
    ch.advance_slot(ch.tx_ring, s)
    _expect_kill(pool, port, ch, SyncKind.TX, KillReason.BAD_BUFLET_CHAIN)


def test_slot_not_detached_rx() -> None:
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 2)
    ch.sync(SyncKind.RX)
    assert ch.slot_get_packet(ch.rx_ring, 0) is not None
    ch.advance_slot(ch.rx_ring, 1)  # released without detaching
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.SLOT_NOT_DETACHED)
    assert "slot 0" in err.detail


def test_slot_not_detached_event() -> None:
    pool, port, ch, _ = _setup()
    ev = pool.packet_from_bytes(b"event")
    assert ev is not None
    assert port.post_event(port.channels[0], [ev]) == 1
    ch.sync(SyncKind.EVENT)
    assert ch.slot_get_packet(ch.event_ring, 0) == ev
    ch.advance_slot(ch.event_ring, 0)
    _expect_kill(pool, port, ch, SyncKind.EVENT, KillReason.SLOT_NOT_DETACHED)


def test_inconsistent_ready_bytes_rx() -> None:
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 2, size=100)
    ch.sync(SyncKind.RX)
    for s in (0, 1):
        p = ch.slot_get_packet(ch.rx_ring, s)
        assert p is not None
        ch.slot_detach_packet(ch.rx_ring, s, p)
    H.slot(ch, ch.rx_ring, 1).sd_len = 4000  # claims more bytes than were ever ready
    ch.advance_slot(ch.rx_ring, 1)
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.INCONSISTENT_READY_BYTES)
    assert "sd_len 4000" in err.detail


def test_every_reason_is_covered() -> None:
    """Guard: each KillReason above has a test provoking it."""
    src = open(__file__).read()
    for r in KillReason:
        assert f"KillReason.{r.name}" in src


def test_legal_event_round_trip() -> None:
    pool, port, ch, _ = _setup()
    ev = pool.packet_from_bytes(b"event")
    assert ev is not None
    port.post_event(port.channels[0], [ev])
    ch.sync(SyncKind.EVENT)
    s = ch.get_next_slot(ch.event_ring)
    assert s is not None
    p = ch.slot_get_packet(ch.event_ring, s)
    assert p == ev and ch.packet_read(p) == b"event"
    ch.slot_detach_packet(ch.event_ring, s, p)
    ch.advance_slot(ch.event_ring, s)
    ch.sync(SyncKind.EVENT)
    ch.packet_free(p)
    ch.sync(SyncKind.FREE)
    assert pool.stats.in_use == ch.alloc_ring.ready_slots
    ch.close()
    port.close()
    assert_no_leak(pool)
