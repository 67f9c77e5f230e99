//! The forwarding engine: every node is an edge and a worker at once.
//!
//! - **Edge** ([`Forwarding::edge`], on the ingress threads): a service datagram from a
//!   client → the flow's worker (flow table, else weighted rendezvous hashing over the
//!   service's live workers) → PROXY v2 header + datagram in an inner IPv6/UDP packet to
//!   the worker's mesh address and forwarding port → encrypted to that peer. When the
//!   worker is this node, straight to delivery.
//! - **Worker** ([`Forwarder::inbound`], on the mesh's receive threads): unwrap → the
//!   service's local container → an IP/UDP packet `client → container` written into the
//!   TUN, so the kernel delivers it as if the client had sent it. The flow
//!   `(container, client)` remembers the edge and the anycast address.
//! - **Replies** ([`Forwarder::unrouted`], on `mesh-tx`): a container datagram to a client
//!   (routed into the TUN by the policy rules of [`super::host`]) → its worker flow →
//!   PROXY v2 (anycast → client, marked as a reply) → the edge that received the flow,
//!   which checks its own flow and sends the payload from the anycast address and port
//!   through the service's socket. No flow, no reply: counted and dropped, never sent
//!   with an internal source.
//!
//! Direction on the wire: a request carries the standard header only (so it can be
//! delivered intact to applications that parse PROXY v2); a reply carries one custom TLV
//! ([`TLV_REPLY`], in the range the spec reserves for applications).
//!
//! Sizes: an inner packet must fit the TUN MTU. The largest client payload is
//! `mtu - 48 - 28` (IPv4) or `mtu - 48 - 52` (IPv6); a larger datagram is dropped,
//! counted (`edge_oversize`), and answered with ICMP "fragmentation needed" / ICMPv6
//! "packet too big" from the anycast address (rate-limited), which makes the client's
//! stack lower its path MTU. Oversized replies are counted (`reply_oversize`) and
//! dropped: the container chose the size, the client never asked for it.
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use flynode_tunnel::core::{Core, Peer};
use flynode_tunnel::driver::{Forwarder, Port, TunBuilt};
use flynode_tunnel::io::udp::UdpSocket;
use serde::{Deserialize, Serialize};

pub use super::counters::{
    ForwardCounters, Hop, ServiceCounters, ServiceDrop, ServiceForwardStatus,
};
use super::flows::{Endpoint, FlowCounters, FlowTable, Tick, flow_key_octets};
use super::icmp::Icmp;
use super::packet::{self, IPV6_HEADER, UDP_HEADER};
use super::{hash, proxy};
use crate::config::NodeId;
use crate::routing::RoutingMap;

/// The custom TLV that marks a reply (worker → edge). Value: one byte, `R`.
pub const TLV_REPLY: u8 = proxy::TLV_CUSTOM_MIN;
const REPLY: &[u8] = b"R";
/// The reply TLV on the wire: type, 2-byte length, value.
const REPLY_TLV_LEN: usize = 3 + REPLY.len();
/// Inner packets are IPv6/UDP between mesh addresses.
const INNER_OVERHEAD: usize = IPV6_HEADER + UDP_HEADER;

/// The service sockets, by (anycast address, port): the edge sends replies from them.
/// Kept up to date by the ingress ([`crate::ingress::socket`]).
pub type ServiceSockets = Arc<ArcSwap<HashMap<SocketAddr, Arc<UdpSocket>>>>;

/// What the engine needs to know about this node.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub node: NodeId,
    pub mesh_address: Ipv6Addr,
    pub forward_port: u16,
    /// The TUN MTU: the largest inner packet.
    pub mtu: u16,
    pub edge_flows: usize,
    pub worker_flows: usize,
    pub idle_timeout: Duration,
    /// A peer silent for longer is not a healthy worker.
    pub peer_timeout: Duration,
}

/// Flow value at the edge: the worker's mesh address.
type EdgeFlow = [u8; 16];

/// Flow value at the worker: the edge's mesh address and the anycast endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WorkerFlow {
    edge: [u8; 16],
    anycast: Endpoint,
}

/// One worker of a service, resolved against the mesh.
struct WorkerRef {
    id: Arc<str>,
    mesh: Ipv6Addr,
    weight: u32,
    /// `None`: this node.
    peer: Option<Arc<Peer>>,
}

