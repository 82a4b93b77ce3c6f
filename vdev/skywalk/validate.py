"""All per-slot and per-packet work of the kernel half, in one module.

Ring-index validation (the TX and RX rules of channel_ring.c), packet internalize (reading
and checking the user copy of the metadata before the kernel trusts anything in it) and
externalize (publishing the kernel's trusted view to the user copy), and the slot loops that
drive them.  Kept together, with flat integer arguments and typed memoryviews instead of
objects, so the whole module can be rewritten in C behind cffi without touching the rings.

Every value read from shared memory is treated as an arbitrary integer: it is range-checked
before it is used as an index, and failures come back as a :class:`KillReason` (or a raised
:class:`SyncError`), never as an IndexError.

Each per-slot function exists twice: the Python reference (``_py_*``) and a compiled twin
(``_c_*``, ``fastpath.c`` through cffi API mode, built by ``fastbuild.py``).  The public names
are bound to one of them; ``BACKEND`` says which (``"c"`` or ``"python"``), ``set_backend``
switches, and ``VDEV_FASTPATH=0`` in the environment forces Python.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import MutableSequence
from typing import Any, NoReturn, cast

from vdev.abi import lib

from . import fastbuild
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
VNET_F_NEEDS_CSUM = 1  # virtio 1.x 5.1.6: VIRTIO_NET_HDR_F_NEEDS_CSUM

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


# --------------------------------------------------------------------- ring indices
def tx_validate(
    n: int, khead: int, ktail: int, rhead: int, rtail: int, head: int, tail: int
) -> Failure | None:
    """TX/FREE rule: ``khead <= rhead <= head <= tail == rtail <= ktail`` modulo wrap.

    ``head`` and ``tail`` are the user's (untrusted) values; the rest are kernel state.
    """
    if khead >= n or rhead >= n or rtail >= n or ktail >= n:
        return KillReason.BASIC_SANITY, f"kernel indices kh {khead} kt {ktail} rh {rhead}"
    return _head_window(n, head, tail, rtail, (rhead, "rhead"), (rtail, "rtail"))


def rx_validate(n: int, khead: int, ktail: int, rtail: int, head: int, tail: int) -> Failure | None:
    """RX/ALLOC/EVENT rule: ``khead <= head <= ktail`` modulo wrap, tail unchanged."""
    if khead >= n or ktail >= n:
        return KillReason.BASIC_SANITY, f"kernel indices kh {khead} kt {ktail}"
    return _head_window(n, head, tail, rtail, (khead, "khead"), (ktail, "ktail"))


def _head_window(
    n: int, head: int, tail: int, rtail: int, lo: tuple[int, str], hi: tuple[int, str]
) -> Failure | None:
    """The user's head must lie in ``[lo, hi]`` modulo wrap, and its tail be untouched.

    On an unwrapped window (hi >= lo) anything outside is HEAD_OOB; on a wrapped one the
    kernel-owned gap (hi, lo) is HEAD_OOB_WRAPPED, as in Skywalk's ring validation macros.
    """
    (lo_v, lo_name), (hi_v, hi_name) = lo, hi
    if head >= n:
        return KillReason.BASIC_SANITY, f"head {head} >= num_slots {n}"
    if hi_v >= lo_v:
        if head < lo_v or head > hi_v:
            return KillReason.HEAD_OOB, (
                f"head {head} outside [{lo_name} {lo_v}, {hi_name} {hi_v}]"
            )
    elif hi_v < head < lo_v:
        return KillReason.HEAD_OOB_WRAPPED, (
            f"head {head} inside ({hi_name} {hi_v}, {lo_name} {lo_v}) of a wrapped ring"
        )
    if tail != rtail:
        return KillReason.TAIL_MISMATCH, f"ring tail {tail} != kernel tail {rtail}"
    return None


# --------------------------------------------------------------------- packets
def _py_internalize(pool: Pbufpool, idx: int) -> Failure | None:
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
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: metadata redzone overwritten"
    maxf = pool.max_frags
    if md16[b16 + _MD_BUFS_MAX_W16] != maxf:
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: bufs_max changed"
    cnt = md16[b16 + _MD_BUFS_CNT_W16]
    if not 1 <= cnt <= maxf:
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: bufs_cnt {cnt} not in 1..{maxf}"
    if cnt != pool.pkt_nbufs[idx]:
        return KillReason.BAD_BUFLET_CHAIN, (
            f"packet {idx}: bufs_cnt {cnt} but the packet has {pool.pkt_nbufs[idx]} buflets"
        )
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
            return KillReason.INTERNALIZE_FAILED, f"packet {idx} buflet {k}: buffer index changed"
        if (u16[w16 + _BL_FLAGS_W16] & BUFLET_LARGE) != (BUFLET_LARGE if large else 0):
            return KillReason.INTERNALIZE_FAILED, f"packet {idx} buflet {k}: large flag changed"
        dlim = pool.large_buf_size if large else pool.buf_size
        if u32[w32 + _BL_DLIM_W32] != dlim:
            return KillReason.INTERNALIZE_FAILED, f"packet {idx} buflet {k}: dlim changed"
        doff = u32[w32 + _BL_DOFF_W32]
        dlen = u32[w32 + _BL_DLEN_W32]
        if doff + dlen > dlim:
            return KillReason.INTERNALIZE_FAILED, (
                f"packet {idx} buflet {k}: doff {doff} + dlen {dlen} > dlim {dlim}"
            )
        nxt = u32[w32 + _BL_NEXT_W32]
        if nxt != b_next[g]:
            return KillReason.BAD_BUFLET_CHAIN, (
                f"packet {idx} buflet {k}: next {nxt} != {b_next[g]} (chain rewritten)"
            )
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
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: len {plen} != sum of buflets {total}"
    headroom = md16[b16 + _MD_HEADROOM_W16]
    if headroom != doff0:
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: headroom {headroom} != doff {doff0}"
    l2 = md16[b16 + _MD_L2_LEN_W16]
    if headroom + l2 >= dlim0:
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: headroom + l2_len >= buffer size"
    pflags = md16[b16 + _MD_PFLAGS_W16]
    if pflags & ~PKT_KNOWN_FLAGS:
        return KillReason.INTERNALIZE_FAILED, f"packet {idx}: unknown pflags {pflags:#x}"
    cstart = cstuff = 0
    if pflags & PKT_CSUM_PARTIAL:
        cstart = md16[b16 + _MD_CSUM_START_W16]
        cstuff = md16[b16 + _MD_CSUM_STUFF_W16]
        if cstart >= plen or cstuff + 2 > plen:
            return KillReason.INTERNALIZE_FAILED, (
                f"packet {idx}: csum start {cstart} / stuff {cstuff} outside len {plen}"
            )
    vb = b32 * 4 + _MD_VNET_BYTE
    if pflags & PKT_VNET_HDR:
        if a.md8[b32 * 4 + _MD_VNET_FLAGS_BYTE] & VNET_F_NEEDS_CSUM:
            vstart = md16[b16 + _MD_VNET_CSUM_START_W16]
            voff = md16[b16 + _MD_VNET_CSUM_OFFSET_W16]
            if vstart + voff + 2 > plen:
                return KillReason.INTERNALIZE_FAILED, (
                    f"packet {idx}: vnet csum_start {vstart} + csum_offset {voff} outside len"
                )
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


def _py_externalize(pool: Pbufpool, idx: int) -> None:
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
def _py_tx_take(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    sync: SyncKind,
) -> tuple[list[int], int]:
    """Take the packets the user attached to slots ``[start, end)`` of a TX ring.

    For each slot: the packet must be held by ``owner`` (UNALLOCATED_PKT), its metadata
    must name itself (QUM_IDX_MISMATCH) and pass :func:`internalize`.  The slot is reset.
    On a violation everything taken so far, and the offending packet if it was ours, is
    freed before :class:`SyncError` is raised: a dead client's packets are not sent.
    Returns the packets (now kernel-owned) and their byte count.
    """
    pkts: list[int] = []
    nbytes = 0
    md32 = pool.arena.md32
    pkt_owner = pool.pkt_owner
    pkt_state = pool.pkt_state
    pkt_len = pool.pkt_len
    num_packets = pool.num_packets
    owned = pool.owners.get(owner, set())
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        w16 = 2 * w
        idx = r32[w + _SI]
        valid = r16[w16 + _SF] & SD_VALID
        if not (valid and idx < num_packets and pkt_state[idx] and pkt_owner[idx] == owner):
            pool._release(pkts)
            what = idx if valid else "none"
            raise SyncError(
                KillReason.UNALLOCATED_PKT,
                sync,
                f"slot {s}: packet {what} not held by the channel (slots [{start}, {end}))",
            )
        pkt_owner[idx] = KERNEL  # taken back from the user: freed with the rest on failure
        owned.discard(idx)
        pkts.append(idx)
        uidx = md32[idx * MD_W32 + _MD_IDX_W32]
        if uidx != idx:
            fail: Failure | None = (
                KillReason.QUM_IDX_MISMATCH,
                f"slot {s}: metadata of packet {idx} names {uidx}",
            )
        else:
            fail = _py_internalize(pool, idx)
        if fail is not None:
            pool._release(pkts)
            raise SyncError(fail[0], sync, f"slot {s}: {fail[1]} (slots [{start}, {end}))")
        nbytes += pkt_len[idx]
        r32[w + _SI] = NO_INDEX
        r16[w16 + _SF] = 0
        r16[w16 + _SL] = 0
        s = s + 1 if s + 1 < n else 0
    return pkts, nbytes


def _py_free_take(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
) -> list[int]:
    """Collect the packets the user returns in FREE-ring slots ``[start, end)``.

    Slots without SD_VALID are skipped (nothing handed over).  A slot naming a packet the
    channel does not hold is UNALLOCATED_PKT; packets collected before it are still freed.
    """
    out: list[int] = []
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        if r16[2 * w + _SF] & SD_VALID:
            idx = r32[w + _SI]
            if not pool.owner_remove(owner, idx):
                pool._release(out)
                raise SyncError(
                    KillReason.UNALLOCATED_PKT,
                    SyncKind.FREE,
                    f"slot {s}: packet {idx} not held by the channel (slots [{start}, {end}))",
                )
            out.append(idx)
        r32[w + _SI] = NO_INDEX
        r16[2 * w + _SF] = 0
        r16[2 * w + _SL] = 0
        s = s + 1 if s + 1 < n else 0
    return out


def _py_rx_release_check(
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    klen: MutableSequence[int] | None,
    sync: SyncKind,
    pool: Pbufpool | None = None,
) -> int:
    """Check the slots the user released (``[start, end)``) were detached; sum their bytes.

    With ``klen`` (the packet lengths the kernel published per slot), a slot whose ``sd_len``
    no longer matches (lengths above 65535 are published clamped) is
    INCONSISTENT_READY_BYTES: the user's byte accounting disagrees with the kernel's.  The
    sum returned is of the kernel's lengths, so ready_bytes stays exact.
    """
    nbytes = 0
    s = start
    while s != end:
        w = slots_w32 + 2 * s
        if r16[2 * w + _SF] & SD_VALID:
            raise SyncError(
                KillReason.SLOT_NOT_DETACHED,
                sync,
                f"slot {s}: packet {r32[w + _SI]} still attached (released slots [{start}, {end}))",
            )
        if klen is not None:
            ulen = r16[2 * w + _SL]
            ln = klen[s]
            if ulen != (ln if ln <= SD_LEN_MAX else SD_LEN_MAX):
                raise SyncError(
                    KillReason.INCONSISTENT_READY_BYTES,
                    sync,
                    f"slot {s}: sd_len {ulen} != published {min(ln, SD_LEN_MAX)} "
                    f"(released slots [{start}, {end}))",
                )
            nbytes += ln
        s = s + 1 if s + 1 < n else 0
    return nbytes


def _py_rx_publish(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    ksd: MutableSequence[int],
    klen: MutableSequence[int] | None,
) -> int:
    """Hand the kernel-held packets in slots ``[start, end)`` to the user; returns bytes.

    Each packet is recorded as held by ``owner``, externalized, and named by its slot
    (SD_VALID, sd_len); the kernel's slot reference is dropped (user packet pool mode).
    """
    nbytes = 0
    s = start
    pkt_len = pool.pkt_len
    pkt_owner = pool.pkt_owner
    owned = pool.owners.setdefault(owner, set())
    while s != end:
        idx = ksd[s]
        ksd[s] = NO_INDEX
        if pkt_owner[idx] != KERNEL:  # trusted code queued a client's packet: a bug
            raise PoolError(f"packet {idx} queued while held by owner {pkt_owner[idx]}")
        pkt_owner[idx] = owner
        owned.add(idx)
        _py_externalize(pool, idx)
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


# --------------------------------------------------------------------- compiled backend
# fastpath.c implements the per-slot functions above check-for-check; the wrappers below
# hand it the trusted arrays and the arena through ffi.from_buffer, apply the Python-object
# side effects (owner sets, pool._release on failure) and build the failure messages from
# the returned codes, so both backends give identical reasons, details and state.

_fast: Any = None  # the compiled module (ffi, lib), loaded by set_backend("c")

# Trusted arrays of the pool handed to C, with their element types.
_POOL_ARRAYS = (
    ("b_buf", "uint32_t[]"),
    ("b_large", "uint8_t[]"),
    ("b_doff", "uint32_t[]"),
    ("b_dlen", "uint32_t[]"),
    ("b_next", "uint32_t[]"),
    ("pkt_state", "uint8_t[]"),
    ("pkt_owner", "int32_t[]"),
    ("pkt_len", "uint32_t[]"),
    ("pkt_nbufs", "uint16_t[]"),
    ("pkt_pflags", "uint16_t[]"),
    ("pkt_l2", "uint16_t[]"),
    ("pkt_cstart", "uint16_t[]"),
    ("pkt_cstuff", "uint16_t[]"),
    ("pkt_vnet", "uint8_t[]"),
)


class _Scratch:
    """Result struct and output array for one call (reused; never shared between calls)."""

    __slots__ = ("cap", "out", "ret")

    def __init__(self, cap: int) -> None:
        ffi = _fast.ffi
        self.cap = cap
        self.out = ffi.new("uint32_t[]", cap)
        self.ret = ffi.new("struct fp_ret *")


class _FastPool:
    """A pool as the compiled code sees it: a ``struct fp_pool`` over exported buffers.

    Cached on the pool (``pool.fast_ctx``) and released by ``Pbufpool.close`` before the
    arena is unmapped.  The trusted arrays are never resized, so holding their buffers is
    harmless.  cffi drops the GIL around the C calls, so every call takes its own
    :class:`_Scratch` from a small free list (list pop/append are atomic).
    """

    def __init__(self, pool: Pbufpool) -> None:
        ffi = _fast.ffi
        a = pool.arena
        lay = a.layout
        arena = ffi.from_buffer("uint8_t[]", a.mm)
        self.keep: list[Any] = [arena]
        c = ffi.new("struct fp_pool *")
        c.md = arena + lay.md_off
        c.bl = arena + lay.buflet_off
        c.num_packets = pool.num_packets
        c.num_ext = pool.num_ext
        c.max_frags = pool.max_frags
        c.buf_size = pool.buf_size
        c.large_buf_size = pool.large_buf_size
        for name, ctype in _POOL_ARRAYS:
            buf = ffi.from_buffer(ctype, getattr(pool, name))
            self.keep.append(buf)
            setattr(c, name, buf)
        self.c = c
        # The ring functions run only on the arena's own ring view (what KernelRing passes).
        self.ring32: memoryview | None = a.ring32
        self.ring_base = arena + lay.ring_off
        self.ring_bytes = lay.ring_region_size
        self.scratch: list[_Scratch] = []

    def take(self, cap: int) -> _Scratch:
        try:
            s = self.scratch.pop()
        except IndexError:
            return _Scratch(max(cap, 64))
        return s if s.cap >= cap else _Scratch(cap)

    def close(self) -> None:
        ffi = _fast.ffi
        for buf in self.keep:
            ffi.release(buf)
        self.keep = []
        self.ring32 = None
        self.scratch = []


def _ctx(pool: Pbufpool) -> _FastPool:
    ctx = pool.fast_ctx
    if ctx is None:
        ctx = pool.fast_ctx = _FastPool(pool)
    return cast(_FastPool, ctx)


def _internalize_failure(detail: int, v: Any) -> Failure:
    """The message validate's Python internalize gives for check ``detail`` (FPD_*)."""
    idx = v[0]
    pk = f"packet {idx}"
    bl = f"packet {idx} buflet {v[1]}"
    ir = KillReason.INTERNALIZE_FAILED
    if detail == 1:
        return ir, f"{pk}: metadata redzone overwritten"
    if detail == 2:
        return ir, f"{pk}: bufs_max changed"
    if detail == 3:
        return ir, f"{pk}: bufs_cnt {v[1]} not in 1..{v[2]}"
    if detail == 4:
        return KillReason.BAD_BUFLET_CHAIN, (
            f"{pk}: bufs_cnt {v[1]} but the packet has {v[2]} buflets"
        )
    if detail == 5:
        return ir, f"{bl}: buffer index changed"
    if detail == 6:
        return ir, f"{bl}: large flag changed"
    if detail == 7:
        return ir, f"{bl}: dlim changed"
    if detail == 8:
        return ir, f"{bl}: doff {v[2]} + dlen {v[3]} > dlim {v[4]}"
    if detail == 9:
        return KillReason.BAD_BUFLET_CHAIN, f"{bl}: next {v[2]} != {v[3]} (chain rewritten)"
    if detail == 10:
        return ir, f"{pk}: len {v[1]} != sum of buflets {v[2]}"
    if detail == 11:
        return ir, f"{pk}: headroom {v[1]} != doff {v[2]}"
    if detail == 12:
        return ir, f"{pk}: headroom + l2_len >= buffer size"
    if detail == 13:
        return ir, f"{pk}: unknown pflags {v[1]:#x}"
    if detail == 14:
        return ir, f"{pk}: csum start {v[1]} / stuff {v[2]} outside len {v[3]}"
    if detail == 15:
        return ir, f"{pk}: vnet csum_start {v[1]} + csum_offset {v[2]} outside len"
    raise AssertionError(f"unknown fast path detail code {detail}")


