"""A QEMU-free virtio-net driver over vhost-user: the mock guest that tests, fuzzers and
benchmarks drive the device with.

It does what QEMU plus a guest driver would do: the vhost-user handshake in QEMU 7.2's
order (``VhostUserFrontend``), memfd guest RAM shared as two regions with gpa != uva
(``FrontendMemory``), split rings driven from the guest side (``DriverQueue``), kick and
call eventfds, virtio-net headers and mergeable RX buffers.  Because the rings are plain
guest memory here, a test can also reach in and write hostile values on purpose
(``frontend.txq(0).driver.set_avail_idx(...)``).

Packed rings (2.8): when VIRTIO_F_RING_PACKED is negotiated the queues are
``PackedDriverQueue``s, whose hostile helpers are ``write_desc``/``avail_flags``/
``write_indirect``.  Like QEMU 7.2 (``virtio-net-pci`` has ``packed=off`` by default) the
frontend does not take packed rings unless asked with ``packed=True`` (bit 34 in
``features`` alone is not enough, so callers passing the NIC's DEFAULT_FEATURES keep split
rings).
"""

from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass, field

from vdev.abi import lib
from vdev.net.nic import LEGACY_HDR_LEN, NET_HDR_LEN
from vdev.vhost.connection import Listener, connect
from vdev.vhost.frontend import FrontendConfig, FrontendMemory, VhostUserFrontend
from vdev.virtio.driver import DriverQueue
from vdev.virtio.packed_driver import PackedDriverQueue
from vdev.virtio.queue import F_RING_PACKED, queue_format

# What QEMU 7.2 sends with SET_VRING_BASE for a fresh packed ring
# (virtio_queue_packed_get_last_avail_idx): avail index 0, wrap 1; used index 0, wrap 1.
PACKED_FRESH_BASE = 0x8000 | 0x8000 << 16


def bit(n: int) -> int:
    return 1 << n


@dataclass
class FrontQueue:
    """One virtqueue as the mock driver holds it: ring, buffers, eventfds."""

    index: int
    driver: DriverQueue | PackedDriverQueue
    kick_fd: int
    call_fd: int
    buf_gpa: int
    buf_size: int
    free_bufs: list[int] = field(default_factory=list)  # buffer slot numbers
    head_buf: dict[int, int] = field(default_factory=dict)  # head -> buffer slot
    calls: int = 0
    ring_gpas: tuple[int, int, int] = (0, 0, 0)  # desc, avail (driver area), used (device)

    def buf_addr(self, slot: int) -> int:
        return self.buf_gpa + slot * self.buf_size


