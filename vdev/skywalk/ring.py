"""KernelRing: the kernel half of one user-facing channel ring (channel_ring.c semantics).

The user owns ``ring_head`` in shared memory; the kernel owns ``khead``/``ktail`` and keeps
``rhead``/``rtail``, its private copies of what it last accepted and published.  Every
prologue reads the user's head (and tail) exactly once, validates them against the private
state, and only then does per-slot work (``validate.py``); every finalize publishes
``ring_tail``/``ring_khead`` and the ready counters.  One slot is always kept empty, so a
ring of ``n`` slots carries at most ``n - 1`` packets.

All rings run in user-packet-pool mode: the user allocates packets through the ALLOC ring,
attaches them to TX slots, detaches them from RX/EVENT slots and returns them through the
FREE ring.  A prologue that finds a violation raises :class:`SyncError`; the owner of the
ring (the channel) then goes defunct.
"""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence

from vdev.abi import ffi, lib

from . import pool as _pool
from . import validate
from .arena import NO_INDEX, RING_HDR_SIZE, SD_LEN_MAX, SLOT_SIZE, RingOff, SlotOff
from .errors import KillReason, SyncError, SyncKind
from .pool import Pbufpool
from .slotwork import Slots
from .stats import RingStats

RING_TX: int = lib.SK_RING_TX
RING_RX: int = lib.SK_RING_RX
RING_ALLOC: int = lib.SK_RING_ALLOC
RING_FREE: int = lib.SK_RING_FREE
RING_EVENT: int = lib.SK_RING_EVENT

_SYNC_OF_KIND = {
    RING_TX: SyncKind.TX,
    RING_RX: SyncKind.RX,
    RING_ALLOC: SyncKind.ALLOC,
    RING_FREE: SyncKind.FREE,
    RING_EVENT: SyncKind.EVENT,
}


def ring_bytes(num_slots: int) -> int:
    """Arena bytes one ring needs: header then slot array."""
    return RING_HDR_SIZE + num_slots * SLOT_SIZE