def _raise_trusted(code: int, ret: Any) -> NoReturn:
    """Errors of trusted state, raised as the Python reference's indexing would."""
    if code == _FP_OVERFLOW:
        raise ValueError("memoryview: invalid value for format 'H'")
    if code == _FP_INDEX_ERROR:
        raise IndexError("array index out of range")
    raise AssertionError(f"unexpected fast path code {code}")


_FP_OK = 0
_FP_BADARGS = 1
_FP_UNALLOCATED = 2
_FP_QUM_IDX = 3
_FP_INTERNALIZE = 4
_FP_NOT_DETACHED = 5
_FP_READY_BYTES = 6
_FP_POOL_ERROR = 7
_FP_INDEX_ERROR = 8
_FP_OVERFLOW = 9


def _c_internalize(pool: Pbufpool, idx: int) -> Failure | None:
    ctx = _ctx(pool)
    sc = ctx.take(1)
    ret = sc.ret
    code = _fast.lib.fp_internalize(ctx.c, idx, ret)
    if code == _FP_OK:
        ctx.scratch.append(sc)
        return None
    if code == _FP_INTERNALIZE:
        return _internalize_failure(ret.detail, ret.v)
    _raise_trusted(code, ret)


def _c_externalize(pool: Pbufpool, idx: int) -> None:
    ctx = _ctx(pool)
    sc = ctx.take(1)
    code = _fast.lib.fp_externalize(ctx.c, idx, sc.ret)
    if code != _FP_OK:
        _raise_trusted(code, sc.ret)
    ctx.scratch.append(sc)


