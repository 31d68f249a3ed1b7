#!/usr/bin/env bash
# Installs the system packages Meshgate needs to build and test, when missing
# (Debian packages; run as root or with sudo available).
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${1:-}" = "--test" ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
