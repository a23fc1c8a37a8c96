#!/usr/bin/env bash
# Check that the README's serve script (`cargo build --release -p kwq`)
# would reuse every dependency the README's test script (`cargo test
# --workspace --release`) builds: both unit graphs must ask for the same
# features of each crate. When a test-only dependency turns on a feature
# the binary alone does not, cargo builds that crate and everything above
# it a second time (most of wasmtime: 20 minutes of a CI run on 2 cores).
# The fix is a feature-aligning entry in host/Cargo.toml (see the comment
# there). Reads the unit graphs only (cargo's unstable --unit-graph, let
# through by RUSTC_BOOTSTRAP=1); builds nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
graphs=$(mktemp -d)
trap 'rm -rf "$graphs"' EXIT
RUSTC_BOOTSTRAP=1 cargo build --release -p kwq --unit-graph -Z unstable-options > "$graphs/serve.json"
RUSTC_BOOTSTRAP=1 cargo test --workspace --release --no-run --unit-graph -Z unstable-options > "$graphs/test.json"
python3 - "$graphs/serve.json" "$graphs/test.json" <<'PY'
import json, sys

def units(path):
    found = {}
    for unit in json.load(open(path))["units"]:
        key = (unit["pkg_id"], unit["target"]["name"], unit["mode"], unit["platform"] or "")
        found.setdefault(key, set()).add(tuple(sorted(unit["features"])))
    return found

serve, test = units(sys.argv[1]), units(sys.argv[2])
differ = [
    (key, features, test.get(key, set()))
    for key, features in serve.items()
    if not features <= test.get(key, set())
]
for (pkg, target, mode, _), features, built in differ:
    print(f"{pkg} ({target}, {mode}): serve script wants {sorted(features)}, tests build {sorted(built)}")
if differ:
    print(f"{len(differ)} crate(s) would be built twice: align their features in host/Cargo.toml")
    sys.exit(1)
print(f"build reuse: all {len(serve)} units of the serve script are in the tests' build")
PY
