"""Port: a nexus port pairing kernel rings with one or more channels.

The device side talks to a port through two calls: ``deliver(pkts)`` hands packets to the
port's RX rings (ownership moves; the caller frees what was not taken), and the
``on_transmit`` callback receives what a client sent during its TX sync (ownership moves to
the callee).  Each attached channel has a :class:`ChannelHandle`, the kernel half of that
channel: its five rings (TX, RX, ALLOC, FREE, EVENT), its owner id in the pool and its defunct
state.  A sync that raises :class:`SyncError` kills only that channel: its packets go back
to the pool and every later call raises :class:`DefunctError`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DefunctError, SyncError, SyncKind
from .pool import Pbufpool
from .ring import RING_ALLOC, RING_EVENT, RING_FREE, RING_RX, RING_TX, KernelRing

if TYPE_CHECKING:
    from .channel import Channel, ChannelInfo

_owner_ids = itertools.count(1)

TransmitCallback = Callable[["Port", list[int]], None]


@dataclass
class PortStats:
    """Packets through the port as seen by the device side."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0  # sent by a client while nobody listened (on_transmit is None)
    rx_delivered: int = 0
    rx_refused: int = 0  # offered to deliver() but no RX ring had room


class ChannelHandle:
    """Kernel half of one channel: rings, owner id, defunct state."""

    def __init__(self, port: Port, ring_slots: int, alloc_nbufs: int, alloc_ws: int | None) -> None:
        pool = port.pool
        self.port = port
        self.pool = pool
        self.owner = next(_owner_ids)
        self.alloc_nbufs = alloc_nbufs
        rid = self.owner * 8
        self.rings: dict[SyncKind, KernelRing] = {}
        try:
            for kind, sync in (
                (RING_TX, SyncKind.TX),
                (RING_RX, SyncKind.RX),
                (RING_ALLOC, SyncKind.ALLOC),
                (RING_FREE, SyncKind.FREE),
                (RING_EVENT, SyncKind.EVENT),
            ):
                self.rings[sync] = KernelRing(pool, kind, ring_slots, rid + kind, self.owner)
        except BaseException:
            for r in self.rings.values():
                r.release()
            raise
        alloc = self.rings[SyncKind.ALLOC]
        alloc.alloc_nbufs = alloc_nbufs
        if alloc_ws is not None:
            alloc.alloc_ws = max(1, min(alloc_ws, alloc.lim))
        alloc._publish()
        self.tx = self.rings[SyncKind.TX]
        self.rx = self.rings[SyncKind.RX]
        self.alloc = alloc
        self.free = self.rings[SyncKind.FREE]
        self.event = self.rings[SyncKind.EVENT]
        self.defunct: SyncError | None = None
        self.closed = False

    def info(self) -> ChannelInfo:
        """What a client needs (besides the arena fd) to construct its Channel."""
        from .channel import ChannelInfo

        return ChannelInfo(
            channel_id=self.owner,
            tx_off=self.tx.off,
            rx_off=self.rx.off,
            alloc_off=self.alloc.off,
            free_off=self.free.off,
            event_off=self.event.off,
        )

    def sync(self, kind: SyncKind) -> None:
        """Run one sync of ``kind`` (prologue, nexus work, finalize) for this channel."""
        with self.port.lock:
            if self.closed:
                raise DefunctError("channel (closed)", None)
            if self.defunct is not None:
                raise DefunctError("channel", self.defunct)
            try:
                # Identity tests, not self.rings[kind]: an Enum hashes in Python, and TX
                # syncs of one slot are short enough for that to show.
                if kind is SyncKind.TX:
                    ring = self.tx
                elif kind is SyncKind.RX:
                    ring = self.rx
                else:
                    ring = self.rings[kind]
                pkts, nbytes = ring.prologue()
                try:
                    if pkts:  # TX: what the client sent goes to the nexus
                        self.port._transmit(self, pkts, nbytes)
                finally:  # the ring stays consistent even if the device callback fails
                    ring.finalize()
            except SyncError as err:
                self._kill(err)
                raise

    def _kill(self, err: SyncError) -> None:
        """The client broke the contract: reclaim everything it and its rings held."""
        self.defunct = err
        self._teardown()

    def _teardown(self) -> None:
        for r in self.rings.values():
            r.reclaim()
        self.pool.owner_purge(self.owner)
        self.port._detach(self)

    def close(self) -> None:
        """Client went away: purge what it held and give the ring space back."""
        with self.port.lock:
            if self.closed:
                return
            self.closed = True
            if self.defunct is None:
                self._teardown()
            for r in self.rings.values():
                r.release()


