"""Device-generated RX traffic (vdev/net/rxgen.py) through a served device and the mock driver.

The oracle is what the driver receives: every frame a byte-for-byte copy of the template
whose turn it is (templates in order, round after round), exactly ``count`` of them, and the
pool back to where it was once the generator stops.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.net import nic as nic_mod
from vdev.net.device import Device
from vdev.net.nic import GEN_ROUNDS, VirtioNet
from vdev.net.rxgen import MAX_TEMPLATES, RxGenerator
from vdev.skywalk import Pbufpool
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend
from vdev.virtio import fastqueue

RING = 16
TEMPLATES = [numbered(HOST_MAC, GUEST_MAC, i, size) for i, size in enumerate((60, 1500, 64))]


@pytest.fixture(
    params=[("per-nic", False), ("per-nic", True), ("single", False)],
    ids=["per-nic-split", "per-nic-packed", "single-split"],
)
def served(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Device, VirtioNet, VirtioNetFrontend]]:
    threads, packed = request.param
    path = str(tmp_path / "nic0.sock")
    with Device(threads=threads) as device:
        nic = device.add_nic(path)
        device.start()
        with VirtioNetFrontend(path, packed=packed, ring_size=RING) as fe:
            yield device, nic, fe


def held(pool: Pbufpool) -> tuple[int, int, int]:
    """Packets, external buflets and large buffers off the pool's free lists."""
    st = pool.stats
    return st.in_use, st.buflets_in_use, st.large_in_use


def _lock(device: Device, nic: VirtioNet) -> object:
    dp = device.datapaths.get(nic.name)
    return dp.lock if dp is not None else device.lock


