"""PackedQueue's SplitQueue-compatible surface the NIC and the fault engine use: avail_count,
rewind (mergeable RX), push_raw / patch_last_used / _inflight (ring faults), the vhost-user
base encoding, and the device event position that makes a waiting RX queue get its kick."""

from __future__ import annotations

import pytest
from test_virtio_packed import make_packed
from virtio_helpers import DATA_HIGH, DATA_LOW

from vdev.skywalk.errors import SyncKind
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import F_NEXT, RING_EVENT_FLAGS_DESC, packed_need_event


def test_avail_count_counts_complete_chains_across_the_wrap(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 9, size=5, sync=SyncKind.EVENT)
    assert dev.avail_count() == 0
    a = drv.add_chain([(DATA_LOW, 8), (DATA_LOW, 8)])  # 2 descriptors
    drv.add_chain([(DATA_LOW, 8)])
    drv.publish()
    assert dev.avail_count() == 2
    c = dev.pop()
    assert c is not None and c.head == a
    assert dev.avail_count() == 1
    dev.push(a, 0)
    dev.flush_used()
    drv.get_used()
    drv.add_chain([(DATA_LOW, 8), (DATA_LOW, 8)])  # wraps: entries 3, 4
    drv.add_chain([(DATA_LOW, 8)])  # entry 0, wrap counter 0
    drv.publish()
    assert dev.avail_count() == 3
    # A chain whose head is available but whose tail is not yet is not counted.
    dev2, drv2 = make_packed(mem, 10, size=4, sync=SyncKind.EVENT)
    drv2.write_desc(0, DATA_LOW, 8, 0, drv2.avail_flags() | F_NEXT)
    assert dev2.avail_count() == 0
    drv2.write_desc(1, DATA_LOW, 8, 0, drv2.avail_flags())
    assert dev2.avail_count() == 1


def test_rewind_gives_back_buffers_with_their_wrap_counter(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 8, size=4)
    ids = [drv.add_chain([], [(DATA_HIGH + i * 256, 100)]) for i in range(3)]
    drv.publish()
    for _ in ids:  # move to index 3
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
    dev.flush_used()
    drv.get_used()
    ids = [drv.add_chain([], [(DATA_HIGH + i * 256, 100)]) for i in range(3)]  # 3, 0, 1
    drv.publish()
    token = dev.last_avail_idx
    assert token == 3 | 1 << 15
    popped = [dev.pop() for _ in range(3)]
    assert dev.last_avail_idx == 2  # index 2, wrap counter 0
    chains_before = dev.stats.chains
    dev.rewind(token)
    assert dev.last_avail_idx == token and dev.stats.chains == chains_before - 3
    again = [dev.pop() for _ in range(3)]
    assert [c.head for c in again if c] == [c.head for c in popped if c] == ids
    dev.push(ids[0], 1)
    with pytest.raises(ValueError, match="already pushed"):
        dev.rewind(token)
    with pytest.raises(ValueError, match="cannot rewind"):
        dev.rewind(0x7FFF)


def test_push_raw_and_patch_last_used(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 11, size=4, sync=SyncKind.EVENT)
    ids = [drv.add_chain([], [(DATA_HIGH + i * 256, 100)]) for i in range(2)]
    drv.publish()
    c = dev.pop()
    assert c is not None
    assert dev._inflight[c.head] == 101 and not dev._inflight[ids[1]]
    dev.push(c.head, 10)
    dev.patch_last_used(4000)  # a lying length
    dev.push_raw(0x1_0003, 7)  # an id the driver never posted (truncated to 16 bits)
    dev.flush_used()
    with pytest.raises(RuntimeError, match="len 4000"):
        drv.get_used()


def test_vhost_base_and_fresh_ring(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 12, size=3, sync=SyncKind.EVENT)
    assert dev.vhost_base == 0x8000 | 0x8000 << 16
    for _ in range(4):
        bid = drv.add_chain([(DATA_LOW, 1)])
        drv.publish()
        c = dev.pop()
        assert c is not None and c.head == bid
        dev.push(bid, 0)
        dev.flush_used()
        drv.get_used()
    assert dev.vhost_base == 1 | 1 << 16  # index 1, both wrap counters 0
    assert dev.close() == 1


