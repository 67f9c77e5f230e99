//! `flynode run`: load the node's identity and routing map, bring up the WireGuard mesh
//! (TUN + peers), attach the XDP classifier, keep both in line with the routing map,
//! answer on the control socket (status, key rotation), and shut down cleanly on
//! SIGINT/SIGTERM. SIGHUP re-reads the routing file; a broken file is rejected with its
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
    ControlServer, MeshStatus, Request, Response, RoutingStatus, Status, XdpStatus,
};
use crate::mesh::{self, Grace};
use crate::routing::RoutingMap;
use crate::xdp::{XdpClassifier, service_entries};
use flynode_tunnel::driver::Mesh;

struct State {
    config: Config,
    key_dir: KeyDir,
    started: Instant,
    routing: RoutingMap,
    xdp: XdpClassifier,
    mesh: Mesh,
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
    let mesh = Mesh::start(mesh_config.clone(), key.as_static_secret().clone())
        .context("starting the WireGuard mesh")?;
    drop(key);
    let grace = mesh::restore_grace(&key_dir, &mesh, config.wireguard.key_grace)?;
    let mut own_keys = vec![public_key];
    own_keys.extend(grace.map(|g| g.previous));
    mesh::check_self_entry(&config, &routing, &own_keys);
    mesh::apply_peers(&mesh, &config, &routing)?;
    mesh.initiate_all();
    tracing::info!(
        interface = %mesh.tun_name(),
        mtu = mesh.mtu(),
        listen = %mesh_config.listen,
        mesh_address = %config.mesh_address,
        "WireGuard mesh up"
    );
    let mut xdp = XdpClassifier::attach(&config.xdp.interface, config.xdp.mode)
        .with_context(|| format!("attaching XDP to interface `{}`", config.xdp.interface))?;
    tracing::info!(
        interface = %config.xdp.interface,
        mode = %xdp.mode(),
        "XDP program attached"
    );
    let diff = xdp.apply_services(&service_entries(&routing))?;
    tracing::info!(
        node = %config.node_id,
        public_key = %public_key.fingerprint(),
        nodes = routing.nodes.len(),
        services = routing.services.len(),
        added = diff.added,
        "routing map applied"
    );
    let control = ControlServer::bind(&config.control_socket)?;
    tracing::info!(path = %config.control_socket.display(), "control socket listening");

    let state = Arc::new(Mutex::new(State {
        config,
        key_dir,
        started: Instant::now(),
        routing,
        xdp,
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
            }
        }
    }
    drop(control);
    // Dropping the classifier closes the bpf_link, which detaches the program; dropping
    // the mesh stops its threads and closes the TUN, which removes it and its routes.
    drop(state);
    tracing::info!("XDP program detached, mesh down, control socket removed");
    Ok(())
}

fn reload(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match load_routing(&state.config) {
        Ok(routing) => {
            if let Err(e) = mesh::apply_peers(&state.mesh, &state.config, &routing) {
                tracing::error!(error = %format!("{e:#}"), "applying the reloaded mesh peers failed");
            }
            match state.xdp.apply_services(&service_entries(&routing)) {
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
        ("forward_queue_full", &c.forward_queue_full),
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
        },
        xdp: XdpStatus {
            interface: state.xdp.interface().to_owned(),
            mode: state.xdp.mode().to_string(),
            counters,
            verdicts,
        },
        mesh,
    })
}
