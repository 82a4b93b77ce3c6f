"""A small learning L2 switch between the device's endpoints.

Endpoints are the guest side of each NIC, host channel ports opened by test code and the
built-in responder.  Packets are pbufpool indices; handing a list to ``deliver`` moves
ownership, and whatever an endpoint does not take is freed here and counted as a drop, so
nothing leaks whatever the receiver does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vdev.skywalk import Pbufpool

log = logging.getLogger("vdev.switch")

BROADCAST = b"\xff" * 6


class Endpoint(Protocol):
    """Anything the switch can hand packets to."""

    name: str

    def deliver(self, pkts: list[int]) -> int:
        """Take ownership of a prefix of ``pkts``; return how many were taken."""
        ...


@dataclass
class EndpointStats:
    """Per-endpoint counters, as seen from the switch."""

    rx_frames: int = 0  # frames the switch handed to the endpoint
    rx_bytes: int = 0
    tx_frames: int = 0  # frames the endpoint sent into the switch
    tx_bytes: int = 0
    drops: int = 0  # frames the endpoint refused (backpressure, ring down)


# A tap sees every frame the switch forwards: (source name, frame bytes).
Tap = Callable[[str, bytes], None]


class Switch:
    """MAC-learning switch with flooding for broadcast, multicast and unknown unicast."""

    def __init__(self, pool: Pbufpool) -> None:
        self.pool = pool
        self.endpoints: dict[str, Endpoint] = {}
        self.stats: dict[str, EndpointStats] = {}
        self.fdb: dict[bytes, str] = {}
        self.taps: list[Tap] = []

    def attach(self, endpoint: Endpoint) -> None:
        if endpoint.name in self.endpoints:
            raise ValueError(f"switch already has an endpoint named {endpoint.name!r}")
        self.endpoints[endpoint.name] = endpoint
        self.stats[endpoint.name] = EndpointStats()

    def detach(self, name: str) -> None:
        self.endpoints.pop(name, None)
        for mac in [m for m, n in self.fdb.items() if n == name]:
            del self.fdb[mac]

    def forward(self, src: str, pkts: list[int]) -> None:
        """Switch packets sent by endpoint ``src``; ownership of every packet moves here."""
        if not pkts:
            return
        pool = self.pool
        src_stats = self.stats.get(src)
        batches: dict[str, list[int]] = {}
        for pkt in pkts:
            head = pool.packet_head(pkt, 14)
            length = pool.packet_len(pkt)
            if src_stats is not None:
                src_stats.tx_frames += 1
                src_stats.tx_bytes += length
            if len(head) < 14:
                pool.free_packets([pkt])
                if src_stats is not None:
                    src_stats.drops += 1
                continue
            dst_mac, src_mac = head[0:6], head[6:12]
            if not src_mac[0] & 1:
                self.fdb[src_mac] = src
            if self.taps:
                frame = pool.packet_bytes(pkt)
                for tap in self.taps:
                    tap(src, frame)
            out = self.fdb.get(dst_mac) if not dst_mac[0] & 1 else None
            if out is not None and out != src and out in self.endpoints:
                batches.setdefault(out, []).append(pkt)
                continue
            if out == src:
                # The destination lives behind the sender: no hairpin, counted as a drop.
                pool.free_packets([pkt])
                if src_stats is not None:
                    src_stats.drops += 1
                continue
            targets = [n for n in self.endpoints if n != src]
            if not targets:
                pool.free_packets([pkt])
                continue
            # Flood: the first target takes the original, the others get copies.
            for name in targets[1:]:
                copy = pool.packet_copy(pkt)
                if copy is None:
                    self.stats[name].drops += 1
                    continue
                batches.setdefault(name, []).append(copy)
            batches.setdefault(targets[0], []).append(pkt)
        for name, batch in batches.items():
            self._deliver(name, batch)

    def _deliver(self, name: str, batch: list[int]) -> None:
        stats = self.stats[name]
        lengths = [self.pool.packet_len(p) for p in batch]
        try:
            taken = self.endpoints[name].deliver(batch)
        except Exception:
            log.exception("endpoint %s failed to take %d frames", name, len(batch))
            taken = 0
        stats.rx_frames += taken
        stats.rx_bytes += sum(lengths[:taken])
        if taken < len(batch):
            stats.drops += len(batch) - taken
            self.pool.free_packets(batch[taken:])
