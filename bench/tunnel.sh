#!/usr/bin/env bash
# Tunnel benchmark: flynode's mesh against the plain veth, boringtun-cli and wireguard-go,
# all on the same topology, in one run. See usage() or bench/README.md.
#
# Topology (rebuilt for every run of every variant, removed at the end, also on Ctrl-C):
#
#   netns fnb-a-PID ("host A", edge)            netns fnb-b-PID ("host B", worker)
#   veth-a 198.18.1.1/24  <---------- veth ---------->  veth-b 198.18.1.2/24
#   tunnel 198.18.250.1/24, fd00:b::1/64                tunnel 198.18.250.2/24, fd00:b::2/64
#   tunnel process, iperf3 client, ping: CPU0           tunnel process, iperf3 server: CPU1
#
# Progress goes to stderr; the result table to stdout.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/tunnel.sh            (as root)

Measures, over two network namespaces joined by a veth (host A pinned to CPU0, host B
to CPU1), for each variant: iperf3 TCP (1 stream), UDP 1392-byte and 64-byte payloads at
full offered rate (receiver-side delivered rate), and idle ping RTT over the tunnel.
Variants: plain (the veth, no tunnel), boringtun (boringtun-cli), wggo (wireguard-go),
flynode. Prints a table (medians), the ratios flynode/boringtun-cli and PASS/FAIL
against the targets (>= 3x TCP, >= 3x delivered UDP at both sizes, ping no worse).

