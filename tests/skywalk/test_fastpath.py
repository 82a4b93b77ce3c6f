"""The compiled fast path (fastpath.c via fastglue.py) against the Python reference (slotwork.py).

Differential properties: a channel is put in a state with every ring in flight (multi-buflet,
large-buffer and vnet packets), random client writes are applied to everything the client
can write, then each per-slot function runs on an identical copy of the state with each
backend.  Results, exceptions (reason, sync kind, detail), every trusted array, the owner
sets, free lists, stats, ring-side kernel arrays and every byte of the arena must match.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vdev.skywalk.pool as pool_module
from vdev.abi import ffi
from vdev.native import build as fastbuild
from vdev.skywalk import (
    Channel,
    Pbufpool,
    Port,
    SyncError,
    SyncKind,
    fastglue,
    slotwork,
    validate,
)
from vdev.skywalk.arena import BUFLET_SIZE, MD_SIZE, RING_HDR_SIZE, SLOT_SIZE, MdOff
from vdev.skywalk.port import ChannelHandle
from vdev.skywalk.ring import KernelRing

from . import hostile as H

pytestmark = pytest.mark.skipif(
    not validate.fast_available(), reason="compiled fast path unavailable (no compiler?)"
)

SETTINGS = settings(
    max_examples=int(os.environ.get("VDEV_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
N = 8
REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------ state snapshots
_ARRAYS = [name for name, _ in fastglue.POOL_ARRAYS]


def _snapshot(pool: Pbufpool, rings: list[KernelRing]) -> dict[str, Any]:
    return {
        "arena": bytes(pool.arena.mm),
        "arrays": {name: bytes(getattr(pool, name)) for name in _ARRAYS},
        "owners": {k: sorted(v) for k, v in pool.owners.items()},
        "free": (list(pool._free_pkts), list(pool._free_ext), list(pool._free_large)),
        "stats": dataclasses.asdict(pool.stats),
        "rings": [
            (bytes(r.ksd), None if r.klen is None else bytes(r.klen), r.khead, r.ktail)
            for r in rings
        ],
    }


def _restore(pool: Pbufpool, rings: list[KernelRing], snap: dict[str, Any]) -> None:
    pool.arena.mm[:] = snap["arena"]
    for name in _ARRAYS:
        arr = getattr(pool, name)
        memoryview(arr).cast("B")[:] = snap["arrays"][name]
    pool._free_pkts[:], pool._free_ext[:], pool._free_large[:] = (list(x) for x in snap["free"])
    pool.stats = type(pool.stats)(**snap["stats"]).bind(pool)
    for r, (ksd, klen, _, _) in zip(rings, snap["rings"], strict=True):
        memoryview(r.ksd).cast("B")[:] = ksd
        if klen is not None:
            assert r.klen is not None
            memoryview(r.klen).cast("B")[:] = klen


def _outcome(fn: Callable[[], object]) -> tuple[object, ...]:
    try:
        return ("ok", fn())
    except SyncError as err:
        return ("sync", err.reason, err.sync, err.detail)
    except Exception as err:  # trusted-state errors must match too
        return ("exc", type(err).__name__, str(err))


def _differential(
    pool: Pbufpool, rings: list[KernelRing], call: Callable[[], object], fn: str
) -> tuple[object, ...]:
    """Run ``call`` with each backend on the same state; assert identical outcome + state."""
    before = _snapshot(pool, rings)
    results = []
    states = []
    prev_min = fastglue.C_MIN_RX_SLOTS
    fastglue.C_MIN_RX_SLOTS = 1  # single-slot spans through C as well
    try:
        for backend in ("python", "c"):
            _restore(pool, rings, before)
            assert validate.set_backend(backend) == backend
            results.append(_outcome(call))
            states.append(_snapshot(pool, rings))
    finally:
        validate.set_backend("c")
        fastglue.C_MIN_RX_SLOTS = prev_min
    assert results[0] == results[1], fn
    py, c = states
    assert py["arrays"] == c["arrays"], fn
    assert py["owners"] == c["owners"], fn
    assert py["free"] == c["free"], fn
    assert py["stats"] == c["stats"], fn
    assert py["rings"] == c["rings"], fn
    assert py["arena"] == c["arena"], fn
    return results[0]


# ------------------------------------------------------------------ a busy channel
def _busy(tx_pkts: int, vnet: bool) -> tuple[Pbufpool, Port, Channel, ChannelHandle, list[int]]:
    pool = Pbufpool(num_packets=64, max_frags=3, num_large_bufs=4, large_buf_size=4096)
    port = Port(pool, ring_slots=N, alloc_nbufs=2)
    ch = port.open_channel()
    h = port.channels[0]
    held = [p for p in (ch.packet_alloc() for _ in range(3)) if p is not None]
    # TX: packets attached and handed over (head moved), not synced yet.
    for i in range(tx_pkts):
        p, s = H.stage_tx(ch, bytes([i]) * (60 + 1500 * i))
        if vnet and i == 1:
            pk = H.pkt(ch.arena, p)
            pk.pflags = 3
            pk.csum_start, pk.csum_stuff = 14, 30
            pk.vnet.flags, pk.vnet.csum_start, pk.vnet.csum_offset = 1, 34, 16
        ch.advance_slot(ch.tx_ring, s)
        held.append(p)
    # FREE: one packet handed back, not synced.
    fr = ch.free_ring
    s = fr.head
    ch.slot_attach_packet(fr, s, held.pop(0))
    fr.head = fr.next(s)
    # RX: delivered (large-buffer and vnet packets too) and synced; the user detaches one
    # slot and releases it, and more packets wait on the kernel side for rx_publish.
    frames = [b"r" * 100, b"L" * 3000, b"v" * 200]
    dev = [
        p
        for p in (
            pool.packet_from_bytes(f, vnet=bytes(range(12)) if vnet else None) for f in frames
        )
        if p is not None
    ]
    pool.free_packets(dev[port.deliver(dev) :])
    ch.sync(SyncKind.RX)
    rr = ch.rx_ring
    s = rr.head
    q = ch.slot_get_packet(rr, s)
    if q is not None:
        ch.slot_detach_packet(rr, s, q)
        rr.head = rr.next(s)
        held.append(q)
    more = [p for p in (pool.packet_from_bytes(b"m" * 70) for _ in range(2)) if p is not None]
    pool.free_packets(more[port.deliver(more) :])
    ev = pool.packet_from_bytes(b"e")
    assert ev is not None
    port.post_event(h, [ev])
    ch.sync(SyncKind.EVENT)
    for ring in (ch.rx_ring, ch.event_ring):
        q = ch.slot_get_packet(ring, ring.head)
        if q is not None:
            held.append(q)
    return pool, port, ch, h, held


def _regions(pool: Pbufpool, ch: Channel) -> list[tuple[int, int]]:
    out = []
    for ring in (ch.tx_ring, ch.rx_ring, ch.alloc_ring, ch.free_ring, ch.event_ring):
        out.append((ring.off, RING_HDR_SIZE))
        out.append((ring.off + RING_HDR_SIZE, ring.n * SLOT_SIZE))
    lay = ch.arena.layout
    for p in range(pool.num_packets):
        if pool.pkt_state[p]:
            out.append((lay.md_off + p * MD_SIZE, MD_SIZE))
            j = pool.b_next[p]
            while j != 0xFFFFFFFF:
                out.append((lay.buflet_off + j * BUFLET_SIZE, BUFLET_SIZE))
                j = pool.b_next[pool.num_packets + j]
    return out


def _head(r: KernelRing) -> int:
    return r.r32[r.h32] % r.n  # the prologue has range-checked head before the loops run


corruption = st.lists(
    st.tuples(
        st.integers(0, 1000),
        st.integers(0, 10_000),
        st.sampled_from([1, 2, 4]),
        st.one_of(
            st.integers(0, 16),
            st.integers(0, 0xFFFFFFFF),
            st.sampled_from([0xFFFFFFFF, 0xFFFF, 2048, 4096, 3, 1, 2]),
        ),
    ),
    max_size=4,
)


@SETTINGS
@given(corruption, st.integers(0, 3), st.booleans(), st.integers(0, 63))
def test_backends_agree_on_random_states(
    writes: list[tuple[int, int, int, int]], tx_pkts: int, vnet: bool, pick: int
) -> None:
    pool, port, ch, h, _ = _busy(tx_pkts, vnet)
    try:
        regions = _regions(pool, ch)
        base = H.base(ch.arena)
        for r, off, size, value in writes:
            start, length = regions[r % len(regions)]
            o = start + (off % max(1, length - size + 1))
            o -= o % size
            ctype = {1: "uint8_t *", 2: "uint16_t *", 4: "uint32_t *"}[size]
            ffi.cast(ctype, base + o)[0] = value & ((1 << (8 * size)) - 1)
        del base
        rings = list(h.rings.values())
        tx, rx, fr, evr = h.tx, h.rx, h.free, h.event
        allocated = [p for p in range(pool.num_packets) if pool.pkt_state[p]]
        idx = allocated[pick % len(allocated)]
        calls: list[tuple[str, Callable[[], object]]] = [
            (
                "tx_take",
                lambda: validate.tx_take(tx.slots, tx.rhead, _head(tx), SyncKind.TX),
            ),
            (
                "free_take",
                lambda: validate.free_take(fr.slots, fr.rhead, _head(fr)),
            ),
            (
                "rx_release_check",
                lambda: validate.rx_release_check(
                    rx.slots, rx.rhead, _head(rx), rx.klen, SyncKind.RX
                ),
            ),
            (
                # Views other than the arena's own ring view: C borrows their buffer.
                "rx_release_check(foreign view)",
                lambda: validate.rx_release_check(
                    evr.slots._replace(r32=memoryview(evr.r32), r16=memoryview(evr.r16)),
                    evr.rhead,
                    _head(evr),
                    None,
                    SyncKind.EVENT,
                ),
            ),
            (
                "rx_publish",
                lambda: validate.rx_publish(rx.slots, rx.rtail, rx.ktail, rx.ksd, rx.klen),
            ),
            ("internalize", lambda: validate.internalize(pool, idx)),
            ("externalize", lambda: validate.externalize(pool, idx)),
        ]
        for name, call in calls:
            _differential(pool, rings, call, name)
    finally:
        ch.close()
        port.close()
        pool.close()


def test_legal_tx_take_agrees_and_succeeds() -> None:
    """No corruption: both backends take every staged packet with the same byte count."""
    pool, port, ch, h, _ = _busy(3, True)
    tx = h.tx
    out = _differential(
        pool,
        list(h.rings.values()),
        lambda: validate.tx_take(tx.slots, tx.rhead, _head(tx), SyncKind.TX),
        "tx_take",
    )
    assert out[0] == "ok"
    pkts, nbytes = out[1]  # type: ignore[misc]
    assert len(pkts) == 3 and nbytes == 60 + 1560 + 3060
    ch.close()
    port.close()
    pool.close()


def test_every_internalize_check_formats_like_python() -> None:
    """Each FPD_* detail code reproduces validate's message for that check."""
    pool, port, ch, h, _ = _busy(2, False)
    tx = h.tx
    p = tx.r32[tx.slots_w32 + tx.rhead * 2]
    pk = H.pkt(ch.arena, p)
    b0 = pk.buf0
    edits: list[Callable[[], None]] = [
        lambda: setattr(H.md(ch.arena, p).pre, "redzone", 0),
        lambda: setattr(pk, "bufs_max", 9),
        lambda: setattr(pk, "bufs_cnt", 0),
        lambda: setattr(pk, "bufs_cnt", 1),
        lambda: setattr(b0, "buf_idx", 5),
        lambda: setattr(b0, "flags", 1),
        lambda: setattr(b0, "dlim", 7),
        lambda: setattr(b0, "doff", 2047),
        lambda: setattr(b0, "next_idx", 0xFFFFFFF0),
        lambda: setattr(pk, "len", 61),
        lambda: setattr(pk, "headroom", 1),
        lambda: setattr(pk, "l2_len", 5000),
        lambda: setattr(pk, "pflags", 8),
        lambda: (setattr(pk, "pflags", 2), setattr(pk, "csum_start", 60)),
        lambda: (
            setattr(pk, "pflags", 1),
            setattr(pk.vnet, "flags", 1),
            setattr(pk.vnet, "csum_start", 59),
        ),
    ]
    rings = list(h.rings.values())
    clean = _snapshot(pool, rings)
    seen = set()
    for i, edit in enumerate(edits):
        _restore(pool, rings, clean)
        edit()
        out = _differential(pool, rings, lambda: validate.internalize(pool, p), "internalize")
        assert out[0] == "ok" and out[1] is not None, i
        seen.add(out[1])
    assert len(seen) == len(edits)
    _restore(pool, rings, clean)
    ch.close()
    port.close()
    pool.close()


