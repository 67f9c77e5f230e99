#!/usr/bin/env bash
# The packaging test: builds the flynode .deb, lints it, installs it for real into a
# throwaway root and checks what the package and its maintainer scripts did.
#
#   packaging/test-deb.sh          # from the repository root, as root
#   FLYNODE_DEB_NO_BUILD=1 ...     # package the existing target/release/flynode
#
# One PASS/FAIL line per check; exits non-zero if any check failed. The host is left
# untouched: the install happens in an overlay of the host's root file system whose
# writable layer is a tmpfs inside a private mount namespace (see packaging/README.md).

# dpkg-query's ${Status}-style formats are meant to stay unexpanded.
# shellcheck disable=SC2016
set -Eeuo pipefail

PROG=test-deb
FAILED=0
# Anything failing outside an explicit check is a failure too, never a silent exit.
trap 'printf "FAIL  %s: unexpected error at line %s: %s\n" "$PROG" "$LINENO" "$BASH_COMMAND"' ERR

pass() { printf 'PASS  %s\n' "$1"; }
fail() {
    printf 'FAIL  %s: %s\n' "$1" "$2"
    FAILED=1
}
# A failure after which nothing else can be checked.
fatal() {
    fail "$1" "$2"
    printf '%s: giving up\n' "$PROG" >&2
    exit 1
}
note() { printf '      %s\n' "$@"; }
# Indented copy of a command's output, for context under a PASS/FAIL line.
show() { sed 's/^/      | /' "$@"; }

