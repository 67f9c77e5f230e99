#!/usr/bin/env bash
# XDP benchmark: classifier cost (BPF_PROG_RUN) and delivered datagrams per second
# (AF_XDP vs UDP socket, live-frames generator over a veth). See usage() or
# bench/README.md "### XDP".
#
# Everything runs inside network namespaces that the benchmark binary creates
# (fn-fxbgen-PID-*, fn-fxbrx-PID-*, fn-fxbcls-PID-*; addresses in 198.18.71.0/24) and
# removes itself, also on Ctrl-C; the trap below removes them too should the binary be
# killed outright.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/xdp.sh [classify|deliver|all] [flynode-xdp-bench flags]   (as root)

1. classify: ns per packet of flynode's XDP classifier against a trivial XDP_DROP
   program (BPF_PROG_RUN, 10M repeats, median of 5 rounds) on representative frames,
   plus the cost of one bare hash-map lookup for reference; target trivial/classifier
   >= 0.6 on the mean.
2. deliver: datagrams per second delivered to a userspace consumer, AF_XDP (flynode's
   classifier + an AF_XDP socket, copy mode) vs an ordinary UDP socket (recvmmsg, GRO,
   64 MiB buffer), fed by our live-frames generator (BPF_PROG_RUN of an XDP_TX program)
   over a veth between two network namespaces; generator on CPU0, consumer and the
   veth's napi kthread on CPU1. Each run steps through offered rates; the peak delivered
   rate is compared; target AF_XDP >= 3x the socket. Two workloads: one flow (GRO's best
   case) and 256 client ports.

Environment (defaults in brackets):
  BENCH_RUNS=N        runs per receiver and workload, the median is reported [3]
  BENCH_SECONDS=S     measured seconds per offered rate [1]
  BENCH_WARMUP=S      settling time per offered rate [0.3]
  BENCH_RATES=LIST    offered rates in Mpps, `max` = unpaced
                      [0.25,0.5,0.75,1,1.25,1.5,2,2.5,3,4,max]
  BENCH_FLOWS=LIST    workloads: client ports cycled through [1,256]
  BENCH_ONLY=LIST     receivers: socket,af_xdp,af_xdp_bare [all]; af_xdp_bare is a
                      redirect-only program into the same socket: the ceiling of
                      any AF_XDP receiver, printed as a ratio to the socket
  BENCH_CONSUMER_SCHED=batch|other   consumer threads' policy [batch]
  BENCH_PAYLOAD=N     UDP payload bytes [64]
  BENCH_REPEAT=N      BPF_PROG_RUN repeat count for classify [10000000]
  BENCH_ROUNDS=N      timed rounds per frame and program for classify [5]
  BENCH_QUIET_WAIT=S  before each run, wait up to S s for no CPU to be >10% busy [30]
  BENCH_RETRIES=N     repeat a run when other tasks took >10% of CPU0/CPU1 [1]
  BENCH_STRICT=1      exit 1 if a target is missed
  FLYNODE_XDP_BENCH_BIN=PATH  use this binary instead of building it

Takes about 4 minutes with the defaults on a quiet machine (longer when it has to wait). Installs ethtool (apt) if missing. Everything
runs in network namespaces the benchmark creates and removes (also on Ctrl-C);
addresses 198.18.71.0/24. See `flynode-xdp-bench --help` for every flag.
EOF
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
esac

BENCH_NAME=xdp.sh
BENCH_NEEDS_ROOT_FOR="BPF programs, network namespaces, AF_XDP"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"


cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_child 50
  # The binary removes its namespaces itself; this only catches a binary killed outright.
  if [[ -n $CHILD ]]; then
    ip netns list 2>/dev/null | awk '{print $1}' |
      grep -E "^fn-fxb(gen|rx|cls)-$CHILD-[0-9]+$" |
      while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

warn_if_loaded

"$BIN" "$@" &
CHILD=$!
wait "$CHILD"
