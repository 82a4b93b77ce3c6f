"""Claiming a Unix socket path to listen on, without ever taking over another instance.

Every socket vdev listens on (vhost-user NICs, the fault control socket) goes through
``listen_unix``: a live process already listening on the path is refused (``SocketInUse``),
a stale socket file left by a dead process is replaced, anything that is not a socket is
left alone, and a missing directory is named in the error.  ``release`` removes the file at
close only while it is still the one we bound (another instance may have replaced it), so
closing one instance can never delete a socket a second instance owns.

Errors are ``OSError`` subclasses whose ``strerror`` is a complete sentence and whose
``filename`` is the path, so a CLI prints ``f"--control {path}: {exc.strerror}"``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

from vdev.errors import VdevError

log = logging.getLogger("vdev.socketpath")

IN_USE = "another process is listening on this socket (stop it, or choose another path)"


class SocketInUse(VdevError, FileExistsError):
    """A live process accepts connections on the path we were asked to listen on."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EADDRINUSE, IN_USE, path)


def live_listener(path: str | os.PathLike[str], timeout: float = 1.0) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` right now."""
    spath = os.fspath(path)
    try:
        if not stat.S_ISSOCK(os.lstat(spath).st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(spath)
        except OSError:
            return False
        return True


def prepare(path: str | os.PathLike[str]) -> None:
    """Make ``path`` bindable: refuse a live listener or a non-socket, drop a stale socket."""
    spath = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(spath))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"directory {parent} {what}", spath)
    try:
        st = os.lstat(spath)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket (not replacing it)", spath)
    if live_listener(spath):
        raise SocketInUse(spath)
    log.info("replacing stale socket %s", spath)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spath)


def listen_unix(
    path: str | os.PathLike[str], *, backlog: int = 4, mode: int | None = None
) -> tuple[socket.socket, int]:
    """A non-blocking listening socket on ``path`` and the inode of its file (for ``release``).

    ``mode`` is applied before ``listen()``: nobody can connect to a socket that does not
    listen yet, so there is no window in which another user could get in.
    """
    spath = os.fspath(path)
    prepare(spath)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(spath)
        ino = os.stat(spath).st_ino
        if mode is not None:
            os.chmod(spath, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # another instance bound it since prepare()
            raise SocketInUse(spath) from None
        raise
    return sock, ino


def release(path: str | os.PathLike[str], ino: int) -> None:
    """Remove the socket file if it is still the one we bound (inode ``ino``)."""
    spath = os.fspath(path)
    with contextlib.suppress(OSError):
        if os.stat(spath).st_ino == ino:
            os.unlink(spath)


__all__ = ["IN_USE", "SocketInUse", "listen_unix", "live_listener", "prepare", "release"]
