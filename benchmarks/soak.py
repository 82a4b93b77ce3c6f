"""Soak: millions of frames each way through one device process, with faults, and no leaks.

Rows: frontend {testpmd ``net_virtio_user``, Linux guest (QEMU, TCG where KVM does not work)}
x ring {split, packed} x direction {to the device (the frontend's TX), from the device (its
RX)}; each row is ``--frames`` frames (default 10,000,000) of 64 bytes.

Each row runs a fresh device process (``host/soak_device.py``): role ``sink`` counts the
frontend's TX on a host channel, role ``source`` sends exactly ``--frames`` frames to it.
For the middle third of the frames (by count, so whatever the rate) a seeded fault scenario
is active on the row's virtqueue: drop with p=``--drop-p`` (0.01) and one stall of
``--stall`` s at its start.  While the frontend is connected this script samples the device
process every ``--interval`` s: its open fds (``/proc/PID/fd``), its ``RssAnon``
(``/proc/PID/status``) and the pool's ``in_use`` (from the device's sample lines).  After
the frontend is gone it checks, with ``host/soak_verdict.py`` (bounds and why there): pool
``in_use`` 0, fds back to where they were and flat, RSS flat, no queue killed, and
``sent == received + fault drops + other drops`` exactly from the device's counters (and,
for RX, the frontend's own count equal to the device's).

A row that cannot reach ``--frames`` within ``--row-timeout`` s is stopped there and reported
with the frames it did move (the verdict is then computed on what happened).

Usage: nice -n 5 python3 benchmarks/soak.py [--frames 10000000] [--rows ROWS] [--json F]
       ROWS: comma-separated of testpmd-split-tx, testpmd-split-rx, ..., linux-packed-rx
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
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_throughput import GUEST_MAC_STR, HOST_MAC_STR, TESTPMD, Child, _wait, testpmd

from host.machine import Machine, Nic
from host.soak_verdict import (
    Sample,
    SoakCounts,
    SoakRun,
    Verdict,
    counts_from_stats,
    judge,
    other_drop_reasons,
)

FRONTENDS = ("testpmd", "linux")
RINGS = ("split", "packed")
DIRECTIONS = ("tx", "rx")
ALL_ROWS = [f"{f}-{r}-{d}" for f in FRONTENDS for r in RINGS for d in DIRECTIONS]
DIRECTION_NAMES = {"tx": "to device (TX)", "rx": "from device (RX)"}


# -- the device process, seen from outside -------------------------------------------------


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError(f"no RssAnon in /proc/{pid}/status")


class DeviceProc:
    """``host/soak_device.py`` as a child; its ``S`` lines parsed, its /proc read."""

    def __init__(self, argv: list[str]) -> None:
        self.child = Child(argv, "worker")  # "worker": sets ready on READY, keeps lines
        _wait(self.child.samples.ready.is_set, 60, "soak device did not start")
        self.pid = self.child.proc.pid

    def lines(self) -> list[str]:
        with self.child.samples.lock:
            return list(self.child.samples.lines)

    def last(self) -> dict[str, Any]:
        """The newest ``S`` sample ({} before the first)."""
        for line in reversed(self.lines()):
            if line.startswith("S "):
                parsed: dict[str, Any] = json.loads(line[2:])
                return parsed
        return {}

    def points(self) -> list[tuple[float, int]]:
        """(device time, progress) of every ``S`` sample."""
        out = []
        for line in self.lines():
            if line.startswith("S "):
                d = json.loads(line[2:])
                out.append((float(d["t"]), int(d["progress"])))
        return out

    def said(self, tag: str) -> str | None:
        return next((x for x in self.lines() if x.split(maxsplit=1)[0:1] == [tag]), None)

    def finish(self) -> tuple[int, dict[str, Any]]:
        """SIGTERM: the device closes its channel and prints FINAL and STATS."""
        self.child.stop(signal.SIGTERM, timeout=30)
        final, stats = self.said("FINAL"), self.said("STATS")
        if final is None or stats is None:
            raise RuntimeError("soak device ended without FINAL/STATS:\n" + self.output_tail())
        return int(json.loads(final.split(" ", 1)[1])["in_use"]), json.loads(stats[6:])

    def output_tail(self, n: int = 20) -> str:
        return "".join(x for x in self.lines()[-n:] if not x.startswith("S "))

    def close(self) -> None:
        self.child.close()


# -- frontends -----------------------------------------------------------------------------


class Frontend:
    """A frontend of one row: started, polled for being done, stopped with its own count."""

    def start(self) -> None:
        raise NotImplementedError

    def done(self, dev: dict[str, Any]) -> bool:
        raise NotImplementedError

    def stop(self) -> int | None:
        """Stop; the frames the frontend itself counted as received, where it can say."""
        raise NotImplementedError

    def sent(self) -> int | None:
        """After :meth:`stop`: the frames the frontend counted as sent, where that is exact."""
        return None

    def close(self) -> None:
        """Last-resort cleanup (idempotent)."""


_TOTAL = re.compile(r"Accumulated forward statistics for all ports.*?RX-packets:\s+(\d+)", re.S)


class TestpmdFrontend(Frontend):
    def __init__(self, sock: str, ring: str, direction: str, frames: int, limit: float) -> None:
        self.sock, self.ring, self.direction, self.frames = sock, ring, direction, frames
        self.limit = limit
        self.child: Child | None = None

    def start(self) -> None:
        packed = ",packed_vq=1" if self.ring == "packed" else ""
        vdev = f"net_virtio_user0,path={self.sock},queues=1,server=0,mac={GUEST_MAC_STR}{packed}"
        mode = "txonly" if self.direction == "tx" else "rxonly"
        peer = HOST_MAC_STR if self.direction == "tx" else None
        self.child = testpmd(vdev, mode, 64, main_lcore=1, peer=peer, limit=self.limit)

    def done(self, dev: dict[str, Any]) -> bool:
        if self.child is not None and self.child.proc.poll() is not None:
            return True  # testpmd ended (its time limit): report what it did
        if self.direction == "tx":
            return int(dev.get("progress", 0)) >= self.frames
        return bool(dev.get("drained"))

    def stop(self) -> int | None:
        if self.child is None:
            return None
        if self.direction == "rx":
            time.sleep(1.0)  # the last frames the device wrote are polled by testpmd
        self.child.stop(signal.SIGINT, timeout=15)
        m = _TOTAL.search(self.child.output())
        return int(m[1]) if m and self.direction == "rx" else None

    def close(self) -> None:
        if self.child is not None:
            self.child.close()


class LinuxFrontend(Frontend):
    """A Linux guest: TX by ``vdev-pktgen --raw`` (run on a thread), RX counted by the driver's
    ``rx_packets``.  IPv6 is switched off first so the guest sends nothing of its own."""

    def __init__(
        self, image: object, sock: str, ring: str, direction: str, frames: int, limit: float
    ) -> None:
        props = ",packed=on" if ring == "packed" else ""
        nic = Nic.vhost_user(sock, mac=GUEST_MAC_STR, device_props=props)
        self.m = Machine.linux(image, nics=[nic], name="soak")  # type: ignore[arg-type]
        self.direction, self.frames, self.limit = direction, frames, limit
        self.thread: threading.Thread | None = None
        self.pktgen: str = ""
        self.error: BaseException | None = None

    def start(self) -> None:
        self.m.launch(wait=True)
        self.m.run(
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; ip link set eth0 up", timeout=60
        )
        if self.direction == "tx":
            cmd = f"vdev-pktgen --raw eth0 --dst-mac {HOST_MAC_STR} --count {self.frames} --size 64"

            def run() -> None:
                try:
                    self.pktgen, _ = self.m.run(cmd, timeout=self.limit)
                except BaseException as exc:  # reported in the row's note
                    self.error = exc

            self.thread = threading.Thread(target=run, daemon=True)
            self.thread.start()

    def done(self, dev: dict[str, Any]) -> bool:
        if self.direction == "tx":
            return self.thread is not None and not self.thread.is_alive()
        return bool(dev.get("drained"))

    def stop(self) -> int | None:
        count: int | None = None
        if self.direction == "rx":
            out, _ = self.m.run("cat /sys/class/net/eth0/statistics/rx_packets", timeout=60)
            count = int(re.findall(r"^(\d+)\s*$", out, re.M)[-1])
        self.m.shutdown()
        if self.thread is not None:
            self.thread.join(10)
        return count

    def sent(self) -> int | None:
        m = re.search(r"pktgen tx_packets=(\d+)", self.pktgen)
        return int(m[1]) if m else None

    def close(self) -> None:
        self.m.shutdown()


# -- one row -------------------------------------------------------------------------------


def rate(points: list[tuple[float, int]], target: int) -> float:
    """Frames per second between the first sample with progress and the first at the target
    (or the last one): the device's own clock and counter, not the polling of this script."""
    moving = [(t, n) for t, n in points if n > 0]
    if len(moving) < 2:
        return 0.0
    end = next(((t, n) for t, n in moving if n >= target), moving[-1])
    (t0, n0), (t1, n1) = moving[0], end
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


