"""Scenario files: validation errors name file, line and key; play() runs the timeline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
from faults_helpers import device_with_nic, push_tx, udp_frame

from host import cli_ctl
from vdev.faults import FaultEngine
from vdev.faults.scenario import ScenarioError, load_scenario, parse_scenario, play

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = sorted((ROOT / "scenarios").glob("*.toml"))


@pytest.mark.parametrize("path", LIBRARY, ids=[p.stem for p in LIBRARY])
def test_library_scenarios_are_valid(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.name == path.stem
    assert path.read_text().startswith("# " + path.stem + ":")  # documented at the top


def test_library_has_the_required_scenarios() -> None:
    names = {p.stem for p in LIBRARY}
    assert {
        "flaky-link",
        "bursty-loss",
        "hostile-device",
        "backend-crash",
        "pool-exhaustion",
    } <= names


GOOD = """\
[scenario]
name = "t"
seed = 3

[[rule]]
id = "loss"
action = "drop"
every = 2

[[step]]
at = 0.05
do = "add"
rule = { id = "dup", action = "duplicate", nth = 1 }

[[step]]
after_packets = 12
do = "remove"
id = "loss"

[[expect]]
rule = "loss"
min_hits = 1
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[scenario\nname = 1", "t.toml:1: TOML syntax error"),
        ("[[rules]]\naction = 'drop'\n", "t.toml:1: rules: unknown top-level key"),
        ("[scenario]\nname = 'x'\nspeed = 3\n", "t.toml:3: [scenario]: speed: unknown key"),
        (
            "[[rule]]\naction = 'drop'\n\n[[rule]]\naction = 'drop'\np = 3\n",
            "t.toml:6: rule[2]: p: 3.0 is not a probability",
        ),
        ("[[rule]]\naction = 'drop'\ncolour = 'red'\n", "t.toml:3: rule[1]: colour: unknown key"),
        ("[[rule]]\naction = 'teleport'\n", "t.toml:2: rule[1]: action: unknown action"),
        ("[[step]]\nat = 1\ndo = 'dance'\n", "t.toml:3: step[1]: do: 'dance' must be one of"),
        (
            "[[step]]\nat = 1\ndo = 'add'\nrule = { action = 'drop', bogus = 1 }\n",
            "t.toml:4: step[1]: bogus: unknown key for action 'drop'",
        ),
        (
            "[[step]]\nat = 1\ndo = 'remove'\nid = 'ghost'\n",
            "t.toml:4: step[1]: id: 'ghost' is not a rule or fault defined earlier",
        ),
        (
            "[[step]]\nat = 1\nafter = 2\ndo = 'clear'\n",
            "t.toml:3: step[1]: after: use one of at, after, after_packets",
        ),
        (
            "[[step]]\ndo = 'wait_console'\npattern = '(('\n",
            "t.toml:3: step[1]: pattern: not a valid regex",
        ),
        ("[[step]]\ndo = 'clear'\nat = -1\n", "t.toml:3: step[1]: at: -1 must be seconds"),
        ("[[expect]]\nrule = 'nobody'\n", "t.toml:2: expect[1]: rule: 'nobody' is not a rule id"),
        ("[[expect]]\nevent = 'drop'\nstat = 'x'\n", "expect[1]: an expectation needs exactly one"),
        (
            "[[rule]]\nid = 'a'\naction = 'drop'\n[[rule]]\nid = 'a'\naction = 'drop'\n",
            "t.toml:5: rule[2]: id: 'a' is defined twice",
        ),
        ("[[step]]\ndo = 'shrink_pool'\npackets = -1\n", "t.toml:3: step[1]: packets: -1"),
    ],
)
def test_errors_name_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, "t.toml")
    assert message in str(info.value), str(info.value)


def test_scenario_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]]\naction = 'drop'\nq = 1\n")
    parser = argparse.ArgumentParser()
    cli_ctl.register(parser.add_subparsers())
    args = parser.parse_args(["scenario", "check", str(good)])
    assert args.func(args) == 0
    assert "scenario 't' OK: 1 rule(s), 2 step(s), 1 expectation(s)" in capsys.readouterr().out
    args = parser.parse_args(["scenario", "check", str(good), str(bad)])
    assert args.func(args) == 1
    assert f"{bad}:3: rule[1]: q: unknown key" in capsys.readouterr().err


