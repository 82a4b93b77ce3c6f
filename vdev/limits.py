"""What a front-end (or a local process) can make the device allocate: every bound in one place.

A vhost-user front-end is untrusted: a hostile one must not make the device allocate without
bound, and every refusal names the limit it hit (``<name> limit``) so the operator knows
which knob to turn.  The bounds and where they are enforced (docs/limits.md lists them too):

==========================  ==========  ======================================================
limit                        default     enforced by
==========================  ==========  ======================================================
``guest memory``             1 TiB       VhostUserBackend: SET_MEM_TABLE / ADD_MEM_REG sizes
                                         summed per connection (mappings are virtual, but the
                                         address space of the process is not endless)
``memory regions``           8 / 32      codec (SET_MEM_TABLE: VHOST_MEMORY_BASELINE_NREGIONS);
                                         backend (ADD_MEM_REG: GET_MAX_MEM_SLOTS slots)
``ring size``                32768       the queue formats (2.7 / 2.8 "Queue Size")
``queues``                   16          the NIC (8 queue pairs), GET_QUEUE_NUM
``inflight buffer``          queues x    inflight_buffer: num_queues <= queues, queue_size
                             32768       <= 32768 (at most 16 x 1 MiB per connection)
``held connections``         8           VhostUserServer: silent newcomers per socket (the
                                         oldest is closed when a ninth arrives)
``NICs``                     64          Device.add_nic
``message``                  4096 B      codec (payload), connection (64 fds per message)
``RX backlog``               512         the NIC (frames held for a guest without buffers)
==========================  ==========  ======================================================
"""

from __future__ import annotations

from vdev.errors import VdevError

MAX_GUEST_MEMORY = 1 << 40  # bytes mapped per connection
MAX_HELD_CONNECTIONS = 8  # silent newcomers held per socket
MAX_NICS = 64  # NICs per device


class LimitError(VdevError, ValueError):
    """A resource limit was hit; the message starts with the limit's name."""


def human(n: int) -> str:
    """Bytes as the largest binary unit that divides them (1 TiB, 64 MiB, 4097 B)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


__all__ = ["MAX_GUEST_MEMORY", "MAX_HELD_CONNECTIONS", "MAX_NICS", "LimitError", "human"]
