"""The VirtQueue / QueueFormat interface (vdev/virtio/queue.py), the same for split and packed:
ring areas against the spec's formulas, the size and base rules, in-flight accounting and
the vhost base encoding."""

from __future__ import annotations

import pytest
from test_virtio_packed import make_packed
from virtio_helpers import DATA_HIGH, DATA_LOW, device_queue, make_pair

from vdev.skywalk.errors import SyncKind
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import PackedQueue
from vdev.virtio.queue import F_RING_PACKED, queue_format
from vdev.virtio.split import SplitQueue


def test_the_format_follows_ring_packed() -> None:
    assert queue_format(0) is SplitQueue
    assert queue_format(F_RING_PACKED) is PackedQueue
    assert queue_format(~F_RING_PACKED & (2**64 - 1)) is SplitQueue


@pytest.mark.parametrize("n", [1, 2, 256, 32768])
def test_split_ring_areas_are_the_spec_formulas(n: int) -> None:
    # 2.7 "Split Virtqueues": 16*n descriptor bytes; avail flags+idx+ring+used_event
    # (6 + 2n); used flags+idx+elements+avail_event (6 + 8n); alignments 16, 2, 4 (2.7.2).
    areas = SplitQueue.ring_areas(n)
    assert [(a.field, a.length, a.align) for a in areas] == [
        ("desc_addr", 16 * n, 16),
        ("avail_addr", 6 + 2 * n, 2),
        ("used_addr", 6 + 8 * n, 4),
    ]


@pytest.mark.parametrize("n", [1, 3, 100, 32768])
def test_packed_ring_areas_are_the_spec_formulas(n: int) -> None:
    # 2.8.10: 16-byte descriptors, two 4-byte event suppression structures (align 4).
    areas = PackedQueue.ring_areas(n)
    assert [(a.field, a.length, a.align) for a in areas] == [
        ("desc_addr", 16 * n, 16),
        ("avail_addr", 4, 4),
        ("used_addr", 4, 4),
    ]


def test_size_rules() -> None:
    for ok in (1, 2, 64, 32768):
        SplitQueue.check_size(ok)
    for bad in (0, -1, 3, 24, 65536, 32769):
        with pytest.raises(ValueError, match="is not a power of 2 <= 32768"):
            SplitQueue.check_size(bad)
    for ok in (1, 3, 100, 32767, 32768):
        PackedQueue.check_size(ok)
    for bad in (0, -1, 32769, 65536):
        with pytest.raises(ValueError, match=r"1\.\.32768"):
            PackedQueue.check_size(bad)


def test_base_rules() -> None:
    for ok in (0, 1, 0xFFFF):
        SplitQueue.check_base(ok, 256)
    for bad in (-1, 0x10000, 0x8000_0000):
        with pytest.raises(ValueError, match="16-bit"):
            SplitQueue.check_base(bad, 256)
    # Packed: index in bits 0-14 below the ring size, any wrap bits, used half ignored.
    for ok in (0, 0x8000, 0x8000_8000, 255, 0xFFFF_80FF):
        PackedQueue.check_base(ok, 256)
    for bad in (256, 0x8100, 0x7FFF):
        with pytest.raises(ValueError, match="index >= ring size 256"):
            PackedQueue.check_base(bad, 256)
    with pytest.raises(ValueError, match="32 bits"):
        PackedQueue.check_base(1 << 32, 256)
    PackedQueue.check_base(0x7FFF, 0)  # before SET_VRING_NUM nothing bounds the index


def test_split_inflight_and_vhost_base(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 0, 8, sync=SyncKind.RX)
    a = drv.add_chain([], [(DATA_LOW, 100), (DATA_HIGH, 28)])
    b = drv.add_chain([], [(DATA_LOW + 0x200, 64)])
    drv.publish()
    assert [dev.inflight_writable(h) for h in (a, b)] == [None, None]
    ca, cb = dev.pop(), dev.pop()
    assert ca is not None and cb is not None and (ca.head, cb.head) == (a, b)
    assert dev.inflight_writable(a) == 128 and dev.inflight_writable(b) == 64
    assert dev.in_flight == 2
    idle = [h for h in range(8) if h not in (a, b)]
    assert all(dev.inflight_writable(h) is None for h in idle)
    assert dev.inflight_writable(-1) is None and dev.inflight_writable(8) is None
    dev.push(a, 128)
    assert dev.inflight_writable(a) is None and dev.inflight_writable(b) == 64
    assert dev.vhost_base == dev.last_avail_idx == 2


def test_packed_inflight_and_vhost_base(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 12, size=5, sync=SyncKind.RX)
    ids = [drv.add_chain([], [(DATA_LOW, 100)]), drv.add_chain([], [(DATA_HIGH, 7)])]
    drv.publish()
    assert all(dev.inflight_writable(i) is None for i in ids)
    c1, c2 = dev.pop(), dev.pop()
    assert c1 is not None and c2 is not None and [c1.head, c2.head] == ids
    assert [dev.inflight_writable(i) for i in ids] == [100, 7]
    assert dev.inflight_writable(5) is None and dev.inflight_writable(-1) is None
    dev.push(ids[0], 50)
    dev.flush_used()
    assert dev.inflight_writable(ids[0]) is None and dev.inflight_writable(ids[1]) == 7
    # GET_VRING_BASE: avail index 2 with wrap 1 in bits 0-15, used index 1 wrap 1 above.
    assert dev.vhost_base == (2 | 1 << 15) | (1 | 1 << 15) << 16


