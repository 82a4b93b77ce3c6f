"""Skywalk channel syncs with hostile user memory, Python and compiled, differentially.

Two identical worlds (a pool and a nexus port each), one per backend.  The Python world runs
both halves of a channel in Python: the kernel side's reference (``slotwork.py``) and the
user side's send/recv loops (``Channel.send_py``/``recv_py``).  The C world runs both
compiled: the kernel side's fast path (``fastpath.c``) and the user side's channel bursts
(``chanbatch.c``), under the fuzz campaign the UBSan build.  Each input is a program run on
a fresh channel in both worlds:

* legal client work: hold packets, send frames (alloc, write, attach, advance), free held
  packets, receive, syncs of every kind;
* device work: deliver frames into the channel's RX ring, post events;
* hostile writes of 1, 2 or 4 bytes anywhere a client can write that the kernel reads: ring
  headers and slot arrays of all five rings, the metadata of packets it holds, their
  buflets, and the user copies of kernel-held packets.

Properties: a sync only ever raises a named ``SyncError`` once (then ``DefunctError``);
both backends give the same outcome for every step (the same reason and detail, the same
frames, the same client-library refusal of a scribbled ring with the same message, whether
``channel.py`` or ``chanbatch.py`` raised it), the pools' trusted state stays identical, and
after the channel closes no packet is left in use.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from vdev.abi import ffi
from vdev.skywalk import (
    Channel,
    DefunctError,
    KillReason,
    Pbufpool,
    Port,
    SyncError,
    SyncKind,
    chanbatch,
    fastglue,
    validate,
)
from vdev.skywalk.arena import BUFLET_SIZE, MD_SIZE, RING_HDR_SIZE, SLOT_SIZE

from .common import FuzzLeak, Reader

SLOTS = 8
KINDS = list(SyncKind)
EDGES = [0, 1, 2, 7, 8, 9, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 2048, 0x7FFFFFFF, 0xFFFFFFFF]
TRUSTED = ("pkt_state", "pkt_owner", "pkt_len", "pkt_nbufs", "b_next", "b_dlen", "b_doff")
# Where the client library (the client's own code, not the kernel side) refuses what the
# client scribbled over: the Python loops, or the glue of the compiled ones.
CLIENT_LIBRARY = ("skywalk/channel.py", "skywalk/chanbatch.py")


class World:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.pool = Pbufpool(num_packets=64, max_frags=3, num_large_bufs=2)
        self.port = Port(self.pool, ring_slots=SLOTS, alloc_nbufs=2)
        self.base = ffi.from_buffer(self.pool.arena.mm)  # kept: the arena lives as long

    def use(self) -> None:
        """Select this world's kernel-side backend and its user-side send/recv loops."""
        assert validate.set_backend(self.backend) == self.backend, self.backend
        compiled = chanbatch.set_enabled(self.backend == "c")
        assert compiled == (self.backend == "c"), "chanbatch unavailable in the C world"


_worlds: list[World] = []


def setup() -> None:
    logging.getLogger("vdev").setLevel(logging.ERROR)
    fastglue.C_MIN_RX_SLOTS = 1  # every span through C, even single slots
    _worlds.append(World("python"))
    if validate.fast_available():
        _worlds.append(World("c"))


def regions(w: World, ch: Channel, held: list[int]) -> list[tuple[int, int]]:
    """(arena offset, length) of what this client may write and the kernel reads."""
    out = []
    for ring in (ch.tx_ring, ch.rx_ring, ch.alloc_ring, ch.free_ring, ch.event_ring):
        out.append((ring.off, RING_HDR_SIZE))
        out.append((ring.off + RING_HDR_SIZE, ring.n * SLOT_SIZE))
    lay = ch.arena.layout
    pool = w.pool
    for p in held:
        if not (0 <= p < pool.num_packets and pool.pkt_state[p] and pool.pkt_owner[p] != -1):
            continue  # the client library read a scribbled alloc ring: not a packet it holds
        out.append((lay.md_off + p * MD_SIZE, MD_SIZE))
        j = pool.b_next[p]
        while j != 0xFFFFFFFF:
            out.append((lay.buflet_off + j * BUFLET_SIZE, BUFLET_SIZE))
            j = pool.b_next[pool.num_packets + j]
    for i in range(pool.num_packets):  # user copies of kernel-held packets
        if pool.pkt_state[i] and pool.pkt_owner[i] == -1:
            out.append((lay.md_off + i * MD_SIZE, MD_SIZE))
    return out


