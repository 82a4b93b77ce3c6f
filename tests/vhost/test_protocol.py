"""Protocol tests: the front-end replays QEMU 7.2 against a VhostUserBackend + fake device."""

from __future__ import annotations

import os

import pytest

from vdev.vhost.codec import ProtocolFeature, Request, encode_state, encode_u64
from vdev.vhost.frontend import (
    FrontendConfig,
    FrontendMemory,
    VhostUserError,
    VhostUserFrontend,
)

from .conftest import BackendServer, FakeDevice
from .helpers import QEMU_HANDSHAKE, RING_SETUP, close_rings, qemu_start

F_PROTO = 1 << 30


def _connect(server: BackendServer, **cfg: object) -> VhostUserFrontend:
    return VhostUserFrontend.connect(server.path, FrontendConfig(**cfg))  # type: ignore[arg-type]


def _tx(ring_driver: object, mem: FrontendMemory, data: bytes) -> int:
    buf = mem.alloc(len(data), 16)
    mem.write(buf, data)
    head: int = ring_driver.add_chain([(buf, len(data))])  # type: ignore[attr-defined]
    ring_driver.publish()  # type: ignore[attr-defined]
    return head


@pytest.mark.parametrize("add_mem_reg", [False, True], ids=["set_mem_table", "add_mem_reg"])
def test_qemu_sequence(server: BackendServer, device: FakeDevice, add_mem_reg: bool) -> None:
    with _connect(server, add_mem_reg=add_mem_reg) as fe, FrontendMemory(16 << 20) as mem:
        rings = qemu_start(fe, mem)
        try:
            server.wait_idle()
            b = server.backend
            # QEMU only starts the datapath if the backend offers bit 30.
            assert fe.backend_features & F_PROTO
            assert fe.backend_features & ~F_PROTO == FakeDevice.FEATURES
            for bit in ("MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS", "STATUS"):
                assert fe.protocol_features & (1 << ProtocolFeature[bit]), bit
            assert fe.queue_num == 2 and fe.max_mem_slots == 32
            mem_msgs = [Request.ADD_MEM_REG] * 2 if add_mem_reg else [Request.SET_MEM_TABLE]
            expected = (
                QEMU_HANDSHAKE
                + [Request.SET_FEATURES, Request.GET_STATUS, Request.SET_STATUS]
                + mem_msgs
                + RING_SETUP * 2
                + [Request.GET_STATUS, Request.SET_STATUS]
                + [Request.SET_VRING_ENABLE] * 2
            )
            # REPLY_ACK was used for every request without its own reply and every ack was 0.
            assert fe.sent == expected
            assert b.features == FakeDevice.FEATURES | F_PROTO
            assert b.status == 0xF
            assert [(r.gpa, r.size) for r in b.mem.regions] == [(0, 0xA0000), (0xC0000, 0xF40000)]
            assert all(r.uva != r.gpa for r in b.mem.regions)
            # "Ring states": each ring started (disabled) at its KICK, and was announced
            # again when SET_VRING_ENABLE 1 enabled it.
            names = device.names()
            assert names.count("queue_started") == 4
            assert names.index("queue_started") > names.index("features_set")
            assert device.enabled_at_start == [(0, False), (1, False), (0, True), (1, True)]
            assert sorted(device.started) == [0, 1]
            for r in rings:
                v = b.vrings[r.index]
                assert (v.desc_addr, v.avail_addr, v.used_addr) == tuple(
                    mem.uva_of(a) for a in (r.desc, r.avail, r.used)
                )
                assert v.started and v.enabled and v.kick_fd is not None
            # End to end through gpa != uva: the driver posts a TX buffer, the device pops it.
            assert rings[1].driver is not None
            head = _tx(rings[1].driver, mem, b"hello vhost")
            q = b.vrings[1].queue
            assert q is not None
            chain = q.pop()
            assert chain is not None and chain.read_bytes() == b"hello vhost"
            q.push(chain.head, 0)
            q.flush_used()
            chain.release()
            assert rings[1].driver.get_used() == [(head, 0)]
            # Stop like QEMU: SET_STATUS 0 first, then GET_VRING_BASE (status 0 keeps rings).
            bases = fe.stop()
            assert bases == {0: 0, 1: 1}
            server.wait_idle()
            assert device.names().count("queue_stopped") == 2
            # queue_stopped came while the queue object still existed
            assert all(e[2] for e in device.events if e[0] == "queue_stopped")
        finally:
            close_rings(rings)


