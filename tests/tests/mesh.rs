//! The WireGuard mesh with real flynode processes in network namespaces on one LAN:
//! every pair talks, peers come and go with the routing map, a killed node comes back,
//! and key rotation under a steady stream loses nothing.
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use flynode::netns::wait_for;
use flynode_keys::PublicKey;
use flynode_tests::mesh::{Lan, routing_for, start_mesh, stream_while};
use flynode_tests::node::{Daemon, flynode_bin, require_root};

const UP: Duration = Duration::from_secs(10);

fn peer<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["mesh"]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == node)
        .unwrap_or_else(|| panic!("no peer {node} in {status}"))
}

fn logs(daemons: &[Daemon]) -> String {
    daemons
        .iter()
        .map(|d| format!("--- {} ---\n{}", d.spec().id, d.log()))
        .collect()
}

fn map_of(lan: &Lan, daemons: &[&Daemon], keys: &[PublicKey]) -> String {
    let specs: Vec<_> = daemons.iter().map(|d| d.spec().clone()).collect();
    let entries: Vec<_> = daemons
        .iter()
        .zip(&specs)
        .zip(keys)
        .map(|((d, spec), key)| {
            let n: u8 = d
                .spec()
                .id
                .trim_start_matches("node-")
                .parse()
                .expect("node-N");
            (lan.host(n), spec, *key)
        })
        .collect();
    routing_for(&entries)
}

#[test]
fn three_nodes_every_pair_pings_over_the_mesh() {
    require_root();
    let lan = Lan::new(3);
    let daemons = start_mesh(&lan, |_| {});
    for from in &lan.nodes {
        for to in &lan.nodes {
            if from.n == to.n {
                continue;
            }
            for dst in [to.mesh6().to_string(), to.mesh4().to_string()] {
                assert!(
                    from.ping_within(&dst, UP),
                    "{} cannot ping {dst}\n{}",
                    from.id(),
                    logs(&daemons)
                );
            }
        }
    }
    let mut inline = 0;
    for (d, host) in daemons.iter().zip(&lan.nodes) {
        let status = d.status();
        let counters = &status["mesh"]["counters"];
        let (tun_rx, here) = (
            counters["tun_rx_packets"].as_u64().unwrap(),
            counters["tun_rx_inline"].as_u64().unwrap(),
        );
        assert!(here <= tun_rx, "{counters}");
        inline += here;
        assert_eq!(status["mesh"]["peers"].as_array().unwrap().len(), 2);
        for other in lan.nodes.iter().filter(|o| o.n != host.n) {
            let p = peer(&status, &other.id());
            assert_eq!(p["session_up"], true, "{p}");
            assert!(p["handshakes"].as_u64().unwrap() >= 1, "{p}");
            assert!(p["rx_packets"].as_u64().unwrap() >= 2, "{p}");
            assert!(p["tx_packets"].as_u64().unwrap() >= 2, "{p}");
            assert_eq!(p["decrypt_failures"], 0, "{p}");
        }
        assert_eq!(status["mesh"]["interface"], "fly0");
        assert_eq!(status["mesh"]["mtu"], 1420);
        // A crash must not write the key into a core file (issue 29 item 6).
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .expect("core limit line");
        assert_eq!(
            core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
            ["0", "0"],
            "{core}"
        );
    }
    // Each echo reply is queued in the TUN inside the write of its request: the
    // receiving thread sends it itself unless `mesh-tx` is reading at that instant.
    assert!(
        inline >= 1,
        "no echo reply was answered inline\n{}",
        logs(&daemons)
    );
    for d in daemons {
        assert!(d.stop().success());
    }
}

