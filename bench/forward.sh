#!/usr/bin/env bash
# End-to-end forwarding benchmark (issue 5): client → edge → worker → container through
# flynode, against the same namespaces with plain kernel routing, in one run. See usage()
# or bench/README.md "### Forwarding".
#
# Everything runs inside network namespaces the benchmark binary creates (fn-hub-PID-*,
# fn-h1-PID-*, fn-h2-PID-*, fn-c1-PID-*, fn-c2-PID-*, fn-client-PID-*; addresses in
# 198.18.0.0/15, 2001:db8::/32 and fd00::/8) and removes itself, also on Ctrl-C; the trap
# below removes them too, and stops the flynode daemons in them, should the binary be
# killed outright.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/forward.sh [flynode-xdp-bench flags]   (as root)

Two flynode nodes on a bridged LAN (real `flynode run` daemons, release build, native
XDP + AF_XDP): node 1 is the edge the client is routed to, node 2 the only worker of an
echo service (anycast 198.18.100.1:7 → container 198.19.2.2:7). Our live-frames
generator (BPF_PROG_RUN of an XDP_TX program, pinned to CPU0) sends from the hub out of
the edge's veth; everything else — both daemons, both eth0 NAPI threads, the
container's counting socket (recvmmsg) and the softirqs — runs on CPU1. Then the daemons
stop and the same namespaces forward in the kernel (client → 198.19.2.2 via the edge,
the edge → via the worker), and the same measurements run again:

1. delivered datagrams/s at the container, 64- and 1200-byte payloads, 256 client
   ports, offered rates stepped up to the generator's maximum; peak and loss at the full
   rate; target: flynode >= 0.4x plain routing at 1200 bytes.
2. CPU per host at the peak (daemons, NAPI threads, from /proc/PID/stat).
3. round-trip latency p50/p99 of 2000 sequential request/replies to the echo service
   (anycast; the container directly for plain routing); target: added p50 <= 150 us.
4. 1,000,000 flows (one datagram per client address and port) through the edge, then
   the flow tables and VmRSS of both daemons; target: <= 256 MiB each.

Environment (defaults in brackets):
  BENCH_RUNS=N          rounds (a fresh topology, a flynode run, a plain routing run);
                        the target is on the median of the rounds' ratios [5]
  BENCH_SECONDS=S       measured seconds per offered rate [1]
  BENCH_WARMUP=S        settling time per offered rate [0.3]
  BENCH_FWD_RATES=LIST  offered rates in Mpps, `max` = unpaced
                        [0.02,0.04,0.06,0.07,0.08,0.09,0.1,0.11,0.12,0.135,0.15,0.175,0.2,0.225,0.25,0.275,0.3,0.4,0.5,max]
  BENCH_FWD_PAYLOADS=LIST  UDP payload bytes [64,1200]
  BENCH_FWD_FLOWS=N     client ports the generator cycles through [256]
  BENCH_PINGS=N         timed ping-pongs [2000]
  BENCH_MILLION=N       flows of the flow-table fill, 0 = skip [1000000]
  BENCH_MILLION_RATE=M  its rate in Mpps [0.4 x flynode's 64-byte peak]
  BENCH_FWD_ONLY=LIST   throughput,latency,flows,metrics [throughput,latency,flows];
                        metrics (opt-in): the cost of the metrics endpoint — flynode's
                        throughput with both daemons scraped every second vs their
                        endpoint disabled, alternating runs (daemons restart to switch);
                        target: cost < 3%. `BENCH_FWD_ONLY=metrics` runs only that.
  BENCH_RETRIES=N       repeat a run when other work took >10% of CPU1 [1]
  BENCH_QUIET_WAIT=S    wait up to S s for an idle machine first [30]
  BENCH_STRICT=1        exit 1 if a target is missed
  FLYNODE_BIN=PATH      the flynode binary [target/release/flynode, built first]
  FLYNODE_XDP_BENCH_BIN=PATH  the benchmark binary [built first]

Takes about 10 minutes on a quiet machine (plus the builds). Installs ethtool (apt) if missing.
EOF
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
esac

BENCH_NAME=forward.sh
BENCH_NEEDS_ROOT_FOR="network namespaces, XDP, AF_XDP, BPF_PROG_RUN"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

if [[ -z ${FLYNODE_BIN:-} ]]; then
  say "building flynode (cargo build --release -p flynode)"
  (cd "$REPO" && cargo build --release -q -p flynode)
  export FLYNODE_BIN=$REPO/target/release/flynode
fi

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_child 100
  # The binary stops its daemons and removes its namespaces itself; this only catches a
  # binary killed outright: the daemons it started are the processes left in its
  # namespaces.
  if [[ -n $CHILD ]]; then
    local ours dirs=()
    ours=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^fn-[a-z0-9]+-$CHILD-[0-9]+$" || true)
    for ns in $ours; do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do
        # A daemon's directory (keys, config) is a temporary directory its fixture would
        # have removed: `flynode run --config /tmp/.tmpXXXX/flynode.toml`.
        local config
        config=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -A1 -x -- --config | tail -n1 || true)
        [[ $config =~ ^(/tmp/\.tmp[A-Za-z0-9]+)/flynode\.toml$ ]] && dirs+=("${BASH_REMATCH[1]}")
        kill -TERM "$pid" 2>/dev/null || true
      done
    done
    [[ -n $ours ]] && sleep 1
    for ns in $ours; do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    done
    for dir in "${dirs[@]}"; do rm -rf -- "$dir"; done
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

warn_if_loaded

# Five runs: on this VM a path's peak varies by up to 1.5x from run to run.
export BENCH_RUNS=${BENCH_RUNS:-5}
"$BIN" forward "$@" &
CHILD=$!
wait "$CHILD"
