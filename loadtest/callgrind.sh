#!/usr/bin/env bash
# Instructions per proxied request of the gateway, counted by callgrind:
# repeatable for the same binary whatever else the machine does, so it
# compares builds where wall-clock rates drift by ±10% (BENCHMARKS.md).
#
#   loadtest/callgrind.sh [--h2] [BIN_DIR]      # default: target/release
#
# With --h2 the clients speak HTTP/2 (h2c): h2load sends 6,000 and then
# 18,000 requests over 10 connections × 10 streams (the upstream is
# HTTP/1.1 either way).
#
# A standalone gateway (one worker) runs under valgrind in front of
# meshgate-echo; meshgate-load sends an open loop of 2,000 req/s (10
# connections) for 3 s and then for 9 s. The difference of the two totals
# over the difference of the request counts is the cost of a request,
# start-up and shutdown excluded. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
H2=0
if [ "${1:-}" = "--h2" ]; then H2=1; shift; fi
BIN=${1:-target/release}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind not found (apt-get install valgrind)" >&2; exit 2; }
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not up: $1" >&2; return 1; }

ECHO=$(free_port)
"$BIN/meshgate-echo" --listen "127.0.0.1:$ECHO" --fixed-body 64 >/dev/null 2>&1 &
cat >"$WORK/mesh.yaml" <<YAML
services:
  echo:
    endpoints: [{address: "127.0.0.1:$ECHO"}]
routes:
  echo:
    scope: ingress
    match: {path: {prefix: /}}
    backends: [{service: echo}]
YAML

# Instructions of one run of the gateway carrying `secs` seconds of load.
run() {
    local secs=$1 ingress mesh ops out
    ingress=$(free_port); mesh=$(free_port); ops=$(free_port)
    out="$WORK/cg.$secs"
    MESHGATE_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BIN/meshgate-gateway" --standalone "$WORK/mesh.yaml" --workers 1 \
        --listen "127.0.0.1:$mesh" --ingress-listen "127.0.0.1:$ingress" \
        --admin-listen "127.0.0.1:$ops" >/dev/null 2>&1 &
    local pid=$!
    wait_http "http://127.0.0.1:$ops/readyz"
    local report ok
    if [ "$H2" = 1 ]; then
        report=$(h2load -t1 -c10 -m10 -n $((secs * 2000)) "http://127.0.0.1:$ingress/x")
        ok=$(echo "$report" | sed -n 's/.* \([0-9]*\) succeeded.*/\1/p')
    else
        report=$("$BIN/meshgate-load" --json -c 10 -r 2000 -d "$secs" "http://127.0.0.1:$ingress/x")
        ok=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["ok"])' "$report")
    fi
    kill -TERM "$pid"; wait "$pid" || true
    local ir
    ir=$(grep -m1 '^summary:' "$out" | awk '{print $2}')
    echo "$ok $ir"
}

read -r n1 i1 < <(run 3)
read -r n2 i2 < <(run 9)
python3 - "$n1" "$i1" "$n2" "$i2" <<'PY'
import sys
n1, i1, n2, i2 = map(int, sys.argv[1:])
print(f"requests {n1} and {n2}; instructions {i1:,} and {i2:,}")
print(f"instructions per proxied request: {(i2 - i1) / (n2 - n1):,.0f}")
PY
