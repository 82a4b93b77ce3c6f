"""Device throughput: vdev's virtio-net backend next to DPDK's net_vhost, same frontends.

Rows: frontend (the Python ``VirtioNetFrontend`` or DPDK testpmd's ``net_virtio_user``) x
direction (guest TX -> host, host -> guest RX) x frame size.  For every row the same
frontend runs against two backends:

* vdev: a device process (this script with ``--worker``) serving the NIC; "host" is a
  Skywalk host channel on its switch.  Guest TX is counted as frames received on the
  channel (by a reader thread in the device process), or with ``--far-end drop`` as frames
  an endpoint on the switch frees as it takes them (``vdev.testing.sink.DropSink``: the
  device alone, as testpmd rxonly is for net_vhost); host -> guest RX as frames the NIC
  wrote into guest RX buffers (rx0 ``frames``), fed by a host channel that keeps the NIC's
  RX backlog filled (``VirtioNet.rx_waiting``).
* DPDK: ``dpdk-testpmd --vdev net_vhost0`` in rxonly (guest TX) or txonly (guest RX), counted
  by testpmd's own per-second Rx-pps / Tx-pps.

Both are counted on the backend side, in steady state: the window starts ``--warmup``
seconds after the first frame and lasts ``--duration`` seconds.  The frontend is only the
load: the Python frontend sends 256-frame bursts / receives in a loop in this process,
testpmd runs txonly / rxonly.

All vdev per-packet work is in ``vdev/net/nic.py`` (``process_tx`` / ``_internalize_tx``,
``drain_rx`` / ``_write_rx``), ``vdev/virtio/split.py`` and ``vdev/skywalk``; ``--profile``
runs one extra TX measurement with cProfile on the device loop and prints the top functions.

With ``--rx-source generator`` the guest RX frames come from the NIC's own generator
(``vdev/net/rxgen.py``), the device-generated counterpart of testpmd txonly on net_vhost;
``--poll`` makes vdev busy-poll as testpmd does.

Usage: python3 benchmarks/device_throughput.py [--duration 3] [--sizes 64,1500] [--quick]
       [--frontends python,dpdk] [--directions tx,rx] [--far-end channel|drop] [--profile]
       [--rx-source channel|generator] [--poll]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdev.net.device import Device
from vdev.net.kickhold import DEFAULT_WINDOW_S
from vdev.net.nic import DEFAULT_FEATURES, RX_BACKLOG
from vdev.net.rxbatch import DEFAULT_BATCH
from vdev.shutdown import stop_on_signals
from vdev.skywalk import chanbatch
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend
from vdev.testing.pools import streaming_pool
from vdev.testing.sink import DropSink

TESTPMD = shutil.which("dpdk-testpmd")
NAP_MAX = 0.01  # the RX source's longest wait for room (it is woken when there is room)
GUEST_MAC_STR = ":".join(f"{b:02x}" for b in GUEST_MAC)
HOST_MAC_STR = ":".join(f"{b:02x}" for b in HOST_MAC)
DIRECTION_NAMES = {"tx": "guest-TX -> host", "rx": "host -> guest-RX"}
FRONTEND_NAMES = {"python": "python VirtioNetFrontend", "dpdk": "dpdk virtio_user"}


# -- the vdev device process -------------------------------------------------------------


def worker(
    sock: str,
    role: str,
    size: int,
    profile: str | None,
    kick_hold_us: float | None = None,
    rx_kick_batch: int | None = None,
    poll: bool = False,
) -> int:
    """Serve one NIC and count; prints READY, then "S <monotonic> <count>" every 0.1 s.

    role "sink": count frames arriving on a host channel (guest TX direction).
    role "drop": count frames an endpoint frees as the switch hands them over (guest TX).
    role "source": feed the NIC from a host channel, count frames written to the guest.
    role "gen": the NIC's own generator (vdev/net/rxgen.py), count frames written.
    ``poll``: busy-poll (``vdev serve --poll``), as a DPDK PMD spins.
    On SIGTERM prints "STATS <json>" (device stats, and the profile if asked) and exits.
    """
    # The device's warnings, and with VDEV_BENCH_LOG=info its info lines (the RX kick
    # batching's fall-backs, say), on stderr: the parent shows them when a run goes wrong.
    logging.basicConfig(level=os.environ.get("VDEV_BENCH_LOG", "WARNING").upper())
    pool = streaming_pool()
    hold = DEFAULT_WINDOW_S if kick_hold_us is None else kick_hold_us * 1e-6
    batch = DEFAULT_BATCH if rx_kick_batch is None else rx_kick_batch
    device = Device(pool=pool, kick_hold=hold, rx_kick_batch=batch)
    nic = device.add_nic(sock, mac=GUEST_MAC_STR)
    stop = threading.Event()
    stop_on_signals(stop, (signal.SIGTERM,))
    count = 0

    if role == "drop":
        # The device alone: the switch unicasts to an endpoint that frees (testpmd rxonly's
        # counterpart), counted there.
        sink = DropSink(pool, "host")
        with device.lock:
            device.switch.attach(sink)
            device.switch.fdb[HOST_MAC] = sink.name

        def pump() -> None:
            stop.wait()  # counted by the sink itself

    elif role == "sink":
        ch = device.open_channel("host", ring_slots=4096)
        # Teach the switch where HOST_MAC lives (floods once: nic0's RX ring is still down).
        ch.send([numbered(b"\xff" * 6, HOST_MAC, 0)])

        def pump() -> None:
            # Counted without copying the frames out (compiled user half, chanbatch.py), so
            # the host side is not what limits the device; the Python loop otherwise.
            nonlocal count
            while not stop.is_set():
                if chanbatch.in_use():
                    count += chanbatch.recv_count(ch, 4096, timeout=0.05)[0]
                else:
                    count += len(ch.recv(4096, timeout=0.05))

    elif role == "gen":
        # Device-generated (testpmd txonly on net_vhost's counterpart): no host sender.
        with device.lock:
            nic.start_rx_generator([numbered(GUEST_MAC, HOST_MAC, i, size) for i in range(256)])

        def pump() -> None:
            stop.wait()

    else:
        ch = device.open_channel("host", ring_slots=512)
        # As if the guest had sent a frame: the learning switch then unicasts to nic0
        # instead of flooding a copy of every frame to the responder too.
        device.switch.fdb[GUEST_MAC] = nic.name
        # Bursts of up to half the backlog: one staging call and one TX sync per burst
        # (64-frame bursts made the host-side sender, not the device, the limit).
        frames = [numbered(GUEST_MAC, HOST_MAC, i, size) for i in range(RX_BACKLOG // 2)]
        burst = chanbatch.prepare(frames) if chanbatch.in_use() else None

        room = threading.Event()
        # Woken by the NIC when a drain leaves room for a burst (VirtioNet.rx_low); the
        # timeout only bounds a wait across a ring restart.
        nic.rx_low = (RX_BACKLOG - len(frames), room.set)

        def pump() -> None:
            while not stop.is_set():
                room.clear()  # before the look: a drain after it sets it again
                vring = nic.vrings.get(0)
                running = vring is not None and vring.enabled and vring.queue is not None
                # Frames waiting for the guest: the NIC's backlog and, with a datapath
                # thread, its hand-off inbox.  Sending past that only gets frames refused
                # as rx_backlog_full, at the sender's cost.
                if not running or nic.rx_waiting() > RX_BACKLOG - len(frames):
                    room.wait(NAP_MAX)
                    continue
                if burst is not None:
                    chanbatch.send_prepared(ch, burst)
                else:
                    ch.send(frames)

    def sampler() -> None:
        while not stop.is_set():
            # Far end (host channel, or frames written to the guest) and the virtqueue.
            rx = role in ("source", "gen")
            ring = nic.stats[0 if rx else 1].frames
            n = ring if rx else sink.frames if role == "drop" else count
            sys.stdout.write(f"S {time.monotonic():.6f} {n} {ring}\n")  # one write: one line
            sys.stdout.flush()
            stop.wait(0.1)

    def dump_state(*_: object) -> None:
        # A wedged run can be asked where each queue stands, both sides (kill -USR1).
        print("STATE " + json.dumps(device.stats(), default=str), flush=True)

    signal.signal(signal.SIGUSR1, dump_state)
    print("READY", flush=True)
    threads = [threading.Thread(target=f, daemon=True) for f in (pump, sampler)]
    for t in threads:
        t.start()
    if role == "source":  # the benchmark's traffic source, not device work: told apart
        print(f"SOURCE_TID {threads[0].native_id}", flush=True)
    prof = cProfile.Profile() if profile else None
    if prof is not None:
        prof.enable()
    device.serve_forever(stop, poll=poll)
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)  # type: ignore[arg-type]
    for t in threads:
        t.join(2)
    stats = device.stats()
    sys.stdout.flush()
    if role == "gen":
        nic.stop_rx_generator()
    elif role != "drop":  # the drop sink and the generator have no channel
        ch.close()
    device.close()
    print("STATS " + json.dumps(stats), flush=True)
    return 0


# -- child processes with sample streams ---------------------------------------------------


@dataclass
class Samples:
    """Timestamped values read from a child's stdout by a thread."""

    points: list[tuple[float, float]] = field(default_factory=list)
    ring_points: list[tuple[float, float]] = field(default_factory=list)  # vdev: virtqueue
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_active(self) -> float | None:
        with self.lock:
            return next((t for t, v in self.points if v > 0), None)


