#!/usr/bin/env bash
# Start a KWQ host on the embedded store (./kwq-data) with the bundled
# example modules uploaded. Installs the Wasm targets the modules are built
# for first (rustup does not add a toolchain file's targets by itself when
# RUSTUP_AUTO_INSTALL=0). Extra arguments go to `kwq serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
cargo build --release -p kwq
exec target/release/kwq serve --examples "$@"
