"""The one connection path: a socket path served by one backend at a time, with reconnect.

Everything about connections lives here: listening (server mode, QEMU ``-chardev
socket,path=...`` as the client) or dialling (client mode, QEMU ``server=on`` or DPDK
``virtio_user ...,server=1``; ``vdev serve --client``), a fresh :class:`VhostUserBackend` per
connection, and what happens when a connection ends or a new one arrives.  The caller's
:class:`~vdev.eventloop.EventLoop` runs it: sockets and (through the backend) kick eventfds
are watched on it, and client-mode retries are scheduled on it, never waited for inside a
callback.

Reconnect semantics (one place, chosen deliberately):

* **A new connection that speaks replaces the current one** (server mode).  A vhost-user
  front-end opens a second connection only once it has given up on the first: QEMU
  ``reconnect=N`` after it saw the socket close, a restarted QEMU or DPDK application.  The
  old connection is then dead, but this process may not know yet: its EOF can sit in the
  same loop iteration, after the accept, or never come at all when the front-end's fd
  leaked into a child that lives on.  Refusing (or queueing) the newcomer would then keep
  the NIC offline until that zombie goes away; replacing costs only a connection whose
  front-end already left.  The newcomer is held until its first byte arrives: a peer that
  connects and leaves without a word (another vdev's liveness probe,
  ``vdev.socketpath.live_listener``) must not cost the running guest its NIC.  The replaced
  backend is closed cleanly (rings stopped, fds closed, the device told) and the event is
  logged as a warning and counted (:attr:`replaced`).
* **Client mode dials again after every disconnect** (``reconnect=True``, the default), one
  non-blocking attempt at a time, ``retry_interval`` apart, for as long as the server is
  open: the front-end (DPDK virtio_user server mode, QEMU ``server=on``) keeps listening
  and waits for the back-end to come back.
* A server-mode disconnect just waits for the next connection (QEMU ``reconnect=1``).

Each new connection starts from scratch; the front-end restores the rings' positions with
SET_VRING_BASE (vhost-user "Ring states").
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from vdev.errors import GuestMemoryFault
from vdev.eventloop import EventLoop, Watcher
from vdev.limits import MAX_HELD_CONNECTIONS

from .backend import VhostDevice, VhostUserBackend
from .connection import Connection, Listener, try_connect

log = logging.getLogger("vdev.vhost")

RETRY_INTERVAL = 0.2  # seconds between client-mode connection attempts


class VhostUserServer:
    """Serve ``device`` on the Unix socket ``path`` (listen, or dial when ``client``)."""

    def __init__(
        self,
        device: VhostDevice,
        path: str | os.PathLike[str],
        loop: EventLoop,
        *,
        client: bool = False,
        reconnect: bool = True,
        retry_interval: float = RETRY_INTERVAL,
        name: str | None = None,
        kick_watcher: Watcher | None = None,
        **backend_options: Any,
    ) -> None:
        """``backend_options`` go to every :class:`VhostUserBackend` created (they may be
        changed between connections); ``name`` labels log lines (default: the path);
        ``kick_watcher`` watches the kick eventfds instead of ``loop`` (a NIC's own datapath
        thread: its kicks are serviced there, the connection socket stays on ``loop``)."""
        self.device = device
        self.path = os.fspath(path)
        self.loop = loop
        self.kick_watcher: Watcher = kick_watcher if kick_watcher is not None else loop
        self.client = client
        self.reconnect = reconnect
        self.retry_interval = retry_interval
        self.name = name or self.path
        self.backend_options = backend_options
        self.backend: VhostUserBackend | None = None
        self.connections = 0  # connections served so far
        self.replaced = 0  # server mode: connections dropped for a newer one
        self.evicted = 0  # server mode: silent newcomers closed at the held-connections limit
        self.attempts = 0  # client mode: connection attempts made
        self.memory_faults = 0  # connections dropped for a guest memory fault (SIGBUS)
        self.last_fault: GuestMemoryFault | None = None
        self.closed = False
        self.listener: Listener | None = None
        self._held: dict[Connection, None] = {}  # newcomers not yet heard from, oldest first
        if client:
            self._try_connect()
        else:
            self.listener = Listener(self.path)
            loop.watch(self.listener.fileno(), self._on_accept)

    @property
    def connected(self) -> bool:
        return self.backend is not None

    # -- connection life cycle -----------------------------------------------------------

    def _attach(self, conn: Connection) -> None:
        backend = VhostUserBackend(
            self.device, conn, watcher=self.kick_watcher, **self.backend_options
        )
        self.backend = backend
        self.connections += 1
        self.loop.watch(backend.fileno(), lambda: self._on_readable(backend))
        self.loop.watch(backend.fault_fd, lambda: self._on_fault(backend))
        log.info("%s: front-end connected (connection %d)", self.name, self.connections)

    def _on_accept(self) -> None:
        assert self.listener is not None
        conn = self.listener.accept(0)
        if conn is None:
            return
        if self.backend is None:
            self._attach(conn)
            return
        # A front-end is already served: hold the newcomer until it speaks.  At most
        # MAX_HELD_CONNECTIONS: a local process that opens connections and never speaks must
        # not run the device out of fds; the oldest silent one goes first.
        if len(self._held) >= MAX_HELD_CONNECTIONS:
            oldest = next(iter(self._held))
            del self._held[oldest]
            self.loop.unwatch(oldest.fileno())
            oldest.close()
            self.evicted += 1
            log.warning(
                "%s: held connections limit: %d silent newcomers; closed the oldest",
                self.name, MAX_HELD_CONNECTIONS,
            )  # fmt: skip
        self._held[conn] = None
        self.loop.watch(conn.fileno(), lambda: self._held_readable(conn))

    def _held_readable(self, conn: Connection) -> None:
        """A held newcomer is readable: a message replaces the current connection, EOF (a
        probe that connected and left) just closes it."""
        self.loop.unwatch(conn.fileno())
        self._held.pop(conn, None)
        try:
            peeked = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:  # a spurious wakeup: keep holding it
            self._held[conn] = None
            self.loop.watch(conn.fileno(), lambda: self._held_readable(conn))
            return
        except OSError:
            peeked = b""
        if not peeked or self.closed:
            conn.close()  # connected and left: a liveness probe
            return
        if self.backend is not None:
            log.warning("%s: a new front-end spoke; dropping the previous one", self.name)
            self.replaced += 1
            self._drop()
        self._attach(conn)
        assert self.backend is not None
        self._on_readable(self.backend)  # its first message is waiting

    def _try_connect(self) -> None:
        """One non-blocking attempt; on failure the next one is scheduled on the loop."""
        if self.closed or self.backend is not None:
            return
        self.attempts += 1
        try:
            conn = try_connect(self.path)
        except OSError as exc:
            log.error("%s: cannot connect: %s (will retry)", self.name, exc)
            conn = None
        if conn is None:
            log.debug("%s: nobody listens yet (will retry)", self.name)
            self.loop.call_later(self.retry_interval, self._try_connect)
            return
        self._attach(conn)

    def _on_readable(self, backend: VhostUserBackend) -> None:
        if backend is not self.backend:
            return  # an event for a connection already dropped
        if not backend.handle_readable():
            self._drop()
            self._after_disconnect()

    def _on_fault(self, backend: VhostUserBackend) -> None:
        """A region of the connection took a SIGBUS (the front-end truncated its memory):
        that connection goes, nothing else does."""
        if backend is self.backend and backend.memory_fault() is not None:
            self._drop()
            self._after_disconnect()

    def _drop(self) -> None:
        """Close the current backend (rings stopped, fds closed, device told)."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        self.loop.unwatch(backend.fileno())
        self.loop.unwatch(backend.fault_fd)
        backend.close()
        if backend.fault is not None:
            self.memory_faults += 1
            self.last_fault = backend.fault
            log.error("%s: front-end disconnected: %s", self.name, backend.fault)
        else:
            log.info("%s: front-end disconnected", self.name)

    def _after_disconnect(self) -> None:
        if self.client and self.reconnect and not self.closed:
            self.loop.call_later(self.retry_interval, self._try_connect)

    def disconnect(self) -> bool:
        """Drop the current connection as a crashed back-end would; returns whether there
        was one.  A server-mode front-end reconnects by itself (QEMU ``reconnect=1``); in
        client mode the next attempt is scheduled.  Call from the loop's thread, or under
        the lock the loop holds while it runs callbacks."""
        had = self.backend is not None
        self._drop()
        if had:
            self._after_disconnect()
        return had

    def close(self) -> None:
        """Drop the connection and stop listening (the socket file is removed)."""
        if self.closed:
            return
        self.closed = True
        self._drop()
        for conn in self._held:
            self.loop.unwatch(conn.fileno())
            conn.close()
        self._held.clear()
        if self.listener is not None:
            self.loop.unwatch(self.listener.fileno())
            self.listener.close()
            self.listener = None


__all__ = ["RETRY_INTERVAL", "VhostUserServer"]
