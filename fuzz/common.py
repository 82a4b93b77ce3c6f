"""What every harness shares: the leak exception, a byte reader, fd accounting."""

from __future__ import annotations

import os
import struct


class FuzzLeak(AssertionError):
    """A harness found a resource left behind (fds, pool packets): the ``leaks`` column."""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Reader:
    """Consume a fuzz input as typed fields; past the end every field reads as 0 (so a short
    input is still a valid, shorter program)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def choice(self, options: list[int] | tuple[int, ...]) -> int:
        return options[self.u8() % len(options)]

    def rest(self, limit: int) -> bytes:
        return self.take(min(self.left, limit))
