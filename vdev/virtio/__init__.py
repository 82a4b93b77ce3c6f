"""Guest memory and virtqueues: the device side (validation, split and packed behind one
interface, ``queue.py``) and mock driver sides (``driver.py``, ``packed_driver.py``)."""

from vdev.virtio.chain import Chain, ChainViolation, walk_chain
from vdev.virtio.driver import DriverError, DriverQueue, RingFull
from vdev.virtio.memory import GuestMemory, MemoryFault
from vdev.virtio.queue import QueueFormat, RingArea, VirtQueue, VirtqueueStats, queue_format
from vdev.virtio.split import SplitQueue, ring_sizes, vring_need_event

__all__ = [
    "Chain",
    "ChainViolation",
    "DriverError",
    "DriverQueue",
    "GuestMemory",
    "MemoryFault",
    "QueueFormat",
    "RingArea",
    "RingFull",
    "SplitQueue",
    "VirtQueue",
    "VirtqueueStats",
    "queue_format",
    "ring_sizes",
    "vring_need_event",
    "walk_chain",
]
