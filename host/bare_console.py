"""Drive the bare-metal guest driver (``guest/driver``) over its serial console.

``BareGuest`` starts QEMU with the driver ELF as ``-kernel`` (always under a wall-clock
limit, in its own session so it can be killed as a group), waits for the ``vdev> `` prompt
(measuring start-to-prompt time), sends one command at a time and parses the single
``OK ...`` / ``ERR ...`` status line that ends every reply. QEMU is killed on exit, on
exceptions and when the Python object is collected.

The NIC is either QEMU's own ``-netdev socket`` UDP backend (``UdpLink``: the test sends and
receives raw Ethernet frames as datagrams, no vdev needed) or any ``-netdev`` string the
caller passes (e.g. a vhost-user chardev once vdev runs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pexpect

PROMPT = "vdev> "
STATUS_RE = re.compile(r"^(OK|ERR) (\S+)(.*)$")
KV_RE = re.compile(r"(\w+)=(\S+)")
ETHERTYPE_VDEV = 0x88B5
BROADCAST = b"\xff" * 6
# The multiboot loader passes the kernel path first; the driver ignores unknown words.
Transport = Literal["pci", "pci-modern", "mmio"]
Machine = Literal["pc", "q35", "microvm"]


class BareConsoleError(RuntimeError):
    """QEMU or the guest failed; the message carries the command line and console tail."""


@dataclass
class Reply:
    """One command's reply: the status line parsed, plus the informational lines before it."""

    ok: bool
    verb: str
    fields: dict[str, str]
    status_line: str
    lines: list[str] = field(default_factory=list)

    def int(self, key: str) -> int:
        """A numeric field of the status line (decimal or 0x-hex)."""
        return int(self.fields[key], 0)

    def pairs(self) -> dict[str, str]:
        """Every ``key=value`` on the informational lines (what ``stats`` prints)."""
        out: dict[str, str] = {}
        for line in self.lines:
            out.update(KV_RE.findall(line))
        return out


def qemu_binary() -> str:
    """Path of qemu-system-x86_64 (``$VDEV_QEMU`` overrides)."""
    path = os.environ.get("VDEV_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise BareConsoleError("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    return path


def free_udp_port() -> int:
    """A UDP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class UdpLink:
    """The host end of QEMU's ``-netdev socket,udp=...``: one datagram is one frame."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.host_port: int = self.sock.getsockname()[1]
        self.qemu_port = free_udp_port()

    def netdev(self, netdev_id: str = "n0") -> str:
        return (
            f"socket,id={netdev_id},udp=127.0.0.1:{self.host_port},"
            f"localaddr=127.0.0.1:{self.qemu_port}"
        )

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, ("127.0.0.1", self.qemu_port))

    def recv(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """Up to ``count`` frames, stopping ``timeout`` seconds after the last one arrived."""
        frames: list[bytes] = []
        self.sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError):
            while len(frames) < count:
                frames.append(self.sock.recv(70000))
        return frames

    def drain(self) -> int:
        """Discard whatever is queued; returns how many frames."""
        n = 0
        self.sock.settimeout(0.0)
        with contextlib.suppress(BlockingIOError, TimeoutError):
            while True:
                self.sock.recv(70000)
                n += 1
        return n

    def qemu_backlog(self) -> int:
        """Bytes (kernel truesize) waiting in QEMU's UDP socket, from /proc/net/udp.

        QEMU stops reading that socket while the guest has no RX buffers, and the socket
        drops datagrams once ~rmem_default is queued: waiting for 0 before each burst is
        the host's flow control.
        """
        suffix = f":{self.qemu_port:04X}"
        with open("/proc/net/udp") as f:
            for line in f:
                cols = line.split()
                if len(cols) > 4 and cols[1].endswith(suffix):
                    return int(cols[4].split(":")[1], 16)
        return 0

    def wait_drained(self, timeout: float = 10.0) -> None:
        """Wait until QEMU has read every datagram sent to it (see ``qemu_backlog``)."""
        deadline = time.monotonic() + timeout
        while self.qemu_backlog() > 0:
            if time.monotonic() > deadline:
                raise BareConsoleError(f"QEMU did not drain its socket in {timeout} s")
            time.sleep(0.001)

    def close(self) -> None:
        self.sock.close()


