"""NIC scaling: do 2 NICs on 2 datapath threads move more than 1 NIC on 1? (issue 11 item 4)

Rows: 1 NIC (threads=per-nic: one datapath thread), 2 NICs with threads=per-nic (a thread
each), 2 NICs with threads=single (one thread for both: the control).  The load is testpmd
``net_virtio_user`` txonly, 64 B, one port per NIC, every port on ONE forwarding lcore (so
the frontend costs one spinning core whatever the number of NICs), sending to a sink MAC.
vdev's switch unicasts those frames to a sink endpoint that frees them; the count is the
frames the NICs took off their TX rings (tx0 ``frames``) per second, in steady state.

DPDK is measured in the same run with the same frontend: ``dpdk-testpmd --vdev
net_vhost0[,net_vhost1]`` rxonly on one forwarding lcore, counted by its own Rx-pps (summed
over ports).  The machine has 2 cores: the frontend's lcore is pinned to core 0, vdev gets
core 1 with 1 NIC (``--cpus-1``, default "1") and cores 0-1 with 2 NICs (``--cpus-2``,
default "0,1"), so "2 NICs on 2 cores" shares core 0 with the frontend.  vdev's CPU use in
the window (% of one core, all its threads) is in the table.

Usage: python3 benchmarks/nic_scaling.py [--duration 3] [--warmup 1] [--rows 1,2,2s]
       [--backends vdev,dpdk] [--profile]  (VDEV_FASTQUEUE=1 for the compiled bursts)

``--profile`` runs py-spy on the vdev worker during the 2-NIC per-nic row and prints, per
thread, where its samples are: in a compiled burst (GIL released), waiting for a lock,
waiting in select, or running Python (holding the GIL).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_throughput import Child, _counter_rate, _wait

from vdev.net.device import Device
from vdev.shutdown import stop_on_signals
from vdev.skywalk import Pbufpool
from vdev.testing.sink import DropSink
from vdev.virtio import fastqueue

TESTPMD = shutil.which("dpdk-testpmd")
PYSPY = shutil.which("py-spy")
SINK_MAC = "02:00:00:00:00:99"
BACKENDS_SEEN: set[str] = set()  # the workers' virtqueue backends (c or python)
ROWS = {"1": (1, "per-nic"), "2": (2, "per-nic"), "2s": (2, "single")}


def worker(socks: list[str], threads: str, poll: bool) -> int:
    """Serve the NICs; print READY, then "S <monotonic> <tx0 frames, all NICs>" every 0.1 s."""
    pool = Pbufpool(
        num_packets=16384, buf_size=2048, max_frags=4, num_large_bufs=16, large_buf_size=65536
    )
    device = Device(pool=pool, threads=threads)
    nics = [device.add_nic(s, mac=f"52:54:00:00:01:{i:02x}") for i, s in enumerate(socks)]
    sink = DropSink(pool)
    device.switch.attach(sink)
    device.switch.fdb[bytes.fromhex(SINK_MAC.replace(":", ""))] = sink.name
    stop = threading.Event()
    stop_on_signals(stop, (signal.SIGTERM,))

    def sampler() -> None:
        while not stop.is_set():
            n = sum(nic.stats[1].frames for nic in nics)
            sys.stdout.write(f"S {time.monotonic():.6f} {n} {sink.frames}\n")
            sys.stdout.flush()
            stop.wait(0.1)

    print(f"READY backend={fastqueue.BACKEND}", flush=True)
    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    device.serve_forever(stop, poll=poll)
    t.join(2)
    device.close()
    return 0


_prefix = 0


def testpmd(vdevs: list[str], mode: str, lcores: str, main: int) -> Child:
    global _prefix
    assert TESTPMD is not None
    _prefix += 1
    prefix = f"vdevscale{os.getpid()}x{_prefix}"
    argv = ["timeout", "-s", "INT", "-k", "5", "90", "stdbuf", "-oL", TESTPMD]
    argv += ["--no-huge", "-m", "1024", "--no-pci", "--file-prefix", prefix]
    argv += ["-l", lcores, "--main-lcore", str(main)]
    for v in vdevs:
        argv += ["--vdev", v]
    argv += ["--", "--total-num-mbufs", "32768", f"--forward-mode={mode}", "--txpkts=64"]
    argv += ["--nb-cores=1", "--stats-period", "1", "-a", "--no-flush-rx"]
    for i in range(len(vdevs)):
        argv.append(f"--eth-peer={i},{SINK_MAC}")
    return Child(argv, "rx" if mode == "rxonly" else "tx", prefix=prefix)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def classify(stack: str) -> str:
    """Where one py-spy sample (a ';'-joined stack, native frames included) is.  CPython
    3.11 locks wait in ``sem_clockwait`` (under ``PyThread_acquire_lock_timed``); the GIL
    waits on a condition variable (``take_gil`` is inlined: ``pthread_cond_timedwait``)."""
    if "PyThread_acquire_lock" in stack or "sem_clockwait" in stack or "sem_timedwait" in stack:
        return "waiting for a lock"
    if "take_gil" in stack or "pthread_cond_timedwait" in stack:
        return "waiting for the GIL"
    if "vq_tx" in stack or "vq_rx" in stack:
        return "in a compiled burst (GIL released)"
    if "epoll_wait" in stack or "select (" in stack:
        return "waiting in select"
    return "running with the GIL"


def tally(raw: str, pick: Callable[[str], str | None]) -> str:
    """Per-thread shares of each :func:`classify` class in py-spy ``raw`` output; ``pick``
    names a sample's thread (None: not counted)."""
    per: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        name = pick(stack)
        if name is None:
            continue
        per.setdefault(name, Counter())[classify(stack)] += int(count)
    lines = []
    for key, c in sorted(per.items()):
        total = sum(c.values())
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in c.most_common())
        lines.append(f"  {key}: {total} samples: {parts}")
    return "\n".join(lines)


