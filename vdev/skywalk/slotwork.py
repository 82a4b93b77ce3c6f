"""The per-slot and per-packet work of the kernel half, in Python: the reference backend.

Packet internalize (reading and checking the user copy of the metadata before the kernel
trusts anything in it), externalize (publishing the kernel's trusted view to the user copy)
and the slot loops that drive them.  A loop gets its ring as :class:`Slots` (the pool, the
owner, typed views and plain integers; no ring object), the numbers ``fastpath.c`` takes.
``fastpath.c`` implements every function here check for check (``fastglue.py`` wraps it
with the same signatures); ``validate.py`` binds one of the two.

Every value read from shared memory is treated as an arbitrary integer: it is range-checked
before it is used as an index, and failures come back as a :class:`KillReason` (or a raised
:class:`SyncError`), never as an IndexError.  The failure messages are defined once, below,
and both backends build them from the same table, so reasons and details are identical.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import NamedTuple

from vdev.abi import lib

from .arena import (
    BUF0_W16,
    BUF0_W32,
    BUFLET_W16,
    BUFLET_W32,
    MD_W16,
    MD_W32,
    MD_W64,
    NO_INDEX,
    REDZONE_SEED,
    SD_LEN_MAX,
    BufletOff,
    MdOff,
    SlotOff,
)
from .errors import KillReason, PoolError, SyncError, SyncKind
from .pool import KERNEL, Pbufpool

SD_VALID: int = lib.SK_SD_VALID
PKT_VNET_HDR: int = lib.SK_PKT_VNET_HDR
PKT_CSUM_PARTIAL: int = lib.SK_PKT_CSUM_PARTIAL
PKT_KNOWN_FLAGS = PKT_VNET_HDR | PKT_CSUM_PARTIAL
QUM_FINALIZED: int = lib.SK_QUM_FINALIZED
BUFLET_LARGE: int = lib.SK_BUFLET_LARGE
VNET_F_NEEDS_CSUM: int = lib.VIRTIO_NET_HDR_F_NEEDS_CSUM  # virtio 1.x 5.1.6

Failure = tuple[KillReason, str]

# Field offsets as plain module constants: the hot loops avoid attribute lookups.
_MD_BUFS_CNT_W16 = MdOff.BUFS_CNT_W16
_MD_BUFS_MAX_W16 = MdOff.BUFS_MAX_W16
_MD_CSUM_START_W16 = MdOff.CSUM_START_W16
_MD_CSUM_STUFF_W16 = MdOff.CSUM_STUFF_W16
_MD_HEADROOM_W16 = MdOff.HEADROOM_W16
_MD_IDX_W32 = MdOff.IDX_W32
_MD_L2_LEN_W16 = MdOff.L2_LEN_W16
_MD_LEN_W32 = MdOff.LEN_W32
_MD_PFLAGS_W16 = MdOff.PFLAGS_W16
_MD_QFLAGS_W16 = MdOff.QFLAGS_W16
_MD_REDZONE_W64 = MdOff.REDZONE_W64
_MD_VNET_BYTE = MdOff.VNET_BYTE
_MD_VNET_FLAGS_BYTE = MdOff.VNET_FLAGS_BYTE
_MD_VNET_CSUM_START_W16 = MdOff.VNET_CSUM_START_W16
_MD_VNET_CSUM_OFFSET_W16 = MdOff.VNET_CSUM_OFFSET_W16
_MD_VNET_LEN = MdOff.VNET_LEN
_BL_BUF_IDX_W32 = BufletOff.BUF_IDX_W32
_BL_DLEN_W32 = BufletOff.DLEN_W32
_BL_DLIM_W32 = BufletOff.DLIM_W32
_BL_DOFF_W32 = BufletOff.DOFF_W32
_BL_FLAGS_W16 = BufletOff.FLAGS_W16
_BL_NEXT_W32 = BufletOff.NEXT_W32
_SI = SlotOff.MD_IDX_W32
_SF = SlotOff.FLAGS_W16
_SL = SlotOff.LEN_W16


# --------------------------------------------------------------------- failure messages
# The internalize checks in the order both backends run them: (reason, message template of
# the numbers the check reports).  fastpath.h names the same checks FPD_<key>.
INTERNALIZE_CHECKS: dict[str, tuple[KillReason, str]] = {
    "REDZONE": (KillReason.INTERNALIZE_FAILED, "packet {0}: metadata redzone overwritten"),
    "BUFS_MAX": (KillReason.INTERNALIZE_FAILED, "packet {0}: bufs_max changed"),
    "BUFS_CNT_RANGE": (KillReason.INTERNALIZE_FAILED, "packet {0}: bufs_cnt {1} not in 1..{2}"),
    "BUFS_CNT_CHAIN": (
        KillReason.BAD_BUFLET_CHAIN,
        "packet {0}: bufs_cnt {1} but the packet has {2} buflets",
    ),
    "BUF_IDX": (KillReason.INTERNALIZE_FAILED, "packet {0} buflet {1}: buffer index changed"),
    "LARGE_FLAG": (KillReason.INTERNALIZE_FAILED, "packet {0} buflet {1}: large flag changed"),
    "DLIM": (KillReason.INTERNALIZE_FAILED, "packet {0} buflet {1}: dlim changed"),
    "DOFF_DLEN": (
        KillReason.INTERNALIZE_FAILED,
        "packet {0} buflet {1}: doff {2} + dlen {3} > dlim {4}",
    ),
    "NEXT": (
        KillReason.BAD_BUFLET_CHAIN,
        "packet {0} buflet {1}: next {2} != {3} (chain rewritten)",
    ),
    "LEN_SUM": (KillReason.INTERNALIZE_FAILED, "packet {0}: len {1} != sum of buflets {2}"),
    "HEADROOM": (KillReason.INTERNALIZE_FAILED, "packet {0}: headroom {1} != doff {2}"),
    "L2_LEN": (KillReason.INTERNALIZE_FAILED, "packet {0}: headroom + l2_len >= buffer size"),
    "PFLAGS": (KillReason.INTERNALIZE_FAILED, "packet {0}: unknown pflags {1:#x}"),
    "CSUM": (
        KillReason.INTERNALIZE_FAILED,
        "packet {0}: csum start {1} / stuff {2} outside len {3}",
    ),
    "VNET_CSUM": (
        KillReason.INTERNALIZE_FAILED,
        "packet {0}: vnet csum_start {1} + csum_offset {2} outside len",
    ),
}


def internalize_failure(check: str, *values: int) -> Failure:
    """The (reason, detail) of internalize check ``check`` with the numbers it reports."""
    reason, template = INTERNALIZE_CHECKS[check]
    return reason, template.format(*values)


def qum_mismatch(idx: int, uidx: int) -> Failure:
    return KillReason.QUM_IDX_MISMATCH, f"metadata of packet {idx} names {uidx}"


def slot_failure(sync: SyncKind, slot: int, fail: Failure, start: int, end: int) -> SyncError:
    """A TX slot's packet failed a check: the error for the slots ``[start, end)``."""
    return SyncError(fail[0], sync, f"slot {slot}: {fail[1]} (slots [{start}, {end}))")


