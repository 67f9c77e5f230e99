//! A standard WireGuard peer, wireguard-go configured with `wg` (Debian's packages),
//! joins a flynode mesh: handshakes and pings both ways, IPv6 and IPv4, with the
//! handshake started by either side.
use std::process::Stdio;
use std::time::Duration;

use flynode::netns::{ChildGuard, run, wait_for};
use flynode_tests::mesh::{Host, Lan, have, node_entry, wg};
use flynode_tests::node::{Daemon, Prepared, require_root};

const UP: Duration = Duration::from_secs(15);

struct WgGo {
    iface: String,
    _child: ChildGuard,
    _keys: tempfile::TempDir,
    public_key: String,
}

fn require_wireguard_go() -> bool {
    if have("wireguard-go") && have("wg") {
        return true;
    }
    assert!(
        std::env::var_os("FLYNODE_REQUIRE_WG").is_none(),
        "wireguard-go and wg are required (scripts/setup.sh installs them)"
    );
    eprintln!("skipping: wireguard-go or wg not installed");
    false
}

/// The wireguard-go side's key pair, made with `wg genkey`/`wg pubkey`.
fn wg_keys() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let private = run(std::process::Command::new("wg").arg("genkey")).expect("wg genkey");
    let path = dir.path().join("private.key");
    std::fs::write(&path, &private.stdout).expect("key");
    let public = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(&path).expect("key"))
        .output()
        .expect("wg pubkey");
    assert!(public.status.success(), "wg pubkey failed");
    (
        dir,
        String::from_utf8_lossy(&public.stdout).trim().to_owned(),
    )
}

