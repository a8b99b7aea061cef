#!/usr/bin/env bash
# Build in release mode and run the whole benchmark suite on this machine:
# `cellnet bench all` starts its own `mpirun -n 2` (latency, throughput),
# `mpirun -n 2/4/8` (halo) and plain processes (discovery) with the flags
# below. Results (tables on stdout, JSON and PNG) go to results/ or $OUT.
# Extra arguments go to `cellnet bench all` (e.g. --quick, --reps 9).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
cargo build --release --locked
# Keep MPI on loopback; cellnet binds with hwloc itself (mpirun --bind-to none).
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec timeout 3600 target/release/cellnet bench all --out "${OUT:-results}" "$@"