struct ServiceRoute {
    name: Arc<str>,
    proxy_protocol: bool,
    workers: Vec<WorkerRef>,
    /// This node's containers for the service, if it is one of its workers.
    local_v4: Option<SocketAddr>,
    local_v6: Option<SocketAddr>,
    /// Carried over from the previous table for the same service id.
    counters: Arc<ServiceCounters>,
}

impl ServiceRoute {
    fn local(&self, v6: bool) -> Option<SocketAddr> {
        if v6 { self.local_v6 } else { self.local_v4 }
    }
}

/// The table's keys come from the routing map, never from a packet, so a fast
/// non-cryptographic hash cannot be steered into collisions; every datagram does one or
/// two lookups here.
type MapHasher = foldhash::fast::RandomState;

#[derive(Default)]
struct Table {
    services: HashMap<u32, ServiceRoute, MapHasher>,
    /// (anycast address, port) → service id.
    endpoints: HashMap<SocketAddr, u32, MapHasher>,
}

impl Table {
    /// The service answering on `anycast` (address, port).
    fn service_at(&self, anycast: &SocketAddr) -> Option<&ServiceRoute> {
        self.endpoints
            .get(anycast)
            .and_then(|id| self.services.get(id))
    }
}

/// Flow tables in `flynode status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowStatus {
    pub active: usize,
    pub capacity: usize,
    pub inserted: u64,
    pub evicted: u64,
    pub expired: u64,
    pub invalidated: u64,
}

impl FlowStatus {
    fn of<V: Copy>(t: &FlowTable<V>) -> FlowStatus {
        let FlowCounters {
            inserted,
            evicted,
            expired,
            invalidated,
        } = t.counters();
        FlowStatus {
            active: t.len(),
            capacity: t.capacity(),
            inserted,
            evicted,
            expired,
            invalidated,
        }
    }
}

/// One worker of a service as `flynode status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerStatus {
    pub node: String,
    pub weight: u32,
    pub local: bool,
    pub healthy: bool,
}

/// The forwarding layer in `flynode status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardStatus {
    pub max_payload_v4: usize,
    pub max_payload_v6: usize,
    pub edge_flows: FlowStatus,
    pub worker_flows: FlowStatus,
    /// Service id → its workers.
    pub workers: std::collections::BTreeMap<String, Vec<WorkerStatus>>,
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Service name → its share of the counters.
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, ServiceForwardStatus>,
}

/// What applying a routing map changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyReport {
    pub edge_flows_invalidated: usize,
    pub worker_flows_invalidated: usize,
}

pub struct Forwarding {
    config: ForwardConfig,
    mesh: SocketAddr,
    table: ArcSwap<Table>,
    /// Local targets judged out (see [`super::targets`]); empty nearly always.
    refused: ArcSwap<HashSet<SocketAddr, MapHasher>>,
    /// `refused` is not empty: the packet path reads this flag, not the set.
    any_refused: AtomicBool,
    edge: FlowTable<EdgeFlow>,
    worker: FlowTable<WorkerFlow>,
    sockets: ServiceSockets,
    icmp: Icmp,
    pub counters: ForwardCounters,
}

thread_local! {
    /// Where inner packets are built before encryption (one per thread).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65536 + 256]);
}

/// Room for a PROXY v2 header with our TLV.
const PROXY_BUF: usize = 64;

impl Forwarding {
    pub fn new(config: ForwardConfig, sockets: ServiceSockets) -> Forwarding {
        Forwarding {
            mesh: SocketAddr::new(IpAddr::V6(config.mesh_address), config.forward_port),
            edge: FlowTable::new(config.edge_flows, config.idle_timeout),
            worker: FlowTable::new(config.worker_flows, config.idle_timeout),
            table: ArcSwap::from_pointee(Table::default()),
            refused: ArcSwap::from_pointee(HashSet::default()),
            any_refused: AtomicBool::new(false),
            sockets,
            icmp: Icmp::new(),
            counters: ForwardCounters::default(),
            config,
        }
    }

    /// The largest client payload that fits an inner packet, per family.
    pub fn max_payload(&self, v6: bool) -> usize {
        usize::from(self.config.mtu).saturating_sub(INNER_OVERHEAD + proxy::udp_header_len(v6))
    }