def test_without_optional_protocol_features(server: BackendServer, device: FakeDevice) -> None:
    cfg = {"mq": False, "reply_ack": False, "status": False, "mem_slots": False}
    with _connect(server, **cfg) as fe, FrontendMemory(8 << 20, regions=1) as mem:
        rings = qemu_start(fe, mem, num=64)
        try:
            assert Request.GET_QUEUE_NUM not in fe.sent
            assert Request.GET_MAX_MEM_SLOTS not in fe.sent
            assert Request.GET_STATUS not in fe.sent
            server.wait_idle()
            assert sorted(device.started) == [0, 1]
            assert fe.stop() == {0: 0, 1: 0}
        finally:
            close_rings(rings)


def test_get_vring_base_returns_last_avail_idx(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=8)
        try:
            drv = rings[1].driver
            assert drv is not None
            for i in range(5):
                _tx(drv, mem, bytes([i]) * 10)
            server.wait_idle()
            q = server.backend.vrings[1].queue
            assert q is not None
            for _ in range(3):
                c = q.pop()
                assert c is not None
                c.release()
            assert fe.get_vring_base(1) == 3
            # The ring is stopped now and its kick/call fds are gone.
            server.wait_idle()
            v = server.backend.vrings[1]
            assert not v.started and v.queue is None and v.kick_fd is None
            assert fe.get_vring_base(0) == 0
        finally:
            close_rings(rings)


def test_status_zero_does_not_reset_rings(server: BackendServer, device: FakeDevice) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        try:
            assert rings[1].driver is not None
            _tx(rings[1].driver, mem, b"x" * 20)
            _tx(rings[1].driver, mem, b"y" * 20)
            server.wait_idle()
            q = server.backend.vrings[1].queue
            assert q is not None
            for _ in range(2):
                c = q.pop()
                assert c is not None
                c.release()
            fe.set_status(0)
            server.wait_idle()
            v = server.backend.vrings[1]
            assert v.started and v.enabled and v.queue is q
            assert "queue_stopped" not in device.names()
            assert fe.get_vring_base(1) == 2
        finally:
            close_rings(rings)


