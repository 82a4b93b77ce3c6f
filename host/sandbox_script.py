"""``vdev sandbox --script``: one file drives the guest and the device, and fails loudly.

Script lines (blank lines and ``#`` comments are skipped):

* a guest console command (``tx 100 60``, ``rx 10``...): sent, its reply printed;
  ``COMMAND &`` sends it without waiting (the guest is then busy), ``wait`` prints its
  reply, so a host line can run while the guest receives;
* ``host ...`` / ``fault ...``: the device side (``host.script_peer``);
* ``sleep SECONDS``: pause the script (e.g. while a fault scenario plays);
* ``quit [CODE]``: ends the script; the guest exits with CODE (isa-debug-exit).

After every line the device is checked (``host.device_watch``): a killed queue, a refused
ring or a dropped vhost-user connection stops the script with :data:`EXIT_DEVICE` and the
reason on stderr.

Exit statuses of ``vdev sandbox`` (docs/sandbox.md), each with one meaning: 0 ok, 1 a
command answered ERR, 2 usage, 3 the guest or QEMU was lost, 4 the device failed, 5 the
fault scenario's verdict failed; ``quit CODE`` exits with CODE (the script's own choice).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from host.bare_console import PROMPT, Reply
from host.script_peer import is_peer_line

if TYPE_CHECKING:
    from host.cli_sandbox import Sandbox
    from host.device_watch import DeviceWatch
    from host.script_peer import ScriptPeer

EXIT_OK = 0  # every command answered OK (or `quit 0`, or Ctrl-] on the console)
EXIT_ERR = 1  # a script command (guest, host or fault line) answered ERR
EXIT_USAGE = 2  # bad command line, script or scenario file; QEMU missing
EXIT_GUEST = 3  # the guest did not come up, stopped answering, or QEMU exited on its own
EXIT_DEVICE = 4  # the device failed under the guest (queue killed, ring refused, disconnect)
EXIT_SCENARIO = 5  # the fault scenario's verdict failed (a step or an expectation)
# `quit CODE` exits with CODE: the script chose it (use codes above 5 to stay distinct).


@dataclass
class ScriptResult:
    replies: list[Reply] = field(default_factory=list)
    errors: int = 0
    quit_code: int | None = None  # the guest's quit code; -1: QEMU's status was not a quit
    qemu_status: int | None = None
    failure: str | None = None  # the device failed (EXIT_DEVICE)
    lost: str | None = None  # the guest stopped answering (EXIT_GUEST)


def exit_status(res: ScriptResult, scenario_status: int = 0) -> int:
    """The one status a run ends with (see the module docstring)."""
    if res.failure is not None:
        return EXIT_DEVICE
    if res.lost is not None:
        return EXIT_GUEST
    if res.quit_code is not None:
        code = EXIT_GUEST if res.quit_code < 0 else res.quit_code
    else:
        code = EXIT_ERR if res.errors else EXIT_OK
    if scenario_status and code == EXIT_OK:
        return EXIT_SCENARIO
    return code


def describe_exit(qemu_status: int | None, guest_code: int) -> str:
    """The transcript's last line: a guest quit is not an error, whatever QEMU's status."""
    if guest_code >= 0:
        return f"(guest quit with code {guest_code})"
    return f"(QEMU exited with status {qemu_status}, not through the guest's quit)"


def _print_reply(reply: Reply, out: TextIO) -> None:
    for info in reply.lines:
        print(info, file=out)
    print(reply.status_line, file=out, flush=True)


class ScriptRunner:
    """Runs script lines against one sandbox (and its host peer and device watch)."""

    def __init__(
        self,
        sb: Sandbox,
        out: TextIO,
        *,
        timeout: float = 60.0,
        peer: ScriptPeer | None = None,
        watch: DeviceWatch | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.sb = sb
        self.out = out
        self.err = err if err is not None else sys.stderr
        self.timeout = timeout
        self.peer = peer
        self.watch = watch
        self.pending: str | None = None  # a guest command sent with `&`
        self.res = ScriptResult()

    def run(self, lines: Iterable[str]) -> ScriptResult:
        from host.errors import MachineError

        try:
            for raw in lines:
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if not self._step(line) or self._device_failed():
                    return self.res
            if self.pending is not None:
                self._collect()
            self._device_failed()
        except MachineError as exc:
            self.res.lost = str(exc).splitlines()[0]
            print(f"vdev sandbox: the guest stopped answering: {self.res.lost}", file=self.err)
        return self.res

    def _device_failed(self) -> bool:
        failure = self.watch.check() if self.watch is not None else None
        if failure is None:
            return False
        self.res.failure = failure
        print(f"vdev sandbox: device failure: {failure}", file=self.err, flush=True)
        return True

    def _error(self, status_line: str) -> None:
        from host.bare_console import parse_reply

        reply = parse_reply(status_line, [])
        self.res.replies.append(reply)
        self.res.errors += 1
        print(status_line, file=self.out, flush=True)

    def _step(self, line: str) -> bool:
        """One line; False ends the script (quit)."""
        print(f"{PROMPT}{line}", file=self.out, flush=True)
        words = line.split()
        if words[0] == "quit":
            return self._quit(words)
        if words[0] == "wait" and len(words) == 1:
            if self.pending is None:
                self._error("ERR wait nothing is running in the background")
            else:
                self._collect()
            return True
        if words[0] == "sleep" and len(words) == 2:
            import time

            try:
                seconds = float(words[1])
            except ValueError:
                self._error(f"ERR sleep {words[1]!r} is not a number of seconds")
                return True
            time.sleep(max(0.0, seconds))
            print(f"OK sleep seconds={seconds:g}", file=self.out, flush=True)
            return True
        if is_peer_line(line):
            if self.peer is None:
                self._error(f"ERR {words[0]} no host peer in this run")
                return True
            reply = self.peer.execute(line)
            self.res.replies.append(reply)
            self.res.errors += not reply.ok
            _print_reply(reply, self.out)
            return True
        background = line.endswith("&")
        command = line[:-1].strip() if background else line
        if self.pending is not None:
            self._error(f"ERR guest busy with {self.pending!r}: `wait` first")
            return True
        if background:
            self.sb.begin(command)  # keeps the console: a scenario's traffic waits for `wait`
            self.pending = command
            print("(running in the background: `wait` prints its reply)", file=self.out)
            return True
        reply = self.sb.cmd(command, timeout=self.timeout, check=False)
        self._record(reply)
        return True

    def _collect(self) -> None:
        self.pending = None
        reply = self.sb.finish(self.timeout)
        self._record(reply)

    def _record(self, reply: Reply) -> None:
        self.res.replies.append(reply)
        _print_reply(reply, self.out)
        if not reply.ok:
            self.res.errors += 1

    def _quit(self, words: list[str]) -> bool:
        if self.pending is not None:
            self._collect()
        # A failure before the quit must not be hidden by the quit's exit status.
        if self._device_failed():
            return False
        try:
            code = int(words[1], 0) if len(words) > 1 else 0
        except ValueError:
            self._error(f"ERR quit {words[1]!r} is not a number")
            return True
        self.res.quit_code = self.sb.quit(code)
        self.res.qemu_status = self.sb.exit_status
        print(describe_exit(self.sb.exit_status, self.res.quit_code), file=self.out, flush=True)
        return False


__all__ = [
    "EXIT_DEVICE",
    "EXIT_ERR",
    "EXIT_GUEST",
    "EXIT_OK",
    "EXIT_SCENARIO",
    "EXIT_USAGE",
    "ScriptResult",
    "ScriptRunner",
    "describe_exit",
    "exit_status",
]
