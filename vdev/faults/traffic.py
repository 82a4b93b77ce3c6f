"""The traffic a scenario declares, and the host side that plays it.

A scenario's verdict must not depend on who plays it: a rule that needs 200 RX frames to
fire passes at 10 pings/s and fails at 5/s.  So the file says what traffic it needs
(``[traffic]``, or several ``[[traffic]]`` flows) and every player (``vdev run``,
``vdev sandbox``, the tests) honours it through this module and a guest adapter:

* ``TrafficFlow``: one flow as declared (kind, direction, rate, size, start, duration or
  count), validated by ``parse_flow`` with the scenario parser's ``file:line`` errors.
* ``HostPeer``: a host channel on the device's switch, the far end of the flows that are
  not the responder's: it sends the host-to-guest frames at the declared rate, counts what
  the guest sends it, answers ARP for its address, and runs the liveness probe (ICMP echo
  to a Linux guest; raw frames that the bare driver's ``echo`` reflects).
* ``ScenarioGuest``: what a guest adapter (``host.scenario_guest``: Linux over its shell,
  the bare driver over its console) provides: start/stop its side of a flow, answer the
  probe, and show its console for "the guest broke as declared".

Kinds (see docs/faults.md, "Traffic"):

==========  =================================================================
``ping``    the guest pings the responder (request out = TX, reply in = RX)
``udp``     tx: guest ``vdev-pktgen`` to the responder's sink port 9;
            rx: the host peer to the guest's ``vdev-sink`` (UDP port 9000)
``frames``  raw frames (ethertype 0x88b5): tx guest -> host peer, rx host peer -> guest
==========  =================================================================
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vdev.errors import VdevError
from vdev.net.responder import inet_checksum
from vdev.testing.frames import ETH_TEST, eth, ipv4, tools_payload

if TYPE_CHECKING:
    from vdev.net.device import Device
    from vdev.skywalk import Channel

KINDS = ("ping", "udp", "frames")
DIRECTIONS = ("tx", "rx", "both")
FLOW_KEYS = {"kind", "rate", "size", "direction", "start", "duration", "count"}
# Sizes: ping and udp payload bytes that fit a 1500-byte MTU without fragments; frames:
# Ethernet frame length without FCS, 60 (the minimum) to 1514 (1500-byte MTU).
SIZE_RANGE = {"ping": (0, 1472), "udp": (8, 1472), "frames": (60, 1514)}
DEFAULT_SIZE = {"ping": 56, "udp": 64, "frames": 64}
MAX_RATE = {"ping": 50.0, "udp": 100_000.0, "frames": 100_000.0}
DEFAULT_RATE = 10.0

PEER_MAC = bytes.fromhex("02000000c0de")
PEER_IP = bytes([10, 0, 2, 3])
GUEST_UDP_PORT = 9000  # the guest's vdev-sink for udp rx flows
RESPONDER_SINK_PORT = 9  # the responder counts (and drops) UDP sent here
PROBE_ICMP_ID = 0x5644


class FlowError(VdevError, ValueError):
    """A [traffic] key is invalid; ``key`` names it (the parser adds file and line)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TrafficFlow:
    """One declared flow.  ``rate`` None means flood (as fast as the sender can)."""

    index: int
    kind: str
    direction: str
    rate: float | None
    size: int
    start: float = 0.0
    duration: float | None = None
    count: int | None = None

    @property
    def tx(self) -> bool:
        """The guest sends (TX queues see it)."""
        return self.kind == "ping" or self.direction in ("tx", "both")

    @property
    def rx(self) -> bool:
        """The guest receives from the host peer (ping replies come from the responder)."""
        return self.kind != "ping" and self.direction in ("rx", "both")

    def end(self, scenario_end: float | None) -> float | None:
        """When the flow stops (seconds since the start), None: when the scenario ends."""
        if self.duration is not None:
            return self.start + self.duration
        if self.count is not None and self.rate is not None:
            return self.start + self.count / self.rate
        return scenario_end

    def packets(self, seconds: float) -> int:
        """Packets (per direction) due ``seconds`` after the flow started."""
        if seconds < 0:
            return 0
        if self.rate is None:  # flood: everything at once (parse_flow requires a count)
            return self.count or 0
        due = math.floor(seconds * self.rate + 1e-9) + 1  # the first one at t = 0
        return due if self.count is None else min(due, self.count)

    def describe(self) -> str:
        rate = "flood" if self.rate is None else f"{self.rate:g}/s"
        span = f" count={self.count}" if self.count is not None else ""
        span += f" for {self.duration:g} s" if self.duration is not None else ""
        direction = "" if self.kind == "ping" else f" {self.direction}"
        return f"{self.kind}{direction} {rate} size={self.size} from t={self.start:g}{span}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "direction": "both" if self.kind == "ping" else self.direction,
            "rate": "flood" if self.rate is None else self.rate,
            "size": self.size,
            "start": self.start,
            "duration": self.duration,
            "count": self.count,
        }


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_flow(raw: object, index: int) -> TrafficFlow:
    """Validate one ``[traffic]`` table; FlowError names the key."""
    if not isinstance(raw, dict):
        raise FlowError("must be a table")
    for key in raw:
        if key not in FLOW_KEYS:
            raise FlowError(f"{key}: unknown key (allowed: {', '.join(sorted(FLOW_KEYS))})", key)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise FlowError(f"kind: {kind!r} must be one of {', '.join(KINDS)}", "kind")
    direction = raw.get("direction", "both")
    if direction not in DIRECTIONS:
        raise FlowError(f"direction: {direction!r} must be tx, rx or both", "direction")
    if kind == "ping" and direction != "both":
        raise FlowError(
            "direction: ping is both directions (request out, reply in); use udp or frames "
            "for one direction",
            "direction",
        )
    rate_v = raw.get("rate", DEFAULT_RATE)
    rate: float | None
    if rate_v == "flood":
        if kind == "ping":
            raise FlowError("rate: 'flood' is for udp and frames, not ping", "rate")
        if "count" not in raw:
            raise FlowError("rate: 'flood' needs count = N (packets per direction)", "rate")
        rate = None
    elif isinstance(rate_v, int | float) and _num(rate_v) and 0 < rate_v <= MAX_RATE[kind]:
        rate = float(rate_v)
    else:
        raise FlowError(
            f"rate: {rate_v!r} must be packets per second in (0, {MAX_RATE[kind]:g}]"
            + ("" if kind == "ping" else ' or "flood"'),
            "rate",
        )
    lo, hi = SIZE_RANGE[kind]
    size = raw.get("size", DEFAULT_SIZE[kind])
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        what = "frame length" if kind == "frames" else "payload bytes"
        raise FlowError(f"size: {size!r} must be an integer {lo}..{hi} ({what})", "size")
    start = raw.get("start", 0.0)
    if not _num(start) or start < 0:
        raise FlowError(f"start: {start!r} must be seconds >= 0", "start")
    duration = raw.get("duration")
    if duration is not None and (not _num(duration) or duration <= 0):
        raise FlowError(f"duration: {duration!r} must be seconds > 0", "duration")
    count = raw.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise FlowError(f"count: {count!r} must be an integer >= 1", "count")
    if count is not None and duration is not None:
        raise FlowError("duration: use count or duration, not both", "duration")
    return TrafficFlow(
        index=index,
        kind=str(kind),
        direction=str(direction),
        rate=rate,
        size=int(size),
        start=float(start),
        duration=None if duration is None else float(duration),
        count=count,
    )


