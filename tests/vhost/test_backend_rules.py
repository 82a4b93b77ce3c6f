"""The vhost-user backend's rules, one message at a time (issue 12 item 5, backend.py).

Single-threaded: the test is the front-end on one end of a socketpair and calls
``handle_readable`` itself, so every check is deterministic and needs no wait.  The oracles
are the vhost-user spec (docs/interop/vhost-user.rst: "REPLY_ACK", "Ring states", the
payload layouts) and the bytes on the wire: a refused request with REPLY_ACK gets the u64 1
and its error line names the request, the field and the detail, word for word; fds are
counted in /proc/self/fd.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.codec import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    VERSION,
    Inflight,
    MemRegionDesc,
    Message,
    Request,
    VringAddr,
    encode_addr,
    encode_config,
    encode_inflight,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
    request_name,
)
from vdev.vhost.connection import Connection, PeerClosed
from vdev.vhost.frontend import FrontendMemory

from .conftest import FakeDevice

# Protocol feature bits, from the spec's "Protocol features" list.
PF_MQ, PF_LOG_SHMFD, PF_RARP, PF_REPLY_ACK, PF_MTU, PF_BACKEND_REQ = 0, 1, 2, 3, 4, 5
PF_CONFIG, PF_INFLIGHT_SHMFD, PF_CONFIGURE_MEM_SLOTS, PF_STATUS = 9, 12, 15, 16
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32
F_RING_PACKED = 1 << 34  # VIRTIO_F_RING_PACKED
UVA = 0x7F0000000000
MIB = 1 << 20


class Watcher:
    """The caller's loop as the backend sees it: records watch/unwatch."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.unwatched: list[int] = []

    def watch(self, fd: int, cb: Callable[[], None]) -> None:
        self.watched[fd] = cb

    def unwatch(self, fd: int) -> None:
        self.unwatched.append(fd)
        self.watched.pop(fd, None)


