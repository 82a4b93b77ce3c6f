"""Shared pieces of the sandbox tests: a module-scoped sandbox and host-channel helpers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from host.bare_console import check_pattern_frame, pattern_frame
from host.cli_sandbox import GUEST_MAC, Sandbox
from vdev.net.nic import RX_BACKLOG

if TYPE_CHECKING:
    from vdev.net.nic import VirtioNet
    from vdev.skywalk import Channel

GUEST_MAC_B = bytes.fromhex(GUEST_MAC.replace(":", ""))
HOST_MAC_B = bytes.fromhex("02000000aa01")


def require_tools() -> Path:
    """The driver ELF; skips (with the reason) when QEMU or the compiler is missing."""
    from host.device_fixtures import bare_elf_or_skip

    return bare_elf_or_skip()


def sandbox_fixture(tmp_path_factory: pytest.TempPathFactory, **kw: object) -> Iterator[Sandbox]:
    elf = require_tools()
    log = tmp_path_factory.mktemp("sandbox") / "console.log"
    sb = Sandbox(elf=elf, console_log=log, **kw)  # type: ignore[arg-type]
    sb.start()
    try:
        yield sb
    finally:
        sb.close()


def drain(ch: Channel, quiet: float = 0.2, limit: float = 10.0) -> list[bytes]:
    """Everything the channel receives until nothing arrived for ``quiet`` seconds."""
    out: list[bytes] = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = ch.recv(256, timeout=quiet)
        if not got:
            break
        out += got
    return out


class Collector:
    """Reads a host channel in a thread while the guest transmits (its RX ring is finite)."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self.frames: list[bytes] = []
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.frames += self.ch.recv(256, timeout=0.05)
        except Exception as exc:  # channel closed under a failed test: stop quietly
            self.error = exc

    def stop(self, quiet: float = 0.3) -> list[bytes]:
        self._stop.set()
        self._thread.join(10)
        if self.error is not None:
            raise self.error
        self.frames += drain(self.ch, quiet)
        return self.frames


def guest_frames(frames: list[bytes]) -> list[int]:
    """Sequence numbers of the driver's pattern frames (raises on a broken one)."""
    return [check_pattern_frame(f) for f in frames if f[12:14] == b"\x88\xb5"]


def send_all(
    ch: Channel,
    frames: list[bytes],
    limit: float = 30.0,
    *,
    nic: VirtioNet | None = None,
    rate: float = 20_000.0,
) -> None:
    """Send every frame, retrying while the channel's TX ring or pool is full, paced.

    The compiled host side (``chanbatch``) sends hundreds of thousands of frames a second,
    far faster than a driver under TCG takes them; the switch then drops what the NIC's RX
    backlog cannot hold (as a VALE port would), so exact-delivery tests must pace: with
    ``nic``, wait while its backlog (and a datapath thread's inbox: ``rx_waiting``) is half
    full; without, stay under ``rate`` frames/s.
    """
    sent = 0
    start = time.monotonic()
    end = start + limit
    while sent < len(frames):
        if nic is not None:
            if nic.rx_waiting() >= RX_BACKLOG // 2:
                if time.monotonic() > end:
                    raise TimeoutError(f"NIC backlog never drained ({sent}/{len(frames)} sent)")
                time.sleep(0.0002)
                continue
        else:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        n = ch.send(frames[sent : sent + 64])
        sent += n
        if n == 0:
            if time.monotonic() > end:
                raise TimeoutError(f"host channel accepted only {sent}/{len(frames)} frames")
            time.sleep(0.002)


def to_guest(count: int, size: int, first: int = 0) -> list[bytes]:
    return [pattern_frame(first + i, size, dst=GUEST_MAC_B, src=HOST_MAC_B) for i in range(count)]


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.01) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; returns its last value."""
    end = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(step)


def driver_stats(sb: Sandbox) -> dict[str, int]:
    """The driver's counters read from guest RAM (no console round trip)."""
    stats: dict[str, int] = sb.introspect()["stats"]
    return stats


def send_one_at_a_time(
    sb: Sandbox, ch: Channel, count: int, size: int, counter: str, first: int = 0
) -> None:
    """Send frames one by one so that no two device calls can merge into one interrupt and
    no frame can be picked up by polling before its interrupt lands: each frame goes out
    once the driver waits with RX notifications armed, and the next only after the
    driver's ``counter`` moved for it, the driver harvested it (``rx_packets``) and halted
    again (``vdev_halts``), i.e. it is back in its wait, re-armed."""
    s0 = driver_stats(sb)

    def rx_armed() -> bool:
        return any(q["kind"] == "rx" and q["armed"] for q in sb.introspect()["queues"])

    for k in range(count):
        # The command has started waiting with RX notifications on (a frame sent earlier
        # would be found when it arms, and its call would land on a queue not yet armed).
        if not wait_for(rx_armed, timeout=10):
            raise TimeoutError(f"the driver's RX queue never armed before frame {k}")
        send_all(ch, to_guest(1, size, first=first + k))
        want, got = s0[counter] + k + 1, s0["rx_packets"] + k + 1
        ok = wait_for(lambda want=want: driver_stats(sb)[counter] >= want, timeout=10)
        ok = ok and wait_for(lambda got=got: driver_stats(sb)["rx_packets"] >= got, timeout=10)
        halts = sb.introspect()["globals"]["vdev_halts"]
        ok = ok and wait_for(lambda h=halts: sb.introspect()["globals"]["vdev_halts"] > h + 1)
        if not ok:
            st = driver_stats(sb)
            irq = {key: v for key, v in st.items() if key.startswith(("irq_", "rx_"))}
            raise TimeoutError(f"{counter} stayed below {want} after frame {k}: {irq}")


def csum16(data: bytes) -> int:
    """RFC 1071 one's-complement sum (not inverted), computed here independently of both
    the driver and the device."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether an IPv4 UDP/TCP frame carries a complete, correct L4 checksum."""
    ihl = (frame[14] & 0xF) * 4
    ip = frame[14 : 14 + ihl]
    l4 = frame[14 + ihl : 14 + int.from_bytes(ip[2:4], "big")]
    pseudo = ip[12:20] + bytes([0, ip[9]]) + len(l4).to_bytes(2, "big")
    return csum16(pseudo + l4) == 0xFFFF


def l4_pseudo_sum(frame: bytes) -> int:
    """The pseudo-header sum a NEEDS_CSUM frame must carry in its L4 checksum field."""
    ihl = (frame[14] & 0xF) * 4
    ip = frame[14 : 14 + ihl]
    l4len = int.from_bytes(ip[2:4], "big") - ihl
    return csum16(ip[12:20] + bytes([0, ip[9]]) + l4len.to_bytes(2, "big"))