# -- guest adapters -------------------------------------------------------------------------


@dataclass
class FlowCounts:
    """What one flow did, from both ends (None: that end does not count it)."""

    flow: TrafficFlow
    started: bool = False
    error: str | None = None
    guest_sent: int | None = None
    guest_received: int | None = None
    host_sent: int | None = None
    host_received: int | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return self.flow.as_dict() | {
            "started": self.started,
            "error": self.error,
            "guest_sent": self.guest_sent,
            "guest_received": self.guest_received,
            "host_sent": self.host_sent,
            "host_received": self.host_received,
        }

    def format(self) -> str:
        parts = [
            f"{name}={v}"
            for name, v in (
                ("guest_sent", self.guest_sent),
                ("guest_received", self.guest_received),
                ("host_sent", self.host_sent),
                ("host_received", self.host_received),
            )
            if v is not None
        ]
        state = "" if self.started else " NOT STARTED"
        err = f" ({self.error})" if self.error else ""
        return f"{self.flow.index}: {self.flow.describe()}{state}: {' '.join(parts)}{err}"


@dataclass
class ProbeResult:
    """The liveness probe: the host asked the guest ``sent`` times, it answered ``answered``."""

    ok: bool
    sent: int
    answered: int
    seconds: float
    detail: str = ""