class Wire:
    """The front-end end of a socketpair, the backend on the other end."""

    def __init__(self, device: Any = None, **kw: Any) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fe = Connection(a, io_timeout=0.5)
        self.device = device if device is not None else FakeDevice()
        self.backend = VhostUserBackend(self.device, Connection(b, io_timeout=0.5), **kw)
        self.mem = FrontendMemory(2 * MIB, regions=1, uva_base=UVA)
        self.region = self.mem.regions[0]

    def send(
        self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), ack: bool = False
    ) -> bool:
        flags = VERSION | (FLAG_NEED_REPLY if ack else 0)
        self.fe.send_message(request, payload, flags=flags, fds=list(fds))
        return self.backend.handle_readable()

    def reply(self) -> Message:
        msg = self.fe.recv_message(expect_reply=True, block=False)
        assert msg.flags == VERSION | FLAG_REPLY
        return msg

    def no_reply(self) -> None:
        with pytest.raises(BlockingIOError):
            self.fe.recv_message(expect_reply=True, block=False)

    def ack(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        """Send with NEED_REPLY; the u64 the backend acked (0 ok, non-zero refused)."""
        assert self.send(request, payload, fds, ack=True)
        msg = self.reply()
        assert msg.request == request and len(msg.payload) == 8 and not msg.fds
        return int(struct.unpack("=Q", msg.payload)[0])

    def ok(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        assert self.ack(request, payload, fds) == 0

    def get(self, request: int, payload: bytes = b"") -> Message:
        assert self.send(request, payload)
        msg = self.reply()
        assert msg.request == request
        return msg

    def reply_ack(self, features: int = 0, protocol: int = 0) -> None:
        """SET_FEATURES with bit 30, then REPLY_ACK (and ``protocol``) acked."""
        assert self.send(Request.SET_FEATURES, encode_u64(F_PROTOCOL_FEATURES | features))
        assert self.send(Request.SET_PROTOCOL_FEATURES, encode_u64((1 << PF_REPLY_ACK) | protocol))

    def mem_table(self) -> None:
        fd = os.dup(self.mem.fd)
        try:
            self.ok(Request.SET_MEM_TABLE, encode_mem_table([self.region]), (fd,))
        finally:
            os.close(fd)

    def ring(self, index: int = 0, num: int = 256, kick: bool = True) -> tuple[int, int, int]:
        """NUM, ADDR (and KICK): a split ring inside guest memory; returns its uvas."""
        desc = self.mem.alloc(16 * num, 16)
        avail = self.mem.alloc(6 + 2 * num, 2)
        used = self.mem.alloc(6 + 8 * num, 4)
        uvas = (self.mem.uva_of(desc), self.mem.uva_of(avail), self.mem.uva_of(used))
        self.ok(Request.SET_VRING_NUM, encode_state(index, num))
        self.ok(
            Request.SET_VRING_ADDR, encode_addr(VringAddr(index, 0, uvas[0], uvas[2], uvas[1], 0))
        )
        if kick:
            self.kick(index)
        return uvas

    def kick(self, index: int = 0) -> None:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.ok(Request.SET_VRING_KICK, encode_u64(index), (fd,))
        finally:
            os.close(fd)

    def close(self) -> None:
        self.backend.close()
        self.fe.close()
        self.mem.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Lines(logging.Handler):
    """Every line of the vdev.vhost logger, formatted (a broken format fails the test)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))

    def at(self, level: int) -> list[str]:
        return [text for lv, text in self.lines if lv == level]


@pytest.fixture
def lines() -> Iterator[Lines]:
    logger = logging.getLogger("vdev.vhost")
    h = Lines()
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    try:
        yield h  # Lines.emit formats in the caller: a broken log call raises there
    finally:
        logger.removeHandler(h)
        logger.setLevel(old)


def open_fds() -> frozenset[tuple[str, str]]:
    """This process's open fds, each with what it points at (a socket's or memfd's inode).

    Garbage left by earlier tests in the same worker is collected first; a test then checks
    that nothing it opened is still open (`open_fds() <= before`), which a leak fails even
    when the leaked fd reuses the number of one that a late collection closed meanwhile."""
    gc.collect()
    fds: set[tuple[str, str]] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass  # the listing's own directory fd, closed by now
    return frozenset(fds)


def memfds(name: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if name in os.readlink(f"/proc/self/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


@pytest.fixture
def wire() -> Iterator[Wire]:
    before = open_fds()
    with Wire() as w:
        yield w
    assert open_fds() <= before


def refused(
    w: Wire, lines: Lines, request: int, payload: bytes, line: str, fds: tuple[int, ...] = ()
) -> None:
    """REPLY_ACK: the u64 1, the connection stays, the error line word for word."""
    del lines.lines[:]
    assert w.ack(request, payload, fds) == 1
    assert not w.backend.closed
    assert lines.at(logging.ERROR) == [f"vhost-user: {line}; failure reply"]


# -- refusals, word for word -----------------------------------------------------------


def test_ring_refusals_name_request_field_and_detail(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    refused(
        w,
        lines,
        Request.SET_VRING_NUM,
        encode_state(0, 3),
        "VHOST_USER_SET_VRING_NUM: num: size 3 is not a power of 2 <= 32768",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_BASE,
        encode_state(0, 0x10000),
        "VHOST_USER_SET_VRING_BASE: num: base 0x10000 is not a 16-bit index",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ENABLE,
        encode_state(0, 2),
        "VHOST_USER_SET_VRING_ENABLE: num: enable must be 0 or 1, got 2",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ENABLE,
        encode_state(2, 1),
        "VHOST_USER_SET_VRING_ENABLE: index: vring 2 does not exist (2 queues)",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_CALL,
        encode_u64(0x300),
        "VHOST_USER_SET_VRING_CALL: u64: unknown bits 0x300",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 2, 0, 0, 0, 0)),
        "VHOST_USER_SET_VRING_ADDR: flags: unknown vring flags 0x2",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 1, 0, 0, 0, 0)),
        "VHOST_USER_SET_VRING_ADDR: flags: VHOST_VRING_F_LOG: logging not offered",
    )
    # a ring of num 256 with a used ring 2 bytes off its 4-byte alignment (2.7.2)
    w.ok(Request.SET_VRING_NUM, encode_state(0, 256))
    u = UVA + 0x10000
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 0, u, u + 0x2002, u + 0x1000, 0)),
        "VHOST_USER_SET_VRING_ADDR: used_addr: vring 0: used ring"
        f" {u + 0x2002:#x} is not 4-byte aligned",
    )
    # the call fd of ring 1 and a "no fd" call (bit 8) are accepted, index bits and all
    call = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        w.ok(Request.SET_VRING_CALL, encode_u64(1), (call,))
    finally:
        os.close(call)
    w.ok(Request.SET_VRING_CALL, encode_u64(0x101))
    assert w.backend.vrings[1].call_fd is None
    w.ok(Request.SET_VRING_ERR, encode_u64(0x100))


def test_started_ring_refusals(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    desc, avail, used = w.ring(0)
    assert w.backend.vrings[0].started
    refused(
        w,
        lines,
        Request.SET_VRING_NUM,
        encode_state(0, 128),
        "VHOST_USER_SET_VRING_NUM: num: vring 0 is started",
    )
    w.ok(Request.SET_VRING_NUM, encode_state(0, 256))  # the same num
    refused(
        w,
        lines,
        Request.SET_VRING_BASE,
        encode_state(0, 1),
        "VHOST_USER_SET_VRING_BASE: num: vring 0 is started",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 0, desc + 16, used, avail, 0)),
        "VHOST_USER_SET_VRING_ADDR: desc_addr: vring 0 is started",
    )
    w.ok(Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, desc, used, avail, 0)))
    # a new table while the ring runs: checked against the ring, the device told
    del w.device.events[:]
    w.mem_table()
    assert w.device.names() == ["memory_changed"]
    assert w.backend.vrings[0].started
    # the region that holds the running ring cannot go
    refused(
        w,
        lines,
        Request.REM_MEM_REG,
        encode_mem_reg(w.region),
        "VHOST_USER_REM_MEM_REG: region: gpa 0x0 holds running vring 0",
    )
    # SET_INFLIGHT_FD after the ring started
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 4096)
        refused(
            w,
            lines,
            Request.SET_INFLIGHT_FD,
            encode_inflight(Inflight(4096, 0, 2, 256)),
            "VHOST_USER_SET_INFLIGHT_FD: fd: vring 0 is started",
            (fd,),
        )
    finally:
        os.close(fd)


def test_requests_not_handled_are_refused_by_kind(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    refused(
        w,
        lines,
        Request.RESET_DEVICE,
        b"",
        "VHOST_USER_RESET_DEVICE: request: not supported (its feature is not offered)",
    )
    refused(w, lines, 999, b"", "request 999: request: unknown request")
    refused(
        w,
        lines,
        Request.NET_SET_MTU,
        encode_u64(1500),
        "VHOST_USER_NET_SET_MTU: request: MTU protocol feature not offered",
    )
    refused(
        w,
        lines,
        Request.SET_FEATURES,
        encode_u64(1 << 40),
        "VHOST_USER_SET_FEATURES: features: bits 0x10000000000 not offered",
    )
    refused(
        w,
        lines,
        Request.SET_PROTOCOL_FEATURES,
        encode_u64((1 << PF_REPLY_ACK) | (1 << PF_MTU)),
        "VHOST_USER_SET_PROTOCOL_FEATURES: protocol_features: bits 0x10 not offered",
    )
    refused(
        w,
        lines,
        Request.SET_STATUS,
        encode_u64(0x100),
        "VHOST_USER_SET_STATUS: status: 0x100 is not a u8",
    )
    assert w.backend.features_acked is True


def test_mtu_refusals_and_the_accepted_mtu(lines: Lines) -> None:
    with Wire(FakeDevice(protocol=1 << PF_MTU)) as w:
        w.reply_ack()
        refused(
            w,
            lines,
            Request.NET_SET_MTU,
            encode_u64(65536),
            "VHOST_USER_NET_SET_MTU: mtu: 65536 is not in 68..65535",
        )
        refused(
            w,
            lines,
            Request.NET_SET_MTU,
            encode_u64(9001),
            "VHOST_USER_NET_SET_MTU: mtu: mtu 9001 too large for this device",
        )
        w.ok(Request.NET_SET_MTU, encode_u64(1500))
        assert w.backend.mtu == 1500 and w.device.mtu == 1500


def test_memory_refusals(lines: Lines) -> None:
    before = open_fds()
    with Wire(max_guest_memory=MIB, max_mem_slots=1) as w:
        w.reply_ack()
        fd = os.dup(w.mem.fd)
        try:
            refused(
                w,
                lines,
                Request.SET_MEM_TABLE,
                encode_mem_table([w.region]),
                "VHOST_USER_SET_MEM_TABLE: regions: guest memory limit: 2 MiB (0x200000 bytes)"
                " would exceed 1 MiB per connection",
                (fd,),
            )
            # mmap_offset + size past the fd's end (a SIGBUS waiting to happen)
            short = MemRegionDesc(0, 0x100000, UVA, 0x180000)
            refused(
                w,
                lines,
                Request.SET_MEM_TABLE,
                encode_mem_table([short]),
                "VHOST_USER_SET_MEM_TABLE: regions[0].size: mmap_offset 0x180000+0x100000"
                " exceeds fd size 0x200000",
                (fd,),
            )
            refused(
                w,
                lines,
                Request.ADD_MEM_REG,
                encode_mem_reg(w.region),
                "VHOST_USER_ADD_MEM_REG: region.size: guest memory limit: 2 MiB (0x200000 bytes)"
                " would exceed 1 MiB per connection",
                (fd,),
            )
            low = MemRegionDesc(0, 0x80000, UVA, 0)
            w.ok(Request.ADD_MEM_REG, encode_mem_reg(low), (fd,))
            # the same region again: a no-op (QEMU 7.2 re-sends them)
            del lines.lines[:]
            w.ok(Request.ADD_MEM_REG, encode_mem_reg(low), (fd,))
            assert (
                lines.at(logging.DEBUG)[-1] == "ADD_MEM_REG: region gpa 0x0+0x80000 already mapped"
            )
            high = MemRegionDesc(0x100000, 0x80000, UVA + 0x100000, 0x100000)
            refused(
                w,
                lines,
                Request.ADD_MEM_REG,
                encode_mem_reg(high),
                "VHOST_USER_ADD_MEM_REG: region: memory regions limit: all 1 slots in use"
                " (GET_MAX_MEM_SLOTS)",
                (fd,),
            )
            refused(
                w,
                lines,
                Request.REM_MEM_REG,
                encode_mem_reg(high),
                "VHOST_USER_REM_MEM_REG: region: gpa 0x100000+0x80000 uva 0x7f0000100000"
                " is not mapped",
            )
        finally:
            os.close(fd)
    assert open_fds() <= before


def test_regions_are_added_checked_and_removed(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    fd = os.dup(w.mem.fd)
    try:
        low = MemRegionDesc(0, 0x80000, UVA, 0)
        high = MemRegionDesc(0x100000, 0x80000, UVA + 0x100000, 0x100000)
        w.ok(Request.ADD_MEM_REG, encode_mem_reg(low), (fd,))
        w.ok(Request.ADD_MEM_REG, encode_mem_reg(high), (fd,))
        assert w.device.events[-1] == (
            "memory_changed",
            [(0, 0x80000, UVA), (0x100000, 0x80000, UVA + 0x100000)],
        )
        # an overlapping one, and one past the fd's end, into the live table
        over = MemRegionDesc(0x40000, 0x80000, UVA + 0x200000, 0)
        refused(
            w,
            lines,
            Request.ADD_MEM_REG,
            encode_mem_reg(over),
            "VHOST_USER_ADD_MEM_REG: region: memory region gpa 0x40000+0x80000 overlaps"
            " gpa 0x0+0x80000",
            (fd,),
        )
        past = MemRegionDesc(0x400000, 0x100000, UVA + 0x400000, 0x180000)
        refused(
            w,
            lines,
            Request.ADD_MEM_REG,
            encode_mem_reg(past),
            "VHOST_USER_ADD_MEM_REG: region.size: mmap_offset 0x180000+0x100000 exceeds"
            " fd size 0x200000",
            (fd,),
        )
        w.ok(Request.REM_MEM_REG, encode_mem_reg(high))
        assert w.device.events[-1] == ("memory_changed", [(0, 0x80000, UVA)])
        assert [(r.gpa, r.size) for r in w.backend.mem.regions] == [(0, 0x80000)]
    finally:
        os.close(fd)


def test_a_table_with_overlapping_regions_is_refused_by_region(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    fd = os.dup(w.mem.fd)
    try:
        a = MemRegionDesc(0, 0x80000, UVA, 0)
        b = MemRegionDesc(0x40000, 0x80000, UVA + 0x100000, 0)
        refused(
            w,
            lines,
            Request.SET_MEM_TABLE,
            encode_mem_table([a, b]),
            "VHOST_USER_SET_MEM_TABLE: regions[1]: memory region gpa 0x40000+0x80000 overlaps"
            " gpa 0x0+0x80000",
            (fd, fd),
        )
    finally:
        os.close(fd)
    assert w.backend.mem is None


def test_replaced_memory_is_unmapped(wire: Wire) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    n = memfds("vdev-guest-ram")
    w.mem_table()
    w.mem_table()
    assert memfds("vdev-guest-ram") == n
    w.close()
    assert memfds("vdev-guest-ram") == 0  # ours closed too


# -- ring state ("Ring states") ------------------------------------------------------


def test_a_ring_starts_only_with_num_addresses_kick_and_memory(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    # addresses and kick, no num: not started
    u = UVA + 0x10000
    w.ok(Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, u, u + 0x2000, u + 0x1000, 0)))
    w.kick(0)
    assert not w.backend.vrings[0].started
    # num and kick, no addresses: not started
    w.ok(Request.SET_VRING_NUM, encode_state(1, 256))
    w.kick(1)
    assert not w.backend.vrings[1].started
    assert "queue_started" not in w.device.names()
    del lines.lines[:]
    w.ok(Request.SET_VRING_NUM, encode_state(0, 256))
    v = w.backend.vrings[0]
    assert v.started and v.queue is not None and v.notified
    assert w.device.started == {0: v}
    assert (
        f"vring 0 started: num 256 base 0 desc {u:#x} avail {u + 0x1000:#x} used {u + 0x2000:#x}"
        in lines.at(logging.INFO)
    )
    # a kick with the invalid-FD flag: polling is not supported, the ring is taken away
    w.ok(Request.SET_VRING_KICK, encode_u64(0x100))
    assert (
        lines.at(logging.WARNING)[-1] == "vring 0: kick without fd (polling mode) is not supported"
    )
    assert w.device.started == {} and not v.notified
    w.kick(0)
    assert w.device.started == {0: v}
    del lines.lines[:]
    state = w.get(Request.GET_VRING_BASE, encode_state(0, 0))
    assert state.payload == encode_state(0, 0)
    assert lines.at(logging.INFO) == ["vring 0 stopped at avail idx 0"]
    assert v.kick_fd is None and v.call_fd is None and not v.started


def test_kicks_are_watched_while_the_ring_runs() -> None:
    watcher = Watcher()
    before = open_fds()
    with Wire(watcher=watcher) as w:
        w.reply_ack()
        w.mem_table()
        w.ring(0)
        v = w.backend.vrings[0]
        assert list(watcher.watched) == [v.kick_fd]
        os.eventfd_write(v.kick_fd, 1)
        watcher.watched[v.kick_fd]()
        assert w.device.kicks == [0]
        os.eventfd_write(v.kick_fd, 1)
        assert os.eventfd_read(v.kick_fd) == 1  # consumed by the backend's read before
        kick = v.kick_fd
        w.get(Request.GET_VRING_BASE, encode_state(0, 0))
        assert watcher.unwatched == [kick] and watcher.watched == {}
        assert ("queue_stopped", 0, True) in w.device.events
    assert open_fds() <= before


def test_a_kick_fd_that_cannot_be_read_is_dropped(lines: Lines) -> None:
    watcher = Watcher()
    with Wire(watcher=watcher) as w:
        r, wr = os.pipe()
        try:
            w.reply_ack()
            w.mem_table()
            w.ring(0, kick=False)
            # a pipe's write end as the "eventfd": reading it fails with EBADF
            w.ok(Request.SET_VRING_KICK, encode_u64(0), (wr,))
            fd = w.backend.vrings[0].kick_fd
            watcher.watched[fd]()
            assert lines.at(logging.WARNING)[-1] == (
                f"vring 0: kick fd {fd}: [Errno 9] Bad file descriptor; no longer watched"
            )
            assert fd in watcher.unwatched and w.device.kicks == []
        finally:
            os.close(r)
            os.close(wr)


def test_enable_and_disable_tell_the_device(wire: Wire) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    w.ring(0)
    del w.device.events[:]
    w.ok(Request.SET_VRING_ENABLE, encode_state(0, 1))
    assert w.device.names() == ["queue_started"] and w.backend.vrings[0].running
    w.ok(Request.SET_VRING_ENABLE, encode_state(0, 0))
    assert w.device.names() == ["queue_started", "queue_disabling"]
    assert not w.backend.vrings[0].enabled


def test_without_protocol_features_rings_start_enabled(wire: Wire) -> None:
    w = wire
    assert w.send(Request.SET_FEATURES, encode_u64(F_VERSION_1))
    assert [v.enabled for v in w.backend.vrings] == [True, True]
    assert w.device.events[-1] == ("features_set", F_VERSION_1)
    assert w.backend.features_acked is True


def test_internal_error_disconnects_and_closes_the_fds(lines: Lines) -> None:
    class Broken(FakeDevice):
        def queue_direction(self, index: int) -> Any:
            raise RuntimeError("device bug")

    before = open_fds()
    with Wire(Broken()) as w:
        w.reply_ack()
        w.mem_table()
        w.ring(0, kick=False)
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            assert w.send(Request.SET_VRING_KICK, encode_u64(0), (fd,), ack=True) is False
        finally:
            os.close(fd)
        assert w.backend.closed
        assert (
            lines.at(logging.ERROR)[-1]
            == "vhost-user: internal error on VHOST_USER_SET_VRING_KICK; disconnecting"
        )
    assert open_fds() <= before


def test_a_broken_frame_disconnects_with_its_reason(wire: Wire, lines: Lines) -> None:
    w = wire
    w.fe.sock.sendall(struct.pack("=III", Request.GET_FEATURES, 0x2, 0))  # version 2
    assert w.backend.handle_readable() is False
    assert lines.at(logging.ERROR) == [
        "vhost-user: VHOST_USER_GET_FEATURES: flags: version 2, need 1; disconnecting"
    ]


def test_a_reply_to_a_closed_peer_closes(wire: Wire, lines: Lines) -> None:
    w = wire
    w.fe.send_message(Request.GET_FEATURES, b"")
    w.fe.sock.shutdown(socket.SHUT_RD)
    w.fe.close()
    assert w.backend.handle_readable() is False
    info = [t for t in lines.at(logging.INFO) if t.startswith("vhost-user: reply to")]
    # the send's own error, the peer's end gone (EPIPE)
    assert info == ["vhost-user: reply to VHOST_USER_GET_FEATURES failed: [Errno 32] Broken pipe"]


def test_dispatch_debug_line_names_request_payload_and_fds(wire: Wire, lines: Lines) -> None:
    w = wire
    w.get(Request.GET_FEATURES)
    assert lines.at(logging.DEBUG)[0] == "vhost-user <- VHOST_USER_GET_FEATURES Empty() fds=[]"


def test_close_releases_every_fd_and_the_memory() -> None:
    before = open_fds()
    w = Wire()
    w.reply_ack()
    ours = memfds("vdev-guest-ram")  # the front-end's fd and its mapping's
    w.mem_table()
    w.ring(0)
    call = os.eventfd(0, os.EFD_CLOEXEC)
    w.ok(Request.SET_VRING_CALL, encode_u64(0), (call,))
    w.ok(Request.SET_VRING_ERR, encode_u64(0), (call,))
    w.ok(Request.SET_VRING_ERR, encode_u64(1), (call,))
    w.ok(Request.SET_VRING_ERR, encode_u64(1), (call,))  # replaces, closes the old
    os.close(call)
    assert memfds("vdev-guest-ram") > ours
    w.backend.close()
    assert w.backend.mem is None
    assert memfds("vdev-guest-ram") == ours
    w.fe.close()
    w.mem.close()
    assert open_fds() <= before


# -- device-level requests --------------------------------------------------------------


def test_protocol_feature_offer_is_exact() -> None:
    base = (1 << PF_MQ) | (1 << PF_RARP) | (1 << PF_REPLY_ACK) | (1 << PF_INFLIGHT_SHMFD)
    base |= (1 << PF_CONFIGURE_MEM_SLOTS) | (1 << PF_STATUS)
    h = Lines()
    logging.getLogger("vdev.vhost").addHandler(h)
    try:
        for extra, offer in (
            (0, base),
            (1 << PF_MTU, base | (1 << PF_MTU)),
            ((1 << PF_LOG_SHMFD) | (1 << PF_CONFIG), base | (1 << PF_CONFIG)),
        ):
            with Wire(FakeDevice(protocol=extra)) as w:
                assert w.get(Request.GET_PROTOCOL_FEATURES).payload == encode_u64(offer)
                assert w.backend.protocol_features == 0
        assert h.at(logging.WARNING) == [
            "device asked for unsupported protocol features 0x2; not offered"
        ]
    finally:
        logging.getLogger("vdev.vhost").removeHandler(h)


def test_queue_count_is_1_to_256() -> None:
    with Wire(FakeDevice(queues=256)) as w:
        assert w.get(Request.GET_QUEUE_NUM).payload == encode_u64(256)
    with pytest.raises(ValueError, match=r"^device max_queues 257 is not in 1\.\.256$"):
        Wire(FakeDevice(queues=257))
    with Wire(FakeDevice(queues=1)) as w:  # one queue is a device too (the bound included)
        assert w.get(Request.GET_QUEUE_NUM).payload == encode_u64(1)
    with pytest.raises(ValueError, match=r"^device max_queues 0 is not in 1\.\.256$"):
        Wire(FakeDevice(queues=0))


def test_status_kept_by_the_device() -> None:
    class Keeper(FakeDevice):
        def status_set(self, value: int) -> int:
            return 0x0F if value == 0 else value

    with Wire(Keeper()) as w:
        w.reply_ack()
        w.ok(Request.SET_STATUS, encode_u64(0))
        assert w.get(Request.GET_STATUS).payload == encode_u64(0x0F)
        w.ok(Request.SET_STATUS, encode_u64(0xFF))
        assert w.get(Request.GET_STATUS).payload == encode_u64(0xFF)


def test_rarp_is_logged_with_its_mac(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.ok(Request.SEND_RARP, encode_u64(0x0807060504030201))
    assert lines.at(logging.INFO)[-1] == "SEND_RARP for 01:02:03:04:05:06 accepted (ignored)"


def test_get_config_answers_and_errors(lines: Lines) -> None:
    class Cfg(FakeDevice):
        def get_config(self, offset: int, size: int) -> bytes:
            if offset == 100:
                raise ValueError("boom")
            if offset == 200:
                return b"abc"
            return bytes(range(offset, offset + size))

    with Wire(Cfg(protocol=1 << PF_CONFIG)) as w:
        req = encode_config(4, 0, bytes(8))
        assert w.get(Request.GET_CONFIG, req).payload == b""
        assert lines.at(logging.ERROR) == [
            "vhost-user: GET_CONFIG without the CONFIG protocol feature"
        ]
        w.reply_ack(protocol=1 << PF_CONFIG)
        got = w.get(Request.GET_CONFIG, encode_config(4, 1, bytes(8))).payload
        assert got == struct.pack("=III", 4, 8, 1) + bytes(range(4, 12))
        assert w.get(Request.GET_CONFIG, encode_config(100, 0, bytes(8))).payload == b""
        assert lines.at(logging.ERROR)[-1] == "vhost-user: GET_CONFIG offset 100 size 8: boom"
        assert w.get(Request.GET_CONFIG, encode_config(200, 0, bytes(8))).payload == b""
        assert lines.at(logging.ERROR)[-1] == "vhost-user: device config is 3 bytes, asked 8"


# -- inflight ("Inflight I/O tracking") ----------------------------------------------------


def _inflight(w: Wire, queues: int, size: int) -> int:
    """GET_INFLIGHT_FD: the reply's fd, checked against the reply's payload."""
    assert w.send(Request.GET_INFLIGHT_FD, encode_inflight(Inflight(0, 0, queues, size)))
    msg = w.reply()
    assert msg.request == Request.GET_INFLIGHT_FD and len(msg.fds) == 1
    mmap_size, mmap_offset, nq, qs = struct.unpack("=QQHH4x", msg.payload)
    assert (mmap_offset, nq, qs) == (0, queues, size)
    assert mmap_size == os.fstat(msg.fds[0]).st_size > 0
    return msg.fds[0]


def test_inflight_buffer_is_attached_to_the_ring(lines: Lines) -> None:
    before = open_fds()
    with Wire() as w:
        w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
        fd = _inflight(w, 2, 128)
        try:
            size = os.fstat(fd).st_size
            refused(
                w,
                lines,
                Request.SET_INFLIGHT_FD,
                encode_inflight(Inflight(size, 0, 3, 128)),
                "VHOST_USER_SET_INFLIGHT_FD: num_queues: num_queues 3 is not in 1..2"
                " (device queues)",
                (fd,),
            )
            w.ok(Request.SET_INFLIGHT_FD, encode_inflight(Inflight(size, 0, 2, 128)), (fd,))
            assert w.backend.inflight is not None
            w.mem_table()
            # ring 0 of another size than the buffer's: refused when it would start
            w.ring(0, num=256, kick=False)
            k = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                refused(
                    w,
                    lines,
                    Request.SET_VRING_KICK,
                    encode_u64(0),
                    "VHOST_USER_SET_VRING_KICK: inflight: vring 0: vring 0 has num 256,"
                    " the buffer queue_size 128",
                    (k,),
                )
            finally:
                os.close(k)
            assert w.backend.vrings[0].queue is None and not w.backend.vrings[0].started
            w.ring(1, num=128)
            q = w.backend.vrings[1].queue
            assert q is not None and getattr(q, "inflight", None) is not None
        finally:
            os.close(fd)
    assert open_fds() <= before


def test_an_inflight_shape_the_device_cannot_have_disconnects(wire: Wire, lines: Lines) -> None:
    # GET_INFLIGHT_FD has a reply of its own: no REPLY_ACK, a refusal closes ("REPLY_ACK")
    w = wire
    w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
    assert not w.send(Request.GET_INFLIGHT_FD, encode_inflight(Inflight(0, 0, 3, 128)), ack=True)
    assert lines.at(logging.ERROR) == [
        "vhost-user: VHOST_USER_GET_INFLIGHT_FD: num_queues: num_queues 3 is not in 1..2"
        " (device queues); disconnecting"
    ]
    with pytest.raises(PeerClosed):  # no reply: the connection is gone
        w.fe.recv_message(expect_reply=True, block=False)


def test_memory_that_starts_a_ring_names_its_own_request(lines: Lines) -> None:
    with Wire() as w:
        os.close(_unstartable_ring(w, lines))
        # the last of NUM, ADDR, KICK and memory to arrive is the request named: ADDR here
        u = UVA + 0x40000
        w.ok(Request.SET_VRING_NUM, encode_state(1, 256))
        w.kick(1)
        refused(
            w,
            lines,
            Request.SET_VRING_ADDR,
            encode_addr(VringAddr(1, 0, u, u + 0x2000, u + 0x1000, 0)),
            "VHOST_USER_SET_VRING_ADDR: inflight: vring 1: vring 1 has num 256, the buffer"
            " queue_size 128",
        )
        # everything there, the start retried by NUM, then by KICK: each names itself
        refused(
            w,
            lines,
            Request.SET_VRING_NUM,
            encode_state(1, 256),
            "VHOST_USER_SET_VRING_NUM: inflight: vring 1: vring 1 has num 256, the buffer"
            " queue_size 128",
        )
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            refused(
                w,
                lines,
                Request.SET_VRING_KICK,
                encode_u64(1),
                "VHOST_USER_SET_VRING_KICK: inflight: vring 1: vring 1 has num 256, the buffer"
                " queue_size 128",
                (kick,),
            )
        finally:
            os.close(kick)
        assert not w.backend.vrings[1].started


class QueueProxy:
    """A real queue seen through a wrapper (reads and writes go to it), so that a test can
    change one of its methods."""

    def __init__(self, q: Any) -> None:
        object.__setattr__(self, "_q", q)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._q, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._q, name, value)


def test_a_queue_that_fails_to_close_is_logged_and_the_ring_stops(lines: Lines) -> None:
    from vdev.virtio.queue import queue_format

    class Stubborn(QueueProxy):
        def close(self) -> None:
            self._q.close()
            raise RuntimeError("queue bug")

    def factory(*a: Any, **kw: Any) -> Any:
        return Stubborn(queue_format(0)(*a, **kw))

    with Wire(queue_factory=factory) as w:
        w.reply_ack()
        w.mem_table()
        w.ring(0)
        assert w.get(Request.GET_VRING_BASE, encode_state(0, 0)).payload == encode_state(0, 0)
        assert "vhost-user: closing queue 0 failed" in lines.at(logging.ERROR)
        assert not w.backend.vrings[0].started and w.backend.vrings[0].queue is None


def test_a_queue_without_inflight_tracking_is_named(lines: Lines) -> None:
    from vdev.virtio.queue import queue_format

    class NoInflight(QueueProxy):
        def __getattr__(self, name: str) -> Any:
            if name == "attach_inflight":
                raise AttributeError(name)
            return super().__getattr__(name)

    def factory(*a: Any, **kw: Any) -> Any:
        return NoInflight(queue_format(0)(*a, **kw))

    with Wire(queue_factory=factory) as w:
        w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
        fd = _inflight(w, 2, 128)
        try:
            w.ok(
                Request.SET_INFLIGHT_FD,
                encode_inflight(Inflight(os.fstat(fd).st_size, 0, 2, 128)),
                (fd,),
            )
        finally:
            os.close(fd)
        w.mem_table()
        w.ring(0, num=128)
        assert w.backend.vrings[0].started
        assert "vring 0: this queue does not track inflight I/O" in lines.at(logging.WARNING)


def test_a_packed_ring_gets_a_packed_inflight_region() -> None:
    from vdev.virtio.inflight import PackedInflight

    class Packed(FakeDevice):
        FEATURES = FakeDevice.FEATURES | F_RING_PACKED

    with Wire(Packed()) as w:
        w.reply_ack(features=F_VERSION_1 | F_RING_PACKED, protocol=1 << PF_INFLIGHT_SHMFD)
        fd = _inflight(w, 2, 128)
        try:
            size = os.fstat(fd).st_size
            w.ok(Request.SET_INFLIGHT_FD, encode_inflight(Inflight(size, 0, 2, 128)), (fd,))
        finally:
            os.close(fd)
        w.mem_table()
        # 2.8: descriptor ring 16 * num bytes (16-aligned), two 4-byte event areas
        desc, drv, dev = w.mem.alloc(16 * 128, 16), w.mem.alloc(4, 4), w.mem.alloc(4, 4)
        w.ok(Request.SET_VRING_NUM, encode_state(0, 128))
        w.ok(Request.SET_VRING_BASE, encode_state(0, 0x8000))  # index 0, wrap counter 1
        addr = VringAddr(0, 0, w.mem.uva_of(desc), w.mem.uva_of(dev), w.mem.uva_of(drv), 0)
        w.ok(Request.SET_VRING_ADDR, encode_addr(addr))
        w.kick(0)
        q = w.backend.vrings[0].queue
        assert q is not None and isinstance(q.inflight, PackedInflight)


def test_an_inflight_fd_that_cannot_be_mapped_is_refused(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
    e = os.eventfd(0, os.EFD_CLOEXEC)  # not mappable: mmap fails with ENODEV
    try:
        refused(
            w,
            lines,
            Request.SET_INFLIGHT_FD,
            encode_inflight(Inflight(0x2080, 0, 2, 128)),
            "VHOST_USER_SET_INFLIGHT_FD: fd: cannot map: [Errno 19] No such device",
            (e,),
        )
    finally:
        os.close(e)
    assert w.backend.inflight is None


def test_an_inflight_buffer_the_host_cannot_allocate_disconnects(wire: Wire, lines: Lines) -> None:
    import resource
    import signal

    w = wire
    w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
    w.fe.send_message(
        Request.GET_INFLIGHT_FD, encode_inflight(Inflight(0, 0, 2, 128)), flags=VERSION
    )
    # The host refuses the buffer's size (RLIMIT_FSIZE: ftruncate fails with EFBIG).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        alive = w.backend.handle_readable()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert alive is False
    assert lines.at(logging.ERROR) == [
        "vhost-user: VHOST_USER_GET_INFLIGHT_FD: mmap_size: cannot allocate: [Errno 27] File too"
        " large; disconnecting"
    ]


def test_a_packed_base_past_a_later_num_is_refused_when_the_ring_starts(lines: Lines) -> None:
    class Packed(FakeDevice):
        FEATURES = FakeDevice.FEATURES | F_RING_PACKED

    with Wire(Packed()) as w:
        w.reply_ack(features=F_VERSION_1 | F_RING_PACKED)
        w.mem_table()
        w.ok(Request.SET_VRING_BASE, encode_state(0, 0x8000 | 200))  # before NUM: unchecked
        desc, drv, dev = w.mem.alloc(16 * 128, 16), w.mem.alloc(4, 4), w.mem.alloc(4, 4)
        w.ok(Request.SET_VRING_NUM, encode_state(0, 128))
        addr = VringAddr(0, 0, w.mem.uva_of(desc), w.mem.uva_of(dev), w.mem.uva_of(drv), 0)
        w.ok(Request.SET_VRING_ADDR, encode_addr(addr))
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            refused(
                w,
                lines,
                Request.SET_VRING_KICK,
                encode_u64(0),
                "VHOST_USER_SET_VRING_KICK: ring: vring 0: virtqueue 0: last_avail_idx 200 >= 128",
                (fd,),
            )
        finally:
            os.close(fd)
        assert not w.backend.vrings[0].started


def test_replaced_memory_is_unmapped_even_if_the_device_holds_it() -> None:
    class Holder(FakeDevice):
        def __init__(self) -> None:
            super().__init__()
            self.held: list[Any] = []

        def memory_changed(self, mem: Any) -> None:
            self.held.append(mem)  # a device may keep the object it was given

    with Wire(Holder()) as w:
        w.reply_ack()
        ours = memfds("vdev-guest-ram")
        w.mem_table()
        one = memfds("vdev-guest-ram") - ours
        w.mem_table()
        w.mem_table()
        assert memfds("vdev-guest-ram") - ours == one  # the old tables' mappings are gone


def test_get_features_takes_the_devices_latest_offer() -> None:
    class Changing(FakeDevice):
        offer = F_VERSION_1

        def features_offer(self) -> int:
            return self.offer

    with Wire(Changing()) as w:
        assert w.get(Request.GET_FEATURES).payload == encode_u64(F_VERSION_1 | F_PROTOCOL_FEATURES)
        w.device.offer = F_VERSION_1 | (1 << 5)
        assert w.get(Request.GET_FEATURES).payload == encode_u64(
            F_VERSION_1 | (1 << 5) | F_PROTOCOL_FEATURES
        )


def test_a_device_callback_that_raises_is_logged_by_name(lines: Lines) -> None:
    class Raising(FakeDevice):
        def disconnected(self) -> None:
            raise RuntimeError("device bug")

    w = Wire(Raising())
    w.close()
    assert lines.at(logging.ERROR) == ["vhost-user: device disconnected failed"]


# -- guest memory that goes away ("Memory regions description"; issue 12 item 4) ------------


def test_memory_truncated_under_a_running_ring_closes_with_the_fault(lines: Lines) -> None:
    """The front-end truncates its memfd after SET_MEM_TABLE; the device reads the avail ring
    on a kick (SIGBUS, recovered by memguard onto zero pages); the next message is not read:
    the connection closes with the fault's line and every fd goes."""
    from vdev.errors import GuestMemoryFault
    from vdev.virtio import memguard

    if not memguard.available():
        pytest.skip("compiled module unavailable (no C compiler?)")

    class Reader(FakeDevice):
        def queue_kicked(self, vring: Any) -> None:
            super().queue_kicked(vring)
            self.pending = vring.queue.avail_count()  # reads avail->idx from guest memory

    watcher = Watcher()
    before = open_fds()
    with Wire(Reader(), watcher=watcher) as w:
        w.reply_ack()
        w.mem_table()
        _desc, avail, _used = w.ring(0)
        v = w.backend.vrings[0]
        assert v.started and list(watcher.watched) == [v.kick_fd]
        # From here on this process never touches its own (unguarded) mapping of the fd.
        os.ftruncate(w.mem.fd, 0)
        os.eventfd_write(v.kick_fd, 1)
        watcher.watched[v.kick_fd]()
        assert w.device.kicks == [0] and w.device.pending == 0  # zero pages after the fault
        assert not w.backend.closed  # recorded at a defined point: the next message
        del lines.lines[:]
        w.fe.send_message(Request.GET_FEATURES, b"", flags=VERSION)
        assert w.backend.handle_readable() is False
        assert w.backend.closed
        err = w.backend.fault
        assert isinstance(err, GuestMemoryFault)
        # avail->idx: the u16 at offset 2 of the avail ring (2.7.6); region gpa 0, offset 0
        gpa = avail - UVA
        offset = gpa + 2
        assert (err.gpa, err.size, err.offset, err.faults) == (0, 2 * MIB, offset, 1)
        assert lines.at(logging.ERROR) == [
            f"vhost-user: guest memory region gpa 0x0+0x200000 faulted at offset {offset:#x}"
            " (1 SIGBUS): the frontend truncated or shrank the region's fd after mapping it;"
            " disconnecting"
        ]
        assert ("queue_stopped", 0, True) in w.device.events
        assert w.device.names()[-1] == "disconnected"
        with pytest.raises(PeerClosed):  # GET_FEATURES was never answered: the peer hung up
            w.fe.recv_message(expect_reply=True, block=False)
        assert w.backend.memory_fault() is err  # stays recorded; the closed fault fd unread
        assert w.backend.handle_readable() is False
    assert open_fds() <= before


# -- the rest of the module (second mutation session) ---------------------------------------


def test_a_ring_area_at_a_regions_first_byte_is_in_that_region(wire: Wire, lines: Lines) -> None:
    """A region holds a ring when an area starts at uva <= addr < uva + size: its first byte
    is in it, the byte after its end is not (the next region's first byte)."""
    w = wire
    w.reply_ack()
    fd = os.dup(w.mem.fd)
    try:
        low = MemRegionDesc(0, 0x80000, UVA, 0)
        high = MemRegionDesc(0x80000, 0x80000, UVA + 0x80000, 0x80000)
        w.ok(Request.ADD_MEM_REG, encode_mem_reg(low), (fd,))
        w.ok(Request.ADD_MEM_REG, encode_mem_reg(high), (fd,))
        # every area in high, the descriptor table at high's first byte (= low's end)
        h = UVA + 0x80000
        w.ok(Request.SET_VRING_NUM, encode_state(0, 256))
        w.ok(Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, h, h + 0x2000, h + 0x1000, 0)))
        w.kick(0)
        assert w.backend.vrings[0].started
        w.ok(Request.REM_MEM_REG, encode_mem_reg(low))  # low holds nothing of the ring
        assert [(r.gpa, r.size) for r in w.backend.mem.regions] == [(0x80000, 0x80000)]
        w.ok(Request.ADD_MEM_REG, encode_mem_reg(low), (fd,))
        # again, the avail and used rings now in low: only the descriptor table is in high
        w.get(Request.GET_VRING_BASE, encode_state(0, 0))
        w.ok(
            Request.SET_VRING_ADDR,
            encode_addr(VringAddr(0, 0, h, UVA + 0x2000, UVA + 0x1000, 0)),
        )
        w.kick(0)
        assert w.backend.vrings[0].started
        refused(
            w,
            lines,
            Request.REM_MEM_REG,
            encode_mem_reg(high),
            "VHOST_USER_REM_MEM_REG: region: gpa 0x80000 holds running vring 0",
        )
    finally:
        os.close(fd)


