"""Pbufpool's reports and spare buflets, against hand-built expectations: the leak report's
and the audit's words (what an operator reads when a pool closed dirty), and
``alloc_buflets`` handing out clean spares without touching any packet's chain.

Mutations killed (mutmut, ``vdev.skywalk.pool``, 2026-12-03 sample ``pool:3``):
``LeakReport.__str__``'s owner list, audit separator and "(+N more)" suffix,
``check``'s message and its first-eight cut, ``close``'s warning line, ``alloc_buflets``
resetting another index than the spare's and counting failures down, ``audit``'s large
buffer checks (``and`` for ``or``, ``not in``, ``0 <``, the holder's name), its out-of-range
cut, "free and off", a chain naming buflet ``num_buflets``, ``owner_holds`` with ``or`` or
``<=``, ``ring_release`` rounding with ``/`` or ``// 65`` or keying by None, ``ring_alloc``'s
message.

The whole-module run's survivors (2026-12-04, numbered on cf2739b; benchmarks/RESULTS.md has
the names) are killed by the tests from "the survivors classified" on: the 16- and 32-bit
widths of the trusted arrays, arrays sized for an odd packet count, the ring region sized
from ``num_ring_slots``, the free lists' names, a spare holding a large buffer, the default
chain when the large buffers are gone, redzone faults adding up, and ``_release`` refusing
an index outside the pool (a negative one used to free the last packet: a bug, fixed), with
the release of index ``num_packets`` in ``test_releasing_an_index_past_the_pool_...``.
"""

from __future__ import annotations

import logging
import mmap

import pytest

from vdev.abi import ffi, lib
from vdev.skywalk import Pbufpool, validate
from vdev.skywalk.arena import NO_INDEX
from vdev.skywalk.errors import PoolError
from vdev.skywalk.pool import LeakReport

from . import hostile as H


def test_leak_report_words() -> None:
    rep = LeakReport(
        packets=[1, 2, 3],
        by_owner={3: 2, -1: 1},
        buflets=[5],
        buflets_in_use=2,
        large_in_use=1,
        problems=[f"p{i}" for i in range(7)],
    )
    assert str(rep) == (
        "3 packets leaked (owner -1: 1, owner 3: 2), 1 spare buflets, 2 external buflets "
        "and 1 large buffers not on the free lists; audit: p0; p1; p2; p3; p4 (+2 more)"
    )
    rep.problems = rep.problems[:5]  # five shown, none left over
    assert str(rep).endswith("; audit: p0; p1; p2; p3; p4")
    rep.problems = [f"p{i}" for i in range(6)]  # six: one left over
    assert str(rep).endswith("; audit: p0; p1; p2; p3; p4 (+1 more)")
    assert str(LeakReport()) == "no leaks"


def _broken(pool: Pbufpool, n: int) -> list[str]:
    """Mark the ``n`` packets on top of the free list allocated behind its back."""
    top = list(pool._free_pkts)[-n:]
    for idx in top:
        pool.pkt_state[idx], pool.pkt_nbufs[idx] = 1, 1
    return [f"packet {idx} is allocated and on the free list" for idx in sorted(top)]


def test_check_names_the_first_eight_problems() -> None:
    pool = Pbufpool(num_packets=16, max_frags=1)
    problems = _broken(pool, 9)
    assert pool.audit() == problems
    with pytest.raises(PoolError) as info:
        pool.check()
    assert str(info.value) == "pool accounting broken: " + "; ".join(problems[:8])
    for idx in range(16):
        pool.pkt_state[idx], pool.pkt_nbufs[idx] = 0, 0
    pool.close()


def test_closing_a_leaking_pool_warns_with_the_report(caplog: pytest.LogCaptureFixture) -> None:
    pool = Pbufpool(num_packets=8, max_frags=1)
    assert pool.packet_from_bytes(b"x" * 10) is not None
    with caplog.at_level(logging.WARNING, logger="vdev.skywalk"):
        rep = pool.close()
    assert rep.leaked
    assert [r.getMessage() for r in caplog.records] == [f"pbufpool closed with leaks: {rep}"]


def test_spare_buflets_come_back_clean_and_leave_packets_alone() -> None:
    pool = Pbufpool(num_packets=8, buf_size=64, max_frags=4, num_buflets=8)
    p = pool.num_packets
    data = bytes(range(200))
    first = pool.packet_from_bytes(data)  # 4 buflets: the inline one and 3 external
    assert first is not None
    used = pool.packet_from_bytes(bytes(150))  # 3 buflets, then freed: dirty windows
    assert used is not None
    pool.free_packets([used])
    failures = pool.stats.alloc_failures
    spares = pool.alloc_buflets(8)
    assert len(spares) == 5  # 8 external buflets, 3 still in ``first``'s chain
    assert pool.stats.alloc_failures == failures + 3
    for j in spares:
        assert (pool.b_doff[p + j], pool.b_dlen[p + j], pool.b_next[p + j]) == (0, 0, NO_INDEX)
    assert pool.packet_bytes(first) == data
    assert pool.audit() == []
    pool.free_buflets(spares)
    pool.free_packets([first])
    assert not pool.close().leaked


