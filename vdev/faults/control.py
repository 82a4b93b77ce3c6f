"""Runtime control socket: list/add/remove fault rules, read stats and dump rings while running.

Protocol (one JSON object per line each way, UTF-8, over a Unix stream socket of mode 0600)::

    -> {"cmd": "add", "rule": {"nic": 0, "action": "drop", "queue": "rx", "p": 0.1}}
    <- {"ok": true, "rule": {"id": "r1", "action": "drop", "hits": 0, ...}}
    -> {"cmd": "nope"}
    <- {"ok": false, "error": "cmd: unknown command 'nope' (one of: add, clear, ...)"}

Any request may carry ``"seq"`` (a JSON scalar), echoed in the reply to match answers.
Commands are listed in ``COMMANDS``; an embedding program may add its own with
``ControlServer.add_command`` (``vdev sandbox`` adds ``introspect``).  Requests are data:
each field is type-checked and mapped through fixed tables; nothing is evaluated, unpickled
or imported from input.

The server runs inside the device loop (its fds are registered in ``device.sel`` with the
handler as data, like every other fd of the device), so handlers already hold
``device.lock`` and no second thread touches device state.  Sockets are non-blocking; a
reply the client does not read is buffered (up to ``MAX_OUTPUT``) instead of stalling the
device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vdev import socketpath
from vdev.errors import VdevError
from vdev.faults.engine import FaultEngine, engine_stats
from vdev.faults.rules import SpecError
from vdev.net.rxgen import MAX_TEMPLATES
from vdev.skywalk.errors import PoolError
from vdev.testing.frames import numbered

if TYPE_CHECKING:
    from vdev.net.device import Device

log = logging.getLogger("vdev.faults.control")

MAX_REQUEST = 64 * 1024
MAX_OUTPUT = 16 * 1024 * 1024
GEN_MIN_SIZE = 60  # "generate": an Ethernet frame without its FCS, at least
GEN_MAX_SIZE = 9014  # and at most a 9000-byte MTU's
# What the selector raises for an fd it no longer knows, or once the device closed it.
_GONE: tuple[type[Exception], ...] = (KeyError, ValueError, OSError, RuntimeError, AttributeError)


class RequestError(VdevError):
    """A request the server refuses; the message names the problem (sent to the client)."""


@dataclass
class _Client:
    sock: socket.socket
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    closing: bool = False


def _check_keys(req: dict[str, Any], allowed: set[str]) -> None:
    for key in req:
        if key not in allowed | {"cmd", "seq"}:
            raise RequestError(
                f"{key}: unknown field for {req['cmd']!r} "
                f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
            )


def _get_int(req: dict[str, Any], key: str, default: int) -> int:
    v = req.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key}: {v!r} is not an integer")
    return v


def _get_nic(req: dict[str, Any]) -> int | str:
    v = req.get("nic", 0)
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise RequestError(f"nic: {v!r} is not a NIC index or name")
    return v


class ControlServer:
    """JSON-lines control server on ``path``, driven by the device loop."""

    def __init__(self, device: Device, path: str, engine: FaultEngine | None = None) -> None:
        self.device = device
        self.path = path
        self.engine = engine if engine is not None else FaultEngine.for_device(device)
        self.clients: dict[int, _Client] = {}
        self.requests = 0
        # Never take over another instance's socket (vdev.socketpath refuses a live
        # listener and only replaces a stale file); mode 0600 is set before listen().
        sock, self._ino = socketpath.listen_unix(path, backlog=8, mode=0o600)
        self.sock = sock
        self.commands: dict[str, tuple[set[str], Callable[[dict[str, Any]], dict[str, Any]]]] = {
            "ping": (set(), lambda r: {"pong": True}),
            "list": (set(), self._list),
            "add": ({"rule"}, self._add),
            "remove": ({"id"}, self._remove),
            "clear": (set(), self._clear),
            "stats": (set(), self._stats),
            "rings": ({"nic"}, self._rings),
            "events": ({"since", "limit"}, self._events),
            "link": ({"nic", "up"}, self._link),
            "pool": ({"packets", "id"}, self._pool),
            "crash": ({"nic", "after_frames", "in_flight", "mode"}, self._crash),
            "generate": ({"nic", "size", "count", "stop"}, self._generate),
        }
        with device.lock:
            device.sel.register(sock, selectors.EVENT_READ, self._accept)

    def add_command(
        self, name: str, allowed: set[str], fn: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        """Register an extra request (e.g. ``vdev sandbox``'s ``introspect``).

        ``allowed``: the request's fields besides ``cmd``/``seq``; ``fn(req)`` runs in the
        device loop under ``device.lock`` and returns the reply's fields (``ok`` is added;
        raise ``RequestError`` to refuse).
        """
        if name in self.commands:
            raise ValueError(f"control command {name!r} already exists")
        self.commands[name] = (set(allowed), fn)

    # -- socket plumbing ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        client = _Client(conn)
        self.clients[conn.fileno()] = client
        self.device.sel.register(conn, selectors.EVENT_READ, lambda: self._service(client))

    def _service(self, client: _Client) -> None:
        """Readable or writable: flush pending output, then read and answer full lines."""
        self._flush(client)
        if client.closing:
            return
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        while b"\n" in client.inbuf:
            line, _, rest = bytes(client.inbuf).partition(b"\n")
            client.inbuf = bytearray(rest)
            if line.strip():
                self._reply(client, self.handle_line(line))
            if client.sock.fileno() < 0:
                return
        if len(client.inbuf) > MAX_REQUEST:
            self._reply(client, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            client.closing = True
            self._flush(client)

    def _reply(self, client: _Client, reply: dict[str, Any]) -> None:
        client.outbuf += json.dumps(reply, default=str).encode() + b"\n"
        if len(client.outbuf) > MAX_OUTPUT:
            self._drop(client)
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.outbuf:
            try:
                n = client.sock.send(client.outbuf)
                del client.outbuf[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(client)
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.outbuf else 0)
        if client.closing and not client.outbuf:
            self._drop(client)
            return
        with contextlib.suppress(*_GONE):
            key = self.device.sel.get_key(client.sock)
            if key.events != want:
                self.device.sel.modify(client.sock, want, key.data)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if fd >= 0:
            self.clients.pop(fd, None)
            with contextlib.suppress(*_GONE):
                self.device.sel.unregister(client.sock)
        client.sock.close()

    def close(self) -> None:
        with self.device.lock:
            for client in list(self.clients.values()):
                self._drop(client)
            with contextlib.suppress(*_GONE):
                self.device.sel.unregister(self.sock)
            self.sock.close()
            socketpath.release(self.path, self._ino)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """Parse and answer one request line (also usable without a socket, in tests)."""
        self.requests += 1
        try:
            req = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "error": f"request is not valid JSON: {exc}"}
        if not isinstance(req, dict):
            return {
                "ok": False,
                "error": f"request must be a JSON object, not {type(req).__name__}",
            }
        return self.handle(req)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        seq = req.get("seq")
        reply: dict[str, Any]
        try:
            if seq is not None and not isinstance(seq, int | str | float):
                raise RequestError(f"seq: {seq!r} must be a number or a string")
            cmd = req.get("cmd")
            if not isinstance(cmd, str) or cmd not in self.commands:
                raise RequestError(
                    f"cmd: {'missing' if cmd is None else f'unknown command {cmd!r}'} "
                    f"(one of: {', '.join(sorted(self.commands))})"
                )
            allowed, fn = self.commands[cmd]
            _check_keys(req, allowed)
            with self.device.lock:
                reply = {"ok": True} | fn(req)
        except (RequestError, SpecError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the device loop down
            log.exception("control request failed")
            reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        if seq is not None:
            reply["seq"] = seq
        return reply

    def _list(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "rules": [r.describe() for r in self.engine.rules()],
            "device_faults": [d.describe() for d in self.engine.device_faults.values()],
        }

    def _add(self, req: dict[str, Any]) -> dict[str, Any]:
        spec = req.get("rule")
        if not isinstance(spec, dict):
            raise RequestError('rule: missing or not an object (e.g. {"action": "drop"})')
        rule = self.engine.add(spec)
        return {"rule": rule.describe()}

    def _remove(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("id")
        if not isinstance(rid, str):
            raise RequestError(f"id: {rid!r} is not a rule id")
        if not self.engine.remove(rid):
            raise RequestError(f"id: no rule or device fault {rid!r}")
        return {"removed": rid}

    def _clear(self, req: dict[str, Any]) -> dict[str, Any]:
        n = len(self.engine.rules()) + len(self.engine.device_faults)
        self.engine.clear()
        return {"removed": n}

    def _stats(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            device: Any = self.device.stats()
        except Exception as exc:
            device = {"error": f"{type(exc).__name__}: {exc}"}
        return {"device": device, "faults": engine_stats(self.engine)}

    def _rings(self, req: dict[str, Any]) -> dict[str, Any]:
        nics = self.device.nics
        if "nic" in req:
            key = _get_nic(req)
            nics = [self.engine._resolve(key)]
        return {"nics": [dump_rings(n) for n in nics]}

    def _events(self, req: dict[str, Any]) -> dict[str, Any]:
        since = _get_int(req, "since", 0)
        limit = _get_int(req, "limit", 1000)
        if limit < 1:
            raise RequestError(f"limit: {limit} must be >= 1")
        return {"events": [e.as_dict() for e in self.engine.log.since(since, limit)]}

    def _link(self, req: dict[str, Any]) -> dict[str, Any]:
        up = req.get("up")
        if not isinstance(up, bool):
            raise RequestError(f"up: {up!r} must be true or false")
        nf = self.engine.nic(_get_nic(req))
        if up:
            nf.link_up()
            return {"link_up": True}
        fault = nf.link_down()
        return {"link_up": False, "id": fault.id}

    def _pool(self, req: dict[str, Any]) -> dict[str, Any]:
        n = _get_int(req, "packets", -1)
        fid = req.get("id")
        if fid is not None and not isinstance(fid, str):
            raise RequestError(f"id: {fid!r} must be a string")
        fault = self.engine.shrink_pool(n, fault_id=fid)
        return {"fault": fault.describe()}

    def _crash(self, req: dict[str, Any]) -> dict[str, Any]:
        """Drop the connection now, or (with after_frames / in_flight / mode) arm a crash
        point that fires from the data path (vdev.faults.crash)."""
        keys = {"after_frames", "in_flight", "mode"} & set(req)
        if not keys:
            self.engine.crash_backend(_get_nic(req))
            return {"crashed": True}
        args: dict[str, Any] = {"after_frames": 0, "in_flight": 1, "mode": "exit"}
        args |= {k: req[k] for k in keys}
        self.engine.crash_point(_get_nic(req), **args)
        return {"armed": args}

    def _generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """Device-generated RX traffic (vdev/net/rxgen.py): numbered frames of ``size``
        bytes from the responder's MAC to the NIC's, ``count`` of them (absent: until
        stopped), written into the guest's RX buffers as fast as its driver posts them;
        ``stop``: stop it (the frames sent so far in the reply)."""
        nic = self.engine._resolve(_get_nic(req))
        stop = req.get("stop", False)
        if not isinstance(stop, bool):
            raise RequestError(f"stop: {stop!r} must be true or false")
        if stop:
            if set(req) & {"size", "count"}:
                raise RequestError("stop: takes no size or count")
            gen = nic.rx_gen
            nic.stop_rx_generator()
            return {"stopped": gen is not None, "sent": gen.sent if gen is not None else 0}
        size = _get_int(req, "size", 64)
        if not GEN_MIN_SIZE <= size <= GEN_MAX_SIZE:
            raise RequestError(f"size: {size} bytes, want {GEN_MIN_SIZE} to {GEN_MAX_SIZE}")
        count = req.get("count")
        if count is not None:
            count = _get_int(req, "count", 0)
            if count < 0:
                raise RequestError(f"count: {count} must be >= 0 (absent: until stopped)")
        src = self.device.responder.mac
        frames = [numbered(nic.mac, src, i, size) for i in range(MAX_TEMPLATES)]
        try:
            nic.start_rx_generator(frames, count)
        except (ValueError, PoolError) as exc:
            raise RequestError(f"size: {size} bytes: {exc}") from None
        return {"generating": {"nic": nic.name, "size": size, "count": count}}


def dump_rings(nic: Any) -> dict[str, Any]:
    """Ring state of one NIC as plain data (indices, in-flight count, defunct reason)."""
    out: list[dict[str, Any]] = []
    for index in sorted(nic.vrings):
        vring = nic.vrings[index]
        q = getattr(vring, "queue", None)
        entry: dict[str, Any] = {
            "index": index,
            "kind": "rx" if index % 2 == 0 else "tx",
            "num": getattr(vring, "num", None),
            "enabled": getattr(vring, "enabled", None),
        }
        if q is not None:
            defunct = getattr(q, "defunct", None)
            entry.update(
                size=getattr(q, "size", None),
                last_avail_idx=getattr(q, "last_avail_idx", None),
                used_idx=getattr(q, "used_idx", None),
                in_flight=getattr(q, "in_flight", None),
                defunct=str(defunct.reason.name) if defunct is not None else None,
            )
            qstats = getattr(q, "stats", None)
            if qstats is not None and hasattr(qstats, "__dataclass_fields__"):
                entry["stats"] = {k: getattr(qstats, k) for k in qstats.__dataclass_fields__}
        out.append(entry)
    faults = getattr(nic, "faults", None)
    return {
        "nic": nic.name,
        "link_up": nic.link_up,
        "backlog": len(nic.backlog),
        "held_used": faults.ring.held() if faults is not None else 0,
        "vrings": out,
    }


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client side: send one request, wait for its reply line (``vdev ctl`` uses this)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: connection closed before the reply")
            buf += chunk
        reply = json.loads(buf.partition(b"\n")[0])
        if not isinstance(reply, dict):
            raise ConnectionError(f"{path}: reply is not a JSON object")
        return reply


__all__ = ["ControlServer", "RequestError", "dump_rings", "request"]
