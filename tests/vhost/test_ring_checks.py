"""vhost-user checks with no test before: a started ring refuses new addresses, a new base and
a new size (vhost-user.rst "Ring states": the ring must be stopped, GET_VRING_BASE, first),
the MTU range 68..65535 at both ends, and the ends of the other ranges the backend checks.

Each refusal is paired with the closest accepted request, so a check that refuses too much
fails as well as one that refuses too little.  Mutations killed (tools/mutants/
section5.toml, ``vhost-*``): each "is started" refusal removed; the MTU bounds moved by one
(``68 <=`` made ``68 <``, ``<= 65535`` made ``< 65535``, or widened); the vring index, packed
base and queue size bounds made off by one.
"""

from __future__ import annotations

import pytest

from vdev.vhost.codec import ProtocolFeature, Request, VringAddr, encode_addr, encode_state
from vdev.vhost.codec import encode_u64 as u64
from vdev.vhost.frontend import FrontendConfig, FrontendMemory, VhostUserError, VhostUserFrontend
from vdev.virtio.queue import F_RING_PACKED

from .conftest import BackendServer, FakeDevice
from .helpers import alloc_ring, close_rings, qemu_start


def _connect(server: BackendServer, **cfg: object) -> VhostUserFrontend:
    return VhostUserFrontend.connect(server.path, FrontendConfig(**cfg))  # type: ignore[arg-type]


def refused(fe: VhostUserFrontend, request: int, payload: bytes) -> None:
    with pytest.raises(VhostUserError, match="failed"):
        fe.request(request, payload)


def test_started_ring_refuses_new_addresses_but_not_the_same_ones(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory(16 << 20) as mem:
        rings = qemu_start(fe, mem, num=64)
        try:
            server.wait_idle()
            v = server.backend.vrings[1]
            assert v.started
            was = (v.desc_addr, v.avail_addr, v.used_addr)  # frontend virtual addresses
            same = encode_addr(VringAddr(1, 0, was[0], was[2], was[1], 0))
            fe.request(Request.SET_VRING_ADDR, same)  # a repeat changes nothing: accepted
            other = alloc_ring(mem, 1, 64)
            uva = [mem.uva_of(a) for a in (other.desc, other.avail, other.used)]
            moved = encode_addr(VringAddr(1, 0, uva[0], uva[2], uva[1], 0))
            refused(fe, Request.SET_VRING_ADDR, moved)
            server.wait_idle()
            assert (v.desc_addr, v.avail_addr, v.used_addr) == was
            # stopped (GET_VRING_BASE), the ring takes the new addresses
            fe.get_vring_base(1)
            fe.request(Request.SET_VRING_ADDR, moved)
            server.wait_idle()
            assert (v.desc_addr, v.avail_addr, v.used_addr) == tuple(uva)
            close_rings([other])
        finally:
            close_rings(rings)


def test_started_ring_refuses_a_new_base(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory(16 << 20) as mem:
        rings = qemu_start(fe, mem, num=64)
        try:
            server.wait_idle()
            v = server.backend.vrings[1]
            assert v.started and v.base == 0
            refused(fe, Request.SET_VRING_BASE, encode_state(1, 5))
            refused(fe, Request.SET_VRING_BASE, encode_state(1, 0))  # even the same value
            server.wait_idle()
            assert v.base == 0
            assert fe.get_vring_base(1) == 0
            fe.request(Request.SET_VRING_BASE, encode_state(1, 5))  # stopped: accepted
            server.wait_idle()
            assert v.base == 5
        finally:
            close_rings(rings)


def test_started_ring_refuses_a_new_size_but_not_the_same(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory(16 << 20) as mem:
        rings = qemu_start(fe, mem, num=64)
        try:
            fe.request(Request.SET_VRING_NUM, encode_state(1, 64))
            refused(fe, Request.SET_VRING_NUM, encode_state(1, 32))
            server.wait_idle()
            assert server.backend.vrings[1].num == 64
        finally:
            close_rings(rings)


@pytest.mark.parametrize(
    ("mtu", "ok"), [(67, False), (68, True), (1500, True), (9000, True), (65535, True),
                    (65536, False)],
)  # fmt: skip
def test_mtu_range_both_ends(tmp_path: object, mtu: int, ok: bool) -> None:
    """virtio 1.x 5.1.4.1: the MTU is at least 68 (RFC 791's minimum) and a u16."""
    from pathlib import Path

    class AnyMtu(FakeDevice):
        def set_mtu(self, value: int) -> None:  # no device limit: only the backend's range
            self.mtu = value

    dev = AnyMtu(protocol=1 << ProtocolFeature.MTU)
    srv = BackendServer(Path(str(tmp_path)) / "s.sock", dev)
    try:
        with _connect(srv, mtu=True, host_mtu=1500) as fe, FrontendMemory() as mem:
            fe.handshake()
            fe.start(mem)
            assert dev.mtu == 1500
            if ok:
                fe.request(Request.NET_SET_MTU, u64(mtu))
                srv.wait_idle()
                assert dev.mtu == mtu and srv.backend.mtu == mtu
            else:
                refused(fe, Request.NET_SET_MTU, u64(mtu))
                srv.wait_idle()
                assert dev.mtu == 1500 and srv.backend.mtu == 1500
    finally:
        srv.stop()
    assert not srv.errors


def test_vring_index_just_past_the_last_ring(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        fe.handshake()
        fe.start(mem)
        fe.request(Request.SET_VRING_NUM, encode_state(1, 64))  # the last ring (2 queues)
        refused(fe, Request.SET_VRING_NUM, encode_state(2, 64))


@pytest.mark.parametrize(("num", "ok"), [(1, True), (32768, True), (0, False), (65536, False)])
def test_split_ring_size_range_both_ends(server: BackendServer, num: int, ok: bool) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        fe.handshake()
        fe.start(mem)
        payload = encode_state(1, num)
        if ok:
            fe.request(Request.SET_VRING_NUM, payload)
        else:
            refused(fe, Request.SET_VRING_NUM, payload)


def test_split_base_is_a_u16(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        fe.handshake()
        fe.start(mem)
        fe.request(Request.SET_VRING_BASE, encode_state(1, 0xFFFF))
        refused(fe, Request.SET_VRING_BASE, encode_state(1, 0x10000))


class PackedFakeDevice(FakeDevice):
    FEATURES = FakeDevice.FEATURES | F_RING_PACKED


def test_packed_base_index_and_size_ends(tmp_path: object) -> None:
    """Packed: the base index must be < num (num - 1 accepted), sizes 1..32768 (any)."""
    from pathlib import Path

    srv = BackendServer(Path(str(tmp_path)) / "p.sock", PackedFakeDevice())
    try:
        with _connect(srv) as fe, FrontendMemory() as mem:
            fe.handshake()
            fe.start(mem, FakeDevice.FEATURES | F_RING_PACKED)
            fe.request(Request.SET_VRING_NUM, encode_state(1, 32768))
            refused(fe, Request.SET_VRING_NUM, encode_state(1, 32769))
            fe.request(Request.SET_VRING_NUM, encode_state(1, 100))
            fe.request(Request.SET_VRING_BASE, encode_state(1, 0x8000 | 99))
            refused(fe, Request.SET_VRING_BASE, encode_state(1, 0x8000 | 100))
    finally:
        srv.stop()
    assert not srv.errors