class FakeConsole:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.waited: list[tuple[str, float]] = []

    def expect(self, pattern: str, timeout: float = 30.0) -> None:
        import re

        self.waited.append((pattern, timeout))
        if not any(re.search(pattern, line) for line in self.lines):
            raise TimeoutError(f"timed out after {timeout} s waiting for {pattern!r}")


class FakeQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []

    def cmd(self, cmd: str, **args: object) -> dict[str, object]:
        self.calls.append((cmd, args))
        return {}


def test_play_timeline_and_report(tmp_path: Path) -> None:
    dev = device_with_nic(str(tmp_path))
    sent = 0

    def sleep(seconds: float) -> None:  # traffic from the "guest" while the player waits
        nonlocal sent
        time.sleep(seconds)
        push_tx(dev, [udp_frame(dport=sent)])
        sent += 1

    try:
        report = play(parse_scenario(GOOD), dev, sleep=sleep)
        assert report.ok, report.format()
        rules = {r["id"]: r for r in report.rules}
        assert rules["loss"]["hits"] >= 1 and rules["dup"]["hits"] == 1
        assert [s.do for s in report.steps] == ["add", "remove"]
        assert report.exit_code == 0 and "scenario t: PASS" in report.format()
        engine = FaultEngine.for_device(dev)
        assert engine.rules() == []  # the scenario cleaned up after itself
        assert engine.seed == 3
    finally:
        dev.close()


def test_play_device_steps_console_qmp_and_failures(tmp_path: Path) -> None:
    dev = device_with_nic(str(tmp_path))
    text = """
[scenario]
name = "dev"
[[step]]
do = "link_down"
qmp = true
qmp_name = "net0"
id = "cut"
[[step]]
do = "expect"
stat = "nics.nic0.link_up"
equals = false
[[step]]
do = "link_up"
[[step]]
do = "shrink_pool"
packets = 8
id = "squeeze"
[[step]]
do = "expect"
stat = "pool.in_use"
min = 200
[[step]]
do = "restore_pool"
[[step]]
do = "crash"
[[step]]
do = "wait_console"
pattern = "link up"
timeout = 0.1
[[step]]
do = "wait_console"
pattern = "never printed"
timeout = 0.1
[[expect]]
event = "link_down"
equals = 1
[[expect]]
stat = "pool.in_use"
max = 0
[[expect]]
name = "impossible"
event = "drop"
min = 1
"""
    console = FakeConsole(["eth0: link up"])
    qmp = FakeQmp()
    try:
        report = play(parse_scenario(text), dev, console=console, qmp=qmp)
    finally:
        dev.close()
    assert qmp.calls == [
        ("set_link", {"name": "net0", "up": False}),
        ("set_link", {"name": "net0", "up": True}),
    ]
    oks = [(s.do, s.ok) for s in report.steps]
    assert oks == [
        ("link_down", True),
        ("expect", True),
        ("link_up", True),
        ("shrink_pool", True),
        ("expect", True),
        ("restore_pool", True),
        ("crash", True),
        ("wait_console", True),
        ("wait_console", False),
    ]
    assert [(e.name, e.ok) for e in report.expects] == [
        ("stat nics.nic0.link_up", True),
        ("stat pool.in_use", True),
        ("event link_down", True),
        ("stat pool.in_use", True),
        ("impossible", False),
    ]
    assert not report.ok and report.exit_code == 1
    text_report = report.format()
    assert "FAIL" in text_report and "never printed" in text_report


def test_play_runs_device_loop_itself_and_times_out(tmp_path: Path) -> None:
    dev = device_with_nic(str(tmp_path))
    text = """
[scenario]
name = "slow"
timeout = 0.3
[[step]]
after_packets = 1000
timeout = 5
do = "clear"
"""
    try:
        t0 = time.monotonic()
        report = play(parse_scenario(text), dev)
        assert time.monotonic() - t0 < 2
    finally:
        dev.close()
    assert not report.ok
    assert "only 0 of 1000 packets" in report.steps[0].detail


