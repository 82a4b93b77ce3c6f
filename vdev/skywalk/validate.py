"""Where the kernel half's rules are applied: the ring-index rules, and the per-slot work
bound to one of two backends.

Ring-index validation (the TX and RX rules of channel_ring.c) lives here.  The per-slot and
per-packet work (internalize, externalize and the slot loops) exists twice with the same
signatures and the same results: the Python reference in ``slotwork.py`` and the compiled
``fastpath.c`` behind ``fastglue.py``.  The public names below are bound to one of them;
``BACKEND`` says which (``"c"`` or ``"python"``), :func:`set_backend` switches, and
``VDEV_FASTPATH=0`` in the environment forces Python.  Rings look the functions up on this
module at every call.  The same switch binds ``pool.FAST``, the compiled bulk loops of the
pool (alloc, release, the kernel-held check) and of the RX enqueue.
"""

from __future__ import annotations

import os

from . import fastglue, pool, slotwork
from .errors import KillReason
from .pool import KERNEL
from .slotwork import Failure


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


# --------------------------------------------------------------------- backends
BACKEND = "python"
internalize = slotwork.internalize
externalize = slotwork.externalize
tx_take = slotwork.tx_take
free_take = slotwork.free_take
rx_release_check = slotwork.rx_release_check
rx_publish = slotwork.rx_publish


def fast_available() -> bool:
    """True if the compiled path is loaded (or can be built and loaded now)."""
    return fastglue.load()


def set_backend(name: str) -> str:
    """Select ``"c"`` or ``"python"`` for the per-slot functions; returns the one in use.

    ``"c"`` falls back to ``"python"`` (one logged warning) when the extension cannot be
    built.  The switch takes effect at the next sync.
    """
    global BACKEND, internalize, externalize, tx_take, free_take, rx_release_check, rx_publish
    if name not in ("c", "python"):
        raise ValueError(f"unknown backend {name!r} (want 'c' or 'python')")
    impl = fastglue if name == "c" and fast_available() else slotwork
    BACKEND = "c" if impl is fastglue else "python"
    internalize, externalize = impl.internalize, impl.externalize
    tx_take, free_take = impl.tx_take, impl.free_take
    rx_release_check, rx_publish = impl.rx_release_check, impl.rx_publish
    pool.FAST = fastglue if impl is fastglue else None  # the bulk alloc/free/enqueue loops
    return BACKEND


# VDEV_FASTPATH=0 forces the Python reference; anything else uses C when it can be built.
set_backend("python" if os.environ.get("VDEV_FASTPATH", "1") == "0" else "c")


__all__ = [
    "BACKEND",
    "KERNEL",
    "Failure",
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