# RX release/publish of fewer slots than this stay in Python: for a single slot the cffi call
# set-up costs more than the Python loop (both give identical results; tests set it to 1).
C_MIN_RX_SLOTS = 2


def _span(n: int, start: int, end: int) -> int:
    d = end - start
    return d + n if d < 0 else d


def _c_tx_take(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    sync: SyncKind,
) -> tuple[list[int], int]:
    ctx = _ctx(pool)
    if start == end or r32 is not ctx.ring32:
        return _py_tx_take(pool, owner, r32, r16, slots_w32, n, start, end, sync)
    sc = ctx.take(_span(n, start, end))
    ret = sc.ret
    code = _fast.lib.fp_tx_take(
        ctx.c, owner, ctx.ring_base, ctx.ring_bytes, slots_w32, n, start, end, sc.out, ret
    )
    if code == _FP_BADARGS:
        ctx.scratch.append(sc)
        return _py_tx_take(pool, owner, r32, r16, slots_w32, n, start, end, sync)
    pkts: list[int] = _fast.ffi.unpack(sc.out, ret.count)
    if pkts:
        pool.owners.get(owner, set()).difference_update(pkts)
    if code == _FP_OK:
        nbytes = int(ret.nbytes)
        ctx.scratch.append(sc)
        return pkts, nbytes
    s = ret.slot
    if code == _FP_UNALLOCATED:
        pool._release(pkts)
        what = ret.v[1] if ret.v[0] else "none"
        raise SyncError(
            KillReason.UNALLOCATED_PKT,
            sync,
            f"slot {s}: packet {what} not held by the channel (slots [{start}, {end}))",
        )
    if code == _FP_QUM_IDX:
        fail: Failure = (
            KillReason.QUM_IDX_MISMATCH,
            f"slot {s}: metadata of packet {ret.v[0]} names {ret.v[1]}",
        )
    elif code == _FP_INTERNALIZE:
        fail = _internalize_failure(ret.detail, ret.v)
    else:
        _raise_trusted(code, ret)
    pool._release(pkts)
    raise SyncError(fail[0], sync, f"slot {s}: {fail[1]} (slots [{start}, {end}))")


