#!/usr/bin/env bash
# Idle mesh ping, side by side: two flynode builds and boringtun-cli up at the same time
# on one pair of namespaces, pinged in turn, round after round. bench/tunnel.sh measures
# its variants one after another, minutes apart, and this VM's speed moves by a third
# within the hour; here every round pings all three within seconds, so the comparison
# holds even while the machine drifts. See usage() or bench/README.md.
#
#   netns fpa-PID (host A, CPU0)                  netns fpb-PID (host B, CPU1)
#   veth1-a 198.18.1.1/24  <------ veth ------>   veth1-b 198.18.1.2/24
#   veth2-a 198.18.2.1/24  <------ veth ------>   veth2-b 198.18.2.2/24
#   flynode X over veth1 (51820): 198.18.250.1  <->  198.18.250.2
#   flynode Y over veth2 (51822): 198.18.252.1  <->  198.18.252.2
#   boringtun-cli over veth1 (51821): 198.18.251.1 <-> 198.18.251.2
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/ping-ab.sh [FLYNODE_X [FLYNODE_Y]]      (as root)

Starts flynode X, flynode Y (two binaries; both default to target/release/flynode,
which makes Y a control for X) and boringtun-cli between two namespaces (host A on
CPU0, host B on CPU1; each flynode with generic XDP on its own underlay veth, as in
bench/tunnel.sh), then pings each tunnel from host A in turn, ROUNDS times, and prints
every round's median RTT and the median of those per tunnel, with ratios.

Environment:
  PING_ROUNDS=N    rounds (default 8)
  PING_COUNT=N     pings per tunnel per round (default 100)
  PING_INTERVAL=S  seconds between pings (default 0.03; at 0.002 nothing goes idle and
                   every tunnel is about twice as fast)
  PING_LOGS=DIR    copy the tunnels' logs (flyx-a.log, flyy-b.log, bt-a.log, ...) into DIR
                   at the end

