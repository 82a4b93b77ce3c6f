"""Crash/restart loops (issue 12, item 2): the back-end or the front-end dies, again and again.

Four cases, each a function that runs ``iterations`` rounds and returns a :class:`CaseResult`
(one :class:`Round` per iteration plus what was left behind at the end):

- ``serve-kill-linux``: ``vdev serve`` is SIGKILLed during a Linux guest's continuous ping and
  UDP stream (QEMU ``chardev reconnect=1``) and started again;
- ``serve-kill-dpdk``: the same with DPDK ``net_virtio_user`` in server mode (testpmd txonly)
  and ``vdev serve --client``;
- ``guest-reset``: the guest is reset (QMP ``system_reset``) with the device running;
- ``qemu-kill``: QEMU is SIGKILLed and a new QEMU boots against the same device.

A round passes when traffic resumes within ``bound`` seconds (measured on the device, through
its control socket: the frames of the new process or connection grow; for a reset or a new
QEMU, the guest pings again within BOOT_BOUND, a TCG boot), no queue was killed,
the guest's counters moved forward only (interface tx/rx packets, ping replies) and, where
the front-end died, the device let go of its memory (no guest-RAM memfd still mapped) and
its fd count returned to where it was.  After each case: no socket, no QEMU or testpmd
process, no DPDK runtime directory is left.

``tools/restart_loops.py`` prints the table; ``tests/e2e/test_restart_loops.py`` runs the
same functions with 3 rounds on shared VMs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdev.faults.control import request

Progress = Callable[[str], None]

GUEST_IP = "10.0.2.15/24"
GATEWAY = "10.0.2.2"
# A reboot or a new boot under TCG on two shared cores: the bound for the front-end loops.
BOOT_BOUND = 120.0
UDP_SINK = f"{GATEWAY}:9"  # the responder counts UDP to port 9 (udp_sink_packets)


@dataclass
class Round:
    ok: bool
    resume_s: float | None
    detail: str = ""


@dataclass
class CaseResult:
    name: str
    rounds: list[Round] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> int:
        return sum(r.ok for r in self.rounds)

    @property
    def ok(self) -> bool:
        return not self.error and not self.leftovers and all(r.ok for r in self.rounds)


def _noop(_msg: str) -> None:
    pass


# -- the device process --------------------------------------------------------------------


class Serve:
    """One ``vdev serve`` that can be SIGKILLed and started again with the same arguments."""

    def __init__(
        self,
        sock: Path,
        control: Path,
        log: Path,
        *,
        client: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.sock, self.control, self.log = sock, control, log
        self.client = client
        self.argv = [sys.executable, "-m", "host.cli", "serve", "--socket", str(sock),
                     "--control", str(control), "--json", *extra]  # fmt: skip
        if client:
            self.argv.append("--client")
        self.proc: subprocess.Popen[str] | None = None
        self.generation = 0

    def start(self, timeout: float = 20.0) -> None:
        with self.log.open("a") as err:
            err.write(f"--- start {self.generation + 1}\n")
        with self.log.open("a") as err:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.PIPE, stderr=err, text=True,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.generation += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vdev serve exited with {self.proc.returncode}")
            if _listening(self.control) and (self.client or _listening(self.sock)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"vdev serve did not come up in {timeout} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """A crash: SIGKILL, no cleanup (the sockets stay on disk)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stats(self) -> dict[str, Any]:
        reply = request(str(self.control), {"cmd": "stats"}, timeout=5)
        if not reply.get("ok"):
            raise RuntimeError(f"stats: {reply}")
        return dict(reply["device"])

    def stop(self) -> dict[str, Any] | None:
        """SIGINT and the final JSON statistics (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=20)
        import json

        return dict(json.loads(out[out.index("{") :])) if "{" in out else None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def mapped_memfds(self) -> list[str]:
        """Guest-RAM (and inflight) memfds still mapped in the device process."""
        with open(f"/proc/{self.pid}/maps") as f:
            return sorted({ln.split(None, 5)[-1].strip() for ln in f if "memfd:" in ln})


def _listening(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def queue_stats(stats: dict[str, Any], nic: int = 0) -> dict[str, Any]:
    return dict(stats["nics"][nic]["queues"])


def kills(stats: dict[str, Any]) -> dict[str, Any]:
    return {q: v["kills"] for q, v in queue_stats(stats).items() if v["kills"]}


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``cond()`` held, or None after ``timeout``."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError, RuntimeError, ConnectionError, KeyError, ValueError):
            if cond():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)


# -- the Linux guest -----------------------------------------------------------------------


def guest_counters(m: Any) -> dict[str, int]:
    """eth0's packet counters and the background ping's replies, read in the guest."""
    cmd = (
        "cd /sys/class/net/eth0/statistics && echo $(cat tx_packets rx_packets tx_errors "
        "rx_errors tx_dropped) $(grep -c 'bytes from' /tmp/ping.log)"
    )
    out, _ = m.run(cmd, timeout=30)
    vals = [int(v) for v in out.strip().splitlines()[-1].split()]
    keys = ("tx_packets", "rx_packets", "tx_errors", "rx_errors", "tx_dropped", "ping_replies")
    return dict(zip(keys, vals, strict=True))


def start_guest_traffic(m: Any) -> None:
    """A continuous ping (5/s) and UDP stream (200/s) to the responder, in the background."""
    m.run(f"ping -i 0.2 {GATEWAY} > /tmp/ping.log 2>&1 &", timeout=10)
    m.run(
        f"vdev-pktgen --udp {UDP_SINK} --count 1000000000 --size 200 --interval-us 5000 "
        "> /tmp/udp.log 2>&1 &",
        timeout=10,
    )


def stop_guest_traffic(m: Any) -> None:
    m.run("killall ping vdev-pktgen 2>/dev/null; true", timeout=10)


def counters_forward(before: dict[str, int], after: dict[str, int]) -> str:
    """'' when every counter moved forward consistently, else what did not."""
    bad = []
    for k in ("tx_packets", "rx_packets", "ping_replies"):
        if after[k] <= before[k]:
            bad.append(f"{k} {before[k]}->{after[k]}")
    for k in ("tx_errors", "rx_errors"):
        if after[k] != before[k]:
            bad.append(f"{k} {before[k]}->{after[k]}")
    return ", ".join(bad)


def guest_watchdog(m: Any) -> str:
    """Kernel lines saying a TX queue timed out (the driver gave up on a ring)."""
    out, _ = m.run(
        "dmesg | grep -E 'NETDEV WATCHDOG|transmit queue .* timed out' ; true", timeout=20
    )
    return str(out).strip()


# -- cases ---------------------------------------------------------------------------------


def serve_kill_linux(
    m: Any, serve: Serve, iterations: int, bound: float, progress: Progress = _noop
) -> CaseResult:
    """SIGKILL ``serve`` (which ``m``'s NIC reconnects to) ``iterations`` times in traffic."""
    res = CaseResult("serve-kill-linux")
    start_guest_traffic(m)
    try:
        ok = wait_until(lambda: _guest_traffic_seen(serve.stats()), 20)
        if ok is None:
            res.error = "no guest traffic before the first kill"
            return res
        for i in range(iterations):
            before = guest_counters(m)
            k = kills(serve.stats())
            serve.kill9()
            t0 = time.monotonic()
            serve.start()
            waited = wait_until(lambda: _guest_traffic_seen(serve.stats()), bound)
            resume = None if waited is None else time.monotonic() - t0
            time.sleep(0.5)
            after = guest_counters(m)
            problems = []
            if k:
                problems.append(f"kills before the kill: {k}")
            if resume is None:
                problems.append(f"no traffic within {bound} s")
            moved = counters_forward(before, after)
            if moved:
                problems.append(moved)
            res.rounds.append(Round(not problems, resume, "; ".join(problems)))
            progress(f"serve-kill-linux {i + 1}/{iterations}: {_fmt(res.rounds[-1])}")
        k = kills(serve.stats())
        if k:
            res.rounds[-1] = Round(False, res.rounds[-1].resume_s, f"kills at the end: {k}")
        dog = guest_watchdog(m)
        if dog:
            res.error = f"guest kernel: {dog[:300]}"
    finally:
        stop_guest_traffic(m)
    return res


def _guest_traffic_seen(stats: dict[str, Any]) -> bool:
    r = stats["responder"]
    q = queue_stats(stats)
    return bool(r["icmp_replies"] > 0 and r["udp_sink_packets"] > 0 and q["rx0"]["frames"] > 0)


def guest_reset(
    m: Any, serve: Serve, iterations: int, bound: float, progress: Progress = _noop
) -> CaseResult:
    """QMP ``system_reset`` ``iterations`` times; the device stays up throughout."""
    res = CaseResult("guest-reset")
    for i in range(iterations):
        st = serve.stats()
        replies0 = st["responder"]["icmp_replies"]
        t0 = time.monotonic()
        try:
            m.system_reset()
        except Exception as exc:  # a guest that does not come back fails
            res.rounds.append(Round(False, None, f"reset: {exc}"))
            break
        out, status = m.run(f"ping -c 3 -i 0.2 -W 2 {GATEWAY}", timeout=bound + 30)
        resume = time.monotonic() - t0
        st = serve.stats()
        problems = []
        if resume > BOOT_BOUND:
            problems.append(f"back after {resume:.0f} s > {BOOT_BOUND:.0f} s")
        if status != 0:
            problems.append(f"ping failed: {out.strip()[-200:]}")
        if st["responder"]["icmp_replies"] < replies0 + 3:
            problems.append("the device answered fewer than 3 pings")
        k = kills(st)
        if k:
            problems.append(f"kills: {k}")
        res.rounds.append(Round(not problems, resume, "; ".join(problems)))
        progress(f"guest-reset {i + 1}/{iterations}: {_fmt(res.rounds[-1])}")
    return res


def qemu_kill(
    boot: Callable[[], Any],
    serve: Serve,
    iterations: int,
    bound: float,
    progress: Progress = _noop,
) -> CaseResult:
    """Boot a guest with ``boot()``, ping, SIGKILL its QEMU, ``iterations`` times; the device
    must drop the connection and everything it held for it each time."""
    res = CaseResult("qemu-kill")
    # What the device holds with no front-end: its own pool memfd, sockets, the loop.
    fds0 = serve.fd_count()
    maps0 = set(serve.mapped_memfds())
    for i in range(iterations):
        t0 = time.monotonic()
        m = boot()
        try:
            out, status = m.run(f"ping -c 3 -i 0.2 -W 2 {GATEWAY}", timeout=bound + 30)
            resume = time.monotonic() - t0
            pid = m.pid
            problems = []
            if resume > BOOT_BOUND:
                problems.append(f"booted and pinging after {resume:.0f} s > {BOOT_BOUND:.0f} s")
            if status != 0:
                problems.append(f"ping failed: {out.strip()[-200:]}")
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        finally:
            m.shutdown()
        gone = wait_until(lambda: set(serve.mapped_memfds()) <= maps0, 10)
        if gone is None:
            left = sorted(set(serve.mapped_memfds()) - maps0)
            problems.append(f"still mapped after QEMU died: {left}")
        st = serve.stats()
        k = kills(st)
        if k:
            problems.append(f"kills: {k}")
        if st["pool"]["in_use"] != 0:
            problems.append(f"pool in_use {st['pool']['in_use']} after the disconnect")
        if wait_until(lambda: serve.fd_count() == fds0, 5) is None:
            problems.append(f"device fds {fds0} -> {serve.fd_count()}")
        res.rounds.append(Round(not problems, resume, "; ".join(problems)))
        progress(f"qemu-kill {i + 1}/{iterations}: {_fmt(res.rounds[-1])}")
    return res


def serve_kill_dpdk(
    serve: Serve,
    testpmd: Any,
    iterations: int,
    bound: float,
    progress: Progress = _noop,
) -> CaseResult:
    """``serve`` dials testpmd's virtio_user (server=1, txonly); SIGKILL and restart it."""
    res = CaseResult("serve-kill-dpdk")
    if wait_until(lambda: queue_stats(serve.stats())["tx0"]["frames"] > 1000, 30) is None:
        res.error = "no TX from testpmd before the first kill"
        return res
    for i in range(iterations):
        k = kills(serve.stats())
        serve.kill9()
        t0 = time.monotonic()
        serve.start()
        waited = wait_until(lambda: queue_stats(serve.stats())["tx0"]["frames"] > 1000, bound)
        resume = None if waited is None else time.monotonic() - t0
        problems = []
        if k:
            problems.append(f"kills: {k}")
        if resume is None:
            problems.append(f"no TX within {bound} s")
        if testpmd.proc.poll() is not None:
            problems.append("testpmd exited")
        res.rounds.append(Round(not problems, resume, "; ".join(problems)))
        progress(f"serve-kill-dpdk {i + 1}/{iterations}: {_fmt(res.rounds[-1])}")
        if testpmd.proc.poll() is not None:
            break
    k = kills(serve.stats())
    if k and res.rounds:
        res.rounds[-1] = Round(False, res.rounds[-1].resume_s, f"kills at the end: {k}")
    return res


# -- leftovers and the table ---------------------------------------------------------------


def leftovers(paths: list[Path], markers: list[str]) -> list[str]:
    """Files still present among ``paths`` and processes whose command line contains one of
    ``markers`` (QEMU, testpmd and vdev serve all name the socket path they use)."""
    out = [f"file {p}" for p in paths if p.exists()]
    me = os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mk in cmd for mk in markers):
            out.append(f"process {pid}: {cmd[:120]}")
    return out


