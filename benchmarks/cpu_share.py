"""How much CPU this process can get right now: N threads hashing (sha256 lets go of the
GIL), each one's CPU-seconds over a few wall seconds.

On this 2-vCPU machine a run of other work, even niced, can take a whole vCPU away (autogroup
scheduling gives each session its share whatever the nice value), and then 2 threads get
about 1 CPU-second in 2 s each: a scaling benchmark run then says nothing about scaling.
Run this just before one.

Usage: python3 benchmarks/cpu_share.py [--threads 2] [--seconds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args()
    data = b"x" * (1 << 20)
    cpu = [0.0] * a.threads

    def burn(i: int) -> None:
        t0, end = time.thread_time(), time.monotonic() + a.seconds
        while time.monotonic() < end:
            hashlib.sha256(data).digest()
        cpu[i] = time.thread_time() - t0

    threads = [threading.Thread(target=burn, args=(i,)) for i in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        f"{a.threads} threads, {a.seconds:g} s: CPU-seconds per thread "
        + ", ".join(f"{c:.2f}" for c in cpu)
        + f" ({sum(cpu) / a.seconds:.2f} CPUs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
