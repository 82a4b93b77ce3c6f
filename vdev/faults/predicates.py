"""Match predicates: which packets (or used elements, or interrupts) a fault rule applies to.

A predicate is a small object with ``test(pkt, state) -> bool``.  Filters (byte pattern,
ethertype, IP protocol, port, time window) look only at the frame and the clock; selectors
(nth, every k-th, probability, Gilbert-Elliott) keep counters or draw from the rule's own
seeded ``random.Random``, so the same seed and the same traffic always select the same
packets.  Predicates compose with ``&``, ``|`` and ``~`` and describe themselves as plain
dicts so the control socket and scenario reports can show them.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Any

IP_PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "icmpv6": 58, "sctp": 132}
ETHERTYPES = {"ipv4": 0x0800, "arp": 0x0806, "vlan": 0x8100, "ipv6": 0x86DD, "lldp": 0x88CC}


class PacketInfo:
    """One frame as predicates see it; headers are parsed once, lazily, from a copy.

    ``frame`` is None for ring and interrupt rules, which match on counters only.
    """

    def __init__(self, frame: bytes | None, now: float) -> None:
        self.frame = frame
        self.now = now
        self._parsed = False
        self._ethertype: int | None = None
        self._l3 = 0
        self._proto: int | None = None
        self._l4 = 0

    @property
    def length(self) -> int:
        return len(self.frame) if self.frame is not None else 0

    def _parse(self) -> None:
        if self._parsed:
            return
        self._parsed = True
        f = self.frame
        if f is None or len(f) < 14:
            return
        off = 12
        etype = struct.unpack_from("!H", f, off)[0]
        # Skip 802.1Q / 802.1ad tags: the interesting ethertype is the inner one.
        while etype in (0x8100, 0x88A8) and len(f) >= off + 6:
            off += 4
            etype = struct.unpack_from("!H", f, off)[0]
        self._ethertype = etype
        self._l3 = off + 2
        if etype == 0x0800 and len(f) >= self._l3 + 20:
            ihl = (f[self._l3] & 0x0F) * 4
            self._proto = f[self._l3 + 9]
            self._l4 = self._l3 + ihl
        elif etype == 0x86DD and len(f) >= self._l3 + 40:
            self._proto = f[self._l3 + 6]
            self._l4 = self._l3 + 40

    @property
    def ethertype(self) -> int | None:
        self._parse()
        return self._ethertype

    @property
    def ip_proto(self) -> int | None:
        self._parse()
        return self._proto

    def ports(self) -> tuple[int, int] | None:
        """(source, destination) of a TCP/UDP/SCTP frame, None for anything else."""
        self._parse()
        f = self.frame
        if f is None or self._proto not in (6, 17, 132) or len(f) < self._l4 + 4:
            return None
        sport, dport = struct.unpack_from("!HH", f, self._l4)
        return int(sport), int(dport)


@dataclass
class MatchState:
    """Per-rule state predicates may read: the seeded RNG, candidates seen, install time."""

    rng: random.Random
    seen: int = 0  # candidates that passed the filters, including the current one (1-based)
    installed_at: float = 0.0


class Predicate:
    """Base class: subclasses implement ``test`` and ``describe``."""

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    #: Filters only need the frame; selectors count or draw and run after the filters.
    is_filter = False
    #: Needs the frame bytes (refused on ring/interrupt rules).
    needs_frame = False

    def __and__(self, other: Predicate) -> Predicate:
        return All([self, other])

    def __or__(self, other: Predicate) -> Predicate:
        return Any_([self, other])

    def __invert__(self) -> Predicate:
        return Not(self)


@dataclass
class _Combination(Predicate):
    parts: list[Predicate]

    def __post_init__(self) -> None:
        self.needs_frame = any(p.needs_frame for p in self.parts)
        # A combination counts as a filter only if it has no counters/randomness in it.
        self.is_filter = all(p.is_filter for p in self.parts)


@dataclass
class All(_Combination):
    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        # Evaluate every part: stateful selectors (Gilbert-Elliott) advance the same way
        # whatever the others say, which keeps outcomes independent of operand order.
        results = [p.test(pkt, state) for p in self.parts]
        return all(results)

    def describe(self) -> dict[str, Any]:
        return {"all": [p.describe() for p in self.parts]}


@dataclass
class Any_(_Combination):
    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        results = [p.test(pkt, state) for p in self.parts]
        return any(results)

    def describe(self) -> dict[str, Any]:
        return {"any": [p.describe() for p in self.parts]}


@dataclass
class Not(Predicate):
    inner: Predicate

    def __post_init__(self) -> None:
        self.needs_frame = self.inner.needs_frame
        self.is_filter = self.inner.is_filter

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return not self.inner.test(pkt, state)

    def describe(self) -> dict[str, Any]:
        return {"not": self.inner.describe()}


# -- selectors (counters and seeded randomness) ------------------------------------------


@dataclass
class Nth(Predicate):
    """The n-th candidate (1-based), or each of several n."""

    ns: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.ns or any(n < 1 for n in self.ns):
            raise ValueError(f"nth: {list(self.ns)} must be packet numbers >= 1")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return state.seen in self.ns

    def describe(self) -> dict[str, Any]:
        return {"nth": list(self.ns) if len(self.ns) > 1 else self.ns[0]}


@dataclass
class EveryK(Predicate):
    """Every k-th candidate: the k-th, 2k-th, ... (``offset`` shifts the phase)."""

    k: int
    offset: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"every: {self.k} must be >= 1")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return (state.seen - self.offset) % self.k == 0 and state.seen > self.offset

    def describe(self) -> dict[str, Any]:
        return {"every": self.k}


@dataclass
class Probability(Predicate):
    """Each candidate independently with probability ``p`` (one draw per candidate)."""

    p: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p: {self.p} is not a probability in [0, 1]")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return state.rng.random() < self.p

    def describe(self) -> dict[str, Any]:
        return {"p": self.p}


@dataclass
class GilbertElliott(Predicate):
    """Bursty loss: a two-state Markov chain (Good/Bad) with a loss rate per state.

    Per candidate: first decide loss in the current state, then move (Good->Bad with
    ``p_gb``, Bad->Good with ``p_bg``).  Two draws per candidate, always, so the stream of
    random numbers does not depend on the outcome.
    """

    p_gb: float
    p_bg: float
    loss_good: float = 0.0
    loss_bad: float = 1.0
    bad: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("p_gb", "p_bg", "loss_good", "loss_bad"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"gilbert.{name}: {v} is not a probability in [0, 1]")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        loss = state.rng.random() < (self.loss_bad if self.bad else self.loss_good)
        move = state.rng.random()
        self.bad = move >= self.p_bg if self.bad else move < self.p_gb
        return loss

    def describe(self) -> dict[str, Any]:
        return {
            "gilbert": {
                "p_gb": self.p_gb,
                "p_bg": self.p_bg,
                "loss_good": self.loss_good,
                "loss_bad": self.loss_bad,
            }
        }


# -- filters (frame contents and time) -----------------------------------------------------


@dataclass
class BytePattern(Predicate):
    """Frames containing ``pattern`` (at ``offset`` when given, else anywhere)."""

    pattern: bytes
    offset: int | None = None
    is_filter = True
    needs_frame = True

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("pattern: must not be empty")
        if self.offset is not None and self.offset < 0:
            raise ValueError(f"offset: {self.offset} must be >= 0")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        f = pkt.frame
        if f is None:
            return False
        if self.offset is None:
            return self.pattern in f
        return f[self.offset : self.offset + len(self.pattern)] == self.pattern

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern.hex()}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


@dataclass
class Ethertype(Predicate):
    """Frames whose (inner, past VLAN tags) ethertype is ``value``."""

    value: int
    is_filter = True
    needs_frame = True

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return pkt.ethertype == self.value

    def describe(self) -> dict[str, Any]:
        return {"ethertype": self.value}


@dataclass
class IpProto(Predicate):
    """IPv4/IPv6 frames carrying protocol ``value`` (IPv6: the first next-header)."""

    value: int
    is_filter = True
    needs_frame = True

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        return pkt.ip_proto == self.value

    def describe(self) -> dict[str, Any]:
        return {"ip_proto": self.value}


@dataclass
class L4Port(Predicate):
    """TCP/UDP frames with ``port`` as source, destination or either (``side``)."""

    port: int
    side: str = "any"  # "src", "dst" or "any"
    is_filter = True
    needs_frame = True

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port: {self.port} is not a 16-bit port")
        if self.side not in ("src", "dst", "any"):
            raise ValueError(f"port side {self.side!r} must be src, dst or any")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        ports = pkt.ports()
        if ports is None:
            return False
        if self.side == "src":
            return ports[0] == self.port
        if self.side == "dst":
            return ports[1] == self.port
        return self.port in ports

    def describe(self) -> dict[str, Any]:
        key = {"any": "port", "src": "sport", "dst": "dport"}[self.side]
        return {key: self.port}


@dataclass
class TimeWindow(Predicate):
    """Only between ``start`` and ``end`` seconds after the rule was installed."""

    start: float
    end: float | None = None
    is_filter = True

    def __post_init__(self) -> None:
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"window: [{self.start}, {self.end}] is not a time window")

    def test(self, pkt: PacketInfo, state: MatchState) -> bool:
        t = pkt.now - state.installed_at
        return t >= self.start and (self.end is None or t < self.end)

    def describe(self) -> dict[str, Any]:
        return {"window": [self.start, self.end]}


def parse_ip_proto(value: object) -> int:
    """An IP protocol number from 17 or "udp" (names from a fixed table, nothing looked up)."""
    if isinstance(value, str):
        if value.lower() not in IP_PROTOCOLS:
            raise ValueError(
                f"ip_proto: unknown protocol {value!r} (known: {sorted(IP_PROTOCOLS)})"
            )
        return IP_PROTOCOLS[value.lower()]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        return value
    raise ValueError(f"ip_proto: {value!r} is not a protocol number 0-255 or a name")


def parse_ethertype(value: object) -> int:
    """An ethertype from 0x0800, "0x0800" or "ipv4"."""
    if isinstance(value, str):
        name = value.lower()
        if name in ETHERTYPES:
            return ETHERTYPES[name]
        try:
            value = int(name, 16)
        except ValueError:
            raise ValueError(f"ethertype: {value!r} is not a number or a known name") from None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        return value
    raise ValueError(f"ethertype: {value!r} is not a 16-bit ethertype")


__all__ = [
    "All",
    "Any_",
    "BytePattern",
    "Ethertype",
    "EveryK",
    "GilbertElliott",
    "IpProto",
    "L4Port",
    "MatchState",
    "Not",
    "Nth",
    "PacketInfo",
    "Predicate",
    "Probability",
    "TimeWindow",
    "parse_ethertype",
    "parse_ip_proto",
]
