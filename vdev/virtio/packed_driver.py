"""Driver side of a packed virtqueue (virtio 1.x 2.8.13 "Supplying Buffers to The Device",
2.8.14 "Receiving Used Buffers From The Device"): the mock guest driver the QEMU-free frontend
and the tests use, next to ``driver.py``'s split one.  It can also write hostile values on
purpose (``write_desc``, ``write_indirect``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vdev.virtio.chain import U32_MAX
from vdev.virtio.memory import release_views
from vdev.virtio.packed import (
    DESC_SIZE,
    EVENT_SIZE,
    F_AVAIL,
    F_INDIRECT,
    F_NEXT,
    F_USED,
    F_WRITE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    packed_need_event,
    pffi,
    ring_pos,
)
from vdev.virtio.queue import F_EVENT_IDX


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
        new = ring_pos(self.next_avail, self.avail_wrap, self.size)
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
        release_views(pffi, self._bufs, self._views)


__all__ = ["PackedDriverQueue"]
