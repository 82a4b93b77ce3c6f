"""Hand-written mutation testing: apply one mutant, run the tests that claim to cover it.

A mutant is a literal text replacement in one source file, or several at once (``also``;
``old`` must occur exactly ``count`` times, default once, so a mutant cannot silently miss
its target after a refactor).  For each mutant the runner applies it, runs ``pytest -x`` on
its test paths (bounded by a timeout), restores the files byte for byte, and reports KILLED
(a test failed) or SURVIVED (every test passed: the tests do not guard that line).  A mutant
that does not apply is reported as STALE.

The mutants live in TOML files (``tools/mutants/*.toml``)::

    [[mutant]]
    id = "ready-bytes-gt"
    file = "vdev/skywalk/validate.py"
    old = "if ulen != (ln if ln <= SD_LEN_MAX else SD_LEN_MAX):"
    new = "if ulen > (ln if ln <= SD_LEN_MAX else SD_LEN_MAX):"
    tests = ["tests/skywalk/test_kill_reasons.py"]
    also = [{file = "vdev/native/fastpath.c", old = "if (ulen != pub)", new = "if (ulen > pub)"}]

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
class Edit:
    file: str
    old: str
    new: str
    count: int = 1


@dataclass
class Mutant:
    """One mutant: an edit (``file``/``old``/``new``), or several applied together (``also``:
    e.g. the same check broken in validate.py AND its C twin, which a differential test
    comparing the two backends cannot see)."""

    id: str
    file: str
    old: str
    new: str
    tests: list[str]
    count: int = 1
    note: str = ""
    extra: list[str] = field(default_factory=list)  # extra pytest arguments (-k ...)
    also: list[Edit] = field(default_factory=list)

    def edits(self) -> list[Edit]:
        return [Edit(self.file, self.old, self.new, self.count), *self.also]


def load(paths: list[Path]) -> list[Mutant]:
    out: list[Mutant] = []
    for path in paths:
        with path.open("rb") as f:
            data = tomllib.load(f)
        for raw in data.get("mutant", []):
            also = [Edit(**e) for e in raw.pop("also", [])]
            out.append(Mutant(**raw, also=also))
    return out


def run_one(m: Mutant, root: Path, cache: str, timeout: float) -> tuple[str, str, float]:
    originals: dict[Path, bytes] = {}
    mutated: dict[Path, str] = {}
    for e in m.edits():
        target = root / e.file
        originals.setdefault(target, target.read_bytes())
        text = mutated.get(target, originals[target].decode())
        found = text.count(e.old)
        if found != e.count:
            return "STALE", f"{e.file}: 'old' found {found} times, expected {e.count}", 0.0
        mutated[target] = text.replace(e.old, e.new)
    # CI=1: hypothesis derandomized (tests/conftest.py), so a verdict is reproducible.
    env = dict(os.environ, PYTHONPATH=str(root), VDEV_CACHE_DIR=cache, CI="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.extra]
    cmd += m.tests
    t0 = time.monotonic()
    try:
        for target, text in mutated.items():
            target.write_text(text)
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "KILLED", f"timeout after {timeout:.0f} s", time.monotonic() - t0
    finally:
        for target, original in originals.items():
            target.write_bytes(original)
    dt = time.monotonic() - t0
    lines = proc.stdout.splitlines()
    if proc.returncode == 0:
        return "SURVIVED", lines[-1] if lines else "", dt
    # pytest's short summary (not captured log lines, which also start with "ERROR")
    failed = [ln for ln in lines if ln.startswith(("FAILED tests", "ERROR tests"))]
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
