#!/usr/bin/env bash
# Checks the packaging in deploy/ (deploy/README.md), on this machine:
#
#  1. every YAML file in deploy/ parses, and so does every node config
#     embedded in a Kubernetes ConfigMap; the maintainer scripts parse;
#  2. every document of every Kubernetes manifest validates offline
#     (kubernetes-validate, strict: unknown fields refused) against the
#     oldest and the newest Kubernetes version we support, and a broken
#     manifest (a string for replicas, an unknown field, an unknown kind)
#     is refused, so this check can fail;
#  3. the Debian package builds with cargo-deb from the debug binaries
#     (target/debug: run `cargo build --workspace --bins` first) and holds
#     the binaries, units, conffiles and docs;
#  4. it installs with dpkg: the meshgate system user exists, nothing was
#     started, `systemd-analyze verify` has nothing to say about the units;
#  5. the installed binaries run as that user: a standalone gateway on the
#     installed example answers /readyz 200 and its ingress; every
#     installed node config (and every one in the Kubernetes ConfigMaps) is
#     accepted by its binary, which gets ready (/readyz 200; the admin:
#     /healthz) against a throwaway etcd and exits 0 on SIGTERM (listen
#     addresses moved to free 127.0.0.1 ports, etcd's to the throwaway's);
#     with the systemd units' configs, the units' ExecReload (`<binary>
#     upgrade --config <file>`) hands over to a new process, and the old
#     one exits 0; every binary's --help works;
#  6. `dpkg --purge` removes the binaries, units, configs and the user.
#
# It installs and purges the `meshgate` package for real (root needed): run
# it on a throwaway machine, as CI does. Traffic goes to 127.0.0.1 only.
# Needs kubernetes-validate, cargo-deb, systemd-analyze, dpkg, curl and
# python3 with PyYAML, etcd (scripts/deps.sh --test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

# Kubernetes versions the manifests must validate against (the oldest we
# support: native sidecars and the preStop sleep action are in 1.30's API).
K8S_VERSIONS=(1.30.0 1.37.0)
# The cargo profile whose binaries are packaged: dev (target/debug, what
# the test suite builds) unless told otherwise (release: target/release).
PROFILE=${MESHGATE_PACKAGING_PROFILE:-dev}
case "$PROFILE" in
  dev) bindir=target/debug ;;
  *) bindir=target/$PROFILE ;;
esac
# How long a process may take to answer, and to exit after SIGTERM.
START_DEADLINE_S=${START_DEADLINE_S:-30}
STOP_DEADLINE_S=${STOP_DEADLINE_S:-40}

