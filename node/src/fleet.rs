//! The fleet control plane: the routing map from etcd.
//!
//! # Key layout
//!
//! Under a prefix (`[source.etcd] prefix`, default `/flynode/`):
//!
//! | key                          | value (TOML)                                   | written by                          |
//! |------------------------------|------------------------------------------------|-------------------------------------|
//! | `<prefix>nodes/<node-id>`    | the fields of a `[[node]]` table (id, region, public_key, endpoint, mesh_address, mesh_ipv4) | the node itself, under a lease it keeps alive |
//! | `<prefix>services/<name>`    | the fields of a `[[service]]` table, with its `[[worker]]`s | `flynode services apply`            |
//!
//! A node's record carries its WireGuard public key: `flynode keys rotate` rewrites it,
//! and every peer moves to the new key through the zero-loss rotation of the tunnel.
//! The record lives under the node's lease, so a node that dies disappears from every
//! map when the lease expires; one that stops cleanly revokes it at once.
//!
//! Every record is checked on its own and against the others ([`RoutingMap::assemble`]):
//! a bad record is left out (logged once, listed in `flynode status`) and the rest
//! applies. Workers on nodes without a record (down) are left out of their service.

pub mod services;
pub mod source;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use flynode_keys::PublicKey;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::routing::{Assembled, Record, RecordCache, RecordKind, RoutingMap, Service};

/// Where the records live under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` starts with '/'; a missing final '/' is added.
    pub fn new(prefix: &str) -> Layout {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout { prefix }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn services(&self) -> String {
        format!("{}services/", self.prefix)
    }

    pub fn node_key(&self, id: &str) -> String {
        format!("{}nodes/{id}", self.prefix)
    }

    pub fn service_key(&self, name: &str) -> String {
        format!("{}services/{name}", self.prefix)
    }

    /// What a key under the prefix holds; `None` for keys outside the layout.
    pub fn classify<'a>(&self, key: &'a str) -> Option<(RecordKind, &'a str)> {
        let rest = key.strip_prefix(&self.prefix)?;
        let (kind, name) = if let Some(name) = rest.strip_prefix("nodes/") {
            (RecordKind::Node, name)
        } else {
            (RecordKind::Service, rest.strip_prefix("services/")?)
        };
        (!name.is_empty() && !name.contains('/')).then_some((kind, name))
    }
}

/// One key's value and when it was created (older records win conflicts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kv {
    pub value: String,
    pub create_revision: i64,
}

impl Kv {
    /// An etcd key-value as (key, [`Kv`]); a value that is not UTF-8 keeps its valid
    /// parts and fails validation with the rest of the record.
    pub fn of(kv: &etcd_client::KeyValue) -> (String, Kv) {
        (
            String::from_utf8_lossy(kv.key()).into_owned(),
            Kv {
                value: String::from_utf8_lossy(kv.value()).into_owned(),
                create_revision: kv.create_revision(),
            },
        )
    }
}

/// Reads everything under the layout's prefix, at one revision.
pub async fn read_view(client: &mut etcd_client::Client, layout: &Layout) -> anyhow::Result<View> {
    let prefix = layout.prefix();
    let response = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .with_context(|| format!("reading {prefix} from etcd"))?;
    Ok(View {
        revision: response.header().map_or(0, |h| h.revision()),
        records: response.kvs().iter().map(Kv::of).collect(),
    })
}

/// Everything under the prefix at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub revision: i64,
    pub records: BTreeMap<String, Kv>,
}

impl View {
    /// The routing map these records make, with what was left out.
    pub fn assemble(&self, layout: &Layout) -> Assembled {
        self.assemble_cached(layout, &mut RecordCache::default())
    }

    /// As [`View::assemble`], reusing the records parsed for an earlier view.
    pub fn assemble_cached(&self, layout: &Layout, cache: &mut RecordCache) -> Assembled {
        let mut unknown = BTreeMap::new();
        let mut records: Vec<(i64, Record<'_>)> = Vec::with_capacity(self.records.len());
        for (key, kv) in &self.records {
            match layout.classify(key) {
                Some((kind, name)) => records.push((
                    kv.create_revision,
                    Record {
                        key,
                        kind,
                        name,
                        text: &kv.value,
                    },
                )),
                None => {
                    unknown.insert(
                        key.clone(),
                        format!(
                            "{key}: not a flynode record (expected {0}nodes/<id> or {0}services/<name>)",
                            layout.prefix
                        ),
                    );
                }
            }
        }
        records.sort_by_key(|(created, r)| (*created, r.key));
        let mut assembled = RoutingMap::assemble_cached(records.into_iter().map(|(_, r)| r), cache);
        assembled.rejected.extend(unknown);
        assembled
    }
}

/// A node record as published: the fields of a `[[node]]` table.
#[derive(Serialize)]
struct NodeRecord<'a> {
    id: &'a str,
    region: &'a str,
    public_key: String,
    endpoint: String,
    mesh_address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_ipv4: Option<String>,
}

/// This node's record, with `public_key` (the current key) and its endpoint.
pub fn node_record(config: &Config, public_key: &PublicKey, endpoint: SocketAddr) -> String {
    toml::to_string(&NodeRecord {
        id: config.node_id.as_str(),
        region: config.region.as_str(),
        public_key: public_key.to_string(),
        endpoint: endpoint.to_string(),
        mesh_address: config.mesh_address.to_string(),
        mesh_ipv4: config.wireguard.mesh_ipv4.map(|a| a.to_string()),
    })
    .expect("a node record always serializes")
}

#[derive(Serialize)]
struct ServiceRecord<'a> {
    id: u32,
    name: &'a str,
    anycast: Vec<String>,
    ports: &'a [u16],
    proxy_protocol: bool,
    worker: Vec<WorkerRecord<'a>>,
}

#[derive(Serialize)]
struct WorkerRecord<'a> {
    node: &'a str,
    target: Vec<String>,
    weight: u32,
}

/// A service as stored in etcd: the fields of a `[[service]]` table.
pub fn service_record(service: &Service) -> String {
    toml::to_string(&ServiceRecord {
        id: service.id.get(),
        name: service.name.as_str(),
        anycast: service.anycast.iter().map(ToString::to_string).collect(),
        ports: &service.ports,
        proxy_protocol: service.proxy_protocol,
        worker: service
            .workers
            .iter()
            .map(|w| WorkerRecord {
                node: w.node.as_str(),
                target: w.targets.iter().map(ToString::to_string).collect(),
                weight: w.weight,
            })
            .collect(),
    })
    .expect("a service record always serializes")
}

/// The WireGuard endpoint this node publishes: `[wireguard] endpoint`, else the XDP
/// interface's first global address (IPv4 before IPv6) with the listen port.
pub fn advertised_endpoint(config: &Config) -> anyhow::Result<SocketAddr> {
    if let Some(endpoint) = config.wireguard.endpoint {
        return Ok(endpoint);
    }
    let interface = &config.xdp.interface;
    let mut found: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing interface addresses")?
        .filter(|a| &a.interface_name == interface)
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .collect();
    found.sort_by_key(|ip| ip.is_ipv6());
    let ip = found.first().copied().with_context(|| {
        format!(
            "interface `{interface}` has no global address to publish as this node's WireGuard endpoint; set [wireguard] endpoint"
        )
    })?;
    Ok(SocketAddr::new(ip, config.wireguard.listen_port))
}

#[cfg(test)]
mod tests;
