"""Hypothesis fuzzing of the backend: random and mutated messages, from a running state.

Single-threaded: the test writes a message into a socketpair and calls
``handle_readable()`` itself.  Properties: nothing escapes ``handle_readable``, nothing is
logged as an internal error, and once everything is closed no fd is left behind.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vdev.vhost.backend import VhostUserBackend
from vdev.vhost.codec import (
    FLAG_NEED_REPLY,
    VERSION,
    Request,
    VringAddr,
    encode_addr,
    encode_header,
    encode_mem_reg,
    encode_mem_table,
    encode_state,
    encode_u64,
    pf_mask,
)
from vdev.vhost.codec import ProtocolFeature as PF
from vdev.vhost.connection import Connection, close_fds
from vdev.vhost.frontend import DEFAULT_UVA_BASE, FrontendMemory

from .conftest import FakeDevice, fd_targets, open_fds

NUM = 64


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.bad.append(self.format(record))


@contextmanager
def _recording() -> Iterator[_Recorder]:
    rec = _Recorder()
    logger = logging.getLogger("vdev.vhost")
    logger.addHandler(rec)
    try:
        yield rec
    finally:
        logger.removeHandler(rec)


class Harness:
    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.peer = Connection(a, io_timeout=0.2)
        self.device = FakeDevice()
        self.backend = VhostUserBackend(self.device, Connection(b, io_timeout=0.2))
        self.mem = FrontendMemory(2 << 20)
        self.alive = True

    def drain(self) -> None:
        while True:
            try:
                msg = self.peer.recv_message(expect_reply=True, block=False)
            except (BlockingIOError, Exception):
                return
            close_fds(msg.fds)

    def send(
        self,
        request: int,
        payload: bytes,
        nfds: int = 0,
        flags: int = VERSION,
        memfd: bool = False,
        size: int | None = None,
    ) -> None:
        if not self.alive:
            return
        fds = [os.dup(self.mem.fd) if memfd else os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        try:
            if size is None:
                self.peer.send_message(request, payload, flags=flags, fds=fds)
            else:
                # A header that lies about the size; the peer then closes its side so the
                # backend sees EOF instead of waiting for bytes that never come.
                import array

                self.peer.sock.sendmsg(
                    [encode_header(request, flags, size) + payload],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    if fds
                    else [],
                )
                self.peer.sock.shutdown(socket.SHUT_WR)
        except Exception:
            pass
        finally:
            close_fds(fds)
        ok = self.backend.handle_readable()
        assert isinstance(ok, bool)
        self.alive = ok
        self.drain()

    def running_state(self, ack: bool) -> None:
        """Handshake + memory + both rings started and enabled, QEMU style."""
        m = self.mem
        offered = self.backend.offered_protocol_features
        self.send(Request.GET_FEATURES, b"")
        self.send(Request.GET_PROTOCOL_FEATURES, b"")
        pf = offered if ack else offered & ~pf_mask(PF.REPLY_ACK)
        self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(pf))
        self.send(Request.SET_OWNER, b"")
        self.send(Request.SET_FEATURES, encode_u64(FakeDevice.FEATURES | 1 << 30))
        self.send(Request.SET_MEM_TABLE, encode_mem_table(m.regions), 2, memfd=True)
        for i in range(2):
            desc, avail, used = m.alloc(16 * NUM, 16), m.alloc(6 + 2 * NUM), m.alloc(6 + 8 * NUM)
            self.send(Request.SET_VRING_NUM, encode_state(i, NUM))
            self.send(Request.SET_VRING_BASE, encode_state(i, 0))
            uva = m.uva_of
            addr = VringAddr(i, 0, uva(desc), uva(used), uva(avail), 0)
            self.send(Request.SET_VRING_ADDR, encode_addr(addr))
            self.send(Request.SET_VRING_KICK, encode_u64(i), 1)
            self.send(Request.SET_VRING_CALL, encode_u64(i), 1)
            self.send(Request.SET_VRING_ENABLE, encode_state(i, 1))

    def close(self) -> None:
        self.backend.close()
        self.peer.close()
        self.mem.close()


# -- strategies ----------------------------------------------------------------------------

U = DEFAULT_UVA_BASE
interesting_u64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 2, 0xFF, 0x100, 0x101, 0xFFFF, 0x10000, 2**32 - 1, 2**63, 2**64 - 1]),
    st.integers(U - 0x100, U + (2 << 20) + 0x100),
    st.integers(0, 2 << 20),
)
interesting_u32 = st.one_of(
    st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 7, 64, 100, 256, 32768, 65536])
)
# Mostly well-formed flags, so messages get past the header into the handlers.
flags_st = st.sampled_from(
    [VERSION] * 4 + [VERSION | FLAG_NEED_REPLY] * 4 + [0, VERSION | 0x4, 0x2, VERSION | 0x100]
)

# Requests the backend handles, more often than the rest.
HANDLED = [
    Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_OWNER,
    Request.RESET_OWNER, Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG,
    Request.SET_VRING_NUM, Request.SET_VRING_ADDR, Request.SET_VRING_BASE,
    Request.GET_VRING_BASE, Request.SET_VRING_KICK, Request.SET_VRING_CALL,
    Request.SET_VRING_ERR, Request.SET_VRING_ENABLE, Request.NET_SET_MTU, Request.SET_STATUS,
    Request.GET_STATUS, Request.SET_SLAVE_REQ_FD, Request.GET_CONFIG, Request.SEND_RARP,
]  # fmt: skip
KIND_OF = {
    "u64": "u64", "vring state": "state", "vring address": "addr", "memory table": "table",
    "single memory region": "reg", "empty": "empty", "config": "config",
}  # fmt: skip


@st.composite
def structured(draw: st.DrawFn) -> tuple[int, bytes, int, bool]:
    from vdev.vhost.codec import REQUEST_KIND

    req = draw(st.one_of(st.sampled_from(HANDLED), st.sampled_from(list(Request))))
    if draw(st.integers(0, 9)) < 8:
        kind = KIND_OF.get(REQUEST_KIND[req].value if req in REQUEST_KIND else "", "empty")
    else:
        kind = draw(st.sampled_from(["u64", "state", "addr", "table", "reg", "empty"]))
    if kind == "u64":
        payload = encode_u64(draw(interesting_u64))
    elif kind == "state":
        payload = encode_state(draw(interesting_u32), draw(interesting_u32))
    elif kind == "addr":
        a = VringAddr(
            draw(st.integers(0, 3)), draw(st.sampled_from([0, 1, 2])),
            draw(interesting_u64), draw(interesting_u64), draw(interesting_u64), 0,
        )  # fmt: skip
        payload = encode_addr(a)
    elif kind == "table":
        from vdev.vhost.codec import MemRegionDesc

        n = draw(st.integers(0, 9))
        regs = [
            MemRegionDesc(
                draw(interesting_u64),
                draw(st.integers(0, 4 << 20)),
                draw(interesting_u64),
                draw(st.sampled_from([0, 4096, 0xC0000, 2**63])),
            )
            for _ in range(n)
        ]
        payload = encode_mem_table(regs)
    elif kind == "reg":
        from vdev.vhost.codec import MemRegionDesc

        payload = encode_mem_reg(
            MemRegionDesc(
                draw(interesting_u64),
                draw(st.integers(0, 4 << 20)),
                draw(interesting_u64),
                draw(st.sampled_from([0, 4096, 0xC0000])),
            )
        )
    elif kind == "config":
        from vdev.vhost.codec import encode_config

        size = draw(st.integers(0, 300))
        payload = encode_config(draw(interesting_u32), 0, bytes(min(size, 256)), size=size)
    else:
        payload = b""
    # The right number of fds most of the time.
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR) and (
        kind == "u64"
    ):
        right = 0 if int.from_bytes(payload, "little") & 0x100 else 1
    elif req == Request.SET_MEM_TABLE and kind == "table":
        right = int.from_bytes(payload[:4], "little")
    elif req in (Request.ADD_MEM_REG, Request.SET_SLAVE_REQ_FD):
        right = 1
    else:
        right = 0
    nfds = draw(st.one_of(st.just(right), st.integers(0, 3)))
    return int(req), payload, nfds, draw(st.booleans())


@st.composite
def raw(draw: st.DrawFn) -> tuple[int, bytes, int, bool]:
    return (
        draw(st.integers(0, 60)),
        draw(st.binary(max_size=300)),
        draw(st.integers(0, 9)),
        draw(st.booleans()),
    )


@st.composite
def mutated(draw: st.DrawFn) -> tuple[int, bytes, int, bool]:
    req, payload, nfds, memfd = draw(structured())
    if payload:
        data = bytearray(payload)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        cut = draw(st.sampled_from([None, -1, 1, 4]))
        if cut == -1:
            data = data[:-1]
        elif cut is not None:
            data += bytes(cut)
        payload = bytes(data)
    return req, payload, nfds, memfd


message = st.tuples(st.one_of(structured(), structured(), raw(), mutated()), flags_st)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ack=st.booleans(),
    start_running=st.booleans(),
    msgs=st.lists(message, min_size=1, max_size=6),
    lie=st.one_of(st.none(), st.integers(0, 5000)),
)
def test_fuzz_backend(
    ack: bool,
    start_running: bool,
    msgs: list[tuple[tuple[int, bytes, int, bool], int]],
    lie: int | None,
) -> None:
    before = open_fds()
    with _recording() as rec:
        h = Harness()
        try:
            if start_running:
                h.running_state(ack)
                assert h.alive and sorted(h.device.started) == [0, 1]
            for (req, payload, nfds, memfd), flags in msgs:
                h.send(req, payload, nfds, flags, memfd)
            if lie is not None:
                h.send(Request.SET_VRING_NUM, b"\x01\x00", 1, VERSION, False, size=lie)
            # After any sequence the backend must still close cleanly.
        finally:
            h.close()
        assert not h.backend.handle_readable()
    assert not rec.bad, rec.bad
    leaked = fd_targets(open_fds() - before)
    assert not leaked, leaked


def test_kick_without_fd_keeps_the_ring_stopped() -> None:
    """Found by the fuzzer: SET_VRING_KICK with the invalid-FD flag on a running ring must not
    hand the device a ring with no kick fd (vdev does not poll)."""
    with _recording() as rec:
        h = Harness()
        try:
            h.running_state(False)
            assert 0 in h.device.started
            h.send(Request.SET_VRING_KICK, encode_u64(0x100), 0, VERSION, False)
            assert h.alive
            assert 0 not in h.device.started and 1 in h.device.started
        finally:
            h.close()
    assert not rec.bad, rec.bad
