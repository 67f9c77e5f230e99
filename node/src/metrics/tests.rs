use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::control::{
    MeshStatus, PeerInfo, RotationStatus, RoutingStatus, ServiceTraffic, XdpStatus,
};
use crate::forward::engine::{FlowStatus, ForwardStatus, ServiceForwardStatus, WorkerStatus};

const NOW: u64 = 1_800_000_000;

fn map<const N: usize>(entries: [(&str, u64); N]) -> BTreeMap<String, u64> {
    entries.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

fn peer(node: &str, handshake: Option<u64>) -> PeerInfo {
    PeerInfo {
        node: node.into(),
        public_key: "pk".into(),
        endpoint: Some("198.18.10.2:51820".into()),
        allowed: vec!["fd00:f1::2".into()],
        session_up: handshake.is_some(),
        last_handshake_unix: handshake,
        handshakes: 4,
        rx_packets: 10,
        rx_bytes: 1000,
        tx_packets: 11,
        tx_bytes: 1100,
        decrypt_failures: 2,
        own_key: "own".into(),
        warm: handshake.is_some(),
        active: handshake.is_some(),
        handshake_failures: 3,
        unreachable_secs: handshake.is_none().then_some(120),
    }
}

/// A status with a distinct value in every field that becomes a metric.
fn status() -> Status {
    Status {
        version: "0.1.0".into(),
        node_id: "node-1".into(),
        region: "ams".into(),
        public_key: "k".into(),
        public_key_fingerprint: "abcd1234".into(),
        key_age_secs: Some(3600),
        uptime_secs: 42,
        routing: RoutingStatus {
            source: "file /etc/flynode/routing.toml".into(),
            nodes: 3,
            services: 2,
            service_endpoints: 4,
            generation: 7,
            applied_unix: NOW - 5,
            state: "file".into(),
            revision: Some(99),
            connected: true,
            rejected: BTreeMap::from([("/flynode/nodes/x".into(), "bad key".into())]),
        },
        xdp: XdpStatus {
            interface: "eth0".into(),
            mode: "native".into(),
            backend: "af_xdp (copy mode, 1 queue(s))".into(),
            ingress: map([("xsk_datagrams", 120), ("errors", 0)]),
            socket_failures: BTreeMap::new(),
            services: BTreeMap::from([
                (
                    "1".into(),
                    ServiceTraffic {
                        datagrams: 100,
                        bytes: 6400,
                    },
                ),
                // A service that left the map: no name, no series.
                (
                    "9".into(),
                    ServiceTraffic {
                        datagrams: 5,
                        bytes: 5,
                    },
                ),
            ]),
            counters: map([
                ("userspace_service", 100),
                ("userspace_wireguard", 20),
                ("socket_service", 0),
                ("pass_not_ip", 3),
                ("drop_malformed_udp", 1),
                ("drop_unknown_port", 6),
            ]),
            verdicts: map([("userspace", 120), ("pass", 3), ("drop", 7)]),
        },
        mesh: MeshStatus {
            interface: "flynode0".into(),
            mtu: 1420,
            listen_port: 51820,
            rotation: RotationStatus {
                current: "k".into(),
                previous: None,
                moved: 0,
                total: 0,
                grace_left_secs: None,
            },
            peer_summary: crate::mesh::PeerSummary {
                configured: 5000,
                warm: 12,
                active: 40,
                with_session: 38,
                unreachable: 7,
            },
            peers: vec![peer("node-2", Some(NOW - 30)), peer("node-3", None)],
            drops: map([("decrypt_failed", 2), ("no_route", 0)]),
            counters: map([("tun_rx_packets", 8), ("udp_tx_datagrams", 12)]),
        },
        forwarding: ForwardStatus {
            max_payload_v4: 1344,
            max_payload_v6: 1320,
            edge_flows: FlowStatus {
                active: 5,
                capacity: 1024,
                inserted: 9,
                evicted: 1,
                expired: 3,
                invalidated: 0,
            },
            worker_flows: FlowStatus {
                active: 2,
                capacity: 2048,
                inserted: 2,
                evicted: 0,
                expired: 0,
                invalidated: 4,
            },
            workers: BTreeMap::from([(
                "1".into(),
                vec![
                    WorkerStatus {
                        node: "node-2".into(),
                        weight: 3,
                        local: false,
                        healthy: true,
                    },
                    WorkerStatus {
                        node: "node-3".into(),
                        weight: 1,
                        local: false,
                        healthy: false,
                    },
                ],
            )]),
            counters: map([("edge_forwarded", 97), ("edge_unknown_service", 1)]),
            services: BTreeMap::from([(
                "echo".into(),
                ServiceForwardStatus {
                    id: 1,
                    forwarded: map([("edge_to_worker", 97), ("edge_to_client", 95)]),
                    dropped: map([("edge_no_worker", 3), ("edge_oversize", 0)]),
                    no_live_worker: 2,
                },
            )]),
        },
    }
}

fn samples(text: &str) -> Samples {
    Samples::parse(text)
}

fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.get(name, labels)
}

