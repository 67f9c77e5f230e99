//! How datagrams the XDP program selects reach flynode: the ingress.
//!
//! Two backends, one contract ([`Handler`]):
//! - **AF_XDP** ([`afxdp`]): one socket per RX queue of the NIC, registered in the
//!   program's XSKMAP; the program redirects service datagrams and WireGuard messages
//!   for this node straight into it, past the kernel's IP stack.
//! - **sockets** ([`socket`]): one UDP socket per service (address, port), bound with
//!   FREEBIND; the program passes the datagrams (`XDP_PASS`) and the kernel delivers
//!   them. WireGuard messages then reach the mesh's own UDP socket.
//!
//! The service sockets exist with both backends: fragmented datagrams always go to the
//! kernel for reassembly, and a queue whose AF_XDP socket is missing falls back to
//! `XDP_PASS`, so no datagram the program passes is lost for want of a socket.
//! Which backend runs is decided once at start ([`BackendChoice::Auto`] tries AF_XDP
//! on every queue and falls back to sockets when any queue cannot have one), logged,
//! and shown by `flynode status`.
pub mod afxdp;
pub mod frame;
pub mod socket;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::ArcSwap;
use flynode_xdp_common::{ServiceKey, ServiceValue};
use serde::{Deserialize, Serialize};

pub use frame::Datagram;

use crate::xdp::XdpClassifier;

/// What consumes the datagrams. Each receiving thread gets its own handler (from a
/// [`HandlerFactory`]), so handlers batch without locks; `flush` ends a batch.
pub trait Handler: Send {
    /// A WireGuard message for this node (AF_XDP only: with sockets the mesh's own
    /// socket receives them).
    fn wireguard(&mut self, datagram: &Datagram<'_>);
    /// A datagram for service `service.service_id`.
    fn service(&mut self, service: ServiceValue, datagram: &Datagram<'_>);
    /// The end of a receive batch: write out whatever the batch produced.
    fn flush(&mut self);
}

/// Makes one [`Handler`] per receiving thread.
pub type HandlerFactory = Arc<dyn Fn() -> Box<dyn Handler> + Send + Sync>;

/// Which backend to run (`[xdp] backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendChoice {
    /// AF_XDP when every RX queue gets a socket, else sockets.
    #[default]
    Auto,
    AfXdp,
    Socket,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::AfXdp => "af_xdp",
            BackendChoice::Socket => "socket",
        })
    }
}

/// The backend that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Backend {
    AfXdp {
        /// "copy" or "zero-copy".
        mode: String,
        queues: u32,
    },
    Socket {
        /// Why AF_XDP is not in use.
        reason: String,
    },
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::AfXdp { mode, queues } => {
                write!(f, "af_xdp ({mode} mode, {queues} queue(s))")
            }
            Backend::Socket { reason } => write!(f, "socket ({reason})"),
        }
    }
}

/// Counters of the ingress itself (what the handlers do is theirs to count).
#[derive(Debug, Default)]
pub struct IngressCounters {
    /// Datagrams delivered through AF_XDP.
    pub xsk_datagrams: AtomicU64,
    /// Datagrams delivered through the service sockets.
    pub socket_datagrams: AtomicU64,
    /// AF_XDP frames that did not parse as a UDP datagram (should stay 0: the program
    /// validated them).
    pub xsk_unparsed: AtomicU64,
    /// AF_XDP datagrams for an (address, port) the map no longer has (removed between
    /// the program's verdict and the consumer).
    pub xsk_stale: AtomicU64,
    /// Datagrams a service socket received but could not use (truncated data or
    /// control messages).
    pub socket_dropped: AtomicU64,
    /// Receive errors (logged at a power-of-two rate).
    pub errors: AtomicU64,
}

impl IngressCounters {
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("xsk_datagrams", &self.xsk_datagrams),
            ("socket_datagrams", &self.socket_datagrams),
            ("xsk_unparsed", &self.xsk_unparsed),
            ("xsk_stale", &self.xsk_stale),
            ("socket_dropped", &self.socket_dropped),
            ("errors", &self.errors),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Relaxed)))
        .collect()
    }

    fn error(&self, what: &str, e: &std::io::Error) {
        let n = self.errors.fetch_add(1, Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(error = %e, count = n, "ingress {what} failed");
        }
    }
}

/// The (address, port) → entry table the consumers look datagrams up in: the same
/// content as the program's services map, swapped whole on every change.
#[derive(Debug, Default)]
pub struct Endpoints(HashMap<SocketAddr, ServiceValue>);

