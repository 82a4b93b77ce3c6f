"""Ring- and interrupt-level faults: the device misbehaving toward the driver.

``RingFaultSet`` implements the ``RingFaults`` protocol of ``vdev.net.nic`` and is installed
as ``nic.ring_faults``.  The NIC asks it

* ``stalled(nic, index)`` before consuming a queue: a ``Stall`` rule leaves TX chains
  unconsumed / RX buffers unfilled until it ends (then the queue is kicked so work resumes);
* ``used(nic, index, head, written)`` for every used element: rules may publish it out of
  order, hold it back (delayed used idx), complete it twice, add a bogus id (out of range or
  not outstanding) or lie about its length.  When a rule handles the element itself it
  pushes on the queue directly (``push`` for the real element, ``push_raw`` for bogus or
  duplicate ones) and returns ``[]``; the NIC's ``flush_used`` publishes them;
* ``calls(nic, index, wanted)`` for every interrupt decision: suppress, delay, add spurious
  interrupts, or ignore EVENT_IDX / NO_INTERRUPT and interrupt anyway.

Held used elements are released by timers on the device loop and always with the real
``push`` (the head is still in flight for the device's trusted bookkeeping), so a delayed
element is a delay, not a leak.  An element held for a queue that has since been
restarted is discarded (logged), as the driver reset the ring anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vdev.abi import lib
from vdev.faults.predicates import PacketInfo

if TYPE_CHECKING:
    from vdev.faults.rules import Rule
    from vdev.net.nic import VirtioNet
    from vdev.virtio.queue import VirtQueue

Used = list[tuple[int, int]]


@dataclass
class UsedElem:
    """One used element the NIC is about to publish on queue ``index`` of ``nic``: what a
    ring action sees (and what it holds back when it delays or reorders)."""

    nic: VirtioNet
    index: int
    queue: VirtQueue
    head: int
    written: int
    token: int = 0  # delay_used: the hold that releases it


class RingAction:
    """Base class of ring/interrupt actions; ``kind`` says which NIC callback drives it."""

    name = "ring"
    kind = "used"  # "used", "calls", "stall" or "timer"

    def applicable(self, nic: VirtioNet) -> bool:
        return True

    def ready(self, u: UsedElem) -> bool:
        """Whether this element is one the action can act on (checked before the rule's
        match keys, so ``nth``/``every`` count only elements it could fire on)."""
        return True

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        return None

    def candidate(self, wanted: bool) -> bool:
        """Whether an interrupt decision is a candidate for this rule's predicates."""
        return True

    def on_calls(
        self, rs: RingFaultSet, rule: Rule, nic: VirtioNet, index: int, count: int, wanted: bool
    ) -> int:
        return count

    def params(self) -> dict[str, Any]:
        return {}


@dataclass
class Stall(RingAction):
    """Stop consuming TX / filling RX for ``seconds`` (None: until the rule is removed)."""

    seconds: float | None = None
    name = "stall"
    kind = "stall"
    active: bool = False

    def params(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "active": self.active}


@dataclass
class OutOfOrder(RingAction):
    """Publish the matched element after the next one (2.7.8: allowed without IN_ORDER).

    If no next element comes within ``hold_ms``, the held one is published alone."""

    hold_ms: float = 1.0
    name = "out_of_order"

    def applicable(self, nic: VirtioNet) -> bool:
        # 2.7.9 "In-order use of descriptors": with IN_ORDER the driver may rely on order.
        return not nic.has(lib.VIRTIO_F_IN_ORDER)

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        rs.hold_ooo(rule, u, self.hold_ms / 1000.0)
        return []

    def params(self) -> dict[str, Any]:
        return {"hold_ms": self.hold_ms}


