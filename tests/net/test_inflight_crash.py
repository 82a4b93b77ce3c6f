"""A back-end crash in the middle of a TX burst, then exact counts (issue 12, item 2).

The crash point (vdev.faults.crash) fires with ``in_flight`` chains taken from the avail ring
and not yet published in the used ring.  What the front-end says with SET_VRING_BASE on
reconnect decides what happens to them:

- with the inflight protocol (INFLIGHT_SHMFD), the region decides whatever the base says:
  the chains in flight are resubmitted, oldest first, and every frame reaches the host
  exactly once;
- without it, a base that claims everything posted was consumed ("avail") loses the chains
  in flight and everything behind them (the oracle: the host sees exactly the frames before
  the crash batch) — the same scenario, so the inflight case is not passing by accident;
- DPDK virtio_user's base 0 makes the device adopt the used idx in guest memory, and the
  ``ring_resume`` event carries both values.

The oracle is the sequence numbers the test wrote into the frames, counted at a host
channel, plus the driver's own count of TX completions.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from host.restart_loops import Serve
from vdev.faults import FaultEngine
from vdev.faults.control import request
from vdev.net.device import Device
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered, seq_of
from vdev.testing.frontend import VirtioNetFrontend
from vdev.vhost.frontend import FrontendConfig

from .conftest import drain_channel

BURST = 200  # one kick, one batch (TX_BUDGET is 256)
BEFORE = 60  # frames of a first burst, completed before the crash
IN_FLIGHT = 17


def _wait(cond: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _crash_mid_burst(
    device: Device, path: str, *, inflight: bool, base: str, packed: bool = False
) -> tuple[Counter[int], int, VirtioNetFrontend, FaultEngine]:
    """Send BEFORE frames, arm the crash, send BURST more; reconnect with ``base``; return
    the host's count per sequence number, the driver's TX completions, the frontend."""
    engine = FaultEngine.for_device(device, seed=1)
    ch = device.open_channel("host", ring_slots=1024)  # room for every frame of the run
    fe = VirtioNetFrontend(path, config=FrontendConfig(inflight=inflight), packed=packed)
    assert (fe.vhost.inflight_fd is not None) == inflight
    assert fe.send([numbered(HOST_MAC, GUEST_MAC, i) for i in range(BEFORE)]) == BEFORE
    got = drain_channel(ch, BEFORE)
    done = [0]

    def reaped() -> bool:
        done[0] += fe.reap_tx()
        return done[0] == BEFORE

    assert _wait(reaped)
    completed = done[0]
    engine.crash_point(0, after_frames=1, in_flight=IN_FLIGHT, mode="drop")
    frames = [numbered(HOST_MAC, GUEST_MAC, BEFORE + i) for i in range(BURST)]
    assert fe.send(frames) == BURST
    assert _wait(lambda: any(e.kind == "backend_crash" for e in engine.log.events))
    time.sleep(0.1)
    fe.reconnect(path, base=base)
    got += drain_channel(ch, BURST, timeout=3)
    got += ch.recv(256, timeout=0.2)  # anything extra (a duplicate) would show here
    deadline = time.monotonic() + 3
    while completed < BEFORE + BURST and time.monotonic() < deadline:
        completed += fe.reap_tx()
        time.sleep(0.01)
    ch.close()
    return Counter(seq_of(f) for f in got), completed, fe, engine


def test_inflight_resubmits_exactly_what_was_in_flight(nic_path: str, device: Device) -> None:
    counts, completed, fe, engine = _crash_mid_burst(device, nic_path, inflight=True, base="avail")
    try:
        crash = next(e for e in engine.log.events if e.kind == "backend_crash")
        assert crash.detail["in_flight"] == IN_FLIGHT
        # Nothing lost, nothing twice: every number exactly once.
        assert sorted(counts) == list(range(BEFORE + BURST))
        assert set(counts.values()) == {1}
        assert completed == BEFORE + BURST  # every TX buffer came back to the driver
        resumes = {r["queue"]: r for r in device.nics[0].resumes}
        # RX: the base claimed all 256 posted buffers consumed; none was in flight.
        assert resumes[0] == {
            "queue": 0, "base": 256, "used_idx": 0, "resumed_at": 0, "resubmitted": 0,
            "source": "inflight",
        }  # fmt: skip
        resume = resumes[1]
        # TX: the region decided: IN_FLIGHT resubmitted from the used idx, not the base.
        assert resume["source"] == "inflight"
        assert resume["resubmitted"] == IN_FLIGHT
        assert resume["base"] == BEFORE + BURST
        assert resume["used_idx"] == BEFORE
        assert resume["resumed_at"] == BEFORE + IN_FLIGHT
        ev = next(e for e in engine.log.events if e.kind == "ring_resume" and e.queue == 1)
        assert ev.queue == 1 and ev.detail["base"] == BEFORE + BURST
        assert not device.nics[0].kill_log
    finally:
        fe.close()


def test_without_inflight_a_stale_base_loses_the_burst(nic_path: str, device: Device) -> None:
    counts, completed, fe, _engine = _crash_mid_burst(
        device, nic_path, inflight=False, base="avail"
    )
    try:
        # Only the first burst arrived: the crash batch was never published, and the base
        # told the device that all of it (and the rest of the burst) had been consumed.
        assert sorted(counts) == list(range(BEFORE))
        assert completed == BEFORE
        assert device.nics[0].resumes == []  # a non-zero base is the front-end's word
    finally:
        fe.close()


@pytest.mark.parametrize("inflight", [False, True])
def test_base_zero_resumes_at_the_used_idx_with_an_event(
    nic_path: str, device: Device, inflight: bool
) -> None:
    """DPDK virtio_user in server mode sends base 0 on reconnect: the used idx is adopted
    (or, with inflight, the region decides) and the event carries base and used idx."""
    counts, completed, fe, engine = _crash_mid_burst(
        device, nic_path, inflight=inflight, base="zero"
    )
    try:
        assert sorted(counts) == list(range(BEFORE + BURST))
        assert set(counts.values()) == {1}
        assert completed == BEFORE + BURST
        (resume,) = device.nics[0].resumes  # RX: base 0 = used idx 0, nothing to report
        assert resume["queue"] == 1
        assert resume["base"] == 0 and resume["used_idx"] == BEFORE
        assert resume["source"] == ("inflight" if inflight else "used_idx")
        assert resume["resumed_at"] == BEFORE + (IN_FLIGHT if inflight else 0)
        kinds = [e.kind for e in engine.log.events]
        assert "ring_resume" in kinds
    finally:
        fe.close()


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_sigkill_mid_burst_then_restart_is_exact(tmp_path: Path, packed: bool) -> None:
    """The real thing: ``vdev serve`` dies by SIGKILL (crash point mode "exit", armed through
    the control socket) with IN_FLIGHT chains taken and unpublished; a new ``vdev serve``
    starts on the same sockets, both front-ends reconnect, and NIC B receives every frame
    NIC A sent exactly once."""
    sa, sb, ctl = tmp_path / "a.sock", tmp_path / "b.sock", tmp_path / "ctl.sock"
    serve = Serve(sa, ctl, tmp_path / "serve.log", extra=("--socket", str(sb)))
    serve.start()
    fa = fb = None
    try:
        fa = VirtioNetFrontend(str(sa), config=FrontendConfig(inflight=True), packed=packed)
        fb = VirtioNetFrontend(str(sb), config=FrontendConfig(inflight=True), packed=packed)
        mac_a, mac_b = b"\x52\x54\x00\x12\x34\x56", b"\x52\x54\x00\x12\x34\x57"
        assert fa.send([numbered(mac_b, mac_a, i) for i in range(BEFORE)]) == BEFORE
        got = fb.recv(BEFORE, timeout=5)
        assert len(got) == BEFORE
        reply = request(str(ctl), {"cmd": "crash", "nic": 0, "after_frames": 1,
                                   "in_flight": IN_FLIGHT, "mode": "exit"})  # fmt: skip
        assert reply["ok"], reply
        reaped = [0]

        def reap() -> bool:
            reaped[0] += fa.reap_tx()
            return reaped[0] == BEFORE

        assert _wait(reap)
        assert fa.send([numbered(mac_b, mac_a, BEFORE + i) for i in range(BURST)]) == BURST
        assert serve.proc is not None
        serve.proc.wait(10)
        assert serve.proc.returncode == -signal.SIGKILL
        assert fa.reap_tx() == 0  # the crash batch was never published
        serve.start()
        fb.reconnect(str(sb), base="used")
        fa.reconnect(str(sa), base="avail")  # a base that disagrees: the region decides
        got += fb.recv(BURST, timeout=10)
        got += fb.recv(10, timeout=0.3)  # a duplicate would show here
        counts = Counter(seq_of(f) for f in got)
        assert sorted(counts) == list(range(BEFORE + BURST)), len(counts)
        assert set(counts.values()) == {1}
        stats = serve.stats()
        resumes = {r["queue"]: r for r in stats["nics"][0]["resumes"]}
        assert resumes[1]["resubmitted"] == IN_FLIGHT
        assert resumes[1]["used_idx"] == (BEFORE | 1 << 15 if packed else BEFORE)
        assert all(not q["kills"] for n in stats["nics"] for q in n["queues"].values())
    finally:
        for fe in (fa, fb):
            if fe is not None:
                fe.close()
        serve.stop()
        serve.close()
    assert not sa.exists() and not sb.exists() and not ctl.exists()


@pytest.mark.parametrize("inflight", [True, False])
def test_packed_crash_mid_burst(nic_path: str, device: Device, inflight: bool) -> None:
    """Packed rings: the front-end comes back with the fresh base (index 0, wrap 1), as QEMU
    does after a back-end crash (a packed ring has nothing in memory to restore a base
    from).  With the inflight region every frame arrives exactly once; without it the base
    is stale (reported as packed_stale) and nothing after the crash arrives."""
    counts, completed, fe, _engine = _crash_mid_burst(
        device, nic_path, inflight=inflight, base="used", packed=True
    )
    try:
        assert fe.packed
        resumes = {r["queue"]: r for r in device.nics[0].resumes}
        if inflight:
            assert sorted(counts) == list(range(BEFORE + BURST))
            assert set(counts.values()) == {1}
            assert completed == BEFORE + BURST
            tx = resumes[1]
            assert tx["source"] == "inflight" and tx["resubmitted"] == IN_FLIGHT
            assert tx["base"] == 0x8000 and tx["resumed_at"] == BEFORE | 1 << 15
        else:
            assert sorted(counts) == list(range(BEFORE))
            assert completed == BEFORE
            tx = resumes[1]
            # Entry 0 was used, then posted again a lap ahead by the burst: stale.
            assert tx["source"] == "packed_stale" and tx["base"] == 0x8000
        assert not device.nics[0].kill_log
    finally:
        fe.close()