# ------------------------------------------------------------------ selection and build
def test_backend_switch_is_visible() -> None:
    """The switch is total: with "python" (VDEV_FASTPATH=0, for telling a C bug from a
    reference one) no compiled loop runs, the pool's bulk alloc/free loops included."""
    assert validate.BACKEND == "c"
    assert pool_module.FAST is fastglue
    try:
        assert validate.set_backend("python") == "python"
        assert validate.BACKEND == "python" and validate.tx_take is slotwork.tx_take
        assert pool_module.FAST is None
    finally:
        validate.set_backend("c")
    assert validate.tx_take is fastglue.tx_take
    assert pool_module.FAST is fastglue
    with pytest.raises(ValueError):
        validate.set_backend("rust")


@pytest.mark.parametrize(("env", "want"), [("0", "python"), ("1", "c")])
def test_env_selects_backend(env: str, want: str) -> None:
    code = "import vdev.skywalk.validate as v; print(v.BACKEND)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "VDEV_FASTPATH": env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.stdout.strip() == want, proc.stderr


def test_no_compiler_falls_back_to_python(tmp_path: Path) -> None:
    """Without a compiler (empty PATH, empty cache): one warning, then the Python path."""
    code = (
        "import logging; logging.basicConfig();"
        "import vdev.skywalk.validate as v; print(v.BACKEND, v.fast_available())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PATH": str(tmp_path), "VDEV_CACHE_DIR": str(tmp_path / "c")},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.stdout.strip() == "python False", proc.stderr
    assert proc.stderr.count("fast path unavailable") == 1, proc.stderr


