"""Ring- and interrupt-level faults through VirtioNet._push/_maybe_notify on fake queues."""

from __future__ import annotations

import random

from faults_helpers import make_ring_bench

from vdev.abi import lib


def test_out_of_order_swaps_with_next_and_times_out() -> None:
    rb = make_ring_bench()
    rule = rb.nf.out_of_order(queue="tx", every=2)
    rb.complete(1, [0, 1, 2, 3, 4])
    q = rb.queues[1]
    # 1 (2nd candidate) goes out behind 2; 2 is not a candidate (it carried 1); 4 is held.
    assert q.calls == [("push", 0, 0), ("push", 2, 0), ("push", 1, 0), ("push", 3, 0), ("flush",)]
    assert rule.hits == 2
    rb.bench.clock.advance(0.002)  # 4 was held with nothing behind it: published alone
    assert q.calls[-2:] == [("push", 4, 0), ("flush",)]
    assert rb.irqs(1) == 1


def test_out_of_order_not_with_in_order() -> None:
    rb = make_ring_bench()
    rb.nic.negotiated |= 1 << lib.VIRTIO_F_IN_ORDER
    rule = rb.nf.out_of_order(queue="tx")
    rb.complete(1, [0, 1, 2])
    assert [c[1] for c in rb.queues[1].calls if c[0] == "push"] == [0, 1, 2]
    assert rule.hits == 0


def test_bad_used_id_modes() -> None:
    """The bogus id is pinned per mode against an independent model of the draw (the rule's
    random.Random(str(seed)): first the out-of-range offset, then, for not_outstanding, an
    index into the ids neither in flight nor the head), not just "one of the idle ones".

    Mutations killed (tools/mutants/section5.toml ``ring-*``): the idle list keeping buffers
    still in flight, or keeping the head; out-of-range ids starting inside the ring.  The
    old ``bogus in (0, 1, 2)`` accepted 3 of the 7 ids a mutated pick could return.
    """
    size = 8  # FakeQueue: every id starts in flight
    rb = make_ring_bench()
    nf = rb.nf
    with nf.bad_used_id(queue="rx", nth=2, seed=5) as rule:
        rb.complete(0, [0, 1, 2], written=100)
    model = random.Random("5")
    out_of_range = size + model.randrange(size)
    assert out_of_range == 13 and out_of_range >= size
    assert rb.queues[0].calls == [
        ("push", 0, 100),
        ("push", 1, 100),
        ("raw", out_of_range, 100),
        ("push", 2, 100),
        ("flush",),
    ]
    assert rule.hits == 1
    rb.queues[0].calls.clear()
    with nf.bad_used_id(queue="rx", mode="not_outstanding", nth=1, replace=True, seed=5):
        rb.complete(0, [3])
    # Model: 0, 1, 2 completed above; 3 is the head; 4..7 are still in flight.
    model = random.Random("5")
    model.randrange(size)  # the out-of-range draw comes first in every mode
    idle = [0, 1, 2]
    want = idle[model.randrange(len(idle))]
    ((kind, bogus, _), _flush) = rb.queues[0].calls
    assert (kind, bogus) == ("raw", want)
    assert not rb.queues[0]._inflight[bogus]  # not outstanding: the driver has it back
    assert rb.queues[0]._inflight[3]  # replaced: the real buffer is never returned
    # Every draw of the mode stays outside the in-flight set, for many seeds.  nth=3: head
    # 0 is no candidate (no idle id yet, the precondition), heads 1, 2, 3 are.
    for seed in range(40):
        rb2 = make_ring_bench()
        with rb2.nf.bad_used_id(queue="rx", mode="not_outstanding", nth=3, seed=seed):
            rb2.complete(0, [0, 1, 2, 3], written=10)
        (raw,) = [c for c in rb2.queues[0].calls if c[0] == "raw"]
        m = random.Random(str(seed))
        m.randrange(size)
        assert raw[1] == [0, 1, 2][m.randrange(3)], seed


def test_not_outstanding_waits_for_an_id_the_driver_cannot_hold() -> None:
    """The precondition of mode=not_outstanding: an element counts as a candidate only when
    some id is neither the head, nor in flight, nor in an avail slot (an id the driver
    posted may still be outstanding for it).  Model: FakeQueue starts with every id in
    flight, so for head 0 there is no such id; for head 1, id 0 (just completed) is the only
    one; with 0 posted in the avail ring, the first usable id is 1, at head 2.  Without the
    precondition, nth=1 fired on head 0 with an out-of-range id: another signature."""
    rb = make_ring_bench()
    with rb.nf.bad_used_id(queue="rx", mode="not_outstanding", nth=1, seed=3) as rule:
        rb.complete(0, [0, 1, 2], written=10)
    assert rb.queues[0].calls == [
        ("push", 0, 10),
        ("push", 1, 10),
        ("raw", 0, 10),
        ("push", 2, 10),
        ("flush",),
    ]
    assert (rule.seen, rule.hits) == (2, 1)  # heads 1 and 2 were candidates, 0 was not
    rb2 = make_ring_bench()
    rb2.queues[0].avail_heads = lambda: {0}  # type: ignore[attr-defined]
    with rb2.nf.bad_used_id(queue="rx", mode="not_outstanding", nth=1, seed=3) as rule2:
        rb2.complete(0, [0, 1, 2], written=10)
    raws = [c for c in rb2.queues[0].calls if c[0] == "raw"]
    assert raws == [("raw", 1, 10)] and (rule2.seen, rule2.hits) == (1, 1)
    rb3 = make_ring_bench()
    rb3.queues[0].avail_heads = lambda: set(range(8))  # type: ignore[attr-defined]
    with rb3.nf.bad_used_id(queue="rx", mode="not_outstanding", every=1, seed=3) as rule3:
        rb3.complete(0, [0, 1, 2, 3], written=10)
    assert not [c for c in rb3.queues[0].calls if c[0] == "raw"]
    assert (rule3.seen, rule3.hits) == (0, 0)


