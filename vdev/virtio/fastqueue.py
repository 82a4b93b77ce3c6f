"""The compiled virtqueue bursts: cffi glue between the queues and ``vdev/native/virtq.c``.

``virtq.c`` runs the per-chain work of the NIC's TX loop (walk, validate, copy into a pool
packet, push) and RX drain (pop buffers, write a pool packet, push) for a split or a packed
ring, one call per burst with the GIL released.  The Python code stays the reference and the only
place where kill details, drop reasons and pool shortages are produced: a burst completes
only the items the reference would complete plainly and stops *before* anything else
(``Burst.stop`` is ``SLOW`` or ``VIOLATION``), leaving the queue as the reference would
have; the NIC then runs the reference for that one item and calls the burst again.  So both
paths give the same used ring, kills, pool state and counters by construction, and the
differential tests (``tests/virtio/test_fastqueue_diff.py``) check that the C accepts
exactly what the reference accepts.

Selection follows ``vdev/skywalk/validate.py``: :func:`set_backend` (``"c"`` or
``"python"``), ``BACKEND`` says which is in use; the compiled bursts are the default,
``VDEV_FASTQUEUE=0`` in the environment selects the reference for the virtqueues and
``VDEV_FASTPATH=0`` turns off every compiled path.  :data:`STRICT`
(tests) makes a VIOLATION that the reference then accepts an AssertionError instead of a
tolerated race with a guest rewriting its ring.

The caller (the device, under its lock) must not remap, kill or close the queue, or close
the pool, while a burst runs: the C reads the ring and guest memory through pointers taken
here.
"""

from __future__ import annotations

import os
from array import array
from collections import defaultdict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from vdev.abi import ffi as abi_ffi
from vdev.errors import KillReason, SyncError
from vdev.native import structs
from vdev.skywalk import fastglue
from vdev.skywalk.pool import Pbufpool
from vdev.virtio import ringstate
from vdev.virtio.memory import GuestMemory

BACKEND = "python"
STRICT = False
# Largest frame a burst handles (nic.MAX_FRAME), plus room for the 12-byte header.
SCRATCH_BYTES = 65550 + 16
# Buffers of the chains of one item a burst can hold; a chain with more goes to Python.
MIN_SEGS = 1024

_fast: Any = None  # the compiled module (vdev/native), shared with fastglue
# Bursts run and items completed per direction, and why bursts stopped (tests, profiling).
COUNTS: defaultdict[str, int] = defaultdict(int)
_TX_STOP = {i: f"tx_stop_{i}" for i in range(8)}
_RX_STOP = {i: f"rx_stop_{i}" for i in range(8)}


@dataclass(frozen=True)
class Violation:
    """A ring rule the C reported (``VQV_*``), as the Python reference words its kill."""

    name: str
    reason: KillReason
    phrase: str  # a part of the reference's detail message