# ---------------------------------------------------------------------------------
# Part 2: runs inside the private mount namespace (re-executed by part 1 below).
# ---------------------------------------------------------------------------------
in_namespace() {
    local tmp=$1 deb=$2 deb_version=$3
    local version=${deb_version%-*}
    local root=$tmp/root layers=$tmp/layers
    local unit=/usr/lib/systemd/system/flynode.service

    # Everything written to the throwaway root lands in this tmpfs, which goes away
    # with the namespace. Separately mounted /usr or /var get their own overlay:
    # overlayfs does not descend into other mounts.
    mount -t tmpfs -o mode=0700 flynode-test-layers "$layers"
    mkdir -p "$layers/root/upper" "$layers/root/work"
    mount -t overlay flynode-test-root \
        -o "lowerdir=/,upperdir=$layers/root/upper,workdir=$layers/root/work" "$root"
    local d
    for d in usr var etc; do
        if mountpoint -q "/$d"; then
            mkdir -p "$layers/$d/upper" "$layers/$d/work"
            mount -t overlay "flynode-test-$d" \
                -o "lowerdir=/$d,upperdir=$layers/$d/upper,workdir=$layers/$d/work" "$root/$d"
        fi
    done
    # API file systems. No /run/systemd/system in the fresh /run: the maintainer
    # scripts see a host where systemd is not running, so they never talk to the
    # host's systemd.
    mount -t proc proc "$root/proc" 2>/dev/null || mount --rbind /proc "$root/proc"
    mount -t tmpfs -o mode=0755 flynode-test-run "$root/run"
    mount -t tmpfs -o mode=1777 flynode-test-tmp "$root/tmp"
    mount -t tmpfs -o mode=0755 flynode-test-dev "$root/dev"
    for d in null zero full random urandom; do
        touch "$root/dev/$d"
        mount --bind "/dev/$d" "$root/dev/$d"
    done
    cp "$deb" "$root/tmp/flynode.deb"

    # Run a command in the throwaway root with a clean environment, as dpkg would.
    inroot() {
        chroot "$root" /usr/bin/env -i \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
    }
    mode_of() { inroot stat -c '%a %U:%G %F' "$1" 2>/dev/null || echo missing; }
    expect_mode() { # name path "mode owner type"
        local got
        got=$(mode_of "$2")
        if [ "$got" = "$3" ]; then pass "$1"; else fail "$1" "$2 is '$got', want '$3'"; fi
    }

    # The host's own flynode state (if any) would mask what the package does: start
    # from a root where flynode was never installed.
    local host_status
    host_status=$(inroot dpkg-query -W -f='${Status}' flynode 2>/dev/null || true)
    case "$host_status" in
        "" | *" not-installed") ;;
        *)
            note "flynode is known to the host's dpkg ($host_status); purging it inside the throwaway root first"
            inroot dpkg --purge flynode >/dev/null 2>&1 </dev/null
            ;;
    esac
    inroot rm -rf /etc/flynode /var/lib/flynode

    # --- (3) install ---------------------------------------------------------------
    local out=$tmp/dpkg-install.log
    if inroot dpkg --force-confold -i /tmp/flynode.deb >"$out" 2>&1 </dev/null; then
        pass "install: dpkg -i in the throwaway root (maintainer scripts ran)"
    else
        show "$out"
        fatal "install: dpkg -i in the throwaway root" "dpkg failed (output above)"
    fi
    local status
    status=$(inroot dpkg-query -W -f='${Status}' flynode 2>&1 || true)
    if [ "$status" = "install ok installed" ]; then
        pass "install: dpkg status is 'install ok installed'"
    else
        fail "install: dpkg status" "'$status'"
    fi
    expect_mode "installed /usr/bin/flynode is 755 root" /usr/bin/flynode "755 root:root regular file"
    expect_mode "installed unit is 644 root" "$unit" "644 root:root regular file"
    expect_mode "installed /etc/flynode/flynode.toml is 644 root" /etc/flynode/flynode.toml "644 root:root regular file"
    expect_mode "installed /etc/flynode/routing.toml is 644 root" /etc/flynode/routing.toml "644 root:root regular file"
    local conffiles
    conffiles=$(inroot dpkg-query -W -f='${Conffiles}\n' flynode 2>&1 || true)
    if grep -q '^ /etc/flynode/flynode.toml ' <<<"$conffiles" &&
        grep -q '^ /etc/flynode/routing.toml ' <<<"$conffiles"; then
        pass "install: dpkg registered both /etc/flynode files as conffiles"
    else
        fail "install: conffiles in the dpkg database" "got: $(tr '\n' ' ' <<<"$conffiles")"
    fi

    # --- (4) the installed binary ----------------------------------------------------
    local got
    got=$(inroot /usr/bin/flynode --version 2>&1) || true
    if [ "$got" = "flynode $version" ]; then
        pass "flynode --version prints 'flynode $version'"
    else
        fail "flynode --version" "printed '$got', want 'flynode $version'"
    fi
    # node_id defaults to the hostname, so pin a valid one (a UTS namespace of its
    # own) to make the result independent of the CI machine's name.
    if unshare --uts sh -c 'hostname flynode-test && exec "$@"' sh \
        chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        flynode check-config /etc/flynode/flynode.toml >"$tmp/check-config.log" 2>&1; then
        pass "flynode check-config accepts the shipped flynode.toml + routing.toml"
    else
        show "$tmp/check-config.log"
        fail "flynode check-config on the shipped config" "exit status non-zero (output above)"
    fi

    # --- (5) systemd-analyze verify ----------------------------------------------------
    # Run inside the throwaway root, so ExecStart=/usr/bin/flynode and the
    # Documentation=man:flynode(8) page are checked against what the package installed.
    if inroot systemd-analyze verify "$unit" >"$tmp/verify.log" 2>&1 && ! [ -s "$tmp/verify.log" ]; then
        pass "systemd-analyze verify $unit (no warnings)"
    elif inroot systemd-analyze verify "$unit" >/dev/null 2>&1; then
        show "$tmp/verify.log"
        fail "systemd-analyze verify" "passed, but with the warnings above"
    else
        show "$tmp/verify.log"
        fail "systemd-analyze verify" "failed (output above)"
    fi
    # Informational: systemd's own exposure score for the unit's sandboxing.
    inroot systemd-analyze security --offline=yes "$unit" 2>/dev/null |
        grep -i 'overall exposure' | sed 's/^→ */      /' || true

    # --- (6) maintainer scripts --------------------------------------------------------
    local keys=/var/lib/flynode/keys
    expect_mode "postinst: /var/lib/flynode is 0700 root" /var/lib/flynode "700 root:root directory"
    expect_mode "postinst: $keys is 0700 root" "$keys" "700 root:root directory"
    expect_mode "postinst: $keys/private.key is 0600 root" "$keys/private.key" "600 root:root regular file"
    local key_sum secret
    key_sum=$(inroot sha256sum "$keys/private.key" 2>/dev/null | cut -d' ' -f1 || true)
    secret=$(inroot cat "$keys/private.key" 2>/dev/null | tr -d '[:space:]' || true)
    if [ -n "$secret" ] && ! grep -qF -- "$secret" "$out"; then
        pass "postinst: the private key is not in dpkg's output"
    else
        fail "postinst: private key printed" "dpkg -i output contains the private key (or the key is empty)"
    fi
    if inroot flynode keys show --key-dir "$keys" >/dev/null 2>&1; then
        pass "postinst: the generated key is readable by 'flynode keys show'"
    else
        fail "postinst: generated key" "'flynode keys show --key-dir $keys' failed"
    fi

    if inroot /var/lib/dpkg/info/flynode.postinst configure "$deb_version" >/dev/null 2>&1 </dev/null &&
        [ "$(inroot sha256sum "$keys/private.key" | cut -d' ' -f1)" = "$key_sum" ]; then
        pass "postinst: running 'postinst configure' again keeps the key"
    else
        fail "postinst: second run" "failed or replaced the key"
    fi
    # A reinstall (same version: preinst upgrade, postinst configure <old>) keeps the
    # key and an edited conffile.
    echo '# edited by test-deb' | inroot tee -a /etc/flynode/flynode.toml >/dev/null
    local conf_sum
    conf_sum=$(inroot sha256sum /etc/flynode/flynode.toml | cut -d' ' -f1)
    if inroot dpkg --force-confold -i /tmp/flynode.deb >"$tmp/dpkg-reinstall.log" 2>&1 </dev/null &&
        [ "$(inroot sha256sum "$keys/private.key" | cut -d' ' -f1)" = "$key_sum" ] &&
        [ "$(inroot sha256sum /etc/flynode/flynode.toml | cut -d' ' -f1)" = "$conf_sum" ]; then
        pass "reinstall: key and edited flynode.toml unchanged"
    else
        show "$tmp/dpkg-reinstall.log"
        fail "reinstall" "dpkg failed, or the key or the edited conffile changed"
    fi
    local wants
    wants=$(inroot sh -c 'ls /etc/systemd/system/*.wants/flynode.service 2>/dev/null' || true)
    if [ -z "$wants" ]; then
        pass "install: flynode.service is not enabled"
    else
        fail "install: unit enabled" "found $wants"
    fi

    if inroot dpkg -r flynode >"$tmp/dpkg-remove.log" 2>&1 </dev/null &&
        [ "$(mode_of /usr/bin/flynode)" = missing ] &&
        [ "$(inroot sha256sum "$keys/private.key" 2>/dev/null | cut -d' ' -f1)" = "$key_sum" ] &&
        [ "$(mode_of /etc/flynode/flynode.toml)" != missing ]; then
        pass "remove: binary gone, key and configuration kept"
    else
        show "$tmp/dpkg-remove.log"
        fail "remove" "dpkg -r failed, or it did not keep the key/configuration"
    fi
    if inroot dpkg --purge flynode >"$tmp/dpkg-purge.log" 2>&1 </dev/null &&
        [ "$(mode_of /var/lib/flynode)" = missing ] &&
        [ "$(mode_of /etc/flynode)" = missing ] &&
        case "$(inroot dpkg-query -W -f='${Status}' flynode 2>/dev/null || true)" in
            "" | *" not-installed") true ;;
            *) false ;;
        esac; then
        pass "purge: /var/lib/flynode (keys) and /etc/flynode removed"
    else
        show "$tmp/dpkg-purge.log"
        fail "purge" "dpkg --purge failed, or /var/lib/flynode or /etc/flynode is still there"
    fi

    return "$FAILED"
}

