"""Crash/restart loops, N rounds per case, as a table (issue 12, item 2; host/restart_loops.py).

    python tools/restart_loops.py [--iterations 20] [--bound 15] [--cases a,b,...]

Cases: serve-kill-linux, serve-kill-dpdk, guest-reset, qemu-kill (default: all).  Guests boot
under TCG where KVM does not work; testpmd runs under ``timeout`` with its own file prefix and
its runtime directory removed.  Exit status 0 only when every round of every case passed and
nothing was left behind.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from host.restart_loops import (  # noqa: E402
    GUEST_IP,
    CaseResult,
    Serve,
    guest_reset,
    leftovers,
    qemu_kill,
    serve_kill_dpdk,
    serve_kill_linux,
    table,
)

CASES = (
    "serve-kill-linux",
    "serve-kill-dpdk",
    "serve-kill-dpdk-packed",
    "guest-reset",
    "qemu-kill",
)
KERNEL_ARGS = f"vdev.ip={GUEST_IP} vdev.gw=10.0.2.2 ipv6.disable=1"


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_linux_cases(work: Path, cases: list[str], n: int, bound: float) -> list[CaseResult]:
    from host.machine import Machine, Nic
    from images.linux import build_linux

    image = build_linux()
    sock, ctl = work / "nic0.sock", work / "ctl.sock"
    serve = Serve(sock, ctl, work / "serve.log")
    out: list[CaseResult] = []
    serve.start()
    try:
        shared = [c for c in cases if c in ("serve-kill-linux", "guest-reset")]
        if shared:
            progress("booting the shared guest")
            with Machine.linux(
                image,
                nics=[Nic.vhost_user(sock, reconnect=True)],
                kernel_args=KERNEL_ARGS,
                console_log=work / "console-shared.log",
            ) as m:
                if "serve-kill-linux" in cases:
                    out.append(serve_kill_linux(m, serve, n, bound, progress))
                if "guest-reset" in cases:
                    out.append(guest_reset(m, serve, n, bound, progress))
        if "qemu-kill" in cases:
            boots = iter(range(n))

            def boot() -> Machine:
                i = next(boots)
                m = Machine.linux(
                    image,
                    nics=[Nic.vhost_user(sock, reconnect=True)],
                    kernel_args=KERNEL_ARGS,
                    console_log=work / f"console-kill{i}.log",
                )
                m.launch()
                return m

            out.append(qemu_kill(boot, serve, n, bound, progress))
    finally:
        serve.stop()
        serve.close()
    left = leftovers([sock, ctl], [str(sock)])
    for r in out:
        r.leftovers += left
    return out


def run_dpdk_case(work: Path, n: int, bound: float, *, packed: bool = False) -> CaseResult:
    from interop.testpmd import TESTPMD, Testpmd

    name = "serve-kill-dpdk-packed" if packed else "serve-kill-dpdk"
    if TESTPMD is None:
        return CaseResult(name, error="dpdk-testpmd not installed")
    sock, ctl = work / f"{name}.sock", work / f"{name}-ctl.sock"
    mac = "52:54:00:d7:d7:01"
    vdev = f"net_virtio_user0,path={sock},queues=1,server=1,mac={mac}"
    vdev += ",packed_vq=1" if packed else ""
    tp = Testpmd(vdev, "txonly", work / "testpmd.log", max_seconds=60 + n * (bound + 5))
    serve = Serve(sock, ctl, work / f"serve-{name}.log", client=True)
    prefix = tp.prefix
    try:
        serve.start()
        res = serve_kill_dpdk(serve, tp, n, bound, progress)
        res.name = name
        serve.stop()
        stats = tp.stop()
        progress(f"testpmd: tx_packets={stats.tx_packets} tx_dropped={stats.tx_dropped}")
    except Exception as exc:
        res = CaseResult(name, error=f"{type(exc).__name__}: {exc}")
    finally:
        serve.close()
        tp.close()
    res.leftovers += leftovers([sock, ctl, Path("/var/run/dpdk") / prefix], [str(sock)])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--bound", type=float, default=15.0, help="seconds for traffic to resume")
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        ap.error(f"--cases: unknown {', '.join(bad)} (known: {', '.join(CASES)})")
    work = Path(tempfile.mkdtemp(prefix="vdev-loops-"))
    results: list[CaseResult] = []
    try:
        if "serve-kill-dpdk" in cases:
            results.append(run_dpdk_case(work, args.iterations, args.bound))
        if "serve-kill-dpdk-packed" in cases:
            results.append(run_dpdk_case(work, args.iterations, args.bound, packed=True))
        linux = [c for c in cases if not c.startswith("serve-kill-dpdk")]
        if linux:
            results += run_linux_cases(work, linux, args.iterations, args.bound)
    finally:
        print(table(results))
        print(f"(logs in {work})" if not all(r.ok for r in results) else "", end="")
        if all(r.ok for r in results):
            shutil.rmtree(work, ignore_errors=True)
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
