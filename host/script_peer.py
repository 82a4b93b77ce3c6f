"""The device side of a script: ``host ...`` and ``fault ...`` lines next to guest commands.

A sandbox or ``vdev run`` script drives both ends of the link from one file. Guest lines go
to the guest (the bare driver's console, or a Linux shell); these lines act on the vdev
device, in the same process:

``host send COUNT SIZE [pattern|zero] [to=MAC|broadcast] [flood]``
    COUNT frames from a host Skywalk channel on the device's switch toward the guest
    (pattern frames carry vdev's test pattern: ``host.bare_console.pattern_frame``).
    Frames queue in the guest's RX ring and the NIC's backlog (256 + 512 here); for more,
    start the guest's receiver first (``rx N &`` in a sandbox script). The sender keeps the
    NIC's RX backlog at most half full (it waits, up to 30 s, for the guest to take
    frames), so a guest that is slow for a moment is not flooded into drops; ``flood``
    sends as fast as the channel takes frames and lets the device drop (``host stats``).
``host expect COUNT [TIMEOUT_S] [pattern] [from=MAC] [type=0xNNNN]``
    wait until COUNT matching frames reached the host channel since the previous
    ``expect`` (default timeout 5 s); ``pattern`` also checks every frame's payload and
    that sequence numbers ascend. OK when at least COUNT arrived (the reply says how many).
``host stats``
    what the host channel sent and received, then the device's per-queue counters.
``host clear``
    forget frames received so far.
``fault add KEY=VALUE...`` / ``fault remove ID`` / ``fault list`` / ``fault clear``
    fault rules on the NIC, same keys as ``vdev ctl add`` and scenario files
    (docs/faults.md); values are JSON when they parse (``p=0.1``, ``nth=[1,3]``).

Every command answers like a guest command: informational lines, then one ``OK verb ...``
or ``ERR verb ...`` status line (``host.bare_console.Reply``).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import threading
import time
from typing import TYPE_CHECKING, Any

from host.bare_console import ETHERTYPE_VDEV, Reply, check_pattern_frame, parse_reply, pattern_frame

if TYPE_CHECKING:
    from vdev.net.device import Device
    from vdev.skywalk import Channel

HOST_MAC = bytes.fromhex("0200000000aa")  # vdev.testing.frames.HOST_MAC: the host's address
BROADCAST = b"\xff" * 6
EXPECT_TIMEOUT = 5.0
SEND_TIMEOUT = 30.0
PEER_VERBS = ("host", "fault")


def is_peer_line(line: str) -> bool:
    """Whether a script line is for the host peer (``host ...`` / ``fault ...``)."""
    word = line.split(maxsplit=1)[0] if line.strip() else ""
    return word in PEER_VERBS


def _mac(text: str) -> bytes:
    if text == "broadcast":
        return BROADCAST
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{text!r} is not a MAC address")
    return raw


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class PeerError(ValueError):
    """A bad host/fault line: the message names the word (printed as the ERR line)."""


class ScriptPeer:
    """A host channel on the device's switch (read by a thread) and the device's faults."""

    def __init__(self, device: Device, guest_mac: bytes, name: str = "script-host") -> None:
        self.device = device
        self.guest_mac = guest_mac
        self.name = name
        self.channel: Channel = device.open_channel(name, ring_slots=2048, alloc_nbufs=8)
        self.sent = 0
        self.received = 0
        self._frames: list[bytes] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._read, name="vdev-host-peer", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.channel.recv(256, timeout=0.05)
            except Exception:  # channel closed under us: stop quietly
                return
            if got:
                with self._arrived:
                    self._frames += got
                    self.received += len(got)
                    self._arrived.notify_all()

    def close(self) -> None:
        """Stop the reader, close the channel and take the port off the switch (a sandbox
        that runs many scripts does not collect dead ports)."""
        self._stop.set()
        self._thread.join(5)
        self.channel.close()
        with contextlib.suppress(Exception), self.device.lock:
            port = self.device.ports.pop(self.name, None)
            if port is not None:
                port.close()
                self.device.switch.detach(self.name)

    # ------------------------------------------------------------------ commands
    def execute(self, line: str) -> Reply:
        """Run one ``host``/``fault`` line; a bad line is an ``ERR`` reply, never raised."""
        words = shlex.split(line)
        verb = f"{words[0]}-{words[1]}" if len(words) > 1 else words[0]
        try:
            if words[0] == "host":
                if len(words) < 2:
                    raise PeerError("usage: host send|expect|stats|clear ...")
                handler = {
                    "send": self._send,
                    "expect": self._expect,
                    "stats": self._stats,
                    "clear": self._clear,
                }.get(words[1])
            else:
                if len(words) < 2:
                    raise PeerError("usage: fault add KEY=VALUE...|remove ID|list|clear")
                handler = {
                    "add": self._fault_add,
                    "remove": self._fault_remove,
                    "list": self._fault_list,
                    "clear": self._fault_clear,
                }.get(words[1])
            if handler is None:
                raise PeerError(f"unknown {words[0]} command {words[1]!r}")
            lines, status = handler(words[2:])
        except (PeerError, ValueError) as exc:
            return parse_reply(f"ERR {verb} {exc}", [])
        return parse_reply(status, lines)

    def _send(self, args: list[str]) -> tuple[list[str], str]:
        pos = [a for a in args if "=" not in a]
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        unknown = set(kv) - {"to"}
        flood = "flood" in pos
        pos = [p for p in pos if p != "flood"]
        if len(pos) < 2 or len(pos) > 3 or unknown:
            raise PeerError("usage: host send COUNT SIZE [pattern|zero] [to=MAC|broadcast] [flood]")
        try:
            count, size = int(pos[0]), int(pos[1])
        except ValueError:
            raise PeerError(f"COUNT and SIZE are numbers: {pos[0]!r} {pos[1]!r}") from None
        kind = pos[2] if len(pos) > 2 else "pattern"
        if kind not in ("pattern", "zero"):
            raise PeerError(f"payload {kind!r}: pattern or zero")
        if not 26 <= size <= 16000 or count < 0:
            raise PeerError(f"size {size}: 26..16000 bytes, count >= 0")
        dst = _mac(kv["to"]) if "to" in kv else self.guest_mac
        frames = []
        for _ in range(count):
            f = pattern_frame(self._seq, size, dst=dst, src=HOST_MAC)
            frames.append(f if kind == "pattern" else f[:26] + bytes(size - 26))
            self._seq += 1
        sent = 0
        deadline = time.monotonic() + SEND_TIMEOUT
        while sent < len(frames):
            if not flood:
                self._wait_backlog(deadline)
            n = self.channel.send(frames[sent : sent + 64])
            sent += n
            if n == 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        self.sent += sent
        status = "OK" if sent == count else "ERR"
        return [], f"{status} host-send sent={sent} bytes={sent * size}"

    def _wait_backlog(self, deadline: float) -> None:
        """Wait while any NIC's RX backlog is more than half full (the guest is behind); with
        per-NIC threads that counts the frames handed to a NIC's thread and not yet in its
        backlog (``rx_waiting``)."""
        from vdev.net.nic import RX_BACKLOG

        while time.monotonic() < deadline:
            with self.device.lock:
                depth = max((nic.rx_waiting() for nic in self.device.nics), default=0)
            if depth + 64 <= RX_BACKLOG // 2:
                return
            time.sleep(0.001)

    def _match(
        self, frame: bytes, want_pattern: bool, src: bytes | None, etype: int | None
    ) -> bool:
        if src is not None and frame[6:12] != src:
            return False
        if etype is not None and int.from_bytes(frame[12:14], "big") != etype:
            return False
        return not want_pattern or int.from_bytes(frame[12:14], "big") == ETHERTYPE_VDEV

    def _expect(self, args: list[str]) -> tuple[list[str], str]:
        pos = [a for a in args if "=" not in a]
        kv = dict(a.split("=", 1) for a in args if "=" in a)
        want_pattern = "pattern" in pos
        pos = [p for p in pos if p != "pattern"]
        if not 1 <= len(pos) <= 2 or set(kv) - {"from", "type"}:
            raise PeerError("usage: host expect COUNT [TIMEOUT_S] [pattern] [from=MAC] [type=0xN]")
        try:
            count = int(pos[0])
            timeout = float(pos[1]) if len(pos) > 1 else EXPECT_TIMEOUT
            etype = int(kv["type"], 0) if "type" in kv else None
        except ValueError as exc:
            raise PeerError(str(exc)) from None
        src = _mac(kv["from"]) if "from" in kv else None
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                matching = [f for f in self._frames if self._match(f, want_pattern, src, etype)]
                left = deadline - time.monotonic()
                if len(matching) >= count or left <= 0:
                    break
                self._arrived.wait(min(left, 0.1))
            self._frames = [f for f in self._frames if not self._match(f, want_pattern, src, etype)]
        bad = 0
        seqs: list[int] = []
        if want_pattern:
            for f in matching:
                try:
                    seqs.append(check_pattern_frame(f))
                except ValueError:
                    bad += 1
        fields = f"received={len(matching)} bytes={sum(len(f) for f in matching)}"
        if want_pattern:
            fields += f" bad={bad} in_order={int(seqs == sorted(seqs))}"
        ok = len(matching) >= count and bad == 0
        return [], f"{'OK' if ok else 'ERR'} host-expect {'' if ok else 'timeout '}{fields}"

    def _stats(self, args: list[str]) -> tuple[list[str], str]:
        if args:
            raise PeerError("usage: host stats")
        lines = []
        with self.device.lock:
            for nic in self.device.nics:
                for index, q in sorted(nic.stats.items()):
                    kind = "rx" if index % 2 == 0 else "tx"
                    drops = ",".join(f"{k}:{v}" for k, v in sorted(q.drop_reasons.items()))
                    kills = ",".join(f"{k}:{v}" for k, v in sorted(q.kills.items()))
                    lines.append(
                        f"{nic.name} {kind}{index // 2} frames={q.frames} bytes={q.bytes} "
                        f"drops={q.drops} irqs={q.notifications}"
                        + (f" drop_reasons={drops}" if drops else "")
                        + (f" kills={kills}" if kills else "")
                    )
        with self._lock:
            waiting = len(self._frames)
        return lines, f"OK host-stats sent={self.sent} received={self.received} unread={waiting}"

    def _clear(self, args: list[str]) -> tuple[list[str], str]:
        with self._lock:
            n = len(self._frames)
            self._frames.clear()
        return [], f"OK host-clear dropped={n}"

    # ------------------------------------------------------------------ faults
    def _engine(self) -> Any:
        from vdev.faults import FaultEngine

        return FaultEngine.for_device(self.device)

    def _fault_add(self, args: list[str]) -> tuple[list[str], str]:
        from vdev.faults.rules import SpecError

        spec: dict[str, Any] = {}
        for word in args:
            key, sep, val = word.partition("=")
            if not sep or not key:
                raise PeerError(f"{word!r}: expected KEY=VALUE")
            spec[key] = _value(val)
        if "action" not in spec:
            raise PeerError("fault add: action=... is required (docs/faults.md)")
        try:
            rule = self._engine().add(spec)
        except (SpecError, KeyError, TypeError) as exc:
            raise PeerError(str(exc).strip("'\"")) from None
        d = rule.describe()
        return [], f"OK fault-add id={d['id']} action={d['action']} queue={d['queue']}"

    def _fault_remove(self, args: list[str]) -> tuple[list[str], str]:
        if len(args) != 1:
            raise PeerError("usage: fault remove ID")
        engine = self._engine()
        rule = next((r for r in engine.rules() if r.id == args[0]), None)
        hits = rule.hits if rule is not None else None
        if not engine.remove(args[0]):
            raise PeerError(f"no rule or device fault {args[0]!r}")
        return [], f"OK fault-remove id={args[0]}" + (f" hits={hits}" if hits is not None else "")

    def _fault_list(self, args: list[str]) -> tuple[list[str], str]:
        rules = self._engine().rules()
        lines = []
        for r in rules:
            d = r.describe()
            lines.append(
                f"{d['id']} action={d['action']} queue={d['queue']} "
                f"seen={d['seen']} hits={d['hits']}"
            )
        return lines, f"OK fault-list rules={len(rules)}"

    def _fault_clear(self, args: list[str]) -> tuple[list[str], str]:
        engine = self._engine()
        n = len(engine.rules())
        engine.clear()
        return [], f"OK fault-clear removed={n}"


__all__ = ["HOST_MAC", "PeerError", "ScriptPeer", "is_peer_line"]
