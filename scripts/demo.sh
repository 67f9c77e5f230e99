#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), builds flynode and runs `flynode demo`: a
# throwaway topology of network namespaces, torn down at the end (also on Ctrl-C).
# Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p flynode
exec ./target/release/flynode demo
