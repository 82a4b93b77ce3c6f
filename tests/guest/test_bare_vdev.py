"""The bare driver against the real vdev device (``vdev serve``) over vhost-user.

The device's built-in responder is the peer: the driver sends an ARP request and UDP echo
requests as raw frames (``txhex``) and must receive the answers; ``tx`` traffic is counted by the
device. Skips when the device cannot be imported.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host.bare_console import BareGuest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = bytes([10, 0, 2, 15])
RESPONDER_IP = bytes([10, 0, 2, 2])
RESPONDER_MAC = bytes.fromhex("5254000000fe")


class VdevServe:
    """``vdev serve --json`` in a subprocess; ``stop()`` returns its final statistics."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host.cli", "serve", "--socket", str(sock), "--json"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=5)
                raise RuntimeError(f"vdev serve did not start: {err}")
            time.sleep(0.02)

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=5)
            raise
        start = out.find("{")
        return json.loads(out[start:]) if start >= 0 else {}


@pytest.fixture
def vdev(tmp_path: Path) -> Iterator[VdevServe]:
    try:
        import vdev.net.device  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vdev device not importable: {exc}")
    server = VdevServe(tmp_path / "vdev.sock")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(5)


def vhost_guest(elf: Path, sock: Path, append: str = "") -> BareGuest:
    """A bare guest whose NIC is vdev: vhost-user needs guest RAM in a shared memfd."""
    return BareGuest(
        elf,
        netdev="vhost-user,id=n0,chardev=c0",
        append=append,
        extra=[
            *("-chardev", f"socket,id=c0,path={sock}"),
            *("-object", "memory-backend-memfd,id=mem,size=64M,share=on"),
            *("-numa", "node,memdev=mem"),
        ],
    )


def arp_request() -> bytes:
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + bytes(6)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body + RESPONDER_IP


def ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_echo_request(payload: bytes, sport: int = 40000) -> bytes:
    udp = struct.pack("!HHHH", sport, 7, 8 + len(payload), 0) + payload  # checksum 0: none
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, GUEST_IP, RESPONDER_IP
    )
    ip = ip[:10] + struct.pack("!H", ip_checksum(ip)) + ip[12:]
    return RESPONDER_MAC + GUEST_MAC + b"\x08\x00" + ip + udp


def check_echo(frame: bytes, payload: bytes) -> None:
    """The responder's UDP echo, byte for byte where it is defined, parsed with dpkt: addresses
    and ports swapped, the exact payload, a valid IPv4 header checksum (dpkt recomputes it).

    Mutation killed: the responder echoing zeros of the right length (tools/mutants/
    section5-qemu.toml ``bare-echo-zeros``); the old test only compared lengths."""
    import dpkt

    assert len(frame) == 14 + 20 + 8 + len(payload)
    eth = dpkt.ethernet.Ethernet(frame)
    assert (eth.dst, eth.src, eth.type) == (GUEST_MAC, RESPONDER_MAC, 0x0800)
    ip = eth.data
    assert (ip.src, ip.dst, ip.p, ip.len) == (RESPONDER_IP, GUEST_IP, 17, 28 + len(payload))
    udp = ip.data
    assert (udp.sport, udp.dport, udp.ulen, udp.sum) == (7, 40000, 8 + len(payload), 0)
    assert bytes(udp.data) == payload
    sent_sum = ip.sum
    ip.sum = 0  # serialising recomputes it (and fills in the UDP sum: read above, first)
    assert dpkt.ip.IP(bytes(ip)).sum == sent_sum


def dumped(reply_lines: list[str]) -> list[bytes]:
    return [bytes.fromhex(ln.split("hex=")[1]) for ln in reply_lines if ln.startswith("frame ")]


@pytest.mark.parametrize(
    "append", ["", "legacy event_idx=0 mrg_rxbuf=0", "modern event_idx=1 mrg_rxbuf=0"]
)
def test_responder_round_trips(bare_elf: Path, vdev: VdevServe, append: str) -> None:
    with vhost_guest(bare_elf, vdev.sock, append=append) as g:
        g.cmd(f"txhex {arp_request().hex()}")
        reply = g.cmd("rx 1 3000 dump")
        (arp,) = dumped(reply.lines)
        assert arp[:6] == GUEST_MAC and arp[12:14] == b"\x08\x06"
        assert arp[20:22] == b"\x00\x02" and arp[28:32] == RESPONDER_IP  # ARP reply
        for size in (18, 600, 1400):
            # No zero runs: a zero-filled echo must not match (it did with the old payload).
            payload = bytes((7 * i + 1) & 0xFF or 0x5A for i in range(size))
            g.cmd(f"txhex {udp_echo_request(payload).hex()} 10")
            got = g.cmd("rx 10 3000 full")
            assert got.int("received") == 10
            echoes = dumped(got.lines)
            assert len(echoes) == 10
            for echo in echoes:
                check_echo(echo, payload)
        g.cmd("tx 300 60 32")
        stats = g.stats()
        assert stats["violations"] == 0
        g.quit(0)
    final = vdev.stop()
    nic = final["nics"][0]
    assert nic["queues"]["tx0"]["frames"] == 1 + 30 + 300
    assert nic["queues"]["rx0"]["frames"] == 1 + 30
    assert not nic["queues"]["tx0"]["kills"] and not nic["queues"]["rx0"]["kills"]
    assert final["responder"]["arp_replies"] == 1 and final["responder"]["udp_replies"] == 30
