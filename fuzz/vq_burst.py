"""The compiled virtqueue bursts against the Python reference, on the same hostile rings.

The compiled bursts (``vdev/virtio/fastqueue.py`` over ``vdev/native/virtq.c``) are the
default datapath, but they are not a ``VirtQueue`` with pop/push: they run inside the NIC's
TX loop and RX drain.  So this mode of the ``virtqueue`` target drives a NIC: each input is
a program (ring format, size, features, SET_VRING_BASE, pool pressure, then a list of steps)
that is run twice from the same guest memory, once with ``fastqueue`` on the Python backend
and once on the C one (``STRICT``: a C violation the reference accepts is an
AssertionError), and everything observable must be the same (``vdev/net/burstdiff.py``,
shared with ``tests/virtio/test_fastqueue_diff.py``).  The campaign loads the UBSan build
of the C, so an out-of-bounds or misaligned access there aborts as a crash.

Guest memory is two regions over one small memfd.  Region B's ``mmap_offset`` is odd
(vhost-user does not constrain it), so a ring placed there has guest addresses the backend
accepts as aligned but host addresses that are not: every ring access of the C is
misaligned.  The steps:

* the mock driver adds TX chains (vnet header and frame) or RX buffers, direct or
  indirect, and publishes them;
* hostile stores of 1-8 bytes into the descriptor table/ring, the avail/driver area, the
  used/device area or the driver's indirect tables;
* a hostile indirect table at any byte offset (the spec aligns the rings, not indirect
  tables: 2.7.5.3 / 2.8.7) that a descriptor then names;
* the device runs: TX ``process_tx``, RX ``deliver`` of pool packets then ``drain_rx``;
* the driver reclaims its used buffers.

Leaks: after a run the pool must have no packet in use but the ones the program held.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vdev.abi import lib
from vdev.net.burstdiff import FakeVring, Forwarded, assert_same, make_nic, outcome
from vdev.net.nic import VirtioNet, net_queue_direction
from vdev.skywalk import Pbufpool
from vdev.virtio import fastqueue
from vdev.virtio.driver import DriverError, DriverQueue
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed_driver import PackedDriverQueue
from vdev.virtio.queue import F_RING_PACKED, queue_format

from .common import FuzzLeak, Reader

# Region A: gpa 0..0x10000 at mmap_offset 0; region B: gpa 0x20000..0x30000 at an odd
# mmap_offset, so its host addresses are misaligned by SKEW.
SKEW = 1
A_SIZE, B_GPA, B_SIZE = 0x10000, 0x20000, 0x10000
A_UVA, B_UVA = 0x7E00_0000_0000, 0x7E00_1000_0000
FD_SIZE = A_SIZE + B_SIZE + 0x1000
# Per region (offsets from its start): the ring (desc, avail/driver area, used/device area),
# the driver's indirect area, hostile indirect tables, data buffers.
RING, DRV_IND, HOSTILE_IND = 0x1000, 0x2000, 0x3000
AREA_OFFS = ((RING, 0x100), (RING + 0x100, 0x100), (RING + 0x200, 0x100), (DRV_IND, 0x1000))
DATA_OFFS = (0x4000, 0x8000, -1)  # -1: the buffer ends where the region does
F_V1 = 1 << lib.VIRTIO_F_VERSION_1
FEATURE_BITS = (
    1 << lib.VIRTIO_RING_F_INDIRECT_DESC,
    1 << lib.VIRTIO_RING_F_EVENT_IDX,
    1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY,
    1 << lib.VIRTIO_NET_F_MRG_RXBUF,
    1 << lib.VIRTIO_NET_F_GUEST_CSUM,
    F_V1,
)
EDGES = (0, 1, 2, 7, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63)
HOLDS = (0, 0, 10, 22, 24)
KICK_AHEADS = (0, 0, 2, 3, 7, 64)  # Shape.kick_ahead, from the header byte's bits 3-7
TX_Q, RX_Q = 1, 0

_state: dict[str, Any] = {}


def setup() -> None:
    fd = os.memfd_create("vdev-fuzz-burst", os.MFD_CLOEXEC)
    os.ftruncate(fd, FD_SIZE)
    mem = GuestMemory()
    mem.add_region(0, A_SIZE, A_UVA, 0, fd)
    mem.add_region(B_GPA, B_SIZE, B_UVA, A_SIZE + SKEW, fd)
    _state.update(mem=mem, fd=fd, zero=bytes(FD_SIZE))


def uva(gpa: int) -> int:
    return A_UVA + gpa if gpa < A_SIZE else B_UVA + gpa - B_GPA


def memory() -> bytes:
    return os.pread(_state["fd"], FD_SIZE, 0)


@dataclass
class Shape:
    """What the program's header fixes: the ring and the NIC around it."""

    packed: bool
    tx: bool
    features: int
    size: int
    start: int | None  # SET_VRING_BASE; None: a fresh packed ring (wrap counter 1)
    base: int  # guest address of the region holding ring, tables and buffers
    hold: int
    # RX kick batching (vdev/net/rxbatch.py): the ring re-armed out of room asks for the
    # refill kick after min(kick_ahead, frames waiting) buffers, on both backends.
    kick_ahead: int = 0

    @classmethod
    def read(cls, r: Reader) -> Shape:
        head = r.u8()
        packed, tx = bool(head & 1), bool(head & 2)
        features = 0
        bits = r.u8()
        for i, b in enumerate(FEATURE_BITS):
            if bits >> i & 1:
                features |= b
        if packed:
            features |= F_V1 | F_RING_PACKED
        size = (1 + r.u8() % 16) if packed else 1 << (r.u8() % 5)
        start: int | None = None if packed else 0
        if r.u8() >= 200:
            start = r.u16() if not packed else r.u32()
        base = B_GPA if head & 4 else 0
        ahead = KICK_AHEADS[(head >> 3) % len(KICK_AHEADS)]
        return cls(packed, tx, features, size, start, base, HOLDS[r.u8() % len(HOLDS)], ahead)

    def gpa(self, off: int) -> int:
        return self.base + off


