"""The pool's free lists in C memory (vdev/skywalk/freelist.py) against a plain Python list,
the representation they replaced, and the compiled code that pops and pushes them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.native import structs
from vdev.skywalk import Pbufpool, PoolError, fastglue
from vdev.skywalk import pool as poolmod
from vdev.skywalk.freelist import SLACK, FreeList

ops_st = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("pop"), st.just(0)),
        st.tuples(st.just("extend"), st.lists(st.integers(0, 2**32 - 1), max_size=12)),
        st.tuples(st.just("drop_top"), st.integers(0, 8)),
        st.tuples(st.just("slice_top"), st.integers(0, 8)),
        st.tuples(st.just("index"), st.integers(-10, 10)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(objects=st.integers(0, 20), start=st.lists(st.integers(0, 99), max_size=20), ops=ops_st)
def test_a_free_list_behaves_as_the_list_it_replaced(
    objects: int, start: list[int], ops: list[tuple[str, Any]]
) -> None:
    start = start[: objects + SLACK]
    fl = FreeList("packet", objects, start)
    model = list(start)
    cap = objects + SLACK
    for op, arg in ops:
        if op == "append":
            if len(model) >= cap:
                with pytest.raises(PoolError, match="packet free list overflow"):
                    fl.append(arg)
            else:
                fl.append(arg)
                model.append(arg)
        elif op == "pop":
            if model:
                assert fl.pop() == model.pop()
            else:
                with pytest.raises(IndexError):
                    fl.pop()
        elif op == "extend":
            if len(model) + len(arg) > cap:
                with pytest.raises(PoolError, match="overflow"):
                    fl.extend(arg)
            else:
                fl.extend(iter(arg))
                model.extend(arg)
        elif op == "drop_top":
            k = min(arg, len(model))
            del fl[len(fl) - k :]
            del model[len(model) - k :]
        elif op == "slice_top":
            assert fl[len(fl) - arg :] == model[len(model) - arg :]
        elif op == "index":
            if -len(model) <= arg < len(model):
                assert fl[arg] == model[arg]
            else:
                with pytest.raises(IndexError):
                    fl[arg]
        assert len(fl) == len(model) and bool(fl) == bool(model)
        assert list(fl) == model and fl == model


def test_only_the_top_can_be_dropped_and_only_whole_lists_replaced() -> None:
    fl = FreeList("buflet", 4, [3, 2, 1, 0])
    with pytest.raises(ValueError, match="top slice"):
        del fl[1:2]
    with pytest.raises(TypeError):
        fl[0:2] = [9, 9]
    fl[:] = [7, 8]
    assert list(fl) == [7, 8]


needs_c = pytest.mark.skipif(not fastglue.load(), reason="no C compiler: no compiled path")


@needs_c
def test_a_list_made_before_the_compiled_module_moves_over_intact() -> None:
    fl = FreeList("large buffer", 3, [2, 1, 0])
    fl._make(structs.plain())  # as if made on a machine that had not loaded it yet
    fl.extend([2, 1, 0])
    c = fl.native()
    assert structs.native().typeof(c) is structs.native().typeof("struct fl_stack *")
    assert list(fl) == [2, 1, 0] and c.n == 3 and c.cap == 3 + SLACK


@needs_c
def test_bulk_release_pushes_onto_the_lists_in_the_python_order() -> None:
    """pb_release_lists against the Python loop: same lists after freeing the same
    multi-buflet packets; with no room on a list it changes nothing and the fallback
    names the list that overflowed."""
    results = []
    for fast in (True, False):
        pool = Pbufpool(num_packets=16, buf_size=128, max_frags=3)
        pkts = pool.alloc_packets(6, 3) + pool.alloc_packets(4, 1)
        if not fast:
            saved, poolmod.FAST = poolmod.FAST, None
            try:
                pool.free_packets(pkts)
            finally:
                poolmod.FAST = saved
        else:
            pool.free_packets(pkts)
        results.append((list(pool._free_pkts), list(pool._free_ext), list(pool._free_large)))
        assert pool.stats.in_use == 0
        pool.close()
    assert results[0] == results[1]
    pool = Pbufpool(num_packets=8, buf_size=128, max_frags=3)
    pkts = pool.alloc_packets(8, 3)
    pool._free_ext.extend([0] * (pool._free_ext.cap - len(pool._free_ext)))  # no room left
    with pytest.raises(PoolError, match="buflet free list overflow"):
        pool.free_packets(pkts)
