//! The routing map as written, and the cross-reference checks that turn it into a
//! [`RoutingMap`]. Values that are checked across entries keep their spans so the error
//! can point at the second occurrence and say where the first one is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use flynode_keys::PublicKey;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Node, RoutingMap, Service, ServiceId, ServiceName, Worker};
use crate::config::de::{self, MeshV4, Port, UlaAddr};
use crate::config::toml_error::quoted;
use crate::config::{Location, NodeId, Region, TomlError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RoutingFile {
    #[serde(default)]
    node: Vec<NodeEntry>,
    #[serde(default)]
    service: Vec<ServiceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    id: Spanned<NodeId>,
    region: Region,
    public_key: Spanned<Key>,
    #[serde(deserialize_with = "de::socket_addr")]
    endpoint: SocketAddr,
    mesh_address: Spanned<UlaAddr>,
    #[serde(default)]
    mesh_ipv4: Option<Spanned<MeshV4>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    id: Spanned<ServiceId>,
    name: Spanned<ServiceName>,
    anycast: Spanned<Vec<Spanned<Anycast>>>,
    ports: Spanned<Vec<Spanned<Port>>>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    worker: Vec<WorkerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerEntry {
    node: Spanned<NodeId>,
    target: Spanned<Targets>,
    #[serde(default = "default_weight", deserialize_with = "weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

fn weight<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let w = de::int_in(d, "a weight (1..=65535)", 1..=65535)?;
    u32::try_from(w).map_err(serde::de::Error::custom)
}

/// A worker's container address(es): one `"ip:port"`, or a list with at most one per
/// address family (a dual-stack service needs an IPv4 and an IPv6 target).
struct Targets(Vec<SocketAddr>);

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, SeqAccess, Visitor, value::StrDeserializer};
        struct V;
        fn one<E: Error>(s: &str) -> Result<SocketAddr, E> {
            de::SockAddr::deserialize(StrDeserializer::<E>::new(s)).map(|a| a.0)
        }
        impl<'de> Visitor<'de> for V {
            type Value = Vec<SocketAddr>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a container address \"ip:port\" or a list of them (one IPv4, one IPv6)",
                )
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(vec![one(v)?])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(one(&s)?);
                }
                Ok(out)
            }
        }
        let list = d.deserialize_any(V)?;
        if list.is_empty() {
            return Err(D::Error::custom("must list at least one container address"));
        }
        for a in &list {
            let ip = a.ip();
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(D::Error::custom(format!(
                    "{a} cannot be a container address"
                )));
            }
        }
        let v4 = list.iter().filter(|a| a.is_ipv4()).count();
        if v4 > 1 || list.len() - v4 > 1 {
            return Err(D::Error::custom(
                "at most one IPv4 and one IPv6 container address per worker",
            ));
        }
        Ok(Targets(list))
    }
}

#[derive(PartialEq, Eq, Hash)]
struct Key(PublicKey);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The value is not echoed: a private key pasted here by mistake must not end up
        // in logs.
        de::parse_str(d, "a WireGuard public key (44 base64 characters)", |s| {
            s.parse()
                .map(Key)
                .map_err(|e| format!("invalid WireGuard public key: {e}"))
        })
    }
}

/// An address traffic can be sent to and answered from: not unspecified, multicast or
/// broadcast. IPv4-mapped IPv6 is refused because packets arrive as plain IPv4, so such
/// an entry could never match.
struct Anycast(IpAddr);

impl<'de> Deserialize<'de> for Anycast {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::parse_str(d, "an IP address", |s| {
            let address: IpAddr = s
                .parse()
                .map_err(|_| format!("expected an IPv4 or IPv6 address, got {}", quoted(s)))?;
            let broadcast = matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
            if address.is_unspecified() || address.is_multicast() || broadcast {
                return Err(format!("{address} cannot be an anycast address"));
            }
            if let IpAddr::V6(v6) = address
                && let Some(v4) = v6.to_ipv4_mapped()
            {
                return Err(format!("write the IPv4-mapped address {v6} as {v4}"));
            }
            Ok(Anycast(address))
        })
    }
}

