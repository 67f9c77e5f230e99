//! The etcd test harness itself: a real etcd in a LAN's hub namespace, reachable from the
//! node namespaces, its key-value helpers, a single member killed and restarted on its
//! data, a 3-member cluster losing its leader and getting the member back, and nothing
//! left behind (namespaces, etcd processes).
use std::process::Command;
use std::time::{Duration, Instant};

use flynode::netns::{run, wait_for};
use flynode_tests::etcd::EtcdCluster;
use flynode_tests::mesh::Lan;
use flynode_tests::node::require_root;

const NODE_1: &str = "[[node]]\nid = \"node-1\"\nregion = \"test\"\n\
                      endpoint = \"198.18.10.1:51820\"\nmesh_address = \"fd00:f1::1\"\n";

fn namespaces(lan: &Lan) -> Vec<String> {
    std::iter::once(lan.hub.name())
        .chain(lan.nodes.iter().map(|h| h.ns.name()))
        .map(str::to_owned)
        .collect()
}

/// Panics if one of `names` is still a namespace or a process still has `token` (the
/// cluster's unique token) on its command line.
fn assert_gone(names: &[String], token: &str) {
    let list = run(Command::new("ip").args(["netns", "list"])).expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(
            !list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} left behind:\n{list}"
        );
    }
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(token),
            "etcd process left behind (pid {}): {cmdline}",
            entry.file_name().to_string_lossy()
        );
    }
}

#[test]
fn one_member_key_values_and_restart_on_its_data() {
    require_root();
    let started = Instant::now();
    let lan = Lan::new(1);
    let names = namespaces(&lan);
    let mut etcd = EtcdCluster::start(&lan.hub, 1);
    eprintln!("1 member healthy after {:?}", started.elapsed());
    let token = etcd.token().to_owned();
    assert_eq!(etcd.endpoints(), ["http://198.18.10.250:2379"]);
    assert_eq!(etcd.member_endpoint(0), "http://198.18.10.250:2379");

    assert_eq!(etcd.get("/flynode/nodes/node-1"), None);
    let r1 = etcd.put("/flynode/nodes/node-1", NODE_1);
    assert_eq!(etcd.get("/flynode/nodes/node-1").as_deref(), Some(NODE_1));
    // Values etcdctl treats specially: empty, and starting with '-' (as the key does).
    etcd.put("/flynode/nodes/node-2", "");
    assert_eq!(etcd.get("/flynode/nodes/node-2").as_deref(), Some(""));
    let r3 = etcd.put("/flynode/nodes/-3", "-v\n");
    assert_eq!(r3, r1 + 2);
    assert_eq!(etcd.revision(), r3);
    etcd.put("/flynode/other", "x");
    assert_eq!(
        etcd.get_prefix("/flynode/nodes/"),
        [
            ("/flynode/nodes/-3".to_owned(), "-v\n".to_owned()),
            ("/flynode/nodes/node-1".to_owned(), NODE_1.to_owned()),
            ("/flynode/nodes/node-2".to_owned(), String::new()),
        ]
    );
    assert_eq!(etcd.delete("/flynode/nodes/node-2"), 1);
    assert_eq!(etcd.delete("/flynode/nodes/node-2"), 0);
    assert_eq!(etcd.get("/flynode/nodes/node-2"), None);
    assert_eq!(etcd.get_prefix("/flynode/nodes/").len(), 2);

    let compacted = etcd.compact_all();
    assert_eq!(compacted, etcd.revision());
    assert_eq!(
        etcd.compact_all(),
        compacted,
        "compacting again is no error"
    );
    let old = etcd.client().try_compact(r1).expect_err("r1 is compacted");
    assert!(old.contains("compacted"), "{old}");
    assert_eq!(etcd.get("/flynode/nodes/node-1").as_deref(), Some(NODE_1));

    // A daemon in a node namespace reaches the member over the LAN.
    let from_node = run(lan
        .host(1)
        .ns
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoints().join(",")))
        .args(["get", "--print-value-only", "/flynode/other"]))
    .unwrap_or_else(|e| panic!("etcdctl from node 1: {e}\n{}", etcd.logs()));
    assert_eq!(String::from_utf8_lossy(&from_node.stdout), "x\n");

    // Killed: nothing answers. Restarted on its data: everything is still there.
    let revision = etcd.revision();
    let pid = etcd.pid(0).expect("running");
    etcd.kill(0);
    assert!(!etcd.is_running(0));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let err = etcd
        .via(0)
        .timeout(Duration::from_millis(500))
        .try_get("/flynode/other")
        .expect_err("etcd is down");
    eprintln!("with etcd killed: {err}");
    let t = Instant::now();
    etcd.restart(0);
    eprintln!("restarted member healthy after {:?}", t.elapsed());
    assert_eq!(etcd.revision(), revision);
    assert_eq!(etcd.get("/flynode/nodes/node-1").as_deref(), Some(NODE_1));
    assert!(etcd.put("/flynode/other", "y") > revision);

    etcd.stop_all();
    assert!(!etcd.is_running(0));
    drop(etcd);
    drop(lan);
    assert_gone(&names, &token);
    eprintln!("total {:?}", started.elapsed());
}

#[test]
fn three_members_lose_the_leader_and_get_it_back() {
    require_root();
    let started = Instant::now();
    let lan = Lan::new(1);
    let names = namespaces(&lan);
    let mut etcd = EtcdCluster::start(&lan.hub, 3);
    eprintln!("3 members healthy after {:?}", started.elapsed());
    let token = etcd.token().to_owned();
    assert_eq!(
        etcd.endpoints(),
        [
            "http://198.18.10.250:2379",
            "http://198.18.10.251:2379",
            "http://198.18.10.252:2379"
        ]
    );
    let leader = wait_for(Duration::from_secs(5), || etcd.leader())
        .unwrap_or_else(|| panic!("no leader; logs:\n{}", etcd.logs()));
    etcd.put("/flynode/k", "before");
    for i in 0..3 {
        assert_eq!(etcd.via(i).get("/flynode/k").as_deref(), Some("before"));
    }

    let t = Instant::now();
    etcd.kill(leader);
    etcd.wait_healthy();
    eprintln!(
        "killed leader m{leader}; survivors healthy after {:?}",
        t.elapsed()
    );
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    assert!(
        etcd.via(leader)
            .timeout(Duration::from_millis(500))
            .try_get("/flynode/k")
            .is_err(),
        "the killed member answered"
    );
    // A write through one survivor, read back through the other.
    let revision = etcd.via(survivors[0]).put("/flynode/k", "after");
    assert_eq!(
        etcd.via(survivors[1]).get("/flynode/k").as_deref(),
        Some("after")
    );
    let new_leader = etcd.leader().expect("the survivors have a leader");
    assert_ne!(new_leader, leader);

    let t = Instant::now();
    etcd.restart(leader);
    eprintln!("m{leader} rejoined after {:?}", t.elapsed());
    // It serves linearizable reads again, with the write it missed.
    assert!(etcd.via(leader).is_healthy());
    assert_eq!(etcd.via(leader).get("/flynode/k").as_deref(), Some("after"));
    assert_eq!(etcd.via(leader).revision(), revision);
    assert!(etcd.client().is_healthy(), "all three endpoints healthy");
    assert_eq!(etcd.client().endpoints().len(), 3);

    // Dropped with every member running: killed by PID, nothing left.
    drop(etcd);
    drop(lan);
    assert_gone(&names, &token);
    eprintln!("total {:?}", started.elapsed());
}
