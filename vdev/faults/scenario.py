"""Declarative fault scenarios: a TOML timeline of traffic, steps, rules and expectations.

Format (full reference in docs/faults.md; examples in scenarios/)::

    [scenario]
    name = "flaky-link"
    seed = 42              # engine seed: rule RNGs derive from it
    duration = 10.0        # run until t = 10 s even if the steps finish earlier (optional)

    [traffic]              # what the guest and the host send meanwhile (or [[traffic]] flows)
    kind = "ping"          # ping | udp | frames
    rate = 10              # packets per second (udp/frames: or "flood" with count = N)

    [[rule]]               # installed at t = 0; same keys as the Python API
    id = "loss"
    action = "drop"
    queue = "rx"
    p = 0.05               # optional = true: the rule may never fire without failing the run

    [[step]]
    at = 2.0               # or: after = 1.5 (since the previous step), after_packets = 100
    do = "link_down"
    nic = 0

    [[expect]]
    rule = "loss"
    min_hits = 1

    [liveness]             # after the faults end: "recovers" (default) or "breaks"
    within = 10.0

``load_scenario(path)`` validates everything up front (unknown keys, wrong types, rule
specs, references to unknown rule ids, traffic and liveness) and raises ``ScenarioError``
with ``file:line`` naming the bad key.  ``vdev.faults.scenario_play.play`` (re-exported
here) runs it; ``vdev.faults.scenario_report.Report`` is the verdict.  TOML values are
data only: nothing is evaluated or imported.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from vdev.errors import VdevError
from vdev.faults.rules import SpecError, build_rule
from vdev.faults.scenario_report import ExpectResult, Report, StepResult
from vdev.faults.traffic import FlowError, TrafficFlow, parse_flow

if TYPE_CHECKING:
    from vdev.net.device import Device

TOP_KEYS = {"scenario", "rule", "step", "expect", "traffic", "liveness"}
LIVENESS_KEYS = {"expect", "within", "answers", "console"}
LIVENESS_EXPECT = ("recovers", "breaks", "none")
SCENARIO_KEYS = {"name", "description", "seed", "duration", "timeout"}
TRIGGER_KEYS = {"at", "after", "after_packets", "direction", "nic", "timeout"}
STEP_KEYS: dict[str, set[str]] = {
    "add": {"rule"},
    "remove": {"id"},
    "clear": set(),
    "link_down": {"qmp", "qmp_name", "id"},
    "link_up": set(),
    "crash": {"mode", "after_frames", "in_flight"},
    "shrink_pool": {"packets", "id"},
    "restore_pool": {"id"},
    "wait_console": {"pattern"},
    "sleep": {"seconds"},
    "alive": {"within", "answers"},
    "expect": {"rule", "event", "stat", "min", "max", "min_hits", "max_hits", "equals"},
    # One guest console command (the bare driver's console, or a Linux shell line) and its
    # reply: what a fuzzer finding replays (vdev fuzz-driver), in its exact order.
    "guest": {"command", "check"},
    # COUNT frames of SIZE bytes from the host peer to the guest, at once.
    "send": {"count", "size"},
}
EXPECT_KEYS = {"rule", "event", "stat", "min", "max", "min_hits", "max_hits", "equals", "name"}


class ScenarioError(VdevError, ValueError):
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
class Liveness:
    """What must hold once the faults are over.

    ``recovers``: the guest answers the host's probe ``answers`` times within ``within``
    seconds.  ``breaks``: the scenario is meant to break the guest; the console must show
    ``console`` (a regex) by ``within`` seconds after the end.  ``none``: not checked."""

    expect: str = "recovers"
    within: float = 15.0
    answers: int = 3
    console: str | None = None


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
    traffic: list[TrafficFlow] = field(default_factory=list)
    liveness: Liveness = field(default_factory=Liveness)
    optional: set[str] = field(default_factory=set)  # rule ids that may never fire


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
        self.optional: set[str] = set()

    def error(self, table: str, nth: int, key: str | None, message: str) -> ScenarioError:
        line = self.loc.key(table, nth, key)
        if line is None:  # "traffic = 3": a key, not a table header
            pat = re.compile(rf"^\s*{re.escape(table)}\s*=")
            line = next((i for i, ln in enumerate(self.loc.lines, 1) if pat.match(ln)), None)
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
    return parse_scenario_bytes(data, p)


def parse_scenario_bytes(data: bytes, p: str = "<scenario>") -> Scenario:
    """A scenario file's bytes (what ``load_scenario`` read, or a fuzzer's input)."""
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
                f"(allowed: [scenario], [traffic], [[rule]], [[step]], [[expect]], [liveness])"
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
    sc.traffic = _parse_traffic(ctx, data.get("traffic"))
    sc.liveness = _parse_liveness(ctx, data.get("liveness"))
    sc.optional = ctx.optional
    return sc


def _parse_traffic(ctx: _Ctx, raw: object) -> list[TrafficFlow]:
    """``[traffic]`` (one flow) or ``[[traffic]]`` (several), see vdev.faults.traffic."""
    if raw is None:
        return []
    if not isinstance(raw, dict | list):
        raise ctx.error("traffic", 0, None, "use a [traffic] table or [[traffic]] tables")
    tables = [(0, raw)] if isinstance(raw, dict) else list(enumerate(raw, 1))
    flows = []
    for nth, table in tables:
        try:
            flows.append(parse_flow(table, max(nth, 1)))
        except FlowError as exc:
            raise ctx.error("traffic", nth, exc.key, str(exc)) from None
    return flows


def _parse_liveness(ctx: _Ctx, raw: object) -> Liveness:
    if raw is None:
        return Liveness()
    if not isinstance(raw, dict):
        raise ctx.error("liveness", 0, None, "must be a table ([liveness])")
    for key in raw:
        if key not in LIVENESS_KEYS:
            raise ctx.error(
                "liveness",
                0,
                key,
                f"{key}: unknown key (allowed: {', '.join(sorted(LIVENESS_KEYS))})",
            )
    live = Liveness()
    expect = raw.get("expect", live.expect)
    if expect not in LIVENESS_EXPECT:
        raise ctx.error(
            "liveness", 0, "expect", f"expect: {expect!r} must be {', '.join(LIVENESS_EXPECT)}"
        )
    live.expect = str(expect)
    if "within" in raw:
        v = raw["within"]
        if not _number(v) or v <= 0:
            raise ctx.error("liveness", 0, "within", f"within: {v!r} must be seconds > 0")
        live.within = float(v)
    if "answers" in raw:
        v = raw["answers"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ctx.error("liveness", 0, "answers", f"answers: {v!r} must be an integer >= 1")
        if live.expect != "recovers":
            raise ctx.error("liveness", 0, "answers", 'answers: only with expect = "recovers"')
        live.answers = v
    if "console" in raw:
        pat = raw["console"]
        if live.expect != "breaks":
            raise ctx.error("liveness", 0, "console", 'console: only with expect = "breaks"')
        if not isinstance(pat, str) or not pat:
            raise ctx.error("liveness", 0, "console", "console: must be a regex string")
        try:
            re.compile(pat)
        except re.error as exc:
            raise ctx.error(
                "liveness", 0, "console", f"console: not a valid regex: {exc}"
            ) from None
        live.console = pat
    elif live.expect == "breaks":
        raise ctx.error(
            "liveness",
            0,
            "expect",
            'expect = "breaks" needs console = "<regex>": the console line that shows the '
            "guest broke the way the scenario declares",
        )
    return live


def _check_rule(ctx: _Ctx, table: str, nth: int, spec: object, known: set[str]) -> None:
    if not isinstance(spec, dict):
        raise ctx.error(table, nth, None, "a rule must be a table")
    optional = spec.get("optional", False)
    if not isinstance(optional, bool):
        raise ctx.error(table, nth, "optional", f"optional: {optional!r} must be true or false")
    if optional and not isinstance(spec.get("id"), str):
        raise ctx.error(table, nth, "optional", 'optional = true needs id = "<rule id>"')
    try:
        rule = build_rule(rule_spec(spec))
    except SpecError as exc:
        raise ctx.error(table, nth, exc.key, str(exc)) from None
    nic = spec.get("nic", 0)
    if isinstance(nic, bool) or not isinstance(nic, int | str):
        raise ctx.error(table, nth, "nic", f"nic: {nic!r} is not a NIC index or name")
    if rule.id:
        if rule.id in known:
            raise ctx.error(table, nth, "id", f"id: {rule.id!r} is defined twice")
        known.add(rule.id)
        if optional:
            ctx.optional.add(rule.id)


def rule_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A [[rule]] table without the scenario-only keys (``optional``): what build_rule takes."""
    return {k: v for k, v in spec.items() if k != "optional"}


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
    elif do == "crash" and params:
        # A crash point (vdev.faults.crash): armed by the step, fired by the data path.
        from vdev.faults.crash import check_crash_args

        args = {"after_frames": 0, "in_flight": 1, "mode": "exit"} | params
        try:
            check_crash_args(args["after_frames"], args["in_flight"], args["mode"])
        except ValueError as exc:
            key = str(exc).split(":")[0]
            raise ctx.error("step", nth, key, str(exc)) from None
        step.params = args
    elif do == "wait_console":
        pat = raw.get("pattern")
        if not isinstance(pat, str) or not pat:
            raise ctx.error("step", nth, "pattern", 'wait_console needs pattern = "<regex>"')
        try:
            re.compile(pat)
        except re.error as exc:
            raise ctx.error("step", nth, "pattern", f"pattern: not a valid regex: {exc}") from None
    elif do == "guest":
        cmd = raw.get("command")
        if not isinstance(cmd, str) or not cmd.strip() or "\n" in cmd or "\r" in cmd:
            raise ctx.error("step", nth, "command", 'guest needs command = "<one console line>"')
        if "check" in raw and not isinstance(raw["check"], bool):
            raise ctx.error("step", nth, "check", "check: must be true or false")
    elif do == "send":
        for key, lo, hi in (("count", 1, 4096), ("size", 60, 1514)):
            v = raw.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ctx.error("step", nth, key, f"{key}: {v!r} must be an integer {lo}-{hi}")
    elif do == "sleep":
        v = raw.get("seconds")
        if not _number(v) or v < 0:
            raise ctx.error("step", nth, "seconds", f"seconds: {v!r} must be a number >= 0")
    elif do == "alive":
        for key, default in (("within", 10.0), ("answers", 3)):
            v = raw.get(key, default)
            good = _number(v) and v > 0 if key == "within" else isinstance(v, int) and v >= 1
            if isinstance(v, bool) or not good:
                what = "seconds > 0" if key == "within" else "an integer >= 1"
                raise ctx.error("step", nth, key, f"{key}: {v!r} must be {what}")
            step.params[key] = v
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