# -- audit: each accounting fault named (the audit is what close() and the tests trust) ----
def _large_pool() -> tuple[Pbufpool, list[int]]:
    """4 packets, each on one of the 4 large buffers (buffer 0 among them)."""
    pool = Pbufpool(num_packets=8, buf_size=64, max_frags=2, num_large_bufs=4,
                    large_buf_size=1024)  # fmt: skip
    pkts = [pool.packet_from_bytes(bytes([i]) * 500) for i in range(4)]
    assert None not in pkts
    held = sorted(pool.b_buf[p] for p in pkts)  # type: ignore[index]
    assert held == [0, 1, 2, 3] and all(pool.b_large[p] for p in pkts)  # type: ignore[index]
    return pool, pkts  # type: ignore[return-value]


def test_a_sound_pool_with_every_large_buffer_held_audits_clean() -> None:
    pool, pkts = _large_pool()
    assert pool.audit() == []
    pool.free_packets(pkts)
    assert pool.audit() == []
    pool.close()


def test_a_large_buffer_held_twice_is_named_with_both_holders() -> None:
    pool, pkts = _large_pool()
    a, b = pkts[0], pkts[1]
    lb = pool.b_buf[a]
    pool.b_buf[b] = lb  # b now claims a's buffer; b's own buffer is lost
    lost = sorted({0, 1, 2, 3} - {pool.b_buf[p] for p in pkts})
    assert pool.audit() == [
        f"large buffer {lb}: held by packet {b} and by packet {a}",
        f"{len(lost)} large buffers neither free nor held (lost): {lost}",
    ]


def test_a_held_large_buffer_also_on_the_free_list_is_named() -> None:
    pool, pkts = _large_pool()
    a = pkts[2]
    pool._free_large.append(pool.b_buf[a])
    assert pool.audit() == [
        f"large buffer {pool.b_buf[a]}: held by packet {a} and by the free list"
    ]


def test_a_large_buffer_index_out_of_range_is_named() -> None:
    pool, pkts = _large_pool()
    a = pkts[3]
    old = pool.b_buf[a]
    pool.b_buf[a] = 4  # one past the last large buffer
    assert pool.audit() == [
        f"large buffer 4: held by packet {a} and by range",
        f"1 large buffers neither free nor held (lost): [{old}]",
    ]


def test_free_list_faults_are_named() -> None:
    pool = Pbufpool(num_packets=8, max_frags=1)
    off = [pool._free_pkts.pop() for _ in range(6)]  # free, but off the list
    for bogus in range(100, 106):
        pool._free_pkts.append(bogus)
    assert pool.audit() == [
        "packet free list holds out-of-range [100, 101, 102, 103, 104]",
        *(f"packet {i} is free and off the free list" for i in sorted(off)),
    ]


def test_owner_holds_only_the_owners_allocated_packets() -> None:
    pool = Pbufpool(num_packets=4, max_frags=1)
    p = pool.packet_from_bytes(b"x")
    assert p is not None
    pool.pkt_owner[p] = 7
    assert pool.owner_holds(7, p)
    assert not pool.owner_holds(8, p)
    free = next(i for i in range(4) if i != p)
    pool.pkt_owner[free] = 7  # a stale owner on a free packet: not held
    assert not pool.owner_holds(7, free)
    for idx in (-1, 4, 1 << 32):  # outside the pool: no, never an IndexError
        assert not pool.owner_holds(7, idx)


# -- the ring region -----------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [100, 4096, 4100])
def test_a_released_ring_area_is_reused_for_the_same_size(nbytes: int) -> None:
    pool = Pbufpool(num_packets=8, max_frags=1, num_ring_slots=2048)
    a = pool.ring_alloc(nbytes)
    b = pool.ring_alloc(nbytes)
    assert b - a == (nbytes + 63) // 64 * 64  # 64-byte granules
    pool.ring_release(a, nbytes)
    assert pool.ring_alloc(nbytes) == a
    pool.close()


def test_a_full_ring_region_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=8, max_frags=1, num_ring_slots=64)
    size = pool.arena.layout.ring_region_size
    with pytest.raises(PoolError) as info:
        for _ in range(size // 64 + 1):
            pool.ring_alloc(64)
    assert str(info.value) == f"ring region full ({size} bytes); raise num_ring_slots"
    pool.close()


def test_a_chain_naming_the_buflet_past_the_last_is_named() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4)
    p = pool.packet_from_bytes(bytes(100))  # the inline buflet and one external
    assert p is not None
    j = pool.b_next[p]
    pool.b_next[p] = 4  # num_buflets: one past the last external buflet
    assert pool.audit() == [
        f"packet {p}: chain names buflet 4 out of range",
        f"packet {p}: chain of 1 buflets, nbufs says 2",
        f"1 buflets neither free nor held (lost): [{j}]",
    ]


