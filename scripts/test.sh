#!/usr/bin/env bash
# Run every test of the workspace on a fresh machine: installs the Wasm
# targets the task modules are built for (rustup does not add a toolchain
# file's targets by itself when RUSTUP_AUTO_INSTALL=0) and Chromium with
# chromedriver for the dashboard test, then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
# The dashboard's browser test drives Debian's Chromium through chromedriver.
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
exec cargo test --workspace "$@"
