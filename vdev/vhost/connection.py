"""vhost-user connection I/O: one Unix stream socket, messages with fds via SCM_RIGHTS.

The spec ("Introduction") has fds travel as ancillary data on the Unix socket.  This module
frames messages (12-byte header then ``size`` payload bytes), collects every fd the peer
attached to any byte of the message, and closes them if the message is then refused, so a
hostile peer cannot make us leak descriptors.

Nothing here owns an event loop: :class:`Connection` and :class:`Listener` expose
``fileno()`` for the caller's poll/selectors loop.  Once a message has begun to arrive the
rest is read with a bounded timeout (a well-behaved front-end writes a message in one go).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Iterable, Sequence

from vdev import socketpath
from vdev.errors import VdevError

from .codec import (
    HEADER_SIZE,
    VERSION,
    Message,
    ProtocolError,
    decode_header,
    encode_header,
    request_name,
)

log = logging.getLogger("vdev.vhost")

# Ancillary space for this many fds per read.  The spec passes at most 8 with a message
# (SET_MEM_TABLE, "Memory regions description"); extra room lets us see, and close, more.
MAX_FDS = 64
_FD_SIZE = array.array("i").itemsize
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already gone (used on every refusal path)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(arr)
    return fds


class PeerClosed(VdevError):
    """The peer closed the connection (EOF or reset)."""


class Connection:
    """One vhost-user socket.  ``recv_message`` returns complete messages with their fds."""

    def __init__(self, sock: socket.socket, *, io_timeout: float = 5.0) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self.closed = False
        self._fd = sock.fileno()
        # Always non-blocking at the OS level: waits are explicit polls with a deadline, so
        # a caller's event loop never stalls on a spurious wakeup.
        sock.setblocking(False)

    def fileno(self) -> int:
        """The socket's fd number; unchanged after :meth:`close`, so that a caller whose
        selector still holds it can unregister it by number once ``handle_readable`` has
        returned False (the backend closes the connection before returning)."""
        return self._fd

    # -- receiving ---------------------------------------------------------------------

    def _wait(self, events: int, deadline: float) -> bool:
        """Poll the socket for ``events`` until ``deadline``; False on timeout."""
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if poller.poll(remaining * 1000):
                return True

    def _recv_exact(
        self, n: int, fds: list[int], what: str, *, block: bool = True, timeout: float | None = None
    ) -> bytes:
        """Read exactly ``n`` bytes, appending any fds that ride along to ``fds``.

        With ``block=False`` the first read does not wait (BlockingIOError if nothing is
        there); otherwise, and once a message has begun, reads wait up to ``timeout``
        (default ``io_timeout``).
        """
        buf = bytearray()
        deadline = time.monotonic() + (self.io_timeout if timeout is None else timeout)
        while len(buf) < n:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(
                    n - len(buf), _ANC_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                if not block and not buf:
                    raise
                if self._wait(select.POLLIN, deadline):
                    continue
                if not buf and what == "header":
                    raise TimeoutError(f"no message within the timeout ({what})") from None
                raise ProtocolError(
                    what, "size", f"peer stalled after {len(buf)}/{n} bytes"
                ) from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise PeerClosed(str(exc)) from exc
            fds.extend(_fds_from_ancdata(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(what, "fds", f"more than {MAX_FDS} fds attached")
            if not data:
                if buf or what != "header":
                    raise ProtocolError(what, "size", f"peer closed after {len(buf)}/{n} bytes")
                raise PeerClosed("EOF")
            buf += data
        return bytes(buf)

    def recv_message(
        self, *, expect_reply: bool = False, block: bool = True, timeout: float | None = None
    ) -> Message:
        """Read one whole message.

        Raises :class:`PeerClosed` on a clean EOF before a message, :class:`ProtocolError`
        for a broken frame (every fd received so far is closed first), TimeoutError when no
        message starts within ``io_timeout`` and BlockingIOError when ``block`` is False and
        nothing is waiting.  The caller owns the fds of a returned message.
        """
        fds: list[int] = []
        try:
            header = self._recv_exact(HEADER_SIZE, fds, "header", block=block, timeout=timeout)
            request, flags, size = decode_header(header, expect_reply=expect_reply)
            payload = self._recv_exact(size, fds, request_name(request)) if size else b""
        except BaseException:
            close_fds(fds)
            raise
        return Message(request, flags, payload, fds)

    # -- sending -----------------------------------------------------------------------

    def send_message(
        self,
        request: int,
        payload: bytes = b"",
        *,
        flags: int = VERSION,
        fds: Sequence[int] = (),
    ) -> None:
        """Send header + payload in one sendmsg, fds attached to the first byte."""
        data = encode_header(request, flags, len(payload)) + payload
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        deadline = time.monotonic() + self.io_timeout
        sent = 0
        while sent < len(data):
            try:
                # The fds go with the first chunk only.
                sent += self.sock.sendmsg([data[sent:]], anc if sent == 0 else [])
            except BlockingIOError:
                if not self._wait(select.POLLOUT, deadline):
                    raise TimeoutError(
                        f"{request_name(request)}: peer does not read its socket"
                    ) from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise PeerClosed(str(exc)) from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Listener:
    """A listening Unix socket for server mode (QEMU connects as client).

    Refuses to clobber a path where a live process is listening (connecting to it succeeds)
    or that is not a socket at all; replaces a stale socket file left by a dead process.
    The socket file is removed on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], *, backlog: int = 4) -> None:
        self.path = os.fspath(path)
        # One rule for every socket vdev listens on (vdev.socketpath): never take over a
        # live listener, replace a stale file, name a missing directory.
        self.sock, self._ino = socketpath.listen_unix(self.path, backlog=backlog)
        self.closed = False
        self._fd = self.sock.fileno()

    def fileno(self) -> int:
        """Unchanged after :meth:`close` (see :meth:`Connection.fileno`)."""
        return self._fd

    def accept(self, timeout: float | None = 0.0, *, io_timeout: float = 5.0) -> Connection | None:
        """Accept one connection; ``None`` if none arrives within ``timeout`` (0: poll)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                select.select([self.sock], [], [], remaining)
                continue
            conn.set_inheritable(False)
            return Connection(conn, io_timeout=io_timeout)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        # Only remove the file if it is still ours (another listener may have replaced it).
        socketpath.release(self.path, self._ino)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def try_connect(path: str | os.PathLike[str], *, io_timeout: float = 5.0) -> Connection | None:
    """One non-blocking connection attempt (client mode): None while nobody listens.

    ENOENT/ECONNREFUSED (the peer has not created or is not listening on the socket yet)
    and EAGAIN (its backlog is full) mean "try again later"; other errors are raised.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return Connection(sock, io_timeout=io_timeout)


def connect(
    path: str | os.PathLike[str],
    *,
    timeout: float = 10.0,
    retry_interval: float = 0.05,
    io_timeout: float = 5.0,
) -> Connection:
    """Connect to a listening peer, retrying until ``timeout`` (a blocking call, for tools
    and test front-ends; the device's client mode retries from its loop instead).

    The peer may not have created the socket yet when we start, hence the retry on
    ENOENT/ECONNREFUSED.  Raises TimeoutError naming the path when it never comes up.
    """
    spath = os.fspath(path)
    deadline = time.monotonic() + timeout
    while True:
        conn = try_connect(spath, io_timeout=io_timeout)
        if conn is not None:
            return conn
        if time.monotonic() + retry_interval > deadline:
            why = "connection refused" if os.path.exists(spath) else "no such socket"
            raise TimeoutError(f"could not connect to vhost-user socket {spath}: {why}")
        time.sleep(retry_interval)
