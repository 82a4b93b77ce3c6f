"""Compiled bursts for the user half of a channel: ``chanbatch.c`` behind channel.py's loops.

Host-side test code and benchmarks drive a channel with ``send``/``recv``; in Python each
frame costs a few microseconds of slot and metadata writes, so the host side, not the
device, would limit any benchmark near a million frames per second.  ``chanbatch.c`` runs
the same per-frame work (ALLOC take, buflet fill, TX attach; RX read, detach, FREE return)
for a whole burst in one call with the GIL released.  What stays here is what needs Python:
the syncs (a direct call, or a request to another process for an attached channel) and the
errors, raised with the Python reference's messages.

``Channel.send``/``Channel.recv`` call :func:`send`/:func:`recv` when :data:`ENABLED`
(``VDEV_FASTPATH=0`` or :func:`set_enabled(False) <set_enabled>` selects the Python
reference, ``Channel.send_py``/``Channel.recv_py``).  Both work on any channel, in-process
or attached, since the user half sees only the arena.  :func:`send_repeat` and
:func:`recv_count` are the benchmark forms: one template frame sent ``count`` times, and
frames counted and returned to the pool without being copied out.
"""

from __future__ import annotations

import os
import time
from array import array
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, cast

from . import fastglue
from .errors import SyncKind

if TYPE_CHECKING:
    from .channel import Channel, UserRing

# Frames copied out per recv burst before the scratch buffer is handed back to Python.
OUT_SCRATCH = 256 * 2048


def available() -> bool:
    """True if the compiled module is loaded (or can be built and loaded now)."""
    return fastglue.load()


ENABLED = os.environ.get("VDEV_FASTPATH", "1") != "0"


def set_enabled(on: bool) -> bool:
    """Use the compiled bursts in ``Channel.send``/``recv`` (if they can be built); returns
    whether they are in use."""
    global ENABLED
    ENABLED = bool(on) and available()
    return ENABLED


def in_use() -> bool:
    return ENABLED and available()


class _Ctx:
    """A channel as chanbatch.c sees it: ``struct cb_arena`` and its five rings.

    The arena pointer is taken per call (``ffi.from_buffer`` inside a ``with``), so nothing
    here keeps the mapping alive after the channel or its arena closes.
    """

    def __init__(self, ch: Channel) -> None:
        ffi = fastglue._fast.ffi
        a = ch.arena
        lay, cfg = a.layout, a.cfg
        c = ffi.new("struct cb_arena *")
        c.size = lay.arena_size
        c.md_off = lay.md_off
        c.buflet_off = lay.buflet_off
        c.buf_off = lay.buf_off
        c.large_buf_off = lay.large_buf_off
        c.ring_off = lay.ring_off
        c.num_packets = cfg.num_packets
        c.num_buflets = cfg.resolved_buflets()
        c.num_bufs = lay.num_bufs
        c.buf_size = cfg.buf_size
        c.num_large_bufs = cfg.num_large_bufs
        c.large_buf_size = cfg.large_buf_size
        self.c = c
        self.tx = self._ring(ch.tx_ring)
        self.rx = self._ring(ch.rx_ring)
        self.alloc = self._ring(ch.alloc_ring)
        self.free = self._ring(ch.free_ring)
        self.out = bytearray(OUT_SCRATCH)
        self.lens = array("I", bytes(4 * 1024))

    def _ring(self, ring: UserRing) -> Any:
        r = fastglue._fast.ffi.new("struct cb_ring *")
        r.off = ring.off
        r.slots_off = ring.off + (ring.slots_w32 - ring.h) * 4
        r.n = ring.n
        return r


def _ctx(ch: Channel) -> _Ctx:
    ctx = ch.fast_ctx
    if ctx is None:
        ctx = ch.fast_ctx = _Ctx(ch)
    return cast(_Ctx, ctx)


def _bad_index(ret: Any) -> ValueError:
    """channel.py's message for the index the C walk refused."""
    lib = fastglue._fast.lib
    what, value, pkt = int(ret.v[0]), int(ret.v[1]), int(ret.pkt)
    if what == lib.CB_BAD_PACKET:
        return ValueError(f"packet {value} out of range")
    if what == lib.CB_BAD_BUFLET:
        return ValueError(f"packet {pkt}: buflet {value} out of range")
    if what == lib.CB_BAD_BUFFER:
        return ValueError(f"buffer {value} out of range")
    if what == lib.CB_BAD_WINDOW and value == pkt:
        return ValueError(f"packet {pkt}: data window beyond its buffer")
    return ValueError("channel rings outside the arena")