def _c_free_take(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
) -> list[int]:
    ctx = _ctx(pool)
    if start == end or r32 is not ctx.ring32:
        return _py_free_take(pool, owner, r32, r16, slots_w32, n, start, end)
    sc = ctx.take(_span(n, start, end))
    ret = sc.ret
    code = _fast.lib.fp_free_take(
        ctx.c, owner, ctx.ring_base, ctx.ring_bytes, slots_w32, n, start, end, sc.out, ret
    )
    if code == _FP_BADARGS:
        ctx.scratch.append(sc)
        return _py_free_take(pool, owner, r32, r16, slots_w32, n, start, end)
    pkts: list[int] = _fast.ffi.unpack(sc.out, ret.count)
    if pkts:
        pool.owners[owner].difference_update(pkts)
    if code == _FP_OK:
        ctx.scratch.append(sc)
        return pkts
    pool._release(pkts)
    raise SyncError(
        KillReason.UNALLOCATED_PKT,
        SyncKind.FREE,
        f"slot {ret.slot}: packet {ret.v[1]} not held by the channel (slots [{start}, {end}))",
    )


def _klen_buf(klen: MutableSequence[int] | None, n: int) -> Any:
    """``klen``/``ksd`` as a C array, None if absent; False if it cannot be shared."""
    if klen is None:
        return None
    if type(klen) is not array or klen.typecode != "I" or len(klen) < n:
        return False
    return _fast.ffi.from_buffer("uint32_t[]", klen)


