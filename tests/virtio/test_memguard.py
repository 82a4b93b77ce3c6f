"""Guest memory that cannot kill the process (issue 12 item 4): ``vdev/native/memguard.c``.

A memfd really truncated under a mapped region: the access completes (zero pages), the
region reports a :class:`GuestMemoryFault` naming itself and the offset, the owner's
eventfd fires; guarded C copies and probes return the faulting address.  In subprocesses: a
SIGBUS on memory nobody registered (or sent with kill) still kills, with or without Python's
faulthandler in front.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdev.errors import GuestMemoryFault, VdevError
from vdev.virtio import memguard
from vdev.virtio.memory import GuestMemory

PAGE = mmap.PAGESIZE
SIZE = 64 * PAGE
GPA = 0x10000
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not memguard.available(), reason="compiled module unavailable (no C compiler?)"
)


@pytest.fixture
def guarded() -> Iterator[tuple[GuestMemory, int, int]]:
    """One region over a fresh memfd, its notify eventfd, and the memfd."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, 2 * SIZE)
    mem = GuestMemory(efd)
    # mmap_offset != 0 so the reported offset is region-relative, not fd-relative.
    mem.add_region(GPA, SIZE, 0x7F00_0000_0000, SIZE, fd)
    yield mem, efd, fd
    mem.close()
    os.close(fd)
    os.close(efd)


def eventfd_count(efd: int) -> int:
    try:
        return os.eventfd_read(efd)
    except BlockingIOError:
        return 0


def test_intact_memory_reports_no_fault(guarded: tuple[GuestMemory, int, int]) -> None:
    mem, efd, fd = guarded
    mem.write(GPA + SIZE - 4, b"tail")
    assert mem.read(GPA + SIZE - 4, 4) == b"tail"
    os.ftruncate(fd, 2 * SIZE + PAGE)  # growing is harmless
    mem.check()
    assert mem.fault() is None and eventfd_count(efd) == 0


def test_truncated_region_faults_by_name_and_offset(
    guarded: tuple[GuestMemory, int, int],
) -> None:
    mem, efd, fd = guarded
    mem.write(GPA, b"head")
    # Keep the region's first 5 pages: the fd ends SIZE + 5 pages in, the region at SIZE.
    os.ftruncate(fd, SIZE + 5 * PAGE)
    assert mem.read(GPA + 4 * PAGE, 4) == bytes(4)  # still inside the file: no fault yet...
    assert mem.fault() is None
    # ... one page further is past the new end: SIGBUS, recovered onto zero pages.
    assert mem.read(GPA + 5 * PAGE + 8, 4) == bytes(4)
    err = mem.fault()
    assert isinstance(err, GuestMemoryFault) and isinstance(err, VdevError)
    assert (err.gpa, err.size, err.offset, err.faults) == (GPA, SIZE, 5 * PAGE + 8, 1)
    assert f"gpa {GPA:#x}+{SIZE:#x}" in str(err) and "truncated" in str(err)
    assert eventfd_count(efd) == 1
    with pytest.raises(GuestMemoryFault, match="faulted at offset 0x5008"):
        mem.check()
    # The whole mapping is now zero pages: later accesses neither fault nor see guest data.
    assert mem.read(GPA, 4) == bytes(4)
    mem.write(GPA + SIZE - 1, b"x")
    assert mem.fault() is not None and mem.fault().faults == 1  # type: ignore[union-attr]


def test_guarded_copy_and_probe_return_the_fault_address(
    guarded: tuple[GuestMemory, int, int],
) -> None:
    mem, efd, fd = guarded
    mod = memguard.native()
    view = mem.gpa_view(GPA + 8 * PAGE, 64)
    assert memguard.copy_from(view) == bytes(64)  # intact: the bytes
    region = mem.regions[0]
    assert region.guard is not None
    page8 = region.guard.address + 8 * PAGE  # the mapping starts at the region (page aligned)
    fault = mod.ffi.new("uint64_t *")
    assert mod.lib.mg_probe(mod.ffi.cast("void *", page8), fault) == mod.lib.MG_OK
    os.ftruncate(fd, SIZE + 8 * PAGE)  # page 8 onwards is gone
    assert mod.lib.mg_probe(mod.ffi.cast("void *", page8 - 1), fault) == mod.lib.MG_OK
    assert mod.lib.mg_probe(mod.ffi.cast("void *", page8), fault) == mod.lib.MG_FAULT
    assert fault[0] == page8
    assert memguard.copy_from(view) == page8  # the guarded copy says where, not what
    view.release()
    # A guarded fault jumps out without mapping zero pages: the count says 2 faults.
    err = mem.fault()
    assert err is not None and err.faults == 2 and err.offset == 8 * PAGE
    assert eventfd_count(efd) == 2


