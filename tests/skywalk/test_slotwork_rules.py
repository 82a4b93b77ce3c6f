"""The slot loops and externalize of the kernel half (slotwork.py, fastpath.c), checked
against the ABI (``struct sk_slot``, ``struct sk_packet``, ``struct sk_buflet`` read through
cffi, not through slotwork's word offsets) and the documented contracts:

- a refusal names the slot, the packet (``none`` when the slot had no SD_VALID) and the
  window ``[start, end)`` of the sync, in the same words on both backends;
- the FREE ring skips slots without SD_VALID (nothing handed over), resets every slot of
  the window (``sd_md_idx`` NO_INDEX, flags and length 0) and nothing outside it, and
  walks a window that wraps past the ring's end;
- externalize writes every field of the packet's user copy from the kernel's view and
  touches no other packet's metadata.

Mutations killed (mutmut, ``vdev.skywalk.slotwork``, 2026-12-03 run): ``tx_take`` and
``free_take`` building the UNALLOCATED message with the slot, the packet or the window
ends dropped, ``tx_take``'s QUM message without the packet, ``free_take`` taking every slot
as SD_VALID, resetting ``sd_len`` of another word, stepping past the ring's end before
wrapping, never wrapping; ``externalize`` writing pflags, l2_len or the vnet header at
another offset.
"""

from __future__ import annotations

from array import array

import pytest

from vdev.abi import ffi, lib
from vdev.skywalk import Channel, KillReason, Pbufpool, Port, SyncError, SyncKind, validate
from vdev.skywalk.arena import NO_INDEX
from vdev.skywalk.errors import PoolError

from . import hostile as H
from .test_kill_reasons import _setup

pytestmark = pytest.mark.usefixtures("backend")

SD_VALID = lib.SK_SD_VALID


def _advance_tx(ch: Channel, n: int) -> None:
    """Send ``n`` good frames so the TX window of the next sync starts at slot ``n``."""
    assert ch.send([bytes([i]) * 60 for i in range(n)]) == n
    ch.sync(SyncKind.TX)
    assert ch.tx_ring.head == n


def _refusal(ch: Channel, kind: SyncKind) -> SyncError:
    with pytest.raises(SyncError) as info:
        ch.sync(kind)
    return info.value


def test_tx_refusal_of_a_packet_not_held_names_slot_packet_and_window() -> None:
    _pool, port, ch, _sent = _setup()
    other = port.open_channel()
    theirs = other.packet_alloc()
    assert theirs is not None
    _advance_tx(ch, 3)
    H.stage_tx(ch)  # slot 3: a good packet
    slot = H.slot(ch, ch.tx_ring, 4)
    slot.sd_md_idx, slot.sd_flags = theirs, SD_VALID
    ch.advance_slot(ch.tx_ring, 4)
    err = _refusal(ch, SyncKind.TX)
    assert err.reason is KillReason.UNALLOCATED_PKT
    assert err.detail == f"slot 4: packet {theirs} not held by the channel (slots [3, 5))"
    other.close()
    port.close()


def test_tx_refusal_of_an_empty_slot_says_none() -> None:
    _pool, port, ch, _sent = _setup()
    _advance_tx(ch, 2)
    slot = H.slot(ch, ch.tx_ring, 2)
    slot.sd_md_idx, slot.sd_flags = 7, 0  # an index, but not handed over (no SD_VALID)
    ch.advance_slot(ch.tx_ring, 2)
    err = _refusal(ch, SyncKind.TX)
    assert err.reason is KillReason.UNALLOCATED_PKT
    assert err.detail == "slot 2: packet none not held by the channel (slots [2, 3))"
    port.close()


