"""Kill the device process during traffic and start it again: QEMU (chardev reconnect=1)
replays the vhost-user setup, the rings resume from SET_VRING_BASE, and the stock Linux
driver keeps working without a reset."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def start_serve(sock: Path, log: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "host.cli", "serve", "--socket", str(sock), "--json", "-v"],
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vdev serve exited with {proc.returncode}: {log.read_text()}")
        if sock.exists():
            try:
                import socket

                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(1)
                    s.connect(str(sock))  # a live listener (not the stale file)
                    return proc
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("vdev serve did not come up")


def replies(m: object) -> int:
    out, _ = m.run("grep -c 'bytes from' /tmp/bg.log", timeout=10)  # type: ignore[attr-defined]
    return int(out.strip().splitlines()[-1])


def test_device_crash_and_restart_during_traffic(linux_image: object, tmp_path: Path) -> None:
    from host.machine import Machine, Nic

    sock, log = tmp_path / "nic0.sock", tmp_path / "serve.log"
    serve = start_serve(sock, log)
    try:
        with Machine.linux(
            linux_image,  # type: ignore[arg-type]
            nics=[Nic.vhost_user(sock, reconnect=True)],
            kernel_args="vdev.ip=10.0.2.15/24 vdev.gw=10.0.2.2",
        ) as m:
            out, status = m.run("ping -c 3 -W 2 10.0.2.2", timeout=30)
            assert status == 0, out
            m.run("ping -i 0.1 10.0.2.2 > /tmp/bg.log 2>&1 & echo $! > /tmp/bg.pid", timeout=10)
            time.sleep(1.0)
            before = replies(m)
            assert before > 0
            serve.kill()  # a crash: no cleanup, the socket file stays behind
            serve.wait(timeout=10)
            time.sleep(1.0)
            serve = start_serve(sock, log)
            # QEMU reconnects within ~1 s and replays the ring setup.
            deadline = time.monotonic() + 30
            ok = False
            while time.monotonic() < deadline and not ok:
                out, status = m.run("ping -c 3 -W 1 10.0.2.2", timeout=30)
                ok = status == 0 and " 0% packet loss" in out
            assert ok, f"no traffic after restart:\n{out}\n{log.read_text()[-3000:]}"
            # The ping started before the crash kept going over the same driver instance.
            after = replies(m)
            time.sleep(1.0)
            assert replies(m) > after > before
            m.run("kill $(cat /tmp/bg.pid)", timeout=10)
            carrier, _ = m.run("cat /sys/class/net/eth0/carrier", timeout=10)
            assert carrier.strip().endswith("1")
        serve.send_signal(signal.SIGINT)
        out, _ = serve.communicate(timeout=15)
        stats = json.loads(out[out.index("{") :])
        queues = stats["nics"][0]["queues"]
        assert queues["tx0"]["frames"] > 0 and queues["rx0"]["frames"] > 0
        assert queues["tx0"]["kills"] == {} and queues["rx0"]["kills"] == {}
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert not sock.exists()
