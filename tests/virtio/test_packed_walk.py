"""PackedQueue: the chain walk's refusals word for word, the start and resume records, the
introspection dict, the 2.8.10 event test against a brute-force walk, and a chain as long as
the largest queue (virtio 1.2 2.8).

Oracles: 2.8.6 (a chain is consecutive entries linked by NEXT, each available, the buffer id
in the last), 2.8.7 (INDIRECT only on the first and only descriptor, NEXT meaningless inside
the table), 2.8 "Driver Requirements: Scatter-Gather Support" (a chain may be as long as the
queue size, 32768 at most), 2.8.10 (with EVENT_IDX the driver asks to be notified when the
device passes the position ``off_wrap`` names), vhost-user "Ring states" (the packed base is
index | wrap << 15), and the message formats the queue documents (``virtqueue N: avail desc
I (wrap W): <what>``, each naming the descriptor or table entry).

Mutations killed (mutmut, ``vdev.virtio.packed``, 2026-12-03 run): ``_walk``'s descriptor and
table-entry names and indices in refusals, the not-available and INDIRECT-after-NEXT words,
the total-overflow ``where``, ``Chain.indirect`` of direct and indirect chains, keeping one
popped token fewer than the queue size; ``pop``'s ``where``; ``__init__``'s resume records
(plain and stale) and stale warning, ``last_avail_idx == size`` accepted or refused without
words, ``_ndesc`` as signed 16-bit (a 32768-descriptor chain), ``signalled_used`` not None
when fresh; ``ring_state``'s keys and values; ``ring_areas``' names in refusals;
``check_base`` refusing 0xFFFFFFFF; ``_format_features``; ``close`` leaving the queue open
or the region attached; ``packed_need_event`` over a 3*size cycle.
"""

from __future__ import annotations

import logging

import pytest
from test_virtio_packed import TABLE, make_packed, round_trips
from virtio_helpers import (
    DATA_HIGH,
    DATA_LOW,
    FEATURES,
    HIGH_GPA,
    LOW_SIZE,
    RING_BASE,
    RING_SLOT,
    gpa_to_uva,
)

from vdev.abi import lib
from vdev.errors import DefunctError, SyncError, SyncKind
from vdev.virtio.inflight import PackedInflight, RingResume, queue_region_size
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    PackedQueue,
    packed_need_event,
)
from vdev.virtio.packed_driver import PackedDriverQueue

NO_INDIRECT = FEATURES & ~(1 << lib.VIRTIO_RING_F_INDIRECT_DESC)


def _refusal(dev: PackedQueue) -> str:
    with pytest.raises(SyncError) as info:
        dev.pop()
    return info.value.detail


