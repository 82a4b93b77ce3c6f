"""Scenario traffic, liveness and honest verdicts, against the whole Device with the
QEMU-free frontend as the guest (vdev.testing.frontend): no QEMU needed.

The guest adapter here (``FrontendGuest``) plays the guest's side of flows with the
frontend, and answers (or ignores) the host peer's ICMP probes, so every path of
``play()`` that a real guest takes runs: flows on schedule, the host peer's exact counts,
the liveness verdict, rules that never fire, Ctrl-C, progress and device statistics.
"""

from __future__ import annotations

import json
import queue
import random
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.faults import FaultEngine
from vdev.faults.scenario import ScenarioError, parse_scenario
from vdev.faults.scenario_play import play
from vdev.faults.traffic import (
    PEER_IP,
    PEER_MAC,
    FlowCounts,
    HostPeer,
    ProbeResult,
    TrafficFlow,
    parse_flow,
)
from vdev.net.device import Device
from vdev.net.responder import inet_checksum
from vdev.testing.frames import ETH_TEST, TOOLS_MAGIC, eth, ipv4

frontend_mod = pytest.importorskip("vdev.testing.frontend")

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])


def tools_seq(frame: bytes) -> int | None:
    """The sequence number of a vdev-pktgen/vdev-sink style frame (magic checked)."""
    if len(frame) < 22 or struct.unpack_from("!H", frame, 12)[0] != ETH_TEST:
        return None
    magic, seq = struct.unpack_from("!II", frame, 14)
    return int(seq) if magic == TOOLS_MAGIC else None