if [ "${1:-}" = "--in-namespace" ]; then
    shift
    if in_namespace "$@"; then exit 0; else exit 1; fi
fi

# ---------------------------------------------------------------------------------
# Part 1: build, lint and inspect the package on the host.
# ---------------------------------------------------------------------------------
cd "$(dirname "$(readlink -f "$0")")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "$PROG: must run as root (it installs the package into a throwaway root)" >&2
    exit 1
fi
missing=""
for tool in cargo lintian dpkg dpkg-deb dpkg-parsechangelog systemd-analyze unshare chroot python3; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
cargo deb --version >/dev/null 2>&1 || missing="$missing cargo-deb"
if [ -n "$missing" ]; then
    echo "$PROG: missing tools:$missing (run scripts/setup.sh)" >&2
    exit 1
fi

tmp=$(mktemp -d /tmp/flynode-test-deb.XXXXXX)
cleanup() {
    # The mounts live only in the namespace and vanish with it; this is a guard
    # against a leak before deleting anything.
    local m
    for m in "$tmp/root" "$tmp/layers"; do
        if mountpoint -q "$m" 2>/dev/null; then umount -l "$m" || true; fi
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- (1) cargo deb ---------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$repo/target}
deb_args=(deb -p flynode)
if [ "${FLYNODE_DEB_NO_BUILD:-}" = 1 ]; then
    if [ -x "$target_dir/release/flynode" ]; then
        deb_args+=(--no-build)
    else
        note "FLYNODE_DEB_NO_BUILD=1 but $target_dir/release/flynode does not exist: building"
    fi
fi
if cargo "${deb_args[@]}" >"$tmp/cargo-deb.out" 2>"$tmp/cargo-deb.err"; then
    deb=$(grep '\.deb$' "$tmp/cargo-deb.out" | tail -n1 || true)
    if [ -n "$deb" ] && [ -f "$deb" ]; then
        pass "cargo ${deb_args[*]} -> ${deb#"$repo"/}"
    else
        cat "$tmp/cargo-deb.out" "$tmp/cargo-deb.err" | tail -n 20 | show
        fatal "cargo ${deb_args[*]}" "no .deb path in its output"
    fi