@dataclass
class BadUsedId(RingAction):
    """Add a used element whose id is out of range (>= queue size) or not outstanding.

    ``replace``: publish the bogus id *instead of* the real one (the real buffer is then
    never returned, as with a device that lost it)."""

    mode: str = "out_of_range"
    replace: bool = False
    name = "bad_used_id"

    @staticmethod
    def idle(u: UsedElem) -> list[int]:
        """Ids the driver cannot have outstanding: not the head, not in flight on the
        device, and (split rings) in no slot of the avail ring.  The last part matters: an
        id the device completed may not be harvested by the driver yet, but a driver can
        only have made an id available through an avail slot, and a slot is overwritten
        only after ``size`` newer ones, which the driver cannot post while it still holds
        that id.  So these ids are "not a head" for the driver, whatever it harvested."""
        size, head = int(u.queue.size), u.head
        avail = getattr(u.queue, "avail_heads", None)
        posted: set[int] = avail() if callable(avail) else set()
        return [
            i
            for i in range(size)
            if i != head and i not in posted and u.queue.inflight_writable(i) is None
        ]

    def ready(self, u: UsedElem) -> bool:
        # The precondition of not_outstanding: a queue whose every id is posted (a Linux
        # RX ring, always full) has none to use, so the rule waits for one that has,
        # instead of falling back to an out-of-range id (another signature) by timing.
        return self.mode != "not_outstanding" or bool(self.idle(u))

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        size, head, written = int(u.queue.size), u.head, u.written
        rng = rule.state.rng
        bogus = size + rng.randrange(max(1, min(size, 0x10000 - size)))
        if self.mode == "not_outstanding":
            idle = self.idle(u)
            if idle:
                bogus = idle[rng.randrange(len(idle))]
        rs.event(rule, u.nic, u.index, "bad_used_id", head=head, id=bogus, mode=self.mode)
        return [(bogus, written)] if self.replace else [(head, written), (bogus, written)]

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode, "replace": self.replace}


class DoubleComplete(RingAction):
    """Publish the element twice (the second copy written raw)."""

    name = "double_complete"

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        u.queue.push(u.head, u.written)
        u.queue.push_raw(u.head, u.written)
        rs.event(rule, u.nic, u.index, "double_complete", head=u.head, len=u.written)
        return []


@dataclass
class BadUsedLen(RingAction):
    """Report a used length larger than the buffer (``huge``: writable + extra), zero, or
    just the vnet header (``header``: an RX buffer holding a zero-length frame)."""

    mode: str = "huge"
    extra: int = 4096
    name = "bad_used_len"

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        written = u.written
        if self.mode == "zero":
            if written == 0:
                return None  # nothing to lie about (TX elements are 0 already)
            n = 0
        elif self.mode == "header":
            # A zero-length frame: the vnet header and nothing after it.
            if written == 0 or u.index % 2 == 1:
                return None
            n = u.nic.hdr_len
        else:
            writable = u.queue.inflight_writable(u.head)
            n = min(
                0xFFFFFFFF, max(written if writable is None else writable, written) + self.extra
            )
        rs.event(rule, u.nic, u.index, "bad_used_len", head=u.head, real=written, reported=n)
        return [(u.head, n)]

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode, "extra": self.extra}


VNET_MODES = ("gso", "csum_beyond", "num_buffers", "flags")