def pattern_frame(seq: int, size: int, dst: bytes = BROADCAST, src: bytes | None = None) -> bytes:
    """The driver's test frame: header, "VDEV", seq, size, then byte[o] = (seq + o) & 0xff."""
    if size < 26:
        raise ValueError("pattern frames are at least 26 bytes")
    src = src if src is not None else bytes.fromhex("020000000001")
    head = dst + src + struct.pack(">H", ETHERTYPE_VDEV) + b"VDEV" + struct.pack("<II", seq, size)
    return head + bytes((seq + o) & 0xFF for o in range(26, size))


def check_pattern_frame(frame: bytes) -> int:
    """Return the sequence number of an intact pattern frame, else raise ValueError."""
    if len(frame) < 26 or frame[12:14] != struct.pack(">H", ETHERTYPE_VDEV):
        raise ValueError("not a vdev pattern frame")
    if frame[14:18] != b"VDEV":
        raise ValueError("bad magic")
    seq, size = struct.unpack_from("<II", frame, 18)
    if size != len(frame):
        raise ValueError(f"size field {size} != frame length {len(frame)}")
    expect = bytes((seq + o) & 0xFF for o in range(26, size))
    if frame[26:] != expect:
        raise ValueError(f"payload pattern mismatch in frame {seq}")
    return int(seq)


