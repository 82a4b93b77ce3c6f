"""Run ``dpdk-testpmd`` as a bounded, always-cleaned-up peer and read its counters.

testpmd pins its forwarding lcore at 100%, so every run is wrapped in ``timeout`` (a test
that dies still cannot leave it spinning), stopped early with SIGINT (``timeout`` forwards
it), killed if it does not exit, and its EAL runtime directory (/var/run/dpdk/PREFIX,
created as root) is removed.  On SIGINT testpmd prints an "Accumulated forward statistics
for all ports" block, which is what ``stop()`` parses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd")
DPDK_RUNTIME = Path("/var/run/dpdk")

_ACCUMULATED = "Accumulated forward statistics for all ports"
_RX = re.compile(r"RX-packets:\s+(\d+)\s+RX-dropped:\s+(\d+)\s+RX-total:\s+(\d+)")
_TX = re.compile(r"TX-packets:\s+(\d+)\s+TX-dropped:\s+(\d+)\s+TX-total:\s+(\d+)")

_counter = 0


def unique_prefix(tag: str) -> str:
    """An EAL --file-prefix no other testpmd on this machine uses.

    The pid makes it unique per process (each pytest-xdist worker is one); the worker id
    (``gw0``...) only makes /var/run/dpdk readable while a parallel run is going.
    """
    global _counter
    _counter += 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return f"vdev{tag}{worker}{os.getpid()}x{_counter}"


@dataclass
class ForwardStats:
    """testpmd's final accumulated forward statistics."""

    rx_packets: int
    rx_dropped: int
    tx_packets: int
    tx_dropped: int


def parse_forward_stats(output: str) -> ForwardStats:
    at = output.rfind(_ACCUMULATED)
    if at < 0:
        raise AssertionError(f"no final forward statistics in testpmd output:\n{output[-3000:]}")
    block = output[at:]
    rx, tx = _RX.search(block), _TX.search(block)
    if rx is None or tx is None:
        raise AssertionError(f"cannot parse testpmd statistics:\n{block[:1000]}")
    return ForwardStats(int(rx[1]), int(rx[2]), int(tx[1]), int(tx[2]))


class Testpmd:
    """One testpmd with one vdev port (``net_virtio_user0,...`` or ``net_vhost0,...``)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        vdev: str,
        mode: str,
        log_path: Path,
        *,
        txpkts: int = 64,
        eth_peer: str | None = None,
        lcores: str = "0,1",
        main_lcore: int = 0,
        max_seconds: float = 30.0,
        tag: str = "t",
        extra: tuple[str, ...] = (),
    ) -> None:
        assert TESTPMD is not None
        self.prefix = unique_prefix(tag)
        self.log_path = log_path
        argv = [
            "timeout",
            "-s",
            "INT",
            "-k",
            "5",
            str(max_seconds),
            TESTPMD,
            "--no-huge",
            "-m",
            "512",
            "--no-pci",
            "--file-prefix",
            self.prefix,
            "-l",
            lcores,
            "--main-lcore",
            str(main_lcore),
            "--vdev",
            vdev,
            "--",
            "--total-num-mbufs",
            "16384",
            f"--forward-mode={mode}",
            f"--txpkts={txpkts}",
            "--stats-period",
            "1",
            "-a",
        ]
        if eth_peer is not None:
            argv.append(f"--eth-peer=0,{eth_peer}")
        argv += extra
        self.argv = argv
        self._log = open(log_path, "w")  # closed in close()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> ForwardStats:
        """SIGINT, wait for the final statistics, clean up; returns the statistics."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.close()
            tail = self.output()[-2000:]
            raise AssertionError(f"testpmd did not exit on SIGINT:\n{tail}") from exc
        self.close()
        return parse_forward_stats(self.output())

    def close(self) -> None:
        """Kill if still running, close the log, remove the EAL runtime directory."""
        if self.proc.poll() is None:
            # ``timeout`` leads its own process group (testpmd is in it): kill the group.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if not self._log.closed:
            self._log.close()
        shutil.rmtree(DPDK_RUNTIME / self.prefix, ignore_errors=True)

    def __enter__(self) -> Testpmd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
