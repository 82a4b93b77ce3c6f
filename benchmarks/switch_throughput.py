"""Two-port switch: testpmd txonly on NIC 0 -> vdev's L2 switch -> NIC 1 -> testpmd rxonly,
next to DPDK testpmd io-forwarding between two ``net_vhost`` ports, with the same two
frontends (the VALE / vhost-user-bridge job, measured side by side).

Frontends (both backends): testpmd A, ``net_virtio_user`` txonly with ``--eth-peer`` set to
B's MAC; testpmd B, ``net_virtio_user`` rxonly.  The number is what B receives (its own
Rx-pps), so both backends are counted by the same code.  The vdev backend is a device
process serving two NICs with the switch's FDB pinned (B's MAC behind nic1: B never sends,
so nothing would teach the switch where it lives); it also reports frames written into
nic1's guest RX buffers, and its CPU use (``/proc/<pid>/stat``, in % of one core).

Three busy processes share this machine's cores with vdev (two testpmd frontends, each
polling one lcore); DPDK's io forward adds a third poller, vdev serves from its event loop.

Usage: python3 benchmarks/switch_throughput.py [--sizes 64,1500] [--duration 3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_throughput import (
    TESTPMD,
    Child,
    _counter_rate,
    _pps_mean,
    _wait,
    fmt_pps,
)

from vdev.net.device import Device
from vdev.net.responder import mac_bytes
from vdev.shutdown import stop_on_signals
from vdev.skywalk import Pbufpool

MAC_A = "02:00:00:00:0a:01"
MAC_B = "02:00:00:00:0b:02"
_n = 0


def worker(sock0: str, sock1: str) -> int:
    """Serve nic0 and nic1; prints READY then "S <monotonic> <nic1 rx frames> <cpu s>"."""
    pool = Pbufpool(
        num_packets=16384, buf_size=2048, max_frags=4, num_large_bufs=16, large_buf_size=65536
    )
    device = Device(pool=pool)
    device.add_nic(sock0, mac=MAC_A)
    nic1 = device.add_nic(sock1, mac=MAC_B)
    device.switch.fdb[mac_bytes(MAC_B)] = nic1.name
    stop = threading.Event()
    stop_on_signals(stop, (signal.SIGTERM,))

    def sampler() -> None:
        while not stop.is_set():
            cpu = time.process_time()
            sys.stdout.write(f"S {time.monotonic():.6f} {nic1.stats[0].frames} {cpu:.4f}\n")
            sys.stdout.flush()
            stop.wait(0.1)

    print("READY", flush=True)
    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    device.serve_forever(stop)
    t.join(2)
    device.close()
    return 0


def _testpmd(vdevs: list[str], mode: str, size: int, lcores: str, main: int, peer: str | None):
    global _n
    _n += 1
    prefix = f"vdevsw{os.getpid()}x{_n}"
    argv = ["timeout", "-s", "INT", "-k", "5", "90", "stdbuf", "-oL", str(TESTPMD)]
    argv += ["--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix]
    argv += ["-l", lcores, "--main-lcore", str(main)]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--total-num-mbufs", "16384", f"--forward-mode={mode}", f"--txpkts={size}"]
    argv += ["--stats-period", "1", "-a", "--no-flush-rx"]
    if peer:
        argv.append(f"--eth-peer=0,{peer}")
    return Child(argv, "rx" if mode in ("rxonly", "io") else "tx", prefix=prefix)


def measure(workdir: Path, backend: str, size: int, duration: float, warmup: float) -> dict:
    s0, s1 = str(workdir / f"{backend}-{size}-0.sock"), str(workdir / f"{backend}-{size}-1.sock")
    for s in (s0, s1):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(s)
    children: list[Child] = []
    try:
        if backend == "vdev":
            be = Child([sys.executable, __file__, "--worker", s0, s1], "worker")
            children.append(be)
            _wait(be.samples.ready.is_set, 20, "vdev worker did not start")
        else:
            be = _testpmd(
                [f"net_vhost0,iface={s0},queues=1", f"net_vhost1,iface={s1},queues=1"],
                "io",
                size,
                "0,1",
                0,
                None,
            )
            children.append(be)
        _wait(lambda: os.path.exists(s0) and os.path.exists(s1), 20, "backend sockets missing")
        rx = _testpmd(
            [f"net_virtio_user0,path={s1},queues=1,server=0,mac={MAC_B}"],
            "rxonly",
            size,
            "0,1",
            1,
            None,
        )
        children.append(rx)
        time.sleep(1.0)  # B's RX ring posted before A starts
        tx = _testpmd(
            [f"net_virtio_user0,path={s0},queues=1,server=0,mac={MAC_A}"],
            "txonly",
            size,
            "0,1",
            1,
            MAC_B,
        )
        children.append(tx)
        deadline = time.monotonic() + 30 + warmup + duration
        first = None
        while time.monotonic() < deadline:
            with rx.samples.lock:
                first = next((t for t, v in rx.samples.points if v > 0), None)
            if first is not None and time.monotonic() > first + warmup + duration + 1.1:
                break
            time.sleep(0.05)
        if first is None:
            return {"pps": None, "dev_pps": None, "cpu": None}
        w = (first + warmup, first + warmup + duration)
        with rx.samples.lock:
            pps = _pps_mean(list(rx.samples.points), *w)
        dev_pps = cpu = None
        if backend == "vdev":
            with be.samples.lock:
                dev_pps = _counter_rate(list(be.samples.points), *w)
                cpu_rate = _counter_rate(list(be.samples.ring_points), *w)
            cpu = None if cpu_rate is None else 100 * cpu_rate
        for child in reversed(children):
            child.stop(signal.SIGTERM if child is be and backend == "vdev" else signal.SIGINT)
        return {"pps": pps, "dev_pps": dev_pps, "cpu": cpu}
    finally:
        for child in children:
            child.close()
        for s in (s0, s1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="64,1500")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1, help="measure each cell this many times")
    ap.add_argument("--worker", nargs=2, metavar="SOCK", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    if TESTPMD is None:
        print("dpdk-testpmd not found: nothing to compare with", file=sys.stderr)
        return 1
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        "| bytes | round | vdev switch (B Rx-pps) | vdev nic1 RX (pps) | vdev CPU % "
        "| DPDK io-fwd (B Rx-pps) | ratio vdev/DPDK |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="vdevsw") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            for r in range(args.rounds):
                v = measure(Path(tmp), "vdev", size, args.duration, args.warmup)
                d = measure(Path(tmp), "dpdk", size, args.duration, args.warmup)
                ratio = f"{v['pps'] / d['pps']:.4f}" if v["pps"] and d["pps"] else "n/a"
                cpu = f"{v['cpu']:.0f}" if v["cpu"] is not None else "n/a"
                print(
                    f"| {size} | {r + 1} | {fmt_pps(v['pps'])} | {fmt_pps(v['dev_pps'])} | {cpu} "
                    f"| {fmt_pps(d['pps'])} | {ratio} |",
                    flush=True,
                )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
