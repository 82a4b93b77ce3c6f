"""Shared set-up for the virtqueue tests: QEMU-like guest memory over one memfd.

Two regions like a PC guest below 4 GiB: gpa 0..0xa0000 and gpa 0xc0000..0x400000 (the VGA
hole between them is *not* guest memory), each at a frontend virtual address different from
its gpa, so mixing up uva and gpa translation is caught.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vdev.abi import lib
from vdev.net.nic import net_queue_direction
from vdev.skywalk.errors import SyncKind
from vdev.virtio.driver import DriverQueue
from vdev.virtio.memory import GuestMemory
from vdev.virtio.split import SplitQueue, ring_sizes

LOW_SIZE = 0xA0000
HIGH_GPA = 0xC0000
HIGH_SIZE = 0x340000
MEM_END = HIGH_GPA + HIGH_SIZE  # 0x400000
LOW_UVA = 0x7F00_0000_0000
HIGH_UVA = 0x7F00_1000_0000
FD_SIZE = LOW_SIZE + HIGH_SIZE

# Rings live in the high region, one 64 KiB slot per queue index (enough for size 1024).
RING_BASE = 0x100000
RING_SLOT = 0x10000
# Indirect tables: 0x300000..0x380000; data buffers: low region 0x1000.. and 0x380000..
INDIRECT_BASE = 0x300000
INDIRECT_SIZE = 0x80000
DATA_LOW = 0x1000
DATA_HIGH = 0x380000

FEATURES = (
    (1 << lib.VIRTIO_F_VERSION_1)
    | (1 << lib.VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << lib.VIRTIO_RING_F_EVENT_IDX)
)
NO_EVENT = FEATURES & ~(1 << lib.VIRTIO_RING_F_EVENT_IDX)


def make_memory(fd: int | None = None) -> tuple[GuestMemory, int]:
    if fd is None:
        fd = os.memfd_create("vdev-test-guest")
        os.ftruncate(fd, FD_SIZE)
    mem = GuestMemory()
    mem.add_region(0, LOW_SIZE, LOW_UVA, 0, fd)
    mem.add_region(HIGH_GPA, HIGH_SIZE, HIGH_UVA, LOW_SIZE, fd)
    return mem, fd


def gpa_to_uva(gpa: int) -> int:
    if gpa < LOW_SIZE:
        return LOW_UVA + gpa
    assert HIGH_GPA <= gpa < MEM_END
    return HIGH_UVA + gpa - HIGH_GPA


@dataclass
class Layout:
    desc: int
    avail: int
    used: int


def layout(index: int, size: int) -> Layout:
    desc_len, avail_len, _ = ring_sizes(size)
    base = RING_BASE + index * RING_SLOT
    avail = base + desc_len
    used = (avail + avail_len + 3) & ~3
    return Layout(base, avail, used)


def make_pair(
    mem: GuestMemory,
    index: int = 1,
    size: int = 8,
    *,
    features: int = FEATURES,
    start_idx: int = 0,
    sync: SyncKind | None = None,
) -> tuple[SplitQueue, DriverQueue]:
    """A driver ring set up in guest memory and the device queue reading it through uva."""
    lay = layout(index, size)
    per_queue = INDIRECT_SIZE // 8
    drv = DriverQueue(
        mem,
        size,
        lay.desc,
        lay.avail,
        lay.used,
        features=features,
        start_idx=start_idx,
        indirect_area=(INDIRECT_BASE + (index % 8) * per_queue, per_queue),
    )
    dev = device_queue(mem, index, size, features=features, base=start_idx, sync=sync)
    return dev, drv


def device_queue(
    mem: GuestMemory,
    index: int,
    size: int,
    *,
    features: int = FEATURES,
    base: int = 0,
    sync: SyncKind | None = None,
) -> SplitQueue:
    """The device queue over the ring ``layout(index, size)`` (through uva), starting at
    ``base`` (SET_VRING_BASE), numbered like virtio-net unless ``sync`` says otherwise."""
    lay = layout(index, size)
    return SplitQueue(
        mem,
        index,
        size,
        gpa_to_uva(lay.desc),
        gpa_to_uva(lay.avail),
        gpa_to_uva(lay.used),
        features=features,
        last_avail_idx=base,
        sync=sync if sync is not None else net_queue_direction(index),
    )
