"""The ffi that makes the structs Python shares with the compiled code.

A queue's state (``struct vq_queue``, vdev/virtio/ringstate.py) and a pool's free lists
(``struct fl_stack``, vdev/skywalk/freelist.py) are C memory that the Python reference
reads and writes as well.  They come from the compiled module's ffi when it is loaded (its
functions accept only its own cdata), else from an ABI-mode FFI over the same
declarations (the headers' FP-CDEF blocks): cffi lays those out without a compiler, so a
machine without one runs the Python paths over the same structs.
"""

from __future__ import annotations

from typing import Any

_plain: Any = None


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


def ffi() -> Any:
    """The ffi new shared structs come from."""
    return native() or plain()


__all__ = ["ffi", "native", "plain"]