/// With the program attached natively, WireGuard reaches each node through its AF_XDP
/// socket (not the mesh's UDP socket), and the mesh works exactly the same.
#[test]
fn with_native_xdp_wireguard_arrives_through_af_xdp() {
    require_root();
    let lan = Lan::new(3);
    let daemons = start_mesh(&lan, |spec| spec.mode = "native".into());
    for from in &lan.nodes {
        for to in &lan.nodes {
            if from.n != to.n {
                let dst = to.mesh6().to_string();
                assert!(
                    from.ping_within(&dst, UP),
                    "node-{} cannot ping {dst}\n{}",
                    from.n,
                    logs(&daemons)
                );
            }
        }
    }
    for d in &daemons {
        let status = d.status();
        assert_eq!(status["xdp"]["mode"], "native");
        let backend = status["xdp"]["backend"].as_str().unwrap_or_default();
        assert!(backend.starts_with("af_xdp"), "{backend}");
        let wg = status["xdp"]["counters"]["userspace_wireguard"]
            .as_u64()
            .unwrap();
        let xsk = status["xdp"]["ingress"]["xsk_datagrams"].as_u64().unwrap();
        let udp = status["mesh"]["counters"]["udp_rx_datagrams"]
            .as_u64()
            .unwrap();
        assert!(
            wg >= 4,
            "{}: {wg} WireGuard frames through XDP",
            d.spec().id
        );
        assert_eq!(xsk, wg, "every one delivered through AF_XDP");
        // Plus whatever reached the mesh socket before the program was attached.
        assert!(udp >= wg, "the mesh processed those: {status}");
    }
}

