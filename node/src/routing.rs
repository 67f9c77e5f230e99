//! The routing map: which nodes form the mesh and which anycast services they serve.
//!
//! Read from `/etc/flynode/routing.toml` (or etcd, which carries the same TOML). As with
//! the node config, a [`RoutingMap`] in hand is valid, cross-references included, and
//! every problem is a one-line error naming file, line, column and field.

mod file;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use flynode_keys::PublicKey;
use serde::{Deserialize, Deserializer};

use crate::config::names::label_type;
use crate::config::{NodeId, Region, TomlError, de, toml_error};

pub const DEFAULT_PATH: &str = "/etc/flynode/routing.toml";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingMap {
    pub nodes: BTreeMap<NodeId, Node>,
    pub services: BTreeMap<ServiceId, Service>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: NodeId,
    pub region: Region,
    pub public_key: PublicKey,
    /// Where the node's WireGuard listens.
    pub endpoint: SocketAddr,
    /// Always in fc00::/7; unique in the map.
    pub mesh_address: Ipv6Addr,
    /// Optional private IPv4 address inside the mesh; unique in the map.
    pub mesh_ipv4: Option<std::net::Ipv4Addr>,
}

/// A service's stable number, used as its key in BPF maps; never 0 so that an empty
/// map slot cannot be mistaken for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId(NonZeroU32);

impl ServiceId {
    pub const fn new(id: u32) -> Option<ServiceId> {
        match NonZeroU32::new(id) {
            Some(id) => Some(ServiceId(id)),
            None => None,
        }
    }

    pub const fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = de::int_in(d, "a service id (1..=4294967295)", 1..=i64::from(u32::MAX))?;
        u32::try_from(id)
            .ok()
            .and_then(ServiceId::new)
            .ok_or_else(|| serde::de::Error::custom(format!("service id {id} out of range")))
    }
}

label_type!(
    /// A service's name (`dns`), unique in the map.
    ServiceName,
    "service name",
    extra = b"_",
    rule = "use 1 to 63 lowercase letters, digits, '-' and '_', starting with a letter or digit"
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    pub name: ServiceName,
    /// Non-empty, no duplicates; unicast addresses only.
    pub anycast: Vec<IpAddr>,
    /// Non-empty, no duplicates, never 0.
    pub ports: Vec<u16>,
    /// Deliver datagrams with their PROXY v2 header intact instead of stripping it.
    pub proxy_protocol: bool,
    pub workers: Vec<Worker>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    /// Always names a node in the same map.
    pub node: NodeId,
    /// The container's address and port on that node: one per address family the
    /// service's anycast addresses use (checked), at most one per family.
    pub targets: Vec<SocketAddr>,
    /// 1..=65535.
    pub weight: u32,
}

impl Worker {
    /// The container address for datagrams of `family` (the client's and anycast
    /// address's family).
    pub fn target_for(&self, v6: bool) -> Option<SocketAddr> {
        self.targets.iter().copied().find(|t| t.is_ipv6() == v6)
    }
}

/// One etcd record: the key's value, and what the key says it is.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The full etcd key (names the record in errors).
    pub key: &'a str,
    pub kind: RecordKind,
    /// The key's last segment: the node id or service name the record must carry.
    pub name: &'a str,
    pub text: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Node,
    Service,
}

/// Parsed etcd records by key, with the text they were parsed from.
#[derive(Default)]
pub struct RecordCache {
    parsed: std::collections::HashMap<String, (String, Result<file::RecordEntry, TomlError>)>,
}

/// A map built from records, with what was left out of it.
#[derive(Debug, Default)]
pub struct Assembled {
    pub map: RoutingMap,
    /// etcd key -> why the record was left out.
    pub rejected: BTreeMap<String, String>,
    /// Service name -> the nodes its left-out workers name (not registered: down).
    pub absent_workers: BTreeMap<String, Vec<NodeId>>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{}: cannot read routing map: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Invalid(#[from] TomlError),
}

impl RoutingMap {
    pub fn load(path: &Path) -> Result<RoutingMap, RoutingError> {
        let bytes = std::fs::read(path).map_err(|source| RoutingError::Read {
            path: path.to_owned(),
            source,
        })?;
        RoutingMap::parse(toml_error::utf8(&bytes, path)?, path)
    }

