#!/usr/bin/env python3
"""Writes lite-sidecar/hot-symbols.txt, the sidecar's link order, from
callgrind profiles of the sidecar under load: every function it ran,
most run first.

    MESHGATE_BENCH_SIDECAR_WRAP="valgrind --tool=callgrind --demangle=no \\
      --compress-strings=no --compress-pos=no --dump-instr=no \\
      --callgrind-out-file=/tmp/cg.%p.out" \\
      python3 loadtest/bench.py --only mtls --runs 1 --duration 3
    python3 loadtest/hot-symbols.py /tmp/cg.*.out

(then rebuild: `cargo build --release --bins`). Run it again when the
mTLS benchmark's `hot_symbols` shows many listed names no longer found.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def self_costs(path, cost):
    cur, skip = None, False
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                cur = line[3:].strip()
                cost.setdefault(cur, 0)
            elif line.startswith("calls="):
                skip = True  # the next cost line is the call's, not this function's
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if skip:
                    skip = False
                elif cur and len(parts) >= 2 and parts[1].isdigit():
                    cost[cur] += int(parts[1])


def main():
    cost = {}
    for p in sys.argv[1:]:
        self_costs(p, cost)
    names = [n for n, _ in sorted(cost.items(), key=lambda x: -x[1])
             if not n.startswith(("0x", "(")) and "@" not in n and " " not in n]
    out = os.path.join(ROOT, "lite-sidecar", "hot-symbols.txt")
    with open(out, "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"{len(names)} functions written to {out}")


if __name__ == "__main__":
    main()