def test_enable_notifications_names_the_position_past_posted_buffers(mem: GuestMemory) -> None:
    """2.8.10 with EVENT_IDX: a queue that needs more buffers than were posted must ask for
    a kick on the *next* buffer, not at its read position the driver has already passed."""
    dev, drv = make_packed(mem, 13, size=8, sync=SyncKind.EVENT)
    for i in range(3):
        drv.add_chain([], [(DATA_HIGH + i * 256, 100)])
    drv.publish()
    assert drv.kick_needed()
    token = dev.last_avail_idx
    assert dev.pop() is not None and dev.pop() is not None and dev.pop() is not None
    dev.rewind(token)  # not enough room for a big frame: give them back and wait
    assert dev.enable_notifications(True)  # they are still there
    off_wrap = int(dev._device_ev.off_wrap)
    assert int(dev._device_ev.flags) == RING_EVENT_FLAGS_DESC
    assert off_wrap == 3 | 1 << 15
    drv.add_chain([], [(DATA_HIGH + 0x800, 100)])
    drv.publish()
    assert drv.kick_needed()  # the driver kicks for the 4th buffer
    assert packed_need_event(off_wrap, 4, 3, 8)


# 2.8.1: VIRTQ_DESC_F_AVAIL is bit 7, VIRTQ_DESC_F_USED bit 15; a descriptor is available
# when AVAIL equals the driver's wrap counter and USED does not.
SPEC_F_AVAIL, SPEC_F_USED = 1 << 7, 1 << 15


def test_avail_count_never_exceeds_the_ring_size(mem: GuestMemory) -> None:
    """A hostile driver that fills the ring and then re-marks every descriptor available for
    the next lap (before the device took any) cannot make avail_count report more chains
    than the ring holds: at most Queue Size descriptors are outstanding (2.8), so a full
    scan stops after one lap.  Kills the scan-length arithmetic made a true division (the
    resumed scan then runs a second lap; mutmut's sample of packed.py)."""
    size = 4
    dev, drv = make_packed(mem, 11, size=size, sync=SyncKind.EVENT)
    for i in range(size):
        drv.write_desc(i, DATA_LOW, 8, i, SPEC_F_AVAIL)  # wrap counter 1: AVAIL=1, USED=0
    assert dev.avail_count() == size
    for i in range(size):
        drv.write_desc(i, DATA_LOW, 8, i, SPEC_F_USED)  # what wrap counter 0 would post
    assert dev.avail_count() == size


def test_rewind_to_a_position_with_wrap_counter_zero(mem: GuestMemory) -> None:
    """After one lap the driver's wrap counter is 0 (2.8.1): rewinding to such a position
    restores index AND wrap counter 0, and the same buffers are popped again."""
    dev, drv = make_packed(mem, 8, size=4)
    for _ in range(4):  # one full lap
        drv.add_chain([], [(DATA_HIGH, 100)])
        drv.publish()
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
        dev.flush_used()
        drv.get_used()
    token = dev.last_avail_idx
    assert token == 0  # index 0, wrap counter 0 (bit 15 clear)
    ids = [drv.add_chain([], [(DATA_HIGH + i * 256, 100)]) for i in range(2)]
    drv.publish()
    first = [dev.pop() for _ in ids]
    assert [c.head for c in first if c is not None] == ids
    dev.rewind(token)
    assert dev.last_avail_idx == 0
    again = [dev.pop() for _ in ids]
    assert [c.head for c in again if c is not None] == ids


def test_packed_push_names_the_writable_length(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 8, size=4)
    head = drv.add_chain([], [(DATA_HIGH, 100)])
    drv.publish()
    assert dev.pop() is not None
    with pytest.raises(ValueError, match=f"virtqueue 8: id {head}: written 101 exceeds 100"):
        dev.push(head, 101)
    dev.push(head, 100)
