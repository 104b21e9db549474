#!/bin/bash
# Installs a real agent CLI, pinned, from the npm registry into
# target/agent-clis/NAME (once: later runs reuse it) and prints the path of
# its binary. NAME is claude (Claude Code) or codex. Used by .ci/run and by
# the tests that drive the real CLIs (tests/claude.rs, tests/codex.rs) when
# the binary is missing.
set -euo pipefail
case "${1:-}" in
  claude) package=@anthropic-ai/claude-code version=2.1.197 ;;
  codex) package=@openai/codex version=0.171.0 ;;
  *) echo "usage: $0 claude|codex" >&2; exit 64 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/target/agent-clis/$1"
bin="$dir/node_modules/.bin/$1"
if [ -x "$bin" ] && [ "$(cat "$dir/.version" 2>/dev/null)" = "$version" ]; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { echo "npm is missing: apt-get install npm" >&2; exit 1; }
mkdir -p "$dir"
npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "$package@$version" >&2
"$bin" --version >&2
echo "$version" > "$dir/.version"
echo "$bin"