else
    tail -n 30 "$tmp/cargo-deb.err" | show
    fatal "cargo ${deb_args[*]}" "failed (last lines above)"
fi

# --- (2) lintian -------------------------------------------------------------------
# Suppressed, each unavoidable for this package:
#   initial-upload-closes-no-bugs  flynode is not uploaded to the Debian archive, so
#                                  there is no ITP bug for the changelog to close.
# Informational tags (not shown by default) that are expected for a cargo-built
# binary: hardening-no-fortify-functions (Rust does not call glibc's _chk
# functions), no-md5sums-control-file (cargo-deb does not write one).
lintian --suppress-tags initial-upload-closes-no-bugs "$deb" >"$tmp/lintian.out" 2>&1 || true
grep -v 'running with root privileges is not recommended' "$tmp/lintian.out" >"$tmp/lintian.tags" || true
n_err=$(grep -c '^E:' "$tmp/lintian.tags" || true)
n_warn=$(grep -c '^W:' "$tmp/lintian.tags" || true)
if grep -q '^E:' "$tmp/lintian.tags"; then
    show "$tmp/lintian.tags"
    fail "lintian" "$n_err error(s) (listed above)"
elif grep -qv '^[EWIPNX]:' "$tmp/lintian.tags"; then
    show "$tmp/lintian.tags"
    fail "lintian" "did not run cleanly (output above)"
else
    pass "lintian: no errors, $n_warn warning(s)"
    grep '^W:' "$tmp/lintian.tags" | show || true
fi

# --- (3) package contents ------------------------------------------------------------
version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -c "$deb" >"$tmp/contents"
deb_mode() { # path -> "perms owner"
    awk -v p="./$1" '$6 == p { print $1, $2 }' "$tmp/contents"
}
check_deb_mode() {
    local got
    got=$(deb_mode "$1")
    if [ "$got" = "$2" ]; then
        pass "package: /$1 is ${2%% *} root"
    else
        fail "package: /$1" "is '${got:-absent}', want '$2'"
    fi
}
check_deb_mode usr/bin/flynode "-rwxr-xr-x 0/0"
check_deb_mode usr/lib/systemd/system/flynode.service "-rw-r--r-- 0/0"
check_deb_mode etc/flynode/flynode.toml "-rw-r--r-- 0/0"
check_deb_mode etc/flynode/routing.toml "-rw-r--r-- 0/0"
dpkg-deb --ctrl-tarfile "$deb" | tar -x -O ./conffiles >"$tmp/conffiles" 2>/dev/null || true
if grep -qx /etc/flynode/flynode.toml "$tmp/conffiles" && grep -qx /etc/flynode/routing.toml "$tmp/conffiles"; then
    pass "package: DEBIAN/conffiles lists /etc/flynode/flynode.toml and routing.toml"
else
    fail "package: DEBIAN/conffiles" "got: $(tr '\n' ' ' <"$tmp/conffiles")"
fi
changelog_version=$(dpkg-parsechangelog -l packaging/changelog -S Version)
if [ "$changelog_version" = "$version" ]; then
    pass "package: packaging/changelog is at the package version $version"
else
    fail "package: packaging/changelog" "top entry is $changelog_version, the package is $version (add a changelog entry)"
fi
# Debian's synopsis is one line under 80 characters; cargo-deb wraps a longer Cargo
# `description` into the extended description, cutting the synopsis mid-sentence.
cargo_description=$(cargo metadata --no-deps --format-version 1 --offline 2>/dev/null |
    python3 -c 'import json,sys; print(next(p["description"] for p in json.load(sys.stdin)["packages"] if p["name"] == "flynode"))') ||
    cargo_description="(cargo metadata failed)"
synopsis=$(dpkg-deb -f "$deb" Description | sed -n 1p)
if [ "$synopsis" = "$cargo_description" ] && [ "${#synopsis}" -lt 80 ]; then
    pass "package: synopsis is the whole crate description (${#synopsis} < 80 chars)"
else
    fail "package: synopsis" "node/Cargo.toml's description is ${#cargo_description} chars; Debian allows < 80, so the control file's synopsis is cut to '$synopsis'"
fi
note "Depends: $(dpkg-deb -f "$deb" Depends)"

# --- (3)-(6) in the throwaway root -----------------------------------------------------
mkdir -p "$tmp/root" "$tmp/layers"
if ! unshare --mount --propagation private -- "$repo/packaging/test-deb.sh" \
    --in-namespace "$tmp" "$deb" "$version"; then
    FAILED=1
fi

if [ "$FAILED" -ne 0 ]; then
    echo "$PROG: FAILED (see the FAIL lines above)" >&2
    exit 1
fi
echo "$PROG: all checks passed"
