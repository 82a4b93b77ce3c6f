"""Fault rules: a queue selector, match predicates, one action, a seeded RNG and counters.

A ``Rule`` is what the Python API returns, the control socket lists and a scenario adds.
It is also a context manager (``with nic_faults.drop(p=0.1): ...`` removes it on exit),
and it counts ``seen`` (candidates that passed its filters) and ``hits`` (faults it
actually injected; ``limit`` caps them).

``build_rule(spec)`` turns a plain mapping (Python keyword arguments, a JSON control
request, a TOML table) into a rule.  The same keys everywhere, validated strictly: an
unknown key, a wrong type or a bad value raises ``SpecError`` naming the key.  Nothing in a
spec is ever evaluated: values are numbers, strings, booleans and lists, mapped through
fixed tables.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vdev.errors import VdevError
from vdev.faults import actions as A
from vdev.faults import features as F
from vdev.faults import predicates as P
from vdev.faults import ring as R

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet


class SpecError(VdevError, ValueError):
    """A rule/step specification is invalid; ``key`` names the offending key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class QueueSel:
    """Which virtqueues a rule covers: directions and, optionally, one queue pair."""

    tx: bool
    rx: bool
    pair: int | None = None

    def covers(self, index: int) -> bool:
        is_tx = index % 2 == 1
        if (is_tx and not self.tx) or (not is_tx and not self.rx):
            return False
        return self.pair is None or index // 2 == self.pair

    def __str__(self) -> str:
        d = "both" if self.tx and self.rx else ("tx" if self.tx else "rx")
        return d if self.pair is None else f"{d}{self.pair}"