class KernelRing:
    """Kernel state of one ring plus its header and slots in the arena."""

    def __init__(self, pool: Pbufpool, kind: int, num_slots: int, ring_id: int, owner: int) -> None:
        if num_slots < 2:
            raise ValueError("a ring needs at least 2 slots (one is always empty)")
        self.pool = pool
        self.kind = kind
        self.sync_kind = _SYNC_OF_KIND[kind]
        self.n = num_slots
        self.lim = num_slots - 1
        self.owner = owner
        self.off = pool.ring_alloc(ring_bytes(num_slots))
        self.slots_off = self.off + RING_HDR_SIZE
        lay = pool.arena.layout
        self.r32 = pool.arena.ring32
        self.r16 = pool.arena.ring16
        self.r64 = pool.arena.ring64
        self.h32 = (self.off - lay.ring_off) // 4
        self.slots_w32 = (self.slots_off - lay.ring_off) // 4
        # What the per-slot functions (validate.py's backend) see of this ring.
        self.slots = Slots(pool, owner, self.r32, self.r16, self.slots_w32, num_slots)
        self.khead = 0
        self.rhead = 0
        # TX-like rings start with every usable slot owned by the user; RX-like ones empty.
        self.tx_like = kind in (RING_TX, RING_FREE)
        self.ktail = self.lim if self.tx_like else 0
        self.rtail = self.ktail
        self.ready_slots = self.lim if self.tx_like else 0
        self.ready_bytes = self.ready_slots * pool.buf_size if self.tx_like else 0
        # Kernel-attached packets per slot (RX/EVENT/ALLOC, waiting for finalize).
        self.ksd = array("I", [NO_INDEX]) * num_slots
        # Lengths published per RX slot (checked when the user releases them).
        self.klen = array("I", [0]) * num_slots if kind == RING_RX else None
        self.alloc_ws = self.lim
        self.alloc_nbufs = 1
        self.stats = RingStats()
        hdr = self.h32
        self.r32[hdr + RingOff.NUM_SLOTS_W32] = num_slots
        self.r32[hdr + RingOff.KIND_W32] = kind
        self.r32[hdr + RingOff.ID_W32] = ring_id
        # The remaining header copies are written with cffi (cold path, once per ring).
        h = ffi.cast("struct sk_ring *", ffi.from_buffer(pool.arena.mm) + self.off)
        h.buf_size = pool.buf_size
        h.large_buf_size = pool.large_buf_size
        h.max_frags = pool.max_frags
        h.md_off = lay.md_off
        h.buflet_off = lay.buflet_off
        h.buf_off = lay.buf_off
        h.large_buf_off = lay.large_buf_off
        h.slots_off = self.slots_off
        h.md_size = ffi.sizeof("struct sk_md_obj")
        del h
        for s in range(num_slots):
            self.r32[self.slots_w32 + 2 * s + SlotOff.MD_IDX_W32] = NO_INDEX
        self._publish()

    # ------------------------------------------------------------------ helpers
    def _publish(self) -> None:
        """Write the kernel-owned header fields (finalize of every sync kind)."""
        h = self.h32
        r32 = self.r32
        self.rtail = self.ktail
        r32[h + RingOff.TAIL_W32] = self.ktail
        r32[h + RingOff.KHEAD_W32] = self.khead
        r32[h + RingOff.READY_SLOTS_W32] = self.ready_slots
        r32[h + RingOff.ALLOC_WS_W32] = self.alloc_ws
        self.r64[h // 2 + RingOff.READY_BYTES_W64] = self.ready_bytes

    def _user_head_tail(self) -> tuple[int, int]:
        h = self.h32
        return self.r32[h + RingOff.HEAD_W32], self.r32[h + RingOff.TAIL_W32]

    def _count(self, a: int, b: int) -> int:
        d = b - a
        return d + self.n if d < 0 else d

    def kernel_space(self) -> int:
        """Slots the kernel can still fill (RX/EVENT/ALLOC): one slot stays empty."""
        return self.lim - self._count(self.khead, self.ktail)

    # ------------------------------------------------------------------ the sync
    def prologue(self) -> tuple[list[int], int]:
        """The prologue of this ring's sync kind (channel_ring.c's ``*_sync_prologue``).

        Read the user's head and tail once and validate them against the kernel's state by
        the ring's rule (TX/FREE: ``khead <= rhead <= head <= tail == rtail <= ktail``;
        RX/ALLOC/EVENT: ``khead <= head <= ktail``, tail untouched), then run the kind's
        per-slot step on the slots in ``[rhead, head)`` (``validate.py``), account them and
        accept ``head``.  Returns the packets a TX sync took (for the nexus) and the bytes
        accounted; every other kind returns no packets.
        """
        head, tail = self._user_head_tail()
        if self.tx_like:
            fail = validate.tx_validate(
                self.n, self.khead, self.ktail, self.rhead, self.rtail, head, tail
            )
        else:
            fail = validate.rx_validate(self.n, self.khead, self.ktail, self.rtail, head, tail)
        if fail is not None:
            raise SyncError(fail[0], self.sync_kind, self._detail(fail[1], head, tail))
        # The kind's per-slot step on [rhead, head) (validate.py's backend).
        kind = self.kind
        pkts: list[int] = []
        nbytes = 0
        if kind == RING_TX:  # internalize and take what the user attached
            pkts, nbytes = validate.tx_take(self.slots, self.rhead, head, SyncKind.TX)
        elif kind == RING_FREE:  # free every packet the user handed back
            self.pool.free_taken(validate.free_take(self.slots, self.rhead, head))
        elif kind != RING_ALLOC:
            # RX/EVENT: the slots the user consumed must have been detached; RX also checks
            # each slot's length, and the bytes against the ready count it was published.
            klen = self.klen
            released = validate.rx_release_check(self.slots, self.rhead, head, klen, self.sync_kind)
            if klen is not None:
                if released > self.ready_bytes:
                    raise SyncError(
                        KillReason.INCONSISTENT_READY_BYTES,
                        self.sync_kind,
                        self._detail(
                            f"released {released} bytes > ready {self.ready_bytes}", head, tail
                        ),
                    )
                self.ready_bytes -= released
                nbytes = released
        # (ALLOC: the slots before head were taken by the user; the packets are theirs.)
        self.stats.update(self._count(self.rhead, head), nbytes)
        self.rhead = head
        if not self.tx_like:
            self.khead = head  # the released slots are the kernel's again at once
        return pkts, nbytes

    def finalize(self) -> None:
        """The finalize of this ring's sync kind: publish tail, khead and the ready counts.

        TX-like rings: the nexus consumed everything handed over, so khead catches up and
        the free space returns to the user.  RX-like rings: externalize what the kernel
        attached since the last sync (an ALLOC ring first refills to its working set).
        """
        if self.tx_like:
            self.khead = self.rhead
            self.ktail = self.khead - 1 if self.khead else self.lim
            self.ready_slots = self.lim
            self.ready_bytes = self.lim * self.pool.buf_size
        else:
            if self.kind == RING_ALLOC:
                self._refill()
            nbytes = self._publish_slots(self.rtail, self.klen)
            if self.klen is not None:
                self.ready_bytes += nbytes
            self.ready_slots = self._count(self.rhead, self.ktail)
        self._publish()

    # ------------------------------------------------------------------ RX side helpers
    def rx_enqueue(self, pkts: list[int], start: int = 0) -> int:
        """Attach kernel-held packets at ktail (nexus side); returns how many fit."""
        room = self.kernel_space()
        take = min(room, len(pkts) - start)
        fast = _pool.FAST
        if fast is not None and take >= fast.C_MIN_POOL_BATCH:
            self.ktail = fast.rx_enqueue(self.ksd, self.ktail, pkts, start, take)
            return take
        kt = self.ktail
        ksd = self.ksd
        n = self.n
        for i in range(start, start + take):
            ksd[kt] = pkts[i]
            kt = kt + 1 if kt + 1 < n else 0
        self.ktail = kt
        return take

    def _publish_slots(self, start: int, klen: MutableSequence[int] | None) -> int:
        """Hand the packets in slots ``[start, ktail)`` to the user; returns their bytes."""
        return validate.rx_publish(self.slots, start, self.ktail, self.ksd, klen)

    def _refill(self) -> None:
        """ALLOC: attach fresh packets owned by the channel up to the working set."""
        want = min(self.alloc_ws, self.lim) - self._count(self.khead, self.ktail)
        if want > 0:
            self.rx_enqueue(self.pool.alloc_packets(want, self.alloc_nbufs))

    # ------------------------------------------------------------------ teardown
    def reclaim(self) -> int:
        """Free packets still attached on the kernel side (queued, never published)."""
        held = [i for i in self.ksd if i != NO_INDEX]
        for s in range(self.n):
            self.ksd[s] = NO_INDEX
        if held:
            self.pool.free_taken(held)
        return len(held)

    def release(self) -> None:
        """Give the ring's arena space back to the pool."""
        self.reclaim()
        self.pool.ring_release(self.off, ring_bytes(self.n))

    def _detail(self, what: str, head: int, tail: int) -> str:
        return (
            f"{what} | kh {self.khead} kt {self.ktail} rh {self.rhead} rt {self.rtail}"
            f" | h {head} t {tail}"
        )


__all__ = [
    "RING_ALLOC",
    "RING_EVENT",
    "RING_FREE",
    "RING_RX",
    "RING_TX",
    "SD_LEN_MAX",
    "KernelRing",
    "ring_bytes",
]
