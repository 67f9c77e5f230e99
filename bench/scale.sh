#!/usr/bin/env bash
# Fleet-scale benchmark (issue 23): what a map of N nodes costs. Today: `flynode
# check-config` (parse + validation of the node config and the routing file, what the
# unit's ExecStartPre runs at every start) for N = 100, 1,000, 5,000, 10,000, as CPU
# time (user + system, the child's rusage from wait4: the machine's load does not
# enter it), the median of BENCH_RUNS runs, and its growth against N = 1,000 measured
# in the same run. Targets: 5,000 nodes <= 1 s; 10,000 / 1,000 <= 12.
# CPU time is the kernel's accounting, sampled at the scheduler tick on some kernels:
# the 100-node figure is near its resolution; the ratio uses 1,000 and 10,000.
#
# The daemon phase (as root; BENCH_DAEMON=0 skips it) runs `flynode run` with maps of
# BENCH_DAEMON_SIZES nodes in a network namespace it creates (a veth pair in
# 198.18.30.0/24; every other node's endpoint is the peer end, where nobody answers)
# and reports ready time, a one-node change, status latency during that reload, idle
# CPU and packets to the silent peers over BENCH_IDLE seconds [30], and RSS. The
# namespace and the temporary directory are removed on exit, also on failure.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bench/scale.sh

Environment (defaults in brackets):
  BENCH_SIZES="N ..."   map sizes [100 1000 5000 10000]
  BENCH_RUNS=N          runs per size, median taken [3]
  FLYNODE_BIN=PATH      the flynode binary [target/release/flynode, built first]
  BENCH_STRICT=1        exit 1 if a check-config target is missed
  BENCH_DAEMON=0        skip the daemon phase (needs root otherwise)
  BENCH_DAEMON_SIZES="N ..."  map sizes of the daemon phase [1000 5000 10000]
  BENCH_IDLE=S          idle window per size, seconds [30]
USAGE
}
case ${1:-} in -h | --help) usage; exit 0 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
SIZES=${BENCH_SIZES:-100 1000 5000 10000}
RUNS=${BENCH_RUNS:-3}
FLYNODE=${FLYNODE_BIN:-}
if [[ -z $FLYNODE ]]; then
  echo "scale.sh: building flynode (cargo build --release -p flynode)" >&2
  (cd "$REPO" && cargo build --release -q -p flynode)
  FLYNODE=$REPO/target/release/flynode
fi

DIR=$(mktemp -d /tmp/flynode-scale.XXXXXX)
trap 'rm -rf "$DIR"' EXIT INT TERM

# CPU seconds of one check-config of the N-node map (user + system of the child, from
# getrusage; /usr/bin/time rounds to 10 ms, too coarse for the small maps).
cpu_of() {
  python3 - "$FLYNODE" "$DIR/node-$1.toml" <<'PY'
import os, subprocess, sys
child = subprocess.Popen([sys.argv[1], "check-config", sys.argv[2]], stdout=subprocess.DEVNULL)
_, status, r = os.wait4(child.pid, 0)  # this child's own rusage, nothing else's
if status != 0:
    sys.exit(f"check-config failed ({status})")
print(f"{r.ru_utime + r.ru_stime:.4f}")
PY
}

declare -A MEDIAN
printf '%-8s %-14s %-10s %s\n' nodes "map bytes" "CPU s" "runs"
for n in $SIZES; do
  python3 "$REPO/bench/scale_map.py" "$n" "$DIR"
  runs=()
  for _ in $(seq "$RUNS"); do runs+=("$(cpu_of "$n")"); done
  MEDIAN[$n]=$(printf '%s\n' "${runs[@]}" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
  printf '%-8s %-14s %-10s %s\n' "$n" "$(stat -c %s "$DIR/routing-$n.toml")" "${MEDIAN[$n]}" "${runs[*]}"
done

fail=0
if [[ -n ${MEDIAN[5000]:-} ]]; then
  verdict=$(awk -v t="${MEDIAN[5000]}" 'BEGIN { print (t <= 1.0) ? "PASS" : "FAIL" }')
  echo "check-config, 5,000 nodes: ${MEDIAN[5000]} s CPU (target <= 1 s): $verdict"
  [[ $verdict == PASS ]] || fail=1
fi
if [[ -n ${MEDIAN[1000]:-} && -n ${MEDIAN[10000]:-} ]]; then
  ratio=$(awk -v a="${MEDIAN[1000]}" -v b="${MEDIAN[10000]}" 'BEGIN { printf "%.1f", (a > 0) ? b / a : 0 }')
  verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 12) ? "PASS" : "FAIL" }')
  echo "check-config, 10,000 / 1,000 nodes: ${ratio}x (target <= 12x, linear is 10x): $verdict"
  [[ $verdict == PASS ]] || fail=1
fi
# Daemon phase (root: a network namespace with a veth pair): one `flynode run` per size
# with every other node of the map silent; see bench/scale_daemon.py.
if [[ ${BENCH_DAEMON:-1} == 1 ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scale.sh: daemon phase skipped (needs root; BENCH_DAEMON=0 to skip quietly)" >&2
  else
    NS=fn-scale-$$
    trap 'ip netns del "$NS" 2>/dev/null || true; rm -rf "$DIR"' EXIT INT TERM
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add v0 type veth peer name v1
    ip -n "$NS" addr add 198.18.30.1/24 dev v0
    ip -n "$NS" addr add 198.18.30.2/24 dev v1
    ip -n "$NS" link set v0 up
    ip -n "$NS" link set v1 up
    echo
    printf '%-8s %-8s %-9s %-8s %-9s %-12s %-12s %-10s %-12s %s\n' nodes "ready s" "change s" "read ms" "apply ms" "status idle" "status rld" "idle CPU%" "to silent/s" "RSS MiB"
    python3 "$REPO/bench/scale_daemon.py" "$FLYNODE" "$NS" "$DIR" "${BENCH_IDLE:-30}" \
      ${BENCH_DAEMON_SIZES:-1000 5000 10000} | while read -r line; do
      python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"{r['nodes']:<8} {r['ready_s']:<8} {r['change_s']!s:<9} {r['read_ms']!s:<8} {r['apply_ms']!s:<9} "
      f"{r['status_idle_s']:<12} {r['status_during_reload_s']:<12} {r['idle_cpu_pct']:<10} "
      f"{r['to_silent_pkt_s']:<12} {r['rss_mib']}")
PY
    done
    echo "targets (5,000 nodes): ready <= 5 s, change <= 0.1 s, status <= 0.1 s, idle CPU <= 2%, <= 10 pkt/s to silent peers; RSS at 10,000 <= 128 MiB"
  fi
fi
if [[ ${BENCH_STRICT:-0} == 1 && $fail == 1 ]]; then exit 1; fi
