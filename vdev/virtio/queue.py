"""The device-side virtqueue type the vhost-user backend and the NIC hold: split (2.7) or
packed (2.8), chosen by VIRTIO_F_RING_PACKED.  Both classes expose the same method set."""

from __future__ import annotations

from typing import TypeAlias

from vdev.virtio.packed import F_RING_PACKED, PackedQueue
from vdev.virtio.split import SplitQueue

VirtQueue: TypeAlias = SplitQueue | PackedQueue

__all__ = ["F_RING_PACKED", "PackedQueue", "SplitQueue", "VirtQueue"]