    /// Follows a new routing map (after the mesh's peers were applied, so workers
    /// resolve to current peers). Flows pinned to a worker that left their service, and
    /// worker flows to a container this node no longer serves, are forgotten; every
    /// other flow stays where it is.
    pub fn apply(&self, routing: &RoutingMap, core: &Core) -> ApplyReport {
        let previous = self.table.load();
        let mut table = Table::default();
        for service in routing.services.values() {
            let mut route = ServiceRoute {
                name: Arc::from(service.name.as_str()),
                counters: previous
                    .services
                    .get(&service.id.get())
                    .map(|r| Arc::clone(&r.counters))
                    .unwrap_or_default(),
                proxy_protocol: service.proxy_protocol,
                workers: Vec::with_capacity(service.workers.len()),
                local_v4: None,
                local_v6: None,
            };
            for worker in &service.workers {
                let Some(node) = routing.nodes.get(&worker.node) else {
                    continue;
                };
                let local = worker.node == self.config.node;
                if local {
                    route.local_v4 = worker.target_for(false);
                    route.local_v6 = worker.target_for(true);
                }
                let peer = if local {
                    None
                } else {
                    match core.peer(worker.node.as_str()) {
                        Some(p) => Some(p),
                        // Not a peer (yet): cannot be chosen.
                        None => continue,
                    }
                };
                route.workers.push(WorkerRef {
                    id: Arc::from(worker.node.as_str()),
                    mesh: node.mesh_address,
                    weight: worker.weight,
                    peer,
                });
            }
            for (address, port, s) in routing.service_endpoints() {
                if s.id == service.id {
                    table
                        .endpoints
                        .insert(SocketAddr::new(address, port), service.id.get());
                }
            }
            table.services.insert(service.id.get(), route);
        }
        let edge_flows_invalidated = self.edge.retain(|(_, anycast), worker| {
            table
                .endpoints
                .get(&anycast.socket_addr())
                .and_then(|id| table.services.get(id))
                .is_some_and(|s| s.workers.iter().any(|w| w.mesh.octets() == *worker))
        });
        let served: std::collections::HashSet<SocketAddr> = table
            .services
            .values()
            .flat_map(|s| [s.local_v4, s.local_v6])
            .flatten()
            .collect();
        let worker_flows_invalidated = self
            .worker
            .retain(|(container, _), _| served.contains(&container.socket_addr()));
        self.table.store(Arc::new(table));
        ApplyReport {
            edge_flows_invalidated,
            worker_flows_invalidated,
        }
    }