def receive(fe: VirtioNetFrontend, want: int, timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += fe.recv(want - len(got), timeout=0.2)
    return got


def expected(n: int, start: int = 0) -> list[bytes]:
    return [TEMPLATES[(start + i) % len(TEMPLATES)] for i in range(n)]


def test_count_frames_arrive_in_template_order_then_nothing(
    served: tuple[Device, VirtioNet, VirtioNetFrontend],
) -> None:
    device, nic, fe = served
    in_use = held(device.pool)
    with _lock(device, nic):  # type: ignore[attr-defined]
        gen = nic.start_rx_generator(TEMPLATES, count=50)
    got = receive(fe, 50)
    assert got == expected(50)  # several rings' worth: the refills kept it going
    assert fe.recv(10, timeout=0.3) == []  # and then it stopped
    assert gen.done and gen.sent == 50 and nic.stats[0].frames == 50
    with _lock(device, nic):  # type: ignore[attr-defined]
        nic.stop_rx_generator()
    assert held(device.pool) == in_use and nic.rx_gen is None


def test_an_endless_generator_keeps_the_ring_full_until_stopped(
    served: tuple[Device, VirtioNet, VirtioNetFrontend],
) -> None:
    device, nic, fe = served
    with _lock(device, nic):  # type: ignore[attr-defined]
        nic.start_rx_generator(TEMPLATES)
    got = receive(fe, 5 * RING)
    assert got == expected(5 * RING)
    with _lock(device, nic):  # type: ignore[attr-defined]
        nic.stop_rx_generator()
        written = nic.stats[0].frames
    # What was written before the stop arrives; nothing after it.
    rest = receive(fe, written - len(got), timeout=2)
    assert got + rest == expected(written)
    assert fe.recv(10, timeout=0.3) == []


def test_an_rx_hook_sees_every_generated_frame(
    served: tuple[Device, VirtioNet, VirtioNetFrontend],
) -> None:
    """With a hook on the RX path (as a fault rule installs) the generator takes the exact
    path: fresh copies through the backlog and the hooks, not the compiled shortcut."""
    device, nic, fe = served
    seen: list[bytes] = []

    def hook(n: VirtioNet, index: int, pkts: list[int]) -> list[int]:
        seen.extend(n.pool.packet_bytes(p) for p in pkts)
        return pkts

    with _lock(device, nic):  # type: ignore[attr-defined]
        nic.rx_hooks.append(hook)
        nic.start_rx_generator(TEMPLATES, count=40)
    try:
        assert receive(fe, 40) == expected(40)
        assert seen == expected(40)
    finally:
        with _lock(device, nic):  # type: ignore[attr-defined]
            nic.rx_hooks.clear()
            nic.stop_rx_generator()


def test_the_reference_backend_generates_the_same_frames(tmp_path: Path) -> None:
    fastqueue.set_backend("python")
    try:
        path = str(tmp_path / "nic0.sock")
        with Device() as device:
            nic = device.add_nic(path)
            device.start()
            with VirtioNetFrontend(path, ring_size=RING) as fe:
                with _lock(device, nic):  # type: ignore[attr-defined]
                    nic.start_rx_generator(TEMPLATES, count=35)
                assert receive(fe, 35) == expected(35)
                assert fe.recv(10, timeout=0.3) == []
                with _lock(device, nic):  # type: ignore[attr-defined]
                    nic.stop_rx_generator()
    finally:
        fastqueue.set_backend("c")


@pytest.mark.parametrize(
    ("frames", "count", "why"),
    [([], None, "0 template frames"), ([TEMPLATES[0]] * (MAX_TEMPLATES + 1), None, "257 template"),
     (TEMPLATES, -1, "count -1")],
)  # fmt: skip
def test_bad_generators_are_refused_by_name(
    frames: list[bytes], count: int | None, why: str
) -> None:
    with Device() as device:
        in_use = held(device.pool)
        with pytest.raises(ValueError, match=why):
            RxGenerator(device.pool, frames, count)
        assert held(device.pool) == in_use


def test_the_largest_template_set_is_accepted(tmp_path: Path) -> None:
    with Device() as device:
        gen = RxGenerator(device.pool, [TEMPLATES[0]] * MAX_TEMPLATES, 1)
        assert len(gen.next_templates()) == 1  # at most what is left to send
        gen.close()


def test_one_template_fills_a_ring_larger_than_a_drains_bursts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bursts of 2 frames: a drain writes GEN_ROUNDS * 2, fewer than the ring has room for;
    the rest comes from the drain it defers, with no kick from the driver."""
    monkeypatch.setattr(nic_mod, "GEN_BURST", 2)
    room = 4 * GEN_ROUNDS * 2
    path = str(tmp_path / "nic0.sock")
    with Device() as device:
        nic = device.add_nic(path)
        device.start()
        with VirtioNetFrontend(path, ring_size=room) as fe:
            _first_kick_taken(device, nic)
            kicks = nic.stats[0].kicks
            with _lock(device, nic):  # type: ignore[attr-defined]
                nic.start_rx_generator(TEMPLATES[:1], count=room - 2)
            deadline = time.monotonic() + 5
            while nic.stats[0].frames < room - 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert nic.stats[0].frames == room - 2 and nic.stats[0].kicks == kicks
            assert receive(fe, room - 2) == [TEMPLATES[0]] * (room - 2)
            with _lock(device, nic):  # type: ignore[attr-defined]
                nic.stop_rx_generator()


def test_a_long_burst_runs_the_templates_over_and_over_from_where_it_stopped() -> None:
    with Device() as device:
        gen = RxGenerator(device.pool, TEMPLATES, count=10)
        pkts = gen.pkts
        assert list(gen.next_templates(7)) == [pkts[i % 3] for i in range(7)]
        gen.wrote(4)  # the burst stopped after 4: the next starts at template 4 % 3
        assert list(gen.next_templates(7)) == [pkts[(4 + i) % 3] for i in range(6)]  # 6 left
        assert list(gen.next_templates()) == [pkts[1], pkts[2], pkts[0]]  # one round
        gen.close()


def _wait_frames(nic: VirtioNet, n: int) -> None:
    deadline = time.monotonic() + 5
    while nic.stats[0].frames < n and time.monotonic() < deadline:
        time.sleep(0.002)


def _first_kick_taken(device: Device, nic: VirtioNet) -> None:
    """The kick of the driver's first posting handled (a late one would drain buffers a
    test posts without a kick)."""
    deadline = time.monotonic() + 5
    while nic.stats[0].kicks < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    with _lock(device, nic):  # type: ignore[attr-defined]
        assert nic.stats[0].kicks == 1


@pytest.mark.parametrize("batch", [0, 1], ids=["batching", "off"])
def test_a_generated_stream_batches_the_refill_kicks(tmp_path: Path, batch: int) -> None:
    """RX kick batching (rxbatch.py) applies to generated frames as to backlogged ones: once
    the ring is full, the driver's own reading says a kick is due after half the ring's
    buffers (8 of 16), not after each one; with the batch off, after each one."""
    path = str(tmp_path / "nic0.sock")
    with Device(rx_kick_batch=batch, notify_watch="off") as device:
        nic = device.add_nic(path)
        device.start()
        with VirtioNetFrontend(path, ring_size=RING) as fe:
            _first_kick_taken(device, nic)
            with _lock(device, nic):  # type: ignore[attr-defined]
                nic.start_rx_generator(TEMPLATES)
            q = fe.rxq()
            written = RING
            # The stop that starts batching re-arms for the next buffer; the one after it
            # for a batch: 9 buffers in the first round, 8 in the next ones.
            for posts in (9, 8, 8):
                _wait_frames(nic, written)
                with _lock(device, nic):  # type: ignore[attr-defined]
                    pass  # the drain that wrote them has returned (its re-arm done)
                assert nic.stats[0].frames == written
                fe._rx_used(q)  # the driver takes them, then posts one by one
                kicks = []
                for _ in range(posts):
                    slot = q.free_bufs.pop()
                    q.head_buf[q.driver.add_chain([], [(q.buf_addr(slot), q.buf_size)])] = slot
                    q.driver.publish()
                    kicks.append(q.driver.kick_needed())
                    if kicks[-1]:
                        os.eventfd_write(q.kick_fd, 1)
                        if batch == 1 or (posts == 9 and len(kicks) == 1):
                            written += 1  # each kick: the one buffer written
                            _wait_frames(nic, written)
                if batch == 1:
                    assert kicks == [True] * posts
                else:
                    assert kicks == ([True] if posts == 9 else []) + [False] * 7 + [True]
                    written += 8
            _wait_frames(nic, written)
            assert nic.stats[0].frames == written
            with _lock(device, nic):  # type: ignore[attr-defined]
                nic.stop_rx_generator()


def test_the_control_socket_and_vdev_ctl_start_and_stop_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``vdev ctl generate`` (the control socket's "generate"): numbered frames from the
    responder's MAC to the NIC's, of the size asked, as many as asked; refusals name the
    field; ``--stop`` reports what was sent."""
    import argparse
    import json

    from host import cli_ctl
    from vdev.faults.control import ControlServer, request
    from vdev.testing.frames import RESPONDER_MAC, seq_of

    def ctl(*argv: str) -> tuple[int, dict[str, object]]:
        parser = argparse.ArgumentParser(prog="vdev")
        cli_ctl.register(parser.add_subparsers())
        args = parser.parse_args(["ctl", "--socket", ctl_path, "--json", *argv])
        rc = int(args.func(args))
        out, err = capsys.readouterr()
        return rc, json.loads(out or err)

    path, ctl_path = str(tmp_path / "nic0.sock"), str(tmp_path / "ctl.sock")
    with Device() as device:
        nic = device.add_nic(path, mac="52:54:00:12:34:56")
        srv = ControlServer(device, ctl_path)
        device.start()
        try:
            with VirtioNetFrontend(path, ring_size=RING) as fe:
                rc, reply = ctl("generate", "--size", "100", "--count", "40")
                assert rc == 0 and reply["generating"] == {"nic": "nic0", "size": 100, "count": 40}
                got = receive(fe, 40)
                assert [len(f) for f in got] == [100] * 40
                assert [seq_of(f) for f in got] == [i % 256 for i in range(40)]
                assert {f[:12] for f in got} == {bytes.fromhex("525400123456") + RESPONDER_MAC}
                assert fe.recv(5, timeout=0.3) == []
                stats = request(ctl_path, {"cmd": "stats"})["device"]["nics"][0]
                assert stats["rx_generator"] == {"sent": 40, "remaining": 0}
                rc, reply = ctl("generate", "--stop")
                assert rc == 0 and reply["sent"] == 40 and reply["stopped"] is True
                assert nic.rx_gen is None
                for req, why in [
                    ({"size": 59}, "size: 59 bytes, want 60 to 9014"),
                    ({"size": 9015}, "size: 9015 bytes, want 60 to 9014"),
                    ({"count": -1}, "count: -1 must be >= 0"),
                    ({"count": "x"}, "count: 'x' is not an integer"),
                    ({"stop": 1}, "stop: 1 must be true or false"),
                    ({"stop": True, "size": 64}, "stop: takes no size or count"),
                    ({"nic": 3}, "nic: no NIC 3"),
                ]:
                    reply = request(ctl_path, {"cmd": "generate", **req})
                    assert reply["ok"] is False and why in str(reply["error"]), reply
                assert nic.rx_gen is None
        finally:
            srv.close()