Environment:
  BENCH_RUNS=N       runs per measurement, the median is reported (default 3). The runs
                     go round robin (run 1 of every variant, then run 2, ...), so the
                     machine's drift falls on all variants alike
  BENCH_SECONDS=N    iperf3 duration per test (default 5)
  BENCH_PINGS=N      pings per idle-RTT measurement, 50 ms apart (default 20)
  BENCH_ONLY=LIST    comma-separated subset of plain,boringtun,wggo,flynode (default all)
  BENCH_OUT=FILE     also write the results as JSON to FILE
  FLYNODE_BIN=PATH   flynode binary to use (default: build target/release/flynode)
  FLYNODE_XDP_MODE=M  XDP mode of the flynode daemons on the underlay veth (default generic:
                     native XDP on veth makes the kernel segment every GSO packet before
                     the program runs, which costs the tunnel about a third of its TCP
                     throughput here; on a physical NIC native is right)
  BENCH_RPS=1        steer each host's veth receive work to its own CPU (RPS: veth-b's
                     to CPU1, veth-a's to CPU0). Default 0: the kernel's placement, where
                     a veth does the receiver's work in softirq on the sending CPU, so
                     host B's receive path (and flynode B's XDP program) runs on CPU0.
                     With 1 every packet crosses CPUs through a backlog and an IPI,
                     which costs per-packet senders (plain veth, boringtun-cli) most
  BENCH_PERF=DIR     record the machine's profile (perf record -a -g) during flynode's first
                     run of each test into DIR/flynode-TEST.perf.data; e.g. perf report -i
                     DIR/flynode-udp1392.perf.data --no-children --sort cpu,comm,sym
                     (perf's own work slows that run: use BENCH_RUNS=3 and the median)
  BENCH_STRICT=1     exit 1 if a target is missed or flynode could not be measured
  BENCH_KEEP=1       keep the work directory (logs, raw iperf3 JSON) instead of removing it

Installs what is missing first (iperf3 via apt, boringtun-cli via cargo into bench/.tools).
EOF
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if [[ $# -ne 0 ]]; then usage >&2; exit 2; fi

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TOOLS=$BENCH_DIR/.tools
BORINGTUN_VERSION=0.7.1 # newest on crates.io; builds with rustc 1.95
RUNS=${BENCH_RUNS:-3}
SECS=${BENCH_SECONDS:-5}
ONLY=${BENCH_ONLY:-plain,boringtun,wggo,flynode}
OUT=${BENCH_OUT:-}
RPS=${BENCH_RPS:-0}
PERF_DIR=${BENCH_PERF:-}
PINGS=${BENCH_PINGS:-20}
CPU_A=0 # host A: edge side
CPU_B=1 # host B: worker side
ALL_VARIANTS=(plain boringtun wggo flynode)

# Messages go to fd 7, a copy of the original stderr, so that a trap that fires while some
# redirection is in effect still reaches the terminal.
exec 7>&2
log() { printf '%s\n' "$*" >&7; }
# shellcheck source=bench/mesh.sh
source "$(dirname "$0")/mesh.sh"
die() { printf 'bench/tunnel.sh: %s\n' "$*" >&7; exit 1; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, not '$RUNS'"
[[ $RPS == 0 || $RPS == 1 ]] || die "BENCH_RPS must be 0 or 1, not '$RPS'"
[[ $SECS =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer, not '$SECS'"
[[ $PINGS =~ ^[1-9][0-9]{0,3}$ ]] || die "BENCH_PINGS must be an integer from 1 to 9999, not '$PINGS'"
VARIANTS=()
IFS=',' read -r -a _only <<<"$ONLY"
for v in "${ALL_VARIANTS[@]}"; do
  for o in "${_only[@]}"; do [[ $o == "$v" ]] && { VARIANTS+=("$v"); break; }; done
done
for o in "${_only[@]}"; do
  [[ " ${ALL_VARIANTS[*]} " == *" $o "* ]] || die "BENCH_ONLY: unknown variant '$o' (known: ${ALL_VARIANTS[*]})"
done
((${#VARIANTS[@]} > 0)) || die "BENCH_ONLY selects no variant"
want() { [[ " ${VARIANTS[*]} " == *" $1 "* ]]; }

[[ $EUID -eq 0 ]] || die "must run as root (network namespaces, TUN devices)"
[[ $(uname -s) == Linux ]] || die "Linux only"
cpus=$(getconf _NPROCESSORS_ONLN)
((cpus >= 2)) || die "needs at least 2 CPUs (host A on CPU$CPU_A, host B on CPU$CPU_B); this machine has $cpus"
[[ -c /dev/net/tun ]] || die "/dev/net/tun is missing (TUN devices are needed for every tunnel)"

# --- tools ---------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
need() { command -v "$1" >/dev/null || die "$1 not found${2:+: $2}"; }
for t in ip taskset timeout ping ss flock getconf awk; do need "$t" "install iproute2/util-linux/coreutils/iputils-ping"; done
PYTHON=/usr/bin/python3
[[ -x $PYTHON ]] || PYTHON=$(command -v python3) || die "python3 not found"
if [[ -n $PERF_DIR ]]; then
  need perf "BENCH_PERF needs perf: apt-get install linux-perf"
  mkdir -p "$PERF_DIR" || die "BENCH_PERF: cannot create $PERF_DIR"
  PERF_DIR=$(cd "$PERF_DIR" && pwd)
fi
if want boringtun || want wggo; then need wg "run scripts/setup.sh (installs wireguard-tools)"; fi
if want wggo; then need wireguard-go "run scripts/setup.sh (installs wireguard-go)"; fi

mkdir -p "$TOOLS"
exec 9>"$TOOLS/.lock"
flock -n 9 || die "another bench/tunnel.sh is running (lock $TOOLS/.lock)"

if ! command -v iperf3 >/dev/null; then
  log "installing iperf3 (apt)"
  # The package's debconf question (start a system iperf3 daemon?) defaults to no.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >"$TOOLS/apt.log" 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update >>"$TOOLS/apt.log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >>"$TOOLS/apt.log" 2>&1 ||
      { tail -n 30 "$TOOLS/apt.log" >&2; die "apt-get install iperf3 failed"; }
  fi
fi
need iperf3

BORINGTUN=$TOOLS/bin/boringtun-cli
if want boringtun; then
  if ! [[ -x $BORINGTUN ]] || [[ $("$BORINGTUN" --version 2>/dev/null) != *" $BORINGTUN_VERSION" ]]; then
    need cargo "install Rust (scripts/setup.sh)"
    log "installing boringtun-cli $BORINGTUN_VERSION into bench/.tools (cargo install, ~1-2 min)"
    if ! nice cargo install boringtun-cli --version "$BORINGTUN_VERSION" --locked --force \
        --root "$TOOLS" >"$TOOLS/boringtun-install.log" 2>&1; then
      tail -n 40 "$TOOLS/boringtun-install.log" >&2
      die "cargo install boringtun-cli failed (log: $TOOLS/boringtun-install.log)"
    fi
  fi
fi

FLYNODE=${FLYNODE_BIN:-}
FLYNODE_SKIP=""
if want flynode; then
  if [[ -n $FLYNODE ]]; then
    [[ -f $FLYNODE && -x $FLYNODE ]] || die "FLYNODE_BIN=$FLYNODE is not an executable"
    FLYNODE=$(realpath "$FLYNODE")
  else
    need cargo "install Rust (scripts/setup.sh)"
    FLYNODE=$REPO/target/release/flynode
    log "building flynode (cargo build --release -p flynode; log: bench/.tools/flynode-build.log)"
    if ! (cd "$REPO" && nice cargo build --release -p flynode) >"$TOOLS/flynode-build.log" 2>&1; then
      tail -n 40 "$TOOLS/flynode-build.log" >&2
      log "flynode: build failed; the flynode variant is skipped (log: $TOOLS/flynode-build.log)"
      FLYNODE_SKIP="build failed"
    fi
  fi
fi

# --- process and namespace bookkeeping ---------------------------------------------
# Every process is started as `taskset -c CPU timeout ... cmd`: taskset execs timeout,
# which makes itself a process-group leader and forwards SIGTERM to the command. So the
# PID recorded here leads a group that holds only what this script started.
NS_A=fnb-a-$$
NS_B=fnb-b-$$
PIDS=()
SOCKETS=() # wg UAPI sockets (/var/run/wireguard is shared by all namespaces)
WORK=""
LAST_PID=""

drop_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# start_bg LOGFILE CMD...: run CMD in the background, output to LOGFILE; sets LAST_PID.
start_bg() {
  local logf=$1; shift
  "$@" >"$logf" 2>&1 7>&- 9>&- &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# run_fg OUT ERR CMD...: run CMD (already bounded by `timeout`) in the background, output
# to OUT and ERR, and wait for it, so that Ctrl-C is handled at once; returns its exit
# status. (The caller must not redirect: the traps would write there.)
run_fg() {
  local out=$1 err=$2
  shift 2
  if [[ $out == "$err" ]]; then
    "$@" >"$out" 2>&1 7>&- 9>&- &
  else
    "$@" >"$out" 2>"$err" 7>&- 9>&- &
  fi
  local pid=$! rc=0
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  drop_pid "$pid"
  return "$rc"
}

# stop_pid PID [GRACE]: SIGTERM (timeout forwards it), wait, then SIGKILL the group.
stop_pid() {
  local pid=$1 grace=${2:-5} i
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "  pid $pid ignored SIGTERM for ${grace}s: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  drop_pid "$pid"
}

# child_of PID: the command timeout runs (ip netns exec execs into it, so it is the tunnel
# process itself).
child_of() {
  local i c
  for ((i = 0; i < 50; i++)); do
    c=$(pgrep -P "$1" 2>/dev/null | head -n 1 || true)
    [[ -n $c ]] && { echo "$c"; return 0; }
    sleep 0.02
  done
  echo "$1"
}

netns_down() {
  local ns
  for ns in "$NS_A" "$NS_B"; do
    if ip netns list | awk '{print $1}' | grep -qx "$ns"; then ip netns del "$ns" 2>/dev/null || true; fi
  done
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p" 3; done
  netns_down
  for p in "${SOCKETS[@]}"; do rm -f "$p"; done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${BENCH_KEEP:-} == 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

WORK=$(mktemp -d /tmp/fnb-bench.XXXXXX)
RES=$WORK/results
mkdir -p "$RES"

# Upper bound for a tunnel process's life in one variant (never reached in a normal run;
# it only guarantees nothing outlives a SIGKILLed script for long).
DAEMON_BUDGET=$((RUNS * (3 * (SECS + 30) + PINGS / 20 + 15) + 120))
IPERF_PORT=5201

# --- topology ------------------------------------------------------------------------
cpu_mask() { printf '%x' $((1 << $1)); }

underlay_up() {
  netns_down
  ip netns add "$NS_A"
  ip netns add "$NS_B"
  # Created directly inside the namespaces: nothing touches the root namespace.
  ip link add veth-a netns "$NS_A" type veth peer name veth-b netns "$NS_B"
  local ns
  for ns in "$NS_A" "$NS_B"; do
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip -n "$ns" link set lo up
  done
  ip -n "$NS_A" addr add 198.18.1.1/24 dev veth-a
  ip -n "$NS_B" addr add 198.18.1.2/24 dev veth-b
  ip -n "$NS_A" link set veth-a up
  ip -n "$NS_B" link set veth-b up
  if [[ $RPS == 1 ]]; then
    # Each host's receive work on its own CPU (see usage: BENCH_RPS).
    ip netns exec "$NS_A" sh -c "echo $(cpu_mask "$CPU_A") >/sys/class/net/veth-a/queues/rx-0/rps_cpus"
    ip netns exec "$NS_B" sh -c "echo $(cpu_mask "$CPU_B") >/sys/class/net/veth-b/queues/rx-0/rps_cpus"
  fi
  local i
  for ((i = 0; i < 30; i++)); do
    ip netns exec "$NS_A" ping -c 1 -W 1 -q 198.18.1.2 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "the underlay veth does not pass traffic (198.18.1.1 -> 198.18.1.2)"
}

# ping_up DST SECONDS [PIDS...]: true once DST answers from host A; false after SECONDS
# or as soon as one of PIDS has exited.
ping_up() {
  local dst=$1 secs=$2 p deadline
  shift 2
  deadline=$((SECONDS + secs))
  while ((SECONDS < deadline)); do
    timeout 3 ip netns exec "$NS_A" ping -c 1 -W 1 -q "$dst" >/dev/null 2>&1 && return 0
    for p in "$@"; do kill -0 "$p" 2>/dev/null || return 1; done
    sleep 0.2
  done
  return 1
}

# --- userspace WireGuard baselines (boringtun-cli, wireguard-go) ----------------------
TUN_A="" TUN_B="" # tunnel process PIDs (the ones whose CPU time is reported)
IF_A="" IF_B=""   # tunnel interfaces
TOP_A="" TOP_B="" # the recorded PIDs (timeout wrappers) to stop

wg_tunnel_up() { # KIND VARIANT_DIR
  local kind=$1 vd=$2 prefix
  case $kind in
    boringtun) prefix=bt ;;
    wggo) prefix=wgo ;;
  esac
  local if_a=$prefix-a-$$ if_b=$prefix-b-$$ h ns ifn cpu
  IF_A=$if_a IF_B=$if_b
  for h in a b; do
    if [[ $h == a ]]; then ns=$NS_A ifn=$if_a cpu=$CPU_A; else ns=$NS_B ifn=$if_b cpu=$CPU_B; fi
    SOCKETS+=("/var/run/wireguard/$ifn.sock")
    (umask 077 && wg genkey >"$vd/$h.key") || return 1
    wg pubkey <"$vd/$h.key" >"$vd/$h.pub" || return 1
    case $kind in
      boringtun)
        start_bg "$vd/tunnel-$h.log" taskset -c "$cpu" timeout -k 5 "$DAEMON_BUDGET" \
          ip netns exec "$ns" "$BORINGTUN" --disable-drop-privileges -f "$ifn" ;;
      wggo)
        # WG_PROCESS_FOREGROUND=1 also silences the "use the kernel module" banner.
        start_bg "$vd/tunnel-$h.log" taskset -c "$cpu" timeout -k 5 "$DAEMON_BUDGET" \
          ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$ifn" ;;
    esac
    if [[ $h == a ]]; then TOP_A=$LAST_PID; TUN_A=$(child_of "$LAST_PID"); else TOP_B=$LAST_PID; TUN_B=$(child_of "$LAST_PID"); fi
  done
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -S /var/run/wireguard/$if_a.sock && -S /var/run/wireguard/$if_b.sock ]] && break
    if ! kill -0 "$TOP_A" 2>/dev/null || ! kill -0 "$TOP_B" 2>/dev/null; then break; fi
    sleep 0.1
  done
  for h in a b; do
    if [[ ! -S /var/run/wireguard/$([[ $h == a ]] && echo "$if_a" || echo "$if_b").sock ]]; then
      log "$kind: host $h's UAPI socket did not appear; its log:"
      tail -n 20 "$vd/tunnel-$h.log" | sed 's/^/    /' >&2
      return 1
    fi
  done
  local pub_a pub_b
  pub_a=$(cat "$vd/a.pub") pub_b=$(cat "$vd/b.pub")
  ip netns exec "$NS_A" wg set "$if_a" private-key "$vd/a.key" listen-port 51820 \
    peer "$pub_b" endpoint 198.18.1.2:51820 allowed-ips 198.18.250.2/32,fd00:b::2/128 || return 1
  ip netns exec "$NS_B" wg set "$if_b" private-key "$vd/b.key" listen-port 51820 \
    peer "$pub_a" endpoint 198.18.1.1:51820 allowed-ips 198.18.250.1/32,fd00:b::1/128 || return 1
  ip -n "$NS_A" addr add 198.18.250.1/24 dev "$if_a" || return 1
  ip -n "$NS_A" addr add fd00:b::1/64 dev "$if_a" nodad || return 1
  ip -n "$NS_B" addr add 198.18.250.2/24 dev "$if_b" || return 1
  ip -n "$NS_B" addr add fd00:b::2/64 dev "$if_b" nodad || return 1
  ip -n "$NS_A" link set "$if_a" mtu 1420 up || return 1
  ip -n "$NS_B" link set "$if_b" mtu 1420 up || return 1
}

# --- flynode -------------------------------------------------------------------------
flynode_tunnel_up() { # VARIANT_DIR
  local vd=$1
  rm -rf "${vd:?}/a" "${vd:?}/b" # a fresh pair of keys and configs for every run
  flynode_pair_files "$FLYNODE" "$vd" bench 51820 198.18.1 fd00:b:: 198.18.250 fly veth || return 1
  IF_A=fly-a IF_B=fly-b
  start_bg "$vd/a/flynode.log" taskset -c "$CPU_A" timeout -k 5 "$DAEMON_BUDGET" \
    ip netns exec "$NS_A" "$FLYNODE" run --config "$vd/a/flynode.toml"
  TOP_A=$LAST_PID TUN_A=$(child_of "$LAST_PID")
  start_bg "$vd/b/flynode.log" taskset -c "$CPU_B" timeout -k 5 "$DAEMON_BUDGET" \
    ip netns exec "$NS_B" "$FLYNODE" run --config "$vd/b/flynode.toml"
  TOP_B=$LAST_PID TUN_B=$(child_of "$LAST_PID")
}

flynode_logs() { # VARIANT_DIR
  local h
  for h in a b; do
    log "  --- host $h: tail of flynode.log ---"
    tail -n 15 "$1/$h/flynode.log" 2>/dev/null | sed 's/^/    /' >&2 || true
  done
}

# --- measurements ----------------------------------------------------------------------
# snap FILE: per-CPU times, the tunnel processes' CPU time and host B's UDP counters.
snap() {
  {
    echo "t $(date +%s.%N)"
    grep -E '^cpu[0-9]+ ' /proc/stat
    [[ -n $TUN_A && -r /proc/$TUN_A/stat ]] && echo "proc tunnel-a $(cat "/proc/$TUN_A/stat")"
    [[ -n $TUN_B && -r /proc/$TUN_B/stat ]] && echo "proc tunnel-b $(cat "/proc/$TUN_B/stat")"
    ip netns exec "$NS_B" cat /proc/net/snmp | grep '^Udp:' | sed 's/^/snmpB /'
    ip netns exec "$NS_A" cat /proc/net/snmp | grep '^Udp:' | sed 's/^/snmpA /'
  } >"$1" 2>/dev/null || true
}

wait_listen() { # NS PORT
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -n $(ip netns exec "$1" ss -Hltn "sport = :$2" 2>/dev/null) ]] && return 0
    sleep 0.05
  done
  return 1
}

# iperf_test TEST RUN DST VARIANT_DIR CLIENT_ARGS...: one-off server on B (CPU_B), client on
# A (CPU_A); the client's JSON (which carries the server's receive totals) is kept.
iperf_test() {
  local test=$1 run=$2 dst=$3 vd=$4 spid rc=0
  shift 4
  local base=$vd/$test.$run
  start_bg "$base.server.log" taskset -c "$CPU_B" timeout -k 2 $((SECS + 40)) \
    ip netns exec "$NS_B" iperf3 -s -1 -B "$dst" -p "$IPERF_PORT" --rcv-timeout 15000
  spid=$LAST_PID
  if ! wait_listen "$NS_B" "$IPERF_PORT"; then
    log "    $test run $run: the iperf3 server did not start"
    stop_pid "$spid" 2
    return 0
  fi
  snap "$base.pre"
  # BENCH_PERF: the whole machine's profile in the middle of flynode's first run of each
  # test (1 s in, SECS - 2 s long; bounded by its own sleep).
  local perf_pid=""
  if [[ -n $PERF_DIR && $run == 1 && $(basename "$vd") == flynode ]]; then
    (sleep 1 && exec perf record -a -g -o "$PERF_DIR/flynode-$test.perf.data" -- sleep $((SECS > 3 ? SECS - 2 : 1))) \
      >"$PERF_DIR/flynode-$test.perf.log" 2>&1 &
    perf_pid=$!
  fi
  run_fg "$base.json" "$base.err" taskset -c "$CPU_A" timeout -k 2 $((SECS + 25)) \
    ip netns exec "$NS_A" iperf3 -c "$dst" -p "$IPERF_PORT" -t "$SECS" -J --connect-timeout 3000 "$@" ||
    rc=$?
  snap "$base.post"
  if [[ -n $perf_pid ]]; then wait "$perf_pid" || log "    perf record failed: see $PERF_DIR/flynode-$test.perf.log"; fi
  # iperf3 -J can exit 0 after a failure: the JSON's "error" says so.
  local why
  why=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("error",""))' "$base.json" 2>/dev/null ||
    echo "no JSON result")
  if ((rc != 0)) || [[ -n $why ]]; then
    ((rc == 124)) && why="timed out${why:+; $why}"
    log "    $test run $run: iperf3 failed (exit $rc${why:+: $why})"
  fi
  local i
  for ((i = 0; i < 50; i++)); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  stop_pid "$spid" 2
}

measure() { # VARIANT_DIR DST RUN
  local vd=$1 dst=$2 r=$3
  sleep 1 # let queues drain: the ping is of the idle mesh
  run_fg "$vd/ping.$r.txt" "$vd/ping.$r.txt" taskset -c "$CPU_A" timeout -k 2 $((PINGS / 20 + 15)) \
    ip netns exec "$NS_A" ping -c "$PINGS" -i 0.05 -q -W 1 "$dst" ||
    log "    ping run $r failed: $(grep -m1 -E 'transmitted|ping:' "$vd/ping.$r.txt" || echo 'timed out')"
  iperf_test tcp "$r" "$dst" "$vd"
  iperf_test udp1392 "$r" "$dst" "$vd" -u -b 0 -l 1392 -w 4M
  iperf_test udp64 "$r" "$dst" "$vd" -u -b 0 -l 64 -w 4M
}

# pins VARIANT_DIR: where each process may run, as the kernel sees it.
pins() {
  local vd=$1 name pid
  {
    for name in tunnel-a tunnel-b; do
      if [[ $name == tunnel-a ]]; then pid=$TUN_A; else pid=$TUN_B; fi
      [[ -n $pid && -r /proc/$pid/status ]] || continue
      printf '%s pid %s (%s), %s threads, CPUs %s (all threads)\n' "$name" "$pid" "$(cat "/proc/$pid/comm")" \
        "$(awk '/^Threads:/{print $2}' "/proc/$pid/status")" \
        "$(cat "/proc/$pid"/task/*/status 2>/dev/null | awk '/^Cpus_allowed_list:/{print $2}' | sort -u | paste -sd' ')"
    done
    if [[ -n $IF_A ]]; then
      echo "tunnel MTU: $IF_A $(ip netns exec "$NS_A" cat "/sys/class/net/$IF_A/mtu" 2>/dev/null || echo '?'), $IF_B $(ip netns exec "$NS_B" cat "/sys/class/net/$IF_B/mtu" 2>/dev/null || echo '?')"
    fi
    echo "iperf3 client, ping (host A): CPUs $CPU_A"
    echo "iperf3 server (host B): CPUs $CPU_B"
    echo "veth threaded NAPI: veth-a $(ip netns exec "$NS_A" cat /sys/class/net/veth-a/threaded 2>/dev/null || echo '?'), veth-b $(ip netns exec "$NS_B" cat /sys/class/net/veth-b/threaded 2>/dev/null || echo '?') (0: a veth's receive work runs in softirq on the sending CPU)"
  } >"$vd/pins.txt"
}

variant_name() {
  case $1 in
    plain) echo "plain veth" ;;
    boringtun) echo "boringtun-cli $BORINGTUN_VERSION" ;;
    wggo) echo "wireguard-go $(wireguard-go --version 2>/dev/null | awk 'NR==1{print $2}')" ;;
    flynode) echo "flynode" ;;
  esac
}