def icmp_reply_to(frame: bytes) -> bytes | None:
    """The guest's answer to an ICMP echo request addressed to it (built here, by hand)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 1:
        return None
    if frame[30:34] != GUEST_IP or frame[34] != 8:
        return None
    icmp = bytearray(frame[34:])
    icmp[0] = 0
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", inet_checksum(bytes(icmp)))
    return eth(frame[6:12], GUEST_MAC, 0x0800, ipv4(GUEST_IP, frame[26:30], 1, bytes(icmp)))


class FrontendGuest:
    """A ScenarioGuest over the frontend.  One thread owns the frontend: it sends what
    flows queue and answers probes (when ``answer``); frames for the guest are kept."""

    kind = "frontend"

    def __init__(self, fe: Any, *, answer: bool = True, console_text: str = "") -> None:
        self.fe = fe
        self.mac = GUEST_MAC
        self.ip = GUEST_IP
        self.answer = answer
        self.console_text = console_text
        self.received: list[bytes] = []
        self.events: list[tuple[str, int, float]] = []
        self.t0 = time.monotonic()
        self._out: queue.Queue[list[bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    console = None
    qmp = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            while not self._out.empty():
                self.fe.send_all(self._out.get())
            for frame in self.fe.recv(timeout=0.02):
                reply = icmp_reply_to(frame)
                if reply is not None:
                    if self.answer:
                        self.fe.send_all([reply])
                    continue
                with self._lock:
                    self.received.append(frame)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def unsupported(self, flow: TrafficFlow) -> str | None:
        return None if flow.kind == "frames" else "the frontend guest plays frames only"

    def begin(self) -> None:
        self.t0 = time.monotonic()

    def start_flow(self, flow: TrafficFlow, counts: FlowCounts, until: float) -> None:
        self.events.append(("start", flow.index, time.monotonic() - self.t0))
        if flow.tx:
            n = flow.count or 10
            frames = [
                eth(PEER_MAC, GUEST_MAC, ETH_TEST, struct.pack("!II", TOOLS_MAGIC, i).ljust(50))
                for i in range(n)
            ]
            self._out.put(frames)
            counts.guest_sent = n

    def tick(self) -> None:
        pass

    def stop_flow(self, flow: TrafficFlow, counts: FlowCounts) -> None:
        self.events.append(("stop", flow.index, time.monotonic() - self.t0))
        if flow.rx:  # until all arrived, or nothing more for 0.2 s (some were dropped)
            deadline = time.monotonic() + 2
            want, seen, quiet = counts.host_sent or 0, -1, time.monotonic()
            while time.monotonic() < deadline and len(self.seqs()) < want:
                if len(self.seqs()) != seen:
                    seen, quiet = len(self.seqs()), time.monotonic()
                elif time.monotonic() - quiet > 0.2:
                    break
                time.sleep(0.02)
            counts.guest_received = len(self.seqs())

    def seqs(self) -> list[int]:
        with self._lock:
            return [s for s in (tools_seq(f) for f in self.received) if s is not None]

    def probe(self, peer: HostPeer, within: float, answers: int) -> ProbeResult:
        t0 = time.monotonic()
        peer.start_probe("icmp", self.mac, self.ip, interval=0.05)
        while time.monotonic() - t0 < within and peer.probe_counts()[1] < answers:
            time.sleep(0.02)
        sent, got = peer.stop_probe()
        return ProbeResult(got >= answers, sent, got, time.monotonic() - t0)

    def console_shows(self, pattern: str, timeout: float) -> str | None:
        m = re.search(pattern, self.console_text)
        return None if m is None else m.group(0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Device, Any]]:
    dev = Device()
    dev.add_nic(str(tmp_path / "nic0.sock"), mac="52:54:00:12:34:56")
    dev.start()
    fe = frontend_mod.VirtioNetFrontend(str(tmp_path / "nic0.sock"), ring_size=256)
    yield dev, fe
    fe.close()
    engine = FaultEngine.for_device(dev)
    engine.close()
    dev.close()
    leaks = dev.pool.leaks()
    assert not leaks.leaked, leaks


@pytest.fixture
def guest(rig: tuple[Device, Any]) -> Iterator[FrontendGuest]:
    g = FrontendGuest(rig[1])
    yield g
    g.close()


def scenario(body: str, name: str = "t") -> Any:
    return parse_scenario(f'[scenario]\nname = "{name}"\n' + body, "t.toml")


# -- the [traffic] and [liveness] declarations ----------------------------------------------


def test_flow_schedule_counts_from_zero() -> None:
    flow = parse_flow({"kind": "frames", "rate": 10, "count": 25}, 1)
    # One at t = 0, then one every 1/rate: floor(t * rate) + 1, capped by count.
    assert [flow.packets(t) for t in (-0.1, 0.0, 0.099, 0.1, 0.99, 1.0, 2.3, 9.0)] == [
        0, 1, 1, 2, 10, 11, 24, 25,
    ]  # fmt: skip
    assert flow.end(None) == pytest.approx(2.5)
    flood = parse_flow({"kind": "udp", "direction": "tx", "rate": "flood", "count": 7}, 1)
    assert flood.rate is None and flood.packets(0.0) == 7 and flood.tx and not flood.rx
    ping = parse_flow({"kind": "ping"}, 2)
    assert (ping.rate, ping.size, ping.tx, ping.rx) == (10.0, 56, True, False)
    assert ping.end(12.0) == 12.0  # no count or duration: until the scenario ends


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[traffic]\nkind = 'tcp'\n", "t.toml:4: [traffic]: kind: 'tcp' must be one of"),
        (
            "[traffic]\nkind = 'ping'\ndirection = 'rx'\n",
            "t.toml:5: [traffic]: direction: ping is both directions",
        ),
        ("[traffic]\nkind = 'udp'\nrate = 0\n", "t.toml:5: [traffic]: rate: 0 must be packets"),
        ("[traffic]\nkind = 'ping'\nrate = 51\n", "rate: 51 must be packets per second in (0, 50]"),
        ("[traffic]\nkind = 'ping'\nrate = 50\nsize = 1473\n", "t.toml:6: [traffic]: size: 1473"),
        ("[traffic]\nkind = 'frames'\nsize = 59\n", "t.toml:5: [traffic]: size: 59 must be"),
        ("[traffic]\nkind = 'frames'\nsize = 1515\n", "size: 1515 must be an integer 60..1514"),
        ("[traffic]\nkind = 'udp'\nrate = 'flood'\n", "rate: 'flood' needs count"),
        ("[traffic]\nkind = 'ping'\nrate = 'flood'\ncount = 3\n", "'flood' is for udp"),
        ("[traffic]\nkind = 'udp'\nstart = -1\n", "t.toml:5: [traffic]: start: -1"),
        ("[traffic]\nkind = 'udp'\nduration = 0\n", "duration: 0 must be seconds > 0"),
        (
            "[traffic]\nkind = 'udp'\ncount = 5\nduration = 1\n",
            "t.toml:6: [traffic]: duration: use count or duration, not both",
        ),
        ("[traffic]\nkind = 'udp'\ncount = 0\n", "count: 0 must be an integer >= 1"),
        ("[traffic]\nkind = 'udp'\nspeed = 3\n", "t.toml:5: [traffic]: speed: unknown key"),
        (
            "[[traffic]]\nkind = 'ping'\n\n[[traffic]]\nkind = 'frames'\nrate = -3\n",
            "t.toml:8: traffic[2]: rate: -3 must be",
        ),
        ("[liveness]\nexpect = 'maybe'\n", "t.toml:4: [liveness]: expect: 'maybe' must be"),
        ("[liveness]\nexpect = 'breaks'\n", 'expect = "breaks" needs console'),
        ("[liveness]\nconsole = 'x'\n", "t.toml:4: [liveness]: console: only with expect"),
        ("[liveness]\nexpect = 'breaks'\nconsole = '(('\n", "console: not a valid regex"),
        ("[liveness]\nwithin = 0\n", "t.toml:4: [liveness]: within: 0 must be seconds > 0"),
        ("[liveness]\nexpect = 'breaks'\nanswers = 2\nconsole = 'x'\n", "answers: only with"),
        ("[liveness]\nanswers = 0\n", "answers: 0 must be an integer >= 1"),
        ("[liveness]\ncolour = 1\n", "t.toml:4: [liveness]: colour: unknown key"),
        (
            "[[rule]]\nid = 'a'\naction = 'drop'\noptional = 1\n",
            "t.toml:6: rule[1]: optional: 1 must be true or false",
        ),
        ("[[rule]]\naction = 'drop'\noptional = true\n", "optional = true needs id"),
        ("[[step]]\ndo = 'alive'\nwithin = 0\n", "t.toml:5: step[1]: within: 0 must be"),
        ("[[step]]\ndo = 'alive'\nanswers = 1.5\n", "answers: 1.5 must be an integer >= 1"),
    ],
)
def test_traffic_and_liveness_errors_name_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario(text)
    assert message in str(info.value), str(info.value)


def test_traffic_must_be_tables() -> None:
    with pytest.raises(ScenarioError, match=r"t.toml:1: \[traffic\]: use a \[traffic\] table"):
        parse_scenario("traffic = 3\n[scenario]\nname = 'x'\n", "t.toml")


def test_declarations_parse() -> None:
    sc = scenario(
        "[[traffic]]\nkind = 'ping'\nrate = 50\nsize = 1472\n"
        "[[traffic]]\nkind = 'frames'\ndirection = 'rx'\nsize = 60\nstart = 1.5\ncount = 9\n"
        "[[rule]]\nid = 'a'\naction = 'drop'\noptional = true\n"
        "[[step]]\ndo = 'add'\nrule = { id = 'b', action = 'drop', optional = false }\n"
        "[liveness]\nexpect = 'breaks'\nwithin = 2\nconsole = 'broken'\n"
    )
    assert [(f.kind, f.rate, f.size, f.start, f.count) for f in sc.traffic] == [
        ("ping", 50.0, 1472, 0.0, None),
        ("frames", 10.0, 60, 1.5, 9),
    ]
    assert sc.optional == {"a"}
    assert (sc.liveness.expect, sc.liveness.within, sc.liveness.console) == (
        "breaks",
        2.0,
        "broken",
    )


# -- playing ----------------------------------------------------------------------------


def test_host_flow_reaches_the_guest_exactly_in_order(
    rig: tuple[Device, Any], guest: FrontendGuest
) -> None:
    dev, _ = rig
    sc = scenario(
        "duration = 0.3\n[traffic]\nkind = 'frames'\ndirection = 'rx'\nrate = 400\ncount = 60\n"
        "size = 100\n[liveness]\nwithin = 5\n"
    )
    report = play(sc, dev, guest=guest)
    assert report.ok, report.format()
    assert guest.seqs() == list(range(60))  # the guest's own view: every frame, in order
    frames = [f for f in guest.received if tools_seq(f) is not None]
    assert {len(f) for f in frames} == {100} and {f[6:12] for f in frames} == {PEER_MAC}
    (flow,) = report.traffic
    assert (flow["host_sent"], flow["guest_received"], flow["started"]) == (60, 60, True)
    start, stop = guest.events
    assert start[:2] == ("start", 1) and stop[:2] == ("stop", 1)
    assert stop[2] - start[2] >= 60 / 400 - 0.05  # stopped once the count was due
    rx0 = report.device["nics"][0]["queues"]["rx0"]
    assert rx0["frames"] >= 60 and report.liveness is not None and report.liveness.ok
    # The host peer left nothing behind on the device: no port, no switch endpoint.
    assert not [n for n in [*dev.ports, *dev.switch.endpoints] if n.startswith("scenario-peer")]


def test_guest_flow_is_counted_by_the_host_peer(
    rig: tuple[Device, Any], guest: FrontendGuest
) -> None:
    dev, _ = rig
    sc = scenario("[traffic]\nkind = 'frames'\ndirection = 'tx'\nrate = 100\ncount = 25\n")
    report = play(sc, dev, guest=guest)
    assert report.ok, report.format()
    (flow,) = report.traffic
    assert (flow["guest_sent"], flow["host_received"]) == (25, 25)
    tx0 = report.device["nics"][0]["queues"]["tx0"]
    assert tx0["frames"] >= 25 and tx0["bytes"] >= 25 * 64


def test_seeded_rule_sees_exactly_the_declared_traffic(
    rig: tuple[Device, Any], guest: FrontendGuest
) -> None:
    """Same traffic, same counts: a p=0.3 rule over exactly 80 candidates hits as often as
    Python's own RNG with the same seed says it must."""
    dev, _ = rig
    sc = scenario(
        "[traffic]\nkind = 'frames'\ndirection = 'rx'\nrate = 500\ncount = 80\n"
        "[[rule]]\nid = 'loss'\naction = 'drop'\nqueue = 'rx'\nethertype = 0x88b5\n"
        "p = 0.3\nseed = 5\n"
    )
    report = play(sc, dev, guest=guest)
    rng = random.Random("5")  # rules seed random.Random(str(seed)); one draw per candidate
    oracle = sum(rng.random() < 0.3 for _ in range(80))
    (rule,) = report.rules
    assert (rule["seen"], rule["hits"]) == (80, oracle), report.format()
    assert len(guest.seqs()) == 80 - oracle
    assert report.ok


