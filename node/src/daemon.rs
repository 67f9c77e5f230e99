//! `flynode run`: load the node's identity and routing map, bring up the WireGuard mesh
//! (TUN + peers), attach the XDP classifier, keep both in line with the routing map,
//! answer on the control socket (status, key rotation), and shut down cleanly on
//! SIGINT/SIGTERM. The routing file is watched (and SIGHUP re-reads it too); a broken file is rejected with its
//! error logged and the last good map stays in force.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context as _;
use flynode_keys::KeyDir;
use flynode_xdp_common::{Counter, Verdict};
use tokio::signal::unix::{SignalKind, signal};

use crate::NotYetImplemented;
use crate::config::{Config, SourceConfig};
use crate::control::{
    ControlServer, MeshStatus, Request, Response, RoutingStatus, ServiceTraffic, Status, XdpStatus,
};
use crate::forward::engine::{ForwardConfig, Forwarding, ServiceSockets};
use crate::forward::flows::Tick;
use crate::forward::host::HostRoutes;
use crate::ingress::{Datagram, Handler, Ingress, IngressConfig};
use crate::mesh::{self, Grace};
use crate::routing::RoutingMap;
use crate::xdp::{XdpClassifier, endpoint_entries};
use flynode_tunnel::driver::{Mesh, MeshReceiver};
use flynode_xdp_common::ServiceValue;

struct State {
    config: Config,
    key_dir: KeyDir,
    started: Instant,
    routing: RoutingMap,
    xdp: XdpClassifier,
    ingress: Option<Ingress>,
    services: Arc<ServiceTally>,
    forwarding: Arc<Forwarding>,
    host: HostRoutes,
    mesh: Arc<Mesh>,
    /// A key rotation in flight.
    grace: Option<Grace>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_until_signalled(config))
}

fn load_routing(config: &Config) -> anyhow::Result<RoutingMap> {
    match &config.source {
        SourceConfig::File { path } => Ok(RoutingMap::load(path)?),
        SourceConfig::Etcd { .. } => Err(NotYetImplemented(
            "the etcd routing-map source comes with the fleet control plane; use `[source] file = ...`",
        )
        .into()),
    }
}

