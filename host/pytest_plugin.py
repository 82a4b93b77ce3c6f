"""pytest plugin for vdev (registered through the ``pytest11`` entry point).

Fixtures for a device, a Linux guest and a bare-metal guest are added by the areas that
provide them; this module is what pytest loads.
"""

from __future__ import annotations

import pytest

# Linux guest fixtures (image build, VM factory) and the failure-report hook that attaches
# guest console tails; imported here so pytest registers them with this plugin.
from host.linux_fixtures import (  # noqa: F401
    linux_guest_factory,
    linux_image,
    pytest_runtest_makereport,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: needs qemu-system-x86_64")
    config.addinivalue_line("markers", "dpdk: needs dpdk-testpmd")
    config.addinivalue_line("markers", "slow: boots guests or runs long benchmarks")
