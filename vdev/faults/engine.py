"""The fault engine: installs rules on NICs, runs them from the data-path hooks, logs events.

Usage (see docs/faults.md)::

    engine = FaultEngine(device, seed=42, log="faults.jsonl")
    nf = engine.nic(0)                  # also reachable as device.nics[0].faults
    with nf.drop(p=0.1, queue="rx"):    # a Rule: active now, removed on exit
        ...
    rule = nf.corrupt(every=10, flips=2)
    rule.hits, rule.seen                # counters
    rule.remove()
    with engine.shrink_pool(32): ...    # device-level faults are handles too

One engine per device (``FaultEngine.for_device``), so the control socket, a scenario and
test code all see the same rules.  Everything runs on the device loop: hooks and timers
are called by it under ``device.lock``; API calls from other threads take the same lock.

Determinism: each rule draws from its own ``random.Random`` seeded with the rule's ``seed``
or, by default, ``"<engine seed>/<nic>/<rule id>"``; ids are assigned in creation order.
So the same engine seed, the same rules and the same traffic give the same faults and the
same event log (pass ``clock=ManualClock()`` to make timestamps identical as well).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from vdev.faults.actions import ActionContext
from vdev.faults.crash import CrashPoint, crash_detail, kill_self
from vdev.faults.events import EventLog
from vdev.faults.features import FeatureFaultSet
from vdev.faults.ring import RingFaultSet
from vdev.faults.rules import Rule, SpecError, build_rule

if TYPE_CHECKING:
    from vdev.net.device import Device
    from vdev.net.nic import VirtioNet


class ManualClock:
    """A fake monotonic clock with its own timers, for deterministic tests without a loop.

    ``advance(dt)`` moves time forward and runs due timers in time order (timers scheduled by
    timers run too if due)."""

    def __init__(self, start: float = 0.0) -> None:
        self.t = start
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._n = itertools.count()

    def __call__(self) -> float:
        return self.t

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.t + max(0.0, delay), next(self._n), fn))

    def advance(self, dt: float = 0.0) -> None:
        end = self.t + dt
        while self._timers and self._timers[0][0] <= end:
            when, _, fn = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            fn()
        self.t = end

    @property
    def pending(self) -> int:
        return len(self._timers)


class DeviceFault:
    """A device-level fault in effect (link down, pool shrunk): removable, a context manager."""

    def __init__(self, fault_id: str, kind: str, undo: Callable[[], None], **info: Any) -> None:
        self.id = fault_id
        self.kind = kind
        self.info = info
        self.hits = 1
        self.installed = True
        self._undo = undo

    def remove(self) -> None:
        if self.installed:
            self.installed = False
            self._undo()

    def __enter__(self) -> DeviceFault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "action": self.kind, "kind": "device", "hits": self.hits} | {
            k: v for k, v in self.info.items() if isinstance(v, int | float | str | bool)
        }


_ENGINES: weakref.WeakKeyDictionary[Any, FaultEngine] = weakref.WeakKeyDictionary()


class FaultEngine:
    """Fault rules for one device (or for bare ``VirtioNet`` objects in unit tests)."""

    def __init__(
        self,
        device: Device | None = None,
        *,
        seed: int | str = 0,
        log: str | None = None,
        clock: Callable[[], float] | None = None,
        call_later: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        self.device = device
        self.seed = seed
        self.qmp_links = QmpLinkWorker()
        self.clock: Callable[[], float] = clock if clock is not None else time.monotonic
        if call_later is None:
            if device is not None:
                call_later = device.call_later
            elif isinstance(clock, ManualClock):
                call_later = clock.call_later
            else:
                raise ValueError("FaultEngine without a device needs call_later (or ManualClock)")
        self.call_later = call_later
        self.lock: contextlib.AbstractContextManager[Any] = (
            device.lock if device is not None else threading.RLock()
        )
        self.log = EventLog(log, clock=self.clock)
        self._nics: dict[str, NicFaults] = {}
        self._ids = itertools.count(1)
        self.device_faults: dict[str, DeviceFault] = {}
        if device is not None:
            if device in _ENGINES:
                raise ValueError(
                    "this device already has a FaultEngine: use FaultEngine.for_device(device)"
                )
            _ENGINES[device] = self
            device.event_sink = self.log.emit  # ring_resume and other lifecycle events

    @classmethod
    def for_device(cls, device: Device, **kw: Any) -> FaultEngine:
        """The device's engine, created on first use (control socket, scenarios, tests)."""
        engine = _ENGINES.get(device)
        if engine is None:
            engine = cls(device, **kw)
        return engine

    def next_id(self, prefix: str = "r") -> str:
        return f"{prefix}{next(self._ids)}"

    def now(self) -> float:
        return self.clock()

    # -- NICs -----------------------------------------------------------------------------

    def nic(self, key: int | str | VirtioNet) -> NicFaults:
        """The fault API of one NIC: by position in ``device.nics``, name, or the object."""
        with self.lock:
            nic = self._resolve(key)
            nf = self._nics.get(nic.name)
            if nf is None or nf.nic is not nic:
                nf = NicFaults(self, nic)
                self._nics[nic.name] = nf
            return nf

    attach = nic

    def _resolve(self, key: int | str | VirtioNet) -> VirtioNet:
        if not isinstance(key, int | str):
            return key
        nics = self.device.nics if self.device is not None else [n.nic for n in self._nics.values()]
        if isinstance(key, bool):
            raise SpecError(f"nic: {key!r} is not a NIC index or name", "nic")
        if isinstance(key, int):
            if not 0 <= key < len(nics):
                raise SpecError(f"nic: no NIC {key} (device has {len(nics)})", "nic")
            return nics[key]
        for n in nics:
            if n.name == key:
                return n
        raise SpecError(f"nic: no NIC named {key!r}", "nic")

    @property
    def nics(self) -> list[NicFaults]:
        return list(self._nics.values())

    # -- rules across NICs ----------------------------------------------------------------

    def add(self, spec: Mapping[str, Any]) -> Rule:
        """Install a rule from a spec mapping; ``nic`` (default 0) says where."""
        nic = spec.get("nic", 0)
        if not isinstance(nic, int | str):
            raise SpecError(f"nic: {nic!r} is not a NIC index or name", "nic")
        return self.nic(nic).add(spec)

    def rules(self) -> list[Rule]:
        return [r for nf in self._nics.values() for r in nf.rules]

    def find(self, rule_id: str) -> Rule | DeviceFault | None:
        for r in self.rules():
            if r.id == rule_id:
                return r
        return self.device_faults.get(rule_id)

    def remove(self, rule_id: str) -> bool:
        with self.lock:
            r = self.find(rule_id)
            if r is None:
                return False
            r.remove()
            return True

    def clear(self) -> None:
        """Remove every rule and undo every device fault (held frames are released)."""
        with self.lock:
            for r in self.rules():
                r.remove()
            for d in list(self.device_faults.values()):
                d.remove()

    def close(self) -> None:
        """Remove every rule, publish held used elements, unhook the NICs, close the log.

        Call it before ``device.close()`` when rules may still hold frames, so the pool's
        leak report stays clean."""
        with self.lock:
            self.clear()
            for nf in list(self._nics.values()):
                nf.detach()
            self._nics.clear()
            if self.device is not None and _ENGINES.get(self.device) is self:
                del _ENGINES[self.device]
        self.qmp_links.close()
        self.log.close()

    def _claim_id(self, fault_id: str | None) -> str:
        """The id a new device fault will have; SpecError if it is taken.  Called before
        the fault has any effect, so a refused request changes nothing."""
        fid = str(fault_id or self.next_id("d"))
        if fid in self.device_faults or any(r.id == fid for r in self.rules()):
            raise SpecError(f"id: {fid!r} is already in use", "id")
        return fid

    def _device_fault(
        self, fid: str, kind: str, undo: Callable[[], None], **info: Any
    ) -> DeviceFault:
        """Record a fault whose id :meth:`_claim_id` gave (under the lock since)."""

        def undo_and_forget() -> None:
            with self.lock:
                self.device_faults.pop(fid, None)
                undo()

        fault = DeviceFault(fid, kind, undo_and_forget, **info)
        self.device_faults[fid] = fault
        return fault

    # -- device-level faults ----------------------------------------------------------------

    def shrink_pool(self, packets: int, *, fault_id: str | None = None) -> DeviceFault:
        """Leave only ``packets`` free packets in the pool (the rest are held) until removed."""
        if packets < 0:
            raise SpecError(f"packets: {packets} must be >= 0", "packets")
        if self.device is None:
            raise SpecError("shrink_pool needs a device")
        pool = self.device.pool
        with self.lock:
            fid = self._claim_id(fault_id)
            free = pool.num_packets - pool.stats.in_use
            held: list[int] = []
            while len(held) < free - packets:
                got = pool.alloc_packets(min(256, free - packets - len(held)))
                if not got:
                    break
                held.extend(got)
            self.log.emit("pool_shrink", free_before=free, free_after=free - len(held))

            def undo() -> None:
                pool.free_packets(held)
                self.log.emit("pool_restore", released=len(held))
                for nic in self.device.nics if self.device is not None else []:
                    nic.drain_rx()

            return self._device_fault(fid, "pool_limit", undo, packets=packets, held=len(held))

    def crash_backend(self, nic: int | str | VirtioNet = 0) -> None:
        """Drop the vhost-user connection of a NIC abruptly, as if the backend crashed.

        A client-mode NIC reconnects by itself (after 0.2 s); a server-mode NIC waits for the
        frontend (QEMU ``reconnect=N`` on the chardev) to come back (vdev.vhost.server)."""
        if self.device is None:
            raise SpecError("crash_backend needs a device")
        with self.lock:
            target = self._resolve(nic)
            connected = self.device.disconnect(target)
            self.log.emit("backend_crash", nic=target.name, connected=connected)

    def crash_point(
        self,
        nic: int | str | VirtioNet = 0,
        *,
        after_frames: int = 0,
        in_flight: int = 1,
        mode: str = "exit",
    ) -> CrashPoint:
        """Arm a crash of the back-end on ``nic``'s TX data path (see vdev.faults.crash):
        after ``after_frames`` chains, with ``in_flight`` chains taken and unpublished (0: at
        the end of that batch); ``mode`` "exit" SIGKILLs the process, "drop" drops the NIC's
        connection.  Fires once; ValueError names a bad argument."""
        if self.device is None and mode == "drop":
            raise SpecError("crash_point mode 'drop' needs a device")
        with self.lock:
            target = self._resolve(nic)

            def fire(n: VirtioNet, taken: int, unpublished: int) -> None:
                n.take_hook = None
                self.log.emit(
                    "backend_crash", nic=n.name, **crash_detail(point, taken, unpublished)
                )
                if point.mode == "exit":
                    kill_self()
                    return
                assert self.device is not None
                self.device.disconnect(n)

            try:
                point = CrashPoint(after_frames, in_flight, mode, fire)
            except ValueError as exc:
                raise SpecError(str(exc), str(exc).split(":")[0]) from None
            target.take_hook = point.on_take
            self.log.emit(
                "crash_armed", nic=target.name, after_frames=after_frames,
                in_flight=in_flight, mode=mode,
            )  # fmt: skip
            return point


