"""Guest memory and split virtqueues: device side (validation) and a mock driver side."""

from vdev.virtio.chain import Chain, ChainViolation, walk_chain
from vdev.virtio.driver import DriverError, DriverQueue, RingFull
from vdev.virtio.memory import GuestMemory, MemoryFault
from vdev.virtio.split import QueueStats, SplitQueue, ring_sizes, vring_need_event

__all__ = [
    "Chain",
    "ChainViolation",
    "DriverError",
    "DriverQueue",
    "GuestMemory",
    "MemoryFault",
    "QueueStats",
    "RingFull",
    "SplitQueue",
    "ring_sizes",
    "vring_need_event",
    "walk_chain",
]