/// Starts wireguard-go on `host` and configures it with `wg` to peer with `flynode`.
fn start_wireguard_go(
    host: &Host,
    keys: (tempfile::TempDir, String),
    flynode: &Host,
    flynode_key: &str,
) -> WgGo {
    // The UAPI socket lives in /var/run/wireguard, shared by all namespaces: the name
    // must be unique on the machine.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let iface = format!("wgi{}-{n}", std::process::id() % 1_000_000);
    let child = ChildGuard::spawn(
        host.ns
            .command("wireguard-go")
            .args(["-f", &iface])
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
    .expect("wireguard-go");
    let sock = format!("/var/run/wireguard/{iface}.sock");
    assert!(
        wait_for(Duration::from_secs(5), || std::path::Path::new(&sock)
            .exists()
            .then_some(()))
        .is_some(),
        "wireguard-go did not create {sock}"
    );
    let (dir, public_key) = keys;
    let key_path = dir.path().join("private.key");
    let endpoint = format!("{}:51820", flynode.underlay4());
    let allowed = format!("{}/128,{}/32", flynode.mesh6(), flynode.mesh4());
    wg(
        &host.ns,
        &[
            "set",
            &iface,
            "private-key",
            key_path.to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            flynode_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &allowed,
        ],
    );
    let ip = |args: &[&str]| host.ns.ip(args).expect("ip");
    ip(&[
        "addr",
        "add",
        &format!("{}/128", host.mesh6()),
        "dev",
        &iface,
        "nodad",
    ]);
    ip(&[
        "addr",
        "add",
        &format!("{}/32", host.mesh4()),
        "dev",
        &iface,
    ]);
    ip(&["link", "set", &iface, "mtu", "1420", "up"]);
    ip(&[
        "route",
        "add",
        &format!("{}/128", flynode.mesh6()),
        "dev",
        &iface,
    ]);
    ip(&[
        "route",
        "add",
        &format!("{}/32", flynode.mesh4()),
        "dev",
        &iface,
    ]);
    WgGo {
        iface,
        _child: child,
        _keys: dir,
        public_key,
    }
}

/// The map: the flynode node and the wireguard-go node.
fn routing(flynode: &Host, prepared: &Prepared, wg_host: &Host, wg_key: &str) -> String {
    let mut spec = wg_host.spec();
    spec.id = "wg-go".into();
    node_entry(
        &prepared.spec,
        &prepared.public_key,
        format!("{}:51820", flynode.underlay4()).parse().unwrap(),
    ) + &node_entry(
        &spec,
        &wg_key.parse().expect("wg key"),
        format!("{}:51820", wg_host.underlay4()).parse().unwrap(),
    )
}

fn wg_handshakes(host: &Host, iface: &str) -> u64 {
    let out = run(host
        .ns
        .command("wg")
        .args(["show", iface, "latest-handshakes"]))
    .expect("wg show");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn pings_both_ways(fly: &Host, wgh: &Host, first_from_wg: bool, daemon: &Daemon) {
    let to_wg = [wgh.mesh6().to_string(), wgh.mesh4().to_string()];
    let to_fly = [fly.mesh6().to_string(), fly.mesh4().to_string()];
    let rounds: [(&Host, &[String; 2]); 2] = if first_from_wg {
        [(wgh, &to_fly), (fly, &to_wg)]
    } else {
        [(fly, &to_wg), (wgh, &to_fly)]
    };
    for (from, targets) in rounds {
        for dst in targets.iter() {
            assert!(
                from.ping_within(dst, UP),
                "ping {dst} failed\n{}",
                daemon.log()
            );
        }
    }
}

/// Two hosts: flynode's keys and map on host 1 (not started), wireguard-go's keys for
/// host 2. `None` when wireguard-go is missing and not required.
struct Setup {
    lan: Lan,
    keys: (tempfile::TempDir, String),
    prepared: Prepared,
    map: String,
}

fn setup() -> Option<Setup> {
    require_root();
    if !require_wireguard_go() {
        return None;
    }
    let lan = Lan::new(2);
    let keys = wg_keys();
    let prepared = Prepared::new(lan.host(1).spec());
    let map = routing(lan.host(1), &prepared, lan.host(2), &keys.1);
    Some(Setup {
        lan,
        keys,
        prepared,
        map,
    })
}

#[test]
fn wireguard_go_initiates_and_both_sides_ping_v6_and_v4() {
    let Some(Setup {
        lan,
        keys,
        prepared,
        map,
    }) = setup()
    else {
        return;
    };
    let (fly, wgh) = (lan.host(1), lan.host(2));
    let fly_key = prepared.public_key.to_string();
    // flynode first: its own first handshake finds nobody listening.
    let daemon = prepared.start(&fly.ns, &map);
    let wgo = start_wireguard_go(wgh, keys, fly, &fly_key);
    pings_both_ways(fly, wgh, true, &daemon);
    assert!(wg_handshakes(wgh, &wgo.iface) > 0);
    let status = daemon.status();
    let peer = &status["mesh"]["peers"][0];
    assert_eq!(peer["node"], "wg-go");
    assert_eq!(peer["public_key"], wgo.public_key);
    assert_eq!(peer["session_up"], true);
    assert!(daemon.stop().success());
}

#[test]
fn flynode_initiates_and_both_sides_ping_v6_and_v4() {
    let Some(Setup {
        lan,
        keys,
        prepared,
        map,
    }) = setup()
    else {
        return;
    };
    let (fly, wgh) = (lan.host(1), lan.host(2));
    let fly_key = prepared.public_key.to_string();
    // wireguard-go first and silent (no keepalive, no traffic). It is no worker of a
    // service, so flynode's session with it is lazy: no handshake until a packet needs
    // one, then flynode's is the one that makes the session.
    let wgo = start_wireguard_go(wgh, keys, fly, &fly_key);
    let daemon = prepared.start(&fly.ns, &map);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        wg_handshakes(wgh, &wgo.iface),
        0,
        "a handshake to a peer nothing needed"
    );
    pings_both_ways(fly, wgh, false, &daemon);
    assert!(
        wg_handshakes(wgh, &wgo.iface) > 0,
        "no handshake from flynode\n{}",
        daemon.log()
    );
    assert!(daemon.stop().success());
}