_IOB = KillReason.INTERNALIZE_FAILED
VIOLATIONS_BY_NAME = {
    "HEAD_OOB": Violation("HEAD_OOB", KillReason.HEAD_OOB, "ahead of last_avail_idx"),
    "HEAD_RANGE": Violation("HEAD_RANGE", _IOB, ">= queue size"),
    "HEAD_INFLIGHT": Violation("HEAD_INFLIGHT", _IOB, "which is still in flight"),
    "LOOP": Violation("LOOP", _IOB, "chain loop"),
    "TOO_LONG": Violation("TOO_LONG", _IOB, "chain too long"),
    "NESTED": Violation("NESTED", _IOB, "nested indirect"),
    "INDIRECT_FEATURE": Violation("INDIRECT_FEATURE", _IOB, "INDIRECT not negotiated"),
    "INDIRECT_NEXT": Violation("INDIRECT_NEXT", _IOB, "both INDIRECT and NEXT"),
    "INDIRECT_LEN": Violation("INDIRECT_LEN", _IOB, "is not a non-zero multiple of"),
    "INDIRECT_MAX": Violation("INDIRECT_MAX", _IOB, "entries exceeds"),
    "INDIRECT_MEM": Violation("INDIRECT_MEM", _IOB, "indirect table 0x"),
    "WRITABLE": Violation("WRITABLE", _IOB, "is device-writable on a queue the device only reads"),
    "READABLE": Violation("READABLE", _IOB, "is device-readable on a queue the device only writes"),
    "ORDER": Violation("ORDER", _IOB, "device-readable after a device-writable"),
    "BUF_MEM": Violation("BUF_MEM", _IOB, "outside guest memory"),
    "NEXT_RANGE": Violation("NEXT_RANGE", _IOB, "out of range (table has"),
    "OVERFLOW": Violation("OVERFLOW", _IOB, "total length overflows 32 bits"),
    # packed rings (2.8)
    "NOT_AVAIL": Violation("NOT_AVAIL", _IOB, "is not available (flags"),
    "CHAIN_LONG": Violation("CHAIN_LONG", _IOB, "chain longer than the queue size"),
    "INDIRECT_AFTER_DIRECT": Violation("INDIRECT_AFTER_DIRECT", _IOB, "has INDIRECT set after"),
    "INDIRECT_TOO_LONG": Violation("INDIRECT_TOO_LONG", _IOB, "chain too long: indirect table of"),
    "TABLE_NESTED": Violation("TABLE_NESTED", _IOB, "nested indirect at table entry"),
    "BUF_ID": Violation("BUF_ID", _IOB, ">= queue size"),
    "ID_INFLIGHT": Violation("ID_INFLIGHT", _IOB, "is still in flight"),
}


class _Codes:
    """virtq.h's codes, read from the compiled module by name."""

    def __init__(self, lib: Any) -> None:
        self.EMPTY: int = lib.VQ_STOP_EMPTY
        self.BUDGET: int = lib.VQ_STOP_BUDGET
        self.SLOW: int = lib.VQ_STOP_SLOW
        self.VIOLATION: int = lib.VQ_STOP_VIOLATION
        self.NOROOM: int = lib.VQ_STOP_NOROOM
        self.GUEST_FAULT: int = lib.VQ_STOP_GUEST_FAULT
        self.BADARGS: int = lib.VQ_STOP_BADARGS
        self.RX_MERGEABLE: int = lib.VQ_RX_MERGEABLE
        self.RX_GUEST_CSUM: int = lib.VQ_RX_GUEST_CSUM
        self.POOL_SLOW: int = lib.VQS_POOL
        # VQV_<name> -> the reference's wording (a C code without one fails here, at load).
        self.violations: dict[int, Violation] = {
            int(getattr(lib, f"VQV_{name}")): v for name, v in VIOLATIONS_BY_NAME.items()
        }
        self.slow: dict[int, str] = {
            int(getattr(lib, f"VQS_{n}")): n.lower()
            for n in ("RUNT", "OVERSIZE", "POOL", "GSO", "RX_CSUM", "RX_SMALL", "SEGS")
        }


C: _Codes  # bound by load()


def load() -> bool:
    """Load the compiled module (built once, shared with the Skywalk fast path)."""
    global _fast, C
    if _fast is None and fastglue.load():
        mod = fastglue._fast
        if not hasattr(mod.lib, "vq_tx"):  # pragma: no cover - stale cached build
            return False
        C = _Codes(mod.lib)
        _fast = mod
    return _fast is not None


def set_backend(name: str) -> str:
    """Select ``"c"`` or ``"python"`` for the virtqueue bursts; returns the one in use (``"c"``
    falls back to ``"python"`` when the extension cannot be built)."""
    global BACKEND
    if name not in ("c", "python"):
        raise ValueError(f"unknown backend {name!r} (want 'c' or 'python')")
    BACKEND = "c" if name == "c" and load() else "python"
    return BACKEND


@dataclass(slots=True)
class Burst:
    """What one burst did: why it stopped, the code for SLOW / VIOLATION, how many items
    it completed, their frame bytes, and (RX) how many frames were merged."""

    stop: int
    code: int
    count: int
    nbytes: int
    merged: int = 0
    notify: bool | None = None  # tx_burst(finish=True): finished, and whether to signal

    @property
    def violation(self) -> Violation | None:
        return C.violations.get(self.code) if self.stop == C.VIOLATION else None


_queue_types: tuple[type, ...] = ()  # (SplitQueue, PackedQueue), bound at first use


