"""vhost-user message codec: header, request numbers, payload structs, exact size checks.

Spec: ``docs/interop/vhost-user.rst`` (qemu/qemu), "Message Specification".  All numbers are
in the machine's native byte order and the structs are packed, so the wire layout is spelled
out here with :mod:`struct` (``=`` prefix: native order, no padding).  This is a socket
protocol, not shared memory, which is why it does not go through the cffi ABI headers.

Every decoder checks the exact payload size the spec gives for the request and raises
:class:`ProtocolError` naming the request and the field, so that the backend can log a useful
error and refuse the message instead of acting on garbage.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vdev.errors import VdevError

T = TypeVar("T")

# -- header ("Header") -------------------------------------------------------------------

HEADER = struct.Struct("=III")  # request, flags, size
HEADER_SIZE = HEADER.size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# The largest legitimate payload is GET/SET_CONFIG (12 + 256 bytes); anything much bigger is
# a broken or hostile peer, refused before reading it.
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD_SIZE = 4096

# "Memory regions description": VHOST_MEMORY_BASELINE_NREGIONS.
MEMORY_BASELINE_NREGIONS = 8

# SET_VRING_KICK/CALL/ERR u64: "Bits (0-7) of the payload contain the vring index. Bit 8 is
# the invalid FD flag."
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

VHOST_USER_F_PROTOCOL_FEATURES = 30
F_PROTOCOL_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES


class ProtocolError(VdevError):
    """A message broke the protocol; the text names the request and the offending field."""

    def __init__(self, request: int | str, field_name: str, detail: str) -> None:
        self.request = request
        self.field = field_name
        self.detail = detail
        super().__init__(f"{request_name(request)}: {field_name}: {detail}")


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types"), by number."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_SLAVE_REQ_FD = 21
    SET_BACKEND_REQ_FD = 21  # the newer spec's name for the same request
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    SLAVE_REQ = 5
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    SLAVE_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def pf_mask(*bits: ProtocolFeature) -> int:
    """Bitmask of the given protocol features."""
    mask = 0
    for b in bits:
        mask |= 1 << b
    return mask


def request_name(request: int | str) -> str:
    """``VHOST_USER_<NAME>`` for a known number, else the number itself (for log lines)."""
    if isinstance(request, str):
        return request
    try:
        return f"VHOST_USER_{Request(request).name}"
    except ValueError:
        return f"request {request}"


# -- payload structs ("Payload") ----------------------------------------------------------

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")
_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
_REGION = struct.Struct("=QQQQ")  # guest address, size, user address, mmap offset
_MEM_HDR = struct.Struct("=II")  # num regions, padding
_LOG = struct.Struct("=QQ")
_CONFIG_HDR = struct.Struct("=III")  # offset, size, flags
_INFLIGHT = struct.Struct("=QQHHxxxx")  # sizeof(VhostUserInflight) is 24 with tail padding
_IOTLB = struct.Struct("=QQQBB6x")  # sizeof(struct vhost_iotlb_msg) is 32
_AREA = struct.Struct("=QQQ")
_DEVICE_STATE = struct.Struct("=II")


@dataclass(frozen=True)
class VringState:
    """ "A vring state description": index + num (NUM, BASE, GET_VRING_BASE, ENABLE)."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """ "A vring address description" (field order on the wire: desc, used, avail, log)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class MemRegionDesc:
    """One region of "Memory regions description"."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int


@dataclass(frozen=True)
class MemTable:
    """SET_MEM_TABLE payload: up to 8 regions, one fd each in the same order."""

    regions: tuple[MemRegionDesc, ...]


@dataclass(frozen=True)
class Log:
    size: int
    offset: int


@dataclass(frozen=True)
class Config:
    """ "Virtio device config space": offset, size, flags and ``size`` bytes."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True)
class Iotlb:
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


@dataclass(frozen=True)
class Empty:
    """No payload (size 0)."""


Payload = int | VringState | VringAddr | MemTable | MemRegionDesc | Log | Config | Inflight
AnyPayload = Payload | Iotlb | Empty | bytes


class Kind(enum.Enum):
    """Payload shapes; each request has exactly one."""

    EMPTY = "empty"
    U64 = "u64"
    STATE = "vring state"
    ADDR = "vring address"
    MEM_TABLE = "memory table"
    MEM_REG = "single memory region"
    LOG = "log"
    CONFIG = "config"
    INFLIGHT = "inflight"
    IOTLB = "iotlb"
    DEVICE_STATE = "device state"
    RAW = "raw"  # crypto sessions, shared objects: not decoded


