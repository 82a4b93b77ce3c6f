"""A queue's device-private state, kept where both datapaths read it: a ``struct vq_queue``.

The Python queues (:mod:`vdev.virtio.split`, :mod:`vdev.virtio.packed`) and the compiled
bursts (``vdev/native/virtq.c`` through :mod:`vdev.virtio.fastqueue`) run the same queue in
turns.  They used to keep two copies of its indices, flags and counters and copy one into the
other around every burst (about 25 fields each way: a fifth of a 128-frame burst's cost, all
of it under the GIL).  Now there is one copy, the C struct: the queue's attributes
(``used_idx``, ``last_avail_idx``, ``event_idx``, the ``stats`` counters, ...) are
descriptors over its fields, so the Python reference reads and writes the very memory the C
burst does, and a burst starts with nothing to load and ends with nothing to store.

The struct comes from the compiled module's ffi when it is loaded, else from an ABI-mode
ffi over the same declarations (``vdev/native/*.h``'s cdef block; no compiler needed), so a
machine without one runs the Python queues unchanged.  :func:`compiled` moves a queue's
state into a compiled struct when the compiled bursts are switched on after the queue was
made.
"""

from __future__ import annotations

from typing import Any, overload

from vdev.native import structs


def new_state() -> Any:
    """A zeroed ``struct vq_queue *`` for a new queue."""
    return structs.ffi().new("struct vq_queue *")


def compiled(holder: Any) -> Any:
    """``holder._cs`` as a struct of the compiled module (what its functions accept), moving
    the integer fields over from a plain struct made before the module was loaded."""
    cs = holder._cs
    ffi = structs.native()
    if ffi.typeof(cs) is ffi.typeof("struct vq_queue *"):
        return cs
    new = ffi.new("struct vq_queue *")
    for name, field in structs.plain().typeof("struct vq_queue").fields:
        if field.type.kind == "primitive":
            setattr(new, name, getattr(cs, name))
    holder._cs = new
    holder.stats._cs = new
    return new


class CField:
    """An attribute stored in the owner's ``_cs`` struct field ``cname`` (an integer)."""

    __slots__ = ("cname",)

    def __init__(self, cname: str) -> None:
        self.cname = cname

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> CField: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> int: ...

    def __get__(self, obj: Any, owner: type | None = None) -> CField | int:
        if obj is None:
            return self
        return int(getattr(obj._cs, self.cname))

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._cs, self.cname, value)


class CFlag(CField):
    """A boolean attribute stored as a 0/1 struct field."""

    __slots__ = ()

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> CFlag: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> bool: ...

    def __get__(self, obj: Any, owner: type | None = None) -> CFlag | bool:
        if obj is None:
            return self
        return bool(getattr(obj._cs, self.cname))

    def __set__(self, obj: Any, value: int) -> None:
        setattr(obj._cs, self.cname, 1 if value else 0)


__all__ = ["CField", "CFlag", "compiled", "new_state"]
