"""Guest adapters for scenarios: the guest's side of the declared traffic, the liveness
probe and the console, for the Linux image and for the bare driver.

``vdev.faults.scenario_play.play(..., guest=LinuxGuest(machine))`` is what ``vdev run
--scenario`` and the tests call, so the traffic a scenario declares is generated the same
way whoever plays it:

* Linux runs its generators in the guest, in the background, from its shell: ``ping`` to
  the responder, ``vdev-pktgen`` (UDP to the responder's sink port, raw frames to the host
  peer) and ``vdev-sink`` (counts what the host peer sends).  Each is bounded in the guest
  itself (``ping -w``, ``--count``, ``--timeout-ms``), so a guest that stops answering its
  shell still stops sending.  The probe is ICMP echo from the host peer to the guest.
* The bare driver has no shell and no IP stack: the adapter drives its console between
  script commands (``tx`` for frames, ``txhex`` with a prepared ICMP echo request for
  ping, ``rx`` to harvest), and its probe is the driver's ``echo`` reflecting raw frames
  from the host peer.  UDP is not supported there, and says so.
"""

from __future__ import annotations

import contextlib
import math
import re
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from host.errors import MachineError
from vdev.faults.traffic import (
    GUEST_UDP_PORT,
    PEER_MAC,
    RESPONDER_SINK_PORT,
    FlowCounts,
    HostPeer,
    ProbeResult,
    TrafficFlow,
)

if TYPE_CHECKING:
    from host.cli_sandbox import Sandbox
    from host.machine import Machine
    from vdev.faults.scenario_report import Report
    from vdev.net.device import Device