# -- the walk's refusals, word for word ------------------------------------------------
def test_a_direct_descriptor_outside_guest_memory_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    av = drv.avail_flags(1)
    drv.write_desc(0, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(1, LOW_SIZE + 0x10, 8, 0, av)  # the VGA hole: not guest memory
    assert _refusal(dev).startswith(
        "virtqueue 9: avail desc 0 (wrap 1): desc 1: buffer 0xa0010+0x8 outside guest memory: "
    )


def test_a_writable_descriptor_on_a_transmit_queue_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)  # queue 9: a transmitq, the device only reads
    av = drv.avail_flags(1)
    drv.write_desc(0, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(1, DATA_LOW + 8, 8, 0, av | F_WRITE)
    assert _refusal(dev) == (
        "virtqueue 9: avail desc 0 (wrap 1): desc 1 is device-writable on a queue the device "
        f"only reads (addr {DATA_LOW + 8:#x} len 8 flags {av | F_WRITE:#x})"
    )


def test_an_unavailable_chain_entry_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    av = drv.avail_flags(1)
    drv.write_desc(0, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(1, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(2, DATA_LOW, 8, 0, drv.avail_flags(0))  # available for the next lap
    assert _refusal(dev) == (
        "virtqueue 9: avail desc 0 (wrap 1): chain entry 2 is not available "
        f"(flags {drv.avail_flags(0):#x}, wrap 1)"
    )


def test_indirect_after_direct_descriptors_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    av = drv.avail_flags(1)
    drv.write_indirect(TABLE, [(DATA_LOW, 8, 0, 0)])
    drv.write_desc(0, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(1, DATA_LOW, 8, 0, av | F_NEXT)
    drv.write_desc(2, TABLE, 16, 0, av | F_INDIRECT)
    assert _refusal(dev) == (
        "virtqueue 9: avail desc 0 (wrap 1): desc 2 has INDIRECT set after 2 direct "
        "descriptors linked by NEXT"
    )


def test_indirect_without_the_feature_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5, features=NO_INDIRECT)
    drv.write_indirect(TABLE, [(DATA_LOW, 8, 0, 0)])
    drv.write_desc(0, TABLE, 16, 0, drv.avail_flags(1) | F_INDIRECT)
    assert _refusal(dev) == (
        "virtqueue 9: avail desc 0 (wrap 1): desc 0 has INDIRECT set but INDIRECT not "
        "negotiated (VIRTIO_RING_F_INDIRECT_DESC)"
    )


def test_a_bad_indirect_table_entry_is_named(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    drv.write_indirect(TABLE, [(DATA_LOW, 8, 0, 0), (DATA_LOW + 8, 8, 0, 0),
                               (DATA_LOW + 16, 8, 0, F_WRITE)])  # fmt: skip
    drv.write_desc(0, TABLE, 48, 0, drv.avail_flags(1) | F_INDIRECT)
    assert _refusal(dev) == (
        "virtqueue 9: avail desc 0 (wrap 1): indirect entry 2 is device-writable on a queue "
        f"the device only reads (addr {DATA_LOW + 16:#x} len 8 flags {F_WRITE:#x})"
    )


def test_a_refusal_names_the_position_and_lap_it_started_at(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=3)
    round_trips(dev, drv, 4, [(DATA_LOW, 8)])  # one lap and one entry: index 1, wrap 0
    drv.write_desc(1, LOW_SIZE, 8, 0, drv.avail_flags(0))
    assert _refusal(dev).startswith("virtqueue 9: avail desc 1 (wrap 0): desc 1: buffer ")


def test_a_chain_whose_total_overflows_32_bits_is_named(mem: GuestMemory) -> None:
    """Every entry in guest memory, 2 x 0x300000 bytes each of 700 entries: the total passes
    2^32 (2.8.4: lengths are 32-bit)."""
    dev, drv = make_packed(mem, 9, size=2048)
    n, ln = 1400, 0x300000
    table = [(HIGH_GPA, ln, 0, 0)] * n
    gpa = DATA_HIGH - n * 16  # room below the data area, inside the high region
    drv.write_indirect(gpa, table)
    drv.write_desc(0, gpa, 16 * n, 0, drv.avail_flags(1) | F_INDIRECT)
    with pytest.raises(SyncError) as info:
        dev.pop()
    assert info.value.detail == (
        "virtqueue 9: avail desc 0 (wrap 1): chain: total length overflows 32 bits "
        f"(readable {n * ln:#x}, writable 0x0)"
    )


def test_chains_say_whether_they_came_from_an_indirect_table(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    drv.add_chain([(DATA_LOW, 8), (DATA_LOW + 8, 8)])
    drv.add_chain([(DATA_LOW, 8), (DATA_LOW + 8, 8)], indirect=True)
    drv.publish()
    direct, table = dev.pop(), dev.pop()
    assert direct is not None and table is not None
    assert (direct.indirect, direct.desc_count) == (False, 2)
    assert (table.indirect, table.desc_count) == (True, 1)


def test_every_pop_of_a_full_ring_can_be_rewound(mem: GuestMemory) -> None:
    """The queue remembers the last ``size`` pops: a full ring's worth can go back."""
    dev, drv = make_packed(mem, size=4)
    ids = [drv.add_chain([(DATA_LOW + 8 * i, 8)]) for i in range(4)]
    drv.publish()
    token = dev.last_avail_idx
    assert [c.head for c in iter(dev.pop, None)] == ids
    dev.rewind(token)
    assert dev.in_flight == 0 and dev.last_avail_idx == token
    assert [c.head for c in iter(dev.pop, None)] == ids


def test_a_chain_as_long_as_the_largest_queue(mem: GuestMemory) -> None:
    """32768 descriptors (2.8: the queue size, 32768 at most, bounds a chain): popped,
    used, and the used position goes round one whole lap."""
    size = 32768
    desc = HIGH_GPA  # 512 KiB of ring at the start of the high region
    drv_ev, dev_ev = desc + 16 * size, desc + 16 * size + 4
    drv = PackedDriverQueue(mem, size, desc, drv_ev, dev_ev, features=FEATURES)
    dev = PackedQueue(
        mem, 9, size, gpa_to_uva(desc), gpa_to_uva(drv_ev), gpa_to_uva(dev_ev),
        features=FEATURES, sync=SyncKind.TX,
    )  # fmt: skip
    bid = drv.add_chain([(DATA_HIGH, 1)] * size)
    drv.publish()
    c = dev.pop()
    assert c is not None and (c.head, c.desc_count, c.read_len) == (bid, size, size)
    assert dev.last_avail_idx == 0  # index 0, wrap counter 0: one lap on
    dev.push(bid, 0)
    dev.flush_used()
    assert (dev.used_idx, dev.used_wrap) == (0, 0)
    assert drv.get_used() == [(bid, 0)]
    dev.close()
    drv.close()


# -- start, resume and stop ----------------------------------------------------------------
def test_a_plain_start_records_its_base(mem: GuestMemory) -> None:
    dev, _drv = make_packed(mem, size=5)
    assert dev.resume == RingResume(9, 0x8000, 0x8000, 0x8000, 0, "base")
    base = RING_BASE + 10 * RING_SLOT
    again = PackedQueue(
        mem, 10, 5, gpa_to_uva(base), gpa_to_uva(base + 80), gpa_to_uva(base + 84),
        features=FEATURES, last_avail_idx=3 | 1 << 15, sync=SyncKind.RX,
    )  # fmt: skip
    assert again.resume == RingResume(10, 0x8003, 0x8003, 0x8003, 0, "base")
    assert not again.resume.disagreed


def test_a_stale_base_is_recorded_and_reported_with_both_positions(
    mem: GuestMemory, caplog: pytest.LogCaptureFixture
) -> None:
    dev, drv = make_packed(mem, size=5)
    for i in range(2):
        drv.add_chain([(DATA_LOW + 8 * i, 8)])
    drv.publish()
    for c in list(iter(dev.pop, None)):
        dev.push(c.head, 0)
    dev.flush_used()
    # restarted with the first base: its descriptors are used (2.8.1: AVAIL == USED == wrap)
    with caplog.at_level(logging.WARNING, logger="vdev.virtio"):
        again = PackedQueue(
            mem, 9, 5, dev.desc_addr, dev.driver_addr, dev.device_addr,
            features=FEATURES, last_avail_idx=0x8000, sync=SyncKind.TX,
        )  # fmt: skip
    assert again.resume == RingResume(9, 0x8000, 0x8002, 0x8000, 0, "packed_stale")
    assert [r.getMessage() for r in caplog.records] == [
        "virtqueue 9: packed base 0x8000 is stale: the device's used descriptors reach 0x8002, "
        "or the driver posted there a lap ahead"
    ]


def test_a_base_index_equal_to_the_size_is_refused_by_name(mem: GuestMemory) -> None:
    dev, _drv = make_packed(mem, size=5)
    with pytest.raises(ValueError) as info:
        PackedQueue(
            mem, 9, 5, dev.desc_addr, dev.driver_addr, dev.device_addr,
            features=FEATURES, last_avail_idx=5 | 1 << 15, sync=SyncKind.TX,
        )  # fmt: skip
    assert str(info.value) == "virtqueue 9: last_avail_idx 5 >= 5"


def test_check_base_takes_every_32_bit_value_with_a_valid_index() -> None:
    PackedQueue.check_base(0xFFFF_FFFF, 32768)  # index 0x7fff, both wrap counters 1
    PackedQueue.check_base(0, 1)
    with pytest.raises(ValueError, match=r"^packed base 0x100000000 is not 32 bits$"):
        PackedQueue.check_base(1 << 32, 32768)


def test_packed_rings_have_no_notify_on_empty_and_any_layout(mem: GuestMemory) -> None:
    """2.8.10 replaces NOTIFY_ON_EMPTY for packed rings; RING_PACKED needs VERSION_1, which
    implies ANY_LAYOUT (whatever the legacy bits say)."""
    extra = (1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY) | (1 << lib.VIRTIO_F_ANY_LAYOUT)
    for features in (FEATURES, FEATURES | extra):
        dev, _drv = make_packed(mem, size=5, features=features)
        assert dev.notify_on_empty is False
        assert dev.any_layout is True


def test_a_closed_queue_is_stopped_and_lets_the_region_go(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    dev.attach_inflight(PackedInflight(memoryview(bytearray(queue_region_size(5))), 5))
    drv.add_chain([(DATA_LOW, 8)])
    drv.publish()
    assert dev.close() == 0x8000
    assert dev.inflight is None
    with pytest.raises(DefunctError, match=r"^virtqueue 9 \(stopped\) is defunct$"):
        dev.pop()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_a_misaligned_ring_area_is_refused_by_its_name(mem: GuestMemory, which: int) -> None:
    """2.8.10.1 / 2.8 "Virtqueue Alignment": 16, 4 and 4 bytes; the refusal names the area."""
    names = ["descriptor ring", "driver event suppression area", "device event suppression area"]
    base = RING_BASE + 10 * RING_SLOT
    addrs = [gpa_to_uva(base), gpa_to_uva(base + 80), gpa_to_uva(base + 84)]
    addrs[which] += 2
    with pytest.raises(ValueError) as info:
        PackedQueue(mem, 10, 5, *addrs, features=FEATURES, sync=SyncKind.RX)
    align = [16, 4, 4][which]
    assert str(info.value) == (
        f"virtqueue 10: {names[which]} at uva {addrs[which]:#x} is not {align}-byte aligned"
    )


# -- introspection ----------------------------------------------------------------------------
def test_ring_state_reports_device_and_guest_positions(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    assert dev.ring_state()["signalled_used"] is None  # no notification decision yet
    drv.add_chain([(DATA_LOW, 8)])  # entry 0
    drv.add_chain([(DATA_LOW, 8), (DATA_LOW + 8, 8)])  # entries 1, 2
    drv.add_chain([(DATA_LOW, 8)])  # entry 3
    drv.publish()
    assert dev.pop() is not None
    drv.set_used_event(2, 1)
    assert dev.enable_notifications() is True
    assert dev.ring_state() == {
        "format": "packed",
        "size": 5,
        "avail_idx": 1,
        "avail_wrap": 1,
        "used_idx": 0,
        "used_wrap": 1,
        "pending_used": 0,
        "in_flight": 1,
        "signalled_used": None,
        "event_idx": True,
        "guest": {
            "next_desc_flags": drv.avail_flags(1) | F_NEXT,
            "driver_event_flags": 2,  # RING_EVENT_FLAGS_DESC
            "driver_event_off_wrap": 2 | 1 << 15,
            "device_event_flags": 2,
            "device_event_off_wrap": 4 | 1 << 15,  # past the chains available (2.8.10)
        },
        "avail_pending": 1,
    }
    dev.close()
    state = dev.ring_state()
    assert "guest" not in state and "avail_pending" not in state


# -- 2.8.10 with EVENT_IDX, against a walk over the positions ------------------------------
def _passed(off_wrap: int, new: int, old: int, size: int) -> bool:
    """Walk the positions old, old + 1, ... up to new (exclusive) round the 2*size cycle
    (index + wrap counter: position index for wrap 1, index + size for wrap 0) and say
    whether the one ``off_wrap`` names is among them."""
    event = (off_wrap & 0x7FFF) + (0 if off_wrap >> 15 else size)
    p = old
    while p != new:
        if p == event:
            return True
        p = (p + 1) % (2 * size)
    return False


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_packed_need_event_matches_a_walk_over_the_positions(size: int) -> None:
    for idx in range(size):
        for wrap in (0, 1):
            off_wrap = idx | wrap << 15
            for old in range(2 * size):
                for new in range(2 * size):
                    assert packed_need_event(off_wrap, new, old, size) is _passed(
                        off_wrap, new, old, size
                    ), (off_wrap, new, old, size)
