"""Fds per request come from one table (codec.REQUEST_FDS) that dispatch enforces before any
handler runs: a request carrying fds it should not is refused and every fd closed."""

from __future__ import annotations

import logging
import os

import pytest

from vdev.vhost import codec
from vdev.vhost.codec import (
    HAS_REPLY,
    Fds,
    Inflight,
    Kind,
    MemRegionDesc,
    ProtocolError,
    Request,
    VringAddr,
    encode_addr,
    encode_config,
    encode_inflight,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
)
from vdev.vhost.connection import PeerClosed
from vdev.vhost.frontend import FrontendMemory, VhostUserFrontend

from .conftest import BackendServer

# From the spec's request descriptions: the requests that carry fds, and how many.
SPEC_FDS = {
    Request.SET_MEM_TABLE: Fds.PER_REGION,
    Request.SET_LOG_BASE: Fds.ONE,
    Request.SET_LOG_FD: Fds.ONE,
    Request.SET_VRING_KICK: Fds.UNLESS_NOFD,
    Request.SET_VRING_CALL: Fds.UNLESS_NOFD,
    Request.SET_VRING_ERR: Fds.UNLESS_NOFD,
    Request.SET_BACKEND_REQ_FD: Fds.ONE,
    Request.SET_INFLIGHT_FD: Fds.ONE,
    Request.GPU_SET_SOCKET: Fds.ONE,
    Request.ADD_MEM_REG: Fds.ONE,
    Request.REM_MEM_REG: Fds.AT_MOST_ONE,
    Request.SET_DEVICE_STATE_FD: Fds.ONE,
}

# A payload of the right shape for each kind (the fd check runs before the handler's).
PAYLOAD = {
    Kind.EMPTY: b"",
    Kind.U64: encode_u64(0),
    Kind.STATE: encode_state(0, 0),
    Kind.ADDR: encode_addr(VringAddr(0, 0, 0, 0, 0, 0)),
    Kind.CONFIG: encode_config(0, 0, b""),
    Kind.INFLIGHT: encode_inflight(Inflight(0, 0, 1, 256)),
}


def test_the_table_is_the_spec() -> None:
    assert codec.REQUEST_FDS == SPEC_FDS
    assert {r for r in codec.REQUEST_KIND if codec.fds_rule(r) is not Fds.NONE} == set(SPEC_FDS)


def test_expected_counts() -> None:
    table = codec.MemTable(tuple(MemRegionDesc(i << 20, 4096, i << 20, 0) for i in range(3)))
    assert codec.expected_fds(Request.SET_MEM_TABLE, table) == (3, 3)
    assert codec.expected_fds(Request.SET_VRING_KICK, 0x001) == (1, 1)
    assert codec.expected_fds(Request.SET_VRING_KICK, 0x101) == (0, 0)  # invalid-FD flag
    assert codec.expected_fds(Request.REM_MEM_REG, table.regions[0]) == (0, 1)
    assert codec.expected_fds(Request.SET_VRING_NUM, codec.VringState(0, 8)) == (0, 0)
    for n, ok in ((0, True), (1, True), (2, False)):
        if ok:
            codec.check_fds(Request.REM_MEM_REG, table.regions[0], n)
        else:
            with pytest.raises(ProtocolError, match=r"extra fd: 2 attached, need 0\.\.1"):
                codec.check_fds(Request.REM_MEM_REG, table.regions[0], n)
    with pytest.raises(ProtocolError, match="missing fd: 2 attached, need 3"):
        codec.check_fds(Request.SET_MEM_TABLE, table, 2)
    with pytest.raises(ProtocolError, match="extra fd: 4 attached, need 3"):
        codec.check_fds(Request.SET_MEM_TABLE, table, 4)


MARK = "vdev-fd-table-test"


def _marked_fd() -> int:
    """An fd whose every copy (the one the backend receives included) is recognisable."""
    return os.memfd_create(MARK, os.MFD_CLOEXEC)


def _copies_open() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += MARK in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _handled_without_fds(server: BackendServer) -> list[int]:
    with VhostUserFrontend.connect(server.path) as fe:
        fe.handshake()
        handled = server.backend.supported_requests
    return sorted(r for r in handled if codec.fds_rule(r) is Fds.NONE)


def test_every_handled_request_without_fds_refuses_one(
    server: BackendServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request the backend handles and the table gives no fds: one fd attached is
    refused by dispatch (failure reply with REPLY_ACK, else a disconnect) and closed."""
    caplog.set_level(logging.ERROR, logger="vdev.vhost")
    requests = _handled_without_fds(server)
    assert {Request.SET_VRING_NUM, Request.GET_FEATURES, Request.SET_STATUS} <= set(requests)
    assert len(requests) >= 18
    disconnects = server.disconnects
    for request in requests:
        payload = PAYLOAD[codec.REQUEST_KIND[request]]
        with VhostUserFrontend.connect(server.path) as fe, FrontendMemory(4 << 20) as mem:
            fe.handshake()
            fe.start(mem)
            server.wait_idle()
            caplog.clear()
            fd = _marked_fd()
            try:
                assert _copies_open() == 1
                fe.send_raw(request, payload, [fd], 0x1 | 0x8)  # NEED_REPLY
                if request in HAS_REPLY:  # no ack for these: the connection is dropped
                    with pytest.raises(PeerClosed):
                        fe.recv_reply(timeout=3)
                    disconnects += 1
                    server.wait_disconnects(disconnects)
                else:
                    reply = fe.recv_reply(timeout=3)
                    assert reply.payload != encode_u64(0), codec.request_name(request)
                server.wait_idle()
                assert _copies_open() == 1, f"{codec.request_name(request)} kept the fd"
            finally:
                os.close(fd)
        errors = [r.getMessage() for r in caplog.records]
        assert any("extra fd: 1 attached, need 0" in e for e in errors), (request, errors)


def test_rem_mem_reg_fd_is_accepted_and_closed(server: BackendServer) -> None:
    with VhostUserFrontend.connect(server.path) as fe, FrontendMemory(4 << 20) as mem:
        fe.handshake()
        fe.start(mem)
        region = mem.regions[0]
        fd = _marked_fd()
        try:
            assert _copies_open() == 1
            fe.send_raw(Request.REM_MEM_REG, encode_mem_reg(region), [fd], 0x1 | 0x8)
            assert fe.recv_reply(timeout=3).payload == encode_u64(0)  # removed
            server.wait_idle()
            assert _copies_open() == 1
            fe.send_raw(Request.REM_MEM_REG, encode_mem_reg(region), [fd, fd], 0x1 | 0x8)
            assert fe.recv_reply(timeout=3).payload != encode_u64(0)  # two: refused
            server.wait_idle()
            assert _copies_open() == 1
        finally:
            os.close(fd)
    # The memory table still describes the region: SET_MEM_TABLE takes one fd per region.
    assert encode_mem_table([region])
