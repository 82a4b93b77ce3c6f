"""Split ring resume from the inflight region, rewind, and the lying-device pushes, checked
on one SplitQueue across the 16-bit wrap.

Oracles: vhost-user.rst "Inflight I/O tracking" ("When reconnecting"): the back-end
resubmits the descriptors the region marks in flight, oldest (lowest counter) first, taking
them from the region, not from the avail ring; the avail ring goes on after them
(libvhost-user: ``last_avail_idx = used_idx + inuse``).  2.7.8: a used element is
``(id, len)`` at ``used ring[used idx mod size]`` and the used idx counts the elements
published.  The avail slots of the in-flight positions are scribbled over before the
resume, so a resubmission read from the ring instead of the region shows.

Mutations killed (mutmut, ``vdev.virtio.split``): ``attach_inflight`` keying the
resubmissions wrong or dropping them, its warning's condition and text;
``_drop_resubmitted`` forgetting positions not yet published (seen on a rewind that pops
them again) or never forgetting them (seen a lap of 2^16 positions later); ``rewind``
refusing a rewind of exactly the queue size, not telling the region, counting chains up;
``push_raw`` and ``patch_last_used`` writing the wrong slot, id, count or length;
``avail_heads`` reading other words than the avail slots, ``enable_notifications``
defaulting to disable or disabling answering True, ``__repr__`` losing the live/defunct
state, ``push`` taking head == size or misstating the writable length, ``ring_state``'s
keys and values, ``close`` keeping a reference to the region, the in-flight-head
refusal's words, a base of 2^16 accepted or refused without words, the resume record
of a plain start, base 0 over a used idx of 1 not adopted, NOTIFY_ON_EMPTY and
ANY_LAYOUT read from other bits than theirs, the ring areas' names in a misplaced
ring's refusal.
"""

from __future__ import annotations

import logging

import pytest
from virtio_helpers import (
    DATA_HIGH,
    FEATURES,
    NO_EVENT,
    device_queue,
    gpa_to_uva,
    layout,
    make_pair,
)

from vdev.errors import SyncError, SyncKind
from vdev.virtio.driver import DriverQueue
from vdev.virtio.inflight import RingResume, SplitInflight, queue_region_size
from vdev.virtio.memory import GuestMemory
from vdev.virtio.split import F_ANY_LAYOUT, F_NOTIFY_ON_EMPTY, VRING_USED_F_NO_NOTIFY, SplitQueue

SIZE = 8
START = 0xFFFE  # the first chain at avail position 0xFFFE: positions 0xFFFF, 0, 1 follow


def post(drv: DriverQueue, n: int) -> list[int]:
    heads = [drv.add_chain([(DATA_HIGH + 64 * i, 64)]) for i in range(n)]
    drv.publish()
    return heads


def crashed(
    mem: GuestMemory, start: int = START
) -> tuple[DriverQueue, bytearray, list[int], list[int]]:
    """A first device takes 4 chains from ``start`` on, publishes the first, and "dies".
    Returns the driver, the region's buffer, the heads posted, and the in-flight ones."""
    dev, drv = make_pair(mem, 1, SIZE, start_idx=start)
    buf = bytearray(queue_region_size(SIZE))
    dev.attach_inflight(SplitInflight(memoryview(buf), SIZE))
    heads = post(drv, 4)
    popped = [dev.pop() for _ in range(4)]
    assert [c.head for c in popped if c is not None] == heads
    dev.push(heads[0], 0)
    dev.flush_used()
    return drv, buf, heads, heads[1:]


def resumed(mem: GuestMemory, buf: bytearray) -> SplitQueue:
    """The restarted device over the same ring and region (SET_VRING_BASE said 0)."""
    dev = device_queue(mem, 1, SIZE, base=0)
    dev.attach_inflight(SplitInflight(memoryview(buf), SIZE))
    return dev


def scribble(drv: DriverQueue, positions: list[int], head: int) -> None:
    for p in positions:
        drv._avail16[2 + (p & (SIZE - 1))] = head  # a driver that rewrote its avail slots


