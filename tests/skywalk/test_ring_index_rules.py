"""The ring-index rules of validate.py against a brute-force model, on every index tuple.

The rules (channel_ring.c's TX and RX validation, see validate.py): every kernel index is
below the ring size, the user's head lies in the window the kernel allows and its tail is
the kernel's.  The model below does not compare against window ends: it walks the ring from
the window's first slot to its last and asks whether head is among the slots it visited,
and it calls a window wrapped when that walk passes slot ``n - 1``.  Every tuple of indices
in ``0..n`` (one past the last slot, so each ``>= n`` check is hit exactly at ``n``) is
checked for a few ring sizes, which tries both sides of every comparison, each operand of
every ``or`` alone, and the empty, full and one-slot windows.

Mutants this kills (mutmut over validate.py, issue 12 item 5): ``khead >= n`` made ``>``,
``rhead >= n`` made ``>``, and ``or`` made ``and`` between the kernel-index checks (no
existing test gave the validator a corrupt kernel index).
"""

from __future__ import annotations

import itertools

import pytest

from vdev.skywalk import KillReason, validate

SIZES = [1, 2, 3, 5]


def window(n: int, lo: int, hi: int) -> tuple[set[int], bool]:
    """The slots from ``lo`` to ``hi`` inclusive going forward round the ring, and whether the
    walk wrapped past slot ``n - 1``."""
    slots, s, wrapped = {lo}, lo, False
    while s != hi:
        wrapped = wrapped or s == n - 1
        s = (s + 1) % n
        slots.add(s)
    return slots, wrapped


def model(
    n: int, kernel: tuple[int, ...], lo: int, hi: int, head: int, tail: int, rtail: int
) -> KillReason | None:
    if any(k >= n for k in kernel) or head >= n:
        return KillReason.BASIC_SANITY
    slots, wrapped = window(n, lo, hi)
    if head not in slots:
        return KillReason.HEAD_OOB_WRAPPED if wrapped else KillReason.HEAD_OOB
    if tail != rtail:
        return KillReason.TAIL_MISMATCH
    return None


def reason(result: tuple[KillReason, str] | None) -> KillReason | None:
    return None if result is None else result[0]


@pytest.mark.parametrize("n", SIZES)
def test_tx_rule_matches_the_model_on_every_tuple(n: int) -> None:
    """TX/FREE: ``khead <= rhead <= head <= tail == rtail <= ktail`` modulo wrap."""
    vals = range(n + 1)
    for kh, kt, rh, rt, head, tail in itertools.product(vals, repeat=6):
        want = model(n, (kh, rh, rt, kt), rh, rt, head, tail, rt)
        got = validate.tx_validate(n, kh, kt, rh, rt, head, tail)
        assert reason(got) == want, (n, kh, kt, rh, rt, head, tail, got)


@pytest.mark.parametrize("n", SIZES)
def test_rx_rule_matches_the_model_on_every_tuple(n: int) -> None:
    """RX/ALLOC/EVENT: ``khead <= head <= ktail`` modulo wrap, tail unchanged."""
    vals = range(n + 1)
    for kh, kt, rt, head, tail in itertools.product(vals, repeat=5):
        want = model(n, (kh, kt), kh, kt, head, tail, rt)
        got = validate.rx_validate(n, kh, kt, rt, head, tail)
        assert reason(got) == want, (n, kh, kt, rt, head, tail, got)


def test_failures_name_the_bad_index() -> None:
    """The detail names the value that broke the rule (the test above checks reasons)."""
    bad = validate.tx_validate(8, 0, 0, 8, 0, 0, 0)
    assert bad is not None and "rh 8" in bad[1]
    bad = validate.rx_validate(8, 1, 9, 0, 1, 0)
    assert bad is not None and "kt 9" in bad[1]
    bad = validate.tx_validate(8, 0, 7, 2, 4, 5, 4)
    assert bad == (KillReason.HEAD_OOB, "head 5 outside [rhead 2, rtail 4]")
    bad = validate.rx_validate(8, 6, 2, 2, 4, 2)
    wrapped = "head 4 inside (ktail 2, khead 6) of a wrapped ring"
    assert bad == (KillReason.HEAD_OOB_WRAPPED, wrapped)
    assert validate.rx_validate(8, 0, 3, 1, 8, 1) == (
        KillReason.BASIC_SANITY,
        "head 8 >= num_slots 8",
    )
    assert validate.rx_validate(8, 0, 3, 1, 2, 3) == (
        KillReason.TAIL_MISMATCH,
        "ring tail 3 != kernel tail 1",
    )


def test_unknown_backend_is_named() -> None:
    before = validate.BACKEND
    with pytest.raises(ValueError, match=r"unknown backend 'rust' \(want 'c' or 'python'\)"):
        validate.set_backend("rust")
    assert validate.BACKEND == before
