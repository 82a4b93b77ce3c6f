"""Fixtures for device tests: a running Device with one NIC and a mock-driver factory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vdev.net.device import Device
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
