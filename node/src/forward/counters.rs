//! What the forwarding layer counts: node-wide ([`ForwardCounters`], every outcome) and
//! per service ([`ServiceCounters`], the outcomes a service can be named for). Plain
//! atomics with relaxed adds on the data path; `flynode status` and the metrics endpoint
//! read them without a lock.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fm])* pub $field: AtomicU64,)* }
        impl $name {
            /// Every counter by name.
            pub fn snapshot(&self) -> BTreeMap<String, u64> {
                [$((stringify!($field), &self.$field)),*]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.load(Relaxed)))
                    .collect()
            }
        }
    };
}

counters!(
    /// What the forwarding layer did with each datagram; plain atomics (no locks to read).
    ForwardCounters {
        /// Client datagrams sent through the mesh to a worker.
        edge_forwarded,
        /// Client datagrams delivered on this node (the edge is the worker).
        edge_local,
        /// Dropped: the service has no worker at all.
        edge_no_worker,
        /// Sent although no worker looked alive (silence may be our own overload).
        edge_no_live_worker,
        /// Dropped: the service id is not in the routing map (a map change in flight).
        edge_unknown_service,
        /// Dropped: the datagram cannot fit the mesh MTU (an ICMP went to the client).
        edge_oversize,
        /// Dropped: the tunnel refused the packet (no session endpoint, buffer).
        edge_tunnel_drops,
        /// ICMP "too big" messages sent to clients, and those the rate limit held back.
        icmp_sent,
        icmp_rate_limited,
        icmp_errors,
        /// Datagrams written into the TUN for a container.
        worker_delivered,
        /// Dropped: not a UDP inner packet, or an IPv4 one.
        worker_bad_inner,
        /// Dropped: the PROXY v2 header did not decode (or was a LOCAL command).
        worker_bad_proxy,
        /// Dropped: this node serves no container for the datagram's service and family.
        worker_not_serving,
        /// Dropped: the datagram (with its PROXY header, if the service wants one) does
        /// not fit one IP packet to the container.
        worker_oversize,
        /// Dropped: the TUN batch refused the packet for the container.
        worker_tun_drops,
        /// Dropped: the map's target for this node is no container of this host (see
        /// `forward::targets`).
        worker_target_refused,
        /// Container replies sent through the mesh to their edge.
        reply_forwarded,
        /// Container replies sent to the client from this node (edge == worker).
        reply_local,
        /// Dropped: a packet from a container that matches no flow.
        reply_no_flow,
        /// Dropped: a packet routed into the TUN that is not a forwardable UDP datagram.
        reply_not_udp,
        /// Dropped: a reply too large for the mesh MTU.
        reply_oversize,
        /// Dropped: the tunnel refused the reply.
        reply_tunnel_drops,
        /// Replies sent to clients from the anycast address.
        client_replies,
        /// Dropped at the edge: a reply for a flow this edge does not hold for that worker.
        client_reply_unknown_flow,
        /// Dropped at the edge: no socket for the anycast address and port.
        client_reply_no_socket,
        /// Dropped at the edge: sendto failed.
        client_reply_errors,
    }
);

/// Where a service's datagram was passed on: one hop of client → edge → worker →
/// container and back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Edge → worker through the mesh (`edge_forwarded`).
    EdgeToWorker,
    /// Edge → this node as the worker (`edge_local`).
    EdgeToLocalWorker,
    /// Worker → its container through the TUN (`worker_delivered`).
    WorkerToContainer,
    /// A container's reply, worker → edge through the mesh (`reply_forwarded`).
    WorkerToEdge,
    /// A container's reply, worker → this node as the edge (`reply_local`).
    WorkerToLocalEdge,
    /// A reply, edge → client from the anycast address (`client_replies`).
    EdgeToClient,
}

impl Hop {
    pub const ALL: [Hop; 6] = [
        Hop::EdgeToWorker,
        Hop::EdgeToLocalWorker,
        Hop::WorkerToContainer,
        Hop::WorkerToEdge,
        Hop::WorkerToLocalEdge,
        Hop::EdgeToClient,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hop::EdgeToWorker => "edge_to_worker",
            Hop::EdgeToLocalWorker => "edge_to_local_worker",
            Hop::WorkerToContainer => "worker_to_container",
            Hop::WorkerToEdge => "worker_to_edge",
            Hop::WorkerToLocalEdge => "worker_to_local_edge",
            Hop::EdgeToClient => "edge_to_client",
        }
    }
}