def test_liveness_failure_fails_the_run(rig: tuple[Device, Any]) -> None:
    dev, fe = rig
    silent = FrontendGuest(fe, answer=False)
    try:
        report = play(scenario("[liveness]\nwithin = 0.5\nanswers = 2\n"), dev, guest=silent)
    finally:
        silent.close()
    assert report.liveness is not None and report.liveness.checked
    assert not report.liveness.ok and not report.ok and report.exit_code == 1
    assert "0 of 2 probe answers" in report.format()
    assert report.as_dict()["liveness"]["ok"] is False


def test_liveness_recovers_needs_answers(rig: tuple[Device, Any], guest: FrontendGuest) -> None:
    dev, _ = rig
    report = play(scenario("[liveness]\nwithin = 5\nanswers = 4\n"), dev, guest=guest)
    assert report.ok and report.liveness is not None and report.liveness.ok
    assert report.liveness.detail.startswith("4 of 4 probe answers")


def test_declared_breakage_is_checked(rig: tuple[Device, Any]) -> None:
    dev, fe = rig
    text = "[liveness]\nexpect = 'breaks'\nwithin = 0.2\nconsole = 'id \\d+ out of range'\n"
    broke = FrontendGuest(fe, console_text="[ 9.1] virtio_net virtio0: input.0:id 362 out of range")
    try:
        ok = play(scenario(text), dev, guest=broke)
        broke.console_text = "all is well"
        bad = play(scenario(text), dev, guest=broke)
    finally:
        broke.close()
    assert ok.ok and ok.liveness is not None and "id 362 out of range" in ok.liveness.detail
    assert not bad.ok and bad.liveness is not None and "no console line matched" in bad.format()


