"""The bare driver against the vdev device in one sandbox process (issue #5, host side).

One sandbox (device + QEMU booting the driver) is shared by the module; a host Skywalk channel
on the device's switch is the far end of every frame. Counts are exact on both sides: the
host channel sees every frame the driver sent, the driver's ``rx`` checks every frame's
pattern, and the driver's own ``stats`` agree with what the host reads out of guest RAM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.cli_sandbox import Sandbox
from host.inspect_guest import RING_SYMBOLS
from tests.guest.sandbox_support import (
    Collector,
    drain,
    guest_frames,
    sandbox_fixture,
    send_all,
    to_guest,
)
from vdev.faults import FaultEngine
from vdev.faults.control import request
from vdev.skywalk import Channel

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from sandbox_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def host(sandbox: Sandbox) -> Iterator[Channel]:
    ch = sandbox.channel("host", ring_slots=2048)
    yield ch
    ch.close()


@pytest.fixture
def quiet(sandbox: Sandbox, host: Channel) -> Sandbox:
    """Start each test with an empty host channel and an idle driver."""
    drain(host, quiet=0.05)
    sandbox.cmd("rx 0")
    return sandbox


def test_start_to_prompt_under_a_second(sandbox: Sandbox) -> None:
    assert 0 < sandbox.start_to_prompt < 1.0, sandbox.start_to_prompt


@pytest.mark.parametrize("batch", [1, 32, 255])
def test_tx_bursts_wrap_the_ring(quiet: Sandbox, host: Channel, batch: int) -> None:
    count = 256 * 6 + 7  # wraps the 256-slot TX ring six times, ends mid-ring
    before = quiet.stats()
    col = Collector(host)
    try:
        reply = quiet.cmd(f"tx {count} 60 {batch}", timeout=120)
    finally:
        frames = col.stop()
    assert reply.int("sent") == count
    assert guest_frames(frames) == list(range(count))  # exact, in order, intact
    after = quiet.stats()
    assert after["tx_packets"] - before["tx_packets"] == count
    assert after["tx_completions"] - before["tx_completions"] == count
    assert after["violations"] == 0
    # Everything the driver handed over was consumed: TX ring empty, all slots free again.
    assert after["tx_ring_head"] == after["tx_ring_khead"]
    assert after["tx_ring_head"] == (before["tx_ring_head"] + count) % 256


@pytest.mark.parametrize(("count", "size"), [(1, 60), (700, 60), (700, 1514), (300, 1024)])
def test_rx_from_host_channel(quiet: Sandbox, host: Channel, count: int, size: int) -> None:
    before = quiet.stats()
    quiet.send_line(f"rx {count} 20000")
    time.sleep(0.05)
    send_all(host, to_guest(count, size))
    reply = quiet.wait_reply(timeout=60)
    assert reply.ok, reply.status_line
    assert reply.int("received") == count
    assert reply.int("pattern") == count and reply.int("bad") == 0
    assert reply.int("min") == reply.int("max") == size
    after = quiet.stats()
    assert after["rx_packets"] - before["rx_packets"] == count
    assert after["rx_bytes"] - before["rx_bytes"] == count * size
    assert after["violations"] == 0


def test_tx_backpressure_from_a_stalled_device(quiet: Sandbox, host: Channel) -> None:
    """The device stops consuming TX: the driver's rings fill, then traffic resumes."""
    assert quiet.device is not None
    nf = FaultEngine.for_device(quiet.device).nic(0)
    count = 600
    before = quiet.stats()
    col = Collector(host)
    rule = nf.stall(queue="tx")
    try:
        quiet.send_line(f"tx {count} 60 32")
        # The TX virtqueue (256) takes the first chains, then the Skywalk TX ring fills up.
        deadline = time.monotonic() + 10
        snap = quiet.introspect()
        while snap["rings"]["tx"]["available"] != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            snap = quiet.introspect()
        tx = snap["rings"]["tx"]
        assert tx["available"] == 0, tx  # sk_available_slot_count(tx) == 0
        assert tx["pending"] == tx["num_slots"] - 1
        assert snap["stats"]["tx_ring_full"] > before["tx_ring_full"]
        stalled = snap["stats"]["tx_packets"] - before["tx_packets"]
        assert stalled == 256  # exactly one virtqueue's worth was posted
        time.sleep(0.3)  # still stuck, nothing reached the host
        assert quiet.introspect()["stats"]["tx_packets"] - before["tx_packets"] == stalled
    finally:
        rule.remove()  # the device drains the queue and kicks it
    reply = quiet.wait_reply(timeout=30)
    frames = col.stop()
    assert reply.ok and reply.int("sent") == count, reply.status_line
    assert guest_frames(frames) == list(range(count))


def test_tx_stalled_error_then_resume(quiet: Sandbox, host: Channel) -> None:
    """A device that stays stalled past the driver's 5 s limit gets `ERR tx stalled`; the
    queued frames are not lost: they go out once the device consumes again."""
    assert quiet.device is not None
    nf = FaultEngine.for_device(quiet.device).nic(0)
    col = Collector(host)
    rule = nf.stall(queue="tx")
    try:
        reply = quiet.cmd("tx 600 60 32", timeout=30, check=False)
    finally:
        rule.remove()
    assert not reply.ok and reply.status_line.startswith("ERR tx stalled"), reply.status_line
    queued = reply.int("queued")
    assert queued == 255 + 256  # a full Skywalk TX ring on top of a full virtqueue
    # The next command's syncs post the backlog first (counted in its `sent`: tx_packets).
    assert quiet.cmd("tx 10 60 1").int("sent") == queued - 256 + 10
    frames = col.stop()
    assert guest_frames(frames) == list(range(queued)) + list(range(10))


