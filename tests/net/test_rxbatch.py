"""RX kick batching (vdev/net/rxbatch.py) through a served device and the mock driver.

The driver's side is the oracle: after each buffer it posts, whether it must kick is its
own reading of the device's suppression state (``kick_needed``: 2.7.10's
``vring_need_event`` over ``avail_event``, or 2.8.10's rule over the packed device event
area), and what arrived is compared frame by frame with what the host sent.  The fallback
check is recorded instead of run on a timer, and the batching reads a clock the test sets,
so each test decides when a check runs and how much time passed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vdev.net.device import Device
from vdev.net.nic import VirtioNet
from vdev.net.rxbatch import BACKOFF_MIN_S, MAX_BATCH, RxKickBatch, check_batch
from vdev.skywalk.channel import Channel
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend
from vdev.virtio.queue import F_EVENT_IDX

RING = 16  # half of it: the default batch
RX = 0


@dataclass
class Rig:
    device: Device
    nic: VirtioNet
    batch: RxKickBatch
    fe: VirtioNetFrontend
    ch: Channel
    lock: AbstractContextManager[Any]
    checks: list[Callable[[], None]]  # recorded, not yet run
    clock: list[float]
    path: str
    packed: bool
    sent: int = 0  # frames the host sent so far
    got: int = 0  # frames the driver received so far

    def send(self, n: int) -> None:
        frames = [numbered(HOST_MAC, GUEST_MAC, self.sent + i) for i in range(n)]
        assert self.ch.send(frames) == n
        self.sent += n

    def written(self, want: int, timeout: float = 5.0) -> int:
        """Frames the device wrote into RX buffers, waiting up to ``timeout`` for ``want``;
        then the lock serving the NIC is taken once, so the drain that wrote them has
        returned (its ``waiting`` call included)."""
        deadline = time.monotonic() + timeout
        while self.nic.stats[RX].frames < want and time.monotonic() < deadline:
            time.sleep(0.002)
        with self.lock:
            return self.nic.stats[RX].frames

    def settle(self) -> None:
        """Wait until every frame the host sent is written or waits in the backlog (the
        switch may hand a send over in several deliveries, and with a datapath thread
        through its inbox), and the drain that last touched them has returned."""
        nic = self.nic
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            with self.lock:
                if nic.stats[RX].frames + len(nic.backlog) >= self.sent and not (
                    nic.rx_waiting() - len(nic.backlog)
                ):
                    return
            time.sleep(0.002)
        raise AssertionError(f"{self.sent} frames sent, not all taken in: {nic.stats_dict()}")

    def receive(self) -> int:
        """Take the used RX buffers (frames checked in order against what was sent);
        returns how many.  The buffers are not posted again: :meth:`post` does that."""
        q = self.fe.rxq()
        hlen = self.fe.hdr_len
        raws = self.fe._rx_used(q)
        for raw in raws:
            assert raw[hlen:] == numbered(HOST_MAC, GUEST_MAC, self.got), f"frame {self.got}"
            self.got += 1
        return len(raws)

    def post(self, n: int) -> list[bool]:
        """Post ``n`` RX buffers one by one as a driver refilling would; after each one the
        driver's own reading of whether to kick (and the kick when it says so)."""
        q = self.fe.rxq()
        needed = []
        for _ in range(n):
            slot = q.free_bufs.pop()
            head = q.driver.add_chain([], [(q.buf_addr(slot), q.buf_size)])
            q.head_buf[head] = slot
            q.driver.publish()
            kick = q.driver.kick_needed()
            needed.append(kick)
            if kick:
                os.eventfd_write(q.kick_fd, 1)
        return needed

    def run_check(self) -> None:
        fn = self.checks.pop(0)
        with self.lock:
            fn()

    def kicks(self) -> int:
        return self.nic.stats[RX].kicks


def _rig(tmp_path: Path, threads: str, packed: bool, event_idx: bool) -> Iterator[Rig]:
    path = str(tmp_path / "nic0.sock")
    # The lost-kick watch would write frames the test leaves waiting (test_notify_watch).
    with Device(threads=threads, notify_watch="off") as device:
        nic = device.add_nic(path)
        device.start()
        lock: AbstractContextManager[Any] = (
            device.datapaths[nic.name].lock if threads == "per-nic" else device.lock
        )
        batch = nic.rx_batch
        assert batch is not None and batch.active()  # the default: on while serving
        checks: list[Callable[[], None]] = []
        clock = [1000.0]
        with lock:
            batch.later = lambda delay, fn: checks.append(fn)
            batch.clock = lambda: clock[0]
        features = None if event_idx else ~F_EVENT_IDX
        fe = VirtioNetFrontend(path, packed=packed, features=features, ring_size=RING)
        ch = device.open_channel("host")
        rig: Rig | None = None
        try:
            assert bool(fe.features & F_EVENT_IDX) is event_idx
            # The kick of the driver's first posting handled before the test starts: a late
            # one would drain RX buffers the test posts without a kick.
            deadline = time.monotonic() + 5
            while nic.stats[RX].kicks < 1 and time.monotonic() < deadline:
                time.sleep(0.002)
            with lock:
                assert nic.stats[RX].kicks == 1
            rig = Rig(device, nic, batch, fe, ch, lock, checks, clock, path, packed)
            yield rig
        finally:
            ch.close()
            fe.close()
            if rig is not None and rig.fe is not fe:  # a test connected another driver
                rig.fe.close()


