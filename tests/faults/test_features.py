"""Feature-negotiation faults (vdev/faults/features.py) against the mock driver.

The oracle is the virtio 1.x spec's own numbers, written out here rather than taken from
the code under test: feature bits 15 (VIRTIO_NET_F_MRG_RXBUF), 29 (VIRTIO_RING_F_EVENT_IDX),
32 (VIRTIO_F_VERSION_1), status bit 8 (FEATURES_OK, 2.1 "Device Status Field"), and the
header sizes of 5.1.6 "Device Operation": 12 bytes with VERSION_1 or MRG_RXBUF, else 10.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.faults import FaultEngine, SpecError, build_rule
from vdev.faults.traffic import HostPeer
from vdev.net.device import Device

frontend_mod = pytest.importorskip("vdev.testing.frontend")

MRG_RXBUF, EVENT_IDX, VERSION_1 = 15, 29, 32
FEATURES_OK = 8
UNKNOWN = 50  # reserved: no device type defines it in virtio 1.2 for net


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Device, FaultEngine, str]]:
    dev = Device()
    dev.add_nic(str(tmp_path / "nic0.sock"))
    dev.start()
    engine = FaultEngine(dev, seed=1)
    yield dev, engine, str(tmp_path / "nic0.sock")
    engine.clear()
    engine.log.close()
    dev.close()


def _features(dev: Device) -> dict[str, int]:
    stats = dev.nics[0].stats_dict()["features"]
    assert isinstance(stats, dict)
    return {k: int(v, 16) for k, v in stats.items()}


def test_offer_adds_and_clears_bits(rig: tuple[Device, FaultEngine, str]) -> None:
    dev, engine, path = rig
    rule = engine.nic(0).feature_offer(bits=[UNKNOWN], clear=[MRG_RXBUF])
    with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
        offered = fe.vhost.backend_features
        assert offered >> UNKNOWN & 1 and not offered >> MRG_RXBUF & 1
        assert not fe.features >> MRG_RXBUF & 1  # the driver acked from what it saw
        f = _features(dev)
        assert f["offered"] >> UNKNOWN & 1 and not f["offered"] >> MRG_RXBUF & 1
    assert rule.hits >= 1  # one per GET_FEATURES (the handshake asks twice, like QEMU)


def test_no_rule_offers_the_device_set(rig: tuple[Device, FaultEngine, str]) -> None:
    dev, _engine, path = rig
    with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
        offered = fe.vhost.backend_features
        assert not offered >> UNKNOWN & 1 and offered >> MRG_RXBUF & 1
        f = _features(dev)
        assert f["acked"] == f["negotiated"] and f["withdrawn"] == f["assumed"] == 0


def test_refuse_drops_features_ok_only_for_the_matching_set(
    rig: tuple[Device, FaultEngine, str],
) -> None:
    _dev, engine, path = rig
    with engine.nic(0).refuse_features(when=[UNKNOWN]):  # never acked: not refused
        with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
            assert fe.vhost.get_status() & FEATURES_OK
    rule = engine.nic(0).refuse_features(when=[VERSION_1])
    with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
        status = fe.vhost.get_status()
        assert not status & FEATURES_OK, f"status {status:#x} kept FEATURES_OK"
        assert status & 0x3 == 0x3  # ACKNOWLEDGE | DRIVER kept
    assert rule.hits == 1
    kinds = [e.kind for e in engine.log.since(0)]
    assert "features_refused" in kinds and "features_ok_cleared" in kinds


SIZE = 60  # the host's test frame


def _one_rx_buffer(fe: Any, dev: Device) -> bytes:
    """The host sends one frame to the guest; the raw bytes of the RX buffer it landed in
    (header included: the test reads the header size off the buffer, not the driver)."""
    peer = HostPeer(dev, name="feat-peer")
    try:
        assert peer.send_frames(dev.nics[0].mac, 1, SIZE) == 1
    finally:
        peer.close()
    q = fe.rxq(0)
    for _ in range(100):
        raw = fe._rx_used(q)
        if raw:
            assert len(raw) == 1
            return bytes(raw[0])
        fe.wait_call(q, 0.05)
    raise AssertionError("no RX buffer came back")


def test_withdrawn_version_1_writes_the_legacy_header(
    rig: tuple[Device, FaultEngine, str],
) -> None:
    dev, engine, path = rig
    mac = dev.nics[0].mac
    rule = engine.nic(0).feature_withdraw(bits=[VERSION_1, MRG_RXBUF])
    with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
        assert fe.features >> VERSION_1 & 1 and fe.features >> MRG_RXBUF & 1
        raw = _one_rx_buffer(fe, dev)
        assert len(raw) == 10 + SIZE, "the device wrote a 12-byte header"
        assert raw[10:16] == mac  # the frame starts 2 bytes early for a modern driver
        f = _features(dev)
        assert f["withdrawn"] == (1 << VERSION_1) | (1 << MRG_RXBUF)
        assert f["acked"] & ~f["negotiated"] == f["withdrawn"]
    assert rule.hits == 1


def test_clean_negotiation_writes_the_modern_header(rig: tuple[Device, FaultEngine, str]) -> None:
    dev, _engine, path = rig
    with frontend_mod.VirtioNetFrontend(path, ring_size=64) as fe:
        raw = _one_rx_buffer(fe, dev)
        assert len(raw) == 12 + SIZE
        assert raw[12:18] == dev.nics[0].mac


def test_assumed_event_idx_reaches_the_rings(rig: tuple[Device, FaultEngine, str]) -> None:
    dev, engine, path = rig
    from vdev.net.nic import DEFAULT_FEATURES

    engine.nic(0).feature_assume(bits=[EVENT_IDX])
    with frontend_mod.VirtioNetFrontend(
        path, ring_size=64, features=DEFAULT_FEATURES & ~(1 << EVENT_IDX)
    ) as fe:
        assert not fe.features >> EVENT_IDX & 1
        _one_rx_buffer(fe, dev)  # traffic: the rings are running
        nic = dev.nics[0]
        rx = nic.vrings[0].queue
        assert rx is not None and rx.event_idx, "the ring did not get the assumed bit"
        f = _features(dev)
        assert f["assumed"] == 1 << EVENT_IDX and not f["acked"] >> EVENT_IDX & 1


def test_feature_specs_are_checked() -> None:
    with pytest.raises(SpecError) as e:
        build_rule({"action": "feature_assume", "bits": [34]})  # the ring layout
    assert "34" in str(e.value)
    with pytest.raises(SpecError):
        build_rule({"action": "feature_offer", "bits": [30]})  # vhost-user's own bit
    with pytest.raises(SpecError) as e2:
        build_rule({"action": "feature_withdraw", "queue": "rx"})
    assert e2.value.key == "queue"
    with pytest.raises(SpecError):
        build_rule({"action": "feature_offer"})  # nothing to change
    rule = build_rule({"action": "refuse_features", "when": [32], "nth": 2})
    assert rule.kind == "features" and rule.describe()["params"] == {"when": [32]}


def test_send_settles_before_returning(rig: tuple[Device, FaultEngine, str]) -> None:
    """``send_frames(settle=...)`` returns only once the NIC wrote (or dropped) the frames:
    a rule removed right after has seen them all.  Without the wait the channel only
    queues them, and the rule's ``seen`` depends on the device thread's timing."""
    dev, engine, path = rig
    with frontend_mod.VirtioNetFrontend(path, ring_size=64):
        rule = engine.nic(0).double_complete(queue="rx", nth=99)  # counts, never fires
        peer = HostPeer(dev, name="settle-peer")
        try:
            for _ in range(5):
                assert peer.send_frames(dev.nics[0].mac, 4, SIZE, settle=2.0) == 4
                seen = rule.seen
                rule.remove()
                assert seen == 4, f"the rule saw {seen} of 4 frames before send returned"
                rule = engine.nic(0).double_complete(queue="rx", nth=99)
        finally:
            peer.close()
        assert rule.seen == 0
