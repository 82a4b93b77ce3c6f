"""The ffi that makes the structs Python shares with the compiled code.

A queue's state (``struct vq_queue``, vdev/virtio/ringstate.py) and a pool's free lists
(``struct fl_stack``, vdev/skywalk/freelist.py) are C memory that the Python reference
reads and writes as well.  They come from the compiled module's ffi when it is loaded (its
functions accept only its own cdata), else from an ABI-mode FFI over the same
declarations (the headers' FP-CDEF blocks): cffi lays those out without a compiler, so a
machine without one runs the Python paths over the same structs.
"""

from __future__ import annotations

from array import array
from typing import Any

_plain: Any = None
# array("I") / array("i") are the C arrays' uint32_t / int32_t here (checked, not assumed).
if array("I").itemsize != 4 or array("i").itemsize != 4:  # pragma: no cover
    raise ImportError("vdev needs a platform whose C unsigned int is 32 bits")


def native() -> Any:
    """The compiled module's ffi, or None when it is not loaded."""
    from vdev.skywalk import fastglue

    return fastglue._fast.ffi if fastglue._fast is not None else None


def plain() -> Any:
    """An ABI-mode FFI over the native headers' declarations (for structs, not calls)."""
    global _plain
    if _plain is None:
        import cffi

        from vdev.native.build import cdef_text

        ffi = cffi.FFI()
        ffi.cdef(cdef_text())
        _plain = ffi
    return _plain


def u32_list(ffi: Any, ptr: Any, n: int, typecode: str = "I") -> list[int]:
    """``ffi.unpack(ptr, n)`` of a ``uint32_t`` (``typecode="i"``: ``int32_t``) array, as
    one copy and ``tolist``: about 3x faster for a burst's worth than cffi's per-item loop."""
    a = array(typecode)
    a.frombytes(ffi.buffer(ptr, 4 * n))
    return a.tolist()


def u32_array(items: list[int] | tuple[int, ...]) -> array[int]:
    """``items`` as a ``uint32_t`` buffer (OverflowError for a value out of range): 3x
    faster than assigning a list into a cffi array."""
    return array("I", items)


def ffi() -> Any:
    """The ffi new shared structs come from."""
    return native() or plain()


__all__ = ["ffi", "native", "plain", "u32_array", "u32_list"]
