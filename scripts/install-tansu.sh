#!/usr/bin/env bash
# Install the Kafka-protocol broker the Kafka end-to-end tests start:
# tansu 0.6.0 with its SQLite (libsql) storage engine. The build takes about
# 11 minutes on 2 cores, so it goes into a cached root and is skipped when
# that version is already there. Prints the path of the tansu binary.
set -euo pipefail
version=0.6.0
root="${KWQ_TOOLS_DIR:-$HOME/.cache/kwq-tools}/tansu-$version"
if [ ! -x "$root/bin/tansu" ]; then
  # A private target dir keeps this build from locking the project's.
  CARGO_TARGET_DIR="$root/build" cargo install tansu --locked --version "$version" \
    --features libsql --root "$root" >&2 || \
  CARGO_TARGET_DIR="$root/build" cargo install tansu --version "$version" \
    --features libsql --root "$root" >&2
  rm -rf "$root/build"
fi
echo "$root/bin/tansu"
