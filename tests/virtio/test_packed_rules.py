"""PackedQueue: rewind bookkeeping, the lying-device pushes and notification enabling, on
one queue (virtio 1.2 2.8).

Oracles: 2.8.9 (a used descriptor carries the buffer id and a 32-bit length; the device
advances by the descriptors of the buffer, one for a raw element it cannot count), 2.8.10
(``flags`` of the device event suppression area: ENABLE 0, DISABLE 1), and the counters'
meaning (a rewound chain is not taken: chains and descriptors go back down).

Mutations killed (mutmut, ``vdev.virtio.packed``, the part of the module that ran by the
deadline): ``rewind`` counting chains or descriptors up or to n, ``push_raw``'s length and
descriptor count, ``patch_last_used``'s message, ``enable_notifications`` defaulting to
disable and disabling answering True, ``rewind`` keeping the given-back tokens, the
suppressed-notification count and answer, ``__repr__`` losing the live/defunct state.
"""

from __future__ import annotations

import pytest
from test_virtio_packed import make_packed
from virtio_helpers import DATA_HIGH, FEATURES

from vdev.abi import lib
from vdev.skywalk.errors import KillReason, SyncError, SyncKind
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE

NO_EVENT = FEATURES & ~(1 << lib.VIRTIO_RING_F_EVENT_IDX)


def test_a_rewind_gives_back_the_chains_and_their_descriptors(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=8)
    token = dev.last_avail_idx
    drv.add_chain([(DATA_HIGH, 8), (DATA_HIGH + 8, 8)])
    drv.add_chain([(DATA_HIGH + 16, 8)])
    drv.publish()
    assert dev.pop() is not None and dev.pop() is not None
    assert (dev.stats.chains, dev.stats.descriptors) == (2, 3)
    dev.rewind(token)
    assert (dev.stats.chains, dev.stats.descriptors) == (0, 0)
    assert dev.pop() is not None and dev.pop() is not None
    assert (dev.stats.chains, dev.stats.descriptors) == (2, 3)


def test_a_raw_push_writes_one_descriptor_with_the_32_bit_length(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=8)
    dev.push_raw(0x1_0003, 0x1_0000_0040)
    dev.flush_used()
    assert dev.used_idx == 1
    d = drv._ring[0]
    assert (int(d.id), int(d.len)) == (3, 0x40)


def test_patching_with_nothing_pushed_says_so(mem: GuestMemory) -> None:
    dev, _drv = make_packed(mem)
    with pytest.raises(ValueError) as info:
        dev.patch_last_used(1)
    assert str(info.value) == "virtqueue 9: no pushed element to patch"


def test_enable_notifications_enables_by_default_and_disabling_answers_false(
    mem: GuestMemory,
) -> None:
    dev, drv = make_packed(mem, size=8, features=NO_EVENT)
    drv.add_chain([(DATA_HIGH, 8)])
    drv.publish()
    assert dev.enable_notifications(False) is False
    assert int(drv._device_ev.flags) == RING_EVENT_FLAGS_DISABLE
    assert dev.enable_notifications() is True  # one chain is available
    assert int(drv._device_ev.flags) == RING_EVENT_FLAGS_ENABLE


def test_a_rewound_token_cannot_be_rewound_to_again(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=8)
    t0 = dev.last_avail_idx
    drv.add_chain([(DATA_HIGH, 8)])
    drv.add_chain([(DATA_HIGH + 8, 8)])
    drv.publish()
    assert dev.pop() is not None
    t1 = dev.last_avail_idx
    assert dev.pop() is not None
    dev.rewind(t0)
    with pytest.raises(ValueError, match=f"cannot rewind from {t0:#x} to {t1:#x}"):
        dev.rewind(t1)


def test_suppressed_notifications_are_counted_one_each(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=8, features=NO_EVENT)
    drv.set_no_interrupt(True)
    for i in range(2):
        drv.add_chain([(DATA_HIGH, 8)])
        drv.publish()
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
        dev.flush_used()
        assert dev.should_notify() is False
        assert dev.stats.notifications_suppressed == i + 1


def test_repr_says_live_or_the_kill_reason(mem: GuestMemory) -> None:
    dev, _drv = make_packed(mem)
    assert repr(dev).endswith(", live)")
    dev.kill(SyncError(KillReason.HEAD_OOB, SyncKind.TX, "test"))
    assert repr(dev).endswith(", defunct=HEAD_OOB)")