class NicFaults:
    """The fault API of one NIC (``engine.nic(i)`` or ``nic.faults``)."""

    attached: bool = False  # hooks installed on the NIC

    def __init__(self, engine: FaultEngine, nic: VirtioNet) -> None:
        self.engine = engine
        self.nic = nic
        self.rules: list[Rule] = []
        self.packets = {"tx": 0, "rx": 0}  # frames seen by the hooks (scenario triggers)
        self._rules_snapshot: tuple[Rule, ...] = ()
        self.ring = RingFaultSet(
            lambda: list(self._rules_snapshot),
            emit=engine.log.emit,
            now=engine.now,
            call_later=engine.call_later,
        )
        # Feature negotiation faults (features.py): asked by the NIC at GET/SET_FEATURES and
        # SET_STATUS, from the same rule snapshot.
        self.features = FeatureFaultSet(
            lambda: [r for r in self._rules_snapshot if r.kind == "features"],
            emit=engine.log.emit,
            now=engine.now,
        )
        self._link_fault: DeviceFault | None = None
        other = getattr(nic, "faults", None)
        if isinstance(other, NicFaults) and other.engine is not engine and other.attached:
            raise ValueError(f"{nic.name} already belongs to another FaultEngine")
        self.attached = True
        nic.tx_hooks.append(self._tx_hook)
        nic.rx_hooks.append(self._rx_hook)
        nic.ring_faults = self.ring
        nic.feature_faults = self.features
        setattr(nic, "faults", self)  # noqa: B010  # no such attribute on VirtioNet

    def detach(self) -> None:
        """Take the hooks out of the NIC (the engine is closing)."""
        nic = self.nic
        self.ring.flush(nic)
        if self._tx_hook in nic.tx_hooks:
            nic.tx_hooks.remove(self._tx_hook)
        if self._rx_hook in nic.rx_hooks:
            nic.rx_hooks.remove(self._rx_hook)
        if nic.ring_faults is self.ring:
            nic.ring_faults = None
        if nic.feature_faults is self.features:
            nic.feature_faults = None
        self.attached = False

    # -- hooks ----------------------------------------------------------------------------

    def _tx_hook(self, nic: VirtioNet, index: int, pkts: list[int]) -> list[int]:
        return self._run(nic, index, pkts, tx=True)

    def _rx_hook(self, nic: VirtioNet, index: int, pkts: list[int]) -> list[int]:
        return self._run(nic, index, pkts, tx=False)

    def _run(self, nic: VirtioNet, index: int, pkts: list[int], *, tx: bool) -> list[int]:
        self.packets["tx" if tx else "rx"] += len(pkts)
        for rule in self._rules_snapshot:
            if rule.kind == "data" and rule.queue.covers(index) and pkts:
                pkts = rule.process(nic, index, pkts, lambda r: self._ctx(r, index, tx))
        return pkts

    def _ctx(self, rule: Rule, index: int, tx: bool) -> ActionContext:
        nic = self.nic
        release = nic.inject_tx if tx else nic.inject_rx

        def release_locked(pkts: list[int]) -> None:
            with self.engine.lock:
                release(pkts)

        return ActionContext(
            nic=nic,
            index=index,
            tx=tx,
            rule=rule.id,
            rng=rule.state.rng,
            now=self.engine.now,
            call_later=self.engine.call_later,
            emit=self.engine.log.emit,
            release=release_locked,
        )

    # -- rules ----------------------------------------------------------------------------

    def add(self, spec: Mapping[str, Any] | Rule) -> Rule:
        """Install a rule (a ``Rule`` or a spec mapping, see ``rules.build_rule``)."""
        rule = spec if isinstance(spec, Rule) else build_rule(spec)
        pairs = getattr(self.nic, "queue_pairs", None)
        if isinstance(pairs, int) and rule.queue.pair is not None and rule.queue.pair >= pairs:
            # A rule on a queue the NIC does not have could never fire: refuse it by name.
            asked = spec.get("queue", str(rule.queue)) if isinstance(spec, Mapping) else rule.queue
            asked = asked if isinstance(asked, int | str) else str(asked)
            raise SpecError(
                f"queue: {asked!r}: {self.nic.name} has {pairs} queue pair(s) "
                f"(rx0..rx{pairs - 1}, tx0..tx{pairs - 1})",
                "queue",
            )
        with self.engine.lock:
            if rule.installed:
                raise SpecError(f"rule {rule.id} is already installed")
            if rule.id and self.engine.find(rule.id) is not None:
                raise SpecError(f"id: {rule.id!r} is already in use", "id")
            rid = rule.id or self.engine.next_id()
            rule.bind(
                rid, self.nic.name, f"{self.engine.seed}/{self.nic.name}/{rid}", self.engine.now()
            )
            rule._remover = self._remove
            self.rules.append(rule)
            self._rules_snapshot = tuple(self.rules)
            self.engine.log.emit(
                "rule_add",
                rule=None,
                nic=self.nic.name,
                id=rule.id,
                action=rule.action.name,
                queues=str(rule.queue),
            )
            self.ring.installed(rule, self.nic)
        return rule

    def _remove(self, rule: Rule) -> None:
        with self.engine.lock:
            if rule not in self.rules:
                return
            self.rules.remove(rule)
            self._rules_snapshot = tuple(self.rules)
            rule.installed = False
            from vdev.faults.actions import Action

            if isinstance(rule.action, Action):
                rule.action.flush()
            self.ring.removed(rule, self.nic)
            self.engine.log.emit("rule_remove", nic=self.nic.name, id=rule.id, hits=rule.hits)

    def remove(self, rule: Rule | str) -> bool:
        target = (
            rule if isinstance(rule, Rule) else next((r for r in self.rules if r.id == rule), None)
        )
        if target is None or target not in self.rules:
            return False
        target.remove()
        return True

    def clear(self) -> None:
        for r in list(self.rules):
            r.remove()

    def _spec(self, action: str, kw: dict[str, Any]) -> Rule:
        return self.add({"action": action, **kw})

    # Data plane --------------------------------------------------------------------------
    # Every method takes the match keys (nth, every, p, gilbert, pattern, offset, ethertype,
    # ip_proto, port, sport, dport, window), queue ("tx", "rx", "both", "rx0", index),
    # seed, limit and id, plus its own parameters; it returns the installed Rule.

    def drop(self, **kw: Any) -> Rule:
        return self._spec("drop", kw)

    def corrupt(self, **kw: Any) -> Rule:
        """Bit flips: ``flips`` random bits (past ``skip`` bytes) or ``offsets`` ^= ``mask``."""
        return self._spec("corrupt", kw)

    def truncate(self, **kw: Any) -> Rule:
        return self._spec("truncate", kw)

    def pad(self, **kw: Any) -> Rule:
        """``bytes`` extra bytes of ``fill``, or grow to ``to`` bytes."""
        return self._spec("pad", {("bytes" if k == "nbytes" else k): v for k, v in kw.items()})

    def oversize(self, **kw: Any) -> Rule:
        """Frames over the MTU: grow to mtu + 14 + ``over_mtu`` bytes."""
        return self._spec("oversize", kw)

    def duplicate(self, **kw: Any) -> Rule:
        return self._spec("duplicate", kw)

    def reorder(self, **kw: Any) -> Rule:
        """Hold a frame back and release it after ``after`` later frames."""
        return self._spec("reorder", kw)

    def delay(self, **kw: Any) -> Rule:
        return self._spec("delay", kw)

    def rate_limit(self, **kw: Any) -> Rule:
        return self._spec("rate_limit", kw)

    # Ring level ---------------------------------------------------------------------------

    def stall(self, **kw: Any) -> Rule:
        """Stop consuming TX / filling RX of ``queue`` for ``seconds`` (or until removed)."""
        return self._spec("stall", kw)

    def out_of_order(self, **kw: Any) -> Rule:
        return self._spec("out_of_order", kw)

    def bad_used_id(self, **kw: Any) -> Rule:
        return self._spec("bad_used_id", kw)

    def double_complete(self, **kw: Any) -> Rule:
        return self._spec("double_complete", kw)

    def bad_used_len(self, **kw: Any) -> Rule:
        return self._spec("bad_used_len", kw)

    def delay_used(self, **kw: Any) -> Rule:
        return self._spec("delay_used", kw)

    # Interrupts ---------------------------------------------------------------------------

    def suppress_irq(self, **kw: Any) -> Rule:
        return self._spec("suppress_irq", kw)

    def delay_irq(self, **kw: Any) -> Rule:
        return self._spec("delay_irq", kw)

    def spurious_irq(self, **kw: Any) -> Rule:
        return self._spec("spurious_irq", kw)

    # Feature negotiation (features.py) ---------------------------------------------------

    def feature_offer(self, **kw: Any) -> Rule:
        """GET_FEATURES offers ``bits`` more and ``clear`` less."""
        return self._spec("feature_offer", kw)

    def feature_withdraw(self, **kw: Any) -> Rule:
        """At the next SET_FEATURES the device ignores acked ``bits``."""
        return self._spec("feature_withdraw", kw)

    def feature_assume(self, **kw: Any) -> Rule:
        """At the next SET_FEATURES the device also uses ``bits`` the driver did not ack."""
        return self._spec("feature_assume", kw)

    def refuse_features(self, **kw: Any) -> Rule:
        """A SET_FEATURES holding every bit of ``when``: FEATURES_OK is not kept."""
        return self._spec("refuse_features", kw)

    def ignore_event_idx(self, **kw: Any) -> Rule:
        return self._spec("ignore_event_idx", kw)

    # Device level ---------------------------------------------------------------------------

    def link_down(
        self, *, qmp: Any = None, qmp_name: str | None = None, fault_id: str | None = None
    ) -> DeviceFault:
        """Carrier drop (device side: TX drained and dropped, RX refused, config status 0);
        with ``qmp`` also ``set_link <qmp_name> off``.  Removing the handle brings it up."""
        with self.engine.lock:
            if self._link_fault is not None and self._link_fault.installed:
                return self._link_fault
            fid = self.engine._claim_id(fault_id)
            self.nic.link_up = False
            if qmp is not None:
                self.engine.qmp_links.submit(qmp, qmp_name or self.nic.name, False)
            self.engine.log.emit("link_down", nic=self.nic.name, qmp=qmp is not None)

            def undo() -> None:
                self.nic.link_up = True
                if qmp is not None:
                    self.engine.qmp_links.submit(qmp, qmp_name or self.nic.name, True)
                self.engine.log.emit("link_up", nic=self.nic.name, qmp=qmp is not None)
                self._link_fault = None
                self.nic.drain_rx()

            self._link_fault = self.engine._device_fault(fid, "link_down", undo, nic=self.nic.name)
            return self._link_fault

    def link_up(self) -> None:
        with self.engine.lock:
            if self._link_fault is not None:
                self._link_fault.remove()
            elif not self.nic.link_up:
                self.nic.link_up = True
                self.engine.log.emit("link_up", nic=self.nic.name, qmp=False)

    def crash_backend(self) -> None:
        self.engine.crash_backend(self.nic)

    # -- reporting --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "nic": self.nic.name,
            "packets": dict(self.packets),
            "link_up": self.nic.link_up,
            "held_used": self.ring.held(),
            "rules": [r.describe() for r in self.rules],
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Temporarily take every rule out (they keep their counters and RNG state)."""
        saved = self._rules_snapshot
        self._rules_snapshot = ()
        try:
            yield
        finally:
            self._rules_snapshot = saved


_log = logging.getLogger("vdev.faults")


class QmpLinkWorker:
    """Runs QMP ``set_link`` calls in order on one worker thread.

    QEMU answers ``set_link`` on a vhost-user NIC only after stopping or restarting vhost,
    which needs this device's loop (and lock) to answer GET_VRING_BASE and friends.  A
    caller that holds the device lock, or the loop thread itself, would deadlock waiting
    for QMP; so the call is queued here and the link state in the guest follows shortly.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Any, str, bool] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, qmp: Any, name: str, up: bool) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vdev-qmp-link", daemon=True)
            self._thread.start()
        self._queue.put((qmp, name, up))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                qmp_set_link(*item)
            except Exception as exc:  # QEMU gone, bad NIC name: report, keep serving
                _log.warning("QMP set_link %s %s failed: %s", item[1], item[2], exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until every queued call has been made; never call with the
        device lock held (the call may need the device loop)."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._queue.all_tasks_done.wait(remaining)

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None


def qmp_set_link(qmp: Any, name: str, up: bool) -> None:
    """QMP ``set_link``; accepts a sync QEMUMonitorProtocol-like (``cmd``) or ``execute``."""
    if hasattr(qmp, "cmd"):
        qmp.cmd("set_link", name=name, up=up)
    else:
        qmp.execute("set_link", {"name": name, "up": up})


def engine_stats(engine: FaultEngine) -> dict[str, Any]:
    """Rule counters, event counts by kind, device faults: what ``vdev ctl stats`` shows."""
    with engine.lock:
        return {
            "seed": engine.seed,
            "events": dict(engine.log.counts),
            "last_seq": engine.log.events[-1].seq if engine.log.events else 0,
            "nics": [nf.stats() for nf in engine.nics],
            "device_faults": [d.describe() for d in engine.device_faults.values()],
        }


__all__ = ["DeviceFault", "FaultEngine", "ManualClock", "NicFaults", "engine_stats", "qmp_set_link"]
