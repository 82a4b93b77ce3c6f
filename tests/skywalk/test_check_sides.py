"""Both sides of every equality check, and both ends of every range check, in the kernel
half's validators (validate.py and its compiled twin fastpath.c), under both backends.

A check written ``a != b`` is only tested if a test makes ``a`` smaller AND one makes it
larger: a mutation to ``a > b`` survives a suite that only ever makes it larger, and then a
client can declare a length shorter than its buffers and the kernel keeps it.  A range check
is only tested if the last accepted value passes and the first refused one fails.

Mutations these tests kill (tools/mutants/section5.toml, ``sky-*``; each survived the
suite before this file): ``ulen != pub``, ``plen != total``, ``uidx != idx`` made ``>`` in
Python and C, and the other comparisons listed there (``<``/``>`` for each ``!=``, ``>=``
for ``>`` and back on each range).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vdev.abi import lib
from vdev.skywalk import Channel, KillReason, Pbufpool, Port, SyncError, SyncKind
from vdev.skywalk.arena import NO_INDEX

from . import hostile as H
from .conftest import assert_no_leak
from .test_kill_reasons import _deliver, _expect_kill, _setup

pytestmark = pytest.mark.usefixtures("backend")

Edit = Callable[[Channel, int], None]


def bump_pkt(field: str, delta: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        value = getattr(q, field)
        assert value + delta >= 0, f"{field} {value}: no smaller value to test"
        setattr(q, field, value + delta)

    return f


def bump_buf0(field: str, delta: int) -> Edit:
    """Move a buf0 field by ``delta``; a smaller value must really be smaller (no wrap)."""

    def f(ch: Channel, p: int) -> None:
        b = H.pkt(ch.arena, p).buf0
        value = getattr(b, field)
        assert delta > 0 or value + delta >= 0, f"{field} {value}: no smaller value to test"
        setattr(b, field, (value + delta) & 0xFFFFFFFF)

    return f


def redzone(delta: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        pre = H.md(ch.arena, p).pre
        pre.redzone = (pre.redzone + delta) & (1 << 64) - 1

    return f


def headroom(doff: int, headroom: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        q.buf0.doff = doff
        q.headroom = headroom

    return f


def expect_refused(
    edit: Edit, reason: KillReason, data: bytes = b"y" * 60, alloc_nbufs: int = 1
) -> str:
    """Stage ``data`` on TX, apply ``edit`` to the user copy, sync: killed, nothing sent.

    The staged packet is the channel's second (index > 0), so "one less" exists for its
    index fields; the first stays held and is purged with the dead channel."""
    pool, port, ch, sent = _setup(alloc_nbufs=alloc_nbufs)
    assert ch.packet_alloc() is not None
    p, s = H.stage_tx(ch, data)
    edit(ch, p)
    ch.advance_slot(ch.tx_ring, s)
    err = _expect_kill(pool, port, ch, SyncKind.TX, reason)
    assert sent == []
    return err.detail


def expect_accepted(edit: Edit, data: bytes = b"y" * 60, want: bytes | None = None) -> None:
    pool, port, ch, sent = _setup()
    p, s = H.stage_tx(ch, data)
    edit(ch, p)
    ch.advance_slot(ch.tx_ring, s)
    ch.sync(SyncKind.TX)
    assert sent == [data if want is None else want]
    ch.close()
    port.close()
    assert_no_leak(pool)


# -- internalize: equality checks, both sides ----------------------------------------------


@pytest.mark.parametrize(
    ("edit", "reason", "nbufs"),
    [
        pytest.param(bump_pkt("len", -1), KillReason.INTERNALIZE_FAILED, 1, id="len-short"),
        pytest.param(bump_pkt("len", +1), KillReason.INTERNALIZE_FAILED, 1, id="len-long"),
        pytest.param(bump_pkt("bufs_max", -1), KillReason.INTERNALIZE_FAILED, 1, id="max-less"),
        pytest.param(bump_pkt("bufs_max", +1), KillReason.INTERNALIZE_FAILED, 1, id="max-more"),
        pytest.param(bump_pkt("bufs_cnt", -1), KillReason.BAD_BUFLET_CHAIN, 2, id="cnt-less"),
        pytest.param(bump_pkt("bufs_cnt", +1), KillReason.BAD_BUFLET_CHAIN, 2, id="cnt-more"),
        pytest.param(bump_buf0("buf_idx", -1), KillReason.INTERNALIZE_FAILED, 1, id="buf-less"),
        pytest.param(bump_buf0("buf_idx", +1), KillReason.INTERNALIZE_FAILED, 1, id="buf-more"),
        pytest.param(bump_buf0("dlim", -1), KillReason.INTERNALIZE_FAILED, 1, id="dlim-less"),
        pytest.param(bump_buf0("dlim", +1), KillReason.INTERNALIZE_FAILED, 1, id="dlim-more"),
        pytest.param(bump_buf0("next_idx", -1), KillReason.BAD_BUFLET_CHAIN, 1, id="end-less"),
        pytest.param(bump_buf0("next_idx", -1), KillReason.BAD_BUFLET_CHAIN, 2, id="next-less"),
        pytest.param(bump_buf0("next_idx", +1), KillReason.BAD_BUFLET_CHAIN, 2, id="next-more"),
        pytest.param(headroom(4, 3), KillReason.INTERNALIZE_FAILED, 1, id="headroom-less"),
        pytest.param(headroom(4, 5), KillReason.INTERNALIZE_FAILED, 1, id="headroom-more"),
        pytest.param(redzone(-1), KillReason.INTERNALIZE_FAILED, 1, id="redzone-less"),
        pytest.param(redzone(+1), KillReason.INTERNALIZE_FAILED, 1, id="redzone-more"),
    ],
)
def test_equality_checks_refuse_both_sides(edit: Edit, reason: KillReason, nbufs: int) -> None:
    expect_refused(edit, reason, alloc_nbufs=nbufs)


def test_len_shorter_than_the_buflets_is_refused_not_trimmed() -> None:
    """The client says 59 of 60 bytes: the kernel must not keep (and send) a packet whose
    declared length disagrees with its buffers."""
    detail = expect_refused(bump_pkt("len", -1), KillReason.INTERNALIZE_FAILED)
    assert "len 59 != sum of buflets 60" in detail


def large_tx_rig() -> tuple[Pbufpool, Port, Channel, list[bytes], int, int]:
    """A client holding a large-buffer packet (received on RX) staged for TX."""
    pool = Pbufpool(num_packets=64, max_frags=4, num_large_bufs=2, large_buf_size=8192)
    sent: list[bytes] = []

    def on_tx(port: Port, pkts: list[int]) -> None:
        sent.extend(pool.packet_bytes(i) for i in pkts)
        pool.free_packets(pkts)

    port = Port(pool, ring_slots=8, on_transmit=on_tx)
    ch = port.open_channel()
    big = pool.packet_from_bytes(b"L" * 3000)
    assert big is not None and pool.b_large[big]
    assert port.deliver([big]) == 1
    ch.sync(SyncKind.RX)
    s = ch.get_next_slot(ch.rx_ring)
    assert s is not None
    p = ch.slot_get_packet(ch.rx_ring, s)
    assert p == big
    ch.slot_detach_packet(ch.rx_ring, s, p)
    ch.advance_slot(ch.rx_ring, s)
    t = ch.tx_ring.head
    ch.slot_attach_packet(ch.tx_ring, t, p)
    return pool, port, ch, sent, p, t


def test_large_flag_both_ways() -> None:
    """Setting the flag on a normal buffer is refused (test_kill_reasons); so is clearing it
    on a large one, and a large packet forwarded untouched is accepted."""
    pool, port, ch, sent, p, t = large_tx_rig()
    ch.advance_slot(ch.tx_ring, t)
    ch.sync(SyncKind.TX)
    assert sent == [b"L" * 3000]
    ch.close()
    port.close()
    assert_no_leak(pool)
    pool, port, ch, sent, p, t = large_tx_rig()
    H.pkt(ch.arena, p).buf0.flags = 0
    ch.advance_slot(ch.tx_ring, t)
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.INTERNALIZE_FAILED)
    assert "large flag changed" in err.detail and sent == []


# -- internalize: range checks, last accepted and first refused ------------------------------


def full_window(extra: int) -> Edit:
    """One 2048-byte buffer: doff 0 + dlen 2048 fits exactly; ``extra`` moves doff past it."""

    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        q.buf0.doff = extra
        q.headroom = extra

    return f


def test_data_window_up_to_the_buffer_end() -> None:
    data = bytes(range(256)) * 8  # 2048 bytes: one full buffer
    expect_accepted(full_window(0), data)
    expect_refused(full_window(1), KillReason.INTERNALIZE_FAILED, data=data)


def l2_len(value: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        H.pkt(ch.arena, p).l2_len = value

    return f


def test_l2_len_up_to_the_buffer_end() -> None:
    expect_accepted(l2_len(2047))  # headroom 0 + 2047 < 2048
    expect_refused(l2_len(2048), KillReason.INTERNALIZE_FAILED)


def csum(start: int, stuff: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        q.pflags = lib.SK_PKT_CSUM_PARTIAL
        q.csum_start = start
        q.csum_stuff = stuff

    return f


def test_csum_offsets_up_to_the_packet_end() -> None:
    expect_accepted(csum(59, 58))  # start < len 60, stuff + 2 <= 60
    expect_refused(csum(60, 58), KillReason.INTERNALIZE_FAILED)
    expect_refused(csum(59, 59), KillReason.INTERNALIZE_FAILED)


def vnet_csum(start: int, offset: int) -> Edit:
    def f(ch: Channel, p: int) -> None:
        q = H.pkt(ch.arena, p)
        q.pflags = lib.SK_PKT_VNET_HDR
        q.vnet.flags = 1
        q.vnet.csum_start = start
        q.vnet.csum_offset = offset

    return f


def test_vnet_csum_up_to_the_packet_end() -> None:
    expect_accepted(vnet_csum(50, 8))  # 50 + 8 + 2 == 60
    expect_refused(vnet_csum(50, 9), KillReason.INTERNALIZE_FAILED)


def test_bufs_cnt_up_to_max_frags() -> None:
    """4 buflets (max_frags) is legal; the range check is 1..max_frags inclusive."""
    pool, port, ch, sent = _setup(alloc_nbufs=4)
    data = bytes(range(256)) * 28  # 7168 bytes over four 2048-byte buflets
    p, s = H.stage_tx(ch, data)
    assert H.pkt(ch.arena, p).bufs_cnt == 4
    ch.advance_slot(ch.tx_ring, s)
    ch.sync(SyncKind.TX)
    assert sent == [data]
    ch.close()
    port.close()
    assert_no_leak(pool)


# -- slots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, +1], ids=["names-less", "names-more"])
def test_qum_idx_mismatch_both_sides(delta: int) -> None:
    pool, port, ch, _ = _setup()
    assert ch.packet_alloc() is not None  # held: the staged packet has a smaller neighbour
    p, s = H.stage_tx(ch)
    assert p > 0
    H.pkt(ch.arena, p).idx = p + delta
    ch.advance_slot(ch.tx_ring, s)
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.QUM_IDX_MISMATCH)
    assert f"names {p + delta}" in err.detail


@pytest.mark.parametrize("sd_len", [99, 101, 0], ids=["less", "more", "zero"])
def test_inconsistent_ready_bytes_both_sides(sd_len: int) -> None:
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 2, size=100)
    ch.sync(SyncKind.RX)
    for s in (0, 1):
        p = ch.slot_get_packet(ch.rx_ring, s)
        assert p is not None
        ch.slot_detach_packet(ch.rx_ring, s, p)
    H.slot(ch, ch.rx_ring, 1).sd_len = sd_len
    ch.advance_slot(ch.rx_ring, 1)
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.INCONSISTENT_READY_BYTES)
    assert f"sd_len {sd_len} != published 100" in err.detail


def test_packet_index_just_past_the_pool() -> None:
    """num_packets itself is the first bad index (128 here); 127 is a real packet the
    channel does not hold: both UNALLOCATED_PKT, neither an IndexError."""
    for idx in (127, 128):
        pool, port, ch, _ = _setup()
        s = ch.tx_ring.head
        slot = H.slot(ch, ch.tx_ring, s)
        slot.sd_md_idx = idx
        slot.sd_flags = lib.SK_SD_VALID
        ch.advance_slot(ch.tx_ring, s)
        _expect_kill(pool, port, ch, SyncKind.TX, KillReason.UNALLOCATED_PKT)


# -- ring indices: both ends of each window -----------------------------------------------------


def test_head_equal_to_num_slots_is_basic_sanity() -> None:
    pool, port, ch, _ = _setup()
    H.stage_tx(ch)
    H.ring_hdr(ch, ch.tx_ring).ring_head = 8  # n: the first index past the ring
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.BASIC_SANITY)
    assert "head 8 >= num_slots 8" in err.detail


def _rx_window(pending: int) -> tuple[Pbufpool, Port, Channel]:
    """An RX ring with khead 3 and ``pending`` packets ready (ktail 3 + pending)."""
    pool, port, ch, _ = _setup()
    _deliver(pool, port, 3)
    assert len(ch.recv(max=3)) == 3
    ch.sync(SyncKind.RX)
    if pending:
        _deliver(pool, port, pending)
        ch.sync(SyncKind.RX)
    assert (ch.rx_ring.khead, ch.rx_ring.tail) == (3, 3 + pending)
    return pool, port, ch


@pytest.mark.parametrize(("pending", "head"), [(2, 2), (2, 6), (0, 4), (0, 2)])
def test_rx_head_outside_an_unwrapped_window(pending: int, head: int) -> None:
    """[khead 3, ktail 5]: 2 (khead - 1) and 6 (ktail + 1) are HEAD_OOB; with nothing
    pending ([3, 3]) any other head is, too."""
    pool, port, ch = _rx_window(pending)
    if pending:
        for s in range(3, 3 + pending):
            p = ch.slot_get_packet(ch.rx_ring, s)
            assert p is not None
            ch.slot_detach_packet(ch.rx_ring, s, p)
            ch.packet_free(p)
    H.ring_hdr(ch, ch.rx_ring).ring_head = head
    _expect_kill(pool, port, ch, SyncKind.RX, KillReason.HEAD_OOB)


def test_rx_head_at_both_ends_of_an_unwrapped_window() -> None:
    pool, port, ch = _rx_window(2)
    ch.rx_ring.head = 3  # khead: releases nothing
    ch.sync(SyncKind.RX)
    assert len(ch.recv(max=2)) == 2  # head moves up to ktail 5
    ch.sync(SyncKind.RX)
    assert ch.rx_ring.khead == 5
    ch.close()
    port.close()
    assert_no_leak(pool)


def _wrapped_rx() -> tuple[Pbufpool, Port, Channel]:
    from .test_kill_reasons import _wrap_rx

    pool, port, ch, _ = _setup()
    _wrap_rx(pool, port, ch)  # khead 6, ktail 2: the kernel owns 3, 4, 5
    return pool, port, ch


@pytest.mark.parametrize("head", [3, 5])
def test_rx_head_at_the_edges_of_the_kernel_gap(head: int) -> None:
    pool, port, ch = _wrapped_rx()
    H.ring_hdr(ch, ch.rx_ring).ring_head = head
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.HEAD_OOB_WRAPPED)
    assert f"head {head} inside" in err.detail


def test_rx_head_at_both_ends_of_a_wrapped_window() -> None:
    pool, port, ch = _wrapped_rx()
    ch.rx_ring.head = 6  # khead
    ch.sync(SyncKind.RX)
    got = ch.recv(max=4)  # 6, 7, 0, 1: head ends at ktail 2
    ch.sync(SyncKind.RX)
    assert len(got) == 4 and ch.rx_ring.khead == 2
    ch.close()
    port.close()
    assert_no_leak(pool)


@pytest.mark.parametrize("delta", [-1, +1])
def test_tail_mismatch_both_sides(delta: int) -> None:
    for kind in (SyncKind.TX, SyncKind.FREE):
        pool, port, ch, _ = _setup()
        ring = ch.tx_ring if kind is SyncKind.TX else ch.free_ring
        hdr = H.ring_hdr(ch, ring)
        hdr.ring_tail = (hdr.ring_tail + delta) % 8
        _expect_kill(pool, port, ch, kind, KillReason.TAIL_MISMATCH)


def test_no_index_end_of_chain_is_the_only_end() -> None:
    """A one-buflet packet ends with NO_INDEX; naming any buflet instead is a rewrite."""

    def to_zero(ch: Channel, p: int) -> None:
        b = H.pkt(ch.arena, p).buf0
        assert b.next_idx == NO_INDEX
        b.next_idx = 0

    expect_refused(to_zero, KillReason.BAD_BUFLET_CHAIN)


# ---------------------------------------------------------------- sd_len clamp (issue 12 item 5)
def _rx_one_big(sd_len: int | None) -> tuple[Pbufpool, Port, Channel]:
    """Deliver one 70,400-byte packet (more than the 16-bit sd_len holds), receive it and
    release its slot, with ``sd_len`` rewritten unless None."""
    pool = Pbufpool(num_packets=16, buf_size=16384, max_frags=5)
    port = Port(pool, ring_slots=8, on_transmit=lambda _port, pkts: pool.free_packets(pkts))
    ch = port.open_channel()
    p = pool.packet_from_bytes(bytes(range(256)) * 275)
    assert p is not None and port.deliver([p]) == 1
    ch.sync(SyncKind.RX)
    got = ch.slot_get_packet(ch.rx_ring, 0)
    assert got is not None
    ch.slot_detach_packet(ch.rx_ring, 0, got)
    if sd_len is not None:
        H.slot(ch, ch.rx_ring, 0).sd_len = sd_len
    ch.advance_slot(ch.rx_ring, 0)
    return pool, port, ch


def test_long_packet_publishes_a_clamped_sd_len_and_releases_exactly() -> None:
    """A packet longer than 65535 is named by sd_len 65535 (the field is 16 bits); releasing
    the slot with that value is legal and takes the kernel's full length out of ready_bytes.

    Kills the clamp removed from the release check (``pub = ln``: a legal release of a long
    packet dies) and the release sum counting the user's sd_len instead of the length the
    kernel published (ready_bytes would keep 70400 - 65535 bytes)."""
    pool, port, ch = _rx_one_big(None)
    assert H.slot(ch, ch.rx_ring, 0).sd_len == 0xFFFF
    ch.sync(SyncKind.RX)
    assert H.ring_hdr(ch, ch.rx_ring).ready_bytes == 0
    ch.close()
    port.close()
    assert_no_leak(pool)


@pytest.mark.parametrize("sd_len", [0xFFFE, 70400 & 0xFFFF], ids=["one-less", "wrapped-len"])
def test_long_packet_with_another_sd_len_is_inconsistent(sd_len: int) -> None:
    """Below the clamp, or the true length truncated to 16 bits: both are not what the
    kernel published."""
    pool, port, ch = _rx_one_big(sd_len)
    err = _expect_kill(pool, port, ch, SyncKind.RX, KillReason.INCONSISTENT_READY_BYTES)
    assert f"sd_len {sd_len} != published 65535" in err.detail


KNOWN_PFLAGS = {lib.SK_PKT_VNET_HDR: "vnet header", lib.SK_PKT_CSUM_PARTIAL: "csum partial"}


@pytest.mark.parametrize("bit", range(16))
def test_each_pflags_bit_alone(bit: int) -> None:
    """Each of the 16 pflags bits alone: the two the ABI defines (skywalk.h) pass, every other
    one is refused and named.  Kills an unknown-flags mask that only covers some bits (the
    suite set 0x80 only).

    The fields a flag that is NOT set would make meaningful hold garbage, and must be
    ignored: csum_start/csum_stuff without CSUM_PARTIAL, the virtio-net header's csum window
    without VNET_HDR or without its NEEDS_CSUM flag (virtio 1.x 5.1.6).  Kills a checksum
    check gated on the wrong flag, or on none."""
    pool, port, ch, sent = _setup()
    p, s = H.stage_tx(ch, b"z" * 60)
    q = H.pkt(ch.arena, p)
    q.pflags = 1 << bit
    csum = 1 << bit == lib.SK_PKT_CSUM_PARTIAL
    q.csum_start = 0 if csum else 0xFFFF
    q.csum_stuff = 0 if csum else 0xFFFF
    q.vnet.flags = 0 if 1 << bit == lib.SK_PKT_VNET_HDR else lib.VIRTIO_NET_HDR_F_NEEDS_CSUM
    q.vnet.csum_start = q.vnet.csum_offset = 0xFFFF
    ch.advance_slot(ch.tx_ring, s)
    if 1 << bit in KNOWN_PFLAGS:
        ch.sync(SyncKind.TX)
        assert sent == [b"z" * 60]
        ch.close()
        port.close()
        assert_no_leak(pool)
        return
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.INTERNALIZE_FAILED)
    assert f"unknown pflags {1 << bit:#x}" in err.detail
    assert sent == []


def test_tx_slot_naming_an_owned_packet_without_sd_valid_is_empty() -> None:
    """A TX slot whose index names a packet the channel holds, but whose SD_VALID flag is
    clear, hands nothing over: the packet is not taken (UNALLOCATED_PKT, "packet none").
    The existing empty-slot test cleared the index too, so a loop that ignored SD_VALID
    still failed on the index (kills fp-tx-valid-ignored)."""
    pool, port, ch, sent = _setup()
    p, s = H.stage_tx(ch, b"v" * 60)
    sl = H.slot(ch, ch.tx_ring, s)
    assert sl.sd_md_idx == p
    sl.sd_flags = 0
    ch.advance_slot(ch.tx_ring, s)
    err = _expect_kill(pool, port, ch, SyncKind.TX, KillReason.UNALLOCATED_PKT)
    assert f"slot {s}: packet none not held" in err.detail
    assert sent == []


def test_free_of_a_packet_another_channel_holds_is_refused() -> None:
    """FREE must name a packet THIS channel holds: another channel's packet is
    UNALLOCATED_PKT and stays with its holder, which can still free it (the FREE ring's
    ownership check had no test; kills fp-free-owner-ignored)."""
    pool, port, ch, _ = _setup()
    other = port.open_channel()
    theirs = other.packet_alloc()
    assert theirs is not None
    ch.packet_free(theirs)
    with pytest.raises(SyncError) as ei:
        ch.sync(SyncKind.FREE)
    assert ei.value.reason is KillReason.UNALLOCATED_PKT
    assert f"packet {theirs} not held" in ei.value.detail
    other.packet_free(theirs)  # still the other channel's: a legal free
    other.sync(SyncKind.FREE)
    other.close()
    ch.close()
    port.close()
    assert_no_leak(pool)