def summary(sc: Scenario) -> str:
    """One paragraph for ``vdev scenario check``: what the file will do."""
    out = [
        f"{sc.path}: scenario {sc.name!r} OK: {len(sc.rules)} rule(s), "
        f"{len(sc.steps)} step(s), {len(sc.expects)} expectation(s)"
    ]
    for flow in sc.traffic:
        out.append(f"  traffic {flow.index}: {flow.describe()}")
    for spec in sc.rules:
        opt = " (optional)" if spec.get("id") in sc.optional else ""
        out.append(f"  rule {spec.get('id', '?')}: {spec['action']} at t=0{opt}")
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
    live = sc.liveness
    if live.expect == "recovers":
        out.append(
            f"  liveness: the guest answers {live.answers} probe(s) within {live.within:g} s"
        )
    elif live.expect == "breaks":
        out.append(f"  liveness: the guest breaks; console shows {live.console!r}")
    else:
        out.append("  liveness: not checked")
    return "\n".join(out)


# The player and the report live in their own modules (scenario_play imports this one);
# these keep ``from vdev.faults.scenario import play`` working.


def play(scenario: Scenario | str | Path, device: Device, *args: Any, **kw: Any) -> Report:
    """``vdev.faults.scenario_play.play`` (see there)."""
    from vdev.faults.scenario_play import play as play_impl

    return play_impl(scenario, device, *args, **kw)


def play_and_print(path: str | Path, device: Device, *args: Any, **kw: Any) -> int:
    """``vdev.faults.scenario_play.play_and_print`` (see there)."""
    from vdev.faults.scenario_play import play_and_print as impl

    return impl(path, device, *args, **kw)


__all__ = [
    "Expect",
    "ExpectResult",
    "Liveness",
    "Report",
    "Scenario",
    "ScenarioError",
    "Step",
    "StepResult",
    "load_scenario",
    "parse_scenario",
    "play",
    "play_and_print",
    "rule_spec",
    "summary",
]
