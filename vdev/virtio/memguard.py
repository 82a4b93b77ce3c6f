"""Guest memory mappings registered with ``vdev/native/memguard.c``'s SIGBUS handler.

A frontend can shrink or truncate a memfd after SET_MEM_TABLE (vhost-user.rst, "Memory
regions description" gives the device the fd, not a promise about its size).  The next
access to a page past the new end raises SIGBUS, which Python cannot catch: without this
module one hostile VMM kills a device that serves other guests too.

Each mapped region is registered with its address range and its owner's notify eventfd.  A
SIGBUS there is recovered in C (zero pages over the mapping, or a jump out of a guarded
copy), counted on the region and signalled on the eventfd; the owner (the vhost-user
connection) then raises :class:`~vdev.errors.GuestMemoryFault` and disconnects, costing that
connection only.  Without a C compiler nothing is guarded: one warning says so, and a
truncated memfd kills the process as before.
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import Any

from vdev.native import build as fastbuild

log = logging.getLogger("vdev.memguard")

_mod: Any = None
_tried = False
_lock = threading.Lock()


def native() -> Any:
    """The compiled module with the handler installed, or None (warned once)."""
    global _mod, _tried
    with _lock:
        if _mod is None and not _tried:
            _tried = True
            mod = fastbuild.load()
            if mod is None:
                log.warning("guest memory is unguarded: a truncated memfd will kill the process")
            else:
                _mod = mod
        if _mod is not None:
            rc = _mod.lib.mg_install()  # again each time: someone may have replaced it
            if rc != 0:
                log.warning("memguard: sigaction(SIGBUS) failed (errno %d)", rc)
        return _mod


def available() -> bool:
    return native() is not None


def mapping_address(mm: mmap.mmap) -> int:
    """The address an mmap object maps at (the export is released at once, so ``mm`` can
    still be closed)."""
    mod = native()
    if mod is None:
        raise RuntimeError("memguard unavailable")
    buf = mod.ffi.from_buffer(mm)
    try:
        return int(mod.ffi.cast("uintptr_t", buf))
    finally:
        mod.ffi.release(buf)


class Guarded:
    """One registered mapping (``handle`` in the C registry); ``unregister`` before unmap."""

    __slots__ = ("address", "handle", "length")

    def __init__(self, mm: mmap.mmap, notify_fd: int) -> None:
        mod = native()
        assert mod is not None
        self.address = mapping_address(mm)
        self.length = len(mm)
        self.handle: int = mod.lib.mg_register(self.address, self.length, notify_fd)
        if self.handle < 0:
            raise RuntimeError(f"memguard: all {mod.lib.MG_MAX_RANGES} guard slots in use")

    @property
    def faults(self) -> int:
        return int(_mod.lib.mg_faults(self.handle)) if self.handle >= 0 else 0

    @property
    def fault_addr(self) -> int:
        return int(_mod.lib.mg_fault_addr(self.handle)) if self.handle >= 0 else 0

    def unregister(self) -> None:
        if self.handle >= 0:
            _mod.lib.mg_unregister(self.handle)
            self.handle = -1


def guard(mm: mmap.mmap, notify_fd: int) -> Guarded | None:
    """Register ``mm`` if the guard is available (None otherwise, warned once)."""
    if native() is None:
        return None
    return Guarded(mm, notify_fd)


def copy_from(view: memoryview) -> bytes | int:
    """A guarded copy of ``view`` (guest memory): the bytes, or the faulting address."""
    mod = native()
    if mod is None:
        return bytes(view)
    ffi = mod.ffi
    n = len(view)
    out = bytearray(n)
    fault = ffi.new("uint64_t *")
    src = ffi.from_buffer(view)
    dst = ffi.from_buffer(out)
    try:
        rc = mod.lib.mg_copy(dst, src, n, fault)
    finally:
        ffi.release(src)
        ffi.release(dst)
    return int(fault[0]) if rc != mod.lib.MG_OK else bytes(out)


__all__ = ["Guarded", "available", "copy_from", "guard", "mapping_address", "native"]
