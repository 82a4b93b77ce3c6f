"""Device-generated RX traffic: copies of template frames written into a guest's RX buffers
as fast as its driver posts them, with no sender behind the switch.

This is the device's counterpart of testpmd's ``txonly`` engine on a ``net_vhost`` port
(the yardstick for the "device-generated -> testpmd rxonly" benchmark, issue 11), and a
driver developer's line-rate RX stream: a host channel sender has a thread, a TX ring, the
switch and the NIC's hand-off between it and the guest, and is what limits such a stream
(RESULTS "Device throughput").  The generator holds one pool packet per template frame for
its lifetime; each drain of the NIC's RX path writes the templates, over and over, into
whatever buffers the driver has posted (compiled RX bursts of thousands of frames, the
templates over and over: ``VirtioNet._generate_rx``), after any backlogged frames.  The
packets are never freed by a burst, so a generated frame costs a copy into guest memory and
nothing else.

Where the compiled burst does not run (capture, fault rules, several RX queues, the
reference backend), or stops at a frame it cannot write plainly, the generator hands the
NIC fresh copies through its backlog instead, the exact path every other frame takes, so
fault rules, capture and kills see generated frames as they see any other.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vdev.skywalk import Pbufpool

MAX_TEMPLATES = 256  # template frames (packets held for the generator's lifetime)


class RxGenerator:
    """``frames`` (1 to MAX_TEMPLATES Ethernet frames) repeated, ``count`` frames in all
    (None: until :meth:`close`)."""

    def __init__(self, pool: Pbufpool, frames: list[bytes], count: int | None = None) -> None:
        if not 1 <= len(frames) <= MAX_TEMPLATES:
            raise ValueError(f"RX generator: {len(frames)} template frames, want 1 to 256")
        if count is not None and count < 0:
            raise ValueError(f"RX generator: count {count}, want >= 0 or None (no end)")
        self.pool = pool
        self.frames = list(frames)
        self.pkts: list[int] = []
        for frame in frames:
            pkt = pool.packet_from_bytes(frame)
            if pkt is None:
                self.close()
                raise ValueError("RX generator: the pool has no packets for the templates")
            self.pkts.append(pkt)
        self._cycle: array[int] = array("I")
        self.remaining = count
        self.sent = 0  # frames generated: written by a burst, or handed to the backlog
        self._next = 0  # the template the next frame is a copy of

    def next_templates(self, limit: int | None = None) -> array[int]:
        """The template packets for the next compiled burst: ``limit`` frames (default: one
        round of the templates), the templates in order from where the last burst stopped,
        at most what is left to send.  One long burst rather than many short ones: each
        burst is a GIL and lock hand-over, which on this VM costs more than 256 copies."""
        n = len(self.pkts) if limit is None else limit
        if self.remaining is not None:
            n = min(n, self.remaining)
        if len(self._cycle) < len(self.pkts) + n:  # the templates over and over, long enough
            rounds = -(-(len(self.pkts) + n) // len(self.pkts))
            self._cycle = array("I", self.pkts * rounds)
        return self._cycle[self._next : self._next + n]

    def wrote(self, n: int) -> None:
        """``n`` frames of :meth:`next_templates` were written."""
        self.sent += n
        self._next = (self._next + n) % len(self.pkts)
        if self.remaining is not None:
            self.remaining -= n

    def copies(self, n: int) -> list[int]:
        """Up to ``n`` fresh pool packets holding the next frames (the exact path); the
        caller owns them.  Fewer when the pool runs short or the count is reached."""
        out: list[int] = []
        while len(out) < n and (self.remaining is None or self.remaining > len(out)):
            pkt = self.pool.packet_from_bytes(
                self.frames[(self._next + len(out)) % len(self.frames)]
            )
            if pkt is None:
                break
            out.append(pkt)
        self.wrote(len(out))
        return out

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def close(self) -> None:
        """Give the template packets back to the pool."""
        pkts, self.pkts = self.pkts, []
        if pkts:
            self.pool.free_packets(pkts)


__all__ = ["MAX_TEMPLATES", "RxGenerator"]
