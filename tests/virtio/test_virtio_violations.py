"""Each guest violation ends in its named Skywalk kill reason; other queues keep working."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from virtio_helpers import (
    DATA_HIGH,
    DATA_LOW,
    HIGH_GPA,
    HIGH_SIZE,
    INDIRECT_BASE,
    LOW_SIZE,
    MEM_END,
    NO_EVENT,
    make_pair,
)

from vdev.abi import lib
from vdev.skywalk.errors import DefunctError, KillReason, SyncError, SyncKind
from vdev.virtio.driver import DriverQueue
from vdev.virtio.memory import GuestMemory

NEXT = lib.VRING_DESC_F_NEXT
WRITE = lib.VRING_DESC_F_WRITE
INDIRECT = lib.VRING_DESC_F_INDIRECT
TABLE = INDIRECT_BASE + 0x70000  # scratch indirect table, away from make_pair's slots

Build = Callable[[DriverQueue], None]


def head_oob(d: DriverQueue) -> None:
    d.add_chain([(DATA_LOW, 1)])
    d.set_avail_idx(d.size + 1)


def head_oob_backwards(d: DriverQueue) -> None:
    d.set_avail_idx(0xFFFF)  # "minus one": a jump of 65535


def head_out_of_range(d: DriverQueue) -> None:
    d.write_desc(0, DATA_LOW, 1, 0, 0)
    d.post_head(d.size)


def next_out_of_range(d: DriverQueue) -> None:
    d.write_desc(0, DATA_LOW, 1, NEXT, 8)
    d.post_head(0)


def loop2(d: DriverQueue) -> None:
    d.make_loop((DATA_LOW, 16), 2)


def self_loop(d: DriverQueue) -> None:
    d.make_loop((DATA_LOW, 16), 1)


def nested_indirect(d: DriverQueue) -> None:
    d.make_nested_indirect((DATA_LOW, 16), TABLE)


def nested_indirect_second(d: DriverQueue) -> None:
    d.write_indirect(TABLE, [(DATA_LOW, 4, NEXT, 1), (TABLE, 16, INDIRECT, 0)])
    d.write_desc(0, TABLE, 32, INDIRECT, 0)
    d.post_head(0)


def indirect_with_next(d: DriverQueue) -> None:
    d.write_indirect(TABLE, [(DATA_LOW, 4, 0, 0)])
    d.write_desc(0, TABLE, 16, INDIRECT | NEXT, 1)
    d.write_desc(1, DATA_LOW, 4, 0, 0)
    d.post_head(0)


def indirect_len_zero(d: DriverQueue) -> None:
    d.write_desc(0, TABLE, 0, INDIRECT, 0)
    d.post_head(0)


def indirect_len_odd(d: DriverQueue) -> None:
    d.write_desc(0, TABLE, 24, INDIRECT, 0)
    d.post_head(0)


def indirect_loop(d: DriverQueue) -> None:
    d.write_indirect(TABLE, [(DATA_LOW, 4, NEXT, 1), (DATA_LOW, 4, NEXT, 0)])
    d.write_desc(0, TABLE, 32, INDIRECT, 0)
    d.post_head(0)


def indirect_next_beyond_len(d: DriverQueue) -> None:
    # the table memory has 3 valid-looking entries but len says 2
    d.write_indirect(TABLE, [(DATA_LOW, 4, NEXT, 1), (DATA_LOW, 4, NEXT, 2), (DATA_LOW, 4, 0, 0)])
    d.write_desc(0, TABLE, 32, INDIRECT, 0)
    d.post_head(0)


def indirect_table_outside(d: DriverQueue) -> None:
    d.write_desc(0, MEM_END - 16, 32, INDIRECT, 0)
    d.post_head(0)


def buf_in_hole(d: DriverQueue) -> None:
    d.write_desc(0, LOW_SIZE + 0x100, 64, 0, 0)
    d.post_head(0)


def buf_straddles_regions(d: DriverQueue) -> None:
    d.write_desc(0, LOW_SIZE - 8, 16, 0, 0)
    d.post_head(0)


def buf_past_end(d: DriverQueue) -> None:
    d.write_desc(0, MEM_END - 8, 9, 0, 0)
    d.post_head(0)


def buf_wraps_64bit(d: DriverQueue) -> None:
    d.write_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x20, 0, 0)
    d.post_head(0)


def writable_on_tx(d: DriverQueue) -> None:
    d.add_chain([(DATA_LOW, 4)], [(DATA_HIGH, 4)])
    d.publish()


def readable_after_writable(d: DriverQueue) -> None:
    d.write_desc(0, DATA_LOW, 4, WRITE | NEXT, 1)
    d.write_desc(1, DATA_LOW, 4, 0, 0)
    d.post_head(0)


def readable_on_rx(d: DriverQueue) -> None:
    d.add_chain([(DATA_LOW, 4)])
    d.publish()


def indirect_not_negotiated(d: DriverQueue) -> None:
    d.write_indirect(TABLE, [(DATA_LOW, 4, 0, 0)])
    d.write_desc(0, TABLE, 16, INDIRECT, 0)
    d.post_head(0)


def head_in_flight_twice(d: DriverQueue) -> None:
    d.write_desc(0, DATA_LOW, 4, 0, 0)
    d.post_head(0)
    d.post_head(0)


CASES: list[tuple[str, Build, int, SyncKind | None, KillReason, str]] = [
    # name, build, queue index, sync, reason, detail regex
    ("head_oob", head_oob, 1, None, KillReason.HEAD_OOB, r"avail idx 9 is 9 ahead"),
    ("head_oob_back", head_oob_backwards, 1, None, KillReason.HEAD_OOB, r"65535 ahead"),
    ("head_range", head_out_of_range, 1, None, KillReason.INTERNALIZE_FAILED, r"head 8 >= queue"),
    ("next_range", next_out_of_range, 1, None, KillReason.INTERNALIZE_FAILED, r"next 8 out of"),
    ("loop", loop2, 1, None, KillReason.INTERNALIZE_FAILED, r"chain loop.*more than 8"),
    ("self_loop", self_loop, 1, None, KillReason.INTERNALIZE_FAILED, r"chain loop"),
    ("nested", nested_indirect, 1, None, KillReason.INTERNALIZE_FAILED, r"nested indirect"),
    ("nested2", nested_indirect_second, 1, None, KillReason.INTERNALIZE_FAILED, r"nested"),
    ("ind_next", indirect_with_next, 1, None, KillReason.INTERNALIZE_FAILED, r"INDIRECT and NEXT"),
    ("ind_len0", indirect_len_zero, 1, None, KillReason.INTERNALIZE_FAILED, r"len 0 is not"),
    ("ind_len24", indirect_len_odd, 1, None, KillReason.INTERNALIZE_FAILED, r"len 24 is not"),
    ("ind_loop", indirect_loop, 1, None, KillReason.INTERNALIZE_FAILED, r"loop.*indirect"),
    (
        "ind_next_oob",
        indirect_next_beyond_len,
        1,
        None,
        KillReason.INTERNALIZE_FAILED,
        r"indirect desc 1: next 2 out of range \(table has 2",
    ),
    (
        "ind_outside",
        indirect_table_outside,
        1,
        None,
        KillReason.INTERNALIZE_FAILED,
        r"indirect table .* outside guest memory",
    ),
    ("hole", buf_in_hole, 1, None, KillReason.INTERNALIZE_FAILED, r"0xa0100\+0x40 outside"),
    (
        "straddle",
        buf_straddles_regions,
        1,
        None,
        KillReason.INTERNALIZE_FAILED,
        r"outside guest memory.*runs past",
    ),
    ("past_end", buf_past_end, 1, None, KillReason.INTERNALIZE_FAILED, r"outside guest memory"),
    ("wrap64", buf_wraps_64bit, 1, None, KillReason.INTERNALIZE_FAILED, r"outside guest memory"),
    ("w_on_tx", writable_on_tx, 1, None, KillReason.INTERNALIZE_FAILED, r"device-writable on a"),
    (
        "r_after_w",
        readable_after_writable,
        2,
        SyncKind.EVENT,
        KillReason.INTERNALIZE_FAILED,
        r"readable after a device-writable",
    ),
    ("r_on_rx", readable_on_rx, 0, None, KillReason.INTERNALIZE_FAILED, r"device-readable on a"),
    ("twice", head_in_flight_twice, 1, None, KillReason.INTERNALIZE_FAILED, r"still in flight"),
]


@pytest.mark.parametrize(
    ("build", "index", "sync", "reason", "detail"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_violation(
    mem: GuestMemory,
    build: Build,
    index: int,
    sync: SyncKind | None,
    reason: KillReason,
    detail: str,
) -> None:
    dev, drv = make_pair(mem, index, 8, sync=sync)
    other, odrv = make_pair(mem, 5, 8)
    build(drv)
    with pytest.raises(SyncError) as info:
        while dev.pop() is not None:
            pass
    err = info.value
    assert err.reason is reason
    assert err.sync is dev.sync
    assert f"virtqueue {index}:" in err.detail
    assert re.search(detail, err.detail), err.detail
    assert dev.defunct is err and dev.stats.kills == 1
    for call in (dev.pop, dev.avail_count, dev.flush_used, dev.should_notify):
        with pytest.raises(DefunctError) as dinfo:
            call()
        assert dinfo.value.cause is err
    # the other queue on the same memory keeps working
    mem.write(DATA_HIGH, b"alive")
    head = odrv.add_chain([(DATA_HIGH, 5)])
    odrv.publish()
    c = other.pop()
    assert c is not None and c.read_bytes() == b"alive"
    other.push(head, 0)
    other.flush_used()
    assert odrv.get_used() == [(head, 0)]


def test_indirect_not_negotiated(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 8, features=NO_EVENT & ~(1 << lib.VIRTIO_RING_F_INDIRECT_DESC))
    indirect_not_negotiated(drv)
    with pytest.raises(SyncError, match="not negotiated") as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED


def test_total_length_overflow(mem: GuestMemory) -> None:
    """2048 descriptors of 3 MiB each (all inside memory) add up to more than 2^32."""
    dev, drv = make_pair(mem, 0, 2048, sync=SyncKind.TX)
    seg = 0x300000
    for i in range(2048):
        drv.write_desc(i, HIGH_GPA, seg, NEXT if i < 2047 else 0, i + 1)
    drv.post_head(0)
    with pytest.raises(SyncError) as info:
        dev.pop()
    assert info.value.reason is KillReason.INTERNALIZE_FAILED
    assert HIGH_SIZE >= seg
    # the chain is named by its head; the totals are 2048 * 3 MiB readable, none writable
    total = 2048 * seg
    assert f"head 0: total length overflows 32 bits (readable {total:#x}, writable 0x0)" in str(
        info.value
    )


def test_zero_length_descriptor_is_accepted(mem: GuestMemory) -> None:
    dev, drv = make_pair(mem, 1, 8)
    drv.write_desc(0, DATA_LOW, 0, NEXT, 1)
    drv.write_desc(1, DATA_LOW, 3, 0, 0)
    drv.post_head(0)
    c = dev.pop()
    assert c is not None and c.read_len == 3 and len(c.readable) == 1


def test_kill_by_device(mem: GuestMemory) -> None:
    dev, _ = make_pair(mem, 1, 8)
    err = SyncError(KillReason.BAD_BUFLET_CHAIN, SyncKind.TX, "virtio-net header offsets")
    dev.kill(err)
    with pytest.raises(DefunctError, match="BAD_BUFLET_CHAIN"):
        dev.pop()
