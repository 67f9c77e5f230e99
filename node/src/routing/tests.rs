use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::*;
use crate::config::tests::mutations;

const ORIGIN: &str = "/etc/flynode/routing.toml";
const KEY_1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const KEY_2: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

/// Line numbers matter: the error tests below edit single lines of this map in place.
const VALID: &str = r#"[[node]]
id = "ams-1"
region = "ams"
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.1:51820"
mesh_address = "fd00:f1::1"

[[node]]
id = "fra-1"
region = "fra"
public_key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="
endpoint = "[2001:db8::2]:51820"
mesh_address = "fd00:f1::2"

[[service]]
id = 1
name = "dns"
anycast = ["198.18.100.1", "2001:db8:100::1"]
ports = [53]
  [[service.worker]]
  node = "ams-1"
  target = ["198.18.200.2:53", "[fd00:c::2]:53"]
  [[service.worker]]
  node = "fra-1"
  target = ["198.18.200.3:53", "[fd00:c::3]:53"]
  weight = 3

[[service]]
id = 7
name = "game_udp"
anycast = ["198.18.100.2"]
ports = [27015, 27016]
proxy_protocol = true
"#;

fn parse(text: &str) -> Result<RoutingMap, RoutingError> {
    RoutingMap::parse(text, Path::new(ORIGIN))
}