step() { printf '\n== check-packaging: %s\n' "$*"; }
ok() { printf '   ok: %s\n' "$*"; }
fail() {
  printf '\ncheck-packaging: FAIL: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- needs
[ "$(id -u)" -eq 0 ] || fail "run as root: it installs and purges the meshgate package with dpkg"
for tool in python3 curl dpkg dpkg-deb systemd-analyze setpriv kubernetes-validate etcd; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is missing (scripts/deps.sh --test installs it)"
done
cargo deb --version >/dev/null 2>&1 || fail "cargo-deb is missing (scripts/deps.sh --test installs it)"
python3 -c 'import yaml' 2>/dev/null || fail "PyYAML is missing (it comes with kubernetes-validate)"
for bin in meshgate-gateway lite-sidecar meshgate-admin meshctl; do
  [ -x "$bindir/$bin" ] || fail "$bindir/$bin is missing: run cargo build --workspace --bins first (profile $PROFILE)"
done

work=$(mktemp -d /tmp/meshgate-packaging.XXXXXX)
chmod 755 "$work"
pids=()

# Kills what this script started (by pid), purges the package, removes the
# temporary directory: on success, failure or interruption alike.
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Anything else running as the package's user was started by this
  # check (a successor whose pid a failed upgrade never reported).
  if getent passwd meshgate >/dev/null; then
    pkill -TERM -u meshgate 2>/dev/null || true
    for _ in $(seq 50); do pgrep -u meshgate >/dev/null || break; sleep 0.1; done
    pkill -KILL -u meshgate 2>/dev/null || true
  fi
  if dpkg-query -W -f='${Status}' meshgate 2>/dev/null | grep -q 'installed\|config-files\|half'; then
    echo "check-packaging: cleaning up: dpkg --purge meshgate" >&2
    dpkg --purge meshgate >"$work/purge-cleanup.log" 2>&1 \
      || { echo "check-packaging: dpkg --purge meshgate failed:" >&2; cat "$work/purge-cleanup.log" >&2; }
  fi
  rm -rf "$work"
  # cargo-deb's stripped copies of the binaries (see below).
  rm -f target/meshgate-gateway/*.stripped-*.tmp
  rmdir target/meshgate-gateway 2>/dev/null || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# N distinct free ports on 127.0.0.1.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_http URL PID LOG: until URL answers 200, while PID runs, within the
# deadline.
wait_http() {
  local url=$1 pid=$2 log=$3 code=000
  local deadline=$(($(date +%s) + START_DEADLINE_S))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "--- $log" >&2
      tail -n 30 "$log" >&2 || true
      fail "the process exited before $url answered 200"
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
    [ "$code" = 200 ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "--- $log" >&2
      tail -n 30 "$log" >&2 || true
      fail "$url did not answer 200 within ${START_DEADLINE_S}s (last status: $code)"
    fi
    sleep 0.2
  done
}

# forget PID: it has exited (and was waited for); cleanup need not kill it.
forget() {
  local kept=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  pids=("${kept[@]}")
}

# wait_exit PID LOG: waits (with a deadline) for PID, a child of this
# script, to exit, and requires exit status 0.
wait_exit() {
  local pid=$1 log=$2 rc=0
  local deadline=$(($(date +%s) + STOP_DEADLINE_S))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      echo "--- $log" >&2
      tail -n 30 "$log" >&2 || true
      fail "pid $pid did not exit within ${STOP_DEADLINE_S}s"
    fi
    sleep 0.2
  done
  wait "$pid" || rc=$?
  forget "$pid"
  if [ "$rc" -ne 0 ]; then
    echo "--- $log" >&2
    tail -n 30 "$log" >&2 || true
    fail "pid $pid exited $rc (expected 0)"
  fi
}

# stop PID LOG: SIGTERM to a child of this script; it must exit 0.
stop() {
  kill -TERM "$1"
  wait_exit "$1" "$2"
}

# stop_adopted PID: SIGTERM to a process this script did not start itself
# (a hot upgrade's successor, whose parent has exited); it must be gone
# within the deadline (its exit status is not ours to read).
stop_adopted() {
  local pid=$1
  kill -TERM "$pid"
  local deadline=$(($(date +%s) + STOP_DEADLINE_S))
  while kill -0 "$pid" 2>/dev/null; do
    # Exited, not yet reaped by its new parent: gone as far as we care.
    [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      fail "pid $pid did not exit within ${STOP_DEADLINE_S}s of SIGTERM"
    fi
    sleep 0.2
  done
  forget "$pid"
}

# "${as_meshgate[@]}" CMD...: runs CMD as the package's system user
# (setpriv execs CMD: $! of a background run is CMD's own pid).
as_meshgate=(setpriv --reuid=meshgate --regid=meshgate --clear-groups --)

# ------------------------------------------------- 1. YAML and scripts
step "YAML files parse; maintainer scripts parse"
python3 - "$work/configs" <<'PY'
import glob, os, sys, yaml
out = sys.argv[1]
os.makedirs(out)
files = sorted(glob.glob("deploy/**/*.yaml", recursive=True) + glob.glob("deploy/**/*.yml", recursive=True))
bad = []
embedded = 0
for f in files:
    try:
        docs = [d for d in yaml.safe_load_all(open(f)) if d is not None]
    except yaml.YAMLError as e:
        bad.append(f"{f}: {e}")
        continue
    # Node configs inside ConfigMaps: parse them too, and keep them for the
    # binaries' check below.
    for d in docs:
        if not (isinstance(d, dict) and d.get("kind") == "ConfigMap"):
            continue
        for key, text in (d.get("data") or {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            where = f"{f}: ConfigMap {d['metadata']['name']}: {key}"
            try:
                cfg = yaml.safe_load(text)
            except yaml.YAMLError as e:
                bad.append(f"{where}: {e}")
                continue
            if not isinstance(cfg, dict):
                bad.append(f"{where}: not a mapping")
                continue
            name = f"k8s-{d['metadata']['name']}-{key}"
            with open(os.path.join(out, name), "w") as fh:
                fh.write(text)
            embedded += 1
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
print(f"   ok: {len(files)} YAML files, {embedded} node configs embedded in ConfigMaps")
PY
for script in deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm; do
  [ -x "$script" ] || fail "$script is not executable"
  sh -n "$script" || fail "$script: shell syntax error"
done
ok "maintainer scripts"

# ------------------------------------------ 2. Kubernetes manifests
# validate_manifest FILE: every document passes for every version; a
# missing schema (unknown kind or apiVersion: only a warning from the
# tool) counts as a failure.
validate_manifest() {
  local file=$1 out docs passed rc=0
  docs=$(python3 -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$file")
  [ "$docs" -gt 0 ] || { echo "$file: no document"; return 1; }
  local args=()
  local v
  for v in "${K8S_VERSIONS[@]}"; do args+=(-k "$v"); done
  out=$(kubernetes-validate --strict "${args[@]}" "$file" 2>&1) || rc=$?
  passed=$(grep -c '^INFO .* passed for resource' <<<"$out" || true)
  if [ "$rc" -ne 0 ] || grep -q '^\(ERROR\|WARN\|FATAL\)' <<<"$out" \
    || [ "$passed" -ne $((docs * ${#K8S_VERSIONS[@]})) ]; then
    grep -v '^INFO' <<<"$out" || true
    echo "$file: $passed of $((docs * ${#K8S_VERSIONS[@]})) document validations passed"
    return 1
  fi
  return 0
}

step "Kubernetes manifests validate (kubernetes-validate $(kubernetes-validate --version), strict, k8s ${K8S_VERSIONS[*]})"
manifests=(deploy/k8s/*.yaml)
[ "${#manifests[@]}" -gt 0 ] && [ -e "${manifests[0]}" ] || fail "no manifest in deploy/k8s/"
failed=0
for m in "${manifests[@]}"; do
  if validate_manifest "$m" >"$work/validate.out" 2>&1; then
    ok "$m"
  else
    cat "$work/validate.out" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || fail "Kubernetes manifests do not validate (above)"

# The check must be able to fail: three broken manifests, each refused.
mkdir -p "$work/broken"
cat >"$work/broken/replicas-string.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: broken}
spec:
  replicas: "two"
  selector: {matchLabels: {app: broken}}
  template:
    metadata: {labels: {app: broken}}
    spec:
      containers: [{name: c, image: busybox:1.37.0}]
EOF
cat >"$work/broken/unknown-field.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: broken}
spec:
  selector: {app: broken}
  portz: [{port: 80}]
EOF
cat >"$work/broken/unknown-kind.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deploymnet
metadata: {name: broken}
spec: {}
EOF
for m in "$work"/broken/*.yaml; do
  if validate_manifest "$m" >/dev/null 2>&1; then
    fail "the broken manifest $(basename "$m") passed validation: the manifest check cannot fail"
  fi
done
ok "3 broken manifests refused (replicas: \"two\", an unknown field, an unknown kind)"

# ------------------------------------------------ 3. the Debian package
step "cargo deb (profile $PROFILE: the binaries in $bindir, --no-build)"
# cargo-deb warns that the dev profile is meant for releases only: this
# packages the binaries the test suite just built, to test the packaging.
if ! cargo deb -p meshgate-gateway --no-build --profile "$PROFILE" --fast -o "$work/" >"$work/cargo-deb.log" 2>&1; then
  cat "$work/cargo-deb.log" >&2
  fail "cargo deb failed"
fi
deb=$(find "$work" -maxdepth 1 -name 'meshgate_*.deb' | head -n 1)
[ -n "$deb" ] || { cat "$work/cargo-deb.log" >&2; fail "cargo deb made no meshgate_*.deb"; }
# cargo-deb leaves its stripped copies of the binaries behind (in
# target/<crate>/): over 100 MB of them with the dev profile.
rm -f target/meshgate-gateway/*.stripped-*.tmp
rmdir target/meshgate-gateway 2>/dev/null || true
ok "$(basename "$deb") ($(du -h "$deb" | cut -f1))"
dpkg-deb -c "$deb" | awk '{print $NF}' | sed 's#^\./#/#' >"$work/deb-files"
for f in /usr/bin/meshgate-gateway /usr/bin/meshgate-sidecar /usr/bin/meshgate-admin /usr/bin/meshctl \
  /lib/systemd/system/meshgate-gateway.service /lib/systemd/system/meshgate-sidecar.service \
  /lib/systemd/system/meshgate-admin.service /etc/meshgate/gateway.yaml /etc/meshgate/sidecar.yaml \
  /etc/meshgate/admin.yaml /usr/share/meshgate/examples/mesh.yaml /usr/share/doc/meshgate/deploy.md \
  /usr/share/doc/meshgate/configuration.md /usr/share/doc/meshgate/copyright; do
  grep -qx "$f" "$work/deb-files" || fail "the package lacks $f"
done
dpkg-deb -f "$deb" Package | grep -qx meshgate || fail "the package is not named meshgate"
mkdir -p "$work/control"
dpkg-deb -e "$deb" "$work/control"
printf '/etc/meshgate/admin.yaml\n/etc/meshgate/gateway.yaml\n/etc/meshgate/sidecar.yaml\n' >"$work/conffiles.want"
sort "$work/control/conffiles" | diff -u "$work/conffiles.want" - >&2 \
  || fail "the package's conffiles differ from the three node configs (above)"
ok "binaries, units, conffiles, example and docs in the package"

# ------------------------------------------------------- 4. install
step "dpkg -i"
if dpkg-query -W -f='${Status}' meshgate 2>/dev/null | grep -q 'installed\|config-files'; then
  echo "   note: meshgate was installed already (a run cut short?): purging it first"
  dpkg --purge meshgate >"$work/purge-before.log" 2>&1 || { cat "$work/purge-before.log" >&2; fail "dpkg --purge meshgate failed"; }
fi
if ! dpkg -i "$deb" >"$work/install.log" 2>&1; then
  cat "$work/install.log" >&2
  fail "dpkg -i failed"
fi
grep -q 'no service was started' "$work/install.log" || { cat "$work/install.log" >&2; fail "postinst printed no hint"; }
ok "installed $(dpkg-query -W -f='${Package} ${Version}' meshgate)"
getent passwd meshgate >/dev/null || fail "postinst did not create the user meshgate"
getent group meshgate >/dev/null || fail "postinst did not create the group meshgate"
uid=$(id -u meshgate)
[ "$uid" -lt 1000 ] || fail "meshgate is not a system user (uid $uid)"
case "$(getent passwd meshgate | cut -d: -f7)" in
  */nologin | */false) ;;
  *) fail "meshgate has a login shell" ;;
esac
ok "system user meshgate (uid $uid, group $(id -gn meshgate)), no login shell"
# Idempotent: configuring again changes nothing and does not fail.
dpkg-reconfigure meshgate >/dev/null 2>&1 || /var/lib/dpkg/info/meshgate.postinst configure >/dev/null \
  || fail "postinst configure failed when run a second time"
ok "postinst runs again without harm"
if [ -d /run/systemd/system ]; then
  for unit in meshgate-gateway meshgate-sidecar meshgate-admin; do
    ! systemctl is-active --quiet "$unit" || fail "$unit was started by the installation"
    ! systemctl is-enabled --quiet "$unit" 2>/dev/null || fail "$unit was enabled by the installation"
  done
  ok "no unit started or enabled"
fi

step "systemd-analyze verify"
units=(/lib/systemd/system/meshgate-gateway.service /lib/systemd/system/meshgate-sidecar.service
  /lib/systemd/system/meshgate-admin.service)
verify_rc=0
systemd-analyze verify "${units[@]}" >"$work/verify.log" 2>&1 || verify_rc=$?
if grep -q 'meshgate' "$work/verify.log"; then
  cat "$work/verify.log" >&2
  fail "systemd-analyze verify: findings about the units (above; exit $verify_rc)"
fi
if [ "$verify_rc" -ne 0 ]; then
  # Nothing names our units: something else of this machine's systemd.
  echo "   note: systemd-analyze verify exited $verify_rc, about other units:"
  sed 's/^/     /' "$work/verify.log"
fi
ok "no finding about the units"
for u in "${units[@]}"; do
  # Informative: the sandbox's exposure score (0 best, 10 worst).
  score=$(systemd-analyze security --offline=true "$u" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: *//p' || true)
  ok "$(basename "$u"): exposure ${score:-?}"
done

# --------------------------------------------- 5. installed binaries
step "installed binaries: --help"
for bin in meshgate-gateway meshgate-sidecar meshgate-admin meshctl; do
  "${as_meshgate[@]}" "/usr/bin/$bin" --help >"$work/help.out" 2>&1 || { cat "$work/help.out" >&2; fail "/usr/bin/$bin --help failed"; }
  ok "/usr/bin/$bin --help"
done

step "standalone gateway on the installed example, as meshgate"
mkdir -p "$work/standalone"
cp /usr/share/meshgate/examples/mesh.yaml "$work/standalone/mesh.yaml"
chown -R meshgate:meshgate "$work/standalone"
log="$work/standalone/gateway.log"
for _attempt in 1 2 3; do
  read -r mesh_port ingress_port ops_port < <(free_ports 3)
  "${as_meshgate[@]}" /usr/bin/meshgate-gateway --standalone "$work/standalone/mesh.yaml" \
    --listen "127.0.0.1:$mesh_port" --ingress-listen "127.0.0.1:$ingress_port" \
    --admin-listen "127.0.0.1:$ops_port" >"$log" 2>&1 &
  gw_pid=$!
  pids+=("$gw_pid")
  for _ in $(seq 20); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
  # A port found free was taken meanwhile (by another test): new ports.
  if ! kill -0 "$gw_pid" 2>/dev/null && grep -q 'Address already in use' "$log"; then
    wait "$gw_pid" || true
    forget "$gw_pid"
    continue
  fi
  break
done
wait_http "http://127.0.0.1:$ops_port/readyz" "$gw_pid" "$log"
ok "/readyz 200 (ops port 127.0.0.1:$ops_port)"
body=$(curl -s --max-time 5 "http://127.0.0.1:$ingress_port/")
[ "$body" = "Meshgate is running." ] || fail "the ingress answered '$body', not the example's direct response"
ok "ingress answers the example's route"
stop "$gw_pid" "$log"
ok "exited 0 on SIGTERM"

# Every node config the packaging ships, run by its binary: the installed
# ones and those in the Kubernetes ConfigMaps. Addresses are moved to free
# 127.0.0.1 ports (etcd's to the throwaway etcd), paths to a temporary
# directory, placeholders filled in; the rest is as shipped.
step "shipped node configs are accepted by the installed binaries"
# A throwaway etcd on 127.0.0.1, empty: the processes apply its (empty)
# config and become ready, as on a fresh cluster.
read -r etcd_port etcd_peer_port < <(free_ports 2)
etcd_url="http://127.0.0.1:$etcd_port"
etcd --name packaging --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "packaging=http://127.0.0.1:$etcd_peer_port" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
pids+=("$etcd_pid")
wait_http "$etcd_url/health" "$etcd_pid" "$work/etcd.log"
ok "etcd for the check on $etcd_url"
mkdir -p "$work/nodes"
cp /etc/meshgate/gateway.yaml "$work/nodes/etc-gateway.yaml"
cp /etc/meshgate/sidecar.yaml "$work/nodes/etc-sidecar.yaml"
cp /etc/meshgate/admin.yaml "$work/nodes/etc-admin.yaml"
cp "$work"/configs/k8s-*.yaml "$work/nodes/"
chown -R meshgate:meshgate "$work/nodes"

# rewrite FILE: prints "KIND READY_URL" and rewrites FILE in place.
rewrite() {
  ETCD_URL=$etcd_url python3 - "$@" <<'PY'
import os, socket, sys, yaml
path = sys.argv[1]
text = open(path).read()
text = (text.replace("__POD_NAME__", "pod-1").replace("__POD_IP__", "127.0.0.1")
            .replace("__NODE_NAME__", "node-1"))
cfg = yaml.safe_load(text)
socks = []
def free():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
    return f"127.0.0.1:{s.getsockname()[1]}"
if "roles" in cfg:
    kind = "gateway"
elif "service" in cfg and "group" in cfg:
    kind = "sidecar"
else:
    kind = "admin"
for key in ("listen", "ingress_listen", "admin_listen"):
    if key in cfg:
        cfg[key] = free()
if "advertise" in cfg:
    cfg["advertise"] = cfg["listen"]
if "central" in cfg:
    cfg["central"] = [free()]
if isinstance(cfg.get("app"), dict) and "address" in cfg["app"]:
    cfg["app"]["address"] = free()
cfg["store"]["etcd"]["endpoints"] = [os.environ["ETCD_URL"]]
base = os.path.splitext(path)[0]
if "snapshot_file" in cfg:
    cfg["snapshot_file"] = base + ".snapshot.json"
if "upgrade_socket" in cfg:
    cfg["upgrade_socket"] = base + ".sock"
for key in ("token_file",):
    if key in cfg:
        # The admin in Kubernetes reads a Secret's token file: make one.
        tokens = base + ".tokens.yaml"
        with open(tokens, "w") as fh:
            yaml.safe_dump({"tokens": [{"name": "check", "token": "check-packaging-token-0123456789", "role": "admin"}]}, fh)
        os.chmod(tokens, 0o600)
        cfg[key] = tokens
with open(path, "w") as fh:
    yaml.safe_dump(cfg, fh, sort_keys=False)
# Gateways and sidecars: ready (config applied); the admin: serving.
if kind == "admin":
    print(kind, f"http://{cfg['listen']}/healthz")
else:
    print(kind, f"http://{cfg['admin_listen']}/readyz")
PY
}

for cfg in "$work"/nodes/*.yaml; do
  case "$cfg" in *.tokens.yaml) continue ;; esac
  kind="" health=""
  read -r kind health < <(rewrite "$cfg") || true
  [ -n "$kind" ] && [ -n "$health" ] || fail "could not rewrite $(basename "$cfg") for the check"
  bin=/usr/bin/meshgate-$kind
  name=$(basename "$cfg")
  for _attempt in 1 2 3 4 5; do
    chown meshgate:meshgate "$work"/nodes/*
    log="$work/nodes/$name.log"
    "${as_meshgate[@]}" "$bin" --config "$cfg" >"$log" 2>&1 &
    pid=$!
    pids+=("$pid")
    # A refused config exits 2 at once; give it a moment to do so.
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      break
    fi
    rc=0
    wait "$pid" || rc=$?
    forget "$pid"
    # A port found free was taken meanwhile (by another test): new ports.
    if grep -q 'Address already in use' "$log"; then
      read -r kind health < <(rewrite "$cfg") || true
      continue
    fi
    cat "$log" >&2
    fail "$bin refused $name (exit $rc; the shipped config: see deploy/)"
  done
  wait_http "$health" "$pid" "$log"
  # With an upgrade_socket (the configs of the systemd units): what
  # `systemctl reload` runs, the unit's ExecReload. The successor must
  # serve, the old process exit 0.
  if grep -q '^upgrade_socket:' "$cfg"; then
    out=$(timeout 150 "${as_meshgate[@]}" "$bin" upgrade --config "$cfg" 2>&1) || {
      echo "$out" >&2
      echo "--- $log" >&2
      tail -n 30 "$log" >&2 || true
      fail "$bin upgrade --config $name (the unit's ExecReload) failed"
    }
    new_pid=$(sed -n 's/.*process \([0-9][0-9]*\) serves.*/\1/p' <<<"$out" | head -n 1)
    [ -n "$new_pid" ] && [ "$new_pid" != "$pid" ] \
      || fail "$bin upgrade said '$out': no new process id in it"
    pids+=("$new_pid")
    wait_exit "$pid" "$log"
    wait_http "$health" "$new_pid" "$log"
    ok "$name: $bin upgrade (ExecReload): process $new_pid took over, $pid drained and exited 0"
    stop_adopted "$new_pid"
    stopped="its successor stopped on SIGTERM"
  else
    stop "$pid" "$log"
    stopped="exited 0 on SIGTERM"
  fi
  ok "$name: $bin got ready, $stopped"
done

kill -TERM "$etcd_pid"
wait "$etcd_pid" 2>/dev/null || true
forget "$etcd_pid"

# ---------------------------------------------------------- 6. purge
step "dpkg --purge"
if ! dpkg --purge meshgate >"$work/purge.log" 2>&1; then
  cat "$work/purge.log" >&2
  fail "dpkg --purge meshgate failed"
fi
for f in /usr/bin/meshgate-gateway /usr/bin/meshgate-sidecar /usr/bin/meshgate-admin /usr/bin/meshctl \
  /lib/systemd/system/meshgate-gateway.service /lib/systemd/system/meshgate-sidecar.service \
  /lib/systemd/system/meshgate-admin.service /etc/meshgate /usr/share/meshgate /usr/share/doc/meshgate \
  /var/lib/meshgate; do
  [ ! -e "$f" ] || fail "$f is still there after the purge"
done
! getent passwd meshgate >/dev/null || fail "the user meshgate is still there after the purge"
! getent group meshgate >/dev/null || fail "the group meshgate is still there after the purge"
ok "binaries, units, configs, user and group gone"

printf '\ncheck-packaging: all checks passed in %ss\n' "$(($(date +%s) - started))"