#[track_caller]
fn assert_sample(s: &Samples, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(get(s, name, labels), Some(want), "{name} {labels:?}");
}

#[test]
fn every_part_of_the_status_becomes_a_metric_with_its_exact_value() {
    let s = samples(&render(&status(), NOW));
    let info = [
        ("key", "abcd1234"),
        ("node", "node-1"),
        ("region", "ams"),
        ("version", "0.1.0"),
    ];
    assert_sample(&s, "flynode_info", &info, 1.0);
    assert_sample(&s, "flynode_uptime_seconds", &[], 42.0);
    assert_sample(&s, "flynode_key_age_seconds", &[], 3600.0);
    assert_sample(&s, "flynode_key_rotation_in_progress", &[], 0.0);
    assert_eq!(get(&s, "flynode_key_rotation_peers", &[]), None);

    assert_sample(&s, "flynode_routing_generation", &[], 7.0);
    assert_sample(
        &s,
        "flynode_routing_last_apply_timestamp_seconds",
        &[],
        (NOW - 5) as f64,
    );
    assert_sample(&s, "flynode_routing_revision", &[], 99.0);
    assert_sample(&s, "flynode_control_plane_connected", &[], 1.0);
    assert_sample(&s, "flynode_routing_rejected_records", &[], 1.0);
    assert_sample(&s, "flynode_routing_nodes", &[], 3.0);
    assert_sample(&s, "flynode_routing_services", &[], 2.0);
    assert_sample(&s, "flynode_routing_service_endpoints", &[], 4.0);

    assert_sample(
        &s,
        "flynode_xdp_packets_total",
        &[("verdict", "userspace")],
        120.0,
    );
    assert_sample(&s, "flynode_xdp_packets_total", &[("verdict", "pass")], 3.0);
    assert_sample(&s, "flynode_xdp_packets_total", &[("verdict", "drop")], 7.0);
    assert_sample(
        &s,
        "flynode_xdp_redirects_total",
        &[("reason", "service")],
        100.0,
    );
    assert_sample(
        &s,
        "flynode_xdp_redirects_total",
        &[("reason", "wireguard")],
        20.0,
    );
    assert_sample(&s, "flynode_xdp_passes_total", &[("reason", "not_ip")], 3.0);
    assert_sample(
        &s,
        "flynode_xdp_passes_total",
        &[("reason", "socket_service")],
        0.0,
    );
    assert_sample(
        &s,
        "flynode_xdp_drops_total",
        &[("reason", "malformed_udp")],
        1.0,
    );
    assert_sample(
        &s,
        "flynode_xdp_drops_total",
        &[("reason", "unknown_port")],
        6.0,
    );
    assert_sample(&s, "flynode_ingress_xsk_datagrams_total", &[], 120.0);
    assert_sample(&s, "flynode_ingress_socket_failures", &[], 0.0);
    let echo = [("service", "echo")];
    assert_sample(&s, "flynode_service_received_datagrams_total", &echo, 100.0);
    assert_sample(&s, "flynode_service_received_bytes_total", &echo, 6400.0);

    let node2 = [("peer", "node-2")];
    assert_sample(&s, "flynode_peer_rx_bytes_total", &node2, 1000.0);
    assert_sample(&s, "flynode_peer_tx_bytes_total", &node2, 1100.0);
    assert_sample(&s, "flynode_peer_rx_packets_total", &node2, 10.0);
    assert_sample(&s, "flynode_peer_tx_packets_total", &node2, 11.0);
    assert_sample(&s, "flynode_peer_handshakes_total", &node2, 4.0);
    assert_sample(&s, "flynode_peer_decryption_failures_total", &node2, 2.0);
    assert_sample(&s, "flynode_peer_session_up", &node2, 1.0);
    assert_sample(&s, "flynode_peer_last_handshake_age_seconds", &node2, 30.0);
    assert_sample(
        &s,
        "flynode_peer_last_handshake_timestamp_seconds",
        &node2,
        (NOW - 30) as f64,
    );
    let node3 = [("peer", "node-3")];
    assert_sample(&s, "flynode_peer_session_up", &node3, 0.0);
    assert_eq!(
        get(&s, "flynode_peer_last_handshake_age_seconds", &node3),
        None,
        "never handshaken: no age"
    );
    assert_sample(
        &s,
        "flynode_tunnel_drops_total",
        &[("reason", "decrypt_failed")],
        2.0,
    );
    assert_sample(
        &s,
        "flynode_tunnel_drops_total",
        &[("reason", "no_route")],
        0.0,
    );
    assert_sample(&s, "flynode_tunnel_tun_rx_packets_total", &[], 8.0);
    assert_sample(&s, "flynode_tunnel_udp_tx_datagrams_total", &[], 12.0);
    assert_sample(&s, "flynode_tunnel_mtu_bytes", &[], 1420.0);

    assert_sample(&s, "flynode_flows_active", &[("side", "edge")], 5.0);
    assert_sample(&s, "flynode_flows_active", &[("side", "worker")], 2.0);
    assert_sample(&s, "flynode_flows_capacity", &[("side", "worker")], 2048.0);
    assert_sample(&s, "flynode_flows_inserted_total", &[("side", "edge")], 9.0);
    assert_sample(&s, "flynode_flows_evicted_total", &[("side", "edge")], 1.0);
    assert_sample(&s, "flynode_flows_expired_total", &[("side", "edge")], 3.0);
    assert_sample(
        &s,
        "flynode_flows_invalidated_total",
        &[("side", "worker")],
        4.0,
    );
    assert_sample(
        &s,
        "flynode_forwarding_max_payload_bytes",
        &[("family", "ipv6")],
        1320.0,
    );
    let fwd = |direction| [("direction", direction), ("service", "echo")];
    assert_sample(
        &s,
        "flynode_forwarded_datagrams_total",
        &fwd("edge_to_worker"),
        97.0,
    );
    assert_sample(
        &s,
        "flynode_forwarded_datagrams_total",
        &fwd("edge_to_client"),
        95.0,
    );
    let drop = |reason| [("reason", reason), ("service", "echo")];
    assert_sample(
        &s,
        "flynode_dropped_datagrams_total",
        &drop("edge_no_worker"),
        3.0,
    );
    assert_sample(
        &s,
        "flynode_dropped_datagrams_total",
        &drop("edge_oversize"),
        0.0,
    );
    assert_sample(
        &s,
        "flynode_forwarded_without_live_worker_total",
        &echo,
        2.0,
    );
    let worker = |w| [("service", "echo"), ("worker", w)];
    assert_sample(&s, "flynode_service_worker_healthy", &worker("node-2"), 1.0);
    assert_sample(&s, "flynode_service_worker_healthy", &worker("node-3"), 0.0);
    assert_sample(&s, "flynode_service_worker_weight", &worker("node-2"), 3.0);
    assert_sample(&s, "flynode_forwarding_edge_forwarded_total", &[], 97.0);
    assert_sample(
        &s,
        "flynode_forwarding_edge_unknown_service_total",
        &[],
        1.0,
    );
}