def _c_rx_release_check(
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    klen: MutableSequence[int] | None,
    sync: SyncKind,
    pool: Pbufpool | None = None,
) -> int:
    d = end - start
    if (d + n if d < 0 else d) < C_MIN_RX_SLOTS:
        return _py_rx_release_check(r32, r16, slots_w32, n, start, end, klen, sync)
    ffi = _fast.ffi
    lib = _fast.lib
    kbuf = _klen_buf(klen, n)
    if kbuf is False:
        return _py_rx_release_check(r32, r16, slots_w32, n, start, end, klen, sync)
    if kbuf is None:
        kbuf = ffi.NULL
    ctx = _ctx(pool) if pool is not None else None
    if ctx is not None and r32 is ctx.ring32:
        sc = ctx.take(1)
        ret = sc.ret
        code = lib.fp_rx_release_check(
            ctx.ring_base, ctx.ring_bytes, slots_w32, n, start, end, kbuf, ret
        )
        if code == _FP_OK:
            nbytes = int(ret.nbytes)
            ctx.scratch.append(sc)
            return nbytes
    else:
        # Any other view of slots: borrow its buffer for the call (r16 must alias r32).
        if r32.nbytes != r16.nbytes or not r32.c_contiguous or r32.readonly:
            return _py_rx_release_check(r32, r16, slots_w32, n, start, end, klen, sync)
        ret = ffi.new("struct fp_ret *")
        with ffi.from_buffer("uint8_t[]", r32) as base:
            code = lib.fp_rx_release_check(base, r32.nbytes, slots_w32, n, start, end, kbuf, ret)
        if code == _FP_OK:
            return int(ret.nbytes)
    if code == _FP_BADARGS:
        return _py_rx_release_check(r32, r16, slots_w32, n, start, end, klen, sync)
    s = ret.slot
    if code == _FP_NOT_DETACHED:
        raise SyncError(
            KillReason.SLOT_NOT_DETACHED,
            sync,
            f"slot {s}: packet {ret.v[0]} still attached (released slots [{start}, {end}))",
        )
    raise SyncError(
        KillReason.INCONSISTENT_READY_BYTES,
        sync,
        f"slot {s}: sd_len {ret.v[0]} != published {ret.v[1]} (released slots [{start}, {end}))",
    )