_PPS = re.compile(r"(Rx|Tx)-pps:\s+(\d+)")


def _read(stream: TextIO, samples: Samples, kind: str) -> None:
    """kind "worker": "S t count" lines; "rx"/"tx": testpmd's periodic Rx-pps / Tx-pps."""
    for line in stream:
        now = time.monotonic()
        with samples.lock:
            samples.lines.append(line)
        if kind == "worker":
            if line.startswith("READY"):
                samples.ready.set()
            elif line.startswith("S "):
                parts = line.split()
                if len(parts) == 4:
                    with samples.lock:
                        samples.points.append((float(parts[1]), float(parts[2])))
                        samples.ring_points.append((float(parts[1]), float(parts[3])))
        else:
            m = _PPS.search(line)
            if m and m[1].lower() == kind:
                with samples.lock:
                    samples.points.append((now, float(m[2])))


class Child:
    """A bounded child process (own process group) whose stdout is sampled."""

    def __init__(self, argv: list[str], kind: str, *, prefix: str | None = None) -> None:
        self.prefix = prefix
        self.samples = Samples()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.reader = threading.Thread(
            target=_read, args=(self.proc.stdout, self.samples, kind), daemon=True
        )
        self.reader.start()

    def output(self) -> str:
        with self.samples.lock:
            return "".join(self.samples.lines)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(2)  # the last lines (STATS) read before output() is asked
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.reader.join(2)
        if self.prefix:
            shutil.rmtree(Path("/var/run/dpdk") / self.prefix, ignore_errors=True)


