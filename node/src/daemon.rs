//! `flynode run`: load the node's identity and routing map, attach the XDP classifier,
//! keep its maps in line with the routing map, answer on the control socket, and detach
//! cleanly on SIGINT/SIGTERM. SIGHUP re-reads the routing file; a broken file is
//! rejected with its error logged and the last good map stays in force.
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context as _;
use flynode_keys::KeyDir;
use flynode_xdp_common::{Counter, Verdict};
use tokio::signal::unix::{SignalKind, signal};

use crate::NotYetImplemented;
use crate::config::{Config, SourceConfig};
use crate::control::{ControlServer, Request, Response, RoutingStatus, Status, XdpStatus};
use crate::routing::RoutingMap;
use crate::xdp::{XdpClassifier, service_entries};

struct State {
    config: Config,
    public_key: flynode_keys::PublicKey,
    started: Instant,
    routing: RoutingMap,
    xdp: XdpClassifier,
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
    // Only the public half is needed until the tunnel exists; the private key is
    // loaded (so permissions are enforced at start) and zeroized right away.
    let public_key = key_dir.load_current()?.public_key();
    let routing = load_routing(&config)?;
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
        public_key,
        started: Instant::now(),
        routing,
        xdp,
    }));
    let answer = {
        let state = Arc::clone(&state);
        move |request| answer(&state, request)
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    {
        let serve = control.serve(answer);
        tokio::pin!(serve);
        loop {
            tokio::select! {
                _ = &mut serve => break,
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = sighup.recv() => reload(&state),
            }
        }
    }
    drop(control);
    // Dropping the classifier closes the bpf_link, which detaches the program.
    drop(state);
    tracing::info!("XDP program detached, control socket removed");
    Ok(())
}

fn reload(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match load_routing(&state.config) {
        Ok(routing) => match state.xdp.apply_services(&service_entries(&routing)) {
            Ok(diff) => {
                tracing::info!(
                    added = diff.added,
                    changed = diff.changed,
                    removed = diff.removed,
                    "routing map reloaded"
                );
                state.routing = routing;
            }
            Err(e) => tracing::error!(error = %e, "applying the reloaded routing map failed"),
        },
        Err(e) => tracing::error!(error = %e, "routing map rejected, the last good map stays"),
    }
}

fn answer(state: &Mutex<State>, request: Request) -> Response {
    let state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match request {
        Request::Status => match status(&state) {
            Ok(status) => Response::Status(Box::new(status)),
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        },
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
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node_id: state.config.node_id.to_string(),
        region: state.config.region.to_string(),
        public_key: state.public_key.to_string(),
        public_key_fingerprint: state.public_key.fingerprint(),
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
    })
}