#[test]
fn names_follow_the_prometheus_conventions() {
    let text = render(&status(), NOW);
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_owned(), kind.to_owned());
        }
    }
    assert!(types.len() > 40, "{types:?}");
    for (name, kind) in &types {
        assert!(name.starts_with("flynode_"), "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}"
        );
        assert_eq!(
            kind == "counter",
            name.ends_with("_total"),
            "{name} is a {kind}"
        );
        assert!(
            !name.contains("_secs") && !name.contains("_ms") && !name.contains("msec"),
            "base units: {name}"
        );
    }
    for name in samples(&text).names() {
        assert!(types.contains_key(name), "{name} has no # TYPE line");
    }
    assert!(
        text.lines().filter(|l| l.starts_with("# HELP ")).count() == types.len(),
        "every metric has its help line"
    );
}

#[test]
fn a_rotation_in_progress_shows_its_progress() {
    let mut st = status();
    st.mesh.rotation = RotationStatus {
        current: "new".into(),
        previous: Some("old".into()),
        moved: 1,
        total: 2,
        grace_left_secs: Some(300),
    };
    st.key_age_secs = None;
    let s = samples(&render(&st, NOW));
    assert_sample(&s, "flynode_key_rotation_in_progress", &[], 1.0);
    assert_sample(&s, "flynode_key_rotation_peers_moved", &[], 1.0);
    assert_sample(&s, "flynode_key_rotation_peers", &[], 2.0);
    assert_sample(
        &s,
        "flynode_key_rotation_grace_remaining_seconds",
        &[],
        300.0,
    );
    assert_eq!(get(&s, "flynode_key_age_seconds", &[]), None);
}

