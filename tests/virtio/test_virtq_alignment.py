"""Guest memory at any alignment: the compiled bursts must read and write it with accesses
that are defined at any address, and still agree with the Python reference.

The fuzzer (``fuzz/vq_burst.py`` under the UBSan build) found that ``virtq.c`` read
descriptors through ``struct vring_desc *``: an indirect table at a guest address that is
not 8-byte aligned (the spec aligns the descriptor table, avail and used rings, 2.7.2 /
2.8.2 "Virtqueue Alignment", but no rule aligns an indirect table, and the reference accepts
any address) was a misaligned load, undefined behaviour ("member access within misaligned
address ... struct vring_desc").  The same held for every ring access when a region's
``mmap_offset`` (which vhost-user does not constrain) puts aligned guest addresses at
misaligned host ones.  On x86-64 the loads happened to work, so the in-process cases below
compare both paths; ``test_cases_clean_under_ubsan`` runs them again against the UBSan
build, where such a load aborts the process (it failed so before the fix).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_fastqueue_diff import F_INDIRECT, F_MRG, F_V1, _run_rx, _run_tx, _snapshot

from fuzz import vq_burst
from vdev.net.burstdiff import assert_same
from vdev.virtio import fastqueue

pytestmark = pytest.mark.skipif(not fastqueue.load(), reason="no C compiler: no compiled path")

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "fuzz" / "corpus" / "virtqueue"
# vq_burst programs whose ring lies in the region at an odd mmap_offset, or that name an
# indirect table at an odd address (the fuzzer's regression seeds).
MISALIGNED_SEEDS = (
    "burst-split-legacy-ringB",
    "burst-packed-tx",
    "burst-packed-rx",
    "regress-misaligned-indirect-split",
    "regress-misaligned-indirect-packed",
)
FEATURES = F_V1 | F_INDIRECT | F_MRG


@pytest.mark.parametrize("offset", [1, 2, 4, 8, 12])
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_misaligned_indirect_table_same_on_both_paths(packed: bool, offset: int) -> None:
    """A legal indirect table at TABLE + offset, TX and RX: no kill, the compiled burst
    takes the chain (it does not hand it to the reference), and both paths agree."""
    start = _snapshot()
    size = 7 if packed else 8
    mutation: list[Any] = [("table_at", 1, (3, offset))]
    fastqueue.COUNTS.clear()
    tx = [([(60, [], False, (0, 0, 0), False)] * 3, mutation)]
    py = _run_tx("python", packed, start, size, FEATURES, 0, 0, tx, 1)
    c = _run_tx("c", packed, start, size, FEATURES, 0, 0, tx, 1)
    assert_same(py, c)
    assert not py["kills"], py["kills"]
    assert fastqueue.COUNTS.get("tx_chains", 0) == 3
    rx = [([([100], False)] * 3, [(60, None)] * 3, mutation)]
    py = _run_rx("python", packed, start, size, FEATURES, 0, rx, 1)
    c = _run_rx("c", packed, start, size, FEATURES, 0, rx, 1)
    assert_same(py, c)
    assert not py["kills"], py["kills"]
    assert fastqueue.COUNTS.get("rx_frames", 0) == 3


@pytest.mark.parametrize("seed", MISALIGNED_SEEDS)
def test_misaligned_seed_same_on_both_paths(seed: str) -> None:
    """The fuzzer's misaligned programs, both paths compared by the harness itself; the
    compiled bursts must have completed items in them (else nothing C was compared)."""
    fastqueue.COUNTS.clear()
    data = (SEEDS / seed).read_bytes()
    assert data[0] == 0xBB, "not a vq_burst program"
    vq_burst.one_input(data[1:])
    assert fastqueue.COUNTS.get("tx_chains", 0) + fastqueue.COUNTS.get("rx_frames", 0) > 0


def test_cases_clean_under_ubsan() -> None:
    """The cases above against the UBSan build of vdev/native (a misaligned access aborts)."""
    env = dict(os.environ)
    env["VDEV_NATIVE_SANITIZE"] = "ubsan"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
        "-k", "not ubsan", str(Path(__file__).resolve()),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = proc.stdout + proc.stderr
    assert "runtime error" not in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in proc.stdout, out[-4000:]
