"""Shared helpers for the fault tests: a real Pbufpool, a real VirtioNet, a fake forward."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from vdev.faults import FaultEngine, ManualClock
from vdev.net.nic import VirtioNet
from vdev.skywalk.pool import Pbufpool

DST = b"\x52\x54\x00\x12\x34\x56"
SRC = b"\x52\x54\x00\x00\x00\xfe"


def udp_frame(sport: int = 1000, dport: int = 2000, payload: bytes = b"x" * 32) -> bytes:
    """Ethernet + IPv4 + UDP (checksums left 0: the faults never look at them)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([10, 0, 2, 15]),
        bytes([10, 0, 2, 2]),
    )
    return DST + SRC + b"\x08\x00" + ip + udp


def tcp_frame(sport: int = 1000, dport: int = 80) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 0x02, 1024, 0, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, bytes(4), bytes(4)
    )
    return DST + SRC + b"\x08\x00" + ip + tcp


def arp_frame() -> bytes:
    return b"\xff" * 6 + SRC + b"\x08\x06" + bytes(28)


@dataclass
class Bench:
    """One NIC with an engine on a manual clock; TX output collected as frames."""

    pool: Pbufpool
    nic: VirtioNet
    clock: ManualClock
    engine: FaultEngine
    forwarded: list[bytes] = field(default_factory=list)

    def _packets(self, frames: list[bytes]) -> list[int]:
        pkts = [self.pool.packet_from_bytes(f, bytes(12)) for f in frames]
        assert all(p is not None for p in pkts), "test pool too small"
        return [p for p in pkts if p is not None]

    def tx(self, frames: list[bytes], batch: int = 32) -> list[bytes]:
        """Run frames through the TX hooks (queue 1) in batches, as process_tx would;
        return what was forwarded meanwhile."""
        before = len(self.forwarded)
        for i in range(0, len(frames), batch):
            pkts = self._packets(frames[i : i + batch])
            self.nic.inject_tx(self.nic._run_hooks(self.nic.tx_hooks, 1, pkts))
        return self.forwarded[before:]

    def rx(self, frames: list[bytes], batch: int = 32) -> list[bytes]:
        """Run frames through the RX hooks (queue 0); return what reached the backlog."""
        got: list[bytes] = []
        for i in range(0, len(frames), batch):
            pkts = self._packets(frames[i : i + batch])
            self.nic.inject_rx(self.nic._run_hooks(self.nic.rx_hooks, 0, pkts))
            got += self.take_backlog()
        return got

    def take_backlog(self) -> list[bytes]:
        got = [self.pool.packet_bytes(p) for p in self.nic.backlog]
        self.pool.free_packets(list(self.nic.backlog))
        self.nic.backlog.clear()
        return got


def make_bench(seed: Any = 0, log: str | None = None, num_packets: int = 512) -> Bench:
    pool = Pbufpool(num_packets=num_packets, buf_size=2048)
    clock = ManualClock(100.0)
    forwarded: list[bytes] = []

    def forward(src: str, pkts: list[int]) -> None:
        forwarded.extend(pool.packet_bytes(p) for p in pkts)
        pool.free_packets(pkts)

    nic = VirtioNet("nic0", pool, forward)
    engine = FaultEngine(seed=seed, clock=clock, log=log)
    engine.nic(nic)
    return Bench(pool, nic, clock, engine, forwarded)