@dataclass
class BadVnetHdr(RingAction):
    """Rewrite the virtio-net header (5.1.6 "Device Operation") the device wrote into an RX
    buffer, just before its used element is published: a malformed header from a device.

    * ``gso``: ``gso_type`` = ``value`` (default 0x7f: no such type, 5.1.6.4 lists 0, 1, 3,
      4 and ECN 0x80) with ``gso_size`` 1, on a device that may not have negotiated GUEST_TSO;
    * ``csum_beyond``: NEEDS_CSUM with ``csum_start`` + ``csum_offset`` past the frame's end
      by ``value`` bytes (5.1.6.2.1: they must lie inside the packet);
    * ``num_buffers``: ``num_buffers`` = ``value`` (default 64: more than the chain or the
      ring holds; 5.1.6.4 "Processing of Incoming Packets"), only with a 12-byte header;
    * ``flags``: the flags byte = ``value`` (unknown bits).

    Split rings only (the head descriptor names the buffer); the element is published
    unchanged otherwise."""

    mode: str = "gso"
    value: int | None = None
    name = "bad_vnet_hdr"

    def __post_init__(self) -> None:
        if self.mode not in VNET_MODES:
            raise ValueError(f"mode: {self.mode!r} must be one of {', '.join(VNET_MODES)}")
        if self.value is not None and not 0 <= self.value <= 0xFFFF:
            raise ValueError(f"value: {self.value} must be 0-65535")

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        if u.index % 2 == 1 or u.written == 0:
            return None  # TX elements carry no header the driver reads
        desc = getattr(u.queue, "_desc", None)  # SplitQueue's descriptor table
        mem = getattr(u.queue, "mem", None)
        if desc is None or mem is None or not 0 <= u.head < int(u.queue.size):
            return None
        gpa, length = int(desc[u.head].addr), int(desc[u.head].len)
        hlen = u.nic.hdr_len
        if length < hlen or u.written < hlen:
            return None
        hdr = bytearray(mem.read(gpa, hlen))
        frame = u.written - hlen
        if self.mode == "gso":
            hdr[1] = 0x7F if self.value is None else self.value & 0xFF
            hdr[4:6] = (1).to_bytes(2, "little")  # gso_size
        elif self.mode == "csum_beyond":
            hdr[0] |= lib.VIRTIO_NET_HDR_F_NEEDS_CSUM
            start = min(0xFFFF, frame + (16 if self.value is None else self.value))
            hdr[6:8] = start.to_bytes(2, "little")
            hdr[8:10] = (6).to_bytes(2, "little")
        elif self.mode == "num_buffers":
            if hlen < 12:
                return None
            hdr[10:12] = (64 if self.value is None else self.value).to_bytes(2, "little")
        else:
            hdr[0] = 0xFC if self.value is None else self.value & 0xFF
        mem.write(gpa, bytes(hdr))
        rs.event(rule, u.nic, u.index, "bad_vnet_hdr", head=u.head, mode=self.mode, hdr=hdr.hex())
        return None  # the element itself is published as the device made it

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode, "value": self.value}


@dataclass
class DelayUsed(RingAction):
    """Hold the element (and every later one, to keep order) ``ms`` before publishing."""

    ms: float = 10.0
    name = "delay_used"

    def on_used(self, rs: RingFaultSet, rule: Rule, u: UsedElem) -> Used | None:
        rs.hold_delayed(rule, u, self.ms / 1000.0)
        return []

    def params(self) -> dict[str, Any]:
        return {"ms": self.ms}


class SuppressIrq(RingAction):
    """Swallow interrupts the ring rules asked for."""

    name = "suppress_irq"
    kind = "calls"

    def candidate(self, wanted: bool) -> bool:
        return wanted

    def on_calls(
        self, rs: RingFaultSet, rule: Rule, nic: VirtioNet, index: int, count: int, wanted: bool
    ) -> int:
        rs.event(rule, nic, index, "suppress_irq")
        return 0


@dataclass
class DelayIrq(RingAction):
    """Send the interrupt ``ms`` later instead of now."""

    ms: float = 10.0
    name = "delay_irq"
    kind = "calls"

    def candidate(self, wanted: bool) -> bool:
        return wanted

    def on_calls(
        self, rs: RingFaultSet, rule: Rule, nic: VirtioNet, index: int, count: int, wanted: bool
    ) -> int:
        rs.event(rule, nic, index, "delay_irq", ms=self.ms)
        rs.call_later(self.ms / 1000.0, lambda: nic.notify(index))
        return max(0, count - 1)

    def params(self) -> dict[str, Any]:
        return {"ms": self.ms}


@dataclass
class SpuriousIrq(RingAction):
    """Extra interrupts: ``extra`` more per decision, or one every ``interval_ms`` (timer)."""

    extra: int = 1
    interval_ms: float | None = None
    name = "spurious_irq"
    kind = "calls"

    def __post_init__(self) -> None:
        if self.extra < 1:
            raise ValueError(f"extra: {self.extra} must be >= 1")
        if self.interval_ms is not None:
            if self.interval_ms <= 0:
                raise ValueError(f"interval_ms: {self.interval_ms} must be > 0")
            self.kind = "timer"

    def on_calls(
        self, rs: RingFaultSet, rule: Rule, nic: VirtioNet, index: int, count: int, wanted: bool
    ) -> int:
        rs.event(rule, nic, index, "spurious_irq", extra=self.extra)
        return count + self.extra

    def params(self) -> dict[str, Any]:
        return {"extra": self.extra, "interval_ms": self.interval_ms}


