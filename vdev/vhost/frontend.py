"""vhost-user front-end (master side): what tests, fuzzers and benchmarks use instead of QEMU.

:class:`VhostUserFrontend` replays QEMU 7.2's message order for a vhost-user NIC (recorded in
``tests/vhost/helpers.py``, ``QEMU_HANDSHAKE``/``RING_SETUP``, and checked against a real QEMU
by ``tests/vhost/test_qemu.py``), with switches for each optional protocol feature, so a
backend is exercised exactly as QEMU would exercise it.  :meth:`VhostUserFrontend.send_raw`
and :meth:`VhostUserFrontend.recv_reply` bypass every rule for hostile tests.

:class:`FrontendMemory` is the "guest RAM": one memfd shared as one region or, like QEMU with
the legacy VGA hole, two (gpa 0 size 0xa0000 and gpa 0xc0000 onwards).  Its user addresses are
a fake base plus the fd offset, so guest-physical and user addresses always differ and a
backend that confuses them fails loudly.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from vdev.errors import VdevError
from vdev.virtio.memory import MemoryFault
from vdev.virtio.queue import F_RING_PACKED

from .codec import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    HAS_REPLY,
    VERSION,
    Inflight,
    MemRegionDesc,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    decode_inflight,
    decode_state,
    decode_u64,
    encode_addr,
    encode_inflight,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
    pf_mask,
    request_name,
)
from .connection import Connection, Listener, close_fds, connect

log = logging.getLogger("vdev.vhost")

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8

# QEMU's PC layout below 1 MiB: RAM up to the VGA window at 0xa0000, RAM again from 0xc0000.
QEMU_LOW_SIZE = 0xA0000
QEMU_HIGH_START = 0xC0000
DEFAULT_UVA_BASE = 0x7F3A_0000_0000


class VhostUserError(VdevError):
    """The backend refused a request (non-zero REPLY_ACK) or answered nonsense."""


# -- guest RAM -----------------------------------------------------------------------------


class FrontendMemory:
    """memfd-backed guest RAM, shared with the backend as 1 or 2 regions."""

    def __init__(
        self,
        size: int = 16 << 20,
        *,
        regions: int = 2,
        uva_base: int = DEFAULT_UVA_BASE,
        alloc_start: int = 0x100000,
    ) -> None:
        if regions not in (1, 2):
            raise ValueError("regions must be 1 or 2")
        if size <= alloc_start or size % mmap.PAGESIZE:
            raise ValueError(f"size {size:#x} must be page-aligned and above {alloc_start:#x}")
        self.size = size
        self.fd = os.memfd_create("vdev-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        if regions == 1:
            self.regions = [MemRegionDesc(0, size, uva_base, 0)]
        else:
            # Both regions come from the same fd; mmap_offset is the gpa, as in QEMU.
            self.regions = [
                MemRegionDesc(0, QEMU_LOW_SIZE, uva_base, 0),
                MemRegionDesc(
                    QEMU_HIGH_START, size - QEMU_HIGH_START, uva_base + QEMU_HIGH_START,
                    QEMU_HIGH_START,
                ),
            ]  # fmt: skip
        self._next = alloc_start
        self.closed = False

    def _region(self, gpa: int, length: int) -> MemRegionDesc:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r
        raise MemoryFault(f"gpa {gpa:#x}+{length:#x} is outside frontend guest memory")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        r = self._region(gpa, length)
        off = r.mmap_offset + gpa - r.gpa
        return memoryview(self.mm)[off : off + length]

    def uva_of(self, gpa: int) -> int:
        """The front-end (QEMU) virtual address of ``gpa``: what SET_VRING_ADDR carries."""
        r = self._region(gpa, 0)
        return r.uva + gpa - r.gpa

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.gpa_view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        self.gpa_view(gpa, len(data))[:] = data

    def alloc(self, size: int, align: int = 4096) -> int:
        """Bump-allocate ``size`` bytes of guest RAM (rings, buffers); returns the gpa."""
        gpa = (self._next + align - 1) // align * align
        self._region(gpa, size)
        self._next = gpa + size
        return gpa

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive; freed with it
        os.close(self.fd)

    def __enter__(self) -> FrontendMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the front-end -------------------------------------------------------------------------


@dataclass
class FrontendConfig:
    """Which optional protocol features the front-end asks for, like QEMU's switches."""

    mq: bool = True
    reply_ack: bool = True
    status: bool = True
    mem_slots: bool = True  # CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS)
    add_mem_reg: bool = False  # share memory with ADD_MEM_REG instead of SET_MEM_TABLE
    backend_req: bool = False  # SET_SLAVE_REQ_FD, if the backend offers it
    mtu: bool = False  # negotiate the MTU protocol feature
    host_mtu: int | None = None  # QEMU's host_mtu=: sent with NET_SET_MTU at start
    rarp: bool = True
    inflight: bool = False  # INFLIGHT_SHMFD: GET_INFLIGHT_FD once, SET_INFLIGHT_FD each start
    num_queues: int = 2  # RX + TX: QEMU keeps the control queue to itself
    features: int | None = None  # virtio features to ack; None: everything offered