def parse_queue(value: object) -> QueueSel:
    """ "tx", "rx", "both", "tx0", "rx1" or a virtqueue index (even RX, odd TX)."""
    if isinstance(value, bool):
        raise SpecError(f"queue: {value!r} is not a queue name or index", "queue")
    if isinstance(value, int):
        if not 0 <= value < 16:
            raise SpecError(f"queue: index {value} is not a virtqueue 0-15", "queue")
        return QueueSel(tx=value % 2 == 1, rx=value % 2 == 0, pair=value // 2)
    if isinstance(value, str):
        v = value.lower()
        for prefix, sel in (("both", (True, True)), ("tx", (True, False)), ("rx", (False, True))):
            if v.startswith(prefix):
                rest = v[len(prefix) :]
                if rest == "":
                    return QueueSel(*sel)
                if rest.isdigit() and int(rest) < 8:
                    return QueueSel(*sel, pair=int(rest))
    raise SpecError(f"queue: {value!r} must be tx, rx, both, tx<N>, rx<N> or an index", "queue")


class Rule:
    """One installed (or not yet installed) fault rule."""

    def __init__(
        self,
        action: A.Action | R.RingAction,
        *,
        queue: QueueSel,
        predicates: list[P.Predicate] | None = None,
        limit: int | None = None,
        seed: int | str | None = None,
        rule_id: str | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.action = action
        self.queue = queue
        self.predicates = predicates or []
        self.filters = [p for p in self.predicates if p.is_filter]
        self.selectors = [p for p in self.predicates if not p.is_filter]
        self.needs_frame = any(p.needs_frame for p in self.predicates)
        self.limit = limit
        self.seed = seed
        self.id = rule_id or ""
        self.spec = spec or {}
        self.hits = 0
        self.seen = 0
        self.state = P.MatchState(rng=random.Random(0))
        self.nic_name: str | None = None
        self.installed = False
        self._remover: Callable[[Rule], None] | None = None

    @property
    def kind(self) -> str:
        """Either "data" (packet actions) or the ring action kind: used, calls, stall, timer."""
        return "data" if isinstance(self.action, A.Action) else self.action.kind

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.hits >= self.limit

    def bind(self, rule_id: str, nic_name: str, seed: int | str, now: float) -> None:
        """Called by the engine on install: fixes the id, the RNG seed and the time origin."""
        self.id = self.id or rule_id
        self.nic_name = nic_name
        if self.seed is None:
            self.seed = seed
        # str seeds hash with SHA-512 in random.seed(): stable across runs and platforms.
        self.state = P.MatchState(rng=random.Random(str(self.seed)), installed_at=now)
        self.installed = True

    def select(self, pkt: P.PacketInfo) -> bool:
        """Filters first (no state), then count the candidate, then every selector."""
        if self.exhausted:
            return False
        for f in self.filters:
            if not f.test(pkt, self.state):
                return False
        self.seen += 1
        self.state.seen = self.seen
        results = [s.test(pkt, self.state) for s in self.selectors]
        return all(results)

    def process(
        self,
        nic: VirtioNet,
        index: int,
        pkts: list[int],
        make_ctx: Callable[[Rule], A.ActionContext],
    ) -> list[int]:
        """Run this data rule over one hook batch (packets in order, output in order)."""
        action = self.action
        assert isinstance(action, A.Action)
        ctx = make_ctx(self)
        out: list[int] = []
        for pkt in pkts:
            frame = nic.pool.packet_bytes(pkt) if self.needs_frame else None
            if self.select(P.PacketInfo(frame, ctx.now())):
                before = ctx.emitted
                out.extend(action.apply(ctx, pkt))
                if ctx.emitted > before:  # a no-op (frame already short...) is not a hit
                    self.hits += 1
            else:
                out.append(pkt)
            out.extend(action.tick(ctx))
        return out

    def remove(self) -> None:
        """Uninstall (held frames/elements are released, stalls end)."""
        if self._remover is not None:
            self._remover(self)

    def __enter__(self) -> Rule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        match: dict[str, Any] = {}
        for p in self.predicates:
            match.update(p.describe())
        d: dict[str, Any] = {
            "id": self.id,
            "nic": self.nic_name,
            "action": self.action.name,
            "kind": self.kind,
            "queue": str(self.queue),
            "match": match,
            "params": self.action.params(),
            "seed": self.seed,
            "limit": self.limit,
            "seen": self.seen,
            "hits": self.hits,
            "held": self.action.held() if isinstance(self.action, A.Action) else 0,
        }
        return d

    def __repr__(self) -> str:
        return f"Rule({self.id or '?'} {self.action.name} {self.queue} hits={self.hits})"


# -- building rules from plain data -------------------------------------------------------

COMMON_KEYS = {"id", "name", "action", "queue", "seed", "limit", "nic"}
MATCH_KEYS = {
    "nth",
    "every",
    "p",
    "gilbert",
    "pattern",
    "offset",
    "ethertype",
    "ip_proto",
    "port",
    "sport",
    "dport",
    "window",
}
FRAME_KEYS = {"pattern", "offset", "ethertype", "ip_proto", "port", "sport", "dport"}


def _num(spec: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    v = spec.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(f"{key}: {v!r} is not a number", key)
    return float(v)


def _int(spec: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    v = spec.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"{key}: {v!r} is not an integer", key)
    return v


def _req_num(spec: Mapping[str, Any], key: str, default: float) -> float:
    v = _num(spec, key, default)
    assert v is not None
    return v


def _req_int(spec: Mapping[str, Any], key: str, default: int) -> int:
    v = _int(spec, key, default)
    assert v is not None
    return v


def _bool(spec: Mapping[str, Any], key: str, default: bool) -> bool:
    v = spec.get(key, default)
    if not isinstance(v, bool):
        raise SpecError(f"{key}: {v!r} is not true/false", key)
    return v


def _str(spec: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    v = spec.get(key, default)
    if not isinstance(v, str) or v not in choices:
        raise SpecError(f"{key}: {v!r} must be one of {', '.join(choices)}", key)
    return v


def _int_list(spec: Mapping[str, Any], key: str) -> tuple[int, ...]:
    v = spec.get(key)
    items = v if isinstance(v, list | tuple) else [v]
    if not items or any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise SpecError(f"{key}: {v!r} is not an integer or a list of integers", key)
    return tuple(items)


def _pattern(v: object) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        try:
            return bytes.fromhex(v.replace(":", "").replace(" ", ""))
        except ValueError:
            raise SpecError(f"pattern: {v!r} is not hex bytes", "pattern") from None
    raise SpecError(f"pattern: {v!r} must be a hex string", "pattern")


def build_predicates(spec: Mapping[str, Any]) -> list[P.Predicate]:
    """Match predicates from the match keys of ``spec`` (filters before selectors)."""
    out: list[P.Predicate] = []
    try:
        if "pattern" in spec:
            out.append(P.BytePattern(_pattern(spec["pattern"]), _int(spec, "offset")))
        elif "offset" in spec:
            raise SpecError("offset: only meaningful with pattern", "offset")
        if "ethertype" in spec:
            out.append(P.Ethertype(P.parse_ethertype(spec["ethertype"])))
        if "ip_proto" in spec:
            out.append(P.IpProto(P.parse_ip_proto(spec["ip_proto"])))
        for key, side in (("port", "any"), ("sport", "src"), ("dport", "dst")):
            if key in spec:
                out.append(P.L4Port(_req_int(spec, key, 0), side))
        if "window" in spec:
            w = spec["window"]
            if (
                not isinstance(w, list | tuple)
                or len(w) != 2
                or not all(x is None or (isinstance(x, int | float) and x is not True) for x in w)
                or w[0] is None
            ):
                raise SpecError(f"window: {w!r} must be [start, end] seconds (end may be -1)")
            end = None if w[1] is None or w[1] < 0 else float(w[1])
            out.append(P.TimeWindow(float(w[0]), end))
        if "nth" in spec:
            out.append(P.Nth(_int_list(spec, "nth")))
        if "every" in spec:
            out.append(P.EveryK(_req_int(spec, "every", 1)))
        if "p" in spec:
            out.append(P.Probability(_req_num(spec, "p", 1.0)))
        if "gilbert" in spec:
            g = spec["gilbert"]
            if not isinstance(g, Mapping):
                raise SpecError("gilbert: must be a table {p_gb, p_bg, loss_good, loss_bad}")
            extra = set(g) - {"p_gb", "p_bg", "loss_good", "loss_bad"}
            if extra:
                raise SpecError(f"gilbert: unknown key {sorted(extra)[0]!r}", "gilbert")
            if "p_gb" not in g or "p_bg" not in g:
                raise SpecError("gilbert: p_gb and p_bg are required", "gilbert")
            out.append(
                P.GilbertElliott(
                    _req_num(g, "p_gb", 0),
                    _req_num(g, "p_bg", 0),
                    _req_num(g, "loss_good", 0.0),
                    _req_num(g, "loss_bad", 1.0),
                )
            )
    except SpecError:
        raise
    except ValueError as exc:
        key = str(exc).split(":", 1)[0].split(".", 1)[0]
        raise SpecError(str(exc), key if key in MATCH_KEYS else None) from None
    return out


# action name -> (allowed parameter keys, factory)
ActionFactory = Callable[[Mapping[str, Any]], A.Action | R.RingAction]


def _offsets(spec: Mapping[str, Any]) -> tuple[int, ...]:
    return _int_list(spec, "offsets") if "offsets" in spec else ()


ACTIONS: dict[str, tuple[set[str], ActionFactory]] = {
    "drop": (set(), lambda s: A.Drop()),
    "corrupt": (
        {"flips", "offsets", "mask", "skip"},
        lambda s: A.Corrupt(
            _req_int(s, "flips", 1), _offsets(s), _req_int(s, "mask", 1), _req_int(s, "skip", 0)
        ),
    ),
    "truncate": ({"length"}, lambda s: A.Truncate(_req_int(s, "length", 14))),
    "pad": (
        {"bytes", "fill", "to"},
        lambda s: A.Pad(_req_int(s, "bytes", 0), _req_int(s, "fill", 0), _int(s, "to")),
    ),
    "oversize": (
        {"over_mtu", "fill"},
        lambda s: A.Pad(0, _req_int(s, "fill", 0), None, _req_int(s, "over_mtu", 100)),
    ),
    "duplicate": ({"copies"}, lambda s: A.Duplicate(_req_int(s, "copies", 1))),
    "reorder": (
        {"after", "timeout"},
        lambda s: A.Reorder(_req_int(s, "after", 1), _req_num(s, "timeout", 1.0)),
    ),
    "delay": (
        {"ms", "jitter_ms"},
        lambda s: A.Delay(_req_num(s, "ms", 10.0), _req_num(s, "jitter_ms", 0.0)),
    ),
    "rate_limit": (
        {"pps", "bps", "burst", "burst_bytes"},
        lambda s: A.RateLimit(
            _num(s, "pps"), _num(s, "bps"), _num(s, "burst"), _num(s, "burst_bytes")
        ),
    ),
    # Ring level: the device misbehaving toward the driver.
    "stall": ({"seconds"}, lambda s: R.Stall(_num(s, "seconds"))),
    "out_of_order": ({"hold_ms"}, lambda s: R.OutOfOrder(_req_num(s, "hold_ms", 1.0))),
    "bad_used_id": (
        {"mode", "replace"},
        lambda s: R.BadUsedId(
            _str(s, "mode", "out_of_range", ("out_of_range", "not_outstanding")),
            _bool(s, "replace", False),
        ),
    ),
    "double_complete": (set(), lambda s: R.DoubleComplete()),
    "bad_used_len": (
        {"mode", "extra"},
        lambda s: R.BadUsedLen(
            _str(s, "mode", "huge", ("huge", "zero", "header")), _req_int(s, "extra", 4096)
        ),
    ),
    "bad_vnet_hdr": (
        {"mode", "value"},
        lambda s: R.BadVnetHdr(_str(s, "mode", "gso", R.VNET_MODES), _int(s, "value")),
    ),
    "delay_used": ({"ms"}, lambda s: R.DelayUsed(_req_num(s, "ms", 10.0))),
    "suppress_irq": (set(), lambda s: R.SuppressIrq()),
    "delay_irq": ({"ms"}, lambda s: R.DelayIrq(_req_num(s, "ms", 10.0))),
    "spurious_irq": (
        {"extra", "interval_ms"},
        lambda s: R.SpuriousIrq(_req_int(s, "extra", 1), _num(s, "interval_ms")),
    ),
    "ignore_event_idx": (set(), lambda s: R.IgnoreEventIdx()),
    # Feature negotiation (vdev/faults/features.py): the device inconsistent about its bits.
    "feature_offer": ({"bits", "clear"}, lambda s: F.build("feature_offer", s, _int_list)),
    "feature_withdraw": ({"bits"}, lambda s: F.build("feature_withdraw", s, _int_list)),
    "feature_assume": ({"bits"}, lambda s: F.build("feature_assume", s, _int_list)),
    "refuse_features": ({"when"}, lambda s: F.build("refuse_features", s, _int_list)),
}


def build_rule(spec: Mapping[str, Any]) -> Rule:
    """A rule from a plain mapping; raises SpecError naming the bad key."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"a rule must be a table/object, not {type(spec).__name__}")
    name = spec.get("action")
    if not isinstance(name, str):
        raise SpecError("action: missing (one of: " + ", ".join(sorted(ACTIONS)) + ")", "action")
    if name not in ACTIONS:
        raise SpecError(
            f"action: unknown action {name!r} (one of: {', '.join(sorted(ACTIONS))})", "action"
        )
    allowed, factory = ACTIONS[name]
    for key in spec:
        if not isinstance(key, str) or key not in COMMON_KEYS | MATCH_KEYS | set(allowed):
            raise SpecError(
                f"{key}: unknown key for action {name!r} (parameters: "
                f"{', '.join(sorted(allowed)) or 'none'}; match: {', '.join(sorted(MATCH_KEYS))})",
                str(key),
            )
    try:
        action = factory(spec)
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(f"{name}: {exc}", name) from None
    predicates = build_predicates(spec)
    is_ring = isinstance(action, R.RingAction)
    if is_ring:
        bad = FRAME_KEYS & set(spec)
        if bad:
            key = sorted(bad)[0]
            raise SpecError(f"{key}: ring/interrupt actions match on counters, not frames", key)
        if (
            isinstance(action, R.Stall | R.SpuriousIrq)
            and set(spec) & MATCH_KEYS
            and (isinstance(action, R.Stall) or action.interval_ms is not None)
        ):
            key = sorted(set(spec) & MATCH_KEYS)[0]
            raise SpecError(f"{key}: {name} is time-driven and takes no match keys", key)
        if isinstance(action, F.FeatureAction) and "queue" in spec:
            # A negotiation covers the whole device: a queue key would promise a scope
            # the fault does not have.
            raise SpecError(f"queue: {name} acts on the feature negotiation, not a queue", "queue")
    default_queue = "both"
    queue = parse_queue(spec.get("queue", default_queue))
    limit = _int(spec, "limit")
    if limit is not None and limit < 0:
        raise SpecError(f"limit: {limit} must be >= 0", "limit")
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | str)):
        raise SpecError(f"seed: {seed!r} must be an integer or a string", "seed")
    rid = spec.get("id", spec.get("name"))
    if rid is not None and (not isinstance(rid, str) or not rid or len(rid) > 64):
        raise SpecError(f"id: {rid!r} must be a non-empty string (<= 64 chars)", "id")
    return Rule(
        action,
        queue=queue,
        predicates=predicates,
        limit=limit,
        seed=seed,
        rule_id=rid,
        spec=dict(spec),
    )


__all__ = ["ACTIONS", "QueueSel", "Rule", "SpecError", "build_predicates", "build_rule"]
