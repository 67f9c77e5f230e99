//! `routing_map`: the routing file (`flynode::routing::RoutingMap::parse`, with the
//! cross-checks of `routing/file.rs`).
//!
//! Input: the file's text (bytes that are not UTF-8 are ignored: `load` refuses them
//! before parsing).
//!
//! Properties: an accepted map holds what `RoutingMap` documents (ids, mesh addresses
//! and keys unique; unicast anycast addresses; ports non-zero and unique; every
//! address/port served once; workers on nodes of the map, with a target for each family
//! the service serves); written back as a file it parses to the same map; as etcd
//! records it assembles to the same map with nothing left out; its services, as a
//! services file, are accepted against its nodes unchanged. A refusal is one line that
//! names the file.
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use flynode::routing::{Assembled, Record, RecordKind, RoutingMap};

use crate::render;

pub const ORIGIN: &str = "/fuzz/routing.toml";

pub fn routing_map(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new(ORIGIN);
    let map = match RoutingMap::parse(text, origin) {
        Ok(map) => map,
        Err(e) => return one_line(&e.to_string(), ORIGIN),
    };
    check_map(&map);
    reaccepted(&map);
    let nodes_only = RoutingMap {
        nodes: map.nodes.clone(),
        services: Default::default(),
    };
    let file = render::services_file(map.services.values());
    let (services, absent) = RoutingMap::parse_services(&file, origin, &nodes_only)
        .unwrap_or_else(|e| panic!("its services refused as a services file: {e}\n{file}"));
    assert!(absent.is_empty(), "workers on absent nodes: {absent:?}");
    assert!(
        services.iter().eq(map.services.values()),
        "services changed through a services file"
    );
}

/// What every accepted map holds, whether from a file or from etcd.
pub fn check_map(map: &RoutingMap) {
    let mut mesh = HashSet::new();
    let mut mesh4 = HashSet::new();
    let mut keys = HashSet::new();
    for (id, n) in &map.nodes {
        assert_eq!(id, &n.id, "node filed under another id");
        assert_eq!(
            n.mesh_address.segments()[0] & 0xfe00,
            0xfc00,
            "mesh address not ULA"
        );
        assert!(mesh.insert(n.mesh_address), "mesh address used twice");
        if let Some(v4) = n.mesh_ipv4 {
            assert!(mesh4.insert(v4), "mesh IPv4 address used twice");
        }
        assert!(keys.insert(n.public_key), "public key used twice");
        assert_ne!(n.endpoint.port(), 0, "endpoint port 0");
    }
    let mut names = HashSet::new();
    let mut served = HashSet::new();
    for (id, sv) in &map.services {
        assert_eq!(id, &sv.id, "service filed under another id");
        assert_ne!(sv.id.get(), 0);
        assert!(names.insert(sv.name.clone()), "service name used twice");
        assert!(!sv.anycast.is_empty() && !sv.ports.is_empty());
        for a in &sv.anycast {
            let broadcast = matches!(a, IpAddr::V4(v4) if v4.is_broadcast());
            let mapped = matches!(a, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some());
            assert!(
                !(a.is_unspecified() || a.is_multicast() || broadcast || mapped),
                "{a} accepted as anycast address"
            );
            for &p in &sv.ports {
                assert_ne!(p, 0, "port 0");
                assert!(served.insert((*a, p)), "{a} port {p} served twice");
            }
        }
        for w in &sv.workers {
            assert!(
                map.nodes.contains_key(&w.node),
                "worker on unknown node {}",
                w.node
            );
            assert!((1..=65535).contains(&w.weight), "weight {}", w.weight);
            let v4 = w.targets.iter().filter(|t| t.is_ipv4()).count();
            assert!(!w.targets.is_empty() && v4 <= 1 && w.targets.len() - v4 <= 1);
            for t in &w.targets {
                assert!(!t.ip().is_unspecified() && !t.ip().is_multicast() && t.port() != 0);
            }
            for v6 in [false, true] {
                if sv.anycast.iter().any(|a| a.is_ipv6() == v6) {
                    assert!(w.target_for(v6).is_some(), "no target for a served family");
                }
            }
        }
    }
}

/// Written back as a file and as etcd records, `map` is accepted again unchanged.
pub fn reaccepted(map: &RoutingMap) {
    let file = render::routing_file(map);
    let again = RoutingMap::parse(&file, Path::new(ORIGIN))
        .unwrap_or_else(|e| panic!("an accepted map written back is refused: {e}\n{file}"));
    assert!(
        again == *map,
        "an accepted map written back parses differently:\n{file}"
    );
    let assembled = assemble_records(map);
    assert!(
        assembled.rejected.is_empty(),
        "records of an accepted map rejected: {:?}",
        assembled.rejected
    );
    assert!(assembled.absent_workers.is_empty());
    assert!(
        assembled.map == *map,
        "records of an accepted map assemble differently"
    );
}

/// The map as etcd holds it: one record per node (as written here) and per service (as
/// `fleet::service_record` writes it, checked against ours).
fn assemble_records(map: &RoutingMap) -> Assembled {
    let mut records = Vec::new();
    for n in map.nodes.values() {
        records.push((
            format!("/flynode/nodes/{}", n.id),
            RecordKind::Node,
            n.id.to_string(),
            render::text(&render::node(n)),
        ));
    }
    for sv in map.services.values() {
        let text = flynode::fleet::service_record(sv);
        let ours: toml::Table = render::service(sv);
        assert_eq!(
            text.parse::<toml::Table>().ok(),
            Some(ours),
            "fleet::service_record writes another table"
        );
        records.push((
            format!("/flynode/services/{}", sv.name),
            RecordKind::Service,
            sv.name.to_string(),
            text,
        ));
    }
    RoutingMap::assemble(records.iter().map(|(key, kind, name, text)| Record {
        key,
        kind: *kind,
        name,
        text,
    }))
}

/// A refusal the operator sees: one line, naming the file.
pub fn one_line(e: &str, origin: &str) {
    assert!(
        !e.contains(['\n', '\r']),
        "an error on more than one line: {e:?}"
    );
    assert!(
        e.starts_with(origin),
        "an error that does not name {origin}: {e:?}"
    );
}
