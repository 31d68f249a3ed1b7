#!/usr/bin/env python3
"""Meshgate benchmark suite: the gateway against nginx and HAProxy.

Every target runs on 127.0.0.1 with one worker pinned to the same core
(the "proxy core", shared with the nginx backend, as a sidecar shares a
host with its app); the load generators run pinned to the other core.
Runs are interleaved (every repetition goes through all targets in a fresh
random order) so machine drift hits every target alike; tables report
medians over the repetitions and each target's ratio to nginx.

Scenarios: HTTP/1.1 max throughput (wrk, 10 and 50 connections) with CPU
time per request read from /proc; latency at 25/50/75 % of nginx's
maximum (meshgate-load, open loop, latency from the intended send time);
HTTP/2 (h2load); the two-hop mesh path app -> lite-sidecar -> gateway ->
backend against direct and one nginx hop; RSS idle and under load;
config propagation (200 route changes through the admin API, applied on
3 gateways, timed with each gateway's /config/revision long-poll); and
route-table scale (meshgate-routebench, 50,000 routes).

Run through loadtest/run.sh (installs the tools, builds release binaries).
Results go between the markers in BENCHMARKS.md; the text around them is
kept. Uses only the Python standard library.
"""

import argparse
import base64
import concurrent.futures
import datetime
import hashlib
import hmac
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import ssl
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MESHGATE_BENCH_BIN", os.path.join(ROOT, "target", "release"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BEGIN = "<!-- results:begin (written by loadtest/bench.py; edits here are overwritten) -->"
END = "<!-- results:end -->"


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, fn, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def http(method, url, body=None, headers=None, timeout=10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_ok(url):
    try:
        return http("GET", url, timeout=1.0)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def https_ok(url):
    """A 200 over TLS, the certificate not checked (the bench's own)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=ctx) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


class Procs:
    """Started processes, stopped at exit."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.procs = []

    def start(self, name, cmd, cpu=None, env=None):
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu)] + cmd
        logf = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                             env={**os.environ, **(env or {})}, cwd=self.workdir,
                             start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def mem_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_response(s):
    """Reads one HTTP/1.1 response with a content-length from socket s."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed before a response head")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"unexpected answer: {head[:40]!r}")
    length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            raise OSError("closed inside a response body")
        body += chunk


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


class Bench:
    def __init__(self, args):
        self.args = args
        self.ncpu = os.cpu_count() or 1
        self.proxy_cpu = args.proxy_cpu
        self.load_cpu = args.load_cpu if self.ncpu > 1 else args.proxy_cpu
        self.workdir = tempfile.mkdtemp(prefix="meshgate-bench-")
        self.procs = Procs(self.workdir)
        self.results = {}
        self.commands = []

    # ---------------------------------------------------------- targets

    def write(self, name, text):
        path = os.path.join(self.workdir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start_backend(self):
        self.backend_port = free_port()
        self.backend_status_port = free_port()
        self.backend_h2_port = free_port()
        conf = self.write("backend.conf", f"""