def test_spares_and_chained_large_buffers_audit_clean() -> None:
    """Spare buflets are held (by the spares), and a large buffer on an external buflet of
    a packet's chain is held by that packet."""
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4,
                    num_large_bufs=2, large_buf_size=256)  # fmt: skip
    p = pool.packet_from_bytes(bytes(400))  # two large buffers: inline and external buflet
    assert p is not None and pool.b_large[p] and pool.b_large[pool.num_packets + pool.b_next[p]]
    spares = pool.alloc_buflets(2)
    assert len(spares) == 2
    assert pool.audit() == []
    pool.free_buflets(spares)
    pool.free_packets([p])
    assert pool.audit() == []


def test_a_chain_through_a_spare_buflet_is_named() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4)
    p = pool.packet_from_bytes(bytes(100))
    assert p is not None
    j0 = pool.b_next[p]
    (j,) = pool.alloc_buflets(1)
    pool.b_next[p] = j
    assert pool.audit() == [
        f"buflet {j}: in the chain of packet {p} and held by the spares",
        f"packet {p}: chain of 1 buflets, nbufs says 2",
        f"1 buflets neither free nor held (lost): [{j0}]",
    ]


def test_free_buflets_holding_large_buffers_are_named_first_eight() -> None:
    pool = Pbufpool(num_packets=12, max_frags=2, num_buflets=4)
    p = pool.num_packets
    ext = list(pool._free_ext)
    stale = list(range(9)) + [p + j for j in ext[:2]]  # free packets' and free buflets'
    for g in stale:
        pool.b_large[g] = 1
    assert pool.audit() == [f"free buflets still hold large buffers: {sorted(stale)[:8]}"]
    only_ext = Pbufpool(num_packets=12, max_frags=2, num_buflets=4)
    g = only_ext.num_packets + next(iter(only_ext._free_ext))
    only_ext.b_large[g] = 1
    assert only_ext.audit() == [f"free buflets still hold large buffers: [{g}]"]


def test_leaks_count_the_packets_of_each_owner() -> None:
    pool = Pbufpool(num_packets=8, max_frags=1)
    pkts = [pool.packet_from_bytes(b"x") for _ in range(4)]
    assert None not in pkts
    for p, owner in zip(pkts, (5, 7, 5, 5), strict=True):
        pool.pkt_owner[p] = owner  # type: ignore[index]
    rep = pool.leaks()
    assert (rep.packets, rep.by_owner) == (sorted(pkts), {5: 3, 7: 1})  # type: ignore[type-var]


def test_every_large_exhaustion_is_counted() -> None:
    """A frame that needs large buffers (more than max_frags default ones) when none is left:
    None, and one alloc failure each time."""
    pool = Pbufpool(num_packets=8, buf_size=64, max_frags=2, num_large_bufs=1,
                    large_buf_size=512)  # fmt: skip
    assert pool.packet_from_bytes(bytes(300)) is not None
    base = pool.stats.alloc_failures
    for k in (1, 2, 3):
        assert pool.packet_from_bytes(bytes(300)) is None
        assert pool.stats.alloc_failures == base + k


def test_a_vnet_header_of_another_length_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=8, max_frags=1)
    with pytest.raises(PoolError) as info:
        pool.packet_from_bytes(b"x", vnet=bytes(10))
    assert str(info.value) == "vnet header must be 12 bytes, got 10"


def test_alloc_failures_accumulate_over_shortfalls() -> None:
    pool = Pbufpool(num_packets=4, max_frags=1)
    assert len(pool.alloc_packets(5)) == 4
    assert pool.stats.alloc_failures == 1
    assert pool.alloc_packets(2) == []
    assert pool.stats.alloc_failures == 3


# -- the batch checks, under both backends (the compiled one words its verdicts in pool.py) --
@pytest.mark.usefixtures("backend")
def test_a_client_held_packet_in_a_kernel_batch_is_named_with_its_owner() -> None:
    pool = Pbufpool(num_packets=8, max_frags=1)
    pkts = [pool.packet_from_bytes(b"x") for _ in range(3)]
    assert None not in pkts
    pool.pkt_owner[pkts[1]] = 7  # type: ignore[index]
    with pytest.raises(PoolError) as info:
        pool.check_kernel_held(pkts)  # type: ignore[arg-type]
    assert str(info.value) == f"packet {pkts[1]} is held by owner 7"