#[test]
fn requests_are_routed_by_method_and_path() {
    let r = |line: &str| route(format!("{line}\r\nHost: x\r\n\r\n").as_bytes());
    assert_eq!(
        r("GET /metrics HTTP/1.1"),
        Route::Metrics { head_only: false }
    );
    assert_eq!(
        r("GET /metrics?name[]=x HTTP/1.0"),
        Route::Metrics { head_only: false }
    );
    assert_eq!(
        r("HEAD /metrics HTTP/1.1"),
        Route::Metrics { head_only: true }
    );
    assert_eq!(r("GET / HTTP/1.1"), Route::NotFound);
    assert_eq!(r("GET /metrics/ HTTP/1.1"), Route::NotFound);
    assert_eq!(r("POST /metrics HTTP/1.1"), Route::MethodNotAllowed);
    assert_eq!(r("GET /metrics"), Route::BadRequest);
    assert_eq!(r("GET /metrics HTTP/2"), Route::BadRequest);
    assert_eq!(
        route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"),
        Route::BadRequest
    );
    assert_eq!(route(b""), Route::BadRequest);
}

/// Sends `request` and returns the whole response.
async fn fetch(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_endpoint_serves_one_snapshot_per_scrape_and_404_elsewhere() {
    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    tokio::spawn(server.serve(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        Ok(status())
    }));

    let response = fetch(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    assert_sample(
        &samples(body),
        "flynode_forwarded_datagrams_total",
        &[("direction", "edge_to_worker"), ("service", "echo")],
        97.0,
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let head_only = fetch(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(head_only.ends_with("\r\n\r\n"), "no body for HEAD");

    let other = fetch(addr, "GET /favicon.ico HTTP/1.1\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    let post = fetch(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "only the two scrapes took a snapshot"
    );
}

#[tokio::test]
async fn a_failing_snapshot_is_a_500_with_the_reason() {
    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    tokio::spawn(server.serve(|| anyhow::bail!("reading the XDP counters: EPERM")));
    for _ in 0..2 {
        let response = fetch(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            response.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{response}"
        );
        assert!(
            response.ends_with("reading the XDP counters: EPERM\n"),
            "{response}"
        );
    }
}

#[tokio::test]
async fn a_taken_address_is_one_clear_error() {
    let first = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = first.local_addr().unwrap();
    let err = MetricsServer::bind(addr)
        .await
        .err()
        .expect("address in use");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "metrics: cannot listen on {addr}: Address already in use"
        )),
        "{text}"
    );
}

/// The fleet-level gauges count every peer; per-peer series are limited to
/// `max_peer_series` peers, those with a session first (issue 23: a scrape of 5,000
/// peers was 1.75 MB).
#[test]
fn peer_series_are_limited_and_the_fleet_gauges_stay() {
    let mut s = status();
    let text = render(&s, NOW);
    let all = samples(&text);
    assert_sample(&all, "flynode_peers", &[("state", "configured")], 5000.0);
    assert_sample(&all, "flynode_peers", &[("state", "unreachable")], 7.0);
    assert_sample(&all, "flynode_peers", &[("state", "with_session")], 38.0);
    assert!(get(&all, "flynode_peer_rx_packets_total", &[("peer", "node-3")]).is_some());
    limit_peer_series(&mut s, 1);
    let one = samples(&render(&s, NOW));
    assert!(get(&one, "flynode_peer_rx_packets_total", &[("peer", "node-2")]).is_some());
    assert!(
        get(&one, "flynode_peer_rx_packets_total", &[("peer", "node-3")]).is_none(),
        "the peer without a session is left out first"
    );
    assert_sample(&one, "flynode_peers", &[("state", "configured")], 5000.0);
    limit_peer_series(&mut s, 0);
    let none = render(&s, NOW);
    assert!(!none.contains("flynode_peer_"), "{none}");
    assert!(none.contains("flynode_peers{"), "{none}");
}
