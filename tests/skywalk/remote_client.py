"""Child-process client used by test_subprocess.py: attaches to the pool through its fd.

argv: arena_fd sync_fd channel_info_json mode.  Prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import sys

from vdev.skywalk import Channel, ChannelInfo, DefunctError, SyncError, SyncKind


def main() -> None:
    fd, sync_fd = int(sys.argv[1]), int(sys.argv[2])
    info = ChannelInfo.from_json(sys.argv[3])
    mode = sys.argv[4]
    ch = Channel.attach(fd, info, sync_fd)
    out: dict[str, object] = {}
    if mode == "traffic":
        got = ch.recv(max=100, timeout=5.0)
        out["received"] = [g.hex() for g in got]
        out["sent"] = ch.send([bytes([0xC0 + i]) * (60 + i) for i in range(5)])
        big = ch.send([b"M" * 3000])
        out["sent_multi"] = big
    elif mode == "hostile":
        ch.tx_ring.head = ch.tx_ring.n + 1  # a bogus head written straight into the ring
        try:
            ch.sync(SyncKind.TX)
        except SyncError as err:
            out["reason"] = err.reason.name
            out["sync"] = err.sync.name
            out["detail"] = err.detail
        try:
            ch.sync(SyncKind.RX)
        except DefunctError as err:
            out["defunct"] = str(err)
    ch.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
