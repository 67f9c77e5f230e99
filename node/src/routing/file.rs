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
use crate::config::toml_error::{self, quoted};
use crate::config::{Location, NodeId, Region, TomlError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RoutingFile {
    #[serde(default)]
    node: Vec<NodeEntry>,
    #[serde(default)]
    service: Vec<ServiceEntry>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeEntry {
    id: Spanned<NodeId>,
    region: Region,
    public_key: Spanned<Key>,
    #[serde(deserialize_with = "de::socket_addr")]
    endpoint: SocketAddr,
    mesh_address: Spanned<UlaAddr>,
    #[serde(default)]
    mesh_ipv4: Option<Spanned<MeshV4>>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceEntry {
    id: Spanned<ServiceId>,
    name: Spanned<ServiceName>,
    anycast: Spanned<Vec<Spanned<Anycast>>>,
    ports: Spanned<Vec<Spanned<Port>>>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    worker: Vec<WorkerEntry>,
}

#[derive(Clone, Deserialize)]
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
#[derive(Clone)]
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

#[derive(Clone, PartialEq, Eq, Hash)]
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
#[derive(Clone)]
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

/// Builds located errors for one text: the whole routing file, or one etcd record.
pub(super) struct Errors<'a> {
    text: &'a str,
    origin: &'a Path,
    /// The text is one record (an etcd key): other values are placed by their record's
    /// name instead of a line of this text.
    record: bool,
}

/// Where a value was first defined, kept for the "already used by … (<place>)" message
/// of a later duplicate. Only an error renders it: a line number costs a scan of the
/// text up to it, and computing one for every node of a 5,000-node file made parsing
/// quadratic (87% of `check-config`'s time).
#[derive(Debug, Clone)]
pub(super) enum Place {
    /// A byte offset in the routing file being parsed (rendered as its line).
    Offset(usize),
    /// Named: an etcd key, or "etcd" for a map the builder was seeded with.
    Named(std::sync::Arc<str>),
}

impl Errors<'_> {
    fn at<T>(&self, value: &Spanned<T>, field: String, message: String) -> TomlError {
        TomlError::at(self.origin, self.text, value.span(), field, message)
    }

    /// Where a value is: its offset in a file, the etcd key for a record.
    fn place<T>(&self, value: &Spanned<T>) -> Place {
        if self.record {
            Place::Named(self.origin.display().to_string().into())
        } else {
            Place::Offset(value.span().start)
        }
    }

    /// `line 12` in a file, the etcd key for a record. Offsets are always of this
    /// text: a builder takes offsets from one file only (seeded entries are named).
    fn describe(&self, place: &Place) -> String {
        match place {
            Place::Offset(offset) => {
                format!("line {}", Location::of_offset(self.text, *offset).line)
            }
            Place::Named(name) => name.to_string(),
        }
    }
}

impl RoutingFile {
    pub(super) fn validate(self, text: &str, origin: &Path) -> Result<RoutingMap, TomlError> {
        let errors = Errors {
            text,
            origin,
            record: false,
        };
        let mut builder = Builder::default();
        for (i, entry) in self.node.into_iter().enumerate() {
            builder.add_node(entry, &format!("node[{i}]."), &errors)?;
        }
        for (i, entry) in self.service.into_iter().enumerate() {
            builder.add_service(entry, &format!("service[{i}]."), &errors, None)?;
        }
        Ok(builder.finish())
    }

    /// A routing file that must hold services only (`flynode services apply`).
    pub(super) fn into_services(
        self,
        text: &str,
        origin: &Path,
    ) -> Result<Vec<ServiceEntry>, TomlError> {
        if !self.node.is_empty() {
            return Err(TomlError::at(
                origin,
                text,
                0..0,
                "node",
                "nodes register themselves in etcd; this file may only hold [[service]] entries",
            ));
        }
        Ok(self.service)
    }
}

impl ServiceEntry {
    pub(super) fn name(&self) -> &ServiceName {
        self.name.get_ref()
    }
}

/// One etcd record: a node table or a service table, as its key's value.
#[derive(Clone)]
pub(super) enum RecordEntry {
    Node(NodeEntry),
    Service(ServiceEntry),
}

impl RecordEntry {
    /// Parses one record's TOML; `name` is the key's last segment, which must equal
    /// the record's `id` (node) or `name` (service).
    pub(super) fn parse(
        text: &str,
        origin: &Path,
        service: bool,
        name: &str,
    ) -> Result<RecordEntry, TomlError> {
        let mismatch = |span, what: &str, value: &str| {
            TomlError::at(
                origin,
                text,
                span,
                what,
                format!("{}, but the key names `{name}`", quoted(value)),
            )
        };
        if service {
            let entry: ServiceEntry = toml_error::from_str(text, origin)?;
            if entry.name.get_ref().as_str() != name {
                return Err(mismatch(
                    entry.name.span(),
                    "name",
                    entry.name.get_ref().as_str(),
                ));
            }
            Ok(RecordEntry::Service(entry))
        } else {
            let entry: NodeEntry = toml_error::from_str(text, origin)?;
            if entry.id.get_ref().as_str() != name {
                return Err(mismatch(entry.id.span(), "id", entry.id.get_ref().as_str()));
            }
            Ok(RecordEntry::Node(entry))
        }
    }
}

/// Builds a [`RoutingMap`] one entry at a time, checking each entry against the ones
/// already in. An entry is checked completely before anything of it is inserted, so a
/// rejected entry leaves the builder as it was (the etcd source skips bad records and
/// keeps the rest).
#[derive(Default)]
pub(super) struct Builder {
    nodes: BTreeMap<NodeId, Node>,
    services: BTreeMap<ServiceId, Service>,
    // Value -> (owner, place) of the first entry that used it.
    node_ids: HashMap<NodeId, Place>,
    mesh: HashMap<UlaAddr, (NodeId, Place)>,
    mesh4: HashMap<std::net::Ipv4Addr, (NodeId, Place)>,
    keys: HashMap<PublicKey, (NodeId, Place)>,
    service_ids: HashMap<ServiceId, (ServiceName, Place)>,
    names: HashMap<ServiceName, (ServiceId, Place)>,
    served: HashMap<(IpAddr, u16), (ServiceName, Place)>,
    /// Keep workers on absent nodes in their service (still named in `absent`): for
    /// a services file written back to etcd, where they count once the node is up.
    keep_absent: bool,
}

impl Builder {
    pub(super) fn finish(self) -> RoutingMap {
        RoutingMap {
            nodes: self.nodes,
            services: self.services,
        }
    }

    /// Starts from a valid map, so that entries added next are checked against it.
    pub(super) fn seed(&mut self, map: &RoutingMap) {
        let etcd: std::sync::Arc<str> = "etcd".into();
        let place = |_: &str| Place::Named(etcd.clone());
        for (id, node) in &map.nodes {
            self.node_ids.insert(id.clone(), place("node"));
            self.mesh
                .insert(UlaAddr(node.mesh_address), (id.clone(), place("node")));
            if let Some(v4) = node.mesh_ipv4 {
                self.mesh4.insert(v4, (id.clone(), place("node")));
            }
            self.keys
                .insert(node.public_key, (id.clone(), place("node")));
        }
        for (id, service) in &map.services {
            let where_ = place("service");
            self.service_ids
                .insert(*id, (service.name.clone(), where_.clone()));
            self.names
                .insert(service.name.clone(), (*id, where_.clone()));
            for (address, port, _) in map.service_endpoints().filter(|e| e.2.id == *id) {
                self.served
                    .insert((address, port), (service.name.clone(), where_.clone()));
            }
        }
        self.nodes = map.nodes.clone();
        self.services = map.services.clone();
    }

    /// Adds service `i` of a services file, allowing workers on absent nodes.
    pub(super) fn add_file_service(
        &mut self,
        entry: ServiceEntry,
        i: usize,
        text: &str,
        origin: &Path,
        absent: &mut Vec<NodeId>,
    ) -> Result<(), TomlError> {
        let errors = Errors {
            text,
            origin,
            record: false,
        };
        self.keep_absent = true;
        self.add_service(entry, &format!("service[{i}]."), &errors, Some(absent))
    }

    /// Adds a record (see [`RecordEntry`]); workers on nodes that are not in the map
    /// are left out and named in `absent` (in etcd a node that is down has no record).
    pub(super) fn add_record(
        &mut self,
        entry: RecordEntry,
        text: &str,
        origin: &Path,
        absent: &mut Vec<NodeId>,
    ) -> Result<(), TomlError> {
        let errors = Errors {
            text,
            origin,
            record: true,
        };
        match entry {
            RecordEntry::Node(entry) => self.add_node(entry, "", &errors),
            RecordEntry::Service(entry) => self.add_service(entry, "", &errors, Some(absent)),
        }
    }

    fn add_node(
        &mut self,
        entry: NodeEntry,
        at: &str,
        errors: &Errors<'_>,
    ) -> Result<(), TomlError> {
        let id = entry.id.get_ref().clone();
        if let Some(place) = self.node_ids.get(&id) {
            let place = errors.describe(place);
            let message = format!("duplicate node id `{id}` (first defined at {place})");
            return Err(errors.at(&entry.id, format!("{at}id"), message));
        }
        let address = *entry.mesh_address.get_ref();
        if let Some((other, place)) = self.mesh.get(&address) {
            let place = errors.describe(place);
            let message = format!(
                "{} is already the mesh address of node `{other}` ({place})",
                address.0
            );
            return Err(errors.at(&entry.mesh_address, format!("{at}mesh_address"), message));
        }
        if let Some(v4) = &entry.mesh_ipv4 {
            let value = v4.get_ref().0;
            if let Some((other, place)) = self.mesh4.get(&value) {
                let place = errors.describe(place);
                let message =
                    format!("{value} is already the mesh IPv4 address of node `{other}` ({place})");
                return Err(errors.at(v4, format!("{at}mesh_ipv4"), message));
            }
        }
        let key = entry.public_key.get_ref().0;
        if let Some((other, place)) = self.keys.get(&key) {
            let place = errors.describe(place);
            let message = format!("already the public key of node `{other}` ({place})");
            return Err(errors.at(&entry.public_key, format!("{at}public_key"), message));
        }

        self.node_ids.insert(id.clone(), errors.place(&entry.id));
        self.mesh
            .insert(address, (id.clone(), errors.place(&entry.mesh_address)));
        if let Some(v4) = &entry.mesh_ipv4 {
            self.mesh4
                .insert(v4.get_ref().0, (id.clone(), errors.place(v4)));
        }
        self.keys
            .insert(key, (id.clone(), errors.place(&entry.public_key)));
        let node = Node {
            id: id.clone(),
            region: entry.region,
            public_key: key,
            endpoint: entry.endpoint,
            mesh_address: address.0,
            mesh_ipv4: entry.mesh_ipv4.map(|a| a.get_ref().0),
        };
        self.nodes.insert(id, node);
        Ok(())
    }

    /// `absent`: `None` makes a worker on an unknown node an error (a file must be
    /// complete); `Some` leaves such workers out and names their nodes.
    pub(super) fn add_service(
        &mut self,
        entry: ServiceEntry,
        at: &str,
        errors: &Errors<'_>,
        absent: Option<&mut Vec<NodeId>>,
    ) -> Result<(), TomlError> {
        let id = *entry.id.get_ref();
        let name = entry.name.get_ref().clone();
        if let Some((other, place)) = self.service_ids.get(&id) {
            let place = errors.describe(place);
            let message =
                format!("duplicate service id {id} (already used by service `{other}` at {place})");
            return Err(errors.at(&entry.id, format!("{at}id"), message));
        }
        if let Some((other, place)) = self.names.get(&name) {
            let place = errors.describe(place);
            let message = format!(
                "duplicate service name `{name}` (already used by service id {other} at {place})"
            );
            return Err(errors.at(&entry.name, format!("{at}name"), message));
        }

        let anycast = unique_addresses(&entry.anycast, at, errors)?;
        let ports = unique_ports(&entry.ports, at, errors)?;
        for (k, address) in entry.anycast.get_ref().iter().enumerate() {
            for &port in &ports {
                let pair = (address.get_ref().0, port);
                if let Some((other, place)) = self.served.get(&pair) {
                    let place = errors.describe(place);
                    let message = format!(
                        "{} port {port} of service `{name}` is already served by service `{other}` ({place})",
                        pair.0
                    );
                    return Err(errors.at(address, format!("{at}anycast[{k}]"), message));
                }
            }
        }

        let mut workers = Vec::with_capacity(entry.worker.len());
        let mut left_out = Vec::new();
        for (w, worker) in entry.worker.into_iter().enumerate() {
            let node = worker.node.get_ref();
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
                        format!("{at}worker[{w}].target"),
                        message,
                    ));
                }
            }
            if !self.nodes.contains_key(node) {
                if absent.is_none() {
                    let message = format!("no [[node]] has id `{node}`");
                    return Err(errors.at(&worker.node, format!("{at}worker[{w}].node"), message));
                }
                left_out.push(node.clone());
                if !self.keep_absent {
                    continue;
                }
            }
            workers.push(Worker {
                node: node.clone(),
                targets: worker.target.into_inner().0,
                weight: worker.weight,
            });
        }
        if let Some(absent) = absent {
            absent.extend(left_out);
        }

        self.service_ids
            .insert(id, (name.clone(), errors.place(&entry.id)));
        self.names
            .insert(name.clone(), (id, errors.place(&entry.name)));
        for &address in &anycast {
            for &port in &ports {
                self.served
                    .insert((address, port), (name.clone(), errors.place(&entry.id)));
            }
        }
        let service = Service {
            id,
            name,
            anycast,
            ports,
            proxy_protocol: entry.proxy_protocol,
            workers,
        };
        self.services.insert(id, service);
        Ok(())
    }
}

