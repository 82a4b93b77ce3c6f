"""The compiled pool bulk loops (poolbatch.c) against pool.py's and ring.py's Python loops.

Hypothesis drives one random sequence of allocations (1..max_frags buflets, some packets
given large buffers), frees (including double frees, out-of-range and client-held packets),
kernel-held checks and RX enqueues through two identical pools, one with ``pool.FAST``
unbound (the reference) and one bound to the compiled loops.  Every return value and error,
every trusted array, the free lists (in order: they decide what the next allocation gets),
the owner sets, the statistics and the metadata redzones must match after every step.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.skywalk import Pbufpool, fastglue, validate
from vdev.skywalk import pool as pool_mod
from vdev.skywalk.arena import MD_W64, NO_INDEX, MdOff
from vdev.skywalk.ring import RING_RX, KernelRing

pytestmark = pytest.mark.skipif(
    not validate.fast_available(), reason="compiled fast path unavailable (no compiler?)"
)

SETTINGS = settings(
    max_examples=int(os.environ.get("VDEV_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
ARRAYS = [name for name, _ in fastglue.POOL_ARRAYS]


@pytest.fixture(autouse=True)
def _every_batch_through_c() -> Iterator[None]:
    prev, prev_min = pool_mod.FAST, fastglue.C_MIN_POOL_BATCH
    fastglue.C_MIN_POOL_BATCH = 1
    yield
    pool_mod.FAST, fastglue.C_MIN_POOL_BATCH = prev, prev_min


def _state(p: Pbufpool, ring: KernelRing) -> dict[str, Any]:
    out: dict[str, Any] = {name: bytes(getattr(p, name)) for name in ARRAYS}
    out["free"] = (list(p._free_pkts), list(p._free_ext), list(p._free_large))
    out["owners"] = {k: sorted(v) for k, v in p.owners.items() if v}
    out["stats"] = p.stats_dict()
    out["redzones"] = [p.arena.md64[i * MD_W64 + MdOff.REDZONE_W64] for i in range(p.num_packets)]
    out["ring"] = (ring.ktail, list(ring.ksd))
    return out


step = st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 12), st.integers(1, 4)),
    st.tuples(st.just("free"), st.lists(st.integers(0, 40), max_size=10)),
    st.tuples(st.just("check"), st.lists(st.integers(0, 40), max_size=10)),
    st.tuples(st.just("enqueue"), st.lists(st.integers(0, 31), max_size=12), st.integers(0, 3)),
    st.tuples(st.just("large"), st.integers(0, 40)),
    st.tuples(st.just("redzone"), st.integers(0, 31)),
    st.tuples(st.just("hold"), st.integers(0, 40)),
)


def _play(steps: list[tuple[Any, ...]], fast: bool) -> list[Any]:
    p = Pbufpool(num_packets=32, buf_size=256, max_frags=4, num_buflets=40, num_large_bufs=4)
    ring = KernelRing(p, RING_RX, 8, 1, 7)
    pool_mod.FAST = fastglue if fast else None
    held: list[int] = []  # packets allocated, in allocation order
    clients: list[int] = []  # packets a client (owner 99) holds
    log: list[Any] = []
    try:
        for s in steps:
            op = s[0]
            try:
                if op == "alloc":
                    got = p.alloc_packets(s[1], min(s[2], p.max_frags))
                    held += got
                    log.append(got)
                elif op == "free":  # some may be client-held: refused, nothing freed
                    pick = held + clients
                    idxs = [pick[i % len(pick)] if pick else i for i in s[1]]
                    p.free_packets(idxs)
                    held = [h for h in held if h not in idxs]
                elif op == "check":
                    pick = held + clients
                    p.check_kernel_held([pick[i % len(pick)] if pick else i for i in s[1]])
                elif op == "enqueue":  # kernel-held packets onto the RX ring (now its own)
                    pkts = list(dict.fromkeys(held[i % len(held)] for i in s[1])) if held else []
                    start = min(s[2], len(pkts))
                    took = ring.rx_enqueue(pkts, start)
                    held = [h for h in held if h not in pkts[start : start + took]]
                    log.append(took)
                elif op == "large" and held:
                    idx = held[s[1] % len(held)]  # give its buf0 a large buffer, as the device does
                    if p._free_large and not p.b_large[idx]:
                        p.b_buf[idx] = p._free_large.pop()
                        p.b_large[idx] = 1
                elif op == "redzone":
                    p.arena.md64[s[1] * MD_W64 + MdOff.REDZONE_W64] ^= 1
                elif op == "hold" and held:  # a client holds it now (purged at the end)
                    idx = held[s[1] % len(held)]
                    p.owner_insert(99, idx)
                    held.remove(idx)
                    clients.append(idx)
            except (pool_mod.PoolError, IndexError) as exc:
                log.append((type(exc).__name__, str(exc)))
            log.append(_state(p, ring))
        # Release by the trusted path too (free_taken: no ownership checks).
        for owner in list(p.owners):
            p.owner_purge(owner)
        ring.reclaim()
        log.append(_state(p, ring))
    finally:
        ring.release()
        p.close()
    return log


@SETTINGS
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_bulk_loops_match_python(steps: list[tuple[Any, ...]]) -> None:
    assert _play(steps, True) == _play(steps, False)


def test_release_reports_double_free_after_freeing_the_prefix() -> None:
    for fast in (False, True):
        pool_mod.FAST = fastglue if fast else None
        p = Pbufpool(num_packets=16, max_frags=2)
        a = p.alloc_packets(3, nbufs=2)
        p.free_packets([a[2]])
        with pytest.raises(pool_mod.PoolError, match=f"packet {a[2]} freed twice"):
            p.free_taken([a[0], a[1], a[2]])
        assert p.stats.in_use == 0  # the two before the double free were released
        assert p._free_pkts[-2:] == [a[0], a[1]]
        assert p.audit() == []
        p.close()


def test_rx_enqueue_wraps_and_stops_at_room() -> None:
    pool_mod.FAST = fastglue
    p = Pbufpool(num_packets=16)
    ring = KernelRing(p, RING_RX, 4, 1, 7)
    ring.ktail = ring.khead = 2
    assert ring.rx_enqueue([5, 6, 7, 8, 9], 1) == 3  # 3 slots usable of 4
    assert ring.ktail == 1 and list(ring.ksd) == [8, NO_INDEX, 6, 7]
    ring.ksd[0:4] = array("I", [NO_INDEX] * 4)  # not pool packets: nothing to reclaim
    ring.release()
    p.close()
