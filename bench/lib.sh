# Shared by bench/xdp.sh and bench/forward.sh (sourced, not run). Sets BENCH_DIR, REPO,
# `say`; checks root and tools (installs ethtool if missing); builds or finds the
# benchmark binary into BIN; `stop_child TENTHS` and `warn_if_loaded` for the callers'
# cleanup and start.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
exec 7>&2
say() { echo "$BENCH_NAME: $*" >&7; }

if [[ $(id -u) -ne 0 ]]; then
  say "needs root ($BENCH_NEEDS_ROOT_FOR)"
  exit 2
fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need ethtool; then
  say "installing ethtool"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q ethtool >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q ethtool >/dev/null; }
fi
for tool in ip sysctl; do
  need "$tool" || { say "missing $tool (iproute2/procps)"; exit 2; }
done

BIN=${FLYNODE_XDP_BENCH_BIN:-}
if [[ -z $BIN ]]; then
  say "building flynode-xdp-bench (cargo build --release)"
  (cd "$REPO" && cargo build --release -q -p flynode-xdp-bench)
  BIN=$REPO/target/release/flynode-xdp-bench
fi

CHILD=
# SIGTERM to the benchmark binary, SIGKILL if it is still there after TENTHS × 0.1 s.
stop_child() {
  if [[ -n $CHILD ]] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null || true
    for _ in $(seq "$1"); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$CHILD" 2>/dev/null || true
  fi
}

warn_if_loaded() {
  local load1
  read -r load1 _ </proc/loadavg
  if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
    say "warning: load average $load1: other work on this machine skews the numbers"
  fi
}