@pytest.fixture(
    params=[("per-nic", False), ("per-nic", True), ("single", False)],
    ids=["per-nic-split", "per-nic-packed", "single-split"],
)
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, *request.param, event_idx=True)


def fill_ring(rig: Rig, extra: int) -> None:
    """The host sends a ring's worth plus ``extra``: the device fills every posted buffer,
    ``extra`` frames wait, and the queue starts batching (its check due).  The stop that
    started it re-armed for the next buffer; a second drain (as a later delivery makes,
    whether the host's send arrived in one piece or several) re-arms it batched."""
    rig.send(RING + extra)
    assert rig.written(RING) == RING
    rig.settle()
    assert len(rig.nic.backlog) == extra
    with rig.lock:
        rig.nic.drain_rx()
    assert rig.batch.batched == 1 and len(rig.checks) == 1
    assert rig.receive() == RING


def test_the_refill_kick_comes_after_a_batch_then_after_what_waits(rig: Rig) -> None:
    fill_ring(rig, 14)
    kicks = rig.kicks()
    # 14 waiting: the kick after half the ring (8), not after 1.
    assert rig.post(8) == [False] * 7 + [True]
    assert rig.written(RING + 8) == RING + 8
    # 6 waiting, fewer than a batch: the kick after exactly 6 buffers.
    assert rig.post(6) == [False] * 5 + [True]
    assert rig.written(RING + 14) == RING + 14
    rig.settle()
    assert not rig.nic.backlog and rig.receive() == 14 and rig.got == rig.sent
    assert rig.kicks() == kicks + 2  # one per batch, not one per buffer
    rig.run_check()  # nothing waits: no fall-back, and no check again until frames wait
    assert rig.batch.checks == 1 and rig.batch.fallbacks == 0 and not rig.checks


def test_without_batching_every_refill_is_kicked(tmp_path: Path) -> None:
    """The same traffic on a device with ``rx_kick_batch=1``: a kick per buffer posted."""
    path = str(tmp_path / "nic0.sock")
    with Device(threads="per-nic", notify_watch="off", rx_kick_batch=1) as device:
        nic = device.add_nic(path)
        device.start()
        assert nic.rx_batch is not None and not nic.rx_batch.active()
        with VirtioNetFrontend(path, ring_size=RING) as fe:
            ch = device.open_channel("host")
            frames = [numbered(HOST_MAC, GUEST_MAC, i) for i in range(RING + 4)]
            assert ch.send(frames) == RING + 4
            deadline = time.monotonic() + 5
            while nic.stats[RX].frames < RING and time.monotonic() < deadline:
                time.sleep(0.002)
            q = fe.rxq()
            assert len(fe._rx_used(q)) == RING
            for i in range(4):
                slot = q.free_bufs.pop()
                q.head_buf[q.driver.add_chain([], [(q.buf_addr(slot), q.buf_size)])] = slot
                q.driver.publish()
                assert q.driver.kick_needed()
                os.eventfd_write(q.kick_fd, 1)
                while nic.stats[RX].frames < RING + i + 1 and time.monotonic() < deadline:
                    time.sleep(0.002)
            assert nic.stats[RX].frames == RING + 4
            assert nic.rx_batch.batched == 0
            ch.close()


def test_flag_only_suppression_never_batches(tmp_path: Path) -> None:
    """Without EVENT_IDX there is no threshold to set: every refill is kicked."""
    for r in _rig(tmp_path, "per-nic", False, event_idx=False):
        r.send(RING + 3)
        assert r.written(RING) == RING
        r.settle()
        assert r.batch.batched == 0 and not r.checks
        assert r.nic.vrings[RX].queue.kick_ahead == 0  # type: ignore[union-attr]
        assert r.receive() == RING
        assert r.post(3) == [True, True, True]
        assert r.written(RING + 3) == RING + 3


def test_a_check_that_saw_frames_written_keeps_batching(rig: Rig) -> None:
    fill_ring(rig, 14)
    assert rig.post(8) == [False] * 7 + [True]
    assert rig.written(RING + 8) == RING + 8
    rig.run_check()  # frames were written since it was set: batching goes on
    assert rig.batch.fallbacks == 0 and len(rig.checks) == 1
    assert rig.post(6) == [False] * 5 + [True]
    assert rig.written(RING + 14) == RING + 14


