use std::path::Path;

use super::*;
use crate::config::tests::MINIMAL;
use crate::routing::{RecordCache, RecordKind};

const KEY_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY_B: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

fn node(id: &str, key: &str, n: u8) -> String {
    format!(
        "id = \"{id}\"\nregion = \"ams\"\npublic_key = \"{key}\"\nendpoint = \"198.18.10.{n}:51820\"\nmesh_address = \"fd00:f1::{n}\"\n"
    )
}

fn service(name: &str, id: u32, port: u16, workers: &[&str]) -> String {
    let mut s =
        format!("id = {id}\nname = \"{name}\"\nanycast = [\"198.18.0.53\"]\nports = [{port}]\n");
    for w in workers {
        s.push_str(&format!(
            "[[worker]]\nnode = \"{w}\"\ntarget = \"10.0.0.2:53\"\n"
        ));
    }
    s
}

/// A service record as a routing file writes it.
fn in_file(record: &str) -> String {
    format!(
        "[[service]]\n{}",
        record.replace("[[worker]]", "[[service.worker]]")
    )
}

fn view(records: &[(&str, &str, i64)]) -> View {
    View {
        revision: 100,
        records: records
            .iter()
            .map(|(k, v, created)| {
                (
                    (*k).to_owned(),
                    Kv {
                        value: (*v).to_owned(),
                        create_revision: *created,
                    },
                )
            })
            .collect(),
    }
}

#[test]
fn layout_classifies_keys_under_the_prefix_only() {
    let layout = Layout::new("/fly");
    assert_eq!(layout.prefix(), "/fly/");
    assert_eq!(
        layout.classify("/fly/nodes/ams-1"),
        Some((RecordKind::Node, "ams-1"))
    );
    assert_eq!(
        layout.classify("/fly/services/dns"),
        Some((RecordKind::Service, "dns"))
    );
    for other in [
        "/fly/nodes/",
        "/fly/nodes/a/b",
        "/fly/other/x",
        "/flyer/nodes/a",
        "/fly/services",
    ] {
        assert_eq!(layout.classify(other), None, "{other}");
    }
    assert_eq!(layout.node_key("a"), "/fly/nodes/a");
    assert_eq!(layout.service_key("dns"), "/fly/services/dns");
}

#[test]
fn a_view_assembles_into_the_map_a_file_would_give() {
    let layout = Layout::new("/flynode/");
    let a = node("a", KEY_A, 1);
    let b = node("b", KEY_B, 2);
    let dns = service("dns", 1, 53, &["a", "b"]);
    let assembled = view(&[
        ("/flynode/nodes/a", &a, 5),
        ("/flynode/nodes/b", &b, 6),
        ("/flynode/services/dns", &dns, 7),
    ])
    .assemble(&layout);
    assert!(assembled.rejected.is_empty(), "{:?}", assembled.rejected);
    let file = format!("[[node]]\n{a}[[node]]\n{b}{}", in_file(&dns));
    let expected = RoutingMap::parse(&file, Path::new("f")).unwrap();
    assert_eq!(assembled.map, expected);
}

