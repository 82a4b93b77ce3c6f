"""``vdev run --script FILE``: FILE runs as ONE shell script in the Linux guest.

So ``for`` loops work, ``cd`` and variables persist, and the exit status is the script's own
(``--errexit`` puts ``set -e`` first: the first failing command ends it). The output is
streamed as the guest prints it.

Transfer: the script goes over the console base64-encoded in 512-byte chunks (busybox's line
editor truncates long lines), is decoded into a file and run with ``sh FILE </dev/null``, as
``host.console.Console.run`` does for single commands. Start and end markers carry a fresh
tag, and the end marker carries ``$?``; in the typed line they are split by ``''`` so only
the shell's own output can match them.

Host-side lines: the guest shell gets two functions, ``host`` and ``fault``, so a script
mixes device-side commands with shell code (``for i in 1 2 3; do host send 10 60; done``)
with the grammar of ``host.script_peer``. Each call prints a request marker
``@@VDEV-REQ <n> <words>@@`` and blocks reading one line from the console tty
(``/dev/ttyS0``; the script's stdin stays /dev/null). This reader sees the marker, runs the
line against the device, prints its reply in the transcript and types ``@@VDEV-OK <n>`` or
``@@VDEV-ERR <n>`` back: the function returns 0 or 1, so ``set -e`` / ``||`` work on
host lines too. Console echo is off (``stty -echo``), so the typed answer never shows.
"""

from __future__ import annotations

import base64
import itertools
import os
import re
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from host.script_peer import ScriptPeer

CHUNK = 512
SCRIPT = "/tmp/.vdev-script"
DEFAULT_TIMEOUT = 600.0
_REQ = re.compile(r"@@VDEV-REQ (\d+) (.*?)@@")
_tags = itertools.count(1)

PRELUDE = r"""# vdev run: host-side lines (see host/run_script.py)
__vdev_req() {
    __vdev_n=$((${__vdev_n:-0} + 1))
    printf '\n@@VDEV-REQ %s %s@@\n' "$__vdev_n" "$*"
    IFS= read -r __vdev_rep < /dev/ttyS0 || return 2
    case "$__vdev_rep" in
    "@@VDEV-OK $__vdev_n"*) return 0 ;;
    *) return 1 ;;
    esac
}
host() { __vdev_req host "$@"; }
fault() { __vdev_req fault "$@"; }
"""


def build_script(text: str, errexit: bool) -> str:
    """What runs in the guest: the prelude, ``set -e`` when asked, then FILE unchanged."""
    return PRELUDE + ("set -e\n" if errexit else "") + text + ("" if text.endswith("\n") else "\n")


def run_guest_script(
    machine: Any,
    text: str,
    *,
    peer: ScriptPeer | None,
    errexit: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    out: TextIO,
) -> int:
    """Run ``text`` as one script in the Linux guest of ``machine``; returns its status.

    Raises ``host.errors.GuestTimeout`` after ``timeout`` seconds (the script gets a
    Ctrl-C first) and ``GuestCrashed`` when a failure pattern (a kernel panic) appears.
    """
    from host.errors import GuestCrashed, GuestTimeout

    console = machine.console
    console.run(":", timeout=30)  # turns console echo off once, and checks the shell is there
    tag = f"{os.getpid() % 10000}s{next(_tags)}"
    path = f"{SCRIPT}.{tag}"
    b64 = base64.b64encode(build_script(text, errexit).encode()).decode()
    chunks = [b64[i : i + CHUNK] for i in range(0, len(b64), CHUNK)] or [""]
    for i, chunk in enumerate(chunks):
        console.sendline(f"echo {chunk} {'>' if i == 0 else '>>'} {path}.b64")
    console.sendline(
        f"base64 -d {path}.b64 > {path}; rm -f {path}.b64; echo __VDEV_S_''{tag}__; "
        f"sh {path} </dev/null 2>&1; printf '\\n__VDEV_E_%s_%d__\\n' {tag} $?; rm -f {path}"
    )
    console.expect(rf"__VDEV_S_{tag}__\r?\n", 60)
    child = console.child
    pending = str(child.buffer or "")
    child.buffer = ""
    end = re.compile(rf"__VDEV_E_{tag}_(\d+)__")
    fails = [re.compile(p) for p in console.fail_patterns]
    deadline = time.monotonic() + timeout
    import pexpect

    blank = 0  # empty lines held back: the end marker's own newline is not output
    while True:
        lines = pending.split("\n")
        pending = lines.pop()  # an incomplete last line waits for more
        for raw in lines:
            line = raw.rstrip("\r")
            m = end.search(line)
            if m:
                print("\n" * max(blank - 1, 0), end="", file=out)
                status = int(m.group(1))
                if status:
                    print(f"[exit {status}]", file=out, flush=True)
                return status
            if not line:
                blank += 1
                continue
            req = _REQ.search(line)
            # A request marker starts with a newline of its own: not the script's output.
            print("\n" * (max(blank - 1, 0) if req else blank), end="", file=out)
            blank = 0
            if req:
                _answer(console, peer, int(req.group(1)), req.group(2), out)
                continue
            for f in fails:
                if f.search(line):
                    print(line, file=out, flush=True)
                    raise console._error(GuestCrashed, f"guest failure pattern {line!r}")
            print(line, file=out, flush=True)
        if time.monotonic() > deadline:
            console.send("\x03")
            raise console._error(GuestTimeout, f"the script ran longer than {timeout:g} s")
        try:
            pending += child.read_nonblocking(65536, timeout=0.2)
        except pexpect.TIMEOUT:
            continue
        except pexpect.EOF:
            raise console._error(GuestCrashed, "console closed: QEMU exited") from None


def _answer(console: Any, peer: ScriptPeer | None, n: int, line: str, out: TextIO) -> None:
    """Run one host-side line for the guest and type the verdict back to it."""
    print(f"@ {line}", file=out)
    if peer is None:
        print(f"ERR {line.split()[0]} no host peer in this run", file=out, flush=True)
        ok = False
    else:
        reply = peer.execute(line)
        for info in reply.lines:
            print(info, file=out)
        print(reply.status_line, file=out, flush=True)
        ok = reply.ok
    console.send(f"@@VDEV-{'OK' if ok else 'ERR'} {n}\r")


__all__ = ["PRELUDE", "build_script", "run_guest_script"]
