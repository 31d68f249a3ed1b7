#!/usr/bin/env bash
# Checks that the engine's folders depend one way (gateway/src/lib.rs has
# the table): lists every `crate::` edge between top-level modules of
# gateway/src and fails on one that points up a layer or sideways within
# one. `--edges` prints the edges found. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'EOF'
import os, re, sys

SRC = "gateway/src"
# Lowest first. A module may use modules of lower layers, and itself.
LAYERS = [
    # `testing` (cfg(test) only) holds the unit tests' shared helpers,
    # which every layer's tests use, so it sits at the bottom.
    {"alloc", "clock", "maps", "metrics", "tls", "testing"},
    {"http"},
    {"server", "upstream", "observe", "policy"},
    {"routing"},
    {"snapshot"},
    {"proxy"},
    {"node"},
    # Test-only entry points for the fuzz targets (feature `fuzzing`).
    {"fuzzing"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def top_module(path):
    rel = os.path.relpath(path, SRC)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".rs") else head


def targets(text):
    """The top-level modules a file names through `crate::`."""
    found = set()
    # `use crate::{a::x, b}` and nested braces: the first segment of each
    # path inside the outermost braces.
    for m in re.finditer(r"crate::\{", text):
        depth, i, start = 1, m.end(), m.end()
        parts, cur = [], start
        while depth and i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    parts.append(text[cur:i])
            elif c == "," and depth == 1:
                parts.append(text[cur:i])
                cur = i + 1
            i += 1
        for p in parts:
            seg = re.match(r"\s*(\w+)", p)
            if seg and seg.group(1) != "self":
                found.add(seg.group(1))
    for m in re.finditer(r"crate::(\w+)", text):
        found.add(m.group(1))
    return found


def strip_comments(text):
    return re.sub(r"//[^\n]*", "", text)


edges, bad = set(), []
for root, _, files in os.walk(SRC):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(root, f)
        src_mod = top_module(path)
        if src_mod in ("lib", "main"):
            continue
        if src_mod not in RANK:
            bad.append(f"{path}: module {src_mod} is in no layer (add it to scripts/check-layers.sh and lib.rs)")
            continue
        for dst in targets(strip_comments(open(path).read())):
            if dst == src_mod or dst not in RANK:
                continue
            edges.add((src_mod, dst, path))
            if RANK[dst] >= RANK[src_mod]:
                way = "up" if RANK[dst] > RANK[src_mod] else "sideways"
                bad.append(f"{path}: {src_mod} -> {dst} points {way}")

if "--edges" in sys.argv:
    for s, d, p in sorted(edges):
        print(f"{s} -> {d}  ({p})")
if bad:
    print("layering violations in gateway/src:", *sorted(set(bad)), sep="\n  ")
    sys.exit(1)
pairs = sorted({(s, d) for s, d, _ in edges})
print(f"layers ok: {len(pairs)} module edges, all downward")
EOF
