"""NIC scaling with no frontend: the device's own TX work on 1 thread vs 2 (issue 11 item 4).

Each "NIC" is a ``VirtioNet`` whose TX ring a driver keeps full of 64-byte one-buffer chains
(``scripts/bench_virtq.py``'s ``Ring``: re-posting is one avail-idx write), drained by
``process_tx`` on its own thread exactly as a datapath thread does it: under the NIC's
``DatapathLock`` (its NIC lock and the shared lock, the shared lock let go around each
compiled burst), forwarding into a sink that frees the packets under the shared lock.  All
NICs share one pool.  What is counted is frames per second of wall time, all NICs together,
with the process pinned to ``--cpus``; the frontend's cost is out of the picture, so this is
what the threads themselves scale to (GIL and lock included).

``--direction rx`` measures the other way: each NIC's own RX generator (vdev/net/rxgen.py:
64-byte template frames, the device-generated source) fills an RX ring whose driver only
re-posts the buffers (one avail-idx write), through ``drain_rx`` under the same lock; with
``--ring`` large enough, most of each drain is the compiled burst, outside the GIL.

Usage: VDEV_FASTQUEUE=1 python3 benchmarks/nic_scaling_inproc.py [--seconds 2] [--repeat 3]
       [--direction tx|rx] [--ring N]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_virtq import Ring, _memory, _Vring
from nic_scaling import PYSPY, pyspy, tally

from vdev.abi import lib
from vdev.net.nic import DEFAULT_FEATURES, VirtioNet
from vdev.net.threads import DatapathLock, WorldLock
from vdev.skywalk import Pbufpool
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.virtio import fastqueue

N = 256


def run(
    nics: int,
    seconds: float,
    profile: list[str] | None = None,
    direction: str = "tx",
    n: int = N,
) -> tuple[float, list[float]]:
    """(frames per wall second, all NICs; CPU seconds per thread)."""
    features = DEFAULT_FEATURES & ~(1 << lib.VIRTIO_F_RING_PACKED)
    pool = Pbufpool(num_packets=max(8 * N * nics, 512 * nics), buf_size=2048, max_frags=4)
    shared = threading.RLock()
    world = WorldLock(shared)
    counts = [0] * nics
    cpu = [0.0] * nics
    mems, rigs = [], []
    start = threading.Barrier(nics + 1)
    stop = threading.Event()

    def sink(_name: str, pkts: list[int]) -> None:
        pool.free_packets(pkts)  # called with the shared lock held, as the switch is

    for i in range(nics):
        mem, fd = _memory()
        nic = VirtioNet(f"nic{i}", pool, sink)
        nic.negotiated = features
        world.add(nic.lock)
        dp = DatapathLock(nic, world, shared)
        nic.burst_unlocked = dp.unlocked
        if direction == "rx":
            ring = Ring(mem, False, n, 0, features)
            ring.fill(b"")
            nic.vrings = {0: _Vring(0, ring.queue)}  # type: ignore[dict-item]
            nic.start_rx_generator([numbered(GUEST_MAC, HOST_MAC, k, 64) for k in range(256)])
        else:
            ring = Ring(mem, False, N, 1, features)
            ring.fill(bytes(nic.hdr_len) + numbered(HOST_MAC, GUEST_MAC, i, 64))
            nic.vrings = {1: _Vring(1, ring.queue)}  # type: ignore[dict-item]
        tx = ring
        mems.append((mem, fd))
        rigs.append((nic, dp, tx))

    def worker(i: int) -> None:
        nic, dp, tx = rigs[i]
        dp.thread_ident = threading.get_ident()
        start.wait()
        t0 = time.thread_time()
        while not stop.is_set():
            with dp:
                tx.post()
                if direction == "rx":
                    before = nic.stats[0].frames
                    nic.drain_rx()
                    counts[i] += nic.stats[0].frames - before
                else:
                    counts[i] += nic.process_tx(1)
        cpu[i] = time.thread_time() - t0

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nics)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    if profile is not None and PYSPY is not None:
        raw, _ = pyspy(os.getpid(), max(1.0, seconds - 0.5))
        pick = lambda st: st.split(";", 1)[0] if "worker" in st else None  # noqa: E731
        profile.append(tally(raw, pick))
    time.sleep(max(0.0, t0 + seconds - time.monotonic()))
    stop.set()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    for nic, _dp, tx in rigs:
        nic.stop_rx_generator()
        tx.queue.close()
    for mem, fd in mems:
        mem.close()
        os.close(fd)
    pool.close()
    return sum(counts) / wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="py-spy the first 2-NIC 2-CPU run")
    fq = os.environ.get("VDEV_FASTQUEUE") == "1"
    p.add_argument("--backend", default="c" if fq else "python", help="c or python bursts")
    p.add_argument("--direction", choices=("tx", "rx"), default="tx")
    p.add_argument("--ring", type=int, default=N, help="RX ring size (--direction rx)")
    args = p.parse_args()
    fastqueue.set_backend(args.backend)
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, virtqueue bursts: {fastqueue.BACKEND}, "
        f"direction {args.direction}" + (f", ring {args.ring}" if args.direction == "rx" else "")
    )
    print(
        "| NICs (threads) | CPUs | pps, all NICs (wall) | CPU s per thread "
        "| frames per CPU s | x 1 NIC |"
    )
    print("|---:|---|---:|---|---:|---:|")
    notes: list[str] = []
    for _ in range(args.repeat):
        base = None
        for nics, cpus in ((1, {1}), (2, {1}), (2, {0, 1})):
            os.sched_setaffinity(0, cpus)
            prof = [] if args.profile and len(cpus) == 2 and not notes else None
            pps, cpu = run(nics, args.seconds, prof, args.direction, args.ring)
            if prof:
                notes.append(f"py-spy of the {nics}-NIC run on CPUs 0,1, per thread:\n{prof[0]}")
            base = base or pps
            print(
                f"| {nics} | {','.join(map(str, sorted(cpus)))} | {pps / 1e3:.0f} kpps "
                f"| {', '.join(f'{c:.2f}' for c in cpu)} "
                f"| {pps * args.seconds / max(sum(cpu), 1e-9) / 1e3:.0f} k | {pps / base:.2f} |",
                flush=True,
            )
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
