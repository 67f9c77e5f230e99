#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup.sh) and runs every test: formatting, lints, unit
# tests, the network-namespace integration tests (real XDP on veths, real daemons) and
# the packaging test. Needs root. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n== %s ==\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
step "build (debug: the integration tests run target/debug/flynode)"
cargo build --workspace
step "unit and integration tests"
# wg is installed by setup.sh, so the wg-compatibility tests must not skip.
FLYNODE_REQUIRE_WG=1 cargo test --workspace
step "packaging test (.deb, lintian, install into a throwaway root)"
./packaging/test-deb.sh
step "all tests passed"