# skip VARIANT_DIR WHY: this run of the variant could not be measured. The variant is
# reported as skipped only if no run of it was measured.
skip() {
  [[ $(cat "$1/status" 2>/dev/null) == ok ]] || echo "skipped: $2" >"$1/status"
}

# run_variant VARIANT RUN: brings the variant's tunnel up on a fresh topology, measures
# run RUN (ping, TCP, UDP 1392 B, UDP 64 B) and takes everything down again.
run_variant() {
  local v=$1 r=$2 vd=$RES/$1 failed=""
  mkdir -p "$vd"
  variant_name "$v" >"$vd/name"
  log "== $(cat "$vd/name"), run $r/$RUNS"
  TUN_A="" TUN_B="" TOP_A="" TOP_B="" IF_A="" IF_B=""
  if [[ $v == flynode && -n $FLYNODE_SKIP ]]; then
    echo "skipped: $FLYNODE_SKIP" >"$vd/status"
    return 0
  fi
  underlay_up
  local dst=198.18.250.2
  case $v in
    plain) dst=198.18.1.2 ;;
    boringtun | wggo)
      if ! wg_tunnel_up "$v" "$vd"; then
        failed="tunnel setup failed"
        log "$v: tunnel setup failed; run $r skipped"
      elif ! ping_up "$dst" 10 "$TOP_A" "$TOP_B"; then
        failed="mesh did not come up"
        log "$v: mesh did not come up within 10 s; run $r skipped. Logs:"
        tail -n 10 "$vd/tunnel-a.log" "$vd/tunnel-b.log" | sed 's/^/    /' >&2
      fi ;;
    flynode)
      if ! flynode_tunnel_up "$vd"; then
        failed="setup failed"
        log "flynode: setup failed; run $r skipped"
      elif ! ping_up "$dst" 10 "$TOP_A" "$TOP_B"; then
        failed="mesh did not come up"
        log "flynode: mesh did not come up (no ping 198.18.1.1 -> $dst over the mesh within 10 s); run $r skipped"
        kill -0 "$TOP_A" 2>/dev/null || log "  (host A's daemon has exited)"
        kill -0 "$TOP_B" 2>/dev/null || log "  (host B's daemon has exited)"
        flynode_logs "$vd"
      fi ;;
  esac
  if [[ -n $failed ]]; then
    skip "$vd" "$failed"
  else
    if [[ $v != plain ]] && ! timeout 5 ip netns exec "$NS_A" ping -6 -c 2 -i 0.2 -W 1 -q fd00:b::2 >/dev/null 2>&1; then
      log "  warning: IPv6 over the mesh (fd00:b::1 -> fd00:b::2) does not answer; IPv4 is measured"
    fi
    pins "$vd"
    [[ $r == 1 ]] && sed 's/^/  pinned: /' "$vd/pins.txt" >&2
    measure "$vd" "$dst" "$r"
    # The tunnels' UDP sockets after the run: buffer sizes and drops (skmem d) per socket.
    ip netns exec "$NS_A" ss -Huanmp >"$vd/sockets-a.txt" 2>/dev/null || true
    ip netns exec "$NS_B" ss -Huanmp >"$vd/sockets-b.txt" 2>/dev/null || true
    echo ok >"$vd/status"
    if [[ $v == flynode ]] && ! kill -0 "$TOP_A" 2>/dev/null; then flynode_logs "$vd"; fi
  fi
  local p
  for p in "$TOP_A" "$TOP_B"; do [[ -n $p ]] && stop_pid "$p" 10; done
  netns_down
}

