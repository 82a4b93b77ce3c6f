"""Sandbox throughput: the bare guest driver (QEMU TCG) <-> the vdev device, packets per second.

One sandbox (``host.cli_sandbox.Sandbox``: the device in this process, QEMU booting
``guest/driver``) and one host Skywalk channel on the device's switch:

* guest -> host: the driver's ``tx N SIZE BATCH``; frames counted on the host channel (read
  by a thread; its RX ring has 2048 slots and what overflows is counted as switch drops).
  Time: from typing the command to its ``OK tx`` line (so it includes the final drain).
* host -> guest: the driver's ``rx N``; the host channel sends N pattern frames as fast as
  its TX ring accepts them; the driver checks every frame. Time: from the first frame sent
  to the ``OK rx`` line.

Rates are wall-clock (the machine is shared). Per-direction driver counters (syncs, kicks)
are taken from the host's view of guest RAM (``Sandbox.introspect``).

``--irq on,off`` runs every cell once per driver mode (``irq=1``: the driver waits for
interrupts in ``hlt``; ``irq=0``: it busy-polls), on a fresh sandbox each; the "driver irqs"
column counts the interrupts it attributed to a queue during the cell.

Usage: python3 benchmarks/sandbox_throughput.py [--count 5000] [--sizes 64,1500]
       [--batches 32] [--machine pc] [--irq on] [--append ARGS]
       [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host.cli_sandbox import Sandbox
from tests.guest.sandbox_support import Collector, guest_frames, send_all, to_guest
from vdev.skywalk import Channel


@dataclass
class Row:
    direction: str
    size: int
    batch: int | str
    frames: int
    seconds: float
    drops: int
    syncs: int
    kicks: int
    irq: str = "on"
    irqs: int = 0
    qemu_cpu_ms: int = 0

    @property
    def pps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        return self.pps * self.size * 8 / 1e6


def counters(sb: Sandbox) -> dict[str, int]:
    stats: dict[str, int] = dict(sb.introspect()["stats"])
    stats["qemu_cpu_ms"] = qemu_cpu_ms(sb)
    return stats


def qemu_cpu_ms(sb: Sandbox) -> int:
    """User + system CPU time QEMU (all its threads) has used, from /proc (0 if unknown)."""
    pid = sb.machine.pid if sb.machine is not None else None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks * 1000 // os.sysconf("SC_CLK_TCK")


def bench_tx(sb: Sandbox, ch: Channel, count: int, size: int, batch: int) -> Row:
    assert sb.device is not None
    drops0 = sb.device.switch.stats["bench"].drops
    c0 = counters(sb)
    col = Collector(ch)
    t0 = time.monotonic()
    try:
        reply = sb.cmd(f"tx {count} {size} {batch}", timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        frames = col.stop()
    c1 = counters(sb)
    seqs = guest_frames(frames)
    assert reply.int("sent") == count and seqs == sorted(seqs)
    drops = sb.device.switch.stats["bench"].drops - drops0
    return Row(
        "guest->host",
        size,
        batch,
        len(seqs),
        elapsed,
        drops,
        c1["tx_syncs"] - c0["tx_syncs"],
        c1["tx_kicks"] - c0["tx_kicks"],
        irqs=c1["rx_irqs"] + c1["tx_irqs"] - c0["rx_irqs"] - c0["tx_irqs"],
        qemu_cpu_ms=c1["qemu_cpu_ms"] - c0["qemu_cpu_ms"],
    )


def bench_rx(sb: Sandbox, ch: Channel, count: int, size: int) -> Row:
    frames = to_guest(count, size)
    c0 = counters(sb)
    sb.send_line(f"rx {count} 30000")
    time.sleep(0.05)
    t0 = time.monotonic()
    # Paced by the NIC's RX backlog: the compiled host side outruns any TCG guest.
    send_all(ch, frames, limit=300, nic=sb.device.nics[0] if sb.device is not None else None)
    reply = sb.wait_reply(timeout=300)
    elapsed = time.monotonic() - t0
    c1 = counters(sb)
    got = reply.int("received")
    assert reply.int("bad") == 0, reply.status_line
    if got < count and sb.device is not None:
        nic = sb.device.nics[0]
        reasons = {i: dict(q.drop_reasons) for i, q in nic.stats.items() if q.drop_reasons}
        print(f"  (rx {size}: {count - got} not received; device drop reasons {reasons})")
    return Row(
        "host->guest",
        size,
        "-",
        got,
        elapsed,
        count - got,
        c1["rx_syncs"] - c0["rx_syncs"],
        c1["rx_kicks"] - c0["rx_kicks"],
        irqs=c1["rx_irqs"] + c1["tx_irqs"] - c0["rx_irqs"] - c0["tx_irqs"],
        qemu_cpu_ms=c1["qemu_cpu_ms"] - c0["qemu_cpu_ms"],
    )


def idle_cpu(sb: Sandbox, seconds: float = 2.0) -> float:
    """Share of one CPU QEMU uses while the driver sits at its prompt."""
    t0, c0 = time.monotonic(), qemu_cpu_ms(sb)
    time.sleep(seconds)
    return (qemu_cpu_ms(sb) - c0) / 1000 / (time.monotonic() - t0)


def table(rows: list[Row]) -> str:
    out = [
        "| irq | direction | bytes | batch | frames | seconds | packets/s | Mbit/s | drops "
        "| driver syncs | driver kicks | driver irqs | QEMU CPU ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.irq} | {r.direction} | {r.size} | {r.batch} | {r.frames} | {r.seconds:.2f} "
            f"| {r.pps:,.0f} | {r.mbps:,.1f} | {r.drops} | {r.syncs} | {r.kicks} | {r.irqs} "
            f"| {r.qemu_cpu_ms} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=5000, help="frames per measurement")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes (comma-separated)")
    ap.add_argument("--batches", default="32", help="driver TX batch sizes (comma-separated)")
    ap.add_argument("--machine", default="pc", choices=("pc", "q35", "microvm"))
    ap.add_argument("--irq", default="on", help="driver modes: on, off or on,off")
    ap.add_argument("--append", default="", help="more driver options (--append of vdev sandbox)")
    ap.add_argument("--results", metavar="FILE", help="append a markdown section to FILE")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.irq.split(",")
    if any(m not in ("on", "off") for m in modes):
        ap.error(f"--irq {args.irq}: on, off or on,off")
    rows: list[Row] = []
    idle: list[tuple[str, float]] = []
    boot = 0.0
    for mode in modes:
        append = f"irq={int(mode == 'on')} {args.append}".strip()
        with Sandbox(machine=args.machine, append=append) as sb:
            boot = sb.start_to_prompt
            ch = sb.channel("bench", ring_slots=2048)
            bench_tx(sb, ch, 1000, 64, 32)  # warm-up (both sides' caches, the pool)
            bench_rx(sb, ch, 1000, 64)
            idle.append((mode, idle_cpu(sb)))
            for size in sizes:
                for batch in batches:
                    rows.append(bench_tx(sb, ch, args.count, size, batch))
                    rows[-1].irq = mode
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                rows.append(bench_rx(sb, ch, args.count, size))
                rows[-1].irq = mode
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print()
    print(text)
    print(f"\nstart to first prompt: {boot * 1000:.0f} ms")
    for mode, share in idle:
        print(f"idle at the prompt, irq {mode}: QEMU used {share:.0%} of a CPU")
    if args.results:
        cmd = "python3 benchmarks/sandbox_throughput.py " + " ".join(
            a for a in sys.argv[1:] if not a.startswith("--results") and a != args.results
        )
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        section = (
            "\n## Sandbox throughput\n\n"
            "Packets per second between the bare guest driver (`guest/driver`, QEMU 7.2 TCG, "
            f"`{args.machine}` machine, virtio-net-pci over vhost-user) and the vdev device in "
            "the same `vdev sandbox` process (`host/cli_sandbox.py`), through a host Skywalk "
            "channel on the device's switch. guest->host: the driver's `tx N SIZE BATCH`, "
            "frames counted on the host channel (a reader thread), timed from the command to "
            "its `OK` line. host->guest: the host channel sends N pattern frames as fast as "
            "its TX ring takes them while the driver runs `rx N` (every frame checked), timed "
            "from the first frame to the `OK` line. Driver syncs/kicks are read from guest "
            "RAM (`Sandbox.introspect`). Wall-clock rates.\n\n"
            f"- Command: `{cmd.strip()}`\n"
            f"- Date: {date}\n"
            f"- Machine: {os.cpu_count()} cores shared with other QEMU jobs (load average "
            f"{load} at the end); start to first prompt {boot * 1000:.0f} ms.\n\n"
            f"{text}\n"
        )
        with open(args.results, "a") as f:
            f.write(section)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