class ScenarioGuest(Protocol):
    """The guest side of a scenario run (``host.scenario_guest`` has Linux and bare)."""

    kind: str  # "linux" or "bare": named in reports and errors
    mac: bytes

    @property
    def console(self) -> Any:  # ``expect(pattern, timeout)`` for wait_console steps, or None
        ...

    @property
    def qmp(self) -> Any: ...

    def unsupported(self, flow: TrafficFlow) -> str | None:
        """Why this guest cannot play ``flow`` (None: it can)."""
        ...

    def begin(self) -> None:
        """The scenario starts (remember where the console log is)."""
        ...

    def start_flow(self, flow: TrafficFlow, counts: FlowCounts, until: float) -> None:
        """Start the guest's side; ``until`` bounds any guest process (seconds from now)."""
        ...

    def tick(self) -> None:
        """Called often by the player: guests without their own generators send here."""
        ...

    def stop_flow(self, flow: TrafficFlow, counts: FlowCounts) -> None:
        """Stop the guest's side and fill in its counters (never raises)."""
        ...

    def command(self, line: str, timeout: float) -> tuple[bool, str]:
        """Run one console command (a ``guest`` step): whether it succeeded, its reply."""
        ...

    def probe(self, peer: HostPeer, within: float, answers: int) -> ProbeResult:
        """Does the guest answer the host again (within ``within`` s, ``answers`` times)?"""
        ...

    def console_shows(self, pattern: str, timeout: float) -> str | None:
        """The console line matching ``pattern`` since ``begin`` (waiting up to
        ``timeout``), or None."""
        ...


# -- host peer ------------------------------------------------------------------------------


@dataclass
class _Sending:
    flow: TrafficFlow
    dst_mac: bytes
    dst_ip: bytes
    t0: float
    sent: int = 0
    backpressure: int = 0  # rounds where the channel took fewer frames than were due
    stopped: bool = False


@dataclass
class _Probe:
    kind: str  # "icmp" or "raw"
    dst_mac: bytes
    dst_ip: bytes
    interval: float
    next_at: float = 0.0
    sent: int = 0
    answered: set[int] = field(default_factory=set)


