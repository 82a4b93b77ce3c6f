"""Playing a scenario: the timeline, its traffic, and an honest verdict.

``play(scenario, device, guest=...)`` is the one implementation behind ``vdev run
--scenario``, ``vdev sandbox --scenario`` and the tests, so a file gets the same traffic
and the same verdict whoever plays it:

1. the declared ``[traffic]`` flows start and stop on their schedule (the guest's side
   through the ``guest`` adapter, the host's through a ``HostPeer`` on the switch);
2. rules are installed at t = 0 and steps run in order, each after its trigger;
3. at the end the flows stop, the expectations are evaluated, and every rule that never
   fired fails the run unless the file marks it ``optional``;
4. the scenario's rules and device faults are removed, and then the liveness check runs:
   the guest must answer the host's probe again (``recovers``), or its console must show
   the breakage the file declares (``breaks``);
5. the report carries the device's own counters for the run.

``stop`` (a ``threading.Event``, set by a Ctrl-C handler) ends the run early: the report
then says what happened so far and is marked interrupted (exit status 130).  ``progress``
receives a one-line status every ``progress_interval`` seconds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from vdev.errors import VdevError
from vdev.faults.engine import DeviceFault, FaultEngine, engine_stats
from vdev.faults.rules import Rule, SpecError, build_rule
from vdev.faults.scenario import (
    Expect,
    Scenario,
    ScenarioError,
    Step,
    _number,
    load_scenario,
    rule_spec,
)
from vdev.faults.scenario_report import (
    ExpectResult,
    LivenessResult,
    Report,
    StepResult,
    device_delta,
)
from vdev.faults.traffic import FlowCounts, HostPeer, ProbeResult, ScenarioGuest, TrafficFlow

if TYPE_CHECKING:
    from vdev.net.device import Device

GUEST_IP_DEFAULT = bytes([10, 0, 2, 15])
SETTLE = 0.3  # seconds for the last frames of a stopped flow to reach the far end
# A ``send`` step waits (at most this long) until the guest's NIC wrote or dropped the
# frames, so the next step (a ``clear``) cannot beat them to the RX path: a replay where a
# rule sees them or not by timing is not a replay (HostPeer.send_frames).
SEND_SETTLE = 1.0


class Interrupted(VdevError):
    """The ``stop`` event was set while the scenario ran."""


@dataclass
class _Flow:
    flow: TrafficFlow
    counts: FlowCounts
    end: float | None
    state: str = "pending"  # pending -> running -> done
    base_raw: int = 0
    base_responder: int = 0


class _Player:
    def __init__(
        self,
        sc: Scenario,
        device: Device,
        console: Any,
        qmp: Any,
        engine: FaultEngine,
        sleep: Callable[[float], None] | None,
        guest: ScenarioGuest | None,
        progress: Callable[[str], None] | None,
        progress_interval: float,
        stop: threading.Event | None,
    ) -> None:
        self.sc = sc
        self.device = device
        self.guest = guest
        self.console = console if console is not None or guest is None else guest.console
        self.qmp = qmp if qmp is not None or guest is None else guest.qmp
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
        self.base_stats: dict[str, Any] = device.stats()
        self.progress = progress
        self.progress_interval = progress_interval
        self._next_progress = progress_interval
        self.stop = stop
        self.peer: HostPeer | None = None
        self.flows = [
            _Flow(f, FlowCounts(f), f.end(sc.duration)) for f in sorted(sc.traffic, key=_start)
        ]
        self._in_service = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- time passing -----------------------------------------------------------------

    def pump(self, seconds: float) -> None:
        """Let time pass: keep the traffic on schedule, run the device loop ourselves when
        nobody else does, report progress, and stop when asked to."""
        if self.stop is not None and self.stop.is_set():
            raise Interrupted()
        self.service()
        self.idle(max(0.0, seconds))

    def idle(self, seconds: float) -> None:
        """Let time pass without the schedule (used while the schedule itself runs)."""
        if self._sleep is not None:
            self._sleep(seconds)
        elif getattr(self.device, "_thread", None) is None:
            self.device.poll(seconds)
        else:
            time.sleep(seconds)

    def wait_until(self, cond: Callable[[], bool], timeout: float) -> bool:
        end = min(time.monotonic() + timeout, self.deadline)
        while not cond():
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(0.01, left))
        return True

    def service(self) -> None:
        if self._in_service:  # a flow start waiting on the guest pumps too
            return
        self._in_service = True
        try:
            t = self.now()
            for fl in self.flows:
                if fl.state == "pending" and t >= fl.flow.start:
                    self.start_flow(fl)
                elif fl.state == "running" and fl.end is not None and t >= fl.end:
                    self.stop_flow(fl)
            if self.guest is not None:
                self.guest.tick()
            if self.progress is not None and t >= self._next_progress:
                self._next_progress = t + self.progress_interval
                self.progress(self.status_line())
        finally:
            self._in_service = False

    def status_line(self) -> str:
        total = f"/{self.sc.duration:g}" if self.sc.duration is not None else ""
        now = self.device.stats()
        delta = device_delta(self.base_stats, now)
        parts = [f"t={self.now():.1f}{total} s"]
        for nic in delta["nics"]:
            tx = sum(q["frames"] for n, q in nic["queues"].items() if n.startswith("tx"))
            rx = sum(q["frames"] for n, q in nic["queues"].items() if n.startswith("rx"))
            drops = sum(q["drops"] for q in nic["queues"].values())
            parts.append(f"{nic['name']} tx={tx} rx={rx} drops={drops}")
        hits = " ".join(f"{r.id}={r.hits}" for r in self.seen_rules)
        if hits:
            parts.append(f"hits {hits}")
        return "  ".join(parts)

    # -- traffic ----------------------------------------------------------------------

    def host_peer(self) -> HostPeer:
        if self.peer is None:
            self.peer = HostPeer(self.device, name=f"scenario-peer-{id(self):x}")
        return self.peer

    def guest_mac(self) -> bytes:
        if self.guest is not None:
            return self.guest.mac
        return bytes(self.device.nics[0].mac)

    def guest_ip(self) -> bytes:
        ip = getattr(self.guest, "ip", None)
        return ip if isinstance(ip, bytes) else GUEST_IP_DEFAULT

    def start_flow(self, fl: _Flow) -> None:
        fl.state = "running"
        flow, counts = fl.flow, fl.counts
        needs_guest = flow.tx or flow.kind == "udp"
        reason = None
        if self.guest is None and needs_guest:
            reason = "no guest attached: the guest's side of this flow cannot run"
        elif self.guest is not None:
            reason = self.guest.unsupported(flow)
        if reason is not None:
            counts.error = reason
            fl.state = "done"
            return
        end = fl.end if fl.end is not None else self.sc.timeout
        try:
            if flow.rx or flow.tx:
                peer = self.host_peer()
                fl.base_raw = peer.raw_from_guest
            fl.base_responder = self._responder_count(flow)
            if self.guest is not None:
                self.guest.start_flow(flow, counts, max(1.0, end - self.now()) + 5.0)
            if flow.rx:
                self.host_peer().send_flow(flow, self.guest_mac(), self.guest_ip())
            counts.started = True
        except Exception as exc:  # the guest's shell is gone, a tool is missing, ...
            counts.error = f"could not start: {_one_line(exc)}"
            fl.state = "done"

    def _responder_count(self, flow: TrafficFlow) -> int:
        r = self.device.responder.stats
        if flow.kind == "ping":
            return int(r.icmp_replies)
        if flow.kind == "udp":
            return int(r.udp_sink_packets)
        return 0

    def stop_flow(self, fl: _Flow) -> None:
        fl.state = "done"
        flow, counts = fl.flow, fl.counts
        if flow.rx and self.peer is not None:
            # A counted flow sends exactly its count: let the peer catch up (bounded; a
            # squeezed pool or a guest that stopped taking frames may hold it back).
            deadline = time.monotonic() + 5.0
            while (
                flow.count is not None
                and self.peer.flow_sent(flow) < flow.count
                and time.monotonic() < deadline
            ):
                self.idle(0.01)
            counts.host_sent = self.peer.stop_flow(flow)
        if self.guest is not None:
            try:
                self.guest.stop_flow(flow, counts)
            except Exception as exc:  # adapters should not raise; keep the report going
                counts.error = counts.error or f"could not stop: {_one_line(exc)}"
        self.idle(SETTLE)
        if flow.tx:
            if flow.kind == "frames" and self.peer is not None:
                counts.host_received = self.peer.raw_from_guest - fl.base_raw
            elif flow.kind in ("ping", "udp"):
                counts.host_received = self._responder_count(flow) - fl.base_responder

    def stop_all_flows(self) -> None:
        for fl in self.flows:
            if fl.state == "running":
                self.stop_flow(fl)
            elif fl.state == "pending":
                fl.state = "done"
                fl.counts.error = fl.counts.error or "never started: the scenario ended first"

    # -- timeline ---------------------------------------------------------------------

    def packets(self, step: Step) -> int:
        nf = self.engine.nic(step.nic)
        counts = nf.packets
        base = self.base_packets.setdefault(nf.nic.name, dict(counts))
        dirs = ("tx", "rx") if step.packets == "both" else (step.packets,)
        return sum(counts[d] - base.get(d, 0) for d in dirs)

    def add_rule(self, spec: dict[str, Any], nic: int | str) -> Rule:
        rule = self.engine.nic(spec.get("nic", nic)).add(build_rule(rule_spec(spec)))
        self.installed[rule.id] = rule
        self.seen_rules.append(rule)
        return rule

    def run(self) -> None:
        for nic in self.device.nics:  # after_packets counts from the start of this run
            self.base_packets[nic.name] = dict(self.engine.nic(nic).packets)
        if self.guest is not None:
            self.guest.begin()
        for spec in self.sc.rules:
            self.add_rule(spec, 0)
        self.service()  # flows that start at t = 0
        last = 0.0
        for step in self.sc.steps:
            ok, detail = self.trigger(step, last)
            if ok:
                try:
                    ok, detail = self.execute(step)
                except Interrupted:
                    raise
                except Exception as exc:  # a QMP error, a vanished NIC...: the step failed
                    ok, detail = False, f"{type(exc).__name__}: {exc}"
            last = self.now()
            self.steps.append(StepResult(step.index, step.do, round(last, 3), ok, detail))
        ends = [self.sc.duration or 0.0] + [f.end for f in self.flows if f.end is not None]
        end = max(ends)
        if end > self.now():
            self.wait_until(lambda: self.now() >= end, end - self.now() + 1)

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
                if p:  # a crash point: armed now, fired by the data path
                    eng.crash_point(step.nic, **p)
                    return True, "armed: " + " ".join(f"{k}={v}" for k, v in sorted(p.items()))
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
        if step.do == "guest":
            if self.guest is None:
                return False, "no guest attached to run a command on"
            ok, detail = self.guest.command(str(p["command"]), step.timeout)
            # The command answered; an ERR answer fails the step only with check = true
            # (a fuzz finding's traffic often times out by design).
            return ok or not p.get("check", False), detail
        if step.do == "send":
            peer = self.host_peer()
            sent = peer.send_frames(
                self.guest_mac(), int(p["count"]), int(p["size"]), 1.0, settle=SEND_SETTLE
            )
            # A device refusing frames (link down, a stalled RX queue) is part of what a
            # scenario plays, not a failed step: the detail says how many went out.
            return True, f"sent {sent} of {p['count']}"
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
                return False, _one_line(exc)
            return True, f"saw {p['pattern']!r}"
        if step.do == "alive":
            if self.guest is None:
                return False, "no guest attached to probe"
            probe = self.guest.probe(self.host_peer(), float(p["within"]), int(p["answers"]))
            return probe.ok, _probe_detail(probe, int(p["answers"]))
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

    def fired_checks(self) -> list[ExpectResult]:
        """A rule that never fired tested nothing: it fails the run unless optional."""
        out = []
        for rule in self.seen_rules:
            optional = rule.id in self.sc.optional
            ok = rule.hits > 0 or optional
            detail = f"hits={rule.hits} seen={rule.seen}"
            if rule.hits == 0:
                detail += " (optional)" if optional else ": it never fired, so it tested nothing"
            out.append(ExpectResult(f"rule {rule.id} fired", ok, rule.hits, detail))
        return out

    # -- liveness -----------------------------------------------------------------------

    def liveness(self, interrupted: bool) -> LivenessResult:
        live = self.sc.liveness
        if live.expect == "none":
            return LivenessResult("none", True, False, "not checked (the scenario says so)")
        if interrupted:
            return LivenessResult(live.expect, True, False, "not checked: interrupted")
        if self.guest is None:
            return LivenessResult(
                live.expect, True, False, "not checked: no guest attached (play(..., guest=...))"
            )
        if live.expect == "breaks":
            assert live.console is not None
            line = self.guest.console_shows(live.console, live.within)
            if line is None:
                return LivenessResult(
                    "breaks",
                    False,
                    True,
                    f"the guest was declared to break, but no console line matched "
                    f"{live.console!r} within {live.within:g} s",
                )
            return LivenessResult("breaks", True, True, f"broke as declared: {line.strip()!r}")
        res = self.guest.probe(self.host_peer(), live.within, live.answers)
        return LivenessResult("recovers", res.ok, True, _probe_detail(res, live.answers))

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def _start(flow: TrafficFlow) -> float:
    return flow.start


def _probe_detail(res: ProbeResult, answers: int) -> str:
    extra = f"; {res.detail}" if res.detail else ""
    return (
        f"{res.answered} of {answers} probe answers needed, {res.sent} probes sent, "
        f"{res.seconds:.1f} s{extra}"
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _stat_path(device: Device, engine: FaultEngine, path: str) -> Any:
    """A value from ``device.stats()`` by dotted path (list items by index or by name);
    ``faults.<...>`` reads the engine stats instead."""
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
    guest: ScenarioGuest | None = None,
    engine: FaultEngine | None = None,
    sleep: Callable[[float], None] | None = None,
    keep_rules: bool = False,
    progress: Callable[[str], None] | None = None,
    progress_interval: float = 2.0,
    stop: threading.Event | None = None,
) -> Report:
    """Run a scenario against ``device``; never raises for a failing scenario (see Report).

    ``guest``: the guest adapter (``host.scenario_guest.LinuxGuest`` / ``BareGuest``) that
    plays the guest's side of the declared traffic and answers the liveness probe; its
    console and QMP are used when ``console``/``qmp`` are not given.  Without a guest only
    host-side traffic runs and liveness is reported as not checked.
    ``console``: object with ``expect(pattern, timeout)`` (host.console.Console);
    ``qmp``: QEMUMonitorProtocol-like (``cmd``) for ``link_down`` steps with ``qmp = true``.
    When the device loop is not running in a thread, ``play`` runs it while it waits.
    Rules and device faults the scenario installed are removed at the end (before the
    liveness check) unless ``keep_rules``.
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    eng = engine if engine is not None else FaultEngine.for_device(device)
    if sc.seed is not None:
        eng.seed = sc.seed
    player = _Player(sc, device, console, qmp, eng, sleep, guest, progress, progress_interval, stop)
    error: str | None = None
    interrupted = False
    try:
        try:
            player.run()
        except (Interrupted, KeyboardInterrupt):
            interrupted = True
            error = f"interrupted at t={player.now():.1f} s: the report shows the run so far"
        except (SpecError, OSError, ValueError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        try:
            player.stop_all_flows()
        except KeyboardInterrupt:
            interrupted = True
        eng.qmp_links.flush()
        with eng.lock:
            fired = player.fired_checks()
            for exp in sc.expects:
                player.expects.append(player.check(exp))
            player.expects.extend(fired)
            rules = [
                r.describe() | ({"optional": True} if r.id in sc.optional else {})
                for r in player.seen_rules
            ]
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
        try:
            live = player.liveness(interrupted)
        except KeyboardInterrupt:
            interrupted = True
            live = LivenessResult(sc.liveness.expect, True, False, "not checked: interrupted")
        duration = player.now()
        device_stats = device_delta(player.base_stats, device.stats())
    finally:
        player.close()
    traffic = [fl.counts.as_dict() | {"text": fl.counts.format()} for fl in player.flows]
    for fl in player.flows:  # traffic the file asks for that did not run: not honoured
        if fl.counts.error and not fl.counts.started:
            player.expects.append(
                ExpectResult(f"traffic {fl.flow.index} ran", False, None, fl.counts.error)
            )
    return Report(
        sc.name,
        eng.seed,
        duration,
        rules,
        player.steps,
        player.expects,
        events,
        error,
        traffic=traffic,
        liveness=live,
        device=device_stats,
        interrupted=interrupted,
    )


def play_and_print(
    path: str | Path,
    device: Device,
    console: Any = None,
    qmp: Any = None,
    *,
    as_json: bool = False,
    out: TextIO | None = None,
    **play_kw: Any,
) -> int:
    """What ``vdev run/sandbox --scenario FILE`` do: load, play, print, return the status.

    2 when the file is invalid (the error names file, line and key), 130 when interrupted
    (the partial report is printed), else the report's exit code (1 when a step, an
    expectation, a rule that never fired or the liveness check failed).  ``play_kw`` go to
    ``play`` (``guest``, ``progress``, ``stop``...)."""
    stream = out if out is not None else sys.stdout
    try:
        sc = load_scenario(path)
    except ScenarioError as exc:
        print(f"scenario: {exc}", file=sys.stderr if out is None else stream)
        return 2
    report = play(sc, device, console, qmp, **play_kw)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str), file=stream, flush=True)
    else:
        print(report.format(), file=stream, flush=True)
    return report.exit_code


__all__ = ["Interrupted", "play", "play_and_print"]