def _bind_queue_types() -> tuple[type, ...]:
    """The queue classes bursts run on (imported late: they import this module)."""
    global _queue_types
    from vdev.virtio.packed import PackedQueue
    from vdev.virtio.split import SplitQueue

    _queue_types = (SplitQueue, PackedQueue)
    return _queue_types


def usable(queue: object) -> bool:
    """Whether ``queue`` can run compiled bursts (the C backend, a live split or packed
    queue)."""
    return (
        BACKEND == "c"
        and type(queue) in (_queue_types or _bind_queue_types())
        and queue.defunct is None  # type: ignore[attr-defined]
        and not queue._closed  # type: ignore[attr-defined]
        and len(queue._bufs) == 3  # type: ignore[attr-defined]
        # Inflight I/O tracking (vhost-user "Inflight I/O tracking") records every pop and
        # push in the shared region, and resubmitted heads come before the avail ring: the
        # reference path does both.
        and getattr(queue, "inflight", None) is None
        and not getattr(queue, "_resubmit", None)
    )


class _QueueCtx:
    """A queue's ``struct vq_queue`` and scratch, cached on the queue (``fast_ctx``)."""

    def __init__(self, queue: Any) -> None:
        from vdev.virtio.packed import PackedQueue

        nffi = _fast.ffi
        self.packed = type(queue) is PackedQueue
        self.c = ringstate.compiled(queue)
        self.seg_cap = max(MIN_SEGS, 2 * queue.size)
        self.segs = nffi.new("struct vq_seg[]", self.seg_cap)
        self.scratch = nffi.new("uint8_t[]", SCRATCH_BYTES)
        self.out = nffi.new("uint32_t[]", 1024)
        self.burst = nffi.new("struct vq_burst *")
        self.inflight = nffi.from_buffer("uint64_t[]", queue._inflight)
        c = self.c
        c.packed = self.packed
        c.size = queue.size
        c.segs = self.segs
        c.seg_cap = self.seg_cap
        c.scratch = self.scratch
        c.scratch_cap = SCRATCH_BYTES
        c.inflight = self.inflight
        if self.packed:
            from vdev.virtio.packed import pffi

            self.ring_ffi = pffi
            self.ndesc = nffi.from_buffer("uint16_t[]", queue._ndesc)
            self.pend_cap = queue.size + 64
            self.pend = [nffi.new("uint32_t[]", self.pend_cap) for _ in range(3)]
            c.ndesc = self.ndesc
            c.pend_id, c.pend_len, c.pend_nd = self.pend
            c.pend_cap = self.pend_cap
        else:
            self.ring_ffi = abi_ffi
            self.popped = nffi.from_buffer("uint16_t[]", queue._popped)
            c.popped = self.popped
        self.bufs_ref: list[Any] | None = None
        self.vp: Any = None
        self.tops: list[Any] = []  # own_pool's arrays of reserved free-list tops
        self.vp_pool: Any = None  # the _PoolCtx self.vp was made for
        self.pool: Any = None  # the pool of the last burst, and its _PoolCtx
        self.pc: Any = None
        self.region_map = _RegionMap()
        self.want_ext = RESERVE_MIN  # TX bursts' buffer reservations (tx_burst)
        self.want_large = RESERVE_MIN

    def own_pool(self, pc: _PoolCtx, pool: Pbufpool) -> Any:
        """This queue's own ``struct vq_pool`` for bursts outside the pool lock (it must not
        share the pool's one with another thread's burst), with room for the free-list
        tops a burst of up to ``len(self.out)`` chains may reserve."""
        vp = self.vp
        if vp is None or self.vp_pool is not pc:
            nffi = _fast.ffi
            vp = self.vp = nffi.new("struct vq_pool *")
            src = pc.vp
            vp.p, vp.bufs, vp.large, vp.num_large = src.p, src.bufs, src.large, src.num_large
            vp.lists = pc.lists
            most = len(self.out)
            caps = (most, most * (pool.max_frags - 1), most * pool.max_frags)
            self.tops = [
                nffi.new("uint32_t[]", max(1, min(k, fl.cap)))
                for k, fl in zip(
                    caps, (pool._free_pkts, pool._free_ext, pool._free_large), strict=True
                )
            ]
            vp.own = self.tops
            vp.own_cap = [len(t) for t in self.tops]
            self.vp_pool = pc
        return vp

    def rings(self, queue: Any) -> None:
        """Point the struct at the queue's current ring views (after a remap, new ones)."""
        if self.bufs_ref is queue._bufs:
            return
        nffi = _fast.ffi
        addr = [int(self.ring_ffi.cast("uintptr_t", b)) for b in queue._bufs]
        c = self.c
        c.desc = nffi.cast("uint8_t *", addr[0])
        c.avail = nffi.cast("uint16_t *", addr[1])
        c.used16 = nffi.cast("uint16_t *", addr[2])
        self.bufs_ref = queue._bufs


