#!/bin/bash
# Installs Claude Code, pinned, from the npm registry into target/claude-code
# (once: later runs reuse it) and prints the path of its binary. Used by
# .ci/run and by tests/claude.rs when the binary is missing.
set -euo pipefail
version=2.1.197
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/target/claude-code"
bin="$dir/node_modules/.bin/claude"
if [ -x "$bin" ] && [ "$(cat "$dir/.version" 2>/dev/null)" = "$version" ]; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { echo "npm is missing: apt-get install npm" >&2; exit 1; }
mkdir -p "$dir"
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error \
  "@anthropic-ai/claude-code@$version" >&2
"$bin" --version >&2
echo "$version" > "$dir/.version"
echo "$bin"
