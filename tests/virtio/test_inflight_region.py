"""The split queue region of the inflight buffer (vdev/virtio/inflight.py) against a model.

The model is the spec's meaning, kept independently: a head is in flight from the moment it
is popped until the used idx that covers it was stored; recovery resubmits exactly the heads
in flight, in the order they were popped.  A crash can come between any two steps, the
interesting one being after the used idx store and before the batch's flags were cleared
(vhost-user.rst "When reconnecting", step 1).  The front-end can write the region, so each
field recovery reads is also corrupted once and must be refused by name.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_virtio_packed import make_packed
from virtio_helpers import DATA_LOW

from vdev.skywalk.errors import SyncKind
from vdev.virtio.inflight import (
    SPLIT_DESC,
    SPLIT_HDR,
    InflightError,
    PackedInflight,
    SplitInflight,
    queue_region_size,
)
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import PackedQueue

SIZE = 8


def region(buf: bytearray | None = None, size: int = SIZE) -> tuple[bytearray, SplitInflight]:
    buf = buf if buf is not None else bytearray(queue_region_size(size))
    return buf, SplitInflight(memoryview(buf), size)


def test_sizes_follow_the_spec_layout() -> None:
    assert (SPLIT_HDR, SPLIT_DESC) == (16, 16)
    assert queue_region_size(256) % 64 == 0
    # Room for the packed layout (32-byte entries after a 29-byte header) too.
    assert queue_region_size(256) >= 29 + 32 * 256 > 16 + 16 * 256
    assert queue_region_size(1) == 64


def test_fresh_region_is_initialised_and_resubmits_nothing() -> None:
    _buf, r = region()
    assert r.recover(used_idx=7) == []
    assert r.hdr.version == 1 and r.hdr.desc_num == SIZE and r.hdr.used_idx == 7


def test_crash_after_the_used_idx_store_clears_the_last_batch() -> None:
    buf, r = region()
    r.recover(0)
    for h in (4, 1, 6, 2):
        r.popped(h)
    r.pushed(4)
    r.pushed(1)
    # The used idx became 2 in guest memory; the crash came before published().
    _, again = region(buf)
    assert again.recover(used_idx=2) == [6, 2]  # pop order, not head order
    assert again.hdr.used_idx == 2
    assert again.counter == 5  # continues after the largest counter seen


def test_crash_before_the_used_idx_store_resubmits_the_batch_too() -> None:
    buf, r = region()
    r.recover(0)
    for h in (4, 1, 6):
        r.popped(h)
    r.pushed(4)
    _, again = region(buf)
    assert again.recover(used_idx=0) == [4, 1, 6]


def test_rewound_heads_are_not_in_flight() -> None:
    buf, r = region()
    r.recover(0)
    r.popped(3)
    r.popped(5)
    r.rewound([5])
    _, again = region(buf)
    assert again.recover(0) == [3]


@pytest.mark.parametrize(
    ("poke", "message"),
    [
        (lambda r: setattr(r.hdr, "version", 2), "version 2"),
        (lambda r: setattr(r.hdr, "desc_num", SIZE + 1), "desc_num 9 != queue size 8"),
        (lambda r: setattr(r.desc[3], "inflight", 2), r"desc\[3\].inflight is 2"),
        (lambda r: setattr(r.desc[3], "counter", 1 << 63), r"desc\[3\].counter"),
        (lambda r: setattr(r.hdr, "last_batch_head", SIZE), "last batch list names head 8"),
        (lambda r: setattr(r.hdr, "used_idx", 0xFFF7), "is 9 behind"),  # SIZE + 1
    ],
)
def test_a_corrupted_region_is_refused_by_name(poke: object, message: str) -> None:
    buf, r = region()
    r.recover(0)
    r.popped(3)
    r.pushed(3)
    poke(r)  # type: ignore[operator]
    _, again = region(buf)
    with pytest.raises(InflightError, match=message):
        again.recover(used_idx=1 if "last batch" in message else 0)


def test_the_largest_accepted_values_pass() -> None:
    """The other side of the checks above: the boundary values are accepted."""
    buf0, r0 = region()
    r0.recover(0)
    r0.popped(2)
    r0.desc[2].counter = (1 << 63) - 1
    assert region(buf0)[1].recover(0) == [2]
    buf, r = region()
    r.recover(0)
    r.popped(SIZE - 1)
    r.desc[SIZE - 1].counter = (1 << 63) - 1
    r.pushed(SIZE - 1)
    _, again = region(buf)
    assert again.recover(used_idx=1) == []  # a batch of exactly one, head SIZE - 1
    buf2 = bytearray(queue_region_size(SIZE))
    _, r3 = region(buf2)
    r3.recover(0)
    for h in range(SIZE):
        r3.popped(h)
        r3.pushed(h)
    _, again = region(buf2)
    assert again.recover(used_idx=SIZE) == []  # a batch of the whole ring


ops = st.lists(st.sampled_from(["pop", "push", "publish", "rewind"]), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, 3))
def test_recovery_matches_the_model(seq: list[str], crash_step: int) -> None:
    """Random pop/push/publish/rewind sequences (an in-order device, as vdev is), then a crash
    at one of the four points of the next publish; the resubmitted heads are the model's."""
    buf, r = region()
    r.recover(0)
    free = list(range(SIZE))
    popped: list[int] = []  # in flight, pop order
    pushed: list[int] = []  # pushed since the last publish (a prefix of popped)
    used_idx = 0
    for op in seq:
        if op == "pop" and free:
            h = free.pop(0)
            r.popped(h)
            popped.append(h)
        elif op == "push" and len(pushed) < len(popped):
            h = popped[len(pushed)]
            r.pushed(h)
            pushed.append(h)
        elif op == "publish" and pushed:
            used_idx = (used_idx + len(pushed)) & 0xFFFF
            r.published(used_idx)
            for h in pushed:
                popped.remove(h)
                free.append(h)
            pushed = []
        elif op == "rewind" and len(popped) > len(pushed):
            h = popped.pop()
            r.rewound([h])
            free.insert(0, h)
    # The crash: 0 before anything of the publish, 1 after the used idx store, 2 after some
    # flags were cleared, 3 after all flags but before used_idx.
    ring_used = used_idx
    if pushed and crash_step >= 1:
        ring_used = (used_idx + len(pushed)) & 0xFFFF
        cleared = {2: pushed[:1], 3: pushed}.get(crash_step, [])
        for h in cleared:
            r.desc[h].inflight = 0
        popped = [h for h in popped if h not in pushed]
    _, again = region(buf)
    assert again.recover(used_idx=ring_used) == popped