def test_set_vring_call_twice_closes_old_fd(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        r_old, w_old = os.pipe()
        r_new, w_new = os.pipe()
        try:
            fe.request(Request.SET_VRING_CALL, encode_u64(0), [w_old])
            os.close(w_old)
            server.wait_idle()
            v = server.backend.vrings[0]
            os.write(v.call_fd, b"1")  # the device signals through the live field
            assert os.read(r_old, 1) == b"1"
            fe.request(Request.SET_VRING_CALL, encode_u64(0), [w_new])
            server.wait_idle()
            # The backend closed its copy of the old write end: the old pipe sees EOF.
            assert os.read(r_old, 1) == b""
            os.write(v.call_fd, b"2")
            assert os.read(r_new, 1) == b"2"
            # The "invalid fd" flag removes the call fd altogether.
            fe.request(Request.SET_VRING_CALL, encode_u64(0x100))
            server.wait_idle()
            assert v.call_fd is None
            os.close(w_new)
            assert os.read(r_new, 1) == b""
        finally:
            for fd in (r_old, r_new):
                os.close(fd)
            close_rings(rings)


def test_reconnect_restores_rings(server: BackendServer, device: FakeDevice) -> None:
    with FrontendMemory() as mem:
        fe = _connect(server)
        rings = qemu_start(fe, mem, num=16)
        assert rings[1].driver is not None
        for i in range(4):
            _tx(rings[1].driver, mem, bytes([i]) * 8)
        server.wait_idle()
        q = server.backend.vrings[1].queue
        assert q is not None
        for _ in range(4):
            c = q.pop()
            assert c is not None
            q.push(c.head, 0)
            c.release()
        q.flush_used()
        used = rings[1].driver.read_used_idx()
        assert used == 4
        # The backend "crashes" from QEMU's point of view: the connection goes away.
        fe.close()
        server.wait_disconnects(1)
        assert "disconnected" in device.names()
        close_rings(rings)
        # QEMU replays the whole sequence with SET_VRING_BASE = the guest's used index.
        with _connect(server) as fe2:
            rings2 = qemu_start(fe2, mem, num=16, bases=(0, used))
            try:
                server.wait_idle()
                b = server.backends[-1]
                assert len(server.backends) == 2
                q2 = b.vrings[1].queue
                assert q2 is not None
                assert q2.last_avail_idx == 4 and q2.used_idx == 4
                assert rings2[1].driver is not None
                _tx(rings2[1].driver, mem, b"after reconnect")
                c = q2.pop()
                assert c is not None and c.read_bytes() == b"after reconnect"
                c.release()
                assert fe2.stop() == {0: 0, 1: 5}
            finally:
                close_rings(rings2)


def test_reply_ack(server: BackendServer) -> None:
    with _connect(server) as fe:
        fe.handshake()
        # Success: ack 0.
        fe.send_raw(Request.SET_VRING_NUM, encode_state(0, 256), flags=0x9)
        ack = fe.recv_reply()
        assert ack.request == Request.SET_VRING_NUM and ack.payload == encode_u64(0)
        # Failure: non-zero, and the connection stays up.
        fe.send_raw(Request.SET_VRING_NUM, encode_state(0, 100), flags=0x9)
        assert fe.recv_reply().payload != encode_u64(0)
        # Requests with their own reply get exactly that, need_reply or not.
        fe.send_raw(Request.GET_QUEUE_NUM, b"", flags=0x9)
        assert fe.recv_reply().payload == encode_u64(2)
        # Without need_reply nothing comes back.
        fe.send_raw(Request.SET_VRING_NUM, encode_state(0, 256))
        fe.send_raw(Request.GET_FEATURES)
        assert fe.recv_reply().request == Request.GET_FEATURES


def test_reply_ack_not_negotiated_means_no_ack(server: BackendServer) -> None:
    with _connect(server, reply_ack=False) as fe:
        fe.handshake()
        fe.send_raw(Request.SET_VRING_NUM, encode_state(0, 256), flags=0x9)
        fe.send_raw(Request.GET_FEATURES)
        assert fe.recv_reply().request == Request.GET_FEATURES


def test_disable_keeps_ring_started(server: BackendServer, device: FakeDevice) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        try:
            fe.set_vring_enable(0, False)
            server.wait_idle()
            # Started but disabled: still the device's (it must discard TX, supply no RX).
            assert sorted(device.started) == [0, 1]
            v = server.backend.vrings[0]
            assert v.started and not v.enabled and not v.running
            assert "queue_stopped" not in device.names()
            n = device.names().count("queue_started")
            fe.set_vring_enable(0, True)
            server.wait_idle()
            assert v.running
            assert device.names().count("queue_started") == n + 1  # announced again
            fe.set_vring_enable(0, True)  # already enabled: no new announcement
            server.wait_idle()
            assert device.names().count("queue_started") == n + 1
        finally:
            close_rings(rings)


def test_set_features_without_bit30_enables_rings(server: BackendServer) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        fe.handshake()  # leaves every ring disabled (SET_VRING_ENABLE 0)
        server.wait_idle()
        assert not any(v.enabled for v in server.backend.vrings)
        # A legacy front-end acks features without bit 30: "Ring states" says the rings
        # then start directly in the enabled state.
        fe.request(Request.SET_FEATURES, encode_u64(FakeDevice.FEATURES))
        server.wait_idle()
        assert all(v.enabled for v in server.backend.vrings)
        fe.share_memory(mem)


def test_mtu_and_rarp_and_config(tmp_path: object, no_fd_leak: None) -> None:
    from pathlib import Path

    dev = FakeDevice(protocol=(1 << ProtocolFeature.MTU) | (1 << ProtocolFeature.CONFIG))
    srv = BackendServer(Path(str(tmp_path)) / "s.sock", dev)
    try:
        cfg = FrontendConfig(mtu=True, host_mtu=1500)
        with VhostUserFrontend.connect(srv.path, cfg) as fe, FrontendMemory() as mem:
            fe.handshake()
            assert fe.protocol_features & (1 << ProtocolFeature.MTU)
            fe.start(mem)
            assert fe.sent.index(Request.NET_SET_MTU) < fe.sent.index(Request.SET_FEATURES)
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.NET_SET_MTU, encode_u64(9500))  # device refuses
            fe.request(Request.SEND_RARP, encode_u64(0x665544332211))
            srv.wait_idle()
            assert dev.mtu == 1500
            # CONFIG offered but not negotiated: zero-length payload = error.
            from vdev.vhost.codec import encode_config

            fe.send_raw(Request.GET_CONFIG, encode_config(0, 0, bytes(6)))
            assert fe.recv_reply().payload == b""
    finally:
        srv.stop()
    assert not srv.errors


