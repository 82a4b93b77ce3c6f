"""Echo latency: ICMP echo round trips from one frontend, through vdev's responder or DPDK.

The same QEMU-free frontend (``VirtioNetFrontend``, the Python driver, one frame in flight)
sends an ICMP echo request and waits for the reply, ``--count`` times, against two
backends on a vhost-user socket:

* vdev: a device process (``Device`` with one NIC; the built-in responder answers),
  event-driven, and with ``--poll`` also in busy-poll mode (``vdev serve --poll``);
* DPDK: ``dpdk-testpmd --vdev net_vhost0 --forward-mode=icmpecho`` (testpmd answers).

The difference of the medians is what vdev adds to a round trip compared with DPDK's
vhost-user backend answering in C (issue 11's target: at most 20 us).  Both include the
frontend's own cost (Python, kicks and calls through eventfds), which is the same on both.

Usage: python3 benchmarks/echo_latency.py [--count 2000] [--poll] [--kick-hold-us US]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_throughput import TESTPMD, Child, _wait

from vdev.net.nic import DEFAULT_FEATURES
from vdev.testing.frames import icmp_echo
from vdev.testing.frontend import VirtioNetFrontend

DEVICE = """
import signal, sys, threading
from vdev.net.device import Device
from vdev.shutdown import stop_on_signals
stop = threading.Event()
stop_on_signals(stop, (signal.SIGTERM,))
with Device(kick_hold=float(sys.argv[3]) * 1e-6) as d:
    d.add_nic(sys.argv[1])
    print("READY", flush=True)
    d.serve_forever(stop, poll=sys.argv[2] == "poll")
"""


KICK_HOLD_US = 100.0  # the device's default (vdev/net/kickhold.py)


def rtts(sock: str, count: int) -> list[float]:
    fe = VirtioNetFrontend(sock, features=DEFAULT_FEATURES, connect_timeout=20)
    out: list[float] = []
    try:
        for seq in range(count + 50):
            frame = icmp_echo(seq & 0xFFFF)
            t0 = time.perf_counter()
            fe.send([frame])
            got: list[bytes] = []
            deadline = t0 + 2.0
            while not got and time.perf_counter() < deadline:
                got = [g for g in fe.recv(1, timeout=0.5) if len(g) > 34 and g[34] == 0]
            t1 = time.perf_counter()
            if got and seq >= 50:  # the first 50: warm-up
                out.append(t1 - t0)
    finally:
        fe.close()
    return out


def measure(backend: str, workdir: Path, count: int, hold_us: float) -> list[float]:
    sock = str(workdir / f"{backend.replace(' ', '')}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    if backend.startswith("vdev"):
        mode = "poll" if backend == "vdev --poll" else "events"
        child = Child([sys.executable, "-c", DEVICE, sock, mode, str(hold_us)], "worker")
        env_ok = child.samples.ready.is_set
    else:
        prefix = f"vdevecho{os.getpid()}"
        argv = ["timeout", "-s", "INT", "-k", "5", "300", "stdbuf", "-oL", str(TESTPMD)]
        argv += ["--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix]
        argv += ["-l", "0,1", "--vdev", f"net_vhost0,iface={sock},queues=1", "--"]
        argv += ["--total-num-mbufs", "8192", "--forward-mode=icmpecho", "-a"]
        argv += ["--stats-period", "1", "--no-flush-rx"]
        child = Child(argv, "rx", prefix=prefix)

        def env_ok() -> bool:
            return os.path.exists(sock)

    try:
        _wait(env_ok, 30, f"{backend} backend did not start")
        return rtts(sock, count)
    finally:
        child.stop(15 if backend.startswith("vdev") else 2)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _us(xs: list[float], q: float) -> str:
    if not xs:
        return "n/a"
    s = sorted(xs)
    return f"{1e6 * s[min(len(s) - 1, int(q * len(s)))]:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=2000, help="round trips per backend")
    ap.add_argument("--poll", action="store_true", help="also vdev in busy-poll mode")
    ap.add_argument(
        "--kick-hold-us",
        type=float,
        default=KICK_HOLD_US,
        help="vdev's TX kick mitigation window (vdev serve --kick-hold-us; default 100)",
    )
    args = ap.parse_args()
    backends = ["vdev"] + (["vdev --poll"] if args.poll else []) + (["dpdk"] if TESTPMD else [])
    print(f"load average at start: {os.getloadavg()[0]:.2f}; kick hold {args.kick_hold_us:g} us")
    res: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vdevecho") as tmp:
        for b in backends:
            res[b] = measure(b, Path(tmp), args.count, args.kick_hold_us)
    print("| backend | replies | median (us) | p99 (us) |")
    print("|---|---:|---:|---:|")
    for b, xs in res.items():
        print(f"| {b} | {len(xs)} | {_us(xs, 0.5)} | {_us(xs, 0.99)} |")
    for b in ("vdev", "vdev --poll"):
        if res.get(b) and res.get("dpdk"):
            added = 1e6 * (statistics.median(res[b]) - statistics.median(res["dpdk"]))
            print(f"added by {b} vs DPDK (median): {added:.0f} us")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
