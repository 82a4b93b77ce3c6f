"""Each class of malformed message: a logged error naming the field, then a failure reply
(REPLY_ACK asked) or a clean disconnect; never an exception, never a leaked fd, and the server
keeps serving new connections."""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from vdev.vhost.codec import (
    MemRegionDesc,
    Request,
    VringAddr,
    encode_addr,
    encode_header,
    encode_mem_table,
    encode_state,
    encode_u64,
)
from vdev.vhost.connection import PeerClosed
from vdev.vhost.frontend import DEFAULT_UVA_BASE, FrontendConfig, FrontendMemory, VhostUserFrontend

from .conftest import BackendServer

VERSION = 0x1
NEED_REPLY = 0x8


@dataclass
class Case:
    request: int
    payload: Callable[[FrontendMemory], bytes]
    field: str  # must appear in the logged error
    nfds: int = 0
    memfd_fds: bool = False  # attach fds of the guest RAM memfd instead of eventfds
    frame: bool = False  # broken frame: always a disconnect
    flags: int | None = None


def _addr(desc: int, avail: int, used: int) -> Callable[[FrontendMemory], bytes]:
    return lambda m: encode_addr(VringAddr(0, 0, desc, used, avail, 0))


B = DEFAULT_UVA_BASE
HI = B + 0xC0000  # uva of gpa 0xc0000, start of the second region

CASES: dict[str, Case] = {
    "wrong_size": Case(Request.SET_VRING_NUM, lambda m: b"\x00" * 4, "size"),
    "wrong_size_u64": Case(Request.SET_FEATURES, lambda m: b"\x00" * 9, "size"),
    "unknown_request": Case(99, lambda m: b"", "unknown request"),
    "unsupported_request": Case(Request.SET_LOG_BASE, lambda m: bytes(16), "not supported"),
    "missing_fd": Case(Request.SET_VRING_KICK, lambda m: encode_u64(0), "missing fd"),
    "missing_mem_fd": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_mem_table(m.regions),
        "missing fd",
        nfds=1,
        memfd_fds=True,
    ),
    "extra_fd": Case(Request.SET_VRING_NUM, lambda m: encode_state(0, 256), "extra fd", nfds=1),
    "extra_fd_kick": Case(Request.SET_VRING_KICK, lambda m: encode_u64(0), "extra fd", nfds=2),
    "extra_fd_nofd_flag": Case(
        Request.SET_VRING_CALL, lambda m: encode_u64(0x100), "extra fd", nfds=1
    ),
    "bad_version": Case(
        Request.GET_FEATURES, lambda m: b"", "version", frame=True, flags=0x2 | NEED_REPLY
    ),
    "reply_bit_on_request": Case(
        Request.SET_OWNER, lambda m: b"", "reply bit", frame=True, flags=0x5 | NEED_REPLY
    ),
    "unknown_flag_bits": Case(
        Request.SET_OWNER, lambda m: b"", "unknown flag", frame=True, flags=0x101 | NEED_REPLY
    ),
    "addr_outside_memory": Case(
        Request.SET_VRING_ADDR, _addr(B + 0xB0000, HI + 0x1000, HI + 0x2000), "desc_addr"
    ),
    "addr_is_gpa_not_uva": Case(
        Request.SET_VRING_ADDR, _addr(0x100000, 0x110000, 0x120000), "desc_addr"
    ),
    "ring_does_not_fit": Case(
        # used ring (6 + 8*256 bytes) starts 64 bytes before the end of region 0
        Request.SET_VRING_ADDR,
        _addr(HI, HI + 0x1000, B + 0xA0000 - 64),
        "used_addr",
    ),
    "ring_misaligned": Case(
        Request.SET_VRING_ADDR, _addr(HI + 8, HI + 0x1000, HI + 0x2000), "desc_addr"
    ),
    "num_not_power_of_2": Case(Request.SET_VRING_NUM, lambda m: encode_state(1, 100), "num"),
    "num_too_big": Case(Request.SET_VRING_NUM, lambda m: encode_state(1, 65536), "num"),
    "index_out_of_range": Case(Request.SET_VRING_NUM, lambda m: encode_state(7, 64), "index"),
    "kick_index_out_of_range": Case(
        Request.SET_VRING_KICK, lambda m: encode_u64(5), "index", nfds=1
    ),
    "kick_reserved_bits": Case(
        Request.SET_VRING_KICK, lambda m: encode_u64(1 << 40), "u64", nfds=1
    ),
    "enable_not_bool": Case(Request.SET_VRING_ENABLE, lambda m: encode_state(0, 2), "num"),
    "base_not_u16": Case(Request.SET_VRING_BASE, lambda m: encode_state(0, 0x10000), "num"),
    "features_not_offered": Case(Request.SET_FEATURES, lambda m: encode_u64(1 << 63), "features"),
    "protocol_features_not_offered": Case(
        Request.SET_PROTOCOL_FEATURES, lambda m: encode_u64(1 << 14), "protocol_features"
    ),
    "overlapping_regions": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_mem_table(
            [MemRegionDesc(0, 0x200000, B, 0), MemRegionDesc(0x100000, 0x200000, B + 0x400000, 0)]
        ),
        "overlaps",
        nfds=2,
        memfd_fds=True,
    ),
    "overflowing_region": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_mem_table([MemRegionDesc(0xFFFF_FFFF_FFFF_F000, 0x2000, B, 0)]),
        "overflows",
        nfds=1,
        memfd_fds=True,
    ),
    "region_beyond_fd": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_mem_table([MemRegionDesc(0, m.size * 2, B, 0)]),
        "exceeds fd size",
        nfds=1,
        memfd_fds=True,
    ),
    "zero_size_region": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_mem_table([MemRegionDesc(0, 0, B, 0)]),
        "size 0",
        nfds=1,
        memfd_fds=True,
    ),
    "too_many_regions": Case(
        Request.SET_MEM_TABLE,
        lambda m: encode_u64(9) + bytes(32 * 9),
        "num_regions",
    ),
    "mem_table_size_mismatch": Case(
        Request.SET_MEM_TABLE, lambda m: encode_u64(2) + bytes(32), "size", nfds=0
    ),
    "mtu_not_offered": Case(Request.NET_SET_MTU, lambda m: encode_u64(1500), "MTU"),
    "rem_unknown_region": Case(
        Request.REM_MEM_REG, lambda m: bytes(8) + bytes(8) + encode_u64(4096) + bytes(16), "region"
    ),
}


