"""Slots per second through Skywalk TX and RX syncs (Python or compiled per-slot path).

Two numbers per cell:
  * sync: only the kernel half is timed (``Channel.sync``: prologue validation, per-slot
    internalize/externalize, owner tracking, finalize; for TX it includes the device's
    ``on_transmit`` freeing the packets).  Slots are staged outside the timed region.
  * end-to-end: the user half too (``Channel.send`` of prepared frames, or the device's
    ``packet_from_bytes`` + ``Port.deliver`` followed by ``Channel.recv``).

Rates are slots per CPU-second of this process (``time.process_time``), so a machine shared
with other work does not distort them much; the wall-clock rate of the sync column is
printed too.

``--backend`` picks the implementation of ``vdev/skywalk/validate.py``'s per-slot loops:
``python`` (the reference), ``c`` (``fastpath.c`` through cffi) or ``both`` (default; one
table row per backend and cell).

Usage: python3 benchmarks/skywalk_sync.py [--seconds 0.5] [--backend python|c|both]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdev.skywalk import Channel, Pbufpool, Port, SyncKind, validate

SIZES = (64, 1500)
BATCHES = (1, 32, 256)
RING_SLOTS = 1024  # RX releases come back one sync late: room for two batches of 256


def _pool() -> Pbufpool:
    return Pbufpool(num_packets=4096, buf_size=2048, max_frags=4, num_ring_slots=8192)


def _stage_tx(ch: Channel, frame: bytes, batch: int) -> None:
    ring = ch.tx_ring
    for _ in range(batch):
        pkt = ch.packet_alloc()
        assert pkt is not None
        ch.packet_write(pkt, frame)
        s = ring.head
        ch.slot_attach_packet(ring, s, pkt)
        ring.head = ring.next(s)


def tx_sync_rate(size: int, batch: int, seconds: float) -> tuple[float, float]:
    pool = _pool()
    port = Port(pool, ring_slots=RING_SLOTS, on_transmit=lambda p, pk: pool.free_packets(pk))
    ch = port.open_channel()
    frame = b"\xab" * size
    slots = 0
    cpu = wall = 0.0
    while cpu < seconds:
        _stage_tx(ch, frame, batch)
        c0, w0 = time.process_time(), time.perf_counter()
        ch.sync(SyncKind.TX)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        slots += batch
    ch.close()
    pool.close()
    return slots / cpu, slots / wall


def tx_send_rate(size: int, batch: int, seconds: float) -> float:
    pool = _pool()
    port = Port(pool, ring_slots=RING_SLOTS, on_transmit=lambda p, pk: pool.free_packets(pk))
    ch = port.open_channel()
    frames = [b"\xab" * size] * batch
    slots = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        slots += ch.send(frames)
    rate = slots / (time.process_time() - t0)
    ch.close()
    pool.close()
    return rate


def rx_sync_rate(size: int, batch: int, seconds: float) -> tuple[float, float]:
    pool = _pool()
    port = Port(pool, ring_slots=RING_SLOTS)
    ch = port.open_channel()
    frame = b"\xcd" * size
    ring = ch.rx_ring
    slots = 0
    cpu = wall = 0.0
    while cpu < seconds:
        pkts = [pool.packet_from_bytes(frame) for _ in range(batch)]
        assert port.deliver([p for p in pkts if p is not None]) == batch
        c0, w0 = time.process_time(), time.perf_counter()
        ch.sync(SyncKind.RX)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        # User half (untimed): detach, release, return packets through the FREE ring.
        s = ring.head
        while s != ring.tail:
            pkt = ch.slot_get_packet(ring, s)
            assert pkt is not None
            ch.slot_detach_packet(ring, s, pkt)
            ch.packet_free(pkt)
            s = ring.next(s)
        ring.head = s
        ch.sync(SyncKind.FREE)
        slots += batch
    ch.close()
    pool.close()
    return slots / cpu, slots / wall


def rx_recv_rate(size: int, batch: int, seconds: float) -> float:
    pool = _pool()
    port = Port(pool, ring_slots=RING_SLOTS)
    ch = port.open_channel()
    frame = b"\xcd" * size
    slots = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pkts = [pool.packet_from_bytes(frame) for _ in range(batch)]
        port.deliver([p for p in pkts if p is not None])
        slots += len(ch.recv(max=batch))
    rate = slots / (time.process_time() - t0)
    ch.close()
    pool.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per cell")
    ap.add_argument(
        "--backend",
        choices=("python", "c", "both"),
        default="both",
        help="validate.py per-slot implementation to time",
    )
    args = ap.parse_args()
    backends = ["python", "c"] if args.backend == "both" else [args.backend]
    for b in backends:
        if validate.set_backend(b) != b:
            sys.exit(f"backend {b!r} unavailable (is a C compiler installed?)")
    print(
        "| backend | direction | bytes | batch | sync slots/CPU-s | sync slots/wall-s "
        "| end-to-end slots/CPU-s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, sync_fn, e2e_fn in (
        ("TX", tx_sync_rate, tx_send_rate),
        ("RX", rx_sync_rate, rx_recv_rate),
    ):
        for size in SIZES:
            for batch in BATCHES:
                for b in backends:
                    validate.set_backend(b)
                    cpu, wall = sync_fn(size, batch, args.seconds)
                    e2e = e2e_fn(size, batch, args.seconds)
                    print(
                        f"| {b} | {name} | {size} | {batch} | {cpu:,.0f} | {wall:,.0f} "
                        f"| {e2e:,.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
