"""A pool free list (a stack of indices) in C memory, which the compiled bursts pop in place.

Pbufpool's free lists were Python lists.  A compiled TX burst may allocate up to a burst's
worth of packets, buflets and large buffers, so every burst copied the lists' tops into C
arrays and the unused ones back (list slices converted int by int: a tenth of a burst).
A :class:`FreeList` keeps its entries in a ``struct fl_stack`` (a ``uint32_t[]`` of fixed
capacity, the top at ``v[n - 1]``, and its length ``n``): a burst under the pool's lock
pops straight from it and writes the length back; one without the lock (a NIC's datapath
thread) has its tops reserved in C first (``vq_pool_reserve``) and what it did not use
pushed back after (``vq_pool_unreserve``); a bulk release pushes onto it in C.

The Python side keeps the list interface the pool code and its tests use (``pop``,
``append``, ``extend``, ``len``, slices of the top, iteration), in the same order a list
would give.  The array comes from the compiled module's ffi when it is loaded (its
functions take it), else from an ABI-mode FFI (``vdev/native/structs.py``): no compiler is
needed.  Callers hold the pool's lock, as they did for the lists; unlike a list's append,
an append here is several bytecodes, so that rule is now what keeps it whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, overload

from vdev.native import structs
from vdev.skywalk.errors import PoolError

# Room beyond the objects a list can hold, for the corrupted states the pool's audit
# (Pbufpool.check_consistency) must be able to see and name: an index listed twice.
SLACK = 64


class FreeList:
    """A stack of up to ``objects`` (+ :data:`SLACK`) indices: ``v[0..n)``, top last, in a
    ``struct fl_stack`` (``c``) the compiled bursts pop and push too."""

    __slots__ = ("c", "cap", "ffi", "name", "v")

    def __init__(self, name: str, objects: int, items: Iterable[int] = ()) -> None:
        self.name = name
        self.cap = objects + SLACK
        self._make(structs.ffi())
        self.extend(items)

    def _make(self, ffi: Any) -> None:
        self.ffi = ffi
        self.v: Any = ffi.new("uint32_t[]", self.cap)
        self.c: Any = ffi.new("struct fl_stack *")
        self.c.v, self.c.cap = self.v, self.cap

    @property
    def n(self) -> int:
        return int(self.c.n)

    @n.setter
    def n(self, value: int) -> None:
        self.c.n = value

    def __len__(self) -> int:
        return int(self.c.n)

    def __bool__(self) -> bool:
        return int(self.c.n) != 0

    def __iter__(self) -> Iterator[int]:
        return iter(structs.u32_list(self.ffi, self.v, self.c.n))

    def __repr__(self) -> str:
        return f"FreeList({self.name!r}, {list(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FreeList | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _overflow(self, more: int) -> PoolError:
        return PoolError(
            f"{self.name} free list overflow: {self.n} + {more} entries exceed its "
            f"{self.cap} slots (an index freed twice)"
        )

    def append(self, idx: int) -> None:
        c = self.c
        n = c.n
        if n >= self.cap:
            raise self._overflow(1)
        self.v[n] = idx
        c.n = n + 1

    def pop(self) -> int:
        c = self.c
        n = c.n
        if not n:
            raise IndexError(f"pop from an empty {self.name} free list")
        c.n = n - 1
        return int(self.v[n - 1])

    def extend(self, items: Iterable[int]) -> None:
        seq = items if isinstance(items, list | tuple) else list(items)
        k = len(seq)
        if not k:
            return
        c = self.c
        n = c.n
        if n + k > self.cap:
            raise self._overflow(k)
        self.ffi.memmove(self.v + n, structs.u32_array(seq), 4 * k)
        c.n = n + k

    def _bounds(self, s: slice) -> tuple[int, int]:
        start, stop, step = s.indices(self.c.n)
        if step != 1:
            raise ValueError("free list slices have step 1")
        return start, max(start, stop)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            start, stop = self._bounds(i)
            return structs.u32_list(self.ffi, self.v + start, stop - start)
        n = int(self.c.n)
        assert isinstance(i, int)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name} free list index {i} out of range")
        return int(self.v[i])

    def __delitem__(self, s: slice) -> None:
        """Only the top can go: ``del fl[k:]``."""
        if not isinstance(s, slice):
            raise TypeError("free lists drop only a top slice")
        start, stop = self._bounds(s)
        if stop != self.c.n:
            raise ValueError("free lists drop only a top slice")
        self.c.n = start

    def __setitem__(self, s: slice, items: Iterable[int]) -> None:
        """``fl[:] = items``: replace the whole list (tests restoring a snapshot)."""
        if not isinstance(s, slice) or s != slice(None):
            raise TypeError("free lists are replaced whole only: fl[:] = items")
        self.c.n = 0
        self.extend(items)

    def native(self) -> Any:
        """The ``struct fl_stack *`` as the compiled module's cdata (moved over once if the
        list was made before that module was loaded)."""
        ffi = structs.native()
        if ffi is not self.ffi:
            items = list(self)
            self._make(ffi)
            self.extend(items)
        return self.c


__all__ = ["SLACK", "FreeList"]