def test_tx_refusal_of_metadata_naming_another_packet_names_both() -> None:
    _pool, port, ch, _sent = _setup()
    _advance_tx(ch, 1)
    p, s = H.stage_tx(ch)
    H.pkt(ch.arena, p).idx = p + 1
    ch.advance_slot(ch.tx_ring, s)
    err = _refusal(ch, SyncKind.TX)
    assert err.reason is KillReason.QUM_IDX_MISMATCH
    assert err.detail == f"slot 1: metadata of packet {p} names {p + 1} (slots [1, 2))"
    port.close()


def test_free_refusal_names_slot_packet_and_window() -> None:
    _pool, port, ch, _sent = _setup()
    pkts = [ch.packet_alloc() for _ in range(3)]
    assert None not in pkts
    for p in pkts[:2]:
        ch.packet_free(p)  # type: ignore[arg-type]
    ch.sync(SyncKind.FREE)
    ch.packet_free(pkts[2])  # type: ignore[arg-type]
    ch.packet_free(pkts[0])  # type: ignore[arg-type]  # freed already: not held
    err = _refusal(ch, SyncKind.FREE)
    assert err.reason is KillReason.UNALLOCATED_PKT
    assert err.detail == f"slot 3: packet {pkts[0]} not held by the channel (slots [2, 4))"
    port.close()


def _free_slots(ch: Channel) -> list[tuple[int, int, int]]:
    r = ch.free_ring
    return [
        (int(s.sd_md_idx), int(s.sd_flags), int(s.sd_len))
        for s in (H.slot(ch, r, i) for i in range(r.n))
    ]


def _after_free_slots(ch: Channel) -> bytes:
    """The 8 bytes just past the FREE ring's slot array (the next ring's header)."""
    r = ch.free_ring
    off = r.off + ffi.sizeof("struct sk_ring") + 8 * r.n
    return bytes(ch.arena.mm[off : off + 8])


def test_free_ring_skips_slots_without_sd_valid_and_resets_the_window() -> None:
    pool, port, ch, _sent = _setup()
    keep = ch.packet_alloc()
    gone = ch.packet_alloc()
    assert keep is not None and gone is not None
    owner = pool.pkt_owner[keep]
    r = ch.free_ring
    untouched = _free_slots(ch)[3:]
    s0, s1, s2 = (H.slot(ch, r, i) for i in range(3))
    # slot 0 names a held packet without SD_VALID: nothing is handed over
    s0.sd_md_idx, s0.sd_flags, s0.sd_len = keep, 0, 60
    s1.sd_md_idx, s1.sd_flags, s1.sd_len = gone, SD_VALID, 1234
    s2.sd_md_idx, s2.sd_flags, s2.sd_len = NO_INDEX, 0, 77
    after = _after_free_slots(ch)
    ch.advance_slot(r, 2)
    ch.sync(SyncKind.FREE)
    assert pool.pkt_owner[keep] == owner and pool.pkt_state[keep]
    assert not pool.pkt_state[gone]
    assert _free_slots(ch) == [(NO_INDEX, 0, 0)] * 3 + untouched
    assert _after_free_slots(ch) == after
    ch.packet_free(keep)
    ch.sync(SyncKind.FREE)
    assert not pool.pkt_state[keep]
    port.close()


def test_free_ring_window_wrapping_past_the_end() -> None:
    pool, port, ch, _sent = _setup()
    n = ch.free_ring.n
    first = [ch.packet_alloc() for _ in range(n - 2)]
    for p in first:
        ch.packet_free(p)  # type: ignore[arg-type]
    ch.sync(SyncKind.FREE)
    assert ch.free_ring.head == n - 2
    after = _after_free_slots(ch)
    pkts = [ch.packet_alloc() for _ in range(4)]  # slots n-2, n-1, 0, 1
    for p in pkts:
        ch.packet_free(p)  # type: ignore[arg-type]
    assert ch.free_ring.head == 2
    frees = pool.stats.frees
    ch.sync(SyncKind.FREE)
    assert pool.stats.frees == frees + 4
    assert _free_slots(ch)[:2] == [(NO_INDEX, 0, 0)] * 2
    assert _free_slots(ch)[n - 2 :] == [(NO_INDEX, 0, 0)] * 2
    assert _after_free_slots(ch) == after
    port.close()


