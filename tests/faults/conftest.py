from __future__ import annotations

from collections.abc import Iterator

import pytest
from faults_helpers import Bench, make_bench


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = make_bench(seed=0)
    yield b
    b.engine.clear()
    b.take_backlog()
    b.clock.advance(10.0)
    b.engine.log.close()
    leaks = b.pool.leaks()  # free lists and audit: buflets and large buffers included
    assert not leaks.leaked, f"a fault leaked pool objects: {leaks}"