@pytest.mark.usefixtures("backend")
def test_releasing_an_index_past_the_pool_fails_alike_on_both_backends() -> None:
    """A trusted-caller bug: the Python loop's bytearray IndexError, and the compiled path
    raises the same words."""
    pool = Pbufpool(num_packets=8, max_frags=1)
    p = pool.packet_from_bytes(b"x")
    assert p is not None
    for past in (pool.num_packets, p + 100):  # one past the last packet, and far past
        with pytest.raises(IndexError) as info:
            pool._release([p, past])
        assert str(info.value) == "bytearray index out of range"
        assert pool.stats.in_use == 0  # the packet before the fault was freed
        p = pool.packet_from_bytes(b"x")
        assert p is not None


def test_the_defaults_are_the_documented_ones() -> None:
    """docs/skywalk.md: Pbufpool(num_packets=4096, buf_size=2048, max_frags=4,
    num_buflets=None, num_large_bufs=0, large_buf_size=16384, num_ring_slots=8192)."""
    pool = Pbufpool()
    c = pool.config
    got = (c.num_packets, c.buf_size, c.max_frags, c.num_buflets, c.num_large_bufs,
           c.large_buf_size, c.num_ring_slots)  # fmt: skip
    assert got == (4096, 2048, 4, None, 0, 16384, 8192)
    assert pool.num_packets == 4096
    pool.close()


@pytest.mark.usefixtures("backend")
def test_an_l2_len_above_32767_in_a_large_first_buffer_is_adopted() -> None:
    """``l2_len`` is a 16-bit field (struct sk_packet); inside a 64 KiB large buffer any
    value with headroom + l2_len below the buffer size passes the L2_LEN check."""
    pool = Pbufpool(num_packets=4, buf_size=2048, max_frags=1, num_large_bufs=2,
                    large_buf_size=65536)  # fmt: skip
    p = pool.packet_from_bytes(bytes(3000))  # one large buffer
    assert p is not None and pool.b_large[p]
    validate.externalize(pool, p)
    H.pkt(pool.arena, p).l2_len = 40000
    assert validate.internalize(pool, p) is None
    assert pool.pkt_l2[p] == 40000


# -- whole-module run of pool.py (2026-12-03, second session) --------------------------------
def test_freeing_a_buflet_that_is_not_a_spare_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4)
    (j,) = pool.alloc_buflets(1)
    others = [k for k in range(4) if k != j]
    with pytest.raises(PoolError) as info:
        pool.free_buflets([j, others[0]])
    assert str(info.value) == f"buflet {others[0]} is not a spare allocated buflet"
    assert pool.stats.buflets_in_use == 1  # nothing freed: the check runs before any free
    pool.free_buflets([j])
    assert not pool.close().leaked


def test_freeing_spares_leaves_every_packets_large_buffer_alone() -> None:
    """Spare ``j`` is buflet ``num_packets + j``; the packets numbered below ``num_packets``
    each hold a large buffer, and freeing every spare must not touch them."""
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=1, num_buflets=4, num_large_bufs=4,
                    large_buf_size=256)  # fmt: skip
    data = {pool.packet_from_bytes(bytes([i + 1]) * 200): bytes([i + 1]) * 200 for i in range(4)}
    assert None not in data and sorted(data) == [0, 1, 2, 3]  # type: ignore[type-var]
    spares = pool.alloc_buflets(4)
    assert sorted(spares) == [0, 1, 2, 3]
    assert pool.audit() == []  # nor does the audit of the spares claim them
    pool.free_buflets(spares)
    assert pool.stats.large_in_use == 4
    for p, want in data.items():
        assert pool.b_large[p] and pool.packet_bytes(p) == want  # type: ignore[index,arg-type]
    assert pool.audit() == []
    pool.free_packets(list(data))  # type: ignore[arg-type]
    assert not pool.close().leaked


def test_spare_shortfalls_add_to_the_failures_already_counted() -> None:
    pool = Pbufpool(num_packets=2, buf_size=64, max_frags=2, num_buflets=2)
    assert len(pool.alloc_packets(3)) == 2  # one packet short
    assert pool.stats.alloc_failures == 1
    assert pool.alloc_buflets(4) == [1, 0]  # two buflets short
    assert pool.stats.alloc_failures == 3
    assert pool.alloc_buflets(1) == []
    assert pool.stats.alloc_failures == 4


def test_inserting_a_packet_another_owner_holds_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=4, max_frags=1)
    p = pool.packet_from_bytes(b"x")
    assert p is not None
    pool.owner_insert(5, p)
    with pytest.raises(PoolError) as info:
        pool.owner_insert(6, p)
    assert str(info.value) == f"packet {p} already held by owner 5"
    assert pool.owners == {5: {p}}