    /// Parses routing map text; `origin` names the file (or etcd key) in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<RoutingMap, RoutingError> {
        let raw: file::RoutingFile = toml_error::from_str(text, origin)?;
        Ok(raw.validate(text, origin)?)
    }

    /// Builds a map from etcd records, each checked on its own and against the records
    /// before it: nodes first, then services, each in the order given (the caller
    /// orders by creation revision, so on a conflict the older record wins). A bad
    /// record is left out and named in [`Assembled::rejected`]; the rest still applies.
    pub fn assemble<'a>(records: impl IntoIterator<Item = Record<'a>>) -> Assembled {
        Self::assemble_cached(records, &mut RecordCache::default())
    }

    /// As [`RoutingMap::assemble`], parsing only the records whose text changed since
    /// the last call with this cache (parsing is most of the cost: ~80 ms for 2200
    /// records in release on this machine; the checks across records always run).
    pub fn assemble_cached<'a>(
        records: impl IntoIterator<Item = Record<'a>>,
        cache: &mut RecordCache,
    ) -> Assembled {
        let mut builder = file::Builder::default();
        let mut rejected = BTreeMap::new();
        let mut absent_workers = BTreeMap::new();
        let (nodes, services): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| r.kind == RecordKind::Node);
        let mut seen = std::collections::HashSet::new();
        for record in nodes.into_iter().chain(services) {
            let origin = Path::new(record.key);
            seen.insert(record.key);
            let parsed = match cache.parsed.get(record.key) {
                Some((text, parsed)) if text == record.text => parsed.clone(),
                _ => {
                    let parsed = file::RecordEntry::parse(
                        record.text,
                        origin,
                        record.kind == RecordKind::Service,
                        record.name,
                    );
                    cache.parsed.insert(
                        record.key.to_owned(),
                        (record.text.to_owned(), parsed.clone()),
                    );
                    parsed
                }
            };
            let added = parsed.and_then(|entry| {
                let mut absent = Vec::new();
                builder.add_record(entry, record.text, origin, &mut absent)?;
                if !absent.is_empty() {
                    absent_workers.insert(record.name.to_owned(), absent);
                }
                Ok(())
            });
            if let Err(e) = added {
                rejected.insert(record.key.to_owned(), e.to_string());
            }
        }
        cache.parsed.retain(|key, _| seen.contains(key.as_str()));
        Assembled {
            map: builder.finish(),
            rejected,
            absent_workers,
        }
    }

    /// Parses a file of `[[service]]` entries (what `flynode services apply` takes),
    /// checking each service as [`RoutingMap::assemble`] would against `existing`
    /// (the map in etcd, without the services the file replaces). Workers on nodes
    /// that are not registered are allowed (they may be down) and named.
    pub fn parse_services(
        text: &str,
        origin: &Path,
        existing: &RoutingMap,
    ) -> Result<(Vec<Service>, Vec<NodeId>), RoutingError> {
        let raw: file::RoutingFile = toml_error::from_str(text, origin)?;
        let entries = raw.into_services(text, origin)?;
        let mut builder = file::Builder::default();
        let mut absent = Vec::new();
        // The existing map is valid as a whole; re-adding it through the builder's
        // records only to seed the uniqueness checks.
        builder.seed(existing);
        let mut names = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            names.push(entry.name().clone());
            builder.add_file_service(entry, i, text, origin, &mut absent)?;
        }
        let map = builder.finish();
        let services = names
            .iter()
            .filter_map(|n| map.services.values().find(|s| &s.name == n).cloned())
            .collect();
        absent.sort();
        absent.dedup();
        Ok((services, absent))
    }

    /// Every (anycast address, port) a service answers on, with its service: the
    /// contents of the XDP services map. Pairs are unique across the map.
    pub fn service_endpoints(&self) -> impl Iterator<Item = (IpAddr, u16, &Service)> {
        self.services.values().flat_map(|service| {
            service.anycast.iter().flat_map(move |&address| {
                service
                    .ports
                    .iter()
                    .map(move |&port| (address, port, service))
            })
        })
    }
}