def test_reset_owner_disables_every_ring_and_keeps_the_connection(wire: Wire) -> None:
    # RESET_OWNER: "back-ends either ignore this message, or use it to disable all rings"
    w = wire
    w.reply_ack()
    w.mem_table()
    w.ring(0)
    w.ok(Request.SET_VRING_ENABLE, encode_state(0, 1))
    w.ok(Request.SET_VRING_ENABLE, encode_state(1, 1))  # enabled, never started
    del w.device.events[:]
    w.ok(Request.RESET_OWNER)
    assert [v.enabled for v in w.backend.vrings] == [False, False]
    assert all(v.enabled is False for v in w.backend.vrings)  # Vring.enabled is a bool
    assert w.device.events == [("queue_disabling", 0)]  # the started one only
    assert w.backend.vrings[0].started and not w.backend.closed
    # the connection goes on: ring 0 is enabled again and announced again
    w.ok(Request.SET_VRING_ENABLE, encode_state(0, 1))
    assert w.device.names()[-1] == "queue_started" and w.backend.vrings[0].running


def _unstartable_ring(w: Wire, lines: Lines, ring1_num: int | None = None) -> int:
    """Ring 0 of num 256 against an inflight buffer of queue_size 128: everything it needs
    is there, memory last (ADD_MEM_REG, refused); returns the region's fd (the caller's).
    With ``ring1_num``, ring 1 is set up too (NUM, ADDR, KICK) before the memory."""
    w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
    fd = _inflight(w, 2, 128)
    try:
        w.ok(
            Request.SET_INFLIGHT_FD,
            encode_inflight(Inflight(os.fstat(fd).st_size, 0, 2, 128)),
            (fd,),
        )
    finally:
        os.close(fd)
    w.ring(0, num=256)
    if ring1_num is not None:
        w.ring(1, num=ring1_num)
    m = os.dup(w.mem.fd)
    refused(
        w,
        lines,
        Request.ADD_MEM_REG,
        encode_mem_reg(w.region),
        "VHOST_USER_ADD_MEM_REG: inflight: vring 0: vring 0 has num 256, the buffer queue_size 128",
        (m,),
    )
    return m