    /// The container endpoints this node serves (for the host's reply rules).
    pub fn local_targets(&self) -> Vec<SocketAddr> {
        let table = self.table.load();
        let mut out: Vec<SocketAddr> = table
            .services
            .values()
            .flat_map(|s| [s.local_v4, s.local_v6])
            .flatten()
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Replaces the set of local targets this worker must not deliver to (see
    /// [`super::targets`]): datagrams for them are dropped as `worker_target_refused`.
    pub fn refuse_targets(&self, refused: impl IntoIterator<Item = SocketAddr>) {
        let set: HashSet<SocketAddr, MapHasher> = refused.into_iter().collect();
        self.any_refused.store(!set.is_empty(), Relaxed);
        self.refused.store(Arc::new(set));
    }

    /// Forgets idle flows; called about once a second.
    pub fn expire(&self) -> usize {
        let now = Tick::now();
        self.edge.expire(now) + self.worker.expire(now)
    }

    pub fn status(&self, core: &Core) -> ForwardStatus {
        let table = self.table.load();
        let workers = table
            .services
            .iter()
            .map(|(id, s)| {
                let list = s
                    .workers
                    .iter()
                    .map(|w| WorkerStatus {
                        node: w.id.to_string(),
                        weight: w.weight,
                        local: w.peer.is_none(),
                        healthy: self.alive(w, core),
                    })
                    .collect();
                (id.to_string(), list)
            })
            .collect();
        ForwardStatus {
            max_payload_v4: self.max_payload(false),
            max_payload_v6: self.max_payload(true),
            edge_flows: FlowStatus::of(&self.edge),
            worker_flows: FlowStatus::of(&self.worker),
            workers,
            counters: self.counters.snapshot(),
            services: table
                .services
                .iter()
                .map(|(id, s)| (s.name.to_string(), s.counters.status(*id)))
                .collect(),
        }
    }

    fn alive(&self, w: &WorkerRef, core: &Core) -> bool {
        match &w.peer {
            None => true,
            Some(p) => core.peer_alive(p, self.config.peer_timeout),
        }
    }

    /// Edge: a datagram for service `service` from `client` to `anycast`.
    pub fn edge(
        &self,
        service: u32,
        client: SocketAddr,
        anycast: SocketAddr,
        payload: &[u8],
        port: &mut Port<'_>,
        now: Tick,
    ) {
        let c = &self.counters;
        let table = self.table.load();
        let Some(route) = table.services.get(&service) else {
            c.edge_unknown_service.fetch_add(1, Relaxed);
            return;
        };
        let v6 = anycast.is_ipv6();
        if payload.len() > self.max_payload(v6) {
            c.edge_oversize.fetch_add(1, Relaxed);
            route.counters.count_drop(ServiceDrop::EdgeOversize);
            self.too_big(client, anycast, payload);
            return;
        }
        let key = (Endpoint::new(client), Endpoint::new(anycast));
        let core = port.core();
        // When no worker looks alive, silence may be our own doing: under overload the
        // edge's receive ring drops the workers' keepalives too. Dropping everything
        // would turn overload into total loss, so the flow keeps (or hashes to) a worker
        // with its session as it is, counted as `edge_no_live_worker`.
        let any_alive = || route.workers.iter().any(|w| self.alive(w, core));
        let pinned = self.edge.get(&key, now).and_then(|mesh| {
            route
                .workers
                .iter()
                .find(|w| w.mesh.octets() == mesh && (self.alive(w, core) || !any_alive()))
        });
        let worker = match pinned {
            Some(w) => w,
            None => {
                let flow = flow_key_octets(&key);
                let live = route.workers.iter().filter(|w| self.alive(w, core));
                let chosen =
                    hash::choose(&flow, live, |w| w.id.as_bytes(), |w| w.weight).or_else(|| {
                        let w = hash::choose(
                            &flow,
                            route.workers.iter(),
                            |w| w.id.as_bytes(),
                            |w| w.weight,
                        );
                        if w.is_some() {
                            c.edge_no_live_worker.fetch_add(1, Relaxed);
                            route.counters.no_live_worker.fetch_add(1, Relaxed);
                        }
                        w
                    });
                let Some(w) = chosen else {
                    c.edge_no_worker.fetch_add(1, Relaxed);
                    route.counters.count_drop(ServiceDrop::EdgeNoWorker);
                    return;
                };
                self.edge.insert(key, w.mesh.octets(), now);
                w
            }
        };
        let mut header = [0u8; PROXY_BUF];
        let Ok(hlen) = proxy::encode_udp(client, anycast, &[], &mut header) else {
            return;
        };
        let Some(peer) = &worker.peer else {
            c.edge_local.fetch_add(1, Relaxed);
            route.counters.count_hop(Hop::EdgeToLocalWorker);
            self.deliver(
                route,
                client,
                anycast,
                &header[..hlen],
                payload,
                self.config.mesh_address.octets(),
                port,
                now,
            );
            return;
        };
        let dst = SocketAddr::new(IpAddr::V6(worker.mesh), self.config.forward_port);
        let sent = SCRATCH.with_borrow_mut(|buf| {
            let len = packet::write_udp(buf, self.mesh, dst, &[&header[..hlen], payload])?;
            Some(port.to_peer(peer, &buf[..len]))
        });
        match sent {
            Some(Ok(())) => {
                c.edge_forwarded.fetch_add(1, Relaxed);
                route.counters.count_hop(Hop::EdgeToWorker);
            }
            _ => {
                c.edge_tunnel_drops.fetch_add(1, Relaxed);
                route.counters.count_drop(ServiceDrop::EdgeTunnelDrops);
            }
        }
    }

    /// Worker: writes `client → container` into the TUN and remembers the flow.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &self,
        route: &ServiceRoute,
        client: SocketAddr,
        anycast: SocketAddr,
        header: &[u8],
        payload: &[u8],
        edge: [u8; 16],
        port: &mut Port<'_>,
        now: Tick,
    ) {
        let c = &self.counters;
        let Some(target) = route.local(client.is_ipv6()) else {
            c.worker_not_serving.fetch_add(1, Relaxed);
            route.counters.count_drop(ServiceDrop::WorkerNotServing);
            return;
        };
        if self.any_refused.load(Relaxed) && self.refused.load().contains(&target) {
            c.worker_target_refused.fetch_add(1, Relaxed);
            route.counters.count_drop(ServiceDrop::WorkerTargetRefused);
            return;
        }
        self.worker.insert(
            (Endpoint::new(target), Endpoint::new(client)),
            WorkerFlow {
                edge,
                anycast: Endpoint::new(anycast),
            },
            now,
        );
        let parts: &[&[u8]] = if route.proxy_protocol {
            &[header, payload]
        } else {
            &[payload]
        };
        let max = packet::udp_overhead(client.is_ipv6()) + header.len() + payload.len();
        let built = port.build_tun_partial(max, |buf| {
            packet::write_udp_partial(buf, client, target, parts)
        });
        count_delivery(c, route, built);
    }

    /// Edge: sends a reply payload from the anycast address to the client.
    fn send_to_client(
        &self,
        anycast: SocketAddr,
        client: SocketAddr,
        payload: &[u8],
        service: Option<&ServiceCounters>,
    ) {
        let c = &self.counters;
        let sockets = self.sockets.load();
        let Some(socket) = sockets.get(&anycast) else {
            c.client_reply_no_socket.fetch_add(1, Relaxed);
            if let Some(s) = service {
                s.count_drop(ServiceDrop::ClientReplyNoSocket);
            }
            return;
        };
        let to = nix::sys::socket::SockaddrStorage::from(client);
        match nix::sys::socket::sendto(
            socket.as_raw_fd(),
            payload,
            &to,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(_) => {
                c.client_replies.fetch_add(1, Relaxed);
                if let Some(s) = service {
                    s.count_hop(Hop::EdgeToClient);
                }
            }
            Err(_) => {
                c.client_reply_errors.fetch_add(1, Relaxed);
                if let Some(s) = service {
                    s.count_drop(ServiceDrop::ClientReplyErrors);
                }
            }
        }
    }

    fn too_big(&self, client: SocketAddr, anycast: SocketAddr, payload: &[u8]) {
        let v6 = anycast.is_ipv6();
        let mtu = self.max_payload(v6) + packet::udp_overhead(v6);
        let c = &self.counters;
        match self.icmp.too_big(
            client,
            anycast,
            payload,
            u16::try_from(mtu).unwrap_or(u16::MAX),
        ) {
            Ok(true) => c.icmp_sent.fetch_add(1, Relaxed),
            Ok(false) => c.icmp_rate_limited.fetch_add(1, Relaxed),
            Err(e) => {
                let n = c.icmp_errors.fetch_add(1, Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, count = n + 1, "sending ICMP too-big failed");
                }
                n
            }
        };
    }