def test_liveness_none_and_no_guest_are_reported_unchecked(rig: tuple[Device, Any]) -> None:
    dev, _ = rig
    none = play(scenario("[liveness]\nexpect = 'none'\n"), dev)
    alone = play(scenario(""), dev)
    for report in (none, alone):
        assert report.ok and report.liveness is not None and not report.liveness.checked
    assert alone.liveness is not None and "no guest attached" in alone.liveness.detail


def test_rule_that_never_fires_fails_unless_optional(rig: tuple[Device, Any]) -> None:
    dev, fe = rig
    rule = "[[rule]]\nid = 'ghost'\naction = 'drop'\nqueue = 'tx'\nport = 4444\n"
    fired = "[[rule]]\nid = 'real'\naction = 'drop'\nqueue = 'tx'\nethertype = 0x88b5\n"
    frames = [eth(PEER_MAC, GUEST_MAC, ETH_TEST, bytes(50))] * 3

    def sleep(seconds: float) -> None:
        fe.send_all(frames)
        time.sleep(seconds)

    plain = play(scenario("duration = 0.2\n" + rule + fired), dev, sleep=sleep)
    optional = play(
        scenario("duration = 0.2\n" + rule + "optional = true\n" + fired), dev, sleep=sleep
    )
    verdict = {e.name: e.ok for e in plain.expects}
    assert verdict == {"rule ghost fired": False, "rule real fired": True}, plain.format()
    assert not plain.ok and "ghost" in plain.format() and "never fired" in plain.format()
    assert optional.ok, optional.format()
    assert {e.name: e.ok for e in optional.expects} == {
        "rule ghost fired": True,
        "rule real fired": True,
    }
    assert [r["optional"] for r in optional.rules if r["id"] == "ghost"] == [True]


