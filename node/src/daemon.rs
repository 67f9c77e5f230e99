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

use crate::config::{Config, SourceConfig};
use crate::control::{
    ControlServer, MeshStatus, Request, Response, RoutingStatus, ServiceTraffic, Status, XdpStatus,
};
use crate::fleet::source::Source;
use crate::fleet::{self, Layout, View};
use crate::forward::engine::{ForwardConfig, Forwarding, ServiceSockets};
use crate::forward::flows::Tick;
use crate::forward::host::HostRoutes;
use crate::forward::targets::{TargetGate, TargetPolicy};
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
    /// Which local targets may be delivered to (judged again every few seconds).
    targets: TargetGate,
    targets_judged: Instant,
    /// A key rotation in flight.
    grace: Option<Grace>,
    /// The etcd source, when the map comes from etcd.
    fleet: Option<Fleet>,
    /// How many maps have been applied (1 = the initial one), and when the last was.
    generation: u64,
    applied: std::time::SystemTime,
}

/// The etcd side of the daemon.
struct Fleet {
    source: Source,
    layout: Layout,
    /// This node's WireGuard endpoint as published.
    endpoint: std::net::SocketAddr,
    /// Where the last applied view is kept, so that a restart while etcd is down
    /// still starts with the fleet's map.
    cache: std::path::PathBuf,
    /// The revision of the applied view.
    revision: Option<i64>,
    /// Records left out of the applied map (key → why).
    rejected: std::collections::BTreeMap<String, String>,
    /// Records parsed for the last view (only changed ones are parsed again).
    parsed: crate::routing::RecordCache,
    /// The views after the first (taken by the main loop).
    views: Option<tokio::sync::watch::Receiver<Option<Arc<View>>>>,
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
        SourceConfig::Etcd { .. } => {
            anyhow::bail!("the routing map comes from etcd; it is applied as etcd changes")
        }
    }
}

/// How long the daemon waits for etcd's first answer at start before it falls back
/// to the cached view (or an empty map) and keeps trying in the background.
const FIRST_VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the etcd source and waits (bounded) for the first view.
async fn start_fleet(
    config: &Config,
    public_key: &flynode_keys::PublicKey,
) -> anyhow::Result<(Fleet, Option<Arc<View>>)> {
    let SourceConfig::Etcd {
        endpoints,
        prefix,
        lease_ttl,
    } = &config.source
    else {
        anyhow::bail!("not an etcd source");
    };
    let layout = Layout::new(prefix);
    let endpoint = fleet::advertised_endpoint(config)?;
    let settings = fleet::source::Settings {
        endpoints: endpoints.clone(),
        layout: layout.clone(),
        own_key: layout.node_key(config.node_id.as_str()),
        lease_ttl: *lease_ttl,
    };
    let source = Source::spawn(settings, fleet::node_record(config, public_key, endpoint));
    let cache = config
        .key_dir
        .parent()
        .unwrap_or(&config.key_dir)
        .join("etcd-view.json");
    let mut views = source.views();
    let first = match tokio::time::timeout(FIRST_VIEW_WAIT, views.wait_for(Option::is_some)).await {
        Ok(Ok(view)) => view.clone(),
        _ => {
            let why = source.health().detail;
            match read_cache(&cache) {
                Ok(view) => {
                    tracing::warn!(
                        error = %why,
                        cache = %cache.display(),
                        revision = view.revision,
                        "etcd did not answer at start: starting with the last view this node applied, retrying in the background"
                    );
                    Some(Arc::new(view))
                }
                Err(e) => {
                    tracing::warn!(
                        error = %why,
                        cache = %format!("{e:#}"),
                        "etcd did not answer at start and there is no cached view: starting with an empty map, retrying in the background"
                    );
                    None
                }
            }
        }
    };
    tracing::info!(
        endpoints = %endpoints.join(","),
        prefix = %layout.prefix(),
        endpoint = %endpoint,
        "routing map source: etcd"
    );
    Ok((
        Fleet {
            source,
            layout,
            endpoint,
            cache,
            revision: None,
            rejected: Default::default(),
            parsed: Default::default(),
            // `wait_for` marked the first view seen: the loop gets every later one.
            views: Some(views),
        },
        first,
    ))
}

