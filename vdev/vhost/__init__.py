"""vhost-user protocol layer: codec, connection I/O, backend dispatch and a test front-end.

Spec: ``docs/interop/vhost-user.rst`` in qemu/qemu.  See docs/DESIGN.md for how the layers fit.
"""

from .backend import VhostDevice, VhostUserBackend, Vring
from .codec import Message, ProtocolError, ProtocolFeature, Request
from .connection import Connection, Listener, PeerClosed, connect, try_connect
from .frontend import FrontendConfig, FrontendMemory, VhostUserError, VhostUserFrontend
from .server import VhostUserServer

__all__ = [
    "Connection",
    "FrontendConfig",
    "FrontendMemory",
    "Listener",
    "Message",
    "PeerClosed",
    "ProtocolError",
    "ProtocolFeature",
    "Request",
    "VhostDevice",
    "VhostUserBackend",
    "VhostUserError",
    "VhostUserFrontend",
    "VhostUserServer",
    "Vring",
    "connect",
    "try_connect",
]
