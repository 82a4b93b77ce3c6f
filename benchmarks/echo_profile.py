"""Where an echo round trip's device CPU goes: cProfile on the NIC's datapath thread.

One in-process ``Device`` (per-NIC threads, the built-in responder) and the QEMU-free
frontend; ``--count`` ICMP echoes, one in flight, as ``echo_latency.py`` sends them.  The
NIC thread runs under ``cProfile`` with ``time.thread_time`` as its clock, so the table is
that thread's CPU (not the wall time it spent descheduled), and the calls per echo say how
much Python one frame costs on its way in and back out.  cProfile's own overhead inflates
the times several-fold; the call counts are exact.

The first run is unprofiled and gives the thread's real CPU per echo (``time.thread_time`` over
the thread's life, the device's start and stop included).

Usage: python3 benchmarks/echo_profile.py [--count 3000] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdev.net import threads
from vdev.net.device import Device
from vdev.net.nic import DEFAULT_FEATURES
from vdev.testing.frames import icmp_echo
from vdev.testing.frontend import VirtioNetFrontend


def echoes(count: int) -> tuple[int, float]:
    """``count`` echoes, one in flight, through a fresh device: (replies, seconds)."""
    replies = 0
    with tempfile.TemporaryDirectory(prefix="vdevechoprof") as tmp, Device() as device:
        sock = str(Path(tmp) / "nic0.sock")
        device.add_nic(sock)
        device.start()
        with VirtioNetFrontend(sock, features=DEFAULT_FEATURES) as fe:
            t0 = time.perf_counter()
            for seq in range(count):
                fe.send([icmp_echo(seq & 0xFFFF)])
                got: list[bytes] = []
                deadline = time.perf_counter() + 2.0
                while not got and time.perf_counter() < deadline:
                    got = [g for g in fe.recv(1, timeout=0.5) if len(g) > 34 and g[34] == 0]
                replies += bool(got)
            elapsed = time.perf_counter() - t0
    return replies, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=3000, help="echo round trips")
    ap.add_argument("--top", type=int, default=25, help="functions shown")
    a = ap.parse_args()
    profiles: list[cProfile.Profile] = []
    run = threads.NicDatapath._run
    cpu: list[float] = []

    def timed_run(self: threads.NicDatapath, *args: Any, **kw: Any) -> Any:
        t0 = time.thread_time()
        try:
            return run(self, *args, **kw)
        finally:
            cpu.append(time.thread_time() - t0)

    def profiled_run(self: threads.NicDatapath, *args: Any, **kw: Any) -> Any:
        prof = cProfile.Profile(time.thread_time)
        profiles.append(prof)
        prof.enable()
        try:
            return run(self, *args, **kw)
        finally:
            prof.disable()

    # First unprofiled (the NIC thread's CPU per echo as it really is), then profiled.
    threads.NicDatapath._run = timed_run  # type: ignore[method-assign]
    plain_replies, plain_elapsed = echoes(a.count)
    threads.NicDatapath._run = profiled_run  # type: ignore[method-assign]
    replies, elapsed = echoes(a.count)
    threads.NicDatapath._run = run  # type: ignore[method-assign]
    if not profiles:
        print("no datapath thread ran (threads=single?)", file=sys.stderr)
        return 1
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(
        f"unprofiled: {plain_replies}/{a.count} replies, {plain_elapsed / a.count * 1e6:.0f} us"
        f" per round trip; NIC thread {sum(cpu) / a.count * 1e6:.1f} us of CPU per echo"
    )
    print(f"profiled: {replies}/{a.count} replies, {elapsed / a.count * 1e6:.0f} us per round trip")
    print(
        f"NIC thread: {calls / a.count:.0f} Python calls and "
        f"{stats.total_tt / a.count * 1e6:.0f} us of CPU (profiled) per echo"  # type: ignore[attr-defined]
    )
    stats.sort_stats("tottime").print_stats(a.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