worker_processes 1;
daemon off;
pid {self.workdir}/backend.pid;
error_log {self.workdir}/backend.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{self.backend_status_port};
    location / {{ stub_status; }}
  }}
  http2_max_concurrent_streams 128;
  server {{
    listen 127.0.0.1:{self.backend_port};
    listen 127.0.0.1:{self.backend_h2_port} http2;
    location / {{ return 200 "hello from the backend\\n"; }}
    location /p/cache {{ add_header Cache-Control "max-age=3600"; return 200 "hello from the backend\\n"; }}
  }}
}}
""")
        self.backend = self.procs.start("nginx-backend", ["nginx", "-p", self.workdir, "-c", conf],
                                        cpu=self.proxy_cpu)
        wait_until("nginx backend", lambda: http_ok(f"http://127.0.0.1:{self.backend_port}/"))

    def backend_accepts(self):
        """Connections the backend has accepted so far (its stub_status),
        this read's own included."""
        body = http("GET", f"http://127.0.0.1:{self.backend_status_port}/")[1].decode()
        return int(re.search(r"server accepts handled requests\s+(\d+)", body).group(1))

    def nginx_proxy(self, name, listens, upstream_port, server_extra="", ready=None):
        """An nginx reverse proxy (one worker, pinned) to 127.0.0.1:upstream_port."""
        listen = "\n".join(f"    listen 127.0.0.1:{x};" for x in listens)
        listen += server_extra
        conf = self.write(f"{name}.conf", f"""
worker_processes 1;
daemon off;
pid {self.workdir}/{name}.pid;
error_log {self.workdir}/{name}.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  upstream next {{
    server 127.0.0.1:{upstream_port};
    keepalive 512;
    keepalive_requests 10000000;
  }}
  server {{
{listen}
    location / {{
      proxy_pass http://next;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""")
        p = self.procs.start(name, ["nginx", "-p", self.workdir, "-c", conf], cpu=self.proxy_cpu)
        wait_until(name, ready or (lambda: http_ok(f"http://127.0.0.1:{listens[0].split()[0]}/")))
        return lambda: children(p.pid)

    def start_nginx(self):
        port, h2 = free_port(), free_port()
        self.nginx_pids = self.nginx_proxy("nginx-proxy", [str(port), f"{h2} http2"], self.backend_port)
        return {"name": "nginx", "port": port, "h2_port": h2, "pids": self.nginx_pids}

    def start_nginx_chain(self, upstream_port):
        """A second nginx in front of the first: the two-hop nginx baseline."""
        port = free_port()
        front = self.nginx_proxy("nginx-front", [str(port)], upstream_port)
        first = self.nginx_pids
        return {"name": "nginx two-hop", "port": port, "pids": lambda: front() + first()}

    def start_haproxy_h2_upstream(self):
        """HAProxy speaking HTTP/2 (h2c) to the backend."""
        port = free_port()
        conf = self.write("haproxy-h2up.cfg", f"""
global
  nbthread 1
  maxconn 9900
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port} proto h2
  default_backend be
backend be
  server s1 127.0.0.1:{self.backend_h2_port} proto h2
""")
        p = self.procs.start("haproxy-h2up", ["haproxy", "-f", conf], cpu=self.proxy_cpu)
        wait_until("haproxy-h2up", lambda: subprocess.run(
            ["curl", "-sf", "--http2-prior-knowledge", "-o", "/dev/null", f"http://127.0.0.1:{port}/"]).returncode == 0)
        return {"name": "haproxy", "port": port, "h2_port": port, "pids": lambda: [p.pid]}

    def h2_upstream(self, _targets=None):
        """HTTP/2 to the upstream: HAProxy and the gateway speaking h2c to
        the backend (nginx, 128 streams per connection), against the
        gateway speaking HTTP/1.1 to it; HTTP/2 clients throughout."""
        d = self.args.duration
        hp = self.start_haproxy_h2_upstream()
        mg2 = self.start_meshgate(h2_upstream=True, name="meshgate-h2up")
        mg2["name"] = "meshgate (h2 upstream)"
        mg1 = self.mg if hasattr(self, "mg") else self.start_meshgate(name="meshgate-h1up")
        mg1 = dict(mg1, name="meshgate (HTTP/1.1 upstream)")
        targets = [dict(hp, name="haproxy (h2 upstream)"), mg2, mg1]
        for c, m in ((10, 10), (50, 10)):
            log(f"HTTP/2 upstream: h2load {c} connections x {m} streams")
            self.note_cmd(f"taskset -c {self.load_cpu} h2load -t1 -c{c} -m{m} -D{d} http://127.0.0.1:<port>/  (h2 upstream)")
            self.results[f"h2_upstream_{c}_{m}"] = self.interleaved(targets, lambda t: self.measured(
                t, lambda: self.h2load(self.url(t, "h2_port"), c, m, d)))

    def uring(self, _targets=None):
        """The io_uring decision (issue 20): one minimal HTTP/1.1 proxy
        (meshgate-uringproto) on epoll and on io_uring, CPU per request
        under wrk at 10 and 50 connections."""
        d = self.args.duration
        targets = []
        for mode in ("epoll", "uring"):
            port = free_port()
            p = self.procs.start(f"uringproto-{mode}", [
                os.path.join(BIN, "meshgate-uringproto"), "--mode", mode, "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{self.backend_port}"], cpu=self.proxy_cpu)
            wait_until(f"uringproto {mode}", lambda: http_ok(f"http://127.0.0.1:{port}/"))
            targets.append({"name": mode, "port": port, "pids": lambda p=p: [p.pid]})
        for conns in (10, 50):
            log(f"io_uring prototype: wrk {conns} connections")
            self.note_cmd(f"meshgate-uringproto --mode epoll|uring ...; taskset -c {self.load_cpu} wrk -t1 -c{conns} "
                          f"-d{d}s http://127.0.0.1:<port>/")
            self.results[f"uring_{conns}"] = self.interleaved(
                targets, lambda t: self.measured(t, lambda: self.wrk(self.url(t), conns, d)))

    def start_haproxy(self):
        port, h2 = free_port(), free_port()
        conf = self.write("haproxy.cfg", f"""
global
  nbthread 1
  maxconn 9900
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2} proto h2
  default_backend be
backend be
  server s1 127.0.0.1:{self.backend_port}
""")
        p = self.procs.start("haproxy", ["haproxy", "-f", conf], cpu=self.proxy_cpu)
        wait_until("haproxy", lambda: http_ok(f"http://127.0.0.1:{port}/"))
        return {"name": "haproxy", "port": port, "h2_port": h2, "pids": lambda: [p.pid]}

    def start_meshgate(self, extra_model="", tls=False, extra_args=(), name=None, extra_routes="", h2_upstream=False):
        """A standalone gateway on the demo config plus the bench route (and
        a TLS ingress listener serving `extra_model`'s certificate);
        `extra_args` are added to its command line. `h2_upstream`: the bench
        service speaks HTTP/2 (h2c) to the backend."""
        with open(os.path.join(ROOT, "config", "examples", "demo.yaml")) as f:
            demo = f.read()
        if h2_upstream:
            bench_service = (f"  bench-backend:\n    protocol: http2\n    endpoints:\n"
                             f"      - address: 127.0.0.1:{self.backend_h2_port}\n")
        else:
            bench_service = f"  bench-backend:\n    endpoints:\n      - address: 127.0.0.1:{self.backend_port}\n"
        bench_route = ("  bench:\n    scope: ingress\n    match:\n      path:\n        prefix: /\n"
                       "    priority: -1\n    backends:\n      - service: bench-backend\n")
        model = demo.replace("services:\n", "services:\n" + bench_service, 1)
        model = model.replace("routes:\n", "routes:\n" + bench_route + extra_routes, 1) + extra_model
        # The demo's exact "/" status route would answer the bench's GET /.
        path = "/bench"
        name = name or ("meshgate-tls" if tls else "meshgate")
        # One file per gateway: a standalone gateway follows its file.
        mesh_yaml = self.write(f"{name}.yaml", model)
        port, mesh_port, ops, tls_port = free_port(), free_port(), free_port(), free_port()
        cmd = [os.path.join(BIN, "meshgate-gateway"), "--standalone", mesh_yaml, "--workers", "1",
               "--listen", f"127.0.0.1:{mesh_port}", "--ingress-listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{ops}"]
        if tls:
            cmd += ["--ingress-tls-listen", f"127.0.0.1:{tls_port}", "--default-cert", "bench"]
        cmd += list(extra_args)
        p = self.procs.start(name, cmd, cpu=self.proxy_cpu, env={"MESHGATE_LOG": "warn"})
        wait_until(name, lambda: http_ok(f"http://127.0.0.1:{port}{path}"))
        if tls:
            wait_until(f"{name} TLS", lambda: https_ok(f"https://127.0.0.1:{tls_port}{path}"))
        return {"name": "meshgate", "port": port, "h2_port": port, "pids": lambda: [p.pid],
                "path": path, "proc": p, "tls_port": tls_port, "ops": ops}

    # ---------------------------------------------------------- TLS targets

    # TLS 1.3 with the suite an OpenSSL client (wrk, s_time) prefers, which
    # rustls, following the client's order, picks too; nginx and HAProxy
    # are held to it, so all three do the same cipher work.
    TLS_SUITE = "TLS_AES_256_GCM_SHA384"

    def make_cert(self):
        """An ECDSA P-256 certificate for bench.test: (cert, key, both)."""
        key, crt = os.path.join(self.workdir, "tls.key"), os.path.join(self.workdir, "tls.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=bench.test",
                        "-addext", "subjectAltName=DNS:bench.test"], check=True, capture_output=True)
        with open(crt) as c, open(key) as k:
            cert_pem, key_pem = c.read(), k.read()
        both = self.write("tls.pem", cert_pem + key_pem)
        return {"crt": crt, "key": key, "pem": both, "cert_pem": cert_pem, "key_pem": key_pem}

    def start_tls_targets(self):
        cert = self.make_cert()
        targets = []
        port = free_port()
        extra = (f"\n    ssl_certificate {cert['crt']};\n    ssl_certificate_key {cert['key']};"
                 f"\n    ssl_protocols TLSv1.3;\n    ssl_conf_command Ciphersuites {self.TLS_SUITE};"
                 f"\n    ssl_session_cache shared:SSL:10m;")
        pids = self.nginx_proxy("nginx-tls", [f"{port} ssl"], self.backend_port, extra,
                                ready=lambda: https_ok(f"https://127.0.0.1:{port}/"))
        targets.append({"name": "nginx", "port": port, "pids": pids, "scheme": "https"})
        port = free_port()
        conf = self.write("haproxy-tls.cfg", f"""
global
  nbthread 1
  maxconn 4000
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port} ssl crt {cert['pem']} alpn http/1.1 ssl-min-ver TLSv1.3 ciphersuites {self.TLS_SUITE}
  default_backend be
backend be
  server s1 127.0.0.1:{self.backend_port}
""")
        p = self.procs.start("haproxy-tls", ["haproxy", "-f", conf], cpu=self.proxy_cpu)
        wait_until("haproxy-tls", lambda: https_ok(f"https://127.0.0.1:{port}/"))
        targets.append({"name": "haproxy", "port": port, "pids": lambda: [p.pid], "scheme": "https"})
        certs = json.dumps({"bench": {"certificate": cert["cert_pem"], "private_key": cert["key_pem"]}})
        mg = self.start_meshgate(extra_model=f"certs: {certs}\n", tls=True)
        targets.append(dict(mg, port=mg["tls_port"], scheme="https"))
        for t in targets:
            t["cipher"] = self.negotiated(t["port"])
        return targets

    def negotiated(self, port):
        """The protocol and suite an OpenSSL client gets from the target."""
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "bench.test"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        m = re.search(r"New, (\S+), Cipher is (\S+)", r.stdout)
        return f"{m.group(1)} {m.group(2)}" if m else "unknown"

    # ---------------------------------------------------------- tools

    def pinned(self, cmd):
        return ["taskset", "-c", str(self.load_cpu)] + cmd

    def wrk(self, url, conns, duration, headers=(), script=None):
        cmd = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s"]
        for h in headers:
            cmd += ["-H", h]
        if script:
            cmd += ["-s", script]
        cmd.append(url)
        out = subprocess.run(self.pinned(cmd), capture_output=True, text=True, check=True).stdout
        reqs = int(re.search(r"(\d+) requests in", out).group(1))
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        errors = 0
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if m:
            errors += int(m.group(1))
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if m:
            errors += sum(int(x) for x in m.groups())
        return {"requests": reqs, "rps": rps, "errors": errors}

    def h2load(self, url, conns, streams, duration):
        cmd = ["h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{duration}", url]
        out = subprocess.run(self.pinned(cmd), capture_output=True, text=True, check=True).stdout
        m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
        done, ok = int(m.group(2)), int(m.group(3))
        rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
        return {"requests": done, "rps": rps, "errors": done - ok}

    def load(self, url, conns, duration, rate=None, headers=()):
        cmd = [os.path.join(BIN, "meshgate-load"), "--json", "-c", str(conns), "-d", str(duration)]
        if rate:
            cmd += ["-r", str(rate)]
        for h in headers:
            cmd += ["-H", h]
        out = subprocess.run(self.pinned(cmd + [url]), capture_output=True, text=True, check=True).stdout
        r = json.loads(out)
        r.pop("failures", None)
        return r

    def measured(self, target, fn):
        """Runs fn() and adds the target's CPU time per request."""
        pids = target["pids"]()
        before = cpu_seconds(pids)
        r = fn()
        after = cpu_seconds(pids)
        if r["requests"]:
            r["cpu_us_per_req"] = (after - before) * 1e6 / r["requests"]
        return r

    def note_cmd(self, cmd):
        if cmd not in self.commands:
            self.commands.append(cmd)

    # ---------------------------------------------------------- scenarios

    def interleaved(self, targets, run_one):
        """{target: [result per repetition]}, targets shuffled per repetition."""
        out = {t["name"]: [] for t in targets}
        for rep in range(self.args.runs):
            order = list(targets)
            random.shuffle(order)
            for t in order:
                out[t["name"]].append(self.connects_counted(lambda: run_one(t)))
        return out

    def connects_counted(self, fn):
        """Runs fn() and adds the connections the backend accepted meanwhile
        (`upstream_connects`: the proxy's new upstream connections; for the
        `direct` target, the load generator's own)."""
        before = self.backend_accepts()
        r = fn()
        # The second read's own connection is not the run's.
        r["upstream_connects"] = self.backend_accepts() - before - 1
        return r

    def url(self, t, port_key="port"):
        return f"{t.get('scheme', 'http')}://127.0.0.1:{t[port_key]}{t.get('path', '/')}"

    def throughput(self, targets):
        d = self.args.duration
        for conns in (10, 50):
            log(f"throughput, HTTP/1.1, {conns} connections")
            self.note_cmd(f"taskset -c {self.load_cpu} wrk -t1 -c{conns} -d{d}s http://127.0.0.1:<port>/")
            res = self.interleaved(targets, lambda t: self.measured(t, lambda: self.wrk(self.url(t), conns, d)))
            self.results[f"throughput_{conns}"] = res

    def latency(self, targets):
        d = self.args.duration
        nginx_max = median([r["rps"] for r in self.results["throughput_50"]["nginx"]])
        self.results["nginx_max_rps"] = nginx_max
        for pct in (25, 50, 75):
            rate = round(nginx_max * pct / 100)
            log(f"latency at {pct}% of nginx's max ({rate} req/s)")
            self.note_cmd(f"taskset -c {self.load_cpu} meshgate-load --json -c 50 -d {d} -r <rate> http://127.0.0.1:<port>/")
            res = self.interleaved(targets, lambda t: self.load(self.url(t), 50, d, rate))
            self.results[f"latency_{pct}"] = {"rate": rate, "runs": res}

    # (connections, streams per connection) of the HTTP/2 rows.
    H2_SHAPES = ((10, 10), (50, 1), (50, 10))

    def http2(self, targets):
        d = self.args.duration
        for c, m in self.H2_SHAPES:
            log(f"HTTP/2 (h2c prior knowledge), {c} connections x {m} streams")
            self.note_cmd(f"taskset -c {self.load_cpu} h2load -t1 -c{c} -m{m} -D{d} http://127.0.0.1:<port>/")
            res = self.interleaved(targets, lambda t: self.measured(
                t, lambda: self.h2load(self.url(t, "h2_port"), c, m, d)))
            self.results[f"http2_{c}_{m}"] = res

    def idle_memory(self, targets):
        """Memory of idle keep-alive client connections: `--idle-conns`
        connections to each target, each answered once and then left idle.
        The proxy's RSS before, right after the last answer, and after
        `--idle-wait` seconds idle."""
        n, wait = self.args.idle_conns, self.args.idle_wait
        log(f"idle connections: {n} per target, RSS after {wait} s idle")
        self.note_cmd(f"bench.py idle_memory: {n} connections, one GET each, then idle {wait} s (RSS from /proc)")
        out = {}
        for t in targets:
            rss = lambda: sum(mem_kb(p, "VmRSS") for p in t["pids"]())
            path = t.get("path", "/")
            req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
            before = rss()
            socks = []
            try:
                for _ in range(n):
                    s = socket.create_connection(("127.0.0.1", t["port"]), timeout=10)
                    socks.append(s)
                    s.sendall(req)
                    read_response(s)
                hot = rss()
                time.sleep(wait)
                idle = rss()
                # Still open and served: each connection answers again.
                for s in socks[:: max(1, n // 100)]:
                    s.sendall(req)
                    read_response(s)
            finally:
                for s in socks:
                    s.close()
            out[t["name"]] = {"conns": n, "wait_s": wait, "before_kb": before, "hot_kb": hot, "idle_kb": idle}
        self.results["idle_memory"] = out

    def s_time(self, port, duration):
        """Full TLS handshakes, one after another (`openssl s_time -new`)."""
        cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time", str(duration)]
        out = subprocess.run(self.pinned(cmd), capture_output=True, text=True, check=True).stdout
        m = re.search(r"(\d+) connections in ([\d.]+)s;", out) or re.search(r"(\d+) connections in (\d+) real", out)
        n = int(m.group(1))
        return {"requests": n, "rps": n / float(m.group(2)), "errors": 0}

    def tls(self):
        """TLS termination at the ingress: keep-alive throughput and full
        handshakes, against nginx and HAProxy with the same certificate and
        suite."""
        if not hasattr(self, "backend_port"):
            self.start_backend()
        targets = self.start_tls_targets()
        d = self.args.duration
        out = {"ciphers": {t["name"]: t["cipher"] for t in targets}}
        log("TLS keep-alive, 50 connections (wrk over TLS)")
        self.note_cmd(f"taskset -c {self.load_cpu} wrk -t1 -c50 -d{d}s https://127.0.0.1:<port>/")
        out["keepalive"] = self.interleaved(
            targets, lambda t: self.measured(t, lambda: self.wrk(self.url(t), 50, d)))
        log("TLS full handshakes (openssl s_time -new)")
        self.note_cmd(f"taskset -c {self.load_cpu} openssl s_time -connect 127.0.0.1:<port> -new -time {d}")
        out["handshakes"] = self.interleaved(
            targets, lambda t: self.measured(t, lambda: self.s_time(t["port"], d)))
        self.results["tls"] = out

    def rss_sample(self, pid):
        # Resident memory: the peak (VmHWM), and now, split into the
        # process's own memory (RssAnon) and mapped file pages (RssFile:
        # the binary's code and data, shared with other processes).
        return {"rss_kb": mem_kb(pid, "VmRSS"), "hwm_kb": mem_kb(pid, "VmHWM"),
                "anon_kb": mem_kb(pid, "RssAnon"), "file_kb": mem_kb(pid, "RssFile")}

    # ---------------------------------------------------------- cluster

    def start_etcd(self):
        client, peer = free_port(), free_port()
        etcd = self.procs.start("etcd", [
            "etcd", "--name", "bench", "--data-dir", os.path.join(self.workdir, "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"bench=http://127.0.0.1:{peer}", "--log-level", "warn"],
            cpu=self.load_cpu)
        self.etcd_url = f"http://127.0.0.1:{client}"
        self.etcd = etcd
        wait_until("etcd", lambda: http_ok(f"{self.etcd_url}/health"))
        return etcd

    def start_admin(self):
        port = free_port()
        self.token = "bench-token-0123456789abcdef"
        tokens = self.write("tokens.yaml", f"tokens:\n  - name: bench\n    token: {self.token}\n    role: admin\n")
        cfg = self.write("admin.yaml", json.dumps({
            "listen": f"127.0.0.1:{port}", "token_file": tokens,
            "store": {"etcd": {"endpoints": [self.etcd_url], "timeout_ms": 2000}}}))
        self.procs.start("admin", [os.path.join(BIN, "meshgate-admin"), "--config", cfg],
                         cpu=self.load_cpu, env={"MESHGATE_LOG": "warn"})
        self.admin = f"http://127.0.0.1:{port}"
        # Up once it answers at all (401 without a token).
        wait_until("admin", lambda: http("GET", f"{self.admin}/api/v1/services", timeout=1.0)[0] == 401)

    def api(self, method, path, body=None):
        status, data = http(method, f"{self.admin}/api/v1{path}", body,
                            {"authorization": f"Bearer {self.token}"})
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data) if data else None

    def start_cluster_gateway(self, gid, groups, roles=("egress",), extra=None):
        mesh, ops = free_port(), free_port()
        cfg = self.write(f"{gid}.yaml", json.dumps({
            "id": gid, "roles": list(roles), "groups": groups, "workers": 1,
            "listen": f"127.0.0.1:{mesh}", "admin_listen": f"127.0.0.1:{ops}",
            "store": {"etcd": {"endpoints": [self.etcd_url], "timeout_ms": 2000}}, **(extra or {})}))
        p = self.procs.start(gid, [os.path.join(BIN, "meshgate-gateway"), "--config", cfg],
                             cpu=self.proxy_cpu, env={"MESHGATE_LOG": "warn"})
        wait_until(gid, lambda: http_ok(f"http://127.0.0.1:{ops}/readyz"))
        return {"id": gid, "mesh": mesh, "ops": ops, "proc": p}

    def start_sidecar(self, central, sid="bench-sidecar", service="bench-client", group="bench", wait=True,
                      extra=None):
        app, ops = free_port(), free_port()
        cfg = self.write(f"{sid}.yaml", json.dumps({
            "id": sid, "service": service, "group": group,
            "listen": f"127.0.0.1:{app}", "admin_listen": f"127.0.0.1:{ops}",
            "central": [f"127.0.0.1:{central}"],
            "snapshot_file": os.path.join(self.workdir, f"{sid}.snapshot.json"),
            "store": {"etcd": {"endpoints": [self.etcd_url], "timeout_ms": 2000}}, **(extra or {})}))
        # Development: MESHGATE_BENCH_SIDECAR_WRAP runs the sidecar under a
        # tool (e.g. valgrind, to list the functions it runs).
        wrap = os.environ.get("MESHGATE_BENCH_SIDECAR_WRAP", "").split()
        p = self.procs.start(sid, wrap + [os.path.join(BIN, "lite-sidecar"), "--config", cfg],
                             cpu=self.proxy_cpu, env={"MESHGATE_LOG": "warn"})
        if wait:
            wait_until(sid, lambda: http_ok(f"http://127.0.0.1:{ops}/readyz"))
        return {"app": app, "ops": ops, "proc": p}

    def cluster(self, direct, nginx):
        """Two-hop mesh path, RSS of the sidecar, config propagation."""
        self.start_etcd()
        self.start_admin()
        self.api("PUT", "/groups/bench", {"description": "benchmark group"})
        self.api("PUT", "/groups/other", {"description": "the other gateways' group"})
        self.api("PUT", "/services/backend", {
            "group": "bench", "endpoints": [{"address": f"127.0.0.1:{self.backend_port}"}]})
        self.api("PUT", "/services/bench-client", {"group": "bench", "destinations": [{"service": "backend"}]})
        gws = [self.start_cluster_gateway("gw-1", ["bench"]),
               self.start_cluster_gateway("gw-2", ["other"]),
               self.start_cluster_gateway("gw-3", ["other"])]
        sc = self.start_sidecar(gws[0]["mesh"])
        sidecar_url = f"http://127.0.0.1:{sc['app']}/"
        wait_until("sidecar route to the backend", lambda: http(
            "GET", sidecar_url, headers={"x-mesh-service": "backend"})[0] == 200
            and self.sidecar_tier(sidecar_url) == "group")
        self.results["sidecar_rss_idle"] = self.rss_sample(sc["proc"].pid)

        d = self.args.duration
        # Both hops share the proxy CPU with the backend, so the rate is a
        # quarter of one nginx hop's maximum: half of what two hops on one
        # core can carry (at half of nginx's max, two nginx hops on one core
        # would already be near saturation, and so would any two-hop path).
        rate = round(self.results["nginx_max_rps"] * 0.25)
        two_hop = {"name": "mesh two-hop", "port": sc["app"], "pids": lambda: [sc["proc"].pid, gws[0]["proc"].pid]}
        chain = self.start_nginx_chain(nginx["port"])
        targets = [dict(direct, name="direct"), dict(nginx, name="nginx"), chain, two_hop]
        log(f"two-hop mesh path at {rate} req/s (25% of nginx's max)")
        self.note_cmd(f"taskset -c {self.load_cpu} meshgate-load --json -c 50 -d {d} -r <rate> "
                      "-H 'x-mesh-service: backend' http://127.0.0.1:<sidecar port>/")

        def run(t):
            hdr = ["x-mesh-service: backend"] if t is two_hop else []
            return self.load(self.url(t), 50, d, rate, hdr)
        self.results["two_hop"] = {"rate": rate, "runs": self.interleaved(targets, run)}
        log("two-hop paths, max throughput (50 connections)")
        self.results["two_hop_max"] = self.interleaved([chain, two_hop], lambda t: self.measured(
            t, lambda: self.load(self.url(t), 50, d, None,
                                 ["x-mesh-service: backend"] if t is two_hop else [])))
        self.results["sidecar_rss_load"] = self.rss_sample(sc["proc"].pid)
        self.results["cluster_gateway_rss_load"] = self.rss_sample(gws[0]["proc"].pid)

        log(f"config propagation: {self.args.changes} route changes, 3 gateways")
        self.results["propagation"] = self.propagation(gws)

    def sidecar_scale(self):
        """A sidecar's RSS and policy-load time against the size of the mesh
        (services in etcd), next to a central gateway, which holds it all."""
        pool = concurrent.futures.ThreadPoolExecutor(8)
        have = 0
        out = []
        for n in self.args.scale_services:
            log(f"sidecar scale: {n} services in etcd")

            def put(i):
                self.api("PUT", f"/services/scale-{i}", {
                    "group": "other", "endpoints": [{"address": f"127.0.0.1:{20000 + i % 10000}"}],
                    "timeouts": {"request_ms": 5000}, "labels": {"team": f"t{i % 50}"}})
            list(pool.map(put, range(have, n)))
            if have == 0:
                self.api("PUT", "/services/scale-client", {"group": "bench", "destinations": [
                    {"service": "backend"}, {"service": "scale-1", "mode": "direct"}]})
            have = n
            row = {"services": n, "sidecar": [], "central": []}
            for rep in range(self.args.runs):
                for kind in ("sidecar", "central"):
                    t0 = time.perf_counter()
                    if kind == "sidecar":
                        sc = self.start_sidecar(1, sid=f"scale-{n}-{rep}", service="scale-client", wait=False)
                        proc, ops = sc["proc"], sc["ops"]

                        def loaded():
                            st, body = http("GET", f"http://127.0.0.1:{ops}/readyz", timeout=1.0)
                            return st == 200 and json.loads(body).get("policy") == "fresh"
                    else:
                        mesh, ops = free_port(), free_port()
                        cfg = self.write(f"central-{n}-{rep}.yaml", json.dumps({
                            "id": f"central-{n}-{rep}", "roles": ["central"], "workers": 1,
                            "listen": f"127.0.0.1:{mesh}", "admin_listen": f"127.0.0.1:{ops}",
                            "store": {"etcd": {"endpoints": [self.etcd_url], "timeout_ms": 5000}}}))
                        proc = self.procs.start(f"central-{n}-{rep}", [
                            os.path.join(BIN, "meshgate-gateway"), "--config", cfg],
                            cpu=self.proxy_cpu, env={"MESHGATE_LOG": "warn"})

                        def loaded():
                            return http_ok(f"http://127.0.0.1:{ops}/readyz")
                    while True:
                        try:
                            if loaded():
                                break
                        except (OSError, ValueError):
                            pass
                        if time.perf_counter() - t0 > 120:
                            raise RuntimeError(f"{kind} did not load {n} services")
                        time.sleep(0.002)
                    ms = (time.perf_counter() - t0) * 1000.0
                    time.sleep(1.0)
                    row[kind].append({"load_ms": ms, "rss_kb": mem_kb(proc.pid, "VmRSS")})
                    self.procs.stop(proc)
            out.append(row)
        self.note_cmd("sidecar scale: N services PUT through the admin API; a sidecar (service scale-client, "
                      "2 destinations, one direct) and a central gateway started against them, time to "
                      "/readyz fresh (sidecar) or ready (gateway), RSS 1 s later")
        self.results["sidecar_scale"] = out

    def scale(self):
        """The control plane at 10,000 sidecars, 10,000 services and 50,000
        routes (issue 19): etcd, `etcd grpc-proxy` (etcd's own watch-
        coalescing proxy) in front of it for the sidecars, the admin API,
        two gateways holding the whole config, and meshgate-scalebench
        running the simulated sidecars (the real sync and registration code
        on a connection each, no data plane). Records the fan-out of one
        write to every sidecar, the admin's /status, /nodes and ?wait with
        every node registered, and etcd's and the proxy's CPU and memory."""
        import resource
        # As many descriptors as this machine allows (a connection per
        # simulated sidecar, at the harness and at the proxy).
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = (hard, hard)

        def raise_nofile():
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        # Processes here need more descriptors than the default 1024.
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        proxy_port = free_port()
        proxy = self.procs.start("grpc-proxy", [
            "etcd", "grpc-proxy", "start", f"--endpoints={self.etcd_url.removeprefix('http://')}",
            f"--listen-addr=127.0.0.1:{proxy_port}"])
        wait_until("grpc-proxy", lambda: http_ok(f"http://127.0.0.1:{proxy_port}/health"))
        gws = [self.start_cluster_gateway(f"scale-gw-{i}", [], roles=("central",)) for i in range(2)]
        pids = {"etcd": self.etcd.pid, "grpc_proxy": proxy.pid}
        for g in gws:
            pids[g["id"]] = g["proc"].pid
        cpu0 = {k: cpu_seconds([v]) for k, v in pids.items()}
        t0 = time.time()
        args = [os.path.join(BIN, "meshgate-scalebench"),
                "--sidecar-etcd", f"http://127.0.0.1:{proxy_port}", "--etcd", self.etcd_url,
                "--admin", self.admin, "--token", self.token,
                "--sidecars", str(self.args.scale_sidecars), "--services", str(self.args.scale_sidecars),
                "--routes", str(self.args.routes), "--steady-s", "30",
                "--lease-ttl-s", str(self.args.scale_lease_ttl)]
        logf = open(os.path.join(self.workdir, "scalebench.log"), "ab")
        bench = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=logf, text=True,
                                 cwd=self.workdir, preexec_fn=raise_nofile)
        # The harness itself (the simulated sidecars) shares the machine.
        pids["harness"] = bench.pid
        cpu0["harness"] = 0.0
        out = {"sidecars": self.args.scale_sidecars}
        for line in bench.stdout:
            msg = json.loads(line)
            if msg.get("phase") == "steady":
                # Steady state: every sidecar synced and registered; CPU over
                # the next 20 s (lease keep-alives, watch progress).
                c1 = {k: cpu_seconds([v]) for k, v in pids.items()}
                time.sleep(20)
                c2 = {k: cpu_seconds([v]) for k, v in pids.items()}
                out["steady_cpu_pct"] = {k: round((c2[k] - c1[k]) / 20 * 100, 1) for k in pids}
                out["steady_rss_kb"] = {k: mem_kb(v, "VmRSS") for k, v in pids.items()}
                out["startup_cpu_s"] = {k: round(c1[k] - cpu0[k], 1) for k in pids}
            elif msg.get("phase") == "result":
                out["result"] = msg
                out["peak_rss_kb"] = {k: mem_kb(v, "VmHWM") for k, v in pids.items()}
        bench.wait()
        out["wall_s"] = round(time.time() - t0, 1)
        try:
            out["etcd_db_bytes"] = os.path.getsize(os.path.join(self.workdir, "etcd", "member", "snap", "db"))
        except OSError:
            pass
        self.note_cmd(f"scale: python3 loadtest/bench.py --only scale --scale-sidecars {self.args.scale_sidecars} "
                      f"--routes {self.args.routes} --scale-lease-ttl {self.args.scale_lease_ttl}")
        self.results["scale"] = out
        for g in gws:
            self.procs.stop(g["proc"])
        self.procs.stop(proxy)

    def soak(self):
        """Hours of operation compressed to one (configurable): steady
        traffic through a sidecar and its group gateways, a config change
        every second, a group gateway SIGKILLed and restarted every five
        minutes, etcd stopped for a minute every ten. Records the failures
        in each phase (steady, gateway down, etcd down: 0 expected for these
        GETs), the RSS and open descriptors of every process over time (and
        the slope after warm-up), and etcd's database size."""
        minutes = self.args.soak_minutes
        duration = int(minutes * 60)
        kill_every, etcd_every, etcd_down = (self.args.soak_kill_every, self.args.soak_etcd_every,
                                             self.args.soak_etcd_down)
        self.api("PUT", "/groups/soak", {"description": "soak"})
        self.api("PUT", "/services/soak-backend", {
            "group": "soak", "endpoints": [{"address": f"127.0.0.1:{self.backend_port}"}]})
        self.api("PUT", "/services/soak-client", {"group": "soak", "destinations": [{"service": "soak-backend"}]})
        snap = lambda gid: {"snapshot_file": os.path.join(self.workdir, f"{gid}.snapshot.json")}
        central = self.start_cluster_gateway("soak-central", [], roles=("central",), extra=snap("soak-central"))
        gws = [self.start_cluster_gateway(g, ["soak"], extra=snap(g)) for g in ("soak-a", "soak-b")]
        sc = self.start_sidecar(central["mesh"], sid="soak-sidecar", service="soak-client", group="soak")
        url = f"http://127.0.0.1:{sc['app']}/"
        wait_until("the soak sidecar reaches the backend", lambda: http(
            "GET", url, headers={"x-mesh-service": "soak-backend"})[0] == 200)
        procs = {"sidecar": sc["proc"], "central": central["proc"], "gw-a": gws[0]["proc"],
                 "gw-b": gws[1]["proc"], "etcd": self.etcd}
        admin_proc = next(p for n, p in self.procs.procs if n == "admin")
        procs["admin"] = admin_proc
        rate = self.args.soak_rate
        cmd = [os.path.join(BIN, "meshgate-load"), "--json", "-c", "20", "-d", str(duration),
               "-r", str(rate), "-H", "x-mesh-service: soak-backend", url]
        self.note_cmd(f"soak: python3 loadtest/bench.py --only soak --soak-minutes {minutes} "
                      f"(meshgate-load -c 20 -r {rate} through the sidecar; a route change every second; "
                      f"SIGKILL + restart of a group gateway every {kill_every} s; etcd stopped {etcd_down} s "
                      f"every {etcd_every} s)")
        log(f"soak: {minutes} min at {rate} req/s")
        t0 = time.time()
        load = subprocess.Popen(self.pinned(cmd), stdout=subprocess.PIPE, text=True)
        events, samples = [], []
        changes = {"ok": 0, "refused": 0}
        stop = threading.Event()

        def change_config():
            n = 0
            while not stop.wait(1.0):
                n += 1
                try:
                    st, _ = http("PUT", f"{self.admin}/api/v1/routes/soak-{n % 50}", {
                        "scope": "mesh", "match": {"hosts": [f"soak-{n % 50}.internal"]},
                        "backends": [{"service": "soak-backend"}], "labels": {"n": str(n)}},
                        {"authorization": f"Bearer {self.token}"}, timeout=5.0)
                except OSError:
                    st = 0
                # Refused while etcd is down (503): nothing was changed.
                changes["ok" if st in (200, 201) else "refused"] += 1
        changer = threading.Thread(target=change_config, daemon=True)
        changer.start()

        def sample(now):
            row = {"t": round(now - t0, 1)}
            for name, p in procs.items():
                if p.poll() is None:
                    try:
                        row[name] = {"rss_kb": mem_kb(p.pid, "VmRSS"), "fds": len(os.listdir(f"/proc/{p.pid}/fd"))}
                    except OSError:
                        pass
            try:
                row["etcd_db_bytes"] = os.path.getsize(os.path.join(self.workdir, "etcd", "member", "snap", "db"))
            except OSError:
                pass
            samples.append(row)
        gw_cmds = {}
        for name, g in (("gw-a", gws[0]), ("gw-b", gws[1])):
            gw_cmds[name] = g["proc"].args
        next_kill, next_etcd, victim = kill_every, etcd_every, 0
        etcd_back_at, gw_back_at, down_gw = None, None, None
        while True:
            now = time.time()
            el = now - t0
            if el >= duration:
                break
            if not samples or now - t0 - samples[-1]["t"] >= 10:
                sample(now)
            if el >= next_kill and down_gw is None:
                down_gw = ("gw-a", "gw-b")[victim % 2]
                victim += 1
                self.procs.stop(procs[down_gw], signal.SIGKILL)
                events.append({"t": round(el, 1), "event": f"SIGKILL {down_gw}"})
                gw_back_at = el + 10
                next_kill += kill_every
            if gw_back_at is not None and el >= gw_back_at:
                logf = open(os.path.join(self.workdir, f"{down_gw}.log"), "ab")
                p = subprocess.Popen(gw_cmds[down_gw], stdout=logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, "MESHGATE_LOG": "warn"}, cwd=self.workdir,
                                     start_new_session=True)
                self.procs.procs.append((down_gw, p))
                procs[down_gw] = p
                events.append({"t": round(el, 1), "event": f"restarted {down_gw}"})
                gw_back_at, down_gw = None, None
            if el >= next_etcd and etcd_back_at is None:
                self.procs.stop(procs["etcd"])
                events.append({"t": round(el, 1), "event": "etcd stopped"})
                etcd_back_at = el + etcd_down
                next_etcd += etcd_every
            if etcd_back_at is not None and el >= etcd_back_at:
                procs["etcd"] = self.start_etcd_again()
                events.append({"t": round(time.time() - t0, 1), "event": "etcd started"})
                etcd_back_at = None
            time.sleep(0.2)
        sample(time.time())
        stop.set()
        out, _ = load.communicate(timeout=120)
        r = json.loads(out)
        # Each second of the load's timeline in the phase it fell in.
        def phase(sec):
            state = "steady"
            down = {"gateway": False, "etcd": False}
            for e in events:
                if e["t"] > sec + 1:
                    break
                if e["event"].startswith("SIGKILL"):
                    down["gateway"] = True
                elif e["event"].startswith("restarted"):
                    down["gateway"] = False
                elif e["event"] == "etcd stopped":
                    down["etcd"] = True
                elif e["event"] == "etcd started":
                    down["etcd"] = False
            if down["etcd"]:
                state = "etcd down"
            elif down["gateway"]:
                state = "gateway down"
            return state
        phases = {}
        for secrow in r["timeline"]:
            p = phases.setdefault(phase(secrow["second"]), {"seconds": 0, "ok": 0, "errors": 0, "p99_us": 0})
            p["seconds"] += 1
            p["ok"] += secrow["ok"]
            p["errors"] += secrow["errors"]
            p["p99_us"] = max(p["p99_us"], secrow["p99_us"])

        def slope(name):
            # KB per hour, least squares over the samples after warm-up.
            pts = [(row["t"], row[name]["rss_kb"]) for row in samples
                   if name in row and row["t"] >= self.args.soak_warmup]
            if len(pts) < 3:
                return None
            n = len(pts)
            mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
            den = sum((x - mx) ** 2 for x, _ in pts)
            return round(sum((x - mx) * (y - my) for x, y in pts) / den * 3600, 1) if den else None
        self.results["soak"] = {
            "minutes": minutes, "rate": rate, "requests": r["requests"], "errors": r["errors"],
            "phases": phases, "events": events, "config_changes": changes,
            # Restarted processes (the killed gateways, etcd) start over:
            # a slope across their lives would mean nothing.
            "rss_slope_kb_per_h": {n: slope(n) for n in ("sidecar", "central", "admin")},
            "first": samples[0] if samples else None, "last": samples[-1] if samples else None,
            "samples": samples, "failures": r["failures"][:50]}

    def start_etcd_again(self):
        """etcd started again on its ports and data (after a stop)."""
        name, p = next((n, p) for n, p in reversed(self.procs.procs) if n == "etcd")
        logf = open(os.path.join(self.workdir, "etcd.log"), "ab")
        q = subprocess.Popen(p.args, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
                             start_new_session=True)
        self.procs.procs.append((name, q))
        self.etcd = q
        wait_until("etcd again", lambda: http_ok(f"{self.etcd_url}/health"))
        return q

    def failover(self):
        """Constant load through a sidecar while a group gateway is SIGKILLed,
        then while etcd is stopped: the errors and the latency spike."""
        self.api("PUT", "/groups/fo", {"description": "fail-over figures"})
        self.api("PUT", "/services/fo-client", {"group": "fo", "destinations": [{"service": "backend"}]})
        central = self.start_cluster_gateway("gw-fc", [], roles=("central",))
        gws = [self.start_cluster_gateway("gw-fa", ["fo"]), self.start_cluster_gateway("gw-fb", ["fo"])]
        sc = self.start_sidecar(central["mesh"], sid="fo-sidecar", service="fo-client", group="fo")
        url = f"http://127.0.0.1:{sc['app']}/"

        def tiers_ready():
            st, body = http("GET", f"http://127.0.0.1:{sc['ops']}/config", timeout=1.0)
            return st == 200 and len(json.loads(body)["tiers"]["group"]) == 2
        wait_until("fail-over sidecar sees both group gateways", tiers_ready)
        duration, kill_at, etcd_at = 15, 5.0, 10.0
        rate = self.args.failover_rate
        cmd = [os.path.join(BIN, "meshgate-load"), "--json", "-c", "20", "-d", str(duration),
               "-r", str(rate), "-H", "x-mesh-service: backend", url]
        self.note_cmd(f"taskset -c {self.load_cpu} meshgate-load --json -c 20 -d {duration} -r {rate} "
                      f"-H 'x-mesh-service: backend' http://127.0.0.1:<fail-over sidecar port>/  "
                      f"# SIGKILL one of 2 group gateways at {kill_at:.0f} s, stop etcd at {etcd_at:.0f} s")
        log(f"fail-over: {rate} req/s; SIGKILL gw-fa at {kill_at} s, stop etcd at {etcd_at} s")
        t0 = time.perf_counter()
        load = subprocess.Popen(self.pinned(cmd), stdout=subprocess.PIPE, text=True)
        time.sleep(kill_at)
        self.procs.stop(gws[0]["proc"], signal.SIGKILL)
        killed = time.perf_counter() - t0
        time.sleep(max(0.0, etcd_at - (time.perf_counter() - t0)))
        self.procs.stop(self.etcd)
        stopped = time.perf_counter() - t0
        out, _ = load.communicate(timeout=duration + 60)
        r = json.loads(out)
        st, body = http("GET", f"http://127.0.0.1:{sc['ops']}/readyz", timeout=2.0)
        policy = json.loads(body).get("policy") if st == 200 else f"readyz {st}"

        def window(lo, hi):
            secs = [s for s in r["timeline"] if lo <= s["second"] < hi]
            return {"errors": sum(s["errors"] for s in secs), "ok": sum(s["ok"] for s in secs),
                    "p99_us": max((s["p99_us"] for s in secs), default=0),
                    "max_us": max((s["max_us"] for s in secs), default=0)}
        self.results["failover"] = {
            "rate": rate, "duration": duration, "killed_at_s": killed, "etcd_stopped_at_s": stopped,
            "baseline": window(1, int(kill_at)), "gateway_killed": window(int(kill_at), int(kill_at) + 2),
            "etcd_stopped": window(int(etcd_at), int(etcd_at) + 2), "errors": r["errors"],
            "requests": r["requests"], "failures": r["failures"][:20], "policy_after": policy}

    # ---------------------------------------------------------- mTLS

    def mesh_identity(self, name, spiffe):
        """A `mesh_tls` section: a P-256 leaf for `spiffe` signed by the
        bench's mesh CA (made on first use)."""
        ca_crt, ca_key = os.path.join(self.workdir, "mesh-ca.crt"), os.path.join(self.workdir, "mesh-ca.key")
        if not os.path.exists(ca_crt):
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=bench mesh CA"],
                           check=True, capture_output=True)
        key, csr, crt = (os.path.join(self.workdir, f"{name}.{x}") for x in ("key", "csr", "crt"))
        ext = self.write(f"{name}.ext", f"subjectAltName=URI:{spiffe}\n")
        subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", key, "-out", csr, "-subj", f"/CN={name}"], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
                        "-days", "2", "-out", crt, "-extfile", ext], check=True, capture_output=True)
        return {"mesh_tls": {"cert_file": crt, "key_file": key, "ca_file": ca_crt}}

    def metric(self, ops, sample):
        _, body = http("GET", f"http://127.0.0.1:{ops}/metrics")
        for line in body.decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return 0.0

    def mtls(self):
        """The two-hop mesh path (app -> sidecar -> gateway -> backend)
        with mutual TLS on the sidecar -> gateway hop against the same path
        in plaintext: latency at a fixed rate, max throughput and CPU per
        request of both proxies, TLS handshakes per 10,000 requests, and
        the sidecar's RSS."""
        if not hasattr(self, "etcd_url"):
            self.start_etcd()
            self.start_admin()
        if not hasattr(self, "backend_port"):
            self.start_backend()
        for g in ("plainbench", "mtlsbench"):
            self.api("PUT", f"/groups/{g}", {"description": "mTLS benchmark"})
        self.api("PUT", "/services/mtls-backend", {
            "endpoints": [{"address": f"127.0.0.1:{self.backend_port}"}]})
        paths = {}
        for name, group, secure in (("plaintext", "plainbench", False), ("mTLS", "mtlsbench", True)):
            client = f"{group}-client"
            self.api("PUT", f"/services/{client}", {"group": group, "destinations": [{"service": "mtls-backend"}]})
            gid, sid = f"gw-{group}", f"sc-{group}"
            gx = self.mesh_identity(gid, f"spiffe://bench.mesh/gateway/{gid}") if secure else None
            sx = self.mesh_identity(sid, f"spiffe://bench.mesh/group/{group}/service/{client}") if secure else None
            gw = self.start_cluster_gateway(gid, [group], extra=gx)
            sc = self.start_sidecar(gw["mesh"], sid=sid, service=client, group=group, extra=sx)
            url = f"http://127.0.0.1:{sc['app']}/"
            wait_until(f"{name} path", lambda url=url: http(
                "GET", url, headers={"x-mesh-service": "mtls-backend"})[0] == 200)
            paths[name] = {"name": name, "port": sc["app"], "gw": gw, "sc": sc,
                           "pids": lambda sc=sc, gw=gw: [sc["proc"].pid, gw["proc"].pid]}
        targets = list(paths.values())
        d = self.args.duration
        rate = round(self.results.get("nginx_max_rps", 16000) * 0.25)
        hdr = ["x-mesh-service: mtls-backend"]
        log(f"mTLS two-hop path at {rate} req/s")
        self.note_cmd(f"taskset -c {self.load_cpu} meshgate-load --json -c 50 -d {d} -r <rate> "
                      "-H 'x-mesh-service: mtls-backend' http://127.0.0.1:<sidecar port>/  (plaintext and mTLS hop)")
        ok = 'meshgate_tls_handshakes_total{listener="mesh",result="ok"}'
        gw_m = paths["mTLS"]["gw"]
        hs_before = self.metric(gw_m["ops"], ok)
        fixed = self.interleaved(targets, lambda t: self.load(self.url(t), 50, d, rate, hdr))
        log("mTLS two-hop path, max throughput (50 connections)")
        top = self.interleaved(targets, lambda t: self.measured(t, lambda: self.load(self.url(t), 50, d, None, hdr)))
        mtls_requests = sum(r["requests"] for r in fixed["mTLS"]) + sum(r["requests"] for r in top["mTLS"])
        handshakes = self.metric(gw_m["ops"], ok) - hs_before
        self.results["mtls"] = {
            "rate": rate, "fixed": fixed, "max": top,
            "handshakes": handshakes, "requests": mtls_requests,
            "handshakes_per_10k": handshakes * 10_000 / max(mtls_requests, 1),
            "sidecar_rss": {n: self.rss_sample(p["sc"]["proc"].pid) for n, p in paths.items()},
            "hot_symbols": self.hot_symbols_found(),
        }

    def hot_symbols_found(self):
        """How many of the names in lite-sidecar/hot-symbols.txt the
        sidecar binary has (the list goes stale as crate hashes change)."""
        with open(os.path.join(ROOT, "lite-sidecar", "hot-symbols.txt")) as f:
            wanted = {l.strip() for l in f if l.strip().startswith("_ZN")}
        out = subprocess.run(["nm", os.path.join(BIN, "lite-sidecar")], capture_output=True, text=True).stdout
        have = {l.split()[-1] for l in out.splitlines() if l.strip()}
        return {"listed": len(wanted), "found": len(wanted & have)}

    def access_log(self):
        """The gateway's CPU per request with its access log off, writing
        every request to a file, and on for errors only (none happen, so
        none is written: the cost of recording alone), closed loop over 50
        connections, interleaved."""
        if not hasattr(self, "backend_port"):
            self.start_backend()
        logfile = os.path.join(self.workdir, "access.log")
        modes = (("log off", []), ("log all", ["--access-log", "all", "--access-log-path", logfile]),
                 ("log errors", ["--access-log", "errors", "--access-log-path", logfile]))
        targets = []
        for name, extra in modes:
            t = self.start_meshgate(extra_args=extra, name=name.replace(" ", "-"))
            t["name"] = name
            targets.append(t)
        d = self.args.duration
        log("access log off / all / errors, 50 connections (wrk)")
        self.note_cmd(f"taskset -c {self.load_cpu} wrk -t1 -c50 -d{d}s http://127.0.0.1:<port>/  "
                      "(gateways with --access-log off | all --access-log-path <file> | errors)")
        runs = self.interleaved(targets, lambda t: self.measured(t, lambda: self.wrk(self.url(t), 50, d)))
        on = targets[1]["ops"]
        self.results["access_log"] = {
            "runs": runs,
            "lines": self.metric(on, "meshgate_access_log_lines_total"),
            "dropped": self.metric(on, "meshgate_access_log_dropped_total"),
            "requests": sum(r["requests"] for r in runs["log all"]),
        }
        for t in targets:
            self.procs.stop(t["proc"])

    EDGE_ROUTES = {
        # name: (path, route fields, request headers)
        "no policy": ("/bench", None, ()),
        "rate limit (route)": ("/p/limit", "rate_limit: {requests: 100000000}", ()),
        "rate limit (source_ip)": ("/p/limit-ip", "rate_limit: {requests: 100000000, key: source_ip}", ()),
        "API key": ("/p/key", "auth: {api_key: {}}", ("x-api-key: bench-api-key-0123456789",)),
        "JWT (HS256, cached)": ("/p/jwt", "auth: {jwt: {issuer: bench}}", ("authorization: Bearer {jwt}",)),
        "fault (0%)": ("/p/fault", "fault: {abort: {status: 503, percent: 0}, delay: {ms: 1, percent: 0}}", ()),
        "cache (hits)": ("/p/cache", "cache: {}", ()),
        "mirror (100%)": ("/p/mirror", "mirror: {service: bench-backend}", ()),
    }

    def edge_policies(self):
        """The gateway's CPU per request on a route without policies and on
        routes with each edge policy (one gateway, the same backend; wrk,
        50 connections, interleaved); then its memory while a rate limit
        keyed by a header sees a million and then two million distinct
        keys (the keyed state's bound, as for a million source addresses)."""
        if not hasattr(self, "backend_port"):
            self.start_backend()
        secret = "bench-hs256-secret-0123456789abcdef0123"
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "b1"}).encode())
        claims = b64(json.dumps({"iss": "bench", "exp": int(time.time()) + 86400}).encode())
        sig = b64(hmac.new(secret.encode(), f"{head}.{claims}".encode(), hashlib.sha256).digest())
        jwt = f"{head}.{claims}.{sig}"
        routes = ""
        for name, (path, fields, _) in self.EDGE_ROUTES.items():
            if fields:
                rname = "p" + path.replace("/", "-")
                routes += (f"  {rname}:\n    scope: ingress\n    match: {{path: {{prefix: {path}}}}}\n"
                           f"    backends: [{{service: bench-backend}}]\n    {fields}\n")
        routes += ("  p-keys:\n    scope: ingress\n    match: {path: {prefix: /p/keys}}\n"
                   "    backends: [{service: bench-backend}]\n"
                   "    rate_limit: {requests: 100000000, key: header, header: x-client}\n")
        consumers = ("consumers:\n  bench:\n    api_keys: [{key: bench-api-key-0123456789}]\n"
                     f"    jwt: {{keys: [{{kid: b1, algorithm: HS256, secret: {secret}}}]}}\n")
        t = self.start_meshgate(extra_model=consumers, name="meshgate-edge", extra_routes=routes)
        targets = []
        for name, (path, _, headers) in self.EDGE_ROUTES.items():
            targets.append(dict(t, name=name, path=path,
                                headers=tuple(h.replace("{jwt}", jwt) for h in headers)))
        d = self.args.duration
        log("edge policies: CPU per request by policy, 50 connections (wrk)")
        self.note_cmd(f"taskset -c {self.load_cpu} wrk -t1 -c50 -d{d}s [-H <credential>] "
                      "http://127.0.0.1:<port>/<route's path>  (one standalone gateway, a route per policy)")
        runs = self.interleaved(targets, lambda x: self.measured(
            x, lambda: self.wrk(self.url(x), 50, d, headers=x["headers"])))
        pid = t["proc"].pid
        rss = {"before": self.rss_sample(pid)}
        script = self.write("keys.lua", "counter = 0\nrequest = function()\n  counter = counter + 1\n"
                            "  return wrk.format(nil, nil, {[\"x-client\"] = tostring(counter) .. \"-\" .. "
                            "tostring(math.random(1, 1000000000))})\nend\n")
        sent = 0
        self.note_cmd(f"taskset -c {self.load_cpu} wrk -t1 -c50 -d<s> -s keys.lua http://127.0.0.1:<port>/p/keys  "
                      "(a distinct x-client value per request: a rate limit keyed by header)")
        for goal in (1_000_000, 2_000_000):
            while sent < goal:
                r = self.wrk(f"http://127.0.0.1:{t['port']}/p/keys", 50, 10, script=script)
                sent += r["requests"]
            rss[f"after {goal // 1_000_000}M keys"] = dict(self.rss_sample(pid), requests=sent)
        self.results["edge_policies"] = {"runs": runs, "rss": rss}
        self.procs.stop(t["proc"])

    def sidecar_tier(self, url):
        req = urllib.request.Request(url, headers={"x-mesh-service": "backend"})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.headers.get("x-mesh-tier")

    def propagation(self, gws):
        """ms from sending a route PUT until each gateway has applied it."""
        pool = concurrent.futures.ThreadPoolExecutor(len(gws))
        samples = {g["id"]: [] for g in gws}
        for i in range(self.args.changes):
            t0 = time.perf_counter()
            obj = self.api("PUT", "/routes/propagation-probe", {
                "scope": "mesh", "match": {"hosts": ["probe"], "path": {"prefix": f"/v{i}"}},
                "backends": [{"service": "backend"}]})
            version = obj["version"]

            def wait(g):
                status, _ = http("GET", f"http://127.0.0.1:{g['ops']}/config/revision"
                                        f"?at_least={version}&wait_ms=10000", timeout=15)
                if status != 200:
                    raise RuntimeError(f"{g['id']} did not apply revision {version}")
                return g["id"], (time.perf_counter() - t0) * 1000.0
            for gid, ms in pool.map(wait, gws):
                samples[gid].append(ms)
        allms = sorted(x for v in samples.values() for x in v)

        def q(p):
            return allms[min(len(allms) - 1, int(p * len(allms)))]
        return {"changes": self.args.changes, "gateways": len(gws), "p50_ms": q(0.5), "p99_ms": q(0.99),
                "max_ms": allms[-1], "per_gateway_p50_ms": {k: median(v) for k, v in samples.items()}}

    def route_scale(self):
        out = {}
        for shape in ("hosts", "paths"):
            log(f"route table scale: {self.args.routes} routes, shape {shape}")
            cmd = [os.path.join(BIN, "meshgate-routebench"), "--json", "--routes", str(self.args.routes),
                   "--shape", shape, "--changes", "20", "--lookups", "20000" if shape == "paths" else "200000"]
            self.note_cmd(" ".join(["meshgate-routebench"] + cmd[1:]))
            r = subprocess.run(self.pinned(cmd), capture_output=True, text=True, check=True)
            out[shape] = json.loads(r.stdout)
        self.results["route_scale"] = out

    # ---------------------------------------------------------- main

    def run(self):
        log(f"work dir {self.workdir}; proxies on CPU {self.proxy_cpu}, load on CPU {self.load_cpu}")
        try:
            self.start_backend()
            direct = {"name": "direct", "port": self.backend_port,
                      "pids": lambda: children(self.backend.pid)}
            nginx = self.start_nginx()
            haproxy = self.start_haproxy()
            if self.args.only:
                return self.run_only(direct, nginx, haproxy)
            mg = self.start_meshgate()
            self.results["gateway_rss_idle"] = self.rss_sample(mg["proc"].pid)
            self.throughput([direct, nginx, haproxy, mg])
            self.latency([nginx, haproxy, mg])
            self.http2([nginx, haproxy, mg])
            self.results["gateway_rss_load"] = self.rss_sample(mg["proc"].pid)
            self.idle_memory([nginx, haproxy, mg])
            self.mg = mg
            self.h2_upstream()
            self.uring()
            self.tls()
            self.cluster(direct, nginx)
            self.mtls()
            self.access_log()
            self.edge_policies()
            self.sidecar_scale()
            self.failover()
            self.route_scale()
        finally:
            self.procs.stop_all()
        return self.results

    def run_only(self, direct, nginx, haproxy):
        """A partial run for development (`--only`): etcd, admin and the
        named scenarios; prints raw results. The single-proxy scenarios
        (throughput, http2, idle_memory) run against nginx, HAProxy and a
        standalone gateway."""
        single = [s for s in self.args.only if s in ("throughput", "http2", "idle_memory", "h2_upstream", "uring")]
        if single:
            mg = self.mg = self.start_meshgate()
            for name in single:
                getattr(self, name)(([direct] if name == "throughput" else []) + [nginx, haproxy, mg])
            if len(single) == len(self.args.only):
                return self.results
        self.start_etcd()
        self.start_admin()
        self.api("PUT", "/groups/bench", {"description": "benchmark group"})
        self.api("PUT", "/groups/other", {"description": "other"})
        self.api("PUT", "/services/backend", {
            "group": "bench", "endpoints": [{"address": f"127.0.0.1:{self.backend_port}"}]})
        for name in self.args.only:
            if name not in single:
                getattr(self, name)()
        return self.results

    def machine(self):
        cpu = "unknown"
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.+)", f.read())
                cpu = m.group(1).strip() if m else cpu
        except OSError:
            pass
        mem = mem_kb("self", "VmRSS") and 0
        try:
            with open("/proc/meminfo") as f:
                mem = int(f.readline().split()[1]) // 1024 // 1024
        except OSError:
            pass
        return {
            "date": datetime.date.today().isoformat(), "cpu": cpu, "cores": self.ncpu,
            "memory_gib": mem, "kernel": platform.release(),
            "nginx": tool_version(["nginx", "-v"]), "haproxy": tool_version(["haproxy", "-v"]),
            "wrk": tool_version(["wrk", "--version"]), "h2load": tool_version(["h2load", "--version"]),
            "etcd": tool_version(["etcd", "--version"]), "rustc": tool_version(["rustc", "--version"]),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
        }


