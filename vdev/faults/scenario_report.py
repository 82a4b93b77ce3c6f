"""The verdict of one scenario run: what ``vdev run --scenario`` prints (text or JSON).

A report says what happened, not only what was expected: every rule with its hits (a
rule that never fired fails the run unless the scenario marked it optional), every step,
every expectation, the traffic each flow carried from both ends, the liveness check, and
the device's own counters for the run (per NIC and queue: frames, bytes, drops by reason,
kills; the pool's in-use, high water and allocation failures).  An interrupted run still
reports what happened until the interrupt, and fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C


@dataclass
class StepResult:
    index: int
    do: str
    t: float
    ok: bool
    detail: str = ""


@dataclass
class ExpectResult:
    name: str
    ok: bool
    value: Any
    detail: str


@dataclass
class LivenessResult:
    """``expect``: recovers / breaks / none; ``checked`` False when it could not run."""

    expect: str
    ok: bool
    checked: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return vars(self).copy()


@dataclass
class Report:
    """What ``vdev run --scenario`` prints; ``ok`` False means exit non-zero."""

    name: str
    seed: int | str
    duration: float
    rules: list[dict[str, Any]]
    steps: list[StepResult]
    expects: list[ExpectResult]
    events: dict[str, int]
    error: str | None = None
    traffic: list[dict[str, Any]] = field(default_factory=list)
    liveness: LivenessResult | None = None
    device: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.interrupted
            and all(s.ok for s in self.steps)
            and all(e.ok for e in self.expects)
            and (self.liveness is None or self.liveness.ok)
        )

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED_EXIT
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "interrupted": self.interrupted,
            "seed": self.seed,
            "duration": round(self.duration, 3),
            "error": self.error,
            "rules": self.rules,
            "steps": [vars(s) for s in self.steps],
            "expects": [vars(e) for e in self.expects],
            "traffic": self.traffic,
            "liveness": None if self.liveness is None else self.liveness.as_dict(),
            "events": self.events,
            "device": self.device,
        }

    def format(self) -> str:
        verdict = "INTERRUPTED" if self.interrupted else ("PASS" if self.ok else "FAIL")
        lines = [f"scenario {self.name}: {verdict} (seed {self.seed}, {self.duration:.1f} s)"]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append("  rules:")
        for r in self.rules:
            opt = " optional" if r.get("optional") else ""
            lines.append(
                f"    {r['id']:12} {r['action']:16} {r.get('queue', ''):6} "
                f"hits={r['hits']:<6} seen={r.get('seen', 0)}{opt}"
            )
        lines.append("  steps:")
        for s in self.steps:
            mark = "ok  " if s.ok else "FAIL"
            lines.append(f"    {mark} {s.index:3} t={s.t:7.3f} {s.do} {s.detail}".rstrip())
        if self.expects:
            lines.append("  expectations:")
            for e in self.expects:
                lines.append(f"    {'ok  ' if e.ok else 'FAIL'} {e.name}: {e.detail}")
        if self.traffic:
            lines.append("  traffic:")
            for t in self.traffic:
                lines.append(f"    {t['text']}")
        if self.liveness is not None:
            lv = self.liveness
            mark = "ok  " if lv.ok else "FAIL"
            lines.append(f"  liveness: {mark} {lv.expect}: {lv.detail}")
        if self.device:
            lines.extend("  " + ln for ln in format_device(self.device))
        if self.events:
            lines.append(
                "  events: " + " ".join(f"{k}={v}" for k, v in sorted(self.events.items()))
            )
        return "\n".join(lines)


# -- device counters ------------------------------------------------------------------------

_QUEUE_COUNTERS = ("frames", "bytes", "drops", "notifications", "merged")


def _delta_map(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def device_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the device counted during the run: ``after - before`` for counters, ``after``
    for levels (pool in_use, high_water, link state).  Both are ``Device.stats()``."""
    old_nics = {n["name"]: n for n in before.get("nics", [])}
    nics = []
    for nic in after.get("nics", []):
        old = old_nics.get(nic["name"], {})
        queues = {}
        for qname, q in nic.get("queues", {}).items():
            oq = old.get("queues", {}).get(qname, {})
            entry: dict[str, Any] = {k: q.get(k, 0) - oq.get(k, 0) for k in _QUEUE_COUNTERS}
            entry["drop_reasons"] = _delta_map(
                q.get("drop_reasons", {}), oq.get("drop_reasons", {})
            )
            entry["kills"] = _delta_map(q.get("kills", {}), oq.get("kills", {}))
            queues[qname] = entry
        nics.append(
            {
                "name": nic["name"],
                "link_up": nic.get("link_up"),
                "connections": nic.get("connections", 0) - old.get("connections", 0),
                "queues": queues,
            }
        )
    pool, old_pool = after.get("pool", {}), before.get("pool", {})
    return {
        "nics": nics,
        "pool": {
            "in_use": pool.get("in_use"),
            "high_water": pool.get("high_water"),
            "num_packets": pool.get("num_packets"),
            "alloc_failures": pool.get("alloc_failures", 0) - old_pool.get("alloc_failures", 0),
        },
        "responder": _delta_map(after.get("responder", {}), before.get("responder", {})),
    }


def format_device(device: dict[str, Any]) -> list[str]:
    """The device block of the text report: one line per queue, then pool and responder."""
    lines = ["device (this run):"]
    for nic in device.get("nics", []):
        for qname, q in nic["queues"].items():
            notes = [f"{k}={v}" for k, v in sorted(q["drop_reasons"].items())]
            notes += [f"kill {k}={v}" for k, v in sorted(q["kills"].items())]
            why = f" ({' '.join(notes)})" if notes else ""
            lines.append(
                f"  {nic['name']} {qname}: frames={q['frames']} bytes={q['bytes']} "
                f"drops={q['drops']}{why} irqs={q['notifications']}"
            )
        lines.append(
            f"  {nic['name']}: link {'up' if nic['link_up'] else 'down'}, "
            f"{nic['connections']} new vhost-user connection(s)"
        )
    pool = device.get("pool", {})
    if pool:
        lines.append(
            f"  pool: in_use={pool['in_use']} high_water={pool['high_water']} "
            f"alloc_failures={pool['alloc_failures']} (of {pool['num_packets']} packets)"
        )
    resp = device.get("responder", {})
    if resp:
        lines.append("  responder: " + " ".join(f"{k}={v}" for k, v in sorted(resp.items())))
    return lines


__all__ = [
    "INTERRUPTED_EXIT",
    "ExpectResult",
    "LivenessResult",
    "Report",
    "StepResult",
    "device_delta",
    "format_device",
]
