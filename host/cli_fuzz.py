"""``vdev fuzz-driver``: the device fuzzes the guest driver (docs/fuzz-driver.md).

Runs a coverage-guided search (``host.fuzz_campaign``) of device misbehaviour interleaved
with traffic against the bare driver in one reused sandbox (``host.fuzz_target``), shrinks
every new finding to a minimal scenario and writes it to the findings directory
(``host.fuzz_findings``).  ``--report`` prints the findings table instead.

Exit status: 0 the search ran (findings or not), 1 ``--expect-finding`` and none came,
2 usage, 3 the guest could not start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from host.cli_args import input_dir, output_dir, seconds


def register(subparsers: Any) -> None:
    from images.bare import VARIANTS

    p = subparsers.add_parser(
        "fuzz-driver",
        help="fuzz a guest driver with device misbehaviour; shrink findings to scenarios",
        description=(
            "Generate sequences of device misbehaviour (ring faults, malformed vnet headers, "
            "bogus ids and lengths, reordered/duplicate/late completions, interrupt faults, "
            "link changes, resets and renegotiation mid-traffic) interleaved with traffic, "
            "against the bare driver built with its coverage map. Each new signature (the "
            "first BUG/panic console line, a hang, a failed liveness probe) is shrunk to a "
            "minimal scenario TOML, replayed, and written to --findings."
        ),
    )
    p.add_argument(
        "--target",
        choices=("bare", "linux"),
        default="bare",
        help="bare: the vdev bare driver (coverage map); linux: Debian's virtio_net in the "
        "vdev Linux image (device-observed behaviour as novelty)",
    )
    p.add_argument(
        "--variant",
        choices=[v for v in VARIANTS if v != "default"],
        default="cov",
        help="bare-driver build: cov (coverage map) or a test-only planted-bug build",
    )
    p.add_argument("--append", default="", metavar="ARGS", help="driver command line")
    p.add_argument("--execs", type=int, default=None, metavar="N", help="stop after N executions")
    p.add_argument(
        "--seconds",
        type=seconds(positive=True),
        default=None,
        help="stop after this long (default 60 s when --execs is not given)",
    )
    p.add_argument("--seed", type=int, default=1, help="search seed (default 1)")
    p.add_argument(
        "--replays", type=int, default=10, help="scenario replays per finding (default 10)"
    )
    p.add_argument(
        "--findings",
        metavar="DIR",
        type=output_dir,
        default="fuzz-findings",
        help="findings directory (default ./fuzz-findings)",
    )
    p.add_argument("--stop-on-finding", action="store_true", help="stop at the first new signature")
    p.add_argument(
        "--expect-finding", action="store_true", help="exit 1 when the search finds nothing"
    )
    p.add_argument("--no-pcap", action="store_true", help="skip the fresh-guest pcap replay")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--report", action="store_true", help="print the findings table of --findings and exit"
    )
    p.add_argument(
        "--confirm",
        type=int,
        default=None,
        metavar="N",
        help="runs each shrink candidate must reproduce the signature in (default 1 for "
        "bare, 2 for linux)",
    )
    p.add_argument(
        "--from-findings",
        metavar="DIR",
        type=input_dir,
        default=None,
        help="no search: run the original program of every finding in DIR again, then "
        "shrink, replay and write what reproduces to --findings (re-minimizes old findings)",
    )
    p.set_defaults(func=run_fuzz)


def run_fuzz(args: argparse.Namespace) -> int:
    from host.fuzz_findings import report_table

    root = Path(args.findings)
    if args.report:
        print(report_table(root))
        return 0
    if args.execs is not None and args.execs < 1:
        print(f"vdev fuzz-driver: --execs {args.execs}: must be >= 1", file=sys.stderr)
        return 2
    if args.replays < 1:
        print(f"vdev fuzz-driver: --replays {args.replays}: must be >= 1", file=sys.stderr)
        return 2
    if args.confirm is not None and args.confirm < 1:
        print(f"vdev fuzz-driver: --confirm {args.confirm}: must be >= 1", file=sys.stderr)
        return 2
    source = Path(args.from_findings) if args.from_findings else None
    if source is not None and not list(source.glob("*/finding.json")):
        print(f"vdev fuzz-driver: --from-findings {source}: no */finding.json", file=sys.stderr)
        return 2
    budget_s = args.seconds if args.seconds is not None or args.execs else 60.0
    summary = fuzz(
        target_kind=args.target,
        variant=args.variant,
        append=args.append,
        execs=args.execs,
        seconds_budget=budget_s,
        seed=args.seed,
        replays=args.replays,
        root=root,
        stop_on_finding=args.stop_on_finding,
        pcap=not args.no_pcap,
        confirm=args.confirm,
        source=source,
        progress=lambda line: print(f"vdev fuzz-driver: {line}", file=sys.stderr, flush=True),
    )
    if summary is None:
        return 3
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['execs']} executions in {summary['search_seconds']:.1f} s "
            f"({summary['execs_per_second']:.1f}/s), {summary['edges']} edges, "
            f"{len(summary['findings'])} findings"
        )
        print(report_table(root) if summary["findings"] else "no findings")
    return 1 if args.expect_finding and not summary["findings"] else 0


def fuzz(
    *,
    target_kind: str = "bare",
    variant: str = "cov",
    append: str = "",
    execs: int | None = None,
    seconds_budget: float | None = 60.0,
    seed: int = 1,
    replays: int = 10,
    root: Path = Path("fuzz-findings"),
    stop_on_finding: bool = False,
    pcap: bool = True,
    progress: Any = None,
    confirm: int | None = None,
    source: Path | None = None,
) -> dict[str, Any] | None:
    """One campaign against the bare driver; the summary dict (None: no guest)."""
    from host.cli_sandbox import SandboxError
    from host.errors import MachineError
    from host.fuzz_campaign import Campaign, Finding
    from host.fuzz_findings import write_finding
    from host.fuzz_target import BareTarget

    target: Any
    if target_kind == "linux":
        from host.fuzz_linux import LinuxTarget

        target = LinuxTarget()
        pcap = False  # the capture replay boots the bare driver
        variant = "linux"
    else:
        target = BareTarget(variant=variant, append=append)
    try:
        target.start()
    except (SandboxError, MachineError) as exc:
        print(f"vdev fuzz-driver: {exc}", file=sys.stderr)
        return None

    def pcap_replay(prog: Any, path: str) -> None:
        with BareTarget(variant=variant, append=append, pcap=path) as fresh:
            fresh.run(prog)

    def on_finding(f: Finding) -> None:
        d = write_finding(
            root,
            f,
            variant=variant,
            pcap_replay=pcap_replay if pcap else None,
            target=target_kind,
        )
        if progress is not None:
            progress(f"wrote {d}")

    camp = Campaign(
        target,
        seed=seed,
        replays=replays,
        on_finding=on_finding,
        progress=progress,
        shrink_budget=40 if target_kind == "linux" else 120,
        confirm=confirm if confirm is not None else (2 if target_kind == "linux" else 1),
    )
    t0 = time.monotonic()
    try:
        if source is not None:
            from host.fuzz_findings import load_findings, ops_from_json

            for info in load_findings(source):
                got = camp.adopt(ops_from_json(info["program"]))
                if progress is not None:
                    progress(f"{info['signature']}: the original program gave {got}")
        else:
            camp.run(
                budget_execs=execs,
                budget_seconds=seconds_budget,
                stop_when=(lambda c: bool(c.findings)) if stop_on_finding else None,
            )
    except KeyboardInterrupt:
        if progress is not None:
            progress("interrupted: the summary covers the search so far")
    finally:
        target.close()
    out = camp.summary()
    out["search_seconds"] = round(time.monotonic() - t0 - camp.shrink_seconds, 2)
    out["boots"] = target.boots
    out["target"] = target_kind
    out["samples"] = [s.__dict__ for s in camp.samples]
    out["variant"] = variant
    out["seed"] = seed
    return out


__all__ = ["fuzz", "register", "run_fuzz"]
