# A two-host flynode mesh's files, shared by bench/tunnel.sh and bench/ping-ab.sh
# (sourced, not run). The caller defines `log MESSAGE...`.

# flynode_pair_files BIN DIR NAME PORT UNDERLAY MESH6 MESH4 TUN VETH [METRICS_PORT]
#
# Writes DIR/a and DIR/b (mode 0700), one per host: a fresh key (keys/, pub), a
# flynode.toml and the routing map (routing.toml, the same for both). Host a is node
# NAME-a at UNDERLAY.1:PORT with mesh addresses MESH6 1 and MESH4.1, its TUN device
# TUN-a and generic XDP (or $FLYNODE_XDP_MODE) on VETH-a; host b the same with .2/2/-b.
# MESH6 ends in "::" (fd00:b::). With METRICS_PORT, metrics listen on 127.0.0.1 there
# (two daemons in one namespace); without, on the default. Returns 1 (with a message)
# if a key cannot be made.
flynode_pair_files() {
  local bin=$1 dir=$2 name=$3 port=$4 underlay=$5 m6=$6 m4=$7 tun=$8 veth=$9 metrics=${10:-}
  local h i d out
  for h in a b; do
    d=$dir/$h
    mkdir -p "$d"
    chmod 700 "$d"
    if ! out=$(timeout 20 "$bin" keys generate --key-dir "$d/keys" 2>"$d/keys.err"); then
      log "flynode: 'flynode keys generate' failed:"
      sed 's/^/    /' "$d/keys.err" >&2
      return 1
    fi
    out=$(printf '%s\n' "$out" | tail -n 1 | tr -d '[:space:]')
    [[ $out =~ ^[A-Za-z0-9+/]{43}=$ ]] ||
      { log "flynode: 'flynode keys generate' printed no public key (got '$out')"; return 1; }
    echo "$out" >"$d/pub"
  done
  for h in a b; do
    d=$dir/$h
    i=1
    [[ $h == b ]] && i=2
    {
      cat <<EOF
node_id = "$name-$h"
region = "bench"
mesh_address = "$m6$i"
key_dir = "$d/keys"
control_socket = "$d/control.sock"

[wireguard]
listen_port = $port
interface = "$tun-$h"
mesh_ipv4 = "$m4.$i"

[xdp]
mode = "${FLYNODE_XDP_MODE:-generic}"
interface = "$veth-$h"

[source]
file = "$d/routing.toml"
EOF
      if [[ -n $metrics ]]; then printf '\n[metrics]\nlisten = "127.0.0.1:%s"\n' "$metrics"; fi
    } >"$d/flynode.toml"
  done
  for h in a b; do
    i=1
    [[ $h == b ]] && i=2
    cat <<EOF
[[node]]
id = "$name-$h"
region = "bench"
public_key = "$(cat "$dir/$h/pub")"
endpoint = "$underlay.$i:$port"
mesh_address = "$m6$i"
mesh_ipv4 = "$m4.$i"

EOF
  done >"$dir/a/routing.toml"
  cp "$dir/a/routing.toml" "$dir/b/routing.toml"
}