Needs boringtun-cli in bench/.tools (bench/tunnel.sh installs it) and wireguard-tools.
EOF
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if [[ $# -gt 2 ]]; then usage >&2; exit 2; fi
[[ $(id -u) -eq 0 ]] || { echo "ping-ab: needs root (namespaces, TUN devices)" >&2; exit 2; }

BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
FLY_X=${1:-$REPO/target/release/flynode}
FLY_Y=${2:-$FLY_X}
BT=$BENCH_DIR/.tools/bin/boringtun-cli
ROUNDS=${PING_ROUNDS:-8}
COUNT=${PING_COUNT:-100}
INTERVAL=${PING_INTERVAL:-0.03}
for v in ROUNDS COUNT; do
  [[ ${!v} =~ ^[1-9][0-9]{0,3}$ ]] || { echo "ping-ab: PING_$v must be 1..9999" >&2; exit 2; }
done
[[ $INTERVAL =~ ^0?\.[0-9]+$|^[1-9]$ ]] || { echo "ping-ab: PING_INTERVAL: seconds, e.g. 0.03" >&2; exit 2; }
for f in "$FLY_X" "$FLY_Y"; do
  [[ -x $f ]] || { echo "ping-ab: no flynode binary at $f (cargo build --release -p flynode)" >&2; exit 2; }
done
[[ -x $BT ]] || { echo "ping-ab: no boringtun-cli at $BT (run bench/tunnel.sh once to install it)" >&2; exit 2; }
command -v wg >/dev/null || { echo "ping-ab: needs wg (apt install wireguard-tools)" >&2; exit 2; }

log() { echo "ping-ab: $*" >&2; }
# shellcheck source=bench/mesh.sh
source "$BENCH_DIR/mesh.sh"
NS_A=fpa-$$ NS_B=fpb-$$
BT_A=pbt-a-$$ BT_B=pbt-b-$$
WORK=$(mktemp -d /tmp/fly-ping-ab.XXXXXX)
chmod 700 "$WORK"
PIDS=()
# Processes run as `timeout ... ip netns exec ...`: the recorded PID is timeout, which
# forwards SIGTERM to the daemon and bounds its life should this script be SIGKILLed.
BUDGET=$(awk -v r="$ROUNDS" -v c="$COUNT" -v i="$INTERVAL" 'BEGIN { printf "%d", r * 3 * (c * i + 30) + 120 }')

cleanup() {
  local rc=$? p i
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  rm -f "/var/run/wireguard/$BT_A.sock" "/var/run/wireguard/$BT_B.sock"
  if [[ -n ${PING_LOGS:-} ]]; then
    mkdir -p "$PING_LOGS" && cp "$WORK"/*.log "$PING_LOGS"/ 2>/dev/null || log "could not copy the logs to $PING_LOGS"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

start() { # LOG CPU NS CMD...
  local logf=$1 cpu=$2 ns=$3
  shift 3
  taskset -c "$cpu" timeout -k 5 "$BUDGET" ip netns exec "$ns" "$@" >"$logf" 2>&1 &
  PIDS+=("$!")
}

ip netns add "$NS_A"
ip netns add "$NS_B"
for ns in "$NS_A" "$NS_B"; do
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
  ip -n "$ns" link set lo up
done
for u in 1 2; do
  ip link add "veth$u-a" netns "$NS_A" type veth peer name "veth$u-b" netns "$NS_B"
  ip -n "$NS_A" addr add "198.18.$u.1/24" dev "veth$u-a"
  ip -n "$NS_B" addr add "198.18.$u.2/24" dev "veth$u-b"
  ip -n "$NS_A" link set "veth$u-a" up
  ip -n "$NS_B" link set "veth$u-b" up
done

flynode_up() { # NAME BINARY UNDERLAY MESH6-PREFIX MESH4-NET PORT
  local n=$1 bin=$2 u=$3 m6=$4 m4=$5 port=$6
  # Both daemons of a host share its namespace: metrics on a port of their own.
  FLYNODE_XDP_MODE=generic flynode_pair_files "$bin" "$WORK/$n" "$n" "$port" "198.18.$u" \
    "$m6" "$m4" "$n" "veth$u" $((port + 1000))
  start "$WORK/$n-a.log" 0 "$NS_A" "$bin" run --config "$WORK/$n/a/flynode.toml"
  start "$WORK/$n-b.log" 1 "$NS_B" "$bin" run --config "$WORK/$n/b/flynode.toml"
}

flynode_up flyx "$FLY_X" 1 fd00:b:: 198.18.250 51820
flynode_up flyy "$FLY_Y" 2 fd00:c:: 198.18.252 51822

for h in a b; do (umask 077 && wg genkey >"$WORK/bt-$h.key") && wg pubkey <"$WORK/bt-$h.key" >"$WORK/bt-$h.pub"; done
start "$WORK/bt-a.log" 0 "$NS_A" "$BT" --disable-drop-privileges -f "$BT_A"
start "$WORK/bt-b.log" 1 "$NS_B" "$BT" --disable-drop-privileges -f "$BT_B"
for ((i = 0; i < 50; i++)); do
  [[ -S /var/run/wireguard/$BT_A.sock && -S /var/run/wireguard/$BT_B.sock ]] && break
  sleep 0.1
done
ip netns exec "$NS_A" wg set "$BT_A" private-key "$WORK/bt-a.key" listen-port 51821 \
  peer "$(cat "$WORK/bt-b.pub")" endpoint 198.18.1.2:51821 allowed-ips 198.18.251.2/32
ip netns exec "$NS_B" wg set "$BT_B" private-key "$WORK/bt-b.key" listen-port 51821 \
  peer "$(cat "$WORK/bt-a.pub")" endpoint 198.18.1.1:51821 allowed-ips 198.18.251.1/32
ip -n "$NS_A" addr add 198.18.251.1/24 dev "$BT_A"
ip -n "$NS_B" addr add 198.18.251.2/24 dev "$BT_B"
ip -n "$NS_A" link set "$BT_A" mtu 1420 up
ip -n "$NS_B" link set "$BT_B" mtu 1420 up

NAMES=([250]="flynode X" [252]="flynode Y" [251]="boringtun-cli")
for net in 250 252 251; do
  up=0
  for ((i = 0; i < 50; i++)); do
    if timeout 3 ip netns exec "$NS_A" ping -c 1 -W 1 -q "198.18.$net.2" >/dev/null 2>&1; then up=1; break; fi
    sleep 0.2
  done
  if [[ $up == 0 ]]; then
    log "${NAMES[$net]}: no answer from 198.18.$net.2 within 10 s; logs:"
    tail -n 5 "$WORK"/*.log >&2 || true
    exit 1
  fi
done

# p50 of one ping run's RTTs (ms), from ping's per-packet lines.
p50() {
  timeout "$(awk -v c="$COUNT" -v i="$INTERVAL" 'BEGIN { printf "%d", c * (i + 0.01) + 30 }')" ip netns exec "$NS_A" taskset -c 0 \
    ping -n -c "$COUNT" -i "$INTERVAL" -W 1 "$1" 2>/dev/null |
    sed -n 's/.* time=\([0-9.]*\) ms/\1/p' | sort -n |
    awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", v[int((NR + 1) / 2)]; else print "nan" }'
}

log "flynode X: $FLY_X"
log "flynode Y: $FLY_Y"
log "$ROUNDS rounds of $COUNT pings each, ${INTERVAL}s apart, from host A (CPU0)"
declare -A ALL
for ((r = 1; r <= ROUNDS; r++)); do
  line="round $r:"
  for net in 250 252 251; do
    v=$(p50 "198.18.$net.2")
    ALL[$net]+="$v "
    line+="  ${NAMES[$net]} $v"
  done
  log "$line"
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { printf "%.3f", v[int((NR + 1) / 2)] }'; }
printf '\n%-15s %-10s %s\n' "tunnel" "p50 ms" "per round (p50 ms)"
for net in 250 252 251; do
  printf '%-15s %-10s %s\n' "${NAMES[$net]}" "$(echo "${ALL[$net]}" | median)" "${ALL[$net]}"
done
bt=$(echo "${ALL[251]}" | median)
x=$(echo "${ALL[250]}" | median)
y=$(echo "${ALL[252]}" | median)
awk -v x="$x" -v y="$y" -v b="$bt" 'BEGIN {
  printf "\nflynode X / boringtun-cli: %.2fx   flynode Y / boringtun-cli: %.2fx   Y / X: %.2fx\n", x / b, y / b, y / x
}'
