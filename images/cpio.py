"""A minimal writer for the ``newc`` cpio format that the Linux initramfs unpacker reads.

Written in Python (rather than calling ``cpio``) so that device nodes such as
``/dev/console`` can be created without root, and so that the archive is reproducible:
every entry has mtime 0, uid/gid 0 and is sorted as it is added.
"""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path

_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Accumulates entries in memory and serialises them as (optionally gzipped) newc."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"duplicate cpio entry {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,  # ino
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime: fixed for reproducible archives
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        ]
        self._ino += 1
        header = "070701" + "".join(f"{f:08x}" for f in fields)
        self._out.write(header.encode())
        self._out.write(encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        # newc pads both the header+name and the file data to 4-byte boundaries.
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def add_host_file(self, name: str, path: Path, perm: int | None = None) -> None:
        mode = path.stat().st_mode & 0o777 if perm is None else perm
        self.add_file(name, path.read_bytes(), mode)

    def add_symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def has(self, name: str) -> bool:
        return name.lstrip("/") in self._names

    def getvalue(self) -> bytes:
        """The archive with its trailer; the writer can still be used afterwards."""
        out = io.BytesIO()
        out.write(self._out.getvalue())
        name = _TRAILER.encode() + b"\0"
        header = "070701" + "".join(
            f"{f:08x}" for f in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(name), 0)
        )
        out.write(header.encode() + name)
        out.write(b"\0" * (-out.tell() % 4))
        return out.getvalue()

    def gzipped(self, level: int = 6) -> bytes:
        return gzip.compress(self.getvalue(), compresslevel=level, mtime=0)
