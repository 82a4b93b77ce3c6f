"""Declarative fault scenarios: a TOML timeline of steps, rules and expectations.

Format (full reference in docs/faults.md; examples in scenarios/)::

    [scenario]
    name = "flaky-link"
    seed = 42              # engine seed: rule RNGs derive from it
    duration = 10.0        # run until t = 10 s even if the steps finish earlier (optional)

    [[rule]]               # installed at t = 0; same keys as the Python API
    id = "loss"
    action = "drop"
    queue = "rx"
    p = 0.05

    [[step]]
    at = 2.0               # or: after = 1.5 (since the previous step), after_packets = 100
    do = "link_down"
    nic = 0

    [[expect]]
    rule = "loss"
    min_hits = 1

``load_scenario(path)`` validates everything up front (unknown keys, wrong types, rule
specs, references to unknown rule ids) and raises ``ScenarioError`` with ``file:line``
naming the bad key.  ``play(scenario, device, console, qmp)`` runs the timeline against a
device and returns a ``Report`` with each rule's hit count and each expectation's verdict;
``report.ok`` is what ``vdev run --scenario`` turns into its exit status.  TOML values are
data only: nothing is evaluated or imported.
"""

from __future__ import annotations

import json
import re
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeGuard

from vdev.faults.engine import DeviceFault, FaultEngine
from vdev.faults.rules import Rule, SpecError, build_rule

if TYPE_CHECKING:
    from vdev.net.device import Device

TOP_KEYS = {"scenario", "rule", "step", "expect"}
SCENARIO_KEYS = {"name", "description", "seed", "duration", "timeout"}
TRIGGER_KEYS = {"at", "after", "after_packets", "direction", "nic", "timeout"}
STEP_KEYS: dict[str, set[str]] = {
    "add": {"rule"},
    "remove": {"id"},
    "clear": set(),
    "link_down": {"qmp", "qmp_name", "id"},
    "link_up": set(),
    "crash": set(),
    "shrink_pool": {"packets", "id"},
    "restore_pool": {"id"},
    "wait_console": {"pattern"},
    "sleep": {"seconds"},
    "expect": {"rule", "event", "stat", "min", "max", "min_hits", "max_hits", "equals"},
}
EXPECT_KEYS = {"rule", "event", "stat", "min", "max", "min_hits", "max_hits", "equals", "name"}


class ScenarioError(ValueError):
    """A scenario file is invalid: the message starts with ``file:line:`` when known."""


@dataclass
class Step:
    do: str
    index: int  # 1-based position among [[step]] tables
    at: float | None = None
    after: float | None = None
    after_packets: int | None = None
    packets: str = "both"  # which hook counts after_packets: tx, rx or both
    nic: int | str = 0
    timeout: float = 30.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Expect:
    index: int
    name: str
    rule: str | None = None
    event: str | None = None
    stat: str | None = None
    min: float | None = None
    max: float | None = None
    equals: Any = None


@dataclass
class Scenario:
    name: str
    path: str | None = None
    description: str = ""
    seed: int | str | None = None
    duration: float | None = None
    timeout: float = 300.0
    rules: list[dict[str, Any]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    expects: list[Expect] = field(default_factory=list)


class _Locator:
    """Best-effort line numbers for TOML tables and keys (tomllib does not report them)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def table(self, name: str, nth: int = 1) -> int | None:
        pat = re.compile(
            rf"^\s*\[\[\s*{re.escape(name)}\s*\]\]" if nth else rf"^\s*\[\s*{name}\s*\]"
        )
        seen = 0
        for i, line in enumerate(self.lines, 1):
            if pat.match(line):
                seen += 1
                if seen == max(nth, 1):
                    return i
        return None

    def key(self, table: str, nth: int, key: str | None) -> int | None:
        start = self.table(table, nth)
        if start is None or key is None:
            return start
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=|[{{,]\s*{re.escape(key)}\s*=")
        for i in range(start, len(self.lines)):
            line = self.lines[i]
            if i > start - 1 and re.match(r"^\s*\[", line):
                break
            if pat.search(line):
                return i + 1
        return start


class _Ctx:
    """Error context while validating one file."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.loc = _Locator(text)

    def error(self, table: str, nth: int, key: str | None, message: str) -> ScenarioError:
        line = self.loc.key(table, nth, key)
        where = f"{self.path}:{line}" if line else self.path
        what = f"{table}[{nth}]" if nth else f"[{table}]"
        return ScenarioError(f"{where}: {what}: {message}")


def _number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool)


