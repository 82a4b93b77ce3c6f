"""Hand-written mutation testing: apply one mutant, run the tests that claim to cover it.

A mutant is a literal text replacement in one source file (``old`` must occur exactly
``count`` times, default once, so a mutant cannot silently miss its target after a
refactor).  For each mutant the runner applies it, runs ``pytest -x`` on its test paths
(bounded by a timeout), restores the file byte for byte, and reports KILLED (a test failed)
or SURVIVED (every test passed: the tests do not guard that line).  A mutant that does not
apply is reported as STALE.

The mutants live in TOML files (``tools/mutants/*.toml``)::

    [[mutant]]
    id = "ready-bytes-gt"
    file = "vdev/skywalk/validate.py"
    old = "if ulen != pub:"
    new = "if ulen > pub:"
    tests = ["tests/skywalk/test_kill_reasons.py"]

Usage: ``python3 tools/mutate.py tools/mutants/*.toml [--only ID ...] [--expect killed]
[--root DIR]``; ``--root`` runs against another tree (``git archive REV | tar -x -C DIR``) to
show which mutants the older tests let survive.
Compiled-path mutants (``fastpath.c``) rebuild the extension into a private cache directory
(``VDEV_CACHE_DIR`` under a temp dir), never the user's cache.  Tests run with ``CI=1``
(derandomized hypothesis, as in CI), so the same mutant gets the same verdict every run.
With ``--expect killed`` the exit status is non-zero if any mutant survived.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: list[str]
    count: int = 1
    note: str = ""
    extra: list[str] = field(default_factory=list)  # extra pytest arguments (-k ...)


def load(paths: list[Path]) -> list[Mutant]:
    out: list[Mutant] = []
    for path in paths:
        with path.open("rb") as f:
            data = tomllib.load(f)
        for raw in data.get("mutant", []):
            out.append(Mutant(**raw))
    return out


def run_one(m: Mutant, root: Path, cache: str, timeout: float) -> tuple[str, str, float]:
    target = root / m.file
    original = target.read_bytes()
    text = original.decode()
    found = text.count(m.old)
    if found != m.count:
        return "STALE", f"'old' found {found} times, expected {m.count}", 0.0
    # CI=1: hypothesis derandomized (tests/conftest.py), so a verdict is reproducible.
    env = dict(os.environ, PYTHONPATH=str(root), VDEV_CACHE_DIR=cache, CI="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.extra]
    cmd += m.tests
    t0 = time.monotonic()
    try:
        target.write_text(text.replace(m.old, m.new))
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "KILLED", f"timeout after {timeout:.0f} s", time.monotonic() - t0
    finally:
        target.write_bytes(original)
    dt = time.monotonic() - t0
    lines = proc.stdout.splitlines()
    if proc.returncode == 0:
        return "SURVIVED", lines[-1] if lines else "", dt
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return "KILLED", (failed[0] if failed else (lines[-1] if lines else "")), dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="TOML mutant lists")
    ap.add_argument("--only", nargs="*", default=None, help="mutant ids to run")
    ap.add_argument("--prefix", default="", help="run only the mutants whose id starts so")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    ap.add_argument("--expect", choices=["killed"], help="fail if any mutant survives")
    ap.add_argument(
        "--root", type=Path, default=ROOT, help="tree to mutate and test (e.g. an older export)"
    )
    args = ap.parse_args(argv)
    mutants = [m for m in load(args.files) if m.id.startswith(args.prefix)]
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            print(f"--only: no mutant named {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in args.only]
    survived = 0
    with tempfile.TemporaryDirectory(prefix="vdev-mutate-") as cache:
        for m in mutants:
            verdict, detail, dt = run_one(m, args.root.resolve(), cache, args.timeout)
            survived += verdict != "KILLED"
            print(f"{verdict:8} {m.id:40} {dt:6.1f}s  {detail}", flush=True)
    print(f"{len(mutants) - survived}/{len(mutants)} killed")
    return 1 if args.expect and survived else 0


if __name__ == "__main__":
    sys.exit(main())