# ---------------------------------------------------------------- externalize
def _md_bytes(pool: Pbufpool, idx: int) -> bytes:
    a = pool.arena
    size = ffi.sizeof("struct sk_md_obj")
    off = a.layout.md_off + idx * size
    return bytes(a.mm[off : off + size])


@pytest.mark.parametrize("with_vnet", [True, False], ids=["vnet", "no-vnet"])
@pytest.mark.parametrize("idx_pick", [0, 1, -1])
def test_externalize_writes_every_field_of_the_packets_own_copy(
    idx_pick: int, with_vnet: bool
) -> None:
    """Without PKT_VNET_HDR the user copy's vnet bytes are left as they were (they mean
    nothing; fastpath.c copies them only under the flag, and both backends must publish
    the same user copy)."""
    pool = Pbufpool(num_packets=8, max_frags=4)
    vnet = bytes(range(1, 13))
    pkts = [pool.packet_from_bytes(bytes([i]) * 100, vnet=vnet) for i in range(8)]
    assert None not in pkts
    p = pkts[idx_pick]
    assert p is not None
    pflags = lib.SK_PKT_CSUM_PARTIAL | (lib.SK_PKT_VNET_HDR if with_vnet else 0)
    pool.pkt_pflags[p] = pflags
    pool.pkt_l2[p], pool.pkt_cstart[p], pool.pkt_cstuff[p] = 14, 34, 50
    q = H.pkt(pool.arena, p)
    # a user copy scribbled with other values everywhere
    for field in ("idx", "len", "qflags", "pflags", "bufs_cnt", "bufs_max", "headroom",
                  "l2_len", "csum_start", "csum_stuff"):  # fmt: skip
        setattr(q, field, 0x5A5A & (0xFFFF if field not in ("idx", "len") else 0xFFFFFFFF))
    for field in ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset"):
        setattr(q.vnet, field, 0xA5 if field in ("flags", "gso_type") else 0xA5A5)
    for field in ("buf_idx", "doff", "dlen", "dlim", "next_idx", "flags"):
        setattr(q.buf0, field, 0x3C3C)
    H.md(pool.arena, p).pre.redzone = 0
    scribbled = bytes(ffi.buffer(ffi.addressof(q.vnet), 12))
    others = {i: _md_bytes(pool, i) for i in range(8) if i != p}
    validate.externalize(pool, p)
    assert int(H.md(pool.arena, p).pre.redzone) == lib.SK_REDZONE_SEED ^ p
    got = {
        "idx": q.idx, "len": q.len, "qflags": q.qflags, "pflags": q.pflags,
        "bufs_cnt": q.bufs_cnt, "bufs_max": q.bufs_max, "headroom": q.headroom,
        "l2_len": q.l2_len, "csum_start": q.csum_start, "csum_stuff": q.csum_stuff,
    }  # fmt: skip
    assert got == {
        "idx": p, "len": 100, "qflags": lib.SK_QUM_FINALIZED,
        "pflags": pflags,
        "bufs_cnt": 1, "bufs_max": 4, "headroom": 0, "l2_len": 14,
        "csum_start": 34, "csum_stuff": 50,
    }  # fmt: skip
    assert bytes(ffi.buffer(ffi.addressof(q.vnet), 12)) == (vnet if with_vnet else scribbled)
    b = q.buf0
    assert (b.buf_idx, b.doff, b.dlen, b.dlim, b.next_idx, b.flags) == (
        pool.b_buf[p], 0, 100, pool.buf_size, NO_INDEX, 0,
    )  # fmt: skip
    assert {i: _md_bytes(pool, i) for i in others} == others
    pool.free_packets([x for x in pkts if x is not None])
    pool.close()