# -------------------------------------------------------------- report

def fmt(x, digits=0):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def conns(rs):
    """New upstream connections over a row's runs, and per 10,000 requests."""
    c = sum(r.get("upstream_connects", 0) for r in rs)
    n = sum(r.get("requests", 0) for r in rs)
    return f"{fmt(c)} ({c * 10000 / n:.1f})" if n else fmt(c)


CONNS_NOTE = ("`upstream conns`: connections the backend accepted during the row's runs (from its "
              "`stub_status`), and per 10,000 requests; for `direct`, the load generator's own.\n")


def report(res, machine, args, commands):
    L = []
    L.append(f"Generated by `loadtest/run.sh --runs {args.runs} --duration {args.duration}` on {machine['date']} "
             f"(commit `{machine['commit']}`).\n")
    L.append("### Machine\n")
    L.append(f"- CPU: {machine['cpu']}, {machine['cores']} cores; {machine['memory_gib']} GiB; kernel {machine['kernel']}")
    L.append(f"- {machine['nginx']}; {machine['haproxy']}; {machine['wrk']}; {machine['h2load']}; "
             f"{machine['etcd'].splitlines()[0]}; {machine['rustc']}")
    L.append(f"- Proxies (one worker each: nginx `worker_processes 1`, HAProxy `nbthread 1`, "
             f"Meshgate `--workers 1`) and the nginx backend pinned to CPU {args.proxy_cpu}; load generators "
             f"pinned to CPU {args.load_cpu}. Each run {args.duration} s, {args.runs} interleaved repetitions, "
             f"medians shown.\n")
    L.append(CONNS_NOTE)
    L.append("### Commands\n")
    L.append("```")
    L.extend(commands)
    L.append("```\n")

    def tp_table(key, title):
        runs = res[key]
        nginx_rps = median([r["rps"] for r in runs["nginx"]])
        nginx_cpu = median([r.get("cpu_us_per_req", 0) for r in runs["nginx"]])
        L.append(f"### {title}\n")
        L.append("| target | req/s (median) | runs | vs nginx | CPU µs/req (proxy) | CPU vs nginx | "
                 "upstream conns (per 10k req) | errors |")
        L.append("|---|---|---|---|---|---|---|---|")
        for name, rs in runs.items():
            rps = median([r["rps"] for r in rs])
            cpu = median([r.get("cpu_us_per_req", 0) for r in rs])
            errs = sum(r["errors"] for r in rs)
            cpu_s = "-" if name == "direct" else fmt(cpu, 1)
            cpu_ratio = "-" if name == "direct" else f"{cpu / nginx_cpu:.2f}×"
            L.append(f"| {name} | {fmt(rps)} | {' / '.join(fmt(r['rps']) for r in rs)} | "
                     f"{rps / nginx_rps:.2f}× | {cpu_s} | {cpu_ratio} | {conns(rs)} | {errs} |")
        L.append("")

    tp_table("throughput_10", "HTTP/1.1 keep-alive, max throughput, 10 connections (wrk)")
    tp_table("throughput_50", "HTTP/1.1 keep-alive, max throughput, 50 connections (wrk)")

    L.append(f"### Latency at fixed rates (meshgate-load, open loop, 50 connections)\n")
    L.append(f"Rates are fractions of nginx's median maximum at 50 connections "
             f"({fmt(res['nginx_max_rps'])} req/s). Latency in µs from each request's intended send time.\n")
    L.append("| load | target | p50 | p99 | p99.9 | p99 vs nginx | upstream conns (per 10k req) | errors |")
    L.append("|---|---|---|---|---|---|---|---|")
    for pct in (25, 50, 75):
        block = res[f"latency_{pct}"]
        n99 = median([r["latency_us"]["p99"] for r in block["runs"]["nginx"]])
        for name, rs in block["runs"].items():
            p50 = median([r["latency_us"]["p50"] for r in rs])
            p99 = median([r["latency_us"]["p99"] for r in rs])
            p999 = median([r["latency_us"]["p999"] for r in rs])
            errs = sum(sum(r["errors"].values()) for r in rs)
            L.append(f"| {pct}% ({fmt(block['rate'])}/s) | {name} | {fmt(p50)} | {fmt(p99)} | {fmt(p999)} | "
                     f"{p99 / n99:.2f}× | {conns(rs)} | {errs} |")
    L.append("")

    for c, m in Bench.H2_SHAPES:
        tp_table(f"http2_{c}_{m}", f"HTTP/2 cleartext, {c} connections × {m} streams (h2load; upstream HTTP/1.1)")

    if "idle_memory" in res:
        im = res["idle_memory"]
        first = next(iter(im.values()))
        L.append(f"### Idle keep-alive client connections: memory\n")
        L.append(f"{fmt(first['conns'])} connections to each proxy, each answered once (HTTP/1.1 GET) and then "
                 f"left open and idle; the proxy's RSS before they were opened, right after the last answer, and "
                 f"after {first['wait_s']} s idle. Every hundredth connection is asked again afterwards "
                 f"(all still open and served).\n")
        L.append("| target | RSS before MB | right after MB | after idle MB | per 10,000 idle connections MB |")
        L.append("|---|---|---|---|---|")
        for name, r in im.items():
            per = (r["idle_kb"] - r["before_kb"]) / 1024 * 10_000 / r["conns"]
            L.append(f"| {name} | {fmt(r['before_kb'] / 1024, 1)} | {fmt(r['hot_kb'] / 1024, 1)} | "
                     f"{fmt(r['idle_kb'] / 1024, 1)} | {fmt(per, 1)} |")
        L.append("")

    for c, m in ((10, 10), (50, 10)):
        if f"h2_upstream_{c}_{m}" in res:
            runs = res[f"h2_upstream_{c}_{m}"]
            base = median([r["rps"] for r in runs["haproxy (h2 upstream)"]])
            base_cpu = median([r.get("cpu_us_per_req", 0) for r in runs["haproxy (h2 upstream)"]])
            L.append(f"### HTTP/2 to the upstream, {c} connections × {m} streams (h2load; backend: nginx h2c, "
                     f"128 streams per connection)\n")
            L.append("| target | req/s (median) | runs | vs HAProxy | CPU µs/req (proxy) | CPU vs HAProxy | "
                     "upstream conns (per 10k req) | errors |")
            L.append("|---|---|---|---|---|---|---|---|")
            for name, rs in runs.items():
                rps = median([r["rps"] for r in rs])
                cpu = median([r.get("cpu_us_per_req", 0) for r in rs])
                L.append(f"| {name} | {fmt(rps)} | {' / '.join(fmt(r['rps']) for r in rs)} | {rps / base:.2f}× | "
                         f"{fmt(cpu, 1)} | {cpu / base_cpu:.2f}× | {conns(rs)} | {sum(r['errors'] for r in rs)} |")
            L.append("")

    if "uring_50" in res:
        L.append("### io_uring: the same minimal proxy on epoll and on io_uring\n")
        L.append("`meshgate-uringproto` (loadtest/src/bin/uring.rs): read a request head, parse it, send it on a "
                 "pooled upstream connection, read and parse the answer, write it back; one thread each, pinned "
                 "like the proxies. What io_uring saves in the kernel shows here at its largest.\n")
        L.append("| connections | data path | req/s (median) | CPU µs/req | vs epoll |")
        L.append("|---|---|---|---|---|")
        for conns in (10, 50):
            runs = res[f"uring_{conns}"]
            base = median([r.get("cpu_us_per_req", 0) for r in runs["epoll"]])
            for name, rs in runs.items():
                cpu = median([r.get("cpu_us_per_req", 0) for r in rs])
                L.append(f"| {conns} | {name} | {fmt(median([r['rps'] for r in rs]))} | {fmt(cpu, 1)} | "
                         f"{cpu / base:.2f}× |")
        L.append("")

    if "tls" in res:
        tls = res["tls"]
        res["tls_keepalive"] = tls["keepalive"]
        suites = "; ".join(f"{n}: {c}" for n, c in tls["ciphers"].items())
        tp_table("tls_keepalive", f"TLS termination, keep-alive, 50 connections (wrk over TLS; {suites})")
        res["tls_handshakes"] = tls["handshakes"]
        tp_table("tls_handshakes", "TLS termination, full handshakes one after another "
                 "(openssl s_time -new; req/s = handshakes/s, CPU per handshake)")

    if "mtls" in res:
        mt = res["mtls"]
        L.append(f"### Mutual TLS on the mesh hop: app → sidecar → gateway → backend\n")
        L.append(f"The same two-hop path with and without mutual TLS on the sidecar → gateway hop "
                 f"(P-256 SPIFFE certificates). Open loop at {fmt(mt['rate'])} req/s, 50 connections; then "
                 f"closed loop. TLS handshakes on the gateway's mesh listener: {fmt(mt['handshakes'])} for "
                 f"{fmt(mt['requests'])} requests ({mt['handshakes_per_10k']:.2f} per 10,000).\n")
        L.append("| hop | p50 µs | p99 µs | max req/s | CPU µs/req (sidecar + gateway) | sidecar RSS peak | "
                 "upstream conns (per 10k req) |")
        L.append("|---|---|---|---|---|---|---|")
        for name in ("plaintext", "mTLS"):
            fx, mx = mt["fixed"][name], mt["max"][name]
            L.append(f"| {name} | {fmt(median([r['latency_us']['p50'] for r in fx]))} | "
                     f"{fmt(median([r['latency_us']['p99'] for r in fx]))} | {fmt(median([r['rps'] for r in mx]))} | "
                     f"{fmt(median([r.get('cpu_us_per_req', 0) for r in mx]), 1)} | "
                     f"{fmt(mt['sidecar_rss'][name]['hwm_kb'] / 1024, 1)} MB | {conns(fx + mx)} |")
        L.append("")

    if "access_log" in res:
        al = res["access_log"]
        L.append("### Access log: the gateway's cost per request\n")
        L.append(f"The standalone gateway with its access log off, writing every request to a file, and on "
                 f"for errors only (no request fails, so this is the cost of recording each request without "
                 f"writing it). `log all` wrote {fmt(al['lines'])} lines for {fmt(al['requests'])} requests "
                 f"and dropped {fmt(al['dropped'])}.\n")
        L.append("| log | req/s | CPU µs/req | upstream conns (per 10k req) |")
        L.append("|---|---|---|---|")
        for name, rs in al["runs"].items():
            L.append(f"| {name} | {fmt(median([r['rps'] for r in rs]))} | "
                     f"{fmt(median([r.get('cpu_us_per_req', 0) for r in rs]), 1)} | {conns(rs)} |")
        L.append("")

    if "edge_policies" in res:
        ep = res["edge_policies"]
        base = median([r.get("cpu_us_per_req", 0) for r in ep["runs"]["no policy"]])
        L.append("### Edge policies: the gateway's cost per request\n")
        L.append("One standalone gateway, a route per policy to the same backend, closed loop over 50 "
                 "connections, interleaved. Limits are set high enough that nothing is refused; the JWT is "
                 "HS256 and verified once (then a cache hit); the fault route draws 0% so it measures the "
                 "draw; the cache route is answered from the cache; the mirror route sends every request "
                 "twice (the copy to the same backend).\n")
        L.append("| route | req/s | CPU µs/req | vs no policy | upstream conns (per 10k req) |")
        L.append("|---|---|---|---|---|")
        for name, rs in ep["runs"].items():
            cpu = median([r.get("cpu_us_per_req", 0) for r in rs])
            L.append(f"| {name} | {fmt(median([r['rps'] for r in rs]))} | {fmt(cpu, 1)} | "
                     f"{'—' if name == 'no policy' else f'{cpu - base:+.1f} µs'} | {conns(rs)} |")
        L.append("")
        L.append("Memory of the gateway while a rate limit keyed by a header (`max_keys` 100,000, the "
                 "default) sees a distinct key on every request (as a million source addresses would):\n")
        L.append("| when | requests with distinct keys | RSS MB | own memory (RssAnon) MB |")
        L.append("|---|---|---|---|")
        for when, r in ep["rss"].items():
            L.append(f"| {when} | {fmt(r.get('requests', 0))} | {fmt(r['rss_kb'] / 1024, 1)} | "
                     f"{fmt(r['anon_kb'] / 1024, 1)} |")
        L.append("")

    th = res["two_hop"]
    L.append(f"### Two-hop mesh path: app → lite-sidecar → gateway → backend\n")
    L.append(f"Open loop at {fmt(th['rate'])} req/s (25% of one nginx hop's max: both hops and the backend "
             f"share the proxy CPU, so this is about half of what a two-hop path on one core can carry), "
             f"50 connections. The sidecar and the egress gateway run one worker each; etcd and the admin API "
             f"run on the load CPU. `nginx two-hop` is nginx → nginx → backend, the like-for-like baseline.\n")
    L.append("| path | p50 µs | p99 µs | p99.9 µs | added p50 | added p99 | upstream conns (per 10k req) | errors |")
    L.append("|---|---|---|---|---|---|---|---|")
    base50 = median([r["latency_us"]["p50"] for r in th["runs"]["direct"]])
    base99 = median([r["latency_us"]["p99"] for r in th["runs"]["direct"]])
    added = {}
    for name, rs in th["runs"].items():
        p50 = median([r["latency_us"]["p50"] for r in rs])
        p99 = median([r["latency_us"]["p99"] for r in rs])
        p999 = median([r["latency_us"]["p999"] for r in rs])
        errs = sum(sum(r["errors"].values()) for r in rs)
        added[name] = (p50 - base50, p99 - base99)
        L.append(f"| {name} | {fmt(p50)} | {fmt(p99)} | {fmt(p999)} | {fmt(p50 - base50)} | {fmt(p99 - base99)} | "
                 f"{conns(rs)} | {errs} |")
    if added.get("nginx", (0, 0))[0] > 0:
        L.append(f"\nAdded p50 latency of the two-hop mesh path vs one nginx hop: "
                 f"**{added['mesh two-hop'][0] / added['nginx'][0]:.2f}×** (target ≤ 2×); added p99: "
                 f"{added['mesh two-hop'][1] / max(added['nginx'][1], 1):.2f}×.")
    if added.get("nginx two-hop", (0, 0))[0] > 0:
        L.append(f"Against two nginx hops: {added['mesh two-hop'][0] / added['nginx two-hop'][0]:.2f}× the added p50.")
    L.append("\nTwo-hop max throughput, 50 connections, closed loop (meshgate-load):\n")
    L.append("| path | req/s | CPU µs/req (both proxies) | upstream conns (per 10k req) |")
    L.append("|---|---|---|---|")
    for name, m in res["two_hop_max"].items():
        L.append(f"| {name} | {fmt(median([r['rps'] for r in m]))} | "
                 f"{fmt(median([r.get('cpu_us_per_req', 0) for r in m]), 1)} | {conns(m)} |")
    L.append("")

    L.append("### Memory (RSS)\n")
    L.append("| process | idle | after load (VmHWM peak) | target |")
    L.append("|---|---|---|---|")
    g0, g1 = res["gateway_rss_idle"], res["gateway_rss_load"]
    s0, s1 = res["sidecar_rss_idle"], res["sidecar_rss_load"]
    c1 = res["cluster_gateway_rss_load"]
    L.append(f"| gateway, standalone, demo config + bench route | {g0['rss_kb'] / 1024:.1f} MB | {g1['hwm_kb'] / 1024:.1f} MB | ≤ 30 MB |")
    L.append(f"| gateway, etcd cluster (two-hop runs) | - | {c1['hwm_kb'] / 1024:.1f} MB | ≤ 30 MB |")
    L.append(f"| lite-sidecar (two-hop runs) | {s0['rss_kb'] / 1024:.1f} MB | {s1['hwm_kb'] / 1024:.1f} MB | ≤ 15 MB |")
    L.append("")

    p = res["propagation"]
    L.append("### Config propagation\n")
    L.append(f"{p['changes']} route changes through the admin API (etcd on the load CPU, 3 gateways on the proxy "
             f"CPU); time from sending each PUT until each gateway has applied its revision "
             f"(`GET /config/revision?at_least=<version>` long-poll on each gateway).\n")
    L.append("| samples | p50 ms | p99 ms | max ms | per-gateway p50 ms |")
    L.append("|---|---|---|---|---|")
    per = ", ".join(f"{k} {v:.2f}" for k, v in p["per_gateway_p50_ms"].items())
    L.append(f"| {p['changes'] * p['gateways']} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['max_ms']:.2f} | {per} |\n")

    sc = res["sidecar_scale"]
    L.append("### Sidecar policy against the size of the mesh\n")
    L.append("N services (each with an endpoint, a timeout and a label) in etcd, PUT through the admin API. "
             "A fresh lite-sidecar (its service calls 2 destinations, one in direct mode) and, for contrast, a "
             "fresh central gateway (which holds the whole config) are started against them; load time is "
             "from process start until `/readyz` reports policy `fresh` (sidecar) or ready (gateway); RSS is "
             "read 1 s later. Medians of the runs.\n")
    L.append("| services in etcd | sidecar load ms | sidecar RSS MB | central gateway load ms | central gateway RSS MB |")
    L.append("|---|---|---|---|---|")
    for row in sc:
        def m(kind, key):
            return median([x[key] for x in row[kind]])
        L.append(f"| {row['services']:,} | {m('sidecar', 'load_ms'):.0f} | {m('sidecar', 'rss_kb') / 1024:.1f} | "
                 f"{m('central', 'load_ms'):.0f} | {m('central', 'rss_kb') / 1024:.1f} |")
    L.append("")

    fo = res["failover"]
    L.append("### Fail-over under load\n")
    L.append(f"Open loop at {fo['rate']:,} req/s (GET, 20 connections) through a lite-sidecar whose group has "
             f"two egress gateways, with a central gateway behind them. One group gateway is SIGKILLed at "
             f"{fo['killed_at_s']:.1f} s; etcd is stopped at {fo['etcd_stopped_at_s']:.1f} s and stays down. "
             f"Latency from each request's intended send time. Windows are the 2 s from each event.\n")
    L.append("| window | requests ok | errors | worst 1 s p99 µs | max µs |")
    L.append("|---|---|---|---|---|")
    for key, title in (("baseline", "before (steady state)"), ("gateway_killed", "group gateway SIGKILLed"),
                       ("etcd_stopped", "etcd stopped")):
        w = fo[key]
        L.append(f"| {title} | {w['ok']:,} | {w['errors']} | {w['p99_us']:,} | {w['max_us']:,} |")
    errs = ", ".join(f"{k}: {v}" for k, v in fo["errors"].items()) or "none"
    L.append(f"\nWhole run: {fo['requests']:,} requests; errors: {errs}. Sidecar policy after etcd stopped: "
             f"`{fo['policy_after']}`.\n")

    L.append("### Route table scale\n")
    L.append("Routes loaded through the gateway's config compiler; `match` is one lookup on the published "
             "table; `apply one change` is one changed route from watch event to published snapshot.\n")
    L.append("| shape | routes | initial load ms | match p50 ns | match p99 ns | apply one change p50 µs | p99 µs |")
    L.append("|---|---|---|---|---|---|---|")
    for shape, r in res["route_scale"].items():
        a = r["apply_one_change_us"]
        L.append(f"| {shape} | {r['routes']:,} | {r['initial_load_ms']:.0f} | {r['match_ns']['p50']:,} | "
                 f"{r['match_ns']['p99']:,} | {a['p50']:,.0f} | {a['p99']:,.0f} |")
    L.append("\n`hosts`: one host per route (`svc-N.example.com`, prefix `/`); `paths`: one shared host, "
             "a path prefix per route (`/svc-N`).\n")
    return "\n".join(L)


