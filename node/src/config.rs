//! The node config, `/etc/flynode/flynode.toml`.
//!
//! Parse, don't validate: every check runs while deserializing, so a [`Config`] in hand is
//! valid, and every failure is a one-line [`ConfigError`] pointing at the file, line,
//! column and field. Loading never touches the system beyond reading the file (and the
//! hostname when `node_id` is unset), so `check-config` can run anywhere.

pub(crate) mod de;
pub(crate) mod names;
mod source;
pub mod toml_error;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flynode_tunnel::sched::ThreadPolicy;
use serde::Deserialize;

pub use names::{InvalidName, NodeId, Region};
pub use source::SourceConfig;
pub use toml_error::{Location, TomlError};

pub const DEFAULT_PATH: &str = "/etc/flynode/flynode.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node_id: NodeId,
    pub region: Region,
    /// This node's address inside the WireGuard mesh; always in fc00::/7.
    pub mesh_address: Ipv6Addr,
    pub key_dir: PathBuf,
    pub control_socket: PathBuf,
    pub wireguard: WireguardConfig,
    pub xdp: XdpConfig,
    pub source: SourceConfig,
    pub metrics: MetricsConfig,
    pub flows: FlowConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireguardConfig {
    /// UDP port the mesh listens on (all addresses, IPv4 and IPv6).
    #[serde(deserialize_with = "de::port")]
    pub listen_port: u16,
    /// Name of the TUN device that carries the mesh addresses.
    #[serde(deserialize_with = "de::interface")]
    pub interface: String,
    /// An optional IPv4 address for this node inside the mesh (for IPv4-only tools
    /// and peers); the IPv6 `mesh_address` is always assigned.
    #[serde(deserialize_with = "de::mesh_v4")]
    pub mesh_ipv4: Option<Ipv4Addr>,
    /// The TUN's MTU. Default: the underlay interface's MTU minus WireGuard's overhead
    /// over IPv6 (80 bytes), so that every encrypted packet fits the underlay.
    #[serde(deserialize_with = "de::mtu")]
    pub mtu: Option<u16>,
    /// How many packets the kernel may queue in the TUN for the mesh to read (its
    /// `txqueuelen`). The kernel's 500 overflow whenever a local sender outruns the
    /// mesh thread for one scheduler slice; see `flynode_tunnel::io::tun::DEFAULT_TX_QUEUE_LEN`.
    #[serde(deserialize_with = "de::queue_len")]
    pub tun_queue_len: u32,
    /// How the kernel schedules the mesh's data-path threads (`mesh-tx`, `mesh-rx`):
    /// `batch` (SCHED_BATCH: no preemption at every wakeup, so each wakeup moves a
    /// batch) or `normal`. See `flynode_tunnel::sched`.
    pub data_path_sched: SchedPolicy,
    /// The nice value of `mesh-tx` (-20..=19). Below 0 gives it a larger CPU share
    /// than the local senders it drains, so what they send is not dropped at the TUN.
    /// `mesh-rx` stays at 0: the local receivers it feeds must not be starved.
    #[serde(deserialize_with = "de::nice")]
    pub tx_nice: i8,
    /// After `flynode keys rotate`, how long the previous key keeps working for peers
    /// that have not moved to the new one.
    #[serde(deserialize_with = "de::duration")]
    pub key_grace: Duration,
    /// Keepalive interval on every session, so idle sessions stay up (and a worker's
    /// health, judged by a recent handshake, stays visible).
    #[serde(deserialize_with = "de::duration")]
    pub persistent_keepalive: Duration,
    /// UDP port on the mesh address where forwarded datagrams (PROXY v2 wrapped) arrive;
    /// inner packets to it are handled in flynode, never by the kernel.
    #[serde(deserialize_with = "de::port")]
    pub forward_port: u16,
    /// The address peers reach this node's WireGuard at, as published in etcd
    /// (`ip:port`). Default: the XDP interface's first global address (IPv4 first)
    /// and `listen_port`. Not used with a routing file, which lists every endpoint.
    #[serde(deserialize_with = "de::opt_socket_addr")]
    pub endpoint: Option<SocketAddr>,
}