fn read_cache(path: &std::path::Path) -> anyhow::Result<View> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Keeps the applied view for the next start (written to a temporary file and renamed,
/// so a crash never leaves half a cache). Failure is logged, never fatal.
fn write_cache(path: &std::path::Path, view: &View) {
    let result = (|| -> anyhow::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(view)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %format!("{e:#}"), "could not cache the etcd view");
    }
}

/// The map a view makes; new rejections are logged once each.
fn assemble_view(fleet: &mut Assembly, view: &View) -> RoutingMap {
    let assembled = view.assemble_cached(&fleet.layout, &mut fleet.parsed);
    for (key, error) in &assembled.rejected {
        if fleet.rejected.get(key) != Some(error) {
            tracing::error!(key = %key, error = %error, "etcd record rejected; the rest of the map applies without it");
        }
    }
    for (service, nodes) in &assembled.absent_workers {
        tracing::debug!(service = %service, nodes = ?nodes, "workers on nodes without a record left out");
    }
    fleet.rejected = assembled.rejected;
    fleet.revision = Some(view.revision);
    assembled.map
}

async fn run_until_signalled(config: Config) -> anyhow::Result<()> {
    let key_dir = KeyDir::open(&config.key_dir)?;
    let key = key_dir.load_current()?;
    let public_key = key.public_key();
    let (mut fleet, routing) = match &config.source {
        SourceConfig::File { .. } => (None, load_routing(&config)?),
        SourceConfig::Etcd { .. } => {
            let (mut fleet, first) = start_fleet(&config, &public_key).await?;
            let routing = first
                .as_deref()
                .map(|view| {
                    let mut assembly = fleet.assembly();
                    let map = assemble_view(&mut assembly, view);
                    fleet.restore(assembly);
                    map
                })
                .unwrap_or_default();
            (Some(fleet), routing)
        }
    };
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
    let mut host = HostRoutes::setup(
        mesh.tun_name(),
        mesh.tun_ifindex(),
        config.flows.reply_capture,
    )
    .context("setting up reply routing for containers")?;
    forwarding.apply(&routing, mesh.core());
    let mut targets = TargetGate::new(TargetPolicy::from_config(&config));
    targets.judge(&forwarding);
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
    let entries = service_endpoints(&config, &routing, native);
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
    let mut views = fleet.as_mut().and_then(|f| f.views.take());
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
        targets,
        targets_judged: Instant::now(),
        grace,
        fleet,
        generation: 1,
        applied: std::time::SystemTime::now(),
    }));
    let answer = {
        let state = Arc::clone(&state);
        move |request| answer(&state, request)
    };
    let metrics = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .config
        .metrics
        .clone();
    if metrics.enabled {
        let server = crate::metrics::MetricsServer::bind(metrics.listen).await?;
        tracing::info!(listen = %metrics.listen, "metrics endpoint listening");
        // Weak: the endpoint must not keep the state (XDP program, mesh) alive past
        // shutdown; a scrape then gets a 500.
        let state = Arc::downgrade(&state);
        let max_peers = metrics.max_peer_series;
        tokio::spawn(server.serve(move || {
            let state = state.upgrade().context("the daemon is shutting down")?;
            let state = state.lock().unwrap_or_else(PoisonError::into_inner);
            let mut status = status(&state)?;
            crate::metrics::limit_peer_series(&mut status, max_peers);
            Ok(status)
        }));
    }
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stamp = routing_file.as_deref().and_then(file_stamp);
    let mut settling = false;
    // The control socket is served by a task of its own, so that `status` and `keys
    // rotate` answer while this loop is busy (reading a large routing map).
    let control = Arc::new(control);
    let server = {
        let control = Arc::clone(&control);
        tokio::spawn(async move { control.serve(answer).await })
    };
    {
        loop {
            tokio::select! {
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = sighup.recv() => reload(&state),
                _ = tick.tick() => housekeeping(&state),
                changed = next_view(views.as_mut()) => match changed {
                    Some(view) => apply_view(&state, &view),
                    None => views = None,
                },
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
    server.abort();
    let _ = server.await;
    drop(control);
    let fleet = state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .fleet
        .take();
    if let Some(fleet) = fleet {
        fleet
            .source
            .shutdown(std::time::Duration::from_secs(1))
            .await;
    }
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

/// The next view from etcd; `None` when there is no source (pending forever) or it
/// is gone.
async fn next_view(
    views: Option<&mut tokio::sync::watch::Receiver<Option<Arc<View>>>>,
) -> Option<Arc<View>> {
    let Some(views) = views else {
        return std::future::pending().await;
    };
    views.changed().await.ok()?;
    views.borrow_and_update().clone()
}

fn apply_view(state: &Mutex<State>, view: &View) {
    // Assembling the map of a large fleet and writing the view's cache take a while:
    // done without the state lock (status, metrics and keys rotate answer meanwhile),
    // on a copy of what assembly needs, its record cache taken out and put back. Views
    // are applied by the main loop alone, so nothing else touches the cache meanwhile.
    let (mut fleet, cache_path) = {
        let mut guard = state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(fleet) = guard.fleet.as_mut() else {
            return;
        };
        if fleet.revision == Some(view.revision) {
            return; // a resync that found nothing new
        }
        (fleet.assembly(), fleet.cache.clone())
    };
    let started = Instant::now();
    let routing = assemble_view(&mut fleet, view);
    write_cache(&cache_path, view);
    let assembled = started.elapsed();
    let mut guard = state.lock().unwrap_or_else(PoisonError::into_inner);
    let state = &mut *guard;
    if let Some(f) = state.fleet.as_mut() {
        f.restore(fleet);
    }
    let (revision, nodes) = (view.revision, routing.nodes.len());
    let locked = Instant::now();
    apply_routing(state, routing);
    tracing::debug!(
        revision,
        nodes,
        assemble_ms = assembled.as_millis() as u64,
        apply_ms = locked.elapsed().as_millis() as u64,
        "etcd view applied"
    );
}

/// What assembling an etcd view needs of the fleet state, held outside the lock.
struct Assembly {
    layout: Layout,
    parsed: crate::routing::RecordCache,
    rejected: std::collections::BTreeMap<String, String>,
    revision: Option<i64>,
}

impl Fleet {
    /// Takes the record cache out (and copies the rest) for an assembly.
    fn assembly(&mut self) -> Assembly {
        Assembly {
            layout: self.layout.clone(),
            parsed: std::mem::take(&mut self.parsed),
            // Copied, not taken: status shows them meanwhile.
            rejected: self.rejected.clone(),
            revision: self.revision,
        }
    }

    fn restore(&mut self, a: Assembly) {
        self.parsed = a.parsed;
        self.rejected = a.rejected;
        self.revision = a.revision;
    }
}

fn reload(state: &Mutex<State>) {
    let config = {
        let state = state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.fleet.is_some() {
            tracing::info!("SIGHUP: the map comes from etcd and is applied as it changes");
            return;
        }
        state.config.clone()
    };
    // Reading and validating a large map takes a while (a 10,000-node file): it is done
    // without the state lock, so `status`, the metrics and `keys rotate` answer
    // meanwhile; only applying the result holds it. Reloads come from one task, so two
    // never race to apply.
    let started = Instant::now();
    let loaded = load_routing(&config);
    let read = started.elapsed();
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    match loaded {
        Ok(routing) => {
            let nodes = routing.nodes.len();
            let locked = Instant::now();
            apply_routing(&mut state, routing);
            tracing::info!(
                nodes,
                read_ms = read.as_millis() as u64,
                apply_ms = locked.elapsed().as_millis() as u64,
                "routing map reloaded"
            );
        }
        Err(e) => tracing::error!(error = %e, "routing map rejected, the last good map stays"),
    }
}

/// The (address, port) entries XDP steers and the ingress serves: the map's services
/// within `[xdp] anycast_prefixes` (those outside are logged, each time the map is
/// applied) and this node's WireGuard endpoint.
fn service_endpoints(
    config: &Config,
    routing: &RoutingMap,
    native: bool,
) -> std::collections::BTreeMap<flynode_xdp_common::ServiceKey, flynode_xdp_common::ServiceValue> {
    let prefixes = config.xdp.anycast_prefixes.as_deref();
    if let Some(prefixes) = prefixes {
        for (endpoint, service) in crate::xdp::refused_anycast(routing, prefixes) {
            tracing::warn!(
                %endpoint,
                %service,
                "not serving a routing-map anycast address outside [xdp] anycast_prefixes"
            );
        }
    }
    endpoint_entries(routing, &own_wireguard(config, routing, native), prefixes)
}

/// Applies a new routing map to peers, forwarding, reply rules, ingress sockets and the
/// XDP maps, each as a diff against what is in force.
fn apply_routing(state: &mut State, routing: RoutingMap) {
    if let Err(e) = mesh::apply_peers(&state.mesh, &state.config, &routing) {
        tracing::error!(error = %format!("{e:#}"), "applying the reloaded mesh peers failed");
    }
    let report = state.forwarding.apply(&routing, state.mesh.core());
    state.targets.judge(&state.forwarding);
    state.targets_judged = Instant::now();
    state.host.apply(&state.forwarding.local_targets());
    if report.edge_flows_invalidated + report.worker_flows_invalidated > 0 {
        tracing::info!(
            edge = report.edge_flows_invalidated,
            worker = report.worker_flows_invalidated,
            "flows of removed workers forgotten"
        );
    }
    let native = state.xdp.mode() == Some(crate::xdp::AttachedMode::Native);
    let entries = service_endpoints(&state.config, &routing, native);
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
    state.generation += 1;
    state.applied = std::time::SystemTime::now();
}

/// How often the local targets are judged again while the map stays the same
/// (containers come and go): a route lookup per target.
const TARGETS_REJUDGED: std::time::Duration = std::time::Duration::from_secs(5);

/// Once a second: forget idle flows, judge the local targets again every
/// [`TARGETS_REJUDGED`], and end a key rotation's grace period when it is over.
fn housekeeping(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.forwarding.expire();
    if state.targets_judged.elapsed() >= TARGETS_REJUDGED {
        let state = &mut *state;
        state.targets.judge(&state.forwarding);
        state.targets_judged = Instant::now();
    }
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
                    if let Some(fleet) = &state.fleet {
                        let key =
                            flynode_keys::PublicKey::from_bytes(state.mesh.core().public_key());
                        fleet.source.publish(fleet::node_record(
                            &state.config,
                            &key,
                            fleet.endpoint,
                        ));
                    }
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
        SourceConfig::Etcd {
            endpoints, prefix, ..
        } => {
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
        ("udp_rx_dropped", &c.udp_rx_dropped),
        ("forwarded", &c.forwarded),
        ("unrouted", &c.unrouted),
        ("tun_rx_inline", &c.tun_rx_inline),
        ("io_errors", &c.io_errors),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed)))
    .chain(
        [
            ("cookies_sent", &core.counters.cookies_sent),
            ("handshake_initiations", &core.counters.initiations),
            ("sessions_released", &core.counters.sessions_released),
        ]
        .map(|(k, v)| (k.to_owned(), v.load(std::sync::atomic::Ordering::Relaxed))),
    )
    .chain(std::iter::once((
        "handshake_failures".to_owned(),
        core.unreachable().failures,
    )))
    .collect();
    let peers: Vec<mesh::PeerInfo> = core.peers().into_iter().map(Into::into).collect();
    let mesh = MeshStatus {
        interface: state.mesh.tun_name().to_owned(),
        mtu: state.mesh.mtu(),
        listen_port: state.config.wireguard.listen_port,
        rotation: mesh::rotation_status(&state.mesh, state.grace),
        peer_summary: mesh::PeerSummary::of(&peers),
        peers,
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
        key_age_secs: mesh::key_age(&state.key_dir),
        uptime_secs: state.started.elapsed().as_secs(),
        routing: RoutingStatus {
            source,
            nodes: state.routing.nodes.len(),
            services: state.routing.services.len(),
            service_endpoints: state.routing.service_endpoints().count(),
            generation: state.generation,
            applied_unix: state
                .applied
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            state: match &state.fleet {
                None => "file".to_owned(),
                Some(f) => {
                    let h = f.source.health();
                    if h.connected {
                        "connected".to_owned()
                    } else {
                        format!(
                            "disconnected: {} (forwarding on the last good map)",
                            h.detail
                        )
                    }
                }
            },
            revision: state.fleet.as_ref().and_then(|f| f.revision),
            connected: state
                .fleet
                .as_ref()
                .is_none_or(|f| f.source.health().connected),
            rejected: state
                .fleet
                .as_ref()
                .map(|f| f.rejected.clone())
                .unwrap_or_default(),
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