def unallocated(sync: SyncKind, slot: int, idx: int | None, start: int, end: int) -> SyncError:
    """A slot names a packet the channel does not hold (``None``: no packet at all)."""
    what = "none" if idx is None else idx
    return SyncError(
        KillReason.UNALLOCATED_PKT,
        sync,
        f"slot {slot}: packet {what} not held by the channel (slots [{start}, {end}))",
    )


def not_detached(sync: SyncKind, slot: int, idx: int, start: int, end: int) -> SyncError:
    return SyncError(
        KillReason.SLOT_NOT_DETACHED,
        sync,
        f"slot {slot}: packet {idx} still attached (released slots [{start}, {end}))",
    )


def ready_bytes_mismatch(
    sync: SyncKind, slot: int, ulen: int, published: int, start: int, end: int
) -> SyncError:
    return SyncError(
        KillReason.INCONSISTENT_READY_BYTES,
        sync,
        f"slot {slot}: sd_len {ulen} != published {published} (released slots [{start}, {end}))",
    )


class Slots(NamedTuple):
    """One ring's slot array as the per-slot functions see it (all kernel-trusted): the
    pool, the owner id of the channel the ring belongs to, the arena's ring region as 32-
    and 16-bit views, where the slot array starts (in 32-bit words) and how many slots it
    has.  Built once per ring (``KernelRing.slots``); the compiled backend passes the same
    numbers to ``fastpath.c``.  A tuple, so a loop unpacks it into locals in one step."""

    pool: Pbufpool
    owner: int
    r32: memoryview
    r16: memoryview
    slots_w32: int
    n: int