def _ctx(queue: Any) -> _QueueCtx:
    ctx = queue.fast_ctx
    if ctx is None:
        ctx = queue.fast_ctx = _QueueCtx(queue)
    ctx.rings(queue)
    return ctx  # type: ignore[no-any-return]


# The queue's indices, switches and counters live in its struct (queue._cs,
# vdev/virtio/ringstate.py), which the Python queue uses too: a burst has nothing to copy in
# or out but a packed queue's used elements pushed and not yet published, which the Python
# queue keeps as a list (only a ring fault leaves any between batches).


def _load_pending(ctx: _QueueCtx, queue: Any) -> None:
    pending = queue._pending
    if len(pending) > ctx.pend_cap:  # pragma: no cover - only ring faults push this many
        raise AssertionError(f"virtqueue {queue.index}: {len(pending)} used elements pending")
    ids, lens, nds = ctx.pend
    for i, (bid, n, nd) in enumerate(pending):
        ids[i], lens[i], nds[i] = bid, n, nd
    ctx.c.npend = len(pending)
    pending.clear()


def _store_pending(ctx: _QueueCtx, queue: Any) -> None:
    c = ctx.c
    n = c.npend
    if n:
        ids, lens, nds = (_fast.ffi.unpack(a, n) for a in ctx.pend)
        queue._pending.extend(zip(ids, lens, nds, strict=True))
        c.npend = 0


