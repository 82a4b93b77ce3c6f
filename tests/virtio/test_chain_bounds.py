"""Chains are bounded by the queue size, direct or indirect, split and packed.

virtio 1.2 2.7.5.3.1 ("Indirect Descriptors", driver requirements): "A driver MUST NOT
create a descriptor chain longer than the Queue Size of the device."  2.8 ("Driver
Requirements: Scatter-Gather Support"): "A driver MUST NOT create a descriptor list longer
than the Queue Size."  A direct chain cannot be longer without revisiting a descriptor (a
loop, or for packed rings an entry of the next lap, which is not available); an indirect
table can, so 256 entries on a 256-entry queue are accepted and 257 refused by name.

Mutations killed (tools/mutants/section5.toml, ``chain-*``): the split bound removed or
off by one (``>`` made ``>=``, or the table pointer counted), the packed bound removed or
``>`` made ``>=``; the packed rule "no INDIRECT in a NEXT-linked list" removed.
"""

from __future__ import annotations

import pytest
from test_virtio_packed import make_packed
from virtio_helpers import DATA_HIGH, INDIRECT_BASE, make_pair

from vdev.abi import lib
from vdev.skywalk.errors import KillReason, SyncError, SyncKind
from vdev.virtio.memory import GuestMemory
from vdev.virtio.packed import F_INDIRECT, F_NEXT

NEXT = lib.VRING_DESC_F_NEXT
INDIRECT = lib.VRING_DESC_F_INDIRECT
SIZE = 256
TABLE = INDIRECT_BASE + 0x70000  # room for 300 entries (4800 bytes)


def linear(n: int, start: int = 0) -> list[tuple[int, int, int, int]]:
    """``n`` one-byte readable entries, each linked to the next (split ``next`` indices)."""
    return [
        (DATA_HIGH + i, 1, NEXT if i + 1 < n else 0, start + i + 1 if i + 1 < n else 0)
        for i in range(n)
    ]


# -- split ---------------------------------------------------------------------------------


