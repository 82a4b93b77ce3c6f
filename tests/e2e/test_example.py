"""The README's example: plugin fixtures, one Linux guest and one bare driver per module."""

from __future__ import annotations

import pytest

from host.cli_sandbox import Sandbox
from host.device_fixtures import LinuxOnVdev
from vdev.testing.frames import HOST_MAC, numbered

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def test_linux_guest_pings_the_responder_and_reaches_the_host(vdev_linux: LinuxOnVdev) -> None:
    out, status = vdev_linux.machine.run("ping -c 3 -W 2 10.0.2.2")
    assert status == 0 and "3 packets received" in out
    hostmac = ":".join(f"{b:02x}" for b in HOST_MAC)
    vdev_linux.machine.run(f"vdev-pktgen --raw eth0 --dst-mac {hostmac} --count 50 --size 100")
    frames = vdev_linux.host.recv(max=256, timeout=5)
    assert len([f for f in frames if f[:6] == HOST_MAC]) == 50


def test_bare_driver_counts_what_the_host_sends(bare_guest: Sandbox) -> None:
    ch = bare_guest.channel()
    mac = bytes.fromhex(bare_guest.mac.replace(":", ""))
    bare_guest.send_line("rx 20 5000")
    assert ch.send([numbered(mac, HOST_MAC, i, 200) for i in range(20)]) == 20
    reply = bare_guest.wait_reply()
    assert reply.ok and reply.int("received") == 20
    ch.close()
