#!/usr/bin/env bash
# Control-plane latency benchmark (issue 6): time from a routing change to the new entry
# in a running daemon's XDP services map, through etcd and, as the baseline, through
# the routing file. See usage() or bench/README.md "### Fleet".
#
# Everything runs in one network namespace this script creates (fn-fleet-PID: loopback
# for etcd, a veth pair v0/v1 in 198.18.20.0/24 for the daemon's XDP program); the trap
# stops the processes it started (by PID) and removes the namespace and the temporary
# directory, also on failure and Ctrl-C.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/fleet.sh   (as root)

Starts etcd (Debian's etcd-server, data in a temporary directory) and one
`flynode run` (release build, generic XDP on a veth) with `[source.etcd]`, waits for the
node's record in etcd, then times 100 changes of a service record (`bench`, anycast
198.18.0.53: even changes add port 20000+i, odd ones remove it again): t0 just before
the etcd put, t1 when a poll of the daemon's XDP services map (every 200 us, the map
opened by id through the attached program) shows the change; 5 s timeout per change.
Then the daemon restarts with `[source] file = ...` (the same node record) and the same
changes are made by rewriting the routing file (write + rename). Prints p50/p90/p99/max
for both and PASS/FAIL for the target: etcd write -> XDP map p99 <= 500 ms.

Environment (defaults in brackets):
  BENCH_FLEET_CHANGES=N  timed changes per source [100]
  BENCH_STRICT=1         exit 1 if the target is missed
  FLYNODE_BIN=PATH       the flynode binary [target/release/flynode, built first]
  FLYNODE_XDP_BENCH_BIN=PATH  the benchmark binary [built first]

Takes about 30 seconds (plus the builds).
EOF
}

case ${1:-} in
  -h | --help) usage; exit 0 ;;
esac

BENCH_NAME=fleet.sh
BENCH_NEEDS_ROOT_FOR="network namespaces, XDP, reading the daemon's BPF map"
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"

for tool in etcd etcdctl; do
  need "$tool" || { say "missing $tool (scripts/setup.sh installs etcd-server and etcd-client)"; exit 2; }
done
if [[ -z ${FLYNODE_BIN:-} ]]; then
  say "building flynode (cargo build --release -p flynode)"
  (cd "$REPO" && cargo build --release -q -p flynode)
  FLYNODE_BIN=$REPO/target/release/flynode
fi

NS=fn-fleet-$$
NODE=fleet-1
ETCD_URL=http://127.0.0.1:2379
DIR=
ETCD_PID=
DAEMON_PID=
NS_MADE=

# SIGTERM to one of our processes, SIGKILL after TENTHS x 0.1 s.
stop_pid() {
  local pid=$1
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq "$2"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_child 50
  stop_pid "$DAEMON_PID" 50
  stop_pid "$ETCD_PID" 50
  if [[ $rc -ne 0 && $rc -ne 130 && -n $DIR ]]; then
    for log in "$DIR"/daemon-*.log "$DIR"/etcd.log; do
      [[ -s $log ]] || continue
      say "--- last lines of ${log##*/} ---"
      tail -n 15 "$log" >&7 || true
    done
  fi
  if [[ -n $NS_MADE ]]; then
    # Anything still in the namespace was started by this script (a daemon that a kill
    # of its PID missed): the namespace is ours and only lives as long as this run.
    local left
    left=$(ip netns pids "$NS" 2>/dev/null || true)
    if [[ -n $left ]]; then
      say "stopping leftover processes in $NS: ${left//$'\n'/ }"
      for pid in $left; do stop_pid "$pid" 30; done
    fi
    ip netns del "$NS" 2>/dev/null || true
  fi
  [[ -n $DIR ]] && rm -rf -- "$DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

warn_if_loaded

DIR=$(mktemp -d /tmp/flynode-fleet.XXXXXX)
# Foreground only: a function run with `&` is a subshell, and $! its PID, not the
# program's. The background starts below call `ip netns exec` directly, which execs the
# program, so $! is the program's PID.
in_ns() { ip netns exec "$NS" "$@"; }

ip netns add "$NS"
NS_MADE=1
ip -n "$NS" link set lo up
ip -n "$NS" link add v0 type veth peer name v1
ip -n "$NS" addr add 198.18.20.1/24 dev v0
ip -n "$NS" addr add 198.18.20.2/24 dev v1
ip -n "$NS" link set v0 up
ip -n "$NS" link set v1 up
# The daemon installs reply rules for its (local) worker and warns on every apply
# when forwarding is off.
in_ns sysctl -q -w net.ipv4.ip_forward=1

say "starting etcd in $NS"
ip netns exec "$NS" etcd --name fleet --data-dir "$DIR/etcd" \
  --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster fleet=http://127.0.0.1:2380 >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 100); do
  in_ns etcdctl --endpoints "$ETCD_URL" endpoint health >/dev/null 2>&1 && break
  kill -0 "$ETCD_PID" 2>/dev/null || { say "etcd exited"; exit 1; }
  sleep 0.1
done
in_ns etcdctl --endpoints "$ETCD_URL" endpoint health >/dev/null 2>&1 || { say "etcd not healthy after 10 s"; exit 1; }

"$FLYNODE_BIN" keys generate --key-dir "$DIR/keys" >/dev/null
# $1: the [source] part.
write_config() {
  cat >"$DIR/flynode.toml" <<EOF
node_id = "$NODE"
region = "lab"
mesh_address = "fd00:f1::1"
key_dir = "$DIR/keys"
control_socket = "$DIR/control.sock"
[xdp]
interface = "v0"
mode = "generic"
[metrics]
enabled = false
$1
EOF
}
# $1: log name.
start_daemon() {
  ip netns exec "$NS" "$FLYNODE_BIN" run --config "$DIR/flynode.toml" >"$DIR/daemon-$1.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 150); do
    [[ -S $DIR/control.sock ]] && return 0
    kill -0 "$DAEMON_PID" 2>/dev/null || { say "flynode run ($1) exited"; exit 1; }
    sleep 0.1
  done
  say "flynode run ($1): no control socket after 15 s"
  exit 1
}
# $1: phase.
measure() {
  ip netns exec "$NS" "$BIN" fleet --fleet-phase "$1" --fleet-dir "$DIR" --fleet-node "$NODE" \
    --fleet-interface v0 --fleet-etcd "$ETCD_URL" &
  CHILD=$!
  wait "$CHILD"
  CHILD=
}

# 1. etcd.
write_config "[source.etcd]
endpoints = [\"$ETCD_URL\"]"
say "starting flynode run (etcd source)"
start_daemon etcd
record=
for _ in $(seq 100); do
  record=$(in_ns etcdctl --endpoints "$ETCD_URL" get "/flynode/nodes/$NODE" --print-value-only)
  [[ -n $record ]] && break
  sleep 0.1
done
[[ -n $record ]] || { say "the node's record did not appear in etcd within 10 s"; exit 1; }
measure etcd

# 2. The routing file, with the record the node published (the daemon revokes it
# when it stops).
stop_pid "$DAEMON_PID" 100
DAEMON_PID=
stop_pid "$ETCD_PID" 50
ETCD_PID=
printf '[[node]]\n%s\n' "$record" >"$DIR/routing.toml"
write_config "[source]
file = \"$DIR/routing.toml\""
say "restarting flynode run (file source)"
start_daemon file
measure file
stop_pid "$DAEMON_PID" 100
DAEMON_PID=

# 3. Side by side.
"$BIN" fleet --fleet-phase report --fleet-dir "$DIR"
