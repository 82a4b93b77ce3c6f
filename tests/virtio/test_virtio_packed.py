"""Packed virtqueues (2.8): round trips across the wrap, validation, event suppression."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_helpers import (
    DATA_HIGH,
    DATA_LOW,
    FEATURES,
    INDIRECT_BASE,
    LOW_SIZE,
    RING_BASE,
    RING_SLOT,
    gpa_to_uva,
    make_memory,
)

from vdev.abi import lib
from vdev.net.nic import net_queue_direction
from vdev.skywalk.errors import DefunctError, KillReason, SyncError, SyncKind
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    PackedQueue,
    packed_need_event,
)
from vdev.virtio.packed_driver import PackedDriverQueue

TABLE = INDIRECT_BASE + 0x78000


def make_packed(
    mem: GuestMemory,
    index: int = 9,
    size: int = 5,
    *,
    features: int = FEATURES,
    sync: SyncKind | None = None,
) -> tuple[PackedQueue, PackedDriverQueue]:
    base = RING_BASE + index * RING_SLOT
    desc, drv_ev, dev_ev = base, base + 16 * size, base + 16 * size + 4
    per_queue = 0x8000
    drv = PackedDriverQueue(
        mem,
        size,
        desc,
        drv_ev,
        dev_ev,
        features=features,
        indirect_area=(INDIRECT_BASE + (index % 8) * per_queue, per_queue),
    )
    dev = PackedQueue(
        mem,
        index,
        size,
        gpa_to_uva(desc),
        gpa_to_uva(drv_ev),
        gpa_to_uva(dev_ev),
        features=features,
        sync=sync if sync is not None else net_queue_direction(index),
    )
    return dev, drv


def round_trips(
    dev: PackedQueue, drv: PackedDriverQueue, n: int, segs: list[tuple[int, int]]
) -> None:
    """``n`` chains of ``segs``, each posted, taken, completed and taken back in turn: both
    sides move ``n * len(segs)`` entries on (to a position in a later lap, say)."""
    for _ in range(n):
        drv.add_chain(segs)
        drv.publish()
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
        dev.flush_used()
        assert drv.get_used()


def test_packed_roundtrip_across_wraps(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, size=5)
    for rnd in range(30):
        nd = 1 + rnd % 3
        segs = []
        for k in range(nd):
            gpa = DATA_LOW + k * 64
            mem.write(gpa, bytes([rnd, k]))
            segs.append((gpa, 2))
        bid = drv.add_chain(segs, indirect=rnd % 4 == 3)
        assert dev.pop() is None  # flags not written yet
        drv.publish()
        c = dev.pop()
        assert c is not None and c.head == bid
        assert c.read_bytes() == b"".join(bytes([rnd, k]) for k in range(nd))
        assert dev.pop() is None
        dev.push(c.head, 0)
        dev.flush_used()
        assert drv.get_used() == [(bid, 0)]
    assert dev.stats.chains == 30


def test_packed_rx_batch(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 8, size=6)
    ids = [drv.add_chain([], [(DATA_HIGH + i * 256, 100)]) for i in range(6)]
    drv.publish()
    chains = [dev.pop() for _ in range(6)]
    assert dev.pop() is None
    for c in chains:
        assert c is not None
        c.write_into(b"x" * 10)
        dev.push(c.head, 10)
    dev.flush_used()
    assert drv.get_used() == [(i, 10) for i in ids]
    with pytest.raises(ValueError):
        dev.push(ids[0], 1)


def test_packed_need_event_brute_force() -> None:
    for size in (1, 3, 5, 8):
        cycle = 2 * size
        for old in range(cycle):
            for k in range(cycle):
                new = (old + k) % cycle
                for ev in range(cycle):
                    off, wrap = (ev, 1) if ev < size else (ev - size, 0)
                    want = (ev - old) % cycle < k
                    assert packed_need_event(off | wrap << 15, new, old, size) == want


def test_packed_notifications(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 9, size=4)
    for _ in range(4):
        drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()
    dev.enable_notifications(False)
    drv.set_no_interrupt(True)

    def one() -> None:
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
        dev.flush_used()

    one()
    assert not dev.should_notify()
    drv.set_no_interrupt(False)
    one()
    assert dev.should_notify()
    assert not dev.should_notify()
    drv.set_used_event(3, 1)  # interrupt when the used descriptor at 3 (first lap) is written
    one()  # used idx 3
    assert not dev.should_notify()
    one()  # used idx 0, wrap 0: position 3 passed
    assert dev.should_notify()
    drv.get_used()
    assert dev.enable_notifications(True) is False
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert drv.kick_needed()  # avail_event at the device's next index
    drv.add_chain([(DATA_LOW, 1)])
    drv.publish()
    assert not drv.kick_needed()
    dev.enable_notifications(False)
    assert int(drv._device_ev.flags) == RING_EVENT_FLAGS_DISABLE
    dev.enable_notifications(True)
    assert int(drv._device_ev.flags) == RING_EVENT_FLAGS_DESC


def _post_raw(drv: PackedDriverQueue, descs: list[tuple[int, int, int, int]]) -> None:
    """Write descriptors from index 0 with the flags given, AVAIL bits for wrap 1 added."""
    for i, (a, n, bid, fl) in enumerate(descs):
        drv.write_desc(i, a, n, bid, fl | drv.avail_flags(1))


PACKED_CASES = [
    ("id_range", [(DATA_LOW, 4, 7, 0)], r"buffer id 7 >= queue size 5"),
    # The first id past the end: with ``>`` for ``>=`` this one reached _inflight[5] and
    # raised IndexError instead of a named kill.
    ("id_eq_size", [(DATA_LOW, 4, 5, 0)], r"buffer id 5 >= queue size 5"),
    ("id_max", [(DATA_LOW, 4, 0xFFFF, 0)], r"buffer id 65535 >= queue size 5"),
    ("not_avail", [(DATA_LOW, 4, 0, F_NEXT)], r"chain entry 1 is not available"),
    ("hole", [(LOW_SIZE, 4, 0, 0)], r"buffer 0xa0000\+0x4 outside guest memory"),
    ("writable_tx", [(DATA_LOW, 4, 0, F_WRITE)], r"device-writable"),
    ("ind_next", [(TABLE, 16, 0, F_INDIRECT | F_NEXT)], r"both INDIRECT and NEXT"),
    ("ind_len", [(TABLE, 20, 0, F_INDIRECT)], r"table len 20"),
    ("nested", [(TABLE + 0x100, 16, 0, F_INDIRECT)], r"nested indirect"),
    ("wrap_all", [(DATA_LOW, 1, 0, F_NEXT)] * 5, r"chain entry 0 is not available"),
]


@pytest.mark.parametrize(
    ("descs", "detail"), [c[1:] for c in PACKED_CASES], ids=[c[0] for c in PACKED_CASES]
)
def test_packed_violations(mem: GuestMemory, descs: list, detail: str) -> None:
    dev, drv = make_packed(mem, 9, size=5)
    other, odrv = make_packed(mem, 11, size=3)
    drv.write_indirect(TABLE + 0x100, [(TABLE + 0x100, 16, 0, F_INDIRECT)])
    _post_raw(drv, descs)
    with pytest.raises(SyncError) as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED
    assert re.search(detail, info.value.detail), info.value.detail
    with pytest.raises(DefunctError):
        dev.pop()
    bid = odrv.add_chain([(DATA_LOW, 1)])
    odrv.publish()
    c = other.pop()
    assert c is not None and c.head == bid


def test_packed_last_buffer_id_is_accepted(mem: GuestMemory) -> None:
    """size - 1 is the last valid id (the other end of the id range check; with ``>=`` made
    ``> size`` the ``id_eq_size`` case fails: ``virtio-packed-buf-id-gt``)."""
    dev, drv = make_packed(mem, 9, size=5)
    _post_raw(drv, [(DATA_LOW, 1, 4, 0)])
    c = dev.pop()
    assert c is not None and c.head == 4
    dev.push(4, 0)
    dev.flush_used()
    assert dev.defunct is None


@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_packed_readable_after_writable(mem: GuestMemory, indirect: bool) -> None:
    """2.8 "Driver Requirements: Scatter-Gather Support": device-writable elements come
    after every device-readable one; on a queue that takes both (the control queue).
    Mutation killed: the check removed (``virtio-packed-readable-after-writable``)."""
    dev, drv = make_packed(mem, 9, size=5, sync=SyncKind.EVENT)
    w_then_r = [(DATA_HIGH, 4, 1, F_WRITE), (DATA_LOW, 4, 1, 0)]
    if indirect:
        drv.write_indirect(TABLE, [(a, n, 0, fl) for a, n, _bid, fl in w_then_r])
        _post_raw(drv, [(TABLE, 32, 1, F_INDIRECT)])
    else:
        _post_raw(drv, [(DATA_HIGH, 4, 1, F_WRITE | F_NEXT), (DATA_LOW, 4, 1, 0)])
    with pytest.raises(SyncError, match="device-readable after a device-writable") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED
    ok, odrv = make_packed(mem, 11, size=5, sync=SyncKind.EVENT)  # the legal order passes
    _post_raw(odrv, [(DATA_LOW, 4, 1, F_NEXT), (DATA_HIGH, 4, 1, F_WRITE)])
    c = ok.pop()
    assert c is not None and (c.read_len, c.write_len) == (4, 4)


def test_packed_indirect_not_negotiated(mem: GuestMemory) -> None:
    """2.8.7: INDIRECT only when negotiated (``virtio-packed-indirect-not-negotiated``)."""
    no_ind = FEATURES & ~(1 << lib.VIRTIO_RING_F_INDIRECT_DESC)
    dev, drv = make_packed(mem, 9, size=5, features=no_ind)
    drv.write_indirect(TABLE, [(DATA_LOW, 4, 0, 0)])
    _post_raw(drv, [(TABLE, 16, 0, F_INDIRECT)])
    with pytest.raises(SyncError, match="INDIRECT not negotiated") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED
    ok, odrv = make_packed(mem, 11, size=5)  # negotiated: the same table is fine
    odrv.write_indirect(TABLE, [(DATA_LOW, 4, 0, 0)])
    _post_raw(odrv, [(TABLE, 16, 0, F_INDIRECT)])
    c = ok.pop()
    assert c is not None and c.read_len == 4


def test_packed_id_twice_and_state(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 9, size=5)
    _post_raw(drv, [(DATA_LOW, 1, 2, 0), (DATA_LOW, 1, 2, 0)])
    assert dev.pop() is not None
    with pytest.raises(SyncError, match="still in flight"):
        dev.pop()
    dev2, _ = make_packed(mem, 13, size=5)
    assert dev2.close() == 0x8000  # index 0, wrap counter 1


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 9),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.booleans()), max_size=60),
)
def test_packed_legal_random(size: int, ops: list[tuple[int, int, bool]]) -> None:
    mem, _ = PACKED_MEM
    dev, drv = make_packed(mem, 12, size=size, sync=SyncKind.EVENT)
    pushed: dict[int, int] = {}
    popped = []
    for kind, n, flag in ops:
        # (a legal driver never builds an indirect list longer than the queue: 2.8)
        if kind == 0 and drv.num_free >= (1 if flag else n) and drv._free_ids and n <= size:
            drv.add_chain([(DATA_LOW, 8)] * (n - 1), [(DATA_HIGH, 16)], indirect=flag)
        elif kind == 1:
            drv.publish()
        elif kind == 2:
            while (c := dev.pop()) is not None:
                popped.append(c)
        else:
            for c in popped:
                dev.push(c.head, 16 if flag else 0)
                pushed[c.head] = 16 if flag else 0
            popped.clear()
            dev.flush_used()
            dev.should_notify()
            for bid, ln in drv.get_used():
                assert pushed.pop(bid) == ln
    assert dev.defunct is None
    dev.close()
    drv.close()


PACKED_MEM = make_memory()