@dataclass
class RowResult:
    row: str
    frames: int = 0
    pps: float = 0.0
    counts: SoakCounts | None = None
    fds_start: int = 0
    fds_end: int = 0
    rss_start_kib: int = 0
    rss_max_kib: int = 0
    rss_end_kib: int = 0
    in_use_after: int | None = None
    samples: list[Sample] = field(default_factory=list)
    other_drops: dict[str, int] = field(default_factory=dict)
    verdict: str = ""
    note: str = ""


def run_row(row: str, a: argparse.Namespace, workdir: Path, image: object | None) -> RowResult:
    frontend_name, ring, direction = row.split("-")
    res = RowResult(row)
    sock = str(workdir / f"{row}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    third = a.frames // 3
    argv = [sys.executable, "-m", "host.soak_device", "--socket", sock]
    argv += ["--role", "sink" if direction == "tx" else "source", "--frames", str(a.frames)]
    argv += ["--fault-start", str(third), "--fault-end", str(2 * third), "--seed", str(a.seed)]
    argv += ["--drop-p", str(a.drop_p), "--stall", str(a.stall)]
    argv += ["--interval", str(min(a.interval, 0.5))]
    dev = DeviceProc(argv)
    fe: Frontend | None = None
    try:
        res.fds_start = proc_fds(dev.pid)
        res.rss_start_kib = proc_rss_anon_kib(dev.pid)
        if frontend_name == "testpmd":
            fe = TestpmdFrontend(sock, ring, direction, a.frames, a.row_timeout + 30)
        else:
            fe = LinuxFrontend(image, sock, ring, direction, a.frames, a.row_timeout)
        fe.start()
        t0 = time.monotonic()
        deadline = t0 + a.row_timeout
        while True:
            last = dev.last()
            now = time.monotonic()
            # Sampled while traffic flows: the frontend's set-up (its fds) is complete.
            if last.get("connected") and int(last.get("progress", 0)) > 0:
                res.samples.append(
                    Sample(now - t0, proc_fds(dev.pid), proc_rss_anon_kib(dev.pid), last["in_use"])
                )
            if fe.done(last):
                break
            if now > deadline:
                res.note = f"stopped at the {a.row_timeout:.0f} s row limit"
                break
            time.sleep(a.interval)
        end_progress = int(dev.last().get("progress", 0))
        res.pps = rate(dev.points(), a.frames)
        frontend_received = fe.stop()
        if isinstance(fe, LinuxFrontend) and fe.error is not None:
            res.note = (res.note + "; " if res.note else "") + f"pktgen: {fe.error!r}"[:200]
        _wait(lambda: dev.said("GONE") is not None, 60, "the frontend's connection never closed")
        time.sleep(1.0)  # let the disconnect's cleanup finish before the last look
        res.fds_end = proc_fds(dev.pid)
        res.rss_end_kib = proc_rss_anon_kib(dev.pid)
        res.in_use_after, stats = dev.finish()
        if direction == "rx" and frontend_received is None:
            raise RuntimeError("the frontend did not report how many frames it received")
        frontend_sent = fe.sent()
        stopped_early = bool(res.note)  # pktgen was cut short: it printed no count
        if (
            isinstance(fe, LinuxFrontend)
            and direction == "tx"
            and frontend_sent is None
            and not stopped_early
        ):
            raise RuntimeError(f"no pktgen count in its output: {fe.pktgen[-200:]!r}")
        res.counts = counts_from_stats(stats, direction, frontend_received, frontend_sent)
        res.other_drops = other_drop_reasons(stats, direction)
        res.frames = res.counts.sent or end_progress
        res.rss_max_kib = max(
            [res.rss_start_kib, res.rss_end_kib, *[s.rss_anon_kib for s in res.samples]]
        )
        verdict: Verdict = judge(
            SoakRun(
                res.samples,
                res.fds_start,
                res.fds_end,
                res.rss_start_kib,
                res.rss_end_kib,
                res.in_use_after,
                res.counts,
            ),
            rss_slack_kib=a.rss_slack_kib,
        )
        res.verdict = verdict.text()
        return res
    except Exception as exc:
        res.verdict = f"FAIL: {exc!r}"[:300]
        return res
    finally:
        if fe is not None:
            fe.close()
        dev.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


# -- the table -----------------------------------------------------------------------------

HEADER = (
    "| frontend | ring | direction | frames | rate | fault drops | other drops | fds start/end "
    "| RssAnon start/max/end (MiB) | in_use after | kills | verdict |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def fmt_rate(pps: float) -> str:
    return f"{pps / 1e6:.2f} Mpps" if pps >= 1e6 else f"{pps / 1e3:.1f} kpps"


def fmt_row(r: RowResult) -> str:
    frontend, ring, direction = r.row.split("-")
    c = r.counts
    mib = [f"{x / 1024:.1f}" for x in (r.rss_start_kib, r.rss_max_kib, r.rss_end_kib)]
    notes = [r.note] if r.note else []
    notes += [f"{k}: {n}" for k, n in r.other_drops.items()]
    verdict = r.verdict + (f" ({'; '.join(notes)})" if notes else "")
    return (
        f"| {'testpmd virtio_user' if frontend == 'testpmd' else 'Linux guest'} | {ring} "
        f"| {DIRECTION_NAMES[direction]} | {r.frames:,} | {fmt_rate(r.pps)} "
        f"| {c.fault_drops if c else 'n/a'} | {c.other_drops if c else 'n/a'} "
        f"| {r.fds_start}/{r.fds_end} | {'/'.join(mib)} "
        f"| {r.in_use_after if r.in_use_after is not None else 'n/a'} "
        f"| {c.kills if c else 'n/a'} | {verdict} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--frames", type=int, default=10_000_000, help="frames per row")
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help="comma-separated row names")
    ap.add_argument("--drop-p", type=float, default=0.01)
    ap.add_argument("--stall", type=float, default=0.2, help="seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--row-timeout", type=float, default=900.0, help="bound on one row, s")
    ap.add_argument("--rss-slack-kib", type=int, default=8 * 1024)
    ap.add_argument("--json", metavar="FILE", help="write the rows (with samples) as JSON")
    a = ap.parse_args(argv)
    # The device process imports this checkout's vdev, not whatever is installed.
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in ALL_ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)} (known: {', '.join(ALL_ROWS)})")
    if TESTPMD is None and any(r.startswith("testpmd") for r in rows):
        print("dpdk-testpmd not found: testpmd rows skipped", file=sys.stderr)
        rows = [r for r in rows if not r.startswith("testpmd")]
    image = None
    if any(r.startswith("linux") for r in rows):
        from images.linux import build_linux

        image = build_linux()
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    print(HEADER, flush=True)
    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="vdevsoak") as tmp:
        for row in rows:
            r = run_row(row, a, Path(tmp), image)
            results.append(r)
            print(fmt_row(r), flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.verdict == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
