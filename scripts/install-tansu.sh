#!/usr/bin/env bash
# Install the Kafka-protocol broker the Kafka end-to-end tests start:
# tansu 0.6.0 with its SQLite (libsql) storage engine, into a cached root
# (skipped when that version is already there). Prints the path of the
# tansu binary. Safe to run twice at once (say, two test runs on a fresh
# machine): the second waits for the first's build.
#
# tansu's own release profile asks for one codegen unit and thin LTO; a
# test broker does not need that last 10-20% of speed, and without them the
# build takes about half as long on 2 cores.
set -euo pipefail
version=0.6.0
root="${KWQ_TOOLS_DIR:-$HOME/.cache/kwq-tools}/tansu-$version"
mkdir -p "$root"
exec 9>"$root.lock"
flock 9
if [ ! -x "$root/bin/tansu" ]; then
  export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_LTO=false \
    CARGO_PROFILE_RELEASE_DEBUG=false
  # A private target dir keeps this build from locking the project's.
  CARGO_TARGET_DIR="$root/build" cargo install tansu --locked --version "$version" \
    --features libsql --root "$root" >&2 || \
  CARGO_TARGET_DIR="$root/build" cargo install tansu --version "$version" \
    --features libsql --root "$root" >&2
  rm -rf "$root/build"
fi
echo "$root/bin/tansu"