def test_every_request_that_retries_a_ring_start_names_itself(lines: Lines) -> None:
    """The region stays mapped after that refusal; the same ADD_MEM_REG again (the no-op QEMU
    7.2 sends) and RESET_OWNER try the start again, and are refused by their own name."""
    with Wire() as w:
        m = _unstartable_ring(w, lines)
        try:
            assert [(r.gpa, r.size) for r in w.backend.mem.regions] == [(0, 2 * MIB)]
            refused(
                w,
                lines,
                Request.ADD_MEM_REG,
                encode_mem_reg(w.region),
                "VHOST_USER_ADD_MEM_REG: inflight: vring 0: vring 0 has num 256, the buffer"
                " queue_size 128",
                (m,),
            )
        finally:
            os.close(m)
        refused(
            w,
            lines,
            Request.RESET_OWNER,
            b"",
            "VHOST_USER_RESET_OWNER: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        refused(
            w,
            lines,
            Request.SET_VRING_ENABLE,
            encode_state(0, 1),
            "VHOST_USER_SET_VRING_ENABLE: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        # SET_FEATURES with bit 30 enables nothing ("Ring states") but retries the start
        refused(
            w,
            lines,
            Request.SET_FEATURES,
            encode_u64(F_PROTOCOL_FEATURES | F_VERSION_1),
            "VHOST_USER_SET_FEATURES: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        assert not w.backend.vrings[0].started


def test_reset_owner_disables_the_rings_after_one_that_cannot_start(lines: Lines) -> None:
    """RESET_OWNER disables every ring ("use it to disable all rings"), ring 1 too although
    ring 0's start attempt on the way fails; the failure is still the reply."""
    with Wire() as w:
        m = _unstartable_ring(w, lines)
        os.close(m)
        w.ok(Request.SET_VRING_ENABLE, encode_state(1, 1))
        assert [v.enabled for v in w.backend.vrings] == [False, True]
        refused(
            w,
            lines,
            Request.RESET_OWNER,
            b"",
            "VHOST_USER_RESET_OWNER: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        assert [v.enabled for v in w.backend.vrings] == [False, False]


def test_a_memory_table_starts_the_rings_after_one_that_cannot_start(lines: Lines) -> None:
    """Ring 0 cannot start (num 256 against the inflight buffer's 128), ring 1 can: the
    region that makes both startable starts ring 1 and the device hears of it; the reply
    names ring 0's refusal."""
    with Wire() as w:
        os.close(_unstartable_ring(w, lines, ring1_num=128))
        assert [v.started for v in w.backend.vrings] == [False, True]
        assert [e for e in w.device.events if e[0] == "queue_started"] == [("queue_started", 1)]


def test_the_first_region_past_its_fd_end_is_refused_and_nothing_stays_mapped(
    wire: Wire, lines: Lines
) -> None:
    w = wire
    w.reply_ack()
    ours = memfds("vdev-guest-ram")
    fd = os.dup(w.mem.fd)
    try:
        past = MemRegionDesc(0, 0x100000, UVA, 0x180000)
        refused(
            w,
            lines,
            Request.ADD_MEM_REG,
            encode_mem_reg(past),
            "VHOST_USER_ADD_MEM_REG: region.size: mmap_offset 0x180000+0x100000 exceeds"
            " fd size 0x200000",
            (fd,),
        )
    finally:
        os.close(fd)
    assert w.backend.mem is None and memfds("vdev-guest-ram") == ours


def test_a_new_backend_request_fd_closes_the_old_one(lines: Lines) -> None:
    before = open_fds()
    with Wire(FakeDevice(protocol=1 << PF_BACKEND_REQ)) as w:
        w.reply_ack(protocol=1 << PF_BACKEND_REQ)
        first, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        second, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            w.ok(Request.SET_SLAVE_REQ_FD, b"", (theirs.fileno(),))
            theirs.close()
            first.settimeout(0)
            with pytest.raises(BlockingIOError):  # the backend holds the other end
                first.recv(1)
            w.ok(Request.SET_SLAVE_REQ_FD, b"", (theirs2.fileno(),))
            theirs2.close()
            assert first.recv(1) == b""  # the old channel closed: EOF
            second.settimeout(0)
            with pytest.raises(BlockingIOError):
                second.recv(1)
        finally:
            first.close()
            second.close()
        assert not w.backend.closed
    assert w.backend.backend_req_fd is None  # closed with the connection (int | None)
    assert open_fds() <= before


def test_a_stale_kick_callback_does_not_reach_the_device() -> None:
    """A kick event the loop took for a watch that is gone (SET_VRING_KICK replaced the fd)
    is not the ring's kick: the device does not hear it, even if the old number is an open
    eventfd again by then."""
    watcher = Watcher()
    with Wire(watcher=watcher) as w:
        w.reply_ack()
        w.mem_table()
        w.ring(0)
        v = w.backend.vrings[0]
        old = v.kick_fd
        assert old is not None
        stale = watcher.watched[old]
        w.kick(0)  # a new kick fd: the old one unwatched and closed
        assert v.kick_fd != old and old in watcher.unwatched
        assert list(watcher.watched) == [v.kick_fd]
        with pytest.raises(OSError):
            os.fstat(old)
        e = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        os.dup2(e, old)  # the old number reused by another eventfd, with a count
        os.close(e)
        try:
            stale()
            assert w.device.kicks == []
        finally:
            os.close(old)
        os.eventfd_write(v.kick_fd, 1)
        watcher.watched[v.kick_fd]()
        assert w.device.kicks == [0]


def test_get_inflight_fd_logs_the_buffer_it_allocated(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
    del lines.lines[:]
    fd = _inflight(w, 2, 128)
    size = os.fstat(fd).st_size  # the reply's mmap_size (checked by _inflight)
    os.close(fd)
    assert lines.at(logging.INFO) == [f"inflight buffer: 2 queues x 128 entries, {size} bytes"]


def test_every_ring_request_refuses_a_ring_that_does_not_exist(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    gone = "index: vring 2 does not exist (2 queues)"
    for request, payload in (
        (Request.SET_VRING_NUM, encode_state(2, 256)),
        (Request.SET_VRING_BASE, encode_state(2, 0)),
        (Request.SET_VRING_ADDR, encode_addr(VringAddr(2, 0, UVA, UVA + 0x2000, UVA + 0x1000, 0))),
        (Request.SET_VRING_ENABLE, encode_state(2, 1)),
    ):
        refused(w, lines, request, payload, f"{request_name(request)}: {gone}")
    for request in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        e = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            refused(w, lines, request, encode_u64(2), f"{request_name(request)}: {gone}", (e,))
        finally:
            os.close(e)
    assert all(v.num == 0 and v.kick_fd is None for v in w.backend.vrings)


def test_get_vring_base_of_a_ring_that_does_not_exist_disconnects(wire: Wire, lines: Lines) -> None:
    # GET_VRING_BASE has a reply of its own: a refusal closes ("REPLY_ACK")
    w = wire
    w.reply_ack()
    assert not w.send(Request.GET_VRING_BASE, encode_state(2, 0), ack=True)
    assert lines.at(logging.ERROR) == [
        "vhost-user: VHOST_USER_GET_VRING_BASE: index: vring 2 does not exist (2 queues);"
        " disconnecting"
    ]
    with pytest.raises(PeerClosed):
        w.fe.recv_message(expect_reply=True, block=False)


def test_a_ring_area_that_does_not_fit_in_a_region_is_refused_by_name(
    wire: Wire, lines: Lines
) -> None:
    # 2.7: the used ring of num 256 is 6 + 8 * 256 = 0x806 bytes; the region ends at 2 MiB
    w = wire
    w.reply_ack()
    w.mem_table()
    w.ok(Request.SET_VRING_NUM, encode_state(0, 256))
    u = UVA + 0x10000
    used = UVA + 2 * MIB - 0x800
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 0, u, used, u + 0x1000, 0)),
        f"VHOST_USER_SET_VRING_ADDR: used_addr: vring 0 (num 256): used ring does not fit:"
        f" uva {used:#x}+0x806 runs past the end of its region ({UVA:#x}+0x200000)",
    )
    refused(
        w,
        lines,
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 0, UVA - 0x10000, u + 0x2000, u + 0x1000, 0)),
        f"VHOST_USER_SET_VRING_ADDR: desc_addr: vring 0 (num 256): descriptor table does not"
        f" fit: uva {UVA - 0x10000:#x}+0x1000 is outside guest memory",
    )
    # addresses that fit num 256; a larger num would not: SET_VRING_NUM is refused
    w.ok(
        Request.SET_VRING_ADDR,
        encode_addr(VringAddr(0, 0, u, UVA + 2 * MIB - 0x1000, u + 0x1000, 0)),
    )
    refused(
        w,
        lines,
        Request.SET_VRING_NUM,
        encode_state(0, 512),
        f"VHOST_USER_SET_VRING_NUM: used_addr: vring 0 (num 512): used ring does not fit:"
        f" uva {UVA + 2 * MIB - 0x1000:#x}+0x1006 runs past the end of its region"
        f" ({UVA:#x}+0x200000)",
    )
    assert not w.backend.vrings[0].started


