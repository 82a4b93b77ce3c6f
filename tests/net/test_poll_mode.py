"""Busy-poll mode (``Device.serve_forever(poll=True)``, ``vdev serve --poll``).

A frontend that never kicks (its kick is silenced in the test) is served in poll mode, and
left waiting in event mode: both sides of what the mode changes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vdev.net.device import Device
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend


@pytest.mark.parametrize("poll", [True, False])
def test_poll_mode_serves_queues_without_kicks(tmp_path: Path, poll: bool) -> None:
    path = str(tmp_path / "nic0.sock")
    # The lost-kick watch would service the unkicked queue too (tests/net/test_notify_watch.py);
    # here only the two loop modes are compared.
    with Device(notify_watch="off") as device:
        device.add_nic(path)
        ch = device.open_channel("host")
        ch.send([numbered(b"\xff" * 6, HOST_MAC, 0)])  # the switch learns where HOST_MAC is
        device.start(poll=poll)
        fe = VirtioNetFrontend(path)
        try:
            fe.kick = lambda q, force=False: None  # type: ignore[method-assign]
            frames = [numbered(HOST_MAC, GUEST_MAC, i) for i in range(20)]
            assert fe.send(frames) == 20
            got: list[bytes] = []
            deadline = time.monotonic() + (5.0 if poll else 0.5)
            while len(got) < 20 and time.monotonic() < deadline:
                got += ch.recv(64, timeout=0.05)
            if poll:
                assert got == frames
            else:
                assert got == []  # nothing kicked the queue: event mode waits
        finally:
            fe.close()
            ch.close()