/// Builds located errors for one file.
struct Errors<'a> {
    text: &'a str,
    origin: &'a Path,
}

impl Errors<'_> {
    fn at<T>(&self, value: &Spanned<T>, field: String, message: String) -> TomlError {
        TomlError::at(self.origin, self.text, value.span(), field, message)
    }

    fn line<T>(&self, value: &Spanned<T>) -> usize {
        Location::of_offset(self.text, value.span().start).line
    }
}

impl RoutingFile {
    pub(super) fn validate(self, text: &str, origin: &Path) -> Result<RoutingMap, TomlError> {
        let errors = Errors { text, origin };
        let nodes = validate_nodes(self.node, &errors)?;
        let services = validate_services(self.service, &nodes, &errors)?;
        Ok(RoutingMap { nodes, services })
    }
}

fn validate_nodes(
    entries: Vec<NodeEntry>,
    errors: &Errors<'_>,
) -> Result<BTreeMap<NodeId, Node>, TomlError> {
    let mut nodes = BTreeMap::new();
    // Value -> (node id, line) of the first entry that used it.
    let mut ids: HashMap<NodeId, usize> = HashMap::new();
    let mut mesh: HashMap<UlaAddr, (NodeId, usize)> = HashMap::new();
    let mut mesh4: HashMap<std::net::Ipv4Addr, (NodeId, usize)> = HashMap::new();
    let mut keys: HashMap<PublicKey, (NodeId, usize)> = HashMap::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let id = entry.id.get_ref().clone();
        if let Some(line) = ids.get(&id) {
            let message = format!("duplicate node id `{id}` (first defined at line {line})");
            return Err(errors.at(&entry.id, format!("node[{i}].id"), message));
        }
        ids.insert(id.clone(), errors.line(&entry.id));

        let address = *entry.mesh_address.get_ref();
        if let Some((other, line)) = mesh.get(&address) {
            let message = format!(
                "{} is already the mesh address of node `{other}` (line {line})",
                address.0
            );
            return Err(errors.at(
                &entry.mesh_address,
                format!("node[{i}].mesh_address"),
                message,
            ));
        }
        mesh.insert(address, (id.clone(), errors.line(&entry.mesh_address)));

        if let Some(v4) = &entry.mesh_ipv4 {
            let value = v4.get_ref().0;
            if let Some((other, line)) = mesh4.get(&value) {
                let message = format!(
                    "{value} is already the mesh IPv4 address of node `{other}` (line {line})"
                );
                return Err(errors.at(v4, format!("node[{i}].mesh_ipv4"), message));
            }
            mesh4.insert(value, (id.clone(), errors.line(v4)));
        }

        let key = entry.public_key.get_ref().0;
        if let Some((other, line)) = keys.get(&key) {
            let message = format!("already the public key of node `{other}` (line {line})");
            return Err(errors.at(&entry.public_key, format!("node[{i}].public_key"), message));
        }
        keys.insert(key, (id.clone(), errors.line(&entry.public_key)));

        let node = Node {
            id: id.clone(),
            region: entry.region,
            public_key: key,
            endpoint: entry.endpoint,
            mesh_address: address.0,
            mesh_ipv4: entry.mesh_ipv4.map(|a| a.get_ref().0),
        };
        nodes.insert(id, node);
    }
    Ok(nodes)
}