def run(w: World, data: bytes) -> list[Any]:
    """Run the program on ``w``; the outcome trace (compared across backends)."""
    w.use()
    r = Reader(data)
    pool, port = w.pool, w.port
    ch = port.open_channel()
    trace: list[Any] = []
    held: list[int] = []
    killed = False
    poked = False
    counter = 0
    try:
        for _ in range(40):
            if r.left <= 0:
                break
            op = r.u8() % 9
            try:
                if op == 0:
                    for _ in range(1 + r.u8() % 4):
                        p = ch.packet_alloc()
                        if p is not None:
                            held.append(p)
                    trace.append(("hold", list(held)))
                elif op == 1:
                    frames = []
                    for _ in range(r.u8() % 5):
                        counter += 1
                        frames.append(bytes([counter & 0xFF]) * (14 + r.u16() % 4000))
                    trace.append(("send", ch.send(frames)))
                elif op == 2:
                    if held:
                        ch.packet_free(held.pop(r.u8() % len(held)))
                    ch.sync(SyncKind.FREE)
                    trace.append(("free",))
                elif op == 3:
                    trace.append(("recv", ch.recv(max=1 + r.u8() % 10)))
                elif op == 4:
                    kind = KINDS[r.u8() % len(KINDS)]
                    ch.sync(kind)
                    trace.append(("sync", kind))
                elif op == 5:
                    sizes = [1 + r.u16() % 9000 for _ in range(r.u8() % 5)]
                    pkts = [pool.packet_from_bytes(b"D" * s) for s in sizes]
                    ok = [p for p in pkts if p is not None]
                    taken = port.deliver(ok)
                    pool.free_packets(ok[taken:])
                    trace.append(("deliver", taken))
                elif op == 6:
                    ev = pool.packet_from_bytes(b"e" * (1 + r.u8()))
                    if ev is not None and not port.channels:
                        pool.free_packets([ev])  # a killed channel left the port
                    elif ev is not None:
                        n = port.post_event(port.channels[0], [ev])
                        if not n:
                            pool.free_packets([ev])
                        trace.append(("event", n))
                elif op in (7, 8):
                    regs = regions(w, ch, held) if not killed else []
                    idx, off, width = r.u16(), r.u16(), (1, 2, 4)[r.u8() % 3]
                    sel = r.u8()
                    value = EDGES[sel % len(EDGES)] if sel < 160 else r.u32()
                    if regs:
                        start, length = regs[idx % len(regs)]
                        o = start + off % max(1, length - width + 1)
                        o -= o % width
                        ctype = {1: "uint8_t *", 2: "uint16_t *", 4: "uint32_t *"}[width]
                        ffi.cast(ctype, w.base + o)[0] = value & ((1 << (8 * width)) - 1)
                        trace.append(("poke", o, width))
                        poked = True
            except SyncError as err:
                assert not killed, f"second kill: {err}"
                assert isinstance(err.reason, KillReason) and err.detail
                killed = True
                trace.append(("killed", err.reason, err.sync, err.detail))
            except DefunctError:
                assert killed
                trace.append(("defunct",))
            except (ValueError, IndexError) as exc:
                # The client library (channel.py, the client's own code) refusing what the
                # client scribbled over; the kernel side never raises this.
                where = traceback.extract_tb(exc.__traceback__)[-1].filename
                if not (poked and where.endswith(CLIENT_LIBRARY)):
                    raise
                trace.append(("client refused", str(exc)))
    finally:
        ch.close()
    # The device keeps working whatever the channel did.
    more = [p for p in (pool.packet_from_bytes(b"m" * 10) for _ in range(2)) if p is not None]
    pool.free_packets(more[port.deliver(more) :])
    if pool.stats.in_use != 0:
        raise FuzzLeak(f"{w.backend}: {pool.stats.in_use} packets in use after close")
    return trace


def one_input(data: bytes) -> None:
    if not _worlds:
        setup()
    enabled = chanbatch.ENABLED
    try:
        traces = [run(w, data) for w in _worlds]
    finally:
        chanbatch.set_enabled(enabled)
    if len(traces) == 2:
        assert traces[0] == traces[1], f"python and c differ:\n{traces[0]}\n{traces[1]}"
        a, b = (w.pool for w in _worlds)
        for name in TRUSTED:
            assert list(getattr(a, name)) == list(getattr(b, name)), f"pool {name} differs"
