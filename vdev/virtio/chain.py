"""Walking and validating one descriptor chain (virtio 1.x 2.7.5 "The Virtqueue Descriptor Table").

This module is the virtqueue twin of Skywalk's internalize step: the descriptor table lives
in memory the guest driver (the untrusted user) writes at any time, so every descriptor is
read exactly once into locals and every field is checked before it is used.  It is kept
apart from the queue state machine in ``split.py`` (as rust-vmm keeps ``descriptor_chain.rs``
apart from ``queue.rs``) so the per-descriptor loop stays small and can move to C later.

A violation raises :class:`ChainViolation` carrying a detail string; the queue turns it into
``SyncError(INTERNALIZE_FAILED, ...)`` and goes defunct.  Nothing is ever read or written
outside guest memory: descriptor buffers are only reached through ``gpa_view``, which
refuses any range that is not inside exactly one region.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vdev.abi import ffi, lib
from vdev.errors import VdevError
from vdev.virtio.memory import MemoryFault

F_NEXT: int = lib.VRING_DESC_F_NEXT
F_WRITE: int = lib.VRING_DESC_F_WRITE
F_INDIRECT: int = lib.VRING_DESC_F_INDIRECT

DESC_SIZE: int = ffi.sizeof("struct vring_desc")
U32_MAX = 0xFFFF_FFFF
# The spec gives no upper bound for an indirect table; like Linux vhost (get_indirect) we
# refuse more than 2^16 entries so one hostile descriptor cannot make the device walk a
# table of millions of entries.
MAX_INDIRECT = 65536

GpaView = Callable[[int, int], memoryview]


class ChainViolation(VdevError):
    """The chain breaks a rule of 2.7.5; ``str()`` is the detail for the SyncError."""


class Chain:
    """One validated descriptor chain: the device's view of a buffer the driver made available.

    ``readable`` holds the device-readable segments (driver → device data), ``writable`` the
    device-writable ones, in chain order; both are memoryviews straight into guest memory
    (no copy).  Zero-length descriptors are accepted but produce no segment.
    """

    __slots__ = ("desc_count", "head", "indirect", "read_len", "readable", "writable", "write_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        read_len: int,
        write_len: int,
        desc_count: int = 0,
        indirect: bool = False,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.read_len = read_len
        self.write_len = write_len
        self.desc_count = desc_count
        self.indirect = indirect

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, read_len={self.read_len}, write_len={self.write_len}, "
            f"segments={len(self.readable)}+{len(self.writable)}, indirect={self.indirect})"
        )

    def read_bytes(self) -> bytes:
        """Copy out everything the driver gave the device (the TX direction)."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def write_into(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Scatter ``data`` into the writable segments starting ``offset`` bytes into them.

        Returns how many bytes were written: fewer than ``len(data)`` when the chain's
        writable space runs out (the caller decides whether that is a truncation or an
        error, e.g. virtio-net mergeable RX buffers continue in the next chain).
        """
        src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        total = len(src)
        done = 0
        for seg in self.writable:
            n = len(seg)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, total - done)
            seg[offset : offset + take] = src[done : done + take]
            done += take
            offset = 0
            if done == total:
                break
        return done

    def release(self) -> None:
        """Drop the views so the guest memory mapping can be unmapped (remap, shutdown)."""
        for seg in self.readable:
            seg.release()
        for seg in self.writable:
            seg.release()
        self.readable = []
        self.writable = []


class Segments:
    """The buffers of one chain as the device collects them, the same for split and packed
    rings (their descriptor flags NEXT/WRITE/INDIRECT have the same values, 2.7.5 / 2.8):

    * direction: a device-writable buffer only on a queue the device writes, a
      device-readable one only on a queue it reads (the queue's ``sync``);
    * order: device-readable buffers before device-writable ones (2.7.4.2, 2.8.x "Driver
      Requirements: Scatter-Gather Support");
    * bounds: every non-empty buffer inside guest memory (``gpa_view``), and the totals
      within 32 bits (the used element's ``len``), checked by :meth:`finish`.

    ``where`` and ``idx`` name the descriptor in each message (``f"{where} {idx}"``: the
    ring walkers know how to say it; nothing is formatted unless a check fails).
    """

    __slots__ = (
        "allow_readable",
        "allow_writable",
        "gpa_view",
        "read_len",
        "readable",
        "seen_writable",
        "writable",
        "write_len",
    )

    def __init__(self, gpa_view: GpaView, *, allow_readable: bool, allow_writable: bool) -> None:
        self.gpa_view = gpa_view
        self.allow_readable = allow_readable
        self.allow_writable = allow_writable
        self.readable: list[memoryview] = []
        self.writable: list[memoryview] = []
        self.read_len = 0
        self.write_len = 0
        self.seen_writable = False

    def add(self, where: str, idx: int, addr: int, length: int, flags: int) -> None:
        """One buffer descriptor (not an INDIRECT one), its fields read once by the caller."""
        if flags & F_WRITE:
            if not self.allow_writable:
                raise ChainViolation(
                    f"{where} {idx} is device-writable on a queue the device only reads "
                    f"(addr {addr:#x} len {length} flags {flags:#x})"
                )
            self.seen_writable = True
            self.write_len += length
        else:
            if not self.allow_readable:
                raise ChainViolation(
                    f"{where} {idx} is device-readable on a queue the device only writes "
                    f"(addr {addr:#x} len {length} flags {flags:#x})"
                )
            if self.seen_writable:
                raise ChainViolation(
                    f"{where} {idx} is device-readable after a device-writable descriptor "
                    f"(addr {addr:#x} len {length})"
                )
            self.read_len += length
        if length:
            try:
                seg = self.gpa_view(addr, length)
            except MemoryFault as exc:
                raise ChainViolation(
                    f"{where} {idx}: buffer {addr:#x}+{length:#x} outside guest memory: {exc}"
                ) from None
            (self.writable if flags & F_WRITE else self.readable).append(seg)

    def finish(self, head: int, desc_count: int, indirect: bool, where: str = "") -> Chain:
        """The validated chain ``head`` (``where``, default "head N", names it if the totals
        overflow)."""
        if self.read_len > U32_MAX or self.write_len > U32_MAX:
            raise ChainViolation(
                f"{where or f'head {head}'}: total length overflows 32 bits "
                f"(readable {self.read_len:#x}, writable {self.write_len:#x})"
            )
        return Chain(
            head,
            self.readable,
            self.writable,
            self.read_len,
            self.write_len,
            desc_count,
            indirect,
        )


def indirect_table(
    gpa_view: GpaView, where: str, addr: int, length: int, flags: int, *, indirect_ok: bool
) -> tuple[memoryview, int]:
    """The checks of a descriptor with INDIRECT set, split or packed (2.7.5.3.1, 2.8.7):
    negotiated, not combined with NEXT, a non-zero multiple of 16 bytes of at most
    MAX_INDIRECT entries, inside guest memory.  Returns the table's view and entry count;
    whether an INDIRECT may appear where it does (nesting) is the walker's rule."""
    if not indirect_ok:
        raise ChainViolation(
            f"{where} has INDIRECT set but INDIRECT not negotiated (VIRTIO_RING_F_INDIRECT_DESC)"
        )
    if flags & F_NEXT:
        raise ChainViolation(f"{where} has both INDIRECT and NEXT set (flags {flags:#x})")
    if length == 0 or length % DESC_SIZE:
        raise ChainViolation(
            f"{where}: indirect table len {length} is not a non-zero multiple of {DESC_SIZE}"
        )
    n = length // DESC_SIZE
    if n > MAX_INDIRECT:
        raise ChainViolation(f"{where}: indirect table of {n} entries exceeds {MAX_INDIRECT}")
    try:
        view = gpa_view(addr, length)
    except MemoryFault as exc:
        raise ChainViolation(
            f"{where}: indirect table {addr:#x}+{length:#x} outside guest memory: {exc}"
        ) from None
    return view, n


def walk_chain(
    table: Any,
    table_size: int,
    head: int,
    gpa_view: GpaView,
    *,
    indirect_ok: bool,
    allow_readable: bool,
    allow_writable: bool,
) -> Chain:
    """Walk the split chain starting at ``head`` in ``table`` (a cffi ``struct vring_desc *``).

    Rules checked, each a ChainViolation (spec sections in the messages' comments):
    head / next index inside the table; at most ``table_size`` descriptors per table (a longer
    walk must revisit a descriptor: a loop); at most ``table_size`` (the queue size) buffer
    descriptors in the whole chain, indirect ones included; INDIRECT never inside an
    indirect table, and otherwise :func:`indirect_table`'s rules; the buffers by
    :class:`Segments`.
    """
    if head >= table_size:
        raise ChainViolation(f"head {head} out of range (queue size {table_size})")
    segs = Segments(gpa_view, allow_readable=allow_readable, allow_writable=allow_writable)
    desc = table
    limit = table_size
    where = "desc"
    idx = head
    count = 0
    total = 0
    indirect_buf: Any = None
    try:
        while True:
            d = desc[idx]
            # Read each field exactly once: the driver may rewrite the descriptor under us.
            addr = d.addr
            length = d.len
            flags = d.flags
            nxt = d.next
            count += 1
            total += 1
            if count > limit:
                # 2.7.5.2: a chain cannot hold more descriptors than its table has entries,
                # so a longer walk has revisited one.
                raise ChainViolation(
                    f"chain loop: head {head} reaches more than {limit} descriptors "
                    f"in the {where} table (at {where} {idx}, next {nxt})"
                )
            if total - (indirect_buf is not None) > table_size:
                # 2.7.5.3.1 "Indirect Descriptors", driver requirements: "A driver MUST NOT
                # create a descriptor chain longer than the Queue Size of the device."  The
                # direct table cannot get here without a loop (caught above); an indirect
                # table can be longer than the queue.  The descriptor pointing at the table
                # describes no buffer and is not counted.
                raise ChainViolation(
                    f"chain too long: head {head} has more than {table_size} descriptors, "
                    f"the queue size (at {where} {idx})"
                )
            if flags & F_INDIRECT:
                # 2.7.5.3.1 "Indirect Descriptors", driver requirements.
                if desc is not table:
                    raise ChainViolation(
                        f"nested indirect: {where} {idx} in the indirect table of head {head} "
                        f"has INDIRECT set (addr {addr:#x} len {length})"
                    )
                view, n = indirect_table(
                    gpa_view, f"desc {idx}", addr, length, flags, indirect_ok=indirect_ok
                )
                # 2.7.5.3.2: the device ignores WRITE on the descriptor that points at the
                # table; the chain continues at entry 0 of the table.
                indirect_buf = ffi.from_buffer(view)
                desc = ffi.cast("struct vring_desc *", indirect_buf)
                limit = n
                where = "indirect desc"
                idx = 0
                count = 0
                continue
            segs.add(where, idx, addr, length, flags)
            if not flags & F_NEXT:
                break
            if nxt >= limit:
                raise ChainViolation(
                    f"{where} {idx}: next {nxt} out of range (table has {limit} entries)"
                )
            idx = nxt
    finally:
        if indirect_buf is not None:
            ffi.release(indirect_buf)
    return segs.finish(head, total, indirect_buf is not None)
