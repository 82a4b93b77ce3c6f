"""What a wake-up costs here: the floor under every kick, interrupt and GIL hand-off.

1. Two processes ping-pong through two eventfds, each waiting in ``select`` as the device's
   loop and the Python frontend do: both pinned to one CPU, then to two.  A kick and an
   interrupt are each one such wake-up, so an event-driven echo pays two.  On a VM, waking a
   halted vCPU goes through the hypervisor, which a bare-metal number would hide.
2. Threads that share the GIL as the per-NIC datapath threads do: each iteration is a
   GIL-free C call (``hashlib.sha256`` of 8 KiB: the compiled burst) and a little Python
   (the glue around it).  One and two threads, on one and on two CPUs: what a second thread
   adds when the GIL has to move between CPUs on every burst.

Usage: python3 benchmarks/wakeup_cost.py [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time


def ping_pong(count: int, cpus: tuple[int, int]) -> tuple[float, float, float]:
    """(round trip, eventfd_write call, writer CPU per round trip), in seconds."""
    a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpus[1]})
            for _ in range(count):
                select.select([a], [], [], 5.0)
                os.eventfd_read(a)
                os.eventfd_write(b, 1)
        finally:
            os._exit(0)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        write = 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            t = time.perf_counter()
            os.eventfd_write(a, 1)
            write += time.perf_counter() - t
            if not select.select([b], [], [], 5.0)[0]:
                raise TimeoutError("the other process stopped answering")
            os.eventfd_read(b)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        os.close(a)
        os.close(b)
    return wall / count, write / count, cpu / count


def gil_pair(count: int, nthreads: int, cpus: set[int]) -> tuple[float, float]:
    """(iterations per second over all threads, CPU per iteration in seconds)."""
    import hashlib
    import threading

    buf = bytes(8192)

    def work() -> None:
        for _ in range(count):
            hashlib.sha256(buf)  # the GIL is released for buffers this size
            x = 0
            for i in range(60):
                x += i

    os.sched_setaffinity(0, cpus)
    try:
        ts = [threading.Thread(target=work) for _ in range(nthreads)]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return count * nthreads / wall, cpu / (count * nthreads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--count", type=int, default=20000, help="round trips per placement")
    a = ap.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    print("| placement | round trip (us) | eventfd_write (us) | writer CPU per trip (us) |")
    print("|---|---:|---:|---:|")
    placements = [("one CPU", (0, 0))] + ([("two CPUs", (0, 1))] if ncpu > 1 else [])
    for name, cpus in placements:
        rt, wr, cpu = ping_pong(a.count, cpus)
        print(f"| {name} | {rt * 1e6:.1f} | {wr * 1e6:.1f} | {cpu * 1e6:.1f} |", flush=True)
    print()
    print("| CPUs | threads | iterations/s (all threads) | CPU per iteration (us) |")
    print("|---:|---:|---:|---:|")
    sets: list[set[int]] = [{0}] + ([{0, 1}] if ncpu > 1 else [])
    for cpuset in sets:
        for nthreads in (1, 2):
            rate, per = gil_pair(a.count, nthreads, cpuset)
            print(f"| {len(cpuset)} | {nthreads} | {rate:,.0f} | {per * 1e6:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
