"""The compiled per-slot work: cffi glue between ``slotwork.py``'s signatures and ``fastpath.c``.

``vdev/native/fastpath.c`` implements slotwork's functions check for check (built and cached
by ``vdev/native/build.py``, cffi API mode).  The wrappers here hand it the trusted arrays and
the arena through ``ffi.from_buffer`` (never copied), apply the Python-object side effects
(owner sets, freeing what a failed TX/FREE sync took) and turn the returned codes into
slotwork's failures, so both backends give identical reasons, details and state.

Result and detail codes are read from the compiled module (``fastpath.h``'s ``FP_*`` and
``FPD_*``, exported through the cdef), never repeated here by number: a detail code maps to
the slotwork check of the same name.  :func:`load` loads the module once; until then (or
without a compiler) nothing here may be called.
"""

from __future__ import annotations

from array import array
from collections.abc import MutableSequence
from typing import Any, NoReturn, cast

from vdev.native import build as fastbuild
from vdev.native import structs

from . import slotwork
from .errors import PoolError, SyncKind
from .pool import Pbufpool
from .slotwork import Failure, Slots

_fast: Any = None  # the compiled module (.ffi, .lib), set by load()
_tried = False

# RX release/publish of fewer slots than this stay in Python: for a single slot the cffi call
# set-up costs more than the Python loop (both give identical results; tests set it to 1).
C_MIN_RX_SLOTS = 2