#[test]
fn a_bad_record_is_left_out_and_named_the_rest_applies() {
    let layout = Layout::new("/flynode/");
    let a = node("a", KEY_A, 1);
    // Same mesh address as `a`, created later: `b` loses.
    let b = node("b", KEY_B, 1);
    let wrong_name = node("c", "not a key", 3);
    let dns = service("dns", 1, 53, &["a"]);
    // Same (anycast, port) as dns, created later.
    let clash = service("clash", 2, 53, &["a"]);
    let assembled = view(&[
        ("/flynode/nodes/a", &a, 5),
        ("/flynode/nodes/b", &b, 6),
        ("/flynode/nodes/x", &wrong_name, 7),
        ("/flynode/services/dns", &dns, 8),
        ("/flynode/services/clash", &clash, 9),
        ("/flynode/junk", "??", 10),
    ])
    .assemble(&layout);
    assert_eq!(
        assembled
            .map
            .nodes
            .keys()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(assembled.map.services.len(), 1);
    let r = &assembled.rejected;
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(
        r["/flynode/nodes/b"],
        "/flynode/nodes/b:5:16: mesh_address: fd00:f1::1 is already the mesh address of node `a` (/flynode/nodes/a)"
    );
    assert!(
        r["/flynode/nodes/x"].starts_with("/flynode/nodes/x:3:"),
        "{}",
        r["/flynode/nodes/x"]
    );
    assert!(
        r["/flynode/services/clash"].contains("already served by service `dns`"),
        "{}",
        r["/flynode/services/clash"]
    );
    assert!(r["/flynode/junk"].contains("not a flynode record"));
}

#[test]
fn a_record_must_carry_the_name_its_key_gives() {
    let layout = Layout::new("/flynode/");
    let a = node("a", KEY_A, 1);
    let assembled = view(&[("/flynode/nodes/b", &a, 5)]).assemble(&layout);
    assert_eq!(
        assembled.rejected["/flynode/nodes/b"],
        "/flynode/nodes/b:1:6: id: `a`, but the key names `b`"
    );
}

#[test]
fn workers_on_nodes_without_a_record_are_left_out_not_the_service() {
    let layout = Layout::new("/flynode/");
    let a = node("a", KEY_A, 1);
    let dns = service("dns", 1, 53, &["a", "gone"]);
    let assembled = view(&[
        ("/flynode/nodes/a", &a, 5),
        ("/flynode/services/dns", &dns, 8),
    ])
    .assemble(&layout);
    assert!(assembled.rejected.is_empty());
    let dns = assembled.map.services.values().next().unwrap();
    assert_eq!(dns.workers.len(), 1);
    assert_eq!(dns.workers[0].node.as_str(), "a");
    assert_eq!(
        assembled.absent_workers["dns"]
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        ["gone"]
    );
}

#[test]
fn node_and_service_records_round_trip() {
    let text = format!("node_id = \"n1\"\n{MINIMAL}");
    let config = crate::config::Config::parse(&text, Path::new("c")).unwrap();
    let key: PublicKey = KEY_A.parse().unwrap();
    let endpoint: SocketAddr = "198.18.10.7:51820".parse().unwrap();
    let record = node_record(&config, &key, endpoint);
    let layout = Layout::new("/flynode/");
    let node_key = layout.node_key(config.node_id.as_str());
    let dns = service("dns", 1, 53, &[config.node_id.as_str()]);
    let assembled =
        view(&[(&node_key, &record, 1), ("/flynode/services/dns", &dns, 2)]).assemble(&layout);
    assert!(assembled.rejected.is_empty(), "{:?}", assembled.rejected);
    let me = &assembled.map.nodes[&config.node_id];
    assert_eq!(me.public_key, key);
    assert_eq!(me.endpoint, endpoint);
    assert_eq!(me.mesh_address, config.mesh_address);
    let service = assembled.map.services.values().next().unwrap().clone();
    let again = service_record(&service);
    let reassembled = view(&[
        (&node_key, &record, 1),
        ("/flynode/services/dns", &again, 2),
    ])
    .assemble(&layout);
    assert_eq!(reassembled.map, assembled.map);
}

#[test]
fn a_services_file_is_checked_against_the_services_already_there() {
    let a = node("a", KEY_A, 1);
    let existing = RoutingMap::parse(
        &format!("[[node]]\n{a}{}", in_file(&service("dns", 1, 53, &["a"]))),
        Path::new("etcd"),
    )
    .unwrap();
    let file = in_file(&service("game", 1, 7777, &["a", "down"]));
    let err = RoutingMap::parse_services(&file, Path::new("s.toml"), &existing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "s.toml:2:6: service[0].id: duplicate service id 1 (already used by service `dns` at etcd)"
    );
    let file = in_file(&service("game", 2, 7777, &["a", "down"]));
    let (services, absent) =
        RoutingMap::parse_services(&file, Path::new("s.toml"), &existing).unwrap();
    assert_eq!(services.len(), 1);
    // Kept: the node is down now, and counts again when it registers.
    assert_eq!(services[0].workers.len(), 2);
    assert_eq!(
        absent.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["down"]
    );
    let nodes = format!("[[node]]\n{a}");
    let err = RoutingMap::parse_services(&nodes, Path::new("s.toml"), &existing).unwrap_err();
    assert!(
        err.to_string().contains("may only hold [[service]]"),
        "{err}"
    );
}

#[test]
fn a_fleet_sized_view_assembles() {
    // 2000 nodes and 200 services, each with 3 workers: every record parsed and checked.
    let layout = Layout::new("/flynode/");
    let mut records = std::collections::BTreeMap::new();
    let key = |i: u32| {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_be_bytes());
        bytes[31] = 1;
        PublicKey::from_bytes(bytes).to_string()
    };
    for i in 0..2000u32 {
        let text = format!(
            "id = \"n{i}\"\nregion = \"r\"\npublic_key = \"{}\"\nendpoint = \"198.18.{}.{}:51820\"\nmesh_address = \"fd00:f1::{:x}\"\n",
            key(i),
            i / 250,
            i % 250 + 1,
            i + 1
        );
        records.insert(
            layout.node_key(&format!("n{i}")),
            Kv {
                value: text,
                create_revision: i64::from(i),
            },
        );
    }
    for s in 0..200u32 {
        let workers: Vec<String> = (0..3).map(|w| format!("n{}", (s * 3 + w) % 2000)).collect();
        let text = service(
            &format!("s{s}"),
            s + 1,
            1000 + s as u16,
            &workers.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        records.insert(
            layout.service_key(&format!("s{s}")),
            Kv {
                value: text,
                create_revision: 5000 + i64::from(s),
            },
        );
    }
    let mut view = View {
        revision: 1,
        records,
    };
    let mut cache = RecordCache::default();
    let start = std::time::Instant::now();
    let first = view.assemble_cached(&layout, &mut cache);
    let cold = start.elapsed();
    assert!(
        first.rejected.is_empty(),
        "{:?}",
        first.rejected.iter().next()
    );
    assert_eq!(first.map.nodes.len(), 2000);
    assert_eq!(first.map.services.len(), 200);
    // One service changes and one node leaves: only the changed record is parsed again,
    // and the result is what a cold assembly gives.
    let s7 = layout.service_key("s7");
    view.records.get_mut(&s7).unwrap().value = service("s7", 8, 4242, &["n1"]);
    view.records.remove(&layout.node_key("n1999"));
    let start = std::time::Instant::now();
    let again = view.assemble_cached(&layout, &mut cache);
    let warm = start.elapsed();
    let cold_again = view.assemble(&layout);
    assert_eq!(again.map, cold_again.map);
    assert_eq!(again.rejected, cold_again.rejected);
    assert_eq!(again.map.nodes.len(), 1999);
    eprintln!("assembled 2200 records: {cold:?} cold, {warm:?} after one change");
}