_prefix_counter = 0


def testpmd(
    vdev: str, mode: str, size: int, *, main_lcore: int, peer: str | None, limit: float = 60.0
) -> Child:
    """testpmd with one port, bounded by ``timeout`` (``limit`` s, then SIGINT; SIGKILL 5 s
    later), line-buffered periodic stats (``--stats-period 1``; stdin is /dev/null)."""
    global _prefix_counter
    assert TESTPMD is not None
    _prefix_counter += 1
    prefix = f"vdevbench{os.getpid()}x{_prefix_counter}"
    argv = ["timeout", "-s", "INT", "-k", "5", f"{limit:g}", "stdbuf", "-oL", TESTPMD]
    argv += ["--no-huge", "-m", "512", "--no-pci", "--file-prefix", prefix]
    argv += ["-l", "0,1", "--main-lcore", str(main_lcore), "--vdev", vdev, "--"]
    argv += ["--total-num-mbufs", "16384", f"--forward-mode={mode}", f"--txpkts={size}"]
    argv += ["--stats-period", "1", "-a", "--no-flush-rx"]
    if peer:
        argv.append(f"--eth-peer=0,{peer}")
    kind = "rx" if mode == "rxonly" else "tx"
    return Child(argv, kind, prefix=prefix)


# -- one measurement -----------------------------------------------------------------------