def test_unread_host_channel_drops_at_the_switch(quiet: Sandbox) -> None:
    """A host channel that is not read does not block the guest: like a real switch the
    device drops what the port cannot take (counted), and the guest's TX never stalls."""
    assert quiet.device is not None
    ch = quiet.channel("lazy", ring_slots=64)
    try:
        drops0 = quiet.device.switch.stats["lazy"].drops
        reply = quiet.cmd("tx 500 60 32")
        assert reply.int("sent") == 500
        got = drain(ch)
        drops = quiet.device.switch.stats["lazy"].drops - drops0
        assert len(got) + drops == 500 and drops > 0
        assert guest_frames(got) == list(range(len(got)))
    finally:
        ch.close()


def test_reset_and_reinit_mid_traffic(quiet: Sandbox, host: Channel) -> None:
    resets0 = quiet.stats()["resets"]
    # Host traffic in flight toward the guest while it resets its device.
    send_all(host, to_guest(100, 200))
    assert quiet.cmd("reset").int("resets") == resets0 + 1
    assert quiet.cmd("features event_idx=0 mrg_rxbuf=0").fields["event_idx"] == "0"
    drain(host, quiet=0.1)
    # After re-init both directions work and count exactly.
    col = Collector(host)
    try:
        assert quiet.cmd("tx 700 128 32").int("sent") == 700
    finally:
        frames = col.stop()
    assert guest_frames(frames) == list(range(700))
    quiet.send_line("rx 300 20000")
    time.sleep(0.05)
    send_all(host, to_guest(300, 300))
    reply = quiet.wait_reply(60)
    assert reply.ok and reply.int("received") == 300 and reply.int("bad") == 0
    assert quiet.cmd("features event_idx=1 mrg_rxbuf=1").fields["event_idx"] == "1"
    assert quiet.cmd("tx 300 60 32").int("sent") == 300
    drain(host, quiet=0.1)
    assert quiet.stats()["violations"] == 0


def test_introspection_agrees_with_driver_stats(quiet: Sandbox, host: Channel) -> None:
    col = Collector(host)
    try:
        quiet.cmd("tx 333 100 16")
    finally:
        col.stop()
    quiet.send_line("rx 50 20000")
    time.sleep(0.05)
    send_all(host, to_guest(60, 90))  # 10 more than taken: they wait in RX slots
    assert quiet.wait_reply(30).int("received") == 50
    quiet.cmd("rx 0")  # harvest the rest into the RX ring
    console = quiet.stats()
    snap = quiet.introspect()
    for key in (
        "tx_packets",
        "rx_packets",
        "tx_syncs",
        "rx_syncs",
        "tx_completions",
        "rx_bytes",
        "violations",
        "pool_packets_in_use",
    ):
        assert snap["stats"][key] == console[key], key
    for ring in ("tx", "rx"):
        for idx in ("head", "khead", "tail"):
            assert snap["rings"][ring][idx] == console[f"{ring}_ring_{idx}"], (ring, idx)
    assert snap["rings"]["rx"]["available"] == 10  # the extra frames sit in RX slots
    assert snap["rings"]["alloc"]["available"] == console["alloc_ring_ready"]
    assert set(snap["rings"]) == set(RING_SYMBOLS)
    assert snap["info"]["mac"] == "52:54:00:12:34:56" and snap["info"]["tx_qsize"] == 256
    # The same snapshot through the sandbox's control socket (what `vdev inspect` prints).
    assert quiet.ctl_path is not None
    reply = request(str(quiet.ctl_path), {"cmd": "introspect"})
    assert reply["ok"] and reply["stats"] == snap["stats"] and reply["rings"] == snap["rings"]
    # Device side of the same virtqueue: it consumed exactly what the driver published.
    vq = quiet.cmd("vq").pairs()
    tx_vring = next(v for v in reply["device"]["vrings"] if v["kind"] == "tx")
    assert tx_vring["last_avail_idx"] % 65536 == int(vq["avail_idx"], 0) % 65536
    quiet.cmd("rx 10 1000")  # leave the ring empty for the next test


def test_vdev_inspect_cli(quiet: Sandbox) -> None:
    """`vdev inspect --socket CTL` (another process) prints rings, pool and counters."""
    assert quiet.ctl_path is not None
    tx_packets = quiet.stats()["tx_packets"]
    cmd = [sys.executable, "-m", "host.cli", "inspect", "--socket", str(quiet.ctl_path)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.strip()}
    assert {"tx", "rx", "alloc", "free", "pool:", "stats:"} <= rows.keys(), res.stdout
    assert f"tx_packets={tx_packets}" in res.stdout
    assert "device tx0: last_avail_idx=" in res.stdout
    js = subprocess.run([*cmd, "--json"], cwd=REPO, capture_output=True, text=True, timeout=30)
    snap = json.loads(js.stdout)
    assert snap["stats"]["tx_packets"] == tx_packets and snap["rings"]["tx"]["num_slots"] == 256


def test_vdev_inspect_without_sandbox(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "host.cli", "inspect", "--socket", str(tmp_path / "none.sock")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "is `vdev sandbox` running?" in res.stderr
