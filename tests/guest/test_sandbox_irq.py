"""The bare driver's interrupt paths against the vdev device (issue 13, part 1).

The device counts every call (interrupt) it signals per queue (``VirtioNet.stats[i]
.notifications``); the driver counts what its interrupt handler saw and attributed. With
frames sent one at a time (the next only after the driver counted the previous), two calls
can never merge into one interrupt, so the counts must be equal. The device's interrupt
faults (suppression, spurious calls, EVENT_IDX ignored) and QMP link flaps must each land
in the driver's matching counter, visible in its stats and through ``inspect``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from host.cli_sandbox import Sandbox
from tests.guest.sandbox_support import (
    Collector,
    drain,
    driver_stats,
    sandbox_fixture,
    send_all,
    send_one_at_a_time,
    to_guest,
    wait_for,
)
from vdev.faults import FaultEngine
from vdev.faults.engine import NicFaults
from vdev.skywalk import Channel

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

RX0, TX0 = 0, 1


# Counting tests must not mistake a vCPU that the loaded host did not schedule for a while
# for a lost interrupt: a generous watchdog bound here; the watchdog itself is tested with
# 50 ms (test_suppressed_interrupts_are_named_lost_and_recovered).
WD = "irq_wd=3000"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from sandbox_fixture(tmp_path_factory, append=WD)


@pytest.fixture(scope="module")
def host(sandbox: Sandbox) -> Iterator[Channel]:
    ch = sandbox.channel("host", ring_slots=2048)
    yield ch
    ch.close()


@pytest.fixture
def quiet(sandbox: Sandbox, host: Channel) -> Sandbox:
    drain(host, quiet=0.05)
    sandbox.cmd("rx 0")
    return sandbox


@pytest.fixture
def faults(sandbox: Sandbox) -> Iterator[NicFaults]:
    assert sandbox.device is not None
    nf = FaultEngine.for_device(sandbox.device).nic(0)
    yield nf
    nf.clear()


def renegotiate(sb: Sandbox, host: Channel, options: str) -> dict[str, str]:
    """``features OPTIONS`` (a device reset), then spend the device's first decision on
    each fresh ring, which always signals (as Linux vhost's signalled_used_valid)."""
    fields = sb.cmd(f"features {options}").fields
    send_all(host, to_guest(1, 100))
    assert sb.cmd("rx 1 5000").int("received") == 1
    assert sb.cmd("tx 1 60 1").int("sent") == 1
    drain(host, quiet=0.1)
    return fields


def calls(sb: Sandbox, index: int) -> int:
    """Interrupts the device signalled on virtqueue ``index`` so far."""
    assert sb.device is not None
    return sb.device.nics[0].stats[index].notifications


def frames_written(sb: Sandbox, index: int) -> int:
    assert sb.device is not None
    return sb.device.nics[0].stats[index].frames


def test_mode_and_line_agree_with_qemu(sandbox: Sandbox) -> None:
    """pc: INTx through the 8259, on the line QEMU reports for the NIC (query-pci)."""
    f = sandbox.cmd("features").fields
    assert f["irq"] == "intx-pic"
    assert sandbox.machine is not None
    buses = sandbox.machine.qmp.cmd("query-pci")
    nics = [d for b in buses for d in b["devices"] if d["id"]["vendor"] == 0x1AF4]
    assert len(nics) == 1
    assert int(f["irq_line"]) == nics[0]["irq"] > 0
    assert sandbox.introspect()["info"]["irq_mode"] == "intx-pic"


def test_rx_interrupts_match_the_devices_calls(quiet: Sandbox, host: Channel) -> None:
    """Three `rx` commands: each starts disarmed (idle), so each must arm on its own."""
    n = 30
    s0, d0 = driver_stats(quiet), calls(quiet, RX0)
    q0 = quiet.introspect()["queues"][0]["driver"]["irqs"]
    for first in range(0, n, 10):
        quiet.send_line("rx 10 30000")
        send_one_at_a_time(quiet, host, 10, 100, "rx_irqs", first=first)
        reply = quiet.wait_reply(30)
        assert reply.ok and reply.int("received") == 10 and reply.int("bad") == 0, reply.status_line
    s1, d1 = driver_stats(quiet), calls(quiet, RX0)
    assert d1 - d0 == n  # one call per frame: the driver re-armed used_event each time
    assert s1["rx_irqs"] - s0["rx_irqs"] == d1 - d0
    assert s1["irq_queue"] - s0["irq_queue"] == n
    for key in ("irq_lost", "irq_spurious", "irq_unarmed", "irq_isr_zero", "violations"):
        assert s1[key] == s0[key], key
    assert quiet.introspect()["queues"][0]["driver"]["irqs"] - q0 == n


def test_tx_completion_interrupt_matches_the_devices_call(
    quiet: Sandbox, host: Channel, faults: NicFaults
) -> None:
    """A stalled device holds the chain until the driver waits (TX armed); releasing it
    must give exactly one call and one TX interrupt per command."""
    col = Collector(host)
    try:
        for _ in range(5):
            s0, d0 = driver_stats(quiet), calls(quiet, TX0)
            rule = faults.stall(queue="tx")
            quiet.send_line("tx 1 60 1")
            assert wait_for(lambda: quiet.introspect()["queues"][1]["armed"], timeout=10)
            rule.remove()
            reply = quiet.wait_reply(30)
            assert reply.ok and reply.int("sent") == 1, reply.status_line
            s1, d1 = driver_stats(quiet), calls(quiet, TX0)
            assert d1 - d0 == 1
            assert s1["tx_irqs"] - s0["tx_irqs"] == 1
    finally:
        col.stop()


def test_bulk_traffic_interrupts_never_exceed_calls(quiet: Sandbox, host: Channel) -> None:
    """Under load calls may merge (eventfd, level-triggered INTx), never multiply."""
    s0, d0 = driver_stats(quiet), calls(quiet, RX0) + calls(quiet, TX0)
    col = Collector(host)
    try:
        assert quiet.cmd("tx 2000 60 32").int("sent") == 2000
    finally:
        col.stop()
    quiet.send_line("rx 600 30000")
    time.sleep(0.05)
    send_all(host, to_guest(600, 200))
    assert quiet.wait_reply(60).int("received") == 600
    s1, d1 = driver_stats(quiet), calls(quiet, RX0) + calls(quiet, TX0)
    attributed = s1["rx_irqs"] + s1["tx_irqs"] - s0["rx_irqs"] - s0["tx_irqs"]
    assert 0 < attributed <= d1 - d0
    assert s1["irq_lost"] == s0["irq_lost"]


@pytest.mark.parametrize("event_idx", [1, 0])
def test_idle_driver_keeps_notifications_off(quiet: Sandbox, host: Channel, event_idx: int) -> None:
    """At the prompt nobody waits for RX: used_event parked (EVENT_IDX) or NO_INTERRUPT
    set, so the device must not signal although frames land in the ring."""
    try:
        assert renegotiate(quiet, host, f"event_idx={event_idx}")["event_idx"] == str(event_idx)
        s0, d0, f0 = driver_stats(quiet), calls(quiet, RX0), frames_written(quiet, RX0)
        send_all(host, to_guest(20, 100))
        assert wait_for(lambda: frames_written(quiet, RX0) - f0 == 20)
        time.sleep(0.1)
        assert calls(quiet, RX0) == d0
        assert driver_stats(quiet)["irq_total"] == s0["irq_total"]
        reply = quiet.cmd("rx 20 5000")  # the frames were there all along
        assert reply.int("received") == 20 and reply.int("pattern") == 20
    finally:
        renegotiate(quiet, host, "event_idx=1")


def test_idle_driver_halts(quiet: Sandbox) -> None:
    """Idle with interrupts on, the driver sleeps in hlt: every halt ends in an interrupt
    (timer tick, console or NIC), so halts never outnumber interrupts. A busy-polling
    driver would not halt at all."""
    g0 = quiet.introspect()["globals"]
    time.sleep(0.5)
    g1, s1 = quiet.introspect()["globals"], driver_stats(quiet)
    halts, ticks = g1["vdev_halts"] - g0["vdev_halts"], g1["vdev_ticks"] - g0["vdev_ticks"]
    assert 0 < halts <= ticks + 2, (halts, ticks, s1["irq_total"])


def test_suppressed_interrupts_are_named_lost_and_recovered(
    quiet: Sandbox, host: Channel, faults: NicFaults
) -> None:
    try:
        renegotiate(quiet, host, "irq_wd=50")
        s0 = driver_stats(quiet)
        lost0 = quiet.introspect()["queues"][0]["driver"]["irq_lost"]
        rule = faults.suppress_irq(queue="rx")
        quiet.send_line("rx 5 30000")
        send_one_at_a_time(quiet, host, 5, 100, "irq_lost")
        reply = quiet.wait_reply(30)
        rule.remove()
        assert reply.ok and reply.int("received") == 5, reply.status_line
        named = [ln for ln in reply.lines if ln.startswith("! lost interrupt rxq0 vq=0")]
        assert len(named) == 5, reply.lines
        s1 = driver_stats(quiet)
        assert rule.hits == 5
        assert s1["irq_lost"] - s0["irq_lost"] == 5
        assert s1["rx_irqs"] == s0["rx_irqs"]
        assert quiet.introspect()["queues"][0]["driver"]["irq_lost"] - lost0 == 5
    finally:
        renegotiate(quiet, host, WD)


def test_spurious_interrupts_take_the_spurious_path(quiet: Sandbox, faults: NicFaults) -> None:
    s0, d0 = driver_stats(quiet), calls(quiet, RX0)
    rule = faults.spurious_irq(queue="rx", interval_ms=40)
    time.sleep(0.6)
    rule.remove()
    hits = rule.hits
    assert hits > 0
    assert wait_for(lambda: driver_stats(quiet)["irq_spurious"] - s0["irq_spurious"] >= hits)
    time.sleep(0.1)
    s1 = driver_stats(quiet)
    assert s1["irq_spurious"] - s0["irq_spurious"] == hits == calls(quiet, RX0) - d0
    assert s1["rx_irqs"] == s0["rx_irqs"] and s1["irq_unarmed"] == s0["irq_unarmed"]


def test_calls_that_ignore_suppression_are_unarmed(
    quiet: Sandbox, host: Channel, faults: NicFaults
) -> None:
    """The device interrupts although the idle driver parked used_event: each such call
    finds new work on a queue that did not ask (irq_unarmed), not an RX interrupt."""
    s0, f0 = driver_stats(quiet), frames_written(quiet, RX0)
    rule = faults.ignore_event_idx(queue="rx")
    for k in range(5):
        send_all(host, to_guest(1, 100, first=k))
        assert wait_for(lambda k=k: driver_stats(quiet)["irq_unarmed"] - s0["irq_unarmed"] > k)
    rule.remove()
    assert frames_written(quiet, RX0) - f0 == 5
    s1 = driver_stats(quiet)
    assert s1["irq_unarmed"] - s0["irq_unarmed"] == 5 == rule.hits
    assert s1["rx_irqs"] == s0["rx_irqs"] and s1["irq_spurious"] == s0["irq_spurious"]
    assert quiet.cmd("rx 5 5000").int("received") == 5


def test_link_flap_seen_through_config_interrupts(
    quiet: Sandbox, host: Channel, faults: NicFaults
) -> None:
    assert quiet.machine is not None
    s0 = driver_stats(quiet)
    assert s0["link_up"] == 1
    with faults.link_down(qmp=quiet.machine.qmp, qmp_name="nic0"):
        down = quiet.cmd("link down 10000")
        # The notice is printed when the driver sees the config interrupt: during the
        # command, or at the prompt just before it when the interrupt came first.
        seen = "\n".join(quiet.prompt_lines + down.lines)
        assert down.int("up") == 0 and "! link down changes=" in seen
        assert driver_stats(quiet)["link_up"] == 0
    up = quiet.cmd("link up 10000")
    assert up.int("up") == 1
    s1 = driver_stats(quiet)
    assert s1["link_changes"] - s0["link_changes"] == 2
    assert s1["irq_config"] - s0["irq_config"] >= 2
    assert up.int("changes") == s1["link_changes"] and up.int("config_irqs") == s1["irq_config"]
    col = Collector(host)  # QEMU restarted vhost: traffic flows again
    try:
        assert quiet.cmd("tx 100 60 32").int("sent") == 100
    finally:
        frames = col.stop()
    assert len([f for f in frames if f[12:14] == b"\x88\xb5"]) == 100


def test_poll_mode_takes_no_interrupts_and_sees_no_link_change(
    quiet: Sandbox, host: Channel, faults: NicFaults
) -> None:
    """irq=0: notifications stay off on every queue, nothing is taken, and a link flap
    goes unseen (it is only ever reported through the config interrupt)."""
    assert quiet.machine is not None
    try:
        assert renegotiate(quiet, host, "irq=0")["irq"] == "poll"
        s0, d0 = driver_stats(quiet), calls(quiet, RX0) + calls(quiet, TX0)
        # Bulk both ways: the device decides after every batch while the polling driver
        # consumes at once, so notifications that are "off" only by a hair show up here.
        col = Collector(host)
        try:
            for _ in range(3):
                assert quiet.cmd("tx 2000 60 32").int("sent") == 2000
        finally:
            col.stop()
        quiet.send_line("rx 600 20000")
        time.sleep(0.05)
        send_all(host, to_guest(600, 200))
        assert quiet.wait_reply(30).int("received") == 600
        assert calls(quiet, RX0) + calls(quiet, TX0) == d0
        # (QEMU restarts vhost around a link flap; a restarted ring's first decision
        # signals whatever the driver asked, so calls are not compared past here.)
        with faults.link_down(qmp=quiet.machine.qmp, qmp_name="nic0"):
            time.sleep(1.0)
            assert not quiet.cmd("link down 100", check=False).ok
        time.sleep(1.0)
        s1 = driver_stats(quiet)
        assert s1["irq_total"] == s0["irq_total"] and s1["link_changes"] == s0["link_changes"]
    finally:
        assert renegotiate(quiet, host, "irq=1")["irq"] == "intx-pic"


def test_inspect_shows_the_interrupt_counters(quiet: Sandbox, host: Channel) -> None:
    quiet.cmd("features irq=1")  # per-queue counters (vdev_vqs) restart at a bring-up
    base = quiet.stats()
    quiet.send_line("rx 3 30000")
    send_one_at_a_time(quiet, host, 3, 100, "rx_irqs")
    assert quiet.wait_reply(30).int("received") == 3
    console = quiet.stats()
    snap = quiet.introspect()
    for key in ("irq_total", "irq_queue", "rx_irqs", "tx_irqs", "irq_lost", "irq_spurious"):
        assert snap["stats"][key] == console[key], key
    per_queue = {q["kind"]: q["driver"]["irqs"] for q in snap["queues"]}
    assert per_queue["rx"] == console["rx_irqs"] - base["rx_irqs"] == 3
    assert per_queue["tx"] == console["tx_irqs"] - base["tx_irqs"]


def test_parked_used_event_stays_out_of_the_devices_window(
    quiet: Sandbox, host: Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device publishes used idx, then decides (vring_need_event on [old, new)). Widen
    that gap to 5 ms: a polling driver has consumed everything by the time the device
    decides, so wherever it parked used_event must be outside [old, new) or the device
    signals although notifications are off."""
    assert quiet.device is not None
    nic = quiet.device.nics[0]
    slow_decision = nic._maybe_notify

    def decide_later(queue: object, index: int) -> None:
        time.sleep(0.005)
        slow_decision(queue, index)  # type: ignore[arg-type]

    try:
        assert renegotiate(quiet, host, "irq=0")["irq"] == "poll"
        monkeypatch.setattr(nic, "_maybe_notify", decide_later)
        d0 = calls(quiet, RX0) + calls(quiet, TX0)
        col = Collector(host)
        try:
            assert quiet.cmd("tx 300 60 8").int("sent") == 300
        finally:
            col.stop()
        quiet.send_line("rx 100 20000")
        time.sleep(0.05)
        send_all(host, to_guest(100, 200))
        assert quiet.wait_reply(30).int("received") == 100
        assert calls(quiet, RX0) + calls(quiet, TX0) == d0
    finally:
        monkeypatch.undo()
        assert renegotiate(quiet, host, "irq=1")["irq"] == "intx-pic"
