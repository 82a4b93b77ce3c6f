"""Per-module mutation scores from mutmut's result files, and deterministic samples.

mutmut keeps one ``mutants/<path>.meta`` JSON per mutated source file, whose
``exit_code_by_key`` maps every mutant name (``vdev.skywalk.pool.xǁPbufpoolǁalloc__mutmut_3``)
to the exit code of its last test run (None: not run yet).  ``mutmut results`` prints only
names; this prints the table ``benchmarks/RESULTS.md`` records, and the sample
``scripts/mutate.sh --sample K`` runs: every K-th mutant of the module ordered by function
name and mutant number (mutmut numbers a function's mutants in source order), so the
sample is the same every run and spreads over the module's functions.

Usage: ``python3 tools/mutmut_score.py table [MODULE ...]``,
``python3 tools/mutmut_score.py names MODULE[:K] ... [--sample K]``,
``python3 tools/mutmut_score.py survivors MODULE``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The trust-boundary validators (issue 12 item 5), fewest mutants first (the run order).
MODULES: dict[str, str] = {
    "validate": "vdev/skywalk/validate.py",
    "chain": "vdev/virtio/chain.py",
    "codec": "vdev/vhost/codec.py",
    "split": "vdev/virtio/split.py",
    "packed": "vdev/virtio/packed.py",
    "slotwork": "vdev/skywalk/slotwork.py",
    "pool": "vdev/skywalk/pool.py",
    "backend": "vdev/vhost/backend.py",
}

# mutmut's exit codes (mutmut/stats.py), folded into the four columns the issue asks for.
KILLED = {1, 3, 37, -11, -9}  # a test failed / crashed the worker / the type checker refused
TIMEOUT = {36, 24, -24, 152, 255}
NO_TESTS = {5, 33}


def _meta(module: str) -> dict[str, int | None]:
    path = ROOT / "mutants" / (MODULES[module] + ".meta")
    if not path.exists():
        sys.exit(f"{path}: no mutmut results for {module!r} (run: bash scripts/mutate.sh {module})")
    codes: dict[str, int | None] = json.loads(path.read_text())["exit_code_by_key"]
    return codes


def _number(name: str) -> int:
    return int(name.rsplit("__mutmut_", 1)[1])


def verdict(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    if code == 0:
        return "survived"
    if code in TIMEOUT:
        return "timeout"
    if code in NO_TESTS:
        return "no tests"
    return f"exit {code}"


def sample(module: str, k: int) -> list[str]:
    """Every ``k``-th mutant of the module, in (function name, mutant number) order."""
    names = sorted(_meta(module), key=lambda n: (n.rsplit("__mutmut_", 1)[0], _number(n)))
    return names[::k]


def table(modules: list[str]) -> str:
    cols = ["killed", "survived", "timeout", "no tests", "not run"]
    out = ["| module | mutants | run | " + " | ".join(cols) + " | score |", "|" + "---|" * 9]
    for m in modules:
        codes = _meta(m)
        counts = dict.fromkeys(cols, 0)
        for c in codes.values():
            v = verdict(c)
            counts[v if v in counts else "survived"] += 1
        run = len(codes) - counts["not run"]
        tested = counts["killed"] + counts["survived"] + counts["timeout"]
        score = f"{100 * (counts['killed'] + counts['timeout']) / tested:.1f}%" if tested else "-"
        row = [MODULES[m], str(len(codes)), str(run), *(str(counts[c]) for c in cols), score]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["table", "names", "survivors"])
    ap.add_argument("modules", nargs="*", help=f"of {', '.join(MODULES)} (default: all run)")
    ap.add_argument("--sample", type=int, default=1, help="every K-th mutant of each function")
    args = ap.parse_args(argv)
    # MODULE:K samples that module 1/K (names only); the rest use --sample
    ks = {m.partition(":")[0]: int(m.partition(":")[2] or args.sample) for m in args.modules}
    args.modules = list(ks)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module {', '.join(unknown)} (want one of {', '.join(MODULES)})")
    ran = [m for m in MODULES if (ROOT / "mutants" / (MODULES[m] + ".meta")).exists()]
    mods = args.modules or ran
    if args.what == "table":
        print(table(mods))
    elif args.what == "names":
        for m in mods:
            print("\n".join(sample(m, ks.get(m, args.sample))))
    else:
        for m in mods:
            for name, code in sorted(_meta(m).items()):
                if verdict(code) not in ("killed", "timeout", "not run"):
                    print(f"{verdict(code):9} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
