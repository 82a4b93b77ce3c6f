#!/usr/bin/env bash
# Install what vdev needs on a fresh Debian 12 machine (run as root). Idempotent: it only
# installs what is missing, and says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static cpio dpdk dpdk-dev tshark gcc gcc-multilib make)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root for apt-get (missing: ${missing[*]})" >&2
        exit 1
    fi
    # tshark asks whether non-root users may capture; answer no without a prompt.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The editable install must point at this checkout: installing another clone re-points it,
# and then `vdev` (and every test that runs it) would import that clone's code.
installed_at=$(cd / && python3 -c "import os, vdev; print(os.path.dirname(os.path.dirname(os.path.realpath(vdev.__file__))))" 2>/dev/null || true)
if ! python3 -c "import vdev, cffi, elftools, pexpect, qemu.qmp, hypothesis, pytest_timeout, xdist, ruff, mypy, atheris" 2>/dev/null \
   || [ "$installed_at" != "$(pwd -P)" ] \
   || [ pyproject.toml -nt .setup-stamp ] 2>/dev/null; then
    echo "setup: installing vdev and its Python dependencies (pip install -e .[dev])"
    python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
    touch .setup-stamp
fi
