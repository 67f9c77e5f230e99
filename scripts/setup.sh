#!/usr/bin/env bash
# Installs everything a fresh Debian 12 machine of this kind lacks to build, test and
# package flynode. Idempotent: every step checks before it acts, so a second run takes
# seconds. Needs root (apt-get, cargo install into ~/.cargo).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

# Debian packages. The list is split by purpose so a reader knows why each is here.
# protobuf-compiler + libprotobuf-dev (the well-known .proto files): etcd-client
# generates its gRPC code at build time.
APT_BUILD=(build-essential pkg-config protobuf-compiler libprotobuf-dev clang llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev)
APT_NET=(iproute2 ethtool tcpdump iputils-ping netcat-openbsd wireguard-tools wireguard-go)
APT_PKG=(lintian dpkg-dev fakeroot systemd)
APT_FLEET=(etcd-server etcd-client)
APT_ALL=("${APT_BUILD[@]}" "${APT_NET[@]}" "${APT_PKG[@]}" "${APT_FLEET[@]}")

missing=()
for p in "${APT_ALL[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Third-party apt sources on some images are unreachable; their failure must not stop us.
  apt-get update -o APT::Update::Error-Mode=any >/dev/null 2>&1 || apt-get update >/dev/null 2>&1 || true
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  # etcd-server's package starts a system etcd on 2379; tests run their own on other ports.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
else
  log "apt packages present"
fi

export PATH="$HOME/.cargo/bin:$PATH"

# The eBPF crate is built with stable + RUSTC_BOOTSTRAP=1 and -Z build-std=core, which
# needs stable's rust-src (see DESIGN.md "Building the XDP program").
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rustup component rust-src"
  rustup component add rust-src
else
  log "rust-src present"
fi

# bpf-linker must link against the same LLVM major as rustc (22).
want_linker="0.13.0"
if ! bpf-linker --version 2>/dev/null | grep -q "$want_linker"; then
  log "building bpf-linker $want_linker against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install bpf-linker@"$want_linker" --locked --no-default-features --features llvm-22
else
  log "bpf-linker $want_linker present"
fi

# cargo-deb builds the .deb from packaging/.
if ! command -v cargo-deb >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install cargo-deb --locked
else
  log "cargo-deb present"
fi

# bpffs, for pinned maps. Harmless if already mounted.
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "could not mount bpffs (pinning disabled)"
fi

log "done"
