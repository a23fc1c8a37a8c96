#!/usr/bin/env bash
# Run every test of the workspace on a fresh machine: installs the Wasm
# targets the task modules are built for (rustup does not add a toolchain
# file's targets by itself when RUSTUP_AUTO_INSTALL=0) and Chromium with
# chromedriver for the dashboard test, python3 for the example worker, componentize-py and componentize-js for
# the Python and JavaScript task projects, and the tansu Kafka broker for the
# Kafka tests (about 20 minutes the first time on 2 cores, cached after), then
# runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
# The dashboard's browser test drives Debian's Chromium through chromedriver.
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The Python example worker (examples/python-worker) is tested against a real host.
if ! command -v python3 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi
# The language tests build Python and JavaScript task modules (kwq build runs
# componentize-py and componentize-js; both cached after the first install).
eval "$(bash scripts/install-guest-tools.sh)"
# The Kafka end-to-end tests start a tansu broker (built once, then cached).
KWQ_TANSU="$(bash scripts/install-tansu.sh)"
export KWQ_TANSU
# A release build: the README's serve script (run by tests/all/readme.rs in
# a copy of the tree) then finds the same artefacts fresh, instead of a
# second build of the tree, and Wasm compiles and runs at full speed.
exec cargo test --workspace --release "$@"