#[test]
fn a_killed_peer_never_blocks_the_others_and_comes_back_by_itself() {
    require_root();
    let lan = Lan::new(3);
    let mut daemons = start_mesh(&lan, |_| {});
    let (h1, h2, h3) = (lan.host(1), lan.host(2), lan.host(3));
    assert!(
        h1.ping_within(&h3.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    assert!(
        h1.ping_within(&h2.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    let third = daemons.pop().expect("node-3").kill();
    // node-3 is gone: traffic to it is lost, traffic between 1 and 2 is not disturbed.
    assert!(!h1.ping(&h3.mesh6().to_string(), 1));
    assert!(h1.ping(&h2.mesh6().to_string(), 5), "{}", logs(&daemons));
    assert!(h2.ping(&h1.mesh4().to_string(), 5), "{}", logs(&daemons));
    // It restarts with no session state; the others have stale sessions. Sessions come
    // back without anyone touching the others.
    let map = std::fs::read_to_string(third.dir().join("routing.toml")).expect("map");
    daemons.push(third.start(&h3.ns, &map));
    assert!(
        h1.ping_within(&h3.mesh6().to_string(), Duration::from_secs(20)),
        "{}",
        logs(&daemons)
    );
    assert!(
        h3.ping_within(&h2.mesh4().to_string(), Duration::from_secs(20)),
        "{}",
        logs(&daemons)
    );
}

#[test]
fn routing_map_edits_add_and_remove_peers_live() {
    require_root();
    let lan = Lan::new(3);
    let daemons = start_mesh(&lan, |_| {});
    let (h1, h2, h3) = (lan.host(1), lan.host(2), lan.host(3));
    let keys: Vec<PublicKey> = daemons.iter().map(Daemon::public_key).collect();
    assert!(
        h1.ping_within(&h3.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    // node-3 leaves node-1's map: node-1 drops it at once, node-2 is untouched.
    let without_3 = map_of(&lan, &[&daemons[0], &daemons[1]], &keys[..2]);
    daemons[0].reload_routing(&without_3);
    let gone = wait_for(UP, || {
        let s = daemons[0].status();
        (s["mesh"]["peers"].as_array().unwrap().len() == 1).then_some(())
    });
    assert!(gone.is_some(), "{}", logs(&daemons));
    assert!(!h1.ping(&h3.mesh6().to_string(), 2));
    assert!(h1.ping(&h2.mesh6().to_string(), 2), "{}", logs(&daemons));
    // And comes back.
    let all = map_of(&lan, &[&daemons[0], &daemons[1], &daemons[2]], &keys);
    daemons[0].reload_routing(&all);
    assert!(
        h1.ping_within(&h3.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    assert!(
        h3.ping_within(&h1.mesh4().to_string(), UP),
        "{}",
        logs(&daemons)
    );
}

/// `flynode keys rotate` against a daemon, in the background: returns its output.
fn rotate(daemon: &Daemon, wait: &str) -> std::process::Child {
    Command::new(flynode_bin())
        .args(["keys", "rotate", "--wait", wait, "--socket"])
        .arg(daemon.socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("flynode keys rotate")
}

fn new_key_of(child: &mut std::process::Child) -> PublicKey {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read new key");
    line.trim().parse().expect("a public key on stdout")
}

#[test]
fn rotating_both_nodes_under_a_steady_stream_loses_nothing() {
    require_root();
    let lan = Lan::new(2);
    let daemons = start_mesh(&lan, |_| {});
    let (h1, h2) = (lan.host(1), lan.host(2));
    assert!(
        h1.ping_within(&h2.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    assert!(
        h2.ping_within(&h1.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    let mut keys: Vec<PublicKey> = daemons.iter().map(Daemon::public_key).collect();
    let to = SocketAddr::from((h2.mesh6(), 9000));
    // 2500 datagrams at 500/s: 5 s, during which node-1 then node-2 rotate.
    let (stream, outputs) = stream_while(&h1.ns, &h2.ns, to, 2500, 500, || {
        let mut outputs = Vec::new();
        for i in 0..2 {
            std::thread::sleep(Duration::from_millis(700));
            let mut child = rotate(&daemons[i], "20s");
            keys[i] = new_key_of(&mut child);
            // The operator publishes the new key: every node's map changes.
            let map = map_of(&lan, &[&daemons[0], &daemons[1]], &keys);
            for d in &daemons {
                d.reload_routing(&map);
            }
            let out = child.wait_with_output().expect("rotate exits");
            outputs.push(out);
        }
        outputs
    });
    for out in &outputs {
        assert!(
            out.status.success(),
            "keys rotate: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs(&daemons)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 1 peers moved"));
    }
    let lost = stream.lost();
    assert!(
        lost.is_empty(),
        "{} of {} datagrams lost across the rotations: {:?}\n{}",
        lost.len(),
        stream.sent,
        &lost[..lost.len().min(20)],
        logs(&daemons)
    );
    for (d, key) in daemons.iter().zip(&keys) {
        let status = d.status();
        assert_eq!(status["public_key"], key.to_string());
        assert!(status["mesh"]["rotation"]["previous"].is_null(), "{status}");
        assert_eq!(
            peer(
                &status,
                if d.spec().id == "node-1" {
                    "node-2"
                } else {
                    "node-1"
                }
            )["own_key"],
            key.fingerprint()
        );
    }
    // The previous key files are gone too.
    for d in &daemons {
        assert!(!d.dir().join("keys/previous.key").exists());
    }
}

#[test]
fn when_the_grace_period_ends_the_old_key_stops_working() {
    require_root();
    let lan = Lan::new(2);
    let daemons = start_mesh(&lan, |spec| {
        spec.wireguard.push("key_grace = \"2s\"".into())
    });
    let (h1, h2) = (lan.host(1), lan.host(2));
    assert!(
        h2.ping_within(&h1.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
    // node-1 rotates; node-2 is never told the new key.
    let child = rotate(&daemons[0], "1s");
    let out = child.wait_with_output().expect("rotate exits");
    assert_eq!(
        out.status.code(),
        Some(6),
        "not every peer moved: exit 6; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Within the grace period the old key still carries traffic.
    assert!(h2.ping(&h1.mesh6().to_string(), 1), "{}", logs(&daemons));
    let wiped = wait_for(Duration::from_secs(5), || {
        daemons[0].status()["mesh"]["rotation"]["previous"]
            .is_null()
            .then_some(())
    });
    assert!(wiped.is_some(), "{}", logs(&daemons));
    assert!(!daemons[0].dir().join("keys/previous.key").exists());
    // node-2 only knows the old key: nothing gets through any more.
    assert!(!h2.ping(&h1.mesh6().to_string(), 3), "{}", logs(&daemons));
    let drops = &daemons[0].status()["mesh"]["drops"];
    assert!(
        drops["unknown_index"].as_u64().unwrap() + drops["bad_mac"].as_u64().unwrap() > 0,
        "{drops}"
    );
    // Told the new key, node-2 is back.
    let keys = [
        daemons[0].status()["public_key"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        daemons[1].public_key(),
    ];
    daemons[1].reload_routing(&map_of(&lan, &[&daemons[0], &daemons[1]], &keys));
    assert!(
        h2.ping_within(&h1.mesh6().to_string(), UP),
        "{}",
        logs(&daemons)
    );
}
