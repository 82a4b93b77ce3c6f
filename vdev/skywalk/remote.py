"""Syncs across a process boundary: a client in another process asks, the kernel side runs.

The arena is shared memory, so only the *request to sync* has to travel.  The protocol on a
``socketpair`` is one byte per request (the sync kind) and a reply of one status byte plus,
for failures, a small JSON body naming the reason, so the client raises the same
:class:`SyncError`/:class:`DefunctError` it would have seen in-process.
"""

from __future__ import annotations

import json
import os
import select
import socket

from .errors import DefunctError, KillReason, SkywalkError, SyncError, SyncKind
from .port import ChannelHandle

_KINDS = list(SyncKind)
_OK = 0
_SYNC_ERROR = 1
_DEFUNCT = 2
REPLY_TIMEOUT = 10.0


class RemoteSyncer:
    """Client side: a callable ``Syncer`` that forwards each sync over a socket."""

    def __init__(self, sock_fd: int) -> None:
        self.sock = socket.socket(fileno=sock_fd)
        self.sock.settimeout(REPLY_TIMEOUT)

    def __call__(self, kind: SyncKind) -> None:
        self.sock.sendall(bytes([_KINDS.index(kind)]))
        hdr = self._recv_exact(5)
        status = hdr[0]
        size = int.from_bytes(hdr[1:5], "little")
        body = self._recv_exact(size) if size else b""
        if status == _OK:
            return
        info = json.loads(body)
        cause = None
        if info.get("reason"):
            cause = SyncError(KillReason[info["reason"]], SyncKind[info["sync"]], info["detail"])
        if status == _SYNC_ERROR and cause is not None:
            raise cause
        raise DefunctError("channel", cause)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise SkywalkError("sync server went away")
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


class SyncServer:
    """Kernel side: runs the syncs a remote client asks for on one ChannelHandle."""

    def __init__(self, handle: ChannelHandle, sock: socket.socket) -> None:
        self.handle = handle
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_request(self) -> bool:
        """Serve one request; False when the client hung up (its channel is then closed)."""
        try:
            req = self.sock.recv(1)
        except ConnectionResetError:
            req = b""
        if not req:
            self.handle.close()
            return False
        status, body = _OK, b""
        if req[0] >= len(_KINDS):
            status, body = _DEFUNCT, json.dumps({"reason": None}).encode()
        else:
            try:
                self.handle.sync(_KINDS[req[0]])
            except SyncError as err:
                status, body = _SYNC_ERROR, _encode(err)
            except DefunctError as err:
                status = _DEFUNCT
                body = _encode(err.cause) if err.cause else json.dumps({"reason": None}).encode()
        self.sock.sendall(bytes([status]) + len(body).to_bytes(4, "little") + body)
        return True

    def serve(self, timeout: float, stop_fd: int | None = None) -> None:
        """Serve until the client hangs up or ``timeout`` seconds pass without a request."""
        fds = [self.sock.fileno()] + ([stop_fd] if stop_fd is not None else [])
        while True:
            ready, _, _ = select.select(fds, [], [], timeout)
            if not ready or (stop_fd is not None and stop_fd in ready):
                return
            if not self.handle_request():
                return


def _encode(err: SyncError) -> bytes:
    return json.dumps(
        {"reason": err.reason.name, "sync": err.sync.name, "detail": err.detail}
    ).encode()


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A (server, client) pair; the client end is inheritable for ``pass_fds``."""
    a, b = socket.socketpair()
    os.set_inheritable(b.fileno(), True)
    return a, b