class _RegionMap:
    """The guest memory map as ``struct vq_region[]``, built once per memory table and
    cached on the queue's context (it was rebuilt, and a buffer export taken and released
    per region, on every burst: a sixth of a 128-frame burst's cost).

    The cache is keyed by the memory object's identity and its ``version``, which every
    change of the table (a region mapped or unmapped, close) bumps; it keeps the object
    alive, so the id cannot be reused while cached.  It holds host addresses, not buffer
    exports: the device never unmaps a region while a burst runs on that NIC (the mapping
    changes only under the NIC's lock, which the burst holds; module docstring), and a
    truncated file is the memguard guard's case."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.keep: list[Any] = []
        self.arr: Any = None
        self.n = 0

    def get(self, mem: GuestMemory) -> tuple[Any, int]:
        key = (id(mem), mem.version)
        if key != self.key:
            self._build(mem, key)
        return self.arr, self.n

    def _build(self, mem: GuestMemory, key: tuple[int, int]) -> None:
        nffi = _fast.ffi
        regions = mem.regions
        arr = nffi.new("struct vq_region[]", max(1, len(regions)))
        for i, r in enumerate(regions):
            assert r.mm is not None
            buf = nffi.from_buffer("uint8_t[]", r.mm)
            try:
                host = int(nffi.cast("uintptr_t", buf))
            finally:
                nffi.release(buf)
            e = arr[i]
            e.gpa = r.gpa
            e.size = r.size
            e.host = nffi.cast("uint8_t *", host + r.mmap_offset - r._base)
        self.arr, self.n, self.key, self.keep = arr, len(regions), key, [mem, *regions]


class _PoolCtx:
    """A pool's ``struct vq_pool``, cached next to fastglue's ``struct fp_pool``."""

    def __init__(self, pool: Pbufpool) -> None:
        nffi = _fast.ffi
        fctx = fastglue._ctx(pool)
        vp = nffi.new("struct vq_pool *")
        vp.p = fctx.c
        vp.bufs = fctx.bufs.buf
        vp.large = fctx.bufs.large
        vp.num_large = pool.config.num_large_bufs
        # A burst pops the pool's free lists (freelist.py) in place, or reserves their tops.
        self.lists = fctx.lists
        vp.lists = self.lists
        self.vp = vp
        self.fp = fctx.c


def _pool_ctx(pool: Pbufpool) -> _PoolCtx:
    fctx = fastglue._ctx(pool)
    ctx: _PoolCtx | None = getattr(fctx, "vq_pool", None)
    if ctx is None:
        ctx = _PoolCtx(pool)
        fctx.vq_pool = ctx  # type: ignore[attr-defined]
    return ctx


def tx_burst(
    queue: Any,
    pool: Pbufpool,
    hlen: int,
    budget: int,
    pkts: list[int],
    unlocked: AbstractContextManager[object] | None = None,
    finish: bool = False,
) -> Burst:
    """Consume up to ``budget`` chains of TX ``queue`` into packets of ``pool`` (appended to
    ``pkts``), as the NIC's TX loop would; see the module docstring for the stop rules.

    ``finish``: when the burst ends the batch (stops EMPTY or BUDGET), also run
    :func:`finish` for its chains in the same call, saving the state round trip; then
    ``Burst.notify`` says whether to signal the guest (None: not finished, the caller
    finishes).  Only for a batch's first burst, with no interrupt fault rule on the queue.

    ``unlocked`` (a NIC datapath thread, docs/DESIGN.md "Threads and the locking rule"):
    the C call runs inside it, i.e. without the lock that guards the pool, so other NICs'
    threads run their bursts meanwhile.  The free-list tops the burst may use are then taken
    off the lists first (no other thread can allocate them) and the unused ones put back in
    their order, so the lists end as without it."""
    ctx, pc, budget = tx_setup(queue, pool, budget)
    c = ctx.c
    b = ctx.burst
    lib = _fast.lib
    if unlocked is None:
        # The pool's lists popped in place (the burst's budget bounds what it takes).
        vp = pc.vp
        lib.vq_tx(c, vp, hlen, budget, ctx.out, b)
    else:
        # Reserve the tops this burst may use (no other thread can allocate them): as many
        # external and large buffers as the last bursts needed, not the worst case.  A
        # chain that needs more than were reserved stops the burst (SLOW, "pool"); the
        # reference then takes that chain from the same lists, as it would have anyway,
        # and the next burst reserves the worst case.  Only the cost changes.
        vp = ctx.own_pool(pc, pool)
        mf = pool.max_frags
        want_e = min(budget * (mf - 1), ctx.want_ext)
        if lib.vq_pool_reserve(vp, budget, want_e, min(budget * mf, ctx.want_large)):
            raise AssertionError(f"virtqueue {queue.index}: free-list reservation refused")
        try:
            with unlocked:
                lib.vq_tx(c, vp, hlen, budget, ctx.out, b)
        finally:  # the reserved tops the burst did not use go back, in their order
            if lib.vq_pool_unreserve(vp):  # pragma: no cover - trusted state broken
                raise AssertionError(f"virtqueue {queue.index}: free lists overflowed")
        if b.stop == C.SLOW and b.slow == C.POOL_SLOW:  # maybe short of reserved buffers
            ctx.want_ext = ctx.want_large = RESERVE_ALL
        else:  # twice what this one used, at least RESERVE_MIN
            took = vp.took
            ctx.want_ext = max(RESERVE_MIN, 2 * (took[1] - vp.n_ext))
            ctx.want_large = max(RESERVE_MIN, 2 * (took[2] - vp.n_large))
    notify: bool | None = None
    if finish and b.stop in (C.EMPTY, C.BUDGET):
        notify = bool(lib.vq_finish(c, b.count))
    return tx_result(queue, pool, ctx, pc, vp, pkts, notify)


def tx_setup(queue: Any, pool: Pbufpool, budget: int) -> tuple[_QueueCtx, _PoolCtx, int]:
    """What a TX burst's C call takes, made ready: the queue's context (ring views, the
    memory map, packed pending elements loaded), the pool's, and the budget it can hold.
    :func:`tx_burst` and the echo turn (vdev/net/echoturn.py) share it."""
    ctx = queue.fast_ctx
    if ctx is None or ctx.bufs_ref is not queue._bufs:
        ctx = _ctx(queue)
    budget = min(budget, len(ctx.out))
    if ctx.packed and queue._pending:
        _load_pending(ctx, queue)
    if ctx.pool is pool:
        pc = ctx.pc
    else:
        pc = ctx.pc = _pool_ctx(pool)
        ctx.pool = pool
    ctx.c.regions, ctx.c.nregions = ctx.region_map.get(queue.mem)
    return ctx, pc, budget


def tx_result(
    queue: Any,
    pool: Pbufpool,
    ctx: _QueueCtx,
    pc: _PoolCtx,
    vp: Any,
    pkts: list[int],
    notify: bool | None,
) -> Burst:
    """After a TX burst's C call (``vp``: the ``struct vq_pool`` it popped): the queue's
    pending elements and the pool's counters brought up to date, its packets appended to
    ``pkts``, a guest-memory fault raised, and the :class:`Burst` it amounts to."""
    nffi = _fast.ffi
    c = ctx.c
    b = ctx.burst
    if c.npend:
        _store_pending(ctx, queue)
    used_p = vp.took[0] - vp.n_pkts
    if used_p:
        st = pool.stats
        st.allocs += used_p
        in_use = pool.num_packets - pc.lists[0].n  # PoolStats.in_use, from the list itself
        if in_use > st.high_water:
            st.high_water = in_use
    npkts = b.npkts
    if npkts > 8:
        pkts.extend(structs.u32_list(nffi, ctx.out, npkts))
    elif npkts:
        pkts.extend(nffi.unpack(ctx.out, npkts))  # cheaper than the copy for a few
    if b.stop == C.GUEST_FAULT:  # pragma: no cover - needs the memguard SIGBUS guard
        if b.partial_pkt != 0xFFFF_FFFF:
            pool.free_taken([b.partial_pkt])
        _guest_fault(queue)
    if b.stop == C.BADARGS:  # pragma: no cover - trusted state broken
        raise AssertionError(f"virtqueue {queue.index}: compiled TX burst refused its arguments")
    counts = COUNTS
    counts["tx_bursts"] += 1
    counts["tx_chains"] += b.count
    counts[_TX_STOP[b.stop]] += 1
    return Burst(b.stop, b.violation or b.slow, b.count, b.nbytes, notify=notify)


# An unlocked TX burst's next reservation of external / large buffers: the worst case
# after a burst that may have stopped for lack of them, else twice what this one used, at
# least RESERVE_MIN, so steady traffic reserves a few list entries, not hundreds.
RESERVE_MIN = 64
RESERVE_ALL = 1 << 30  # "the worst case": min() with the burst's bound and the free list


def rx_burst(
    queue: Any,
    pool: Pbufpool,
    hlen: int,
    mergeable: bool,
    guest_csum: bool,
    pkts: Sequence[int],
    unlocked: AbstractContextManager[object] | None = None,
    waiting: int | None = None,
) -> Burst:
    """Write ``pkts`` into RX ``queue``'s buffers in order, as the NIC's RX drain would, until
    one needs the reference (SLOW/VIOLATION) or the guest posted too few buffers (NOROOM).
    ``waiting``: the frames waiting in all (the NIC's backlog; default ``len(pkts)``), which
    bound how many buffers the refill kick is asked for after (``queue.kick_ahead``).
    ``Burst.count`` packets were written (the caller frees them).  ``unlocked``: as for
    :func:`tx_burst` (the C only reads ``pkts``, which the caller owns, and the pool's
    constant layout)."""
    nffi = _fast.ffi
    ctx, pc, flags = rx_setup(queue, pool, mergeable, guest_csum)
    c = ctx.c
    vp = pc.vp
    n = len(pkts)
    arr = array("I", pkts)
    c.rx_waiting = n if waiting is None else waiting
    b = ctx.burst
    buf = nffi.from_buffer("uint32_t[]", arr)
    try:
        if unlocked is None:
            _fast.lib.vq_rx(c, pc.fp, vp.bufs, vp.large, hlen, flags, buf, n, b)
        else:
            with unlocked:
                _fast.lib.vq_rx(c, pc.fp, vp.bufs, vp.large, hlen, flags, buf, n, b)
    finally:
        nffi.release(buf)
    return rx_result(queue, ctx)


def rx_setup(
    queue: Any, pool: Pbufpool, mergeable: bool, guest_csum: bool
) -> tuple[_QueueCtx, _PoolCtx, int]:
    """What an RX burst's C call takes (the queue's context made ready, the pool's, the
    vq_rx flags); shared with the echo turn."""
    ctx = _ctx(queue)
    if ctx.packed and queue._pending:
        _load_pending(ctx, queue)
    ctx.c.regions, ctx.c.nregions = ctx.region_map.get(queue.mem)
    flags = (C.RX_MERGEABLE if mergeable else 0) | (C.RX_GUEST_CSUM if guest_csum else 0)
    return ctx, _pool_ctx(pool), flags


def rx_result(queue: Any, ctx: _QueueCtx) -> Burst:
    """After an RX burst's C call: pending elements stored, a fault raised, the Burst."""
    c = ctx.c
    b = ctx.burst
    if c.npend:
        _store_pending(ctx, queue)
    if b.stop == C.GUEST_FAULT:  # pragma: no cover - needs the memguard SIGBUS guard
        _guest_fault(queue)
    if b.stop == C.BADARGS:  # pragma: no cover - trusted state broken
        raise AssertionError(f"virtqueue {queue.index}: compiled RX burst refused its arguments")
    counts = COUNTS
    counts["rx_bursts"] += 1
    counts["rx_frames"] += b.count
    counts[_RX_STOP[b.stop]] += 1
    return Burst(b.stop, b.violation or b.slow, b.count, b.nbytes, b.merged)


