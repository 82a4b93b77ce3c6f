"""Faults in front of a driver: the whole Device with the QEMU-free frontend
(vdev.testing.frontend), traffic echoed by the built-in responder."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.faults import FaultEngine
from vdev.net.device import Device
from vdev.testing.frames import udp
from vdev.virtio.driver import DriverError

frontend_mod = pytest.importorskip("vdev.testing.frontend")

GUEST_MAC = bytes.fromhex("525400123456")
RESPONDER_MAC = bytes.fromhex("5254000000fe")


def echo_request(i: int, size: int = 32) -> bytes:
    """UDP to the responder's echo port 7 (it answers to the guest: RX traffic)."""
    payload = struct.pack("!I", i) + b"e" * (size - 4)
    return udp(7, payload, 5000 + i, RESPONDER_MAC, GUEST_MAC, ip_id=i)


def seqno(frame: bytes) -> int:
    return int(struct.unpack_from("!I", frame, 42)[0])


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Device, Any, FaultEngine]]:
    dev = Device(pcap=str(tmp_path / "cap.pcapng"))
    dev.add_nic(str(tmp_path / "nic0.sock"))
    dev.start()
    engine = FaultEngine(dev, seed=1, log=str(tmp_path / "faults.jsonl"))
    fe = frontend_mod.VirtioNetFrontend(str(tmp_path / "nic0.sock"), ring_size=64)
    fe.post_rx()
    yield dev, fe, engine
    fe.close()
    engine.log.close()
    dev.close()
    leaks = dev.pool.leaks()  # free lists and audit: buflets and large buffers included
    assert not leaks.leaked, str(leaks)


def test_rx_drop_and_corrupt_reach_the_driver(
    rig: tuple[Device, Any, FaultEngine], tmp_path: Path
) -> None:
    dev, fe, engine = rig
    nf = engine.nic(0)
    with nf.drop(queue="rx", every=2) as drop:
        fe.send_all([echo_request(i) for i in range(10)])
        got = fe.recv(max_frames=5, timeout=2.0)
    assert sorted(seqno(f) for f in got) == [0, 2, 4, 6, 8]
    assert drop.hits == 5
    with nf.corrupt(queue="rx", offsets=[50], mask=0xFF) as corrupt:
        fe.send_all([echo_request(100)])
        (frame,) = fe.recv(max_frames=1, timeout=2.0)
    assert frame[50] == ord("e") ^ 0xFF and corrupt.hits == 1
    dev.capture.flush()  # type: ignore[union-attr]
    assert b"vdev-fault corrupt rule=r2" in (tmp_path / "cap.pcapng").read_bytes()
    assert '"kind": "drop"' in (tmp_path / "faults.jsonl").read_text()


def test_hostile_used_ring_is_detected_by_the_driver(rig: tuple[Device, Any, FaultEngine]) -> None:
    _, fe, engine = rig
    with (
        engine.nic(0).bad_used_id(queue="rx", nth=1),
        pytest.raises(DriverError, match="not in flight"),
    ):
        fe.send_all([echo_request(1)])
        fe.recv(max_frames=1, timeout=2.0)


def test_lying_used_length_is_detected(rig: tuple[Device, Any, FaultEngine]) -> None:
    _, fe, engine = rig
    with engine.nic(0).bad_used_len(queue="rx", nth=1), pytest.raises(DriverError, match="exceeds"):
        fe.send_all([echo_request(1)])
        fe.recv(max_frames=1, timeout=2.0)


def test_double_completion_on_tx(rig: tuple[Device, Any, FaultEngine]) -> None:
    _, fe, engine = rig
    with engine.nic(0).double_complete(queue="tx", nth=1) as rule:
        fe.send([echo_request(1)])
        deadline = time.monotonic() + 2
        while fe.txq().driver.used_pending() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(DriverError, match="not in flight"):
            fe.reap_tx()
    assert rule.hits == 1


def wait_for(cond: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_stall_and_delayed_used_idx(rig: tuple[Device, Any, FaultEngine]) -> None:
    _, fe, engine = rig
    txq = fe.txq()
    with engine.nic(0).stall(queue="tx", seconds=0.6):
        fe.send([echo_request(1)])
        time.sleep(0.1)
        assert txq.driver.used_pending() == 0  # not consumed while stalled
        assert wait_for(lambda: txq.driver.used_pending() == 1)  # resumed by the stall end
    fe.reap_tx()
    with engine.nic(0).delay_used(queue="tx", ms=600, nth=1):
        fe.send([echo_request(2)])
        time.sleep(0.1)
        assert txq.driver.used_pending() == 0  # consumed, but the used idx is not published
        assert wait_for(lambda: txq.driver.used_pending() == 1)
    assert fe.recv(max_frames=2, timeout=2.0)  # the echoes still arrived


def test_interrupt_suppression_and_spurious(rig: tuple[Device, Any, FaultEngine]) -> None:
    _, fe, engine = rig
    rxq = fe.rxq()
    fe.drain_calls(rxq)
    with engine.nic(0).suppress_irq(queue="rx"):
        fe.send_all([echo_request(1)])
        time.sleep(0.2)
        assert fe.drain_calls(rxq) == 0 and rxq.driver.used_pending() == 1
    fe.recv(max_frames=1, timeout=1.0)
    with engine.nic(0).spurious_irq(queue="rx", interval_ms=50):
        time.sleep(0.3)
    assert fe.drain_calls(rxq) >= 3


def test_link_down_pool_exhaustion_and_crash(
    rig: tuple[Device, Any, FaultEngine], tmp_path: Path
) -> None:
    dev, fe, engine = rig
    nic = dev.nics[0]
    with engine.nic(0).link_down():
        fe.send_all([echo_request(1)])
        time.sleep(0.2)
        assert nic.stats[1].drop_reasons.get("link_down") == 1
    assert nic.link_up
    with engine.shrink_pool(0):
        fe.send_all([echo_request(2)])
        time.sleep(0.2)
        assert nic.stats[1].drop_reasons.get("pool_exhausted") == 1
    assert dev.pool.stats.in_use == 0
    engine.crash_backend(0)
    time.sleep(0.1)
    assert nic.vrings == {}  # the connection is gone; a new frontend comes back
    fe2 = frontend_mod.VirtioNetFrontend(str(tmp_path / "nic0.sock"), ring_size=64)
    try:
        fe2.post_rx()
        fe2.send_all([echo_request(3)])
        assert [seqno(f) for f in fe2.recv(max_frames=1, timeout=2.0)] == [3]
    finally:
        fe2.close()
    assert engine.log.counts["backend_crash"] == 1
