//! The Prometheus endpoint of real daemons: scraped from inside each node's namespace
//! after known traffic, its counters must equal what was sent, exactly.
use std::io;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use flynode::netns::{ChildGuard, Netns, wait_for};
use flynode_tests::forwarding::{ServiceSpec, Topology, anycast};
use flynode_tests::metrics::{LISTEN, Samples, get, scrape};
use flynode_tests::node::{NodeSpec, Prepared, flynode_bin, require_root};
use flynode_tests::xdp::quiet_pair;

const MESH_UP: Duration = Duration::from_secs(20);
const PAYLOAD: &[u8] = b"counted by the metrics test";

/// Request/replies through the edge, one at a time, until `replies` replies came back.
/// Returns (datagrams sent, replies received): a datagram that got no answer within
/// the socket's timeout is sent again, and counted again.
fn exchange(socket: &UdpSocket, v6: bool, replies: u64) -> (u64, u64) {
    let mut buf = [0u8; 2048];
    let (mut sent, mut received) = (0, 0);
    while received < replies {
        assert!(sent < replies + 10, "too many datagrams without a reply");
        socket.send_to(PAYLOAD, anycast(v6)).expect("send");
        sent += 1;
        if socket.recv_from(&mut buf).is_ok() {
            received += 1;
        }
    }
    // A late reply to a datagram that was sent again.
    while socket.recv_from(&mut buf).is_ok() {
        received += 1;
    }
    (sent, received)
}

/// Scrapes `ns` until `name{labels}` reaches `target` (the daemon counts a datagram
/// after passing it on, so a reply can overtake the count), then returns that scrape.
fn scrape_when(ns: &Netns, name: &str, labels: &[(&str, &str)], target: u64) -> Samples {
    wait_for(Duration::from_secs(5), || {
        let s = scrape(ns);
        (s.get(name, labels).unwrap_or(0.0) >= target as f64).then_some(s)
    })
    .unwrap_or_else(|| scrape(ns))
}

fn sum(s: &Samples, name: &str) -> u64 {
    s.family(name).iter().map(|(_, v)| *v as u64).sum()
}

#[test]
fn scraped_counters_equal_the_traffic_sent() {
    require_root();
    // Node 1 is the edge the client uses; node 2 the only worker of `echo`.
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    let (edge, worker) = (&topo.host(1).ns, &topo.host(2).ns);
    let echo = |direction| [("direction", direction), ("service", "echo")];

    let before = scrape(edge);
    assert_eq!(
        before.counter("flynode_forwarded_datagrams_total", &echo("edge_to_worker")),
        0,
        "nothing forwarded before the test sends"
    );
    assert_eq!(
        before.counter("flynode_xdp_redirects_total", &[("reason", "service")]),
        0
    );

    // Two flows: one IPv4, one IPv6 client port.
    let (sent4, replies4) = exchange(&topo.client_socket(false, 41000), false, 60);
    let (sent6, replies6) = exchange(&topo.client_socket(true, 41001), true, 40);
    let (sent, replies) = (sent4 + sent6, replies4 + replies6);

    let e = scrape_when(
        edge,
        "flynode_forwarded_datagrams_total",
        &echo("edge_to_client"),
        replies,
    );
    let w = scrape_when(
        worker,
        "flynode_forwarded_datagrams_total",
        &echo("worker_to_edge"),
        replies,
    );
    let logs = || topo.logs();

    // The edge: every datagram passed the XDP program to the ingress, was counted for
    // its service and forwarded to the worker; every reply went to the client.
    let backend = e.family("flynode_xdp_info")[0].0["backend"].clone();
    let (redirected, socket) = (
        e.counter("flynode_xdp_redirects_total", &[("reason", "service")]),
        e.counter("flynode_xdp_passes_total", &[("reason", "socket_service")]),
    );
    if backend.starts_with("af_xdp") {
        assert_eq!((redirected, socket), (sent, 0), "{backend}");
    } else {
        assert_eq!((redirected, socket), (0, sent), "{backend}");
    }
    assert_eq!(
        e.counter("flynode_xdp_packets_total", &[("verdict", "userspace")]),
        sum(&e, "flynode_xdp_redirects_total"),
        "a verdict is the sum of its reasons"
    );
    assert_eq!(
        e.counter("flynode_xdp_packets_total", &[("verdict", "drop")]),
        0
    );
    assert_eq!(
        e.counter(
            "flynode_service_received_datagrams_total",
            &[("service", "echo")]
        ),
        sent
    );
    assert_eq!(
        e.counter(
            "flynode_service_received_bytes_total",
            &[("service", "echo")]
        ),
        sent * PAYLOAD.len() as u64
    );
    assert_eq!(
        e.counter("flynode_forwarded_datagrams_total", &echo("edge_to_worker")),
        sent,
        "{}",
        logs()
    );
    assert_eq!(
        e.counter("flynode_forwarded_datagrams_total", &echo("edge_to_client")),
        replies
    );
    assert_eq!(
        e.counter(
            "flynode_forwarded_datagrams_total",
            &echo("edge_to_local_worker")
        ),
        0
    );
    assert_eq!(
        e.counter("flynode_forwarding_edge_forwarded_total", &[]),
        sent
    );
    assert_eq!(
        sum(&e, "flynode_dropped_datagrams_total"),
        0,
        "{:?}",
        e.family("flynode_dropped_datagrams_total")
    );
    assert_eq!(
        e.counter("flynode_flows_active", &[("side", "edge")]),
        2,
        "one flow per client port"
    );
    assert_eq!(e.counter("flynode_flows_active", &[("side", "worker")]), 0);

    // The worker: every datagram delivered to the container, every reply sent back.
    assert_eq!(
        w.counter(
            "flynode_forwarded_datagrams_total",
            &echo("worker_to_container")
        ),
        sent,
        "{}",
        logs()
    );
    assert_eq!(
        w.counter("flynode_forwarded_datagrams_total", &echo("worker_to_edge")),
        replies
    );
    assert_eq!(
        w.counter("flynode_forwarded_datagrams_total", &echo("edge_to_worker")),
        0
    );
    assert_eq!(sum(&w, "flynode_dropped_datagrams_total"), 0);
    assert_eq!(w.counter("flynode_flows_active", &[("side", "worker")]), 2);
    assert_eq!(
        w.counter("flynode_xdp_redirects_total", &[("reason", "service")]),
        0
    );

    // The tunnel between them carried at least that much, and says so per peer.
    let to_worker = [("peer", "node-2")];
    assert!(e.counter("flynode_peer_tx_packets_total", &to_worker) >= sent);
    assert!(e.counter("flynode_peer_rx_packets_total", &to_worker) >= replies);
    assert!(e.counter("flynode_peer_handshakes_total", &to_worker) >= 1);
    assert_eq!(e.get("flynode_peer_session_up", &to_worker), Some(1.0));
    assert_eq!(
        e.counter("flynode_peer_decryption_failures_total", &to_worker),
        0
    );
    let age = e
        .get("flynode_peer_last_handshake_age_seconds", &to_worker)
        .expect("a handshake happened");
    assert!((0.0..180.0).contains(&age), "{age}");

    // The node itself.
    let key_age = e.get("flynode_key_age_seconds", &[]).expect("key age");
    assert!(
        (0.0..600.0).contains(&key_age),
        "the key was made for this test: {key_age}"
    );
    assert_eq!(e.get("flynode_control_plane_connected", &[]), Some(1.0));
    assert!(e.get("flynode_routing_generation", &[]).unwrap_or(0.0) >= 1.0);

    // The same numbers as `flynode status`.
    let status = topo.daemon(1).status();
    assert_eq!(
        status["forwarding"]["services"]["echo"]["forwarded"]["edge_to_worker"],
        sent
    );
    assert_eq!(
        topo.daemon(2).status()["forwarding"]["services"]["echo"]["forwarded"]["worker_to_container"],
        sent
    );

    // Only /metrics is served.
    let (code, _) = get(edge, LISTEN, "/").expect("GET /");
    assert_eq!(code, 404);
}