def test_unsupported_traffic_fails_the_run(rig: tuple[Device, Any], guest: FrontendGuest) -> None:
    dev, _ = rig
    report = play(scenario("[traffic]\nkind = 'udp'\ncount = 3\n"), dev, guest=guest)
    assert not report.ok
    assert "traffic 1 ran" in report.format() and "frames only" in report.format()
    no_guest = play(scenario("[traffic]\nkind = 'ping'\ncount = 3\n"), dev)
    assert not no_guest.ok and "no guest attached" in no_guest.format()


def test_interrupt_gives_a_partial_report(rig: tuple[Device, Any], guest: FrontendGuest) -> None:
    dev, _ = rig
    sc = scenario(
        "duration = 30\n[traffic]\nkind = 'frames'\ndirection = 'rx'\nrate = 50\n"
        "[[step]]\nat = 0.1\ndo = 'link_down'\n[[step]]\nat = 20\ndo = 'link_up'\n"
    )
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    t0 = time.monotonic()
    report = play(sc, dev, guest=guest, stop=stop)
    assert time.monotonic() - t0 < 10
    assert report.interrupted and not report.ok and report.exit_code == 130
    assert [s.do for s in report.steps] == ["link_down"]  # what happened so far
    assert report.traffic[0]["host_sent"] >= 1 and report.device["nics"]
    assert report.liveness is not None and "interrupted" in report.liveness.detail
    assert report.format().startswith("scenario t: INTERRUPTED")
    assert dev.nics[0].link_up  # the run's faults were removed on the way out
    assert json.loads(json.dumps(report.as_dict()))["interrupted"] is True


