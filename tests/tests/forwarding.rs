//! End to end: client → anycast on an edge → mesh → worker → container, and back, with
//! real flynode daemons in network namespaces (see flynode_tests::forwarding).
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use flynode_tests::forwarding::{
    ServiceSpec, Topology, anycast, ask, client_addr, counter, counter_reaching, parse_echo,
    try_workers_of, workers_of,
};
use flynode_tests::node::require_root;

const MESH_UP: Duration = Duration::from_secs(20);

#[test]
fn a_container_sees_the_client_and_the_reply_comes_from_the_anycast_address() {
    require_root();
    // Node 1 is the edge the client uses; node 2 is the only worker.
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    for v6 in [false, true] {
        let port = 40000 + u16::from(v6);
        let socket = topo.client_socket(v6, port);
        let (reply, from) = ask(&socket, anycast(v6), b"hello")
            .unwrap_or_else(|| panic!("no reply (v6={v6}); logs:\n{}", topo.logs()));
        assert_eq!(
            from,
            anycast(v6),
            "the reply must come from the anycast address"
        );
        let (worker, saw) = parse_echo(&reply);
        assert_eq!(worker, "worker-2");
        assert_eq!(
            saw,
            client_addr(v6, port),
            "the container must see the client"
        );
        assert!(reply.ends_with("| hello"), "{reply}");
    }
    // The edge forwarded through the mesh, the worker delivered and replied.
    assert!(counter(topo.daemon(1), "edge_forwarded") >= 2);
    assert!(counter(topo.daemon(2), "worker_delivered") >= 2);
    assert!(counter(topo.daemon(2), "reply_forwarded") >= 2);
    assert!(counter(topo.daemon(1), "client_replies") >= 2);
}

#[test]
fn when_the_edge_is_the_worker_no_tunnel_is_crossed() {
    require_root();
    let topo = Topology::start(2, &[ServiceSpec::echo(&[1])]);
    topo.wait_for_mesh(MESH_UP);
    for v6 in [false, true] {
        let socket = topo.client_socket(v6, 40100);
        let (reply, from) = ask(&socket, anycast(v6), b"local").expect("reply");
        assert_eq!(from, anycast(v6));
        assert_eq!(
            parse_echo(&reply),
            ("worker-1".into(), client_addr(v6, 40100))
        );
    }
    let edge = topo.daemon(1);
    assert!(counter(edge, "edge_local") >= 2);
    assert_eq!(counter(edge, "edge_forwarded"), 0);
    assert!(counter(edge, "reply_local") >= 2);
}

#[test]
fn flows_stick_to_their_worker_across_edges_and_only_a_dead_workers_flows_move() {
    require_root();
    // Nodes 1 and 2 are the edges, 3 and 4 the workers.
    let topo = Topology::start(4, &[ServiceSpec::echo(&[3, 4])]);
    topo.wait_for_mesh(MESH_UP);
    let flows = 41000..41032;
    let first = workers_of(&topo, flows.clone(), false);
    let on3 = first.iter().filter(|w| *w == "worker-3").count();
    assert!(
        (4..=28).contains(&on3),
        "32 flows should spread over both workers: {first:?}"
    );
    // Again through the same edge, then through the other edge: same workers.
    assert_eq!(workers_of(&topo, flows.clone(), false), first);
    topo.route_client_to(2);
    assert_eq!(
        workers_of(&topo, flows.clone(), false),
        first,
        "edge 2 must choose what edge 1 chose"
    );
    // The reply went back through edge 2, which received the flow.
    let before1 = counter(topo.daemon(1), "client_replies");
    workers_of(&topo, flows.clone(), false);
    assert_eq!(counter(topo.daemon(1), "client_replies"), before1);
    assert!(counter(topo.daemon(2), "client_replies") >= 32);

    // Worker 3 dies without warning: its flows move to worker 4, the others stay.
    let mut topo = topo;
    let dead = topo.daemons[2].take().expect("node 3");
    let _prepared = dead.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = try_workers_of(&topo, flows.clone(), false);
        if now.iter().all(|w| w.as_deref() == Some("worker-4")) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        after.iter().all(|w| w.as_deref() == Some("worker-4")),
        "{after:?}; logs:\n{}",
        topo.logs()
    );
    // Worker 4 stayed live throughout: the edge never had to fall back to sending
    // without a live worker, nor drop for want of one.
    let edge = topo.daemon(2).status();
    assert_eq!(edge["forwarding"]["counters"]["edge_no_worker"], 0);
    assert_eq!(edge["forwarding"]["counters"]["edge_no_live_worker"], 0);
}

