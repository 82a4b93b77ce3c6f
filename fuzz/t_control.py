"""Control-socket JSON requests (``vdev/faults/control.py``), through the socket plumbing.

One device with one NIC (never connected) and one control server, made once.  Each input is
a byte stream a client writes to the control socket, in one or more chunks: the server's
``_service`` reads it, frames lines, answers each.  Properties:

* every reply is one JSON object per line with a boolean ``ok``; a refusal names the field;
* no request ends in ``internal error`` (a handler raising something it did not mean to);
* after the client leaves and the rules are cleared, nothing is held: the pool is back to
  what it was and no fd is left open.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from typing import Any

from vdev.faults.control import MAX_REQUEST, ControlServer, _Client

from .common import FuzzLeak, Reader, open_fds

_state: dict[str, Any] = {}


def setup() -> None:
    from vdev.net.device import Device
    from vdev.skywalk import Pbufpool

    tmp = tempfile.mkdtemp(prefix="vdev-fuzz-ctl-")
    dev = Device(pool=Pbufpool(num_packets=256, buf_size=2048))
    dev.add_nic(f"{tmp}/nic0.sock")
    srv = ControlServer(dev, f"{tmp}/ctl.sock")
    # Clients here come through socketpairs: the files can go now, so a campaign that
    # ends in libFuzzer's exit() (no Python teardown) leaves nothing behind in /tmp.
    for name in ("nic0.sock", "ctl.sock"):
        os.unlink(f"{tmp}/{name}")
    os.rmdir(tmp)
    _state.update(dev=dev, srv=srv)


def one_input(data: bytes) -> None:
    if not _state:
        setup()
    dev, srv = _state["dev"], _state["srv"]
    in_use, fds = dev.pool.stats.in_use, open_fds()
    r = Reader(data)
    chunks = len(data) % 4 + 1
    body = r.rest(MAX_REQUEST + 1024)
    a, b = socket.socketpair()
    a.setblocking(False)
    client = _Client(a)
    with dev.lock:
        srv.clients[a.fileno()] = client
        dev.sel.register(a, 1, lambda: srv._service(client))
    step = max(1, len(body) // chunks)
    replies = bytearray()

    def pump() -> None:
        """Read what the server sent; while it still buffers output (a reply bigger than
        the socket takes at once), let it flush as its loop would on EVENT_WRITE."""
        while True:
            try:
                while got := b.recv(1 << 20):
                    replies.extend(got)
            except BlockingIOError:
                pass
            if a.fileno() < 0 or not client.outbuf:
                return
            with dev.lock:
                srv._flush(client)

    b.setblocking(False)
    try:
        for i in range(0, len(body) or 1, step):
            b.sendall(body[i : i + step])
            with dev.lock:
                srv._service(client)
            pump()
            if a.fileno() < 0:
                break  # the server dropped the client (an over-long request)
    finally:
        server_dropped = a.fileno() < 0
        b.close()
        with dev.lock:
            if a.fileno() >= 0:
                srv._drop(client)
            dev.sel.get_map()  # the selector must still be consistent
            srv.engine.clear()
            srv.engine.log.events.clear()  # each input starts from an empty event log
            for nic in dev.nics:  # a "generate" holds its templates until stopped
                nic.stop_rx_generator()
    lines = bytes(replies).split(b"\n")
    assert lines[-1] == b"" or server_dropped, f"a reply cut short: {lines[-1][-200:]!r}"
    for line in lines[:-1]:
        reply = json.loads(line)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            err = reply.get("error")
            assert isinstance(err, str) and err, reply
            assert "internal error" not in err, err
    if dev.pool.stats.in_use != in_use:
        raise FuzzLeak(f"pool in_use {dev.pool.stats.in_use}, was {in_use}")
    if open_fds() != fds:
        raise FuzzLeak(f"{open_fds()} fds open, was {fds}")