def test_backend_req_fd_kept_and_closed(tmp_path: object, no_fd_leak: None) -> None:
    from pathlib import Path

    dev = FakeDevice(protocol=1 << ProtocolFeature.SLAVE_REQ)
    srv = BackendServer(Path(str(tmp_path)) / "s.sock", dev)
    try:
        with VhostUserFrontend.connect(srv.path, FrontendConfig(backend_req=True)) as fe:
            fe.handshake()
            assert Request.SET_SLAVE_REQ_FD in fe.sent
            srv.wait_idle()
            assert srv.backend.backend_req_fd is not None
    finally:
        srv.stop()
    assert not srv.errors


def test_memory_table_replaced_while_running(server: BackendServer, device: FakeDevice) -> None:
    with _connect(server) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        try:
            old = server.backend.mem
            fe.share_memory(mem)  # same layout again, as QEMU does on memory changes
            server.wait_idle()
            b = server.backend
            assert b.mem is not old
            assert sorted(device.started) == [0, 1]
            assert rings[1].driver is not None
            _tx(rings[1].driver, mem, b"after remap")
            q = b.vrings[1].queue
            assert q is not None and q.mem is b.mem
            c = q.pop()
            assert c is not None and c.read_bytes() == b"after remap"
            c.release()
        finally:
            close_rings(rings)


def test_add_and_remove_region(server: BackendServer, device: FakeDevice) -> None:
    from vdev.vhost.codec import MemRegionDesc, encode_mem_reg

    with _connect(server, add_mem_reg=True) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        extra = os.memfd_create("extra", os.MFD_CLOEXEC)
        try:
            os.ftruncate(extra, 1 << 20)
            reg = MemRegionDesc(0x4000_0000, 1 << 20, 0x10_0000_0000, 0)
            fe.request(Request.ADD_MEM_REG, encode_mem_reg(reg), [extra])
            server.wait_idle()
            assert len(server.backend.mem.regions) == 3
            fe.request(Request.REM_MEM_REG, encode_mem_reg(reg))
            server.wait_idle()
            assert len(server.backend.mem.regions) == 2
            # Removing the region the rings live in is refused while they run.
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.REM_MEM_REG, encode_mem_reg(mem.regions[1]))
            # Removing something never added is refused too.
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.REM_MEM_REG, encode_mem_reg(reg))
            assert sorted(device.started) == [0, 1]
        finally:
            os.close(extra)
            close_rings(rings)


