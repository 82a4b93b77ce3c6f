"""Glue for serving a device on a socket path: accept (or connect), one backend per connection.

The backend owns no event loop and neither does this helper: it registers its sockets on the
caller's :mod:`selectors` selector with a zero-argument callable as ``key.data``, so a loop of
the form ``for key, _ in sel.select(t): key.data()`` drives it (the device can register its
kick eventfds the same way).  :meth:`VhostUserServer.run` is such a loop for simple uses.

Server mode (QEMU ``-chardev socket,path=...`` as client): listen; QEMU uses one connection at
a time, so a second one while the first is alive is refused, and after a disconnect the next
connection (QEMU ``reconnect=1``) gets a fresh :class:`VhostUserBackend`.
Client mode (QEMU ``server=on``; ``vdev serve --client``): connect with retry, and connect
again after a disconnect when ``reconnect`` is set.
"""

from __future__ import annotations

import logging
import os
import selectors
import time
from collections.abc import Callable
from typing import Any

from .backend import VhostDevice, VhostUserBackend
from .connection import Connection, Listener, connect

log = logging.getLogger("vdev.vhost")


class VhostUserServer:
    def __init__(
        self,
        device: VhostDevice,
        path: str | os.PathLike[str],
        selector: selectors.BaseSelector,
        *,
        client: bool = False,
        reconnect: bool = True,
        connect_timeout: float = 30.0,
        **backend_options: Any,
    ) -> None:
        """``backend_options`` go to every :class:`VhostUserBackend` created."""
        self.device = device
        self.path = os.fspath(path)
        self.sel = selector
        self.client = client
        self.reconnect = reconnect
        self.connect_timeout = connect_timeout
        self.backend_options = backend_options
        self.backend: VhostUserBackend | None = None
        self.connections = 0
        self.closed = False
        self.listener: Listener | None = None
        if client:
            self._attach(connect(self.path, timeout=connect_timeout))
        else:
            self.listener = Listener(self.path)
            self.sel.register(self.listener, selectors.EVENT_READ, self._on_accept)

    def _attach(self, conn: Connection) -> None:
        self.backend = VhostUserBackend(self.device, conn, **self.backend_options)
        self.connections += 1
        self.sel.register(self.backend, selectors.EVENT_READ, self._on_readable)
        log.info("vhost-user connection %d on %s", self.connections, self.path)

    def _on_accept(self) -> None:
        assert self.listener is not None
        conn = self.listener.accept(0)
        if conn is None:
            return
        if self.backend is not None:
            log.warning("vhost-user: refusing a second connection on %s", self.path)
            conn.close()
            return
        self._attach(conn)

    def _on_readable(self) -> None:
        backend = self.backend
        if backend is None or backend.handle_readable():
            return
        self.sel.unregister(backend)
        self.backend = None
        if self.client and self.reconnect and not self.closed:
            try:
                self._attach(connect(self.path, timeout=self.connect_timeout))
            except TimeoutError as exc:
                log.error("vhost-user: reconnect failed: %s", exc)

    def disconnect(self) -> None:
        """Drop the current connection as a crashed backend would (QEMU ``reconnect=1``
        then replays the whole sequence).  Call from the loop's thread."""
        backend = self.backend
        if backend is None:
            return
        self.sel.unregister(backend)
        backend.close()
        self.backend = None

    @property
    def connected(self) -> bool:
        return self.backend is not None

    def run(
        self, until: Callable[[], bool], *, poll: float = 0.1, timeout: float | None = None
    ) -> None:
        """A minimal loop: dispatch ``key.data()`` until ``until()`` is true (or timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("VhostUserServer.run timed out")
            for key, _ in self.sel.select(poll):
                key.data()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.backend is not None:
            self.sel.unregister(self.backend)
            self.backend.close()
            self.backend = None
        if self.listener is not None:
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
