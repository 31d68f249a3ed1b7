#!/usr/bin/env bash
# Installs the system packages Meshgate needs to build and test, when missing
# (Debian packages; run as root or with sudo available).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need+=(curl)
case "${1:-}" in
  --test)
    command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
    # The console's browser test (tests/tests/console.rs).
    [ -x /usr/bin/chromium ] || need+=(chromium)
    # The packaging check (scripts/check-packaging.sh): systemd-analyze
    # verifies the units; dpkg-shlibdeps gives the package its Depends.
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
    ;;
  --bench)
    command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
    command -v nginx >/dev/null 2>&1 || need+=(nginx)
    command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
    command -v wrk >/dev/null 2>&1 || need+=(wrk)
    command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
    command -v taskset >/dev/null 2>&1 || need+=(util-linux)
    ;;
esac
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The end-to-end tests' real gRPC, WebSocket and OTLP peers, the JWT
# signer (PyJWT with its crypto backend), and the browser driver (Playwright, on Debian's Chromium) (tests/peers/), and
# schemathesis, which fuzzes the admin API from its OpenAPI document.
if [ "${1:-}" = "--test" ]; then
  command -v python3 >/dev/null 2>&1 || { echo "python3 is required for the tests"; exit 1; }
  if ! command -v st >/dev/null 2>&1; then
    echo "installing: schemathesis (PyPI)"
    python3 -m pip install -q --disable-pip-version-check "schemathesis==4.32.5" 2>&1 \
      | grep -v "Running pip as the 'root' user" || true
    command -v st >/dev/null 2>&1 || { echo "schemathesis did not install (st not on PATH)"; exit 1; }
  fi
  if ! python3 -c "import grpc, websockets, opentelemetry.proto, playwright, jwt, cryptography" >/dev/null 2>&1; then
    echo "installing: grpcio websockets opentelemetry-proto playwright pyjwt[crypto] (PyPI)"
    python3 -m pip install -q --disable-pip-version-check \
      "grpcio==1.85.1" "websockets==17.4" "opentelemetry-proto==1.28.0" "playwright==1.49.1" \
      "pyjwt[crypto]==2.10.1" 2>&1 \
      | grep -v "Running pip as the 'root' user" || true
    python3 -c "import grpc, websockets, opentelemetry.proto, playwright, jwt, cryptography"
  fi
  # The packaging check (scripts/check-packaging.sh): Kubernetes manifests
  # validated offline against the schemas this package bundles.
  if [ "$(kubernetes-validate --version 2>/dev/null)" != "1.37.0" ]; then
    echo "installing: kubernetes-validate (PyPI)"
    python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==1.37.0" 2>&1 \
      | grep -v "Running pip as the 'root' user" || true
    command -v kubernetes-validate >/dev/null 2>&1 || { echo "kubernetes-validate did not install (not on PATH)"; exit 1; }
  fi
  # ... and the Debian package, built with cargo-deb.
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb (crates.io)"
    cargo install cargo-deb --locked --version 3.8.0 --quiet
  fi
fi