def test_client_mode(tmp_path: object, device: FakeDevice, no_fd_leak: None) -> None:
    """``vdev serve --client``: the front-end (QEMU ``server=on``) listens, the backend
    connects with retry and is driven exactly as in server mode."""
    import threading
    from pathlib import Path

    from vdev.vhost.backend import VhostUserBackend
    from vdev.vhost.connection import Listener, connect

    path = Path(str(tmp_path)) / "qemu-server.sock"
    errors: list[BaseException] = []

    def backend_side() -> None:
        try:
            b = VhostUserBackend(device, connect(path, timeout=5))
            import select

            while not b.closed:
                select.select([b], [], [], 0.05)
                if not b.handle_readable():
                    break
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=backend_side)
    t.start()  # starts before the listener exists: connect() retries
    try:
        import time

        time.sleep(0.2)
        with Listener(path) as lst:
            with VhostUserFrontend.accept(lst) as fe, FrontendMemory() as mem:
                rings = qemu_start(fe, mem, num=32)
                try:
                    assert fe.stop() == {0: 0, 1: 0}
                finally:
                    close_rings(rings)
    finally:
        t.join(5)
    assert not errors
    assert device.names()[-1] == "disconnected"


def test_add_mem_reg_up_to_max_mem_slots(server: BackendServer, device: FakeDevice) -> None:
    """ADD_MEM_REG fills the slots the backend announced (GET_MAX_MEM_SLOTS) and not one
    more: the last free slot is accepted, the next region refused with the table unchanged
    (both sides of the limit; kills ``>=`` made ``>`` in mutmut's sample of backend.py)."""
    from vdev.vhost.codec import MemRegionDesc, encode_mem_reg

    with _connect(server, add_mem_reg=True) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        extra = os.memfd_create("extra", os.MFD_CLOEXEC)
        try:
            os.ftruncate(extra, 64 << 12)
            have = len(server.backend.mem.regions)
            assert fe.max_mem_slots == 32 and have < 32

            def reg(i: int) -> MemRegionDesc:
                return MemRegionDesc(
                    0x4000_0000 + i * 0x10_0000, 4096, 0x10_0000_0000 + i * 0x10_0000, i * 4096
                )

            for i in range(32 - have):
                fe.request(Request.ADD_MEM_REG, encode_mem_reg(reg(i)), [extra])
            server.wait_idle()
            assert len(server.backend.mem.regions) == 32
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.ADD_MEM_REG, encode_mem_reg(reg(40)), [extra])
            server.wait_idle()
            assert len(server.backend.mem.regions) == 32
            assert sorted(device.started) == [0, 1]
        finally:
            os.close(extra)
            close_rings(rings)


def test_refusals_of_a_running_ring_name_request_and_field(
    server: BackendServer, device: FakeDevice, caplog: pytest.LogCaptureFixture
) -> None:
    """With REPLY_ACK the front-end only sees "failed"; the backend's log line is where the
    request and the field are named (an operator's only clue).  Moving a started ring's
    addresses names ``desc_addr``; removing the region a running ring lives in names
    ``region`` (both had only their refusal tested)."""
    import logging

    from vdev.vhost.codec import VringAddr, encode_addr, encode_mem_reg

    caplog.set_level(logging.ERROR, logger="vdev.vhost")
    with _connect(server, add_mem_reg=True) as fe, FrontendMemory() as mem:
        rings = qemu_start(fe, mem, num=16)
        try:
            r = rings[0]
            moved = VringAddr(0, 0, r.desc + 4096, r.used, r.avail, 0)
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.SET_VRING_ADDR, encode_addr(moved))
            with pytest.raises(VhostUserError, match="failed"):
                fe.request(Request.REM_MEM_REG, encode_mem_reg(mem.regions[1]))
            server.wait_idle()
            errors = [rec.getMessage() for rec in caplog.records]
            assert (
                "vhost-user: VHOST_USER_SET_VRING_ADDR: desc_addr: vring 0 is started; "
                "failure reply"
            ) in errors, errors
            gpa = mem.regions[1].gpa
            assert any(
                m.startswith(f"vhost-user: VHOST_USER_REM_MEM_REG: region: gpa {gpa:#x} holds")
                for m in errors
            ), errors
        finally:
            close_rings(rings)