/// The rendered error for VALID with `from` replaced by `to` (which must occur).
fn err_with(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "{from}");
    match parse(&VALID.replacen(from, to, 1)) {
        Ok(map) => panic!("expected an error, got {map:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn valid_map_parses_nodes_services_and_workers() {
    let map = parse(VALID).unwrap();
    assert_eq!(map.nodes.len(), 2);
    let ams: NodeId = "ams-1".parse().unwrap();
    let node = &map.nodes[&ams];
    assert_eq!(node.region.as_str(), "ams");
    assert_eq!(node.public_key, KEY_1.parse().unwrap());
    assert_eq!(
        node.endpoint,
        "198.18.0.1:51820".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(node.mesh_address, "fd00:f1::1".parse::<Ipv6Addr>().unwrap());
    let fra = &map.nodes[&"fra-1".parse().unwrap()];
    assert_eq!(fra.public_key, KEY_2.parse().unwrap());
    assert_eq!(
        fra.endpoint,
        "[2001:db8::2]:51820".parse::<SocketAddr>().unwrap()
    );

    let dns = &map.services[&ServiceId::new(1).unwrap()];
    assert_eq!(dns.name.as_str(), "dns");
    assert_eq!(
        dns.anycast,
        vec![
            "198.18.100.1".parse::<IpAddr>().unwrap(),
            "2001:db8:100::1".parse().unwrap()
        ]
    );
    assert_eq!(dns.ports, vec![53]);
    assert!(!dns.proxy_protocol);
    assert_eq!(
        dns.workers,
        vec![
            Worker {
                node: ams,
                targets: vec![
                    "198.18.200.2:53".parse().unwrap(),
                    "[fd00:c::2]:53".parse().unwrap()
                ],
                weight: 1
            },
            Worker {
                node: "fra-1".parse().unwrap(),
                targets: vec![
                    "198.18.200.3:53".parse().unwrap(),
                    "[fd00:c::3]:53".parse().unwrap()
                ],
                weight: 3
            },
        ]
    );
    let game = &map.services[&ServiceId::new(7).unwrap()];
    assert_eq!(game.name.as_str(), "game_udp");
    assert!(game.proxy_protocol);
    assert!(game.workers.is_empty());
}

#[test]
fn empty_map_is_valid() {
    assert_eq!(parse("").unwrap(), RoutingMap::default());
    assert_eq!(parse("# nothing yet\n").unwrap(), RoutingMap::default());
}

#[test]
fn service_endpoints_lists_every_address_port_pair() {
    let map = parse(VALID).unwrap();
    let pairs: Vec<(String, u16, u32)> = map
        .service_endpoints()
        .map(|(a, p, s)| (a.to_string(), p, s.id.get()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("198.18.100.1".into(), 53, 1),
            ("2001:db8:100::1".into(), 53, 1),
            ("198.18.100.2".into(), 27015, 7),
            ("198.18.100.2".into(), 27016, 7),
        ]
    );
}

#[test]
fn duplicate_node_id_points_at_the_second() {
    assert_eq!(
        err_with("id = \"fra-1\"", "id = \"ams-1\""),
        "/etc/flynode/routing.toml:9:6: node[1].id: duplicate node id `ams-1` (first defined at line 2)"
    );
}

#[test]
fn duplicate_mesh_address_names_the_other_node() {
    assert_eq!(
        err_with("\"fd00:f1::2\"", "\"fd00:f1:0::1\""),
        "/etc/flynode/routing.toml:13:16: node[1].mesh_address: fd00:f1::1 is already the mesh \
         address of node `ams-1` (line 6)"
    );
}

#[test]
fn duplicate_public_key_names_the_other_node() {
    assert_eq!(
        err_with(KEY_2, KEY_1),
        "/etc/flynode/routing.toml:11:14: node[1].public_key: already the public key of node \
         `ams-1` (line 4)"
    );
}

#[test]
fn duplicate_service_id_and_name_are_rejected() {
    assert_eq!(
        err_with("id = 7", "id = 1"),
        "/etc/flynode/routing.toml:29:6: service[1].id: duplicate service id 1 (already used by \
         service `dns` at line 16)"
    );
    assert_eq!(
        err_with("name = \"game_udp\"", "name = \"dns\""),
        "/etc/flynode/routing.toml:30:8: service[1].name: duplicate service name `dns` (already \
         used by service id 1 at line 17)"
    );
}

#[test]
fn address_port_pair_served_twice_names_both_services() {
    let text = VALID
        .replacen(
            "[\"198.18.100.2\"]",
            "[\"198.18.100.2\", \"198.18.100.1\"]",
            1,
        )
        .replacen("[27015, 27016]", "[27015, 53]", 1);
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        "/etc/flynode/routing.toml:31:28: service[1].anycast[1]: 198.18.100.1 port 53 of service \
         `game_udp` is already served by service `dns` (line 16)"
    );
    // Same address on different ports is fine.
    let text = VALID.replacen("[\"198.18.100.2\"]", "[\"198.18.100.1\"]", 1);
    assert!(parse(&text).is_ok());
}

#[test]
fn worker_on_unknown_node_is_rejected() {
    assert_eq!(
        err_with("node = \"fra-1\"", "node = \"lhr-1\""),
        "/etc/flynode/routing.toml:24:10: service[0].worker[1].node: no [[node]] has id `lhr-1`"
    );
}

#[test]
fn zero_weight_and_zero_port_are_rejected_at_the_value() {
    assert_eq!(
        err_with("weight = 3", "weight = 0"),
        "/etc/flynode/routing.toml:26:12: service[0].worker[1].weight: invalid value: integer `0`, \
         expected a weight (1..=65535)"
    );
    assert_eq!(
        err_with("[27015, 27016]", "[27015, 0]"),
        "/etc/flynode/routing.toml:32:17: service[1].ports[1]: invalid value: integer `0`, \
         expected a port number (1..=65535)"
    );
    assert_eq!(
        err_with("ports = [53]", "ports = [65536]"),
        "/etc/flynode/routing.toml:19:10: service[0].ports[0]: invalid value: integer `65536`, \
         expected a port number (1..=65535)"
    );
    assert_eq!(
        err_with("198.18.200.3:53", "198.18.200.3:0"),
        "/etc/flynode/routing.toml:25:12: service[0].worker[1].target: port 0 is not allowed in \
         198.18.200.3:0"
    );
}

#[test]
fn address_and_port_lists_must_be_non_empty_and_unique() {
    assert_eq!(
        err_with("[27015, 27016]", "[27015, 27015]"),
        "/etc/flynode/routing.toml:32:17: service[1].ports[1]: port 27015 is listed twice"
    );
    assert_eq!(
        err_with("[27015, 27016]", "[]"),
        "/etc/flynode/routing.toml:32:9: service[1].ports: must list at least one port"
    );
    assert_eq!(
        err_with("[\"198.18.100.2\"]", "[\"198.18.100.2\", \"198.18.100.2\"]"),
        "/etc/flynode/routing.toml:31:28: service[1].anycast[1]: 198.18.100.2 is listed twice"
    );
    assert_eq!(
        err_with("[\"198.18.100.2\"]", "[]"),
        "/etc/flynode/routing.toml:31:11: service[1].anycast: must list at least one address"
    );
}

#[test]
fn bad_single_values_are_located() {
    assert_eq!(
        err_with("[\"198.18.100.2\"]", "[\"198.18.100.2\", \"bogus\"]"),
        "/etc/flynode/routing.toml:31:28: service[1].anycast[1]: expected an IPv4 or IPv6 \
         address, got `bogus`"
    );
    assert_eq!(
        err_with("[\"198.18.100.2\"]", "[\"0.0.0.0\"]"),
        "/etc/flynode/routing.toml:31:12: service[1].anycast[0]: 0.0.0.0 cannot be an anycast address"
    );
    assert_eq!(
        err_with("[\"198.18.100.2\"]", "[\"::ffff:198.18.100.2\"]"),
        "/etc/flynode/routing.toml:31:12: service[1].anycast[0]: write the IPv4-mapped address \
         ::ffff:198.18.100.2 as 198.18.100.2"
    );
    assert_eq!(
        err_with("\"fd00:f1::2\"", "\"2001:db8::2\""),
        "/etc/flynode/routing.toml:13:16: node[1].mesh_address: must be an IPv6 unique local \
         address (fc00::/7, e.g. fd00:f1::1), got 2001:db8::2"
    );
    assert_eq!(
        err_with(KEY_2, "c2hvcnQ="),
        "/etc/flynode/routing.toml:11:14: node[1].public_key: invalid WireGuard public key: \
         decodes to 5 bytes, a WireGuard key is 32 bytes (44 base64 characters)"
    );
    assert_eq!(
        err_with("id = 7", "id = 0"),
        "/etc/flynode/routing.toml:29:6: service[1].id: invalid value: integer `0`, expected a \
         service id (1..=4294967295)"
    );
    assert_eq!(
        err_with("name = \"game_udp\"", "name = \"Game\""),
        "/etc/flynode/routing.toml:30:8: service[1].name: invalid service name `Game`: use 1 to \
         63 lowercase letters, digits, '-' and '_', starting with a letter or digit"
    );
    assert_eq!(
        err_with("proxy_protocol = true", "proxy_protocol = \"yes\""),
        "/etc/flynode/routing.toml:33:18: service[1].proxy_protocol: invalid type: string \
         \"yes\", expected a boolean"
    );
}

#[test]
fn unknown_and_missing_fields_are_located() {
    assert_eq!(
        err_with("  weight = 3", "  wieght = 3"),
        "/etc/flynode/routing.toml:26:3: service[0].worker[1]: unknown field `wieght`, expected \
         one of `node`, `target`, `weight`"
    );
    assert_eq!(
        err_with("ports = [27015, 27016]", "# no ports"),
        "/etc/flynode/routing.toml:28:1: service[1].ports: missing field"
    );
    assert_eq!(
        parse("[[nodes]]\nid = \"x\"\n").unwrap_err().to_string(),
        "/etc/flynode/routing.toml:1:3: unknown field `nodes` at top level, expected `node` or \
         `service`"
    );
}

#[test]
fn load_reads_the_file_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.toml");
    std::fs::write(&path, VALID).unwrap();
    assert_eq!(RoutingMap::load(&path).unwrap(), parse(VALID).unwrap());
    let missing = dir.path().join("nope.toml");
    let e = RoutingMap::load(&missing).unwrap_err();
    assert!(matches!(e, RoutingError::Read { .. }));
    assert!(
        e.to_string()
            .starts_with(&format!("{}: cannot read routing map: ", missing.display()))
    );
}

