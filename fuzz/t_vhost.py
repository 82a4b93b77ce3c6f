"""The vhost-user message stream into the backend, with ancillary fds.

Each input is a small program run against a fresh :class:`VhostUserBackend` serving a real
:class:`VirtioNet` over a socketpair (single-threaded: the harness writes and then calls
``handle_readable`` itself, as the device loop would):

* the first byte picks a starting point: nothing, or both rings running (the mock
  frontend's memfd as the memory table), reached by QEMU's full sequence (REPLY_ACK and
  the rest) or by the shortest legal one;
* then operations: a structured message (a handled request with a payload of its kind, the
  fields drawn from edge values or the input, and 0-3 fds of several kinds), a raw message
  (any header, any payload, possibly lying about its size), a kick of a watched kick fd (the
  NIC processes the ring), the mock driver queueing a frame on TX or posting RX, or a hostile
  write anywhere in guest memory (ring or buffers).

Properties: nothing escapes ``handle_readable`` or a kick; nothing is logged as an internal
error; once the backend is closed no fd is left open and the pool holds what it held before.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Callable

from vdev.net.nic import VirtioNet
from vdev.skywalk import Pbufpool
from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.codec import (
    FLAG_NEED_REPLY,
    REQUEST_KIND,
    VERSION,
    Kind,
    MemRegionDesc,
    Request,
    VringAddr,
    encode_addr,
    encode_config,
    encode_header,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
)
from vdev.vhost.connection import Connection, close_fds
from vdev.vhost.frontend import DEFAULT_UVA_BASE, FrontendMemory
from vdev.virtio.driver import DriverQueue

from .common import FuzzLeak, Reader, open_fds

NUM = 16
MEM = 2 << 20
HANDLED = [
    Request.GET_FEATURES, Request.SET_FEATURES, Request.GET_PROTOCOL_FEATURES,
    Request.SET_PROTOCOL_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
    Request.SET_MEM_TABLE, Request.GET_MAX_MEM_SLOTS, Request.ADD_MEM_REG, Request.REM_MEM_REG,
    Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE,
    Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
    Request.SET_VRING_ERR, Request.SET_VRING_ENABLE, Request.GET_QUEUE_NUM,
    Request.NET_SET_MTU, Request.SEND_RARP, Request.SET_STATUS, Request.GET_STATUS,
    Request.SET_SLAVE_REQ_FD, Request.GET_CONFIG,
]  # fmt: skip
FLAGS = [VERSION, VERSION, VERSION | FLAG_NEED_REPLY, VERSION | FLAG_NEED_REPLY, 0, 0x2, 0x104]
U = DEFAULT_UVA_BASE
EDGES_64 = [
    0, 1, 2, 0xFF, 0x100, 0x101, 0xFFFF, 0x10000, 2**32 - 1, 2**63, 2**64 - 1,
    U, U + 0x1000, U + MEM - 1, U + MEM, 0xC0000, MEM, MEM - 0x1000,
]  # fmt: skip
EDGES_32 = [0, 1, 2, 3, 7, 15, 16, 17, 64, 256, 0x8000, 0x8000_8000, 0xFFFF, 0x10000, 2**32 - 1]
FRAME = bytes(12) + bytes.fromhex("5254000000fe525400aabbcc88b5") + bytes(50)

_pool: Pbufpool | None = None


class _Watcher:
    """The loop's watch table, fired by the harness (the backend watches kick fds)."""

    def __init__(self) -> None:
        self.fds: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.fds[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.fds.pop(fd, None)


class _Bad(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


_bad = _Bad()


def setup() -> None:
    global _pool
    _pool = Pbufpool(num_packets=256, buf_size=2048, max_frags=4, num_large_bufs=8)
    for name in ("vdev.vhost", "vdev.net"):
        logger = logging.getLogger(name)
        logger.addHandler(_bad)
        logger.propagate = False
        logger.setLevel(logging.ERROR)  # only errors: records cost time at 1M runs


def _v64(r: Reader) -> int:
    sel = r.u8()
    return EDGES_64[sel % len(EDGES_64)] if sel < 200 else r.u64()


def _v32(r: Reader) -> int:
    sel = r.u8()
    return EDGES_32[sel % len(EDGES_32)] if sel < 200 else r.u32()


class Run:
    def __init__(self) -> None:
        pool = _pool
        assert pool is not None
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer = a
        a.setblocking(False)
        self.nic = VirtioNet("fuzz", pool, lambda src, pkts: pool.free_packets(pkts))
        self.watcher = _Watcher()
        self.backend = VhostUserBackend(
            self.nic, Connection(b, io_timeout=0.05), watcher=self.watcher
        )
        self.mem = FrontendMemory(MEM)
        self.alive = True
        self.tx: DriverQueue | None = None
        self.rx: DriverQueue | None = None
        self.kicks: list[int] = []

    # -- sending ----------------------------------------------------------------------------

    def _fd(self, kind: int) -> int:
        if kind == 0:
            return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        if kind == 1:
            return os.dup(self.mem.fd)
        if kind == 2:
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        if kind == 3:
            fd = os.memfd_create("fuzz-small", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
            return fd
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r

    def send(
        self, data: bytes, fd_kinds: list[int], *, shut: bool = False, raw: bool = False
    ) -> None:
        if not self.alive:
            return
        fds = [self._fd(k) for k in fd_kinds]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            self.peer.sendmsg([data], anc if fds else [])
            if shut:
                self.peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the backend closed its end
        finally:
            close_fds(fds)
        for _ in range(4 if raw else 1):  # one message per call; raw bytes may hold more
            ok = self.backend.handle_readable()
            assert isinstance(ok, bool)
            if not ok:
                self.alive = False
                break
        self.drain()

    def msg(self, req: int, payload: bytes, fd_kinds: list[int], flags: int = VERSION) -> None:
        self.send(encode_header(req, flags, len(payload)) + payload, fd_kinds)

    def drain(self) -> None:
        while True:
            try:
                data, anc, _f, _a = self.peer.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            except (BlockingIOError, OSError):
                return
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    close_fds(array.array("i", raw[: len(raw) - len(raw) % 4]))
            if not data:
                return

    # -- the running state ------------------------------------------------------------------

    def running(self, full: bool) -> None:
        """Both rings started.  ``full``: QEMU's whole sequence (protocol features with
        REPLY_ACK, owner, bases, call fds, enables); otherwise the shortest one (no protocol
        features, so rings start enabled: "Ring states"), which leaves more of each input's
        time for the fuzzed part."""
        m = self.mem
        offered = self.backend.offered_protocol_features
        if full:
            self.msg(Request.SET_PROTOCOL_FEATURES, encode_u64(offered), [])
            self.msg(Request.SET_OWNER, b"", [])
        features = self.nic.offered | (1 << 30 if full else 0)
        self.msg(Request.SET_FEATURES, encode_u64(features), [])
        self.msg(Request.SET_MEM_TABLE, encode_mem_table(m.regions), [1, 1])
        feats = self.backend.features
        for i in range(2):
            desc, avail, used = m.alloc(16 * NUM, 16), m.alloc(6 + 2 * NUM), m.alloc(6 + 8 * NUM)
            q = DriverQueue(m, NUM, desc, avail, used, features=feats)
            if i == 0:
                self.rx = q
            else:
                self.tx = q
            self.msg(Request.SET_VRING_NUM, encode_state(i, NUM), [])
            if full:
                self.msg(Request.SET_VRING_BASE, encode_state(i, 0), [])
            uva = m.uva_of
            self.msg(
                Request.SET_VRING_ADDR,
                encode_addr(VringAddr(i, 0, uva(desc), uva(used), uva(avail), 0)),
                [],
            )
            if full:
                self.msg(Request.SET_VRING_CALL, encode_u64(i), [0])
            self.msg(Request.SET_VRING_KICK, encode_u64(i), [0])
            if full:
                self.msg(Request.SET_VRING_ENABLE, encode_state(i, 1), [])

    # -- operations -------------------------------------------------------------------------

    def structured(self, r: Reader) -> None:
        req = HANDLED[r.u8() % len(HANDLED)] if r.u8() < 230 else r.u8()
        kind = REQUEST_KIND.get(req, Kind.EMPTY)
        flags = FLAGS[r.u8() % len(FLAGS)]
        if kind is Kind.U64:
            payload = encode_u64(_v64(r))
        elif kind is Kind.STATE:
            payload = encode_state(r.u8() % 4 if r.u8() < 240 else _v32(r), _v32(r))
        elif kind is Kind.ADDR:
            payload = encode_addr(VringAddr(r.u8() % 3, r.u8() % 3, _v64(r), _v64(r), _v64(r), 0))
        elif kind is Kind.MEM_TABLE:
            regs = [
                MemRegionDesc(_v64(r), _v64(r) % (8 << 20), _v64(r), _v64(r))
                for _ in range(r.u8() % 10)
            ]
            payload = encode_mem_table(regs)
        elif kind is Kind.MEM_REG:
            payload = encode_mem_reg(MemRegionDesc(_v64(r), _v64(r) % (8 << 20), _v64(r), _v64(r)))
        elif kind is Kind.CONFIG:
            size = r.u16() % 300
            payload = encode_config(_v32(r), 0, bytes(min(size, 256)), size=size)
        else:
            payload = b""
        cut = r.u8()
        if cut >= 250 and payload:
            payload = payload[: cut % len(payload)]
        elif cut >= 245:
            payload += bytes(cut - 244)
        fd_kinds = [r.u8() % 5 for _ in range(r.u8() % 4)]
        self.msg(req, payload, fd_kinds, flags)

    def raw(self, r: Reader) -> None:
        req, flags, size = r.u32() % 64, r.u32() & 0x10F, r.u16() % 600
        body = r.take(r.u16() % 300)
        lie = size != len(body)
        fd_kinds = [r.u8() % 5 for _ in range(r.u8() % 4)]
        self.send(encode_header(req, flags, size) + body, fd_kinds, shut=lie, raw=True)

    def kick(self, r: Reader) -> None:
        fds = sorted(self.watcher.fds)
        if not fds:
            return
        fd = fds[r.u8() % len(fds)]
        try:
            os.eventfd_write(fd, 1)
        except OSError:
            pass
        self.watcher.fds[fd]()
        self.drain()

    def driver(self, r: Reader) -> None:
        q = self.tx if r.u8() % 2 else self.rx
        if q is None or q.num_free == 0:
            return
        gpa = self.mem.alloc(2048, 64) if self.mem._next + 4096 < MEM else 0x100000
        if q is self.tx:
            frame = FRAME[: 14 + 12 + r.u8() % 50]
            self.mem.write(gpa, frame)
            q.add_chain([(gpa, len(frame))])
        else:
            q.add_chain([], [(gpa, 2048)])
        q.publish()

    def scribble(self, r: Reader) -> None:
        off = r.u32() % MEM
        data = r.take(r.u8() % 9)
        off = min(off, MEM - len(data))
        self.mem.mm[off : off + len(data)] = data

    def close(self) -> None:
        for q in (self.tx, self.rx):
            if q is not None:
                q.close()
        self.backend.close()
        assert not self.backend.handle_readable()
        self.peer.close()
        self.mem.close()


OPS: list[Callable[[Run, Reader], None]] = [
    Run.structured, Run.structured, Run.structured, Run.raw, Run.kick, Run.kick, Run.driver,
    Run.scribble,
]  # fmt: skip


def one_input(data: bytes) -> None:
    if _pool is None:
        setup()
    assert _pool is not None
    fds = open_fds()
    in_use = _pool.stats.in_use
    del _bad.records[:]
    r = Reader(data)
    run = Run()
    try:
        start = r.u8()
        if start % 4:
            run.running(full=bool(start & 4))
        for _ in range(24):
            if r.left <= 0 or not run.alive:
                break
            OPS[r.u8() % len(OPS)](run, r)
    finally:
        run.close()
    assert not _bad.records, "\n".join(_bad.records)
    if _pool.stats.in_use != in_use:
        raise FuzzLeak(f"pool in_use {_pool.stats.in_use}, was {in_use}")
    if open_fds() != fds:
        raise FuzzLeak(f"{open_fds()} fds open, was {fds}")