# Request payload shapes, from each request's ":request payload:" line in the spec.
REQUEST_KIND: dict[int, Kind] = {
    Request.GET_FEATURES: Kind.EMPTY,
    Request.SET_FEATURES: Kind.U64,
    Request.SET_OWNER: Kind.EMPTY,
    Request.RESET_OWNER: Kind.EMPTY,
    Request.SET_MEM_TABLE: Kind.MEM_TABLE,
    Request.SET_LOG_BASE: Kind.LOG,
    Request.SET_LOG_FD: Kind.EMPTY,
    Request.SET_VRING_NUM: Kind.STATE,
    Request.SET_VRING_ADDR: Kind.ADDR,
    Request.SET_VRING_BASE: Kind.STATE,
    Request.GET_VRING_BASE: Kind.STATE,
    Request.SET_VRING_KICK: Kind.U64,
    Request.SET_VRING_CALL: Kind.U64,
    Request.SET_VRING_ERR: Kind.U64,
    Request.GET_PROTOCOL_FEATURES: Kind.EMPTY,
    Request.SET_PROTOCOL_FEATURES: Kind.U64,
    Request.GET_QUEUE_NUM: Kind.EMPTY,
    Request.SET_VRING_ENABLE: Kind.STATE,
    Request.SEND_RARP: Kind.U64,
    Request.NET_SET_MTU: Kind.U64,
    Request.SET_SLAVE_REQ_FD: Kind.EMPTY,
    Request.IOTLB_MSG: Kind.IOTLB,
    Request.SET_VRING_ENDIAN: Kind.STATE,
    Request.GET_CONFIG: Kind.CONFIG,
    Request.SET_CONFIG: Kind.CONFIG,
    Request.CREATE_CRYPTO_SESSION: Kind.RAW,
    Request.CLOSE_CRYPTO_SESSION: Kind.U64,
    Request.POSTCOPY_ADVISE: Kind.EMPTY,
    Request.POSTCOPY_LISTEN: Kind.EMPTY,
    Request.POSTCOPY_END: Kind.EMPTY,
    Request.GET_INFLIGHT_FD: Kind.INFLIGHT,
    Request.SET_INFLIGHT_FD: Kind.INFLIGHT,
    Request.GPU_SET_SOCKET: Kind.EMPTY,
    Request.RESET_DEVICE: Kind.EMPTY,
    Request.VRING_KICK: Kind.STATE,
    Request.GET_MAX_MEM_SLOTS: Kind.EMPTY,
    Request.ADD_MEM_REG: Kind.MEM_REG,
    Request.REM_MEM_REG: Kind.MEM_REG,
    Request.SET_STATUS: Kind.U64,
    Request.GET_STATUS: Kind.EMPTY,
    Request.GET_SHARED_OBJECT: Kind.RAW,
    Request.SET_DEVICE_STATE_FD: Kind.DEVICE_STATE,
    Request.CHECK_DEVICE_STATE: Kind.EMPTY,
}


class Fds(enum.Enum):
    """How many file descriptors a request carries (each request's text in the spec)."""

    NONE = "none"
    ONE = "one"
    PER_REGION = "one per region"  # SET_MEM_TABLE, "Memory regions description"
    UNLESS_NOFD = "one, unless the invalid-FD flag (bit 8) is set"  # SET_VRING_KICK/CALL/ERR
    # REM_MEM_REG: "No file descriptors SHOULD be passed ... the back-end MAY accept messages
    # with one file descriptor. If a file descriptor is passed, the back-end MUST close it".
    AT_MOST_ONE = "none, or one that is closed"


# The fds of every request that carries any; every other request carries none.  Dispatch
# enforces this table (check_fds) before any handler runs, so a handler cannot forget to.
REQUEST_FDS: dict[int, Fds] = {
    Request.SET_MEM_TABLE: Fds.PER_REGION,
    Request.SET_LOG_BASE: Fds.ONE,  # the log's shared memory (LOG_SHMFD)
    Request.SET_LOG_FD: Fds.ONE,
    Request.SET_VRING_KICK: Fds.UNLESS_NOFD,
    Request.SET_VRING_CALL: Fds.UNLESS_NOFD,
    Request.SET_VRING_ERR: Fds.UNLESS_NOFD,
    Request.SET_SLAVE_REQ_FD: Fds.ONE,
    Request.SET_INFLIGHT_FD: Fds.ONE,
    Request.GPU_SET_SOCKET: Fds.ONE,
    Request.ADD_MEM_REG: Fds.ONE,  # "Exactly one file descriptor ... is passed"
    Request.REM_MEM_REG: Fds.AT_MOST_ONE,
    Request.SET_DEVICE_STATE_FD: Fds.ONE,
}


