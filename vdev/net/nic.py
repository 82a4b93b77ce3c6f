"""The virtio-net device model behind one vhost-user socket (virtio 1.x, 5.1 "Network Device").

This is the small callback table the vhost-user backend drives (``VhostDevice``): it
offers features, learns which ones were negotiated, and is told when rings start and stop.
The data path is two functions:

* ``process_tx``: chains from a guest TX queue are internalized into pbufpool packets (the
  virtio_net_hdr travels in packet metadata) and handed to the switch;
* ``deliver``: packets from the switch are written into guest RX buffers (mergeable when
  MRG_RXBUF is negotiated), and the guest is notified through the call eventfd when the
  EVENT_IDX / NO_INTERRUPT rules say so.

A guest that breaks the ring contract gets its queue killed with a named ``KillReason``;
the device, the other queues and the other NICs keep running.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from vdev.abi import lib
from vdev.errors import DefunctError, KillReason, SyncError, SyncKind
from vdev.net.checksum import complete_checksum
from vdev.skywalk import Pbufpool
from vdev.skywalk.errors import PoolError
from vdev.vhost.codec import ProtocolFeature
from vdev.virtio import fastqueue

if TYPE_CHECKING:
    from vdev.net.echoturn import EchoTurn
    from vdev.net.kickhold import KickHold
    from vdev.net.notify_watch import NotifyWatch
    from vdev.net.rxbatch import RxKickBatch
    from vdev.net.rxgen import RxGenerator
    from vdev.vhost.backend import Vring
    from vdev.virtio.chain import Chain
    from vdev.virtio.memory import GuestMemory
    from vdev.virtio.queue import VirtQueue

log = logging.getLogger("vdev.net")

NET_HDR_LEN = 12  # struct virtio_net_hdr_mrg_rxbuf, VERSION_1 or MRG_RXBUF
LEGACY_HDR_LEN = 10  # 5.1.6.1 "Legacy Interface: Device Operation" without MRG_RXBUF
MAX_FRAME = 65550  # a 64 KiB GSO frame plus its Ethernet header
RX_BACKLOG = 512  # frames held per NIC while the guest refills its RX ring
TX_BUDGET = 256  # chains per TX kick before letting other work run
RX_BURST = 256  # backlog frames handed to one compiled RX burst
GEN_ROUNDS = 4  # compiled bursts of the RX generator per drain (rxgen.py)
GEN_BURST = 4096  # frames per such burst (the templates over and over)
GEN_ENDLESS = 1 << 30  # the frames an endless generator has waiting (rxbatch.py's bound)


def bit(n: int) -> int:
    return 1 << n


DEFAULT_FEATURES = (
    bit(lib.VIRTIO_F_VERSION_1)
    | bit(lib.VIRTIO_F_ANY_LAYOUT)
    | bit(lib.VIRTIO_F_NOTIFY_ON_EMPTY)
    | bit(lib.VIRTIO_RING_F_INDIRECT_DESC)
    | bit(lib.VIRTIO_RING_F_EVENT_IDX)
    | bit(lib.VIRTIO_NET_F_MAC)
    | bit(lib.VIRTIO_NET_F_MTU)
    | bit(lib.VIRTIO_NET_F_STATUS)
    | bit(lib.VIRTIO_NET_F_MRG_RXBUF)
    | bit(lib.VIRTIO_NET_F_CSUM)
    | bit(lib.VIRTIO_NET_F_GUEST_CSUM)
    | bit(lib.VIRTIO_NET_F_HOST_TSO4)
    | bit(lib.VIRTIO_NET_F_HOST_TSO6)
    | bit(lib.VIRTIO_NET_F_GUEST_TSO4)
    | bit(lib.VIRTIO_NET_F_GUEST_TSO6)
    # 2.8 "Packed Virtqueues": the backend builds PackedQueue when the driver acks it
    # (QEMU 7.2 with virtio-net-pci packed=on, DPDK virtio_user packed_vq=1).
    | bit(lib.VIRTIO_F_RING_PACKED)
)


@dataclass
class NicQueueStats:
    """Counters of one virtqueue, as ``vdev serve`` prints them on exit."""

    frames: int = 0
    bytes: int = 0
    drops: int = 0
    notifications: int = 0
    kicks: int = 0  # kick eventfd wake-ups from the driver
    merged: int = 0  # RX frames that spanned more than one buffer (MRG_RXBUF)
    kills: dict[str, int] = field(default_factory=dict)
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops += n
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + n

    def rx_burst(self, burst: fastqueue.Burst) -> None:
        """The frames a compiled RX burst wrote into guest buffers."""
        self.frames += burst.count
        self.bytes += burst.nbytes
        self.merged += burst.merged

    def as_dict(self) -> dict[str, object]:
        return {
            "frames": self.frames,
            "bytes": self.bytes,
            "drops": self.drops,
            "drop_reasons": dict(self.drop_reasons),
            "notifications": self.notifications,
            "kicks": self.kicks,
            "merged": self.merged,
            "kills": dict(self.kills),
        }


class RingFaults(Protocol):
    """Ring-level misbehaviour the fault engine installs (``nic.ring_faults``).

    The NIC asks before it consumes a queue and around every used element and call, so a
    fault can stall a queue, rewrite or duplicate used elements, or drop/add interrupts
    without the data path knowing about faults.
    """

    def stalled(self, nic: VirtioNet, index: int) -> bool:
        """True to leave queue ``index`` untouched for now (TX not consumed, RX not filled)."""
        ...

    def used(
        self, nic: VirtioNet, index: int, head: int, written: int
    ) -> list[tuple[int, int]] | None:
        """Used elements to publish instead of (head, written); None means publish as is.

        Elements whose head is not the one in flight are written raw (``push_raw``)."""
        ...

    def calls(self, nic: VirtioNet, index: int, wanted: bool) -> int:
        """How many call notifications to send now (``wanted``: what the ring rules say)."""
        ...

    def idle(self, nic: VirtioNet, index: int, kinds: tuple[str, ...]) -> bool:
        """True when ``used`` ("used" in ``kinds``) or ``calls`` ("calls") would change
        nothing on queue ``index`` (no rule, nothing held), so the compiled bursts, which do
        not call them, may do that part."""
        ...


class FeatureFaults(Protocol):
    """Feature-negotiation misbehaviour (``nic.feature_faults``, vdev/faults/features.py)."""

    def offer(self, nic: VirtioNet, base: int) -> int:
        """The offer a GET_FEATURES answers with, given the device's own ``base``."""
        ...

    def negotiate(self, nic: VirtioNet, acked: int) -> int:
        """The features the device behaves by after the driver acked ``acked``."""
        ...

    def status(self, nic: VirtioNet, value: int) -> int:
        """The device status kept after SET_STATUS ``value``."""
        ...