/// Why a datagram of a known service was dropped; named like the node-wide counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceDrop {
    EdgeNoWorker,
    EdgeOversize,
    EdgeTunnelDrops,
    WorkerNotServing,
    WorkerOversize,
    WorkerTunDrops,
    WorkerTargetRefused,
    ReplyOversize,
    ReplyTunnelDrops,
    ClientReplyUnknownFlow,
    ClientReplyNoSocket,
    ClientReplyErrors,
}

impl ServiceDrop {
    pub const ALL: [ServiceDrop; 12] = [
        ServiceDrop::EdgeNoWorker,
        ServiceDrop::EdgeOversize,
        ServiceDrop::EdgeTunnelDrops,
        ServiceDrop::WorkerNotServing,
        ServiceDrop::WorkerOversize,
        ServiceDrop::WorkerTunDrops,
        ServiceDrop::WorkerTargetRefused,
        ServiceDrop::ReplyOversize,
        ServiceDrop::ReplyTunnelDrops,
        ServiceDrop::ClientReplyUnknownFlow,
        ServiceDrop::ClientReplyNoSocket,
        ServiceDrop::ClientReplyErrors,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ServiceDrop::EdgeNoWorker => "edge_no_worker",
            ServiceDrop::EdgeOversize => "edge_oversize",
            ServiceDrop::EdgeTunnelDrops => "edge_tunnel_drops",
            ServiceDrop::WorkerNotServing => "worker_not_serving",
            ServiceDrop::WorkerOversize => "worker_oversize",
            ServiceDrop::WorkerTunDrops => "worker_tun_drops",
            ServiceDrop::WorkerTargetRefused => "worker_target_refused",
            ServiceDrop::ReplyOversize => "reply_oversize",
            ServiceDrop::ReplyTunnelDrops => "reply_tunnel_drops",
            ServiceDrop::ClientReplyUnknownFlow => "client_reply_unknown_flow",
            ServiceDrop::ClientReplyNoSocket => "client_reply_no_socket",
            ServiceDrop::ClientReplyErrors => "client_reply_errors",
        }
    }
}

/// One service's share of the forwarding counters, counted next to the node-wide
/// [`ForwardCounters`] on the route the datagram already looked up: one relaxed add, no
/// lock. The table is rebuilt on every routing-map change; a service's counters move to
/// the new table with its id, so they only ever grow. Datagrams no service can be
/// named for (unknown id, no flow, bad inner packet) are in the node-wide counters only.
// Its own cache lines: the counters are written from every forwarding thread.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct ServiceCounters {
    forwarded: [AtomicU64; Hop::ALL.len()],
    dropped: [AtomicU64; ServiceDrop::ALL.len()],
    pub(super) no_live_worker: AtomicU64,
}

impl ServiceCounters {
    pub(super) fn count_hop(&self, hop: Hop) {
        self.forwarded[hop as usize].fetch_add(1, Relaxed);
    }

    pub(super) fn count_drop(&self, reason: ServiceDrop) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    pub(super) fn status(&self, id: u32) -> ServiceForwardStatus {
        ServiceForwardStatus {
            id,
            forwarded: Hop::ALL
                .iter()
                .map(|h| {
                    (
                        h.name().to_owned(),
                        self.forwarded[*h as usize].load(Relaxed),
                    )
                })
                .collect(),
            dropped: ServiceDrop::ALL
                .iter()
                .map(|d| (d.name().to_owned(), self.dropped[*d as usize].load(Relaxed)))
                .collect(),
            no_live_worker: self.no_live_worker.load(Relaxed),
        }
    }
}

/// One service's forwarding counters in `flynode status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceForwardStatus {
    pub id: u32,
    /// Datagrams passed on, by hop ([`Hop`] names).
    pub forwarded: BTreeMap<String, u64>,
    /// Datagrams dropped, by reason ([`ServiceDrop`] names).
    pub dropped: BTreeMap<String, u64>,
    /// Sent to a worker although none looked alive (also in `forwarded`).
    pub no_live_worker: u64,
}
