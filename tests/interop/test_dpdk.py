"""Interop with a real third-party vhost-user frontend: DPDK testpmd's net_virtio_user.

testpmd (a C virtio driver written against the spec, not against vdev) connects to the
device's socket.  Frames are counted at both ends and compared:

* testpmd txonly -> vdev -> host channel: every frame the device took from the TX ring
  (tx0 ``frames``) is either on the channel or counted as a switch drop of the host port,
  and testpmd's TX-packets bounds tx0 from above (and from below by one ring of frames
  that may still sit unconsumed when testpmd stops the port).
* host channel -> vdev -> testpmd rxonly: exactly N frames sent, exactly N RX-packets.
* the same txonly run against the ``vdev serve`` CLI, counted from its --json statistics.

The first two run twice: split rings, and packed rings (``packed_vq=1``: virtio_user then
negotiates VIRTIO_F_RING_PACKED, virtio 1.x 2.8, which the device must have negotiated).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.net.device import Device
from vdev.net.nic import VirtioNet
from vdev.skywalk import Pbufpool
from vdev.testing.frames import HOST_MAC, numbered
from vdev.testing.pools import streaming_pool
from vdev.virtio.queue import F_RING_PACKED

from .testpmd import TESTPMD, Testpmd

pytestmark = [
    pytest.mark.dpdk,
    pytest.mark.skipif(
        TESTPMD is None,
        reason="dpdk-testpmd not found (apt-get install dpdk dpdk-dev; scripts/setup.sh does)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="DPDK EAL needs root for /var/run/dpdk"),
]

REPO = Path(__file__).resolve().parents[2]
VIRTIO_USER_MAC = "52:54:00:d7:d7:01"
RING = 256  # virtio_user's default queue size: frames that may be unconsumed at stop
TXONLY_SECONDS = 2.0


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def virtio_user(path: str, packed: bool = False) -> str:
    vdev = f"net_virtio_user0,path={path},queues=1,server=0,mac={VIRTIO_USER_MAC}"
    return vdev + (",packed_vq=1" if packed else "")


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def check_ring_kind(device: Device, packed: bool) -> None:
    """The NIC negotiated exactly the ring layout testpmd was asked for."""
    negotiated = device.nics[0].negotiated
    assert bool(negotiated & F_RING_PACKED) == packed, hex(negotiated)
    vring = device.nics[0].vrings.get(1) or device.nics[0].vrings.get(0)
    assert vring is not None and vring.queue is not None
    assert type(vring.queue).__name__ == ("PackedQueue" if packed else "SplitQueue")


def queue_stats(stats: dict[str, Any], name: str) -> dict[str, Any]:
    q: dict[str, Any] = stats["nics"][0]["queues"][name]
    return q


def wait_queue(nic: VirtioNet, index: int, timeout: float = 15.0) -> None:
    """Until testpmd has started and enabled virtqueue ``index``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vring = nic.vrings.get(index)
        if vring is not None and vring.enabled and vring.queue is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"testpmd did not start queue {index} within {timeout}s")


@pytest.fixture
def sock(tmp_path: Path) -> str:
    path = str(tmp_path / "nic0.sock")
    assert len(path) < 100 and "," not in path, path  # sun_path; devargs split on ','
    return path


@pytest.fixture
def device(sock: str) -> Iterator[Device]:
    pool = streaming_pool()
    dev = Device(pool=pool)
    nic = dev.add_nic(sock, mac=VIRTIO_USER_MAC)
    nic.offered |= F_RING_PACKED  # offered whatever the default; packed_vq decides
    dev.start()
    try:
        yield dev
    finally:
        dev.close()
        assert dev.pool.stats.in_use == 0, f"pool leak: {dev.pool.stats_dict()}"


def test_testpmd_txonly_to_host_channel(
    device: Device, sock: str, tmp_path: Path, packed: bool
) -> None:
    ch = device.open_channel("host", ring_slots=4096)
    # Let the switch learn the host MAC, so testpmd's frames are unicast to the channel
    # (the learning frame floods to the responder and to nic0, whose RX ring is still down).
    assert ch.send([numbered(b"\xff" * 6, HOST_MAC, 0)]) == 1
    assert device.switch.fdb.get(HOST_MAC) == "host"

    received = 0
    samples: list[bytes] = []
    stop = threading.Event()

    def drain() -> None:
        nonlocal received
        while not stop.is_set():
            frames = ch.recv(4096, timeout=0.05)
            received += len(frames)
            if len(samples) < 4:
                samples.extend(frames[: 4 - len(samples)])

    drainer = threading.Thread(target=drain, name="drain", daemon=True)
    drainer.start()
    try:
        with Testpmd(
            virtio_user(sock, packed),
            "txonly",
            tmp_path / "testpmd.log",
            eth_peer=mac_str(HOST_MAC),
        ) as tp:
            wait_queue(device.nics[0], 1)
            check_ring_kind(device, packed)
            time.sleep(TXONLY_SECONDS)
            final = tp.stop()
        # testpmd has closed the port: nothing more can arrive; collect the rest.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            stats = device.stats()
            host = stats["switch"]["host"]  # type: ignore[index]
            if received >= host["rx_frames"]:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        drainer.join(5)
    received += len(ch.recv(4096, timeout=0.1))

    stats = device.stats()
    tx0 = queue_stats(stats, "tx0")
    host = stats["switch"]["host"]  # type: ignore[index]
    print(f"testpmd {final}; vdev tx0 {tx0}; host port {host}; channel received {received}")
    assert final.tx_packets > 0 and received > 0
    assert tx0["kills"] == {} and tx0["drops"] == 0, tx0
    # Everything the switch handed to the host port reached the channel ...
    assert received == host["rx_frames"]
    # ... and every frame vdev took off the TX ring went there (or is a counted drop).
    assert tx0["frames"] == host["rx_frames"] + host["drops"]
    assert device.responder.stats.udp_sink_packets == 0  # unicast: nothing flooded
    # testpmd's count of frames it put on the ring bounds what vdev consumed.
    assert final.tx_packets - RING <= tx0["frames"] <= final.tx_packets
    for frame in samples:
        assert len(frame) == 64
        assert frame[0:6] == HOST_MAC and mac_str(frame[6:12]) == VIRTIO_USER_MAC
        assert frame[12:14] == b"\x08\x00"  # testpmd's txonly IPv4/UDP frame