# Trusted arrays of the pool handed to C, with their element types.
POOL_ARRAYS = (
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


class _Codes:
    """fastpath.h's result codes (``fp_ret.code``) and internalize checks (``fp_ret.detail``),
    read from the compiled module's lib."""

    def __init__(self, lib: Any) -> None:
        self.OK: int = lib.FP_OK
        self.BADARGS: int = lib.FP_BADARGS  # trusted arguments out of range: use Python
        self.UNALLOCATED: int = lib.FP_UNALLOCATED
        self.QUM_IDX: int = lib.FP_QUM_IDX
        self.INTERNALIZE: int = lib.FP_INTERNALIZE
        self.NOT_DETACHED: int = lib.FP_NOT_DETACHED
        self.READY_BYTES: int = lib.FP_READY_BYTES
        self.POOL_ERROR: int = lib.FP_POOL_ERROR
        self.INDEX_ERROR: int = lib.FP_INDEX_ERROR
        self.OVERFLOW: int = lib.FP_OVERFLOW
        # FPD_<check> -> slotwork's check of the same name (a C check without a Python
        # twin is an AttributeError here, at load time, not a wrong message later).
        self.checks: dict[int, str] = {
            int(getattr(lib, f"FPD_{check}")): check for check in slotwork.INTERNALIZE_CHECKS
        }


C: _Codes  # bound by load()


def load() -> bool:
    """Load (building once if needed) the compiled module; False if it is unavailable.

    Building is attempted once per process; a failure was logged by ``vdev.native.build.load``.
    """
    global _fast, _tried, C
    if _fast is None and not _tried:
        _tried = True
        mod = fastbuild.load()
        if mod is not None:
            C = _Codes(mod.lib)
            _fast = mod
    return _fast is not None


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
        for name, ctype in POOL_ARRAYS:
            buf = ffi.from_buffer(ctype, getattr(pool, name))
            self.keep.append(buf)
            setattr(c, name, buf)
        self.c = c
        # The ring functions run only on the arena's own ring view (what KernelRing passes).
        self.ring32: memoryview | None = a.ring32
        self.ring_base = arena + lay.ring_off
        self.ring_bytes = lay.ring_region_size
        self.scratch: list[_Scratch] = []
        self.mark: Any = None  # check_kernel_held's scratch marks, one byte per packet
        self.pb_ret: Any = _fast.ffi.new("struct pb_ret *")  # release's result (lock held)
        # The data buffers as the switch's header reads and the responder's pre-filter take
        # them, and the free lists (freelist.py) as the bursts and bulk release take them.
        self.bufs: Any = ffi.new("struct sw_bufs *")
        self.bufs.buf = arena + lay.buf_off
        self.bufs.large = arena + lay.large_buf_off
        self.lists: list[Any] = [
            fl.native() for fl in (pool._free_pkts, pool._free_ext, pool._free_large)
        ]

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


def _internalize_failure(ret: Any) -> Failure:
    """slotwork's failure for the internalize check the C code reported (its numbers in
    ``ret.v``, in the order the check's message uses them)."""
    check = C.checks.get(int(ret.detail))
    if check is None:
        raise AssertionError(f"unknown fast path detail code {ret.detail}")
    return slotwork.internalize_failure(check, *(int(x) for x in ret.v))


def _raise_trusted(code: int) -> NoReturn:
    """Errors of trusted state, raised as the Python reference's indexing would."""
    if code == C.OVERFLOW:
        raise ValueError("memoryview: invalid value for format 'H'")
    if code == C.INDEX_ERROR:
        raise IndexError("array index out of range")
    raise AssertionError(f"unexpected fast path code {code}")


def _span(n: int, start: int, end: int) -> int:
    d = end - start
    return d + n if d < 0 else d


# --------------------------------------------------------------------- slotwork's functions
def internalize(pool: Pbufpool, idx: int) -> Failure | None:
    ctx = _ctx(pool)
    sc = ctx.take(1)
    ret = sc.ret
    code = _fast.lib.fp_internalize(ctx.c, idx, ret)
    if code == C.OK:
        ctx.scratch.append(sc)
        return None
    if code == C.INTERNALIZE:
        return _internalize_failure(ret)
    _raise_trusted(code)


def externalize(pool: Pbufpool, idx: int) -> None:
    ctx = _ctx(pool)
    sc = ctx.take(1)
    code = _fast.lib.fp_externalize(ctx.c, idx, sc.ret)
    if code != C.OK:
        _raise_trusted(code)
    ctx.scratch.append(sc)


def _take(
    fn: Any, ring: Slots, ctx: _FastPool, start: int, end: int
) -> tuple[int, Any, _Scratch, list[int]] | None:
    """Run ``fp_tx_take`` / ``fp_free_take`` on slots ``[start, end)``: the code, the result,
    its scratch (the caller returns it) and the packets taken, already kernel-owned again;
    None if C refused the (trusted) arguments and the Python loop must run."""
    _pool, owner, _r32, _r16, slots_w32, n = ring
    sc = ctx.take(_span(n, start, end))
    ret = sc.ret
    code = fn(ctx.c, owner, ctx.ring_base, ctx.ring_bytes, slots_w32, n, start, end, sc.out, ret)
    if code == C.BADARGS:
        ctx.scratch.append(sc)
        return None
    pkts = structs.u32_list(_fast.ffi, sc.out, ret.count)
    return code, ret, sc, pkts


def tx_take(ring: Slots, start: int, end: int, sync: SyncKind) -> tuple[list[int], int]:
    pool = ring.pool
    ctx = _ctx(pool)
    done = None
    if start != end and ring.r32 is ctx.ring32:
        done = _take(_fast.lib.fp_tx_take, ring, ctx, start, end)
    if done is None:
        return slotwork.tx_take(ring, start, end, sync)
    code, ret, sc, pkts = done
    if code == C.OK:
        nbytes = int(ret.nbytes)
        ctx.scratch.append(sc)
        return pkts, nbytes
    s = int(ret.slot)
    if code == C.UNALLOCATED:
        pool.free_taken(pkts)
        raise slotwork.unallocated(sync, s, int(ret.v[1]) if ret.v[0] else None, start, end)
    if code == C.QUM_IDX:
        fail = slotwork.qum_mismatch(int(ret.v[0]), int(ret.v[1]))
    elif code == C.INTERNALIZE:
        fail = _internalize_failure(ret)
    else:
        _raise_trusted(code)
    pool.free_taken(pkts)
    raise slotwork.slot_failure(sync, s, fail, start, end)


def free_take(ring: Slots, start: int, end: int) -> list[int]:
    pool = ring.pool
    ctx = _ctx(pool)
    done = None
    if start != end and ring.r32 is ctx.ring32:
        done = _take(_fast.lib.fp_free_take, ring, ctx, start, end)
    if done is None:
        return slotwork.free_take(ring, start, end)
    code, ret, sc, pkts = done
    if code == C.OK:
        ctx.scratch.append(sc)
        return pkts
    pool.free_taken(pkts)
    raise slotwork.unallocated(SyncKind.FREE, int(ret.slot), int(ret.v[1]), start, end)


def _klen_buf(klen: MutableSequence[int] | None, n: int) -> Any:
    """``klen``/``ksd`` as a C array, None if absent; False if it cannot be shared."""
    if klen is None:
        return None
    if type(klen) is not array or klen.typecode != "I" or len(klen) < n:
        return False
    return _fast.ffi.from_buffer("uint32_t[]", klen)


def rx_release_check(
    ring: Slots, start: int, end: int, klen: MutableSequence[int] | None, sync: SyncKind
) -> int:
    pool, _owner, r32, r16, slots_w32, n = ring
    d = end - start
    if (d + n if d < 0 else d) < C_MIN_RX_SLOTS:
        return slotwork.rx_release_check(ring, start, end, klen, sync)
    fast = _fast
    kbuf = _klen_buf(klen, n)
    if kbuf is False:
        return slotwork.rx_release_check(ring, start, end, klen, sync)
    if kbuf is None:
        kbuf = fast.ffi.NULL
    ctx = _ctx(pool)
    if r32 is ctx.ring32:
        sc = ctx.take(1)
        ret = sc.ret
        code = fast.lib.fp_rx_release_check(
            ctx.ring_base, ctx.ring_bytes, slots_w32, n, start, end, kbuf, ret
        )
        if code == C.OK:
            nbytes = int(ret.nbytes)
            ctx.scratch.append(sc)
            return nbytes
    else:
        # Any other view of slots: borrow its buffer for the call (r16 must alias r32).
        if r32.nbytes != r16.nbytes or not r32.c_contiguous or r32.readonly:
            return slotwork.rx_release_check(ring, start, end, klen, sync)
        ret = fast.ffi.new("struct fp_ret *")
        with fast.ffi.from_buffer("uint8_t[]", r32) as base:
            code = fast.lib.fp_rx_release_check(
                base, r32.nbytes, slots_w32, n, start, end, kbuf, ret
            )
        if code == C.OK:
            return int(ret.nbytes)
    if code == C.BADARGS:
        return slotwork.rx_release_check(ring, start, end, klen, sync)
    s = int(ret.slot)
    if code == C.NOT_DETACHED:
        raise slotwork.not_detached(sync, s, int(ret.v[0]), start, end)
    raise slotwork.ready_bytes_mismatch(sync, s, int(ret.v[0]), int(ret.v[1]), start, end)


def rx_publish(
    ring: Slots, start: int, end: int, ksd: MutableSequence[int], klen: MutableSequence[int] | None
) -> int:
    pool, owner, r32, _r16, slots_w32, n = ring
    d = end - start
    if (d + n if d < 0 else d) < C_MIN_RX_SLOTS:
        return slotwork.rx_publish(ring, start, end, ksd, klen)
    ctx = _ctx(pool)
    if r32 is not ctx.ring32:
        return slotwork.rx_publish(ring, start, end, ksd, klen)
    kbuf = _klen_buf(klen, n)
    sbuf = _klen_buf(ksd, n)
    if kbuf is False or not sbuf:
        return slotwork.rx_publish(ring, start, end, ksd, klen)
    fast = _fast
    sc = ctx.take(_span(n, start, end))
    ret = sc.ret
    code = fast.lib.fp_rx_publish(
        ctx.c,
        owner,
        ctx.ring_base,
        ctx.ring_bytes,
        slots_w32,
        n,
        start,
        end,
        sbuf,
        fast.ffi.NULL if kbuf is None else kbuf,
        sc.out,
        ret,
    )
    if code == C.BADARGS:
        ctx.scratch.append(sc)
        return slotwork.rx_publish(ring, start, end, ksd, klen)
    if code == C.OK:
        nbytes = int(ret.nbytes)
        ctx.scratch.append(sc)
        return nbytes
    if code == C.POOL_ERROR:
        held = ret.v[1] - (1 << 64) if ret.v[1] >= 1 << 63 else ret.v[1]
        raise PoolError(f"packet {ret.v[0]} queued while held by owner {held}")
    _raise_trusted(code)


# --------------------------------------------------------------------- pool bulk operations
# Batches smaller than this stay in Python (the cffi set-up costs more than a short loop).
C_MIN_POOL_BATCH = 4


def _idx_buf(idxs: list[int]) -> Any:
    return _fast.ffi.from_buffer("uint32_t[]", array("I", idxs))


def init_packets(pool: Pbufpool, idxs: list[int], nbufs: int, ext: list[int]) -> None:
    """``Pbufpool._init_packet`` for every packet of ``idxs`` (``ext``: the external buflets
    in the order ``fe.pop()`` would give them)."""
    ctx = _ctx(pool)
    ffi = _fast.ffi
    _fast.lib.pb_init_packets(
        ctx.c, _idx_buf(idxs), len(idxs), nbufs, _idx_buf(ext) if ext else ffi.NULL
    )


def release(pool: Pbufpool, idxs: list[int]) -> tuple[int, int, int | None]:
    """``Pbufpool._release``'s loop, pushing onto the pool's free lists as it does (the freed
    external buflets, large buffers, then the packets): (packets released, redzone
    faults, the packet freed twice or None)."""
    ctx = _ctx(pool)
    ffi, lib = _fast.ffi, _fast.lib
    n = len(idxs)
    ret = ctx.pb_ret
    buf = _idx_buf(idxs)
    lp, le, ll = ctx.lists
    code = lib.pb_release_lists(ctx.c, buf, n, lp, le, ll, ret)
    if code == lib.PB_FALLBACK:  # a list without room for them: its extend() words it
        fp, fe, fl = pool._free_pkts, pool._free_ext, pool._free_large
        out_ext = ffi.new("uint32_t[]", n * max(pool.max_frags - 1, 1))
        out_large = ffi.new("uint32_t[]", n * pool.max_frags)
        code = lib.pb_release(ctx.c, buf, n, out_ext, out_large, ret)
        fe.extend(structs.u32_list(ffi, out_ext, ret.n_ext))
        fl.extend(structs.u32_list(ffi, out_large, ret.n_large))
        fp.extend(idxs[: ret.count])
    return (
        int(ret.count),
        int(ret.redzone_faults),
        int(ret.v[0]) if code == lib.PB_DOUBLE_FREE else None,
    )


def check_kernel_held(pool: Pbufpool, idxs: list[int]) -> tuple[str, int, int] | None:
    """``Pbufpool.check_kernel_held``'s verdict: None if all good, else (what, idx, owner)
    with what in "twice", "unallocated", "held", "python" (let the Python check word it)."""
    ctx = _ctx(pool)
    ffi, lib = _fast.ffi, _fast.lib
    if ctx.mark is None:
        ctx.mark = ffi.new("uint8_t[]", pool.num_packets)
    ret = ffi.new("struct pb_ret *")
    code = lib.pb_check_kernel_held(ctx.c, _idx_buf(idxs), len(idxs), ctx.mark, ret)
    if code == lib.PB_OK:
        return None
    what = {
        lib.PB_TWICE: "twice",
        lib.PB_NOT_ALLOCATED: "unallocated",
        lib.PB_HELD: "held",
    }.get(code, "python")
    return what, int(ret.v[0]), int(ret.v[1])


def rx_enqueue(ksd: array[int], kt: int, pkts: list[int], start: int, take: int) -> int:
    """``KernelRing.rx_enqueue``'s loop; returns the new ktail."""
    ffi = _fast.ffi
    with ffi.from_buffer("uint32_t[]", ksd) as cksd:
        kt_new: int = _fast.lib.pb_rx_enqueue(
            cksd, len(ksd), kt, _idx_buf(pkts[start : start + take]), take
        )
    return kt_new


__all__ = [
    "C_MIN_POOL_BATCH",
    "C_MIN_RX_SLOTS",
    "POOL_ARRAYS",
    "check_kernel_held",
    "externalize",
    "free_take",
    "init_packets",
    "internalize",
    "load",
    "release",
    "rx_enqueue",
    "rx_publish",
    "rx_release_check",
    "tx_take",
]