def test_owner_remove_takes_any_integer_from_shared_memory() -> None:
    pool = Pbufpool(num_packets=4, max_frags=1)
    p = pool.packet_from_bytes(b"x")
    assert p is not None
    pool.owner_insert(5, p)
    for idx in (-1, 4, 5, 1 << 32):  # outside the pool: False, never an IndexError
        assert pool.owner_remove(5, idx) is False
    assert pool.owner_remove(6, p) is False
    assert pool.owner_remove(5, p) is True
    assert pool.pkt_owner[p] == -1


def test_purging_an_owner_that_holds_nothing_frees_nothing() -> None:
    pool = Pbufpool(num_packets=4, max_frags=1)
    p = pool.packet_from_bytes(b"x")
    assert p is not None
    pool.owner_insert(5, p)
    assert pool.owner_purge(6) == 0
    assert pool.owner_purge(5) == 1
    assert pool.stats.in_use == 0
    assert not pool.close().leaked


def test_the_ring_region_can_be_filled_to_its_last_byte() -> None:
    """The region the arena header (struct sk_arena_hdr, read through cffi) publishes:
    ``ring_off`` .. ``ring_off + ring_region_size``, all of it allocatable, not one byte more."""
    pool = Pbufpool(num_packets=8, max_frags=1, num_ring_slots=64)
    hdr = ffi.cast("struct sk_arena_hdr *", H.base(pool.arena))
    off, size = int(hdr.ring_off), int(hdr.ring_region_size)
    del hdr
    assert size % 64 == 0
    assert pool.ring_alloc(size - 64) == off
    assert pool.ring_alloc(64) == off + size - 64  # the last granule
    with pytest.raises(PoolError):
        pool.ring_alloc(1)
    pool.close()


@pytest.mark.parametrize("which", ["packet", "buflet", "large buffer"])
def test_each_free_list_names_its_duplicates_and_the_entry_one_past_the_last(which: str) -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4, num_large_bufs=4,
                    large_buf_size=256)  # fmt: skip
    fl = {"packet": pool._free_pkts, "buflet": pool._free_ext, "large buffer": pool._free_large}
    free = fl[which]
    assert list(free) == [3, 2, 1, 0]
    assert [free.pop(), free.pop()] == [0, 1]
    free.append(4)  # the object count: one past the last index
    free.append(2)  # a second time
    lost = {
        "packet": [
            "packet 0 is free and off the free list",
            "packet 1 is free and off the free list",
        ],
        "buflet": ["2 buflets neither free nor held (lost): [0, 1]"],
        "large buffer": ["2 large buffers neither free nor held (lost): [0, 1]"],
    }
    assert pool.audit() == [
        f"{which} free list holds duplicates",
        f"{which} free list holds out-of-range [4]",
        *lost[which],
    ]


def test_a_chained_buflets_large_buffer_on_the_free_list_is_named_with_its_packet() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4, num_large_bufs=4,
                    large_buf_size=256)  # fmt: skip
    p = pool.packet_from_bytes(bytes(400))  # two large buffers: inline and external buflet
    assert p is not None
    g = pool.num_packets + pool.b_next[p]
    assert pool.b_large[g]
    lb = pool.b_buf[g]
    pool._free_large.append(lb)
    assert pool.audit() == [f"large buffer {lb}: held by packet {p} and by the free list"]


def test_a_spare_buflet_also_on_the_free_list_is_named() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4)
    (j,) = pool.alloc_buflets(1)
    pool._free_ext.append(j)
    assert pool.audit() == [f"buflet {j}: spare and on the free list"]


def test_a_spare_buflet_claiming_a_packets_large_buffer_is_named() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=1, num_buflets=4, num_large_bufs=4,
                    large_buf_size=256)  # fmt: skip
    p = pool.packet_from_bytes(bytes(200))
    assert p is not None and pool.b_large[p]
    (j,) = pool.alloc_buflets(1)
    g = pool.num_packets + j
    pool.b_large[g], pool.b_buf[g] = 1, pool.b_buf[p]
    assert pool.audit() == [
        f"large buffer {pool.b_buf[p]}: held by spare buflet {j} and by packet {p}"
    ]


@pytest.mark.parametrize("which", ["buflets", "large buffers"])
def test_lost_objects_are_named_first_eight(which: str) -> None:
    pool = Pbufpool(num_packets=4, max_frags=1, num_buflets=10, num_large_bufs=10,
                    large_buf_size=4096)  # fmt: skip
    free = pool._free_ext if which == "buflets" else pool._free_large
    taken = [free.pop() for _ in range(10)]
    assert sorted(taken) == list(range(10))
    assert pool.audit() == [f"10 {which} neither free nor held (lost): [0, 1, 2, 3, 4, 5, 6, 7]"]


