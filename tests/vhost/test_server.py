"""VhostUserServer: the one connection path (accept or dial, one backend per connection,
reconnect, kick-fd watches on the caller's loop).  ``Device.add_nic`` (and so ``vdev serve``)
serves every NIC through it; these tests drive it with a bare :class:`SelectorLoop` and the
fake device."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vdev.eventloop import Callback, SelectorLoop
from vdev.vhost.codec import Request
from vdev.vhost.connection import Listener, PeerClosed
from vdev.vhost.frontend import FrontendMemory, VhostUserFrontend
from vdev.vhost.server import RETRY_INTERVAL, VhostUserServer

from .conftest import FakeDevice
from .helpers import close_rings, qemu_start


@contextmanager
def running(loop: SelectorLoop) -> Iterator[None]:
    """Run ``loop`` in a thread; any exception escaping a poll fails the test."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run(stop.is_set, poll=0.02)
        except BaseException as exc:  # pragma: no cover - would be a library bug
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        yield
    finally:
        stop.set()
        loop.wake()
        t.join(5)
        assert not t.is_alive()
    assert not errors


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


Served = tuple[FakeDevice, SelectorLoop, VhostUserServer]


@pytest.fixture
def served(tmp_path: Path, no_fd_leak: None) -> Iterator[Served]:
    """A fake device served in server mode on a fresh loop; closed (in this thread, once
    the test has stopped the loop) and checked to leave no watch behind."""
    dev = FakeDevice()
    loop = SelectorLoop()
    before = set(loop.sel.get_map())
    srv = VhostUserServer(dev, tmp_path / "s.sock", loop)
    yield dev, loop, srv
    srv.close()
    assert set(loop.sel.get_map()) == before  # no listener, connection or kick fd left
    loop.close()
    assert not (tmp_path / "s.sock").exists()


def test_server_mode_serves_connections_in_turn(served: Served) -> None:
    dev, loop, srv = served
    with running(loop), FrontendMemory() as mem:
        for round_ in range(2):
            with VhostUserFrontend.connect(srv.path) as fe:
                rings = qemu_start(fe, mem, num=32)
                try:
                    assert fe.get_vring_base(1) == 0
                finally:
                    close_rings(rings)
            wait_for(lambda: not srv.connected, "disconnect not seen")
            assert dev.names().count("disconnected") == round_ + 1
        assert srv.connections == 2 and srv.replaced == 0


def test_a_new_connection_replaces_the_active_one(served: Served) -> None:
    """Decision (vdev/vhost/server.py): a front-end connects again only after giving up on
    its old connection, which this side may not have seen die; the newcomer wins."""
    dev, loop, srv = served
    with running(loop), FrontendMemory() as mem:
        with VhostUserFrontend.connect(srv.path) as first:
            rings = qemu_start(first, mem, num=32)
            try:
                wait_for(lambda: sorted(dev.started) == [0, 1], "rings never started")
                first_backend = srv.backend
                with VhostUserFrontend.connect(srv.path) as second:
                    second.handshake()  # served: the handshake gets its replies
                    assert second.queue_num == 2
                    assert srv.backend is not first_backend and srv.connected
                    # The replaced connection is closed: its next request sees EOF.
                    with pytest.raises(PeerClosed):
                        first.send_raw(Request.GET_FEATURES)
                        first.recv_reply(timeout=2)
                    assert first_backend is not None and first_backend.closed
                    # Its rings were stopped and the device told, before the new session.
                    names = dev.names()
                    cut = names.index("disconnected")
                    assert names[:cut].count("queue_stopped") == 2
                    assert dev.started == {}
                assert srv.connections == 2 and srv.replaced == 1
            finally:
                close_rings(rings)
        wait_for(lambda: not srv.connected, "disconnect not seen")


class ManualLoop:
    """An EventLoop that records watches and timers and runs nothing by itself."""

    def __init__(self) -> None:
        self.watched: dict[int, Callback] = {}
        self.timers: list[tuple[float, Callback]] = []

    def watch(self, fd: int, callback: Callback) -> None:
        self.watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def call_later(self, delay: float, fn: Callback) -> None:
        self.timers.append((delay, fn))

    def run_timers(self) -> None:
        due, self.timers = self.timers, []
        for _, fn in due:
            fn()