def _prepare(fe: VhostUserFrontend, mem: FrontendMemory) -> None:
    """A connection in a state where every case is meaningful: memory shared, ring 0 has
    num 256 but no addresses yet."""
    fe.handshake()
    fe.start(mem)
    fe.request(Request.SET_VRING_NUM, encode_state(0, 256))


def _send_case(fe: VhostUserFrontend, mem: FrontendMemory, case: Case, flags: int) -> None:
    fds: list[int] = []
    try:
        for _ in range(case.nfds):
            fds.append(os.dup(mem.fd) if case.memfd_fds else os.eventfd(0, os.EFD_CLOEXEC))
        fe.send_raw(case.request, case.payload(mem), fds, flags)
    finally:
        for fd in fds:
            os.close(fd)


def _assert_still_serving(server: BackendServer) -> None:
    with VhostUserFrontend.connect(server.path) as fe2:
        fe2.handshake()
        assert fe2.queue_num == 2


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ack", [True, False], ids=["ack", "noack"])
def test_malformed(
    server: BackendServer, caplog: pytest.LogCaptureFixture, name: str, ack: bool
) -> None:
    case = CASES[name]
    caplog.set_level(logging.ERROR, logger="vdev.vhost")
    with VhostUserFrontend.connect(server.path) as fe, FrontendMemory(4 << 20) as mem:
        _prepare(fe, mem)
        flags = case.flags if case.flags is not None else VERSION | (NEED_REPLY if ack else 0)
        _send_case(fe, mem, case, flags)
        if ack and not case.frame:
            reply = fe.recv_reply(timeout=3)
            assert reply.request == case.request
            assert reply.payload != encode_u64(0), "failure must be acked non-zero"
            # The connection is still usable.
            fe.send_raw(Request.GET_QUEUE_NUM)
            assert fe.recv_reply(timeout=3).payload == encode_u64(2)
        else:
            with pytest.raises(PeerClosed):
                fe.recv_reply(timeout=3)
            server.wait_disconnects(1)
    server.wait_idle()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(case.field in e for e in errors), errors
    _assert_still_serving(server)


def test_truncated_message_then_close(server: BackendServer) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.handshake()
        fe.conn.sock.sendall(encode_header(Request.SET_VRING_NUM, VERSION, 8) + b"\x01\x00")
        fe.conn.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(PeerClosed):
            fe.recv_reply(timeout=3)
    server.wait_disconnects(1)
    _assert_still_serving(server)


def test_oversized_payload_refused_before_reading(server: BackendServer) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.conn.sock.sendall(encode_header(Request.SET_MEM_TABLE, VERSION, 1 << 30))
        with pytest.raises(PeerClosed):
            fe.recv_reply(timeout=3)
    _assert_still_serving(server)


def test_too_many_fds_closed(server: BackendServer) -> None:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(80)]
    try:
        with VhostUserFrontend.connect(server.path) as fe:
            fe.send_raw(Request.SET_OWNER, b"", fds)
            with pytest.raises(PeerClosed):
                fe.recv_reply(timeout=3)
    finally:
        for fd in fds:
            os.close(fd)
    _assert_still_serving(server)


def test_garbage_stream(server: BackendServer) -> None:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.conn.sock.sendall(random.Random(1).randbytes(4096))
        with pytest.raises(PeerClosed):
            while True:
                fe.recv_reply(timeout=3)
    _assert_still_serving(server)


def test_frontend_config_defaults_are_qemu_like() -> None:
    cfg = FrontendConfig()
    assert cfg.mq and cfg.reply_ack and cfg.status and cfg.mem_slots and not cfg.add_mem_reg
