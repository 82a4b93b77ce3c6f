"""Driver side of a split virtqueue: the mock guest driver used by tests, fuzzers and benchmarks.

:class:`DriverQueue` follows virtio 1.x 2.7.13 "Supplying Buffers to The Device" and 2.7.14
"Receiving Used Buffers From The Device" on guest RAM reached through any accessor with a
``gpa_view(gpa, length) -> memoryview`` method (``GuestMemory``, the frontend's
``FrontendMemory``) or a plain callable ``(gpa, length) -> memoryview``.

The driver's own bookkeeping (free descriptors, chains in flight) lives in Python, not in the
shared rings, so the device cannot corrupt it and the driver can check what the device
returns (2.7.8.1-style checks: used idx jumps, unknown ids, lengths beyond the buffer).

It is also a deliberately hostile driver: ``write_desc``, ``set_avail_idx``,
``set_avail_ring``, ``write_indirect`` and the ``make_*`` builders write any value, ignoring
the rules, so tests can check that the device turns each violation into a named kill reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from vdev.abi import ffi, lib
from vdev.errors import VdevError
from vdev.virtio.chain import DESC_SIZE as _DESC_SIZE
from vdev.virtio.chain import F_INDIRECT, F_NEXT, F_WRITE
from vdev.virtio.memory import release_views
from vdev.virtio.queue import F_EVENT_IDX, F_INDIRECT_DESC
from vdev.virtio.split import USED_ELEM as _USED_ELEM
from vdev.virtio.split import USED_HDR as _USED_HDR
from vdev.virtio.split import ring_sizes, vring_need_event

Segment = tuple[int, int]  # (gpa, len)


class HasGpaView(Protocol):
    def gpa_view(self, gpa: int, length: int) -> memoryview: ...


MemAccess = HasGpaView | Callable[[int, int], memoryview]


class DriverError(VdevError):
    """The device broke the contract as seen by the driver, or the driver was misused."""


class RingFull(DriverError):
    """Not enough free descriptors (or indirect space) for the requested chain."""


class DriverQueue:
    """A split ring driven from the guest's side.

    ``indirect_area=(gpa, length)`` is guest memory the driver may use for indirect tables:
    each head owns a fixed slice of ``length // size`` bytes (rounded down to 16), so a chain
    of up to that many descriptors fits in one indirect table.
    """

    def __init__(
        self,
        mem: MemAccess,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        features: int,
        start_idx: int = 0,
        indirect_area: tuple[int, int] | None = None,
        auto_used_event: bool = True,
        init: bool = True,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"size {size} is not a power of two <= 32768")
        view_fn = getattr(mem, "gpa_view", None)
        self._view: Callable[[int, int], memoryview] = (
            view_fn if view_fn is not None else mem  # type: ignore[assignment]
        )
        self.size = size
        self._mask = size - 1
        self.features = features
        self.event_idx = bool(features & F_EVENT_IDX)
        self.indirect_ok = bool(features & F_INDIRECT_DESC)
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self.auto_used_event = auto_used_event
        desc_len, avail_len, used_len = ring_sizes(size)
        self._views = [
            self._view(desc_gpa, desc_len),
            self._view(avail_gpa, avail_len),
            self._view(used_gpa, used_len),
        ]
        self._bufs = [ffi.from_buffer(v) for v in self._views]
        self._desc = ffi.cast("struct vring_desc *", self._bufs[0])
        self._avail16 = ffi.cast("uint16_t *", self._bufs[1])
        self._used_event_i = 2 + size
        self._used16 = ffi.cast("uint16_t *", self._bufs[2])
        self._used_elems = ffi.cast("struct vring_used_elem *", self._bufs[2] + _USED_HDR)
        self._avail_event_i = (_USED_HDR + _USED_ELEM * size) // 2

        self._indirect_area = indirect_area
        self.indirect_slot = 0
        if indirect_area is not None:
            self.indirect_slot = (indirect_area[1] // size) // _DESC_SIZE * _DESC_SIZE

        start_idx &= 0xFFFF
        if init:
            for v in self._views:
                v[:] = bytes(len(v))
            self._avail16[1] = start_idx
            self._used16[1] = start_idx
            self._avail16[self._used_event_i] = start_idx
            self._used16[self._avail_event_i] = start_idx
        self.avail_idx = int(self._avail16[1])  # shadow: next slot to fill (2.7.13.1)
        self.published_idx = self.avail_idx
        self.last_used_idx = int(self._used16[1])
        self._kicked_idx = self.avail_idx
        self._free: list[int] = list(range(size - 1, -1, -1))  # stack, pops 0 first
        # head -> (descriptor indices it holds, writable length)
        self._inflight: dict[int, tuple[list[int], int]] = {}
        self.interrupts_enabled = True

    # -- properties ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def indirect_table_gpa(self, head: int) -> int:
        if self._indirect_area is None or not self.indirect_slot:
            raise DriverError("no indirect_area configured")
        return self._indirect_area[0] + head * self.indirect_slot

    # -- supplying buffers (2.7.13) -----------------------------------------------------

    def add_chain(
        self,
        readable: Sequence[Segment],
        writable: Sequence[Segment] = (),
        indirect: bool = False,
    ) -> int:
        """Put a chain in the descriptor table and the next avail ring slot; return its head.

        Not visible to the device until :meth:`publish` (2.7.13.3 "Updating idx").
        """
        segs = [(a, n, 0) for a, n in readable] + [(a, n, F_WRITE) for a, n in writable]
        if not segs:
            raise ValueError("a chain needs at least one buffer")
        write_len = sum(n for _, n, _ in segs[len(readable) :])
        if indirect:
            if not self.indirect_ok:
                raise ValueError("VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
            if self._indirect_area is None or not self.indirect_slot:
                raise DriverError("no indirect_area configured")
            if not self._free:
                raise RingFull("no free descriptor")
            if len(segs) * _DESC_SIZE > self.indirect_slot:
                raise RingFull(f"{len(segs)} descriptors do not fit the indirect slot")
            if len(segs) > self.size:
                # 2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the
                # Queue Size of the device."  (The device refuses it: chain too long.)
                raise ValueError(f"{len(segs)} descriptors: longer than the queue size {self.size}")
            head = self._free.pop()
            table_gpa = self.indirect_table_gpa(head)
            self.write_indirect(
                table_gpa,
                [
                    (
                        a,
                        n,
                        fl | (F_NEXT if i + 1 < len(segs) else 0),
                        i + 1 if i + 1 < len(segs) else 0,
                    )
                    for i, (a, n, fl) in enumerate(segs)
                ],
            )
            self.write_desc(head, table_gpa, len(segs) * _DESC_SIZE, F_INDIRECT, 0)
            self._inflight[head] = ([head], write_len)
        else:
            if len(segs) > len(self._free):
                raise RingFull(f"{len(segs)} descriptors needed, {len(self._free)} free")
            idxs = [self._free.pop() for _ in segs]
            for i, (a, n, fl) in enumerate(segs):
                last = i + 1 == len(segs)
                self.write_desc(
                    idxs[i], a, n, fl | (0 if last else F_NEXT), 0 if last else idxs[i + 1]
                )
            head = idxs[0]
            self._inflight[head] = (idxs, write_len)
        self._avail16[2 + (self.avail_idx & self._mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Store the avail idx: after the ring entries (2.7.13.3; x86 TSO keeps the order)."""
        self._avail16[1] = self.avail_idx
        self.published_idx = self.avail_idx

    def kick_needed(self) -> bool:
        """2.7.13.4 "Notifying The Device": EVENT_IDX compares avail_event with the idx range
        published since the last decision; otherwise obey VRING_USED_F_NO_NOTIFY."""
        new = self.published_idx
        old = self._kicked_idx
        self._kicked_idx = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(int(self._used16[self._avail_event_i]), new, old)
        return not (int(self._used16[0]) & lib.VRING_USED_F_NO_NOTIFY)

    # -- receiving used buffers (2.7.14) ------------------------------------------------

    def used_pending(self) -> int:
        return (int(self._used16[1]) - self.last_used_idx) & 0xFFFF

    def get_used(self) -> list[tuple[int, int]]:
        """Collect published used elements as ``(id, len)``, freeing their descriptors.

        Raises DriverError when the device publishes more than it could hold, an id that is
        not in flight, or a length beyond the chain's writable space.
        """
        used_idx = int(self._used16[1])
        n = (used_idx - self.last_used_idx) & 0xFFFF
        if n > self.size:
            raise DriverError(
                f"used idx {used_idx} is {n} ahead of last seen {self.last_used_idx} "
                f"(size {self.size})"
            )
        out: list[tuple[int, int]] = []
        for _ in range(n):
            elem = self._used_elems[self.last_used_idx & self._mask]
            uid = int(elem.id)
            ulen = int(elem.len)
            entry = self._inflight.pop(uid, None)
            if entry is None:
                raise DriverError(f"used id {uid} at used idx {self.last_used_idx} not in flight")
            idxs, write_len = entry
            if ulen > write_len:
                raise DriverError(
                    f"used id {uid}: len {ulen} exceeds the writable length {write_len}"
                )
            self._free.extend(reversed(idxs))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            out.append((uid, ulen))
        if self.event_idx and self.auto_used_event and self.interrupts_enabled:
            self._avail16[self._used_event_i] = self.last_used_idx
        return out

    def set_used_event(self, value: int) -> None:
        """2.7.10: interrupt me when the used idx passes ``value``."""
        self._avail16[self._used_event_i] = value & 0xFFFF

    def set_no_interrupt(self, suppress: bool = True) -> None:
        """2.7.7: set or clear VRING_AVAIL_F_NO_INTERRUPT."""
        self.interrupts_enabled = not suppress
        self._avail16[0] = lib.VRING_AVAIL_F_NO_INTERRUPT if suppress else 0

    def read_avail_event(self) -> int:
        return int(self._used16[self._avail_event_i])

    def read_used_flags(self) -> int:
        return int(self._used16[0])

    def read_used_idx(self) -> int:
        return int(self._used16[1])

    # -- hostile helpers: write anything ------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int) -> None:
        """Write descriptor ``i`` of the table verbatim (values wrap to the field widths)."""
        if not 0 <= i < self.size:
            raise ValueError(f"descriptor {i} is outside the table of {self.size}")
        d = self._desc[i]
        d.addr = addr & 0xFFFF_FFFF_FFFF_FFFF
        d.len = length & 0xFFFF_FFFF
        d.flags = flags & 0xFFFF
        d.next = next & 0xFFFF

    def write_indirect(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Write ``(addr, len, flags, next)`` entries as an indirect table at ``gpa``."""
        view = self._view(gpa, len(descs) * _DESC_SIZE)
        buf = ffi.from_buffer(view)
        table: Any = ffi.cast("struct vring_desc *", buf)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            table[i].addr = addr & 0xFFFF_FFFF_FFFF_FFFF
            table[i].len = length & 0xFFFF_FFFF
            table[i].flags = flags & 0xFFFF
            table[i].next = nxt & 0xFFFF
        ffi.release(buf)
        view.release()

    def set_avail_idx(self, value: int) -> None:
        """Store any avail idx (published immediately)."""
        self.avail_idx = self.published_idx = value & 0xFFFF
        self._avail16[1] = self.avail_idx

    def set_avail_ring(self, slot: int, head: int) -> None:
        """Store any head in avail ring slot ``slot`` (0..size-1)."""
        if not 0 <= slot < self.size:
            raise ValueError(f"avail slot {slot} is outside the ring of {self.size}")
        self._avail16[2 + slot] = head & 0xFFFF

    def set_avail_flags(self, flags: int) -> None:
        self._avail16[0] = flags & 0xFFFF

    def post_head(self, head: int) -> None:
        """Put ``head`` in the next avail slot and publish, with no bookkeeping at all."""
        self._avail16[2 + (self.avail_idx & self._mask)] = head & 0xFFFF
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.publish()

    def make_loop(self, buf: Segment, length: int = 2, writable: bool = False) -> int:
        """Descriptors 0..length-1 chained in a cycle; posts and publishes head 0."""
        fl = F_NEXT | (F_WRITE if writable else 0)
        for i in range(length):
            self.write_desc(i, buf[0], buf[1], fl, (i + 1) % length)
        self.post_head(0)
        return 0

    def make_nested_indirect(self, buf: Segment, table_gpa: int) -> int:
        """Head 0 points to an indirect table whose first entry is itself INDIRECT."""
        self.write_indirect(table_gpa, [(table_gpa, _DESC_SIZE, F_INDIRECT, 0)])
        self.write_desc(0, table_gpa, _DESC_SIZE, F_INDIRECT, 0)
        self.post_head(0)
        return 0

    def close(self) -> None:
        """Release the views onto guest memory."""
        release_views(ffi, self._bufs, self._views)
