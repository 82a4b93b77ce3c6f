"""A queue's state lives in one struct both datapaths use (vdev/virtio/ringstate.py): the
Python queue's attributes are its fields, and a queue made before the compiled module was
loaded carries its state over when the compiled bursts take it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from virtio_helpers import DATA_LOW, make_memory, make_pair

from vdev.native import structs
from vdev.skywalk import Pbufpool
from vdev.virtio import fastqueue, ringstate
from vdev.virtio.memory import GuestMemory

pytestmark = pytest.mark.skipif(not fastqueue.load(), reason="no C compiler: no compiled path")


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m, fd = make_memory()
    yield m
    m.close()
    os.close(fd)


def test_queue_attributes_are_the_struct_fields(mem: GuestMemory) -> None:
    dev, _drv = make_pair(mem, index=1, size=8)
    cs = dev._cs
    dev.last_avail_idx = 0xFFFE
    assert cs.last_avail == 0xFFFE
    cs.used_idx = 7
    assert dev.used_idx == 7
    dev._signalled_valid = True
    assert cs.signalled_valid == 1 and dev._signalled_valid is True
    dev.stats.chains += 3
    assert cs.chains == 3 and dev.stats.chains == 3
    assert dev.event_idx is bool(cs.event_idx)
    with pytest.raises(OverflowError):
        dev.used_idx = -1  # a uint32 field takes no negative index
    dev.close()


def test_a_queue_made_before_the_compiled_module_moves_to_it_intact(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made with a plain (ABI-mode) struct, run by the Python reference, then taken by a
    compiled burst: the indices and counters carry over and the burst continues from them,
    as the driver sees in the used ring."""
    with monkeypatch.context() as m:
        m.setattr(structs, "native", lambda: None)
        dev, drv = make_pair(mem, index=1, size=8)
    plain = dev._cs
    assert structs.plain().typeof(plain) is structs.plain().typeof("struct vq_queue *")
    hlen = 12
    for i in range(3):
        drv.add_chain([(DATA_LOW + 0x100 * i, hlen + 60)])
    drv.publish()
    for _ in range(3):  # the Python reference takes three chains
        chain = dev.pop()
        assert chain is not None
        dev.push(chain.head, 0)
    dev.flush_used()
    assert (dev.last_avail_idx, dev.used_idx, dev.stats.chains, dev.stats.used) == (3, 3, 3, 3)
    assert [h for h, _ in drv.get_used()] == [0, 1, 2]

    fastqueue.set_backend("c")
    pool = Pbufpool(num_packets=64, buf_size=2048, max_frags=2)
    for i in range(2):
        drv.add_chain([(DATA_LOW + 0x800 + 0x100 * i, hlen + 60)])
    drv.publish()
    pkts: list[int] = []
    burst = fastqueue.tx_burst(dev, pool, hlen, 8, pkts, finish=True)
    assert dev._cs is not plain and dev.stats._cs is dev._cs
    assert structs.native().typeof(dev._cs) is structs.native().typeof("struct vq_queue *")
    assert burst.count == 2 and len(pkts) == 2
    assert (dev.last_avail_idx, dev.used_idx, dev.stats.chains, dev.stats.used) == (5, 5, 5, 5)
    assert len(drv.get_used()) == 2
    assert ringstate.compiled(dev) is dev._cs  # already compiled: the same struct
    pool.free_packets(pkts)
    dev.close()
    pool.close()
