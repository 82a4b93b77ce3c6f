"""Skywalk core: a shared-memory packet pool and channel rings with Skywalk's contract.

The kernel half (``ring.py``, ``validate.py``, ``port.py``) trusts nothing the user half
(``channel.py``, possibly in another process) writes into the shared arena; violations end
in a named :class:`KillReason` and a defunct channel.  See docs/skywalk.md.
"""

from .arena import Arena, PoolConfig
from .channel import Channel, ChannelInfo, UserRing
from .errors import DefunctError, KillReason, PoolError, SkywalkError, SyncError, SyncKind
from .pool import LeakReport, Pbufpool, PoolStats
from .port import ChannelHandle, LoopbackPort, Port, PortStats
from .ring import KernelRing
from .stats import RingStats

__all__ = [
    "Arena",
    "Channel",
    "ChannelHandle",
    "ChannelInfo",
    "DefunctError",
    "KernelRing",
    "KillReason",
    "LeakReport",
    "LoopbackPort",
    "Pbufpool",
    "PoolConfig",
    "PoolError",
    "PoolStats",
    "Port",
    "PortStats",
    "RingStats",
    "SkywalkError",
    "SyncError",
    "SyncKind",
    "UserRing",
]
