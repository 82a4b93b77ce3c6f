"""vhost-user backend: per-connection state machine and request dispatch.

libvhost-user style: this object owns no event loop.  The caller polls :meth:`fileno` and
calls :meth:`handle_readable`, which processes exactly one message and returns False once the
connection is gone (peer closed, or we dropped it after a protocol error).  One backend
object serves one connection; a reconnecting front-end gets a fresh object and restores the
rings' positions with SET_VRING_BASE (QEMU sends the guest's used index there).  Accepting,
dialling and reconnecting are :mod:`vdev.vhost.server`'s job.

Kick eventfds belong to this layer too: given a :class:`~vdev.eventloop.Watcher` (the
caller's loop, libvhost-user's ``set_watch``/``remove_watch``), the backend watches a ring's
kick fd from the moment the device hears ``queue_started`` until before it hears
``queue_stopped``, reads the eventfd when it fires and calls the device's ``queue_kicked``.
The device never touches a kick fd.

Error policy (spec "REPLY_ACK" and "Communication"): a malformed or refused message is logged
on the ``vdev.vhost`` logger with the request and field; if REPLY_ACK was negotiated and the
front-end asked for a reply, it gets a non-zero ack and the connection stays up; otherwise the
connection is closed cleanly (every fd we hold is closed, the device is told).  Nothing a peer
sends may raise out of :meth:`handle_readable` or leak a file descriptor.

Guest memory that goes away (the front-end truncating a region's fd after SET_MEM_TABLE) is
the connection's fault too: the SIGBUS is recovered in C (``vdev/native/memguard.c``), the
region writes :attr:`VhostUserBackend.fault_fd`, and :meth:`VhostUserBackend.memory_fault`
(called by the server when that fd fires, and before and after every message) records the
:class:`~vdev.errors.GuestMemoryFault` in :attr:`VhostUserBackend.fault` and closes.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from vdev.errors import GuestMemoryFault, SyncKind
from vdev.limits import MAX_GUEST_MEMORY, human
from vdev.virtio.inflight import InflightError
from vdev.virtio.memory import GuestMemory, MemoryFault
from vdev.virtio.queue import F_RING_PACKED, QueueFormat, VirtQueue, queue_format

from .codec import (
    F_PROTOCOL_FEATURES,
    FLAG_REPLY,
    HAS_REPLY,
    VERSION,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    Config,
    Empty,
    Inflight,
    MemRegionDesc,
    MemTable,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    VringState,
    check_fds,
    decode_request,
    encode_config,
    encode_inflight,
    encode_state,
    encode_u64,
    pf_mask,
    request_name,
)
from .connection import Connection, PeerClosed, close_fds
from .inflight_buffer import InflightBuffer, InflightLimit

if TYPE_CHECKING:
    from vdev.eventloop import Watcher

log = logging.getLogger("vdev.vhost")


# Protocol features this backend always offers.  MQ: "Back-ends should always implement the
# VHOST_USER_PROTOCOL_F_MQ protocol feature" ("Multiple queue support").
BACKEND_PROTOCOL_FEATURES = pf_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.RARP,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.STATUS,
    # "Inflight I/O tracking": a restarted back-end resumes exactly what was in flight.
    ProtocolFeature.INFLIGHT_SHMFD,
)
# Extra protocol features a device may ask for; the backend implements their messages.
DEVICE_PROTOCOL_FEATURES = pf_mask(
    ProtocolFeature.MTU, ProtocolFeature.CONFIG, ProtocolFeature.SLAVE_REQ
)

# What GET_MAX_MEM_SLOTS answers (libvhost-user's VHOST_USER_MAX_RAM_SLOTS).
MAX_MEM_SLOTS = 32
VHOST_VRING_F_LOG = 1

_ACK_OK = 0
_ACK_FAIL = 1


class VhostDevice(Protocol):
    """The callback table the device (virtio-net) implements."""

    def device_features(self) -> int:
        """Virtio feature bits the device offers (the backend ORs in bit 30)."""
        ...

    def protocol_features(self) -> int:
        """Extra protocol features the device wants (e.g. MTU); the backend adds its own."""
        ...

    def max_queues(self) -> int:
        """Number of virtqueues the device supports (the GET_QUEUE_NUM answer)."""
        ...

    def queue_direction(self, index: int) -> SyncKind:
        """Which way data flows on virtqueue ``index`` (device knowledge, e.g. virtio-net's
        even receiveq / odd transmitq): ``SyncKind.RX`` (the device writes: device-writable
        buffers only), ``SyncKind.TX`` (the device reads) or another kind for both."""
        ...

    def features_set(self, features: int) -> int | None:
        """SET_FEATURES acked ``features``; may return the set the device behaves by (its
        rings get that one: a feature fault), None for ``features`` itself."""
        ...

    def queue_started(self, vring: Vring) -> None:
        """The ring started ("Ring states": memory, num, addresses and a kick fd): watch
        ``vring.kick_fd`` and process ``vring.queue``.

        Also called again, for an already started ring, each time it becomes enabled
        (SET_VRING_ENABLE 1), so the device can flush pending RX: must be idempotent.
        ``vring.enabled`` is read live: while it is False the ring is "started but
        disabled" and the device must process and discard TX and supply no RX.
        """
        ...

    def queue_stopped(self, vring: Vring) -> None:
        """The ring stopped: before GET_VRING_BASE replies (read ``queue.last_avail_idx``
        after this), when its kick fd is replaced (queue_started follows) and on disconnect.
        Stop touching the ring.  Disabling a ring does not stop it."""
        ...

    def queue_disabling(self, vring: Vring) -> None:
        """SET_VRING_ENABLE 0 for a started, enabled ring, before ``vring.enabled`` drops:
        the last moment to finish, as an enabled ring, what the device put off (a held TX
        queue's poll, vdev/net/kickhold.py: the chains the driver posted without a kick)."""
        ...

    def queue_kicked(self, vring: Vring) -> None:
        """The driver notified a started ring (its kick eventfd fired; the backend already
        read it): process ``vring.queue``."""
        ...

    def memory_changed(self, mem: GuestMemory) -> None: ...

    def set_mtu(self, mtu: int) -> None: ...

    def get_config(self, offset: int, size: int) -> bytes: ...

    def disconnected(self) -> None: ...


QueueFactory = Callable[..., VirtQueue]


@dataclass
class Vring:
    """One virtqueue as the front-end configured it.

    ``started`` follows "Ring states": set once the ring has num, addresses, a kick fd and
    guest memory (the queue object exists then) and cleared by GET_VRING_BASE; ``enabled``
    follows SET_VRING_ENABLE (rings start disabled when VHOST_USER_F_PROTOCOL_FEATURES is
    negotiated, enabled otherwise).  A started ring is processed; while disabled, TX is
    discarded and no RX supplied.  ``call_fd`` may change while the ring runs (QEMU sends
    SET_VRING_CALL twice): the device must read it live.
    """

    index: int
    num: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0
    log_addr: int = 0
    flags: int = 0
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    started: bool = False
    queue: VirtQueue | None = None
    addr_set: bool = field(default=False, repr=False)
    notified: bool = field(default=False, repr=False)  # device got queue_started

    @property
    def running(self) -> bool:
        return self.started and self.enabled


class VhostUserBackend:
    """Serve one vhost-user connection for ``device``."""

    def __init__(
        self,
        device: VhostDevice,
        conn: Connection,
        *,
        watcher: Watcher | None = None,
        queue_factory: QueueFactory | None = None,
        max_mem_slots: int = MAX_MEM_SLOTS,
        max_guest_memory: int | None = None,
        without_protocol_features: int = 0,
    ) -> None:
        """``watcher`` watches the kick eventfds (without one, nobody does: the device or
        test drives the queues itself); ``without_protocol_features`` masks protocol
        features out of the offer (e.g. CONFIGURE_MEM_SLOTS, to make QEMU use
        SET_MEM_TABLE); ``queue_factory`` replaces the negotiated format's queue class
        (tests)."""
        self.device = device
        self.conn = conn
        self.watcher = watcher
        self.queue_factory = queue_factory
        self.max_mem_slots = max_mem_slots
        # The guest memory limit (vdev.limits); None: the module default, read now.
        self.max_guest_memory = MAX_GUEST_MEMORY if max_guest_memory is None else max_guest_memory
        nq = int(device.max_queues())
        if not 1 <= nq <= VRING_IDX_MASK + 1:
            raise ValueError(f"device max_queues {nq} is not in 1..256")
        self.vrings = [Vring(i) for i in range(nq)]
        self.offered_features = int(device.device_features()) | F_PROTOCOL_FEATURES
        extra = int(device.protocol_features())
        if extra & ~DEVICE_PROTOCOL_FEATURES:
            log.warning(
                "device asked for unsupported protocol features %#x; not offered",
                extra & ~DEVICE_PROTOCOL_FEATURES,
            )
        self.offered_protocol_features = (
            BACKEND_PROTOCOL_FEATURES | (extra & DEVICE_PROTOCOL_FEATURES)
        ) & ~without_protocol_features
        self.features = 0  # acked with SET_FEATURES (virtio bits + bit 30)
        # What the device behaves by (features_set's answer): the rings are built with it.
        self.device_view: int | None = None
        self.features_acked = False
        self.protocol_features = 0  # acked with SET_PROTOCOL_FEATURES
        self.owner = False
        self.status = 0
        self.mtu: int | None = None
        self.mem: GuestMemory | None = None
        self.backend_req_fd: int | None = None
        self.inflight: InflightBuffer | None = None
        self._reply_fds: list[int] = []
        self.closed = False
        # Written by memguard's SIGBUS handler when a region of this connection faults.
        self.fault_fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fault: GuestMemoryFault | None = None
        self._handlers: dict[int, Callable[[Message, Any], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_fd,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.NET_SET_MTU: self._net_set_mtu,
            Request.SEND_RARP: self._send_rarp,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: self._get_status,
            Request.SET_SLAVE_REQ_FD: self._set_backend_req_fd,
            Request.GET_CONFIG: self._get_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    # -- public -----------------------------------------------------------------------

    def fileno(self) -> int:
        """The connection's fd for the caller's poll loop.  Still the same number after the
        backend closed it, so ``sel.unregister(backend.fileno())`` works after
        :meth:`handle_readable` returned False."""
        return self.conn.fileno()

    @property
    def supported_requests(self) -> frozenset[int]:
        """The front-end requests this backend handles (any other is refused)."""
        return frozenset(self._handlers)

    @property
    def negotiated_features(self) -> int:
        """Virtio feature bits acked by the front-end (without vhost-user's bit 30)."""
        return self.features & ~F_PROTOCOL_FEATURES

    @property
    def ring_features(self) -> int:
        """The features the rings run by: the device's view of the negotiation (a feature
        fault may differ from the acked set), with the acked ring layout always."""
        if self.device_view is None:
            return self.negotiated_features
        return int((self.device_view & ~F_RING_PACKED) | (self.features & F_RING_PACKED))

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED negotiated: rings are packed (2.8), bases packed-encoded."""
        return bool(self.features & F_RING_PACKED)

    @property
    def queue_format(self) -> QueueFormat:
        """The negotiated ring format (split or packed): layout, size and base rules."""
        return queue_format(self.features)

    def has_protocol_feature(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def handle_readable(self) -> bool:
        """Read and process one message; False when the connection is closed."""
        if self.closed or self.memory_fault() is not None:
            return False
        try:
            msg = self.conn.recv_message(block=False)
        except BlockingIOError:
            return True  # spurious wakeup: nothing to read yet
        except PeerClosed:
            log.info("vhost-user front-end disconnected")
            self.close()
            return False
        except ProtocolError as exc:
            # A broken frame: the stream cannot be trusted any more, so no ack is possible.
            log.error("vhost-user: %s; disconnecting", exc)
            self.close()
            return False
        except OSError as exc:
            log.error("vhost-user: socket error %s; disconnecting", exc)
            self.close()
            return False
        try:
            return self._dispatch(msg) and self.memory_fault() is None
        except Exception:
            log.exception(
                "vhost-user: internal error on %s; disconnecting", request_name(msg.request)
            )
            close_fds(msg.fds)
            msg.fds.clear()
            self.close()
            return False

    def memory_fault(self) -> GuestMemoryFault | None:
        """Whether guest memory faulted (a defined point: the server calls it when
        :attr:`fault_fd` fires, the backend before and after each message).  A fault is
        recorded in :attr:`fault`, logged, and closes the connection; it is returned."""
        if self.fault is None and not self.closed:
            try:
                os.eventfd_read(self.fault_fd)  # memguard writes it for every fault
            except OSError:
                return None  # nothing signalled: no region of ours faulted
            err = self.mem.fault() if self.mem is not None else None
            if err is not None:
                self.fault = err
                log.error("vhost-user: %s; disconnecting", err)
                self.close()
        return self.fault

    def close(self) -> None:
        """Stop every ring, release memory and every fd, tell the device.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for v in self.vrings:
            self._stop(v)
            for name in ("kick_fd", "call_fd", "err_fd"):
                fd = getattr(v, name)
                setattr(v, name, None)
                if fd is not None:
                    close_fds([fd])
        if self.backend_req_fd is not None:
            close_fds([self.backend_req_fd])
            self.backend_req_fd = None
        self.conn.close()
        # The device hears about it while guest memory is still mapped, so it can drop any
        # buffers (chains, views) it still holds before the regions go away.
        self._device_call("disconnected")
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        close_fds([self.fault_fd])

    # -- dispatch ---------------------------------------------------------------------

    def _device_call(self, name: str, *args: Any) -> Any:
        """Call a device callback; a device bug is logged, never raised into the loop."""
        try:
            return getattr(self.device, name)(*args)
        except Exception:
            log.exception("vhost-user: device %s failed", name)
            return None

    def _dispatch(self, msg: Message) -> bool:
        ack = (
            msg.need_reply
            and self.has_protocol_feature(ProtocolFeature.REPLY_ACK)
            and msg.request not in HAS_REPLY
        )
        reply: bytes | None = None
        try:
            handler = self._handlers.get(msg.request)
            if handler is None:
                known = msg.request in Request._value2member_map_
                raise ProtocolError(
                    msg.request,
                    "request",
                    "not supported (its feature is not offered)" if known else "unknown request",
                )
            payload = decode_request(msg.request, msg.payload)
            # Every request's fd count comes from the codec's table, before any handler.
            check_fds(msg.request, payload, len(msg.fds))
            log.debug("vhost-user <- %s %s fds=%s", request_name(msg.request), payload, msg.fds)
            reply = handler(msg, payload)
        except ProtocolError as exc:
            if ack:
                # "REPLY_ACK": non-zero on failure; the front-end decides what to do.
                log.error("vhost-user: %s; failure reply", exc)
                return self._send_reply(msg.request, encode_u64(_ACK_FAIL))
            log.error("vhost-user: %s; disconnecting", exc)
            self.close()
            return False
        finally:
            # Whatever fds the handler did not take ownership of are closed here.
            close_fds(msg.fds)
            msg.fds.clear()
        if reply is not None:
            return self._send_reply(msg.request, reply)
        if ack:
            return self._send_reply(msg.request, encode_u64(_ACK_OK))
        return True

    def _send_reply(self, request: int, payload: bytes) -> bool:
        fds, self._reply_fds = self._reply_fds, []
        try:
            self.conn.send_message(request, payload, flags=VERSION | FLAG_REPLY, fds=fds)
        except (PeerClosed, OSError) as exc:
            log.info("vhost-user: reply to %s failed: %s", request_name(request), exc)
            self.close()
            return False
        finally:
            close_fds(fds)  # our copy; the front-end got its own
        return True

    # -- helpers ----------------------------------------------------------------------

    def _vring(self, msg: Message, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(
                msg.request, "index", f"vring {index} does not exist ({len(self.vrings)} queues)"
            )
        return self.vrings[index]

    def _check_ring_fits(self, request: int, v: Vring, mem: GuestMemory) -> None:
        """Every ring area of the negotiated format must be aligned and translate inside one
        region for ``num`` entries (2.7.2; 2.8.10 for packed event suppression areas)."""
        areas = self.queue_format.ring_areas(v.num)
        for area, addr in zip(areas, (v.desc_addr, v.avail_addr, v.used_addr), strict=True):
            if addr % area.align:
                raise ProtocolError(
                    request,
                    area.field,
                    f"vring {v.index}: {area.name} {addr:#x} is not {area.align}-byte aligned",
                )
            try:
                mem.uva_view(addr, area.length).release()
            except MemoryFault as exc:
                raise ProtocolError(
                    request,
                    area.field,
                    f"vring {v.index} (num {v.num}): {area.name} does not fit: {exc}",
                ) from None

    def _update(self, request: int, v: Vring) -> None:
        """Start the ring if it now can ("Ring states") and tell the device once."""
        if (
            not v.started
            and v.num
            and v.addr_set
            and v.kick_fd is not None
            and self.mem is not None
        ):
            self._check_ring_fits(request, v, self.mem)
            make = self.queue_factory or self.queue_format
            try:
                v.queue = make(
                    self.mem,
                    v.index,
                    v.num,
                    v.desc_addr,
                    v.avail_addr,
                    v.used_addr,
                    features=self.ring_features,
                    last_avail_idx=v.base,
                    sync=self.device.queue_direction(v.index),
                )
            except (MemoryFault, ValueError) as exc:
                raise ProtocolError(request, "ring", f"vring {v.index}: {exc}") from None
            self._attach_inflight(request, v, v.queue)
            v.started = True
            log.info(
                "vring %d started: num %d base %d desc %#x avail %#x used %#x",
                v.index, v.num, v.base, v.desc_addr, v.avail_addr, v.used_addr,
            )  # fmt: skip
        if v.started and v.kick_fd is None:
            # "Bit 8 is the invalid FD flag ... polling should be used instead of waiting
            # for the kick" (SET_VRING_KICK): vdev does not poll rings, so the ring stays
            # stopped until a real kick fd arrives.
            log.warning("vring %d: kick without fd (polling mode) is not supported", v.index)
            self._announce_stopped(v)
        elif v.started and not v.notified:
            self._announce_started(v)

    def _attach_inflight(self, request: int, v: Vring, q: VirtQueue) -> None:
        """With an inflight buffer (SET_INFLIGHT_FD), split rings track and resume from it."""
        buf = self.inflight
        if buf is None:
            return
        attach = getattr(q, "attach_inflight", None)
        if attach is None:  # a test's queue_factory
            log.warning("vring %d: this queue does not track inflight I/O", v.index)
            return
        try:
            attach(buf.region(v.index, v.num, self.packed))
        except (InflightError, InflightLimit) as exc:
            v.queue = None
            q.close()
            raise ProtocolError(request, "inflight", f"vring {v.index}: {exc}") from None

    def _set_enabled(self, request: int, v: Vring, enabled: bool) -> None:
        """Record SET_VRING_ENABLE; a started ring that becomes enabled is announced again."""
        was_enabled, was_notified = v.enabled, v.notified
        if was_enabled and not enabled and was_notified:
            self._device_call("queue_disabling", v)
        v.enabled = enabled
        self._update(request, v)
        if enabled and not was_enabled and was_notified:
            self._device_call("queue_started", v)

    # -- the device's view of a ring: started / kicked / stopped ----------------------------

    def _announce_started(self, v: Vring) -> None:
        """Tell the device the ring runs and watch its kick fd (until _announce_stopped)."""
        v.notified = True
        fd = v.kick_fd
        if self.watcher is not None and fd is not None:
            self.watcher.watch(fd, lambda: self._kicked(v, fd))
        self._device_call("queue_started", v)

    def _announce_stopped(self, v: Vring) -> None:
        """Stop watching the kick fd, then tell the device (once per start)."""
        if not v.notified:
            return
        v.notified = False
        if self.watcher is not None and v.kick_fd is not None:
            self.watcher.unwatch(v.kick_fd)
        self._device_call("queue_stopped", v)

    def _kicked(self, v: Vring, fd: int) -> None:
        """The kick eventfd fired: consume it and let the device process the ring."""
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass  # another reader (or a spurious wakeup) took it: still look at the ring
        except OSError as exc:
            log.warning("vring %d: kick fd %d: %s; no longer watched", v.index, fd, exc)
            if self.watcher is not None:
                self.watcher.unwatch(fd)
            return
        if v.notified and v.kick_fd == fd:
            self._device_call("queue_kicked", v)

    def _stop(self, v: Vring) -> None:
        """Stop the ring: device first, then record the position and drop the queue."""
        self._announce_stopped(v)
        if v.queue is not None:
            q = v.queue
            v.queue = None
            try:
                v.base = q.vhost_base  # the format's GET_VRING_BASE encoding
                q.close()
            except Exception:
                log.exception("vhost-user: closing queue %d failed", v.index)
        v.started = False

    def _each_ring(self, fn: Callable[[Vring], None]) -> None:
        """Apply `fn` to every ring, even past one that fails, then raise the first failure.

        A request that touches all rings (SET_FEATURES, RESET_OWNER, a memory table) must
        leave each ring as the request says although one of them cannot start: stopping at
        the first refusal would leave the rings after it in their old state, and the device
        untold of a change that the reply's failure does not undo."""
        first: ProtocolError | None = None
        for v in self.vrings:
            try:
                fn(v)
            except ProtocolError as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first

    def _update_all(self, request: int) -> None:
        self._each_ring(lambda v: self._update(request, v))

    # -- features ---------------------------------------------------------------------

    def _get_features(self, msg: Message, _p: Empty) -> bytes:
        # A device may change its offer from one GET_FEATURES to the next (a feature fault:
        # features_offer); SET_FEATURES is checked against the latest one.
        offer = getattr(self.device, "features_offer", None)
        if callable(offer):
            value = self._device_call("features_offer")
            if isinstance(value, int):
                self.offered_features = value | F_PROTOCOL_FEATURES
        return encode_u64(self.offered_features)

    def _set_features(self, msg: Message, value: int) -> None:
        if value & ~self.offered_features:
            raise ProtocolError(
                msg.request, "features", f"bits {value & ~self.offered_features:#x} not offered"
            )
        self.features = value
        self.features_acked = True
        # The device hears the set before any ring starts by it; a ring that cannot start is
        # refused after every other ring is enabled and updated (_each_ring).
        view = self._device_call("features_set", self.negotiated_features)
        self.device_view = view if isinstance(view, int) else None
        for v in self.vrings:
            if v.queue is not None:
                v.queue.features = self.ring_features
        if not value & F_PROTOCOL_FEATURES:
            # "Ring states": without VHOST_USER_F_PROTOCOL_FEATURES the ring starts directly
            # in the enabled state.
            self._each_ring(lambda v: self._set_enabled(msg.request, v, True))
        self._update_all(msg.request)
        return None

    def _get_protocol_features(self, msg: Message, _p: Empty) -> bytes:
        return encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message, value: int) -> None:
        if value & ~self.offered_protocol_features:
            raise ProtocolError(
                msg.request,
                "protocol_features",
                f"bits {value & ~self.offered_protocol_features:#x} not offered",
            )
        self.protocol_features = value
        return None

    def _set_owner(self, msg: Message, _p: Empty) -> None:
        self.owner = True
        return None

    def _reset_owner(self, msg: Message, _p: Empty) -> None:
        # Deprecated: "It is recommended that back-ends either ignore this message, or use it
        # to disable all rings."  We disable them and keep the connection state.
        self._each_ring(lambda v: self._set_enabled(msg.request, v, False))
        return None

    # -- memory -----------------------------------------------------------------------

    def _map_region(
        self, request: int, mem: GuestMemory, where: str, r: MemRegionDesc, fd: int
    ) -> None:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ProtocolError(request, f"{where}.fd", str(exc)) from None
        # A regular file (memfd, hugetlbfs) shorter than the region would SIGBUS on access.
        if stat.S_ISREG(st.st_mode) and r.mmap_offset + r.size > st.st_size:
            raise ProtocolError(
                request,
                f"{where}.size",
                f"mmap_offset {r.mmap_offset:#x}+{r.size:#x} exceeds fd size {st.st_size:#x}",
            )
        try:
            mem.add_region(r.gpa, r.size, r.uva, r.mmap_offset, fd)
        except ValueError as exc:
            raise ProtocolError(request, where, str(exc)) from None

    def _install_memory(self, request: int, new: GuestMemory) -> None:
        """Switch to ``new`` while rings may be running: re-point queues, then drop old."""
        for v in self.vrings:
            if v.started:
                self._check_ring_fits(request, v, new)
        for v in self.vrings:
            if v.queue is not None:
                try:
                    v.queue.remap(new)
                except (MemoryFault, ValueError) as exc:  # checked above; defensive
                    raise ProtocolError(request, "regions", f"vring {v.index}: {exc}") from None
        old, self.mem = self.mem, new
        self._device_call("memory_changed", new)
        if old is not None and old is not new:
            old.close()

    def _check_memory_limit(self, request: int, field: str, total: int) -> None:
        """The guest memory limit: what one connection may have mapped at once."""
        if total > self.max_guest_memory:
            raise ProtocolError(
                request,
                field,
                f"guest memory limit: {human(total)} ({total:#x} bytes) would exceed "
                f"{human(self.max_guest_memory)} per connection",
            )

    def _set_mem_table(self, msg: Message, table: MemTable) -> None:
        # "Memory regions description": one fd per region, same order (dispatch counted them).
        self._check_memory_limit(msg.request, "regions", sum(r.size for r in table.regions))
        new = GuestMemory(self.fault_fd)
        try:
            for i, (r, fd) in enumerate(zip(table.regions, msg.fds, strict=True)):
                self._map_region(msg.request, new, f"regions[{i}]", r, fd)
            self._install_memory(msg.request, new)
        except BaseException:
            if self.mem is not new:
                new.close()
            raise
        log.info(
            "memory table: %s",
            ", ".join(f"gpa {r.gpa:#x}+{r.size:#x} uva {r.uva:#x}" for r in table.regions),
        )
        self._update_all(msg.request)
        return None

    def _get_max_mem_slots(self, msg: Message, _p: Empty) -> bytes:
        return encode_u64(self.max_mem_slots)

    def _add_mem_reg(self, msg: Message, r: MemRegionDesc) -> None:
        # "Exactly one file descriptor from which the memory is mapped is passed" (counted).
        if self.mem is not None and any(
            (m.gpa, m.size, m.uva, m.mmap_offset) == (r.gpa, r.size, r.uva, r.mmap_offset)
            for m in self.mem.regions
        ):
            # QEMU 7.2 re-sends ADD_MEM_REG for regions the back-end already has when it
            # restarts the device (e.g. the guest enabling a second queue pair): an
            # identical region is already mapped, so this is a no-op, not an overlap.
            log.debug("ADD_MEM_REG: region gpa %#x+%#x already mapped", r.gpa, r.size)
            self._update_all(msg.request)
            return None
        if self.mem is not None and len(self.mem.regions) >= self.max_mem_slots:
            raise ProtocolError(
                msg.request,
                "region",
                f"memory regions limit: all {self.max_mem_slots} slots in use (GET_MAX_MEM_SLOTS)",
            )
        mapped = self.mem.total_size if self.mem is not None else 0
        self._check_memory_limit(msg.request, "region.size", mapped + r.size)
        # Adding a mapping never moves an existing one, so running queues stay valid and
        # the live table can grow in place.
        if self.mem is None:
            new = GuestMemory(self.fault_fd)
            try:
                self._map_region(msg.request, new, "region", r, msg.fds[0])
            except BaseException:
                new.close()
                raise
            self.mem = new
        else:
            self._map_region(msg.request, self.mem, "region", r, msg.fds[0])
        self._device_call("memory_changed", self.mem)
        self._update_all(msg.request)
        return None

    def _rem_mem_reg(self, msg: Message, r: MemRegionDesc) -> None:
        # At most one fd (codec.REQUEST_FDS); dispatch closes it, as the back-end MUST.
        mem = self.mem
        match = None
        if mem is not None:
            for region in mem.regions:
                if (region.gpa, region.size, region.uva) == (r.gpa, r.size, r.uva):
                    match = region
        if mem is None or match is None:
            raise ProtocolError(
                msg.request, "region", f"gpa {r.gpa:#x}+{r.size:#x} uva {r.uva:#x} is not mapped"
            )
        for v in self.vrings:
            if v.started and any(
                match.uva <= a < match.uva_end for a in (v.desc_addr, v.avail_addr, v.used_addr)
            ):
                raise ProtocolError(
                    msg.request, "region", f"gpa {r.gpa:#x} holds running vring {v.index}"
                )
        mem.remove_region(r.gpa, r.size, r.uva)
        self._device_call("memory_changed", mem)
        return None

    # -- vrings -----------------------------------------------------------------------

    def _set_vring_num(self, msg: Message, s: VringState) -> None:
        v = self._vring(msg, s.index)
        try:
            self.queue_format.check_size(s.num)  # 2.7: a power of 2; 2.8: any, up to 32768
        except ValueError as exc:
            raise ProtocolError(msg.request, "num", str(exc)) from None
        if v.started and s.num != v.num:
            raise ProtocolError(msg.request, "num", f"vring {v.index} is started")
        v.num = s.num
        if v.addr_set and self.mem is not None:
            self._check_ring_fits(msg.request, v, self.mem)
        self._update(msg.request, v)
        return None

    def _set_vring_addr(self, msg: Message, a: VringAddr) -> None:
        v = self._vring(msg, a.index)
        if a.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError(msg.request, "flags", f"unknown vring flags {a.flags:#x}")
        if a.flags & VHOST_VRING_F_LOG:
            raise ProtocolError(msg.request, "flags", "VHOST_VRING_F_LOG: logging not offered")
        same = (v.desc_addr, v.avail_addr, v.used_addr) == (a.desc, a.avail, a.used)
        if v.started and not same:
            raise ProtocolError(msg.request, "desc_addr", f"vring {v.index} is started")
        if v.num and self.mem is not None:
            probe = Vring(
                v.index, num=v.num, desc_addr=a.desc, avail_addr=a.avail, used_addr=a.used
            )
            self._check_ring_fits(msg.request, probe, self.mem)
        v.desc_addr, v.avail_addr, v.used_addr, v.log_addr = a.desc, a.avail, a.used, a.log
        v.flags = a.flags
        v.addr_set = True
        self._update(msg.request, v)
        return None

    def _set_vring_base(self, msg: Message, s: VringState) -> None:
        v = self._vring(msg, s.index)
        try:
            self.queue_format.check_base(s.num, v.num)  # the format's encoding
        except ValueError as exc:
            raise ProtocolError(msg.request, "num", str(exc)) from None
        if v.started:
            raise ProtocolError(msg.request, "num", f"vring {v.index} is started")
        v.base = s.num
        return None

    def _get_vring_base(self, msg: Message, s: VringState) -> bytes:
        v = self._vring(msg, s.index)
        # "Ring states": stop the ring upon receiving VHOST_USER_GET_VRING_BASE.  The kick
        # and call fds go too (as in libvhost-user); a restart sends new ones.
        self._stop(v)
        for name in ("kick_fd", "call_fd"):
            fd = getattr(v, name)
            setattr(v, name, None)
            if fd is not None:
                close_fds([fd])
        log.info("vring %d stopped at avail idx %d", v.index, v.base)
        return encode_state(v.index, v.base)

    def _set_vring_fd(self, msg: Message, value: int) -> None:
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(msg.request, "u64", f"unknown bits {value:#x}")
        v = self._vring(msg, value & VRING_IDX_MASK)
        # Dispatch checked the fd count against the invalid-FD flag (codec.REQUEST_FDS).
        fd = None if value & VRING_NOFD_MASK else msg.fds.pop()
        if msg.request == Request.SET_VRING_KICK:
            # The kick fd is watched while the ring runs: take the ring away while it changes.
            self._announce_stopped(v)
            old, v.kick_fd = v.kick_fd, fd
            if old is not None:
                close_fds([old])
            self._update(msg.request, v)
        elif msg.request == Request.SET_VRING_CALL:
            # The device reads call_fd live; the old one is closed once replaced.
            old, v.call_fd = v.call_fd, fd
            if old is not None:
                close_fds([old])
        else:
            old, v.err_fd = v.err_fd, fd
            if old is not None:
                close_fds([old])
        return None

    def _set_vring_enable(self, msg: Message, s: VringState) -> None:
        v = self._vring(msg, s.index)
        if s.num not in (0, 1):
            raise ProtocolError(msg.request, "num", f"enable must be 0 or 1, got {s.num}")
        # QEMU sends this before the rings exist (and before SET_FEATURES): just record it.
        self._set_enabled(msg.request, v, bool(s.num))
        return None

    def _get_queue_num(self, msg: Message, _p: Empty) -> bytes:
        return encode_u64(len(self.vrings))

    # -- device-level -----------------------------------------------------------------

    def _net_set_mtu(self, msg: Message, mtu: int) -> None:
        if not self.offered_protocol_features & (1 << ProtocolFeature.MTU):
            raise ProtocolError(msg.request, "request", "MTU protocol feature not offered")
        if not 68 <= mtu <= 65535:
            raise ProtocolError(msg.request, "mtu", f"{mtu} is not in 68..65535")
        try:
            self.device.set_mtu(mtu)
        except ValueError as exc:
            raise ProtocolError(msg.request, "mtu", str(exc)) from None
        self.mtu = mtu
        return None

    def _send_rarp(self, msg: Message, value: int) -> None:
        mac = value.to_bytes(8, "little")[:6]
        log.info("SEND_RARP for %s accepted (ignored)", mac.hex(":"))
        return None

    def _set_status(self, msg: Message, value: int) -> None:
        if value > 0xFF:
            raise ProtocolError(msg.request, "status", f"{value:#x} is not a u8")
        # QEMU 7.2 sends SET_STATUS 0 *before* GET_VRING_BASE on stop: status 0 must not
        # reset the rings, or the reported bases would be lost.
        keep = getattr(self.device, "status_set", None)
        kept = self._device_call("status_set", value) if callable(keep) else value
        self.status = kept if isinstance(kept, int) else value
        return None

    def _get_status(self, msg: Message, _p: Empty) -> bytes:
        return encode_u64(self.status)

    def _set_backend_req_fd(self, msg: Message, _p: Empty) -> None:
        old, self.backend_req_fd = self.backend_req_fd, msg.fds.pop()
        if old is not None:
            close_fds([old])
        return None

    def _get_inflight_fd(self, msg: Message, req: Inflight) -> bytes:
        # GET_INFLIGHT_FD: "the back-end allocates the shared buffer for the front-end ...
        # num queues and queue size".  A new buffer replaces the old one for the next
        # SET_INFLIGHT_FD; it is not used until then.
        try:
            fd, buf = InflightBuffer.allocate(req.num_queues, req.queue_size, len(self.vrings))
        except InflightLimit as exc:
            raise ProtocolError(msg.request, exc.field, str(exc)) from None
        except OSError as exc:
            raise ProtocolError(msg.request, "mmap_size", f"cannot allocate: {exc}") from None
        size = buf.size
        buf.close()  # mapped again on SET_INFLIGHT_FD, from the fd the front-end keeps
        self._reply_fds = [fd]
        log.info("inflight buffer: %d queues x %d entries, %d bytes", req.num_queues,
                 req.queue_size, size)  # fmt: skip
        return encode_inflight(Inflight(size, 0, req.num_queues, req.queue_size))

    def _set_inflight_fd(self, msg: Message, req: Inflight) -> None:
        started = [v.index for v in self.vrings if v.started]
        if started:
            raise ProtocolError(msg.request, "fd", f"vring {started[0]} is started")
        try:
            buf = InflightBuffer(
                msg.fds[0], req.mmap_size, req.mmap_offset, req.num_queues, req.queue_size,
                len(self.vrings),
            )  # fmt: skip
        except InflightLimit as exc:
            raise ProtocolError(msg.request, exc.field, str(exc)) from None
        except (OSError, ValueError, OverflowError) as exc:
            raise ProtocolError(msg.request, "fd", f"cannot map: {exc}") from None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = buf
        return None

    def _get_config(self, msg: Message, cfg: Config) -> bytes:
        # "back-end uses zero length of payload to indicate an error".
        if not self.has_protocol_feature(ProtocolFeature.CONFIG):
            log.error("vhost-user: GET_CONFIG without the CONFIG protocol feature")
            return b""
        try:
            data = bytes(self.device.get_config(cfg.offset, cfg.size))
        except Exception as exc:
            log.error("vhost-user: GET_CONFIG offset %d size %d: %s", cfg.offset, cfg.size, exc)
            return b""
        if len(data) != cfg.size:
            log.error("vhost-user: device config is %d bytes, asked %d", len(data), cfg.size)
            return b""
        return encode_config(cfg.offset, cfg.flags, data)


__all__ = [
    "BACKEND_PROTOCOL_FEATURES",
    "DEVICE_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "VhostDevice",
    "VhostUserBackend",
    "Vring",
]
