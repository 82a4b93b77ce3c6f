"""pytest fixtures for the device and guests wired to it; re-exported by the plugin.

They compose: ``vdev_device`` is a running device; ``vdev_linux`` boots a Linux guest on a
NIC of that same device (with a host channel on its switch); ``bare_guest`` is the
freestanding driver in a sandbox. Each is module-scoped, so a test module shares one booted
VM, and everything is torn down (and the pool checked for leaks) at the end of the module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from host.cli_sandbox import Sandbox
    from host.machine import Machine
    from images.linux import LinuxImage
    from vdev.net.device import Device
    from vdev.net.nic import VirtioNet
    from vdev.skywalk import Channel

GUEST_MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.2.15"


@pytest.fixture(scope="module")
def vdev_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """A started device (loop in a background thread); closed at module end, leak-checked."""
    from vdev.net.device import Device

    d = tmp_path_factory.mktemp("vdev")
    device = Device(pcap=str(d / "capture.pcapng"))
    device.start()
    try:
        yield device
    finally:
        device.close()
    leaks = device.pool.leaks()
    assert not leaks.leaked, f"device pool leaked at module end: {leaks}"


@dataclass
class LinuxOnVdev:
    """A Linux guest whose eth0 is NIC ``nic`` of ``device``; ``host`` is a channel on the
    same switch (frames to/from the guest's MAC)."""

    device: Device
    nic: VirtioNet
    machine: Machine
    host: Channel
    guest_mac: str = GUEST_MAC
    guest_ip: str = GUEST_IP


@pytest.fixture(scope="module")
def vdev_linux(
    linux_image: LinuxImage, vdev_device: Device, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LinuxOnVdev]:
    """Linux (stock virtio_net) booted against ``vdev_device``, ready at its prompt."""
    from host.machine import Machine, Nic

    sock = tmp_path_factory.mktemp("vdev-linux") / "nic.sock"
    nic = vdev_device.add_nic(str(sock), mac=GUEST_MAC, name="linux0")
    host = vdev_device.open_channel("linux0-host", ring_slots=1024)
    machine = Machine.linux(
        linux_image,
        nics=[Nic.vhost_user(sock, mac=GUEST_MAC)],
        kernel_args=f"vdev.ip={GUEST_IP}/24 vdev.gw={vdev_device.responder.ip}",
    )
    try:
        with machine:
            yield LinuxOnVdev(vdev_device, nic, machine, host)
    finally:
        host.close()


def bare_elf_or_skip() -> Path:
    """The guest driver ELF (built if needed); skips, naming the tool, when one is missing."""
    for tool, package in (
        ("gcc", "gcc"),
        ("ld", "binutils"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(
                f"{tool} not installed (apt-get install {package}, or bash scripts/setup.sh)"
            )
    from images.bare import build_bare

    return build_bare()


@pytest.fixture(scope="session")
def bare_elf() -> Path:
    """The freestanding guest driver ELF, built once per session."""
    return bare_elf_or_skip()


@pytest.fixture(scope="module")
def bare_guest(bare_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The freestanding guest driver booted against its own device (a started Sandbox)."""
    from host.cli_sandbox import Sandbox

    log = tmp_path_factory.mktemp("bare") / "console.log"
    with Sandbox(elf=bare_elf, console_log=log) as sb:
        yield sb