def _send(ch: Channel, data: bytes, offs: array[int], lens: array[int]) -> int:
    ch._check()
    fast = fastglue._fast
    ffi, lib = fast.ffi, fast.lib
    ctx = _ctx(ch)
    # Per call, never shared on the context: a channel's send and recv may run on two
    # threads at once (a test's sender and its receiver), and with the GIL released one
    # burst's count must not land in the other's result (it did: a send that read the
    # receiver's count of 0 sent its 64 frames again).
    ret = ffi.new("struct cb_ret *")
    total = len(lens)
    sent = 0
    tx = ch.tx_ring
    with (
        ffi.from_buffer("uint8_t[]", ch.arena.mm) as base,
        ffi.from_buffer("uint8_t[]", data) as cdata,
        ffi.from_buffer("uint32_t[]", offs) as coffs,
        ffi.from_buffer("uint32_t[]", lens) as clens,
    ):
        ctx.c.base = base
        while sent < total:
            # One pass of the Python loop: as many frames as the TX ring has room for and
            # the ALLOC ring has packets (each synced once when empty), staged in one call.
            room = tx.available()
            if room == 0:
                ch.sync(SyncKind.TX)
                room = tx.available()
                if room == 0:
                    break
            k = min(room, total - sent)
            avail = ch.alloc_ring.available()
            if avail == 0:
                ch.sync(SyncKind.ALLOC)
                avail = ch.alloc_ring.available()
            k = min(k, avail)
            if k == 0:
                # packet_alloc_batch writes the ALLOC head back even when it takes nothing
                # (UserRing.head reads it modulo n): the kernel sees the same value.
                ch.alloc_ring.head = ch.alloc_ring.head
                break
            code = lib.cb_send(ctx.c, ctx.tx, ctx.alloc, cdata, coffs + sent, clens + sent, k, ret)
            done = int(ret.count)
            sent += done
            if code in (lib.CB_OK, lib.CB_TX_FULL, lib.CB_ALLOC_EMPTY):
                continue
            if code == lib.CB_TOO_BIG:
                err = ValueError(
                    f"packet {ret.v[0]} holds {ret.v[1]} bytes, frame has {lens[sent]}"
                )
            else:
                err = _bad_index(ret)
            # As the Python loop does: what was staged goes out; the packet and the rest of
            # this pass's allocation go back (a sync may then fail in its own right).
            rest = k - done - 1
            ch.packet_free_batch([int(ret.pkt), *(ch.packet_alloc_batch(rest) if rest else [])])
            ch.sync(SyncKind.FREE)
            if ch.pending(tx):
                ch.sync(SyncKind.TX)
            raise err
    if ch.pending(tx):
        ch.sync(SyncKind.TX)
    return sent


@dataclass(frozen=True)
class Prepared:
    """Frames laid out once for :func:`send_prepared`: their bytes back to back, and each
    one's offset and length (a sender that repeats a burst skips the join per call)."""

    data: bytes
    offs: array[int]
    lens: array[int]


def prepare(frames: list[bytes]) -> Prepared:
    data = b"".join(frames)
    lens = array("I", [len(f) for f in frames])
    offs = array("I", [0])
    offs.extend(accumulate(lens[:-1]))
    if not frames:
        offs = array("I")
    return Prepared(data, offs, lens)


def send(ch: Channel, frames: list[bytes]) -> int:
    """``Channel.send`` in bursts: same frames staged, same syncs, same errors."""
    return send_prepared(ch, prepare(frames))


def send_prepared(ch: Channel, burst: Prepared) -> int:
    """:func:`send` of frames laid out by :func:`prepare`."""
    return _send(ch, burst.data, burst.offs, burst.lens)


def send_repeat(ch: Channel, frame: bytes, count: int) -> int:
    """Send ``frame`` ``count`` times (a benchmark's load); returns how many were accepted."""
    return _send(ch, frame, array("I", [0]) * count, array("I", [len(frame)]) * count)


def _recv(ch: Channel, limit: int, timeout: float, copy: bool) -> tuple[list[bytes], int, int]:
    ch._check()
    fast = fastglue._fast
    ffi, lib = fast.ffi, fast.lib
    ctx = _ctx(ch)
    # Per call, never shared on the context: a channel's send and recv may run on two
    # threads at once (a test's sender and its receiver), and with the GIL released one
    # burst's count must not land in the other's result (it did: a send that read the
    # receiver's count of 0 sent its 64 frames again).
    ret = ffi.new("struct cb_ret *")
    deadline = time.monotonic() + timeout
    out: list[bytes] = []
    frames = 0
    nbytes = 0
    if len(ctx.lens) < limit:
        ctx.lens = array("I", bytes(4 * limit))
    while True:
        ch.sync(SyncKind.RX)
        took = False
        while frames < limit:
            with (
                ffi.from_buffer("uint8_t[]", ch.arena.mm) as base,
                ffi.from_buffer("uint8_t[]", ctx.out) as cout,
                ffi.from_buffer("uint32_t[]", ctx.lens) as clens,
            ):
                ctx.c.base = base
                code = lib.cb_recv(
                    ctx.c,
                    ctx.rx,
                    ctx.free,
                    limit - frames,
                    cout if copy else ffi.NULL,
                    len(ctx.out),
                    clens,
                    ret,
                )
            n = ret.count
            if n:
                took = True
                frames += n
                nbytes += ret.nbytes
                if copy:
                    mv = memoryview(ctx.out)
                    pos = 0
                    for ln in ctx.lens[:n]:
                        out.append(bytes(mv[pos : pos + ln]))
                        pos += ln
                    mv.release()
            if code == lib.CB_OK:
                break
            if code == lib.CB_FREE_FULL:
                ch.sync(SyncKind.FREE)
                if ch.free_ring.available() == 0:
                    break
            elif code == lib.CB_OUT_FULL:
                if n == 0:  # one frame larger than the scratch buffer
                    ctx.out = bytearray(2 * len(ctx.out))
            else:
                raise _bad_index(ret)
        if took:
            ch.sync(SyncKind.FREE)
        if frames or time.monotonic() >= deadline:
            return out, frames, nbytes
        time.sleep(min(0.001, max(0.0, deadline - time.monotonic())))


def recv(ch: Channel, max: int = 256, timeout: float = 0.0) -> list[bytes]:
    """``Channel.recv`` in bursts: same frames, same syncs."""
    return _recv(ch, max, timeout, True)[0]


def recv_count(ch: Channel, max: int = 256, timeout: float = 0.0) -> tuple[int, int]:
    """Receive up to ``max`` frames without copying them out: (frames, bytes)."""
    _, frames, nbytes = _recv(ch, max, timeout, False)
    return frames, nbytes


__all__ = [
    "ENABLED",
    "Prepared",
    "available",
    "in_use",
    "prepare",
    "recv",
    "recv_count",
    "send",
    "send_prepared",
    "send_repeat",
    "set_enabled",
]
