"""The mock driver's own checks and limits (2.7.14 "Receiving Used Buffers From The Device")."""

from __future__ import annotations

import pytest
from virtio_helpers import DATA_HIGH, DATA_LOW, FEATURES, layout, make_pair

from vdev.abi import ffi, lib
from vdev.virtio.driver import DriverError, DriverQueue, RingFull
from vdev.virtio.memory import GuestMemory


def _used_elem(mem: GuestMemory, index: int, size: int, slot: int, uid: int, ulen: int) -> None:
    lay = layout(index, size)
    view = mem.gpa_view(lay.used + 4 + 8 * slot, 8)
    e = ffi.cast("struct vring_used_elem *", ffi.from_buffer(view))
    e.id = uid
    e.len = ulen


def _used_idx(mem: GuestMemory, index: int, size: int, value: int) -> None:
    lay = layout(index, size)
    mem.write(lay.used + 2, value.to_bytes(2, "little"))


def test_driver_rejects_bad_used(mem: GuestMemory) -> None:
    _, drv = make_pair(mem, 0, 8)
    drv.add_chain([], [(DATA_LOW, 10)])
    drv.publish()
    _used_idx(mem, 0, 8, 9)
    with pytest.raises(DriverError, match="ahead"):
        drv.get_used()
    _used_elem(mem, 0, 8, 0, 5, 0)
    _used_idx(mem, 0, 8, 1)
    with pytest.raises(DriverError, match="not in flight"):
        drv.get_used()
    _, drv = make_pair(mem, 2, 8)
    head = drv.add_chain([], [(DATA_LOW, 10)])
    drv.publish()
    _used_elem(mem, 2, 8, 0, head, 11)
    _used_idx(mem, 2, 8, 1)
    with pytest.raises(DriverError, match="exceeds the writable length 10"):
        drv.get_used()


def test_driver_limits(mem: GuestMemory) -> None:
    _, drv = make_pair(mem, 1, 4)
    with pytest.raises(ValueError):
        drv.add_chain([])
    with pytest.raises(RingFull):
        drv.add_chain([(DATA_LOW, 1)] * 5)
    with pytest.raises(RingFull, match="indirect slot"):
        drv.add_chain([(DATA_LOW, 1)] * 10_000, indirect=True)
    with pytest.raises(ValueError, match="longer than the queue size 4"):
        drv.add_chain([(DATA_LOW, 1)] * 5, indirect=True)  # fits the slot; 2.7.5.3.1 forbids
    with pytest.raises(ValueError):
        drv.write_desc(4, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        drv.set_avail_ring(4, 0)
    for _ in range(4):
        drv.add_chain([(DATA_LOW, 1)], indirect=True)  # one descriptor each
    with pytest.raises(RingFull):
        drv.add_chain([(DATA_LOW, 1)], indirect=True)


def test_driver_without_indirect_area_or_feature(mem: GuestMemory) -> None:
    lay = layout(6, 8)
    drv = DriverQueue(mem, 8, lay.desc, lay.avail, lay.used, features=FEATURES)
    with pytest.raises(DriverError, match="indirect_area"):
        drv.add_chain([(DATA_LOW, 1)], indirect=True)
    no_ind = FEATURES & ~(1 << lib.VIRTIO_RING_F_INDIRECT_DESC)
    drv2 = DriverQueue(mem.gpa_view, 8, lay.desc, lay.avail, lay.used, features=no_ind)
    with pytest.raises(ValueError, match="not negotiated"):
        drv2.add_chain([(DATA_LOW, 1)], indirect=True)


def test_longest_legal_chains(mem: GuestMemory) -> None:
    """Exactly ``size`` descriptors, direct or indirect, are neither a loop nor too long
    (2.7.5.3.1 bounds an indirect chain by the queue size too: tests/virtio/
    test_chain_bounds.py has size + 1 refused)."""
    dev, drv = make_pair(mem, 1, 16)
    head = drv.add_chain([(DATA_HIGH + i, 1) for i in range(16)])
    drv.publish()
    c = dev.pop()
    assert c is not None and c.head == head and c.read_len == 16 and c.desc_count == 16
    dev.push(head, 0)
    dev.flush_used()
    drv.get_used()
    n = 16
    assert drv.indirect_slot // 16 >= n
    head = drv.add_chain([(DATA_HIGH, 1)] * n, indirect=True)
    drv.publish()
    c = dev.pop()
    assert c is not None and c.read_len == n and c.desc_count == n + 1