GUEST_IP = "10.0.2.15"
RESPONDER_IP = "10.0.2.2"
_FLOW_FILE = "/tmp/vdev-flow-{}"
SINK_GRACE = 2.0  # a sink keeps listening this long after its flow's last frame is due
TX_GRACE = 3.0  # how long stop_flow waits for a sender's own summary before killing it


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _mac_bytes(text: str) -> bytes:
    return bytes(int(p, 16) for p in text.split(":"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _probe(
    peer: HostPeer,
    kind: str,
    mac: bytes,
    ip: bytes,
    within: float,
    answers: int,
    during: Any = None,
) -> ProbeResult:
    """Send probes until ``answers`` come back or ``within`` seconds pass."""
    t0 = time.monotonic()
    peer.start_probe(kind, mac, ip)
    detail = ""
    try:
        if during is not None:
            detail = during()
        while time.monotonic() - t0 < within:
            if peer.probe_counts()[1] >= answers:
                break
            time.sleep(0.05)
    finally:
        sent, answered = peer.stop_probe()
    return ProbeResult(answered >= answers, sent, answered, time.monotonic() - t0, detail)


class LinuxGuest:
    """The vdev Linux image (busybox shell, vdev-pktgen, vdev-sink) as a scenario guest."""

    kind = "linux"

    def __init__(self, machine: Machine, *, ip: str = GUEST_IP, mac: str | None = None) -> None:
        from host.machine import default_mac

        self.machine = machine
        nic_mac = machine.nics[0].mac if machine.nics else None
        self.mac = _mac_bytes(mac or nic_mac or default_mac(0))
        self.ip = bytes(int(x) for x in ip.split("."))
        self._ip_text = ip
        self._log_start = 0
        self._procs: dict[int, list[str]] = {}  # flow index -> the files its processes write
        self._shell_lost: str | None = None

    @property
    def console(self) -> Any:
        return self.machine.console

    @property
    def qmp(self) -> Any:
        return self.machine.qmp

    def unsupported(self, flow: TrafficFlow) -> str | None:
        return None  # ping, udp and frames all have a generator in the image

    def begin(self) -> None:
        self._log_start = self.console.log_offset()
        self._shell_lost = None

    def tick(self) -> None:
        pass  # the generators run in the guest

    # -- flows ------------------------------------------------------------------------

    def _seconds(self, flow: TrafficFlow, until: float) -> float:
        if flow.duration is not None:
            return flow.duration
        if flow.count is not None and flow.rate is not None:
            return flow.count / flow.rate
        return until

    def start_flow(self, flow: TrafficFlow, counts: FlowCounts, until: float) -> None:
        f = _FLOW_FILE.format(flow.index)
        secs = self._seconds(flow, until)
        bound = max(1, math.ceil(min(until, secs + TX_GRACE)))
        cmds: list[str] = []
        files: list[str] = []
        if flow.rx:  # the sink first, so that nothing the host sends is missed
            timeout_ms = int((secs + SINK_GRACE) * 1000)
            mode = f"--udp {GUEST_UDP_PORT}" if flow.kind == "udp" else "--raw eth0"
            self._run(f"rm -f {f}.sink; vdev-sink {mode} --count 0 --timeout-ms {timeout_ms} "
                      f"> {f}.sink 2>&1 &")  # fmt: skip
            files.append(f"{f}.sink")
            self._wait_file(f"{f}.sink", "sink ready", 10.0)
        if flow.tx:
            n = flow.count if flow.count is not None else math.ceil((flow.rate or 1) * secs)
            interval_us = 0 if flow.rate is None else int(1e6 / flow.rate)
            if flow.kind == "ping":
                assert flow.rate is not None
                interval = f"{1.0 / flow.rate:.3f}".rstrip("0").rstrip(".")
                cmds.append(f"ping -i {interval} -s {flow.size} -c {n} -w {bound} {RESPONDER_IP}")
            elif flow.kind == "udp":
                cmds.append(
                    f"vdev-pktgen --udp {RESPONDER_IP}:{RESPONDER_SINK_PORT} --count {n} "
                    f"--size {flow.size} --interval-us {interval_us}"
                )
            else:
                cmds.append(
                    f"vdev-pktgen --raw eth0 --dst-mac {_mac_text(PEER_MAC)} --count {n} "
                    f"--size {flow.size} --interval-us {interval_us}"
                )
            self._run(f"rm -f {f}.out; {cmds[0]} > {f}.out 2>&1 & echo $! > {f}.pid")
            files.append(f"{f}.out")
        self._procs[flow.index] = files

    def stop_flow(self, flow: TrafficFlow, counts: FlowCounts) -> None:
        f = _FLOW_FILE.format(flow.index)
        files = self._procs.pop(flow.index, [])
        try:
            if f"{f}.out" in files:
                if flow.kind == "ping":  # ping prints its summary on SIGINT
                    self._run(f"kill -INT $(cat {f}.pid) 2>/dev/null; true", timeout=5.0)
                done = "packets received" if flow.kind == "ping" else "^pktgen "
                if not self._wait_file(f"{f}.out", done, TX_GRACE + 2):
                    self._run(f"kill $(cat {f}.pid) 2>/dev/null; true")
                out = self._run(f"cat {f}.out")
                m = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
                if m:
                    counts.guest_sent, counts.guest_received = int(m.group(1)), int(m.group(2))
                m = re.search(r"pktgen tx_packets=(\d+)", out)
                if m:
                    counts.guest_sent = int(m.group(1))
            if f"{f}.sink" in files:
                self._wait_file(f"{f}.sink", "^sink rx_packets=", SINK_GRACE + 3)
                m = re.search(r"sink rx_packets=(\d+)", self._run(f"cat {f}.sink"))
                if m:
                    counts.guest_received = int(m.group(1))
            self._run(f"rm -f {f}.out {f}.pid {f}.sink")
        except MachineError as exc:  # the guest's shell is gone (a scenario may break it)
            counts.error = f"guest counters unavailable: {_first_line(exc)}"

    def _run(self, cmd: str, timeout: float = 10.0) -> str:
        if self._shell_lost is not None:  # do not wait on a shell that stopped answering
            raise MachineError(f"the guest shell stopped answering earlier: {self._shell_lost}")
        try:
            out, _status = self.machine.run(cmd, timeout=timeout)
        except MachineError as exc:
            self._shell_lost = _first_line(exc)
            raise
        return out

    def _wait_file(self, path: str, pattern: str, timeout: float) -> bool:
        """Wait (bounded) until a line of ``path`` in the guest matches ``pattern``."""
        steps = max(1, int(timeout / 0.1))
        out = self._run(
            f"i=0; while [ $i -lt {steps} ] && ! grep -q '{pattern}' {path} 2>/dev/null; "
            f"do sleep 0.1; i=$((i+1)); done; grep -q '{pattern}' {path} && echo FOUND",
            timeout=timeout + 5,
        )
        return "FOUND" in out

    # -- liveness ---------------------------------------------------------------------

    def command(self, line: str, timeout: float) -> tuple[bool, str]:
        """One shell line (a ``guest`` step); ok when it answers within ``timeout``."""
        try:
            out = self._run(line, timeout=timeout)
        except Exception as exc:  # GuestTimeout, the shell is gone
            return False, _first_line(exc)
        return True, out.strip().splitlines()[-1] if out.strip() else ""

    def probe(self, peer: HostPeer, within: float, answers: int) -> ProbeResult:
        """ICMP echo requests from the host peer to the guest's address: the guest's RX,
        its IP stack and its TX must all work for an answer to come back."""
        return _probe(peer, "icmp", self.mac, self.ip, within, answers)

    def console_shows(self, pattern: str, timeout: float) -> str | None:
        rx = re.compile(pattern)
        m = rx.search(self.console.log_since(self._log_start))
        if m is not None:
            return _line_of(m)
        try:
            return _line_of(self.console.expect(rx, timeout, fail_patterns=()))
        except MachineError:
            return None


def _line_of(m: re.Match[str]) -> str:
    text = m.string
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return text[start : end if end >= 0 else len(text)].strip()


def bare_unsupported(flow: TrafficFlow) -> str | None:
    """Why the bare driver cannot play ``flow`` (None: it can)."""
    if flow.kind == "udp":
        return (
            'kind "udp" is not supported by the bare driver (it has no IP stack: use '
            'kind = "frames", or play the scenario on Linux with vdev run)'
        )
    return None


class BareGuest:
    """The freestanding driver (``vdev sandbox``) as a scenario guest, over its console.

    Commands go through ``Sandbox.cmd`` (one lock), so they interleave with a script's
    commands instead of mixing with them."""

    kind = "bare"
    TICK = 0.1

    def __init__(self, sandbox: Sandbox) -> None:
        self.sb = sandbox
        self.mac = _mac_bytes(sandbox.mac)
        self.ip: bytes | None = None
        self.lines: list[str] = []
        self._active: dict[int, tuple[TrafficFlow, FlowCounts, float]] = {}
        self._sent: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self._next_tick = 0.0

    @property
    def console(self) -> Any:
        return None  # the console belongs to the script; steps cannot wait on it

    @property
    def qmp(self) -> Any:
        return self.sb.machine.qmp if self.sb.machine is not None else None

    def unsupported(self, flow: TrafficFlow) -> str | None:
        return bare_unsupported(flow)

    def begin(self) -> None:
        self.lines = []

    def _cmd(self, line: str, timeout: float = 15.0) -> Any:
        reply = self.sb.cmd(line, timeout=timeout, check=False)
        self.lines.extend(reply.lines)
        self.lines.append(reply.status_line)
        return reply

    def start_flow(self, flow: TrafficFlow, counts: FlowCounts, until: float) -> None:
        self._active[flow.index] = (flow, counts, time.monotonic())
        self._sent[flow.index] = 0
        self._received[flow.index] = 0

    def _ping_frame(self) -> str:
        from vdev.net.responder import inet_checksum
        from vdev.testing.frames import RESPONDER_IP as RIP
        from vdev.testing.frames import RESPONDER_MAC, eth, ipv4

        icmp = bytes([8, 0, 0, 0, 0x42, 0x41, 0, 1]) + b"vdev-bare-ping"
        csum = inet_checksum(icmp)
        icmp = icmp[:2] + csum.to_bytes(2, "big") + icmp[4:]
        frame = eth(RESPONDER_MAC, self.mac, 0x0800, ipv4(bytes([10, 0, 2, 15]), RIP, 1, icmp))
        return frame.hex()

    def tick(self) -> None:
        now = time.monotonic()
        if not self._active or now < self._next_tick:
            return
        self._next_tick = now + self.TICK
        harvest = False
        for index, (flow, counts, t0) in list(self._active.items()):
            harvest |= flow.kind == "ping" or flow.rx
            if not flow.tx:
                continue
            due = min(flow.packets(now - t0) - self._sent[index], 256)
            if due <= 0:
                continue
            try:
                if flow.kind == "ping":
                    reply = self._cmd(f"txhex {self._ping_frame()} {due}")
                else:
                    reply = self._cmd(f"tx {due} {flow.size} 32 {_mac_text(PEER_MAC)}")
                m = re.search(r"sent=(\d+)", reply.status_line)
                self._sent[index] += int(m.group(1)) if m else 0
            except Exception as exc:  # QEMU gone, the driver stopped answering
                counts.error = f"guest stopped sending: {_first_line(exc)}"
                del self._active[index]
        if harvest:
            with contextlib.suppress(Exception):
                reply = self._cmd("rx 4096 1")
                m = re.search(r"received=(\d+)", reply.status_line)
                got = int(m.group(1)) if m else 0
                for index, (flow, _c, _t) in self._active.items():
                    if flow.kind == "ping" or flow.rx:
                        self._received[index] += got
                        break

    def stop_flow(self, flow: TrafficFlow, counts: FlowCounts) -> None:
        self._active.pop(flow.index, None)
        counts.guest_sent = self._sent.get(flow.index) if flow.tx else None
        counts.guest_received = self._received.get(flow.index)

    def command(self, line: str, timeout: float) -> tuple[bool, str]:
        """One console command (a ``guest`` step); its lines count for ``console_shows``."""
        reply = self._cmd(line, timeout=timeout)
        return bool(reply.ok), str(reply.status_line)

    def probe(self, peer: HostPeer, within: float, answers: int) -> ProbeResult:
        """Raw frames from the host peer, reflected by the driver's ``echo`` command."""

        def echo() -> str:
            try:
                reply = self._cmd(f"echo {answers} {int(within * 1000)}", timeout=within + 15)
                return str(reply.status_line)
            except Exception as exc:
                return f"echo failed: {_first_line(exc)}"

        return _probe(peer, "raw", self.mac, b"\0" * 4, within, answers, during=echo)

    def console_shows(self, pattern: str, timeout: float) -> str | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                return None
            with contextlib.suppress(Exception):
                self._cmd("stats")
            time.sleep(0.2)


def play_on_linux(scenario: Any, device: Device, machine: Machine, **play_kw: Any) -> Report:
    """``play`` with the Linux guest adapter: what ``vdev run --scenario`` and the tests do."""
    from vdev.faults.scenario_play import play

    return play(scenario, device, guest=LinuxGuest(machine), **play_kw)


def play_cli(
    path: str,
    device: Device,
    guest: Any,
    *,
    prog: str,
    as_json: bool = False,
    stop: threading.Event | None = None,
    out: TextIO | None = None,
) -> int:
    """``vdev run/sandbox --scenario``: play with progress on stderr and the report on
    stdout (or ``out``: ``vdev sandbox --script`` prints it after the transcript).  In the
    main thread the first Ctrl-C ends the run early with a partial report (exit status 130;
    a second Ctrl-C aborts); elsewhere the caller sets ``stop``."""
    from vdev.faults.scenario_play import play_and_print

    stop = stop if stop is not None else threading.Event()

    def progress(line: str) -> None:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)

    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:

        def on_sigint(signum: int, frame: Any) -> None:
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
            print(
                f"{prog}: interrupted: finishing the report (Ctrl-C again to abort)",
                file=sys.stderr,
                flush=True,
            )

        previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return play_and_print(
            path, device, guest=guest, as_json=as_json, progress=progress, stop=stop, out=out
        )
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


__all__ = ["BareGuest", "LinuxGuest", "play_cli", "play_on_linux"]
