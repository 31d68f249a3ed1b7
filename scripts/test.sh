#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs
# (etcd-server, protobuf-compiler, curl), checks formatting and lints, then
# runs every unit and end-to-end test (real etcd, real processes, 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --test
cargo fmt --all -- --check
scripts/check-layers.sh
scripts/check-docs.sh
cargo clippy --all-targets -- -D warnings
cargo build --workspace --bins
# The packaging (deploy/): manifests validated, the .deb built from these
# debug binaries, installed, run (a hot upgrade through the units'
# ExecReload included) and purged (as root; see the script).
scripts/check-packaging.sh
cargo test --workspace
# The gateway fuzz targets' invariants on the seed corpus (stable toolchain).
cargo test -p meshgate-gateway --features fuzzing --lib fuzzing
