"""A second process maps the arena from its fd and acts as a channel client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vdev.skywalk import Pbufpool, Port
from vdev.skywalk.remote import SyncServer, socketpair

from .conftest import assert_no_leak

ROOT = Path(__file__).resolve().parents[2]


def _run_child(
    pool: Pbufpool, port: Port, mode: str, before: Callable[[], None] | None = None
) -> dict[str, object]:
    handle = port.open_kernel_channel(alloc_nbufs=2)
    if before is not None:
        before()  # e.g. queue frames for the child's RX ring
    server_sock, client_sock = socketpair()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("remote_client.py")),
            str(pool.fd),
            str(client_sock.fileno()),
            handle.info().to_json(),
            mode,
        ],
        pass_fds=(pool.fd, client_sock.fileno()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    client_sock.close()
    server = SyncServer(handle, server_sock)
    server.serve(timeout=20.0)  # until the child hangs up
    out, err = proc.communicate(timeout=20)
    server_sock.close()
    assert proc.returncode == 0, err.decode()
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def test_child_process_sends_and_receives() -> None:
    pool = Pbufpool(num_packets=256)
    port = Port.loopback(pool, ring_slots=32)
    local = port.open_channel()

    def queue_for_child() -> None:
        assert local.send([b"to-child-%d" % i for i in range(3)]) == 3

    result = _run_child(pool, port, "traffic", queue_for_child)
    assert result["received"] == [(b"to-child-%d" % i).hex() for i in range(3)]
    assert result["sent"] == 5 and result["sent_multi"] == 1
    got = local.recv(max=100)
    assert got == [bytes([0xC0 + i]) * (60 + i) for i in range(5)] + [b"M" * 3000]
    local.close()
    port.close()
    assert_no_leak(pool)


def test_child_process_violation_is_named_and_reclaimed() -> None:
    pool = Pbufpool(num_packets=128)
    port = Port(pool, ring_slots=16)
    result = _run_child(pool, port, "hostile")
    assert result["reason"] == "BASIC_SANITY" and result["sync"] == "TX"
    assert "defunct" in str(result["defunct"])
    port.close()
    assert_no_leak(pool)
