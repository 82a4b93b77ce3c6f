"""The shared inflight buffer of one vhost-user connection (GET_INFLIGHT_FD/SET_INFLIGHT_FD).

vhost-user.rst "Inflight I/O tracking": the back-end allocates the buffer when the front-end
asks (GET_INFLIGHT_FD, with the number of queues and their size), hands its fd over, and the
front-end gives the same fd back with SET_INFLIGHT_FD on every (re)connection, so a
restarted back-end finds what its predecessor had in flight.  This module owns the mapping
and its bounds; :mod:`vdev.virtio.inflight` interprets one queue region.

Limits (a front-end must not make the device allocate without bound, nor map beyond the
file): ``num_queues`` is at most the device's queue count, ``queue_size`` at most 32768
(2.7/2.8 "Queue Size"), so one buffer is at most 256 queues x 1 MiB; a SET_INFLIGHT_FD
``mmap_size`` must hold that many regions of :func:`queue_region_size` and fit in the fd.
"""

from __future__ import annotations

import mmap
import os
import stat

from vdev.errors import VdevError
from vdev.virtio.inflight import PackedInflight, SplitInflight, queue_region_size
from vdev.virtio.queue import MAX_QUEUE_SIZE


class InflightLimit(VdevError, ValueError):
    """A GET/SET_INFLIGHT_FD field out of range: the message names the field and the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_shape(num_queues: int, queue_size: int, max_queues: int) -> int:
    """The per-queue stride for ``num_queues`` x ``queue_size``; InflightLimit if out of range."""
    if not 1 <= num_queues <= max_queues:
        raise InflightLimit(
            "num_queues", f"num_queues {num_queues} is not in 1..{max_queues} (device queues)"
        )
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightLimit("queue_size", f"queue_size {queue_size} is not in 1..{MAX_QUEUE_SIZE}")
    return queue_region_size(queue_size)


class InflightBuffer:
    """One mapped inflight buffer: ``num_queues`` regions of ``stride`` bytes each."""

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
                 queue_size: int, max_queues: int) -> None:  # fmt: skip
        """Map ``fd`` (not kept: the mapping holds the memory).  InflightLimit names the field
        when the shape is out of range or the fd is too small for it."""
        stride = check_shape(num_queues, queue_size, max_queues)
        need = stride * num_queues
        if mmap_size < need:
            raise InflightLimit(
                "mmap_size",
                f"mmap_size {mmap_size:#x} is smaller than {num_queues} queue regions of "
                f"{stride:#x} bytes",
            )
        if mmap_size > need:
            # Only what the regions need is mapped: a larger claim allocates nothing here.
            mmap_size = need
        if mmap_offset % mmap.PAGESIZE:
            raise InflightLimit("mmap_offset", f"mmap_offset {mmap_offset:#x} is not page-aligned")
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and mmap_offset + mmap_size > st.st_size:
            raise InflightLimit(
                "mmap_size",
                f"mmap_offset {mmap_offset:#x}+{mmap_size:#x} exceeds fd size {st.st_size:#x}",
            )
        self.mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, offset=mmap_offset)
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.stride = stride
        self.size = mmap_size
        self._regions: list[tuple[memoryview, SplitInflight | PackedInflight]] = []

    @classmethod
    def allocate(
        cls, num_queues: int, queue_size: int, max_queues: int
    ) -> tuple[int, InflightBuffer]:
        """GET_INFLIGHT_FD: a fresh zeroed memfd for the shape; returns (fd, buffer).  The
        caller sends the fd and closes it."""
        stride = check_shape(num_queues, queue_size, max_queues)
        size = stride * num_queues
        fd = os.memfd_create("vdev-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)  # a new memfd reads as zeros: "uninitialized" regions
            return fd, cls(fd, size, 0, num_queues, queue_size, max_queues)
        except BaseException:
            os.close(fd)
            raise

    def region(self, index: int, size: int, packed: bool) -> SplitInflight | PackedInflight:
        """The queue region of vring ``index`` in the ring's layout (``size`` must be the
        buffer's queue_size)."""
        if index >= self.num_queues:
            raise InflightLimit(
                "num_queues", f"vring {index} has no region ({self.num_queues} queues)"
            )
        if size != self.queue_size:
            raise InflightLimit(
                "queue_size",
                f"vring {index} has num {size}, the buffer queue_size {self.queue_size}",
            )
        view = memoryview(self.mm)[index * self.stride : (index + 1) * self.stride]
        region = PackedInflight(view, size) if packed else SplitInflight(view, size)
        self._regions.append((view, region))
        return region

    def close(self) -> None:
        for view, region in self._regions:
            region.release()
            view.release()
        self._regions.clear()
        self.mm.close()


__all__ = ["InflightBuffer", "InflightLimit", "check_shape"]
