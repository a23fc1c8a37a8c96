#!/usr/bin/env bash
# Install the guest build tools the language tests use, into a cached root
# (skipped when that version is already there): componentize-py from PyPI
# in its own virtual environment, componentize-js from npm in its own
# prefix. Prints two lines for `eval`: KWQ_COMPONENTIZE_PY=... and
# KWQ_COMPONENTIZE_JS=..., the variables `kwq build` reads.
set -euo pipefail
py_version=0.25.1
js_version=0.23.0
root="${KWQ_TOOLS_DIR:-$HOME/.cache/kwq-tools}"
py="$root/componentize-py-$py_version"
js="$root/componentize-js-$js_version"
if [ ! -x "$py/bin/componentize-py" ]; then
  rm -rf "$py"
  python3 -m venv "$py" >&2
  "$py/bin/pip" install -q "componentize-py==$py_version" >&2
fi
if [ ! -x "$js/node_modules/.bin/componentize-js" ]; then
  if ! command -v npm >/dev/null; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >&2
  fi
  rm -rf "$js"
  mkdir -p "$js"
  npm install -s --no-audit --no-fund --prefix "$js" "@bytecodealliance/componentize-js@$js_version" >&2
fi
echo "export KWQ_COMPONENTIZE_PY=$py/bin/componentize-py"
echo "export KWQ_COMPONENTIZE_JS=$js/node_modules/.bin/componentize-js"