def _guest_fault(queue: Any) -> None:
    """A burst stopped on a guest-memory fault (the memguard guard caught a SIGBUS: the
    frontend truncated its memory): the queue cannot be trusted again, so it is killed like
    any other violation (the state struct held everything committed before the fault)."""
    err = SyncError(
        KillReason.BASIC_SANITY,
        queue.sync,
        f"virtqueue {queue.index}: guest memory fault (SIGBUS) during a compiled burst",
    )
    queue.kill(err)
    raise err


def finish(queue: Any, consumed: int) -> bool:
    """flush_used, then (when ``consumed``) should_notify: whether to signal the guest."""
    ctx = _ctx(queue)
    if ctx.packed and queue._pending:
        _load_pending(ctx, queue)
    notify = bool(_fast.lib.vq_finish(ctx.c, consumed))
    if ctx.c.npend:
        _store_pending(ctx, queue)
    return notify


def check_violation(burst: Burst, err: SyncError | None) -> None:
    """After a VIOLATION stop the reference ran the item: in :data:`STRICT` mode it must have
    killed the queue with the reason and wording the C's code names."""
    v = burst.violation
    if not STRICT or v is None:
        return
    if err is None:
        raise AssertionError(f"compiled burst reported {v.name}; the reference accepted the item")
    if err.reason is not v.reason or v.phrase not in str(err):
        raise AssertionError(f"compiled burst reported {v.name}; the reference said {err}")


# The compiled bursts are the default; VDEV_FASTQUEUE=0 selects the Python reference for the
# virtqueues only, VDEV_FASTPATH=0 for every compiled path.  (They were opt-in for a while: a
# Linux TCG guest's TX sometimes stopped for good with them on.  The cause was QEMU 7.2's TCG
# dropping the guest's memory barriers with a single vCPU, so driver and device each read
# the other's stale index; the C device's publish-then-re-read is fast enough to fall inside
# that window, the Python one almost never was.  host/machine.py now runs TCG guests so that
# their barriers are real; see Machine._accel_arg.)
_env = os.environ.get("VDEV_FASTQUEUE", "1")
set_backend("c" if _env != "0" and os.environ.get("VDEV_FASTPATH", "1") != "0" else "python")


__all__ = [
    "BACKEND",
    "STRICT",
    "VIOLATIONS_BY_NAME",
    "Burst",
    "Violation",
    "check_violation",
    "finish",
    "load",
    "rx_burst",
    "set_backend",
    "tx_burst",
    "usable",
]