# --------------------------------------------------------------------- packets
def internalize(pool: Pbufpool, idx: int) -> Failure | None:
    """Check the user copy of packet ``idx`` and, only if all of it is sane, adopt it.

    ``idx`` is trusted (the caller got it from the owner table).  Adopted fields: each
    buflet's data window, total length, packet flags, L2 length, checksum offsets and the
    virtio-net header.  Buffer indices, chain links and limits are compared with the trusted
    copy and never taken from the user.
    """
    a = pool.arena
    md16 = a.md16
    md32 = a.md32
    b16 = idx * MD_W16
    b32 = idx * MD_W32
    if a.md64[idx * MD_W64 + _MD_REDZONE_W64] != REDZONE_SEED ^ idx:
        return internalize_failure("REDZONE", idx)
    maxf = pool.max_frags
    if md16[b16 + _MD_BUFS_MAX_W16] != maxf:
        return internalize_failure("BUFS_MAX", idx)
    cnt = md16[b16 + _MD_BUFS_CNT_W16]
    if not 1 <= cnt <= maxf:
        return internalize_failure("BUFS_CNT_RANGE", idx, cnt, maxf)
    if cnt != pool.pkt_nbufs[idx]:
        return internalize_failure("BUFS_CNT_CHAIN", idx, cnt, pool.pkt_nbufs[idx])
    p = pool.num_packets
    b_buf = pool.b_buf
    b_large = pool.b_large
    b_next = pool.b_next
    u32 = md32
    u16 = md16
    w32 = b32 + BUF0_W32
    w16 = b16 + BUF0_W16
    g = idx
    total = 0
    doff0 = dlim0 = 0
    dlen0 = 0
    more: list[int] | None = None  # doff, dlen of buflets 1.., committed only if all pass
    for k in range(cnt):
        large = b_large[g]
        if u32[w32 + _BL_BUF_IDX_W32] != b_buf[g]:
            return internalize_failure("BUF_IDX", idx, k)
        if (u16[w16 + _BL_FLAGS_W16] & BUFLET_LARGE) != (BUFLET_LARGE if large else 0):
            return internalize_failure("LARGE_FLAG", idx, k)
        dlim = pool.large_buf_size if large else pool.buf_size
        if u32[w32 + _BL_DLIM_W32] != dlim:
            return internalize_failure("DLIM", idx, k)
        doff = u32[w32 + _BL_DOFF_W32]
        dlen = u32[w32 + _BL_DLEN_W32]
        if doff + dlen > dlim:
            return internalize_failure("DOFF_DLEN", idx, k, doff, dlen, dlim)
        nxt = u32[w32 + _BL_NEXT_W32]
        if nxt != b_next[g]:
            return internalize_failure("NEXT", idx, k, nxt, b_next[g])
        if k == 0:
            doff0, dlen0, dlim0 = doff, dlen, dlim
        elif more is None:
            more = [doff, dlen]
        else:
            more.append(doff)
            more.append(dlen)
        total += dlen
        if nxt == NO_INDEX:
            break
        g = p + nxt
        u32 = a.bl32
        u16 = a.bl16
        w32 = nxt * BUFLET_W32
        w16 = nxt * BUFLET_W16
    plen = md32[b32 + _MD_LEN_W32]
    if plen != total:
        return internalize_failure("LEN_SUM", idx, plen, total)
    headroom = md16[b16 + _MD_HEADROOM_W16]
    if headroom != doff0:
        return internalize_failure("HEADROOM", idx, headroom, doff0)
    l2 = md16[b16 + _MD_L2_LEN_W16]
    if headroom + l2 >= dlim0:
        return internalize_failure("L2_LEN", idx)
    pflags = md16[b16 + _MD_PFLAGS_W16]
    if pflags & ~PKT_KNOWN_FLAGS:
        return internalize_failure("PFLAGS", idx, pflags)
    cstart = cstuff = 0
    if pflags & PKT_CSUM_PARTIAL:
        cstart = md16[b16 + _MD_CSUM_START_W16]
        cstuff = md16[b16 + _MD_CSUM_STUFF_W16]
        if cstart >= plen or cstuff + 2 > plen:
            return internalize_failure("CSUM", idx, cstart, cstuff, plen)
    vb = b32 * 4 + _MD_VNET_BYTE
    if pflags & PKT_VNET_HDR:
        if a.md8[b32 * 4 + _MD_VNET_FLAGS_BYTE] & VNET_F_NEEDS_CSUM:
            vstart = md16[b16 + _MD_VNET_CSUM_START_W16]
            voff = md16[b16 + _MD_VNET_CSUM_OFFSET_W16]
            if vstart + voff + 2 > plen:
                return internalize_failure("VNET_CSUM", idx, vstart, voff)
    # Everything checked: adopt the user's windows and offload fields.
    b_doff = pool.b_doff
    b_dlen = pool.b_dlen
    b_doff[idx] = doff0
    b_dlen[idx] = dlen0
    if more is not None:
        g = idx
        for k in range(0, len(more), 2):
            g = p + b_next[g]
            b_doff[g] = more[k]
            b_dlen[g] = more[k + 1]
    pool.pkt_len[idx] = plen
    pool.pkt_pflags[idx] = pflags
    pool.pkt_l2[idx] = l2
    pool.pkt_cstart[idx] = cstart
    pool.pkt_cstuff[idx] = cstuff
    if pflags & PKT_VNET_HDR:
        o = idx * _MD_VNET_LEN
        pool.pkt_vnet[o : o + _MD_VNET_LEN] = a.md8[vb : vb + _MD_VNET_LEN]
    return None


