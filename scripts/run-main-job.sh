#!/usr/bin/env bash
# Set up, build in release mode and run the main job under mpirun on this
# machine: `cellnet life` on 4 instances (override with NP=8, extra
# arguments go to `cellnet life`, e.g. --frames 500).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cargo build --release --locked
NP="${NP:-4}"
# Bind with hwloc inside cellnet, not in mpirun; keep MPI on loopback.
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec timeout 600 mpirun --oversubscribe --bind-to none -n "$NP" target/release/cellnet life "$@"