def test_packet_head_of_a_chained_packet_is_the_first_n_bytes() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=4, num_buflets=8)
    data = bytes(range(200))
    p = pool.packet_from_bytes(data)  # 64 + 64 + 64 + 8
    assert p is not None and pool.packet_nbufs(p) == 4
    for n in (0, 1, 63, 64, 65, 100, 128, 129, 199, 200, 300):
        assert pool.packet_head(p, n) == data[:n]


def test_a_frame_that_fits_one_default_buffer_takes_no_large_one() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=1, num_large_bufs=2,
                    large_buf_size=256)  # fmt: skip
    for n in (0, 1, 64):
        p = pool.packet_from_bytes(bytes(n))
        assert p is not None and not pool.b_large[p]
        assert pool.stats.large_in_use == 0
        pool.free_packets([p])
    p = pool.packet_from_bytes(bytes(65))  # one byte more: a large buffer
    assert p is not None and pool.b_large[p] and pool.stats.large_in_use == 1


def test_a_frame_larger_than_the_pool_can_hold_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=3)
    assert pool.packet_from_bytes(bytes(192)) is not None  # 3 x 64: fits
    with pytest.raises(PoolError) as info:
        pool.packet_from_bytes(bytes(193))
    assert str(info.value) == "frame of 193 bytes exceeds max_packet_len 192"


def test_packet_bytes_read_from_the_data_offset_the_client_set() -> None:
    """A client moves buf0's data window 16 bytes into the buffer (doff = headroom = 16,
    struct sk_packet through cffi); after internalize the packet's bytes are the ones at
    that offset of the buffer buf0.buf_idx names (struct sk_arena_hdr's buf_off)."""
    pool = Pbufpool(num_packets=4, buf_size=256, max_frags=1)
    p = pool.packet_from_bytes(bytes(100))
    assert p is not None
    validate.externalize(pool, p)
    q = H.pkt(pool.arena, p)
    hdr = ffi.cast("struct sk_arena_hdr *", H.base(pool.arena))
    at = int(hdr.buf_off) + int(q.buf0.buf_idx) * int(hdr.buf_size) + 16
    del hdr
    want = bytes(range(1, 61))
    pool.arena.mem[at : at + 60] = want
    q.buf0.doff, q.headroom, q.buf0.dlen, q.len = 16, 16, 60, 60
    del q
    assert validate.internalize(pool, p) is None
    assert pool.packet_bytes(p) == want


@pytest.mark.usefixtures("backend")
def test_an_index_one_past_the_last_packet_is_not_allocated() -> None:
    """And -1: not a uint32, so the compiled batch check hands it to the Python loop, which
    must refuse it, not accept the batch."""
    pool = Pbufpool(num_packets=4, max_frags=1)
    for idx in (-1, 4, 5):
        readers = [pool.packet_len, pool.packet_nbufs, pool.packet_vnet, pool.packet_bytes]
        readers += [lambda i: pool.owner_insert(5, i), lambda i: pool.check_kernel_held([i])]
        for call in readers:
            with pytest.raises(PoolError) as info:
                call(idx)
            assert str(info.value) == f"packet {idx} is not allocated"


# -- whole-module run of pool.py, the survivors classified (2026-12-04) ----------------------
def test_a_frame_that_fits_the_default_chain_is_taken_when_the_large_buffers_are_gone() -> None:
    """With the large buffers exhausted, a frame of exactly ``max_frags`` default buffers
    (100 bytes: 64 + 36) still fits the default chain: it is allocated there, not refused."""
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_large_bufs=1,
                    large_buf_size=512)  # fmt: skip
    big = pool.packet_from_bytes(bytes(300))  # 5 default buffers' worth: the large one
    assert big is not None and pool.stats.large_in_use == 1
    data = bytes(range(100))
    p = pool.packet_from_bytes(data)
    assert p is not None and not pool.b_large[p]
    assert (pool.packet_nbufs(p), pool.packet_bytes(p)) == (2, data)
    assert pool.stats.alloc_failures == 0
    pool.free_packets([big, p])
    assert not pool.close().leaked


def test_a_buflet_count_outside_one_to_max_frags_is_refused_by_name() -> None:
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=3)
    for nbufs in (0, 4):
        with pytest.raises(PoolError) as info:
            pool.alloc_packets(1, nbufs)
        assert str(info.value) == f"nbufs {nbufs} not in 1..3"
    assert pool.stats.in_use == 0