def externalize(pool: Pbufpool, idx: int) -> None:
    """Write the kernel's trusted view of packet ``idx`` into its user copy (and redzone)."""
    a = pool.arena
    md16 = a.md16
    md32 = a.md32
    b16 = idx * MD_W16
    b32 = idx * MD_W32
    a.md64[idx * MD_W64 + _MD_REDZONE_W64] = REDZONE_SEED ^ idx
    md32[b32 + _MD_IDX_W32] = idx
    md32[b32 + _MD_LEN_W32] = pool.pkt_len[idx]
    md16[b16 + _MD_QFLAGS_W16] = QUM_FINALIZED
    pflags = pool.pkt_pflags[idx]
    md16[b16 + _MD_PFLAGS_W16] = pflags
    md16[b16 + _MD_BUFS_CNT_W16] = pool.pkt_nbufs[idx]
    md16[b16 + _MD_BUFS_MAX_W16] = pool.max_frags
    md16[b16 + _MD_HEADROOM_W16] = pool.b_doff[idx]
    md16[b16 + _MD_L2_LEN_W16] = pool.pkt_l2[idx]
    md16[b16 + _MD_CSUM_START_W16] = pool.pkt_cstart[idx]
    md16[b16 + _MD_CSUM_STUFF_W16] = pool.pkt_cstuff[idx]
    vb = b32 * 4 + _MD_VNET_BYTE
    if pflags & PKT_VNET_HDR:  # without the flag the user copy's vnet bytes mean nothing
        o = idx * _MD_VNET_LEN
        a.md8[vb : vb + _MD_VNET_LEN] = pool.pkt_vnet[o : o + _MD_VNET_LEN]
    p = pool.num_packets
    g = idx
    u32 = md32
    u16 = md16
    w32 = b32 + BUF0_W32
    w16 = b16 + BUF0_W16
    while True:
        large = pool.b_large[g]
        u32[w32 + _BL_BUF_IDX_W32] = pool.b_buf[g]
        u32[w32 + _BL_DOFF_W32] = pool.b_doff[g]
        u32[w32 + _BL_DLEN_W32] = pool.b_dlen[g]
        u32[w32 + _BL_DLIM_W32] = pool.large_buf_size if large else pool.buf_size
        nxt = pool.b_next[g]
        u32[w32 + _BL_NEXT_W32] = nxt
        u16[w16 + _BL_FLAGS_W16] = BUFLET_LARGE if large else 0
        if nxt == NO_INDEX:
            return
        g = p + nxt
        u32 = a.bl32
        u16 = a.bl16
        w32 = nxt * BUFLET_W32
        w16 = nxt * BUFLET_W16


# --------------------------------------------------------------------- slot loops
def tx_take(ring: Slots, start: int, end: int, sync: SyncKind) -> tuple[list[int], int]:
    """Take the packets the user attached to slots ``[start, end)`` of a TX ring.

    For each slot: the packet must be held by ``owner`` (UNALLOCATED_PKT), its metadata
    must name itself (QUM_IDX_MISMATCH) and pass :func:`internalize`.  The slot is reset.
    On a violation everything taken so far, and the offending packet if it was ours, is
    freed before :class:`SyncError` is raised: a dead client's packets are not sent.
    Returns the packets (now kernel-owned) and their byte count.
    """
    pool, owner, r32, r16, slots_w32, n = ring
    pkts: list[int] = []
    nbytes = 0
    md32 = pool.arena.md32
    pkt_owner = pool.pkt_owner
    pkt_state = pool.pkt_state
    pkt_len = pool.pkt_len
    num_packets = pool.num_packets
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        w16 = 2 * w
        idx = r32[w + _SI]
        valid = r16[w16 + _SF] & SD_VALID
        if not (valid and idx < num_packets and pkt_state[idx] and pkt_owner[idx] == owner):
            pool.free_taken(pkts)
            raise unallocated(sync, s, idx if valid else None, start, end)
        pkt_owner[idx] = KERNEL  # taken back from the user: freed with the rest on failure
        pkts.append(idx)
        uidx = md32[idx * MD_W32 + _MD_IDX_W32]
        fail = qum_mismatch(idx, uidx) if uidx != idx else internalize(pool, idx)
        if fail is not None:
            pool.free_taken(pkts)
            raise slot_failure(sync, s, fail, start, end)
        nbytes += pkt_len[idx]
        r32[w + _SI] = NO_INDEX
        r16[w16 + _SF] = 0
        r16[w16 + _SL] = 0
        s = s + 1 if s + 1 < n else 0
    return pkts, nbytes


