"""The guest serial console, driven with pexpect over a Unix socket.

QEMU connects its serial port to a socket we listen on, so nothing the guest prints is lost
before we attach, and everything is appended to a log file as it is read. ``run`` executes
one shell command in the guest and returns its output and exit status; see its docstring for
how it stays reliable with terminal echo and line editing in the way.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect
import pexpect.fdpexpect

from host.errors import CommandFailed, GuestCrashed, GuestTimeout, MachineError, tail_lines

# What a broken guest prints. Matched while waiting for anything else, so a panic fails the
# wait at once instead of after its timeout. The "] " prefix is the printk timestamp, which
# keeps a program that merely prints "BUG:" from failing a test.
DEFAULT_FAIL_PATTERNS: tuple[str, ...] = (
    r"Kernel panic - not syncing",
    r"\] BUG: ",
    r"\] Oops: ",
    r"\] general protection fault",
    r"\] WARNING: CPU: ",
    r"VDEV-MODULE-FAIL \S+",
)
PROMPT = "vdev-guest# "
READY_PATTERN = r"VDEV-READY[^\r\n]*\r?\n"
# Busybox line editing truncates lines longer than ~1 KiB: send the command in chunks.
_CHUNK = 512
_TMP_CMD = "/tmp/.vdev-cmd"


@dataclass
class ErrorContext:
    """What the owner (the Machine) adds to every error: command line, stderr, log path."""

    cmdline: Sequence[str] = ()
    stderr_tail: str = ""
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Console:
    """pexpect over the console socket, with failure patterns and a log file."""

    def __init__(
        self,
        sock: socket.socket,
        log_path: Path,
        context: Callable[[], ErrorContext] = ErrorContext,
        fail_patterns: Sequence[str] = DEFAULT_FAIL_PATTERNS,
    ) -> None:
        self._sock = sock
        self.log_path = log_path
        self._context = context
        self.fail_patterns = list(fail_patterns)
        self._log = open(log_path, "a", encoding="utf-8", errors="replace", newline="")
        self._tags = itertools.count(1)
        self._echo_off = False
        self.child = pexpect.fdpexpect.fdspawn(
            sock.fileno(),
            timeout=30,
            encoding="utf-8",
            codec_errors="replace",
            maxread=65536,
            searchwindowsize=None,
        )
        self.child.logfile_read = self._log

    # ------------------------------------------------------------------ errors
    def tail(self, lines: int = 40) -> str:
        """The last lines of the console log (carriage returns removed)."""
        self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return tail_lines(text.replace("\r", ""), lines)

    def log_offset(self) -> int:
        """Where the console log ends now (for ``log_since``)."""
        self._log.flush()
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        """What the console printed (and was read) since ``log_offset()`` returned ``offset``."""
        self._log.flush()
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", errors="replace").replace("\r", "")
        except OSError:
            return ""

    def _error(self, cls: type[MachineError], message: str) -> MachineError:
        ctx = self._context()
        return cls(
            message,
            cmdline=ctx.cmdline,
            console_tail=self.tail(),
            stderr_tail=ctx.stderr_tail,
            log_path=ctx.log_path or self.log_path,
        )

    # ------------------------------------------------------------------ expect
    def expect(
        self,
        pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]],
        timeout: float = 30.0,
        fail_patterns: Sequence[str] | None = None,
    ) -> re.Match[str]:
        """Wait for ``pattern`` (a regex, or a list: the first that matches wins).

        Raises :class:`GuestCrashed` when a failure pattern appears first or QEMU closes the
        console, :class:`GuestTimeout` after ``timeout`` seconds. Returns the match; the text
        before it is in ``self.before``.
        """
        wanted = [pattern] if isinstance(pattern, str | re.Pattern) else list(pattern)
        fails = self.fail_patterns if fail_patterns is None else list(fail_patterns)
        compiled: list[Any] = [
            p if isinstance(p, re.Pattern) else re.compile(p) for p in (*wanted, *fails)
        ]
        try:
            idx = self.child.expect_list([*compiled, pexpect.EOF, pexpect.TIMEOUT], timeout=timeout)
        except OSError as e:  # the socket went away under us
            raise self._error(GuestCrashed, f"console read failed: {e}") from e
        if idx < len(wanted):
            match: re.Match[str] = self.child.match
            return match
        if idx < len(compiled):
            raise self._error(
                GuestCrashed, f"guest failure pattern {self.child.match.group(0)!r} on console"
            )
        if idx == len(compiled):
            raise self._error(GuestCrashed, "console closed: QEMU exited")
        names = ", ".join(repr(p.pattern) for p in compiled[: len(wanted)])
        raise self._error(GuestTimeout, f"timed out after {timeout:g} s waiting for {names}")

    @property
    def before(self) -> str:
        return str(self.child.before or "")

    def send(self, text: str) -> None:
        try:
            self.child.send(text)
        except OSError as e:
            raise self._error(GuestCrashed, f"console write failed: {e}") from e

    def sendline(self, line: str = "") -> None:
        self.send(line + "\n")

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait for the init's ready line and the shell prompt; returns the ready line."""
        ready = self.expect(READY_PATTERN, timeout).group(0).strip()
        self.expect(re.escape(PROMPT), timeout)
        return ready

    def reset_shell_state(self) -> None:
        """Forget what we set up in the guest shell (after a reset, it is a new shell)."""
        self._echo_off = False

    # ------------------------------------------------------------------ run
    def run(self, cmd: str, timeout: float = 30.0, check: bool = False) -> tuple[str, int]:
        """Run ``cmd`` with ``sh`` in the guest; returns (output, exit status).

        The command text is base64-encoded into a file and run with ``sh FILE </dev/null``,
        so quoting, newlines, syntax errors and stdin readers cannot desynchronise the
        console. Start and end markers carry a fresh tag; in the echoed input line they are
        split by ``''`` so only the shell's own output can match them. Output is stdout and
        stderr merged, with ``\\r\\n`` turned into ``\\n``; it does not include the marker
        newline. Each call is a new ``sh`` process: ``cd``/``export`` do not persist.
        Background jobs (``&``) keep running; redirect their output to a file.

        The first call turns terminal echo off (busybox then also skips line editing), so
        the log shows each command once, as a ``[vdev run]`` line written by us, followed
        by its output, instead of base64 noise redrawn by the line editor. On timeout the
        command gets a Ctrl-C before :class:`GuestTimeout` is raised, so a shared guest
        stays usable for the next test.
        """
        if not self._echo_off:
            self.sendline("stty -echo")
            self._echo_off = True
        tag = f"{os.getpid() % 10000}x{next(self._tags)}"
        self._log.write(f"\n[vdev run {tag}] {cmd}\n")
        b64 = base64.b64encode(cmd.encode()).decode()
        f = f"{_TMP_CMD}.{tag}"
        chunks = [b64[i : i + _CHUNK] for i in range(0, len(b64), _CHUNK)] or [""]
        for i, chunk in enumerate(chunks[:-1]):
            self.sendline(f"echo {chunk} {'>' if i == 0 else '>>'} {f}.b64")
        last = chunks[-1]
        redir = ">" if len(chunks) == 1 else ">>"
        self.sendline(
            f"echo {last} {redir} {f}.b64; base64 -d {f}.b64 > {f}; rm -f {f}.b64; "
            f"echo __VDEV_S_''{tag}__; sh {f} </dev/null 2>&1; "
            f"printf '\\n__VDEV_E_%s_%d__\\n' {tag} $?; rm -f {f}"
        )
        deadline = time.monotonic() + timeout
        try:
            self.expect(rf"__VDEV_S_{tag}__\r?\n", timeout)
            m = self.expect(rf"\r?\n__VDEV_E_{tag}_(\d+)__", max(deadline - time.monotonic(), 0.1))
        except GuestTimeout:
            self._interrupt(tag)
            raise
        output = self.before.replace("\r\n", "\n")
        status = int(m.group(1))
        if check and status != 0:
            ctx = self._context()
            raise CommandFailed(
                f"guest command {cmd!r} exited with status {status}; output:\n{output}",
                status=status,
                output=output,
                cmdline=ctx.cmdline,
                console_tail=self.tail(),
                stderr_tail=ctx.stderr_tail,
                log_path=ctx.log_path or self.log_path,
            )
        return output, status

    def _interrupt(self, tag: str) -> None:
        """After a timed-out command: Ctrl-C it (the shell owns the tty, so SIGINT reaches
        it) and wait briefly for its end marker, so the next ``run`` finds a shell again."""
        with contextlib.suppress(MachineError):
            self.send("\x03")
            self.expect(rf"__VDEV_E_{tag}_\d+__", timeout=5.0)

    def close(self) -> None:
        self._log.flush()
        self._log.close()
        self._sock.close()