/// A node on a quiet veth, its map naming only itself.
fn single_node(metrics: &[&str]) -> (Netns, Netns, Prepared, String) {
    let (sender, node) = quiet_pair();
    let mut spec = NodeSpec::new("eth0", "auto");
    spec.metrics = metrics.iter().map(|l| (*l).to_owned()).collect();
    let prepared = Prepared::new(spec);
    let routing = format!(
        "[[node]]\nid = \"test-node\"\nregion = \"test\"\npublic_key = \"{}\"\n\
         endpoint = \"198.18.0.1:51820\"\nmesh_address = \"fd00:f1::1\"\n",
        prepared.public_key
    );
    (sender, node, prepared, routing)
}

#[test]
fn with_metrics_disabled_nothing_listens() {
    require_root();
    let (_sender, node, prepared, routing) = single_node(&["enabled = false"]);
    let daemon = prepared.start(&node, &routing);
    let refused = get(&node, LISTEN, "/metrics").expect_err("nothing listens");
    assert_eq!(
        refused.kind(),
        io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
    assert!(daemon.stop().success());
}

#[test]
fn a_taken_metrics_address_fails_the_start_with_one_clear_line() {
    require_root();
    let (_sender, node, prepared, routing) = single_node(&[]);
    let _taken = node
        .enter(|| std::net::TcpListener::bind(LISTEN))
        .expect("enter node")
        .expect("bind the metrics address first");
    std::fs::write(prepared.dir().join("routing.toml"), routing).expect("routing");
    let mut child = ChildGuard::spawn(
        node.command(flynode_bin().to_str().expect("utf-8 path"))
            .arg("run")
            .arg("--config")
            .arg(prepared.dir().join("flynode.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("spawn flynode");
    let exited = wait_for(Duration::from_secs(15), || {
        child.try_wait().ok().flatten().map(|_| ())
    });
    assert!(exited.is_some(), "flynode kept running on a taken address");
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "metrics: cannot listen on 127.0.0.1:9477: Address already in use (os error 98)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The daemon cleaned up after itself: no XDP program left on the interface.
    let link = Command::new("ip")
        .args(["-n", node.name(), "link", "show", "dev", "eth0"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("xdp"), "{link}");
}
