"""Packed virtqueues (virtio 1.x 2.8 "Packed Virtqueues"): device side with validation, and a
mock driver side for tests.

Same Skywalk mapping as the split ring (``split.py``): the guest driver is the untrusted user,
every descriptor is read once and checked, violations raise ``SyncError`` (INTERNALIZE_FAILED)
and make the queue defunct.  The differences that matter for validation:

- there is no avail idx to bound-check: a descriptor is available when its AVAIL bit equals
  the device's avail wrap counter and its USED bit does not (2.8.1 "Driver and Device Ring
  Wrap Counters"), so HEAD_OOB has no packed twin;
- chains are consecutive ring entries linked by NEXT (2.8.6), the buffer id sits in the last
  one, and every entry of a chain must itself be marked available;
- the device writes one used descriptor per buffer and skips the chain's length (2.8.9).

The packed layouts are not in ``vdev/abi/virtio.h`` yet; they are declared here with a local
cffi ``cdef`` (no ``struct`` format strings) until the ABI owner moves them there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from cffi import FFI

from vdev.skywalk.errors import KillReason, SyncError, SyncKind
from vdev.virtio.chain import U32_MAX, Chain
from vdev.virtio.memory import GuestMemory, MemoryFault
from vdev.virtio.split import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    QueueLifecycle,
    QueueStats,
)

pffi = FFI()
pffi.cdef(
    """
    struct pvirtq_desc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
    struct pvirtq_event_suppress { uint16_t off_wrap; uint16_t flags; };
    """
)

F_NEXT = 1
F_WRITE = 2
F_INDIRECT = 4
F_AVAIL = 1 << 7
F_USED = 1 << 15
# 2.8.10 "Event Suppression Structure Format"
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
MAX_PACKED_SIZE = 32768
F_RING_PACKED = 1 << 34  # 6 "Reserved Feature Bits": VIRTIO_F_RING_PACKED
MAX_INDIRECT = 65536
DESC_SIZE: int = pffi.sizeof("struct pvirtq_desc")
EVENT_SIZE: int = pffi.sizeof("struct pvirtq_event_suppress")


def _pos(idx: int, wrap: int, size: int) -> int:
    """A ring position in the 2*size cycle the (index, wrap counter) pair describes."""
    return idx if wrap else idx + size


def packed_need_event(off_wrap: int, new: int, old: int, size: int) -> bool:
    """2.8.10 with EVENT_IDX: was the position named by ``off_wrap`` passed in [old, new)?

    ``new``/``old`` are positions from :func:`_pos`; the comparison is the split ring's
    vring_need_event, done modulo 2*size instead of 2^16 so the ring size need not be a power
    of two.
    """
    cycle = 2 * size
    event = _pos(off_wrap & 0x7FFF, off_wrap >> 15, size)
    return (new - event - 1) % cycle < (new - old) % cycle


def packed_ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor ring, driver event suppression, device event suppression) (2.8)."""
    return DESC_SIZE * size, EVENT_SIZE, EVENT_SIZE