impl Endpoints {
    pub fn new(entries: &BTreeMap<ServiceKey, ServiceValue>) -> Self {
        Self(
            entries
                .iter()
                .map(|(k, v)| (SocketAddr::new(ip_of(&k.addr.addr), k.port()), *v))
                .collect(),
        )
    }

    pub fn get(&self, dst: &SocketAddr) -> Option<ServiceValue> {
        self.0.get(dst).copied()
    }

    /// The service (not WireGuard) endpoints.
    pub fn services(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.0
            .iter()
            .filter(|(_, v)| !v.is_wireguard())
            .map(|(k, _)| *k)
    }
}

fn ip_of(addr: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// AF_XDP and socket settings.
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub interface: String,
    pub backend: BackendChoice,
    /// Whether the program runs in generic (skb) mode. There it runs after the kernel's
    /// GRO and sees a local sender's GSO packets whole (veth passes them unsegmented),
    /// so one frame may hold several datagrams: AF_XDP, which hands up one frame per
    /// datagram, is not chosen automatically.
    pub generic_xdp: bool,
    /// SO_RCVBUF of each service socket.
    pub socket_buffer: usize,
}

/// The running ingress.
pub struct Ingress {
    endpoints: Arc<ArcSwap<Endpoints>>,
    backend: Backend,
    sockets: socket::SocketIngress,
    xsk: Option<afxdp::XskIngress>,
    counters: Arc<IngressCounters>,
}

impl Ingress {
    /// Starts the backend `config` asks for on the interface `classifier` is attached
    /// to, with `entries` (see [`crate::xdp::endpoint_entries`]) as the first map.
    pub fn start(
        config: &IngressConfig,
        classifier: &mut XdpClassifier,
        entries: &BTreeMap<ServiceKey, ServiceValue>,
        handlers: HandlerFactory,
        sockets: crate::forward::engine::ServiceSockets,
    ) -> anyhow::Result<Ingress> {
        let endpoints = Arc::new(ArcSwap::from_pointee(Endpoints::new(entries)));
        let counters = Arc::new(IngressCounters::default());
        let sockets = socket::SocketIngress::start(
            Arc::clone(&endpoints),
            config.socket_buffer,
            Arc::clone(&handlers),
            Arc::clone(&counters),
            sockets,
        )?;
        let (xsk, backend) = match config.backend {
            BackendChoice::Socket => (
                None,
                Backend::Socket {
                    reason: "configured".to_owned(),
                },
            ),
            BackendChoice::Auto if config.generic_xdp => (
                None,
                Backend::Socket {
                    reason: "generic XDP sees GRO/GSO super-packets; AF_XDP needs native mode"
                        .to_owned(),
                },
            ),
            choice => match afxdp::XskIngress::start(
                &config.interface,
                classifier,
                Arc::clone(&endpoints),
                handlers,
                Arc::clone(&counters),
            ) {
                Ok(xsk) => {
                    let backend = Backend::AfXdp {
                        mode: xsk.mode().to_string(),
                        queues: xsk.queues(),
                    };
                    (Some(xsk), backend)
                }
                Err(e) if choice == BackendChoice::Auto => {
                    let reason = format!("AF_XDP unavailable: {e:#}");
                    tracing::warn!(interface = %config.interface, "{reason}; using the socket backend");
                    (None, Backend::Socket { reason })
                }
                Err(e) => {
                    return Err(
                        e.context("starting the AF_XDP backend ([xdp] backend = \"af_xdp\")")
                    );
                }
            },
        };
        tracing::info!(interface = %config.interface, backend = %backend, "ingress running");
        Ok(Ingress {
            endpoints,
            backend,
            sockets,
            xsk,
            counters,
        })
    }

    /// Follows a new endpoints map: the consumers' table is swapped at once, service
    /// sockets are opened and closed as the diff says.
    pub fn apply(&mut self, entries: &BTreeMap<ServiceKey, ServiceValue>) {
        self.endpoints.store(Arc::new(Endpoints::new(entries)));
        self.sockets.reconcile();
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn counters(&self) -> &IngressCounters {
        &self.counters
    }

    /// Service endpoints whose socket could not be opened, with the error.
    pub fn socket_failures(&self) -> BTreeMap<SocketAddr, String> {
        self.sockets.failures()
    }

    /// Stops the consumers and unregisters the AF_XDP sockets from `classifier`.
    pub fn stop(mut self, classifier: &mut XdpClassifier) {
        if let Some(xsk) = self.xsk.take() {
            xsk.stop(classifier);
        }
        self.sockets.stop();
    }
}
