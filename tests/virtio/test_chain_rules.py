"""The chain walker's own rules, called directly (no queue in front of it).

``SplitQueue.pop`` refuses an avail entry naming a head >= the queue size before it calls
:func:`walk_chain`, so the walker's own head check was never reached by a test; the packed
walker uses :class:`Segments` with lengths far below 2^32.  These tests give the walker
and the segment collector the inputs the queues filter out, with the spec's rule as the
oracle (virtio 1.2 2.7.5: descriptor indices are below the queue size; 2.7.8: the used
element's ``len`` is a u32, so a chain's total of 2^32 - 1 bytes is representable and
2^32 is not).

Mutations killed (mutmut, ``vdev.virtio.chain``): ``walk_chain`` ``head >= table_size``
made ``>`` and its message dropped, the INDIRECT descriptor's name dropped from
``indirect_table``'s message, the ``Chain`` defaults (``desc_count`` 0, ``indirect``
False), ``release`` leaving ``None`` instead of empty lists, and the 32-bit totals of
:meth:`Segments.finish` checked with ``>=``.
"""

from __future__ import annotations

from typing import Any

import pytest

from vdev.abi import ffi
from vdev.virtio.chain import (
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    U32_MAX,
    Chain,
    ChainViolation,
    Segments,
    walk_chain,
)
from vdev.virtio.memory import MemoryFault

BASE = 0x1000
MEM = bytearray(0x4000)


def gpa_view(addr: int, length: int) -> memoryview:
    """A guest memory of 16 KiB at 0x1000; anything else is outside."""
    if not (BASE <= addr and addr + length <= BASE + len(MEM)):
        raise MemoryFault(f"{addr:#x}+{length:#x}")
    return memoryview(MEM)[addr - BASE : addr - BASE + length]


def table(entries: list[tuple[int, int, int, int]]) -> Any:
    """A descriptor table of (addr, len, flags, next) entries."""
    t = ffi.new("struct vring_desc[]", len(entries))
    for i, (addr, length, flags, nxt) in enumerate(entries):
        t[i].addr, t[i].len, t[i].flags, t[i].next = addr, length, flags, nxt
    return t


def walk(t: Any, size: int, head: int, *, indirect_ok: bool = True) -> Chain:
    return walk_chain(
        t, size, head, gpa_view, indirect_ok=indirect_ok, allow_readable=True, allow_writable=True
    )


@pytest.mark.parametrize("size", [1, 4, 8])
def test_head_below_the_table_size_is_walked_and_equal_to_it_is_refused(size: int) -> None:
    t = table([(BASE + 16 * i, 16, 0, 0) for i in range(size)])
    last = walk(t, size, size - 1)
    assert (last.head, last.read_len, last.desc_count) == (size - 1, 16, 1)
    with pytest.raises(ChainViolation) as info:
        walk(t, size, size)
    assert str(info.value) == f"head {size} out of range (queue size {size})"


def test_an_indirect_refusal_names_the_descriptor_that_points_at_the_table() -> None:
    t = table([(BASE, 16, 0, 0), (BASE, 16, 0, 0), (BASE + 0x100, 16, F_INDIRECT, 0)])
    with pytest.raises(ChainViolation) as info:
        walk(t, 3, 2, indirect_ok=False)
    assert str(info.value).startswith("desc 2 has INDIRECT set but INDIRECT not negotiated")
    t[2].flags = F_INDIRECT | F_NEXT
    with pytest.raises(ChainViolation) as info:
        walk(t, 3, 2)
    assert str(info.value).startswith("desc 2 has both INDIRECT and NEXT set")


def test_a_chain_built_without_counts_has_no_descriptors_and_is_direct() -> None:
    c = Chain(5, [], [], 0, 0)
    assert c.desc_count == 0
    assert c.indirect is False


def test_release_leaves_an_empty_chain_and_may_be_repeated() -> None:
    c = walk(table([(BASE, 8, F_NEXT, 1), (BASE + 8, 8, F_WRITE, 0)]), 2, 0)
    assert len(c.readable) == 1 and len(c.writable) == 1
    c.release()
    assert c.readable == [] and c.writable == []
    assert c.read_bytes() == b""
    assert c.write_into(b"abc") == 0
    c.release()
    assert c.readable == [] and c.writable == []


@pytest.mark.parametrize("writable", [False, True])
def test_a_total_of_2_to_the_32_minus_1_bytes_is_accepted_and_one_more_refused(
    writable: bool,
) -> None:
    flags = F_WRITE if writable else 0

    def fake_view(addr: int, length: int) -> memoryview:
        return memoryview(b"")  # the lengths, not the bytes, are under test

    segs = Segments(fake_view, allow_readable=True, allow_writable=True)
    segs.add("desc", 0, 0x1000, U32_MAX, flags)
    c = segs.finish(0, 1, False)
    assert (c.write_len if writable else c.read_len) == 2**32 - 1
    segs.add("desc", 1, 0x1000, 1, flags)
    with pytest.raises(ChainViolation, match="total length overflows 32 bits"):
        segs.finish(0, 2, False)