def test_progress_lines(rig: tuple[Device, Any], guest: FrontendGuest) -> None:
    dev, _ = rig
    lines: list[str] = []
    sc = scenario(
        "duration = 0.6\n[traffic]\nkind = 'frames'\ndirection = 'rx'\nrate = 100\n"
        "[[rule]]\nid = 'd'\naction = 'drop'\nqueue = 'rx'\nevery = 2\n"
    )
    report = play(sc, dev, guest=guest, progress=lines.append, progress_interval=0.1)
    assert report.ok, report.format()
    assert len(lines) >= 3
    assert all(re.match(r"t=\d+\.\d/0\.6 s  nic0 tx=\d+ rx=\d+ drops=\d+  hits d=\d+", ln)
               for ln in lines), lines  # fmt: skip
    assert int(re.findall(r"d=(\d+)", lines[-1])[0]) >= 1


def test_alive_step_probes_mid_run(rig: tuple[Device, Any]) -> None:
    dev, fe = rig
    silent = FrontendGuest(fe, answer=False)
    text = "[[step]]\ndo = 'alive'\nwithin = 0.3\nanswers = 1\n[liveness]\nexpect = 'none'\n"
    try:
        bad = play(scenario(text), dev, guest=silent)
        silent.answer = True
        good = play(scenario(text), dev, guest=silent)
    finally:
        silent.close()
    assert [s.ok for s in bad.steps] == [False] and not bad.ok
    assert [s.ok for s in good.steps] == [True] and good.ok
    assert "1 of 1 probe answers" in good.steps[0].detail


def test_report_device_block(rig: tuple[Device, Any], guest: FrontendGuest) -> None:
    dev, _ = rig
    sc = scenario(
        "[traffic]\nkind = 'frames'\ndirection = 'tx'\nrate = 100\ncount = 12\n"
        "[[rule]]\nid = 'd'\naction = 'drop'\nqueue = 'tx'\nevery = 3\n"
    )
    report = play(sc, dev, guest=guest)
    tx0 = report.device["nics"][0]["queues"]["tx0"]
    # 12 frames from the guest; every 3rd dropped by the rule: drop reason "fault".
    assert tx0["drop_reasons"] == {"fault": 4} and tx0["drops"] == 4
    assert report.traffic[0]["host_received"] == 8
    pool = report.device["pool"]
    assert set(pool) == {"in_use", "high_water", "alloc_failures", "num_packets"}
    text = report.format()
    assert "nic0 tx0: frames=" in text and "drops=4 (fault=4)" in text and "pool: in_use=" in text


def test_host_peer_answers_arp(rig: tuple[Device, Any]) -> None:
    dev, fe = rig
    peer = HostPeer(dev)
    try:
        body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP
        fe.send_all([eth(b"\xff" * 6, GUEST_MAC, 0x0806, body + bytes(6) + PEER_IP)])
        got: list[bytes] = []
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            got = [f for f in fe.recv(timeout=0.1) if f[12:14] == b"\x08\x06"]
    finally:
        peer.close()
    (reply,) = got
    assert reply[:6] == GUEST_MAC and reply[6:12] == PEER_MAC
    assert struct.unpack_from("!H", reply, 20)[0] == 2  # ARP reply
    assert reply[22:28] == PEER_MAC and reply[28:32] == PEER_IP and reply[38:42] == GUEST_IP