def _c_rx_publish(
    pool: Pbufpool,
    owner: int,
    r32: memoryview,
    r16: memoryview,
    slots_w32: int,
    n: int,
    start: int,
    end: int,
    ksd: MutableSequence[int],
    klen: MutableSequence[int] | None,
) -> int:
    d = end - start
    if (d + n if d < 0 else d) < C_MIN_RX_SLOTS:
        return _py_rx_publish(pool, owner, r32, r16, slots_w32, n, start, end, ksd, klen)
    ctx = _ctx(pool)
    if r32 is not ctx.ring32:
        return _py_rx_publish(pool, owner, r32, r16, slots_w32, n, start, end, ksd, klen)
    kbuf = _klen_buf(klen, n)
    sbuf = _klen_buf(ksd, n)
    if kbuf is False or not sbuf:
        return _py_rx_publish(pool, owner, r32, r16, slots_w32, n, start, end, ksd, klen)
    ffi = _fast.ffi
    sc = ctx.take(_span(n, start, end))
    ret = sc.ret
    code = _fast.lib.fp_rx_publish(
        ctx.c,
        owner,
        ctx.ring_base,
        ctx.ring_bytes,
        slots_w32,
        n,
        start,
        end,
        sbuf,
        ffi.NULL if kbuf is None else kbuf,
        sc.out,
        ret,
    )
    if code == _FP_BADARGS:
        ctx.scratch.append(sc)
        return _py_rx_publish(pool, owner, r32, r16, slots_w32, n, start, end, ksd, klen)
    owned = pool.owners.setdefault(owner, set())
    if ret.count:
        owned.update(ffi.unpack(sc.out, ret.count))
    if code == _FP_OK:
        nbytes = int(ret.nbytes)
        ctx.scratch.append(sc)
        return nbytes
    if code == _FP_POOL_ERROR:
        held = ret.v[1] - (1 << 64) if ret.v[1] >= 1 << 63 else ret.v[1]
        raise PoolError(f"packet {ret.v[0]} queued while held by owner {held}")
    _raise_trusted(code, ret)


