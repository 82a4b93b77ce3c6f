"""A frontend that truncates its memfd mid-traffic costs its own connection only (issue 12
item 4).

Two NICs in one device.  NIC a's frontend runs in a child process (its own mapping of the
memfd would SIGBUS the test process otherwise): it exchanges pings with the responder, then
queues a burst, truncates its guest RAM to 0 bytes and kicks, touching its memory no more,
and waits for the device to hang up.  Meanwhile this process floods NIC a's RX from a host
channel (the device writes a's rings from this thread) and pings through NIC b.  Afterwards:
a was dropped with a GuestMemoryFault naming its region, b lost not one reply and still
has its first connection, and NIC a serves a new frontend.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.errors import GuestMemoryFault
from vdev.net.device import Device
from vdev.testing.frames import HOST_MAC, icmp_echo, numbered
from vdev.testing.frontend import VirtioNetFrontend
from vdev.virtio import fastqueue, memguard

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not memguard.available(), reason="compiled module unavailable (no C compiler?)"
)

HOSTILE = """
import os, select, sys, time
from vdev.testing.frames import icmp_echo
from vdev.testing.frontend import VirtioNetFrontend

fe = VirtioNetFrontend(sys.argv[1], packed=sys.argv[2] == "packed")
replies = 0
for seq in range(20):  # traffic flows before anything goes wrong
    fe.send([icmp_echo(seq)])
    replies += len(fe.recv(1, timeout=2))
print("pings", replies, flush=True)
sys.stdin.readline()  # the parent is flooding our RX and pinging through NIC b now
fe.send([icmp_echo(100 + i) for i in range(64)])  # a burst the device is working on ...
os.ftruncate(fe.mem.fd, 0)  # ... when the guest RAM goes away
os.eventfd_write(fe.txq().kick_fd, 1)  # from here on no access to our own memory
sock = fe.vhost.conn.sock
sock.setblocking(True)
sock.settimeout(10)
try:
    eof = sock.recv(4096) == b""
except OSError as exc:
    eof = "reset" in str(exc).lower()
print("hung-up" if eof else "still-connected", flush=True)
os._exit(0)
"""


def echo_reply(fe: VirtioNetFrontend, seq: int) -> int:
    """1 once the responder's echo reply ``seq`` arrives (other frames are skipped: NIC a's
    flood reaches b too, a's MAC being unknown to the switch), 0 after 2 s."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for frame in fe.recv(64, timeout=0.05):
            if frame[12:14] == b"\x08\x00" and frame[34] == 0:
                if struct.unpack_from("!H", frame, 40)[0] == seq:
                    return 1
    return 0


@pytest.fixture(params=["python", "c"])
def queue_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both virtqueue paths: the compiled bursts read and write guest memory in C, where the
    SIGBUS of a truncated memfd lands in virtq.c rather than in a memoryview access."""
    old = fastqueue.BACKEND
    assert fastqueue.set_backend(request.param) == request.param
    yield request.param
    fastqueue.set_backend(old)


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_truncated_memfd_costs_that_connection_only(
    tmp_path: Path, ring: str, queue_backend: str
) -> None:
    bursts_before = fastqueue.COUNTS.get("tx_bursts", 0) + fastqueue.COUNTS.get("rx_bursts", 0)
    with Device() as dev:
        path_a, path_b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
        nic_a = dev.add_nic(path_a, name="a")
        dev.add_nic(path_b, name="b")
        dev.start()
        sock_a, sock_b = dev.socket_of(nic_a), dev.sockets[1]
        fe_b = VirtioNetFrontend(path_b, packed=ring == "packed")
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(HOSTILE), path_a, ring],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline().split() == ["pings", "20"]
            # Flood NIC a's RX from this thread while the child pulls its memory away.
            stop = threading.Event()
            ch = dev.open_channel("host")

            def flood() -> None:
                seq = 0
                while not stop.is_set():
                    ch.send([numbered(nic_a.mac, HOST_MAC, seq, 200)])
                    seq += 1
                    time.sleep(0.0005)

            flooder = threading.Thread(target=flood, daemon=True)
            flooder.start()
            child.stdin.write("go\n")
            child.stdin.flush()
            sent = got = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # NIC b pings through it all
                fe_b.send([icmp_echo(sent)])
                sent += 1
                got += echo_reply(fe_b, sent - 1)
            verdict = child.stdout.readline().split()
            stop.set()
            flooder.join(5)
            ch.close()
            assert child.wait(10) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdin.close()
            child.stdout.close()
        assert verdict == ["hung-up"]
        assert got == sent and sent > 20
        # a: one connection, dropped for the named fault; b: untouched.
        assert sock_a.server.memory_faults == 1 and sock_a.connections == 1
        err = sock_a.server.last_fault
        assert isinstance(err, GuestMemoryFault)
        assert err.gpa in (0, 0xC0000) and "truncated" in str(err)
        assert not sock_a.server.connected
        assert sock_b.server.memory_faults == 0 and sock_b.server.last_fault is None
        assert sock_b.connections == 1 and sock_b.server.connected
        stats = dev.stats()["nics"]
        assert [n["memory_faults"] for n in stats] == [1, 0]  # type: ignore[index]
        # NIC a is not broken: a well-behaved frontend gets served on the same socket.
        with VirtioNetFrontend(path_a) as fe_a:
            fe_a.send([icmp_echo(7)])
            assert echo_reply(fe_a, 7) == 1
        assert sock_a.connections == 2 and sock_a.server.memory_faults == 1
        fe_b.send([icmp_echo(999)])
        assert echo_reply(fe_b, 999) == 1
        # Not one ring-contract kill was counted for the zero pages a's queues read.
        for nic in stats:
            assert all(not q["kills"] for q in nic["queues"].values())  # type: ignore[index]
        fe_b.close()
    bursts = fastqueue.COUNTS.get("tx_bursts", 0) + fastqueue.COUNTS.get("rx_bursts", 0)
    # The path named is the path that ran (the reference never counts bursts).
    assert (bursts > bursts_before) == (queue_backend == "c")