def test_closing_unregisters(guarded: tuple[GuestMemory, int, int]) -> None:
    mem, _efd, _fd = guarded
    guard = mem.regions[0].guard
    assert guard is not None and guard.handle >= 0
    mem.close()
    assert guard.handle == -1 and mem.regions == []


# -- in a subprocess: what must still kill --------------------------------------------------

CHILD = """
import mmap, os, signal, sys
from vdev.virtio import memguard
from vdev.virtio.memory import GuestMemory
assert memguard.available()
fd = os.memfd_create("child")
os.ftruncate(fd, 1 << 16)
how = sys.argv[1]
if how == "registered":
    mem = GuestMemory()
    mem.add_region(0, 1 << 16, 0, 0, fd)
    os.ftruncate(fd, 0)
    mem.read(0x8000, 4)
    print("survived", mem.fault().faults, flush=True)
elif how == "unregistered":
    mem = GuestMemory()
    mem.add_region(0, 1 << 16, 0, 0, fd)  # the handler is installed and guards this one ...
    other = mmap.mmap(fd, 1 << 16)  # ... but not this mapping of the same fd
    os.ftruncate(fd, 0)
    print("touching", flush=True)
    other[0x8000]
    print("survived", flush=True)
elif how == "kill":
    mem = GuestMemory()
    mem.add_region(0, 1 << 16, 0, 0, fd)
    print("touching", flush=True)
    os.kill(os.getpid(), signal.SIGBUS)
    print("survived", flush=True)
"""


def run_child(how: str, *python_opts: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, *python_opts, "-c", textwrap.dedent(CHILD), how],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_child_survives_a_fault_on_registered_memory() -> None:
    proc = run_child("registered")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["survived", "1"]


@pytest.mark.parametrize("how", ["unregistered", "kill"])
@pytest.mark.parametrize("opts", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
def test_sigbus_outside_guest_memory_still_kills(how: str, opts: tuple[str, ...]) -> None:
    proc = run_child(how, *opts)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["touching"]
    if opts:
        assert "Bus error" in proc.stderr  # the previous handler (faulthandler) ran first


def test_a_mapping_dropped_without_unregistering_does_not_steal_faults(tmp_path: Path) -> None:
    """Registered, then unmapped without ``unregister`` (an owner dropped, not closed): a new
    mapping at the same addresses must get its own faults, and the stale handle names
    nothing, so unregistering it late cannot free the new registration."""
    mod = memguard.native()
    efd_old = os.eventfd(0, os.EFD_NONBLOCK)
    efd_new = os.eventfd(0, os.EFD_NONBLOCK)
    fd = os.memfd_create("stale", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE)
        old = mmap.mmap(fd, 4 * PAGE)
        stale = memguard.Guarded(old, efd_old)
        address = stale.address
        old.close()  # no unregister
        # Map again until the kernel hands the same address back (it reuses the hole).
        keep = []
        for _ in range(64):
            mm = mmap.mmap(fd, 4 * PAGE)
            if memguard.mapping_address(mm) == address:
                break
            keep.append(mm)
        else:
            pytest.skip("the kernel never reused the address")
        fresh = memguard.Guarded(mm, efd_new)
        assert fresh.handle != stale.handle
        os.ftruncate(fd, PAGE)
        assert memguard.copy_from(memoryview(mm)[2 * PAGE : 2 * PAGE + 8]) == address + 2 * PAGE
        assert fresh.faults == 1 and fresh.fault_addr == address + 2 * PAGE
        assert eventfd_count(efd_new) == 1 and eventfd_count(efd_old) == 0
        assert mod.lib.mg_faults(stale.handle) == 0
        stale.unregister()  # late: must not free the fresh registration (it may reuse the slot)
        assert fresh.faults == 1
        fresh.unregister()
        assert fresh.faults == 0  # gone: the handle names nothing now
        mm.close()
        for m in keep:
            m.close()
    finally:
        os.close(fd)
        os.close(efd_old)
        os.close(efd_new)