class HostPeer:
    """A host endpoint on the device's switch that plays the host side of flows.

    One background thread owns the channel: it receives (answering ARP for ``ip``,
    counting frames from the guest and probe answers) and sends what the active flows and
    the probe have due.  Counters are read by the player thread under ``lock``.
    """

    def __init__(
        self,
        device: Device,
        *,
        mac: bytes = PEER_MAC,
        ip: bytes = PEER_IP,
        name: str = "scenario-peer",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device = device
        self.mac = mac
        self.ip = ip
        self.clock = clock
        self.name = name
        self.channel: Channel = device.open_channel(name, ring_slots=256)
        self.lock = threading.Lock()
        self.sending: dict[int, _Sending] = {}
        self.raw_from_guest = 0  # ethertype 0x88b5 frames addressed to us
        self.udp_from_guest = 0
        self.arp_replies = 0
        self.other = 0
        self._probe: _Probe | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vdev-scenario-peer", daemon=True)
        self._thread.start()

    # -- flows ------------------------------------------------------------------------

    def send_flow(self, flow: TrafficFlow, dst_mac: bytes, dst_ip: bytes) -> None:
        """Start sending ``flow``'s host-to-guest packets at its rate."""
        with self.lock:
            self.sending[flow.index] = _Sending(flow, dst_mac, dst_ip, self.clock())

    def stop_flow(self, flow: TrafficFlow) -> int:
        """Stop sending; returns how many frames the channel took."""
        with self.lock:
            s = self.sending.get(flow.index)
            if s is None:
                return 0
            s.stopped = True
            return s.sent

    def flow_sent(self, flow: TrafficFlow) -> int:
        with self.lock:
            s = self.sending.get(flow.index)
            return 0 if s is None else s.sent

    def frame_for(self, s: _Sending, seq: int) -> bytes:
        flow = s.flow
        if flow.kind == "udp":
            data = tools_payload(seq, flow.size)
            u = struct.pack("!HHHH", 40000, GUEST_UDP_PORT, 8 + len(data), 0) + data
            return eth(s.dst_mac, self.mac, 0x0800, ipv4(self.ip, s.dst_ip, 17, u))
        return eth(s.dst_mac, self.mac, ETH_TEST, tools_payload(seq, flow.size - 14))

    def send_frames(
        self, dst_mac: bytes, count: int, size: int, timeout: float = 5.0, settle: float = 0.0
    ) -> int:
        """Send ``count`` test frames of ``size`` bytes to ``dst_mac`` now (a ``send`` step);
        returns how many the channel took within ``timeout`` seconds.

        ``settle`` > 0: then wait (at most that long) until the NIC with ``dst_mac`` has
        settled the frames' fate, written into guest buffers or dropped.  The channel only
        queues them: a step right after (a ``clear``) would otherwise race the device's RX
        path, and whether a rule saw them would depend on timing (a replay's nondeterminism).
        """
        before = self.rx_settled(dst_mac)
        frames = [
            eth(dst_mac, self.mac, ETH_TEST, tools_payload(i, size - 14)) for i in range(count)
        ]
        sent, deadline = 0, time.monotonic() + timeout
        while sent < count and time.monotonic() < deadline:
            took = self.channel.send(frames[sent:])
            sent += took
            if not took:
                time.sleep(0.002)
        if settle > 0 and before is not None:
            end = time.monotonic() + settle
            while time.monotonic() < end:
                now = self.rx_settled(dst_mac)
                if now is None or now >= before + sent:
                    break
                time.sleep(0.005)
        return sent

    def rx_settled(self, dst_mac: bytes) -> int | None:
        """RX frames the NIC with ``dst_mac`` wrote or dropped so far (None: no such NIC)."""
        for nic in self.device.nics:
            if nic.mac == dst_mac:
                return sum(q.frames + q.drops for i, q in nic.stats.items() if i % 2 == 0)
        return None

    # -- liveness probe ---------------------------------------------------------------

    def start_probe(
        self, kind: str, dst_mac: bytes, dst_ip: bytes = b"\0" * 4, interval: float = 0.2
    ) -> None:
        """Ask the guest every ``interval`` s: ICMP echo (``icmp``) or a raw frame that the
        guest reflects (``raw``, the bare driver's ``echo``)."""
        with self.lock:
            self._probe = _Probe(kind, dst_mac, dst_ip, interval, next_at=self.clock())

    def probe_counts(self) -> tuple[int, int]:
        with self.lock:
            p = self._probe
            return (0, 0) if p is None else (p.sent, len(p.answered))

    def stop_probe(self) -> tuple[int, int]:
        with self.lock:
            p, self._probe = self._probe, None
            return (0, 0) if p is None else (p.sent, len(p.answered))

    def probe_frame(self, p: _Probe, seq: int) -> bytes:
        if p.kind == "icmp":
            icmp = struct.pack("!BBHHH", 8, 0, 0, PROBE_ICMP_ID, seq & 0xFFFF) + b"vdev-alive"
            icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
            return eth(p.dst_mac, self.mac, 0x0800, ipv4(self.ip, p.dst_ip, 1, icmp))
        payload = struct.pack("!4sI", b"LIVE", seq)
        return eth(p.dst_mac, self.mac, ETH_TEST, payload.ljust(46, b"\0"))

    # -- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = False
            try:
                frames = self.channel.recv(max=256)
                for frame in frames:
                    self._received(frame)
                busy = bool(frames) | self._send_due()
            except Exception:  # the device closed under us: nothing more to do
                if self._stop.is_set():
                    return
                time.sleep(0.05)
            self._stop.wait(0.002 if busy else 0.01)

    def _send_due(self) -> bool:
        """Send what the flows and the probe have due; frames the channel does not take
        (ring full, pool exhausted) stay due and go out on a later round."""
        now = self.clock()
        plans: list[tuple[_Sending, list[bytes]]] = []
        probe: tuple[_Probe, bytes] | None = None
        with self.lock:
            for s in self.sending.values():
                n = 0 if s.stopped else min(s.flow.packets(now - s.t0) - s.sent, 256)
                if n > 0:
                    plans.append((s, [self.frame_for(s, s.sent + i) for i in range(n)]))
            p = self._probe
            if p is not None and now >= p.next_at:
                probe = (p, self.probe_frame(p, p.sent))
                p.next_at = now + p.interval
        for s, frames in plans:
            took = self.channel.send(frames)
            with self.lock:
                s.sent += took
                s.backpressure += took < len(frames)
        if probe is not None and self.channel.send([probe[1]]):
            with self.lock:
                probe[0].sent += 1
        return bool(plans)

    def _received(self, frame: bytes) -> None:
        if len(frame) < 14:
            return
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0806 and len(frame) >= 42:
            self._arp(frame)
            return
        if frame[:6] != self.mac:
            return
        if ethertype == ETH_TEST:
            if frame[14:18] == b"LIVE":
                seq = struct.unpack_from("!I", frame, 18)[0]
                with self.lock:
                    if self._probe is not None and self._probe.kind == "raw":
                        self._probe.answered.add(seq)
                return
            with self.lock:
                self.raw_from_guest += 1
            return
        if ethertype == 0x0800 and len(frame) >= 34:
            ihl = (frame[14] & 0x0F) * 4
            proto = frame[23]
            l4 = 14 + ihl
            if proto == 1 and len(frame) >= l4 + 8 and frame[l4] == 0:
                ident, seq = struct.unpack_from("!HH", frame, l4 + 4)
                if ident == PROBE_ICMP_ID:
                    with self.lock:
                        if self._probe is not None and self._probe.kind == "icmp":
                            self._probe.answered.add(seq)
                    return
            if proto == 17:
                with self.lock:
                    self.udp_from_guest += 1
                return
        with self.lock:
            self.other += 1

    def _arp(self, frame: bytes) -> None:
        op = struct.unpack_from("!H", frame, 20)[0]
        sender_mac, sender_ip, target_ip = frame[22:28], frame[28:32], frame[38:42]
        if op != 1 or target_ip != self.ip:
            return
        body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2) + self.mac + self.ip
        body += sender_mac + sender_ip
        with contextlib.suppress(Exception):
            if self.channel.send([eth(sender_mac, self.mac, 0x0806, body.ljust(46 - 18, b"\0"))]):
                with self.lock:
                    self.arp_replies += 1

    def close(self) -> None:
        """Stop the thread, close the channel and take the port off the switch (a device
        that plays many scenarios does not collect dead ports)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.channel.close()
        with contextlib.suppress(Exception), self.device.lock:
            port = self.device.ports.pop(self.name, None)
            if port is not None:
                port.close()
                self.device.switch.detach(self.name)


__all__ = [
    "DIRECTIONS",
    "KINDS",
    "PEER_IP",
    "PEER_MAC",
    "FlowCounts",
    "FlowError",
    "HostPeer",
    "ProbeResult",
    "ScenarioGuest",
    "TrafficFlow",
    "parse_flow",
]