def write_benchmarks(path, body):
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="interleaved repetitions per scenario")
    ap.add_argument("--duration", type=int, default=10, help="seconds per run")
    ap.add_argument("--changes", type=int, default=200, help="route changes for the propagation test")
    ap.add_argument("--routes", type=int, default=50_000, help="routes for the route-table scale test")
    ap.add_argument("--scale-services", type=lambda v: [int(x) for x in v.split(",")],
                    default=[10, 1000, 10000], help="mesh sizes (services in etcd) for the sidecar scale test")
    ap.add_argument("--scale-sidecars", type=int, default=10_000,
                    help="simulated sidecars (and services) in the control-plane scale scenario")
    ap.add_argument("--scale-lease-ttl", type=int, default=10,
                    help="scale: the simulated sidecars' node-record lease TTL, s (lease_ttl_s)")
    ap.add_argument("--soak-minutes", type=float, default=60, help="soak: how long")
    ap.add_argument("--soak-rate", type=int, default=200, help="soak: req/s through the sidecar")
    ap.add_argument("--soak-kill-every", type=int, default=300, help="soak: s between group-gateway kills")
    ap.add_argument("--soak-etcd-every", type=int, default=600, help="soak: s between etcd stops")
    ap.add_argument("--soak-etcd-down", type=int, default=60, help="soak: s etcd stays down")
    ap.add_argument("--soak-warmup", type=int, default=300, help="soak: s before RSS slopes are fitted")
    ap.add_argument("--failover-rate", type=int, default=1000, help="req/s through the sidecar in the fail-over run")
    # HAProxy needs two descriptors per maxconn; this machine's hard limit
    # is 20,000, so its maxconn is 9,900 and the row holds 9,000.
    ap.add_argument("--idle-conns", type=int, default=9_000, help="idle_memory: client connections per target")
    ap.add_argument("--idle-wait", type=int, default=5, help="idle_memory: s idle before RSS is read")
    ap.add_argument("--proxy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition of 2 s, 20 changes, 5,000 routes; prints, writes nothing")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--only", type=lambda v: v.split(","),
                    help="development: run only these cluster scenarios (e.g. sidecar_scale,failover); prints raw JSON")
    args = ap.parse_args()
    # Room for the idle-connection row's client sockets (the proxies
    # inherit it too).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.quick:
        args.idle_conns = 1000
        args.runs, args.duration, args.changes, args.routes = 1, 2, 20, 5000
        args.scale_services = [10, 500]
    for tool in ("nginx", "haproxy", "wrk", "h2load", "etcd", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (loadtest/run.sh installs it)")
    b = Bench(args)
    res = b.run()
    if args.only:
        print(json.dumps(res, indent=1, default=str))
        return
    machine = b.machine()
    body = report(res, machine, args, b.commands)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": res}, f, indent=1, default=str)
    if args.quick:
        print(body)
    else:
        write_benchmarks(args.out, body)
        log(f"wrote {args.out}")
    shutil.rmtree(b.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
