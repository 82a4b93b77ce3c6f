"""Exceptions raised while driving a QEMU guest.

Every one carries the QEMU command line and the tail of the console log (and of QEMU's
stderr), because a bare "timeout" from a guest that panicked two minutes ago is useless in
a CI log: the message itself has to say what ran and what the guest printed.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path


class MachineError(RuntimeError):
    """A guest or QEMU failure, with enough context to debug it from the message alone."""

    def __init__(
        self,
        message: str,
        *,
        cmdline: Sequence[str] = (),
        console_tail: str = "",
        stderr_tail: str = "",
        log_path: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.cmdline = list(cmdline)
        self.console_tail = console_tail
        self.stderr_tail = stderr_tail
        self.log_path = log_path

    def __str__(self) -> str:
        parts = [self.message]
        if self.cmdline:
            parts.append("QEMU command line:\n  " + shlex.join(self.cmdline))
        if self.stderr_tail.strip():
            parts.append("QEMU stderr (tail):\n" + _indent(self.stderr_tail))
        if self.console_tail.strip():
            parts.append("console log (tail):\n" + _indent(self.console_tail))
        if self.log_path is not None:
            parts.append(f"full console log: {self.log_path}")
        return "\n".join(parts)


class GuestTimeout(MachineError, TimeoutError):
    """The guest did not print what we waited for in time."""


class GuestStalled(GuestTimeout):
    """Under KVM, the console stopped moving before the guest was ready (a stuck vCPU)."""


class GuestCrashed(MachineError):
    """A failure pattern (kernel panic, oops, ...) appeared, or QEMU exited unexpectedly."""


class CommandFailed(MachineError):
    """``run(..., check=True)`` saw a non-zero exit status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        output: str,
        cmdline: Sequence[str] = (),
        console_tail: str = "",
        stderr_tail: str = "",
        log_path: Path | None = None,
    ) -> None:
        super().__init__(
            message,
            cmdline=cmdline,
            console_tail=console_tail,
            stderr_tail=stderr_tail,
            log_path=log_path,
        )
        self.status = status
        self.output = output


def _indent(text: str) -> str:
    return "\n".join("  | " + line for line in text.rstrip("\n").splitlines())


def tail_lines(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])
