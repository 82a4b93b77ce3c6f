"""Split and packed virtqueues with hostile descriptor tables, rings and indices.

Guest memory is two regions over one memfd, like a PC guest (gpa 0..0xa0000 and
0xc0000..0x400000, each at a frontend virtual address different from its gpa), made once.
Each input is a program:

* the ring: format (split 2.7 / packed 2.8), size, negotiated ring features (INDIRECT_DESC,
  EVENT_IDX, NOTIFY_ON_EMPTY), direction (RX: device-writable only, TX: device-readable only,
  or both) and the SET_VRING_BASE position;
* the mock driver (``vdev/virtio/driver.py`` / ``packed_driver.py``) makes chains available,
  direct or indirect, of any direction;
* hostile writes of 1, 2, 4 or 8 bytes into the descriptor table, the avail/driver area, the
  used/device area or the indirect tables, before the device queue exists or between its
  calls;
* device calls: pop, push (what was popped, or any head), flush, rewind, notification checks.

Properties: a queue only ever raises ``SyncError`` (then stays defunct: ``DefunctError``) or
``ValueError`` at construction (which the backend turns into a refusal); every segment of
every chain lies inside guest memory and its lengths add up.

``BACKENDS`` maps a name to a queue constructor with the ``QueueFormat`` signature; the input
picks one.

The compiled virtqueue bursts (the default datapath) are not a queue with this API: they run
inside the NIC's TX loop and RX drain.  An input starting with :data:`BURST` (one byte) is a
program for ``fuzz/vq_burst.py`` instead, which drives a NIC through the same kinds of
hostile rings on the Python and the compiled backend and compares everything observable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from vdev.abi import ffi, lib
from vdev.errors import DefunctError, SyncError, SyncKind
from vdev.virtio.chain import Chain
from vdev.virtio.driver import DriverError, DriverQueue
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed_driver import PackedDriverQueue
from vdev.virtio.queue import F_RING_PACKED, VirtQueue, queue_format

from . import vq_burst
from .common import Reader

LOW_SIZE, HIGH_GPA, HIGH_SIZE = 0xA0000, 0xC0000, 0x340000
LOW_UVA, HIGH_UVA = 0x7F00_0000_0000, 0x7F00_1000_0000
RING = 0x100000  # desc / avail / used at RING, RING + 0x1000, RING + 0x2000
INDIRECT = 0x300000
DATA = [0x1000, 0x380000, 0xA0000 - 0x800, 0x3FF000]  # the last two near region ends
FEATURE_BITS = [
    1 << lib.VIRTIO_RING_F_INDIRECT_DESC,
    1 << lib.VIRTIO_RING_F_EVENT_IDX,
    1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY,
]
SYNCS = [SyncKind.RX, SyncKind.TX, SyncKind.EVENT]
EDGES = [0, 1, 2, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 63]
BURST = 0xBB  # first byte of a vq_burst program
AREAS = [(RING, 0x1000), (RING + 0x1000, 0x1000), (RING + 0x2000, 0x1000), (INDIRECT, 0x1000)]

QueueMaker = Callable[..., VirtQueue]


def python_queue(features: int) -> QueueMaker:
    """The reference: ``SplitQueue`` / ``PackedQueue`` as the backend builds them."""
    return queue_format(features)


# name -> (features -> queue constructor); the compiled path is vq_burst's (see above).
BACKENDS: dict[str, Callable[[int], QueueMaker]] = {"python": python_queue}

_mem: GuestMemory | None = None
_ranges: list[tuple[int, int]] = []


def setup() -> None:
    global _mem
    logging.getLogger("vdev").setLevel(logging.ERROR)  # resume warnings: 1M of them
    fd = os.memfd_create("vdev-fuzz-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, LOW_SIZE + HIGH_SIZE)
    _mem = GuestMemory()
    _mem.add_region(0, LOW_SIZE, LOW_UVA, 0, fd)
    _mem.add_region(HIGH_GPA, HIGH_SIZE, HIGH_UVA, LOW_SIZE, fd)
    os.close(fd)
    for r in _mem.regions:
        assert r.mm is not None
        buf = ffi.from_buffer(r.mm)
        base = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)
        _ranges.append((base, base + len(r.mm)))
    vq_burst.setup()


def uva(gpa: int) -> int:
    return LOW_UVA + gpa if gpa < LOW_SIZE else HIGH_UVA + gpa - HIGH_GPA


def check_chain(chain: Chain) -> None:
    for seg in chain.readable + chain.writable:
        buf = ffi.from_buffer(seg)
        a = int(ffi.cast("uintptr_t", buf))
        ffi.release(buf)
        assert any(lo <= a and a + len(seg) <= hi for lo, hi in _ranges), f"{a:#x} outside"
    assert sum(len(s) for s in chain.readable) == chain.read_len
    assert sum(len(s) for s in chain.writable) == chain.write_len
    assert chain.read_len < 1 << 32 and chain.write_len < 1 << 32


def hostile_write(mem: GuestMemory, r: Reader) -> None:
    base, length = AREAS[r.u8() % len(AREAS)]
    width = (1, 2, 4, 8)[r.u8() % 4]
    sel = r.u8()
    value = EDGES[sel % len(EDGES)] if sel < 128 else r.u64()
    off = r.u16() % (length - width + 1)
    mem.write(base + off, (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little"))


class Program:
    def __init__(self, mem: GuestMemory, r: Reader) -> None:
        self.mem, self.r = mem, r
        head = r.u8()
        self.packed = bool(head & 1)
        features = (1 << lib.VIRTIO_F_VERSION_1) | (F_RING_PACKED if self.packed else 0)
        bits = r.u8()
        for i, b in enumerate(FEATURE_BITS):
            if bits >> i & 1:
                features |= b
        self.features = features
        self.sync = SYNCS[(head >> 1) % 3]
        self.size = (1 + r.u8() % 16) if self.packed else 1 << (r.u8() % 5)
        self.indirect = bool(features & FEATURE_BITS[0])
        for base, length in AREAS:
            mem.write(base, bytes(length))
        self.start = 0
        if r.u8() >= 224:
            self.start = r.u16() if not self.packed else r.u32()
        desc, avail, used = RING, RING + 0x1000, RING + 0x2000
        self.driver: DriverQueue | PackedDriverQueue
        if self.packed:
            self.driver = PackedDriverQueue(
                mem, self.size, desc, avail, used, features=features,
                indirect_area=(INDIRECT, 0x1000),
            )  # fmt: skip
        else:
            self.driver = DriverQueue(
                mem, self.size, desc, avail, used, features=features,
                start_idx=self.start & 0xFFFF, indirect_area=(INDIRECT, 0x1000),
            )  # fmt: skip
        names = sorted(BACKENDS)
        self.maker = BACKENDS[names[r.u8() % len(names)]](features)
        self.queue: VirtQueue | None = None
        self.popped: list[Chain] = []
        self.mark: int | None = None  # rewind token taken before the current pops
        self.dead = False

    def add(self) -> None:
        r = self.r
        nr, nw = r.u8() % 4, r.u8() % 4
        if nr + nw == 0:
            nr = 1
        segs = []
        for k in range(nr + nw):
            base = DATA[r.u8() % len(DATA)]
            segs.append((base + (k * 0x100), r.u16() % 0x1000))
        indirect = self.indirect and bool(r.u8() & 1)
        try:
            self.driver.add_chain(segs[:nr], segs[nr:], indirect=indirect)
        except (ValueError, RuntimeError, DriverError):
            return  # ring full, or a chain the mock driver refuses to build

    def device(self, call: Callable[[VirtQueue], Any]) -> Any:
        """One call into the device queue: only SyncError/DefunctError may come out."""
        q = self.queue
        if q is None:
            return None
        try:
            return call(q)
        except SyncError as err:
            assert not self.dead, f"second kill after {q.defunct}: {err}"
            assert q.defunct is err and err.detail
            self.dead = True
        except DefunctError:
            assert self.dead and q.defunct is not None
        return None

    def create(self) -> None:
        q_uva = uva(RING), uva(RING + 0x1000), uva(RING + 0x2000)
        try:
            self.queue = self.maker(
                self.mem, 0, self.size, *q_uva, features=self.features,
                last_avail_idx=self.start, sync=self.sync,
            )  # fmt: skip
        except ValueError:
            self.queue = None  # refused at start (SET_VRING_BASE / ring state): a refusal

    def pop(self) -> None:
        if not self.popped and self.queue is not None and self.queue.defunct is None:
            self.mark = self.queue.last_avail_idx
        for _ in range(1 + self.r.u8() % (self.size + 2)):
            chain = self.device(lambda q: q.pop())
            if chain is None:
                return
            check_chain(chain)
            if self.sync is SyncKind.RX:
                assert not chain.readable
            if self.sync is SyncKind.TX:
                assert not chain.writable
            self.popped.append(chain)

    def push(self) -> None:
        r = self.r
        if self.popped and r.u8() < 200:
            chain = self.popped.pop(r.u8() % len(self.popped))
            written = min(chain.write_len, r.u32())
            if chain.writable:
                chain.write_into(b"\xab" * min(written, 64))
            head = chain.head
            chain.release()
        else:
            # Any head and length: the device's own API refuses (ValueError) what is not
            # in flight or longer than the chain's writable space; a caller bug, named.
            head, written = r.u16(), r.u32() >> (r.u8() % 33)
            q = self.queue
            room = q.inflight_writable(head) if q is not None and q.defunct is None else None
            if q is not None and q.defunct is None and (room is None or written > room):
                try:
                    q.push(head, written)
                except ValueError:
                    return
                raise AssertionError(f"push({head}, {written}) accepted (room {room})")
            for c in [c for c in self.popped if c.head == head]:  # it completes that chain
                c.release()
                self.popped.remove(c)
        self.mark = None  # a push ends what a rewind may give back
        self.device(lambda q: q.push(head, written))

    def step(self) -> None:
        op = self.r.u8() % 10
        if op == 0:
            self.add()
        elif op == 1:
            self.driver.publish()
        elif op == 2:
            hostile_write(self.mem, self.r)
        elif op in (3, 4):
            self.pop()
        elif op == 5:
            self.push()
        elif op == 6:
            self.device(lambda q: q.flush_used())
        elif op == 7:
            self.device(lambda q: (q.should_notify(), q.avail_count(), q.in_flight))
        elif op == 8:
            enable = bool(self.r.u8() & 1)
            self.device(lambda q: q.enable_notifications(enable))
        elif self.popped and self.mark is not None:
            # Give back everything popped since the mark (the device's rewind contract: a
            # token it read before popping, nothing pushed since).
            for c in self.popped:
                c.release()
            self.popped.clear()
            mark = self.mark
            self.device(lambda q: q.rewind(mark))
            self.mark = None

    def close(self) -> None:
        for c in self.popped:
            c.release()
        self.popped.clear()
        if self.queue is not None:
            self.queue.close()
        self.driver.close()


def one_input(data: bytes) -> None:
    if data[:1] == bytes([BURST]):
        vq_burst.one_input(data[1:])
        return
    if _mem is None:
        setup()
    assert _mem is not None
    r = Reader(data)
    prog = Program(_mem, r)
    try:
        for _ in range(r.u8() % 8):  # before the device looks: chains and corruption
            if r.u8() & 1:
                prog.add()
            else:
                hostile_write(_mem, r)
        prog.driver.publish()
        prog.create()
        for _ in range(48):
            if r.left <= 0:
                break
            prog.step()
    finally:
        prog.close()