_RX_ROLE = {"channel": "source", "generator": "gen"}  # --rx-source: the worker's role


@dataclass
class Config:
    duration: float
    warmup: float
    workdir: Path
    profile: bool = False
    far_end: str = "sink"  # guest TX: "sink" (a host channel) or "drop" (a freeing endpoint)
    kick_hold_us: float | None = None  # vdev's TX kick mitigation window; None: its default
    rx_source: str = "channel"  # guest RX: "channel" (a host sender) or "generator" (rxgen.py)
    poll: bool = False  # vdev busy-polls (vdev serve --poll)


@dataclass
class Result:
    pps: float | None  # at the far end: host channel (guest TX) or guest RX buffers
    ring_pps: float | None  # through the virtqueue (vdev: tx0 / rx0 frames)
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _counter_rate(points: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Rate of a cumulative counter between the samples nearest inside [start, end]."""
    inside = [(t, v) for t, v in points if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, v0), (t1, v1) = inside[0], inside[-1]
    return (v1 - v0) / (t1 - t0)


def _pps_mean(points: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean of testpmd's per-second pps samples taken in [start + 0.5, end + 0.6].

    Each sample covers the second before it was printed: at least half of it lies after
    ``start`` (past the warm-up), and the last one ends at most 0.6 s after ``end``."""
    inside = [v for t, v in points if start + 0.5 <= t <= end + 0.6]
    return sum(inside) / len(inside) if inside else None


def _python_pump(
    fe: VirtioNetFrontend, direction: str, size: int, until: Callable[[], bool], timeout: float
) -> None:
    """Drive the Python frontend until ``until()`` says the window is over."""
    frames = [numbered(HOST_MAC, GUEST_MAC, i, size) for i in range(256)]
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for _ in range(50):
            if direction == "tx":
                if fe.send(frames) == 0:
                    fe.wait_call(fe.txq(), 0.001)
            else:
                fe.recv(timeout=0.01)


def measure(cfg: Config, frontend: str, direction: str, size: int, backend: str) -> Result:
    sock = str(cfg.workdir / f"{backend}-{frontend}-{direction}-{size}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    children: list[Child] = []
    fe: VirtioNetFrontend | None = None
    try:
        if backend == "vdev":
            be = Child(
                [sys.executable, __file__, "--worker", sock, "--role"]
                + [cfg.far_end if direction == "tx" else _RX_ROLE[cfg.rx_source]]
                + ["--size", str(size)]
                + (["--poll"] if cfg.poll else [])
                + (["--profile-out", str(cfg.workdir / "tx.prof")] if cfg.profile else [])
                + ([] if cfg.kick_hold_us is None else ["--kick-hold-us", str(cfg.kick_hold_us)]),
                "worker",
            )
            children.append(be)
            _wait(be.samples.ready.is_set, 20, "vdev worker did not start")
        else:
            mode = "rxonly" if direction == "tx" else "txonly"
            be = testpmd(
                f"net_vhost0,iface={sock},queues=1", mode, size, main_lcore=0, peer=GUEST_MAC_STR
            )
            children.append(be)
            _wait(lambda: os.path.exists(sock), 20, "testpmd net_vhost did not create its socket")

        def window() -> tuple[float, float] | None:
            first = be.samples.first_active()
            if first is None:
                return None
            return first + cfg.warmup, first + cfg.warmup + cfg.duration

        def over() -> bool:
            w = window()
            # testpmd's last pps sample of the window lands up to a second later.
            return w is not None and time.monotonic() > w[1] + (1.1 if backend == "dpdk" else 0.1)

        total_timeout = 20 + cfg.warmup + cfg.duration
        if frontend == "python":
            fe = VirtioNetFrontend(sock, features=DEFAULT_FEATURES, connect_timeout=10)
            _python_pump(fe, direction, size, over, total_timeout)
        else:
            vdev = f"net_virtio_user0,path={sock},queues=1,server=0,mac={GUEST_MAC_STR}"
            mode = "txonly" if direction == "tx" else "rxonly"
            peer = HOST_MAC_STR if direction == "tx" else None
            children.append(testpmd(vdev, mode, size, main_lcore=1, peer=peer))
            deadline = time.monotonic() + total_timeout
            while not over() and time.monotonic() < deadline:
                time.sleep(0.05)
        w = window()
        if w is None:
            return Result(None, None, "no traffic")
        with be.samples.lock:
            points = list(be.samples.points)
            ring_points = list(be.samples.ring_points)
        if backend == "vdev":
            pps = _counter_rate(points, *w)
            ring_pps = _counter_rate(ring_points, *w)
        else:
            pps = ring_pps = _pps_mean(points, *w)
        result = Result(pps, ring_pps, "" if pps is not None else "too few samples")
        # Stop the frontend first, then the backend (its final stats).
        if fe is not None:
            fe.close()
            fe = None
        for child in reversed(children):
            child.stop(signal.SIGTERM if child is be and backend == "vdev" else signal.SIGINT)
        if backend == "vdev":
            stats_line = next((x for x in be.output().splitlines() if x.startswith("STATS ")), "")
            if stats_line:
                result.stats = json.loads(stats_line[6:])
        return result
    finally:
        if fe is not None:
            fe.close()
        for child in children:
            child.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


# -- driver --------------------------------------------------------------------------------


def fmt_pps(pps: float | None) -> str:
    if pps is None:
        return "n/a"
    if pps >= 1e6:
        return f"{pps / 1e6:.2f} Mpps"
    return f"{pps / 1e3:.1f} kpps"


def profile_report(path: Path, frames: int, top: int = 15) -> str:
    st = pstats.Stats(str(path), stream=io.StringIO())
    lines = [f"cProfile of the device loop thread, {frames} frames through tx0"]
    stats: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    # The loop's idle wait for kicks is not per-packet work.
    busy = {k: v for k, v in stats.items() if "select" not in k[2] and "epoll" not in k[2]}
    rows = sorted(busy.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    lines.append(f"{'tottime us/frame':>16} {'cumtime us/frame':>16} {'calls/frame':>11}  function")
    for (filename, lineno, name), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{Path(filename).name}:{lineno}({name})" if lineno else name
        lines.append(
            f"{tt / frames * 1e6:16.2f} {ct / frames * 1e6:16.2f} {nc / frames:11.2f}  {where}"
        )
    return "\n".join(lines)


HEADER = (
    "| frontend | direction | bytes | vdev, far end | vdev, virtqueue | DPDK net_vhost "
    "| ratio far end | ratio virtqueue | notes |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.4f}" if a is not None and b else "n/a"


def row_notes(res: dict[str, Result], direction: str) -> str:
    notes = [f"{b}: {r.note}" for b, r in res.items() if r.note]
    v = res.get("vdev")
    if v is not None and v.stats and direction == "tx":
        tx0 = v.stats["nics"][0]["queues"]["tx0"]["frames"]
        drops = v.stats["switch"]["host"]["drops"]
        if tx0 and drops:
            notes.append(f"host channel full: {100 * drops / tx0:.0f}% of tx0 dropped")
        nic = v.stats["nics"][0]
        hold = nic.get("kick_hold")
        if hold:
            kicks = nic["queues"]["tx0"].get("kicks", 0)
            notes.append(
                f"tx0 kicks {kicks}; kick hold {hold['window_us']:g} us: "
                f"held {hold['held']}, polls {hold['polls']} "
                f"({hold.get('polls_at_once', 0)} at once), backoffs {hold['backoffs']}"
            )
    return "; ".join(notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds after the first frame")
    p.add_argument("--sizes", default="64,1500", help="comma-separated frame sizes")
    p.add_argument("--frontends", default="python,dpdk", help="python,dpdk")
    p.add_argument("--directions", default="tx,rx", help="tx (guest TX), rx (guest RX)")
    p.add_argument("--backends", default="vdev,dpdk", help="vdev,dpdk")
    p.add_argument("--quick", action="store_true", help="1 s cells, 64-byte frames only")
    p.add_argument("--profile", action="store_true", help="also cProfile vdev's TX hot path")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--far-end",
        choices=("channel", "drop"),
        default="channel",
        help="guest TX frames go to a host channel (counted by a reader thread) or to an "
        "endpoint that frees them (the device alone, as testpmd rxonly)",
    )
    p.add_argument("--worker", metavar="SOCK", help=argparse.SUPPRESS)
    p.add_argument("--role", default="sink", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    p.add_argument(
        "--kick-hold-us",
        type=float,
        default=None,
        metavar="US",
        help="vdev's TX kick mitigation window (vdev serve --kick-hold-us; default: the "
        "device's, 100; 0: off)",
    )
    p.add_argument("--rx-kick-batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--rx-source",
        choices=tuple(_RX_ROLE),
        default="channel",
        help="guest RX frames come from a host channel sender (default) or from the NIC's "
        "own generator (vdev/net/rxgen.py: device-generated, as testpmd txonly on net_vhost)",
    )
    p.add_argument(
        "--poll", action="store_true", help="vdev busy-polls (vdev serve --poll), as DPDK spins"
    )
    args = p.parse_args(argv)
    if args.worker:
        return worker(
            args.worker,
            args.role,
            args.size,
            args.profile_out,
            args.kick_hold_us,
            args.rx_kick_batch,
            args.poll,
        )
    if args.quick:
        args.duration, args.warmup, args.sizes = 1.0, 0.5, "64"
    sizes = [int(s) for s in args.sizes.split(",")]
    frontends = args.frontends.split(",")
    backends = args.backends.split(",")
    if TESTPMD is None and ("dpdk" in frontends or "dpdk" in backends):
        print("dpdk-testpmd not found: DPDK rows and columns are skipped", file=sys.stderr)
        frontends = [f for f in frontends if f != "dpdk"]
        backends = [b for b in backends if b != "dpdk"]
    with tempfile.TemporaryDirectory(prefix="vdevbench") as tmp:
        far_end = "drop" if args.far_end == "drop" else "sink"
        cfg = Config(
            args.duration,
            args.warmup,
            Path(tmp),
            far_end=far_end,
            kick_hold_us=args.kick_hold_us,
            rx_source=args.rx_source,
            poll=args.poll,
        )
        rows: list[dict[str, Any]] = []
        print(HEADER, flush=True)
        for frontend in frontends:
            for direction in args.directions.split(","):
                for size in sizes:
                    res = {b: measure(cfg, frontend, direction, size, b) for b in backends}
                    v, d = res.get("vdev"), res.get("dpdk")
                    vp, vr = (v.pps, v.ring_pps) if v else (None, None)
                    dp = d.pps if d else None
                    notes = row_notes(res, direction)
                    rows.append(
                        {
                            "frontend": frontend,
                            "direction": direction,
                            "size": size,
                            "vdev_pps": vp,
                            "vdev_ring_pps": vr,
                            "dpdk_pps": dp,
                            "notes": notes,
                            "vdev_stats": v.stats if v else {},
                        }
                    )
                    print(
                        f"| {FRONTEND_NAMES[frontend]} | {DIRECTION_NAMES[direction]} | {size} "
                        f"| {fmt_pps(vp)} | {fmt_pps(vr)} | {fmt_pps(dp)} "
                        f"| {fmt_ratio(vp, dp)} | {fmt_ratio(vr, dp)} | {notes} |",
                        flush=True,
                    )
        if args.profile:
            cfg.profile = True
            frontend = "dpdk" if TESTPMD is not None else "python"
            pres = measure(cfg, frontend, "tx", 64, "vdev")
            prof = cfg.workdir / "tx.prof"
            frames = 0
            if pres.stats:
                frames = int(pres.stats["nics"][0]["queues"]["tx0"]["frames"])
            if prof.exists() and frames:
                print(f"\nprofile ({FRONTEND_NAMES[frontend]} txonly 64 B; rates under cProfile")
                print("are not comparable with the table; per-frame times are inflated ~2x)")
                print(profile_report(prof, frames))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
