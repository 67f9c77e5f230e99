//! The daemon's side of the WireGuard mesh: turning the config and routing map into the
//! tunnel's terms, and key rotation (adopt the new key live, wipe the old one when every
//! peer has moved or the grace period ends).
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flynode_keys::{KeyDir, PublicKey, unix_now};
use flynode_tunnel::core::{PeerConfig, PeerStatus, fingerprint};
use flynode_tunnel::driver::{Mesh, MeshConfig};
use flynode_tunnel::io::tun::TunConfig;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::routing::RoutingMap;

/// WireGuard's overhead over an IPv6 underlay: IPv6 (40) + UDP (8) + data header and
/// tag (32). Using the IPv6 figure for both families keeps one MTU for every peer.
pub const WIREGUARD_OVERHEAD: u16 = 80;
/// Socket buffers: the kernel default (208 KiB) drops bursts at a few hundred Mbit/s.
pub const SOCKET_BUFFER: usize = 16 << 20;

/// The TUN MTU: configured, or the underlay interface's MTU minus the overhead.
pub fn tunnel_mtu(config: &Config) -> anyhow::Result<u16> {
    if let Some(mtu) = config.wireguard.mtu {
        return Ok(mtu);
    }
    let iface = &config.xdp.interface;
    let path = format!("/sys/class/net/{iface}/mtu");
    let underlay: u16 = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the MTU of underlay interface `{iface}` ({path})"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {path}"))?;
    let mtu = underlay.saturating_sub(WIREGUARD_OVERHEAD);
    anyhow::ensure!(
        mtu >= 1280,
        "underlay interface `{iface}` has MTU {underlay}; the mesh needs at least {} (IPv6's 1280 + {WIREGUARD_OVERHEAD}); set [wireguard] mtu",
        1280 + WIREGUARD_OVERHEAD
    );
    Ok(mtu)
}

pub fn mesh_config(config: &Config) -> anyhow::Result<MeshConfig> {
    let (tx_policy, rx_policy) = config.wireguard.data_path();
    Ok(MeshConfig {
        listen: SocketAddr::from((Ipv6Addr::UNSPECIFIED, config.wireguard.listen_port)),
        socket_buffer: SOCKET_BUFFER,
        tun: TunConfig {
            name: config.wireguard.interface.clone(),
            mtu: tunnel_mtu(config)?,
            ipv6: config.mesh_address,
            ipv4: config.wireguard.mesh_ipv4,
            offload: std::env::var_os("FLYNODE_TUN_OFFLOAD").is_none_or(|v| v != "0"),
            tx_queue_len: config.wireguard.tun_queue_len,
        },
        forward_port: config.wireguard.forward_port,
        tx_policy,
        rx_policy,
    })
}

/// Every node of the map except this one, as tunnel peers.
///
/// Sessions are lazy (`flynode_tunnel::core` `demand`): only the workers of the map's
/// services are warm, i.e. get a session and keepalives without traffic, because this
/// node, as an edge, picks only workers whose session is alive and must see a dead one
/// before a flow is sent to it. Every other peer gets a session when a packet needs one
/// and loses it after two idle minutes; a worker answers the keepalives of the edges
/// that keep it warm, so they see it alive.
pub fn peers(config: &Config, routing: &RoutingMap) -> Vec<PeerConfig> {
    let keepalive =
        u16::try_from(config.wireguard.persistent_keepalive.as_secs()).unwrap_or(u16::MAX);
    let workers: std::collections::HashSet<&str> = routing
        .services
        .values()
        .flat_map(|s| s.workers.iter().map(|w| w.node.as_str()))
        .collect();
    routing
        .nodes
        .values()
        .filter(|n| n.id != config.node_id)
        .map(|n| PeerConfig {
            name: Arc::from(n.id.as_str()),
            public_key: *n.public_key.as_bytes(),
            endpoint: Some(n.endpoint),
            allowed: std::iter::once(IpAddr::V6(n.mesh_address))
                .chain(n.mesh_ipv4.map(IpAddr::V4))
                .collect(),
            keepalive,
            warm: workers.contains(n.id.as_str()),
        })
        .collect()
}

