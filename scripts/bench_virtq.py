"""Device-side virtqueue cost, compiled bursts against the Python reference (issue 11).

What the NIC spends per frame on its own rings, with nothing else in the loop: a TX ring
kept full of one-descriptor chains (vnet header + frame) that ``VirtioNet.process_tx`` drains
into pool packets (the "switch" only collects them; they are freed outside the timing), and
an RX ring kept full of buffers that ``drain_rx`` fills from a backlog of pool packets.  The
driver side re-posts the same descriptors between rounds by moving the avail idx (split) or
rewriting the flags (packed), outside the timing.  Rates are frames per second of the
thread's CPU time (``time.thread_time``), as the machine is shared.

``--rule`` adds an active fault rule (p=0, so only its cost shows) on both queues:
``packet`` (drop: the rule sees every packet after either path), ``irq`` (suppress_irq: the
compiled bursts run, the interrupt decision goes through the rules) or ``used``
(bad_used_len: every used element goes through the rules, so the Python reference runs).

Usage: python3 scripts/bench_virtq.py [--sizes 64,1500] [--seconds 1] [--ring 256]
       [--formats split,packed] [--backends python,c] [--rule none,packet,irq,used]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdev.abi import lib
from vdev.net.nic import DEFAULT_FEATURES, VirtioNet
from vdev.skywalk import Pbufpool
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.virtio import fastqueue
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import PackedQueue
from vdev.virtio.split import SplitQueue, ring_sizes

MEM_SIZE = 64 << 20
RING = 0x100000
DATA = 0x400000
BUF = 2048


class _Vring:
    def __init__(self, index: int, queue: Any) -> None:
        self.index, self.queue, self.enabled, self.call_fd = index, queue, True, None


def _memory() -> tuple[GuestMemory, int]:
    fd = os.memfd_create("bench-virtq")
    os.ftruncate(fd, MEM_SIZE)
    mem = GuestMemory()
    mem.add_region(0, MEM_SIZE, 0x7F00_0000_0000, 0, fd)
    return mem, fd


class Ring:
    """A driver that keeps ``n`` one-buffer chains posted, split or packed."""

    def __init__(self, mem: GuestMemory, packed: bool, n: int, index: int, features: int) -> None:
        self.mem, self.packed, self.n = mem, packed, n
        writable = index % 2 == 0
        self.flag_w = lib.VRING_DESC_F_WRITE if writable else 0
        base = RING + index * 0x40000
        uva = 0x7F00_0000_0000
        if packed:
            self.desc, self.drv, self.dev = base, base + 16 * n, base + 16 * n + 4
            mem.write(base, bytes(16 * n + 8))
            self.queue: Any = PackedQueue(
                mem, index, n, uva + self.desc, uva + self.drv, uva + self.dev,
                features=features, sync=_sync(index),
            )  # fmt: skip
            self.wrap = 1
        else:
            d, a, u = ring_sizes(n)
            self.desc, self.avail, self.used = base, base + d, (base + d + a + 3) & ~3
            mem.write(base, bytes(self.used + u - base))
            for i in range(n):
                mem.write(self.avail + 4 + 2 * i, struct.pack("<H", i))
            self.queue = SplitQueue(
                mem, index, n, uva + self.desc, uva + self.avail, uva + self.used,
                features=features, sync=_sync(index),
            )  # fmt: skip
            self.idx = 0
        self.data = DATA + index * n * BUF

    def fill(self, payload: bytes) -> None:
        """Write every buffer's contents once (TX) and the split descriptors."""
        self.len = len(payload) if payload else BUF
        for i in range(self.n):
            addr = self.data + i * BUF
            if payload:
                self.mem.write(addr, payload)
            if not self.packed:
                desc = struct.pack("<QIHH", addr, self.len, self.flag_w, 0)
                self.mem.write(self.desc + 16 * i, desc)

    def post(self) -> None:
        """Make all n chains available again (the device consumed the previous round)."""
        if self.packed:
            # 2.8.9: used descriptors overwrote id and len, so the driver writes all fields.
            flags = (0x80 if self.wrap else 0x8000) | self.flag_w
            for i in range(self.n):
                desc = struct.pack("<QIHH", self.data + i * BUF, self.len, i, flags)
                self.mem.write(self.desc + 16 * i, desc)
            self.wrap ^= 1
        else:
            self.idx = (self.idx + self.n) & 0xFFFF
            self.mem.write(self.avail + 2, struct.pack("<H", self.idx))