def test_resubmissions_come_from_the_region_oldest_first_across_the_wrap(
    mem: GuestMemory,
) -> None:
    drv, buf, heads, in_flight = crashed(mem)
    scribble(drv, [0xFFFF, 0, 1], heads[0])  # heads[0] is used, not in flight
    dev = resumed(mem, buf)
    assert (dev.resume.used_idx, dev.resume.resumed_at, dev.resume.resubmitted) == (0xFFFF, 2, 3)
    got = [dev.pop() for _ in range(3)]
    assert [c.head for c in got if c is not None] == in_flight
    assert dev.pop() is None  # the avail idx is 2: nothing after the resubmissions
    new = post(drv, 1)
    c = dev.pop()
    assert c is not None and c.head == new[0] and dev.last_avail_idx == 3


@pytest.mark.parametrize("start", [START, 4])
def test_a_rewind_after_a_partial_publish_pops_the_region_heads_again(
    mem: GuestMemory, start: int
) -> None:
    drv, buf, heads, in_flight = crashed(mem, start)
    positions = [(start + i) & 0xFFFF for i in (1, 2, 3)]
    scribble(drv, positions, heads[0])
    dev = resumed(mem, buf)
    first = [dev.pop() for _ in range(3)]
    assert [c.head for c in first if c is not None] == in_flight
    dev.push(in_flight[0], 0)
    dev.flush_used()  # publishes the first position only: the others are still resubmissions
    dev.rewind(positions[1])
    again = [dev.pop() for _ in range(2)]
    assert [c.head for c in again if c is not None] == in_flight[1:]


def test_published_resubmissions_are_forgotten_a_lap_later(mem: GuestMemory) -> None:
    """After the resubmitted chains are published, positions 0xFFFF, 0, 1 of the next lap
    (2^16 positions on) are the driver's new chains, not the old heads."""
    drv, buf, _heads, _in_flight = crashed(mem)
    dev = resumed(mem, buf)
    for c in [dev.pop() for _ in range(3)]:
        assert c is not None
        dev.push(c.head, 0)
    dev.flush_used()
    drv.get_used()
    pos = 2
    while pos != 0xFFFF:  # round to the same positions, a few chains at a time
        n = min(SIZE, (0xFFFF - pos) & 0xFFFF)
        post(drv, n)
        for _ in range(n):
            c = dev.pop()
            assert c is not None
            dev.push(c.head, 0)
        dev.flush_used()
        drv.get_used()
        pos = (pos + n) & 0xFFFF
    scribble(drv, [0xFFFF, 0, 1], 7)
    new = post(drv, 3)
    got = [dev.pop() for _ in range(3)]
    assert [c.head for c in got if c is not None] == new