def test_a_busy_driver_is_not_a_stall(rig: Rig) -> None:
    """No buffers posted (the driver busy with what it received), or more than at the
    previous check (still refilling): the checks go on, and batching with them."""
    fill_ring(rig, 14)
    for _ in range(3):
        rig.run_check()
    assert rig.post(2) == [False] * 2
    rig.run_check()
    assert rig.post(2) == [False] * 2
    rig.run_check()
    assert rig.batch.fallbacks == 0 and len(rig.checks) == 1 and rig.batch.checks == 5
    assert rig.post(4) == [False] * 3 + [True]  # the batch of 8 is complete: the kick
    assert rig.written(RING + 8) == RING + 8


def test_a_driver_that_posts_less_than_the_batch_gets_its_frames_at_the_check(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vdev.net")
    fill_ring(rig, 14)
    # 3 buffers, fewer than the batch of 8: no kick, and nothing written.
    assert rig.post(3) == [False] * 3
    time.sleep(0.05)
    assert rig.written(RING) == RING
    rig.run_check()  # the first look at the 3 posted
    assert rig.batch.fallbacks == 0 and len(rig.checks) == 1
    rig.run_check()  # nothing written, and no more posted: fall back
    assert rig.batch.fallbacks == 1 and not rig.checks
    assert (
        "queue 0: RX kick batching: the driver posted 3 buffers, short of the up to 8 asked "
        "for, and none since the last check: writing them now, no batching for 0.1 s"
    ) in caplog.text
    assert rig.written(RING + 3) == RING + 3  # the check's drain wrote the 3
    # Backing off: out of room again, re-armed for the very next buffer.
    assert rig.nic.vrings[RX].queue.kick_ahead == 0  # type: ignore[union-attr]
    assert rig.post(1) == [True]
    assert rig.written(RING + 4) == RING + 4
    rig.settle()
    assert rig.batch.batched == 1 and not rig.checks
    # After the back-off, the next stop for lack of room batches again.
    rig.clock[0] += BACKOFF_MIN_S
    assert rig.post(1) == [True]
    assert rig.written(RING + 5) == RING + 5
    rig.settle()
    assert rig.batch.batched == 2 and len(rig.checks) == 1
    with rig.lock:
        rig.nic.drain_rx()  # the next stop: re-armed batched, for min(8, 9 waiting)
    assert rig.post(8) == [False] * 7 + [True]
    assert rig.written(RING + 13) == RING + 13
    assert rig.post(1) == [True]  # one frame waits: the kick after one buffer
    assert rig.written(RING + 14) == RING + 14
    rig.settle()
    assert rig.receive() == 14 and rig.got == rig.sent


def _stall(rig: Rig, n: int) -> None:
    """A batching queue re-armed batched: one buffer (below the batch), then the check."""
    rig.receive()  # the driver takes what arrived (its buffers free for posting again)
    assert rig.post(1) == [False]
    before = rig.written(0)
    rig.run_check()
    rig.run_check()
    assert rig.batch.fallbacks == n and rig.written(before + 1) == before + 1


def _calm_then_batching(rig: Rig, calm: float, batched: int) -> None:
    """Still backing off just before ``calm`` ends (no batching at that stop), batching
    again at the stop just after it (then re-armed batched by a second drain)."""
    rig.clock[0] += calm * 0.99
    before = rig.written(0)
    assert rig.post(1) == [True]
    assert rig.written(before + 1) == before + 1
    rig.settle()
    assert rig.batch.batched == batched and not rig.checks
    rig.clock[0] += calm * 0.02
    assert rig.post(1) == [True]
    assert rig.written(before + 2) == before + 2
    rig.settle()
    assert rig.batch.batched == batched + 1 and len(rig.checks) == 1
    with rig.lock:
        rig.nic.drain_rx()


def _batch_comes(rig: Rig) -> None:
    """The driver posts a whole batch (8 buffers): one kick, 8 frames written."""
    before = rig.written(0)
    rig.receive()
    assert rig.post(8) == [False] * 7 + [True]
    assert rig.written(before + 8) == before + 8


def test_the_back_off_doubles_while_stalls_recur_and_resets_once_a_batch_came(rig: Rig) -> None:
    fill_ring(rig, 60)
    calm = BACKOFF_MIN_S
    for n in range(1, 4):
        _stall(rig, n)
        _calm_then_batching(rig, calm, n)
        calm *= 2
    # A batch comes, and the period's first check sees it.  That check was set right after
    # the unbatched stop that started the period, so it proves nothing about this driver:
    # the back-off stays where it was.
    _batch_comes(rig)
    rig.run_check()
    _stall(rig, 4)
    _calm_then_batching(rig, calm, 4)
    # Two batches, and the second check sees a batched re-arm's kick: the back-off resets.
    _batch_comes(rig)
    rig.run_check()
    _batch_comes(rig)
    rig.run_check()
    _stall(rig, 5)
    _calm_then_batching(rig, BACKOFF_MIN_S, 5)


def test_a_fault_rule_stops_the_batching_at_the_check(rig: Rig) -> None:
    fill_ring(rig, 14)
    with rig.lock:
        rig.nic.rx_hooks.append(lambda nic, index, pkts: pkts)  # as a fault rule's hook
    try:
        rig.run_check()
        # Not a stall (no fall-back, no back-off): the fault rule ended the batching.
        assert rig.batch.fallbacks == 0
        assert rig.nic.vrings[RX].queue.kick_ahead == 0  # type: ignore[union-attr]
        assert rig.post(1) == [True]
        assert rig.written(RING + 1) == RING + 1
        rig.settle()
        assert rig.batch.batched == 1 and not rig.checks
    finally:
        with rig.lock:
            rig.nic.rx_hooks.clear()


def test_a_check_for_a_queue_that_is_gone_touches_nothing(rig: Rig) -> None:
    fill_ring(rig, 5)
    old = rig.checks.pop()
    rig.fe.close()
    deadline = time.monotonic() + 5
    while rig.nic.vrings and time.monotonic() < deadline:
        time.sleep(0.005)
    frames = rig.nic.stats[RX].frames
    with rig.lock:
        old()
    assert rig.batch.checks == 0 and rig.nic.stats[RX].frames == frames
    # A new driver (the 5 frames that waited went with the old ring): its ring fills up
    # and batches, with its own check due.  The old queue's check, run again, leaves that
    # one alone.
    with rig.lock:
        assert not rig.nic.backlog
    rig.sent = frames
    rig.fe = VirtioNetFrontend(rig.path, packed=rig.packed, ring_size=RING)
    rig.send(RING + 3)
    assert rig.written(frames + RING) == frames + RING
    rig.settle()
    assert rig.batch.batched == 2 and len(rig.checks) == 1
    with rig.lock:
        old()
        rig.nic.drain_rx()  # batching, its check due: no second check
    assert rig.batch.checks == 0 and len(rig.checks) == 1


def test_release_all_unbatches_and_rearms_for_the_next_buffer(rig: Rig) -> None:
    fill_ring(rig, 14)
    with rig.lock:
        rig.batch.later = None  # the loop stops running the checks
        rig.batch.release_all()
    assert rig.nic.vrings[RX].queue.kick_ahead == 0  # type: ignore[union-attr]
    assert rig.post(1) == [True]
    assert rig.written(RING + 1) == RING + 1


@pytest.mark.parametrize("batch", [0, 1, 2, MAX_BATCH])
def test_check_batch_accepts_the_range(batch: int) -> None:
    assert check_batch(batch) == batch


@pytest.mark.parametrize("batch", [-1, MAX_BATCH + 1, True, 1.5, "8"])
def test_check_batch_names_a_bad_batch(batch: Any) -> None:
    with pytest.raises(ValueError, match=f"RX kick batch {batch!r}"):
        check_batch(batch)


@pytest.mark.parametrize(("batch", "size", "want"), [(0, 256, 128), (0, 1, 1), (5, 256, 5),
                                                     (300, 256, 128), (2, 3, 1)])  # fmt: skip
def test_the_batch_is_at_most_half_the_ring(batch: int, size: int, want: int) -> None:
    class Q:
        pass

    q: Any = Q()
    q.size = size
    assert RxKickBatch(None, batch, None).ahead(q) == want  # type: ignore[arg-type]


def test_a_generated_stream_stalled_below_the_batch_falls_back(rig: Rig) -> None:
    """Frames from the NIC's own generator (rxgen.py) wait as backlogged ones do: the
    checks run while it has frames left, and a driver that posts short of the batch gets
    them at the second check."""
    with rig.lock:
        rig.nic.start_rx_generator([numbered(HOST_MAC, GUEST_MAC, 0)])
    try:
        assert rig.written(RING) == RING
        with rig.lock:
            # Two stops for lack of room (the first re-arms for one buffer, or is the second
            # if the drain the generator deferred ran first): re-armed batched either way.
            rig.nic.drain_rx()
            rig.nic.drain_rx()
        assert rig.batch.batched == 1 and len(rig.checks) == 1 and not rig.nic.backlog
        assert len(rig.fe._rx_used(rig.fe.rxq())) == RING
        assert rig.post(3) == [False] * 3
        rig.run_check()
        rig.run_check()
        assert rig.batch.fallbacks == 1 and rig.written(RING + 3) == RING + 3
    finally:
        with rig.lock:
            rig.nic.stop_rx_generator()
