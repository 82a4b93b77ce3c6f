"""Codec size checks and connection I/O (SCM_RIGHTS, server/client modes, stale sockets)."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from vdev.vhost import codec
from vdev.vhost.codec import (
    MemRegionDesc,
    ProtocolError,
    Request,
    VringAddr,
    decode_header,
    decode_request,
    encode_addr,
    encode_config,
    encode_header,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
)
from vdev.vhost.connection import MAX_FDS, Connection, Listener, PeerClosed, connect

# -- codec ---------------------------------------------------------------------------------


def test_request_numbers_cover_the_spec() -> None:
    assert Request.GET_FEATURES == 1 and Request.SET_OWNER == 3 and Request.SET_MEM_TABLE == 5
    assert Request.GET_VRING_BASE == 11 and Request.SET_VRING_ENABLE == 18
    assert Request.SET_SLAVE_REQ_FD == Request.SET_BACKEND_REQ_FD == 21
    assert Request.GET_MAX_MEM_SLOTS == 36 and Request.ADD_MEM_REG == 37
    assert Request.REM_MEM_REG == 38 and Request.SET_STATUS == 39 and Request.GET_STATUS == 40
    assert set(codec.REQUEST_KIND) == set(range(1, 44))


@pytest.mark.parametrize("request_", sorted(codec.REQUEST_KIND))
def test_every_request_shape_decodes_or_refuses_by_name(request_: int) -> None:
    """Each request's payload shape has a decoder: any size decodes or is refused with a
    ProtocolError naming a field, never another exception."""
    for size in (0, 4, 8, 12, 16, 24, 32, 40, 300):
        try:
            codec.decode_request(request_, bytes(size))
        except ProtocolError as exc:
            assert exc.field in ("size", "num_regions", "config.size"), exc


def test_header_roundtrip_and_checks() -> None:
    assert decode_header(encode_header(5, 0x9, 72)) == (5, 0x9, 72)
    assert decode_header(encode_header(1, 0x5, 8), expect_reply=True) == (1, 0x5, 8)
    with pytest.raises(ProtocolError, match="version"):
        decode_header(encode_header(1, 0x0, 0))
    with pytest.raises(ProtocolError, match="reply bit set"):
        decode_header(encode_header(1, 0x5, 0))
    with pytest.raises(ProtocolError, match="reply bit missing"):
        decode_header(encode_header(1, 0x1, 0), expect_reply=True)
    with pytest.raises(ProtocolError, match="unknown flag"):
        decode_header(encode_header(1, 0x11, 0))
    with pytest.raises(ProtocolError, match="size"):
        decode_header(encode_header(1, 0x1, 1 << 20))
    with pytest.raises(ProtocolError, match="header"):
        decode_header(b"short")


def test_payload_roundtrips() -> None:
    assert decode_request(Request.SET_FEATURES, encode_u64(1 << 32)) == 1 << 32
    st = decode_request(Request.SET_VRING_NUM, encode_state(1, 256))
    assert st == codec.VringState(1, 256)
    a = VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert decode_request(Request.SET_VRING_ADDR, encode_addr(a)) == a
    regions = tuple(MemRegionDesc(i << 30, 1 << 20, (i << 30) + 0x7F00, i) for i in range(8))
    table = decode_request(Request.SET_MEM_TABLE, encode_mem_table(regions))
    assert isinstance(table, codec.MemTable) and table.regions == regions
    # The full union size (8 slots) is accepted too.
    padded = encode_mem_table(regions[:2]) + bytes(32 * 6)
    t2 = decode_request(Request.SET_MEM_TABLE, padded)
    assert isinstance(t2, codec.MemTable) and t2.regions == regions[:2]
    assert decode_request(Request.ADD_MEM_REG, encode_mem_reg(regions[3])) == regions[3]
    cfg = decode_request(Request.GET_CONFIG, encode_config(4, 0, b"abcdef"))
    assert cfg == codec.Config(4, 6, 0, b"abcdef")
    assert decode_request(Request.GET_FEATURES, b"") == codec.Empty()
    inf = codec.Inflight(4096, 0, 2, 256)
    assert decode_request(Request.GET_INFLIGHT_FD, codec.encode_inflight(inf)) == inf


@pytest.mark.parametrize(
    ("request_", "payload", "field"),
    [
        (Request.SET_FEATURES, b"", "size"),
        (Request.SET_VRING_NUM, bytes(12), "size"),
        (Request.SET_VRING_ADDR, bytes(39), "size"),
        (Request.SET_MEM_TABLE, bytes(4), "size"),
        (Request.SET_MEM_TABLE, encode_u64(9) + bytes(9 * 32), "num_regions"),
        (Request.SET_MEM_TABLE, encode_u64(1) + bytes(31), "size"),
        (Request.ADD_MEM_REG, bytes(32), "size"),
        (Request.GET_CONFIG, encode_config(0, 0, b"", size=300), "config.size"),
        (Request.GET_CONFIG, encode_config(0, 0, b"ab", size=3), "size"),
        (Request.GET_FEATURES, bytes(3), "size"),
        (200, b"", "request"),
    ],
)
def test_payload_size_errors_name_request_and_field(
    request_: int, payload: bytes, field: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(request_, payload)
    assert info.value.field == field
    assert codec.request_name(request_) in str(info.value)


# -- connection ----------------------------------------------------------------------------


def _pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a, io_timeout=1.0), Connection(b, io_timeout=1.0)


def test_fds_travel_and_are_owned_by_receiver(no_fd_leak: None) -> None:
    a, b = _pair()
    with a, b:
        efds = [os.eventfd(i, os.EFD_CLOEXEC) for i in range(8)]
        a.send_message(Request.SET_MEM_TABLE, b"x" * 40, fds=efds)
        for fd in efds:
            os.close(fd)
        msg = b.recv_message()
        assert msg.request == Request.SET_MEM_TABLE and msg.payload == b"x" * 40
        assert len(msg.fds) == 8
        assert [int.from_bytes(os.read(fd, 8), "little") for fd in msg.fds[1:]] == list(range(1, 8))
        assert not os.get_inheritable(msg.fds[0])
        for fd in msg.fds:
            os.close(fd)


def test_too_many_fds_are_closed(no_fd_leak: None) -> None:
    a, b = _pair()
    with a, b:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS + 10)]
        a.send_message(Request.SET_OWNER, b"", fds=fds)
        for fd in fds:
            os.close(fd)
        with pytest.raises(ProtocolError, match="fds"):
            b.recv_message()


def test_truncated_frame_closes_fds(no_fd_leak: None) -> None:
    a, b = _pair()
    with b:
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        a.sock.sendmsg(
            [encode_header(Request.SET_VRING_KICK, 1, 8) + b"\0\0"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, efd.to_bytes(4, "little"))],
        )
        os.close(efd)
        a.close()
        with pytest.raises(ProtocolError, match="peer closed after 2/8"):
            b.recv_message()


def test_eof_and_nonblocking(no_fd_leak: None) -> None:
    a, b = _pair()
    with b:
        with pytest.raises(BlockingIOError):
            b.recv_message(block=False)
        a.close()
        with pytest.raises(PeerClosed):
            b.recv_message()


def test_listener_lifecycle(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "l.sock"
    with Listener(path) as lst:
        assert path.exists()
        assert lst.accept(0) is None
        # A live listener is never clobbered.
        with pytest.raises(FileExistsError):
            Listener(path)
        probe = lst.accept(1)  # the liveness probe's connection, already closed by it
        assert probe is not None
        with pytest.raises(PeerClosed):
            probe.recv_message()
        probe.close()
        c = connect(path, timeout=1)
        s = lst.accept(1)
        assert s is not None
        c.send_message(Request.GET_FEATURES)
        assert s.recv_message().request == Request.GET_FEATURES
        c.close()
        s.close()
    assert not path.exists()


def test_listener_replaces_stale_socket(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: a crashed backend's leftover
    assert path.exists()
    with Listener(path):
        assert path.exists()
    assert not path.exists()


def test_listener_refuses_non_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        Listener(path)
    assert path.read_text() == "precious"


def test_connect_retries_until_listener_appears(tmp_path: Path, no_fd_leak: None) -> None:
    path = tmp_path / "late.sock"
    holder: list[Listener] = []

    def late() -> None:
        time.sleep(0.3)
        holder.append(Listener(path))

    t = threading.Thread(target=late)
    t.start()
    try:
        c = connect(path, timeout=3, retry_interval=0.02)
        c.close()
    finally:
        t.join()
        for lst in holder:
            lst.close()


def test_connect_times_out(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"nothing\.sock"):
        connect(tmp_path / "nothing.sock", timeout=0.3, retry_interval=0.05)
    assert time.monotonic() - start < 2


def test_backend_spurious_wakeup_does_not_block(no_fd_leak: None) -> None:
    from vdev.vhost.backend import VhostUserBackend

    from .conftest import FakeDevice

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fdnum = b.fileno()
    backend = VhostUserBackend(FakeDevice(), Connection(b, io_timeout=5.0))
    sel = selectors.DefaultSelector()
    sel.register(backend.fileno(), selectors.EVENT_READ)
    try:
        start = time.monotonic()
        assert backend.handle_readable() is True  # nothing there: returns at once
        assert time.monotonic() - start < 0.5
        a.close()
        assert backend.handle_readable() is False
        assert backend.closed
        # The number survives close, so the caller can unregister it (and a new connection
        # that reuses the number can be registered again).
        assert backend.fileno() == fdnum
        sel.unregister(backend.fileno())
        c, d = socket.socketpair()
        sel.register(c.fileno(), selectors.EVENT_READ)
        c.close()
        d.close()
    finally:
        backend.close()
        a.close()
        sel.close()
