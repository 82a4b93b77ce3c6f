"""Pool API used by the device: alloc/free, packet_from_bytes, views, owners, leaks."""

from __future__ import annotations

import pytest

from vdev.skywalk import Pbufpool, PoolError

from .conftest import assert_no_leak

pytestmark = pytest.mark.usefixtures("backend")  # pool.FAST: both bulk-loop implementations


def test_alloc_free_batch_and_stats() -> None:
    pool = Pbufpool(num_packets=64, max_frags=2, num_buflets=10)
    got = pool.alloc_packets(70)
    assert len(got) == 64 and len(set(got)) == 64
    assert pool.stats.in_use == 64 and pool.stats.alloc_failures == 6
    pool.free_packets(got[:32])
    multi = pool.alloc_packets(20, nbufs=2)
    assert len(multi) == 10  # limited by the 10 external buflets
    assert all(pool.packet_nbufs(i) == 2 for i in multi)
    assert pool.stats.high_water == 64
    pool.free_packets(multi + got[32:])
    with pytest.raises(PoolError):
        pool.free_packets([got[0]])  # double free
    assert_no_leak(pool)


@pytest.mark.parametrize("size", [0, 1, 60, 2048, 2049, 5000, 8192])
def test_packet_from_bytes_chains_buflets(size: int) -> None:
    pool = Pbufpool(num_packets=16)
    data = bytes(i & 0xFF for i in range(size))
    idx = pool.packet_from_bytes(data, vnet=bytes(range(12)))
    assert idx is not None
    assert pool.packet_bytes(idx) == data
    assert pool.packet_len(idx) == size
    assert pool.packet_vnet(idx) == bytes(range(12))
    assert b"".join(pool.packet_segments(idx)) == data
    assert pool.packet_nbufs(idx) == max(1, -(-size // 2048))
    pool.free_packets([idx])
    assert_no_leak(pool)


def test_64k_frame_with_large_buffers_and_without() -> None:
    data = bytes(range(256)) * 256
    pool = Pbufpool(num_packets=16, num_large_bufs=4, large_buf_size=16384)
    idx = pool.packet_from_bytes(data)
    assert idx is not None and pool.packet_bytes(idx) == data
    assert pool.stats.large_in_use == 4
    assert pool.packet_from_bytes(data) is None  # large buffers exhausted
    assert pool.packet_vnet(idx) is None
    pool.free_packets([idx])
    assert pool.stats.large_in_use == 0
    assert_no_leak(pool)
    big = Pbufpool(num_packets=8, buf_size=16384, max_frags=4)
    idx = big.packet_from_bytes(data)
    assert idx is not None and big.packet_bytes(idx) == data
    big.free_packets([idx])
    assert_no_leak(big)
    small = Pbufpool(num_packets=8)
    with pytest.raises(PoolError):
        small.packet_from_bytes(data)
    small.close()


def test_exhaustion_returns_none() -> None:
    pool = Pbufpool(num_packets=4)
    idxs = [pool.packet_from_bytes(b"a") for _ in range(4)]
    assert pool.packet_from_bytes(b"b") is None
    assert pool.stats.alloc_failures == 1
    pool.free_packets([i for i in idxs if i is not None])
    assert_no_leak(pool)


def test_owner_tracking_and_purge() -> None:
    pool = Pbufpool(num_packets=8)
    a = pool.alloc_packets(3)
    for i in a:
        pool.owner_insert(7, i)
    assert not pool.owner_remove(8, a[0])
    assert not pool.owner_remove(7, 10_000)
    assert pool.owner_remove(7, a[0])
    with pytest.raises(PoolError):
        pool.free_packets([a[1]])  # held by a client
    assert pool.owner_purge(7) == 2
    pool.free_packets([a[0]])
    assert_no_leak(pool)


def test_close_reports_leaks() -> None:
    pool = Pbufpool(num_packets=8)
    pool.alloc_packets(2)
    rep = pool.close()
    assert rep.leaked and len(rep.packets) == 2 and "2 packets leaked" in str(rep)


def test_bad_config_refused() -> None:
    with pytest.raises(PoolError):
        Pbufpool(num_packets=0)
    with pytest.raises(PoolError):
        Pbufpool(buf_size=100)


def test_head_copy_and_stats_dict() -> None:
    pool = Pbufpool(num_packets=8)
    data = bytes(range(200)) * 20
    idx = pool.packet_from_bytes(data, vnet=bytes(range(12)))
    assert idx is not None
    assert pool.packet_head(idx, 14) == data[:14]
    assert pool.packet_head(idx, 10_000) == data
    cp = pool.packet_copy(idx)
    assert cp is not None and cp != idx
    assert pool.packet_bytes(cp) == data and pool.packet_vnet(cp) == bytes(range(12))
    assert pool.stats_dict()["in_use"] == 2
    pool.free_packets([idx, cp])
    assert_no_leak(pool)


def test_buflet_batch_alloc_free_and_leak_report() -> None:
    pool = Pbufpool(num_packets=4, max_frags=2, num_buflets=6)
    bl = pool.alloc_buflets(8)
    assert len(bl) == 6 and pool.stats.buflets_in_use == 6
    assert pool.alloc_packets(1, nbufs=2) == []  # no buflet left for a chain
    pool.free_buflets(bl[:4])
    with pytest.raises(PoolError):
        pool.free_buflets([bl[0]])
    rep = pool.close()
    assert rep.leaked and rep.buflets == sorted(bl[4:])


def test_free_and_deliver_refuse_duplicates() -> None:
    from vdev.skywalk import Port

    pool = Pbufpool(num_packets=4)
    a = pool.alloc_packets(2)
    with pytest.raises(PoolError):
        pool.free_packets([a[0], a[0]])
    port = Port(pool, ring_slots=8)
    ch = port.open_channel()
    with pytest.raises(PoolError):
        port.deliver([a[1], a[1]])
    held = ch.packet_alloc()
    assert held is not None
    with pytest.raises(PoolError):
        port.deliver([held])  # a client-held packet cannot be delivered
    pool.free_packets(a)
    ch.close()
    assert_no_leak(pool)


# -- accounting against the free lists ---------------------------------------------------------
# Mutations these catch (tools/mutants/section5.toml, pool-*): ``_release`` not returning a
# chained buflet (``fe.append(j)`` removed) or a large buffer (``fl.append(...)`` removed),
# ``free_buflets`` or ``_release`` not returning the buflet/packet itself.  Before the stats
# were read from the free lists, the first two survived the skywalk, net and faults suites:
# ``in_use``/``buflets_in_use`` read 0 and ``close()`` reported no leak.


def test_alloc_free_cycles_give_everything_back() -> None:
    pool = Pbufpool(num_packets=32, max_frags=2, num_buflets=20, num_large_bufs=4,
                    large_buf_size=4096)  # fmt: skip
    for _ in range(3):
        got = pool.alloc_packets(20, nbufs=2)
        assert len(got) == 20 and pool.stats.buflets_in_use == 20
        pool.free_packets(got)
        assert (pool.stats.in_use, pool.stats.buflets_in_use) == (0, 0)
        big = [pool.packet_from_bytes(bytes(5000)) for _ in range(2)]  # 2 large buffers each
        assert None not in big and pool.stats.large_in_use == 4
        pool.free_packets([b for b in big if b is not None])
        assert pool.stats.large_in_use == 0
        spare = pool.alloc_buflets(20)
        assert len(spare) == 20 and pool.stats.buflets_in_use == 20
        pool.free_buflets(spare)
        assert pool.audit() == []
    assert_no_leak(pool)


def test_stats_and_leak_report_see_a_lost_buflet() -> None:
    pool = Pbufpool(num_packets=8, max_frags=2, num_buflets=8)
    got = pool.alloc_packets(4, nbufs=2)
    pool.free_packets(got)
    lost = pool._free_ext.pop()  # what a free path that forgets a chained buflet leaves
    assert pool.stats.in_use == 0 and pool.stats.buflets_in_use == 1
    assert pool.audit() == [f"1 buflets neither free nor held (lost): [{lost}]"]
    with pytest.raises(PoolError, match="lost"):
        pool.check()
    rep = pool.close()
    assert rep.leaked and rep.packets == [] and rep.buflets_in_use == 1
    assert "1 external buflets" in str(rep) and "lost" in str(rep)


def test_stats_and_leak_report_see_a_lost_large_buffer() -> None:
    pool = Pbufpool(num_packets=8, num_large_bufs=2, large_buf_size=8192)
    idx = pool.packet_from_bytes(bytes(3000))
    assert idx is not None and pool.stats.large_in_use == 1
    pool.free_packets([idx])
    lost = pool._free_large.pop()
    assert pool.stats.large_in_use == 1
    assert pool.audit() == [f"1 large buffers neither free nor held (lost): [{lost}]"]
    rep = pool.close()
    assert rep.leaked and rep.packets == [] and rep.large_in_use == 1
    assert "1 large buffers not on the free lists" in str(rep)


def test_audit_finds_shared_double_free_and_stale_objects() -> None:
    pool = Pbufpool(num_packets=8, max_frags=2, num_buflets=8, num_large_bufs=2)
    a, b = pool.alloc_packets(2, nbufs=2)
    assert pool.audit() == []
    pool.b_next[b] = pool.b_next[a]  # two chains through one buflet (and one lost)
    problems = pool.audit()
    assert any("buflet" in p and f"packet {b}" in p and f"packet {a}" in p for p in problems)
    assert any("lost" in p for p in problems)
    pool.b_next[b] = pool._free_ext[-1]  # a chain through a free buflet
    assert any("held by the free list" in p for p in pool.audit())
    pool._free_pkts.append(a)  # allocated and on the free list
    assert f"packet {a} is allocated and on the free list" in pool.audit()
    pool._free_pkts.append(a)
    assert "packet free list holds duplicates" in pool.audit()
    pool.pkt_nbufs[a] = 3
    assert f"packet {a}: chain of 2 buflets, nbufs says 3" in pool.audit()
    pool.close()
    stale = Pbufpool(num_packets=4, num_large_bufs=2)
    idx = stale.packet_from_bytes(bytes(3000))
    assert idx is not None
    stale.b_large[stale._free_pkts[-1]] = 1  # a free packet that still says "large"
    assert any("still hold large buffers" in p for p in stale.audit())
    stale.close()


def test_redzone_fault_is_counted_once_and_repaired() -> None:
    """A packet freed with its redzone overwritten counts one fault, and the pool writes the
    ABI's value back (skywalk.h: SK_REDZONE_SEED ^ object index), so reusing the packet does
    not count it again.  (Kills the repair value computed wrongly, mutmut's sample of
    pool.py: the fault was counted, the repaired value never checked.)"""
    from vdev.abi import lib

    from . import hostile as H

    pool = Pbufpool(num_packets=4, max_frags=1)
    p = pool.packet_from_bytes(b"r" * 60)
    assert p is not None
    H.md(pool.arena, p).pre.redzone ^= 1 << 63
    pool.free_packets([p])
    assert pool.stats.redzone_faults == 1
    assert H.md(pool.arena, p).pre.redzone == lib.SK_REDZONE_SEED ^ p
    again = [pool.packet_from_bytes(b"s" * 60) for _ in range(4)]  # every packet, p too
    assert p in again
    pool.free_packets([q for q in again if q is not None])
    assert pool.stats.redzone_faults == 1
    assert_no_leak(pool)


def test_stats_dict_keys_are_the_counters() -> None:
    """Every key of the JSON status dict is the PoolStats counter (or pool size) it names,
    with its value, after traffic that moves each one (a renamed key breaks the status
    consumers silently: mutmut's sample of pool.py renamed "frees")."""
    pool = Pbufpool(num_packets=4, max_frags=2, num_large_bufs=2)
    pkts = [pool.packet_from_bytes(b"d" * 60) for _ in range(5)]  # the 5th fails
    held = [p for p in pkts if p is not None]
    pool.free_packets(held[:2])
    st = pool.stats
    counters = ["in_use", "high_water", "alloc_failures", "buflets_in_use", "large_in_use"]
    counters += ["allocs", "frees", "redzone_faults"]
    want = {k: getattr(st, k) for k in counters}
    want |= {"num_buflets": pool.num_ext, "num_packets": 4, "num_large_bufs": 2}
    assert pool.stats_dict() == want
    assert (want["allocs"], want["frees"], want["in_use"]) == (4, 2, 2)
    pool.free_packets(held[2:])
    assert_no_leak(pool)


def test_a_closed_pool_says_so() -> None:
    pool = Pbufpool(num_packets=4)
    pool.close()
    with pytest.raises(PoolError, match=r"^pool is closed$"):
        pool.packet_from_bytes(b"x")
