from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from virtio_helpers import make_memory

from vdev.virtio.memory import GuestMemory


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m, fd = make_memory()
    yield m
    os.close(fd)