def test_double_complete_and_lying_lengths() -> None:
    rb = make_ring_bench()
    nf = rb.nf
    with nf.double_complete(queue="rx", nth=1):
        rb.complete(0, [0], written=60)
    assert rb.queues[0].calls[:2] == [("push", 0, 60), ("raw", 0, 60)]
    rb.queues[0].calls.clear()
    with nf.bad_used_len(queue="rx", nth=1) as huge:
        rb.complete(0, [1], written=60)
    assert rb.queues[0].calls[:2] == [("push", 1, 60), ("patch", 1500 + 4096)]
    rb.queues[0].calls.clear()
    with nf.bad_used_len(queue="rx", mode="zero", every=1):
        rb.complete(0, [2], written=60)
        rb.complete(1, [0])  # TX: already 0, nothing to lie about (and queue=rx anyway)
    assert rb.queues[0].calls[:2] == [("push", 2, 60), ("patch", 0)]
    assert huge.hits == 1
    kinds = [
        e.kind for e in rb.bench.engine.log.events if e.kind not in ("rule_add", "rule_remove")
    ]
    assert kinds == ["double_complete", "bad_used_len", "bad_used_len"]


def test_delay_used_keeps_order_and_publishes_late() -> None:
    rb = make_ring_bench()
    rule = rb.nf.delay_used(queue="tx", nth=2, ms=10)
    rb.complete(1, [0, 1, 2])
    q = rb.queues[1]
    assert q.calls == [("push", 0, 0), ("flush",)]
    assert rb.nf.ring.held() == 2
    rb.bench.clock.advance(0.009)
    assert len(q.calls) == 2
    rb.bench.clock.advance(0.002)
    assert q.calls[2:] == [("push", 1, 0), ("push", 2, 0), ("flush",)]
    assert rb.irqs(1) == 1 and rule.hits == 1


def test_stall_window_then_kick() -> None:
    rb = make_ring_bench()
    rule = rb.nf.stall(queue="tx", seconds=0.5)
    assert rb.nic._stalled(1) and not rb.nic._stalled(0)
    assert rb.nic.process_tx(1) == 0
    rb.bench.clock.advance(0.49)
    assert rb.nic._stalled(1)
    rb.bench.clock.advance(0.02)
    assert not rb.nic._stalled(1)
    assert rb.kicks == [1]  # the queue is looked at again when the stall ends
    assert rule.hits == 1
    kinds = [e.kind for e in rb.bench.engine.log.events]
    assert kinds == ["rule_add", "stall", "stall_end"]
    with rb.nf.stall(queue="rx"):  # until removed
        rb.bench.clock.advance(100)
        assert rb.nic._stalled(0)
    assert not rb.nic._stalled(0) and rb.kicks == [1, 0]


def test_interrupt_faults() -> None:
    rb = make_ring_bench()
    nf = rb.nf
    with nf.suppress_irq(queue="rx", every=2) as r:
        assert [rb.irq(0) for _ in range(4)] == [1, 0, 1, 0]
        assert rb.irq(0, wanted=False) == 0
    assert r.hits == 2
    with nf.delay_irq(queue="rx", ms=5):
        assert rb.irq(0) == 0
        rb.bench.clock.advance(0.006)
        assert rb.irqs(0) == 3  # 2 from before + the delayed one
    with nf.spurious_irq(queue="tx", extra=2):
        assert rb.irq(1) == 3
        assert rb.irq(1, wanted=False) == 2
    with nf.ignore_event_idx(queue="tx") as r:
        assert rb.irq(1, wanted=False) == 1
        assert rb.irq(1, wanted=True) == 1
    assert r.hits == 1


def test_spurious_interrupt_timer() -> None:
    rb = make_ring_bench()
    with rb.nf.spurious_irq(queue="both", interval_ms=100) as rule:
        rb.bench.clock.advance(0.35)
    rb.bench.clock.advance(1.0)  # removed: no more
    assert (rb.irqs(0), rb.irqs(1)) == (3, 3)
    assert rule.hits == 6
