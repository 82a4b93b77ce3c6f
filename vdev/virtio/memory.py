"""Guest memory as the vhost-user frontend shares it: fd-backed regions mapped with mmap.

vhost-user.rst, "Memory regions description": each region carries the guest physical
address, its size, the frontend's (QEMU's) user virtual address and an offset into the fd.
Descriptor addresses are guest-physical; ring addresses from SET_VRING_ADDR are frontend
virtual addresses, so both translations are offered.  Every access is bounds-checked
against exactly one region: nothing outside the mapped memory is ever read or written,
and a range that straddles two regions is refused (the device never needs one).

A region's fd may shrink after it was mapped (a hostile or buggy frontend truncating its
memfd): every mapping is registered with :mod:`vdev.virtio.memguard`, whose SIGBUS handler
turns the fault into a count on the region and a write to ``notify_fd``; :meth:`check`
raises the named :class:`~vdev.errors.GuestMemoryFault` for the owner to disconnect.
"""

from __future__ import annotations

import mmap
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from vdev.errors import GuestMemoryFault, VdevError

from . import memguard


class MemoryFault(VdevError):
    """An address range the guest named is not inside guest memory."""


@dataclass
class MemRegion:
    """One mapped region; ``mm`` covers ``[mmap_offset, mmap_offset + size)`` of the fd."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mm: mmap.mmap | None = field(default=None, repr=False)
    _base: int = field(default=0, repr=False)  # page-aligned start of the mapping in the fd
    guard: memguard.Guarded | None = field(default=None, repr=False)

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    @property
    def uva_end(self) -> int:
        return self.uva + self.size

    def view(self, offset: int, length: int) -> memoryview:
        assert self.mm is not None
        start = self.mmap_offset - self._base + offset
        return memoryview(self.mm)[start : start + length]


_U64 = 1 << 64


class GuestMemory:
    """The set of regions currently shared by the frontend.

    ``notify_fd`` (an eventfd the owner watches, or -1) is written when a region faults."""

    def __init__(self, notify_fd: int = -1) -> None:
        self.regions: list[MemRegion] = []
        # Bumped on every change of the table, so a cache of it (fastqueue's region map)
        # can tell in one comparison that it is still current.
        self.version = 0
        self.notify_fd = notify_fd

    # -- building -----------------------------------------------------------------------

    def add_region(self, gpa: int, size: int, uva: int, mmap_offset: int, fd: int) -> MemRegion:
        """Map one region from ``fd``.  The fd is not kept: the mapping holds the memory.

        Refuses (ValueError naming the field) a zero size, an address range that wraps the
        64-bit space, and any overlap with an existing region in guest-physical or frontend
        virtual space.
        """
        for name, value in (
            ("gpa", gpa),
            ("size", size),
            ("uva", uva),
            ("mmap_offset", mmap_offset),
        ):
            if not 0 <= value < _U64:
                raise ValueError(f"memory region {name}={value:#x} is not a 64-bit value")
        if size == 0:
            raise ValueError(f"memory region at gpa {gpa:#x} has size 0")
        for name, start in (("gpa", gpa), ("uva", uva), ("mmap_offset", mmap_offset)):
            if start + size > _U64:
                raise ValueError(f"memory region {name} {start:#x}+{size:#x} overflows 64 bits")
        for r in self.regions:
            if gpa < r.gpa_end and r.gpa < gpa + size:
                raise ValueError(
                    f"memory region gpa {gpa:#x}+{size:#x} overlaps gpa {r.gpa:#x}+{r.size:#x}"
                )
            if uva < r.uva_end and r.uva < uva + size:
                raise ValueError(
                    f"memory region uva {uva:#x}+{size:#x} overlaps uva {r.uva:#x}+{r.size:#x}"
                )
        base = mmap_offset - (mmap_offset % mmap.ALLOCATIONGRANULARITY)
        try:
            fd_size = os.fstat(fd).st_size
        except OSError as exc:
            raise ValueError(f"memory region fd {fd} is not usable: {exc}") from exc
        # Always enforce the fd's size: mapping past the end of a memfd (including an empty
        # one) would turn the first access into SIGBUS, which Python cannot catch.
        if mmap_offset + size > fd_size:
            raise ValueError(
                f"memory region mmap_offset {mmap_offset:#x}+{size:#x} exceeds fd size {fd_size:#x}"
            )
        try:
            mm = mmap.mmap(fd, mmap_offset - base + size, mmap.MAP_SHARED, offset=base)
        except (OSError, ValueError, OverflowError) as exc:
            raise ValueError(f"memory region gpa {gpa:#x}: mmap failed: {exc}") from exc
        try:
            guard = memguard.guard(mm, self.notify_fd)
        except RuntimeError as exc:
            mm.close()
            raise ValueError(f"memory region gpa {gpa:#x}: {exc}") from exc
        region = MemRegion(gpa, size, uva, mmap_offset, mm, base, guard)
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        self.version += 1
        return region

    def remove_region(self, gpa: int, size: int, uva: int) -> bool:
        """Unmap the region that matches exactly; return whether one did."""
        for r in self.regions:
            if (r.gpa, r.size, r.uva) == (gpa, size, uva):
                self.regions.remove(r)
                self.version += 1
                _close_map(r)
                return True
        return False

    def close(self) -> None:
        """Unmap everything (views handed out earlier must have been released)."""
        for r in self.regions:
            _close_map(r)
        self.regions.clear()
        self.version += 1

    # -- translation --------------------------------------------------------------------

    def _find(self, addr: int, length: int, kind: str) -> tuple[MemRegion, int]:
        if length < 0 or addr < 0:
            raise MemoryFault(f"{kind} {addr:#x} length {length} is negative")
        for r in self.regions:
            start = r.gpa if kind == "gpa" else r.uva
            if start <= addr < start + r.size or (length == 0 and addr == start + r.size):
                if addr + length > start + r.size:
                    raise MemoryFault(
                        f"{kind} {addr:#x}+{length:#x} runs past the end of its region "
                        f"({start:#x}+{r.size:#x})"
                    )
                return r, addr - start
        raise MemoryFault(f"{kind} {addr:#x}+{length:#x} is outside guest memory")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical ``[gpa, gpa+length)``, or MemoryFault."""
        region, offset = self._find(gpa, length, "gpa")
        return region.view(offset, length)

    def uva_view(self, uva: int, length: int) -> memoryview:
        """A writable view of frontend-virtual ``[uva, uva+length)``, or MemoryFault."""
        region, offset = self._find(uva, length, "uva")
        return region.view(offset, length)

    def uva_to_gpa(self, uva: int) -> int:
        region, offset = self._find(uva, 0, "uva")
        return region.gpa + offset

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.gpa_view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.gpa_view(gpa, len(data))[:] = data

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- faults -------------------------------------------------------------------------

    def fault(self) -> GuestMemoryFault | None:
        """The first region that took a SIGBUS since it was mapped, as the error to report
        (None while all are intact)."""
        for r in self.regions:
            if r.guard is not None and r.guard.faults:
                offset = r.guard.fault_addr - r.guard.address - (r.mmap_offset - r._base)
                return GuestMemoryFault(r.gpa, r.size, offset, r.guard.faults)
        return None

    def check(self) -> None:
        """Raise :class:`GuestMemoryFault` if any region faulted (a defined point: after a
        burst, before trusting what was read)."""
        err = self.fault()
        if err is not None:
            raise err


def _close_map(region: MemRegion) -> None:
    guard, region.guard = region.guard, None
    if region.mm is not None:
        try:
            region.mm.close()
        except BufferError:
            # A view is still alive (e.g. a queue not yet stopped); the mapping is freed
            # when the last view goes away, and stays guarded until then.
            if guard is not None:
                weakref.finalize(region.mm, guard.unregister)
                guard = None
        region.mm = None
    if guard is not None:
        guard.unregister()  # the range is unmapped: another mapping may take it


def release_views(ffi: Any, bufs: list[Any], views: list[memoryview]) -> None:
    """Release cffi buffers over guest memory, then the views under them, and empty both
    lists: what a ring or driver does before the mapping may go (remap, stop, close)."""
    for b in bufs:
        ffi.release(b)
    for v in views:
        v.release()
    bufs.clear()
    views.clear()
