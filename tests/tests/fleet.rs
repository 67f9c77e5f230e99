//! The fleet control plane with a real etcd: nodes that get their whole map from etcd,
//! register under leases, survive etcd outages, and rotate keys through it.
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use flynode_tests::forwarding::{ServiceSpec, Topology, apply_services, workers_of};
use flynode_tests::mesh::stream_while;
use flynode_tests::node::{flynode_bin, require_root};

const UP: Duration = Duration::from_secs(20);

fn peers(status: &serde_json::Value) -> Vec<String> {
    status["mesh"]["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["node"].as_str().expect("node").to_owned())
        .collect()
}

fn workers(status: &serde_json::Value) -> Vec<String> {
    status["forwarding"]["workers"]["1"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| w["node"].as_str().expect("node").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn all_answered_by(topo: &Topology, ports: std::ops::Range<u16>, allowed: &[&str]) {
    for v6 in [false, true] {
        for w in workers_of(topo, ports.clone(), v6) {
            assert!(
                allowed.contains(&w.as_str()),
                "answered by {w}, expected one of {allowed:?}"
            );
        }
    }
}

#[test]
fn the_map_comes_from_etcd_changes_apply_within_a_second_and_an_outage_changes_nothing() {
    require_root();
    let mut topo = Topology::start_fleet(3, 1, &[ServiceSpec::echo(&[1, 2])], |_| {});
    topo.wait_until_all("3 nodes registered and connected", |s| {
        s["routing"]["nodes"] == 3 && s["routing"]["state"] == "connected"
    });
    topo.wait_for_mesh(UP);
    all_answered_by(&topo, 40000..40006, &["worker-1", "worker-2"]);

    // Status, as a machine reads it.
    let status = topo.daemon(1).status();
    let routing = &status["routing"];
    assert!(
        routing["source"]
            .as_str()
            .unwrap()
            .starts_with("etcd http://198.18.10.250:2379"),
        "{routing}"
    );
    assert_eq!(routing["connected"], true);
    assert!(routing["revision"].as_i64().unwrap() > 0, "{routing}");
    assert!(routing["generation"].as_u64().unwrap() >= 1);
    assert_eq!(routing["services"], 1);
    assert!(routing["rejected"].as_object().unwrap().is_empty());
    let mut p = peers(&status);
    p.sort();
    assert_eq!(p, ["node-2", "node-3"]);
    assert_eq!(workers(&status), ["node-1", "node-2"]);

    // A broken record is named, and the rest of the map stays.
    topo.etcd()
        .client()
        .put("/flynode/services/broken", "id = 9\nports = [1]\n");
    topo.wait_until_all("the broken record rejected", |s| {
        s["routing"]["rejected"]["/flynode/services/broken"]
            .as_str()
            .is_some_and(|e| e.contains("missing field"))
    });
    assert_eq!(workers(&topo.daemon(1).status()), ["node-1", "node-2"]);

    // A service changed in etcd moves traffic within 1 s (all three nodes applied it).
    let start = Instant::now();
    apply_services(&topo.lan.hub, topo.etcd(), &[ServiceSpec::echo(&[3])]);
    topo.wait_until_all("service moved to node-3", |s| workers(s) == ["node-3"]);
    let moved = start.elapsed();
    assert!(
        moved < Duration::from_secs(1),
        "the change took {moved:?} to apply everywhere"
    );
    all_answered_by(&topo, 40100..40106, &["worker-3"]);

    // etcd dies: forwarding goes on with the last good map, and status says why.
    topo.etcd_mut().kill(0);
    topo.wait_until_all("etcd seen down", |s| {
        s["routing"]["connected"] == false
            && s["routing"]["state"]
                .as_str()
                .is_some_and(|st| st.starts_with("disconnected"))
    });
    all_answered_by(&topo, 40200..40206, &["worker-3"]);
    assert_eq!(workers(&topo.daemon(2).status()), ["node-3"]);

    // etcd returns: every node resyncs, and a change made now applies.
    topo.etcd_mut().restart(0);
    topo.wait_until_all("etcd reconnected", |s| s["routing"]["connected"] == true);
    apply_services(&topo.lan.hub, topo.etcd(), &[ServiceSpec::echo(&[1, 3])]);
    topo.wait_until_all("service on nodes 1 and 3", |s| {
        workers(s) == ["node-1", "node-3"]
    });
    all_answered_by(&topo, 40300..40306, &["worker-1", "worker-3"]);
}

#[test]
fn a_node_killed_disappears_when_its_lease_expires_and_rejoins() {
    require_root();
    let mut topo = Topology::start_fleet(3, 1, &[ServiceSpec::echo(&[1, 2, 3])], |_| {});
    topo.wait_for_mesh(UP);
    let prepared = topo.daemons[2].take().expect("node 3").kill();
    // The 2 s lease runs out: the others drop node-3 as a peer and as a worker.
    let killed = Instant::now();
    topo.wait_until_all("node-3 gone", |s| {
        peers(s).len() == 1 && s["routing"]["nodes"] == 2 && workers(s).len() == 2
    });
    let gone = killed.elapsed();
    assert!(gone < Duration::from_secs(6), "node-3 left after {gone:?}");
    assert_eq!(topo.etcd().client().get("/flynode/nodes/node-3"), None);
    all_answered_by(&topo, 41000..41006, &["worker-1", "worker-2"]);

    // It comes back: registers again, peers and worker again.
    topo.daemons[2] = Some(prepared.start(&topo.host(3).ns, ""));
    topo.wait_until_all("node-3 back", |s| {
        s["routing"]["nodes"] == 3 && workers(s).len() == 3
    });
    topo.wait_for_mesh(UP);
    let answered = workers_of(&topo, 41100..41130, false);
    assert!(
        answered.iter().any(|w| w == "worker-3"),
        "node-3 never chosen again: {answered:?}"
    );
}

#[test]
fn one_etcd_member_of_three_dying_changes_nothing() {
    require_root();
    let mut topo = Topology::start_fleet(3, 3, &[ServiceSpec::echo(&[1, 2])], |_| {});
    topo.wait_for_mesh(UP);
    let leader = topo.etcd().leader().expect("a leader");
    topo.etcd_mut().kill(leader);
    all_answered_by(&topo, 42000..42006, &["worker-1", "worker-2"]);
    // Writes through the surviving members reach every node.
    apply_services(&topo.lan.hub, topo.etcd(), &[ServiceSpec::echo(&[2, 3])]);
    topo.wait_until_all("service on nodes 2 and 3", |s| {
        workers(s) == ["node-2", "node-3"] && s["routing"]["connected"] == true
    });
    all_answered_by(&topo, 42100..42106, &["worker-2", "worker-3"]);
    for n in 1..=3 {
        assert_eq!(topo.daemon(n).status()["routing"]["nodes"], 3);
    }
}

#[test]
fn a_key_rotated_through_etcd_loses_nothing_under_a_steady_stream() {
    require_root();
    let topo = Topology::start_fleet(2, 1, &[ServiceSpec::echo(&[1, 2])], |_| {});
    topo.wait_for_mesh(UP);
    let (h1, h2) = (topo.host(1), topo.host(2));
    let old_key = topo.daemon(1).status()["public_key"].clone();
    let to = SocketAddr::from((h2.mesh6(), 9000));
    // 2500 datagrams at 500/s over the mesh while node-1 rotates; nobody edits a file:
    // node-1 republishes its record and node-2 follows it through etcd.
    let (stream, output) = stream_while(&h1.ns, &h2.ns, to, 2500, 500, || {
        std::thread::sleep(Duration::from_millis(700));
        Command::new(flynode_bin())
            .args(["keys", "rotate", "--wait", "20s", "--socket"])
            .arg(topo.daemon(1).socket())
            .output()
            .expect("flynode keys rotate")
    });
    assert!(
        output.status.success(),
        "keys rotate: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        topo.logs()
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 of 1 peers moved"));
    let lost = stream.lost();
    assert!(
        lost.is_empty(),
        "{} of {} datagrams lost across the rotation: {:?}\n{}",
        lost.len(),
        stream.sent,
        &lost[..lost.len().min(20)],
        topo.logs()
    );
    let new_key = topo.daemon(1).status()["public_key"].clone();
    assert_ne!(new_key, old_key);
    let record = topo
        .etcd()
        .client()
        .get("/flynode/nodes/node-1")
        .expect("node-1's record");
    assert!(
        record.contains(new_key.as_str().unwrap()),
        "record not republished: {record}"
    );
}

#[test]
fn services_are_validated_before_anything_is_written() {
    require_root();
    let lan = flynode_tests::mesh::Lan::new(0);
    let etcd = flynode_tests::etcd::EtcdCluster::start(&lan.hub, 1);
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| flynode_tests::forwarding::services_cli(&lan.hub, &etcd, args);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let service = |id: u32, name: &str, port: u16| {
        format!(
            "[[service]]\nid = {id}\nname = \"{name}\"\nanycast = [\"198.18.100.1\"]\nports = [{port}]\n\
             [[service.worker]]\nnode = \"node-1\"\ntarget = \"198.19.1.2:{port}\"\n"
        )
    };

    let ok = file("ok.toml", &service(1, "dns", 53));
    let out = run(&["apply", &ok]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("applied 1 service(s)"), "{stdout}");
    // node-1 has no record: the worker is kept and the operator told.
    assert!(
        stdout.contains("no node record (yet) for worker node(s) node-1"),
        "{stdout}"
    );
    let stored = etcd.client().get("/flynode/services/dns").expect("written");
    assert!(stored.contains("node = \"node-1\""), "{stored}");
    let revision = etcd.client().revision();

    // Conflicts with what is in etcd, and errors inside the file: exit 3, a precise
    // message, nothing written (not even the good service next to the bad one).
    let clash = file(
        "clash.toml",
        &format!("{}{}", service(2, "ntp", 123), service(3, "game", 53)),
    );
    let bad_port = file(
        "bad.toml",
        &service(4, "web", 0).replace("ports = [0]", "ports = [70000]"),
    );
    let with_node = file(
        "node.toml",
        "[[node]]\nid = \"x\"\nregion = \"r\"\npublic_key = \"xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\"\nendpoint = \"198.18.10.9:51820\"\nmesh_address = \"fd00:f1::9\"\n",
    );
    for (path, expected) in [
        (
            &clash,
            "198.18.100.1 port 53 of service `game` is already served by service `dns` (etcd)",
        ),
        (&bad_port, "ports[0]"),
        (&with_node, "may only hold [[service]] entries"),
    ] {
        let out = run(&["apply", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    assert_eq!(
        etcd.client().revision(),
        revision,
        "a rejected file wrote something"
    );
    assert_eq!(etcd.client().get("/flynode/services/ntp"), None);

    // Re-applying replaces the service of the same name; list shows it; remove deletes.
    let moved = file("moved.toml", &service(1, "dns", 5353));
    assert!(run(&["apply", &moved]).status.success());
    let list = run(&["list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("dns") && listed.contains("5353"),
        "{listed}"
    );
    assert!(run(&["remove", "dns"]).status.success());
    assert_eq!(etcd.client().get("/flynode/services/dns"), None);
    let again = run(&["remove", "dns"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no service `dns` in etcd"));
}
