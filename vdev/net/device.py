"""One device process: the packet pool, the switch, the responder, the NICs and the loop.

The vhost-user library owns no event loop (libvhost-user style); this module runs one: a
:class:`~vdev.eventloop.SelectorLoop` on which each NIC's :class:`VhostUserServer` watches
its listening socket and its connection.  With ``threads="per-nic"`` (the default) each
NIC's kick eventfds are watched on a loop of its own, run by that NIC's datapath thread
(vdev/net/threads.py); with ``threads="single"`` everything runs on the one loop.  Either
way ``Device.lock``, held while the loop runs callbacks, excludes every datapath, so test
code may call into the device (host channels, stats, faults) from its own thread while
``start()`` runs the loops in the background (docs/DESIGN.md "Threads and the locking
rule").
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vdev.errors import DefunctError
from vdev.eventloop import SelectorLoop
from vdev.limits import MAX_NICS, LimitError
from vdev.net import kickhold, rxbatch
from vdev.net import notify_watch as notify_watch_mod
from vdev.net.capture import PcapngWriter
from vdev.net.echoturn import EchoTurn
from vdev.net.nic import VirtioNet
from vdev.net.responder import Responder, mac_bytes
from vdev.net.switch import Switch
from vdev.net.threads import NicDatapath, WorldLock, check_mode
from vdev.skywalk import Channel, Pbufpool, Port
from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.server import VhostUserServer

log = logging.getLogger("vdev.device")

# VDEV_THREADS=single|per-nic overrides the default of Device(threads=None) (and of vdev serve).
DEFAULT_THREADS = os.environ.get("VDEV_THREADS", "per-nic")
CLOSE_TIMEOUT = 10.0  # seconds Device.close waits for the device lock


@dataclass
class NicSocket:
    """Where one NIC meets its front-end: the NIC and the server on its socket path."""

    nic: VirtioNet
    server: VhostUserServer

    @property
    def path(self) -> str:
        return self.server.path

    @property
    def client(self) -> bool:
        return self.server.client

    @property
    def backend(self) -> VhostUserBackend | None:
        """The connection currently served, if any."""
        return self.server.backend

    @property
    def connections(self) -> int:
        return self.server.connections


class Device:
    """The whole device; use as a context manager or call ``close()``."""

    def __init__(
        self,
        *,
        pool: Pbufpool | None = None,
        responder_ip: str = "10.0.2.2",
        responder_mac: str = "52:54:00:00:00:fe",
        pcap: str | None = None,
        threads: str | None = None,
        notify_watch: str = notify_watch_mod.DEFAULT_MODE,
        kick_hold: float = kickhold.DEFAULT_WINDOW_S,
        rx_kick_batch: int = rxbatch.DEFAULT_BATCH,
    ) -> None:
        """``threads``: "per-nic" (a datapath thread per NIC) or "single" (one loop thread
        for everything); None: ``DEFAULT_THREADS``.  ``notify_watch``: what the
        lost-notification watch does (notify_watch.py: recover, report or off).
        ``kick_hold``: the TX kick mitigation window in seconds (kickhold.py; 0: off).
        ``rx_kick_batch``: the RX refill kick batch (rxbatch.py; 0: half the ring, 1: off)."""
        self.threads = check_mode(threads if threads is not None else DEFAULT_THREADS)
        self.kick_hold = kickhold.check_window(kick_hold)
        self.rx_kick_batch = rxbatch.check_batch(rx_kick_batch)
        if notify_watch not in notify_watch_mod.MODES:
            modes = ", ".join(notify_watch_mod.MODES)
            raise ValueError(f"notify_watch={notify_watch!r}: expected one of {modes}")
        self.notify_watch = notify_watch
        self.pool = pool if pool is not None else default_pool()
        self.switch = Switch(self.pool)
        self.responder = Responder(self.pool, mac=mac_bytes(responder_mac), ip=responder_ip)
        self.switch.attach(self.responder)
        # A NIC's TX to the responder and the replies' RX in one compiled call (echoturn.py).
        self.echo_turn = EchoTurn(self)
        self.sockets: list[NicSocket] = []
        self.ports: dict[str, Port] = {}
        # The shared lock (switch, pool, responder, ports, capture) and the lock that
        # excludes everything (the control plane's): one and the same with one thread.
        self.shared = threading.RLock()
        self.lock: threading.RLock | WorldLock = (
            WorldLock(self.shared) if self.threads == "per-nic" else self.shared
        )
        self.loop = SelectorLoop(self.lock)
        self.datapaths: dict[str, NicDatapath] = {}
        self._serving = False  # datapath threads run (per-nic)
        self.capture = PcapngWriter(pcap) if pcap else None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._poll = False
        self._started = threading.Event()  # per-nic: the datapath threads run
        self.closed = False
        # Where NIC lifecycle events go (the fault engine's log sets it); None: only logged.
        self.event_sink: Callable[..., object] | None = None
        if notify_watch != "off":
            self.loop.call_later(notify_watch_mod.PERIOD_S, self._watch_tick)

    @property
    def sel(self) -> selectors.BaseSelector:
        """The loop's selector, for code that needs more than read watches (control socket)."""
        return self.loop.sel

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
            if index >= MAX_NICS:
                raise LimitError(f"NICs limit: this device serves at most {MAX_NICS} NICs")
            mac_b = mac_bytes(mac) if mac else bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + index])
            nic = VirtioNet(
                name or f"nic{index}",
                self.pool,
                self.forward,
                mac=mac_b,
                queue_pairs=queue_pairs,
                mtu=mtu,
            )
            if self.capture is not None:
                capture, shared = self.capture, self.shared

                def tap(n: VirtioNet, frame: bytes, direction: int, notes: list[str]) -> None:
                    with shared:  # one capture file for every NIC's thread
                        capture.write(n.name, frame, direction, notes)

                nic.tap = tap
            nic.event_sink = self._event
            nic.echo_turn = self.echo_turn
            nic.watch = notify_watch_mod.NotifyWatch(nic, self.notify_watch)
            kick_watcher = None
            if isinstance(self.lock, WorldLock):
                dp = NicDatapath(nic, self.lock, self.shared, self.switch)
                self.lock.add(nic.lock)
                nic.burst_unlocked = dp.lock.unlocked
                nic.defer = lambda fn: dp.loop.call_later(0.0, fn)
                kick_watcher = dp.loop
                self.datapaths[nic.name] = dp
                # Held queues are polled by the NIC's thread only (_attach_datapath).
                nic.kick_hold = kickhold.KickHold(nic, self.kick_hold, None)
                nic.rx_batch = rxbatch.RxKickBatch(nic, self.rx_kick_batch, None)
            else:
                nic.defer = lambda fn: self.call_later(0.0, fn)
                nic.kick_hold = kickhold.KickHold(nic, self.kick_hold, self._hold_later)
                nic.rx_batch = rxbatch.RxKickBatch(nic, self.rx_kick_batch, self._hold_later)
            server = VhostUserServer(
                nic, path, self.loop, client=client, name=nic.name, kick_watcher=kick_watcher
            )
            self.switch.attach(nic)
            self.sockets.append(NicSocket(nic, server))
            if kick_watcher is not None:
                self._attach_datapath(self.datapaths[nic.name])
            return nic

    def _attach_datapath(self, dp: NicDatapath) -> None:
        """Serve a NIC's loop: on its own thread while the device serves, else from the
        control loop (its epoll fd is readable when one of its fds is)."""
        mitigations = _mitigations(dp.nic)
        if self._serving:
            self.loop.unwatch(dp.loop.sel.fileno())
            dp.nic.handoff = dp.hand_off
            dp.nic.handoff_waiting = dp.inbox_len
            # A held queue's poll (a batching RX queue's check) is a timer of the NIC's
            # loop, which only its own thread runs on time (busy-poll mode services every
            # queue anyway: no holding, no batching).
            for m in mitigations:
                m.later = None if self._poll else dp.hold_later
            dp.start(poll=self._poll)
        else:
            for m in mitigations:
                m.later = None
                m.release_all()
            self.loop.watch(dp.loop.sel.fileno(), lambda: dp.poll(0.0))

    def _event(self, kind: str, **detail: object) -> None:
        if self.event_sink is not None:
            self.event_sink(kind, **detail)

    def open_port(self, name: str, *, ring_slots: int = 256, alloc_nbufs: int = 1) -> Port:
        """A Skywalk nexus port on the switch, for host channels (this or another process).

        The port shares the device's shared lock: a channel's TX sync forwards through the
        switch from the caller's thread (to NICs by hand-off, with per-NIC threads), while
        datapath threads deliver into the port's RX rings; one re-entrant lock orders both
        (and guards the pool).
        """
        with self.lock:
            if name in self.ports or name in self.switch.endpoints:
                raise ValueError(f"an endpoint named {name!r} already exists")
            port = Port(self.pool, name=name, ring_slots=ring_slots, alloc_nbufs=alloc_nbufs)
            port.lock = self.shared
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
        self.echo_turn.forwarded_by(src)
        self.switch.forward(src, pkts)
        self.answer_rounds(16)

    def answer_rounds(self, rounds: int) -> None:
        """Up to ``rounds`` times: switch what the responder answered (the rest of
        :meth:`forward`; the echo turn, vdev/net/echoturn.py, resumes here too)."""
        for _ in range(rounds):
            replies = self.responder.take_outbox()
            if not replies:
                break
            self.switch.forward(self.responder.name, replies)

    # -- connections ---------------------------------------------------------------------

    def socket_of(self, nic: VirtioNet) -> NicSocket:
        return next(s for s in self.sockets if s.nic is nic)

    def disconnect(self, nic: VirtioNet) -> bool:
        """Drop the NIC's vhost-user connection as a crashed back-end would (the fault
        engine's ``crash_backend``); returns whether one was connected.  See
        :mod:`vdev.vhost.server` for what happens next."""
        with self.lock:
            return self.socket_of(nic).server.disconnect()

    # -- the loop ------------------------------------------------------------------------

    def _watch_tick(self) -> None:
        """Every NIC's lost-notification look (notify_watch.py), then the next one."""
        if self.closed:
            return
        try:
            for entry in self.sockets:
                if entry.nic.watch is not None:
                    try:
                        entry.nic.watch.check()
                    except DefunctError:  # a queue stopped under the look: next time
                        pass
        finally:
            self.loop.call_later(notify_watch_mod.PERIOD_S, self._watch_tick)

    def _hold_later(self, delay: float, fn: Callable[[], None]) -> None:
        """A held TX queue's next poll (kickhold.py) or a batching RX queue's check
        (rxbatch.py) on the one loop; not in busy-poll mode, which services every queue on
        every iteration anyway."""
        self.loop.call_later(delay, fn, wake=False)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop after ``delay`` s (under the device lock); any thread."""
        self.loop.call_later(delay, fn)

    def wake(self) -> None:
        self.loop.wake()
        for dp in self.datapaths.values():
            dp.loop.wake()

    def poll(self, timeout: float = 0.1) -> None:
        """Run one loop iteration: wait up to ``timeout`` and dispatch what is ready."""
        self.loop.poll(timeout)

    def serve_forever(self, stop: threading.Event | None = None, *, poll: bool = False) -> None:
        """Run the loop until ``stop`` is set.

        Event-driven by default: the loop sleeps in ``select`` until a socket or a kick
        eventfd is readable.  ``poll=True`` is busy-poll mode (``vdev serve --poll``), like a
        DPDK PMD: the loop never sleeps and every started queue is serviced on every
        iteration, kicked or not, trading one spinning core for the wake-up latency.

        With ``threads="per-nic"`` each NIC's datapath thread runs its own loop (and
        busy-polls its own queues with ``poll``) while this thread runs the control plane;
        with ``threads="single"`` both run here.  docs/DESIGN.md "Threads and the locking
        rule" says what each holds.
        """
        stop = stop or self._stop
        if isinstance(self.lock, WorldLock):  # per-nic, NICs added before or after this
            self._serve_threads(stop, poll)
            return
        if not poll:
            while not stop.is_set():
                self.poll(0.2)
            return
        holds = [m for e in self.sockets for m in _mitigations(e.nic)]
        for hold in holds:  # every queue is serviced on every iteration: nothing to hold
            hold.later = None
        try:
            while not stop.is_set():
                self.poll(0.0)
                self.poll_queues()
        finally:
            for hold in holds:
                hold.later = self._hold_later

    def _serve_threads(self, stop: threading.Event, poll: bool) -> None:
        with self.lock:
            self._serving, self._poll = True, poll
            for dp in self.datapaths.values():
                self._attach_datapath(dp)
        self._started.set()
        try:
            while not stop.is_set():
                self.poll(0.2)
        finally:
            for dp in self.datapaths.values():
                dp.stop()
            with self.lock:
                self._serving = False
                for dp in self.datapaths.values():
                    dp.nic.handoff = None
                    dp.nic.handoff_waiting = None
                    dp.take_inbox()  # what was handed off and not yet taken
                    self._attach_datapath(dp)

    def poll_queues(self) -> None:
        """Service every started queue of every NIC once, as a kick would (busy-poll mode)."""
        with self.lock:
            for entry in self.sockets:
                nic = entry.nic
                for index in list(nic.vrings):
                    nic.kick(index)

    def start(self, *, poll: bool = False) -> Device:
        """Run the loop in a background thread (tests, the demo); ``poll``: busy-poll."""
        if self._thread is None:
            self._stop.clear()
            self._started.clear()
            self._thread = threading.Thread(
                target=self.serve_forever,
                kwargs={"poll": poll},
                name="vdev-loop",
                daemon=True,
            )
            self._thread.start()
            if self.datapaths:  # return once the NICs' threads serve (callers send at once)
                self._started.wait(5)
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
            for pending in self.datapaths.values():
                if pending.refused:  # hand-off drops the NIC's thread has not counted yet
                    pending.nic.count_refused(pending.refused)
                    pending.refused = 0
            return {
                "nics": [
                    s.nic.stats_dict()
                    | {
                        "socket": s.path,
                        "connections": s.connections,
                        "replaced": s.server.replaced,
                        "memory_faults": s.server.memory_faults,
                        # frames handed off to the NIC's thread, not yet in its backlog
                        "inbox": len(dp.inbox) if (dp := self.datapaths.get(s.nic.name)) else 0,
                    }
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
        if not self.lock.acquire(timeout=CLOSE_TIMEOUT):
            # A datapath that never lets go (a bug: a deadlock, a burst that never returns):
            # fail loudly rather than hang the caller; the NIC threads are daemons.
            raise RuntimeError(
                f"Device.close: the device lock is still held after {CLOSE_TIMEOUT} s"
            )
        self.lock.release()
        self.closed = True
        with self.lock:
            for entry in self.sockets:
                entry.server.close()  # drops the connection, removes the socket file
                entry.nic.disconnected()  # frees the RX backlog even if never connected
            for dp in self.datapaths.values():
                self.loop.unwatch(dp.loop.sel.fileno())
                dp.close()
            for port in self.ports.values():
                port.close()
                self.switch.detach(port.name)
            if self.capture is not None:
                self.capture.close()
            self.loop.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mitigations(nic: VirtioNet) -> list[kickhold.KickHold | rxbatch.RxKickBatch]:
    """The NIC's notification policies that run on timers of the loop serving it."""
    return [m for m in (nic.kick_hold, nic.rx_batch) if m is not None]


def default_pool() -> Pbufpool:
    """A pool sized for a few NICs with 256-entry rings and 64 KiB GSO frames.

    ``max_frags=8`` lets a host channel send jumbo (9000-byte MTU) frames from its alloc
    ring; the device itself puts anything above one buffer into a large buffer.
    """
    return Pbufpool(
        num_packets=8192, buf_size=2048, max_frags=8, num_large_bufs=256, large_buf_size=65536
    )