async fn run_until_signalled(config: Config) -> anyhow::Result<()> {
    let key_dir = KeyDir::open(&config.key_dir)?;
    let key = key_dir.load_current()?;
    let public_key = key.public_key();
    let routing = load_routing(&config)?;
    let mesh_config = mesh::mesh_config(&config)?;
    let sockets = ServiceSockets::default();
    let forwarding = Arc::new(Forwarding::new(
        forward_config(&config, mesh_config.tun.mtu),
        Arc::clone(&sockets),
    ));
    let mesh = Mesh::start(
        mesh_config.clone(),
        key.as_static_secret().clone(),
        Some(Arc::clone(&forwarding) as Arc<dyn flynode_tunnel::driver::Forwarder>),
    )
    .context("starting the WireGuard mesh")?;
    drop(key);
    let grace = mesh::restore_grace(&key_dir, &mesh, config.wireguard.key_grace)?;
    let mut own_keys = vec![public_key];
    own_keys.extend(grace.map(|g| g.previous));
    mesh::check_self_entry(&config, &routing, &own_keys);
    mesh::apply_peers(&mesh, &config, &routing)?;
    mesh.initiate_all();
    let mut host = HostRoutes::setup(mesh.tun_name(), mesh.tun_ifindex())
        .context("setting up reply routing for containers")?;
    forwarding.apply(&routing, mesh.core());
    host.apply(&forwarding.local_targets());
    tracing::info!(
        interface = %mesh.tun_name(),
        mtu = mesh.mtu(),
        listen = %mesh_config.listen,
        mesh_address = %config.mesh_address,
        "WireGuard mesh up"
    );
    let mesh = Arc::new(mesh);
    let mut xdp = XdpClassifier::load_and_attach(&config.xdp.interface, config.xdp.mode)
        .with_context(|| format!("attaching XDP to interface `{}`", config.xdp.interface))?;
    tracing::info!(
        interface = %config.xdp.interface,
        mode = %xdp.mode().map_or_else(String::new, |m| m.to_string()),
        "XDP program attached"
    );
    let native = xdp.mode() == Some(crate::xdp::AttachedMode::Native);
    let entries = endpoint_entries(&routing, &own_wireguard(&config, &routing, native));
    let diff = xdp.apply_endpoints(&entries)?;
    tracing::info!(
        node = %config.node_id,
        public_key = %public_key.fingerprint(),
        nodes = routing.nodes.len(),
        services = routing.services.len(),
        added = diff.added,
        "routing map applied"
    );
    let services = Arc::new(ServiceTally::default());
    let handlers: crate::ingress::HandlerFactory = {
        let mesh = Arc::clone(&mesh);
        let services = Arc::clone(&services);
        let forwarding = Arc::clone(&forwarding);
        Arc::new(move || {
            Box::new(NodeHandler {
                mesh: mesh.receiver(),
                services: Arc::clone(&services),
                forwarding: Arc::clone(&forwarding),
                now: None,
                tally: Vec::new(),
            }) as Box<dyn Handler>
        })
    };
    let ingress = Ingress::start(
        &IngressConfig {
            interface: config.xdp.interface.clone(),
            backend: config.xdp.backend,
            generic_xdp: !native,
            socket_buffer: mesh::SOCKET_BUFFER,
        },
        &mut xdp,
        &entries,
        handlers,
        sockets,
    )?;
    let control = ControlServer::bind(&config.control_socket)?;
    tracing::info!(path = %config.control_socket.display(), "control socket listening");

    let routing_file = match &config.source {
        SourceConfig::File { path } => Some(path.clone()),
        SourceConfig::Etcd { .. } => None,
    };
    let state = Arc::new(Mutex::new(State {
        config,
        key_dir,
        started: Instant::now(),
        routing,
        xdp,
        ingress: Some(ingress),
        services,
        forwarding,
        host,
        mesh,
        grace,
    }));
    let answer = {
        let state = Arc::clone(&state);
        move |request| answer(&state, request)
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stamp = routing_file.as_deref().and_then(file_stamp);
    let mut settling = false;
    {
        let serve = control.serve(answer);
        tokio::pin!(serve);
        loop {
            tokio::select! {
                _ = &mut serve => break,
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = sighup.recv() => reload(&state),
                _ = tick.tick() => housekeeping(&state),
                _ = watch.tick() => {
                    // A change is applied once the file has stayed the same for one
                    // whole interval: a file being rewritten in place can be caught
                    // half-written, and a truncated map may still parse (with nodes
                    // or services missing).
                    let now = routing_file.as_deref().and_then(file_stamp);
                    if now != stamp {
                        stamp = now;
                        settling = true;
                    } else if settling {
                        settling = false;
                        tracing::info!("routing file changed");
                        reload(&state);
                    }
                }
            }
        }
    }
    drop(control);
    {
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        if let Some(ingress) = state.ingress.take() {
            ingress.stop(&mut state.xdp);
        }
        state.host.remove();
    }
    // Dropping the classifier closes the bpf_link, which detaches the program; dropping
    // the mesh stops its threads and closes the TUN, which removes it and its routes.
    drop(state);
    tracing::info!("XDP program detached, mesh down, control socket removed");
    Ok(())
}

/// How often the routing file is checked for changes: one stat(2) per interval. A
/// change applies once the file has been stable for an interval, so within two
/// intervals plus the time to parse and apply it.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// What identifies one version of the routing file: modification time, size and inode
/// (editors and `mv` replace the file, which changes the inode even within one mtime
/// tick).
type FileStamp = (std::time::SystemTime, u64, u64);

/// The file's stamp; `None` when it cannot be read (so a reappearing file counts as a
/// change).
fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}

fn reload(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match load_routing(&state.config) {
        Ok(routing) => {
            if let Err(e) = mesh::apply_peers(&state.mesh, &state.config, &routing) {
                tracing::error!(error = %format!("{e:#}"), "applying the reloaded mesh peers failed");
            }
            let report = state.forwarding.apply(&routing, state.mesh.core());
            let state = &mut *state;
            state.host.apply(&state.forwarding.local_targets());
            if report.edge_flows_invalidated + report.worker_flows_invalidated > 0 {
                tracing::info!(
                    edge = report.edge_flows_invalidated,
                    worker = report.worker_flows_invalidated,
                    "flows of removed workers forgotten"
                );
            }
            let native = state.xdp.mode() == Some(crate::xdp::AttachedMode::Native);
            let entries =
                endpoint_entries(&routing, &own_wireguard(&state.config, &routing, native));
            if let Some(ingress) = &mut state.ingress {
                ingress.apply(&entries);
            }
            match state.xdp.apply_endpoints(&entries) {
                Ok(diff) => tracing::info!(
                    added = diff.added,
                    changed = diff.changed,
                    removed = diff.removed,
                    "routing map reloaded"
                ),
                Err(e) => tracing::error!(error = %e, "applying the reloaded routing map failed"),
            }
            state.routing = routing;
        }
        Err(e) => tracing::error!(error = %e, "routing map rejected, the last good map stays"),
    }
}

