"""Run one harness under libFuzzer (atheris): ``python -m fuzz.run TARGET [libFuzzer args]``.

The harness and every ``vdev`` module it imports are instrumented for coverage (atheris
instruments Python bytecode at import).  The compiled module is not instrumented for
coverage (gcc has no ``-fsanitize=fuzzer``); for the C paths the campaign loads the
ASan/UBSan build instead (``VDEV_NATIVE_SANITIZE=1``, see ``vdev/native/build.py``), so
memory errors and undefined behaviour there abort and count as crashes.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

# What each target instruments for coverage: the modules behind its trust boundary (the
# rest of vdev runs uninstrumented, which is 2-3x faster per execution).
COVERED = {
    "vhost": ("vdev.vhost", "vdev.virtio.memory", "vdev.net.nic"),
    "virtqueue": ("vdev.virtio", "vdev.net.nic"),
    "skywalk": ("vdev.skywalk",),
    "scenario": ("vdev.faults",),
    "control": ("vdev.faults",),
}
TARGETS = {
    "vhost": "fuzz.t_vhost",
    "virtqueue": "fuzz.t_virtqueue",
    "skywalk": "fuzz.t_skywalk",
    "scenario": "fuzz.t_scenario",
    "control": "fuzz.t_control",
}


def uncovered(prefixes: tuple[str, ...]) -> list[str]:
    """Every vdev module outside ``prefixes`` (atheris excludes by exact module name), found
    on disk: importing them to list them would load them uninstrumented."""
    root = Path(__file__).resolve().parents[1] / "vdev"
    names = []
    for path in root.rglob("*.py"):
        parts = ["vdev", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return [n for n in names if not any(n == p or n.startswith(p + ".") for p in prefixes)]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.run {{{','.join(TARGETS)}}} [libFuzzer args]")
    import atheris

    name = sys.argv[1]
    with atheris.instrument_imports(include=["vdev"], exclude=uncovered(COVERED[name])):
        mod = importlib.import_module(TARGETS[name])
    setup = getattr(mod, "setup", None)
    if setup is not None:
        setup()
    if name == "virtqueue":
        # Every kill the compiled-burst programs cause is logged (ERROR); a million of them
        # only slow the campaign down.  Here, not in the harness's setup(): the tests run
        # that in-process and must keep the loggers as other tests expect them.
        logging.getLogger("vdev").setLevel(logging.CRITICAL)
    atheris.Setup([sys.argv[0], *sys.argv[2:]], mod.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
