#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh), builds flynode and runs `flynode demo`: a
# throwaway topology of network namespaces, torn down at the end (also on Ctrl-C).
# Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# aya-build relays the eBPF crate's whole cargo output as build-script warnings: keep
# it in a log and show it only when the build fails.
log=$(mktemp /tmp/flynode-build.XXXXXX.log)
echo "building flynode (release; log: $log)" >&2
if ! cargo build --release -p flynode >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
rm -f "$log"
exec ./target/release/flynode demo
