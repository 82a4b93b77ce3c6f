"""Which feature-negotiation faults reach a Linux guest through QEMU's vhost-user frontend.

QEMU, not the guest, talks vhost-user to vdev: it asks GET_FEATURES when the netdev
connects, masks the offer into its own virtio-net device, and sends SET_FEATURES (and, with
the STATUS protocol feature, SET_STATUS) when the guest's driver starts the device.  So
what the guest sees of a feature fault depends on QEMU.  This tool measures it instead of
guessing: one case per fault, each on a freshly booted guest (Debian's virtio_net, the vdev
Linux image), and prints the guest's own view (``/sys/class/net/eth0/device/features``, a
string of '0'/'1' per bit, bit 0 first) next to the device's (``stats_dict``).

    python3 tools/feature_reach.py [--case NAME] [--json]

Cases:
* ``offer-boot``: ``feature_offer`` (bit 50 added, GUEST_CSUM cleared) installed before
  QEMU connects;
* ``offer-reconnect``: the same rule installed after boot, then the backend connection is
  dropped so QEMU (``reconnect=1``) connects again and asks GET_FEATURES again;
* ``withdraw``: ``feature_withdraw`` of VERSION_1 + MRG_RXBUF, then the driver rebinds
  (device reset, SET_FEATURES again) and pings;
* ``assume``: ``feature_assume`` of GUEST_UFO (bit 10), then the driver rebinds;
* ``refuse``: ``refuse_features`` on any set, then the driver rebinds: does the guest see
  FEATURES_OK refused ("virtio: device refuses features" from virtio_dev_probe)?
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host.fuzz_linux import GUEST_IP, GUEST_MAC, PROBE, REBIND, RESPONDER

GUEST_CSUM, GUEST_UFO = 1, 10
FEATURES = "cat /sys/class/net/eth0/device/features 2>/dev/null || echo nodev"
CASES = ("offer-boot", "offer-reconnect", "withdraw", "assume", "refuse")


def _guest_bits(text: str) -> list[int] | None:
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and set(ln) <= {"0", "1"} and len(ln) >= 32:
            return [i for i, c in enumerate(ln) if c == "1"]
    return None


class _Errors(logging.Handler):
    """The backend's own account of a refused request (``vhost-user: ... not offered``)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_case(case: str, timeout: float = 20.0) -> dict[str, Any]:
    from host.machine import Machine, Nic
    from images.linux import build_linux
    from vdev.faults import FaultEngine
    from vdev.net.device import Device

    image = build_linux()
    out: dict[str, Any] = {"case": case}
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    with tempfile.TemporaryDirectory(prefix="vdev-feat-") as tmp:
        sock = Path(tmp) / "nic0.sock"
        dev = Device()
        dev.add_nic(str(sock), mac=GUEST_MAC)
        dev.start()
        eng = FaultEngine.for_device(dev)
        nf = eng.nic(0)
        machine = Machine.linux(
            image,
            nics=[Nic.vhost_user(sock, mac=GUEST_MAC, reconnect=True)],
            kernel_args=f"vdev.ip={GUEST_IP} vdev.gw={RESPONDER}",
        )
        try:
            if case == "offer-boot":
                nf.feature_offer(bits=[50], clear=[GUEST_CSUM])
            machine.launch()
            before, _ = machine.run(FEATURES, timeout=timeout)
            out["guest_before"] = _guest_bits(before)
            if case == "offer-reconnect":
                nf.feature_offer(bits=[50], clear=[GUEST_CSUM])
                eng.crash_backend(0)
                time.sleep(3.0)
                machine.run(REBIND, timeout=timeout)
            elif case == "withdraw":
                nf.feature_withdraw(bits=[32, 15])
                machine.run(REBIND, timeout=timeout)
            elif case == "assume":
                nf.feature_assume(bits=[GUEST_UFO])
                machine.run(REBIND, timeout=timeout)
            elif case == "refuse":
                nf.refuse_features()
                machine.run(REBIND, timeout=timeout)
            after, _ = machine.run(FEATURES, timeout=timeout)
            out["guest_after"] = _guest_bits(after)
            probe, _ = machine.run(PROBE, timeout=timeout)
            out["ping"] = "alive=0" in probe
            out["device"] = dev.nics[0].stats_dict()["features"]
            out["events"] = sorted(
                {e.kind for e in eng.log.since(0) if e.kind.startswith("feature")}
            )
            console = machine.console.log_since(0)
            out["console"] = [
                ln.strip()
                for ln in console.splitlines()
                if "refuses features" in ln or ("virtio_net" in ln and "probe" in ln)
            ][-5:]
            out["backend_errors"] = [ln for ln in errors.lines if "vhost-user" in ln][:3]
        finally:
            logging.getLogger().removeHandler(errors)
            eng.clear()
            machine.shutdown()
            eng.log.close()
            dev.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=CASES, action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = [run_case(c) for c in (args.case or CASES)]
    for r in results:
        if args.json:
            print(json.dumps(r, sort_keys=True))
        else:
            print(
                f"{r['case']:16} guest bits before={r.get('guest_before')} "
                f"after={r.get('guest_after')} ping={r.get('ping')} device={r.get('device')} "
                f"events={r.get('events')} console={r.get('console')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
