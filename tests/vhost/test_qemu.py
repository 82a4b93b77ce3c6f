"""Interop with the real QEMU 7.2: a Linux guest brings the NIC up against our backend.

The fake device does not move packets; this checks the protocol only: QEMU's handshake, ring
start at DRIVER_OK (ADD_MEM_REG or SET_MEM_TABLE), and the reconnect replay after the backend
drops the connection (``reconnect=1``).  Skips without qemu-system-x86_64 or a built Linux
image (``vdev images build linux``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vdev.eventloop import SelectorLoop
from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.codec import ProtocolFeature, pf_mask
from vdev.vhost.server import VhostUserServer

from .conftest import FakeDevice

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _linux_image() -> tuple[Path, Path] | None:
    try:
        from images.cache import list_artifacts
    except ImportError:
        return None
    for art in list_artifacts():
        if art.name == "linux" and {"kernel", "initrd"} <= set(art.files):
            return art.file("kernel"), art.file("initrd")
    return None


class VersionOnlyDevice(FakeDevice):
    FEATURES = 1 << 32  # VIRTIO_F_VERSION_1


class Loop:
    """Runs a SelectorLoop in a thread; ``call`` runs code in that thread."""

    def __init__(self) -> None:
        self.loop = SelectorLoop()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self) -> None:
        try:
            self.loop.run(self.stop.is_set, poll=0.05)
        except BaseException as exc:  # pragma: no cover
            self.errors.append(exc)

    def call(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            fn()

        self.loop.call_later(0.0, run)

    def close(self, srv: VhostUserServer) -> None:
        self.stop.set()
        self.loop.wake()
        self.t.join(5)
        srv.close()
        self.loop.close()


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_qemu_handshake_start_and_reconnect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One boot covers both memory paths: the first backend offers CONFIGURE_MEM_SLOTS (QEMU
    uses ADD_MEM_REG), the one QEMU reconnects to does not (SET_MEM_TABLE)."""
    caplog.set_level(logging.INFO, logger="vdev.vhost")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed")
    image = _linux_image()
    if image is None:
        pytest.skip("no Linux guest image built (vdev images build linux)")
    kernel, initrd = image
    sock = tmp_path / "vhost.sock"
    dev = VersionOnlyDevice()
    loop = Loop()
    srv = VhostUserServer(dev, sock, loop.loop)
    backends: list[VhostUserBackend] = []
    cmd = [
        qemu, "-machine", "q35,memory-backend=mem", "-m", "256M",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-chardev", f"socket,id=c0,path={sock},reconnect=1",
        "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", "virtio-net-pci,netdev=n0,romfile=,vectors=0",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet vdev.ip=10.0.0.2/24 vdev.noshell=1 vdev.carrier_ms=100",
        "-display", "none", "-nodefaults", "-no-reboot", "-serial", "null",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        _wait(lambda: sorted(dev.started) == [0, 1], 60, "rings never started")
        # QEMU sets DRIVER_OK (GET_STATUS, then SET_STATUS) after the last ring's setup:
        # wait for that message too instead of racing it.
        _wait(lambda: srv.backend is not None and srv.backend.status & 4 != 0, 10, "no DRIVER_OK")
        b1 = srv.backend
        assert b1 is not None
        backends.append(b1)
        assert b1.features & (1 << 30) and b1.status & 4  # DRIVER_OK
        assert b1.mem is not None and b1.mem.total_size == 256 << 20
        assert b1.has_protocol_feature(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        assert not any("memory table:" in r.getMessage() for r in caplog.records)
        # The backend "crashes": QEMU (reconnect=1) replays the whole sequence.
        mask = pf_mask(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        loop.call(lambda: srv.backend_options.update(without_protocol_features=mask))
        loop.call(srv.disconnect)
        _wait(lambda: srv.connections == 2, 20, "QEMU did not reconnect")
        _wait(lambda: sorted(dev.started) == [0, 1], 20, "rings not restarted")
        b2 = srv.backend
        assert b2 is not None and b2 is not b1
        assert b2.mem is not None and b2.mem.total_size == 256 << 20
        assert any("memory table:" in r.getMessage() for r in caplog.records)
        # QEMU 7.2 acks INFLIGHT_SHMFD (it is in its VHOST_USER_PROTOCOL_FEATURE_MASK) but
        # its vhost-user-net never asks for the buffer: only vhost-user-blk and
        # vhost-scsi-common call vhost_dev_get_inflight/vhost_dev_prepare_inflight.
        for b in (b1, b2):
            assert b.has_protocol_feature(ProtocolFeature.INFLIGHT_SHMFD)
            assert b.inflight is None
        assert not any("inflight buffer" in r.getMessage() for r in caplog.records)
        for v in b2.vrings:
            assert v.queue is not None
            # SET_VRING_BASE carried the guest's used index; the queue resumed there.
            assert v.queue.last_avail_idx == v.base == v.queue.used_idx
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        loop.close(srv)
    assert not loop.errors
    assert "disconnected" in dev.names()
    assert not os.path.exists(sock)