    /// Edge: a reply from `from_mesh` for the flow (client, anycast) of `service`.
    fn client_reply(
        &self,
        anycast: SocketAddr,
        client: SocketAddr,
        payload: &[u8],
        from_mesh: [u8; 16],
        now: Tick,
        service: Option<&ServiceCounters>,
    ) {
        let key = (Endpoint::new(client), Endpoint::new(anycast));
        if self.edge.get(&key, now) != Some(from_mesh) {
            self.counters
                .client_reply_unknown_flow
                .fetch_add(1, Relaxed);
            if let Some(s) = service {
                s.count_drop(ServiceDrop::ClientReplyUnknownFlow);
            }
            return;
        }
        self.send_to_client(anycast, client, payload, service);
    }
}

impl Forwarder for Forwarding {
    fn inbound(&self, _from: &Peer, packet: &[u8], port: &mut Port<'_>) {
        let c = &self.counters;
        let now = Tick::now();
        let Ok(udp) = packet::parse_udp(packet) else {
            c.worker_bad_inner.fetch_add(1, Relaxed);
            return;
        };
        let IpAddr::V6(sender) = udp.src.ip() else {
            c.worker_bad_inner.fetch_add(1, Relaxed);
            return;
        };
        let Ok((header, hlen)) = proxy::decode(udp.payload) else {
            c.worker_bad_proxy.fetch_add(1, Relaxed);
            return;
        };
        let Some((src, dst)) = header.endpoints() else {
            c.worker_bad_proxy.fetch_add(1, Relaxed);
            return;
        };
        let payload = &udp.payload[hlen..];
        let table = self.table.load();
        if header.tlv(TLV_REPLY) == Some(REPLY) {
            // A reply's header runs anycast → client.
            let service = table.service_at(&src).map(|r| &*r.counters);
            self.client_reply(src, dst, payload, sender.octets(), now, service);
            return;
        }
        let Some(route) = table.service_at(&dst) else {
            c.worker_not_serving.fetch_add(1, Relaxed);
            return;
        };
        self.deliver(
            route,
            src,
            dst,
            &udp.payload[..hlen],
            payload,
            sender.octets(),
            port,
            now,
        );
    }

