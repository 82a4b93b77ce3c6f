"""Pool API used by the device: alloc/free, packet_from_bytes, views, owners, leaks."""

from __future__ import annotations

import pytest

from vdev.skywalk import Pbufpool, PoolError

from .conftest import assert_no_leak


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