def free_take(ring: Slots, start: int, end: int) -> list[int]:
    """Collect the packets the user returns in FREE-ring slots ``[start, end)``.

    Slots without SD_VALID are skipped (nothing handed over).  A slot naming a packet the
    channel does not hold is UNALLOCATED_PKT; packets collected before it are still freed.
    """
    pool, owner, r32, r16, slots_w32, n = ring
    out: list[int] = []
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        if r16[2 * w + _SF] & SD_VALID:
            idx = r32[w + _SI]
            if not pool.owner_remove(owner, idx):
                pool.free_taken(out)
                raise unallocated(SyncKind.FREE, s, idx, start, end)
            out.append(idx)
        r32[w + _SI] = NO_INDEX
        r16[2 * w + _SF] = 0
        r16[2 * w + _SL] = 0
        s = s + 1 if s + 1 < n else 0
    return out


def rx_release_check(
    ring: Slots, start: int, end: int, klen: MutableSequence[int] | None, sync: SyncKind
) -> int:
    """Check the slots the user released (``[start, end)``) were detached; sum their bytes.

    With ``klen`` (the packet lengths the kernel published per slot), a slot whose ``sd_len``
    no longer matches (lengths above 65535 are published clamped) is
    INCONSISTENT_READY_BYTES: the user's byte accounting disagrees with the kernel's.  The
    sum returned is of the kernel's lengths, so ready_bytes stays exact.
    """
    _pool, _owner, r32, r16, slots_w32, n = ring
    nbytes = 0
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        if r16[2 * w + _SF] & SD_VALID:
            raise not_detached(sync, s, r32[w + _SI], start, end)
        if klen is not None:
            ulen = r16[2 * w + _SL]
            ln = klen[s]
            if ulen != (ln if ln <= SD_LEN_MAX else SD_LEN_MAX):
                raise ready_bytes_mismatch(sync, s, ulen, min(ln, SD_LEN_MAX), start, end)
            nbytes += ln
        s = s + 1 if s + 1 < n else 0
    return nbytes


def rx_publish(
    ring: Slots, start: int, end: int, ksd: MutableSequence[int], klen: MutableSequence[int] | None
) -> int:
    """Hand the kernel-held packets in slots ``[start, end)`` to the user; returns bytes.

    Each packet is recorded as held by ``owner``, externalized, and named by its slot
    (SD_VALID, sd_len); the kernel's slot reference is dropped (user packet pool mode).
    """
    pool, owner, r32, r16, slots_w32, n = ring
    nbytes = 0
    s = start
    pkt_len = pool.pkt_len
    pkt_owner = pool.pkt_owner
    while s != end:
        idx = ksd[s]
        ksd[s] = NO_INDEX
        if pkt_owner[idx] != KERNEL:  # trusted code queued a client's packet: a bug
            raise PoolError(f"packet {idx} queued while held by owner {pkt_owner[idx]}")
        pkt_owner[idx] = owner
        externalize(pool, idx)
        ln = pkt_len[idx]
        sdl = ln if ln <= SD_LEN_MAX else SD_LEN_MAX
        w = slots_w32 + 2 * s
        r32[w + _SI] = idx
        r16[2 * w + _SF] = SD_VALID
        r16[2 * w + _SL] = sdl
        if klen is not None:
            klen[s] = ln
        nbytes += ln
        s = s + 1 if s + 1 < n else 0
    return nbytes


__all__ = [
    "INTERNALIZE_CHECKS",
    "Failure",
    "Slots",
    "externalize",
    "free_take",
    "internalize",
    "internalize_failure",
    "not_detached",
    "qum_mismatch",
    "ready_bytes_mismatch",
    "rx_publish",
    "rx_release_check",
    "slot_failure",
    "tx_take",
    "unallocated",
]
