"""vhost-user with VIRTIO_F_RING_PACKED (virtio 1.x 2.8): the backend builds PackedQueue,
SET/GET_VRING_BASE carry the packed encoding, ring sizes and areas follow 2.8; split rings
keep their checks when packed is not negotiated."""

from __future__ import annotations

import os

import pytest

from vdev.vhost.codec import Request, encode_state
from vdev.vhost.frontend import FrontendConfig, FrontendMemory, VhostUserError, VhostUserFrontend
from vdev.virtio.packed import PackedQueue
from vdev.virtio.packed_driver import PackedDriverQueue
from vdev.virtio.queue import F_RING_PACKED
from vdev.virtio.split import SplitQueue

from .conftest import BackendServer, FakeDevice

FRESH = 0x8000 | 0x8000 << 16  # QEMU 7.2, fresh ring: avail 0 wrap 1, used 0 wrap 1


class PackedFakeDevice(FakeDevice):
    FEATURES = FakeDevice.FEATURES | F_RING_PACKED


@pytest.fixture
def device() -> FakeDevice:
    return PackedFakeDevice()


def _start(
    fe: VhostUserFrontend, mem: FrontendMemory, *, packed: bool, num: int, base: int
) -> tuple[list[int], PackedDriverQueue | None]:
    fe.handshake()
    features = FakeDevice.FEATURES | (F_RING_PACKED if packed else 0)
    fe.start(mem, features)
    desc = mem.alloc(16 * num, 16)
    drv_ev, dev_ev = mem.alloc(4, 4), mem.alloc(4, 4)
    drv = PackedDriverQueue(mem, num, desc, drv_ev, dev_ev, features=features) if packed else None
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fe.setup_vring(1, num, desc, drv_ev, dev_ev, kick, call, base)
    return [kick, call], drv


def test_packed_ring_started_with_packed_base(server: BackendServer) -> None:
    with (
        VhostUserFrontend.connect(server.path, FrontendConfig()) as fe,
        FrontendMemory(16 << 20) as mem,
    ):
        # 100 entries: packed rings need not be a power of two (2.8).
        fds, drv = _start(fe, mem, packed=True, num=100, base=FRESH)
        try:
            server.wait_idle()
            q = server.backend.vrings[1].queue
            assert isinstance(q, PackedQueue)
            assert (q.last_avail_idx, q.used_idx, q.used_wrap) == (0x8000, 0, 1)
            assert drv is not None
            buf = mem.alloc(64, 16)
            for _ in range(130):  # across the wrap: 130 % 100 = 30, wrap counter 0
                drv.add_chain([(buf, 64)])
                drv.publish()
                server.wait_idle()
                c = q.pop()  # the fake device never touches rings: no race here
                assert c is not None
                q.push(c.head, 0)
                q.flush_used()
                assert drv.get_used() == [(c.head, 0)]
            # GET_VRING_BASE: avail 30/wrap 0 in bits 0-15, used 30/wrap 0 in bits 16-31.
            assert fe.get_vring_base(1) == 30 | 30 << 16
            assert server.backend.vrings[1].queue is None
        finally:
            for fd in fds:
                os.close(fd)
            if drv is not None:
                drv.close()


def test_packed_base_restores_wrap_counter(server: BackendServer) -> None:
    with (
        VhostUserFrontend.connect(server.path, FrontendConfig()) as fe,
        FrontendMemory(16 << 20) as mem,
    ):
        fds, drv = _start(fe, mem, packed=True, num=64, base=5 | 5 << 16)  # wrap 0
        try:
            server.wait_idle()
            q = server.backend.vrings[1].queue
            assert isinstance(q, PackedQueue)
            assert (q.last_avail_idx, q.avail_wrap, q.used_idx, q.used_wrap) == (5, 0, 5, 0)
            assert fe.get_vring_base(1) == 5 | 5 << 16
        finally:
            for fd in fds:
                os.close(fd)
            if drv is not None:
                drv.close()


def test_packed_base_index_beyond_ring_is_refused(server: BackendServer) -> None:
    with (
        VhostUserFrontend.connect(server.path, FrontendConfig()) as fe,
        FrontendMemory(16 << 20) as mem,
    ):
        fe.handshake()
        fe.start(mem, FakeDevice.FEATURES | F_RING_PACKED)
        fe.request(Request.SET_VRING_NUM, encode_state(1, 64))
        with pytest.raises(VhostUserError, match="failed"):
            fe.request(Request.SET_VRING_BASE, encode_state(1, 0x8000 | 64))


def test_split_keeps_split_checks(server: BackendServer) -> None:
    """Offered but not negotiated: SplitQueue, 16-bit bases and power-of-2 sizes as before."""
    with (
        VhostUserFrontend.connect(server.path, FrontendConfig()) as fe,
        FrontendMemory(16 << 20) as mem,
    ):
        fe.handshake()
        assert fe.backend_features & F_RING_PACKED
        fe.start(mem, FakeDevice.FEATURES)
        with pytest.raises(VhostUserError, match="failed"):
            fe.request(Request.SET_VRING_NUM, encode_state(1, 100))
        with pytest.raises(VhostUserError, match="failed"):
            fe.request(Request.SET_VRING_BASE, encode_state(1, FRESH))
        desc = mem.alloc(16 * 64, 16)
        avail, used = mem.alloc(6 + 2 * 64, 2), mem.alloc(6 + 8 * 64, 4)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            fe.setup_vring(1, 64, desc, avail, used, kick, call, 7)
            server.wait_idle()
            q = server.backend.vrings[1].queue
            assert isinstance(q, SplitQueue) and q.last_avail_idx == 7
            assert fe.get_vring_base(1) == 7
        finally:
            os.close(kick)
            os.close(call)
