#!/usr/bin/env bash
# Checks that ARCHITECTURE.md's request paths are the code's own: each
# numbered list between `<!-- request-path: NAME -->` markers must equal,
# word for word, the numbered list in the module doc of the file that runs
# that path (intra-doc link brackets aside). Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - <<'PY'
import re, sys

SOURCES = {
    "gateway": "gateway/src/proxy/mod.rs",
    "sidecar": "lite-sidecar/src/forward.rs",
}

def words(text):
    text = re.sub(r"\[(`[^`]*`)\]", r"\1", text)
    return " ".join(text.split())

def module_list(path):
    out, on = [], False
    for line in open(path):
        if not line.startswith("//!"):
            if on:
                break
            continue
        t = line[3:].strip()
        if re.match(r"\d+\. ", t):
            on = True
        elif on and not t:
            break
        if on:
            out.append(t)
    return words("\n".join(out))

arch = open("ARCHITECTURE.md").read()
bad = []
for name, path in SOURCES.items():
    m = re.search(rf"<!-- request-path: {name} -->\n(.*?)<!-- /request-path -->", arch, re.S)
    if not m:
        bad.append(f"ARCHITECTURE.md: no request-path block for {name}")
        continue
    doc, code = words(m.group(1)), module_list(path)
    if not code:
        bad.append(f"{path}: no numbered list in the module doc")
    elif doc != code:
        i = next((i for i, (a, b) in enumerate(zip(doc, code)) if a != b), min(len(doc), len(code)))
        bad.append(f"{name}: ARCHITECTURE.md and {path} differ at ...{doc[max(0, i-40):i+40]!r} vs ...{code[max(0, i-40):i+40]!r}")
if bad:
    print("request paths out of step:", *bad, sep="\n  ")
    sys.exit(1)
print(f"request paths ok: {', '.join(SOURCES)} match ARCHITECTURE.md")
PY