def qemu_args(
    elf: Path,
    *,
    machine: Machine = "pc",
    transport: Transport = "pci",
    netdev: str,
    append: str = "",
    extra: Sequence[str] = (),
    memory_mb: int = 64,
    monitor: Path | None = None,
) -> list[str]:
    """The QEMU command line for one bare guest with one virtio-net NIC on netdev ``n0``.

    ``monitor``: a Unix socket path for QEMU's human monitor (used to read guest RAM).
    """
    mon = f"unix:{monitor},server=on,wait=off" if monitor is not None else "none"
    # Always TCG: this harness is the driver's unit-test rig on QEMU's UDP backend, where
    # the whole boot takes ~0.1 s under TCG anyway; KVM selection and its run-time fallback
    # live in host.machine.Machine, which the sandbox and every vhost-user guest use.
    args = [qemu_binary(), "-machine", machine, "-accel", "tcg", "-m", str(memory_mb)]
    args += ["-display", "none", "-monitor", mon, "-serial", "stdio", "-no-reboot"]
    args += ["-nodefaults"] if machine != "microvm" else []
    args += ["-kernel", str(elf)]
    if append:
        args += ["-append", append]
    args += ["-netdev", netdev]
    if transport == "mmio":
        args += ["-device", "virtio-net-device,netdev=n0"]
    elif transport == "pci-modern":
        args += ["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]
    else:
        args += ["-device", "virtio-net-pci,netdev=n0"]
    args += ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    args += list(extra)
    return args


class BareGuest:
    """One QEMU running the bare driver; a context manager that always kills QEMU."""

    def __init__(
        self,
        elf: Path,
        *,
        netdev: str,
        machine: Machine = "pc",
        transport: Transport = "pci",
        append: str = "",
        extra: Sequence[str] = (),
        boot_timeout: float = 10.0,
        wall_limit: float = 120.0,
        log_path: Path | None = None,
        monitor: Path | None = None,
    ) -> None:
        self.elf = elf
        self.monitor = monitor
        self.args = qemu_args(
            elf,
            machine=machine,
            transport=transport,
            netdev=netdev,
            append=append,
            extra=extra,
            monitor=monitor,
        )
        self.boot_timeout = boot_timeout
        self.wall_limit = wall_limit
        self.log_path = log_path
        self.child: pexpect.spawn | None = None
        self.start_to_prompt: float = 0.0
        self.boot_lines: list[str] = []
        self.exit_status: int | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> BareGuest:
        # `timeout -s KILL` is the last line of defence: QEMU never outlives wall_limit even if
        # this process is SIGKILLed before close() runs.
        argv = ["timeout", "-s", "KILL", str(int(self.wall_limit)), *self.args]
        t0 = time.monotonic()
        self.child = pexpect.spawn(
            argv[0], argv[1:], encoding="utf-8", codec_errors="replace", timeout=30
        )
        if self.log_path is not None:
            self.child.logfile_read = self.log_path.open("a")
        self.child.delaybeforesend = None
        idx = self.child.expect_exact([PROMPT, pexpect.EOF, pexpect.TIMEOUT], self.boot_timeout)
        if idx != 0:
            self._fail("no prompt from the bare guest")
        self.start_to_prompt = time.monotonic() - t0
        self.boot_lines = _lines(self.child.before)
        return self

    def __enter__(self) -> BareGuest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        """Kill QEMU (and the timeout wrapper) if still running."""
        child, self.child = self.child, None
        if child is None:
            return
        if child.isalive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(child.pid), signal.SIGKILL)
            child.close(force=True)
        else:
            child.close()
        if self.exit_status is None:
            self.exit_status = child.exitstatus
        if child.logfile_read is not None:
            child.logfile_read.close()

    # -- commands ------------------------------------------------------------------------
    def send_line(self, line: str) -> None:
        """Send a command without waiting (for commands that run while the host acts)."""
        child = self._child()
        child.send(line + "\r")
        # The guest echoes the line; consume it so the reply parser starts after it.
        child.expect_exact(line, timeout=5)

    def wait_reply(self, timeout: float = 30.0) -> Reply:
        """Wait for the status line and the next prompt; parse them."""
        child = self._child()
        idx = child.expect([r"\n\r*(OK|ERR) [^\r\n]*\r*\n", pexpect.EOF, pexpect.TIMEOUT], timeout)
        if idx != 0:
            self._fail("no status line from the bare guest")
        before = child.before
        status = child.after.strip()
        # Wait for the prompt so the next command is not typed into this one's output.
        if child.expect_exact([PROMPT, pexpect.EOF, pexpect.TIMEOUT], 10) != 0:
            self._fail("no prompt after the status line")
        return parse_reply(status, _lines(before))

    def cmd(self, line: str, timeout: float = 30.0, check: bool = True) -> Reply:
        """Run one console command and return its parsed reply (raise on ERR if check)."""
        self.send_line(line)
        reply = self.wait_reply(timeout)
        if check and not reply.ok:
            self._fail(f"command {line!r} failed: {reply.status_line}")
        return reply

    def stats(self) -> dict[str, int]:
        """The ``stats`` command as a dict of integers."""
        return {k: int(v, 0) for k, v in self.cmd("stats").pairs().items()}

    def quit(self, code: int = 0, timeout: float = 10.0) -> int:
        """``quit CODE``; returns QEMU's exit status ((code << 1) | 1 via isa-debug-exit)."""
        child = self._child()
        child.send(f"quit {code}\r")
        child.expect([pexpect.EOF, pexpect.TIMEOUT], timeout)
        child.close()
        self.exit_status = child.exitstatus
        self.child = None
        return -1 if self.exit_status is None else int(self.exit_status)

    # -- guest memory --------------------------------------------------------------------
    def read_memory(self, addr: int, size: int, timeout: float = 10.0) -> bytes:
        """Guest-physical memory through the monitor's ``pmemsave`` (needs ``monitor=``).

        The driver runs without paging, so an ELF symbol's address is its physical address.
        """
        if self.monitor is None:
            raise BareConsoleError("read_memory needs BareGuest(monitor=...)")
        out = self.monitor.with_suffix(".mem")
        out.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor))
            _read_until(s, b"(qemu) ")
            s.sendall(f'pmemsave {addr:#x} {size} "{out}"\n'.encode())
            _read_until(s, b"(qemu) ")
        data = out.read_bytes()
        out.unlink()
        if len(data) != size:
            raise BareConsoleError(f"pmemsave returned {len(data)} bytes, wanted {size}")
        return data

    # -- helpers -------------------------------------------------------------------------
    def _child(self) -> pexpect.spawn:
        if self.child is None:
            raise BareConsoleError("bare guest is not running")
        return self.child

    def _fail(self, message: str) -> None:
        tail = ""
        if self.child is not None:
            before = self.child.before if isinstance(self.child.before, str) else ""
            tail = before[-2000:]
        cmdline = " ".join(self.args)
        self.close()
        raise BareConsoleError(f"{message}\nQEMU: {cmdline}\nconsole tail:\n{tail}")


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise BareConsoleError(f"monitor closed before {marker!r}")
        buf += chunk
    return buf