class IgnoreEventIdx(RingAction):
    """Interrupt even when EVENT_IDX (used_event) or NO_INTERRUPT says not to."""

    name = "ignore_event_idx"
    kind = "calls"

    def candidate(self, wanted: bool) -> bool:
        return not wanted

    def on_calls(
        self, rs: RingFaultSet, rule: Rule, nic: VirtioNet, index: int, count: int, wanted: bool
    ) -> int:
        rs.event(rule, nic, index, "ignore_event_idx")
        return max(count, 1)


class RingFaultSet:
    """The ``RingFaults`` implementation of one NIC (see the module docstring)."""

    def __init__(
        self,
        rules: Callable[[], list[Rule]],
        *,
        emit: Callable[..., Any],
        now: Callable[[], float],
        call_later: Callable[[float, Callable[[], None]], None],
    ) -> None:
        self._rules = rules
        self.emit = emit
        self.now = now
        self.call_later = call_later
        self._ooo: dict[int, UsedElem] = {}
        self._delayed: dict[int, list[UsedElem]] = {}
        self._token = 0

    # -- helpers --------------------------------------------------------------------------

    def event(
        self, rule: Rule | None, nic: VirtioNet, index: int, kind: str, **detail: Any
    ) -> None:
        if rule is not None:
            rule.hits += 1
        self.emit(kind, rule=rule.id if rule else None, nic=nic.name, queue=index, **detail)

    def _rules_for(self, kind: str, index: int) -> list[Rule]:
        return [r for r in self._rules() if r.kind == kind and r.queue.covers(index)]

    @staticmethod
    def _queue(nic: VirtioNet, index: int) -> VirtQueue | None:
        vring = nic.vrings.get(index)
        return vring.queue if vring is not None else None

    def _publish(self, nic: VirtioNet, index: int, elems: list[UsedElem], why: str) -> None:
        """Push held elements for real, publish the used idx and interrupt as the ring says."""
        queue = self._queue(nic, index)
        pushed = 0
        for e in elems:
            if e.queue is not queue or queue is None:
                self.emit(
                    "release_failed",
                    nic=nic.name,
                    queue=index,
                    head=e.head,
                    error="queue restarted",
                )
                continue
            try:
                queue.push(e.head, e.written)
                pushed += 1
            except Exception as exc:  # defunct/closed queue: the driver is gone anyway
                self.emit("release_failed", nic=nic.name, queue=index, head=e.head, error=str(exc))
        if not pushed or queue is None:
            return
        try:
            queue.flush_used()
            wanted = queue.should_notify()
        except Exception as exc:
            self.emit("release_failed", nic=nic.name, queue=index, error=str(exc))
            return
        for _ in range(self.calls(nic, index, wanted)):
            nic.notify(index)

    # -- stalls and timers (driven by rule install/removal) ---------------------------------

    def installed(self, rule: Rule, nic: VirtioNet) -> None:
        action = rule.action
        if isinstance(action, Stall):
            action.active = True
            rule.hits += 1
            self.emit(
                "stall",
                rule=rule.id,
                nic=nic.name,
                queue=None,
                queues=str(rule.queue),
                seconds=action.seconds,
            )
            if action.seconds is not None:
                self.call_later(action.seconds, lambda: self.unstall(rule, nic))
        elif isinstance(action, SpuriousIrq) and action.interval_ms is not None:
            self._tick_spurious(rule, nic, action.interval_ms / 1000.0)

    def removed(self, rule: Rule, nic: VirtioNet) -> None:
        if isinstance(rule.action, Stall):
            self.unstall(rule, nic)

    def unstall(self, rule: Rule, nic: VirtioNet) -> None:
        action = rule.action
        if not isinstance(action, Stall) or not action.active:
            return
        action.active = False
        self.emit("stall_end", rule=rule.id, nic=nic.name, queues=str(rule.queue))
        # Resume: the guest kicked while we ignored it (or filled RX buffers); go look.
        for index in sorted(nic.vrings):
            if rule.queue.covers(index):
                nic.kick(index)

    def _tick_spurious(self, rule: Rule, nic: VirtioNet, period: float) -> None:
        def tick() -> None:
            if not rule.installed or rule.exhausted:
                return
            for index in sorted(nic.vrings):
                if rule.queue.covers(index):
                    self.event(rule, nic, index, "spurious_irq", timer=True)
                    nic.notify(index)
            self.call_later(period, tick)

        self.call_later(period, tick)

    # -- RingFaults protocol ----------------------------------------------------------------

    def idle(self, nic: VirtioNet, index: int, kinds: tuple[str, ...]) -> bool:
        """Whether no rule of ``kinds`` ("used", "calls") covers queue ``index`` and (for
        "used") nothing is held for it: then ``used`` / ``calls`` would change nothing, so
        the NIC may run the compiled bursts, which do not call them."""
        if "used" in kinds and (index in self._ooo or self._delayed.get(index)):
            return False
        return not any(r.kind in kinds and r.queue.covers(index) for r in self._rules())

    def stalled(self, nic: VirtioNet, index: int) -> bool:
        return any(
            isinstance(r.action, Stall) and r.action.active for r in self._rules_for("stall", index)
        )

    def used(self, nic: VirtioNet, index: int, head: int, written: int) -> Used | None:
        queue = self._queue(nic, index)
        if queue is None:
            return None
        fifo = self._delayed.get(index)
        if fifo:
            # A delayed element is pending: later ones queue behind it (publish order kept).
            fifo.append(UsedElem(nic, index, queue, head, written, fifo[-1].token))
            return []
        held = self._ooo.pop(index, None)
        if held is not None and held.queue is queue:
            queue.push(head, written)
            queue.push(held.head, held.written)
            return []
        for rule in self._rules_for("used", index):
            action = rule.action
            assert isinstance(action, RingAction)
            elem = UsedElem(nic, index, queue, head, written)
            if (
                not action.applicable(nic)
                or not action.ready(elem)
                or not rule.select(PacketInfo(None, self.now()))
            ):
                continue
            result = action.on_used(self, rule, elem)
            if result is not None:
                return result
        return None

    def calls(self, nic: VirtioNet, index: int, wanted: bool) -> int:
        count = int(wanted)
        for rule in self._rules_for("calls", index):
            action = rule.action
            assert isinstance(action, RingAction)
            if not action.candidate(wanted) or not rule.select(PacketInfo(None, self.now())):
                continue
            count = action.on_calls(self, rule, nic, index, count, wanted)
        return count

    # -- holding used elements --------------------------------------------------------------

    def hold_ooo(self, rule: Rule, entry: UsedElem, timeout: float) -> None:
        nic, index = entry.nic, entry.index
        self._ooo[index] = entry
        self.event(rule, nic, index, "out_of_order", head=entry.head)

        def expire() -> None:
            if self._ooo.get(index) is entry:
                del self._ooo[index]
                self._publish(nic, index, [entry], "out_of_order timeout")

        self.call_later(timeout, expire)

    def hold_delayed(self, rule: Rule, entry: UsedElem, delay: float) -> None:
        nic, index = entry.nic, entry.index
        self._token += 1
        token = entry.token = self._token
        self._delayed.setdefault(index, []).append(entry)
        self.event(rule, nic, index, "delay_used", head=entry.head, ms=delay * 1000.0)

        def due() -> None:
            fifo = self._delayed.get(index, [])
            ready = [e for e in fifo if e.token <= token]
            rest = [e for e in fifo if e.token > token]
            if rest:
                self._delayed[index] = rest
            else:
                self._delayed.pop(index, None)
            self._publish(nic, index, ready, "delay_used")

        self.call_later(delay, due)

    def held(self) -> int:
        return len(self._ooo) + sum(len(v) for v in self._delayed.values())

    def flush(self, nic: VirtioNet) -> None:
        """Publish everything held now (engine shutdown)."""
        for index, entry in list(self._ooo.items()):
            del self._ooo[index]
            self._publish(nic, index, [entry], "flush")
        for index, fifo in list(self._delayed.items()):
            del self._delayed[index]
            self._publish(nic, index, fifo, "flush")


__all__ = [
    "VNET_MODES",
    "BadUsedId",
    "BadUsedLen",
    "BadVnetHdr",
    "DelayIrq",
    "DelayUsed",
    "DoubleComplete",
    "IgnoreEventIdx",
    "OutOfOrder",
    "RingAction",
    "RingFaultSet",
    "SpuriousIrq",
    "Stall",
    "SuppressIrq",
]
