"""The crash/restart loops of tools/restart_loops.py, bounded to 3 rounds per case (the 20-round
run and its table are in benchmarks/RESULTS.md).  One ``vdev serve`` and one guest serve the
SIGKILL and reset loops; the QEMU-kill loop boots its own guests against the same device.

Each round passes only if traffic resumed within the bound, no queue was killed, the
guest's counters moved forward and (QEMU killed) the device let go of the guest's memory and
fds; the module ends with nothing left behind (host/restart_loops.py says how each is
measured).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host.restart_loops import (
    CaseResult,
    Serve,
    guest_reset,
    leftovers,
    qemu_kill,
    serve_kill_dpdk,
    serve_kill_linux,
    table,
)

ROUNDS = 3
BOUND = 20.0  # seconds for traffic to resume (TCG, two shared cores)
KERNEL_ARGS = "vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2 ipv6.disable=1"

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _check(res: CaseResult) -> None:
    assert len(res.rounds) == ROUNDS and res.ok, table([res])


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    work = tmp_path_factory.mktemp("loops")
    s = Serve(work / "nic0.sock", work / "ctl.sock", work / "serve.log")
    s.start()
    try:
        yield s
    finally:
        s.stop()
        s.close()
    assert leftovers([s.sock, s.control], [str(s.sock)]) == []


@pytest.fixture(scope="module")
def guest(serve: Serve, linux_guest_factory: Any) -> Any:
    from host.machine import Nic

    return linux_guest_factory([Nic.vhost_user(serve.sock, reconnect=True)], KERNEL_ARGS)


def test_serve_sigkill_loop_with_a_linux_guest(guest: Any, serve: Serve) -> None:
    _check(serve_kill_linux(guest, serve, ROUNDS, BOUND))


def test_guest_reset_loop(guest: Any, serve: Serve) -> None:
    _check(guest_reset(guest, serve, ROUNDS, BOUND))


def test_qemu_sigkill_loop(serve: Serve, guest: Any, linux_image: Any, tmp_path: Path) -> None:
    from host.machine import Machine, Nic

    # This test owns the socket now: the shared guest goes (a new QEMU's connection would
    # replace its one, and the device must hold nothing for a front-end when a round ends).
    guest.shutdown()

    n = iter(range(ROUNDS))

    def boot() -> Machine:
        m = Machine.linux(
            linux_image,
            nics=[Nic.vhost_user(serve.sock, reconnect=True)],
            kernel_args=KERNEL_ARGS,
            console_log=tmp_path / f"console-{next(n)}.log",
        )
        m.launch()
        return m

    res = qemu_kill(boot, serve, ROUNDS, BOUND)
    _check(res)


@pytest.mark.dpdk
@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed")
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_serve_sigkill_loop_with_dpdk_virtio_user_server(tmp_path: Path, packed: bool) -> None:
    from interop.testpmd import Testpmd

    sock, ctl = tmp_path / "pmd.sock", tmp_path / "ctl.sock"
    vdev = f"net_virtio_user0,path={sock},queues=1,server=1,mac=52:54:00:d7:d7:01"
    vdev += ",packed_vq=1" if packed else ""
    serve = Serve(sock, ctl, tmp_path / "serve.log", client=True)
    with Testpmd(vdev, "txonly", tmp_path / "testpmd.log", max_seconds=120) as tp:
        prefix = tp.prefix
        try:
            serve.start()
            res = serve_kill_dpdk(serve, tp, ROUNDS, BOUND)
            serve.stop()
            tp.stop()
        finally:
            serve.close()
    _check(res)
    assert leftovers([sock, ctl, Path("/var/run/dpdk") / prefix], [str(sock)]) == []