def test_split_direct_chain_of_queue_size_is_accepted(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    for i, (a, n, fl, nxt) in enumerate(linear(SIZE)):
        drv.write_desc(i, a, n, fl, nxt)
    drv.post_head(0)
    c = dev.pop()
    assert c is not None and c.desc_count == SIZE and c.read_len == SIZE


def test_split_direct_chain_past_queue_size_is_a_loop(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    for i, (a, n, _fl, nxt) in enumerate(linear(SIZE)):
        drv.write_desc(i, a, n, NEXT, nxt % SIZE)  # the 257th step is descriptor 0 again
    drv.post_head(0)
    with pytest.raises(SyncError, match=r"chain loop.*more than 256") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


@pytest.mark.parametrize(("entries", "ok"), [(SIZE, True), (SIZE + 1, False)])
def test_split_indirect_chain_bounded_by_queue_size(
    mem: GuestMemory, entries: int, ok: bool
) -> None:
    dev, drv = make_pair(mem, 1, SIZE)
    drv.write_indirect(TABLE, linear(entries))
    drv.write_desc(0, TABLE, 16 * entries, INDIRECT, 0)
    drv.post_head(0)
    if ok:
        c = dev.pop()
        assert c is not None and c.read_len == SIZE and c.desc_count == SIZE + 1
        return
    with pytest.raises(SyncError, match=r"chain too long: head 0 has more than 256") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED
    assert dev.defunct is info.value


@pytest.mark.parametrize(("direct", "entries", "ok"), [(10, 246, True), (10, 247, False)])
def test_split_direct_then_indirect_counts_both(
    mem: GuestMemory, direct: int, entries: int, ok: bool
) -> None:
    """2.7.5.3.2 allows direct descriptors followed by one INDIRECT: the chain is both."""
    dev, drv = make_pair(mem, 1, SIZE)
    for i in range(direct):
        drv.write_desc(i, DATA_HIGH + i, 1, NEXT, i + 1)
    drv.write_desc(direct, TABLE, 16 * entries, INDIRECT, 0)
    drv.write_indirect(TABLE, linear(entries))
    drv.post_head(0)
    if ok:
        c = dev.pop()
        assert c is not None and c.read_len == direct + entries == SIZE
        return
    with pytest.raises(SyncError, match="chain too long") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


def test_split_large_table_with_a_short_chain_is_accepted(mem: GuestMemory) -> None:
    """The bound is on the chain walked, not on the table's length."""
    dev, drv = make_pair(mem, 1, SIZE)
    drv.write_indirect(TABLE, linear(3) + [(DATA_HIGH, 1, 0, 0)] * (SIZE + 40 - 3))
    drv.write_desc(0, TABLE, 16 * (SIZE + 40), INDIRECT, 0)
    drv.post_head(0)
    c = dev.pop()
    assert c is not None and c.read_len == 3


# -- packed --------------------------------------------------------------------------------


def test_packed_direct_list_of_queue_size_is_accepted(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 9, size=SIZE)
    for i in range(SIZE):
        fl = (F_NEXT if i + 1 < SIZE else 0) | drv.avail_flags(1)
        drv.write_desc(i, DATA_HIGH + i, 1, 7, fl)
    c = dev.pop()
    assert c is not None and c.head == 7 and c.desc_count == SIZE and c.read_len == SIZE


def test_packed_direct_list_past_queue_size_meets_the_next_lap(mem: GuestMemory) -> None:
    dev, drv = make_packed(mem, 9, size=SIZE)
    for i in range(SIZE):
        drv.write_desc(i, DATA_HIGH + i, 1, 7, F_NEXT | drv.avail_flags(1))
    with pytest.raises(SyncError, match="chain entry 0 is not available") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


@pytest.mark.parametrize(("entries", "ok"), [(SIZE, True), (SIZE + 1, False)])
def test_packed_indirect_list_bounded_by_queue_size(
    mem: GuestMemory, entries: int, ok: bool
) -> None:
    dev, drv = make_packed(mem, 9, size=SIZE)
    drv.write_indirect(TABLE, [(DATA_HIGH + i, 1, 0, 0) for i in range(entries)])
    drv.write_desc(0, TABLE, 16 * entries, 3, F_INDIRECT | drv.avail_flags(1))
    if ok:
        c = dev.pop()
        assert c is not None and c.head == 3 and c.read_len == SIZE
        return
    with pytest.raises(SyncError, match="chain too long: indirect table of 257 entries") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


def test_packed_indirect_inside_a_next_list_is_refused(mem: GuestMemory) -> None:
    """Unlike split rings, a packed INDIRECT descriptor cannot follow direct ones (2.8
    "Driver Requirements: Indirect Descriptors")."""
    dev, drv = make_packed(mem, 9, size=8, sync=SyncKind.EVENT)
    drv.write_indirect(TABLE, [(DATA_HIGH, 1, 0, 0)])
    drv.write_desc(0, DATA_HIGH, 1, 2, F_NEXT | drv.avail_flags(1))
    drv.write_desc(1, TABLE, 16, 2, F_INDIRECT | drv.avail_flags(1))
    with pytest.raises(SyncError, match="INDIRECT set after 1 direct") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


@pytest.mark.parametrize(("entries", "ok"), [(65536, True), (65537, False)])
def test_split_indirect_table_size_limit_both_ends(
    mem: GuestMemory, entries: int, ok: bool
) -> None:
    """The table itself may have up to 2^16 entries (MAX_INDIRECT, as Linux vhost): one more
    is refused before the walk; the chain in it is short."""
    big = 0x1C0000  # 1 MiB + 16 fits below the indirect area at 0x300000
    dev, drv = make_pair(mem, 1, SIZE)
    drv.write_indirect(big, [(DATA_HIGH, 1, 0, 0)])
    drv.write_desc(0, big, 16 * entries, INDIRECT, 0)
    drv.post_head(0)
    if ok:
        c = dev.pop()
        assert c is not None and c.read_len == 1
        return
    with pytest.raises(SyncError, match="65537 entries exceeds 65536"):
        dev.pop()
