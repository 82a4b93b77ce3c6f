"""The soak's verdict (``host/soak_verdict.py``) on hand-made runs, each bound from both sides,
and one small real soak through ``benchmarks/soak.py`` (testpmd, split ring, TX).

The unit tests build one passing run and change one thing at a time, just inside and just
outside each bound, so a bound that is off by one (or a check that is missing) fails here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from host.soak_verdict import (
    RSS_SLACK_KIB,
    Sample,
    SoakCounts,
    SoakRun,
    counts_from_stats,
    judge,
    other_drop_reasons,
    quartile_growth,
)

ROOT = Path(__file__).resolve().parents[2]


def samples(fds: list[int] | None = None, rss: list[int] | None = None) -> list[Sample]:
    fds = fds if fds is not None else [20] * 8
    rss = rss if rss is not None else [30_000] * len(fds)
    return [Sample(float(i), f, r, 100) for i, (f, r) in enumerate(zip(fds, rss, strict=True))]


def good(**changes: Any) -> SoakRun:
    counts = SoakCounts(sent=1000, received=985, fault_drops=10, other_drops=5, stalls=1, kills=0)
    run = SoakRun(samples(), 13, 13, 30_000, 30_100, 0, counts)
    return dataclasses.replace(run, **changes)


def with_counts(**changes: Any) -> SoakRun:
    base = good()
    return dataclasses.replace(base, counts=dataclasses.replace(base.counts, **changes))


def test_the_baseline_run_passes() -> None:
    v = judge(good())
    assert v.ok and v.text() == "PASS"


def test_pool_in_use_after_must_be_zero() -> None:
    assert judge(good(in_use_after=0)).ok
    v = judge(good(in_use_after=1))
    assert not v.ok and "in_use 1" in v.text()


@pytest.mark.parametrize("end", [12, 14])
def test_fds_after_must_equal_fds_before(end: int) -> None:
    v = judge(good(fds_end=end))
    assert not v.ok and f"13 before the frontend, {end} after" in v.text()


def test_fds_flat_within_the_slack() -> None:
    # One more fd in the last quarter than the first quarter's max.
    grew = samples(fds=[20, 20, 20, 20, 20, 20, 21, 21])
    assert not judge(good(samples=grew)).ok
    assert judge(good(samples=grew), fd_slack=1).ok
    grew2 = samples(fds=[20, 20, 20, 20, 20, 20, 22, 22])
    assert not judge(good(samples=grew2), fd_slack=1).ok


def test_rss_growth_at_the_bound_passes_and_one_kib_over_fails() -> None:
    base = 30_000
    at = samples(rss=[base] * 6 + [base + RSS_SLACK_KIB] * 2)
    over = samples(rss=[base] * 6 + [base + RSS_SLACK_KIB + 1] * 2)
    assert judge(good(samples=at)).ok
    v = judge(good(samples=over))
    assert not v.ok and f"grew by {RSS_SLACK_KIB + 1} KiB" in v.text()
    assert judge(good(samples=over), rss_slack_kib=RSS_SLACK_KIB + 1).ok


def test_rss_baseline_is_the_first_quarter_peak_and_a_mid_run_spike_is_not_growth() -> None:
    warm_up = samples(rss=[90_000, 30_000, 30_000, 30_000, 30_000, 30_000, 30_000, 30_000])
    mid_spike = samples(rss=[30_000, 30_000, 30_000, 90_000, 30_000, 30_000, 30_000, 30_000])
    late_spike = samples(rss=[30_000] * 7 + [90_000])
    assert judge(good(samples=warm_up)).ok
    assert judge(good(samples=mid_spike)).ok
    assert not judge(good(samples=late_spike)).ok


def test_a_steady_leak_fails_even_when_each_step_is_small() -> None:
    # 2 MiB per sample over 8 samples: 12 MiB between the quarters' maxima.
    leak = samples(rss=[30_000 + 2048 * i for i in range(8)])
    assert not judge(good(samples=leak)).ok


def test_too_few_samples_fail() -> None:
    assert judge(good(samples=samples(fds=[20] * 4))).ok
    v = judge(good(samples=samples(fds=[20] * 3)))
    assert not v.ok and "3 samples" in v.text()


def test_quartile_growth() -> None:
    assert quartile_growth([5]) == 0
    assert quartile_growth([1, 2, 3, 4, 5, 6, 7, 9]) == 9 - 2
    with pytest.raises(ValueError):
        quartile_growth([])


def test_a_kill_fails() -> None:
    assert not judge(with_counts(kills=1)).ok


@pytest.mark.parametrize("sent", [999, 1001])
def test_frames_must_add_up_exactly(sent: int) -> None:
    v = judge(with_counts(sent=sent))
    assert not v.ok and f"sent {sent} != received 985" in v.text()


def test_the_scenario_must_have_run() -> None:
    v = judge(with_counts(fault_drops=0, received=995))
    assert not v.ok and "dropped nothing" in v.text()
    v = judge(with_counts(stalls=0))
    assert not v.ok and "no stall" in v.text()


def test_the_frontends_own_count_must_match_when_known() -> None:
    assert judge(with_counts(frontend_received=985)).ok
    v = judge(with_counts(frontend_received=984))
    assert not v.ok and "frontend counted 984" in v.text()


def test_the_frontends_sent_count_must_match_when_known() -> None:
    assert judge(with_counts(frontend_sent=1000)).ok
    v = judge(with_counts(frontend_sent=1001))
    assert not v.ok and "frontend counted 1001 sent" in v.text()


def stats(direction: str) -> dict[str, Any]:
    """A device STATS dict, trimmed to what the verdict reads."""
    return {
        "nics": [
            {
                "queues": {
                    "rx0": {
                        "frames": 900,
                        "drops": 30,
                        "drop_reasons": {"fault": 20, "rx_backlog_full": 10},
                        "kills": {},
                    },
                    "tx0": {
                        "frames": 5000,
                        "drops": 60,
                        "drop_reasons": {"fault": 50, "tx_bad_header": 10},
                        "kills": {"HEAD_OOB": 1} if direction == "kill" else {},
                    },
                }
            }
        ],
        "switch": {"host": {"drops": 7}, "nic0": {"drops": 10}},
        "host_received": 4933,
        "host_sent": 930,
        "fault_counts": {"drop": 70, "stall": 1},
    }


def test_counts_from_stats_tx_counts_host_ring_refusals_as_other_drops() -> None:
    c = counts_from_stats(stats("tx"), "tx", None, 5000)
    assert (c.sent, c.received, c.fault_drops, c.other_drops) == (5000, 4933, 50, 17)
    assert c.frontend_sent == 5000
    assert (c.stalls, c.kills) == (1, 0)
    assert judge(good(counts=c)).ok


def test_counts_from_stats_rx_and_kills() -> None:
    c = counts_from_stats(stats("rx"), "rx", 900)
    assert (c.sent, c.received, c.fault_drops, c.other_drops) == (930, 900, 20, 10)
    assert c.frontend_received == 900 and judge(good(counts=c)).ok
    assert counts_from_stats(stats("kill"), "tx", None).kills == 1


@pytest.mark.dpdk
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed")
def test_a_small_real_soak_passes(tmp_path: Path) -> None:
    """200,000 frames from testpmd virtio_user (split ring) into a device process, with the
    drop and stall scenario in the middle third: the whole verdict, real numbers.  (The
    device switches the faults by progress, polled every 2 ms: with the compiled bursts at
    0.5-1 Mpps a third of 20,000 frames could pass between two polls, so no drop.)"""
    out = tmp_path / "soak.json"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--rows", "testpmd-split-tx"]
    cmd += ["--frames", "200000", "--interval", "0.05", "--row-timeout", "60", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["verdict"] == "PASS", row
    assert row["frames"] >= 200000 and row["counts"]["fault_drops"] > 0
    assert row["in_use_after"] == 0 and row["fds_start"] == row["fds_end"]
    assert len(row["samples"]) >= 4


def test_other_drop_reasons_name_every_non_fault_drop() -> None:
    assert other_drop_reasons(stats("tx"), "tx") == {"tx0 tx_bad_header": 10, "host ring full": 7}
    assert other_drop_reasons(stats("rx"), "rx") == {"rx0 rx_backlog_full": 10}