def test_a_stopped_ring_is_not_started(wire: Wire) -> None:
    """GET_VRING_BASE stops the ring ("Ring states"); Vring.started, which the device reads,
    is the bool False again, and stays so when the connection closes."""
    w = wire
    w.reply_ack()
    w.mem_table()
    w.ring(0)
    v = w.backend.vrings[0]
    assert v.started is True
    assert w.get(Request.GET_VRING_BASE, encode_state(0, 0)).payload == encode_state(0, 0)
    assert v.started is False and v.queue is None
    w.backend.close()
    assert [u.started for u in w.backend.vrings] == [False, False]
    assert all(u.started is False for u in w.backend.vrings)


def test_a_device_without_status_set_keeps_the_status_as_sent(wire: Wire, lines: Lines) -> None:
    w = wire  # FakeDevice has no status_set: the status is the front-end's
    assert not hasattr(w.device, "status_set")
    w.reply_ack()
    del lines.lines[:]
    w.ok(Request.SET_STATUS, encode_u64(0x0F))
    assert w.get(Request.GET_STATUS).payload == encode_u64(0x0F)
    w.ok(Request.SET_STATUS, encode_u64(0))
    assert w.get(Request.GET_STATUS).payload == encode_u64(0)
    assert lines.at(logging.ERROR) == []