def load_scenario(path: str | Path) -> Scenario:
    """Parse and validate a scenario file; ScenarioError names the file, line and key."""
    p = str(path)
    try:
        data = Path(p).read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # TOML 1.0 "Spec": a TOML file must be valid UTF-8
        line = data.count(b"\n", 0, exc.start) + 1
        raise ScenarioError(
            f"{p}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "TOML files must be UTF-8"
        ) from None
    return parse_scenario(text, p)


def parse_scenario(text: str, path: str = "<scenario>") -> Scenario:
    """Like ``load_scenario`` for TOML text already in memory."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        where = f"{path}:{m.group(1)}" if m else path
        raise ScenarioError(f"{where}: TOML syntax error: {exc}") from None
    ctx = _Ctx(path, text)
    for key in data:
        if key not in TOP_KEYS:
            line = next(
                (
                    i
                    for i, ln in enumerate(ctx.loc.lines, 1)
                    if re.match(rf"^\s*\[*\s*{re.escape(key)}\b", ln)
                ),
                None,
            )
            raise ScenarioError(
                f"{path}:{line or '?'}: {key}: unknown top-level key "
                f"(allowed: [scenario], [[rule]], [[step]], [[expect]])"
            )
    head = data.get("scenario", {})
    if not isinstance(head, dict):
        raise ctx.error("scenario", 0, None, "must be a table")
    for key in head:
        if key not in SCENARIO_KEYS:
            raise ctx.error(
                "scenario",
                0,
                key,
                f"{key}: unknown key (allowed: {', '.join(sorted(SCENARIO_KEYS))})",
            )
    sc = Scenario(name=str(head.get("name", Path(path).stem)), path=path)
    if "description" in head:
        if not isinstance(head["description"], str):
            raise ctx.error("scenario", 0, "description", "description: must be a string")
        sc.description = head["description"]
    seed = head.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | str)):
        raise ctx.error("scenario", 0, "seed", f"seed: {seed!r} must be an integer or a string")
    sc.seed = seed
    for key in ("duration", "timeout"):
        if key in head:
            v = head[key]
            if not _number(v) or v < 0:
                raise ctx.error("scenario", 0, key, f"{key}: {v!r} must be seconds >= 0")
            setattr(sc, key, float(v))

    known_ids: set[str] = set()
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        raise ctx.error("rule", 0, None, "use [[rule]] tables (an array of tables)")
    for i, spec in enumerate(rules, 1):
        _check_rule(ctx, "rule", i, spec, known_ids)
        sc.rules.append(spec)

    steps = data.get("step", [])
    if not isinstance(steps, list):
        raise ctx.error("step", 0, None, "use [[step]] tables (an array of tables)")
    for i, raw in enumerate(steps, 1):
        sc.steps.append(_parse_step(ctx, i, raw, known_ids))

    expects = data.get("expect", [])
    if not isinstance(expects, list):
        raise ctx.error("expect", 0, None, "use [[expect]] tables (an array of tables)")
    for i, raw in enumerate(expects, 1):
        sc.expects.append(_parse_expect(ctx, "expect", i, raw, known_ids, EXPECT_KEYS))
    return sc


def _check_rule(ctx: _Ctx, table: str, nth: int, spec: object, known: set[str]) -> None:
    if not isinstance(spec, dict):
        raise ctx.error(table, nth, None, "a rule must be a table")
    try:
        rule = build_rule(spec)
    except SpecError as exc:
        raise ctx.error(table, nth, exc.key, str(exc)) from None
    nic = spec.get("nic", 0)
    if isinstance(nic, bool) or not isinstance(nic, int | str):
        raise ctx.error(table, nth, "nic", f"nic: {nic!r} is not a NIC index or name")
    if rule.id:
        if rule.id in known:
            raise ctx.error(table, nth, "id", f"id: {rule.id!r} is defined twice")
        known.add(rule.id)


def _parse_step(ctx: _Ctx, nth: int, raw: object, known: set[str]) -> Step:
    if not isinstance(raw, dict):
        raise ctx.error("step", nth, None, "must be a table")
    do = raw.get("do")
    if not isinstance(do, str) or do not in STEP_KEYS:
        raise ctx.error(
            "step", nth, "do", f"do: {do!r} must be one of {', '.join(sorted(STEP_KEYS))}"
        )
    allowed = STEP_KEYS[do] | TRIGGER_KEYS | {"do"}
    for key in raw:
        if key not in allowed:
            raise ctx.error(
                "step",
                nth,
                key,
                f"{key}: unknown key for do = {do!r} "
                f"(allowed: {', '.join(sorted(allowed - {'do'}))})",
            )
    step = Step(do=do, index=nth)
    triggers = [k for k in ("at", "after", "after_packets") if k in raw]
    if len(triggers) > 1:
        raise ctx.error(
            "step", nth, triggers[1], f"{triggers[1]}: use one of at, after, after_packets"
        )
    for key in ("at", "after", "timeout"):
        if key in raw:
            v = raw[key]
            if not _number(v) or v < 0:
                raise ctx.error("step", nth, key, f"{key}: {v!r} must be seconds >= 0")
            setattr(step, key, float(v))
    if "after_packets" in raw:
        v = raw["after_packets"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ctx.error(
                "step", nth, "after_packets", f"after_packets: {v!r} must be an integer >= 0"
            )
        step.after_packets = v
    if "direction" in raw:
        if raw["direction"] not in ("tx", "rx", "both"):
            raise ctx.error(
                "step", nth, "direction", f"direction: {raw['direction']!r} must be tx, rx or both"
            )
        step.packets = raw["direction"]
    nic = raw.get("nic", 0)
    if isinstance(nic, bool) or not isinstance(nic, int | str):
        raise ctx.error("step", nth, "nic", f"nic: {nic!r} is not a NIC index or name")
    step.nic = nic
    params = {k: v for k, v in raw.items() if k in STEP_KEYS[do]}
    step.params = params
    if do == "add":
        if "rule" not in raw:
            raise ctx.error("step", nth, "do", "do = 'add' needs rule = { action = ..., ... }")
        _check_rule(ctx, "step", nth, raw["rule"], known)
    elif do in ("remove", "restore_pool"):
        rid = raw.get("id")
        if do == "remove" and not isinstance(rid, str):
            raise ctx.error("step", nth, "id", 'remove needs id = "<rule id>"')
        if rid is not None and (not isinstance(rid, str) or rid not in known):
            raise ctx.error(
                "step", nth, "id", f"id: {rid!r} is not a rule or fault defined earlier"
            )
    elif do in ("link_down", "shrink_pool"):
        fid = raw.get("id")
        if fid is not None:
            if not isinstance(fid, str) or fid in known:
                raise ctx.error("step", nth, "id", f"id: {fid!r} must be a new string id")
            known.add(fid)
        if do == "shrink_pool":
            n = raw.get("packets")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ctx.error("step", nth, "packets", f"packets: {n!r} must be an integer >= 0")
        if "qmp" in raw and not isinstance(raw["qmp"], bool):
            raise ctx.error("step", nth, "qmp", "qmp: must be true or false")
        if "qmp_name" in raw and not isinstance(raw["qmp_name"], str):
            raise ctx.error("step", nth, "qmp_name", "qmp_name: must be a string (netdev id)")
    elif do == "wait_console":
        pat = raw.get("pattern")
        if not isinstance(pat, str) or not pat:
            raise ctx.error("step", nth, "pattern", 'wait_console needs pattern = "<regex>"')
        try:
            re.compile(pat)
        except re.error as exc:
            raise ctx.error("step", nth, "pattern", f"pattern: not a valid regex: {exc}") from None
    elif do == "sleep":
        v = raw.get("seconds")
        if not _number(v) or v < 0:
            raise ctx.error("step", nth, "seconds", f"seconds: {v!r} must be a number >= 0")
    elif do == "expect":
        step.params = {"expect": _parse_expect(ctx, "step", nth, params, known, EXPECT_KEYS)}
    return step


def _parse_expect(
    ctx: _Ctx, table: str, nth: int, raw: object, known: set[str], allowed: set[str]
) -> Expect:
    if not isinstance(raw, dict):
        raise ctx.error(table, nth, None, "must be a table")
    for key in raw:
        if key not in allowed:
            raise ctx.error(
                table, nth, key, f"{key}: unknown key (allowed: {', '.join(sorted(allowed))})"
            )
    subjects = [k for k in ("rule", "event", "stat") if k in raw]
    if len(subjects) != 1:
        raise ctx.error(
            table,
            nth,
            subjects[1] if subjects[1:] else None,
            "an expectation needs exactly one of rule, event, stat",
        )
    subject = subjects[0]
    value = raw[subject]
    if not isinstance(value, str) or not value:
        raise ctx.error(table, nth, subject, f"{subject}: must be a non-empty string")
    if subject == "rule" and value not in known:
        raise ctx.error(
            table, nth, "rule", f"rule: {value!r} is not a rule id defined in this file"
        )
    exp = Expect(index=nth, name=str(raw.get("name", f"{subject} {value}")))
    setattr(exp, subject, value)
    lo = raw.get("min", raw.get("min_hits"))
    hi = raw.get("max", raw.get("max_hits"))
    for key, v in (("min", lo), ("max", hi)):
        if v is not None and not _number(v):
            raise ctx.error(table, nth, key, f"{key}: {v!r} must be a number")
    if lo is None and hi is None and "equals" not in raw:
        lo = 1  # "it happened at least once" is the useful default
    exp.min = None if lo is None else float(lo)
    exp.max = None if hi is None else float(hi)
    exp.equals = raw.get("equals")
    return exp


# -- playing --------------------------------------------------------------------------------


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

    @property
    def ok(self) -> bool:
        return (
            self.error is None and all(s.ok for s in self.steps) and all(e.ok for e in self.expects)
        )

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "seed": self.seed,
            "duration": round(self.duration, 3),
            "error": self.error,
            "rules": self.rules,
            "steps": [vars(s) for s in self.steps],
            "expects": [vars(e) for e in self.expects],
            "events": self.events,
        }

    def format(self) -> str:
        lines = [
            f"scenario {self.name}: {'PASS' if self.ok else 'FAIL'} "
            f"(seed {self.seed}, {self.duration:.1f} s)"
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append("  rules:")
        for r in self.rules:
            lines.append(
                f"    {r['id']:12} {r['action']:16} {r.get('queue', ''):6} "
                f"hits={r['hits']:<6} seen={r.get('seen', 0)}"
            )
        lines.append("  steps:")
        for s in self.steps:
            mark = "ok  " if s.ok else "FAIL"
            lines.append(f"    {mark} {s.index:3} t={s.t:7.3f} {s.do} {s.detail}".rstrip())
        if self.expects:
            lines.append("  expectations:")
            for e in self.expects:
                lines.append(f"    {'ok  ' if e.ok else 'FAIL'} {e.name}: {e.detail}")
        if self.events:
            lines.append(
                "  events: " + " ".join(f"{k}={v}" for k, v in sorted(self.events.items()))
            )
        return "\n".join(lines)


class _Player:
    def __init__(
        self,
        sc: Scenario,
        device: Device,
        console: Any,
        qmp: Any,
        engine: FaultEngine,
        sleep: Callable[[float], None] | None,
    ) -> None:
        self.sc = sc
        self.device = device
        self.console = console
        self.qmp = qmp
        self.engine = engine
        self.t0 = time.monotonic()
        self.installed: dict[str, Rule | DeviceFault] = {}
        self.seen_rules: list[Rule] = []
        self.steps: list[StepResult] = []
        self.expects: list[ExpectResult] = []
        self._sleep = sleep
        self.deadline = self.t0 + sc.timeout
        self.base_packets: dict[str, dict[str, int]] = {}
        self.base_events = dict(engine.log.counts)  # event expectations count this run only

    def now(self) -> float:
        return time.monotonic() - self.t0

    def pump(self, seconds: float) -> None:
        """Let time pass: run the device loop ourselves when nobody else does."""
        if self._sleep is not None:
            self._sleep(seconds)
        elif getattr(self.device, "_thread", None) is None:
            self.device.poll(max(0.0, seconds))
        else:
            time.sleep(max(0.0, seconds))

    def wait_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        end = min(time.monotonic() + timeout, self.deadline)
        while not cond():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(0.01, left))
        return True

    def packets(self, step: Step) -> int:
        nf = self.engine.nic(step.nic)
        counts = nf.packets
        base = self.base_packets.setdefault(nf.nic.name, dict(counts))
        dirs = ("tx", "rx") if step.packets == "both" else (step.packets,)
        return sum(counts[d] - base.get(d, 0) for d in dirs)

    def add_rule(self, spec: dict[str, Any], nic: int | str) -> Rule:
        rule = self.engine.nic(spec.get("nic", nic)).add(build_rule(spec))
        self.installed[rule.id] = rule
        self.seen_rules.append(rule)
        return rule

    def run(self) -> None:
        for nic in self.device.nics:  # after_packets counts from the start of this run
            self.base_packets[nic.name] = dict(self.engine.nic(nic).packets)
        for spec in self.sc.rules:
            self.add_rule(spec, 0)
        last = 0.0
        for step in self.sc.steps:
            ok, detail = self.trigger(step, last)
            if ok:
                try:
                    ok, detail = self.execute(step)
                except Exception as exc:  # a QMP error, a vanished NIC...: the step failed
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
            last = self.now()
            self.steps.append(StepResult(step.index, step.do, round(last, 3), ok, detail))
        if self.sc.duration is not None:
            self.wait_until(lambda: self.now() >= (self.sc.duration or 0.0), self.sc.duration + 1)

    def trigger(self, step: Step, last: float) -> tuple[bool, str]:
        if step.at is not None:
            at = step.at
            ok = self.wait_until(lambda: self.now() >= at, at - self.now() + 1)
            return ok, "" if ok else f"scenario timeout before t={at}"
        if step.after is not None:
            at = last + step.after
            ok = self.wait_until(lambda: self.now() >= at, step.after + 1)
            return ok, "" if ok else f"scenario timeout before t={at:.3f}"
        if step.after_packets is not None:
            n = step.after_packets
            ok = self.wait_until(lambda: self.packets(step) >= n, step.timeout)
            return ok, "" if ok else (
                f"only {self.packets(step)} of {n} packets after {step.timeout:g} s"
            )
        return True, ""

    def execute(self, step: Step) -> tuple[bool, str]:
        p = step.params
        eng = self.engine
        with eng.lock:
            if step.do == "add":
                rule = self.add_rule(p["rule"], step.nic)
                return True, f"rule {rule.id} ({rule.action.name})"
            if step.do == "remove":
                target = self.installed.get(p["id"]) or eng.find(p["id"])
                if target is None:
                    return False, f"no rule {p['id']!r}"
                target.remove()
                return True, p["id"]
            if step.do == "clear":
                eng.clear()
                return True, ""
            if step.do == "link_down":
                qmp = self.qmp if p.get("qmp") else None
                if p.get("qmp") and qmp is None:
                    return False, "qmp = true but no QMP connection was given"
                fault = eng.nic(step.nic).link_down(
                    qmp=qmp, qmp_name=p.get("qmp_name"), fault_id=p.get("id")
                )
                self.installed[fault.id] = fault
                return True, fault.id
            if step.do == "link_up":
                eng.nic(step.nic).link_up()
                return True, ""
            if step.do == "crash":
                eng.crash_backend(step.nic)
                return True, ""
            if step.do == "shrink_pool":
                fault = eng.shrink_pool(p["packets"], fault_id=p.get("id"))
                self.installed[fault.id] = fault
                return True, f"{fault.id}: {fault.info.get('held')} packets held"
            if step.do == "restore_pool":
                faults = [
                    f
                    for f in list(eng.device_faults.values())
                    if f.kind == "pool_limit" and p.get("id") in (None, f.id)
                ]
                for f in faults:
                    f.remove()
                return True, f"{len(faults)} released"
            if step.do == "expect":
                res = self.check(p["expect"])
                self.expects.append(res)
                return res.ok, res.detail
        if step.do == "sleep":
            secs = float(p["seconds"])
            end = self.now() + secs
            self.wait_until(lambda: self.now() >= end, secs + 1)
            return True, ""
        if step.do == "wait_console":
            if self.console is None:
                return False, "no console to wait on"
            try:
                self.console.expect(p["pattern"], timeout=step.timeout)
            except Exception as exc:  # GuestTimeout, GuestCrashed, pexpect errors
                return False, f"{type(exc).__name__}: {exc}"
            return True, f"saw {p['pattern']!r}"
        return False, f"unhandled step {step.do!r}"

    def check(self, exp: Expect) -> ExpectResult:
        value: Any
        if exp.rule is not None:
            rule = self.installed.get(exp.rule)
            value = rule.hits if rule is not None else None
        elif exp.event is not None:
            value = self.engine.log.counts.get(exp.event, 0) - self.base_events.get(exp.event, 0)
        else:
            assert exp.stat is not None
            value = _stat_path(self.device, self.engine, exp.stat)
        return _verdict(exp, value)


def _stat_path(device: Device, engine: FaultEngine, path: str) -> Any:
    """A value from ``device.stats()`` by dotted path (list items by index or by name);
    ``faults.<...>`` reads the engine stats instead."""
    from vdev.faults.engine import engine_stats

    parts = path.split(".")
    node: Any
    if parts[0] == "faults":
        node, parts = engine_stats(engine), parts[1:]
    else:
        node = device.stats()
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, list):
            found = [n for n in node if isinstance(n, Mapping) and n.get("name") == part]
            if not found:
                return None
            node = found[0]
        else:
            return None
    return node


def _verdict(exp: Expect, value: Any) -> ExpectResult:
    if value is None:
        return ExpectResult(exp.name, False, None, "no such value")
    if exp.equals is not None:
        ok = value == exp.equals
        return ExpectResult(exp.name, ok, value, f"{value!r} {'==' if ok else '!='} {exp.equals!r}")
    if not _number(value):
        return ExpectResult(exp.name, False, value, f"{value!r} is not a number")
    lo, hi = exp.min, exp.max
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    rng = f"[{'' if lo is None else f'{lo:g}'}, {'' if hi is None else f'{hi:g}'}]"
    return ExpectResult(exp.name, ok, value, f"{value} {'in' if ok else 'not in'} {rng}")


def play(
    scenario: Scenario | str | Path,
    device: Device,
    console: Any = None,
    qmp: Any = None,
    *,
    engine: FaultEngine | None = None,
    sleep: Callable[[float], None] | None = None,
    keep_rules: bool = False,
) -> Report:
    """Run a scenario against ``device``; never raises for a failing scenario (see Report).

    ``console``: object with ``expect(pattern, timeout)`` (host.console.Console);
    ``qmp``: QEMUMonitorProtocol-like (``cmd``) for ``link_down`` steps with ``qmp = true``.
    When the device loop is not running in a thread, ``play`` runs it while it waits.
    Rules and device faults the scenario installed are removed at the end unless
    ``keep_rules``.
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    eng = engine if engine is not None else FaultEngine.for_device(device)
    if sc.seed is not None:
        eng.seed = sc.seed
    player = _Player(sc, device, console, qmp, eng, sleep)
    error: str | None = None
    try:
        player.run()
    except (SpecError, OSError, ValueError, RuntimeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    eng.qmp_links.flush()
    with eng.lock:
        for exp in sc.expects:
            player.expects.append(player.check(exp))
        rules = [r.describe() for r in player.seen_rules]
        rules += [f.describe() for f in player.installed.values() if isinstance(f, DeviceFault)]
        events = {
            k: v - player.base_events.get(k, 0)
            for k, v in eng.log.counts.items()
            if v - player.base_events.get(k, 0)
        }
        if not keep_rules:
            for item in player.installed.values():
                item.remove()
    eng.qmp_links.flush()  # QMP link changes made by steps or removals have reached QEMU
    return Report(
        sc.name, eng.seed, player.now(), rules, player.steps, player.expects, events, error
    )


def play_and_print(
    path: str | Path,
    device: Device,
    console: Any = None,
    qmp: Any = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """What ``vdev run/sandbox --scenario FILE`` do: load, play, print, return the status.

    2 when the file is invalid (the error names file, line and key), else the report's
    exit code (1 when a step or an expectation failed)."""
    stream = out if out is not None else sys.stdout
    try:
        sc = load_scenario(path)
    except ScenarioError as exc:
        print(f"scenario: {exc}", file=sys.stderr if out is None else stream)
        return 2
    report = play(sc, device, console, qmp)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str), file=stream)
    else:
        print(report.format(), file=stream)
    return report.exit_code


def summary(sc: Scenario) -> str:
    """One paragraph for ``vdev scenario check``: what the file will do."""
    out = [
        f"{sc.path}: scenario {sc.name!r} OK: {len(sc.rules)} rule(s), "
        f"{len(sc.steps)} step(s), {len(sc.expects)} expectation(s)"
    ]
    for spec in sc.rules:
        out.append(f"  rule {spec.get('id', '?')}: {spec['action']} at t=0")
    for st in sc.steps:
        when = (
            f"at t={st.at:g}"
            if st.at is not None
            else f"after {st.after:g} s"
            if st.after is not None
            else f"after {st.after_packets} packets"
            if st.after_packets is not None
            else "next"
        )
        out.append(f"  step {st.index}: {st.do} {when}")
    return "\n".join(out)


__all__ = [
    "Expect",
    "Report",
    "Scenario",
    "ScenarioError",
    "Step",
    "load_scenario",
    "parse_scenario",
    "play",
    "play_and_print",
    "summary",
]
