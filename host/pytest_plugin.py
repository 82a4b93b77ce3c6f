"""pytest plugin for vdev (registered through the ``pytest11`` entry point).

Fixtures: ``linux_image``, ``linux_guest_factory`` (Linux guests on any NICs),
``vdev_device`` (a running device), ``vdev_linux`` (a Linux guest on ``vdev_device``),
``bare_guest`` (the freestanding driver in a sandbox). Guests are module-scoped: a test
module shares one booted VM. See docs/testing.md.
"""

from __future__ import annotations

import time

import pytest

from host.device_fixtures import bare_elf, bare_guest, vdev_device, vdev_linux  # noqa: F401

# Linux guest fixtures (image build, VM factory) and the failure-report hook that attaches
# guest console tails; imported here so pytest registers them with this plugin.
from host.linux_fixtures import (  # noqa: F401
    linux_guest_factory,
    linux_image,
    pytest_runtest_makereport,
)

_SESSION_START = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SESSION_START] = time.time()
    config.addinivalue_line("markers", "qemu: needs qemu-system-x86_64")
    config.addinivalue_line("markers", "dpdk: needs dpdk-testpmd")
    config.addinivalue_line("markers", "slow: boots guests or runs long benchmarks")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Say once per run that guests fell back from KVM to TCG, if it happened in this run.

    The fallback line is printed inside a test (or an xdist worker), where pytest captures
    it; the verdicts it recorded are in the accel cache, so the controller reads them there.
    """
    from host import accel

    start = config.stash.get(_SESSION_START, time.time())
    lines = {
        accel.fallback_line(v.reason, v.source)
        for v in accel.cached_verdicts().values()
        if v.accel == "tcg" and v.at >= start
    }  # one line per distinct failure, however many images hit it
    for line in sorted(lines):
        terminalreporter.write_line(line)