ESCAPE = b"\x1d"  # Ctrl-]: detach from a bridged console


def bridge_terminal(
    console: Console,
    is_running: Callable[[], bool],
    stdin: int = 0,
    stdout: int = 1,
    greeting: bytes = b"",
) -> bool:
    """Bridge a terminal and a guest console until Ctrl-] or the guest's QEMU exits.

    The console is a socket (pexpect ``fdspawn``), which has no ``interact()``: bytes are
    copied both ways with ``select``; a tty stdin is put in raw mode and restored on every
    path. Output pexpect already buffered is shown first. Returns True when QEMU exited
    (or closed the console), False when the user detached with Ctrl-].
    """
    fd = console.child.child_fd
    pending = console.child.buffer
    if pending:
        os.write(stdout, pending.encode())
    if greeting:
        os.write(stdout, greeting)
    restore: Any = None
    if os.isatty(stdin):
        import termios
        import tty

        restore = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    stdin_open = True
    try:
        while is_running():
            fds = [fd, stdin] if stdin_open else [fd]
            ready, _, _ = select.select(fds, [], [], 0.2)
            if fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    data = b""
                if not data:
                    return True
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data:  # stdin closed: keep showing output until QEMU exits
                    stdin_open = False
                    continue
                if ESCAPE in data:
                    data = data.split(ESCAPE)[0]
                    if data:
                        os.write(fd, data.replace(b"\n", b"\r"))
                    return False
                os.write(fd, data.replace(b"\n", b"\r"))
        return True
    finally:
        if restore is not None:
            import termios

            termios.tcsetattr(stdin, termios.TCSADRAIN, restore)
