#!/usr/bin/env bash
# The benchmark suite: Meshgate against nginx and HAProxy on this machine.
# Installs nginx, haproxy, wrk, h2load and etcd when missing, builds the
# release binaries, runs every scenario and rewrites the results section of
# BENCHMARKS.md. Options are passed to loadtest/bench.py (see --help);
# `--quick` is a short smoke run that writes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/deps.sh --bench
cargo build --release --bins
exec python3 loadtest/bench.py "$@"