def fds_rule(request: int) -> Fds:
    return REQUEST_FDS.get(request, Fds.NONE)


def expected_fds(request: int, payload: AnyPayload) -> tuple[int, int]:
    """The (fewest, most) fds a request with this decoded payload may carry."""
    rule = fds_rule(request)
    if rule is Fds.NONE:
        return 0, 0
    if rule is Fds.ONE:
        return 1, 1
    if rule is Fds.AT_MOST_ONE:
        return 0, 1
    if rule is Fds.PER_REGION:
        n = len(payload.regions) if isinstance(payload, MemTable) else 0
        return n, n
    nofd = isinstance(payload, int) and bool(payload & VRING_NOFD_MASK)
    return (0, 0) if nofd else (1, 1)


def check_fds(request: int, payload: AnyPayload, nfds: int) -> None:
    """ProtocolError naming ``fds`` unless ``nfds`` is what the request may carry."""
    lo, hi = expected_fds(request, payload)
    need = f"{lo}" if lo == hi else f"{lo}..{hi}"
    if nfds < lo:
        raise ProtocolError(request, "fds", f"missing fd: {nfds} attached, need {need}")
    if nfds > hi:
        raise ProtocolError(request, "fds", f"extra fd: {nfds} attached, need {need}")


# Requests whose reply is defined by the spec ("Communication", plus the later additions);
# every other request is answered only through REPLY_ACK.
HAS_REPLY: frozenset[int] = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.IOTLB_MSG,
        Request.POSTCOPY_ADVISE,
        Request.POSTCOPY_END,
        Request.CREATE_CRYPTO_SESSION,
        Request.GET_SHARED_OBJECT,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)


@dataclass
class Message:
    """One received or to-be-sent message.  ``fds`` are owned by whoever holds the message."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


# -- header --------------------------------------------------------------------------------


def encode_header(request: int, flags: int, size: int) -> bytes:
    return HEADER.pack(request & 0xFFFFFFFF, flags & 0xFFFFFFFF, size & 0xFFFFFFFF)


def decode_header(data: bytes, *, expect_reply: bool = False) -> tuple[int, int, int]:
    """Split and check a 12-byte header: version 1, no unknown flag bits, bounded size.

    ``expect_reply`` is True on the frontend side, where every message must carry the reply
    bit; on the backend side a request carrying it is refused.
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError("header", "size", f"{len(data)} bytes, need {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(request, "flags", f"version {flags & VERSION_MASK}, need 1")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(request, "flags", f"unknown flag bits {flags & ~KNOWN_FLAGS:#x}")
    if bool(flags & FLAG_REPLY) != expect_reply:
        what = "missing on a reply" if expect_reply else "set on a request"
        raise ProtocolError(request, "flags", f"reply bit {what}")
    if size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(request, "size", f"{size} exceeds the {MAX_PAYLOAD_SIZE} limit")
    return request, flags, size


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return encode_header(request, flags, len(payload)) + payload


# -- payload encoders ----------------------------------------------------------------------


def encode_u64(value: int) -> bytes:
    return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)


def encode_state(index: int, num: int) -> bytes:
    return _STATE.pack(index & 0xFFFFFFFF, num & 0xFFFFFFFF)


def encode_addr(a: VringAddr) -> bytes:
    return _ADDR.pack(a.index, a.flags, a.desc, a.used, a.avail, a.log)


def encode_region(r: MemRegionDesc) -> bytes:
    return _REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset)


def encode_mem_table(regions: list[MemRegionDesc] | tuple[MemRegionDesc, ...]) -> bytes:
    """Like QEMU: the size covers only the regions actually present."""
    return _MEM_HDR.pack(len(regions), 0) + b"".join(encode_region(r) for r in regions)


def encode_mem_reg(r: MemRegionDesc) -> bytes:
    """ "Single memory region description": 64-bit padding, then the region."""
    return _U64.pack(0) + encode_region(r)


def encode_config(offset: int, flags: int, data: bytes, size: int | None = None) -> bytes:
    return _CONFIG_HDR.pack(offset, len(data) if size is None else size, flags) + data


def encode_inflight(i: Inflight) -> bytes:
    return _INFLIGHT.pack(i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size)


def encode_log(log: Log) -> bytes:
    return _LOG.pack(log.size, log.offset)


# -- payload decoders ----------------------------------------------------------------------


