"""Real Linux guests under TCG: guest TX (vdev-pktgen) and guest RX pps, vdev vs DPDK net_vhost.

The same QEMU command line (``host.machine.Machine.linux``: one virtio-net-pci NIC on a
vhost-user socket, QEMU the client) runs against two backends:

* vdev: a device process (``device_throughput.py --worker``): role "sink" counts what the
  guest sends on a host channel (``--far-end drop``: role "drop", an endpoint that frees
  and counts, so the device's CPU is the device's alone); role "source" keeps the NIC's RX
  backlog half full;
* DPDK: ``dpdk-testpmd --vdev net_vhost0`` rxonly (guest TX) or txonly to the guest's MAC
  (guest RX).

Guest TX: ``vdev-pktgen --raw eth0`` sends ``--count`` frames and prints its own pps.
Guest RX: the driver's ``rx_packets`` (``/sys/class/net/eth0/statistics``) over a window.
Device CPU: utime+stime of the vdev process over the window, in % of one core (testpmd
always spins one core, so its CPU is not a number worth printing).

Usage: python3 benchmarks/guest_tcg.py [--size 64] [--count 100000] [--window 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_throughput import (
    GUEST_MAC_STR,
    HOST_MAC_STR,
    TESTPMD,
    Child,
    _wait,
    fmt_pps,
    testpmd,
)

from host.machine import Machine, Nic

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """utime+stime of process ``pid`` (or of its thread ``tid``), in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _source_tid(out: str) -> int | None:
    found = re.findall(r"^SOURCE_TID (\d+)$", out, re.M)
    return int(found[-1]) if found else None


def _rx_packets(m: Machine) -> int:
    out, _ = m.run("cat /sys/class/net/eth0/statistics/rx_packets", timeout=60)
    return int(re.findall(r"^(\d+)\s*$", out, re.M)[-1])