def test_close_lets_the_inflight_buffer_go() -> None:
    before = open_fds()
    with Wire() as w:
        w.reply_ack(protocol=1 << PF_INFLIGHT_SHMFD)
        fd = _inflight(w, 2, 128)
        try:
            w.ok(
                Request.SET_INFLIGHT_FD,
                encode_inflight(Inflight(os.fstat(fd).st_size, 0, 2, 128)),
                (fd,),
            )
        finally:
            os.close(fd)
        assert w.backend.inflight is not None
        w.backend.close()
        assert w.backend.inflight is None  # InflightBuffer | None
    assert open_fds() <= before


def test_a_device_status_set_without_an_answer_keeps_the_status_as_sent(lines: Lines) -> None:
    class Silent(FakeDevice):
        def status_set(self, value: int) -> None:
            if value == 0xFF:
                raise RuntimeError("device bug")

    with Wire(Silent()) as w:
        w.reply_ack()
        w.ok(Request.SET_STATUS, encode_u64(0x0F))
        assert w.get(Request.GET_STATUS).payload == encode_u64(0x0F)
        w.ok(Request.SET_STATUS, encode_u64(0xFF))
        assert w.get(Request.GET_STATUS).payload == encode_u64(0xFF)
        assert lines.at(logging.ERROR) == ["vhost-user: device status_set failed"]