def _need(request: int, payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(
            request, "size", f"payload is {len(payload)} bytes, {what} needs {size}"
        )


def _fixed(st: struct.Struct, what: str, build: Callable[..., T]) -> Callable[[int, bytes], T]:
    """A decoder for a fixed-size payload: exact size, then ``build(*fields)``."""

    def decode(request: int, payload: bytes) -> T:
        _need(request, payload, st.size, what)
        return build(*st.unpack(payload))

    decode.__doc__ = f"Decode a {what} payload ({st.size} bytes)."
    return decode


decode_u64 = _fixed(_U64, "u64", int)
decode_state = _fixed(_STATE, "vring state", VringState)
decode_addr = _fixed(_ADDR, "vring address", VringAddr)  # wire order is the field order
decode_inflight = _fixed(_INFLIGHT, "inflight description", Inflight)
decode_log = _fixed(_LOG, "log description", Log)
decode_iotlb = _fixed(_IOTLB, "iotlb message", Iotlb)


def decode_mem_table(request: int, payload: bytes) -> MemTable:
    if len(payload) < _MEM_HDR.size:
        raise ProtocolError(
            request, "size", f"payload is {len(payload)} bytes, memory table needs >= 8"
        )
    nregions, _padding = _MEM_HDR.unpack_from(payload)
    if nregions > MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(
            request, "num_regions", f"{nregions} exceeds {MEMORY_BASELINE_NREGIONS}"
        )
    # QEMU sends exactly the regions in use; accept the full-size union too (libvhost-user
    # style front-ends send sizeof(VhostUserMemory)).
    exact = _MEM_HDR.size + nregions * _REGION.size
    full = _MEM_HDR.size + MEMORY_BASELINE_NREGIONS * _REGION.size
    if len(payload) not in (exact, full):
        raise ProtocolError(
            request,
            "size",
            f"payload is {len(payload)} bytes, {nregions} regions need {exact}",
        )
    regions = tuple(
        MemRegionDesc(*_REGION.unpack_from(payload, _MEM_HDR.size + i * _REGION.size))
        for i in range(nregions)
    )
    return MemTable(regions)


def decode_mem_reg(request: int, payload: bytes) -> MemRegionDesc:
    _need(request, payload, _U64.size + _REGION.size, "single memory region")
    return MemRegionDesc(*_REGION.unpack_from(payload, _U64.size))


def decode_config(request: int, payload: bytes) -> Config:
    if len(payload) < _CONFIG_HDR.size:
        raise ProtocolError(request, "size", f"payload is {len(payload)} bytes, config needs >= 12")
    offset, size, flags = _CONFIG_HDR.unpack_from(payload)
    if size > MAX_CONFIG_SIZE:
        raise ProtocolError(request, "config.size", f"{size} exceeds {MAX_CONFIG_SIZE}")
    _need(request, payload, _CONFIG_HDR.size + size, f"config of {size} bytes")
    return Config(offset, size, flags, bytes(payload[_CONFIG_HDR.size :]))


def decode_device_state(request: int, payload: bytes) -> bytes:
    _need(request, payload, _DEVICE_STATE.size, "device state transfer")
    return bytes(payload)


def decode_empty(request: int, payload: bytes) -> Empty:
    # QEMU sends these with size 0; a few front-ends send a zero u64.  Accept both, as
    # libvhost-user does, but nothing else.
    if len(payload) not in (0, _U64.size):
        raise ProtocolError(request, "size", f"payload is {len(payload)} bytes, need 0")
    return Empty()


def _raw(request: int, payload: bytes) -> bytes:
    return bytes(payload)


_DECODERS: dict[Kind, Callable[[int, bytes], AnyPayload]] = {
    Kind.EMPTY: decode_empty,
    Kind.U64: decode_u64,
    Kind.STATE: decode_state,
    Kind.ADDR: decode_addr,
    Kind.MEM_TABLE: decode_mem_table,
    Kind.MEM_REG: decode_mem_reg,
    Kind.LOG: decode_log,
    Kind.CONFIG: decode_config,
    Kind.INFLIGHT: decode_inflight,
    Kind.IOTLB: decode_iotlb,
    Kind.DEVICE_STATE: decode_device_state,
    Kind.RAW: _raw,
}


def decode_request(request: int, payload: bytes) -> AnyPayload:
    """Decode a front-end request's payload by its spec shape, with exact size checks."""
    kind = REQUEST_KIND.get(request)
    if kind is None:
        raise ProtocolError(request, "request", "unknown request number")
    return _DECODERS[kind](request, payload)
