"""The lost-notification watch (vdev/net/notify_watch.py): a kick or an interrupt that the
driver/device handshake of virtio 2.7.10 / 2.8.10 skipped is found, reported and made up.

The mock driver plays the racing guest. It stores its side of the handshake and then does
not act on it: it does not kick for chains it posted, or it asks for an interrupt at a used
position that the device has already passed. That is what a guest whose barrier was dropped
(QEMU 7.2 TCG with one vCPU) leaves behind. Each case is checked in all three modes, and
with a fault rule that owns the queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.abi import lib
from vdev.faults.engine import FaultEngine
from vdev.net import notify_watch
from vdev.net.device import Device
from vdev.testing.frames import HOST_MAC, numbered
from vdev.testing.frontend import FrontQueue, VirtioNetFrontend

F_EVENT_IDX = 1 << lib.VIRTIO_RING_F_EVENT_IDX
# NOTIFY_ON_EMPTY (a legacy bit Linux does not take) interrupts whenever the ring runs dry,
# which would answer every suppression here.
F_NOTIFY_ON_EMPTY = 1 << lib.VIRTIO_F_NOTIFY_ON_EMPTY
# Long enough for several looks of the watch; the positive cases wait for the event itself.
QUIET_S = 6 * notify_watch.PERIOD_S


def _frames(n: int) -> list[bytes]:
    return [numbered(HOST_MAC, b"\x02\x00\x00\x00\x00\x01", i, 64) for i in range(n)]


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(params=["split", "split-noevent", "packed"])
def ring(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _rig(tmp_path: Path, mode: str, ring: str) -> tuple[Device, VirtioNetFrontend]:
    dev = Device(notify_watch=mode)
    path = str(tmp_path / "w.sock")
    dev.add_nic(path)
    dev.start()
    features = ~F_NOTIFY_ON_EMPTY & (~F_EVENT_IDX if ring == "split-noevent" else ~0)
    fe = VirtioNetFrontend(path, packed=ring == "packed", features=features)
    return dev, fe


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[list[tuple[Device, VirtioNetFrontend]]]:
    made: list[tuple[Device, VirtioNetFrontend]] = []
    yield made
    for dev, fe in made:
        fe.close()
        dev.close()


def _suppress(q: FrontQueue, ring: str) -> None:
    """The driver says "no interrupt for now" (2.7.7 / 2.7.10 / 2.8.10)."""
    d = q.driver
    if ring == "packed":
        d.set_no_interrupt(True)
    elif ring == "split":
        d.auto_used_event = False  # type: ignore[union-attr]
        d.set_used_event(d.last_used_idx + 200)  # type: ignore[union-attr, call-arg]
    else:
        d.set_no_interrupt(True)


def _ask_late(q: FrontQueue, ring: str) -> None:
    """The driver asks for an interrupt at a position the device has already passed, and
    (its barrier gone) reads the old used index, so it waits."""
    d = q.driver
    if ring == "packed":
        d.set_no_interrupt(False)
    elif ring == "split":
        d.set_used_event(d.last_used_idx)  # type: ignore[union-attr, call-arg]
    else:
        d.set_no_interrupt(False)


@pytest.mark.parametrize("mode", ["recover", "report", "off"])
def test_lost_interrupt(rigs: list, tmp_path: Path, ring: str, mode: str) -> None:
    dev, fe = _rig(tmp_path, mode, ring)
    rigs.append((dev, fe))
    nic = dev.nics[0]
    q = fe.txq()
    assert fe.send(_frames(4)) == 4
    assert _wait(lambda: nic.stats[1].frames == 4, 5)
    fe.wait_call(q, 1.0)  # the first decision always interrupts
    time.sleep(0.05)
    fe.drain_calls(q)
    _suppress(q, ring)
    assert fe.send(_frames(3)) == 3
    assert _wait(lambda: nic.stats[1].frames == 7, 5)
    # The driver said no: the device neither interrupts nor reports, for several looks.
    assert not fe.wait_call(q, QUIET_S), (nic.watch.late_interrupts, nic.stats[1].notifications)
    assert nic.watch is not None and nic.watch.late_interrupts == {}
    _ask_late(q, ring)
    if mode == "off":
        assert not fe.wait_call(q, QUIET_S)
        assert nic.watch.late_interrupts == {}
        return
    if mode == "recover":
        assert fe.wait_call(q, 5.0)
        assert nic.watch.late_interrupts == {1: 1}
    else:
        assert _wait(lambda: nic.watch.late_interrupts == {1: 1}, 5.0)  # type: ignore[union-attr]
        assert not fe.wait_call(q, QUIET_S)
    # One finding per lost interrupt, not one per look.
    time.sleep(QUIET_S)
    assert nic.watch.late_interrupts == {1: 1}
    assert dev.stats()["nics"][0]["notify_watch"]["late_interrupts"] == {1: 1}  # type: ignore[index]


@pytest.mark.parametrize("mode", ["recover", "report", "off"])
def test_lost_kick(rigs: list, tmp_path: Path, ring: str, mode: str) -> None:
    dev, fe = _rig(tmp_path, mode, ring)
    rigs.append((dev, fe))
    nic = dev.nics[0]
    engine = FaultEngine(dev)  # its event log gets the device's findings
    assert fe.send(_frames(2)) == 2
    assert _wait(lambda: nic.stats[1].frames == 2, 5)
    # Post three chains and publish them, but do not kick (the driver read a stale
    # avail_event, or its kick decision raced).
    fe.kick = lambda q, force=False: None  # type: ignore[method-assign]
    assert fe.send(_frames(3)) == 3
    if mode == "recover":
        assert _wait(lambda: nic.stats[1].frames == 5, 5.0)
        assert nic.watch is not None and nic.watch.late_kicks == {1: 1}
    else:
        time.sleep(QUIET_S)
        assert nic.stats[1].frames == 2
        assert nic.watch is not None
        assert nic.watch.late_kicks == ({} if mode == "off" else {1: 1})
    assert engine.log.counts.get("late_kick", 0) == (0 if mode == "off" else 1)


def test_a_stall_rule_owns_its_queue(rigs: list, tmp_path: Path) -> None:
    """Withholding the kick's effect is the point of a stall: the watch stays out."""
    dev, fe = _rig(tmp_path, "recover", "split")
    rigs.append((dev, fe))
    nic = dev.nics[0]
    engine = FaultEngine(dev)
    rule = engine.nic(0).stall(queue="tx")
    assert fe.send(_frames(3)) == 3
    time.sleep(QUIET_S)
    assert nic.stats[1].frames == 0 and nic.watch is not None and nic.watch.late_kicks == {}
    engine.remove(rule.id)
    assert _wait(lambda: nic.stats[1].frames == 3, 5.0)
    assert nic.watch.late_kicks == {}


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'loud'"):
        Device(notify_watch="loud")
