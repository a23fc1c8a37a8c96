#!/usr/bin/env bash
# Run every test of the workspace on a fresh machine: installs the Wasm
# targets the task modules are built for (rustup does not add a toolchain
# file's targets by itself when RUSTUP_AUTO_INSTALL=0), then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
exec cargo test --workspace "$@"