# The capture tap: (nic, frame, direction, notes) with direction FROM_GUEST or TO_GUEST
# (pcapng epb_flags inbound / outbound) and the notes the frame's record carries.
Tap = Callable[["VirtioNet", bytes, int, list[str]], None]
FROM_GUEST = 1
TO_GUEST = 2

# Hooks the fault engine (and tests) install on the data path.  A TX hook sees the
# packets a queue produced and returns the ones to forward; an RX hook likewise before
# packets are written into guest buffers.  Both own the packets they drop (must free).
PacketHook = Callable[["VirtioNet", int, list[int]], list[int]]


def is_tx(index: int) -> bool:
    """Virtqueue ``index`` is a transmitq (5.1.2 "Virtqueues": receiveqN is 2(N-1),
    transmitqN is 2(N-1)+1)."""
    return index % 2 == 1


def net_queue_direction(index: int) -> SyncKind:
    """The sync a virtio-net queue plays: TX for a transmitq (the device reads), RX else."""
    return SyncKind.TX if is_tx(index) else SyncKind.RX


def _flow_key(head: bytes) -> bytes:
    """IPv4 addresses and L4 ports of a frame (bytes 26-37), or the whole head if short."""
    return head[26:38] if len(head) >= 38 else head


class VirtioNet:
    """One NIC: device side of a vhost-user connection plus its switch endpoint."""

    def __init__(
        self,
        name: str,
        pool: Pbufpool,
        forward: Callable[[str, list[int]], None],
        *,
        mac: bytes = b"\x52\x54\x00\x12\x34\x56",
        queue_pairs: int = 1,
        mtu: int = 1500,
        features: int = DEFAULT_FEATURES,
    ) -> None:
        if not 1 <= queue_pairs <= 8:
            raise ValueError(f"queue_pairs={queue_pairs}: vdev supports 1 to 8 queue pairs")
        self.name = name
        self.pool = pool
        self.forward = forward
        self.mac = mac
        self.queue_pairs = queue_pairs
        self.mtu = mtu
        self.offered = features | (bit(lib.VIRTIO_NET_F_MQ) if queue_pairs > 1 else 0)
        self.negotiated = 0
        self.link_up = True
        self.vrings: dict[int, Vring] = {}
        self.stats: dict[int, NicQueueStats] = {i: NicQueueStats() for i in range(2 * queue_pairs)}
        self.backlog: deque[int] = deque()
        self.tx_hooks: list[PacketHook] = []
        self.rx_hooks: list[PacketHook] = []
        self.kill_log: list[tuple[int, SyncError]] = []
        self.mem: GuestMemory | None = None  # the connection's guest memory (fault checks)
        # Capture: every frame that enters this NIC (a TX chain, or a packet taken from the
        # switch) gets ONE record, written where its fate is settled: forwarded to the
        # switch, written into guest buffers, or dropped (by a fault rule or by the device,
        # with the reason).  Faults on the way attach notes to the packet (``annotate``), so
        # the record says what happened to the frame, once.
        self.tap: Tap | None = None
        self._notes: dict[int, list[str]] = {}
        self.ring_faults: RingFaults | None = None
        # Feature-negotiation faults (vdev/faults/features.py), installed by the engine.
        self.feature_faults: FeatureFaults | None = None
        # What the last GET_FEATURES offered and the last SET_FEATURES acked; ``negotiated``
        # is what the device behaves by (the acked set unless a feature fault says else).
        self.last_offer = self.offered
        self.acked = 0
        # Set by the device: run a callable from its event loop soon (see process_tx).
        self.defer: Callable[[Callable[[], None]], None] | None = None
        # TX kick mitigation (kickhold.py), set by the device; None: every kick drains.
        self.kick_hold: KickHold | None = None
        # RX kick batching (rxbatch.py), set by the device; None: a kick per refill.
        self.rx_batch: RxKickBatch | None = None
        # Device-generated RX traffic (rxgen.py): start_rx_generator / stop_rx_generator.
        self.rx_gen: RxGenerator | None = None
        self._generating = False  # the generator's copies are being delivered
        # Lifecycle events (a ring resumed away from SET_VRING_BASE): kept here and handed to
        # ``event_sink`` (the device's fault log, when there is one).
        self.resumes: list[dict[str, object]] = []
        self.event_sink: Callable[..., object] | None = None
        # Called after every chain the data path takes, with the queue index and how many
        # chains it holds unpublished (popped, used idx not yet stored): the fault engine's
        # scriptable crash point (a crash "with descriptors in flight").
        self.take_hook: Callable[[VirtioNet, int, int], None] | None = None
        # The lost-notification watch (notify_watch.py), set by the device; told of every
        # interrupt sent.
        self.watch: NotifyWatch | None = None
        self._rx_rr = 0
        # Per-NIC datapath threads (vdev/net/threads.py, set by the device): this NIC's lock,
        # the hand-off into its thread's inbox, and the context its compiled bursts run in
        # (without the shared lock).  None: one thread serves everything.
        self.lock = threading.RLock()
        self.handoff: Callable[[list[int]], int] | None = None
        # Frames handed off and not yet taken in by the NIC's thread (with ``handoff``).
        self.handoff_waiting: Callable[[], int] | None = None
        # A paced RX sender's wake-up (``(level, fn)``): ``fn`` runs on the datapath after a
        # drain into guest buffers leaves at most ``level`` frames waiting (rx_waiting), so
        # the sender sleeps until there is room instead of polling for it.
        self.rx_low: tuple[int, Callable[[], None]] | None = None
        self.burst_unlocked: Callable[[], AbstractContextManager[object] | None] | None = None
        # The echo turn (echoturn.py, set by the device): a TX burst to the responder and its
        # replies' RX burst in one compiled call, when nothing needs the stage-by-stage path.
        self.echo_turn: EchoTurn | None = None

    # -- VhostDevice callback table ------------------------------------------------------

    def device_features(self) -> int:
        return self.offered

    def features_offer(self) -> int:
        """The GET_FEATURES answer: the offer, through the feature faults."""
        ff = self.feature_faults
        self.last_offer = self.offered if ff is None else ff.offer(self, self.offered)
        return self.last_offer

    def protocol_features(self) -> int:
        return bit(ProtocolFeature.MTU)  # NET_SET_MTU

    def max_queues(self) -> int:
        # Virtqueues the backend must track: RX and TX per pair (QEMU keeps the control
        # queue).  QEMU compares GET_QUEUE_NUM with queues= (pairs), which this covers.
        return 2 * self.queue_pairs

    def queue_direction(self, index: int) -> SyncKind:
        return net_queue_direction(index)

    def features_set(self, features: int) -> int:
        """SET_FEATURES: returns the set the device (and its rings) will behave by."""
        self.acked = features
        ff = self.feature_faults
        self.negotiated = features if ff is None else ff.negotiate(self, features)
        return self.negotiated

    def status_set(self, status: int) -> int:
        """SET_STATUS: the status the device keeps (a refused negotiation drops
        FEATURES_OK, 3.1.1 "Driver Requirements: Device Initialization")."""
        ff = self.feature_faults
        return status if ff is None else ff.status(self, status)

    def queue_started(self, vring: Vring) -> None:
        if vring.index >= 2 * self.queue_pairs:
            log.error(
                "%s: frontend started queue %d of %d", self.name, vring.index, 2 * self.queue_pairs
            )
            return
        first = self.vrings.get(vring.index) is not vring
        self.vrings[vring.index] = vring
        log.info(
            "%s: queue %d started (num=%d base=%d)", self.name, vring.index, vring.num, vring.base
        )
        resume = vring.queue.resume if vring.queue is not None else None
        if first and resume is not None and resume.disagreed:
            self._note_resume(resume.as_dict())
        if vring.enabled:
            # Buffers may be waiting already (or RX frames backlogged).  Not while the ring is
            # started but disabled ("Ring states": TX would be discarded): a front-end that
            # re-establishes a lost connection starts the rings first and enables them last,
            # and what waits in them (a resubmission included) is traffic, not noise.  The
            # backend calls queue_started again on SET_VRING_ENABLE 1.
            self.kick(vring.index)

    def _note_resume(self, detail: dict[str, object]) -> None:
        """A ring resumed where SET_VRING_BASE did not say (or said something stale): one
        ``ring_resume`` event with both values (vhost-user "Ring states")."""
        self.resumes.append(detail)
        del self.resumes[:-64]
        log.warning("%s: ring_resume %s", self.name, detail)
        if self.event_sink is not None:
            queue = detail.get("queue")
            rest = {k: v for k, v in detail.items() if k != "queue"}
            self.event_sink("ring_resume", nic=self.name, queue=queue, **rest)

    def queue_kicked(self, vring: Vring) -> None:
        if self.vrings.get(vring.index) is vring:
            self.stats[vring.index].kicks += 1
            self.kick(vring.index)

    def queue_disabling(self, vring: Vring) -> None:
        """A held TX queue is polled one last time while still enabled: what the driver
        posted without a kick (it was told none was needed) is sent, not discarded as a
        disabled ring's TX would be (vhost-user "Ring states")."""
        if self.vrings.get(vring.index) is vring and self.kick_hold is not None:
            self.kick_hold.disabling(vring.index)

    def queue_stopped(self, vring: Vring) -> None:
        if self.vrings.get(vring.index) is vring:
            del self.vrings[vring.index]
            log.info("%s: queue %d stopped", self.name, vring.index)

    def memory_changed(self, mem: GuestMemory) -> None:
        self.mem = mem
        log.info(
            "%s: guest memory now %d regions, %d bytes", self.name, len(mem.regions), mem.total_size
        )

    def set_mtu(self, mtu: int) -> None:
        self.mtu = mtu

    def get_config(self, offset: int, size: int) -> bytes:
        cfg = self.mac + struct.pack(
            "<HHH", lib.VIRTIO_NET_S_LINK_UP if self.link_up else 0, self.queue_pairs, self.mtu
        )
        return cfg[offset : offset + size].ljust(size, b"\0")

    def disconnected(self) -> None:
        self.mem = None
        for vring in list(self.vrings.values()):
            self.queue_stopped(vring)
        self._record_refused(list(self.backlog), "disconnected")
        self.pool.free_packets(list(self.backlog))
        self.backlog.clear()

    # -- helpers ---------------------------------------------------------------------------

    def has(self, feature: int) -> bool:
        return bool(self.negotiated & bit(feature))

    @property
    def hdr_len(self) -> int:
        # 5.1.6 "Device Operation": the 12-byte header with VERSION_1 or MRG_RXBUF.
        if self.has(lib.VIRTIO_F_VERSION_1) or self.has(lib.VIRTIO_NET_F_MRG_RXBUF):
            return NET_HDR_LEN
        return LEGACY_HDR_LEN

    def _running(self, index: int) -> VirtQueue | None:
        vring = self.vrings.get(index)
        if vring is None or vring.queue is None or not vring.enabled:
            return None
        if vring.queue.defunct is not None:
            return None
        return vring.queue

    def _kill(self, index: int, err: SyncError) -> None:
        fault = self.mem.fault() if self.mem is not None else None
        if fault is not None:
            # The ring was read from the zero pages memguard put over a truncated region:
            # the driver broke no ring rule, its frontend pulled the memory away.  The
            # connection is dropped for that (GuestMemoryFault); no kill is counted.
            log.error("%s: queue %d stopped: %s", self.name, index, fault)
            return
        stats = self.stats[index]
        stats.kills[err.reason.name] = stats.kills.get(err.reason.name, 0) + 1
        self.kill_log.append((index, err))
        log.error("%s: queue %d defunct: %s", self.name, index, err)

    def _push(self, queue: VirtQueue, index: int, head: int, written: int) -> None:
        faults = self.ring_faults
        elems = faults.used(self, index, head, written) if faults is not None else None
        if elems is None:
            queue.push(head, written)
            return
        for h, n in elems:
            if h == head:
                queue.push(h, written)
                if n != written:
                    queue.patch_last_used(n)  # a lying length, written raw
            else:
                queue.push_raw(h, n)

    def _maybe_notify(self, queue: VirtQueue, index: int) -> None:
        wanted = queue.should_notify()
        faults = self.ring_faults
        count = faults.calls(self, index, wanted) if faults is not None else int(wanted)
        for _ in range(count):
            self.notify(index)

    def _faults_idle(self, index: int, kind: str) -> bool:
        """No ring fault of ``kind`` can act on queue ``index`` now (``RingFaults.idle``)."""
        return self.ring_faults is None or self.ring_faults.idle(self, index, (kind,))

    def _finish(self, queue: VirtQueue, index: int, consumed: int) -> None:
        """Publish the pushed used elements and interrupt if the ring rules (and interrupt
        fault rules) say so: in C when no interrupt rule applies, else the decision goes
        through ``_maybe_notify``."""
        if self._faults_idle(index, "calls"):
            if fastqueue.finish(queue, consumed):
                self.notify(index)
            return
        fastqueue.finish(queue, 0)  # publish only
        if consumed:
            self._maybe_notify(queue, index)

    def _stalled(self, index: int) -> bool:
        return self.ring_faults is not None and self.ring_faults.stalled(self, index)

    def notify(self, index: int) -> None:
        vring = self.vrings.get(index)
        if vring is None or vring.call_fd is None:
            return
        try:
            os.eventfd_write(vring.call_fd, 1)
        except OSError as exc:
            self.notified(index, exc)
            return
        self.notified(index)

    def notified(self, index: int, exc: OSError | None = None) -> None:
        """Book an interrupt written to queue ``index``'s call fd (by :meth:`notify`, or
        from C by the echo turn): counted and told to the watch, or ``exc`` logged."""
        if exc is not None:
            log.warning("%s: queue %d call fd: %s", self.name, index, exc)
            return
        self.stats[index].notifications += 1
        if self.watch is not None:
            self.watch.interrupted(index)

    # -- capture records --------------------------------------------------------------------

    def annotate(self, pkt: int, note: str) -> None:
        """Add ``note`` (a fault's comment) to the record packet ``pkt`` gets at its fate."""
        if self.tap is not None:
            self._notes.setdefault(pkt, []).append(note)

    def pass_notes(self, old: int, new: int, *, keep: bool = False) -> None:
        """Packet ``new`` carries on for ``old``: a modified copy replacing it, or with
        ``keep`` a duplicate of it; either way its record shows the notes so far."""
        if self.tap is not None:
            notes = self._notes.get(old, []) if keep else self._notes.pop(old, [])
            self._notes[new] = list(notes)

    def record(
        self, pkt: int, direction: int, fate: str | None = None, frame: bytes | None = None
    ) -> None:
        """Write the one capture record of ``pkt`` (its bytes, or ``frame`` when the device
        changed them on the way), its notes and, for a dropped frame, its ``fate``."""
        notes = self._notes.pop(pkt, None) if self._notes else None
        if self.tap is not None:
            data = frame if frame is not None else self.pool.packet_bytes(pkt)
            self.tap(self, data, direction, [*(notes or ()), *((fate,) if fate else ())])

    def _fresh(self, pkts: list[int]) -> None:
        """Packets entering this NIC start with no notes (a reused index had a past)."""
        if self._notes:
            for pkt in pkts:
                self._notes.pop(pkt, None)

    def _drop_tx_frame(self, stats: NicQueueStats, reason: str, frame: bytes | None) -> None:
        """A TX frame the device drops before it becomes a packet: counted and recorded."""
        stats.drop(reason)
        if self.tap is not None and frame is not None:
            self.tap(self, frame, FROM_GUEST, [f"vdev-drop reason={reason}"])

    def _forward(self, pkts: list[int]) -> None:
        """Hand TX packets to the switch: their fate here is "forwarded", so record them."""
        if self.tap is not None or self._notes:
            for pkt in pkts:
                self.record(pkt, FROM_GUEST)
        self.forward(self.name, pkts)

    # -- TX: guest -> switch ---------------------------------------------------------------

    def process_tx(self, index: int) -> int:
        """Drain one TX queue; returns the number of chains consumed.

        After ``TX_BUDGET`` chains the rest is handed to ``defer`` (the device's event loop),
        so a guest that keeps its TX ring full cannot hold the device lock forever and
        starve other queues, NICs and host channels; without ``defer`` this loops here until
        the queue is empty (a loop, not recursion: a guest that keeps the ring full would
        otherwise reach RecursionError).
        """
        total = 0
        while True:
            consumed = self._process_tx_batch(index)
            total += consumed
            if consumed < TX_BUDGET:
                return total
            if self.defer is not None:
                self.defer(lambda: self._continue_tx(index))
                return total

    def _continue_tx(self, index: int) -> None:
        self.process_tx(index)

    def _process_tx_batch(self, index: int) -> int:
        """Consume up to ``TX_BUDGET`` chains of one TX queue and forward them.

        With the compiled bursts (``vdev/virtio/fastqueue.py``) the chains go through C in
        runs; whatever a burst cannot complete plainly (a drop, a kill, pool pressure) is
        the next chain for the Python reference below, then the bursts resume.  Used-element
        fault rules on the queue need the reference's per-element hook, so they keep the
        whole batch in Python; interrupt rules only the notification decision
        (``_finish``); capture and packet rules see the packets after the loop on both
        paths."""
        vring = self.vrings.get(index)
        if vring is None or vring.queue is None or vring.queue.defunct is not None:
            return 0
        if self._stalled(index):
            return 0
        queue = vring.queue
        stats = self.stats[index]
        hlen = self.hdr_len
        pkts: list[int] = []
        consumed = 0
        fast = (
            fastqueue.usable(queue)
            and self._faults_idle(index, "used")
            and vring.enabled
            and self.link_up
            and self.take_hook is None  # an armed crash point counts chains one by one
        )
        burst: fastqueue.Burst | None = None
        # A batch that is one burst ending it is finished by that burst's call (the C
        # publishes and decides the interrupt), unless an interrupt rule needs to see it.
        finish_inline = fast and self._faults_idle(index, "calls")
        notify: bool | None = None
        # The echo turn: this batch's first burst, and what its packets go through after it,
        # in one compiled call when nothing needs the stage-by-stage path (echoturn.py);
        # ``resume`` then books and finishes what the call did instead of _forward.
        turn = self.echo_turn if finish_inline else None
        resume: Callable[[], None] | None = None
        try:
            while consumed < TX_BUDGET:
                if fast:
                    first = len(pkts)
                    rx_index = turn.ready(self) if turn is not None and consumed == 0 else None
                    if rx_index is not None:
                        assert turn is not None
                        burst, resume = turn.run(self, queue, index, rx_index, pkts)
                    else:
                        burst = fastqueue.tx_burst(
                            queue,
                            self.pool,
                            hlen,
                            TX_BUDGET - consumed,
                            pkts,
                            self._unlocked(),
                            finish=finish_inline and consumed == 0,
                        )
                    notify = burst.notify
                    self._fresh(pkts[first:])
                    consumed += burst.count
                    stats.frames += burst.count
                    stats.bytes += burst.nbytes
                    if burst.stop in (fastqueue.C.EMPTY, fastqueue.C.BUDGET):
                        break
                    # SLOW or VIOLATION: the reference takes the next chain.
                step = self._tx_one(queue, index, vring, stats, hlen, pkts)
                if burst is not None:
                    fastqueue.check_violation(burst, None)
                    burst = None
                if step < 0:
                    break
                consumed += step
                if step and self.take_hook is not None:
                    self.take_hook(self, index, consumed)  # a crash point counts each chain
            if notify is not None:
                if notify:
                    self.notify(index)
            elif fast and queue.defunct is None:
                self._finish(queue, index, consumed)
            else:
                queue.flush_used()
                if consumed:
                    self._maybe_notify(queue, index)
        except SyncError as err:
            if burst is not None:
                fastqueue.check_violation(burst, err)
            self._kill(index, err)
        except DefunctError:
            pass
        if self.vrings.get(index) is not vring:
            # The ring stopped under this batch (a crash point dropped the connection): the
            # chains it took are not completed, so their frames go nowhere, as with a dead
            # back-end; a resubmission (inflight) or the used idx brings them back.
            self.pool.free_packets(pkts)
            return consumed
        if resume is not None:
            resume()  # the turn forwarded pkts already (no hooks, no capture: ready())
            return consumed
        pkts = self._run_hooks(self.tx_hooks, index, pkts)
        if pkts:
            self._forward(pkts)
        return consumed

    def _tx_one(
        self,
        queue: VirtQueue,
        index: int,
        vring: Vring,
        stats: NicQueueStats,
        hlen: int,
        pkts: list[int],
    ) -> int:
        """One step of the TX loop (the reference): 1 when a chain was consumed, 0 when the
        ring was empty but buffers raced in while re-arming, -1 when it is empty."""
        chain = queue.pop()
        if chain is None:
            if queue.hold_kick:
                return -1  # kick mitigation: the device polls this ring again itself
            # Re-arm the kick (2.7.10: with EVENT_IDX, avail_event must follow what
            # we consumed or the driver stops kicking); if buffers raced in, go on.
            return 0 if queue.enable_notifications(True) else -1
        self._push(queue, index, chain.head, 0)
        # 2.7 "Virtqueue Operation": a disabled TX ring is drained and dropped.
        if not vring.enabled or not self.link_up:
            reason = "ring_disabled" if not vring.enabled else "link_down"
            frame = bytes(chain.read_bytes()[hlen:]) if self.tap is not None else None
            self._drop_tx_frame(stats, reason, frame)
            return 1
        pkt = self._internalize_tx(chain, hlen, stats)
        if pkt is not None:
            pkts.append(pkt)
        return 1

    def _internalize_tx(self, chain: Chain, hlen: int, stats: NicQueueStats) -> int | None:
        if chain.read_len < hlen + 14:
            tapped = bytes(chain.read_bytes()[hlen:]) if self.tap is not None else None
            self._drop_tx_frame(stats, "runt", tapped)
            return None
        if chain.read_len - hlen > MAX_FRAME:
            tapped = bytes(chain.read_bytes()[hlen:]) if self.tap is not None else None
            self._drop_tx_frame(stats, "oversize", tapped)
            return None
        data = chain.read_bytes()
        hdr = bytes(data[:hlen]).ljust(NET_HDR_LEN, b"\0")
        frame = bytes(data[hlen:])
        flags, gso_type = hdr[0], hdr[1]
        if flags & lib.VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == lib.VIRTIO_NET_HDR_GSO_NONE:
            # CSUM negotiated: the guest left the checksum to us.  Complete it here so every
            # consumer (responder, capture, host channels) sees a valid frame; the header
            # keeps saying NEEDS_CSUM only for GSO frames that travel as pass-through.
            csum_start, csum_offset = struct.unpack_from("<HH", hdr, 6)
            frame = complete_checksum(frame, csum_start, csum_offset)
            hdr = b"\0\0" + hdr[2:]
        try:
            pkt = self.pool.packet_from_bytes(frame, hdr)
        except PoolError:  # larger than this pool can ever hold (a small custom pool)
            self._drop_tx_frame(stats, "too_big_for_pool", frame)
            return None
        if pkt is None:
            self._drop_tx_frame(stats, "pool_exhausted", frame)
            return None
        self._fresh([pkt])
        stats.frames += 1
        stats.bytes += len(frame)
        return pkt

    # -- RX: switch -> guest ---------------------------------------------------------------

    @property
    def endpoint_name(self) -> str:
        return self.name

    def deliver(self, pkts: list[int]) -> int:
        """Switch endpoint: take frames for the guest (backlogged while buffers are short).

        With a datapath thread of its own (``handoff``, set while the device runs
        ``threads="per-nic"``), the frames are handed to that thread, whatever thread the
        switch runs on: only the NIC's thread touches its queues (vdev/net/threads.py)."""
        if self.handoff is not None:
            return self.handoff(pkts)
        return self.deliver_now(pkts)

    def rx_waiting(self) -> int:
        """Frames on their way to the guest's RX buffers: the backlog plus, with a datapath
        thread, the frames handed to it that it has not taken in yet.  What a sender that
        paces itself by the guest must watch (the backlog alone looks empty while the
        hand-off inbox fills, and the frames past RX_BACKLOG are refused)."""
        waiting = self.handoff_waiting
        return len(self.backlog) + (waiting() if waiting is not None else 0)

    def rx_room(self) -> int:
        """Frames the hand-off to the NIC's thread may admit now: the backlog's free room,
        plus a guest RX ring's worth (each running RX queue's size) while the backlog is
        empty, since a delivery drains into guest buffers between its chunks.  With frames
        backlogged the guest ring is full, so only the backlog's room counts; an inbox
        admitted past what a direct delivery takes would be decided late, after the guest
        freed buffers.  The NIC's thread then decides exactly (:meth:`deliver_now`)."""
        room = max(0, RX_BACKLOG - len(self.backlog))
        if self.backlog:
            return room
        return room + sum(
            self.vrings[i].num for i in range(0, 2 * self.queue_pairs, 2) if self._running(i)
        )

    def record_refused(self, pkts: list[int], reason: str) -> None:
        """Frames refused on the way in (a full hand-off inbox): recorded as dropped."""
        self._record_refused(pkts, reason)

    def count_refused(self, n: int) -> None:
        """``n`` frames refused before they reached the backlog (a full hand-off inbox)."""
        rx_running = [i for i in range(0, 2 * self.queue_pairs, 2) if self._running(i)]
        self.stats[rx_running[0] if rx_running else 0].drop("rx_backlog_full", n)

    def _unlocked(self) -> AbstractContextManager[object] | None:
        return self.burst_unlocked() if self.burst_unlocked is not None else None

    def deliver_now(self, pkts: list[int]) -> int:
        """:meth:`deliver` on the NIC's own thread (or the only one)."""
        self._fresh(pkts)
        rx_running = [i for i in range(0, 2 * self.queue_pairs, 2) if self._running(i)]
        if not rx_running or not self.link_up:
            # 2.7 / vhost-user "Ring states": a disabled RX ring gets nothing.
            reason = "rx_ring_down" if self.link_up else "link_down"
            self.stats[0].drop(reason, len(pkts))
            self._record_refused(pkts, reason)
            return 0
        # In chunks that fit the backlog: each chunk drains into guest buffers before the
        # next is admitted, so a burst sees the guest ring plus RX_BACKLOG, however the
        # sender split it (64-frame channel syncs, or one hand-off inbox of many).
        taken = 0
        while taken < len(pkts):
            room = RX_BACKLOG - len(self.backlog)
            if room <= 0:
                break
            chunk = pkts[taken : taken + room]
            taken += len(chunk)
            self.inject_rx(self._run_hooks(self.rx_hooks, rx_running[0], chunk))
        if taken < len(pkts):
            self.stats[rx_running[0]].drop("rx_backlog_full", len(pkts) - taken)
            self._record_refused(pkts[taken:], "rx_backlog_full")
        return taken

    def _record_refused(self, pkts: list[int], reason: str) -> None:
        """RX frames refused here (the switch frees them): recorded as dropped, by name."""
        if self.tap is not None:
            for pkt in pkts:
                self.record(pkt, TO_GUEST, f"vdev-drop reason={reason}")

    def _run_hooks(self, hooks: list[PacketHook], index: int, pkts: list[int]) -> list[int]:
        for hook in hooks:
            pkts = hook(self, index, pkts)
        return pkts

    def inject_tx(self, pkts: list[int]) -> None:
        """Send packets into the switch as if the guest sent them, past the TX hooks."""
        if pkts:
            self._forward(pkts)

    def inject_rx(self, pkts: list[int]) -> None:
        """Queue packets for the guest past the RX hooks (a fault releasing held frames)."""
        self.backlog.extend(pkts)
        self.drain_rx()

    def _pick_rx_queue(self, flow: bytes) -> int | None:
        running = [
            i
            for i in range(0, 2 * self.queue_pairs, 2)
            if self._running(i) and not self._stalled(i)
        ]
        if not running:
            return None
        if len(running) == 1:
            return running[0]
        # Spread flows across pairs by a hash of the addresses and ports (no RSS negotiated).
        return running[zlib.crc32(flow) % len(running)]

    def drain_rx(self) -> None:
        """Move backlogged frames into guest RX buffers while there is room, then, with the
        backlog empty, device-generated frames (rxgen.py) if a generator runs.

        With one RX queue running and the compiled bursts usable, frames go through C in
        runs; a frame a burst cannot write plainly (a drop, a kill) is the next one for the
        Python reference below, then the bursts resume."""
        if self.backlog:
            self._drain_backlog()
        gen = self.rx_gen
        if gen is not None and not self.backlog and not gen.done and not self._generating:
            self._generate_rx(gen)

    def _drain_backlog(
        self, first: fastqueue.Burst | None = None, touched: set[int] | None = None
    ) -> None:
        """``first``: the first compiled RX burst was made already (by the echo turn, with
        its frames freed and counted, ``touched`` holding its queue); the loop goes on from
        its outcome."""
        if touched is None:
            touched = set()
        while self.backlog or first is not None:
            fast_index = self._fast_rx_queue()
            if fast_index is not None:
                queue = self.vrings[fast_index].queue
                if first is not None:
                    burst, first = first, None
                else:
                    burst = self._rx_burst(fast_index, queue, touched)
                if burst.stop in (fastqueue.C.EMPTY, fastqueue.C.NOROOM):
                    break
                if burst.stop == fastqueue.C.BUDGET:
                    continue
                # SLOW or VIOLATION: the reference takes the next frame.
                err = self._rx_one(touched)
                fastqueue.check_violation(burst, err if isinstance(err, SyncError) else None)
                if err is False:
                    break
                continue
            first = None
            if not self.backlog or self._rx_one(touched) is False:
                break
        for index in touched:
            done_vring = self.vrings.get(index)
            done = done_vring.queue if done_vring is not None else None
            # A queue killed after it took frames publishes nothing more.
            if done is None or done.defunct is not None:
                continue
            if fastqueue.usable(done) and self._faults_idle(index, "used"):
                self._finish(done, index, 1)
            else:
                done.flush_used()
                self._maybe_notify(done, index)
        if self.backlog and self.rx_batch is not None:
            self.rx_batch.waiting()  # frames wait: batch the refill kicks (rxbatch.py)
        low = self.rx_low
        if low is not None and touched and self.rx_waiting() <= low[0]:
            low[1]()

    def start_rx_generator(self, frames: list[bytes], count: int | None = None) -> RxGenerator:
        """Device-generated RX traffic (rxgen.py): ``frames`` repeated into the guest's RX
        buffers as fast as its driver posts them, ``count`` frames in all (None: until
        :meth:`stop_rx_generator`).  Replaces a generator already running.  Call with the
        NIC's lock held (the device's ``lock`` from the control plane)."""
        from vdev.net.rxgen import RxGenerator

        self.stop_rx_generator()
        gen = self.rx_gen = RxGenerator(self.pool, frames, count)
        self.drain_rx()  # the guest may have buffers posted already
        return gen

    def rx_pending(self) -> bool:
        """Frames wait for the guest's buffers: backlogged, or a generator not done."""
        gen = self.rx_gen
        return bool(self.backlog) or (gen is not None and not gen.done)

    def stop_rx_generator(self) -> None:
        """Stop generating; its template packets go back to the pool."""
        gen, self.rx_gen = self.rx_gen, None
        if gen is not None:
            gen.close()

    def _generate_rx(self, gen: RxGenerator) -> None:
        """Generated frames into the guest's buffers until they run out: compiled RX bursts
        of GEN_BURST frames, the templates over and over, which stay the generator's
        (nothing to free), or fresh copies through the backlog where the burst does not run
        or stops at a frame (rxgen.py).  At most GEN_ROUNDS bursts per call; the rest is
        deferred."""
        index = self._fast_rx_queue()
        if index is None or self.rx_hooks or self.tap is not None or self._notes:
            self._generate_copies(gen)
            return
        queue = self.vrings[index].queue
        assert queue is not None  # _fast_rx_queue: a running queue
        stats = self.stats[index]
        mergeable = self.has(lib.VIRTIO_NET_F_MRG_RXBUF)
        csum = self.has(lib.VIRTIO_NET_F_GUEST_CSUM)
        wrote, more = 0, False
        for _ in range(GEN_ROUNDS):
            pkts = gen.next_templates(GEN_BURST)
            if not pkts:
                break
            # Frames waiting, for the RX kick batch: all the generator has left to send.
            left = gen.remaining if gen.remaining is not None else GEN_ENDLESS
            burst = fastqueue.rx_burst(
                queue, self.pool, self.hdr_len, mergeable, csum, pkts, self._unlocked(), left
            )
            n = burst.count
            if n:
                gen.wrote(n)
                stats.rx_burst(burst)
                wrote += n
            if burst.stop == fastqueue.C.EMPTY:  # the whole round written: room for more?
                more = True
                continue
            more = False
            if burst.stop != fastqueue.C.NOROOM:  # SLOW or VIOLATION: the exact way
                self._generate_copies(gen, 1)
            elif self.rx_batch is not None:
                self.rx_batch.waiting()  # generated frames wait too: batch the refill kicks
            break
        if wrote and queue.defunct is None and self.vrings.get(index) is not None:
            self._finish(queue, index, 1)
        if more and not gen.done and self.defer is not None:
            self.defer(self.drain_rx)  # out of rounds, not of room: go on soon

    def _generate_copies(self, gen: RxGenerator, n: int = RX_BURST) -> None:
        """Generated frames as fresh packets through the backlog, ``n`` at a time while the
        guest takes them all (at most GEN_ROUNDS times; the rest is deferred): fault rules,
        capture and the reference see them as any frame from the switch."""
        for _ in range(GEN_ROUNDS):
            pkts = gen.copies(n)
            if not pkts:
                return
            self._generating = True
            try:
                taken = self.deliver_now(pkts)
            finally:
                self._generating = False
            if taken < len(pkts):
                self.pool.free_packets(pkts[taken:])  # refused: counted as dropped, by name
            if self.backlog or taken < len(pkts) or n < RX_BURST:
                return  # the guest is out of buffers (the refill kick resumes), or one frame
        if not gen.done and self.defer is not None:
            self.defer(self.drain_rx)

    def _fast_rx_queue(self) -> int | None:
        """The RX queue a compiled burst may fill: the only one running, not stalled, with
        no used-element fault rule (those need the reference's per-element hook)."""
        if not self.link_up or fastqueue.BACKEND != "c":
            return None
        running = [i for i in range(0, 2 * self.queue_pairs, 2) if self._running(i)]
        if len(running) != 1 or not self._faults_idle(running[0], "used"):
            return None
        if self._stalled(running[0]):
            return None  # the reference's _pick_rx_queue finds no queue and stops
        queue = self.vrings[running[0]].queue
        return running[0] if fastqueue.usable(queue) else None

    def _rx_burst(self, index: int, queue: VirtQueue | None, touched: set[int]) -> fastqueue.Burst:
        """One compiled RX burst over the head of the backlog; frees what it wrote."""
        stats = self.stats[index]
        pkts = list(itertools.islice(self.backlog, RX_BURST))
        burst = fastqueue.rx_burst(
            queue,
            self.pool,
            self.hdr_len,
            self.has(lib.VIRTIO_NET_F_MRG_RXBUF),
            self.has(lib.VIRTIO_NET_F_GUEST_CSUM),
            pkts,
            self._unlocked(),
            len(self.backlog),
        )
        n = burst.count
        if n:
            for _ in range(n):
                self.backlog.popleft()
            done = pkts[:n]
            if self.tap is not None or self._notes:
                for pkt in done:  # each frame's one record, at its fate (written)
                    self.record(pkt, TO_GUEST)
            self.pool.free_taken(done)
            stats.rx_burst(burst)
            touched.add(index)
        if burst.stop == fastqueue.C.EMPTY and n == len(pkts) and self.backlog:
            # The burst only saw the first RX_BURST frames: go on with the rest.
            return fastqueue.Burst(fastqueue.C.BUDGET, 0, n, burst.nbytes)
        return burst

    def _rx_one(self, touched: set[int]) -> SyncError | bool:
        """One step of the RX drain (the reference) for the frame at the head of the
        backlog: False to stop (no queue, or no room), True to go on, or the SyncError that
        killed a queue (the loop goes on too)."""
        pkt = self.backlog[0]
        head = self.pool.packet_head(pkt, 42)
        index = self._pick_rx_queue(_flow_key(head))
        if index is None:
            return False
        vring = self.vrings[index]
        queue = vring.queue
        assert queue is not None
        try:
            before = queue.avail_count()
            done = self._write_rx(queue, index, pkt, self.stats[index])
            if not done:
                # No room: ask for a kick when the guest refills (2.7.10), with RX kick
                # batching after min(kick_ahead, frames waiting) buffers (rxbatch.py); if
                # buffers arrived while re-arming, go round again.
                ahead = queue.kick_ahead
                if ahead > 1:
                    ahead = min(ahead, len(self.backlog))
                queue.enable_notifications(True, ahead)
                return queue.avail_count() > before
        except SyncError as err:
            self._kill(index, err)
            return err
        except DefunctError:
            return True
        self.backlog.popleft()
        self.pool.free_packets([pkt])
        touched.add(index)
        return True

    def _write_rx(self, queue: VirtQueue, index: int, pkt: int, stats: NicQueueStats) -> bool:
        """Write one frame into guest buffers; False when the guest has not posted enough."""
        frame = self.pool.packet_bytes(pkt)
        vnet = self.pool.packet_vnet(pkt) or bytes(NET_HDR_LEN)
        if vnet[1] != lib.VIRTIO_NET_HDR_GSO_NONE and not self._guest_gso_ok(vnet[1]):
            stats.drop("gso_unsupported")
            self.record(pkt, TO_GUEST, "vdev-drop reason=gso_unsupported")
            return True
        if vnet[0] & lib.VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.has(lib.VIRTIO_NET_F_GUEST_CSUM):
            start, offset = struct.unpack_from("<HH", vnet, 6)
            frame = complete_checksum(frame, start, offset)
            vnet = b"\0\0" + vnet[2:]
        hlen = self.hdr_len
        total = hlen + len(frame)
        mergeable = self.has(lib.VIRTIO_NET_F_MRG_RXBUF)
        start_idx = queue.last_avail_idx
        chains: list[Chain] = []
        room = 0
        while room < total:
            if queue.avail_count() == 0:
                queue.rewind(start_idx)
                return False
            chain = queue.pop()
            if chain is None:
                queue.rewind(start_idx)
                return False
            chains.append(chain)
            room += chain.write_len
            if not mergeable:
                break
        if room < total:
            # One buffer without MRG_RXBUF and it is too small: the frame cannot be
            # delivered.  Hand the buffer back untouched for the next frame and drop this
            # one (as QEMU's virtqueue_unpop does).
            queue.rewind(start_idx)
            stats.drop("rx_buffer_too_small")
            self.record(pkt, TO_GUEST, "vdev-drop reason=rx_buffer_too_small", frame)
            return True
        hdr = vnet[:hlen]
        if hlen == NET_HDR_LEN:
            hdr = hdr[:10] + struct.pack("<H", len(chains) if mergeable else 1)
        data = hdr + frame
        offset = 0
        for chain in chains:
            n = chain.write_into(data[offset:])
            self._push(queue, index, chain.head, n)
            offset += n
        stats.frames += 1
        stats.bytes += len(frame)
        if len(chains) > 1:
            stats.merged += 1
        self.record(pkt, TO_GUEST, frame=frame)
        return True

    def _guest_gso_ok(self, gso_type: int) -> bool:
        kind = gso_type & ~lib.VIRTIO_NET_HDR_GSO_ECN
        need = {
            lib.VIRTIO_NET_HDR_GSO_TCPV4: lib.VIRTIO_NET_F_GUEST_TSO4,
            lib.VIRTIO_NET_HDR_GSO_TCPV6: lib.VIRTIO_NET_F_GUEST_TSO6,
            lib.VIRTIO_NET_HDR_GSO_UDP: lib.VIRTIO_NET_F_GUEST_UFO,
        }.get(kind)
        return need is not None and self.has(need)

    def kick(self, index: int) -> None:
        """Process queue ``index``: the guest kicked it, it started, or a fault resumes it."""
        if is_tx(index):
            if self.kick_hold is not None:
                self.kick_hold.kicked(index)  # may hold the queue (kickhold.py)
            else:
                self.process_tx(index)
        else:
            self.drain_rx()

    def stats_dict(self) -> dict[str, object]:
        queues = {}
        for index, qstats in self.stats.items():
            kind = "tx" if is_tx(index) else "rx"
            entry = qstats.as_dict()
            vring = self.vrings.get(index)
            if vring is not None and vring.queue is not None:
                entry["ring"] = vring.queue.ring_state()
            queues[f"{kind}{index // 2}"] = entry
        return {
            "name": self.name,
            "negotiated": hex(self.negotiated),
            # Offered vs acked vs what the device behaves by: a feature fault shows as a
            # difference here (withdrawn: acked, not used; assumed: used, not acked).
            "features": {
                "offered": hex(self.last_offer),
                "acked": hex(self.acked),
                "negotiated": hex(self.negotiated),
                "withdrawn": hex(self.acked & ~self.negotiated),
                "assumed": hex(self.negotiated & ~self.acked),
            },
            "link_up": self.link_up,
            "backlog": len(self.backlog),
            "queues": queues,
            "resumes": list(self.resumes),
            "notify_watch": self.watch.stats() if self.watch is not None else None,
            "kick_hold": self.kick_hold.stats() if self.kick_hold is not None else None,
            "rx_kick_batch": self.rx_batch.stats() if self.rx_batch is not None else None,
            "rx_generator": (
                {"sent": self.rx_gen.sent, "remaining": self.rx_gen.remaining}
                if self.rx_gen is not None
                else None
            ),
        }


__all__ = [
    "DEFAULT_FEATURES",
    "KillReason",
    "NicQueueStats",
    "VirtioNet",
    "is_tx",
    "net_queue_direction",
]