    fn unrouted(&self, packet: &[u8], port: &mut Port<'_>) {
        let c = &self.counters;
        let Ok(udp) = packet::parse_udp(packet) else {
            c.reply_not_udp.fetch_add(1, Relaxed);
            return;
        };
        let now = Tick::now();
        let key = (Endpoint::new(udp.src), Endpoint::new(udp.dst));
        let Some(flow) = self.worker.get(&key, now) else {
            c.reply_no_flow.fetch_add(1, Relaxed);
            return;
        };
        let anycast = flow.anycast.socket_addr();
        let client = udp.dst;
        let table = self.table.load();
        let service = table.service_at(&anycast).map(|r| &*r.counters);
        if flow.edge == self.config.mesh_address.octets() {
            c.reply_local.fetch_add(1, Relaxed);
            if let Some(s) = service {
                s.count_hop(Hop::WorkerToLocalEdge);
            }
            self.client_reply(anycast, client, udp.payload, flow.edge, now, service);
            return;
        }
        if udp.payload.len() + REPLY_TLV_LEN > self.max_payload(client.is_ipv6()) {
            c.reply_oversize.fetch_add(1, Relaxed);
            if let Some(s) = service {
                s.count_drop(ServiceDrop::ReplyOversize);
            }
            return;
        }
        let mut header = [0u8; PROXY_BUF];
        let Ok(hlen) = proxy::encode_udp(anycast, client, &[(TLV_REPLY, REPLY)], &mut header)
        else {
            c.reply_not_udp.fetch_add(1, Relaxed);
            return;
        };
        let dst = SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(flow.edge)),
            self.config.forward_port,
        );
        let sent = SCRATCH.with_borrow_mut(|buf| {
            let len = packet::write_udp(buf, self.mesh, dst, &[&header[..hlen], udp.payload])?;
            Some(port.to_mesh(&buf[..len]))
        });
        match sent {
            Some(Ok(())) => {
                c.reply_forwarded.fetch_add(1, Relaxed);
                if let Some(s) = service {
                    s.count_hop(Hop::WorkerToEdge);
                }
            }
            _ => {
                c.reply_tunnel_drops.fetch_add(1, Relaxed);
                if let Some(s) = service {
                    s.count_drop(ServiceDrop::ReplyTunnelDrops);
                }
            }
        }
    }
}

/// Counts a worker's delivery into the TUN by what became of it: only a queued packet
/// is delivered.
fn count_delivery(c: &ForwardCounters, route: &ServiceRoute, built: TunBuilt) {
    let (node, drop) = match built {
        TunBuilt::Queued => {
            c.worker_delivered.fetch_add(1, Relaxed);
            route.counters.count_hop(Hop::WorkerToContainer);
            return;
        }
        // The datagram and its PROXY header do not fit one IP packet for the container
        // (an inner packet near 64 KiB from a peer).
        TunBuilt::NotBuilt => (&c.worker_oversize, ServiceDrop::WorkerOversize),
        TunBuilt::Refused => (&c.worker_tun_drops, ServiceDrop::WorkerTunDrops),
    };
    node.fetch_add(1, Relaxed);
    route.counters.count_drop(drop);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a packet the TUN batch took is delivered; one that could not be built (a
    /// PROXY header and payload past 64 KiB) or that the batch refused is a drop, on the
    /// node and on the service (it used to be counted as delivered).
    #[test]
    fn only_a_queued_packet_counts_as_delivered() {
        let route = ServiceRoute {
            name: "dns".into(),
            proxy_protocol: true,
            workers: Vec::new(),
            local_v4: None,
            local_v6: None,
            counters: Arc::default(),
        };
        let c = ForwardCounters::default();
        for built in [TunBuilt::NotBuilt, TunBuilt::Refused, TunBuilt::Queued] {
            count_delivery(&c, &route, built);
        }
        let node = c.snapshot();
        assert_eq!(
            (
                node["worker_delivered"],
                node["worker_oversize"],
                node["worker_tun_drops"]
            ),
            (1, 1, 1)
        );
        let service = route.counters.status(1);
        assert_eq!(service.forwarded["worker_to_container"], 1);
        assert_eq!(service.dropped["worker_oversize"], 1);
        assert_eq!(service.dropped["worker_tun_drops"], 1);
    }
}
