"""Host side: frames per second a Skywalk channel's user half moves, Python loops vs compiled.

The host side (test code, benchmarks) must not be what limits a measurement of the device.
Cells, each with the channel's user half in Python (``Channel.send_py``/``recv_py``) and in
C (``chanbatch``), and the kernel half's per-slot and pool loops compiled in both
(``validate`` backend "c"):

* send -> sink: ``send`` of 256-frame bursts into a port whose ``on_transmit`` frees them.
* loopback: one channel sends, a second one on a loopback port receives (``recv``), both
  in this thread: every frame crosses two user halves and two kernel halves.
* attached sender: the sending channel lives in another process (``Channel.attach`` on the
  arena fd; each sync is a request over a socket), this process serves its syncs and
  receives on a local channel.

Each cell gives frames per wall-clock second and frames per CPU-second (``process_time``;
for the attached cell, the CPU of both processes), the second being what a shared machine
distorts least (the load average is printed with the table).  DPDK has no counterpart of
a Skywalk user half, so the yardstick column is the target of issue 11 (1 Mpps) instead.

Usage: python3 benchmarks/host_channel.py [--seconds 1.0] [--sizes 64,1500]
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdev.skywalk import Pbufpool, Port, chanbatch, validate
from vdev.skywalk.remote import SyncServer, socketpair

BURST = 256
TARGET = 1e6

CHILD = """
import sys, time
from vdev.skywalk import Channel, ChannelInfo, chanbatch
chanbatch.set_enabled(sys.argv[4] == "c")
ch = Channel.attach(int(sys.argv[1]), ChannelInfo.from_json(sys.argv[2]), int(sys.argv[3]))
frames = [b"\\xab" * int(sys.argv[5])] * 256
end = time.monotonic() + float(sys.argv[6])
n = 0
while time.monotonic() < end:
    n += ch.send(frames)
print(n, time.process_time())
ch.close()
"""


def _pool() -> Pbufpool:
    return Pbufpool(num_packets=8192, buf_size=2048, max_frags=4, num_ring_slots=16384)


def _send(ch: object, frames: list[bytes], compiled: bool) -> int:
    return ch.send(frames) if compiled else ch.send_py(frames)  # type: ignore[attr-defined]


def _recv(ch: object, compiled: bool) -> int:
    if compiled:
        return chanbatch.recv_count(ch, 4 * BURST)[0]  # type: ignore[arg-type]
    return len(ch.recv_py(4 * BURST))  # type: ignore[attr-defined]


def sink(size: int, seconds: float, compiled: bool) -> tuple[float, float]:
    pool = _pool()
    port = Port(pool, ring_slots=1024, on_transmit=lambda p, pk: pool.free_packets(pk))
    ch = port.open_channel()
    frames = [b"\xab" * size] * BURST
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        n += _send(ch, frames, compiled)
    rate = n / (time.perf_counter() - t0), n / (time.process_time() - c0)
    ch.close()
    port.close()
    pool.close()
    return rate


def loopback(size: int, seconds: float, compiled: bool) -> tuple[float, float]:
    pool = _pool()
    port = Port.loopback(pool, ring_slots=1024)
    a, b = port.open_channel(), port.open_channel()
    frames = [b"\xab" * size] * BURST
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        _send(a, frames, compiled)
        n += _recv(b, compiled)
    rate = n / (time.perf_counter() - t0), n / (time.process_time() - c0)
    for ch in (a, b):
        ch.close()
    port.close()
    pool.close()
    return rate


def attached(size: int, seconds: float, compiled: bool) -> tuple[float, float]:
    pool = _pool()
    port = Port.loopback(pool, ring_slots=1024)
    local = port.open_channel()
    handle = port.open_kernel_channel()
    server_sock, client_sock = socketpair()
    fd = client_sock.fileno()
    mode = "c" if compiled else "python"
    argv = [sys.executable, "-c", CHILD, str(pool.fd), handle.info().to_json(), str(fd)]
    proc = subprocess.Popen(
        [*argv, mode, str(size), str(seconds)],
        pass_fds=(pool.fd, fd),
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
    )
    client_sock.close()
    server = SyncServer(handle, server_sock)
    got = 0
    t_first = None
    c0 = time.process_time()
    while True:
        ready, _, _ = select.select([server_sock], [], [], 0.5)
        if ready:
            if not server.handle_request():
                break
            if t_first is None:
                t_first = time.perf_counter()
        got += _recv(local, compiled)
    t_end = time.perf_counter()
    got += _recv(local, compiled)
    cpu = time.process_time() - c0
    out, _ = proc.communicate(timeout=30)
    cpu += float(out.split()[1])
    server_sock.close()
    local.close()
    port.close()
    pool.close()
    return got / (t_end - (t_first or t_end) or 1.0), got / cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per cell")
    ap.add_argument("--sizes", default="64,1500")
    args = ap.parse_args()
    if validate.set_backend("c") != "c" or not chanbatch.available():
        print("compiled module unavailable (is a C compiler installed?)", file=sys.stderr)
        return 1
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        "| cell | bytes | Python: pps (wall) | Python: frames/CPU-s | C: pps (wall) "
        "| C: frames/CPU-s | C / Python (CPU) | C frames/CPU-s / 1 Mpps target |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, fn in (("send -> sink", sink), ("loopback", loopback), ("attached sender", attached)):
        for size in [int(s) for s in args.sizes.split(",")]:
            pw, pc = fn(size, args.seconds, False)
            cw, cc = fn(size, args.seconds, True)
            print(
                f"| {name} | {size} | {pw:,.0f} | {pc:,.0f} | {cw:,.0f} | {cc:,.0f} "
                f"| {cc / pc:.1f}x | {cc / TARGET:.2f} |",
                flush=True,
            )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