impl Default for WireguardConfig {
    fn default() -> Self {
        WireguardConfig {
            listen_port: 51820,
            interface: "flynode0".to_owned(),
            mesh_ipv4: None,
            mtu: None,
            tun_queue_len: flynode_tunnel::io::tun::DEFAULT_TX_QUEUE_LEN,
            data_path_sched: SchedPolicy::Batch,
            tx_nice: ThreadPolicy::MESH_TX.nice,
            key_grace: Duration::from_secs(600),
            persistent_keepalive: Duration::from_secs(25),
            forward_port: 51821,
            endpoint: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// A syntactically valid interface name; whether it exists is checked at attach
    /// time, not here, so configs can be validated off-host.
    #[serde(deserialize_with = "de::interface")]
    pub interface: String,
    #[serde(default)]
    pub mode: XdpMode,
    /// How selected datagrams reach flynode: AF_XDP sockets or ordinary UDP sockets.
    #[serde(default)]
    pub backend: crate::ingress::BackendChoice,
    /// The addresses services may claim as anycast on this node. A routing-map service
    /// address outside them is not steered (logged); unset: any address.
    #[serde(default, deserialize_with = "de::opt_prefixes")]
    pub anycast_prefixes: Option<Vec<ipnet::IpNet>>,
}

/// The scheduling policy of the mesh's data-path threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedPolicy {
    /// `SCHED_BATCH`.
    Batch,
    /// `SCHED_OTHER`, the kernel's default.
    Normal,
}

impl WireguardConfig {
    /// The scheduling of `mesh-tx` and `mesh-rx` (whose nice value is not
    /// configurable: see [`ThreadPolicy::MESH_RX`]).
    pub fn data_path(&self) -> (ThreadPolicy, ThreadPolicy) {
        let batch = self.data_path_sched == SchedPolicy::Batch;
        (
            ThreadPolicy {
                batch,
                nice: self.tx_nice,
            },
            ThreadPolicy {
                batch,
                ..ThreadPolicy::MESH_RX
            },
        )
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native if the driver supports it, else generic.
    #[default]
    Auto,
    Native,
    Generic,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve the Prometheus endpoint at all (a benchmark's baseline turns it off).
    pub enabled: bool,
    /// Where `GET /metrics` is served (plain HTTP: keep it on loopback or a management
    /// network).
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Per-peer series for at most this many peers (those with a session first; 0:
    /// none). The `flynode_peers` gauges always count every peer.
    #[serde(deserialize_with = "de::count_or_zero")]
    pub max_peer_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9477)),
            max_peer_series: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// Flow-table capacity on the edge side.
    #[serde(deserialize_with = "de::count")]
    pub edge_max: usize,
    /// Flow-table capacity on the worker side.
    #[serde(deserialize_with = "de::count")]
    pub worker_max: usize,
    #[serde(deserialize_with = "de::duration")]
    pub idle_timeout: Duration,
    /// How containers' replies reach flynode: `auto` (flynode's tc program on the
    /// container's interface, a policy rule where it cannot run) or `rules`.
    pub reply_capture: crate::forward::host::ReplyCaptureChoice,
    /// Where this node may deliver clients' datagrams as a worker: its containers'
    /// prefixes. Unset: any address the kernel reaches on the link of an interface
    /// other than the XDP interface and the mesh, or an address of this host (see
    /// `forward::targets`). A routing-map target outside is refused and counted.
    #[serde(deserialize_with = "de::opt_prefixes")]
    pub container_prefixes: Option<Vec<ipnet::IpNet>>,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            edge_max: 1 << 20,
            worker_max: 1 << 20,
            idle_timeout: Duration::from_secs(120),
            reply_capture: crate::forward::host::ReplyCaptureChoice::Auto,
            container_prefixes: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config file: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Invalid(#[from] TomlError),
    #[error(
        "{}: node_id: not set, and the hostname cannot be used instead ({reason}); set node_id",
        .path.display()
    )]
    NoNodeId { path: PathBuf, reason: String },
}

/// The file as written; only `node_id` needs work after deserializing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node_id: Option<NodeId>,
    region: Region,
    #[serde(deserialize_with = "de::ula")]
    mesh_address: Ipv6Addr,
    #[serde(default = "default_key_dir", deserialize_with = "de::abs_path")]
    key_dir: PathBuf,
    #[serde(default = "default_control_socket", deserialize_with = "de::abs_path")]
    control_socket: PathBuf,
    #[serde(default)]
    wireguard: WireguardConfig,
    xdp: XdpConfig,
    #[serde(default)]
    source: SourceConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    flows: FlowConfig,
}

fn default_key_dir() -> PathBuf {
    PathBuf::from("/var/lib/flynode/keys")
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/flynode/control.sock")
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(toml_error::utf8(&bytes, path)?, path)
    }

    /// Parses config text; `origin` is only used to name the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::parse_with_hostname(text, origin, system_hostname)
    }

    fn parse_with_hostname(
        text: &str,
        origin: &Path,
        hostname: impl FnOnce() -> io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml_error::from_str(text, origin)?;
        let node_id = match file.node_id {
            Some(id) => id,
            None => {
                let no_node_id = |reason: String| ConfigError::NoNodeId {
                    path: origin.to_owned(),
                    reason,
                };
                let name = hostname().map_err(|e| no_node_id(format!("reading it failed: {e}")))?;
                names::node_id_from_hostname(&name).map_err(|e| no_node_id(e.to_string()))?
            }
        };
        Ok(Config {
            node_id,
            region: file.region,
            mesh_address: file.mesh_address,
            key_dir: file.key_dir,
            control_socket: file.control_socket,
            wireguard: file.wireguard,
            xdp: file.xdp,
            source: file.source,
            metrics: file.metrics,
            flows: file.flows,
        })
    }
}

/// The UTS-namespace hostname, as `hostname(1)` prints it.
fn system_hostname() -> io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
}
