from __future__ import annotations

from collections.abc import Iterator

import pytest

from vdev.skywalk import Channel, LoopbackPort, Pbufpool, Port


@pytest.fixture
def pool() -> Iterator[Pbufpool]:
    p = Pbufpool(num_packets=512, buf_size=2048, max_frags=4, num_large_bufs=8)
    yield p
    if not p._closed:
        p.close()


@pytest.fixture
def loop(pool: Pbufpool) -> Iterator[tuple[LoopbackPort, Channel, Channel]]:
    port = Port.loopback(pool, ring_slots=16)
    a = port.open_channel()
    b = port.open_channel()
    yield port, a, b
    port.close()


def assert_no_leak(pool: Pbufpool) -> None:
    """Nothing allocated and the accounting sound (free lists, chains, large buffers)."""
    assert pool.stats.in_use == 0, pool.leaks()
    assert pool.audit() == []
    rep = pool.close()
    assert not rep.leaked, str(rep)


@pytest.fixture(scope="module", params=["python", "c"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module once per validate.py backend (the compiled one skips if unavailable)."""
    from vdev.skywalk import fastglue, validate

    want: str = request.param
    if want == "c" and not validate.fast_available():
        pytest.skip("compiled fast path unavailable (no compiler?)")
    prev, prev_min, prev_pool = validate.BACKEND, fastglue.C_MIN_RX_SLOTS, fastglue.C_MIN_POOL_BATCH
    assert validate.set_backend(want) == want
    fastglue.C_MIN_RX_SLOTS = 1  # every span through C, even single slots
    fastglue.C_MIN_POOL_BATCH = 1  # and every pool batch
    yield want
    validate.set_backend(prev)
    fastglue.C_MIN_RX_SLOTS = prev_min
    fastglue.C_MIN_POOL_BATCH = prev_pool
