#!/usr/bin/env bash
# Install what cellnet needs on Debian 12 (idempotent; run as root or with sudo).
set -euo pipefail
# slurm-wlm, munge, nftables: the virtual-cluster and Slurm tests (scripts/cluster.sh, slurm/vcluster.sh).
packages=(libzmq3-dev libopenmpi-dev openmpi-bin libhwloc-dev libclang-dev clang pkg-config iproute2 build-essential util-linux slurm-wlm munge nftables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install a Rust toolchain >= 1.85 (rustup), then run this again." >&2
    exit 1
fi
