"""Pools sized for streaming tests and benchmarks."""

from __future__ import annotations

from vdev.skywalk import Pbufpool


def streaming_pool() -> Pbufpool:
    """A pool in which neither a big host channel (4096 slots: five rings of ring slots
    besides the default pool's needs) nor packet allocation limits a 64-byte stream: what
    the throughput benchmark, the soak device and the DPDK interop tests run with."""
    return Pbufpool(
        num_packets=16384,
        buf_size=2048,
        max_frags=4,
        num_large_bufs=16,
        large_buf_size=65536,
        num_ring_slots=32768,
    )