def test_build_is_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache dir builds once (one stderr line); the second call reuses the file."""
    monkeypatch.setenv("VDEV_CACHE_DIR", str(tmp_path))
    so = fastbuild.build()
    assert so.parent == tmp_path and so.exists()
    mtime = so.stat().st_mtime_ns
    assert fastbuild.build() == so and so.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".native-")]
    mod = fastbuild.load_module(so)
    assert mod.lib.FP_INTERNALIZE == 4


@pytest.mark.parametrize(
    "source", sorted((REPO / "vdev" / "native").glob("*.c")), ids=lambda p: p.name
)
def test_c_source_is_warning_free(tmp_path: Path, source: Path) -> None:
    """Every C file of the one native home compiles with -Wall -Wextra and no warning."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    proc = subprocess.run(
        [
            gcc,
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            f"-I{REPO / 'vdev' / 'abi'}",
            f"-I{REPO / 'vdev' / 'native'}",
            "-c",
            str(source),
            "-o",
            str(tmp_path / "fp.o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_vnet_len_matches_c() -> None:
    assert MdOff.VNET_LEN == 12  # fastpath.c's VNET_LEN


def test_codes_come_from_the_compiled_module() -> None:
    """fastglue reads fastpath.h's FP_*/FPD_* codes from the compiled module, and every C
    internalize check has exactly one Python message (slotwork.INTERNALIZE_CHECKS)."""
    if not validate.fast_available():
        pytest.skip("compiled fast path unavailable (no compiler?)")
    lib = fastglue._fast.lib
    names = [n for n in dir(lib) if n.startswith("FP_") and not n.startswith("FP_CDEF")]
    assert len(names) == 10
    for name in names:
        assert getattr(fastglue.C, name[3:]) == getattr(lib, name)
    checks = {n[4:]: getattr(lib, n) for n in dir(lib) if n.startswith("FPD_")}
    assert set(checks) == set(slotwork.INTERNALIZE_CHECKS)
    assert {code: name for name, code in checks.items()} == fastglue.C.checks
    assert len(set(checks.values())) == len(checks)  # distinct codes


@pytest.mark.parametrize(
    ("region", "slots_w32", "n", "start", "end", "ok"),
    [
        (32, 0, 4, 0, 3, True),  # four 8-byte slots filling the region exactly
        (32, 0, 4, 3, 0, True),  # wrapped span
        (32, 0, 4, 0, 4, False),  # end == n: one past the ring
        (32, 0, 4, 4, 0, False),  # start == n
        (31, 0, 4, 0, 3, False),  # the last slot's last byte outside the region
        (40, 2, 4, 1, 2, True),  # slot array at byte 8, ending at the region's end
        (39, 2, 4, 1, 2, False),
        (32, 0, 0, 0, 0, False),  # no slots
        (32, 9, 0, 0, 0, False),  # slot array beyond the region (and no slots)
    ],
)
def test_c_refuses_ring_arguments_outside_the_region(
    region: int, slots_w32: int, n: int, start: int, end: int, ok: bool
) -> None:
    """The compiled loops check the (trusted) ring arguments before touching memory: the
    slot array ``[slots_w32 * 4, slots_w32 * 4 + n * SLOT_SIZE)`` must lie inside the
    region, ``start`` and ``end`` name slots.  Refused arguments are FP_BADARGS (fastglue
    then runs the Python loop); the oracle is that byte arithmetic, each bound tested at the
    last accepted and first refused value.  Kills ``end > n`` and a region check one slot
    short (mutants fp-ring-ok-*, tools/mutants/fastpath.toml)."""
    if not validate.fast_available():
        pytest.skip("compiled fast path unavailable (no compiler?)")
    f = fastglue._fast
    assert SLOT_SIZE == 8
    ring = f.ffi.new("uint8_t[]", 64)  # bigger than any region above: a miss is not a crash
    ret = f.ffi.new("struct fp_ret *")
    code = f.lib.fp_rx_release_check(ring, region, slots_w32, n, start, end, f.ffi.NULL, ret)
    assert code == (f.lib.FP_OK if ok else f.lib.FP_BADARGS)