def _fmt(r: Round) -> str:
    t = f"{r.resume_s:.2f} s" if r.resume_s is not None else "-"
    return ("ok " if r.ok else "FAIL ") + t + (f" ({r.detail})" if r.detail else "")


def table(results: list[CaseResult]) -> str:
    head = f"{'case':22} {'passed':>8} {'resume median':>14} {'resume max':>11}"
    lines = [head + "  left behind / failures"]
    for r in results:
        times = sorted(x.resume_s for x in r.rounds if x.resume_s is not None)
        med = f"{times[len(times) // 2]:.2f} s" if times else "-"
        mx = f"{times[-1]:.2f} s" if times else "-"
        notes = [r.error] if r.error else []
        notes += [f"{i + 1}: {x.detail}" for i, x in enumerate(r.rounds) if not x.ok]
        notes += r.leftovers
        lines.append(
            f"{r.name:22} {f'{r.passed}/{len(r.rounds)}':>8} {med:>14} {mx:>11}  "
            + ("; ".join(notes) if notes else "none")
        )
    return "\n".join(lines)


__all__ = [
    "CaseResult",
    "Round",
    "Serve",
    "guest_reset",
    "leftovers",
    "qemu_kill",
    "serve_kill_dpdk",
    "serve_kill_linux",
    "table",
]