def _sync(index: int) -> Any:
    from vdev.net.nic import net_queue_direction

    return net_queue_direction(index)


def bench(
    backend: str, fmt: str, size: int, seconds: float, n: int, rule: str
) -> tuple[float, float]:
    fastqueue.set_backend(backend)
    features = DEFAULT_FEATURES
    if fmt != "packed":
        features &= ~(1 << lib.VIRTIO_F_RING_PACKED)
    mem, fd = _memory()
    pool = Pbufpool(num_packets=4 * n, buf_size=2048, max_frags=4, num_buflets=4 * n)
    got: list[int] = []
    nic = VirtioNet("bench", pool, lambda _name, pkts: got.extend(pkts))
    nic.negotiated = features
    nf = None
    if rule != "none":
        from vdev.faults.engine import FaultEngine, ManualClock

        nf = FaultEngine(seed=1, clock=ManualClock(100.0)).nic(nic)
        # Rules that never fire (p=0): only the cost of having one is measured.
        action = {"packet": "drop", "irq": "suppress_irq", "used": "bad_used_len"}[rule]
        nf.add({"action": action, "queue": "both", "p": 0.0})
    frame = numbered(HOST_MAC, GUEST_MAC, 1, size)
    hdr = bytes(nic.hdr_len)
    tx = Ring(mem, fmt == "packed", n, 1, features)
    rx = Ring(mem, fmt == "packed", n, 0, features)
    tx.fill(hdr + frame)
    rx.fill(b"")
    nic.vrings = {0: _Vring(0, rx.queue), 1: _Vring(1, tx.queue)}  # type: ignore[dict-item]
    rates = []
    for direction in ("tx", "rx"):
        frames = 0
        cpu = 0.0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if direction == "tx":
                tx.post()
                t0 = time.thread_time()
                nic.process_tx(1)
                cpu += time.thread_time() - t0
                frames += len(got)
                pool.free_packets(got)
                got.clear()
            else:
                rx.post()
                pkts = [
                    p for p in (pool.packet_from_bytes(frame) for _ in range(n)) if p is not None
                ]
                t0 = time.thread_time()
                nic.deliver(pkts)  # RX packet rules, the backlog and the drain
                cpu += time.thread_time() - t0
                frames += len(pkts) - len(nic.backlog)
                pool.free_packets(list(nic.backlog))
                nic.backlog.clear()
        rates.append(frames / cpu if cpu else 0.0)
    if nf is not None:
        nf.detach()
    for q in (tx.queue, rx.queue):
        q.close()
    pool.close()
    mem.close()
    os.close(fd)
    return rates[0], rates[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,1500")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--ring", type=int, default=256)
    p.add_argument("--formats", default="split,packed")
    p.add_argument("--backends", default="python,c")
    p.add_argument("--rule", default="none", help="none,packet,irq,used (comma-separated)")
    args = p.parse_args()
    print("| format | backend | rule | bytes | TX frames/CPU-s | RX frames/CPU-s |")
    print("|---|---|---|---:|---:|---:|")
    for fmt in args.formats.split(","):
        for rule in args.rule.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                for backend in args.backends.split(","):
                    t, r = bench(backend, fmt, size, args.seconds, args.ring, rule)
                    print(
                        f"| {fmt} | {fastqueue.BACKEND} | {rule} | {size} | {t:,.0f} | {r:,.0f} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