def pyspy(pid: int, seconds: float) -> tuple[str, str]:
    assert PYSPY is not None
    out = subprocess.run(
        [PYSPY, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "--idle",
         "--native", "--threads", "-f", "raw", "-o", "/dev/stdout"],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    return out.stdout, out.stderr


def profile(pid: int, seconds: float) -> str:
    """py-spy samples of every thread of ``pid``, classified by :func:`classify`."""
    if PYSPY is None:
        return "py-spy not installed"
    raw, err = pyspy(pid, seconds)

    def pick(stack: str) -> str | None:
        thread = stack.split(";", 1)[0]
        if "threads.py" in stack and "_run" in stack:
            return f"NIC datapath {thread}"
        if "serve_forever" in stack:
            return f"control loop {thread}"
        return None  # the sampler, the main thread

    return tally(raw, pick) or f"no samples ({err.strip()[:300]})"


def measure_vdev(
    tmp: Path,
    nics: int,
    threads: str,
    cpus: str,
    duration: float,
    warmup: float,
    prof: bool,
    poll: bool,
) -> tuple[float | None, float | None, str]:
    socks = [str(tmp / f"v{nics}{threads}{i}.sock") for i in range(nics)]
    be = Child(
        ["taskset", "-c", cpus, sys.executable, __file__, "--worker", ",".join(socks),
         "--threads", threads] + (["--poll"] if poll else []),
        "worker",
    )  # fmt: skip
    fe: Child | None = None
    note = ""
    try:
        _wait(be.samples.ready.is_set, 30, "vdev worker did not start")
        m = re.search(r"READY backend=(\w+)", be.output())
        BACKENDS_SEEN.add(m[1] if m else "?")
        vdevs = [
            f"net_virtio_user{i},path={s},queues=1,server=0,mac=52:54:00:00:01:{i:02x}"
            for i, s in enumerate(socks)
        ]
        fe = testpmd(vdevs, "txonly", "0,1", 1)
        _wait(lambda: be.samples.first_active() is not None, 30, "no traffic reached vdev")
        first = be.samples.first_active()
        assert first is not None
        start, end = first + warmup, first + warmup + duration
        while time.monotonic() < start:
            time.sleep(0.01)
        t0c = cpu_ticks(be.proc.pid)
        if prof:
            note = profile(be.proc.pid, duration)
        while time.monotonic() < end + 0.15:
            time.sleep(0.01)
        cpu = (cpu_ticks(be.proc.pid) - t0c) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - start)
        with be.samples.lock:
            points = list(be.samples.points)
        return _counter_rate(points, start, end), 100 * cpu, note
    finally:
        if fe is not None:
            fe.stop(signal.SIGINT)
        be.stop(signal.SIGTERM)
        for s in socks:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)