fn unique_addresses(
    list: &Spanned<Vec<Spanned<Anycast>>>,
    at: &str,
    errors: &Errors<'_>,
) -> Result<Vec<IpAddr>, TomlError> {
    if list.get_ref().is_empty() {
        let message = "must list at least one address".to_owned();
        return Err(errors.at(list, format!("{at}anycast"), message));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.get_ref().len());
    for (k, address) in list.get_ref().iter().enumerate() {
        let address_value = address.get_ref().0;
        if !seen.insert(address_value) {
            let message = format!("{address_value} is listed twice");
            return Err(errors.at(address, format!("{at}anycast[{k}]"), message));
        }
        out.push(address_value);
    }
    Ok(out)
}

fn unique_ports(
    list: &Spanned<Vec<Spanned<Port>>>,
    at: &str,
    errors: &Errors<'_>,
) -> Result<Vec<u16>, TomlError> {
    if list.get_ref().is_empty() {
        let message = "must list at least one port".to_owned();
        return Err(errors.at(list, format!("{at}ports"), message));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.get_ref().len());
    for (k, port) in list.get_ref().iter().enumerate() {
        let Port(value) = *port.get_ref();
        if !seen.insert(value) {
            let message = format!("port {value} is listed twice");
            return Err(errors.at(port, format!("{at}ports[{k}]"), message));
        }
        out.push(value);
    }
    Ok(out)
}