#[test]
fn adding_a_worker_live_moves_a_bounded_share_and_only_to_it() {
    require_root();
    let topo = Topology::start(3, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    let old = 42000..42032;
    assert!(
        workers_of(&topo, old.clone(), false)
            .iter()
            .all(|w| w == "worker-2")
    );
    topo.set_services(&[ServiceSpec::echo(&[2, 3])]);
    topo.wait_for_workers(2);
    topo.wait_for_mesh(MESH_UP);
    let moved = workers_of(&topo, old.clone(), false)
        .iter()
        .filter(|w| *w != "worker-2")
        .count();
    // Established flows stay pinned at their edge; at most the new worker's fair share
    // could move.
    assert!(moved <= 16, "{moved} of 32 flows moved");
    let new = workers_of(&topo, 43000..43064, false);
    let on3 = new.iter().filter(|w| *w == "worker-3").count();
    assert!(
        (12..=52).contains(&on3),
        "new flows must use the new worker: {new:?}"
    );
}

#[test]
fn container_datagrams_that_match_no_flow_are_dropped_and_counted() {
    require_root();
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    for v6 in [false, true] {
        let client = topo.client_socket(v6, 44000);
        let before = counter(topo.daemon(2), "reply_no_flow");
        // The worker is on the client's LAN: without flynode's rules the kernel would
        // route this straight to the client with the container's address as source.
        topo.echoes[1].send_unasked(client_addr(v6, 44000), b"unasked");
        let mut buf = [0u8; 64];
        assert!(
            client.recv_from(&mut buf).is_err(),
            "an unmatched container datagram reached the client"
        );
        assert_eq!(
            counter_reaching(topo.daemon(2), "reply_no_flow", before + 1),
            before + 1
        );
        // A real flow from the same client still works.
        assert!(ask(&client, anycast(v6), b"after").is_some());
    }
}

#[test]
fn oversized_datagrams_are_answered_with_icmp_and_counted() {
    require_root();
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    let status = topo.daemon(1).status();
    for v6 in [false, true] {
        let key = if v6 {
            "max_payload_v6"
        } else {
            "max_payload_v4"
        };
        let max = status["forwarding"][key].as_u64().unwrap() as usize;
        let client = topo.client_socket(v6, 45000);
        // The largest that fits crosses; the echo's reply (a prefix longer) cannot fit
        // the way back and is dropped at the worker, counted.
        let delivered = counter(topo.daemon(2), "worker_delivered");
        let reply_oversize = counter(topo.daemon(2), "reply_oversize");
        client.send_to(&vec![b'x'; max], anycast(v6)).unwrap();
        assert_eq!(
            counter_reaching(topo.daemon(2), "reply_oversize", reply_oversize + 1),
            reply_oversize + 1
        );
        assert_eq!(counter(topo.daemon(2), "worker_delivered"), delivered + 1);
        let before = counter(topo.daemon(1), "edge_oversize");
        let icmp_before = counter(topo.daemon(1), "icmp_sent");
        client.send_to(&vec![b'y'; max + 1], anycast(v6)).unwrap();
        assert_eq!(
            counter_reaching(topo.daemon(1), "edge_oversize", before + 1),
            before + 1
        );
        assert_eq!(counter(topo.daemon(1), "icmp_sent"), icmp_before + 1);
        // The client's kernel learned the path MTU from our ICMP message.
        let family = if v6 { "-6" } else { "-4" };
        let out = topo
            .client()
            .command("ip")
            .args([family, "route", "get", &anycast(v6).ip().to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let overhead = if v6 { 48 } else { 28 };
        assert!(
            text.contains(&format!("mtu {}", max + overhead)),
            "the client did not learn the MTU: {text}"
        );
    }
}

#[test]
fn a_flood_of_spoofed_flows_stays_bounded_and_real_flows_keep_working() {
    require_root();
    let topo = Topology::start_with(2, &[ServiceSpec::echo(&[2])], |spec| {
        spec.flows.push("edge_max = 512".into());
        spec.flows.push("worker_max = 512".into());
    });
    topo.wait_for_mesh(MESH_UP);
    let legit = topo.client_socket(false, 46000);
    assert!(ask(&legit, anycast(false), b"before").is_some());
    // 5000 distinct source ports from the client: to the flow tables, as many new
    // flows as a spoofer would make.
    let mut sent = 0;
    for round in 0..10u16 {
        let sockets: Vec<UdpSocket> = (0..500)
            .map(|i| topo.client_socket(false, 47000 + round * 500 + i))
            .collect();
        for s in &sockets {
            s.send_to(b"flood", anycast(false)).unwrap();
            sent += 1;
        }
        // The legitimate flow is used throughout.
        assert!(
            ask(&legit, anycast(false), b"during").is_some(),
            "legitimate flow lost in round {round}"
        );
    }
    assert_eq!(sent, 5000);
    for n in [1, 2] {
        let status = topo.daemon(n).status();
        for table in ["edge_flows", "worker_flows"] {
            let t = &status["forwarding"][table];
            assert!(
                t["active"].as_u64().unwrap() <= 512,
                "{table} on node {n}: {t}"
            );
        }
    }
    let edge = topo.daemon(1).status();
    assert!(
        edge["forwarding"]["edge_flows"]["evicted"]
            .as_u64()
            .unwrap()
            >= 4000
    );
}

#[test]
fn a_service_added_then_removed_while_traffic_runs() {
    require_root();
    let topo = Topology::start(2, &[]);
    let client = topo.client_socket(true, 48000);
    assert!(ask(&client, anycast(true), b"nobody").is_none());
    topo.set_services(&[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ask(&client, anycast(true), b"soon").is_none() {
        assert!(
            Instant::now() < deadline,
            "service never answered: {}",
            topo.logs()
        );
    }
    let (reply, _) = ask(&client, anycast(true), b"on").expect("reply");
    assert_eq!(parse_echo(&reply).1, client_addr(true, 48000));
    topo.set_services(&[]);
    topo.wait_for_workers(0);
    assert!(ask(&client, anycast(true), b"off").is_none());
    let w = topo.daemon(2).status();
    assert_eq!(
        w["forwarding"]["worker_flows"]["active"], 0,
        "flows of a removed service stay"
    );
}

/// A routing map that names, as a worker's target, an address that is no container of
/// that worker (here another host on the LAN, reached through the uplink) gets none of
/// the clients' datagrams sent there: they are refused and counted, and the daemon says
/// why (issue 29 item 7).
#[test]
fn a_worker_delivers_only_to_its_own_containers() {
    require_root();
    let victims = [
        "198.18.10.1:9999".parse().unwrap(),
        "[2001:db8:10::1]:9999".parse().unwrap(),
    ];
    let mut service = ServiceSpec::echo(&[2]);
    service.targets = Some(victims);
    let topo = Topology::start(2, &[service]);
    let listeners: Vec<UdpSocket> = victims
        .iter()
        .map(|v| {
            let s = topo.lan.nodes[0]
                .ns
                .enter(|| UdpSocket::bind(v))
                .expect("enter node-1")
                .expect("bind the victim");
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .collect();
    topo.wait_for_mesh(MESH_UP);
    for v6 in [false, true] {
        let socket = topo.client_socket(v6, 40700);
        for _ in 0..5 {
            socket.send_to(b"to anywhere", anycast(v6)).unwrap();
        }
    }
    counter_reaching(topo.daemon(2), "worker_target_refused", 10);
    for l in &listeners {
        let mut buf = [0u8; 64];
        assert!(
            l.recv_from(&mut buf).is_err(),
            "a client's datagram reached {:?}",
            l.local_addr()
        );
    }
    assert_eq!(counter(topo.daemon(2), "worker_delivered"), 0);
    let status = topo.daemon(2).status();
    assert_eq!(
        status["forwarding"]["services"]["echo"]["dropped"]["worker_target_refused"], 10,
        "{}",
        status["forwarding"]["services"]
    );
    let log = topo.daemon(2).log();
    assert!(
        log.contains("refusing to deliver") && log.contains("198.18.10.1:9999"),
        "{log}"
    );
}

#[test]
fn a_proxy_protocol_service_gets_the_header_intact() {
    require_root();
    let mut service = ServiceSpec::echo(&[2]);
    service.proxy_protocol = true;
    let topo = Topology::start(2, &[service]);
    topo.wait_for_mesh(MESH_UP);
    for v6 in [false, true] {
        let client = topo.client_socket(v6, 49000);
        let mut buf = [0u8; 2048];
        let n = (0..10)
            .find_map(|_| {
                client.send_to(b"payload", anycast(v6)).unwrap();
                client.recv(&mut buf).ok()
            })
            .expect("reply");
        let reply = &buf[..n];
        let at = reply
            .windows(3)
            .position(|w| w == b" | ")
            .expect("echo format")
            + 3;
        let (header, len) = flynode::forward::proxy::decode(&reply[at..]).expect("PROXY v2");
        assert_eq!(
            header.endpoints(),
            Some((client_addr(v6, 49000), anycast(v6))),
            "the header names the client and the anycast address"
        );
        assert_eq!(header.tlvs().count(), 0);
        assert_eq!(&reply[at + len..], b"payload");
    }
}

/// `ip rule show` lines of table 51821 in `ns`, both families.
fn reply_rules(topo: &Topology, n: u8) -> Vec<String> {
    ["-4", "-6"]
        .iter()
        .flat_map(|family| {
            let out = topo
                .host(n)
                .ns
                .command("ip")
                .args([family, "rule", "show", "table", "51821"])
                .output()
                .expect("ip rule");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn with_the_tc_program_the_host_has_no_reply_rules_and_replies_still_come_back() {
    require_root();
    let topo = Topology::start(2, &[ServiceSpec::echo(&[2])]);
    topo.wait_for_mesh(MESH_UP);
    // `reply_capture = "auto"` (the default): the containers sit behind veths, so the tc
    // program covers them and no policy rule is needed, for either family.
    for v6 in [false, true] {
        let client = topo.client_socket(v6, 52000);
        let reply = ask(&client, anycast(v6), b"no rules");
        let Some((text, from)) = reply else {
            panic!(
                "no reply over IPv{}: {}",
                if v6 { 6 } else { 4 },
                topo.logs()
            );
        };
        // Through flynode, so from the anycast address: a reply the kernel routed
        // itself would come from the container's.
        assert_eq!(from, anycast(v6), "{text}");
        assert_eq!(parse_echo(&text).1, client_addr(v6, 52000));
    }
    assert!(
        reply_rules(&topo, 2).is_empty(),
        "{:?}",
        reply_rules(&topo, 2)
    );
    assert!(
        topo.logs().contains("reply capture attached"),
        "{}",
        topo.logs()
    );
}

#[test]
fn reply_rules_follow_the_daemon_and_survive_no_crash() {
    require_root();
    let mut topo = Topology::start_with(2, &[ServiceSpec::echo(&[2])], |spec| {
        spec.flows.push("reply_capture = \"rules\"".into());
    });
    let rules = reply_rules(&topo, 2);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(
        rules[0].contains("from 198.19.2.2 ipproto udp sport 7 lookup 51821"),
        "{rules:?}"
    );
    assert!(
        rules[1].contains("from fd00:c:2::2 ipproto udp sport 7 lookup 51821"),
        "{rules:?}"
    );
    // Node 1 serves no container: no rules.
    assert!(reply_rules(&topo, 1).is_empty());
    // kill -9 leaves them behind; the next start replaces them, no duplicates.
    let prepared = topo.daemons[1].take().unwrap().kill();
    assert_eq!(reply_rules(&topo, 2).len(), 2);
    let map = topo.routing(&[ServiceSpec::echo(&[2])]);
    topo.daemons[1] = Some(prepared.start(&topo.host(2).ns, &map));
    assert_eq!(reply_rules(&topo, 2), rules);
    topo.wait_for_mesh(MESH_UP);
    let client = topo.client_socket(false, 50000);
    assert!(
        ask(&client, anycast(false), b"again").is_some(),
        "{}",
        topo.logs()
    );
    // A clean stop removes them.
    let status = topo.daemons[1].take().unwrap().stop();
    assert!(status.success());
    assert!(
        reply_rules(&topo, 2).is_empty(),
        "{:?}",
        reply_rules(&topo, 2)
    );
}