class PackedQueue(QueueLifecycle):
    """Device side of one packed virtqueue (arguments as :class:`SplitQueue`'s; ``driver_addr``
    and ``device_addr`` are the driver and device event suppression areas).

    ``last_avail_idx`` uses vhost-user's packed encoding ("Ring states"/SET_VRING_BASE: bits
    0-14 index, bit 15 avail wrap counter; bits 16-31, the used index and wrap counter QEMU
    adds, are ignored: the used side resumes where the avail side is, as in DPDK's vhost);
    None means a fresh ring (index 0, wrap counter 1).  The :attr:`last_avail_idx` property
    reads back in the same encoding, so the NIC can use it as an opaque rewind token and the
    backend as the GET_VRING_BASE answer (see :attr:`vhost_base`).

    The method set is :class:`SplitQueue`'s (``pop``/``push``/``flush_used``/
    ``should_notify``/``enable_notifications``/``avail_count``/``rewind``/``push_raw``/
    ``patch_last_used``, ``_inflight`` as a per-id list of ``write_len + 1``), with buffer ids
    in place of split heads.
    """

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        features: int,
        last_avail_idx: int | None = None,
        addr_space: str = "uva",
        sync: SyncKind | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("vdev virtqueues assume a little-endian host")
        # 2.8 "Packed Virtqueues": any size up to 32768 (no power-of-two requirement).
        if not 0 < size <= MAX_PACKED_SIZE:
            raise ValueError(
                f"virtqueue {index}: packed size {size} is not in 1..{MAX_PACKED_SIZE}"
            )
        if addr_space not in ("uva", "gpa"):
            raise ValueError(f"virtqueue {index}: addr_space {addr_space!r} is not uva or gpa")
        self.mem = mem
        self.index = index
        self.size = size
        self.desc_addr = desc_addr
        self.driver_addr = driver_addr
        self.device_addr = device_addr
        self.addr_space = addr_space
        self.features = features
        self.sync: SyncKind = (
            sync if sync is not None else (SyncKind.RX if index % 2 == 0 else SyncKind.TX)
        )
        self.writable_expected = self.sync is not SyncKind.TX
        self.readable_allowed = self.sync is not SyncKind.RX
        if last_avail_idx is None:
            self._avail_idx, self.avail_wrap = 0, 1
        else:
            self._avail_idx, self.avail_wrap = (
                last_avail_idx & 0x7FFF,
                (last_avail_idx >> 15) & 1,
            )
            if self._avail_idx >= size:
                raise ValueError(f"virtqueue {index}: last_avail_idx {self._avail_idx} >= {size}")
        # The used side resumes where the avail side is (no buffers in flight across a restart).
        self.used_idx, self.used_wrap = self._avail_idx, self.avail_wrap
        self.defunct: SyncError | None = None
        self._closed = False
        self.stats = QueueStats()
        # Device-private record per buffer id (trusted): write_len + 1 while in flight, else 0
        # (the fault engine reads it like SplitQueue's), and the descriptors the buffer used.
        self._inflight = [0] * size
        self._ndesc = [0] * size
        self._pending: list[tuple[int, int, int]] = []  # (id, written, descriptors)
        # (token before the pop, id) of recent pops, so rewind() never re-reads guest memory.
        self._popped: list[tuple[int, int]] = []
        # avail_count() cache: chains known available from the current position up to
        # position _scan_end (a _pos() value); available descriptors stay available until
        # the device consumes them (2.8.1), so only the tail needs scanning again.
        self._scan_end: int | None = None
        self._scan_chains = 0
        self._signalled: int | None = None
        self._bufs: list[Any] = []
        self._views: list[memoryview] = []
        self._map(mem)

    # -- features and state -------------------------------------------------------------

    @property
    def features(self) -> int:
        return self._features

    @features.setter
    def features(self, features: int) -> None:
        """Settable like SplitQueue's: SET_FEATURES may arrive after the ring was set up."""
        self._features = features
        self.event_idx = bool(features & F_EVENT_IDX)
        self.indirect = bool(features & F_INDIRECT_DESC)
        self.notify_on_empty = False  # not defined for packed rings (2.8.10 replaces it)
        self.version_1 = bool(features & F_VERSION_1)
        self.any_layout = True  # RING_PACKED requires VERSION_1, which implies ANY_LAYOUT

    @property
    def last_avail_idx(self) -> int:
        """The next descriptor to read, vhost-user packed encoding (index | wrap << 15)."""
        return self._avail_idx | self.avail_wrap << 15

    @property
    def vhost_base(self) -> int:
        """The GET_VRING_BASE answer (vhost-user.rst "Ring states" / GET_VRING_BASE for packed
        rings: bits 0-14 last avail index, bit 15 avail wrap counter, bits 16-30 used index,
        bit 31 used wrap counter; QEMU 7.2's virtio_queue_packed_set_last_avail_idx reads
        all four)."""
        used = self.used_idx | self.used_wrap << 15
        return self.last_avail_idx | used << 16

    # -- mapping and life cycle ---------------------------------------------------------

    def _map(self, mem: GuestMemory) -> None:
        translate = mem.uva_view if self.addr_space == "uva" else mem.gpa_view
        views = []
        for area, addr, length, align in (
            ("descriptor ring", self.desc_addr, DESC_SIZE * self.size, 16),
            ("driver event suppression area", self.driver_addr, EVENT_SIZE, 4),
            ("device event suppression area", self.device_addr, EVENT_SIZE, 4),
        ):
            if addr % align:
                raise ValueError(
                    f"virtqueue {self.index}: {area} at {addr:#x} is not {align}-byte aligned"
                )
            try:
                views.append(translate(addr, length))
            except MemoryFault as exc:
                raise MemoryFault(
                    f"virtqueue {self.index}: {area} {self.addr_space} {addr:#x}+{length:#x} "
                    f"does not fit in guest memory: {exc}"
                ) from None
        bufs = [pffi.from_buffer(v) for v in views]
        self._release()
        self._views, self._bufs = views, bufs
        self._ring = pffi.cast("struct pvirtq_desc *", bufs[0])
        self._driver_ev = pffi.cast("struct pvirtq_event_suppress *", bufs[1])
        self._device_ev = pffi.cast("struct pvirtq_event_suppress *", bufs[2])
        self.mem = mem

    def _release(self) -> None:
        for b in self._bufs:
            pffi.release(b)
        for v in self._views:
            v.release()
        self._bufs, self._views = [], []

    def close(self) -> int:
        """Stop; returns the vhost-user packed base (index | wrap << 15)."""
        self._release()
        self._closed = True
        return self.last_avail_idx

    def _violation(self, detail: str) -> SyncError:
        err = SyncError(
            KillReason.INTERNALIZE_FAILED, self.sync, f"virtqueue {self.index}: {detail}"
        )
        self.kill(err)
        return err

    # -- avail side ---------------------------------------------------------------------

    def _is_avail(self, flags: int, wrap: int) -> bool:
        return bool(flags & F_AVAIL) == bool(wrap) and bool(flags & F_USED) != bool(wrap)

    def has_avail(self) -> bool:
        """Whether the next descriptor is available (2.8.1)."""
        self._check()
        return self._is_avail(int(self._ring[self._avail_idx].flags), self.avail_wrap)

    def avail_count(self) -> int:
        """Complete chains the driver made available and the device has not taken yet.

        There is no avail idx in a packed ring (2.8.1), so this scans descriptor flags from
        the current position; a chain counts once its last entry (no NEXT) is available.
        Bounded by the ring size; a hint only (``pop`` validates everything again).
        """
        self._check()
        size = self.size
        start = _pos(self._avail_idx, self.avail_wrap, size)
        if self._scan_end is None:
            self._scan_end, self._scan_chains = start, 0
        scanned = (self._scan_end - start) % (2 * size)
        idx, wrap = self._scan_end % size, 1 if self._scan_end < size else 0
        ring = self._ring
        run = 0
        while scanned + run < size:
            flags = int(ring[idx].flags)
            if not self._is_avail(flags, wrap):
                break
            run += 1
            idx += 1
            if idx == size:
                idx, wrap = 0, wrap ^ 1
            if not flags & F_NEXT:
                scanned += run
                run = 0
                self._scan_chains += 1
                self._scan_end = _pos(idx, wrap, size)
        return self._scan_chains

    def pop(self) -> Chain | None:
        """Take the next available buffer, validated, or None."""
        self._check()
        ring = self._ring
        size = self.size
        start = idx = self._avail_idx
        wrap = self.avail_wrap
        token = self.last_avail_idx
        first_flags = int(ring[idx].flags)
        if not self._is_avail(first_flags, wrap):
            return None
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        read_len = write_len = 0
        seen_writable = False
        count = 0
        buf_id = 0
        indirect = False
        where = f"avail desc {start} (wrap {wrap})"
        while True:
            d = ring[idx]
            # 2.8.13: flags are written last by the driver; read them before the rest.
            flags = int(d.flags) if count else first_flags
            if count and not self._is_avail(flags, wrap):
                raise self._violation(
                    f"{where}: chain entry {idx} is not available (flags {flags:#x}, wrap {wrap})"
                )
            addr, length, buf_id = int(d.addr), int(d.len), int(d.id)
            count += 1
            if count > size:
                # Defensive: entry ``size`` is the first one again, whose AVAIL bit is for
                # the other wrap counter, so it fails the availability check first.
                raise self._violation(f"{where}: chain longer than the queue size {size}")
            if flags & F_INDIRECT:
                # 2.8.7 "Indirect Flag: Scatter-Gather Support"
                if not self.indirect:
                    raise self._violation(f"{where}: desc {idx} INDIRECT not negotiated")
                if flags & F_NEXT:
                    raise self._violation(f"{where}: desc {idx} has both INDIRECT and NEXT")
                if count > 1:
                    # 2.8 "Driver Requirements: Indirect Descriptors": "A driver MUST NOT
                    # write direct descriptors with DESC_F_INDIRECT set in a scatter-gather
                    # list linked by VIRTQ_DESC_F_NEXT."
                    raise self._violation(
                        f"{where}: desc {idx} has INDIRECT set after {count - 1} direct "
                        "descriptors linked by NEXT"
                    )
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise self._violation(
                        f"{where}: desc {idx} indirect table len {length} is not a non-zero "
                        f"multiple of {DESC_SIZE} (at most {MAX_INDIRECT} entries)"
                    )
                if length // DESC_SIZE > size:
                    # 2.8 "Driver Requirements: Scatter-Gather Support": "A driver MUST NOT
                    # create a descriptor list longer than the Queue Size", and for indirect
                    # tables "longer than allowed by the device": this device allows the
                    # queue size, as for split rings (2.7.5.3.1).
                    raise self._violation(
                        f"{where}: chain too long: indirect table of {length // DESC_SIZE} "
                        f"entries, more than the queue size {size}"
                    )
                try:
                    tview = self.mem.gpa_view(addr, length)
                except MemoryFault as exc:
                    raise self._violation(
                        f"{where}: indirect table {addr:#x}+{length:#x} outside guest memory: {exc}"
                    ) from None
                tbuf = pffi.from_buffer(tview)
                try:
                    table = pffi.cast("struct pvirtq_desc *", tbuf)
                    for i in range(length // DESC_SIZE):
                        t = table[i]
                        tf, ta, tl = int(t.flags), int(t.addr), int(t.len)
                        if tf & F_INDIRECT:
                            raise self._violation(f"{where}: nested indirect at table entry {i}")
                        # NEXT is meaningless inside a packed indirect table: the table's
                        # length delimits the chain.
                        seen_writable, read_len, write_len = self._segment(
                            f"{where}: indirect entry {i}",
                            ta,
                            tl,
                            tf,
                            seen_writable,
                            readable,
                            writable,
                            read_len,
                            write_len,
                        )
                finally:
                    pffi.release(tbuf)
                indirect = True
            else:
                seen_writable, read_len, write_len = self._segment(
                    f"{where}: desc {idx}",
                    addr,
                    length,
                    flags,
                    seen_writable,
                    readable,
                    writable,
                    read_len,
                    write_len,
                )
            idx += 1
            if idx == size:
                idx = 0
                wrap ^= 1
            if not flags & F_NEXT:
                break
        if read_len > U32_MAX or write_len > U32_MAX:
            raise self._violation(f"{where}: total length overflows 32 bits")
        # 2.8.6: the buffer id is in the last descriptor of the chain.
        if buf_id >= size:
            raise self._violation(f"{where}: buffer id {buf_id} >= queue size {size}")
        if self._inflight[buf_id]:
            raise self._violation(f"{where}: buffer id {buf_id} is still in flight")
        self._avail_idx, self.avail_wrap = idx, wrap
        self._inflight[buf_id] = write_len + 1
        self._ndesc[buf_id] = count
        self._popped.append((token, buf_id))
        if len(self._popped) > size:
            del self._popped[: len(self._popped) - size]
        if self._scan_chains:
            self._scan_chains -= 1
        else:
            self._scan_end = None
        self.stats.chains += 1
        self.stats.descriptors += count
        self.stats.bytes_read += read_len
        return Chain(buf_id, readable, writable, read_len, write_len, count, indirect)

    def _segment(
        self,
        where: str,
        addr: int,
        length: int,
        flags: int,
        seen_writable: bool,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
    ) -> tuple[bool, int, int]:
        if flags & F_WRITE:
            if not self.writable_expected:
                raise self._violation(f"{where} is device-writable on a queue the device reads")
            seen_writable = True
            write_len += length
        else:
            if not self.readable_allowed:
                raise self._violation(f"{where} is device-readable on a queue the device writes")
            if seen_writable:
                raise self._violation(f"{where} is device-readable after a device-writable one")
            read_len += length
        if length:
            try:
                seg = self.mem.gpa_view(addr, length)
            except MemoryFault as exc:
                raise self._violation(
                    f"{where}: buffer {addr:#x}+{length:#x} outside guest memory: {exc}"
                ) from None
            (writable if flags & F_WRITE else readable).append(seg)
        return seen_writable, read_len, write_len

    def rewind(self, avail_idx: int) -> None:
        """Give back the buffers popped since token ``avail_idx`` (a :attr:`last_avail_idx`
        value; none of them pushed yet), as SplitQueue.rewind: the RX path pops several
        buffers for one mergeable frame and returns them when the guest posted too few."""
        self._check()
        if avail_idx == self.last_avail_idx:
            return
        n = 0
        for token, _bid in reversed(self._popped):
            n += 1
            if token == avail_idx:
                break
        else:
            raise ValueError(
                f"virtqueue {self.index}: cannot rewind from {self.last_avail_idx:#x} "
                f"to {avail_idx:#x}"
            )
        ids = [bid for _t, bid in self._popped[-n:]]
        if not all(self._inflight[b] for b in ids):
            raise ValueError(
                f"virtqueue {self.index}: rewind to {avail_idx:#x}: a buffer was already pushed"
            )
        for b in ids:
            self._inflight[b] = 0
            self.stats.descriptors -= self._ndesc[b]
        del self._popped[-n:]
        self._avail_idx, self.avail_wrap = avail_idx & 0x7FFF, (avail_idx >> 15) & 1
        self._scan_end = None
        self.stats.chains -= n

    # -- used side ----------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Queue a used buffer (published by :meth:`flush_used`); misuse is ValueError."""
        self._check()
        if not 0 <= head < self.size or not self._inflight[head]:
            raise ValueError(f"virtqueue {self.index}: buffer id {head} is not in flight")
        if not 0 <= written < self._inflight[head]:
            raise ValueError(
                f"virtqueue {self.index}: id {head}: written {written} exceeds "
                f"{self._inflight[head] - 1}"
            )
        self._inflight[head] = 0
        # 2.8.9 "Used descriptors": one per buffer; the device skips the buffer's
        # descriptors, so the used position advances by their count.
        self._pending.append((head, written, self._ndesc[head]))
        self.stats.used += 1
        self.stats.bytes_written += written

    def push_raw(self, head: int, written: int) -> None:
        """Queue a used descriptor with no checks (fault injection: a lying device).

        Device-private state is untouched; the id is truncated to the 16-bit field and the
        used position advances by one descriptor (the device cannot know more), so a raw
        element overwrites the next ring entry, as a buggy device would.
        """
        self._check()
        self._pending.append((head & 0xFFFF, written & 0xFFFF_FFFF, 1))

    def patch_last_used(self, written: int) -> None:
        """Overwrite the length of the most recently pushed, unpublished element (faults)."""
        self._check()
        if not self._pending:
            raise ValueError(f"virtqueue {self.index}: no pushed element to patch")
        bid, _n, ndesc = self._pending[-1]
        self._pending[-1] = (bid, written & 0xFFFF_FFFF, ndesc)

    def flush_used(self) -> None:
        """Write the used descriptors (2.8.9); the first one's flags go last, publishing the
        whole batch at once."""
        self._check()
        if not self._pending:
            return
        first: tuple[int, int] | None = None
        for buf_id, written, ndesc in self._pending:
            d = self._ring[self.used_idx]
            d.id = buf_id
            d.len = written
            flags = (F_AVAIL | F_USED if self.used_wrap else 0) | (F_WRITE if written else 0)
            if first is None:
                first = (self.used_idx, flags)
            else:
                d.flags = flags
            self.used_idx += ndesc
            if self.used_idx >= self.size:
                self.used_idx -= self.size
                self.used_wrap ^= 1
        assert first is not None
        self._ring[first[0]].flags = first[1]
        self._pending.clear()
        self.stats.flushes += 1

    @property
    def in_flight(self) -> int:
        return sum(1 for v in self._inflight if v)

    # -- notifications (2.8.10 "Event Suppression Structure Format") --------------------

    def should_notify(self) -> bool:
        self._check()
        new = _pos(self.used_idx, self.used_wrap, self.size)
        old = self._signalled
        if old == new:
            return False
        self._signalled = new
        flags = int(self._driver_ev.flags) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            notify = False
        elif flags == RING_EVENT_FLAGS_DESC and self.event_idx and old is not None:
            notify = packed_need_event(int(self._driver_ev.off_wrap), new, old, self.size)
        else:
            notify = True
        if notify:
            self.stats.notifications_sent += 1
        else:
            self.stats.notifications_suppressed += 1
        return notify

    def enable_notifications(self, enable: bool = True) -> bool:
        self._check()
        ev = self._device_ev
        if not enable:
            ev.flags = RING_EVENT_FLAGS_DISABLE
            return False
        if self.event_idx:
            # 2.8.10 with EVENT_IDX: the driver kicks when it makes available the descriptor
            # at off_wrap.  Name the first position *past* what is already available, not
            # our read position: the RX path re-arms while it waits for more buffers than
            # the driver posted, and the driver has already gone past the read position, so
            # it would never kick again.  (With nothing available both are the same.)
            self.avail_count()
            size = self.size
            end = self._scan_end
            if end is None:
                end = _pos(self._avail_idx, self.avail_wrap, size)
            ev.off_wrap = (end % size) | (1 if end < size else 0) << 15
            ev.flags = RING_EVENT_FLAGS_DESC
        else:
            ev.flags = RING_EVENT_FLAGS_ENABLE
        return self.has_avail()

    def __repr__(self) -> str:
        state = f"defunct={self.defunct.reason.name}" if self.defunct else "live"
        return (
            f"PackedQueue(index={self.index}, size={self.size}, sync={self.sync.name}, "
            f"avail={self._avail_idx}/{self.avail_wrap}, used={self.used_idx}/{self.used_wrap}, "
            f"{state})"
        )


class PackedDriverQueue:
    """Driver side of a packed ring (2.8.13 / 2.8.14) for tests; can write hostile values."""

    def __init__(
        self,
        mem: Any,
        size: int,
        desc_gpa: int,
        driver_gpa: int,
        device_gpa: int,
        *,
        features: int,
        indirect_area: tuple[int, int] | None = None,
    ) -> None:
        view_fn = getattr(mem, "gpa_view", None)
        self._view: Callable[[int, int], memoryview] = view_fn if view_fn is not None else mem
        self.size = size
        self.features = features
        self.event_idx = bool(features & F_EVENT_IDX)
        self._views = [
            self._view(desc_gpa, DESC_SIZE * size),
            self._view(driver_gpa, EVENT_SIZE),
            self._view(device_gpa, EVENT_SIZE),
        ]
        for v in self._views:
            v[:] = bytes(len(v))
        self._bufs = [pffi.from_buffer(v) for v in self._views]
        self._ring = pffi.cast("struct pvirtq_desc *", self._bufs[0])
        self._driver_ev = pffi.cast("struct pvirtq_event_suppress *", self._bufs[1])
        self._device_ev = pffi.cast("struct pvirtq_event_suppress *", self._bufs[2])
        self._indirect_area = indirect_area
        self.indirect_slot = 0 if indirect_area is None else (indirect_area[1] // size) & ~15
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.num_free = size
        self._free_ids = list(range(size - 1, -1, -1))
        self._inflight: dict[int, tuple[int, int]] = {}
        self._unpublished: list[tuple[int, int]] = []  # (ring index, head flags)
        self._kicked = 0

    def _flags(self, wrap: int) -> int:
        return F_AVAIL if wrap else F_USED

    def add_chain(
        self,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]] = (),
        indirect: bool = False,
    ) -> int:
        segs = [(a, n, 0) for a, n in readable] + [(a, n, F_WRITE) for a, n in writable]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        write_len = sum(n for a, n in writable)
        need = 1 if indirect else len(segs)
        if need > self.num_free or not self._free_ids:
            raise RuntimeError("packed ring full")
        buf_id = self._free_ids.pop()
        if indirect:
            if len(segs) > self.size:
                # 2.8 "Driver Requirements: Scatter-Gather Support": not longer than the
                # Queue Size (the device refuses it: chain too long).
                raise ValueError(f"{len(segs)} descriptors: longer than the queue size {self.size}")
            if self._indirect_area is None or len(segs) * DESC_SIZE > self.indirect_slot:
                raise RuntimeError("indirect table does not fit")
            gpa = self._indirect_area[0] + buf_id * self.indirect_slot
            self.write_indirect(gpa, [(a, n, 0, fl) for a, n, fl in segs])
            segs = [(gpa, len(segs) * DESC_SIZE, F_INDIRECT)]
        head = self.next_avail
        head_flags = 0
        for i, (a, n, fl) in enumerate(segs):
            last = i + 1 == len(segs)
            flags = fl | (0 if last else F_NEXT) | self._flags(self.avail_wrap)
            d = self._ring[self.next_avail]
            d.addr, d.len, d.id = a, n, buf_id
            if i == 0:
                head_flags = flags
            else:
                d.flags = flags
            self.next_avail += 1
            if self.next_avail == self.size:
                self.next_avail = 0
                self.avail_wrap ^= 1
        self._unpublished.append((head, head_flags))
        self.num_free -= len(segs)
        self._inflight[buf_id] = (len(segs), write_len)
        return buf_id

    def publish(self) -> None:
        """Make the added chains available: head flags written last, first chain's last."""
        for idx, flags in reversed(self._unpublished):
            self._ring[idx].flags = flags
        self._unpublished.clear()

    def kick_needed(self) -> bool:
        new = _pos(self.next_avail, self.avail_wrap, self.size)
        old, self._kicked = self._kicked, new
        if new == old:
            return False
        flags = int(self._device_ev.flags) & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            return packed_need_event(int(self._device_ev.off_wrap), new, old, self.size)
        return True

    def get_used(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while True:
            d = self._ring[self.next_used]
            flags = int(d.flags)
            w = bool(self.used_wrap)
            if bool(flags & F_AVAIL) != w or bool(flags & F_USED) != w:
                return out
            buf_id, ln = int(d.id), int(d.len)
            entry = self._inflight.pop(buf_id, None)
            if entry is None:
                raise RuntimeError(f"used id {buf_id} not in flight")
            if ln > entry[1]:
                raise RuntimeError(f"used id {buf_id}: len {ln} > {entry[1]}")
            self.num_free += entry[0]
            self._free_ids.append(buf_id)
            self.next_used += entry[0]
            if self.next_used >= self.size:
                self.next_used -= self.size
                self.used_wrap ^= 1
            out.append((buf_id, ln))

    def set_used_event(self, off: int, wrap: int) -> None:
        self._driver_ev.off_wrap = (off & 0x7FFF) | (wrap & 1) << 15
        self._driver_ev.flags = RING_EVENT_FLAGS_DESC

    def set_no_interrupt(self, suppress: bool = True) -> None:
        self._driver_ev.flags = RING_EVENT_FLAGS_DISABLE if suppress else RING_EVENT_FLAGS_ENABLE

    # hostile helpers
    def write_desc(self, i: int, addr: int, length: int, buf_id: int, flags: int) -> None:
        if not 0 <= i < self.size:
            raise ValueError(f"descriptor {i} is outside the ring of {self.size}")
        d = self._ring[i]
        d.addr, d.len = addr & (2**64 - 1), length & U32_MAX
        d.id, d.flags = buf_id & 0xFFFF, flags & 0xFFFF

    def avail_flags(self, wrap: int | None = None) -> int:
        """The AVAIL/USED bits that mark a descriptor available for ``wrap`` (default: now)."""
        return self._flags(self.avail_wrap if wrap is None else wrap)

    def write_indirect(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Write ``(addr, len, id, flags)`` entries as an indirect table at ``gpa``."""
        view = self._view(gpa, len(descs) * DESC_SIZE)
        buf = pffi.from_buffer(view)
        table = pffi.cast("struct pvirtq_desc *", buf)
        for i, (a, n, bid, fl) in enumerate(descs):
            table[i].addr, table[i].len = a & (2**64 - 1), n & U32_MAX
            table[i].id, table[i].flags = bid & 0xFFFF, fl & 0xFFFF
        pffi.release(buf)
        view.release()

    def close(self) -> None:
        for b in self._bufs:
            pffi.release(b)
        for v in self._views:
            v.release()
        self._bufs, self._views = [], []
