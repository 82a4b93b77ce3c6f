"""VhostUserServer: the selector-driven accept/connect glue used by ``vdev serve``."""

from __future__ import annotations

import selectors
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vdev.vhost.connection import Listener, PeerClosed
from vdev.vhost.frontend import FrontendMemory, VhostUserFrontend
from vdev.vhost.server import VhostUserServer

from .conftest import FakeDevice
from .helpers import close_rings, qemu_start


@contextmanager
def running(server: VhostUserServer, sel: selectors.BaseSelector) -> Iterator[None]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            server.run(stop.is_set, poll=0.02)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=loop)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        server.close()
        sel.close()
    assert not errors


def test_server_mode_serves_connections_in_turn(tmp_path: Path, no_fd_leak: None) -> None:
    dev = FakeDevice()
    sel = selectors.DefaultSelector()
    srv = VhostUserServer(dev, tmp_path / "s.sock", sel)
    with running(srv, sel), FrontendMemory() as mem:
        for _ in range(2):
            with VhostUserFrontend.connect(srv.path) as fe:
                rings = qemu_start(fe, mem, num=32)
                try:
                    # A second front-end while the first is alive is turned away.
                    with VhostUserFrontend.connect(srv.path) as intruder:
                        with pytest.raises(PeerClosed):
                            intruder.send_raw(1)
                            intruder.recv_reply(timeout=2)
                    assert fe.get_vring_base(1) == 0
                finally:
                    close_rings(rings)
            for _ in range(100):
                if not srv.connected:
                    break
                threading.Event().wait(0.01)
        assert srv.connections == 2
    assert not (tmp_path / "s.sock").exists()


def test_client_mode_reconnects(tmp_path: Path, no_fd_leak: None) -> None:
    dev = FakeDevice()
    path = tmp_path / "qemu.sock"
    with Listener(path) as lst:
        sel = selectors.DefaultSelector()
        holder: list[VhostUserServer] = []
        t = threading.Thread(
            target=lambda: holder.append(VhostUserServer(dev, path, sel, client=True))
        )
        t.start()
        fe = VhostUserFrontend.accept(lst, timeout=5)
        t.join(5)
        srv = holder[0]
        with running(srv, sel):
            with fe:
                fe.handshake()
            # QEMU server=on keeps listening; the backend comes back by itself.
            with VhostUserFrontend.accept(lst, timeout=5) as fe2:
                fe2.handshake()
                assert fe2.queue_num == 2
            assert srv.connections >= 2
