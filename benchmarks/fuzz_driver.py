"""vdev fuzz-driver: executions/s, time to each planted bug, coverage over time.

    nice -n 10 python benchmarks/fuzz_driver.py [--seeds 3] [--budget 4000] [--clean 60]

For each planted-bug build (images/bare.py VARIANTS) and seed: a campaign until the bug's
first finding (or the budget), then shrink and 10 scenario replays.  Then a clean-build
(``cov``) campaign of ``--clean`` seconds, sampled every 10 s for coverage over time.  The
headline is executions/s on one reused guest (reboots counted).  Prints markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

from host.fuzz_campaign import Campaign
from host.fuzz_target import BareTarget
from images.bare import PLANTED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=4000, help="executions per campaign")
    ap.add_argument("--clean", type=float, default=60.0, help="seconds of the clean run")
    ap.add_argument("--replays", type=int, default=10)
    args = ap.parse_args()

    print("| build | seed | found at exec | search s | exec/s | fault steps | ops | replays |")
    print("|---|---|---|---|---|---|---|---|")
    rates: list[float] = []
    for variant in PLANTED:
        with BareTarget(variant=variant) as t:
            for seed in range(1, args.seeds + 1):
                t.reboot()
                camp = Campaign(t, seed=seed, replays=args.replays)
                camp.run(budget_execs=args.budget, stop_when=lambda c: bool(c.findings))
                rates.append(camp.execs_per_second)
                if not camp.findings:
                    print(f"| {variant} | {seed} | not in {camp.execs} | - | "
                          f"{camp.execs_per_second:.1f} | - | - | - |", flush=True)  # fmt: skip
                    continue
                f = next(iter(camp.findings.values()))
                print(
                    f"| {variant} | {seed} | {f.first_exec} | {f.seconds:.1f} | "
                    f"{camp.execs_per_second:.1f} | {f.fault_steps} | {len(f.minimized)} | "
                    f"{f.replays_ok}/{f.replays} |",
                    flush=True,
                )
    print(f"\nexec/s over the planted campaigns: median {statistics.median(rates):.1f}, "
          f"min {min(rates):.1f}, max {max(rates):.1f}")  # fmt: skip

    print("\nClean build (cov), coverage over time:\n")
    print("| t s | executions | exec/s | edges | corpus | findings |")
    print("|---|---|---|---|---|---|")
    with BareTarget(variant="cov") as t:
        camp = Campaign(t, seed=1, replays=1)
        t0 = time.monotonic()
        mark = 10.0
        while time.monotonic() - t0 < args.clean:
            camp.run(budget_seconds=min(10.0, args.clean - (time.monotonic() - t0)))
            # run() restarts its clock: report cumulative numbers.
            print(
                f"| {mark:.0f} | {camp.execs} | {camp.execs_per_second:.1f} | "
                f"{camp.edge_count} | {len(camp.corpus)} | {len(camp.findings)} |",
                flush=True,
            )
            mark += 10.0
        print(f"\nboots: {t.boots} (reboots after a hang or crash: {camp.reboots})")


if __name__ == "__main__":
    main()