/// Once a second: end a key rotation's grace period when it is over.
fn housekeeping(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.forwarding.expire();
    if let Some(grace) = state.grace
        && mesh::maybe_end_grace(&state.key_dir, &state.mesh, grace)
    {
        state.grace = None;
    }
}

fn answer(state: &Mutex<State>, request: Request) -> Response {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let error = |e: anyhow::Error| Response::Error {
        message: format!("{e:#}"),
    };
    match request {
        Request::Status => match status(&state) {
            Ok(status) => Response::Status(Box::new(status)),
            Err(e) => error(e),
        },
        Request::RotateKey => {
            match mesh::rotate(
                &state.key_dir,
                &state.mesh,
                state.config.wireguard.key_grace,
            ) {
                Ok(grace) => {
                    state.grace = Some(grace);
                    Response::Rotation(mesh::rotation_status(&state.mesh, state.grace))
                }
                Err(e) => error(e),
            }
        }
        Request::Rotation => Response::Rotation(mesh::rotation_status(&state.mesh, state.grace)),
    }
}

fn status(state: &State) -> anyhow::Result<Status> {
    let snapshot = state.xdp.counters()?;
    let counters = Counter::ALL
        .iter()
        .map(|c| (c.name().to_owned(), snapshot.get(*c)))
        .collect();
    let verdicts = [Verdict::Userspace, Verdict::Pass, Verdict::Drop]
        .iter()
        .map(|v| (v.name().to_owned(), snapshot.verdict_total(*v)))
        .collect();
    let source = match &state.config.source {
        SourceConfig::File { path } => format!("file {}", path.display()),
        SourceConfig::Etcd { endpoints, prefix } => {
            format!("etcd {} {prefix}", endpoints.join(","))
        }
    };
    let public_key = flynode_keys::PublicKey::from_bytes(state.mesh.core().public_key());
    let core = state.mesh.core();
    let c = state.mesh.counters();
    let driver = [
        ("tun_rx_packets", &c.tun_rx_packets),
        ("tun_tx_packets", &c.tun_tx_packets),
        ("tun_tx_errors", &c.tun_tx_errors),
        ("udp_rx_datagrams", &c.udp_rx_datagrams),
        ("udp_tx_datagrams", &c.udp_tx_datagrams),
        ("udp_tx_dropped", &c.udp_tx_dropped),
        ("forwarded", &c.forwarded),
        ("unrouted", &c.unrouted),
        ("io_errors", &c.io_errors),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed)))
    .chain(std::iter::once((
        "cookies_sent".to_owned(),
        core.counters
            .cookies_sent
            .load(std::sync::atomic::Ordering::Relaxed),
    )))
    .collect();
    let mesh = MeshStatus {
        interface: state.mesh.tun_name().to_owned(),
        mtu: state.mesh.mtu(),
        listen_port: state.config.wireguard.listen_port,
        rotation: mesh::rotation_status(&state.mesh, state.grace),
        peers: core.peers().into_iter().map(Into::into).collect(),
        drops: core
            .counters
            .drops()
            .into_iter()
            .map(|(d, n)| (d.name().to_owned(), n))
            .collect(),
        counters: driver,
    };
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node_id: state.config.node_id.to_string(),
        region: state.config.region.to_string(),
        public_key: public_key.to_string(),
        public_key_fingerprint: public_key.fingerprint(),
        uptime_secs: state.started.elapsed().as_secs(),
        routing: RoutingStatus {
            source,
            nodes: state.routing.nodes.len(),
            services: state.routing.services.len(),
            service_endpoints: state.routing.service_endpoints().count(),
            generation: 1,
            applied_unix: 0,
            state: "file".into(),
            revision: None,
            connected: true,
            rejected: Default::default(),
        },
        xdp: XdpStatus {
            interface: state.xdp.interface().unwrap_or_default().to_owned(),
            mode: state.xdp.mode().map_or_else(String::new, |m| m.to_string()),
            backend: state
                .ingress
                .as_ref()
                .map_or_else(String::new, |i| i.backend().to_string()),
            ingress: state
                .ingress
                .as_ref()
                .map(|i| i.counters().snapshot())
                .unwrap_or_default(),
            socket_failures: state
                .ingress
                .as_ref()
                .map(|i| {
                    i.socket_failures()
                        .into_iter()
                        .map(|(a, e)| (a.to_string(), e))
                        .collect()
                })
                .unwrap_or_default(),
            services: state
                .services
                .snapshot()
                .into_iter()
                .map(|(id, t)| (id.to_string(), t))
                .collect(),
            counters,
            verdicts,
        },
        forwarding: state.forwarding.status(state.mesh.core()),
        mesh,
    })
}

