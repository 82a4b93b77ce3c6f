"""Resource limits (issue 12, item 6; vdev/limits.py): a front-end cannot make the device
allocate without bound, every refusal names its limit, and each limit is tested on both
sides (the largest accepted value, then one more).

- guest memory: 1 TiB per connection, with a real (sparse) 1 TiB memfd;
- memory regions: 8 in SET_MEM_TABLE, GET_MAX_MEM_SLOTS (32) with ADD_MEM_REG;
- the inflight buffer: num_queues <= the device's queues, queue_size <= 32768, and the
  SET_INFLIGHT_FD size/offset checked against the fd;
- held connections: at most 8 silent newcomers per socket, the oldest closed first;
- NICs: 64 per device.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vdev.eventloop import SelectorLoop
from vdev.limits import MAX_GUEST_MEMORY, MAX_HELD_CONNECTIONS, MAX_NICS, LimitError
from vdev.net.device import Device
from vdev.vhost.backend import MAX_MEM_SLOTS
from vdev.vhost.codec import (
    MEMORY_BASELINE_NREGIONS,
    Inflight,
    MemRegionDesc,
    ProtocolFeature,
    Request,
    encode_inflight,
    encode_mem_reg,
    encode_mem_table,
)
from vdev.vhost.connection import PeerClosed
from vdev.vhost.frontend import FrontendConfig, VhostUserError, VhostUserFrontend
from vdev.vhost.server import VhostUserServer
from vdev.virtio.inflight import queue_region_size

from .conftest import BackendServer, FakeDevice

PAGE = 4096


def _fe(server: BackendServer, **cfg: object) -> VhostUserFrontend:
    fe = VhostUserFrontend.connect(server.path, FrontendConfig(**cfg))  # type: ignore[arg-type]
    fe.handshake()
    return fe


def _refused(
    fe: VhostUserFrontend, request: int, payload: bytes, fds: list[int], limit: str
) -> None:
    with pytest.raises(VhostUserError, match="failed"):
        fe.request(request, payload, fds)


def _last_error(caplog: pytest.LogCaptureFixture) -> str:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]


# -- guest memory --------------------------------------------------------------------------


def test_guest_memory_limit_both_sides(
    server: BackendServer, caplog: pytest.LogCaptureFixture
) -> None:
    fd = os.memfd_create("limit", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MAX_GUEST_MEMORY + PAGE)  # sparse: costs nothing
        with _fe(server) as fe:
            # Exactly the limit, as two regions: mapped.
            half = MAX_GUEST_MEMORY // 2
            table = [MemRegionDesc(0, half, 1 << 44, 0), MemRegionDesc(half, half, 1 << 45, half)]
            fe.request(Request.SET_MEM_TABLE, encode_mem_table(table), [fd, fd])
            server.wait_idle()
            assert server.backend.mem is not None
            assert server.backend.mem.total_size == MAX_GUEST_MEMORY
            # One page more: refused, naming the limit; the old table stays.
            table[1] = MemRegionDesc(half, half + PAGE, 1 << 45, half)
            _refused(fe, Request.SET_MEM_TABLE, encode_mem_table(table), [fd, fd], "guest memory")
            assert "guest memory limit" in _last_error(caplog)
            assert "1 TiB per connection" in _last_error(caplog)
            assert server.backend.mem.total_size == MAX_GUEST_MEMORY
    finally:
        os.close(fd)


def test_guest_memory_limit_counts_added_regions(
    server: BackendServer, caplog: pytest.LogCaptureFixture
) -> None:
    fd = os.memfd_create("limit", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, MAX_GUEST_MEMORY + PAGE)
        with _fe(server, add_mem_reg=True) as fe:
            big = MAX_GUEST_MEMORY - PAGE
            fe.request(Request.ADD_MEM_REG, encode_mem_reg(MemRegionDesc(0, big, 1 << 44, 0)), [fd])
            # The last page fits exactly; one more page does not.
            fe.request(
                Request.ADD_MEM_REG,
                encode_mem_reg(MemRegionDesc(big, PAGE, 1 << 45, big)),
                [fd],
            )
            _refused(
                fe,
                Request.ADD_MEM_REG,
                encode_mem_reg(MemRegionDesc(1 << 41, PAGE, 1 << 46, 0)),
                [fd],
                "guest memory",
            )
            assert "guest memory limit" in _last_error(caplog)
            server.wait_idle()
            assert server.backend.mem is not None
            assert server.backend.mem.total_size == MAX_GUEST_MEMORY
    finally:
        os.close(fd)


# -- memory regions ------------------------------------------------------------------------


def test_set_mem_table_region_limit(server: BackendServer) -> None:
    fd = os.memfd_create("regions", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 16 * PAGE)
        regions = [MemRegionDesc(i * PAGE, PAGE, (1 << 40) + i * PAGE, i * PAGE) for i in range(9)]
        with _fe(server) as fe:
            n = MEMORY_BASELINE_NREGIONS
            fe.request(Request.SET_MEM_TABLE, encode_mem_table(regions[:n]), [fd] * n)
            server.wait_idle()
            assert server.backend.mem is not None and len(server.backend.mem.regions) == n
        # Nine regions do not even decode (a broken frame): the connection goes.
        with _fe(server) as fe:
            fe.send_raw(Request.SET_MEM_TABLE, encode_mem_table(regions), [fd] * 9)
            with pytest.raises(PeerClosed):
                fe.recv_reply(timeout=2)
    finally:
        os.close(fd)


def test_add_mem_reg_slot_limit(server: BackendServer, caplog: pytest.LogCaptureFixture) -> None:
    fd = os.memfd_create("slots", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, (MAX_MEM_SLOTS + 1) * PAGE)
        with _fe(server, add_mem_reg=True) as fe:
            assert fe.max_mem_slots == MAX_MEM_SLOTS
            for i in range(MAX_MEM_SLOTS):
                r = MemRegionDesc(i * PAGE, PAGE, (1 << 40) + i * PAGE, i * PAGE)
                fe.request(Request.ADD_MEM_REG, encode_mem_reg(r), [fd])
            extra = MemRegionDesc(MAX_MEM_SLOTS * PAGE, PAGE, 1 << 41, MAX_MEM_SLOTS * PAGE)
            _refused(fe, Request.ADD_MEM_REG, encode_mem_reg(extra), [fd], "memory regions")
            assert "memory regions limit: all 32 slots in use" in _last_error(caplog)
            server.wait_idle()
            assert server.backend.mem is not None
            assert len(server.backend.mem.regions) == MAX_MEM_SLOTS
    finally:
        os.close(fd)


# -- the inflight buffer -------------------------------------------------------------------


def _get_inflight(fe: VhostUserFrontend, num_queues: int, queue_size: int) -> tuple[int, Inflight]:
    fe.inflight_fd = None
    assert fe.share_inflight(num_queues, queue_size)
    assert fe.inflight_fd is not None and fe.inflight is not None
    return fe.inflight_fd, fe.inflight


def test_inflight_shape_limits(server: BackendServer, caplog: pytest.LogCaptureFixture) -> None:
    queues = server.device.queues
    with _fe(server, inflight=True) as fe:
        assert fe.protocol_features & (1 << ProtocolFeature.INFLIGHT_SHMFD)
        # Both largest shapes are accepted and sized by the formula...
        fd, desc = _get_inflight(fe, queues, 32768)
        try:
            assert desc.mmap_size == queues * queue_region_size(32768) == os.fstat(fd).st_size
        finally:
            os.close(fd)
        fd, _ = _get_inflight(fe, 1, 1)
        os.close(fd)
        # ...one more queue, one more entry, or none at all are refused by name.
        for nq, qs, field in (
            (queues + 1, 256, "num_queues"),
            (0, 256, "num_queues"),
            (1, 32769, "queue_size"),
            (1, 0, "queue_size"),
        ):
            fe.send_raw(Request.GET_INFLIGHT_FD, encode_inflight(Inflight(0, 0, nq, qs)))
            with pytest.raises(PeerClosed):
                fe.recv_reply(timeout=2)  # a reply-carrying request: refused by closing
            assert f"{field} {nq if field == 'num_queues' else qs} is not in" in _last_error(caplog)
            fe.close()
            fe = _fe(server, inflight=True)
        fe.close()


def test_set_inflight_fd_bounds(server: BackendServer, caplog: pytest.LogCaptureFixture) -> None:
    with _fe(server, inflight=True) as fe:
        fd, desc = _get_inflight(fe, 2, 256)
        try:
            size = desc.mmap_size
            # The exact size is accepted; a larger claim maps only what the regions need.
            fe.request(Request.SET_INFLIGHT_FD, encode_inflight(desc), [fd])
            server.wait_idle()
            assert server.backend.inflight is not None and server.backend.inflight.size == size
            fe.request(
                Request.SET_INFLIGHT_FD, encode_inflight(Inflight(size * 1000, 0, 2, 256)), [fd]
            )
            server.wait_idle()
            assert server.backend.inflight.size == size
            for bad, what in (
                (Inflight(size - 1, 0, 2, 256), "is smaller than 2 queue regions"),
                (Inflight(size, PAGE, 2, 256), "exceeds fd size"),  # offset + size > fd
                (Inflight(size, 1, 2, 256), "mmap_offset 0x1 is not page-aligned"),
                (Inflight(size, 0, 3, 256), "num_queues 3 is not in 1..2"),
            ):
                _refused(fe, Request.SET_INFLIGHT_FD, encode_inflight(bad), [fd], what)
                assert what in _last_error(caplog), bad
        finally:
            os.close(fd)
            fe.inflight_fd = None


# -- connections and NICs ------------------------------------------------------------------


def test_held_connections_limit(tmp_path: Path) -> None:
    """A live front-end, then silent newcomers: the first MAX_HELD_CONNECTIONS are held, each
    one more closes the oldest; the live front-end never notices."""
    loop = SelectorLoop()
    path = tmp_path / "s.sock"
    srv = VhostUserServer(FakeDevice(), path, loop)
    silent: list[socket.socket] = []
    fe = VhostUserFrontend.connect(path)
    try:
        loop.poll(0.05)
        assert srv.connected
        for n in range(MAX_HELD_CONNECTIONS + 2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            silent.append(s)
            loop.poll(0.05)
            assert len(srv._held) == min(n + 1, MAX_HELD_CONNECTIONS)
        assert srv.evicted == 2
        for i, s in enumerate(silent):
            s.settimeout(0.1)
            try:
                got: bytes | None = s.recv(1)
            except TimeoutError:
                got = None  # still held, open
            assert (got == b"") is (i < 2), i  # the two oldest were closed
        # The live front-end still talks to its backend.
        fe.send_raw(Request.GET_FEATURES)
        loop.poll(0.2)
        assert fe.recv_reply(timeout=1).request == Request.GET_FEATURES
        assert srv.connections == 1 and srv.replaced == 0
    finally:
        fe.close()
        for s in silent:
            s.close()
        srv.close()
        loop.close()


def test_nic_limit(tmp_path: Path) -> None:
    with Device() as dev:
        for i in range(MAX_NICS):
            dev.add_nic(str(tmp_path / f"n{i}.sock"))
        with pytest.raises(LimitError, match="NICs limit: this device serves at most 64 NICs"):
            dev.add_nic(str(tmp_path / "one-more.sock"))
        assert len(dev.nics) == MAX_NICS