# --------------------------------------------------------------------- dispatch
BACKEND = "python"
internalize = _py_internalize
externalize = _py_externalize
tx_take = _py_tx_take
free_take = _py_free_take
rx_release_check = _py_rx_release_check
rx_publish = _py_rx_publish


_fast_tried = False


def fast_available() -> bool:
    """True if the compiled path is loaded (or can be built and loaded now).

    Building is attempted once per process; a failure was logged by ``fastbuild.load``.
    """
    global _fast, _fast_tried
    if _fast is None and not _fast_tried:
        _fast_tried = True
        _fast = fastbuild.load()
    return _fast is not None


def set_backend(name: str) -> str:
    """Select ``"c"`` or ``"python"`` for the per-slot functions; returns the one in use.

    ``"c"`` falls back to ``"python"`` (one logged warning) when the extension cannot be
    built.  Rings look the functions up on this module at every call, so the switch takes
    effect at the next sync.
    """
    global BACKEND, internalize, externalize, tx_take, free_take, rx_release_check, rx_publish
    if name not in ("c", "python"):
        raise ValueError(f"unknown backend {name!r} (want 'c' or 'python')")
    if name == "c" and fast_available():
        BACKEND = "c"
        internalize, externalize = _c_internalize, _c_externalize
        tx_take, free_take = _c_tx_take, _c_free_take
        rx_release_check, rx_publish = _c_rx_release_check, _c_rx_publish
    else:
        BACKEND = "python"
        internalize, externalize = _py_internalize, _py_externalize
        tx_take, free_take = _py_tx_take, _py_free_take
        rx_release_check, rx_publish = _py_rx_release_check, _py_rx_publish
    return BACKEND


# VDEV_FASTPATH=0 forces the Python reference; anything else uses C when it can be built.
set_backend("python" if os.environ.get("VDEV_FASTPATH", "1") == "0" else "c")


__all__ = [
    "BACKEND",
    "KERNEL",
    "externalize",
    "fast_available",
    "free_take",
    "internalize",
    "rx_publish",
    "rx_release_check",
    "rx_validate",
    "set_backend",
    "tx_take",
    "tx_validate",
]