class Port:
    """A nexus port: channels attach to it, the device delivers to and hears from it."""

    def __init__(
        self,
        pool: Pbufpool,
        *,
        name: str = "port",
        ring_slots: int = 256,
        alloc_nbufs: int = 1,
        on_transmit: TransmitCallback | None = None,
    ) -> None:
        self.pool = pool
        self.name = name
        self.ring_slots = ring_slots
        self.alloc_nbufs = alloc_nbufs
        self.on_transmit: TransmitCallback | None = on_transmit
        self.channels: list[ChannelHandle] = []
        self.stats = PortStats()
        self.lock = threading.RLock()
        self._rr = 0

    @staticmethod
    def loopback(
        pool: Pbufpool, *, name: str = "loopback", ring_slots: int = 256, alloc_nbufs: int = 1
    ) -> LoopbackPort:
        """A port that delivers what one channel sends to its other channels."""
        return LoopbackPort(pool, name=name, ring_slots=ring_slots, alloc_nbufs=alloc_nbufs)

    # ------------------------------------------------------------------ channels
    def open_kernel_channel(
        self,
        *,
        ring_slots: int | None = None,
        alloc_nbufs: int | None = None,
        alloc_ws: int | None = None,
    ) -> ChannelHandle:
        """Create the kernel half only (the client may live in another process)."""
        with self.lock:
            h = ChannelHandle(
                self,
                ring_slots or self.ring_slots,
                alloc_nbufs or self.alloc_nbufs,
                alloc_ws,
            )
            self.channels.append(h)
            return h

    def open_channel(
        self,
        *,
        ring_slots: int | None = None,
        alloc_nbufs: int | None = None,
        alloc_ws: int | None = None,
    ) -> Channel:
        """Create a channel in this process, syncing by direct calls."""
        from .channel import Channel

        h = self.open_kernel_channel(
            ring_slots=ring_slots, alloc_nbufs=alloc_nbufs, alloc_ws=alloc_ws
        )
        return Channel(self.pool.arena, h.info(), h.sync, closer=h.close)

    def _detach(self, h: ChannelHandle) -> None:
        if h in self.channels:
            self.channels.remove(h)

    # ------------------------------------------------------------------ device side
    def deliver(self, pkts: list[int]) -> int:
        """Queue kernel-owned packets on the channels' RX rings; returns how many were taken.

        Packets ``pkts[:n]`` now belong to the port; the caller frees ``pkts[n:]``.
        Channels are filled in turn starting after the last one served, so one slow
        channel does not starve the others.
        """
        with self.lock:
            self.pool.check_kernel_held(pkts)
            taken = 0
            chans = self.channels
            nch = len(chans)
            for k in range(nch):
                if taken == len(pkts):
                    break
                h = chans[(self._rr + k) % nch]
                taken += h.rx.rx_enqueue(pkts, taken)
            if nch:
                self._rr = (self._rr + 1) % nch
            self.stats.rx_delivered += taken
            self.stats.rx_refused += len(pkts) - taken
            return taken

    def post_event(self, h: ChannelHandle, pkts: list[int]) -> int:
        """Queue kernel-owned event packets for one channel; returns how many were taken."""
        with self.lock:
            self.pool.check_kernel_held(pkts)
            return h.event.rx_enqueue(pkts)

    def _transmit(self, src: ChannelHandle, pkts: list[int], nbytes: int) -> None:
        """Packets a client sent (already internalized, kernel-owned now)."""
        self.stats.tx_packets += len(pkts)
        self.stats.tx_bytes += nbytes
        cb = self.on_transmit
        if cb is None:
            self.stats.tx_dropped += len(pkts)
            self.pool.free_packets(pkts)
        else:
            cb(self, pkts)

    def close(self) -> None:
        """Close every channel still attached (their packets return to the pool)."""
        with self.lock:
            for h in list(self.channels):
                h.close()
            self.channels.clear()


class LoopbackPort(Port):
    """What one channel sends, the port's other channels receive (for tests)."""

    def _transmit(self, src: ChannelHandle, pkts: list[int], nbytes: int) -> None:
        self.stats.tx_packets += len(pkts)
        self.stats.tx_bytes += nbytes
        taken = 0
        for h in self.channels:
            if h is src or taken == len(pkts):
                continue
            taken += h.rx.rx_enqueue(pkts, taken)
        self.stats.rx_delivered += taken
        if taken < len(pkts):
            self.stats.tx_dropped += len(pkts) - taken
            self.pool.free_packets(pkts[taken:])


__all__ = ["ChannelHandle", "LoopbackPort", "Port", "PortStats", "TransmitCallback"]