def test_a_new_table_that_drops_a_running_ring_is_refused_by_name(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    w.mem_table()
    desc, _avail, _used = w.ring(0)  # the rings are at gpa 0x100000 and up
    fd = os.dup(w.mem.fd)
    try:
        low = MemRegionDesc(0, 0x80000, UVA, 0)
        refused(
            w,
            lines,
            Request.SET_MEM_TABLE,
            encode_mem_table([low]),
            f"VHOST_USER_SET_MEM_TABLE: desc_addr: vring 0 (num 256): descriptor table does not"
            f" fit: uva {desc:#x}+0x1000 is outside guest memory",
            (fd,),
        )
    finally:
        os.close(fd)
    assert w.backend.vrings[0].started
    assert [(r.gpa, r.size) for r in w.backend.mem.regions] == [(0, 2 * MIB)]


def test_a_memory_table_is_logged_region_by_region(wire: Wire, lines: Lines) -> None:
    w = wire
    w.reply_ack()
    fd = os.dup(w.mem.fd)
    try:
        low = MemRegionDesc(0, 0x80000, UVA, 0)
        high = MemRegionDesc(0x100000, 0x80000, UVA + 0x100000, 0x100000)
        # one fd per region ("Memory regions description"), counted before the handler runs
        refused(
            w,
            lines,
            Request.SET_MEM_TABLE,
            encode_mem_table([low, high]),
            "VHOST_USER_SET_MEM_TABLE: fds: missing fd: 1 attached, need 2",
            (fd,),
        )
        del lines.lines[:]
        w.ok(Request.SET_MEM_TABLE, encode_mem_table([low, high]), (fd, fd))
    finally:
        os.close(fd)
    assert lines.at(logging.INFO) == [
        "memory table: gpa 0x0+0x80000 uva 0x7f0000000000, gpa 0x100000+0x80000 uva 0x7f0000100000"
    ]


def test_set_features_that_enables_an_unstartable_ring_names_itself(lines: Lines) -> None:
    # without VHOST_USER_F_PROTOCOL_FEATURES the rings are enabled ("Ring states"): ring 0
    # tries its start again, and the refusal names SET_FEATURES
    with Wire() as w:
        os.close(_unstartable_ring(w, lines))
        refused(
            w,
            lines,
            Request.SET_FEATURES,
            encode_u64(F_VERSION_1),
            "VHOST_USER_SET_FEATURES: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        assert not w.backend.vrings[0].started


def test_a_refused_set_features_leaves_the_device_and_rings_consistent(lines: Lines) -> None:
    """SET_FEATURES without bit 30 enables every ring ("Ring states"). Ring 0 cannot start:
    the reply names that, and the rest of the request still took effect: the device was
    told the acked set, and both rings are enabled (not ring 0 alone, the device untold)."""
    with Wire() as w:
        os.close(_unstartable_ring(w, lines))
        del w.device.events[:]
        refused(
            w,
            lines,
            Request.SET_FEATURES,
            encode_u64(F_VERSION_1),
            "VHOST_USER_SET_FEATURES: inflight: vring 0: vring 0 has num 256, the buffer"
            " queue_size 128",
        )
        assert w.backend.negotiated_features == F_VERSION_1
        assert [e for e in w.device.events if e[0] == "features_set"] == [
            ("features_set", F_VERSION_1)
        ]
        assert [v.enabled for v in w.backend.vrings] == [True, True]


def test_the_rings_run_by_the_features_the_device_behaves_by() -> None:
    """features_set may answer the set the device behaves by (a feature fault): the rings get
    that one, with the acked ring layout; an answer that is not a feature set is ignored."""
    F_EVENT_IDX = 1 << 29  # VIRTIO_RING_F_EVENT_IDX

    class Faulty(FakeDevice):
        answer: Any = None

        def features_set(self, features: int) -> Any:
            super().features_set(features)
            return self.answer

    with Wire(Faulty()) as w:
        w.device.answer = F_VERSION_1  # behaves as if EVENT_IDX were not acked
        w.reply_ack(features=F_VERSION_1 | F_EVENT_IDX)
        w.mem_table()
        w.ring(0)
        q = w.backend.vrings[0].queue
        assert q is not None and q.features == F_VERSION_1 and not q.event_idx
        w.device.answer = "not a feature set"  # a device bug: the acked set is used
        assert w.send(
            Request.SET_FEATURES, encode_u64(F_PROTOCOL_FEATURES | F_VERSION_1 | F_EVENT_IDX)
        )
        assert not w.backend.closed
        assert q.features == F_VERSION_1 | F_EVENT_IDX and q.event_idx


# -- the rest of the module (third mutation session, source of 92a45b1) ---------------------


def test_a_front_end_that_hangs_up_is_a_disconnect(wire: Wire, lines: Lines) -> None:
    """EOF before a message: the connection is gone (handle_readable False, every fd
    closed, the device told), with the disconnect's info line; nothing is read again."""
    w = wire
    w.reply_ack()
    w.mem_table()
    del lines.lines[:]
    w.fe.close()
    assert w.backend.handle_readable() is False
    assert w.backend.closed and w.backend.mem is None
    assert lines.at(logging.INFO) == ["vhost-user front-end disconnected"]
    assert lines.at(logging.ERROR) == []
    assert w.device.names()[-1] == "disconnected"
    assert w.backend.handle_readable() is False


def test_a_socket_that_fails_under_the_backend_disconnects_with_the_error(
    wire: Wire, lines: Lines
) -> None:
    """A receive that fails with an OSError other than a reset (here ENOTSOCK: a pipe put in
    the socket's place) closes the connection; the error line names the error."""
    w = wire
    r, wr = os.pipe()
    try:
        os.dup2(r, w.backend.fileno())  # the backend's own socket is gone, a pipe in its place
    finally:
        os.close(r)
    try:
        os.write(wr, b"x")  # readable, so the receive really runs
        del lines.lines[:]
        assert w.backend.handle_readable() is False
        assert w.backend.closed
        assert lines.at(logging.ERROR) == [
            "vhost-user: socket error [Errno 88] Socket operation on non-socket; disconnecting"
        ]
        assert w.device.names()[-1] == "disconnected"
    finally:
        os.close(wr)


def test_a_wakeup_with_nothing_to_read_keeps_the_connection(wire: Wire, lines: Lines) -> None:
    """A poll loop may call handle_readable with nothing waiting: it returns True at once
    (no wait for a message), nothing is logged, and the next message is served."""
    w = wire
    w.reply_ack()
    del lines.lines[:]
    assert w.backend.handle_readable() is True
    assert not w.backend.closed and lines.lines == []
    assert w.ack(Request.SET_OWNER) == 0


def test_a_new_connection_has_nothing_negotiated(wire: Wire) -> None:
    """Before any request: no features acked (the rings would run by none), no owner, no
    MTU, device status 0 (GET_STATUS answers it), the connection open; SET_OWNER records
    the owner."""
    b = wire.backend
    assert (b.features, b.negotiated_features, b.ring_features, b.protocol_features) == (0, 0, 0, 0)
    assert b.features_acked is False and b.owner is False and b.closed is False
    assert b.mtu is None and b.status == 0
    assert wire.get(Request.GET_STATUS).payload == encode_u64(0)
    assert wire.send(Request.SET_OWNER)
    assert b.owner is True and b.features_acked is False


def test_a_closed_backend_reads_no_fault_fd() -> None:
    """After close the fault eventfd's number may belong to someone else (here an eventfd
    with a count on it): memory_fault, which the server may still call, leaves it alone."""
    w = Wire()
    number = w.backend.fault_fd
    w.close()
    other = os.eventfd(1, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    copied = False
    try:
        if other != number:
            try:
                os.fstat(number)
            except OSError:
                os.dup2(other, number)  # the number is free: ours now
                copied = True
            else:
                pytest.skip(f"fd {number} was taken by another thread meanwhile")
        assert w.backend.memory_fault() is None
        assert w.backend.handle_readable() is False
        assert os.eventfd_read(number) == 1  # still there: not consumed by the closed backend
    finally:
        if copied:
            os.close(number)
        os.close(other)


def test_a_table_that_does_not_hold_a_waiting_ring_is_refused_by_name(
    wire: Wire, lines: Lines
) -> None:
    """Ring 0 has num, addresses and a kick before any memory; the table that arrives last
    ("Ring states") does not hold its descriptor table: SET_MEM_TABLE is the request refused,
    by the ring's field, and the ring stays stopped (the table itself is taken)."""
    w = wire
    w.reply_ack()
    far = UVA + 4 * MIB  # past the 2 MiB region
    w.ok(Request.SET_VRING_NUM, encode_state(0, 256))
    w.ok(Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, far, far + 0x2000, far + 0x1000, 0)))
    w.kick(0)
    fd = os.dup(w.mem.fd)
    try:
        refused(
            w,
            lines,
            Request.SET_MEM_TABLE,
            encode_mem_table([w.region]),
            f"VHOST_USER_SET_MEM_TABLE: desc_addr: vring 0 (num 256): descriptor table does not"
            f" fit: uva {far:#x}+0x1000 is outside guest memory",
            (fd,),
        )
    finally:
        os.close(fd)
    assert not w.backend.vrings[0].started and "queue_started" not in w.device.names()
    assert [(r.gpa, r.size) for r in w.backend.mem.regions] == [(0, 2 * MIB)]


def test_call_and_err_fds_go_to_their_own_slots(wire: Wire) -> None:
    """SET_VRING_CALL gives the ring the eventfd the device signals the driver through;
    SET_VRING_ERR the error eventfd: each message sets its own, and the fd the backend keeps
    is the front-end's eventfd (a write on it is read on ours)."""
    w = wire
    w.reply_ack()
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        w.ok(Request.SET_VRING_CALL, encode_u64(0), (call,))
        v = w.backend.vrings[0]
        assert v.call_fd is not None and v.err_fd is None
        os.eventfd_write(v.call_fd, 1)
        assert os.eventfd_read(call) == 1
        w.ok(Request.SET_VRING_ERR, encode_u64(0), (err,))
        assert v.err_fd is not None
        os.eventfd_write(v.err_fd, 2)
        assert os.eventfd_read(err) == 2
        os.eventfd_write(v.call_fd, 3)  # the call fd is still the call eventfd
        assert os.eventfd_read(call) == 3
    finally:
        os.close(call)
        os.close(err)


def test_get_max_mem_slots_answers_the_slot_limit(lines: Lines) -> None:
    """GET_MAX_MEM_SLOTS answers the number of regions ADD_MEM_REG takes: 32 by default
    (libvhost-user's VHOST_USER_MAX_RAM_SLOTS), the backend's max_mem_slots otherwise."""
    with Wire() as w:
        assert w.get(Request.GET_MAX_MEM_SLOTS).payload == encode_u64(32)
    with Wire(max_mem_slots=1) as w:
        assert w.get(Request.GET_MAX_MEM_SLOTS).payload == encode_u64(1)
        w.reply_ack()
        fd = os.dup(w.mem.fd)
        try:
            w.ok(Request.ADD_MEM_REG, encode_mem_reg(MemRegionDesc(0, 0x80000, UVA, 0)), (fd,))
            refused(
                w,
                lines,
                Request.ADD_MEM_REG,
                encode_mem_reg(MemRegionDesc(0x80000, 0x80000, UVA + 0x80000, 0x80000)),
                "VHOST_USER_ADD_MEM_REG: region: memory regions limit: all 1 slots in use"
                " (GET_MAX_MEM_SLOTS)",
                (fd,),
            )
        finally:
            os.close(fd)


def test_the_ring_records_its_addresses_as_sent(wire: Wire) -> None:
    """SET_VRING_ADDR's fields, as the device reads them on the Vring: the three areas, the
    log address and the flags (0: no logging, the only flags accepted)."""
    w = wire
    w.reply_ack()
    w.mem_table()
    desc, avail, used = w.ring(0, kick=False)
    v = w.backend.vrings[0]
    assert (v.desc_addr, v.avail_addr, v.used_addr, v.log_addr) == (desc, avail, used, 0)
    assert v.flags == 0 and isinstance(v.flags, int)
    w.ok(Request.SET_VRING_ADDR, encode_addr(VringAddr(0, 0, desc, used, avail, 0x1234000)))
    assert v.log_addr == 0x1234000 and v.flags == 0