def elf_symbols(elf: Path) -> dict[str, tuple[int, int]]:
    """Global data symbols of the driver ELF: name -> (guest-physical address, size)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    out: dict[str, tuple[int, int]] = {}
    with elf.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise BareConsoleError(f"{elf}: no symbol table")
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] == "STT_OBJECT" and sym["st_info"]["bind"] == "STB_GLOBAL":
                out[sym.name] = (int(sym["st_value"]), int(sym["st_size"]))
    return out


STATS_H = Path(__file__).resolve().parent.parent / "guest" / "driver" / "stats.h"
_CDEF_BLOCK = re.compile(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", re.S)


def driver_ffi() -> Any:
    """A fresh cffi FFI with the shared ABI (skywalk.h, virtio.h) plus the driver's stats.h.

    Built from the headers' CDEF text rather than with ``ffi.include(vdev.abi.ffi)``: an
    include would share (and can disturb) the device's own FFI type objects.
    """
    from cffi import FFI

    from vdev.abi import HEADERS, cdef_text

    match = _CDEF_BLOCK.search(STATS_H.read_text())
    if match is None:
        raise BareConsoleError(f"{STATS_H}: no CDEF block")
    ffi = FFI()
    for name in HEADERS:
        ffi.cdef(cdef_text(name))
    ffi.cdef(re.sub(r"\b(0x[0-9a-fA-F]+|\d+)U?L?L?\b", r"\1", match.group(1)))
    return ffi


def _lines(text: object) -> list[str]:
    if not isinstance(text, str):
        return []
    return [ln.strip("\r") for ln in text.split("\n") if ln.strip()]


def parse_reply(status_line: str, lines: list[str]) -> Reply:
    """Parse ``OK verb k=v ...`` / ``ERR verb ...``."""
    m = STATUS_RE.match(status_line)
    if m is None:
        raise BareConsoleError(f"not a status line: {status_line!r}")
    return Reply(
        ok=m.group(1) == "OK",
        verb=m.group(2),
        fields=dict(KV_RE.findall(m.group(3))),
        status_line=status_line,
        lines=lines,
    )


@contextlib.contextmanager
def bare_guest_with_udp(
    elf: Path,
    *,
    machine: Machine = "pc",
    transport: Transport = "pci",
    append: str = "",
    extra: Sequence[str] = (),
    monitor: Path | None = None,
) -> Iterator[tuple[BareGuest, UdpLink]]:
    """A bare guest whose NIC is QEMU's UDP socket backend, plus the host end of the link."""
    link = UdpLink()
    guest = BareGuest(
        elf,
        netdev=link.netdev(),
        machine=machine,
        transport=transport,
        append=append,
        extra=extra,
        monitor=monitor,
    )
    try:
        guest.start()
        yield guest, link
    finally:
        guest.close()
        link.close()
