"""Data-plane fault actions: what a rule does to a packet it matched.

An action gets the packet index (the hook owns it) and returns the packets that continue
down the hook chain in its place: ``[]`` when it dropped (freed) or held the packet,
``[new]`` when it replaced it with a modified copy, several for duplicates.  Held packets
go back to the NIC later through ``ActionContext.release`` (``inject_tx``/``inject_rx``,
which bypass the hooks, so a delayed frame is not delayed twice).

Modified frames are new pool packets (``packet_from_bytes``) rather than edits in place:
the pool API we rely on gives copies, and a failed allocation just leaves the frame as it
was and is logged (``alloc_failed``), instead of corrupting accounting.

Capture: the NIC writes one record per frame at its fate.  An action that modifies, holds
or duplicates a frame attaches its event's comment to the packet (``VirtioNet.annotate``);
one that drops a frame writes the frame's record itself, with the comment, then frees it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdev.abi import lib
from vdev.faults.events import FROM_GUEST, TO_GUEST
from vdev.skywalk.errors import PoolError

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet


@dataclass
class ActionContext:
    """Everything an action may touch for one packet: built by the engine per hook call."""

    nic: VirtioNet
    index: int  # virtqueue index (even RX, odd TX)
    tx: bool
    rule: str
    rng: random.Random
    now: Callable[[], float]
    call_later: Callable[[float, Callable[[], None]], None]
    emit: Callable[..., Any]
    release: Callable[[list[int]], None]
    emitted: int = 0  # events emitted through this context (a rule counts a hit when > 0)

    @property
    def direction(self) -> int:
        return FROM_GUEST if self.tx else TO_GUEST

    def event(
        self, kind: str, frame: bytes | None, *, pkt: int | None = None, **detail: Any
    ) -> str:
        """Log one fault; returns its capture comment, also attached to ``pkt`` if given."""
        self.emitted += 1
        ev = self.emit(
            kind, rule=self.rule, nic=self.nic.name, queue=self.index, frame=frame, **detail
        )
        comment = str(ev.comment())
        if pkt is not None:
            self.nic.annotate(pkt, comment)
        return comment

    def drop(self, pkt: int, kind: str, reason: str) -> None:
        """Drop ``pkt`` by this rule: log it, count it, record the frame once, free it."""
        frame = self.nic.pool.packet_bytes(pkt)
        comment = self.event(kind, frame)
        self.nic.stats[self.index].drop(reason)
        self.nic.record(pkt, self.direction, comment, frame)
        self.nic.pool.free_packets([pkt])

    def replace(self, pkt: int, frame: bytes, *, clear_offload: bool = False) -> int | None:
        """A new packet holding ``frame`` (same vnet header) in place of ``pkt``, with its
        capture notes; None (``pkt`` left as it was, the failure noted on it) if the pool
        cannot hold it."""
        pool = self.nic.pool
        vnet = pool.packet_vnet(pkt)
        if clear_offload and vnet is not None:
            # A shortened frame cannot keep checksum/GSO offsets that may point past its end.
            vnet = bytes([vnet[0] & ~lib.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0]) + vnet[2:]
        try:
            new = pool.packet_from_bytes(frame, vnet)
        except PoolError as exc:
            self.event("alloc_failed", None, pkt=pkt, error=str(exc))
            return None
        if new is None:
            self.event("alloc_failed", None, pkt=pkt, error="pool exhausted")
            return None
        self.nic.pass_notes(pkt, new)
        pool.free_packets([pkt])
        return new

    def modify(
        self, pkt: int, frame: bytes, kind: str, *, clear_offload: bool = False, **detail: Any
    ) -> list[int]:
        """Put ``frame`` in place of ``pkt``; the packet that goes on carries the note."""
        comment = self.event(kind, frame, **detail)
        new = self.replace(pkt, frame, clear_offload=clear_offload)
        if new is None:
            return [pkt]
        self.nic.annotate(new, comment)
        return [new]


class Action:
    """Base class of data-plane actions."""

    name = "action"

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        raise NotImplementedError

    def tick(self, ctx: ActionContext) -> list[int]:
        """Called after every packet that passed the rule (matched or not)."""
        return []

    def flush(self) -> None:
        """The rule is being removed: release whatever is held."""

    def held(self) -> int:
        return 0

    def params(self) -> dict[str, Any]:
        return {}


class Drop(Action):
    name = "drop"

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        ctx.drop(pkt, "drop", "fault")
        return []


@dataclass
class Corrupt(Action):
    """Flip ``flips`` random bits, or XOR ``mask`` into the bytes at ``offsets``."""

    flips: int = 1
    offsets: tuple[int, ...] = ()
    mask: int = 0x01
    skip: int = 0  # leave the first ``skip`` bytes alone (e.g. 14: keep the Ethernet header)
    name = "corrupt"

    def __post_init__(self) -> None:
        if self.flips < 1:
            raise ValueError(f"flips: {self.flips} must be >= 1")
        if not 1 <= self.mask <= 0xFF:
            raise ValueError(f"mask: {self.mask} must be a byte 1-255")
        if any(o < 0 for o in self.offsets) or self.skip < 0:
            raise ValueError("offsets and skip must be >= 0")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        data = bytearray(ctx.nic.pool.packet_bytes(pkt))
        flipped: list[list[int]] = []
        if self.offsets:
            for off in self.offsets:
                if off < len(data):
                    data[off] ^= self.mask
                    flipped.append([off, self.mask])
        elif len(data) > self.skip:
            for _ in range(self.flips):
                off = ctx.rng.randrange(self.skip, len(data))
                bit = 1 << ctx.rng.randrange(8)
                data[off] ^= bit
                flipped.append([off, bit])
        return ctx.modify(pkt, bytes(data), "corrupt", flipped=flipped)

    def params(self) -> dict[str, Any]:
        d: dict[str, Any] = {"flips": self.flips, "skip": self.skip}
        if self.offsets:
            d.update(offsets=list(self.offsets), mask=self.mask)
        return d


@dataclass
class Truncate(Action):
    """Cut the frame to ``length`` bytes (checksum/GSO offload flags are cleared)."""

    length: int = 14
    name = "truncate"

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"length: {self.length} must be >= 0")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        frame = ctx.nic.pool.packet_bytes(pkt)
        if len(frame) <= self.length:
            return [pkt]
        return ctx.modify(pkt, frame[: self.length], "truncate", clear_offload=True, was=len(frame))

    def params(self) -> dict[str, Any]:
        return {"length": self.length}


@dataclass
class Pad(Action):
    """Append ``nbytes`` of ``fill`` (or grow to ``to`` bytes, e.g. beyond the MTU)."""

    nbytes: int = 0
    fill: int = 0
    to: int | None = None
    over_mtu: int | None = None  # grow to nic.mtu + 14 + over_mtu: a frame over the MTU
    name = "pad"

    def __post_init__(self) -> None:
        if self.nbytes < 0 or not 0 <= self.fill <= 0xFF:
            raise ValueError("pad: bytes must be >= 0 and fill a byte 0-255")
        if self.nbytes == 0 and self.to is None and self.over_mtu is None:
            raise ValueError("pad: give bytes, to or over_mtu")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        frame = ctx.nic.pool.packet_bytes(pkt)
        target = len(frame) + self.nbytes
        if self.to is not None:
            target = max(target, self.to)
        if self.over_mtu is not None:
            target = max(target, ctx.nic.mtu + 14 + self.over_mtu)
        if target <= len(frame):
            return [pkt]
        grown = frame + bytes([self.fill]) * (target - len(frame))
        kind = "oversize" if self.over_mtu is not None else "pad"
        return ctx.modify(pkt, grown, kind, was=len(frame))

    def params(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bytes": self.nbytes, "fill": self.fill}
        if self.to is not None:
            d["to"] = self.to
        if self.over_mtu is not None:
            d["over_mtu"] = self.over_mtu
        return d


@dataclass
class Duplicate(Action):
    """Send the frame ``copies`` more times, right behind the original."""

    copies: int = 1
    name = "duplicate"

    def __post_init__(self) -> None:
        if not 1 <= self.copies <= 64:
            raise ValueError(f"copies: {self.copies} must be 1-64")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        pool = ctx.nic.pool
        frame = pool.packet_bytes(pkt)
        vnet = pool.packet_vnet(pkt)
        out = [pkt]
        for _ in range(self.copies):
            dup = pool.packet_from_bytes(frame, vnet)
            if dup is None:
                ctx.event("alloc_failed", None, pkt=pkt, error="pool exhausted")
                break
            ctx.nic.pass_notes(pkt, dup, keep=True)  # what happened before, e.g. a corruption
            out.append(dup)
        comment = ctx.event("duplicate", frame, pkt=pkt, copies=len(out) - 1)
        for k, dup in enumerate(out[1:], 1):
            ctx.nic.annotate(dup, f"{comment} copy={k}")
        return out

    def params(self) -> dict[str, Any]:
        return {"copies": self.copies}


@dataclass
class _Held:
    pkt: int
    remaining: int
    release: Callable[[list[int]], None]


@dataclass
class Reorder(Action):
    """Hold the frame back and let it go after ``after`` later frames have passed.

    Held frames are released in the same batch when possible (so the guest sees them right
    behind the N-th successor); ``timeout`` seconds after being held a frame goes anyway,
    so a quiet link does not keep it forever.
    """

    after: int = 1
    timeout: float = 1.0
    name = "reorder"
    _held: list[_Held] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.after < 1:
            raise ValueError(f"after: {self.after} must be >= 1")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        ctx.event("reorder", ctx.nic.pool.packet_bytes(pkt), pkt=pkt, after=self.after)
        entry = _Held(pkt, self.after + 1, ctx.release)  # +1: tick() runs for this one too
        self._held.append(entry)

        def expire() -> None:
            if entry in self._held:
                self._held.remove(entry)
                entry.release([entry.pkt])

        ctx.call_later(self.timeout, expire)
        return []

    def tick(self, ctx: ActionContext) -> list[int]:
        out: list[int] = []
        for entry in list(self._held):
            entry.remaining -= 1
            if entry.remaining <= 0:
                self._held.remove(entry)
                out.append(entry.pkt)
        return out

    def flush(self) -> None:
        held, self._held = self._held, []
        for entry in held:
            entry.release([entry.pkt])

    def held(self) -> int:
        return len(self._held)

    def params(self) -> dict[str, Any]:
        return {"after": self.after, "timeout": self.timeout}


@dataclass
class Delay(Action):
    """Hold the frame ``ms`` milliseconds (plus uniform jitter in [-jitter_ms, +jitter_ms]).

    Jitter can reorder frames, as on a real path; each frame gets one seeded draw.
    """

    ms: float = 10.0
    jitter_ms: float = 0.0
    name = "delay"
    _held: dict[int, Callable[[list[int]], None]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay: ms and jitter_ms must be >= 0")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        jitter = ctx.rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        wait = max(0.0, self.ms + jitter) / 1000.0
        ctx.event("delay", ctx.nic.pool.packet_bytes(pkt), pkt=pkt, ms=round(wait * 1000, 3))
        self._held[pkt] = ctx.release

        def due() -> None:
            release = self._held.pop(pkt, None)
            if release is not None:
                release([pkt])

        ctx.call_later(wait, due)
        return []

    def flush(self) -> None:
        held, self._held = self._held, {}
        for pkt, release in held.items():
            release([pkt])

    def held(self) -> int:
        return len(self._held)

    def params(self) -> dict[str, Any]:
        return {"ms": self.ms, "jitter_ms": self.jitter_ms}


@dataclass
class RateLimit(Action):
    """Token-bucket policer: frames beyond ``pps`` packets/s or ``bps`` bytes/s are dropped.

    Buckets start full (``burst`` packets, ``burst_bytes`` bytes; default one second's
    worth) and refill from the engine clock, so a fake clock gives exact counts.
    """

    pps: float | None = None
    bps: float | None = None
    burst: float | None = None
    burst_bytes: float | None = None
    name = "rate_limit"
    _pkt_tokens: float = field(default=-1.0, repr=False)
    _byte_tokens: float = field(default=-1.0, repr=False)
    _last: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pps is None and self.bps is None:
            raise ValueError("rate_limit: give pps and/or bps")
        if (self.pps is not None and self.pps <= 0) or (self.bps is not None and self.bps <= 0):
            raise ValueError("rate_limit: pps and bps must be > 0")

    def apply(self, ctx: ActionContext, pkt: int) -> list[int]:
        now = ctx.now()
        cap_p = self.burst if self.burst is not None else (self.pps or 0.0)
        cap_b = self.burst_bytes if self.burst_bytes is not None else (self.bps or 0.0)
        if self._last is None:
            self._pkt_tokens, self._byte_tokens = cap_p, cap_b
        else:
            dt = max(0.0, now - self._last)
            if self.pps is not None:
                self._pkt_tokens = min(cap_p, self._pkt_tokens + dt * self.pps)
            if self.bps is not None:
                self._byte_tokens = min(cap_b, self._byte_tokens + dt * self.bps)
        self._last = now
        size = ctx.nic.pool.packet_len(pkt)
        ok_p = self.pps is None or self._pkt_tokens >= 1.0
        ok_b = self.bps is None or self._byte_tokens >= size
        if ok_p and ok_b:
            if self.pps is not None:
                self._pkt_tokens -= 1.0
            if self.bps is not None:
                self._byte_tokens -= size
            return [pkt]
        ctx.drop(pkt, "rate_limit", "fault_rate_limit")
        return []

    def params(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for k in ("pps", "bps", "burst", "burst_bytes"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


__all__ = [
    "Action",
    "ActionContext",
    "Corrupt",
    "Delay",
    "Drop",
    "Duplicate",
    "Pad",
    "RateLimit",
    "Reorder",
    "Truncate",
]
