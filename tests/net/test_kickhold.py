"""TX kick mitigation (vdev/net/kickhold.py) through a served device and the mock driver.

The driver's side is the oracle: whether it must kick is its own reading of the device's
suppression state (``kick_needed``: the used flags, ``avail_event`` or the packed device
event area), and what was taken is what it got back as used.  The held queue's poll is
recorded instead of run on a timer, and the hold reads a clock the test sets, so each test
decides when a poll runs and how much time passed: nothing depends on the machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vdev.net.device import Device
from vdev.net.kickhold import (
    DEFAULT_WINDOW_S,
    MAX_WINDOW_S,
    KickHold,
    check_window,
)
from vdev.net.nic import VirtioNet
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend
from vdev.virtio.queue import F_EVENT_IDX

TX = 1  # virtqueue index of tx0


@dataclass
class Rig:
    device: Device
    nic: VirtioNet
    hold: KickHold
    fe: VirtioNetFrontend
    lock: AbstractContextManager[Any]
    path: str
    polls: list[Callable[[], None]]  # recorded, not yet run
    delays: list[float]  # the delay each poll was asked for, in order
    clock: list[float]  # the hold's clock (s)

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds

    def run_poll(self) -> None:
        """Run the oldest recorded poll as its timer would: under the lock serving the NIC."""
        fn = self.polls.pop(0)
        with self.lock:
            fn()

    def completed(self, want: int, timeout: float = 5.0, pair: int = 0) -> int:
        """TX buffers the driver got back on queue pair ``pair``, waiting up to ``timeout``
        for ``want`` of them; then the lock serving the NIC is taken once, so the handler
        that completed them has returned (it schedules its poll after the completions are
        visible)."""
        got = 0
        deadline = time.monotonic() + timeout
        while got < want and time.monotonic() < deadline:
            got += self.fe.reap_tx(pair)
            if got < want:
                self.fe.wait_call(self.fe.txq(pair), 0.01)
        with self.lock:
            pass
        return got

    def kicks(self) -> int:
        return self.nic.stats[TX].kicks


def frame(i: int) -> bytes:
    return numbered(HOST_MAC, GUEST_MAC, i)


def record(
    delays: list[float], delay: float, polls: list[Callable[[], None]], fn: Callable[[], None]
) -> None:
    delays.append(delay)
    polls.append(fn)


def _rig(
    tmp_path: Path, threads: str, packed: bool, event_idx: bool, queue_pairs: int = 1
) -> Iterator[Rig]:
    path = str(tmp_path / "nic0.sock")
    # The lost-kick watch would take chains the test leaves for the poll (test_notify_watch).
    with Device(threads=threads, notify_watch="off") as device:
        nic = device.add_nic(path, queue_pairs=queue_pairs)
        device.start()
        lock: AbstractContextManager[Any] = (
            device.datapaths[nic.name].lock if threads == "per-nic" else device.lock
        )
        hold = nic.kick_hold
        assert hold is not None and hold.active()  # the default: on while serving
        polls: list[Callable[[], None]] = []
        delays: list[float] = []
        clock = [1000.0]
        with lock:  # before the queues start: their first drain is on this clock too
            hold.later = lambda delay, fn: record(delays, delay, polls, fn)
            hold.clock = lambda: clock[0]
        features = None if event_idx else ~F_EVENT_IDX
        fe = VirtioNetFrontend(path, packed=packed, features=features, queue_pairs=queue_pairs)
        try:
            assert bool(fe.features & F_EVENT_IDX) is event_idx
            yield Rig(device, nic, hold, fe, lock, path, polls, delays, clock)
        finally:
            fe.close()


@pytest.fixture(
    params=[
        ("per-nic", False, True),
        ("per-nic", False, False),
        ("per-nic", True, True),
        ("single", True, False),
        ("single", False, True),
    ],
    ids=["per-nic-split-event-idx", "per-nic-split-flags", "per-nic-packed-event-idx",
         "single-packed-flags", "single-split-event-idx"],
)  # fmt: skip
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, *request.param)


WITHIN = DEFAULT_WINDOW_S / 2  # clock steps: inside the window, and well outside it
OUTSIDE = DEFAULT_WINDOW_S * 10


def hold(rig: Rig) -> int:
    """Get the queue held as a stream does: a kick within the window of the previous
    drain (the queue's start drained it).  Returns the frames sent (all completed)."""
    rig.advance(WITHIN)
    assert rig.fe.send([frame(0)]) == 1
    assert rig.completed(1) == 1  # the kick's own drain takes it at once
    assert rig.kicks() == 1 and rig.hold.held == 1 and len(rig.polls) == 1
    return 1


def test_streaming_kick_holds_the_queue_and_the_poll_takes_what_came_without_one(
    rig: Rig,
) -> None:
    fe = rig.fe
    sent = hold(rig)
    # Held: the driver reads that no kick is wanted and posts without one.
    assert fe.send([frame(1), frame(2)]) == 2
    time.sleep(0.05)
    assert rig.kicks() == 1  # it did not kick
    assert fe.reap_tx() == 0  # and nothing took them: only the poll will

    rig.advance(WITHIN)
    rig.run_poll()  # takes a batch: polls again
    assert rig.completed(2) == 2
    assert rig.hold.polls == 1 and len(rig.polls) == 1
    assert fe.send([frame(3)]) == 1
    time.sleep(0.02)
    assert rig.kicks() == 1  # still held after a poll that took a batch

    rig.advance(WITHIN)
    rig.run_poll()  # takes one chain, less than a batch: released, the kick asked for
    assert rig.completed(1) == 1
    assert rig.polls == [] and rig.hold.polls == 2

    rig.advance(OUTSIDE)
    assert fe.send([frame(4)]) == 1  # re-armed: the driver kicks; a pause: not held
    assert rig.completed(1) == 1
    assert rig.kicks() == 2 and rig.hold.held == 1 and rig.polls == []
    rig.advance(WITHIN)
    assert fe.send([frame(5)]) == 1  # within the window again: held again (it paid off:
    assert rig.completed(1) == 1  # no back-off)
    assert rig.kicks() == 3 and rig.hold.held == 2 and len(rig.polls) == 1
    assert rig.nic.stats[TX].frames == sent + 5
    stats = rig.nic.stats_dict()["kick_hold"]
    assert stats == {
        "window_us": 100.0,
        "held": 2,
        "polls": 2,
        "polls_at_once": 0,
        "backoffs": 0,
    }
    assert rig.delays == [DEFAULT_WINDOW_S] * 3


def test_a_poll_that_takes_a_whole_ring_polls_again_at_once(rig: Rig) -> None:
    """A driver that fills the ring between two polls waits on the device (it was told not
    to kick): the next poll is asked for with no delay.  One chain less than the ring:
    the window's delay."""
    fe = rig.fe
    size = fe.ring_size
    hold(rig)
    assert fe.send([frame(i) for i in range(size - 1)]) == size - 1
    rig.run_poll()
    assert rig.completed(size - 1) == size - 1
    assert rig.delays[-1] == DEFAULT_WINDOW_S and rig.hold.polls_at_once == 0
    assert fe.send([frame(i) for i in range(size)]) == size  # the whole ring
    rig.run_poll()
    assert rig.completed(size) == size
    assert rig.delays[-1] == 0.0 and rig.hold.polls_at_once == 1 and len(rig.polls) == 1
    assert rig.kicks() == 1  # held throughout


def test_kicks_slower_than_the_window_are_never_held(rig: Rig) -> None:
    fe = rig.fe
    for i in range(5):
        rig.advance(DEFAULT_WINDOW_S * 1.01)  # just past the window, every time
        assert fe.send([frame(2 * i), frame(2 * i + 1)]) == 2
        assert rig.completed(2) == 2
    assert rig.kicks() == 5 and rig.hold.held == 0 and rig.polls == []


def request(rig: Rig, i: int, kicked: bool, step: float = WITHIN) -> None:
    """One request ``step`` after the previous one; whether the driver had to kick."""
    rig.advance(step)
    before = rig.kicks()
    assert rig.fe.send([frame(i)]) == 1
    if kicked:
        assert rig.completed(1) == 1
    assert rig.kicks() == before + kicked


BACK = 10 * WITHIN  # the tests' BACKOFF_MIN_S: ten quick round trips


def test_a_ping_pong_backs_off_and_pays_one_poll_per_back_off(rig: Rig) -> None:
    """A request/response faster than the window: held at its kick, but its poll finds the
    one request that waited for it.  The queue then backs off (no hold) for the minimum
    back-off, twice that after the next failed hold, and holds again after each."""
    with rig.lock:
        rig.hold.backoff.min_s = BACK
    sent = hold(rig)
    request(rig, 1, kicked=False)  # held: the next request waits for the poll
    rig.run_poll()  # one chain: released, backing off for BACK
    assert rig.completed(1) == 1 and rig.hold.backoffs == 1 and rig.polls == []
    for i in range(2, 11):  # nine quick round trips: 0.9 BACK, never held
        request(rig, i, kicked=True)
    assert rig.hold.held == 1 and rig.polls == []
    request(rig, 11, kicked=True, step=1.5 * WITHIN)  # 1.05 BACK: holds again
    assert rig.hold.held == 2 and len(rig.polls) == 1

    request(rig, 12, kicked=False)
    rig.run_poll()  # failed again: backing off for 2 BACK
    assert rig.completed(1) == 1 and rig.hold.backoffs == 2
    for i in range(13, 32):  # nineteen quick round trips: 1.9 BACK, never held
        request(rig, i, kicked=True)
    assert rig.hold.held == 2 and rig.polls == []
    request(rig, 32, kicked=True, step=1.5 * WITHIN)
    assert rig.hold.held == 3 and len(rig.polls) == 1
    assert rig.nic.stats[TX].frames == sent + 32


def test_a_hold_that_paid_off_resets_the_back_off(rig: Rig) -> None:
    with rig.lock:
        rig.hold.backoff.min_s = BACK
    hold(rig)
    request(rig, 1, kicked=False)
    rig.run_poll()  # failed: back-off BACK, the next one would be 2 BACK
    assert rig.completed(1) == 1 and rig.hold.backoffs == 1
    for i in range(2, 11):
        request(rig, i, kicked=True)
    request(rig, 11, kicked=True, step=1.5 * WITHIN)
    assert rig.hold.held == 2
    assert rig.fe.send([frame(12), frame(13)]) == 2
    rig.run_poll()  # a batch: paid off
    assert rig.completed(2) == 2 and len(rig.polls) == 1
    rig.run_poll()  # quiet: released without backing off
    assert rig.polls == [] and rig.hold.backoffs == 1
    request(rig, 14, kicked=True)  # held at once
    assert rig.hold.held == 3
    request(rig, 15, kicked=False)
    rig.run_poll()  # failed: back-off BACK again, not 2 BACK
    assert rig.completed(1) == 1 and rig.hold.backoffs == 2
    for i in range(16, 25):
        request(rig, i, kicked=True)
    assert rig.hold.held == 3
    request(rig, 25, kicked=True, step=1.5 * WITHIN)
    assert rig.hold.held == 4


def test_a_poll_for_a_stopped_queue_touches_nothing(rig: Rig) -> None:
    fe = rig.fe
    sent = hold(rig)
    fe.send([frame(9)])  # posted, not kicked, not taken
    fe.stop()  # GET_VRING_BASE on every queue: the held queue is gone
    with rig.lock:
        vring = rig.nic.vrings.get(TX)
        assert vring is None or vring.queue is None
    rig.run_poll()
    assert rig.hold.polls == 0  # the poll saw the queue was gone and returned
    assert rig.nic.stats[TX].frames == sent


@pytest.mark.parametrize(
    "threads,event_idx", [("per-nic", True), ("single", False)], ids=["per-nic", "single"]
)
def test_a_poll_for_a_replaced_queue_touches_nothing(
    tmp_path: Path, threads: str, event_idx: bool
) -> None:
    """The frontend reconnects (as QEMU after a back-end restart) while the queue is held:
    the new queue is started and drained on its own; the old queue's poll leaves it be.
    Split rings only: a packed ring's reconnect base is stale without the inflight region
    (tests/net/test_inflight_crash.py::test_packed_crash_mid_burst), which is not what this
    tests."""
    for rig in _rig(tmp_path, threads, False, event_idx):
        _replaced(rig)


def _replaced(rig: Rig) -> None:
    fe = rig.fe
    sent = hold(rig)
    fe.send([frame(9)])  # posted, not kicked
    fe.reconnect(rig.path)  # new rings from the same memory, every queue kicked
    assert rig.completed(1) == 1  # the new queue took it
    with rig.lock:
        vring = rig.nic.vrings[TX]
        assert vring.queue is not None and vring.queue.defunct is None
    rig.run_poll()  # the old queue's
    assert rig.hold.polls == 0
    assert rig.nic.stats[TX].frames == sent + 1 and not rig.nic.kill_log


def test_disabling_a_held_ring_first_sends_what_was_posted_without_a_kick(rig: Rig) -> None:
    """DPDK virtio_user stops with SET_VRING_ENABLE 0 before GET_VRING_BASE.  A disabled
    ring's TX is processed and discarded (vhost-user "Ring states"), so the chains the
    driver posted while held (told no kick was needed) are taken while the ring is still
    enabled: sent, as their kicks would have sent them, not dropped."""
    fe = rig.fe
    sent = hold(rig)
    assert fe.send([frame(i) for i in range(3, 6)]) == 3  # held: not kicked
    fe.vhost.set_vring_enable(TX, False)
    assert rig.completed(3) == 3
    rig.run_poll()  # the pending poll finds the queue released
    assert rig.hold.polls == 0
    tx = rig.nic.stats[TX]
    assert (tx.frames, tx.drops, tx.drop_reasons) == (sent + 3, 0, {})
    # Disabled and re-armed: what comes now is the disabled ring's to discard.
    fe.send([frame(6)])
    deadline = time.monotonic() + 5
    while rig.nic.stats[TX].drops == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.nic.stats[TX].drop_reasons == {"ring_disabled": 1}


def test_a_fault_rule_releases_a_held_queue(rig: Rig) -> None:
    """Holding is for the plain datapath only: once something needs the world (here a TX
    hook, as a fault rule installs), the next poll re-arms the kick and no kick holds."""
    fe = rig.fe
    hold(rig)
    with rig.lock:
        rig.nic.tx_hooks.append(lambda _nic, _index, pkts: pkts)
    try:
        fe.send([frame(2), frame(3)])  # held: not kicked; a batch, which would keep it held
        rig.run_poll()  # takes them (the release drains) and re-arms
        assert rig.completed(2) == 2 and rig.polls == [] and rig.hold.backoffs == 0
        for i in range(4, 10, 2):  # kicks within the window, but never held again
            rig.advance(WITHIN)
            assert fe.send([frame(i), frame(i + 1)]) == 2
            assert rig.completed(2) == 2
        assert rig.hold.held == 1 and rig.kicks() == 4 and rig.polls == []
    finally:
        with rig.lock:
            rig.nic.tx_hooks.clear()


def test_window_zero_is_off(tmp_path: Path) -> None:
    path = str(tmp_path / "nic0.sock")
    with Device(kick_hold=0.0, notify_watch="off") as device:
        nic = device.add_nic(path)
        device.start()
        with VirtioNetFrontend(path) as fe:
            for i in range(10):
                assert fe.send([frame(i)]) == 1
                deadline = time.monotonic() + 5
                while fe.reap_tx() == 0 and time.monotonic() < deadline:
                    fe.wait_call(fe.txq(), 0.01)
            assert nic.kick_hold is not None and not nic.kick_hold.active()
            assert nic.stats[TX].kicks == 10 and nic.kick_hold.held == 0


@pytest.mark.parametrize("window", [0.0, 50e-6, MAX_WINDOW_S])
def test_check_window_accepts_the_range(window: float) -> None:
    assert check_window(window) == window


@pytest.mark.parametrize("window", [-1e-9, MAX_WINDOW_S * (1 + 1e-9), float("nan"), 1.0])
def test_check_window_names_a_bad_window(window: float) -> None:
    with pytest.raises(ValueError, match=r"kick hold window .* want 0 \(off\) to 10000 us"):
        check_window(window)
    with pytest.raises(ValueError, match="kick hold window"):
        Device(kick_hold=window)


def test_two_tx_queues_are_held_and_polled_each_on_its_own(tmp_path: Path) -> None:
    """Two queue pairs: each TX queue (virtqueues 1 and 3) is held by its own kicks and
    polled by its own poll; a poll of one leaves the other's chains alone."""
    for rig in _rig(tmp_path, "per-nic", False, True, queue_pairs=2):
        fe, nic = rig.fe, rig.nic
        rig.advance(WITHIN)
        for pair in (0, 1):
            assert fe.send([frame(pair)], pair) == 1
            assert rig.completed(1, pair=pair) == 1
        assert rig.hold.held == 2 and len(rig.polls) == 2
        assert (nic.stats[1].kicks, nic.stats[3].kicks) == (1, 1)
        assert fe.send([frame(10), frame(11)], 0) == 2  # held: no kicks
        assert fe.send([frame(20), frame(21), frame(22)], 1) == 3
        assert (nic.stats[1].kicks, nic.stats[3].kicks) == (1, 1)
        rig.run_poll()  # queue 1's
        assert rig.completed(2, pair=0) == 2 and fe.reap_tx(1) == 0  # queue 3 still waits
        rig.run_poll()  # queue 3's
        assert rig.completed(3, pair=1) == 3
        assert (nic.stats[1].frames, nic.stats[3].frames) == (3, 4)
        assert len(rig.polls) == 2  # each took a batch: each polls again
