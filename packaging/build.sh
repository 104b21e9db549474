#!/usr/bin/env bash
# Builds the .deb and the .rpm from a clean tree, in one command:
#   packaging/build.sh        → target/debian/ralph-qchat_*.deb, target/generate-rpm/ralph-qchat-*.rpm
# Installs cargo-deb and cargo-generate-rpm when they are missing. The rpm's
# man pages are the gzipped ones made here (cargo-generate-rpm takes files as
# they are; cargo-deb compresses its own).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null || cargo install --locked cargo-generate-rpm
mkdir -p target/man
for m in man/*; do gzip -9n -c "$m" > "target/man/$(basename "$m").gz"; done
cargo deb -q >/dev/null
cargo generate-rpm
ls -t target/debian/ralph-qchat_*.deb | head -1
ls -t target/generate-rpm/ralph-qchat-*.rpm | head -1