def test_play_and_print(tmp_path: Path) -> None:
    import io
    import json

    from vdev.faults.scenario import play_and_print

    good = tmp_path / "s.toml"
    good.write_text(
        '[scenario]\nname = "p"\n[[step]]\ndo = "link_down"\n[[step]]\ndo = "link_up"\n'
        '[[expect]]\nevent = "link_up"\nequals = 1\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[[step]]\ndo = 'fly'\n")
    dev = device_with_nic(str(tmp_path))
    try:
        out = io.StringIO()
        assert play_and_print(good, dev, out=out) == 0
        assert out.getvalue().startswith("scenario p: PASS")
        out = io.StringIO()
        assert play_and_print(good, dev, as_json=True, out=out) == 0  # counts are per run
        assert json.loads(out.getvalue())["events"] == {"link_down": 1, "link_up": 1}
        out = io.StringIO()
        assert play_and_print(bad, dev, out=out) == 2
        assert "bad.toml:2: step[1]: do: 'fly'" in out.getvalue()
    finally:
        dev.close()


CRASH_POINT = """\
[scenario]
name = "cp"
duration = 2.0
[[step]]
at = 0.0
do = "crash"
mode = "drop"
after_frames = 5
in_flight = 3
[[expect]]
event = "backend_crash"
equals = 1
"""


def test_crash_step_arms_a_crash_point_that_fires_with_chains_in_flight(tmp_path: Path) -> None:
    """The scriptable restart timing: the step arms, the data path fires it at the first
    batch holding 3 unpublished chains once 5 were taken; the event says so."""
    from vdev.net.device import Device
    from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
    from vdev.testing.frontend import VirtioNetFrontend

    path = str(tmp_path / "n.sock")
    with Device() as dev:
        dev.add_nic(path)
        dev.start()
        fe = VirtioNetFrontend(path)
        sent = False

        def sleep(seconds: float) -> None:
            nonlocal sent
            if not sent:  # one kick for 2 frames, then one for 10: only the second holds 3
                fe.send([numbered(HOST_MAC, GUEST_MAC, i) for i in range(2)])
                time.sleep(0.2)
                fe.send([numbered(HOST_MAC, GUEST_MAC, i) for i in range(2, 12)])
                sent = True
            time.sleep(seconds)

        try:
            report = play(parse_scenario(CRASH_POINT), dev, sleep=sleep)
        finally:
            fe.close()
        assert report.ok, report.format()
        assert report.steps[0].detail == "armed: after_frames=5 in_flight=3 mode=drop"
        engine = FaultEngine.for_device(dev)
        (crash,) = [e for e in engine.log.events if e.kind == "backend_crash"]
        assert crash.detail == {"mode": "drop", "taken": 5, "in_flight": 3, "after_frames": 5}
        assert dev.sockets[0].connections == 1  # dropped (nobody reconnected here)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('mode = "boom"', "mode: 'boom' must be one of exit, drop"),
        ("in_flight = -1", "in_flight: -1 must be an integer >= 0"),
        ("after_frames = 1.5", "after_frames: 1.5 must be an integer >= 0"),
        ("in_flight = true", "in_flight: True must be an integer >= 0"),
    ],
)
def test_crash_step_arguments_are_checked(line: str, message: str) -> None:
    text = f'[scenario]\nname = "x"\n[[step]]\ndo = "crash"\n{line}\n'
    with pytest.raises(ScenarioError, match=r"<scenario>:5: .*" + message.replace(".", r"\.")):
        parse_scenario(text)
    # The largest/smallest accepted values on the other side.
    ok = parse_scenario('[scenario]\nname = "x"\n[[step]]\ndo = "crash"\nin_flight = 0\n')
    assert ok.steps[0].params == {"after_frames": 0, "in_flight": 0, "mode": "exit"}
