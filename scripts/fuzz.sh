#!/usr/bin/env bash
# Fuzzes Meshgate's parsers with cargo-fuzz (libFuzzer); fuzz/README.md
# says what each target checks.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Installs cargo-fuzz when it is missing (with the nightly toolchain),
# builds the targets, then runs each one given (all by default) for
# SECONDS_PER_TARGET (default 60), one at a time, as one process at
# `nice -n ${FUZZ_NICE:-19}`. Each run starts from the seeds in
# fuzz/corpus/<target>/ (read, never written) and keeps what it finds in
# fuzz/target/corpus/<target>/, so later runs go on from there; logs are in
# fuzz/target/logs/. Ends with a table of runs, coverage, corpus size and
# crashes, and fails (exit 1) when any target crashed, printing where the
# crashing input was written and how to replay it.
#
# Cargo invocations hold /tmp/meshgate-cargo.lock (shared with other builds
# on this machine); the fuzzing itself does not.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(server_head client_response route_match config_decode snapshot_file)
SECONDS_PER_TARGET=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    SECONDS_PER_TARGET=$1
    shift
fi
if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
else
    TARGETS=("${ALL_TARGETS[@]}")
fi
for t in "${TARGETS[@]}"; do
    if [[ ! -f fuzz/fuzz_targets/$t.rs ]]; then
        echo "fuzz.sh: no fuzz target $t (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

LOCK=/tmp/meshgate-cargo.lock
locked() { flock "$LOCK" "$@"; }

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    locked cargo +nightly install cargo-fuzz --locked
fi

echo "fuzz.sh: building ${TARGETS[*]}"
for t in "${TARGETS[@]}"; do
    (cd fuzz && CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} locked cargo +nightly fuzz build "$t")
done

BIN=fuzz/target/x86_64-unknown-linux-gnu/release
mkdir -p fuzz/target/logs
failed=()
rows=()
for t in "${TARGETS[@]}"; do
    corpus=fuzz/target/corpus/$t
    artifacts=fuzz/artifacts/$t
    log=fuzz/target/logs/$t.log
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz.sh: $t for ${SECONDS_PER_TARGET}s (log: $log)"
    rc=0
    # New inputs go to the first directory only: the seeds stay as they are.
    nice -n "${FUZZ_NICE:-19}" "$BIN/$t" "$corpus" "fuzz/corpus/$t" \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    # The last status line: `#RUNS DONE cov: N ft: N corp: N/SIZE ...`.
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$last")
    crashes=0
    if [[ $rc -ne 0 ]]; then
        crashes=1
        failed+=("$t")
        echo "fuzz.sh: $t FAILED (exit $rc); the end of its log:"
        tail -n 40 "$log" | sed 's/^/    /'
        while read -r path; do
            echo "fuzz.sh: crashing input: $path"
            echo "fuzz.sh: replay: cargo +nightly fuzz run $t $path"
        done < <(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log")
    fi
    rows+=("$(printf '%-16s %12s %8s %8s %8s' "$t" "${runs:-?}" "${cov:-?}" "${corp:-?}" "$crashes")")
done

echo
printf '%-16s %12s %8s %8s %8s\n' target runs cov corpus crashes
printf '%s\n' "${rows[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz.sh: crashes in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz.sh: no crashes"
