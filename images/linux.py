"""Recipe for the Linux test guest: a Debian cloud kernel plus a busybox initramfs.

Why this shape: the Debian ``cloud-amd64`` kernel is small, has virtio-net as modules (so
the guest exercises the real probe path) and comes through apt, which is already configured
on every machine we run on; busybox-static gives a full userland in ~2 MiB; the initramfs
boots in ~2 s under TCG, so a test module can afford its own VM.

Inputs hashed into the cache key: kernel package name and version (or the bytes of a
user-supplied kernel and modules), the busybox binary, ``init.sh``, the tool sources, gcc
version and ``RECIPE_VERSION``.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from images import cache
from images.cache import Artifact, Hasher, human_size
from images.cpio import CpioWriter
from images.tools import ToolError, build_tools, hash_tool_inputs, require_tool

# Bump when the recipe changes in a way the other inputs do not capture.
RECIPE_VERSION = "1"
NAME = "linux"
KEEP_BUILDS = 3  # older linux-* artifacts are pruned after a build
META_PACKAGE = "linux-image-cloud-amd64"
INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUSYBOX = Path("/bin/busybox")
# Modules the guest needs; their dependencies are added from each module's depends= field.
# virtio_mmio serves -machine microvm; af_packet is built into the Debian kernel.
WANTED_MODULES = ("virtio_pci", "virtio_mmio", "virtio_net", "af_packet")

Progress = Callable[[str], None]
_NO_APT_HINT = (
    "the Linux image gets Debian's cloud kernel through apt; on a host without apt, pass "
    "--kernel BZIMAGE (and --modules DIR unless virtio/virtio_net are built in)"
)


def _stderr_progress(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


class ImageError(ToolError):
    """The image cannot be built; the message names the missing piece and how to get it."""


@dataclass(frozen=True)
class LinuxImage:
    """A built Linux guest: what :class:`host.machine.Machine` boots."""

    kernel: Path
    initrd: Path
    hash: str
    kernel_version: str
    modules: tuple[str, ...]
    path: Path
    cache_hit: bool

    @classmethod
    def from_artifact(cls, art: Artifact, cache_hit: bool) -> LinuxImage:
        return cls(
            kernel=art.file("kernel"),
            initrd=art.file("initrd"),
            hash=art.hash,
            kernel_version=str(art.info.get("kernel_version", "?")),
            modules=tuple(art.info.get("modules", ())),
            path=art.path,
            cache_hit=cache_hit,
        )


# ---------------------------------------------------------------------------- apt / kernel


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        raise ImageError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_key() -> str:
    """Changes whenever ``apt-get update`` changes the package lists."""
    h = Hasher()
    try:
        for p in sorted(APT_LISTS.iterdir()):
            if p.is_file():
                st = p.stat()
                h.add(p.name, f"{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return ""
    return h.hexdigest()


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) of the newest cloud kernel in the apt lists, memoised.

    ``apt-cache`` takes about a second per call here; the answer only changes when the
    lists do, so it is remembered in the cache keyed by the lists' sizes and mtimes. That
    keeps a cache hit well under a second.
    """
    memo = cache.cache_root() / "apt-resolve.json"
    key = _apt_lists_key()
    try:
        saved = json.loads(memo.read_text())
        if key and saved["key"] == key:
            return str(saved["package"]), str(saved["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    pkg, version = _resolve_kernel_package_apt()
    if key:
        with contextlib.suppress(OSError):
            memo.write_text(json.dumps({"key": key, "package": pkg, "version": version}))
    return pkg, version


def _resolve_kernel_package_apt() -> tuple[str, str]:
    """(package, version) of the newest cloud kernel apt knows, via the meta package.

    Falls back to the newest concrete ``linux-image-*-cloud-amd64`` if the meta package is
    not in the lists.
    """
    require_tool("apt-cache", "apt", _NO_APT_HINT)
    pkg = ""
    out = subprocess.run(
        ["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, timeout=60
    ).stdout
    m = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if m:
        pkg = m.group(1)
    else:
        names = _run(
            ["apt-cache", "search", "--names-only", r"^linux-image-[0-9.]+-[0-9]+-cloud-amd64$"],
            timeout=60,
        ).split()
        cands = [n for n in names if n.startswith("linux-image-")]
        if not cands:
            raise ImageError(
                "apt knows no linux-image-*-cloud-amd64 package: run `apt-get update` "
                "(Debian 12 lists), or pass --kernel PATH"
            )
        pkg = max(cands, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
    show = _run(["apt-cache", "show", "--no-all-versions", pkg], timeout=60)
    vm = re.search(r"^Version:\s*(\S+)", show, re.M)
    if vm is None:
        raise ImageError(f"apt-cache show {pkg} gave no Version")
    return pkg, vm.group(1)


def _cached_deb(debs: Path, pkg: str, version: str) -> Path | None:
    ver = version.replace(":", "%3a")
    for cand in debs.glob(f"{pkg}_*.deb"):
        if cand.name.startswith(f"{pkg}_{ver}_") or cand.name.startswith(f"{pkg}_{version}_"):
            return cand
    return None


def fetch_kernel_deb(pkg: str, version: str, progress: Progress) -> Path:
    """``apt-get download`` the package into ``images/cache/debs`` (once per version)."""
    debs = cache.cache_root() / "debs"
    debs.mkdir(exist_ok=True)
    found = _cached_deb(debs, pkg, version)
    if found:
        progress(f"kernel package cached: {found.name} ({human_size(found.stat().st_size)})")
        return found
    require_tool("apt-get", "apt", _NO_APT_HINT)
    progress(f"downloading {pkg}={version} with apt-get download ...")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # apt drops privileges to _apt for downloads; a private dir it can write avoids the
        # "unsandboxed" warning when it can.
        Path(tmp).chmod(0o777)
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], timeout=600, cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise ImageError(f"apt-get download {pkg} produced {got}")
        dest = debs / got[0].name
        got[0].replace(dest)
    progress(
        f"downloaded {dest.name}: {human_size(dest.stat().st_size)} "
        f"in {time.monotonic() - t0:.1f} s"
    )
    return dest


def extract_deb(deb: Path, dest: Path) -> None:
    try:
        _run(["dpkg-deb", "-x", str(deb), str(dest)], timeout=300)
    except FileNotFoundError:
        raise ImageError("'dpkg-deb' not found: install it with `apt-get install dpkg`") from None


# ---------------------------------------------------------------------------- modules


def read_modinfo(data: bytes) -> dict[str, str]:
    """Fields of a module's ``.modinfo`` ELF section (NUL-separated ``key=value``)."""
    import io

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(data))
    sec = elf.get_section_by_name(".modinfo")
    if sec is None:
        return {}
    out: dict[str, str] = {}
    for item in sec.data().split(b"\0"):
        if b"=" in item:
            k, _, v = item.decode(errors="replace").partition("=")
            out.setdefault(k, v)
    return out


def _load_module(path: Path) -> bytes:
    """Module bytes, decompressed: busybox insmod cannot read .ko.xz."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        zstd = require_tool("zstd", "zstd")
        return subprocess.run(
            [zstd, "-dc", str(path)], check=True, capture_output=True, timeout=60
        ).stdout
    return path.read_bytes()


def index_modules(root: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> file, for every .ko[.xz|.zst] under root."""
    idx: dict[str, Path] = {}
    for p in sorted(root.rglob("*.ko*")):
        m = re.fullmatch(r"(.+)\.ko(\.xz|\.zst)?", p.name)
        if m:
            idx.setdefault(m.group(1).replace("-", "_"), p)
    return idx


def read_builtin(root: Path | None) -> set[str]:
    """Names from ``modules.builtin`` (``kernel/net/packet/af_packet.ko`` -> ``af_packet``)."""
    if root is None or not (root / "modules.builtin").is_file():
        return set()
    lines = (root / "modules.builtin").read_text().split()
    return {Path(line).name.removesuffix(".ko").replace("-", "_") for line in lines}


def resolve_modules(
    index: dict[str, Path],
    wanted: tuple[str, ...],
    progress: Progress,
    builtin: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[str, bytes]]:
    """Wanted modules plus dependencies, dependencies first (insmod order).

    A wanted module missing from ``index`` is assumed built in (e.g. af_packet in Debian's
    kernel, or everything in a user's monolithic bzImage).
    """
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in stack:
            raise ImageError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        path = index.get(name)
        if path is None:
            if not stack:
                if name in builtin:
                    progress(f"module {name}: built into the kernel")
                else:
                    progress(f"module {name}: not found, assuming built in")
                done.add(name)
                return
            raise ImageError(f"module {stack[-1]} depends on {name}, which is missing")
        data = _load_module(path)
        deps = [d for d in read_modinfo(data).get("depends", "").split(",") if d]
        for dep in deps:
            visit(dep.replace("-", "_"), (*stack, name))
        done.add(name)
        order.append((name, data))

    for w in wanted:
        visit(w, ())
    return order


# ---------------------------------------------------------------------------- initramfs


def check_busybox() -> Path:
    if not BUSYBOX.is_file():
        raise ImageError(f"{BUSYBOX} not found: install it with `apt-get install busybox-static`")
    from elftools.elf.elffile import ELFFile

    with BUSYBOX.open("rb") as f:
        if any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments()):
            raise ImageError(
                f"{BUSYBOX} is dynamically linked: install `busybox-static` "
                "(apt-get install busybox-static), which replaces it with a static build"
            )
    return BUSYBOX


def busybox_applets() -> list[str]:
    """Full paths of every applet (``/bin/sh``, ``/sbin/ip``, ...)."""
    out = _run([str(BUSYBOX), "--list-full"], timeout=30)
    return [line.strip() for line in out.splitlines() if line.strip()]


def build_initramfs(modules: list[tuple[str, bytes]], tools: dict[str, Path]) -> bytes:
    w = CpioWriter()
    for d in (
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/vdev", "lib", "lib/modules",
        "proc", "sys", "dev", "tmp", "run", "root", "var",
    ):  # fmt: skip
        w.add_dir(d)
    # The kernel opens /dev/console before /init runs: it must exist in the archive.
    w.add_chardev("dev/console", 5, 1)
    w.add_host_file("bin/busybox", BUSYBOX, 0o755)
    for applet in busybox_applets():
        name = applet.lstrip("/")
        if name != "bin/busybox" and not w.has(name):
            w.add_symlink(name, "/bin/busybox")
    w.add_file("init", INIT_SCRIPT.read_bytes(), 0o755)
    for name, data in modules:
        w.add_file(f"lib/modules/{name}.ko", data)
    w.add_file("etc/vdev/modules", "".join(f"{n}\n" for n, _ in modules).encode())
    for name, path in sorted(tools.items()):
        w.add_host_file(f"usr/bin/{name}", path, 0o755)
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("etc/group", b"root:x:0:\n")
    return w.gzipped()


# ---------------------------------------------------------------------------- build


def _hash_common(h: Hasher) -> None:
    h.add("recipe", RECIPE_VERSION)
    h.add("wanted", ",".join(WANTED_MODULES))
    h.add_file("busybox", check_busybox())
    h.add_file("init", INIT_SCRIPT)
    h.add_file("recipe-src", Path(__file__))
    hash_tool_inputs(h)


def build_linux(
    *,
    kernel: Path | None = None,
    modules_dir: Path | None = None,
    force: bool = False,
    progress: Progress = _stderr_progress,
) -> LinuxImage:
    """Build (or find in the cache) the Linux guest image.

    ``kernel``: a user-supplied bzImage instead of Debian's; its modules then come from
    ``modules_dir`` (any tree of .ko files) or must be built in.
    """
    t0 = time.monotonic()
    h = Hasher()
    _hash_common(h)
    pkg = version = ""
    if kernel is None:
        pkg, version = resolve_kernel_package()
        h.add("kernel-package", f"{pkg}={version}")
    else:
        if not kernel.is_file():
            raise ImageError(f"--kernel {kernel}: no such file")
        h.add_file("kernel", kernel)
        if modules_dir is not None:
            for p in sorted(index_modules(modules_dir).values()):
                h.add_file(f"module:{p.name}", p)
    digest = h.hexdigest()
    dest = cache.artifact_dir(NAME, digest)

    if not force and (art := cache.load_artifact(dest)):
        progress(f"linux image cache hit {dest.name} ({time.monotonic() - t0:.2f} s)")
        return LinuxImage.from_artifact(art, cache_hit=True)

    with cache.build_lock():
        # Another builder may have finished while we waited for the lock.
        if not force and (art := cache.load_artifact(dest)):
            return LinuxImage.from_artifact(art, cache_hit=True)
        progress(f"building linux image {dest.name}")
        with tempfile.TemporaryDirectory(dir=cache.cache_root(), prefix=".build-") as tmp_s:
            tmp = Path(tmp_s)
            out = tmp / "out"
            out.mkdir()
            if kernel is None:
                deb = fetch_kernel_deb(pkg, version, progress)
                t = time.monotonic()
                extract_deb(deb, tmp / "deb")
                vmlinuz = sorted((tmp / "deb" / "boot").glob("vmlinuz-*"))
                if not vmlinuz:
                    raise ImageError(f"{deb.name} has no /boot/vmlinuz-*")
                kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
                mod_root: Path | None = tmp / "deb" / "lib" / "modules" / kver
                shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
                progress(f"extracted {deb.name} in {time.monotonic() - t:.1f} s (kernel {kver})")
            else:
                kver = f"custom:{kernel.name}"
                mod_root = modules_dir
                shutil.copyfile(kernel, out / "vmlinuz")
            t = time.monotonic()
            index = index_modules(mod_root) if mod_root else {}
            mods = resolve_modules(index, WANTED_MODULES, progress, read_builtin(mod_root))
            progress(
                "modules (load order): "
                + (", ".join(f"{n} ({human_size(len(d))})" for n, d in mods) or "none")
            )
            tools = build_tools(tmp / "tools")
            progress(
                "guest tools: "
                + ", ".join(f"{n} ({human_size(p.stat().st_size)})" for n, p in tools.items())
                + f" in {time.monotonic() - t:.1f} s"
            )
            t = time.monotonic()
            (out / "initrd.gz").write_bytes(build_initramfs(mods, tools))
            progress(
                f"initramfs: {human_size((out / 'initrd.gz').stat().st_size)} "
                f"in {time.monotonic() - t:.1f} s"
            )
            cache.write_manifest(
                out,
                NAME,
                digest,
                {"kernel": "vmlinuz", "initrd": "initrd.gz"},
                {
                    "kernel_version": kver,
                    "kernel_package": f"{pkg}={version}" if pkg else str(kernel),
                    "modules": [n for n, _ in mods],
                    "tools": sorted(tools),
                },
            )
            if dest.exists():
                shutil.rmtree(dest)
            out.rename(dest)
        for gone in cache.prune(NAME, keep=KEEP_BUILDS):
            progress(f"pruned old image {gone.name}")
    art = cache.load_artifact(dest)
    assert art is not None
    progress(f"linux image ready: {dest} ({human_size(art.size)}) in {time.monotonic() - t0:.1f} s")
    return LinuxImage.from_artifact(art, cache_hit=False)