# ---------------------------------------------------------------- RX release and publish
def _rx_from_slot_2(pool: Pbufpool, port: Port, ch: Channel) -> list[int]:
    """Two packets received and released, then three more in slots 2, 3, 4."""
    for rnd in (2, 3):
        pkts = [pool.packet_from_bytes(bytes([i]) * 100) for i in range(rnd)]
        assert None not in pkts and port.deliver(pkts) == rnd  # type: ignore[arg-type]
        ch.sync(SyncKind.RX)
        if rnd == 3:
            return pkts  # type: ignore[return-value]
        for s, p in enumerate(pkts):
            ch.slot_detach_packet(ch.rx_ring, s, p)  # type: ignore[arg-type]
        ch.advance_slot(ch.rx_ring, 1)
        ch.sync(SyncKind.RX)
    raise AssertionError


def test_rx_release_of_an_attached_slot_names_slot_packet_and_window() -> None:
    pool, port, ch, _sent = _setup()
    pkts = _rx_from_slot_2(pool, port, ch)
    ch.slot_detach_packet(ch.rx_ring, 2, pkts[0])
    ch.advance_slot(ch.rx_ring, 3)  # slot 3 released still attached
    err = _refusal(ch, SyncKind.RX)
    assert err.reason is KillReason.SLOT_NOT_DETACHED
    assert err.detail == f"slot 3: packet {pkts[1]} still attached (released slots [2, 4))"
    port.close()


def test_rx_release_with_another_sd_len_names_slot_and_window() -> None:
    pool, port, ch, _sent = _setup()
    pkts = _rx_from_slot_2(pool, port, ch)
    for s in (2, 3):
        ch.slot_detach_packet(ch.rx_ring, s, pkts[s - 2])
    H.slot(ch, ch.rx_ring, 3).sd_len = 4000
    ch.advance_slot(ch.rx_ring, 3)
    err = _refusal(ch, SyncKind.RX)
    assert err.reason is KillReason.INCONSISTENT_READY_BYTES
    assert err.detail == "slot 3: sd_len 4000 != published 100 (released slots [2, 4))"
    port.close()


def test_publishing_a_client_held_packet_is_a_pool_error_naming_it() -> None:
    """Trusted code queueing a packet the client holds is a bug of the trusted side (every
    public path checks first, ``pool.check_kernel_held``); the loop's own guard says which
    packet and which owner."""
    _pool, port, ch, _sent = _setup()
    p = ch.packet_alloc()
    assert p is not None
    handle = port.channels[0]
    ksd = array("I", [p] + [NO_INDEX] * (handle.rx.n - 1))
    with pytest.raises(PoolError) as info:
        validate.rx_publish(handle.rx.slots, 0, 1, ksd, None)
    assert str(info.value) == f"packet {p} queued while held by owner {handle.owner}"
    port.close()


def test_tx_refusal_of_a_bad_data_window_names_every_number() -> None:
    """INTERNALIZE_FAILED's DOFF_DLEN words, inside the TX window's: packet, buflet, doff,
    dlen and dlim, then the slot and the window (mutmut recorded these message mutants as
    timeouts; a message cannot hang, so they are killed here by what they change)."""
    pool, port, ch, _sent = _setup()
    _advance_tx(ch, 2)
    p, s = H.stage_tx(ch, b"w" * 60)
    H.pkt(ch.arena, p).buf0.doff = 7
    H.pkt(ch.arena, p).buf0.dlen = pool.buf_size - 6
    ch.advance_slot(ch.tx_ring, s)
    err = _refusal(ch, SyncKind.TX)
    assert err.reason is KillReason.INTERNALIZE_FAILED
    assert err.detail == (
        f"slot 2: packet {p} buflet 0: doff 7 + dlen {pool.buf_size - 6} > dlim "
        f"{pool.buf_size} (slots [2, 3))"
    )
    port.close()