# -- packed rings ------------------------------------------------------------------------


class Crash(Exception):
    pass


def _packed_with_region(mem: GuestMemory) -> tuple[PackedQueue, Any, bytearray]:
    dev, drv = make_packed(mem, 12, size=5, sync=SyncKind.TX)
    buf = bytearray(queue_region_size(5))
    dev.attach_inflight(PackedInflight(memoryview(buf), 5))
    return dev, drv, buf


def _restart(mem: GuestMemory, dev: PackedQueue, buf: bytearray) -> PackedQueue:
    again = PackedQueue(
        mem, 12, 5, dev.desc_addr, dev.driver_addr, dev.device_addr,
        features=dev.features, last_avail_idx=0x8000, sync=SyncKind.TX,
    )  # fmt: skip
    again.attach_inflight(PackedInflight(memoryview(buf), 5))
    return again


@pytest.mark.parametrize("crash_at", ["publishing", "published"])
def test_packed_crash_inside_a_publish(mem: GuestMemory, crash_at: str) -> None:
    """The window the two-phase position is for: the used descriptors are written (they
    overwrite the ring entries the driver posted) and the crash comes before the batch's
    first flags are stored (rolled back: the posted entries are restored from their copies
    and popped again, unchanged) or just after (committed: nothing is in flight)."""
    dev, drv, buf = _packed_with_region(mem)
    posted = [(DATA_LOW + 64 * i, 10 + i) for i in range(3)]
    data = [bytes([0xA0 + i]) * n for i, (_g, n) in enumerate(posted)]
    for (gpa, n), d in zip(posted, data, strict=True):
        mem.gpa_view(gpa, n)[:] = d
    ids = [drv.add_chain([seg]) for seg in posted]
    drv.publish()
    for _ in ids:
        c = dev.pop()
        assert c is not None
        dev.push(c.head, 0)
    region = dev.inflight
    assert region is not None
    real = getattr(region, crash_at)

    def crash(*args: int) -> None:
        real(*args)
        raise Crash

    setattr(region, crash_at, crash)
    with pytest.raises(Crash):
        dev.flush_used()
    again = _restart(mem, dev, buf)
    if crash_at == "publishing":
        assert again.resume.resubmitted == 3 and again.resume.resumed_at == 0x8000
        got = []
        while (c := again.pop()) is not None:
            got.append((c.head, bytes(c.read_bytes())))
        assert got == list(zip(ids, data, strict=True))
    else:
        assert again.resume.resubmitted == 0 and again.resume.resumed_at == 3 | 1 << 15
        assert again.pop() is None
    for q in (again, dev):
        q.close()


def _packed_in_flight(mem: GuestMemory, n: int) -> tuple[PackedQueue, bytearray]:
    dev, drv, buf = _packed_with_region(mem)
    for i in range(n):
        drv.add_chain([(DATA_LOW + 64 * i, 8)])
    drv.publish()
    for _ in range(n):
        assert dev.pop() is not None
    return dev, buf


@pytest.mark.parametrize(
    ("poke", "message"),
    [
        (lambda h, d: setattr(h, "version", 3), "version 3"),
        (lambda h, d: setattr(h, "desc_num", 4), "desc_num 4 != queue size 5"),
        (lambda h, d: setattr(h, "used_idx", 5), "used_idx 5 >= queue size 5"),
        (lambda h, d: setattr(h, "old_used_wrap_counter", 2), "old_used_wrap_counter is 2"),
        (lambda h, d: setattr(h, "free_head", 5 | 1 << 15), "free_head index 5 >= queue size 5"),
        # avail a lap and one entry past the used position: more than the ring holds.
        (lambda h, d: setattr(h, "free_head", 1), "free_head is 6 entries past"),
        (lambda h, d: setattr(d[1], "num", 2), r"desc\[1\] does not start a chain of 1..1"),
        (lambda h, d: setattr(d[0], "inflight", 0), r"desc\[0\] does not start a chain"),
    ],
)
def test_a_corrupted_packed_region_is_refused_by_name(
    mem: GuestMemory, poke: Any, message: str
) -> None:
    dev, buf = _packed_in_flight(mem, 2)
    r = PackedInflight(memoryview(buf), 5)
    poke(r.hdr, r.desc)
    with pytest.raises(InflightError, match=message):
        _restart(mem, dev, buf)
    dev.close()


def test_a_full_packed_ring_in_flight_is_accepted(mem: GuestMemory) -> None:
    """The other side of 'entries past': exactly the ring size in flight resumes all."""
    dev, buf = _packed_in_flight(mem, 5)
    again = _restart(mem, dev, buf)
    assert again.resume.resubmitted == 5 and again.resume.resumed_at == 0x8000
    for q in (again, dev):
        q.close()