# --- main ----------------------------------------------------------------------------
load1=$(awk '{print $1}' /proc/loadavg)
if awk -v l="$load1" 'BEGIN{exit !(l > 0.5)}'; then
  log "warning: load average is $load1: other work shares the 2 CPUs and will skew the numbers"
fi
{
  printf '{"runs": %d, "seconds": %d, "variants": [' "$RUNS" "$SECS"
  sep=""
  for v in "${VARIANTS[@]}"; do printf '%s"%s"' "$sep" "$v"; sep=", "; done
  printf '], "kernel": "%s", "cpus": %d, "loadavg_start": "%s", "cpu_a": %d, "cpu_b": %d, "date": "%s"}\n' \
    "$(uname -r)" "$cpus" "$(cut -d' ' -f1-3 /proc/loadavg)" "$CPU_A" "$CPU_B" "$(date -u +%FT%TZ)"
} >"$RES/meta.json"

started=$SECONDS
# Round robin: run 1 of every variant, then run 2 of every variant, ... so that the
# machine's drift (its speed moves by a third within an hour) falls on all variants
# alike instead of on whichever was measured last.
for ((r = 1; r <= RUNS; r++)); do
  for v in "${VARIANTS[@]}"; do run_variant "$v" "$r"; done
done
log "measured in $((SECONDS - started)) s"

rc=0
args=("$RES")
[[ -n $OUT ]] && args+=(--json "$OUT")
[[ ${BENCH_STRICT:-} == 1 ]] && args+=(--strict)
"$PYTHON" "$BENCH_DIR/report.py" "${args[@]}" || rc=$?
exit "$rc"
