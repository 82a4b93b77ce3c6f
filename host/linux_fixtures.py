"""pytest fixtures for Linux guests; re-exported by :mod:`host.pytest_plugin`.

``linux_image`` builds (or finds in the cache) the guest image once per session.
``linux_guest_factory`` boots guests for one test module and shuts them all down at the
module's end: booting costs seconds under TCG, so a module shares its VMs and its tests
must leave them usable for the next test.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from host.accel import qemu_binary
from host.machine import Machine, Nic, live_machines

if TYPE_CHECKING:
    from images.linux import LinuxImage


def _skip_reason() -> str | None:
    if qemu_binary() is None:
        return "qemu-system-x86_64 not found (apt-get install qemu-system-x86, or set VDEV_QEMU)"
    if not os.environ.get("VDEV_KERNEL") and shutil.which("apt-cache") is None:
        return "apt is unavailable to fetch the guest kernel (set VDEV_KERNEL=bzImage)"
    return None


@pytest.fixture(scope="session")
def linux_image() -> LinuxImage:
    """The vdev Linux guest image (kernel + initramfs), built once and cached on disk.

    ``VDEV_KERNEL`` / ``VDEV_MODULES`` select a user kernel and module tree instead of
    Debian's. Skips when QEMU or apt is missing; other build failures fail the test.
    """
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from images.linux import build_linux

    kernel = os.environ.get("VDEV_KERNEL")
    modules = os.environ.get("VDEV_MODULES")
    return build_linux(
        kernel=Path(kernel) if kernel else None,
        modules_dir=Path(modules) if modules else None,
    )


class LinuxGuestFactory:
    """Boots Linux guests on demand; ``close()`` shuts every one of them down."""

    def __init__(self, image: LinuxImage, log_dir: Path) -> None:
        self.image = image
        self.log_dir = log_dir
        self.machines: list[Machine] = []

    def __call__(
        self,
        nics: Sequence[Nic | str | Path] = (),
        kernel_args: str = "",
        wait: bool = True,
        **machine_kw: object,
    ) -> Machine:
        """Boot a guest and wait for its shell prompt; returns the running Machine.

        ``nics``: vhost-user socket paths (str/Path) or :class:`Nic` objects, in guest
        eth0, eth1, ... order. ``kernel_args``: ``vdev.*`` options for the guest's /init
        (``vdev.ip=10.0.0.2/24 vdev.mtu=9000 vdev.ip1=...``) and any kernel options.
        Other keywords go to :class:`Machine` (``memory_mb``, ``shared_memory``, ...).
        ``wait=False``: return once QEMU runs (see :meth:`Machine.launch`); the caller
        starts its backend and then calls ``wait_ready()``.
        """
        idx = len(self.machines)
        machine_kw.setdefault("console_log", self.log_dir / f"console-{idx}.log")
        machine_kw.setdefault("name", f"linux{idx}")
        m = Machine.linux(self.image, nics=nics, kernel_args=kernel_args, **machine_kw)
        self.machines.append(m)
        m.launch(wait=wait)
        return m

    def close(self) -> None:
        for m in self.machines:
            m.shutdown()


@pytest.fixture(scope="module")
def linux_guest_factory(
    linux_image: LinuxImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LinuxGuestFactory]:
    """Factory booting Linux guests that live until the end of the test module.

    Console logs are kept under pytest's basetemp (``console-N.log``) after shutdown.
    """
    factory = LinuxGuestFactory(linux_image, tmp_path_factory.mktemp("guests"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failing test, attach the console tail of every running guest to the report."""
    report = yield
    if report.when != "call" or not report.failed:
        return report
    for m in live_machines():
        if m.is_running() and m.console_log_path is not None:
            try:
                tail = m.console.tail(60)
            except Exception:  # the guest may be gone; the report must not fail
                continue
            report.sections.append((f"vdev console {m.name} (tail)", tail))
    return report