def test_the_resume_warning_says_when_the_region_decided(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    _drv, buf, _heads, _in_flight = crashed(mem)
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        resumed(mem, buf)
    assert caplog.records[-1].getMessage() == (
        "virtqueue 1: inflight region: base 0, used idx 65535, 3 in flight resubmitted"
    )


@pytest.mark.parametrize(("base", "warned"), [(5, False), (0, True)])
def test_a_region_with_nothing_in_flight_warns_only_if_the_base_was_wrong(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture, base: int, warned: bool
) -> None:
    make_pair(mem, 1, SIZE, start_idx=5)  # a ring at avail and used idx 5
    buf = bytearray(queue_region_size(SIZE))
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        again = device_queue(mem, 1, SIZE, base=base)
        caplog.clear()
        again.attach_inflight(SplitInflight(memoryview(buf), SIZE))
    assert ("inflight region" in caplog.text) is warned


def test_a_rewind_of_the_whole_queue_is_allowed_and_told_to_the_region(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    buf = bytearray(queue_region_size(SIZE))
    dev.attach_inflight(SplitInflight(memoryview(buf), SIZE))
    heads = post(drv, SIZE)
    assert [c.head for c in [dev.pop() for _ in range(SIZE)] if c is not None] == heads
    assert dev.stats.chains == SIZE
    dev.rewind(0)
    assert dev.stats.chains == 0 and dev.in_flight == 0
    # The region agrees: a device restarted now has nothing to resubmit.
    assert SplitInflight(memoryview(buf), SIZE).recover(0) == []
    assert [c.head for c in [dev.pop() for _ in range(SIZE)] if c is not None] == heads
    assert dev.stats.chains == SIZE


def test_raw_pushes_fill_consecutive_used_slots_with_the_values_given(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE, start_idx=START)
    used = drv._used_elems  # the raw used ring, as a lying device leaves it
    dev.push_raw(0x1_0000_0003, 0x1_0000_0040)  # truncated to the 32-bit fields
    dev.push_raw(5, 17)
    dev.patch_last_used(0x2_0000_0011)
    dev.flush_used()
    assert drv.read_used_idx() == 0
    slots = [START & (SIZE - 1), (START + 1) & (SIZE - 1)]
    assert [(int(used[s].id), int(used[s].len)) for s in slots] == [(3, 0x40), (5, 0x11)]


def test_avail_heads_are_the_heads_in_every_avail_slot(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE, start_idx=3)
    heads = post(drv, SIZE)
    assert sorted(heads) == list(range(SIZE))
    scribble(drv, [3], heads[1])  # heads[0]'s slot now names heads[1] too
    assert dev.avail_heads() == set(range(SIZE)) - {heads[0]}


def test_enable_notifications_enables_by_default(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE, features=NO_EVENT)
    dev.enable_notifications(False)
    assert drv.read_used_flags() == VRING_USED_F_NO_NOTIFY
    assert dev.enable_notifications() is False  # nothing posted
    assert drv.read_used_flags() == 0


def test_with_event_idx_enabling_asks_for_a_kick_after_the_posted_chains(
    mem: GuestMemory,
) -> None:
    """2.7.10: avail_event is where the driver kicks; the device sets it to the driver's
    avail idx, so the next chain after those already posted brings a kick."""
    dev, drv = make_pair(mem, 1, SIZE, start_idx=0x1234)
    post(drv, 3)
    assert dev.enable_notifications() is True  # three posted meanwhile
    assert int(drv._used16[drv._avail_event_i]) == 0x1237


def test_repr_says_live_or_the_kill_reason(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    assert repr(dev).endswith("last_avail_idx=0, used_idx=0, live)")
    drv._avail16[1] = SIZE + 1  # more chains than the ring holds: HEAD_OOB
    with pytest.raises(SyncError):
        dev.pop()
    assert repr(dev).endswith("used_idx=0, defunct=HEAD_OOB)")


def test_disabling_never_reports_posted_chains(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    post(drv, 2)
    assert dev.enable_notifications(False) is False


def test_push_refuses_a_head_of_queue_size_and_states_the_writable_length(
    mem: GuestMemory,
) -> None:
    dev, drv = make_pair(mem, 0, SIZE)  # queue 0: RX, device-writable chains
    head = drv.add_chain([], [(DATA_HIGH, 4)])
    drv.publish()
    assert dev.pop() is not None
    with pytest.raises(ValueError, match=f"head {SIZE} is not in flight"):
        dev.push(SIZE, 0)
    with pytest.raises(ValueError) as info:
        dev.push(head, 5)
    assert str(info.value).endswith(f"head {head}: written 5 exceeds the chain's writable length 4")
    dev.push(head, 4)


def test_ring_state_reports_device_and_guest_indices(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE, start_idx=0x10)
    post(drv, 3)
    assert dev.pop() is not None
    drv._avail16[drv._used_event_i] = 0x11
    dev.enable_notifications()
    assert dev.ring_state() == {
        "format": "split",
        "size": SIZE,
        "last_avail_idx": 0x11,
        "used_idx": 0x10,
        "pending_used": 0,
        "in_flight": 1,
        "signalled_used": None,
        "event_idx": True,
        "guest": {
            "avail_idx": 0x13,
            "avail_flags": 0,
            "used_idx": 0x10,
            "used_flags": 0,
            "used_event": 0x11,
            "avail_event": 0x13,
        },
        "avail_pending": 2,
    }
    dev.push(dev._popped[0x10 % SIZE], 0)
    dev.flush_used()
    assert dev.should_notify() is True  # the first decision always notifies (2.7.10)
    state = dev.ring_state()
    assert (state["signalled_used"], state["used_idx"], state["in_flight"]) == (0x11, 0x11, 0)
    drv._avail16[1] = 0x10 + 3 + SIZE + 1  # HEAD_OOB: the state no longer reads the guest
    with pytest.raises(SyncError):
        dev.avail_count()
    assert "guest" not in dev.ring_state() and "avail_pending" not in dev.ring_state()


def test_close_drops_the_region(mem: GuestMemory) -> None:
    dev, _drv = make_pair(mem, 1, SIZE)
    dev.attach_inflight(SplitInflight(memoryview(bytearray(queue_region_size(SIZE))), SIZE))
    assert dev.close() == 0
    assert dev.inflight is None


def test_an_avail_entry_naming_a_head_in_flight_is_refused_by_name(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    (head,) = post(drv, 1)
    assert dev.pop() is not None
    drv._avail16[2 + 1] = head  # slot 1 names the chain the device still holds
    drv._avail16[1] = 2
    with pytest.raises(SyncError) as info:
        dev.pop()
    assert info.value.detail == (
        f"virtqueue 1: avail ring slot 1 (avail idx 1) names head {head}, "
        "which is still in flight (not yet used)"
    )


def test_the_base_is_a_u16(mem: GuestMemory) -> None:
    make_pair(mem, 1, SIZE, start_idx=0xFFFF)
    assert device_queue(mem, 1, SIZE, base=0xFFFF).last_avail_idx == 0xFFFF
    with pytest.raises(ValueError) as info:
        device_queue(mem, 1, SIZE, base=0x10000)
    assert str(info.value) == "virtqueue 1: last_avail_idx 65536 is not a u16"


def test_a_plain_start_resumes_at_the_base(mem: GuestMemory) -> None:
    make_pair(mem, 1, SIZE, start_idx=5)
    assert device_queue(mem, 1, SIZE, base=5).resume == RingResume(1, 5, 5, 5, 0, "base")


def test_base_0_over_a_used_idx_of_1_resumes_at_1(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    """SET_VRING_BASE 0 with the used ring already at 1: the used idx is the truth (the
    reconnect rule in SplitQueue.__init__), whatever the used idx, 1 included."""
    make_pair(mem, 1, SIZE, start_idx=1)
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        dev = device_queue(mem, 1, SIZE, base=0)
    assert caplog.records[-1].getMessage() == (
        "virtqueue 1: base 0 but used idx 1 in guest memory; resuming at 1"
    )
    assert dev.last_avail_idx == 1
    assert dev.resume == RingResume(1, 0, 1, 1, 0, "used_idx")


@pytest.mark.parametrize("extra", [0, F_NOTIFY_ON_EMPTY, F_ANY_LAYOUT])
def test_legacy_feature_bits_are_read_from_their_own_bit(mem: GuestMemory, extra: int) -> None:
    """6 "Reserved Feature Bits": NOTIFY_ON_EMPTY (24) and ANY_LAYOUT (27); a legacy
    (no VERSION_1) driver has ANY_LAYOUT only if it negotiated it."""
    legacy = FEATURES & ~(1 << 32)  # VIRTIO_F_VERSION_1
    dev = device_queue(mem, 1, SIZE, features=legacy | extra)
    assert dev.notify_on_empty is (extra == F_NOTIFY_ON_EMPTY)
    assert dev.any_layout is (extra == F_ANY_LAYOUT)


@pytest.mark.parametrize("which", ["descriptor table", "avail ring", "used ring"])
def test_a_misaligned_ring_area_is_refused_by_its_name(mem: GuestMemory, which: str) -> None:
    """2.7.2 "Virtqueue Alignment": 16, 2 and 4 bytes; the refusal names the area."""
    lay = layout(1, SIZE)
    addrs = [gpa_to_uva(lay.desc), gpa_to_uva(lay.avail), gpa_to_uva(lay.used)]
    i = ["descriptor table", "avail ring", "used ring"].index(which)
    addrs[i] += 1
    with pytest.raises(ValueError, match=f"^virtqueue 1: {which} at uva 0x[0-9a-f]+ is not "):
        SplitQueue(mem, 1, SIZE, *addrs, features=FEATURES, sync=SyncKind.TX)
