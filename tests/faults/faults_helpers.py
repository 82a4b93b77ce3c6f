"""Shared helpers for the fault tests: a real Pbufpool, a real VirtioNet, a fake forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vdev.faults import FaultEngine, ManualClock, NicFaults
from vdev.net.nic import TO_GUEST, VirtioNet
from vdev.skywalk.pool import Pbufpool
from vdev.testing import frames

DST = b"\x52\x54\x00\x12\x34\x56"
SRC = b"\x52\x54\x00\x00\x00\xfe"


# The fault tests' frames, from vdev.testing.frames: guest (this NIC's MAC) to the
# responder's MAC, ip id 0 and IP checksums left 0 (the faults never look at them).
def udp_frame(sport: int = 1000, dport: int = 2000, payload: bytes = b"x" * 32) -> bytes:
    """Ethernet + IPv4 + UDP."""
    return frames.udp(dport, payload, sport, DST, SRC, ip_id=0, ip_checksum=False)


def tcp_frame(sport: int = 1000, dport: int = 80) -> bytes:
    """Ethernet + IPv4 (addresses 0) + TCP SYN."""
    return frames.tcp(dport, sport, DST, SRC, bytes(4), bytes(4), ip_id=0, ip_checksum=False)


def arp_frame() -> bytes:
    return frames.eth(b"\xff" * 6, SRC, 0x0806, bytes(28))


@dataclass
class Bench:
    """One NIC with an engine on a manual clock; TX output collected as frames."""

    pool: Pbufpool
    nic: VirtioNet
    clock: ManualClock
    engine: FaultEngine
    forwarded: list[bytes] = field(default_factory=list)

    @property
    def nf(self) -> NicFaults:
        """The typed way to the NIC's fault API (``nic.faults`` is the untyped shortcut)."""
        return self.engine.nic(self.nic)

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
        """Deliver the backlog to a pretend guest: each frame's capture record, then free."""
        got = [self.pool.packet_bytes(p) for p in self.nic.backlog]
        for p in self.nic.backlog:
            self.nic.record(p, TO_GUEST)
        self.pool.free_packets(list(self.nic.backlog))
        self.nic.backlog.clear()
        return got


def make_bench(
    seed: Any = 0, log: str | None = None, num_packets: int = 512, queue_pairs: int = 1
) -> Bench:
    pool = Pbufpool(num_packets=num_packets, buf_size=2048)
    clock = ManualClock(100.0)
    forwarded: list[bytes] = []

    def forward(src: str, pkts: list[int]) -> None:
        forwarded.extend(pool.packet_bytes(p) for p in pkts)
        pool.free_packets(pkts)

    nic = VirtioNet("nic0", pool, forward, queue_pairs=queue_pairs)
    engine = FaultEngine(seed=seed, clock=clock, log=log)
    engine.nic(nic)
    return Bench(pool, nic, clock, engine, forwarded)


class FakeQueue:
    """Stands in for SplitQueue on the used side: records push/push_raw/patch/flush calls.

    ``push`` validates like the real queue (head in flight, length within the buffer) so a
    ring fault that pushes something the device does not own fails the test."""

    def __init__(self, size: int = 8, writable: int = 1500) -> None:
        self.size = size
        self._inflight = [writable + 1] * size
        self.calls: list[tuple[Any, ...]] = []
        self.notify_answer = True
        self.defunct = None

    def push(self, head: int, written: int) -> None:
        if not self._inflight[head]:
            raise ValueError(f"head {head} is not in flight")
        if written >= self._inflight[head]:
            raise ValueError(f"head {head}: written {written} too large")
        self._inflight[head] = 0
        self.calls.append(("push", head, written))

    def push_raw(self, head: int, written: int) -> None:
        self.calls.append(("raw", head, written))

    def inflight_writable(self, head: int) -> int | None:
        return self._inflight[head] - 1 if self._inflight[head] else None

    def patch_last_used(self, written: int) -> None:
        self.calls.append(("patch", written))

    def flush_used(self) -> None:
        self.calls.append(("flush",))

    def should_notify(self) -> bool:
        return self.notify_answer

    def pop(self) -> None:
        return None

    def enable_notifications(self, enable: bool = True, ahead: int = 1) -> bool:
        return False

    def avail_count(self) -> int:
        return 0


@dataclass
class FakeVring:
    queue: FakeQueue
    index: int
    enabled: bool = True
    call_fd: int | None = None
    num: int = 8


@dataclass
class RingBench:
    """A real VirtioNet whose vrings hold FakeQueues; interrupts counted by the NIC stats."""

    bench: Bench
    queues: dict[int, FakeQueue]
    kicks: list[int]

    @property
    def nic(self) -> VirtioNet:
        return self.bench.nic

    @property
    def nf(self) -> NicFaults:
        return self.bench.nf

    def complete(self, index: int, heads: list[int], written: int = 0) -> None:
        """What process_tx / _write_rx do for each chain, then the end-of-batch flush."""
        q = self.queues[index]
        for h in heads:
            self.nic._push(q, index, h, written)  # type: ignore[arg-type]
        q.flush_used()

    def irq(self, index: int, wanted: bool = True) -> int:
        """One interrupt decision; returns how many interrupts were sent."""
        q = self.queues[index]
        q.notify_answer = wanted
        before = self.nic.stats[index].notifications
        self.nic._maybe_notify(q, index)  # type: ignore[arg-type]
        return self.nic.stats[index].notifications - before

    def irqs(self, index: int) -> int:
        return self.nic.stats[index].notifications


def make_ring_bench(seed: Any = 0) -> RingBench:
    import os

    b = make_bench(seed)
    queues = {0: FakeQueue(), 1: FakeQueue()}
    for index, q in queues.items():
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        b.nic.vrings[index] = FakeVring(q, index, call_fd=fd)  # type: ignore[assignment]
    kicks: list[int] = []
    b.nic.kick = kicks.append  # type: ignore[method-assign,assignment]
    return RingBench(b, queues, kicks)


def numbered_frames(n: int) -> list[bytes]:
    return [udp_frame(dport=i) for i in range(n)]


def device_with_nic(tmp_dir: str, num_packets: int = 256) -> Any:
    """A Device with one NIC and no frontend (no QEMU, no vhost-user connection): the NIC
    listens on ``tmp_dir/nic0.sock`` and nobody connects."""
    from vdev.net.device import Device

    dev = Device(pool=Pbufpool(num_packets=num_packets, buf_size=2048))
    dev.add_nic(f"{tmp_dir}/nic0.sock")
    return dev


def push_tx(dev: Any, frames: list[bytes], nic_index: int = 0) -> None:
    """Frames from the guest through the NIC's TX hooks into the switch, under the lock."""
    nic = dev.nics[nic_index]
    with dev.lock:
        pkts = [dev.pool.packet_from_bytes(f, bytes(12)) for f in frames]
        nic.inject_tx(nic._run_hooks(nic.tx_hooks, 1, [p for p in pkts if p is not None]))
