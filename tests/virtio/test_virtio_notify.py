"""Notification suppression: 2.7.7 flags, 2.7.10 event idx, NOTIFY_ON_EMPTY."""

from __future__ import annotations

import itertools

import pytest
from virtio_helpers import DATA_LOW, FEATURES, NO_EVENT, make_pair

from vdev.abi import lib
from vdev.virtio.memory import GuestMemory
from vdev.virtio.split import SplitQueue, vring_need_event


def spec_need_event(event_idx: int, new_idx: int, old: int) -> bool:
    """The spec's C expression, evaluated with explicit uint16_t casts."""

    def u16(x: int) -> int:
        return x % 65536

    return u16(new_idx - event_idx - 1) < u16(new_idx - old)


def test_need_event_matches_spec_formula() -> None:
    values = [0, 1, 2, 3, 7, 8, 100, 32767, 32768, 32769, 65533, 65534, 65535]
    for e, new, old in itertools.product(values, repeat=3):
        assert vring_need_event(e, new, old) == spec_need_event(e, new, old), (e, new, old)
    # and the meaning: notify iff event in [old, new) modulo 2^16
    for old in (0, 65530):
        for k in range(0, 12):
            new = (old + k) & 0xFFFF
            for d in range(-3, 15):
                e = (old + d) & 0xFFFF
                assert vring_need_event(e, new, old) == (0 <= d < k)


def _complete(dev: SplitQueue, drv_add: int, drv: object) -> None:
    for _ in range(drv_add):
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
    dev.flush_used()


def test_event_idx_used_event(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 16, start_idx=65530)
    drv.auto_used_event = False
    for _ in range(10):
        drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    # first decision always notifies (nothing signalled yet)
    _complete(dev, 1, drv)
    assert dev.should_notify()
    assert not dev.should_notify()  # nothing new
    # driver wants an interrupt once used idx passes 65533 (i.e. when entry 65533 is used)
    drv.set_used_event(65533)
    _complete(dev, 1, drv)  # used idx 65532
    assert not dev.should_notify()
    _complete(dev, 2, drv)  # used idx 65534: crossed 65533
    assert dev.should_notify()
    drv.set_used_event(2)  # across the wrap
    _complete(dev, 3, drv)  # 65535, 0, 1 -> used idx 1: event 2 not crossed
    assert not dev.should_notify()
    _complete(dev, 3, drv)  # used idx 4: crossed
    assert dev.should_notify()
    assert dev.stats.notifications_sent == 3 and dev.stats.notifications_suppressed == 2


def test_event_idx_avail_event_and_kick(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 8)
    assert not dev.enable_notifications(True)
    assert drv.read_avail_event() == 0
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()  # crossed avail_event 0
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert not drv.kick_needed()  # device did not re-arm
    assert dev.pop() is not None
    # re-arm: there is still one pending chain, so the caller must keep going; the kick is
    # requested for the next buffer after those already posted (avail idx 2), not at the
    # device's read position (which a rewound RX queue may trail).
    assert dev.enable_notifications(True)
    assert drv.read_avail_event() == 2
    assert dev.pop() is not None
    assert not dev.enable_notifications(True)
    assert drv.read_avail_event() == 2
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()
    # disabling with EVENT_IDX does not touch the flags (the driver ignores them)
    dev.enable_notifications(False)
    assert drv.read_used_flags() == 0


def test_no_notify_flag(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 8, features=NO_EVENT)
    dev.enable_notifications(False)
    assert drv.read_used_flags() == lib.VRING_USED_F_NO_NOTIFY
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert not drv.kick_needed()
    assert dev.enable_notifications(True)  # pending work reported
    assert drv.read_used_flags() == 0
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()


@pytest.mark.parametrize("features", [NO_EVENT, FEATURES], ids=["flags", "event_idx"])
def test_the_default_enables_and_disabling_reports_no_pending_work(
    mem: GuestMemory, features: int
) -> None:
    """``enable_notifications()`` with no argument asks for kicks (the queue interface's
    default), and only enabling reports buffers that arrived meanwhile: a caller that
    disables is about to poll the ring itself (2.7.7, 2.7.10)."""
    dev, drv = make_pair(mem, 1, 8, features=features)
    dev.enable_notifications(False)
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert dev.enable_notifications(False) is False  # a buffer waits; disabling says nothing
    assert dev.enable_notifications() is True  # the default enables, and sees it
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()  # the driver's own reading: kicks are wanted again


def test_no_interrupt(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 8, features=NO_EVENT)
    for _ in range(4):
        drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    drv.set_no_interrupt(True)
    _complete(dev, 1, drv)
    assert not dev.should_notify()
    drv.set_no_interrupt(False)
    _complete(dev, 1, drv)
    assert dev.should_notify()
    # with EVENT_IDX the flag is ignored (2.7.10): used_event rules
    dev2, drv2 = make_pair(mem, 3, 8, features=FEATURES)
    drv2.auto_used_event = False
    drv2.add_chain([(DATA_LOW, 1)])
    drv2.add_chain([(DATA_LOW, 1)])
    drv2.publish()
    drv2.set_no_interrupt(True)
    _complete(dev2, 1, drv2)
    assert dev2.should_notify()  # first one
    drv2.set_used_event(1)
    _complete(dev2, 1, drv2)
    assert dev2.should_notify()


def test_notify_on_empty(mem: GuestMemory) -> None:
    feats = NO_EVENT | (1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY)
    dev, drv = make_pair(mem, 1, 8, features=feats)
    drv.set_no_interrupt(True)
    drv.add_chain([(DATA_LOW, 1)])
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    _complete(dev, 1, drv)
    assert not dev.should_notify()  # still buffers available: suppressed
    _complete(dev, 1, drv)
    assert dev.should_notify()  # ran out: must notify despite NO_INTERRUPT
    # and with EVENT_IDX + a used_event far away
    dev2, drv2 = make_pair(mem, 3, 8, features=FEATURES | (1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY))
    drv2.auto_used_event = False
    drv2.set_used_event(1000)
    for _ in range(3):
        drv2.add_chain([(DATA_LOW, 1)])
    drv2.publish()
    _complete(dev2, 1, drv2)
    assert dev2.should_notify()  # first decision
    _complete(dev2, 1, drv2)
    assert not dev2.should_notify()
    _complete(dev2, 1, drv2)
    assert dev2.should_notify()