fn validate_services(
    entries: Vec<ServiceEntry>,
    nodes: &BTreeMap<NodeId, Node>,
    errors: &Errors<'_>,
) -> Result<BTreeMap<ServiceId, Service>, TomlError> {
    let mut services: BTreeMap<ServiceId, Service> = BTreeMap::new();
    // Value -> the first service that used it, by name or id, and its line.
    let mut ids: HashMap<ServiceId, (ServiceName, usize)> = HashMap::new();
    let mut names: HashMap<ServiceName, (ServiceId, usize)> = HashMap::new();
    let mut served: HashMap<(IpAddr, u16), (ServiceName, usize)> = HashMap::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let id = *entry.id.get_ref();
        let name = entry.name.get_ref().clone();
        let line = errors.line(&entry.id);
        if let Some((other, other_line)) = ids.get(&id) {
            let message = format!(
                "duplicate service id {id} (already used by service `{other}` at line {other_line})"
            );
            return Err(errors.at(&entry.id, format!("service[{i}].id"), message));
        }
        ids.insert(id, (name.clone(), line));
        if let Some((other, other_line)) = names.get(&name) {
            let message = format!(
                "duplicate service name `{name}` (already used by service id {other} at line {other_line})"
            );
            return Err(errors.at(&entry.name, format!("service[{i}].name"), message));
        }
        names.insert(name.clone(), (id, errors.line(&entry.name)));

        let anycast = unique_addresses(&entry.anycast, i, errors)?;
        let ports = unique_ports(&entry.ports, i, errors)?;
        for (k, address) in entry.anycast.get_ref().iter().enumerate() {
            for &port in &ports {
                let pair = (address.get_ref().0, port);
                if let Some((other, other_line)) = served.get(&pair) {
                    let message = format!(
                        "{} port {port} of service `{name}` is already served by service `{other}` (line {other_line})",
                        pair.0
                    );
                    return Err(errors.at(address, format!("service[{i}].anycast[{k}]"), message));
                }
            }
        }
        for &address in &anycast {
            for &port in &ports {
                served.insert((address, port), (name.clone(), line));
            }
        }

        let mut workers = Vec::with_capacity(entry.worker.len());
        for (w, worker) in entry.worker.into_iter().enumerate() {
            let node = worker.node.get_ref();
            if !nodes.contains_key(node) {
                let message = format!("no [[node]] has id `{node}`");
                return Err(errors.at(
                    &worker.node,
                    format!("service[{i}].worker[{w}].node"),
                    message,
                ));
            }
            for family in [false, true] {
                let served = anycast.iter().any(|a| a.is_ipv6() == family);
                let has = worker
                    .target
                    .get_ref()
                    .0
                    .iter()
                    .any(|t| t.is_ipv6() == family);
                if served && !has {
                    let (name, v) = if family {
                        ("IPv6", "[fd00::2]:53")
                    } else {
                        ("IPv4", "10.0.0.2:53")
                    };
                    let message = format!(
                        "the service has {name} anycast addresses, so each worker needs an {name} container address (e.g. target = [..., \"{v}\"])"
                    );
                    return Err(errors.at(
                        &worker.target,
                        format!("service[{i}].worker[{w}].target"),
                        message,
                    ));
                }
            }
            workers.push(Worker {
                node: node.clone(),
                targets: worker.target.into_inner().0,
                weight: worker.weight,
            });
        }

        let service = Service {
            id,
            name,
            anycast,
            ports,
            proxy_protocol: entry.proxy_protocol,
            workers,
        };
        services.insert(id, service);
    }
    Ok(services)
}

fn unique_addresses(
    list: &Spanned<Vec<Spanned<Anycast>>>,
    i: usize,
    errors: &Errors<'_>,
) -> Result<Vec<IpAddr>, TomlError> {
    if list.get_ref().is_empty() {
        let message = "must list at least one address".to_owned();
        return Err(errors.at(list, format!("service[{i}].anycast"), message));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.get_ref().len());
    for (k, address) in list.get_ref().iter().enumerate() {
        let address_value = address.get_ref().0;
        if !seen.insert(address_value) {
            let message = format!("{address_value} is listed twice");
            return Err(errors.at(address, format!("service[{i}].anycast[{k}]"), message));
        }
        out.push(address_value);
    }
    Ok(out)
}

fn unique_ports(
    list: &Spanned<Vec<Spanned<Port>>>,
    i: usize,
    errors: &Errors<'_>,
) -> Result<Vec<u16>, TomlError> {
    if list.get_ref().is_empty() {
        let message = "must list at least one port".to_owned();
        return Err(errors.at(list, format!("service[{i}].ports"), message));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.get_ref().len());
    for (k, port) in list.get_ref().iter().enumerate() {
        let Port(value) = *port.get_ref();
        if !seen.insert(value) {
            let message = format!("port {value} is listed twice");
            return Err(errors.at(port, format!("service[{i}].ports[{k}]"), message));
        }
        out.push(value);
    }
    Ok(out)
}