class Run:
    """One run of a program on one backend."""

    def __init__(self, shape: Shape, r: Reader) -> None:
        self.s, self.r = shape, r
        self.mem: GuestMemory = _state["mem"]
        self.pool = Pbufpool(
            num_packets=24, buf_size=128, max_frags=4, num_large_bufs=2, large_buf_size=1024
        )
        self.held = self.pool.alloc_packets(shape.hold)
        self.forwarded: Forwarded = []
        self.nic: VirtioNet = make_nic(shape.features, self.pool, self.forwarded)
        self.index = TX_Q if shape.tx else RX_Q
        desc, avail, used = (shape.gpa(RING + k * 0x100) for k in range(3))
        self.drv: DriverQueue | PackedDriverQueue
        ind = (shape.gpa(DRV_IND), 0x1000)
        if shape.packed:
            self.drv = PackedDriverQueue(
                self.mem, shape.size, desc, avail, used, features=shape.features,
                indirect_area=ind,
            )  # fmt: skip
        else:
            self.drv = DriverQueue(
                self.mem, shape.size, desc, avail, used, features=shape.features,
                start_idx=(shape.start or 0) & 0xFFFF, indirect_area=ind,
            )  # fmt: skip
        self.queue: Any = None
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)
        self.ring = (desc, avail, used)

    def create(self) -> bool:
        s = self.s
        # A fresh packed ring is no SET_VRING_BASE at all (index 0, wrap counter 1).
        base = {} if s.start is None else {"last_avail_idx": s.start}
        try:
            self.queue = queue_format(s.features)(
                self.mem, self.index, s.size, *(uva(a) for a in self.ring),
                features=s.features, sync=net_queue_direction(self.index), **base,
            )  # fmt: skip
        except ValueError:
            return False  # refused at start: the same refusal on both backends
        self.queue.kick_ahead = s.kick_ahead
        vring = FakeVring(self.index, self.queue, True, self.efd)
        self.nic.vrings[self.index] = vring  # type: ignore[assignment]
        return True

    # -- steps ---------------------------------------------------------------------------

    def segments(self, total: int) -> list[tuple[int, int]]:
        r = self.r
        n = 1 + r.u8() % 3
        cuts = sorted({r.u16() % (total + 1) for _ in range(n - 1)})
        bounds = [0, *cuts, total]
        segs = []
        for k in range(len(bounds) - 1):
            n = bounds[k + 1] - bounds[k]
            where = DATA_OFFS[r.u8() % len(DATA_OFFS)]
            where = A_SIZE - n if where < 0 else where + k * 0x1000 + r.u8() % 16
            segs.append((self.s.gpa(where), n))
        return [seg for seg in segs if seg[1]] or [segs[0]]

    def add(self) -> None:
        r, drv = self.r, self.drv
        indirect = bool(self.s.features & FEATURE_BITS[0]) and bool(r.u8() & 1)
        if self.s.tx:
            hlen = self.nic.hdr_len
            vflags = (0, 0, 1, 3)[r.u8() % 4]
            cstart, coff = r.u8() % 80, (6, 16, 7)[r.u8() % 3]
            hdr = struct.pack("<BBHHHHH", vflags, 0, 0, 0, cstart, coff, 0)[:hlen]
            flen = (r.u16() % 1600) if r.u8() & 1 else r.u8() % 80
            seed = r.u8()
            data = hdr + bytes((seed + 31 * i) & 0xFF for i in range(flen))
            segs = self.segments(len(data))
            pos = 0
            for gpa, n in segs:
                self.mem.write(gpa, data[pos : pos + n])
                pos += n
            readable, writable = segs, []
        else:
            readable, writable = [], self.segments(r.u16() % 0x900)
        try:
            drv.add_chain(readable, writable, indirect=indirect)
        except (ValueError, RuntimeError, DriverError):
            pass  # ring full, or a chain the mock driver refuses to build

    def hostile_store(self) -> None:
        r = self.r
        off, length = AREA_OFFS[r.u8() % len(AREA_OFFS)]
        width = (1, 2, 4, 8)[r.u8() % 4]
        sel = r.u8()
        value = EDGES[sel % len(EDGES)] if sel < 128 else r.u64()
        at = self.s.gpa(off) + r.u16() % (length - width + 1)
        self.mem.write(at, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))

    def hostile_table(self) -> None:
        """An indirect table at any byte offset, named by descriptor ``i``."""
        r, s = self.r, self.s
        table = s.gpa(HOSTILE_IND) + r.u8() % 64
        n = r.u8() % 5
        write = 0 if s.tx else lib.VRING_DESC_F_WRITE
        for k in range(n):
            addr = s.gpa(DATA_OFFS[k % 2] + 0x100 * k)  # 20-275 bytes, inside the region
            flags = write | (lib.VRING_DESC_F_NEXT if k + 1 < n and not s.packed else 0)
            if r.u8() >= 240:
                flags = r.u16()
            entry = (addr, 20 + r.u8(), k + 1, flags)
            if s.packed:  # 2.8.13: addr, len, id, flags
                self.mem.write(table + 16 * k, struct.pack("<QIHH", *entry))
            else:  # 2.7.5: addr, len, flags, next
                self.mem.write(
                    table + 16 * k, struct.pack("<QIHH", entry[0], entry[1], flags, k + 1)
                )
        i = r.u8() % s.size
        d = self.ring[0] + 16 * i
        length = 16 * n if r.u8() < 224 else r.u32()
        if s.packed:
            old = struct.unpack("<H", self.mem.read(d + 14, 2))[0]
            flags = (old & 0x8080) | lib.VRING_DESC_F_INDIRECT
            self.mem.write(d, struct.pack("<QI", table, length))
            self.mem.write(d + 14, struct.pack("<H", flags))
        else:
            self.mem.write(d, struct.pack("<QIHH", table, length, lib.VRING_DESC_F_INDIRECT, 0))

    def device(self) -> None:
        r, nic = self.r, self.nic
        if self.s.tx:
            nic.process_tx(self.index)
            return
        pkts = []
        for _ in range(r.u8() % 5):
            flen = (14 + r.u8() % 90, 128, 300, 1500, 3000)[r.u8() % 5]
            hdr = None
            if r.u8() & 1:
                hdr = struct.pack("<BBHHHHH", r.u8() % 4, (0, 1, 3)[r.u8() % 3], 0, 0, 14, 6, 0)
            p = self.pool.packet_from_bytes(
                bytes(range(256)) * (flen // 256) + bytes(flen % 256), hdr
            )
            if p is not None:
                pkts.append(p)
        taken = nic.deliver(pkts)
        self.pool.free_packets(pkts[taken:])  # refused (a dead ring): the switch's to free
        nic.drain_rx()

    def reclaim(self) -> None:
        try:
            self.drv.get_used()
        except (DriverError, RuntimeError, ValueError):
            pass  # the used ring after hostile stores: the same on both backends

    def step(self) -> None:
        op = self.r.u8() % 8
        steps: tuple[Callable[[], None], ...] = (
            self.add, self.add, self.drv.publish, self.hostile_store, self.hostile_table,
            self.device, self.device, self.reclaim,
        )  # fmt: skip
        steps[op]()

    def finish(self) -> dict[str, Any]:
        calls = 0
        try:
            calls = os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        return outcome(self.nic, self.queue, self.pool, self.forwarded, calls, memory())

    def close(self) -> None:
        os.close(self.efd)
        pool, nic = self.pool, self.nic
        pool.free_packets(list(nic.backlog))
        nic.backlog.clear()
        if self.queue is not None and self.queue.defunct is None:
            self.queue.close()
        self.drv.close()
        pool.free_packets(self.held)
        in_use = pool.stats.in_use
        pool.close()
        if in_use:
            raise FuzzLeak(f"pool in_use {in_use} after a {fastqueue.BACKEND} burst run")


def run(data: bytes, backend: str) -> dict[str, Any] | None:
    """The program ``data`` on ``backend`` from zeroed guest memory: its outcome, or None if
    the queue was refused at start."""
    assert fastqueue.set_backend(backend) == backend, f"no {backend} backend"
    os.pwrite(_state["fd"], _state["zero"], 0)
    r = Reader(data)
    shape = Shape.read(r)
    prog = Run(shape, r)
    try:
        for _ in range(r.u8() % 6):  # before the device looks: chains and corruption
            (prog.add if r.u8() & 1 else prog.hostile_store)()
        prog.drv.publish()
        if not prog.create():
            return None
        for _ in range(40):
            if r.left <= 0:
                break
            prog.step()
        return prog.finish()
    finally:
        prog.close()


def one_input(data: bytes) -> None:
    """Run ``data`` on both backends and compare (the C backend must be available: the
    fuzzer exists to check it)."""
    if not _state:
        setup()
    old, strict = fastqueue.BACKEND, fastqueue.STRICT
    fastqueue.STRICT = True
    try:
        py = run(data, "python")
        c = run(data, "c")
    finally:
        fastqueue.set_backend(old)
        fastqueue.STRICT = strict
    assert (py is None) == (c is None), "one backend refused the ring, the other did not"
    if py is not None and c is not None:
        assert_same(py, c)