@dataclass
class VringSetup:
    num: int
    desc_gpa: int
    avail_gpa: int
    used_gpa: int
    base: int = 0


@dataclass(eq=False)
class VhostUserFrontend:
    """The master side of one vhost-user connection."""

    conn: Connection
    config: FrontendConfig = field(default_factory=FrontendConfig)
    mem: FrontendMemory | None = None
    backend_features: int = 0
    backend_protocol_features: int = 0
    protocol_features: int = 0  # negotiated
    acked_features: int = 0
    queue_num: int | None = None
    max_mem_slots: int | None = None
    status: int = 0
    sent: list[int] = field(default_factory=list)  # every request number sent, in order
    vrings: dict[int, VringSetup] = field(default_factory=dict)
    # The inflight buffer the back-end allocated: kept across connections (QEMU keeps it in
    # the device, vhost-user-blk's ``inflight``), closed by its owner, not by close().
    inflight_fd: int | None = None
    inflight: Inflight | None = None
    _placeholders: list[int] = field(default_factory=list, repr=False)

    # -- connecting -------------------------------------------------------------------

    @classmethod
    def connect(
        cls, path: str | os.PathLike[str], config: FrontendConfig | None = None, *,
        timeout: float = 5.0, io_timeout: float = 5.0,
    ) -> VhostUserFrontend:  # fmt: skip
        """Connect to a backend listening on ``path`` (QEMU's default client role)."""
        conn = connect(path, timeout=timeout, io_timeout=io_timeout)
        return cls(conn, config or FrontendConfig())

    @classmethod
    def accept(
        cls, listener: Listener, config: FrontendConfig | None = None, *, timeout: float = 5.0
    ) -> VhostUserFrontend:
        """Accept a backend connecting to us (QEMU ``server=on``; ``vdev serve --client``)."""
        conn = listener.accept(timeout)
        if conn is None:
            raise TimeoutError(f"no backend connected to {listener.path} within {timeout} s")
        return cls(conn, config or FrontendConfig())

    def close(self) -> None:
        close_fds(self._placeholders)
        self._placeholders.clear()
        self.conn.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw messages -----------------------------------------------------------------

    def send_raw(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        flags: int = VERSION,
    ) -> None:
        """Send anything, unchecked (hostile tests).  ``fds`` stay owned by the caller."""
        self.sent.append(request)
        self.conn.send_message(request, payload, flags=flags, fds=fds)

    def recv_reply(self, timeout: float | None = None, *, keep_fds: bool = False) -> Message:
        """Wait for one reply (reply bit required); PeerClosed when the backend hung up.
        Its fds are closed unless ``keep_fds`` (GET_INFLIGHT_FD's reply carries one)."""
        msg = self.conn.recv_message(expect_reply=True, timeout=timeout)
        if not keep_fds:
            close_fds(msg.fds)
            msg.fds = []
        return msg

    def _reply_for(self, request: int) -> Message:
        msg = self.recv_reply(keep_fds=request == Request.GET_INFLIGHT_FD)
        if msg.request != request:
            raise VhostUserError(
                f"{request_name(request)}: reply is for {request_name(msg.request)}"
            )
        return msg

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes | None:
        """Send one request the way QEMU does and return its reply payload, if it has one.

        With REPLY_ACK negotiated, requests without their own reply carry need_reply and a
        non-zero ack raises :class:`VhostUserError` ("REPLY_ACK").
        """
        has_reply = request in HAS_REPLY
        ack = not has_reply and self._negotiated(ProtocolFeature.REPLY_ACK)
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        self.send_raw(request, payload, fds, flags)
        if has_reply:
            return self._reply_for(request).payload
        if ack:
            code = decode_u64(request, self._reply_for(request).payload)
            if code:
                raise VhostUserError(f"{request_name(request)} failed: ack {code}")
        return None

    def _negotiated(self, bit: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << bit))

    def _u64_request(self, request: int) -> int:
        reply = self.request(request)
        assert reply is not None
        try:
            return decode_u64(request, reply)
        except ProtocolError as exc:
            raise VhostUserError(str(exc)) from None

    # -- QEMU 7.2's sequence ----------------------------------------------------------

    def handshake(self) -> None:
        """Everything QEMU sends when the netdev connects, before the guest drives the NIC.

        GET_FEATURES; GET/SET_PROTOCOL_FEATURES; GET_QUEUE_NUM (MQ); GET_MAX_MEM_SLOTS
        (CONFIGURE_MEM_SLOTS); SET_SLAVE_REQ_FD (SLAVE_REQ); SET_OWNER; GET_FEATURES;
        SET_VRING_CALL + SET_VRING_ERR per ring with placeholder eventfds; SET_VRING_ENABLE
        per ring (0: the rings do not exist yet).
        """
        cfg = self.config
        self.backend_features = self._u64_request(Request.GET_FEATURES)
        if self.backend_features & F_PROTOCOL_FEATURES:
            self.backend_protocol_features = self._u64_request(Request.GET_PROTOCOL_FEATURES)
            want = pf_mask(ProtocolFeature.CONFIGURE_MEM_SLOTS) if cfg.mem_slots else 0
            for on, bit in (
                (cfg.mq, ProtocolFeature.MQ),
                (cfg.reply_ack, ProtocolFeature.REPLY_ACK),
                (cfg.status, ProtocolFeature.STATUS),
                (cfg.backend_req, ProtocolFeature.SLAVE_REQ),
                (cfg.mtu, ProtocolFeature.MTU),
                (cfg.rarp, ProtocolFeature.RARP),
                (cfg.inflight, ProtocolFeature.INFLIGHT_SHMFD),
            ):
                if on:
                    want |= 1 << bit
            # Negotiated only after SET_PROTOCOL_FEATURES went out without need_reply.
            self.request(
                Request.SET_PROTOCOL_FEATURES, encode_u64(want & self.backend_protocol_features)
            )
            self.protocol_features = want & self.backend_protocol_features
        if self._negotiated(ProtocolFeature.MQ):
            self.queue_num = self._u64_request(Request.GET_QUEUE_NUM)
            if self.queue_num < cfg.num_queues:
                raise VhostUserError(
                    f"backend supports {self.queue_num} queues, need {cfg.num_queues}"
                )
        if self._negotiated(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self._u64_request(Request.GET_MAX_MEM_SLOTS)
        if self._negotiated(ProtocolFeature.SLAVE_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.request(Request.SET_SLAVE_REQ_FD, b"", [theirs.fileno()])
            finally:
                theirs.close()
            self._placeholders.append(ours.detach())
        self.request(Request.SET_OWNER)
        self.backend_features = self._u64_request(Request.GET_FEATURES)
        for i in range(cfg.num_queues):
            for req in (Request.SET_VRING_CALL, Request.SET_VRING_ERR):
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    self.request(req, encode_u64(i), [efd])
                finally:
                    os.close(efd)
        if self.backend_features & F_PROTOCOL_FEATURES:
            for i in range(cfg.num_queues):
                self.set_vring_enable(i, False)

    def set_features(self, features: int | None = None) -> int:
        """SET_FEATURES (with bit 30 kept, as QEMU 7.2 does), then FEATURES_OK via status."""
        if features is None:
            features = self.config.features
        if features is None:
            # QEMU 7.2's virtio-net-pci defaults to packed=off: VIRTIO_F_RING_PACKED (bit 34)
            # is only acked when asked for explicitly.
            features = self.backend_features & ~F_PROTOCOL_FEATURES & ~F_RING_PACKED
        features |= self.backend_features & F_PROTOCOL_FEATURES
        self.request(Request.SET_FEATURES, encode_u64(features))
        self.acked_features = features
        self.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return features

    def get_status(self) -> int:
        """GET_STATUS: what a driver re-reads after FEATURES_OK (3.1.1 "Driver
        Requirements: Device Initialization", step 6) to learn whether it was refused."""
        return self._u64_request(Request.GET_STATUS)

    def add_status(self, bits: int) -> None:
        """QEMU's vhost_user_add_status: GET_STATUS, then SET_STATUS if bits are missing."""
        if not self._negotiated(ProtocolFeature.STATUS):
            return
        self.status = self._u64_request(Request.GET_STATUS)
        if self.status & bits != bits:
            self.status |= bits
            self.request(Request.SET_STATUS, encode_u64(self.status))

    def set_status(self, status: int) -> None:
        if self._negotiated(ProtocolFeature.STATUS):
            self.request(Request.SET_STATUS, encode_u64(status))
            self.status = status

    def share_memory(self, mem: FrontendMemory) -> None:
        """SET_MEM_TABLE with every region (one fd each), or ADD_MEM_REG per region."""
        self.mem = mem
        if self.config.add_mem_reg and self._negotiated(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            for r in mem.regions:
                self.request(Request.ADD_MEM_REG, encode_mem_reg(r), [mem.fd])
        else:
            self.request(
                Request.SET_MEM_TABLE, encode_mem_table(mem.regions), [mem.fd] * len(mem.regions)
            )

    def share_inflight(self, num_queues: int, queue_size: int) -> bool:
        """QEMU vhost-user-blk's order: GET_INFLIGHT_FD the first time (the back-end allocates
        the buffer and sends its fd), SET_INFLIGHT_FD with that fd on every start, before the
        rings.  False when INFLIGHT_SHMFD is not negotiated."""
        if not self._negotiated(ProtocolFeature.INFLIGHT_SHMFD):
            return False
        if self.inflight_fd is None:
            self.send_raw(
                Request.GET_INFLIGHT_FD,
                encode_inflight(Inflight(0, 0, num_queues, queue_size)),
            )
            msg = self._reply_for(Request.GET_INFLIGHT_FD)
            if len(msg.fds) != 1:
                close_fds(msg.fds)
                raise VhostUserError(f"GET_INFLIGHT_FD reply carries {len(msg.fds)} fds, not 1")
            try:
                self.inflight = decode_inflight(Request.GET_INFLIGHT_FD, msg.payload)
            except ProtocolError as exc:
                close_fds(msg.fds)
                raise VhostUserError(str(exc)) from None
            self.inflight_fd = msg.fds[0]
        assert self.inflight is not None
        self.request(Request.SET_INFLIGHT_FD, encode_inflight(self.inflight), [self.inflight_fd])
        return True

    def start(self, mem: FrontendMemory, features: int | None = None) -> None:
        """What QEMU does at DRIVER_OK before the rings: [NET_SET_MTU], features, status,
        memory."""
        if self.config.host_mtu is not None and self._negotiated(ProtocolFeature.MTU):
            self.request(Request.NET_SET_MTU, encode_u64(self.config.host_mtu))
        self.set_features(features)
        self.share_memory(mem)

    def setup_vring(
        self,
        index: int,
        num: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        kick_fd: int,
        call_fd: int,
        base: int = 0,
        *,
        enable: bool = True,
    ) -> None:
        """NUM, BASE, ADDR (as user addresses), KICK, CALL, then ENABLE 1 for one ring."""
        if self.mem is None:
            raise VhostUserError("setup_vring before share_memory")
        self.request(Request.SET_VRING_NUM, encode_state(index, num))
        self.request(Request.SET_VRING_BASE, encode_state(index, base))
        addr = VringAddr(
            index,
            0,
            self.mem.uva_of(desc_gpa),
            self.mem.uva_of(used_gpa),
            self.mem.uva_of(avail_gpa),
            0,
        )
        self.request(Request.SET_VRING_ADDR, encode_addr(addr))
        self.request(Request.SET_VRING_KICK, encode_u64(index), [kick_fd])
        self.request(Request.SET_VRING_CALL, encode_u64(index), [call_fd])
        self.vrings[index] = VringSetup(num, desc_gpa, avail_gpa, used_gpa, base)
        if enable and self.backend_features & F_PROTOCOL_FEATURES:
            self.set_vring_enable(index, True)

    def driver_ok(self) -> None:
        """QEMU 7.2's vhost_user_dev_start: ACKNOWLEDGE | DRIVER | DRIVER_OK."""
        self.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, encode_state(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        reply = self.request(Request.GET_VRING_BASE, encode_state(index, 0))
        assert reply is not None
        try:
            state = decode_state(Request.GET_VRING_BASE, reply)
        except ProtocolError as exc:
            raise VhostUserError(str(exc)) from None
        if state.index != index:
            raise VhostUserError(f"GET_VRING_BASE reply for vring {state.index}, asked {index}")
        return state.num

    def stop(self, indices: Sequence[int] | None = None) -> dict[int, int]:
        """QEMU's stop: [SET_STATUS 0], GET_VRING_BASE per ring, SET_VRING_ENABLE 0."""
        if indices is None:
            indices = sorted(self.vrings) or list(range(self.config.num_queues))
        self.set_status(0)
        bases = {i: self.get_vring_base(i) for i in indices}
        if self.backend_features & F_PROTOCOL_FEATURES:
            for i in indices:
                self.set_vring_enable(i, False)
        return bases