def test_the_ring_region_is_sized_for_the_ring_slots_asked_for() -> None:
    """arena.py's rule: room for ``num_ring_slots`` slots plus one ring header per 16 slots
    and 8 more, rounded up to a page (sizes of struct sk_slot and struct sk_ring, through
    cffi); the arena header publishes it."""
    page = mmap.PAGESIZE
    for slots in (64, 1024):
        pool = Pbufpool(num_packets=8, max_frags=1, num_ring_slots=slots)
        need = slots * ffi.sizeof("struct sk_slot") + (slots // 16 + 8) * ffi.sizeof(
            "struct sk_ring"
        )
        hdr = ffi.cast("struct sk_arena_hdr *", H.base(pool.arena))
        size = int(hdr.ring_region_size)
        del hdr
        assert size == -(-need // page) * page
        pool.close()


@pytest.mark.usefixtures("backend")
def test_checksum_offsets_above_32767_in_a_large_buffer_are_adopted() -> None:
    """``csum_start`` and ``csum_stuff`` are 16-bit fields (struct sk_packet); in a 50000
    byte frame (one 64 KiB large buffer) the CSUM check passes any start below the length
    and any stuff offset with two bytes of room, and both come back on the next externalize."""
    pool = Pbufpool(num_packets=4, buf_size=2048, max_frags=1, num_large_bufs=2,
                    large_buf_size=65536)  # fmt: skip
    p = pool.packet_from_bytes(bytes(50000))
    assert p is not None and pool.b_large[p]
    validate.externalize(pool, p)
    q = H.pkt(pool.arena, p)
    q.pflags, q.csum_start, q.csum_stuff = lib.SK_PKT_CSUM_PARTIAL, 40000, 49998
    assert validate.internalize(pool, p) is None
    assert (pool.pkt_cstart[p], pool.pkt_cstuff[p]) == (40000, 49998)
    q.csum_start = q.csum_stuff = 0
    validate.externalize(pool, p)
    assert (q.csum_start, q.csum_stuff) == (40000, 49998)
    del q


@pytest.mark.parametrize("num_packets", [1, 3, 5])
def test_a_pool_of_an_odd_number_of_packets_holds_every_one(num_packets: int) -> None:
    """Nothing asks for an even packet count: each of ``num_packets`` packets takes a
    two-buflet frame (100 bytes: 64 + 36), holds its own bytes, and all of them come back."""
    pool = Pbufpool(num_packets=num_packets, buf_size=64, max_frags=2)
    frames = [bytes([i + 1]) * 100 for i in range(num_packets)]
    pkts = [pool.packet_from_bytes(f) for f in frames]
    assert None not in pkts and sorted(pkts) == list(range(num_packets))  # type: ignore[type-var]
    assert pool.packet_from_bytes(b"x") is None
    for p, f in zip(pkts, frames, strict=True):
        assert (pool.packet_len(p), pool.packet_nbufs(p)) == (100, 2)  # type: ignore[arg-type]
        assert pool.packet_bytes(p) == f  # type: ignore[arg-type]
    assert pool.audit() == []
    pool.free_packets(pkts)  # type: ignore[arg-type]
    assert not pool.close().leaked


@pytest.mark.usefixtures("backend")
def test_a_data_length_of_2_gib_in_a_large_buffer_is_adopted() -> None:
    """``len`` and a buflet's ``dlen`` are 32-bit (struct sk_packet, struct sk_buflet), and
    nothing bounds ``large_buf_size`` but that: in a 2 GiB + 8 large buffer (a sparse memfd;
    only the pages written are backed) a client may claim 2^31 bytes, which LEN_SUM and the
    window check accept, and the pool must hold that length as it came."""
    pool = Pbufpool(num_packets=2, buf_size=2048, max_frags=1, num_large_bufs=1,
                    large_buf_size=2**31 + 8)  # fmt: skip
    p = pool.packet_from_bytes(bytes(3000))
    assert p is not None and pool.b_large[p]
    validate.externalize(pool, p)
    q = H.pkt(pool.arena, p)
    q.buf0.dlen = q.len = 2**31
    del q
    assert validate.internalize(pool, p) is None
    assert (pool.packet_len(p), pool.b_dlen[p]) == (2**31, 2**31)
    pool.free_packets([p])
    assert not pool.close().leaked


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("which", ["packet", "large buffer"])
def test_a_free_list_with_no_room_left_is_named_by_the_free_that_overflows_it(which: str) -> None:
    """The guard against an index freed twice past the state check (freelist.py): a list
    filled to its capacity (objects + SLACK) refuses the next free, naming the list."""
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=1, num_large_bufs=2,
                    large_buf_size=256)  # fmt: skip
    p = pool.packet_from_bytes(bytes(200))  # one large buffer
    assert p is not None and pool.b_large[p]
    fl = pool._free_pkts if which == "packet" else pool._free_large
    fl.extend([0] * (fl.cap - len(fl)))  # no room left
    with pytest.raises(PoolError) as info:
        pool.free_packets([p])
    assert str(info.value).startswith(f"{which} free list overflow: {fl.cap} + 1 entries ")