/// Warns when the map's entry for this node disagrees with the node itself: peers would
/// then be configured with something other than what this node is.
pub fn check_self_entry(config: &Config, routing: &RoutingMap, keys: &[PublicKey]) {
    let Some(me) = routing.nodes.get(&config.node_id) else {
        tracing::warn!(node = %config.node_id, "this node is not in the routing map; peers will not know it");
        return;
    };
    if me.mesh_address != config.mesh_address {
        tracing::warn!(map = %me.mesh_address, config = %config.mesh_address, "the routing map gives this node another mesh address than its config");
    }
    if !keys.contains(&me.public_key) {
        tracing::warn!(map = %me.public_key.fingerprint(), "the routing map gives this node a public key it does not have");
    }
}

/// Applies the map's peers to the mesh and logs what changed.
pub fn apply_peers(mesh: &Mesh, config: &Config, routing: &RoutingMap) -> anyhow::Result<()> {
    let diff = mesh
        .set_peers(peers(config, routing))
        .context("installing mesh routes")?;
    if !diff.is_empty() {
        tracing::info!(
            added = ?diff.added,
            removed = ?diff.removed,
            rekeyed = ?diff.rekeyed,
            updated = ?diff.updated,
            "mesh peers applied"
        );
    }
    Ok(())
}

/// A rotation in flight: the previous key stays valid until every peer has moved or
/// `deadline` (unix seconds) passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    pub previous: PublicKey,
    pub deadline: u64,
}

/// What `flynode keys rotate` shows while it waits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotationStatus {
    pub current: String,
    /// The previous key, while its grace period lasts.
    pub previous: Option<String>,
    pub moved: usize,
    pub total: usize,
    /// Seconds until the previous key is wiped regardless.
    pub grace_left_secs: Option<u64>,
}

pub fn rotation_status(mesh: &Mesh, grace: Option<Grace>) -> RotationStatus {
    let p = mesh.core().rotation_progress();
    RotationStatus {
        current: PublicKey::from_bytes(mesh.core().public_key()).to_base64(),
        previous: grace.map(|g| g.previous.to_base64()),
        moved: p.moved,
        total: p.total,
        grace_left_secs: grace.map(|g| g.deadline.saturating_sub(unix_now())),
    }
}

/// Restores a rotation that was in flight when the daemon stopped.
pub fn restore_grace(
    key_dir: &KeyDir,
    mesh: &Mesh,
    grace: Duration,
) -> anyhow::Result<Option<Grace>> {
    let Some(previous) = key_dir.load_previous()? else {
        return Ok(None);
    };
    let state = key_dir.state()?;
    let rotated_at = state.previous.map_or_else(unix_now, |p| p.rotated_at);
    let g = Grace {
        previous: previous.public_key(),
        deadline: rotated_at + grace.as_secs(),
    };
    mesh.core()
        .set_previous_key(previous.as_static_secret().clone());
    tracing::info!(previous = %g.previous.fingerprint(), left_secs = g.deadline.saturating_sub(unix_now()), "key rotation in progress: previous key still accepted");
    Ok(Some(g))
}

/// Rotates the key on disk and in the mesh: the new key answers at once, the old one
/// keeps working for `grace`.
pub fn rotate(key_dir: &KeyDir, mesh: &Mesh, grace: Duration) -> anyhow::Result<Grace> {
    let rotation = key_dir.rotate()?;
    let new = key_dir.load_current()?;
    anyhow::ensure!(
        new.public_key() == rotation.new,
        "the key directory changed during the rotation"
    );
    mesh.rotate_key(new.as_static_secret().clone());
    tracing::info!(old = %rotation.old.fingerprint(), new = %rotation.new.fingerprint(), grace_secs = grace.as_secs(), "key rotated: answering on the new key, the old one stays valid for the grace period");
    Ok(Grace {
        previous: rotation.old,
        deadline: rotation.rotated_at + grace.as_secs(),
    })
}

