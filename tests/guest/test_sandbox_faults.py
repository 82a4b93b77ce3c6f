"""The driver's own validation against a hostile DEVICE (vdev's fault engine, issue #5).

The device writes bogus used entries (out-of-range id, an id that is not outstanding, a
double completion, a used length larger than the buffer); the driver must count each by name
in its stats, recover (reset the device, rebuild queues, pool and rings) and carry on: traffic
works and counts exactly after every recovery.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from host.cli_sandbox import Sandbox
from tests.guest.sandbox_support import (
    Collector,
    drain,
    guest_frames,
    sandbox_fixture,
    send_all,
    to_guest,
)
from vdev.faults import FaultEngine
from vdev.skywalk import Channel

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from sandbox_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def host(sandbox: Sandbox) -> Iterator[Channel]:
    ch = sandbox.channel("host", ring_slots=2048)
    yield ch
    ch.close()


def traffic_works(sb: Sandbox, host: Channel, n: int = 300) -> None:
    """Both directions, counted exactly on the host channel and by the driver."""
    drain(host, quiet=0.05)
    col = Collector(host)
    try:
        assert sb.cmd(f"tx {n} 80 32").int("sent") == n
    finally:
        frames = col.stop()
    assert guest_frames(frames) == list(range(n))
    sb.send_line(f"rx {n} 20000")
    time.sleep(0.05)
    send_all(host, to_guest(n, 400))
    reply = sb.wait_reply(60)
    assert reply.ok and reply.int("received") == n and reply.int("bad") == 0, reply.status_line


def provoke(sb: Sandbox, host: Channel, queue: str, tx: str) -> None:
    """Traffic on ``queue`` so the installed rule fires (replies may be ERR: recovery)."""
    if queue == "tx":
        sb.cmd(tx, check=False)
    else:
        sb.send_line("rx 20 2000")
        time.sleep(0.05)
        send_all(host, to_guest(20, 100))
        sb.wait_reply(30)
    sb.cmd("rx 0", check=False)


UNOUT, RANGE = "viol_used_id_not_outstanding", "viol_used_id_range"
T1, T200 = "tx 1 60 1", "tx 200 60 32"
# Case notes (what the driver can tell apart, see guest/driver/virtq.c):
# * bad_used_id replaces the real id (replace=True): an EXTRA used element on a queue whose
#   chains are all completed would be caught first as used idx running ahead of what is
#   outstanding (viol_used_idx_jump).
# * not_outstanding on TX runs right after a reset with a single chain in flight (`tx 1`),
#   so every other descriptor is free and was never completed since the reset: the driver
#   names it "not outstanding" (an id completed earlier is a double completion to it, and
#   an id that is posted but not yet read by the device cannot be told from a real
#   completion). On RX every descriptor is posted, so there is no such id: not tested.
# * double_complete on TX: the device consumes the whole avail batch at once, so the
#   duplicate pushes used idx one past everything outstanding -- the driver reports the
#   jump. On RX (256 buffers posted) the duplicate is seen as a double completion.
# (fault method, keywords, queue, driver counter, tx command, reset first)
CASES: list[tuple[str, dict[str, Any], str, str, str, bool]] = [
    ("bad_used_id", {"mode": "not_outstanding", "replace": True}, "tx", UNOUT, T1, True),
    ("bad_used_id", {"mode": "out_of_range", "replace": True}, "tx", RANGE, T200, False),
    ("bad_used_id", {"mode": "out_of_range", "replace": True}, "rx", RANGE, T200, False),
    ("double_complete", {}, "rx", "viol_double_completion", T200, False),
    ("double_complete", {}, "tx", "viol_used_idx_jump", T200, False),
    ("bad_used_len", {"mode": "huge"}, "rx", "viol_used_len", T200, False),
]


@pytest.mark.parametrize(
    ("method", "kw", "queue", "counter", "tx", "reset_first"),
    CASES,
    ids=[f"{c[0]}-{c[1].get('mode', '')}-{c[2]}".replace("--", "-") for c in CASES],
)
def test_hostile_used_entry_counted_and_survived(
    sandbox: Sandbox,
    host: Channel,
    method: str,
    kw: dict[str, Any],
    queue: str,
    counter: str,
    tx: str,
    reset_first: bool,
) -> None:
    if reset_first:
        sandbox.cmd("reset")
    assert sandbox.device is not None
    nf = FaultEngine.for_device(sandbox.device).nic(0)
    before = sandbox.stats()
    nth = 1 if reset_first else 3
    rule = getattr(nf, method)(queue=queue, nth=nth, limit=1, **kw)
    try:
        deadline = time.monotonic() + 20
        while rule.hits == 0 and time.monotonic() < deadline:
            provoke(sandbox, host, queue, tx)
        assert rule.hits == 1, f"{method} never fired on {queue}"
    finally:
        rule.remove()
    after = sandbox.stats()
    events = [e.as_dict() for e in FaultEngine.for_device(sandbox.device).log.since(0, 10000)]
    fired = [e for e in events if e.get("rule") == rule.id]
    assert after[counter] - before[counter] >= 1, (counter, fired, after)
    assert after["recoveries"] - before["recoveries"] >= 1
    assert after["violations"] - before["violations"] >= 1
    # The host-side view of guest RAM counts the same violation by name.
    assert sandbox.introspect()["stats"][counter] == after[counter]
    # Survived: the rebuilt rings and pool carry traffic again, counted exactly.
    traffic_works(sandbox, host)
    final = sandbox.stats()
    assert final["violations"] == after["violations"]  # no new violation once it stopped
    assert final["pool_packets_in_use"] < 2048
