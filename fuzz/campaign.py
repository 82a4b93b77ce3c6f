"""Run fuzz targets and print one table row per target (``scripts/fuzz.sh`` calls this).

Each target runs in its own process (``python -m fuzz.run``) over a scratch corpus
directory seeded from ``fuzz/corpus/<target>/`` (read-only: new inputs go to the scratch
directory; ``--keep`` writes them back).  libFuzzer's output is parsed for the executions,
the coverage (``cov``: edges/counters, ``ft``: features) and what ended the run: a crash, a
hang (``-timeout``) or a leak (a harness's ``FuzzLeak``, or LeakSanitizer).  Artifacts land
in ``fuzz/artifacts/``.  Targets whose inputs reach the compiled module run against its
UBSan build, and the corpus they end with is replayed under ASan + UBSan (see
``vdev/native/build.py``).  Exit status 1 if any target saw a crash, hang or leak.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.run import TARGETS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
ARTIFACTS = ROOT / "fuzz" / "artifacts"
# Targets whose inputs reach the compiled module: run them against the sanitized build.
SANITIZED = {"skywalk", "virtqueue"}


@dataclass
class Result:
    target: str
    execs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    leaks: int = 0
    sanitized: bool = False
    replayed: int = 0  # corpus inputs replayed under ASan
    artifact: str = ""

    @property
    def clean(self) -> bool:
        return not (self.crashes or self.hangs or self.leaks)


_STAT = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.M)
_COV = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def parse(target: str, log: str, seconds: float, sanitized: bool) -> Result:
    """The numbers in one libFuzzer log (see the module docstring)."""
    r = Result(target, seconds=seconds, sanitized=sanitized)
    m = _STAT.findall(log)
    covs = _COV.findall(log)
    if covs:
        last = covs[-1]
        r.cov, r.ft, r.corpus = int(last[1]), int(last[2]), int(last[3])
        r.execs = int(last[0])
    if m:
        r.execs = int(m[-1])
    art = _ARTIFACT.findall(log)
    r.artifact = art[-1] if art else ""
    if "ALARM: working on the last Unit" in log or "ERROR: libFuzzer: timeout" in log:
        r.hangs = 1
    elif "FuzzLeak" in log or "ERROR: LeakSanitizer" in log:
        r.leaks = 1
    elif (
        "Uncaught Python exception" in log
        or "ERROR: AddressSanitizer" in log
        or "runtime error:" in log
        or "deadly signal" in log
        or "out-of-memory" in log
        or r.artifact
    ):
        r.crashes = 1
    return r


def fuzz_env(sanitize: str | None) -> dict[str, str]:
    """The environment of one fuzz process: ``sanitize`` None (plain C build), "ubsan" or
    "asan" (with the ASan runtime preloaded; atheris' coverage does not work then)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    for key in ("VDEV_NATIVE_SANITIZE", "LD_PRELOAD", "ASAN_OPTIONS"):
        env.pop(key, None)
    if sanitize == "ubsan":
        env["VDEV_NATIVE_SANITIZE"] = "ubsan"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    elif sanitize == "asan":
        from vdev.native import build

        runtime = build.asan_runtime()
        if runtime is None:
            raise SystemExit("fuzz: no ASan runtime (gcc -print-file-name=libasan.so)")
        env["VDEV_NATIVE_SANITIZE"] = "asan"
        env["LD_PRELOAD"] = runtime
        # Python itself is not ASan-built: its own allocations at exit are not ours.
        env["ASAN_OPTIONS"] = "detect_leaks=0:handle_sigbus=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


def libfuzzer(
    target: str, args: list[str], dirs: list[str], env: dict[str, str], artifacts: Path
) -> str:
    cmd = [
        sys.executable, "-m", "fuzz.run", target, "-timeout=10", "-rss_limit_mb=3072",
        "-print_final_stats=1", "-max_len=4096", f"-artifact_prefix={artifacts}/{target}-",
        *args, *dirs,
    ]  # fmt: skip
    dict_file = ROOT / "fuzz" / "dicts" / f"{target}.dict"
    if dict_file.exists():
        cmd.insert(4, f"-dict={dict_file}")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", check=False,
    )  # fmt: skip
    return proc.stdout + ("" if proc.returncode == 0 else f"\n[exit status {proc.returncode}]\n")


