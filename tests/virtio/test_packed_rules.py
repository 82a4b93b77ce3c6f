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
From the whole-module run of 2026-12-03: ``attach_inflight``'s resume record and warning,
``rewind`` moving the inflight region's avail position, ``avail_count``'s cached scan and its
one-lap bound (against a brute-force walk of the ring's flags), ``push``'s id range. From
the run of 2026-12-04: ``enable_notifications``' ``ahead`` position taken modulo 3*size.
"""

from __future__ import annotations

import logging
import random

import pytest
from test_virtio_packed import make_packed, round_trips
from virtio_helpers import DATA_HIGH, FEATURES

from vdev.abi import lib
from vdev.skywalk.errors import KillReason, SyncError, SyncKind
from vdev.virtio.inflight import PackedInflight, RingResume, queue_region_size
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import (
    F_AVAIL,
    F_NEXT,
    F_USED,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    PackedQueue,
)
from vdev.virtio.packed_driver import PackedDriverQueue

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


# -- the inflight region (vhost-user.rst "Inflight I/O tracking", packed layout) ----------
def _restart_with_region(
    mem: GuestMemory, dev: PackedQueue, buf: bytearray, base: int
) -> tuple[PackedQueue, RingResume]:
    again = PackedQueue(
        mem, dev.index, dev.size, dev.desc_addr, dev.driver_addr, dev.device_addr,
        features=dev.features, last_avail_idx=base, sync=dev.sync,
    )  # fmt: skip
    return again, again.attach_inflight(PackedInflight(memoryview(buf), dev.size))


def test_a_fresh_region_resumes_at_the_base_silently(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    dev, _drv = make_packed(mem, size=5)
    buf = bytearray(queue_region_size(5))
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        got = dev.attach_inflight(PackedInflight(memoryview(buf), 5))
    # fresh ring: index 0, wrap counter 1 (2.8.1), in vhost-user's packed encoding
    assert got == RingResume(9, 0x8000, 0x8000, 0x8000, 0, "inflight")
    assert dev.resume == got and not got.disagreed
    assert caplog.records == []


def test_resuming_with_chains_in_flight_says_so(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    dev, drv = make_packed(mem, size=5)
    buf = bytearray(queue_region_size(5))
    dev.attach_inflight(PackedInflight(memoryview(buf), 5))
    for i in range(2):
        drv.add_chain([(DATA_HIGH + 64 * i, 8)])
    drv.publish()
    assert dev.pop() is not None and dev.pop() is not None
    # the same base as the first start: only the two chains in flight disagree
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        again, got = _restart_with_region(mem, dev, buf, 0x8000)
    assert got == RingResume(9, 0x8000, 0x8000, 0x8000, 2, "inflight")
    assert again.resume == got and got.disagreed
    assert [r.getMessage() for r in caplog.records] == [
        "virtqueue 9: inflight region: base 0x8000, resuming at 0x8000, 2 in flight"
    ]


def test_resuming_past_a_stale_base_says_so(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    dev, drv = make_packed(mem, size=5)
    buf = bytearray(queue_region_size(5))
    dev.attach_inflight(PackedInflight(memoryview(buf), 5))
    drv.add_chain([(DATA_HIGH, 8)])
    drv.add_chain([(DATA_HIGH + 64, 8), (DATA_HIGH + 128, 8)])
    drv.publish()
    for _ in range(2):
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
    dev.flush_used()
    # nothing in flight, but the region's position (3 entries on) beats the stale base
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        again, got = _restart_with_region(mem, dev, buf, 0x8000)
    assert got == RingResume(9, 0x8000, 3 | 1 << 15, 3 | 1 << 15, 0, "inflight")
    assert (again.last_avail_idx, again.used_idx, again.used_wrap) == (3 | 1 << 15, 3, 1)
    # (the constructor's stale-base warning comes first; the region's line is the last)
    assert caplog.records[-1].getMessage() == (
        "virtqueue 9: inflight region: base 0x8000, resuming at 0x8003, 0 in flight"
    )


def test_a_rewind_moves_the_regions_avail_position_back(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    buf = bytearray(queue_region_size(5))
    region = PackedInflight(memoryview(buf), 5)
    dev.attach_inflight(region)
    # two laps of a 5-entry ring: the token has wrap counter 0
    round_trips(dev, drv, 4, [(DATA_HIGH, 8), (DATA_HIGH + 8, 8)])
    token = dev.last_avail_idx
    assert token == 3  # entry 3, wrap counter 0
    drv.add_chain([(DATA_HIGH, 8)])
    drv.publish()
    assert dev.pop() is not None
    assert region.hdr.free_head == 4
    dev.rewind(token)
    # "free_head": the avail position in the packed encoding (index | wrap << 15)
    assert region.hdr.free_head == token


# -- avail_count against a brute-force reading of the ring (2.8.1, 2.8.6) ---------------
def _stepped(idx: int, wrap: int, size: int, steps: int) -> tuple[int, int]:
    """(index, wrap counter) ``steps`` ring entries on: 2.8.1, the counter flips at the end."""
    for _ in range(steps):
        idx += 1
        if idx == size:
            idx, wrap = 0, wrap ^ 1
    return idx, wrap


def _chains_available(drv: PackedDriverQueue, token: int) -> int:
    """The oracle: walk the ring from the device's position (``token``, index | wrap << 15)
    for at most one lap, counting the chains whose every entry is available for its lap
    (2.8.1: AVAIL == wrap counter != USED) and whose last entry has no NEXT (2.8.6)."""
    size = drv.size
    idx, wrap = token & 0x7FFF, token >> 15
    chains = run = 0
    for _ in range(size):
        flags = int(drv._ring[idx].flags)
        if bool(flags & F_AVAIL) != bool(wrap) or bool(flags & F_USED) == bool(wrap):
            break
        run += 1
        idx, wrap = _stepped(idx, wrap, size, 1)
        if not flags & F_NEXT:
            chains += 1
            run = 0
    return chains


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_avail_count_matches_the_ring_over_many_laps(mem: GuestMemory, size: int) -> None:
    """Random (seeded) driver and device steps over many laps, ``avail_count`` asked at
    every step (so its cache is extended from every position, across every wrap)."""
    rng = random.Random(size)
    for _trial in range(20):
        dev, drv = make_packed(mem, size=size)
        for _step in range(40):
            op = rng.randrange(4)
            if op == 0 and drv.num_free:
                n = rng.randint(1, min(3, drv.num_free))
                drv.add_chain([(DATA_HIGH + 64 * k, 8) for k in range(n)])
            elif op == 1:
                drv.publish()
            elif op == 2:
                c = dev.pop()
                if c is not None:
                    dev.push(c.head, 0)
                    dev.flush_used()
            else:
                drv.get_used()
            assert dev.avail_count() == _chains_available(drv, dev.last_avail_idx)
        dev.close()
        drv.close()


def test_avail_count_extends_a_scan_that_wrapped_past_the_position_cycle(
    mem: GuestMemory,
) -> None:
    """The cached scan end is a ring position (index, or index + size in the wrap-0 lap):
    from a start in the wrap-0 lap a scan that wrapped ends below it, and the next call
    must still go on from there."""
    dev, drv = make_packed(mem, size=5)
    round_trips(dev, drv, 8, [(DATA_HIGH, 8)])  # one lap and three entries: index 3, wrap 0
    assert dev.last_avail_idx == 3
    drv.add_chain([(DATA_HIGH, 8), (DATA_HIGH + 8, 8), (DATA_HIGH + 16, 8)])  # 3, 4, 0
    drv.publish()
    assert dev.avail_count() == 1  # the scan ended at index 1, wrap 1: position 1 < 8
    drv.add_chain([(DATA_HIGH, 8)])
    drv.publish()
    assert dev.avail_count() == 2


def test_avail_count_reads_at_most_one_lap(mem: GuestMemory) -> None:
    """A driver that rewrites the entry at the device's position as available for the next
    lap (the device has not taken it: a violation) behind an unterminated chain: the scan
    stops after one lap (``size`` entries) and never counts a ring entry twice."""
    dev, drv = make_packed(mem, size=4)
    av = drv.avail_flags(1)
    drv.write_desc(0, DATA_HIGH, 8, 0, av)
    for i in (1, 2, 3):  # NEXT on every one: the chain never ends within the ring
        drv.write_desc(i, DATA_HIGH, 8, 1, av | F_NEXT)
    assert dev.avail_count() == 1
    drv.write_desc(0, DATA_HIGH, 8, 0, drv.avail_flags(0))
    assert dev.avail_count() == 1


def test_avail_count_reads_at_most_one_lap_over_several_chains(mem: GuestMemory) -> None:
    """The same, with the lap's entries counted over several chains of one scan: a cached
    chain at 0, then chains at 1 and 2 and an unterminated one at 3, and entry 0 rewritten
    for the next lap: three chains, not a fourth from the entry read again."""
    dev, drv = make_packed(mem, size=4)
    av = drv.avail_flags(1)
    drv.write_desc(0, DATA_HIGH, 8, 0, av)
    assert dev.avail_count() == 1
    drv.write_desc(1, DATA_HIGH, 8, 1, av)
    drv.write_desc(2, DATA_HIGH, 8, 2, av)
    drv.write_desc(3, DATA_HIGH, 8, 3, av | F_NEXT)
    drv.write_desc(0, DATA_HIGH, 8, 0, drv.avail_flags(0))
    assert dev.avail_count() == 3


@pytest.mark.parametrize("head", [-1, 4, 5, 2**16])
def test_push_of_an_id_outside_the_ring_is_refused_by_name(mem: GuestMemory, head: int) -> None:
    """Buffer ids are 0..size-1 (2.8.6); every one of them is in flight here, so only the
    range check can refuse (and -1 must not name the last one)."""
    dev, drv = make_packed(mem, size=4)
    for i in range(4):
        drv.add_chain([(DATA_HIGH + 64 * i, 8)])
    drv.publish()
    assert sorted(c.head for c in iter(dev.pop, None)) == [0, 1, 2, 3]
    with pytest.raises(ValueError) as info:
        dev.push(head, 0)
    assert str(info.value) == f"virtqueue 9: buffer id {head} is not in flight"
    assert dev.in_flight == 4 and dev.stats.used == 0


@pytest.mark.parametrize("size", [1, 3, 4])
def test_re_arming_ahead_names_the_entry_that_many_past_the_available_ones(
    mem: GuestMemory, size: int
) -> None:
    """2.8.10 with EVENT_IDX: ``enable_notifications(ahead=a)`` asks for the kick at the
    entry a - 1 past the first one not available, wrap counter included, from every device
    position of two laps and with 0..size-1 chains already posted.  The oracle steps the
    (index, wrap) pair one entry at a time (the 2*size cycle wraps to index 0, counter 1)."""
    for laps in range(2 * size):
        dev, drv = make_packed(mem, size=size)
        round_trips(dev, drv, laps, [(DATA_HIGH, 8)])
        pos = _stepped(0, 1, size, laps)
        for posted in range(size):
            for ahead in range(1, size + 1):
                assert dev.enable_notifications(ahead=ahead) is (posted > 0)
                idx, wrap = _stepped(*pos, size, posted + ahead - 1)
                assert int(dev._device_ev.flags) == RING_EVENT_FLAGS_DESC
                assert int(dev._device_ev.off_wrap) == idx | wrap << 15, (laps, posted, ahead)
            drv.add_chain([(DATA_HIGH + 64 * posted, 8)])
            drv.publish()