fn forward_config(config: &Config, mtu: u16) -> ForwardConfig {
    ForwardConfig {
        node: config.node_id.clone(),
        mesh_address: config.mesh_address,
        forward_port: config.wireguard.forward_port,
        mtu,
        edge_flows: config.flows.edge_max,
        worker_flows: config.flows.worker_max,
        idle_timeout: config.flows.idle_timeout,
        peer_timeout: peer_timeout(config.wireguard.persistent_keepalive),
    }
}

/// How long a worker may stay silent before the edge stops choosing it: three
/// keepalive intervals (every live peer sends at least one per interval), at least 3 s.
pub fn peer_timeout(keepalive: std::time::Duration) -> std::time::Duration {
    (keepalive * 3).max(std::time::Duration::from_secs(3))
}

/// The node's own WireGuard endpoint, as the routing map publishes it: what the XDP
/// program checks and hands to the mesh. Only in native mode: generic XDP runs after GRO
/// and sees a local sender's GSO packets whole, so a frame to the WireGuard port may
/// hold several messages and the per-message size check would drop good traffic; there
/// the mesh's own socket (which understands GRO) receives WireGuard as host traffic.
fn own_wireguard(config: &Config, routing: &RoutingMap, native: bool) -> Vec<std::net::SocketAddr> {
    if !native {
        return Vec::new();
    }
    routing
        .nodes
        .get(&config.node_id)
        .map(|n| n.endpoint)
        .into_iter()
        .collect()
}

/// Datagrams received per service. Until the forwarding layer consumes them, counting
/// is all the node does with service datagrams; the handlers add per batch, not per
/// datagram, so the lock is taken once per receive batch.
#[derive(Default)]
struct ServiceTally(Mutex<std::collections::BTreeMap<u32, ServiceTraffic>>);

impl ServiceTally {
    fn snapshot(&self) -> std::collections::BTreeMap<u32, ServiceTraffic> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The daemon's consumer of ingress datagrams: WireGuard to the mesh, service
/// datagrams counted and forwarded (the edge's half of the forwarding layer).
struct NodeHandler {
    mesh: MeshReceiver,
    services: Arc<ServiceTally>,
    forwarding: Arc<Forwarding>,
    /// The clock for this batch's flow lookups (read once per batch).
    now: Option<Tick>,
    /// This batch's per-service counts.
    tally: Vec<(u32, ServiceTraffic)>,
}

impl Handler for NodeHandler {
    fn wireguard(&mut self, datagram: &Datagram<'_>) {
        self.mesh.push(datagram.src, datagram.payload);
    }

    fn service(&mut self, service: ServiceValue, datagram: &Datagram<'_>) {
        let now = *self.now.get_or_insert_with(Tick::now);
        self.forwarding.edge(
            service.service_id,
            datagram.src,
            datagram.dst,
            datagram.payload,
            &mut self.mesh.port(),
            now,
        );
        let bytes = datagram.payload.len() as u64;
        match self
            .tally
            .iter_mut()
            .find(|(id, _)| *id == service.service_id)
        {
            Some((_, t)) => {
                t.datagrams += 1;
                t.bytes += bytes;
            }
            None => self.tally.push((
                service.service_id,
                ServiceTraffic {
                    datagrams: 1,
                    bytes,
                },
            )),
        }
    }

    fn flush(&mut self) {
        self.now = None;
        self.mesh.flush();
        if self.tally.is_empty() {
            return;
        }
        let mut all = self
            .services
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (id, t) in self.tally.drain(..) {
            let entry = all.entry(id).or_default();
            entry.datagrams += t.datagrams;
            entry.bytes += t.bytes;
        }
    }
}