def test_client_mode_schedules_retries_and_never_blocks(tmp_path: Path, no_fd_leak: None) -> None:
    """Nobody listens: each attempt is one non-blocking connect, and the next one is a timer
    on the loop (no sleep, no wait inside the constructor or a callback)."""
    path = tmp_path / "qemu.sock"
    loop = ManualLoop()
    srv = VhostUserServer(FakeDevice(), path, loop, client=True)
    assert srv.attempts == 1 and not srv.connected
    assert [d for d, _ in loop.timers] == [RETRY_INTERVAL]
    loop.run_timers()  # still nobody: one more attempt, one more timer
    assert srv.attempts == 2 and [d for d, _ in loop.timers] == [RETRY_INTERVAL]
    with Listener(path) as lst:
        loop.run_timers()
        assert srv.attempts == 3 and srv.connected and loop.timers == []
        assert srv.backend is not None and srv.backend.fileno() in loop.watched
        fe = VhostUserFrontend.accept(lst, timeout=5)
        fe.close()
        # The front-end went away: the readable callback sees EOF and schedules a redial.
        loop.watched[srv.backend.fileno()]()
        assert not srv.connected and [d for d, _ in loop.timers] == [RETRY_INTERVAL]
        loop.run_timers()
        assert srv.connected and srv.connections == 2
        # disconnect() (a crash) also redials in client mode ...
        assert srv.disconnect() and not srv.connected and len(loop.timers) == 1
        assert not srv.disconnect()  # ... once: nothing left to drop
        srv.close()
        loop.run_timers()  # ... but not once the server is closed
        assert not srv.connected and loop.timers == [] and srv.attempts == 4
        assert loop.watched == {}
        # Two connections were accepted by the front-end side's listener; drain the second.
        conn = lst.accept(0)
        assert conn is not None
        conn.close()


def test_client_mode_reconnects(tmp_path: Path, no_fd_leak: None) -> None:
    dev = FakeDevice()
    path = tmp_path / "qemu.sock"
    with Listener(path) as lst:
        loop = SelectorLoop()
        srv = VhostUserServer(dev, path, loop, client=True)
        with running(loop):
            with VhostUserFrontend.accept(lst, timeout=5) as fe:
                fe.handshake()
            # QEMU server=on keeps listening; the backend comes back by itself.
            with VhostUserFrontend.accept(lst, timeout=5) as fe2:
                fe2.handshake()
                assert fe2.queue_num == 2
            assert srv.connections >= 2
        srv.close()
        loop.close()


def test_kick_fds_are_watched_while_rings_run(served: Served) -> None:
    """The backend watches each ring's kick eventfd from queue_started until before
    queue_stopped, consumes it when it fires and calls the device's queue_kicked."""
    dev, loop, srv = served
    with running(loop), FrontendMemory() as mem:
        with VhostUserFrontend.connect(srv.path) as fe:
            rings = qemu_start(fe, mem, num=32)
            try:
                wait_for(lambda: sorted(dev.started) == [0, 1], "rings never started")
                assert srv.backend is not None
                kick_fds = [v.kick_fd for v in srv.backend.vrings]
                assert all(fd is not None and fd in loop.sel.get_map() for fd in kick_fds)
                os.eventfd_write(rings[1].kick, 1)
                wait_for(lambda: dev.kicks == [1], "TX kick not delivered")
                os.eventfd_write(rings[0].kick, 1)
                wait_for(lambda: dev.kicks == [1, 0], "RX kick not delivered")
                with pytest.raises(BlockingIOError):  # the backend consumed the counter
                    os.eventfd_read(rings[0].kick)
                fe.get_vring_base(1)  # stops ring 1: its kick fd is no longer watched
                wait_for(lambda: 1 not in dev.started, "ring 1 not stopped")
                assert kick_fds[1] not in loop.sel.get_map()
                assert srv.backend.vrings[1].kick_fd is None  # and closed (libvhost-user)
                os.eventfd_write(rings[1].kick, 1)
                os.eventfd_write(rings[0].kick, 1)
                wait_for(lambda: dev.kicks == [1, 0, 0], "RX kick not delivered")
                assert dev.kicks.count(1) == 1
            finally:
                close_rings(rings)


def test_a_silent_newcomer_does_not_replace_the_active_one(served: Served) -> None:
    """A peer that connects and leaves without a word (vdev.socketpath.live_listener's
    liveness probe) costs the running front-end nothing; one that stays silent is held, and
    closed with the server."""
    import socket

    dev, loop, srv = served
    with running(loop), FrontendMemory() as mem:
        with VhostUserFrontend.connect(srv.path) as fe:
            rings = qemu_start(fe, mem, num=32)
            try:
                wait_for(lambda: sorted(dev.started) == [0, 1], "rings never started")
                backend = srv.backend
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(srv.path)
                probe.close()  # connected and left
                silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                silent.connect(srv.path)  # connected and says nothing
                wait_for(lambda: len(srv._held) == 1, "silent peer not held")
                assert fe.get_vring_base(1) == 0  # the served front-end is still served
                assert srv.backend is backend and srv.replaced == 0 and srv.connections == 1
                assert sorted(dev.started) == [0]  # only ring 1 was stopped, by us
            finally:
                close_rings(rings)
        wait_for(lambda: not srv.connected, "disconnect not seen")
    silent.close()
    # The loop has stopped, so the server still holds its end of the silent connection:
    # the fixture's close must close it (no_fd_leak checks).
