#!/usr/bin/env bash
# Runs Meshgate on its embedded default: a standalone gateway (no etcd) with
# its admin API, the demo config, and two demo backends. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --bins
bin=target/release
demo=.meshgate-demo
mkdir -p "$demo"
[ -f "$demo/mesh.yaml" ] || cp config/examples/demo.yaml "$demo/mesh.yaml"

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
"$bin/meshgate-echo" --listen 127.0.0.1:18081 --name backend-a & pids+=($!)
"$bin/meshgate-echo" --listen 127.0.0.1:18082 --name backend-b & pids+=($!)

cat <<TXT

Meshgate standalone demo. Config: $demo/mesh.yaml (edit it: changes apply live)

  Ingress (north-south), round robin over two backends:
    curl -i http://127.0.0.1:8000/hello
  Mesh (east-west), naming the service; 90/10 split hello / hello-v2:
    curl -i -H 'x-mesh-service: hello' http://127.0.0.1:8080/
  Admin API (embedded, loopback only without a token):
    curl http://127.0.0.1:9901/api/v1/routes
    curl -X PUT http://127.0.0.1:9901/api/v1/routes/ping \\
      -d '{"scope":"ingress","match":{"path":{"exact":"/ping"}},"direct_response":{"status":200,"body":"pong"}}'
    curl http://127.0.0.1:8000/ping
  Ops:
    curl http://127.0.0.1:9901/readyz ; curl http://127.0.0.1:9901/metrics

TXT
"$bin/meshgate-gateway" --standalone "$demo/mesh.yaml" & pids+=($!)
wait "${pids[-1]}"
