"""One device process: the packet pool, the switch, the responder, the NICs and the loop.

The vhost-user library owns no event loop (libvhost-user style); this module does.  One
``selectors`` loop watches every listening socket, every connection and every kick
eventfd, and dispatches to small handlers.  All device state is touched under one lock,
so test code may call into the device (host channels, stats, faults) from its own thread
while ``start()`` runs the loop in the background.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdev.net.capture import PcapngWriter
from vdev.net.nic import VirtioNet
from vdev.net.responder import Responder, mac_bytes
from vdev.net.switch import Switch
from vdev.skywalk import Channel, Pbufpool, Port
from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.connection import Connection, Listener

if TYPE_CHECKING:
    from vdev.vhost.backend import Vring

log = logging.getLogger("vdev.device")

Handler = Callable[[], None]


@dataclass
class NicSocket:
    """Where one NIC meets its frontend, and the connection currently served there."""

    nic: VirtioNet
    path: str
    client: bool
    listener: Listener | None = None
    backend: VhostUserBackend | None = None
    backend_fd: int = -1  # the fd registered in the selector (the socket may close first)
    kick_fds: dict[int, int] = field(default_factory=dict)  # vring index -> fd
    next_connect: float = 0.0
    connections: int = 0


class Device:
    """The whole device; use as a context manager or call ``close()``."""

    def __init__(
        self,
        *,
        pool: Pbufpool | None = None,
        responder_ip: str = "10.0.2.2",
        responder_mac: str = "52:54:00:00:00:fe",
        pcap: str | None = None,
    ) -> None:
        self.pool = pool if pool is not None else default_pool()
        self.switch = Switch(self.pool)
        self.responder = Responder(self.pool, mac=mac_bytes(responder_mac), ip=responder_ip)
        self.switch.attach(self.responder)
        self.sockets: list[NicSocket] = []
        self.ports: dict[str, Port] = {}
        self.sel = selectors.DefaultSelector()
        self.lock = threading.RLock()
        self.capture = PcapngWriter(pcap) if pcap else None
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.closed = False

    # -- building ------------------------------------------------------------------------

    def add_nic(
        self,
        path: str,
        *,
        mac: str | None = None,
        queue_pairs: int = 1,
        mtu: int = 1500,
        client: bool = False,
        name: str | None = None,
    ) -> VirtioNet:
        """Serve a NIC on a vhost-user socket (listen, or connect when ``client``)."""
        with self.lock:  # the loop may already be running (fixtures add NICs late)
            index = len(self.sockets)
            mac_b = mac_bytes(mac) if mac else bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index])
            nic = VirtioNet(
                name or f"nic{index}",
                self.pool,
                self.forward,
                mac=mac_b,
                queue_pairs=queue_pairs,
                mtu=mtu,
                on_queue_started=self._queue_started,
                on_queue_stopped=self._queue_stopped,
            )
            if self.capture is not None:
                capture = self.capture
                nic.tap = lambda n, frame, direction, notes: capture.write(
                    n.name, frame, direction, notes
                )
            nic.defer = lambda fn: self.call_later(0.0, fn)
            entry = NicSocket(nic, path, client)
            if client:
                self._try_connect(entry)
            else:
                entry.listener = Listener(path)
                self.sel.register(
                    entry.listener.fileno(), selectors.EVENT_READ, lambda: self._accept(entry)
                )
            self.switch.attach(nic)
            self.sockets.append(entry)
            return nic

    def open_port(self, name: str, *, ring_slots: int = 256, alloc_nbufs: int = 1) -> Port:
        """A Skywalk nexus port on the switch, for host channels (this or another process).

        The port shares the device lock: a channel's TX sync forwards through the switch
        into guest rings from the caller's thread, while the loop thread delivers into the
        port's RX rings; one re-entrant lock orders both (and guards the pool).
        """
        with self.lock:
            if name in self.ports or name in self.switch.endpoints:
                raise ValueError(f"an endpoint named {name!r} already exists")
            port = Port(self.pool, name=name, ring_slots=ring_slots, alloc_nbufs=alloc_nbufs)
            port.lock = self.lock
            port.on_transmit = lambda p, pkts: self.forward(p.name, pkts)
            self.switch.attach(port)
            self.ports[name] = port
            return port

    def open_channel(self, name: str = "host", **kw: int) -> Channel:
        """A host channel in this process on port ``name`` (created if it does not exist)."""
        with self.lock:
            port = self.ports.get(name) or self.open_port(name, **kw)
            return port.open_channel()

    @property
    def nics(self) -> list[VirtioNet]:
        return [s.nic for s in self.sockets]

    # -- data path glue ------------------------------------------------------------------

    def forward(self, src: str, pkts: list[int]) -> None:
        """Switch packets and let the responder answer what it was sent, until quiet."""
        self.switch.forward(src, pkts)
        for _ in range(16):
            replies = self.responder.take_outbox()
            if not replies:
                break
            self.switch.forward(self.responder.name, replies)

    # -- connections ---------------------------------------------------------------------

    def _accept(self, entry: NicSocket) -> None:
        assert entry.listener is not None
        conn = entry.listener.accept(0)
        if conn is None:
            return
        if entry.backend is None:
            self._attach_connection(entry, conn)
            return
        # A frontend is already served here.  The newcomer may be another vdev checking
        # whether the path is in use (vdev.socketpath connects and closes without a word):
        # it must not cost the running guest its NIC.  Hold it until it speaks; only a
        # peer that sends a message (a frontend that restarted) replaces the old one.
        fd = conn.fileno()

        def first_readable() -> None:
            self._unwatch(fd)
            try:
                peeked = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.sel.register(fd, selectors.EVENT_READ, first_readable)
                return
            except OSError:
                peeked = b""
            if not peeked:
                conn.close()  # connected and left: a liveness probe
                return
            log.warning("%s: dropping the previous frontend for a new one", entry.nic.name)
            self._disconnect(entry)
            self._attach_connection(entry, conn)
            self._readable(entry)

        self.sel.register(fd, selectors.EVENT_READ, first_readable)

    def _try_connect(self, entry: NicSocket) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(entry.path)
        except OSError as exc:
            sock.close()
            log.debug("%s: connect %s: %s (will retry)", entry.nic.name, entry.path, exc)
            self.call_later(0.2, lambda: self._try_connect(entry))
            return
        self._attach_connection(entry, Connection(sock))

    def _attach_connection(self, entry: NicSocket, conn: Connection) -> None:
        entry.backend = VhostUserBackend(entry.nic, conn)
        entry.connections += 1
        entry.backend_fd = entry.backend.fileno()
        self.sel.register(entry.backend_fd, selectors.EVENT_READ, lambda: self._readable(entry))
        log.info("%s: frontend connected on %s", entry.nic.name, entry.path)

    def _readable(self, entry: NicSocket) -> None:
        backend = entry.backend
        if backend is None:
            return
        if not backend.handle_readable():
            self._disconnect(entry)

    def _disconnect(self, entry: NicSocket) -> None:
        backend = entry.backend
        if backend is None:
            return
        entry.backend = None
        self._unwatch(entry.backend_fd)
        entry.backend_fd = -1
        backend.close()
        for fd in list(entry.kick_fds.values()):
            self._unwatch(fd)
        entry.kick_fds.clear()
        log.info("%s: frontend disconnected", entry.nic.name)
        if entry.client and not self.closed:
            self.call_later(0.2, lambda: self._try_connect(entry))

    def _entry(self, nic: VirtioNet) -> NicSocket:
        return next(s for s in self.sockets if s.nic is nic)

    def _queue_started(self, nic: VirtioNet, vring: Vring) -> None:
        entry = self._entry(nic)
        old = entry.kick_fds.pop(vring.index, None)
        if old is not None:
            self._unwatch(old)
        if vring.kick_fd is None:
            return
        fd, index = vring.kick_fd, vring.index
        entry.kick_fds[index] = fd
        self.sel.register(fd, selectors.EVENT_READ, lambda: self._kicked(nic, fd, index))

    def _queue_stopped(self, nic: VirtioNet, vring: Vring) -> None:
        entry = self._entry(nic)
        fd = entry.kick_fds.pop(vring.index, None)
        if fd is not None:
            self._unwatch(fd)

    def _unwatch(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _kicked(self, nic: VirtioNet, fd: int, index: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        except OSError:
            self._unwatch(fd)
            return
        nic.kick(index)

    # -- the loop ------------------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop after ``delay`` s; safe from any thread (the loop rebuilds
        the timer list under the lock, so an unlocked append could be lost)."""
        with self.lock:
            self.timers.append((time.monotonic() + delay, fn))
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def poll(self, timeout: float = 0.1) -> None:
        """Run one loop iteration: wait up to ``timeout`` and dispatch what is ready."""
        now = time.monotonic()
        if self.timers:
            timeout = max(0.0, min(timeout, min(t for t, _ in self.timers) - now))
        events = self.sel.select(timeout)
        with self.lock:
            for key, _mask in events:
                handler: Any = key.data
                try:
                    handler()
                except Exception:
                    log.exception("event handler failed")
            now = time.monotonic()
            due = [t for t in self.timers if t[0] <= now]
            if due:
                self.timers = [t for t in self.timers if t[0] > now]
                for _, fn in due:
                    try:
                        fn()
                    except Exception:
                        log.exception("timer failed")

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        stop = stop or self._stop
        while not stop.is_set():
            self.poll(0.2)

    def start(self) -> Device:
        """Run the loop in a background thread (tests, the demo)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self.serve_forever, name="vdev-loop", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self.wake()
            self._thread.join(timeout=5)
            self._thread = None

    # -- reporting and teardown ------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        with self.lock:
            return {
                "nics": [
                    s.nic.stats_dict() | {"socket": s.path, "connections": s.connections}
                    for s in self.sockets
                ],
                "switch": {name: vars(st).copy() for name, st in self.switch.stats.items()},
                "responder": vars(self.responder.stats).copy(),
                "pool": self.pool.stats_dict(),
            }

    def close(self) -> None:
        """Stop, disconnect every frontend, remove sockets, close the capture and the pool."""
        if self.closed:
            return
        self.stop()
        self.closed = True
        with self.lock:
            for entry in self.sockets:
                self._disconnect(entry)
                entry.nic.disconnected()
                if entry.listener is not None:
                    self._unwatch(entry.listener.fileno())
                    entry.listener.close()  # removes the socket file
            for port in self.ports.values():
                port.close()
                self.switch.detach(port.name)
            if self.capture is not None:
                self.capture.close()
            self.sel.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_pool() -> Pbufpool:
    """A pool sized for a few NICs with 256-entry rings and 64 KiB GSO frames.

    ``max_frags=8`` lets a host channel send jumbo (9000-byte MTU) frames from its alloc
    ring; the device itself puts anything above one buffer into a large buffer.
    """
    return Pbufpool(
        num_packets=8192, buf_size=2048, max_frags=8, num_large_bufs=256, large_buf_size=65536
    )
