"""Fixtures for device tests: a running Device with one NIC and a mock-driver factory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdev.net.device import Device
from vdev.skywalk import Channel
from vdev.testing.frames import GUEST_MAC, HOST_MAC, numbered
from vdev.testing.frontend import VirtioNetFrontend


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    dev = Device(pcap=str(tmp_path / "capture.pcapng"))
    try:
        yield dev
    finally:
        dev.close()
        # Against the free lists and the audit: a lost buflet or large buffer is a leak too.
        leaks = dev.pool.leaks()
        assert not leaks.leaked, f"pool leak: {leaks}"


@pytest.fixture
def nic_path(tmp_path: Path, device: Device) -> str:
    path = str(tmp_path / "nic0.sock")
    device.add_nic(path)
    device.start()
    return path


FrontendFactory = Callable[..., VirtioNetFrontend]


@pytest.fixture
def frontend(nic_path: str) -> Iterator[FrontendFactory]:
    made: list[VirtioNetFrontend] = []

    def make(path: str = nic_path, **kw: object) -> VirtioNetFrontend:
        fe = VirtioNetFrontend(path, **kw)  # type: ignore[arg-type]
        made.append(fe)
        return fe

    yield make
    for fe in made:
        fe.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- helpers shared by the device tests (split and packed) -----------------------------------


def kills(device: Device, nic: int = 0) -> dict[str, dict[str, int]]:
    queues = device.stats()["nics"][nic]["queues"]  # type: ignore[index]
    return {name: q["kills"] for name, q in queues.items()}


def wait_for_kill(
    device: Device, queue: str = "tx0", nic: int = 0, timeout: float = 2.0
) -> dict[str, int]:
    """The kill reasons of ``queue`` once it has any (or {} after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not kills(device, nic)[queue] and time.monotonic() < deadline:
        time.sleep(0.01)
    return kills(device, nic)[queue]


def drain_channel(ch: Channel, want: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += ch.recv(256, timeout=0.05)
    return got


def still_receives(device: Device, fe: VirtioNetFrontend) -> None:
    """RX on the NIC works: three frames from a fresh host channel arrive, in order."""
    ch = device.open_channel("probe")
    try:
        for i in range(3):
            frame = numbered(GUEST_MAC, HOST_MAC, 42 + i, 100)
            assert ch.send([frame]) == 1
            assert fe.recv(1, timeout=2) == [frame]
    finally:
        ch.close()