/// Ends the grace period when every peer has moved or the deadline passed. Returns
/// whether it ended.
pub fn maybe_end_grace(key_dir: &KeyDir, mesh: &Mesh, grace: Grace) -> bool {
    let p = mesh.core().rotation_progress();
    let expired = unix_now() >= grace.deadline;
    if p.moved < p.total && !expired {
        return false;
    }
    mesh.core().wipe_previous_key();
    if let Err(e) = key_dir.wipe_previous() {
        tracing::error!(error = %e, "wiping the previous key file failed; it is no longer accepted");
    }
    if expired && p.moved < p.total {
        tracing::warn!(previous = %grace.previous.fingerprint(), moved = p.moved, total = p.total, "grace period over: previous key wiped; peers that did not move must learn the new key");
    } else {
        tracing::info!(previous = %grace.previous.fingerprint(), peers = p.total, "every peer moved to the new key: previous key wiped");
    }
    true
}

/// Seconds since the current key was made, from the key directory's state (the key
/// file's modification time for a key put in place by hand); `None` if it cannot be
/// read, which `flynode status` and the metrics show as unknown rather than failing.
pub fn key_age(key_dir: &KeyDir) -> Option<u64> {
    match key_dir.state() {
        Ok(state) => Some(unix_now().saturating_sub(state.current?.created_at)),
        Err(e) => {
            tracing::debug!(error = %e, "reading the key directory's state for the key age");
            None
        }
    }
}

/// Status of one peer for `flynode status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    pub node: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed: Vec<String>,
    pub session_up: bool,
    pub last_handshake_unix: Option<u64>,
    pub handshakes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub decrypt_failures: u64,
    /// Fingerprint of our key the outgoing session uses.
    pub own_key: String,
    /// Kept up without traffic (a worker of a service); other peers' sessions are
    /// made by traffic and let go when idle.
    #[serde(default)]
    pub warm: bool,
    /// Holds session state now.
    #[serde(default)]
    pub active: bool,
    /// Handshake attempts that went unanswered.
    #[serde(default)]
    pub handshake_failures: u64,
    /// Seconds since the first unanswered attempt, while it has not answered.
    #[serde(default)]
    pub unreachable_secs: Option<u64>,
}

/// The fleet as this node's mesh sees it: how many peers are in what state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerSummary {
    pub configured: usize,
    pub warm: usize,
    pub active: usize,
    pub with_session: usize,
    pub unreachable: usize,
}

impl PeerSummary {
    pub fn of(peers: &[PeerInfo]) -> PeerSummary {
        let count = |f: fn(&PeerInfo) -> bool| peers.iter().filter(|p| f(p)).count();
        PeerSummary {
            configured: peers.len(),
            warm: count(|p| p.warm),
            active: count(|p| p.active),
            with_session: count(|p| p.session_up),
            unreachable: count(|p| p.unreachable_secs.is_some()),
        }
    }
}

impl From<PeerStatus> for PeerInfo {
    fn from(p: PeerStatus) -> PeerInfo {
        PeerInfo {
            node: p.name.to_string(),
            public_key: PublicKey::from_bytes(p.public_key).to_base64(),
            endpoint: p.endpoint.map(|e| e.to_string()),
            allowed: p.allowed.iter().map(|a| a.to_string()).collect(),
            session_up: p.session_up,
            last_handshake_unix: p.last_handshake_unix,
            handshakes: p.handshakes,
            rx_packets: p.rx_packets,
            rx_bytes: p.rx_bytes,
            tx_packets: p.tx_packets,
            tx_bytes: p.tx_bytes,
            decrypt_failures: p.decrypt_failures,
            own_key: fingerprint(&p.own_key),
            warm: p.warm,
            active: p.active,
            handshake_failures: p.handshake_failures,
            unreachable_secs: p.unreachable_secs,
        }
    }
}
