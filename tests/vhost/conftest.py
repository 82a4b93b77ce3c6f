"""Fixtures for the vhost-user tests: a fake device, a threaded backend server, fd checks."""

from __future__ import annotations

import os
import selectors
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vdev.skywalk.errors import SyncKind
from vdev.vhost.backend import VhostUserBackend, Vring
from vdev.vhost.connection import Listener
from vdev.virtio.memory import GuestMemory


class FakeDevice:
    """Records every callback; offers VERSION_1 | EVENT_IDX | MRG_RXBUF-ish bits."""

    FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 15) | (1 << 5)

    def __init__(self, queues: int = 2, protocol: int = 0) -> None:
        self.queues = queues
        self.protocol = protocol
        self.events: list[tuple[Any, ...]] = []
        self.started: dict[int, Vring] = {}
        self.enabled_at_start: list[tuple[int, bool]] = []
        self.mtu: int | None = None
        self.kicks: list[int] = []
        self.lock = threading.Lock()

    def _log(self, *ev: Any) -> None:
        with self.lock:
            self.events.append(ev)

    def device_features(self) -> int:
        return self.FEATURES

    def protocol_features(self) -> int:
        return self.protocol

    def max_queues(self) -> int:
        return self.queues

    def queue_direction(self, index: int) -> SyncKind:
        return SyncKind.TX if index % 2 else SyncKind.RX  # numbered like virtio-net

    def features_set(self, features: int) -> None:
        self._log("features_set", features)

    def queue_started(self, vring: Vring) -> None:
        assert vring.queue is not None and vring.kick_fd is not None
        self.started[vring.index] = vring
        self.enabled_at_start.append((vring.index, vring.enabled))
        self._log("queue_started", vring.index)

    def queue_stopped(self, vring: Vring) -> None:
        # The queue must still be there so the device can flush; GET_VRING_BASE reads after.
        self.started.pop(vring.index, None)
        self._log("queue_stopped", vring.index, vring.queue is not None)

    def queue_disabling(self, vring: Vring) -> None:
        assert vring.enabled  # called before the ring is marked disabled
        self._log("queue_disabling", vring.index)

    def queue_kicked(self, vring: Vring) -> None:
        assert self.started.get(vring.index) is vring  # only started rings are kicked
        self.kicks.append(vring.index)
        self._log("queue_kicked", vring.index)

    def memory_changed(self, mem: GuestMemory) -> None:
        self._log("memory_changed", [(r.gpa, r.size, r.uva) for r in mem.regions])

    def set_mtu(self, mtu: int) -> None:
        if mtu > 9000:
            raise ValueError(f"mtu {mtu} too large for this device")
        self.mtu = mtu
        self._log("set_mtu", mtu)

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def disconnected(self) -> None:
        self.started.clear()
        self._log("disconnected")

    def names(self) -> list[str]:
        with self.lock:
            return [e[0] for e in self.events]


class BackendServer:
    """A vhost-user server thread: accepts connections one after another, each served by a
    fresh VhostUserBackend, until stopped.  Any exception escaping the library is recorded
    (the tests assert there are none)."""

    def __init__(self, path: Path, device: FakeDevice) -> None:
        self.path = path
        self.device = device
        self.listener = Listener(path)
        self.backends: list[VhostUserBackend] = []
        self.errors: list[BaseException] = []
        self.disconnects = 0
        self._stop_r, self._stop_w = os.pipe()
        self._idle = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def backend(self) -> VhostUserBackend:
        return self.backends[-1]

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        sel.register(self.listener, selectors.EVENT_READ, "listen")
        try:
            while True:
                events = sel.select(timeout=0.05)
                if not events:
                    self._idle.set()
                for key, _ in events:
                    if key.data == "stop":
                        for b in self.backends:
                            b.close()
                        return
                    if key.data == "listen":
                        conn = self.listener.accept(0)
                        if conn is not None:
                            b = VhostUserBackend(self.device, conn)
                            self.backends.append(b)
                            sel.register(b, selectors.EVENT_READ, b)
                        continue
                    b = key.data
                    self._idle.clear()
                    if not b.handle_readable():
                        sel.unregister(b)
                        self.disconnects += 1
        except BaseException as exc:  # pragma: no cover - would be a library bug
            self.errors.append(exc)
            raise
        finally:
            sel.close()

    def wait_idle(self, timeout: float = 2.0) -> None:
        """Wait until the server has drained its sockets (for state checks from the test)."""
        self._idle.clear()
        if not self._idle.wait(timeout):
            raise TimeoutError("backend server never went idle")

    def wait_disconnects(self, n: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while self.disconnects < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.disconnects} disconnects, expected {n}")
            time.sleep(0.01)

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fd_targets(fds: set[str]) -> dict[str, str]:
    out = {}
    for fd in fds:
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it ends with more fds open than it started with."""
    before = open_fds()
    yield
    after = open_fds()
    # The listdir itself briefly holds an fd; ignore fds that vanished meanwhile.
    leaked = fd_targets(after - before)
    assert not leaked, f"leaked fds: {leaked}"


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def server(tmp_path: Path, device: FakeDevice, no_fd_leak: None) -> Iterator[BackendServer]:
    srv = BackendServer(tmp_path / "vhost.sock", device)
    try:
        yield srv
    finally:
        srv.stop()
    assert not srv.errors, srv.errors