#[test]
fn garbled_map_never_panics_and_errors_stay_one_line() {
    let origin = Path::new(ORIGIN);
    for bytes in mutations(VALID, 0xf10e_5eed) {
        let result = match crate::config::toml_error::utf8(&bytes, origin) {
            Ok(text) => parse(text),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(map) => {
                // Whatever got through is consistent.
                for service in map.services.values() {
                    for worker in &service.workers {
                        assert!(map.nodes.contains_key(&worker.node));
                    }
                }
            }
            Err(RoutingError::Invalid(e)) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "multi-line error: {line}");
                assert!(e.location.is_some(), "unlocated error: {line}");
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}

#[test]
fn every_worker_needs_a_container_in_each_family_the_service_uses() {
    let e = err_with(
        r#"target = ["198.18.200.3:53", "[fd00:c::3]:53"]"#,
        r#"target = "198.18.200.3:53""#,
    );
    assert!(
        e.starts_with("/etc/flynode/routing.toml:25:12: service[0].worker[1].target: the service has IPv6 anycast addresses, so each worker needs an IPv6 container address"),
        "{e}"
    );
    let e = err_with(
        r#"target = ["198.18.200.3:53", "[fd00:c::3]:53"]"#,
        r#"target = ["198.18.200.3:53", "198.18.200.4:53"]"#,
    );
    assert!(
        e.ends_with("at most one IPv4 and one IPv6 container address per worker"),
        "{e}"
    );
    let e = err_with(
        r#"target = ["198.18.200.3:53", "[fd00:c::3]:53"]"#,
        r#"target = []"#,
    );
    assert!(
        e.ends_with("must list at least one container address"),
        "{e}"
    );
    let e = err_with(
        r#"target = ["198.18.200.3:53", "[fd00:c::3]:53"]"#,
        r#"target = ["0.0.0.0:53", "[fd00:c::3]:53"]"#,
    );
    assert!(
        e.ends_with("0.0.0.0:53 cannot be a container address"),
        "{e}"
    );
}

#[test]
fn a_single_family_service_takes_a_single_target_string() {
    let text = VALID.replace(
        r#"anycast = ["198.18.100.1", "2001:db8:100::1"]"#,
        r#"anycast = ["198.18.100.1"]"#,
    );
    let text = text.replace(
        r#"target = ["198.18.200.2:53", "[fd00:c::2]:53"]"#,
        r#"target = "198.18.200.2:53""#,
    );
    let map = parse(&text).unwrap();
    let dns = &map.services[&ServiceId::new(1).unwrap()];
    assert_eq!(
        dns.workers[0].target_for(false),
        Some("198.18.200.2:53".parse().unwrap())
    );
    assert_eq!(dns.workers[0].target_for(true), None);
}