@pytest.mark.parametrize(("base", "resumed"), [(0, 300), (7, 7), (300, 300), (299, 299)])
def test_split_base_zero_on_a_used_ring_resumes_at_the_used_idx(
    mem: GuestMemory, base: int, resumed: int
) -> None:
    """SET_VRING_BASE 0 on a ring whose used idx moved on (DPDK virtio_user's reconnect in
    server mode) resumes at the used idx; any other base is the front-end's word."""
    dev, drv = make_pair(mem, 1, 8, start_idx=300)  # 300 chains taken and used before
    head = drv.add_chain([(DATA_LOW, 10)])
    drv.publish()
    again = device_queue(mem, 1, 8, base=base, sync=SyncKind.TX)
    assert again.last_avail_idx == resumed and again.used_idx == 300
    if resumed == 300:
        chain = again.pop()
        assert chain is not None and chain.head == head
    again.close()
    dev.close()


def test_split_base_zero_on_a_fresh_ring_stays_zero(mem: GuestMemory) -> None:
    dev, _drv = make_pair(mem, 1, 8)
    assert dev.last_avail_idx == dev.used_idx == 0


@pytest.mark.parametrize(("base", "source"), [(0, "used_idx"), (300, "base"), (299, "base")])
def test_split_resume_reports_base_and_used_idx(mem: GuestMemory, base: int, source: str) -> None:
    """The adoption is reported with both values (the ring_resume event's fields); an honoured
    base reports nothing to disagree about."""
    dev, _drv = make_pair(mem, 1, 8, start_idx=300)
    again = device_queue(mem, 1, 8, base=base, sync=SyncKind.TX)
    r = again.resume
    assert (r.base, r.used_idx, r.source) == (base, 300, source)
    assert r.resumed_at == again.last_avail_idx
    assert r.disagreed is (source == "used_idx")
    again.close()
    dev.close()


@pytest.mark.parametrize("used", [0, 1, 3, 5])
def test_packed_stale_base_is_reported_with_both_positions(mem: GuestMemory, used: int) -> None:
    """A packed ring has no used idx in memory: restarting at the fresh base (index 0, wrap 1)
    after the device used ``used`` one-descriptor buffers is detected from the descriptor
    flags (2.8.1: AVAIL == USED == wrap counter) and reported; the base itself is kept."""
    dev, drv = make_packed(mem, 12, size=5, sync=SyncKind.RX)
    for _ in range(used):
        drv.add_chain([], [(DATA_LOW, 64)])
    drv.publish()
    for _ in range(used):
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 10)
    dev.flush_used()
    again = PackedQueue(
        mem, 12, 5, dev.desc_addr, dev.driver_addr, dev.device_addr,
        features=dev.features, last_avail_idx=0x8000, sync=SyncKind.RX,
    )  # fmt: skip
    r = again.resume
    fresh = 0x8000
    if used == 0:
        assert (r.source, r.base, r.used_idx) == ("base", fresh, fresh)
        assert not r.disagreed
    else:
        seen = (used % 5) | (0 if used == 5 else 1) << 15  # a full lap flips the wrap counter
        assert (r.source, r.base, r.used_idx, r.resumed_at) == ("packed_stale", fresh, seen, fresh)
        assert r.disagreed  # reported, though nothing was adopted
    assert again.last_avail_idx == fresh
    # The right base (where the device stopped) is not stale.
    right = PackedQueue(
        mem, 12, 5, dev.desc_addr, dev.driver_addr, dev.device_addr,
        features=dev.features, last_avail_idx=dev.last_avail_idx, sync=SyncKind.RX,
    )  # fmt: skip
    assert right.resume.source == "base"
    for q in (again, right, dev):
        q.close()


def test_a_split_ring_of_one_entry_carries_chains_round_and_round(mem: GuestMemory) -> None:
    """2.7 "Split Virtqueues": the queue size is a power of 2, and 2^0 is one: a ring of one
    descriptor takes a chain, completes it, and takes the next in the same slot, with the
    16-bit indices running past the ring size at once (the oracle: the driver's used ring)."""
    dev, drv = make_pair(mem, 0, 1, sync=SyncKind.RX)
    for round_ in range(3):
        head = drv.add_chain([], [(DATA_LOW, 64)])
        drv.publish()
        chain = dev.pop()
        assert chain is not None and chain.head == head == 0
        assert dev.pop() is None  # one entry: nothing more until it comes back
        dev.push(head, 10 + round_)
        dev.flush_used()
        assert drv.get_used() == [(0, 10 + round_)]
        assert drv.read_used_idx() == round_ + 1
    # The one slot's popped head is kept for a rewind (the RX path's mergeable give-back).
    drv.add_chain([], [(DATA_LOW, 64)])
    drv.publish()
    assert dev.pop() is not None and dev.last_avail_idx == 4
    dev.rewind(3)
    again = dev.pop()
    assert again is not None and again.head == 0 and dev.last_avail_idx == 4