def run_target(
    target: str, runs: int, *, max_time: int = 0, sanitize: bool = True, keep: bool = False,
    quiet: bool = False, artifacts: Path = ARTIFACTS,
) -> Result:  # fmt: skip
    """Fuzz ``target`` for ``runs`` executions; targets that reach C are fuzzed against the
    UBSan build, and every input of the corpus they end with is replayed once under
    ASan + UBSan (``-runs=0``: each file once, no mutation)."""
    seeds = CORPUS / target
    artifacts.mkdir(exist_ok=True)
    san = sanitize and target in SANITIZED
    with tempfile.TemporaryDirectory(prefix=f"vdev-fuzz-{target}-") as scratch:
        dirs = [scratch, str(seeds)] if seeds.is_dir() else [scratch]
        args = [f"-runs={runs}"] + ([f"-max_total_time={max_time}"] if max_time else [])
        t0 = time.monotonic()
        log = libfuzzer(target, args, dirs, fuzz_env("ubsan" if san else None), artifacts)
        seconds = time.monotonic() - t0
        (artifacts / f"{target}.log").write_text(log)
        r = parse(target, log, seconds, san)
        if san and r.clean:
            replay = libfuzzer(target, ["-runs=0"], dirs, fuzz_env("asan"), artifacts)
            (artifacts / f"{target}-asan.log").write_text(replay)
            a = parse(target, replay, 0.0, True)
            r.crashes, r.leaks, r.hangs, r.artifact = a.crashes, a.leaks, a.hangs, a.artifact
            if "[exit status" in replay and a.clean:
                r.crashes = 1
            r.replayed = sum(len(os.listdir(d)) for d in dirs)
        if keep and seeds.is_dir():
            for f in Path(scratch).iterdir():
                shutil.copy(f, seeds / f.name)
    if "[exit status" in log and r.clean:
        r.crashes = 1  # died in a way the log does not name: count it, keep the log
    if not quiet and not r.clean:
        print(log[-4000:], file=sys.stderr)
    return r


HEADER = (
    f"{'target':<10} {'execs':>10} {'exec/s':>7} {'cov':>6} {'ft':>6} {'corpus':>6} "
    f"{'crashes':>7} {'hangs':>5} {'leaks':>5}  C build (targets that reach C)"
)


def row(r: Result) -> str:
    rate = r.execs / r.seconds if r.seconds else 0
    cbuild = f"ubsan; corpus {r.replayed} under asan" if r.sanitized else "-"
    return (
        f"{r.target:<10} {r.execs:>10} {rate:>7.0f} {r.cov:>6} {r.ft:>6} {r.corpus:>6} "
        f"{r.crashes:>7} {r.hangs:>5} {r.leaks:>5}  {cbuild}"
        + (f"  ({r.artifact})" if r.artifact else "")
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/fuzz.sh", description=__doc__.split("\n")[0])
    ap.add_argument("target", nargs="?", choices=[*TARGETS, "all"], default="all")
    ap.add_argument("--runs", type=int, default=100_000, help="executions per target")
    ap.add_argument("--max-time", type=int, default=0, help="seconds per target (0: no limit)")
    ap.add_argument("--no-sanitize", action="store_true", help="use the plain C build")
    ap.add_argument("--keep", action="store_true", help="add new inputs to fuzz/corpus/")
    args = ap.parse_args(argv)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    print(HEADER, flush=True)
    results = []
    for t in targets:
        r = run_target(
            t, args.runs, max_time=args.max_time, sanitize=not args.no_sanitize, keep=args.keep
        )
        results.append(r)
        print(row(r), flush=True)
    return 0 if all(r.clean for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
