#!/usr/bin/env bash
# Set up and run every check CI runs: format, lints, docs, the whole test
# suite (unit, simulation, multi-process, mpirun) with hard timeouts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
[ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
RUSTDOCFLAGS=-Dwarnings cargo doc --locked --no-deps --lib
cargo nextest run --locked --profile ci
cargo test --locked --doc
