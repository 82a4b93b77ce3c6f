"""Where one NIC's TX loop spends its time, per 256-chain burst (in process, one thread).

The loop of ``nic_scaling_inproc.py``'s worker: a 256-entry split ring of 64 B chains kept
full by a driver that only moves the avail idx, drained by ``process_tx`` under the NIC's
real ``DatapathLock`` into a sink that frees.  Prints frames per CPU second, then the
profile: cProfile's top functions by own time, or with ``--lines`` (needs line_profiler)
the lines of ``fastqueue.tx_burst`` and ``VirtioNet._process_tx_batch`` by time.

Usage: python3 benchmarks/profile_tx_burst.py [--seconds 3] [--lines]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_virtq import Ring, _memory, _Vring

from vdev.abi import lib
from vdev.net.nic import DEFAULT_FEATURES, VirtioNet
from vdev.net.threads import DatapathLock, WorldLock
from vdev.skywalk import Pbufpool
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.virtio import fastqueue

N = 256


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--lines", action="store_true", help="line profile (line_profiler)")
    args = p.parse_args()
    if fastqueue.set_backend("c") != "c":
        print("no compiled bursts (no C compiler?)", file=sys.stderr)
        return 1
    features = DEFAULT_FEATURES & ~(1 << lib.VIRTIO_F_RING_PACKED)
    pool = Pbufpool(num_packets=8 * N, buf_size=2048, max_frags=4)
    shared = threading.RLock()
    world = WorldLock(shared)
    mem, fd = _memory()
    nic = VirtioNet("nic0", pool, lambda _name, pkts: pool.free_packets(pkts))
    nic.negotiated = features
    world.add(nic.lock)
    dp = DatapathLock(nic, world, shared)
    nic.burst_unlocked = dp.unlocked
    tx = Ring(mem, False, N, 1, features)
    tx.fill(bytes(nic.hdr_len) + numbered(HOST_MAC, GUEST_MAC, 0, 64))
    nic.vrings = {1: _Vring(1, tx.queue)}  # type: ignore[dict-item]
    dp.thread_ident = threading.get_ident()

    def loop(seconds: float) -> tuple[int, float]:
        n, t0 = 0, time.thread_time()
        while time.thread_time() - t0 < seconds:
            with dp:
                tx.post()
                n += nic.process_tx(1)
        return n, time.thread_time() - t0

    loop(0.5)  # warm up
    n, t = loop(args.seconds)
    print(f"{n / t / 1e6:.2f} M frames per CPU second (no profiler)")
    if args.lines:
        try:
            from line_profiler import LineProfiler
        except ImportError:
            print("--lines needs line_profiler (pip install line_profiler)", file=sys.stderr)
            return 1
        lp = LineProfiler(fastqueue.tx_burst, VirtioNet._process_tx_batch)
        lp.enable()
        loop(args.seconds)
        lp.disable()
        lp.print_stats()
    else:
        prof = cProfile.Profile()
        prof.enable()
        loop(args.seconds)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    tx.queue.close()
    mem.close()
    pool.close()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