def measure_dpdk(tmp: Path, nics: int, duration: float, warmup: float) -> float | None:
    socks = [str(tmp / f"d{nics}{i}.sock") for i in range(nics)]
    be = testpmd(
        [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)], "rxonly", "0,1", 0
    )
    fe: Child | None = None
    try:
        _wait(lambda: all(os.path.exists(s) for s in socks), 30, "net_vhost sockets missing")
        vdevs = [
            f"net_virtio_user{i},path={s},queues=1,server=0,mac=52:54:00:00:02:{i:02x}"
            for i, s in enumerate(socks)
        ]
        fe = testpmd(vdevs, "txonly", "0,1", 1)
        _wait(lambda: be.samples.first_active() is not None, 30, "no traffic reached net_vhost")
        first = be.samples.first_active()
        assert first is not None
        start, end = first + warmup, first + warmup + duration
        while time.monotonic() < end + 1.2:
            time.sleep(0.05)
        with be.samples.lock:
            vals = [v for t, v in be.samples.points if start + 0.5 <= t <= end + 0.6]
        # testpmd prints one Rx-pps per port each period: mean per sample x ports = the sum.
        return sum(vals) / len(vals) * nics if vals else None
    finally:
        if fe is not None:
            fe.stop(signal.SIGINT)
        be.stop(signal.SIGINT)


def fmt(pps: float | None) -> str:
    if pps is None:
        return "n/a"
    return f"{pps / 1e6:.2f} Mpps" if pps >= 1e6 else f"{pps / 1e3:.1f} kpps"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rows", default="1,2,2s", help="1 (1 NIC), 2 (2 NICs per-nic), 2s (single)")
    p.add_argument("--backends", default="vdev,dpdk")
    p.add_argument("--cpus-1", default="1", help="vdev's CPUs with 1 NIC (taskset -c)")
    p.add_argument("--cpus-2", default="0,1", help="vdev's CPUs with 2 NICs")
    p.add_argument("--profile", action="store_true", help="py-spy the 2-NIC per-nic row")
    p.add_argument("--poll", action="store_true", help="vdev in busy-poll mode")
    p.add_argument("--repeat", type=int, default=1, help="run the rows this many times")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="per-nic", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker.split(","), args.threads, args.poll)
    if TESTPMD is None:
        print("dpdk-testpmd not found: this benchmark needs its virtio_user frontend")
        return 1
    backends = args.backends.split(",")
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, VDEV_FASTQUEUE="
        f"{os.environ.get('VDEV_FASTQUEUE', '0')}" + (", vdev --poll" if args.poll else "")
    )
    print(
        "| NICs | vdev threads | vdev CPUs | vdev tx0 pps | vdev CPU % | DPDK net_vhost | ratio |"
    )
    print("|---:|---|---|---:|---:|---:|---:|")
    notes: list[str] = []
    dpdk: dict[int, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="vdevscale") as tmp:
        for row in args.rows.split(",") * args.repeat:
            nics, threads = ROWS[row]
            cpus = args.cpus_1 if nics == 1 else args.cpus_2
            vp = cpu = None
            if "vdev" in backends:
                vp, cpu, _ = measure_vdev(
                    Path(tmp), nics, threads, cpus, args.duration, args.warmup, False, args.poll
                )
            if "dpdk" in backends:
                dpdk[nics] = measure_dpdk(Path(tmp), nics, args.duration, args.warmup)
            dp = dpdk.get(nics)
            ratio = f"{vp / dp:.4f}" if vp and dp else "n/a"
            cpu_s = f"{cpu:.0f}" if cpu is not None else "n/a"
            print(
                f"| {nics} | {threads} | {cpus} | {fmt(vp)} | {cpu_s} | {fmt(dp)} | {ratio} |",
                flush=True,
            )
        if args.profile and "vdev" in backends:
            vp, cpu, note = measure_vdev(
                Path(tmp), 2, "per-nic", args.cpus_2, args.duration, args.warmup, True, args.poll
            )
            notes.append(
                f"py-spy of an extra 2-NIC per-nic run ({fmt(vp)} under the profiler, "
                f"vdev CPU {cpu or 0:.0f}%), samples per thread:\n{note}"
            )
    print(f"virtqueue bursts in the workers: {', '.join(sorted(BACKENDS_SEEN)) or 'n/a'}")
    for n in notes:
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