def test_freeing_a_spare_that_holds_a_large_buffer_returns_the_buffer() -> None:
    """No pool path puts a large buffer on a spare today, but the audit counts one as held
    by the spare (a sound state), and ``free_buflets`` must then give the buffer back and
    leave the buflet as a free one: not large, on its own default buffer."""
    pool = Pbufpool(num_packets=4, buf_size=64, max_frags=2, num_buflets=4, num_large_bufs=2,
                    large_buf_size=256)  # fmt: skip
    (j,) = pool.alloc_buflets(1)
    g = pool.num_packets + j
    lb = pool._free_large.pop()
    pool.b_large[g], pool.b_buf[g] = 1, lb
    assert pool.audit() == [] and pool.stats.large_in_use == 1
    pool.free_buflets([j])
    assert (pool.b_large[g], pool.b_buf[g]) == (0, g)
    assert sorted(pool._free_large) == [0, 1] and pool.stats.large_in_use == 0
    assert pool.audit() == []
    p = pool.packet_from_bytes(bytes(range(100)))  # the buflet serves a chain again
    assert p is not None and pool.packet_bytes(p) == bytes(range(100))
    pool.free_packets([p])
    assert not pool.close().leaked


@pytest.mark.usefixtures("backend")
@pytest.mark.parametrize("bad", [-1, -4, 1 << 32])
def test_releasing_a_negative_or_non_uint32_index_touches_no_other_packet(bad: int) -> None:
    """A trusted-caller bug, worded as an index past the pool is: IndexError, the packets
    before it freed, and nothing else touched.  (Until 2026-12-04 the Python loop read -1 as
    the last packet and marked it free, off the free list, with a redzone fault counted; the
    compiled path refused the batch with OverflowError.)"""
    pool = Pbufpool(num_packets=4, max_frags=1)
    pkts = pool.alloc_packets(4)
    assert sorted(pkts) == [0, 1, 2, 3]
    with pytest.raises(IndexError) as info:
        pool._release([pkts[0], bad])
    assert str(info.value) == "bytearray index out of range"
    assert list(pool._free_pkts) == [pkts[0]]  # the one before the fault, and no other
    assert [pool.pkt_state[i] for i in pkts[1:]] == [1, 1, 1]
    assert pool.stats.redzone_faults == 0
    assert pool.audit() == []
    pool.free_packets(pkts[1:])
    assert not pool.close().leaked


@pytest.mark.usefixtures("backend")
def test_redzone_faults_add_up_over_packets_and_frees() -> None:
    """Three packets freed with their redzones overwritten, two in one batch and one after:
    three faults counted (skywalk.h: the redzone is SK_REDZONE_SEED ^ object index)."""
    pool = Pbufpool(num_packets=4, max_frags=1)
    pkts: list[int] = []
    for i in range(3):
        p = pool.packet_from_bytes(bytes([i]) * 60)
        assert p is not None
        pkts.append(p)
        H.md(pool.arena, p).pre.redzone ^= 1
    pool.free_packets(pkts[:2])
    assert pool.stats.redzone_faults == 2
    pool.free_packets(pkts[2:])
    assert pool.stats.redzone_faults == 3
    for p in pkts:
        assert H.md(pool.arena, p).pre.redzone == lib.SK_REDZONE_SEED ^ p
    assert not pool.close().leaked


def test_every_trusted_array_has_the_width_and_sign_the_compiled_pool_reads() -> None:
    """The reference and the compiled loops share the pool's trusted arrays (fastpath.h
    ``struct fp_pool``): a Python array of another width or sign would read values the C
    writes (a data offset of 2^31 and up, say) as something else, and the two paths would
    disagree.  The oracle is the header's field types, as cffi parsed them."""
    from vdev.skywalk import fastglue

    if not fastglue.load():
        pytest.skip("the compiled module is unavailable (no C compiler)")
    ffi = fastglue._fast.ffi
    pool = Pbufpool(num_packets=4, buf_size=256, max_frags=2)
    try:
        fields = dict(ffi.typeof("struct fp_pool").fields)
        checked = 0
        for name, field in fields.items():
            if field.type.kind != "pointer" or name in ("md", "bl"):
                continue  # md and bl point into the arena, not at a trusted array
            item = field.type.item
            arr = getattr(pool, name)
            itemsize = getattr(arr, "itemsize", 1)  # a bytearray holds bytes
            typecode = getattr(arr, "typecode", "B")
            assert itemsize == ffi.sizeof(item), (name, typecode, item.cname)
            signed = not item.cname.startswith("uint")  # int32_t, not uint32_t
            assert typecode.islower() == signed, (name, typecode, item.cname)
            checked += 1
        assert checked == 14  # every trusted array of the struct
        # The case the widths exist for: a chained buflet's data offset past 2^31 - 1 is
        # stored and read back as the unsigned 32-bit value the C reads.
        g = pool.num_packets
        pool.b_doff[g] = 2**31
        assert pool.b_doff[g] == 2**31
        pool.b_doff[g] = 0
    finally:
        pool.close()