class VirtioNetFrontend:
    """Connects to a vdev NIC socket and behaves like a small virtio-net guest driver."""

    def __init__(
        self,
        path: str,
        *,
        queue_pairs: int = 1,
        ring_size: int = 256,
        features: int | None = None,
        rx_buf_size: int = 2048,
        tx_buf_size: int = 2048,
        mem_size: int = 64 << 20,
        config: FrontendConfig | None = None,
        connect_timeout: float = 5.0,
        server: bool = False,
        packed: bool | None = None,
    ) -> None:
        """``server=True`` listens on ``path`` and waits for the device to connect (QEMU
        ``server=on`` against ``vdev serve --client``); otherwise connects to the device.
        ``packed``: True requires VIRTIO_F_RING_PACKED (ValueError if not offered); False
        and None (QEMU 7.2's default, packed=off) mask it out."""
        self.queue_pairs = queue_pairs
        self.ring_size = ring_size
        cfg = config or FrontendConfig()
        cfg.num_queues = 2 * queue_pairs
        self.mem = FrontendMemory(mem_size)
        self.listener: Listener | None = None
        if server:
            self.listener = Listener(path)
            try:
                self.vhost = VhostUserFrontend.accept(self.listener, cfg, timeout=connect_timeout)
            except BaseException:
                self.listener.close()
                self.mem.close()
                raise
        else:
            self.vhost = VhostUserFrontend(connect(path, timeout=connect_timeout), cfg)
        self.queues: dict[int, FrontQueue] = {}
        try:
            self.vhost.handshake()
            offered = self.vhost.backend_features
            want = offered if features is None else features & offered
            if queue_pairs == 1:
                want &= ~bit(lib.VIRTIO_NET_F_MQ)
            if not packed:
                want &= ~F_RING_PACKED
            else:
                if not offered & F_RING_PACKED:
                    raise ValueError("packed=True but the device does not offer RING_PACKED")
                want |= F_RING_PACKED
            self.features = self.vhost.set_features(want)
            self.vhost.share_memory(self.mem)
            self.vhost.share_inflight(2 * queue_pairs, ring_size)
            for index in range(2 * queue_pairs):
                size = rx_buf_size if index % 2 == 0 else tx_buf_size
                self._setup_queue(index, size)
            self.vhost.driver_ok()
            for index in range(0, 2 * queue_pairs, 2):
                self.post_rx(index)
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------

    def has(self, feature: int) -> bool:
        return bool(self.features & bit(feature))

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED negotiated: the queues are packed rings (2.8)."""
        return bool(self.features & F_RING_PACKED)

    @property
    def hdr_len(self) -> int:
        if self.has(lib.VIRTIO_F_VERSION_1) or self.has(lib.VIRTIO_NET_F_MRG_RXBUF):
            return NET_HDR_LEN
        return LEGACY_HDR_LEN

    def _setup_queue(self, index: int, buf_size: int) -> None:
        n = self.ring_size
        driver: DriverQueue | PackedDriverQueue
        # The negotiated format's three areas (packed, 2.8.10: the driver and device event
        # suppression areas travel in vhost-user's avail/used address fields).
        desc, avail, used = (
            self.mem.alloc(a.length, a.align) for a in queue_format(self.features).ring_areas(n)
        )
        base = 0
        if self.packed:
            driver = PackedDriverQueue(self.mem, n, desc, avail, used, features=self.features)
            base = PACKED_FRESH_BASE
        else:
            driver = DriverQueue(self.mem, n, desc, avail, used, features=self.features)
        bufs = self.mem.alloc(n * buf_size, 64)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        q = FrontQueue(index, driver, kick, call, bufs, buf_size, list(range(n - 1, -1, -1)))
        q.ring_gpas = (desc, avail, used)
        self.queues[index] = q
        self.vhost.setup_vring(index, n, desc, avail, used, kick, call, base)

    def reconnect(self, path: str, *, base: str = "used", connect_timeout: float = 5.0) -> None:
        """Re-establish a lost connection with the same guest RAM, rings, eventfds and (if
        negotiated) inflight buffer, as QEMU does after a back-end crash (chardev
        ``reconnect=``): handshake, features, memory, SET_INFLIGHT_FD, then every ring.

        ``base`` is what SET_VRING_BASE says for a split ring: "used" the used idx in guest
        memory (QEMU: virtio_queue_restore_last_avail_idx, as GET_VRING_BASE cannot be
        asked of a dead back-end), "zero" (DPDK virtio_user in server mode), "avail" the
        driver's avail idx (a front-end that believes everything it posted was consumed).
        """
        if base not in ("used", "zero", "avail"):
            raise ValueError(f"base {base!r} is not used, zero or avail")
        old = self.vhost
        cfg = old.config
        old.close()
        if self.listener is not None:
            self.vhost = VhostUserFrontend.accept(self.listener, cfg, timeout=connect_timeout)
        else:
            self.vhost = VhostUserFrontend(connect(path, timeout=connect_timeout), cfg)
        self.vhost.inflight_fd, self.vhost.inflight = old.inflight_fd, old.inflight
        self.vhost.handshake()
        self.vhost.set_features(self.features)
        self.vhost.share_memory(self.mem)
        self.vhost.share_inflight(2 * self.queue_pairs, self.ring_size)
        for index, q in sorted(self.queues.items()):
            d = q.driver
            if isinstance(d, PackedDriverQueue):
                b = PACKED_FRESH_BASE  # QEMU keeps a packed ring's base from its last start
            elif base == "used":
                b = d.read_used_idx()
            elif base == "avail":
                b = d.avail_idx
            else:
                b = 0
            desc, avail, used = q.ring_gpas
            self.vhost.setup_vring(
                index, self.ring_size, desc, avail, used, q.kick_fd, q.call_fd, b
            )
        self.vhost.driver_ok()
        for q in self.queues.values():
            self.kick(q, force=True)

    def rxq(self, pair: int = 0) -> FrontQueue:
        return self.queues[2 * pair]

    def txq(self, pair: int = 0) -> FrontQueue:
        return self.queues[2 * pair + 1]

    # -- notifications -------------------------------------------------------------------

    def kick(self, q: FrontQueue, force: bool = False) -> None:
        if force or q.driver.kick_needed():
            os.eventfd_write(q.kick_fd, 1)

    def drain_calls(self, q: FrontQueue) -> int:
        try:
            n = os.eventfd_read(q.call_fd)
        except BlockingIOError:
            return 0
        q.calls += n
        return n

    def wait_call(self, q: FrontQueue, timeout: float) -> bool:
        ready, _, _ = select.select([q.call_fd], [], [], timeout)
        if ready:
            self.drain_calls(q)
        return bool(ready)

    # -- TX ------------------------------------------------------------------------------

    def reap_tx(self, pair: int = 0) -> int:
        """Take back completed TX buffers; returns how many."""
        q = self.txq(pair)
        done = q.driver.get_used()
        for head, _len in done:
            q.free_bufs.append(q.head_buf.pop(head))
        return len(done)

    def send(self, frames: list[bytes], pair: int = 0, vnet: bytes | None = None) -> int:
        """Queue frames on TX queue ``pair`` and kick; returns how many fit in the ring."""
        q = self.txq(pair)
        self.reap_tx(pair)
        hdr = (vnet or bytes(NET_HDR_LEN))[: self.hdr_len].ljust(self.hdr_len, b"\0")
        sent = 0
        for frame in frames:
            data = hdr + frame
            if len(data) > q.buf_size:
                raise ValueError(f"frame of {len(frame)} bytes exceeds tx_buf_size {q.buf_size}")
            if not q.free_bufs or q.driver.num_free == 0:
                break
            slot = q.free_bufs.pop()
            gpa = q.buf_addr(slot)
            self.mem.write(gpa, data)
            head = q.driver.add_chain([(gpa, len(data))])
            q.head_buf[head] = slot
            sent += 1
        if sent:
            q.driver.publish()
            self.kick(q)
        return sent

    def send_all(self, frames: list[bytes], pair: int = 0, timeout: float = 5.0) -> int:
        """Send every frame, waiting for completions when the ring is full."""
        deadline = time.monotonic() + timeout
        done = 0
        while done < len(frames):
            n = self.send(frames[done : done + self.ring_size], pair)
            done += n
            if n == 0:
                if time.monotonic() >= deadline:
                    break
                self.wait_call(self.txq(pair), 0.01)
        return done

    # -- RX ------------------------------------------------------------------------------

    def post_rx(self, index: int = 0) -> int:
        """Give every free RX buffer to the device; returns how many were posted."""
        q = self.queues[index]
        posted = 0
        while q.free_bufs and q.driver.num_free:
            slot = q.free_bufs.pop()
            head = q.driver.add_chain([], [(q.buf_addr(slot), q.buf_size)])
            q.head_buf[head] = slot
            posted += 1
        if posted:
            q.driver.publish()
            self.kick(q)
        return posted

    def _rx_used(self, q: FrontQueue) -> list[bytes]:
        """Completed RX buffers as raw bytes (header included), buffers recycled."""
        out = []
        for head, length in q.driver.get_used():
            slot = q.head_buf.pop(head)
            out.append(self.mem.read(q.buf_addr(slot), length))
            q.free_bufs.append(slot)
        return out

    def recv(self, max_frames: int = 1 << 30, timeout: float = 1.0) -> list[bytes]:
        """Frames received on any RX queue (headers stripped, mergeable buffers joined)."""
        return [frame for _hdr, frame in self.recv_with_hdr(max_frames, timeout)]

    def recv_with_hdr(
        self, max_frames: int = 1 << 30, timeout: float = 1.0
    ) -> list[tuple[bytes, bytes]]:
        deadline = time.monotonic() + timeout
        frames: list[tuple[bytes, bytes]] = []
        pending: dict[int, list[bytes]] = {i: [] for i in range(0, 2 * self.queue_pairs, 2)}
        hlen = self.hdr_len
        mergeable = self.has(lib.VIRTIO_NET_F_MRG_RXBUF)
        while len(frames) < max_frames:
            got_any = False
            for index in pending:
                q = self.queues[index]
                bufs = pending[index] + self._rx_used(q)
                pending[index] = []
                i = 0
                while i < len(bufs):
                    first = bufs[i]
                    hdr = first[:hlen]
                    count = struct.unpack_from("<H", hdr, 10)[0] if mergeable else 1
                    count = max(count, 1)
                    if i + count > len(bufs):
                        pending[index] = bufs[i:]  # rest of a mergeable frame not here yet
                        break
                    frame = first[hlen:] + b"".join(bufs[i + 1 : i + count])
                    frames.append((hdr, frame))
                    got_any = True
                    i += count
                self.post_rx(index)
            if len(frames) >= max_frames:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not got_any:
                fds = [self.queues[i].call_fd for i in pending]
                ready, _, _ = select.select(fds, [], [], min(remaining, 0.05))
                for i in pending:
                    if self.queues[i].call_fd in ready:
                        self.drain_calls(self.queues[i])
        return frames

    # -- teardown ------------------------------------------------------------------------

    def stop(self) -> dict[int, int]:
        """QEMU's stop sequence; returns the last avail idx per ring (GET_VRING_BASE)."""
        return self.vhost.stop()

    def close(self) -> None:
        for q in self.queues.values():
            q.driver.close()
            for fd in (q.kick_fd, q.call_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.queues.clear()
        self.vhost.close()
        if self.vhost.inflight_fd is not None:
            os.close(self.vhost.inflight_fd)
            self.vhost.inflight_fd = None
        if self.listener is not None:
            self.listener.close()
        self.mem.close()

    def __enter__(self) -> VirtioNetFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