def test_host_channel_to_testpmd_rxonly(
    device: Device, sock: str, tmp_path: Path, packed: bool
) -> None:
    n_frames = 3000
    nic = device.nics[0]
    ch = device.open_channel("host", ring_slots=1024)
    dst = bytes.fromhex(VIRTIO_USER_MAC.replace(":", ""))
    frames = [numbered(dst, HOST_MAC, i, 64 + (i % 4) * 300) for i in range(n_frames)]
    # --no-flush-rx: testpmd otherwise discards what is already in its RX ring when it
    # starts forwarding, i.e. frames vdev delivered between queue enable and that moment.
    with Testpmd(
        virtio_user(sock, packed), "rxonly", tmp_path / "testpmd.log", extra=("--no-flush-rx",)
    ) as tp:
        wait_queue(nic, 0)
        check_ring_kind(device, packed)
        sent = 0
        deadline = time.monotonic() + 15
        while sent < n_frames and time.monotonic() < deadline:
            sent += ch.send(frames[sent : sent + 128])
            # Stay within the NIC's RX backlog: wait until vdev has written them out.
            while nic.stats[0].frames + nic.stats[0].drops < sent:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.001)
        assert sent == n_frames
        time.sleep(0.5)  # testpmd polls continuously; let it take the last burst
        final = tp.stop()
    rx0 = queue_stats(device.stats(), "rx0")
    print(f"testpmd {final}; vdev rx0 {rx0}")
    assert rx0["frames"] == n_frames and rx0["drops"] == 0 and rx0["kills"] == {}, rx0
    assert final.rx_packets == n_frames and final.rx_dropped == 0, final


def test_vdev_serve_cli_with_testpmd_txonly(sock: str, tmp_path: Path) -> None:
    serve = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "serve", "--socket", sock, "--json"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert serve.poll() is None, serve.communicate()
            assert time.monotonic() < deadline, "vdev serve did not create its socket"
            time.sleep(0.05)
        with Testpmd(virtio_user(sock), "txonly", tmp_path / "testpmd.log") as tp:
            time.sleep(TXONLY_SECONDS + 0.5)  # no in-process hook here: includes startup
            final = tp.stop()
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=15)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
    assert serve.returncode == 0, err
    stats = json.loads(out[out.index("{") :])
    tx0 = queue_stats(stats, "tx0")
    print(f"testpmd {final}; vdev serve tx0 {tx0}")
    assert tx0["frames"] > 0
    assert final.tx_packets - RING <= tx0["frames"] + tx0["drops"] <= final.tx_packets
    for nic in stats["nics"]:
        for q in nic["queues"].values():
            assert q["kills"] == {}, nic
    assert stats["nics"][0]["connections"] == 1
    assert not os.path.exists(sock)  # serve removed its socket


def test_virtio_user_server_mode_survives_a_backend_crash(
    sock: str, tmp_path: Path, packed: bool
) -> None:
    """DPDK virtio_user in server mode (``server=1``) listens; the device dials in as a
    client (vdev/vhost/server.py), retrying on the loop while nobody listens yet.  After a
    backend crash (Device.disconnect, the fault engine's crash_backend) the device dials
    again and virtio_user takes the new connection in place of the dead one: TX resumes."""
    dev = Device(pool=Pbufpool(num_packets=8192, buf_size=2048, max_frags=4))
    try:
        nic = dev.add_nic(sock, mac=VIRTIO_USER_MAC, client=True)  # nobody listens yet
        nic.offered |= F_RING_PACKED  # packed_vq decides
        dev.start()
        time.sleep(0.5)  # a few retries against a missing socket, none blocking the loop
        assert dev.sockets[0].connections == 0 and dev.sockets[0].server.attempts >= 2
        vdev = f"net_virtio_user0,path={sock},queues=1,server=1,mac={VIRTIO_USER_MAC}"
        vdev += ",packed_vq=1" if packed else ""
        with Testpmd(vdev, "txonly", tmp_path / "testpmd.log", max_seconds=40) as tp:
            wait_queue(nic, 1, timeout=20)
            check_ring_kind(dev, packed)
            deadline = time.monotonic() + 10
            while nic.stats[1].frames == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert nic.stats[1].frames > 0, tp.output()[-2000:]
            assert dev.disconnect(nic)  # the backend "crashes"
            before = nic.stats[1].frames
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if dev.sockets[0].connections == 2 and nic.stats[1].frames > before + 1000:
                    break
                time.sleep(0.05)
            tp.stop()
        assert dev.sockets[0].connections == 2, dev.stats()
        assert nic.stats[1].frames > before + 1000, (before, nic.stats[1].frames)
        assert queue_stats(dev.stats(), "tx0")["kills"] == {}
    finally:
        dev.close()
    assert dev.pool.stats.in_use == 0
