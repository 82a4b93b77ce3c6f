"""A switch endpoint that takes every frame, counts it and frees it: the device-side twin
of testpmd's rxonly, for measuring the device alone (no consumer behind the switch to wait
on or to share the GIL with)."""

from __future__ import annotations

from vdev.skywalk import Pbufpool


class DropSink:
    """Frees what the switch hands it, one pool call per burst; ``frames`` counts them."""

    def __init__(self, pool: Pbufpool, name: str = "sink") -> None:
        self.pool = pool
        self.name = name
        self.frames = 0

    def deliver(self, pkts: list[int]) -> int:
        self.pool.free_packets(pkts)
        self.frames += len(pkts)
        return len(pkts)


__all__ = ["DropSink"]