def measure(image: object, workdir: Path, backend: str, direction: str, a: argparse.Namespace):
    sock = str(workdir / f"{backend}-{direction}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    rx_role = "gen" if a.rx_source == "generator" else "source"
    role = ("drop" if a.far_end == "drop" else "sink") if direction == "tx" else rx_role
    if backend == "vdev":
        script = str(Path(__file__).with_name("device_throughput.py"))
        argv = [sys.executable, script, "--worker", sock, "--role", role]
        hold = [] if a.kick_hold_us is None else ["--kick-hold-us", str(a.kick_hold_us)]
        if a.rx_kick_batch is not None:
            hold += ["--rx-kick-batch", str(a.rx_kick_batch)]
        be = Child([*argv, "--size", str(a.size), *hold], "worker")
        _wait(be.samples.ready.is_set, 30, "vdev worker did not start")
    else:
        mode = "rxonly" if direction == "tx" else "txonly"
        peer = GUEST_MAC_STR if direction == "rx" else None
        be = testpmd(f"net_vhost0,iface={sock},queues=1", mode, a.size, main_lcore=0, peer=peer)
        _wait(lambda: os.path.exists(sock), 30, "testpmd did not create its socket")
    m = Machine.linux(image, nics=[Nic.vhost_user(sock, mac=GUEST_MAC_STR)], name="bench")  # type: ignore[arg-type]
    print(f"  {backend} guest {direction}: booting", file=sys.stderr, flush=True)
    try:
        m.launch(wait=True)
        print(f"  {backend} guest {direction}: measuring", file=sys.stderr, flush=True)
        m.run("ip link set eth0 up", timeout=60)
        cpu0 = _cpu_s(be.proc.pid) if backend == "vdev" else 0.0
        # Guest RX: the frames come from the worker's own source thread (the benchmark's
        # traffic generator, as testpmd txonly is DPDK's): its CPU is reported apart.
        tid = _source_tid(be.output()) if backend == "vdev" and direction == "rx" else None
        src0 = _cpu_s(be.proc.pid, tid) if tid is not None else 0.0
        t0 = time.monotonic()
        if direction == "tx":
            try:
                out, _ = m.run(
                    f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC_STR} --count {a.count} "
                    f"--size {a.size}",
                    timeout=a.timeout,
                )
            except Exception:
                if backend == "vdev":  # where the queues stand, both sides, for the report
                    be.proc.send_signal(signal.SIGUSR1)
                    time.sleep(1.0)
                    state = [x for x in be.output().splitlines() if x.startswith("STATE ")]
                    print(
                        f"  vdev guest tx: wedged; {state[-1] if state else 'no STATE'}",
                        file=sys.stderr,
                        flush=True,
                    )
                raise
            found = re.search(r"pps=(\d+)", out)
            pps = float(found.group(1)) if found else None
        else:
            time.sleep(1.0)  # traffic running
            r0, t0 = _rx_packets(m), time.monotonic()
            time.sleep(a.window)
            r1 = _rx_packets(m)
            pps = (r1 - r0) / (time.monotonic() - t0)
        elapsed = time.monotonic() - t0
        cpu = 100 * (_cpu_s(be.proc.pid) - cpu0) / elapsed if backend == "vdev" else None
        if tid is not None and cpu is not None:
            src = 100 * (_cpu_s(be.proc.pid, tid) - src0) / elapsed
            print(
                f"  vdev guest rx: process CPU {cpu:.0f}%, of which the traffic source thread "
                f"{src:.0f}%: the device {cpu - src:.0f}%",
                file=sys.stderr,
                flush=True,
            )
        return pps, cpu
    finally:
        m.shutdown()
        be.stop(signal.SIGTERM if backend == "vdev" else signal.SIGINT)
        if backend == "vdev":
            _report_watch(be.output(), direction)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def _report_watch(output: str, direction: str) -> None:
    """Lost kicks / interrupts the device's watch made up in the run (vdev/net/notify_watch.py):
    a number other than 0 means the guest's notification handshake raced."""
    falls = [x for x in output.splitlines() if "RX kick batching:" in x]
    for x in falls[:5]:  # with VDEV_BENCH_LOG=info: what each fall-back saw
        print(f"  vdev guest {direction}: {x.split(' ', 2)[-1]}", file=sys.stderr, flush=True)
    line = next((x for x in output.splitlines() if x.startswith("STATS ")), None)
    if line is None:
        return
    nic = json.loads(line[6:])["nics"][0]
    watch = nic.get("notify_watch") or {}
    queues = nic.get("queues", {})
    per_q = ", ".join(
        f"{name} {q['frames']} frames {q.get('kicks', 0)} kicks {q['notifications']} irqs"
        for name, q in sorted(queues.items())
    )
    print(
        f"  vdev guest {direction}: late kicks {watch.get('late_kicks', {})}, "
        f"late interrupts {watch.get('late_interrupts', {})}; {per_q}; "
        f"kick hold {nic.get('kick_hold')}; RX kick batch {nic.get('rx_kick_batch')}",
        file=sys.stderr,
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--count", type=int, default=100_000, help="frames vdev-pktgen sends")
    ap.add_argument(
        "--far-end",
        choices=("channel", "drop"),
        default="channel",
        help="guest TX frames go to a host channel with a reader thread in the device "
        "process, or to an endpoint that frees them (the device alone)",
    )
    ap.add_argument(
        "--kick-hold-us",
        type=float,
        default=None,
        help="vdev's TX kick mitigation window (vdev/net/kickhold.py; 0: off; default: "
        "the device's default)",
    )
    ap.add_argument(
        "--rx-kick-batch",
        type=int,
        default=None,
        help="vdev's RX kick batch (vdev/net/rxbatch.py; 0: half the ring; 1: off; default: "
        "the device's default)",
    )
    ap.add_argument(
        "--rx-source",
        choices=("channel", "generator"),
        default="channel",
        help="guest RX frames from a host channel sender in the device process (default) or "
        "from the NIC's own generator (vdev/net/rxgen.py), as testpmd txonly generates them",
    )
    ap.add_argument("--window", type=float, default=3.0, help="guest RX window, seconds")
    ap.add_argument("--directions", default="tx,rx")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on one guest TX run, s")
    a = ap.parse_args()
    if TESTPMD is None:
        print("dpdk-testpmd not found", file=sys.stderr)
        return 1
    from images.linux import build_linux

    image = build_linux()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| direction | bytes | vdev (pps) | vdev CPU % | DPDK net_vhost (pps) | vdev / DPDK |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="vdevtcg") as tmp:
        for direction in a.directions.split(","):
            v, cpu = measure(image, Path(tmp), "vdev", direction, a)
            d, _ = measure(image, Path(tmp), "dpdk", direction, a)
            ratio = f"{v / d:.2f}" if v and d else "n/a"
            name = "guest TX (vdev-pktgen)" if direction == "tx" else "guest RX (rx_packets)"
            cpu_s = f"{cpu:.0f}" if cpu is not None else "n/a"
            print(
                f"| {name} | {a.size} | {fmt_pps(v)} | {cpu_s} | {fmt_pps(d)} | {ratio} |",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
