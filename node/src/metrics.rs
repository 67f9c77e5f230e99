//! The Prometheus endpoint: `GET /metrics` on `[metrics] listen`, text format 0.0.4.
//!
//! Nothing here runs per packet. The data path already counts everything in plain
//! atomics (the XDP program's per-CPU maps, the tunnel's per-peer counters, the
//! forwarding engine's node-wide and per-service counters); a scrape takes one daemon
//! [`Status`] — the snapshot `flynode status` shows, built under the state lock — and
//! the lock is released before anything is rendered or written to the socket. The
//! snapshot goes into a recorder made for this scrape alone, so a peer or service that
//! left the routing map leaves the output too, and concurrent scrapes share nothing.
//!
//! Names follow the Prometheus conventions: `flynode_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` for counters, lowercase label values. The list is in README.md
//! ("Metrics").
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use flynode_xdp_common::{Counter, Verdict};
use metrics::{Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::control::Status;

mod samples;
pub use samples::Samples;

/// What Prometheus expects for the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The largest request head read; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// A connection that has not finished its request and read its answer by then is
/// dropped.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes answered at once; more wait. Each takes the daemon's state lock once.
const CONCURRENT_SCRAPES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics: cannot listen on {listen}: {source} (set [metrics] listen to a free address, or enabled = false)"
    )]
    Listen {
        listen: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The bound endpoint; [`MetricsServer::serve`] answers on it.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `listen`, so that a taken address fails the daemon's start with one clear
    /// line instead of a scrape target that silently never answers.
    pub async fn bind(listen: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| MetricsError::Listen { listen, source })?;
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers scrapes forever. `snapshot` is called once per scrape, on a blocking
    /// thread (it takes the daemon's state lock).
    pub async fn serve<F>(self, snapshot: F)
    where
        F: Fn() -> anyhow::Result<Status> + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            snapshot,
            scrapes: Semaphore::new(CONCURRENT_SCRAPES),
            snapshot_failing: Failing::default(),
        });
        let accept_failing = Failing::default();
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => {
                    accept_failing.recovered("accepting connections");
                    stream
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    accept_failing.failed("accepting connections", &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                match tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &shared)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended early"),
                    Err(_) => tracing::debug!("metrics connection timed out"),
                }
            });
        }
    }
}

struct Shared<F> {
    snapshot: F,
    scrapes: Semaphore,
    snapshot_failing: Failing,
}

/// A failure that is logged when it starts and when it ends, not on every request
/// while it lasts (a scraper asks every few seconds).
#[derive(Default)]
struct Failing(AtomicBool);

impl Failing {
    fn failed(&self, what: &str, error: &dyn fmt::Display) {
        if !self.0.swap(true, Relaxed) {
            tracing::warn!(%error, "metrics: {what} failed (not logged again until it works)");
        }
    }

    fn recovered(&self, what: &str) {
        if self.0.swap(false, Relaxed) {
            tracing::info!("metrics: {what} works again");
        }
    }
}

async fn answer<F>(mut stream: TcpStream, shared: &Arc<Shared<F>>) -> io::Result<()>
where
    F: Fn() -> anyhow::Result<Status> + Send + Sync + 'static,
{
    let Some(head) = read_head(&mut stream).await? else {
        return Ok(());
    };
    let reply = match route(&head) {
        Route::Metrics { head_only } => {
            let body = scrape(shared).await;
            match body {
                Ok(body) => Reply::new("200 OK", CONTENT_TYPE, body.into_bytes()),
                Err(e) => Reply::text("500 Internal Server Error", &format!("{e:#}\n")),
            }
            .head_only(head_only)
        }
        Route::NotFound => Reply::text("404 Not Found", "not found: the metrics are at /metrics\n"),
        Route::MethodNotAllowed => {
            Reply::text("405 Method Not Allowed", "only GET and HEAD\n").allow("GET, HEAD")
        }
        Route::BadRequest => Reply::text("400 Bad Request", "not an HTTP/1 request\n"),
    };
    stream.write_all(&reply.to_bytes()).await?;
    stream.shutdown().await
}

/// One snapshot, rendered; the state lock is held only inside `snapshot`.
async fn scrape<F>(shared: &Arc<Shared<F>>) -> anyhow::Result<String>
where
    F: Fn() -> anyhow::Result<Status> + Send + Sync + 'static,
{
    let _permit = shared.scrapes.acquire().await?;
    let worker = Arc::clone(shared);
    let rendered = tokio::task::spawn_blocking(move || {
        let status = (worker.snapshot)()?;
        Ok::<_, anyhow::Error>(render(&status, flynode_keys::unix_now()))
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    match &rendered {
        Ok(_) => shared
            .snapshot_failing
            .recovered("taking a status snapshot"),
        Err(e) => shared
            .snapshot_failing
            .failed("taking a status snapshot", &format_args!("{e:#}")),
    }
    rendered
}

/// Reads up to the end of the request head (the blank line). `None`: the peer closed
/// without sending anything (a TCP health check).
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        head.extend_from_slice(&buf[..n]);
        if head_complete(&head) {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
}

fn head_complete(head: &[u8]) -> bool {
    head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// What the request line asks for. Total: every byte string gets an answer.
fn route(head: &[u8]) -> Route {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics {
            head_only: method == "HEAD",
        },
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    }
}

/// An HTTP/1.1 response that closes the connection (a scrape is one request).
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    head_only: bool,
    allow: Option<&'static str>,
}

impl Reply {
    fn new(status: &'static str, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type,
            body,
            head_only: false,
            allow: None,
        }
    }

    fn text(status: &'static str, body: &str) -> Reply {
        Reply::new(
            status,
            "text/plain; charset=utf-8",
            body.as_bytes().to_vec(),
        )
    }

    fn head_only(mut self, head_only: bool) -> Reply {
        self.head_only = head_only;
        self
    }

    fn allow(mut self, methods: &'static str) -> Reply {
        self.allow = Some(methods);
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        if !self.head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// A scrape's recorder: values are written once each, with their help text.
struct Exposition {
    recorder: PrometheusRecorder,
    /// Families already described (describing costs a lock and a map update).
    described: std::cell::RefCell<std::collections::HashSet<String>>,
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Exposition {
    fn new() -> Exposition {
        Exposition {
            recorder: PrometheusBuilder::new().build_recorder(),
            described: Default::default(),
        }
    }

    /// Whether `name` still needs its help text (true the first time only).
    fn undescribed(&self, name: &str) -> bool {
        let mut described = self.described.borrow_mut();
        !described.contains(name) && described.insert(name.to_owned())
    }

    fn key(name: &str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, (*v).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    fn counter(&self, name: &str, help: &str, labels: &[(&'static str, &str)], value: u64) {
        if self.undescribed(name) {
            self.recorder.describe_counter(
                KeyName::from(name.to_owned()),
                None,
                SharedString::from(help.to_owned()),
            );
        }
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
            .absolute(value);
    }

    fn gauge(&self, name: &str, help: &str, labels: &[(&'static str, &str)], value: f64) {
        if self.undescribed(name) {
            self.recorder.describe_gauge(
                KeyName::from(name.to_owned()),
                None,
                SharedString::from(help.to_owned()),
            );
        }
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
            .set(value);
    }

    fn flag(&self, name: &str, help: &str, labels: &[(&'static str, &str)], on: bool) {
        self.gauge(name, help, labels, if on { 1.0 } else { 0.0 });
    }

    fn render(self) -> String {
        self.recorder.handle().render()
    }
}

/// The exposition of one status snapshot; `now` (unix seconds) turns timestamps into
/// ages.
pub fn render(s: &Status, now: u64) -> String {
    let m = Exposition::new();
    node(&m, s);
    routing(&m, s);
    xdp(&m, s);
    tunnel(&m, s, now);
    forwarding(&m, s);
    m.render()
}

fn node(m: &Exposition, s: &Status) {
    m.gauge(
        "flynode_info",
        "Always 1; the labels describe the node and its current key.",
        &[
            ("node", &s.node_id),
            ("region", &s.region),
            ("version", &s.version),
            ("key", &s.public_key_fingerprint),
        ],
        1.0,
    );
    m.gauge(
        "flynode_uptime_seconds",
        "Seconds since the daemon started.",
        &[],
        s.uptime_secs as f64,
    );
    if let Some(age) = s.key_age_secs {
        m.gauge(
            "flynode_key_age_seconds",
            "Seconds since the current WireGuard key was made (generated or rotated in).",
            &[],
            age as f64,
        );
    }
    let r = &s.mesh.rotation;
    m.flag(
        "flynode_key_rotation_in_progress",
        "1 while the previous key is still accepted after a rotation.",
        &[],
        r.previous.is_some(),
    );
    if r.previous.is_some() {
        m.gauge(
            "flynode_key_rotation_peers_moved",
            "Peers that have moved to the new key during the rotation.",
            &[],
            r.moved as f64,
        );
        m.gauge(
            "flynode_key_rotation_peers",
            "Peers that must move to the new key.",
            &[],
            r.total as f64,
        );
        if let Some(left) = r.grace_left_secs {
            m.gauge(
                "flynode_key_rotation_grace_remaining_seconds",
                "Seconds until the previous key is wiped regardless.",
                &[],
                left as f64,
            );
        }
    }
}

fn routing(m: &Exposition, s: &Status) {
    let r = &s.routing;
    m.gauge(
        "flynode_routing_generation",
        "Routing maps applied since the daemon started (1 = the initial one).",
        &[],
        r.generation as f64,
    );
    if r.applied_unix > 0 {
        m.gauge(
            "flynode_routing_last_apply_timestamp_seconds",
            "When the current routing map was applied (Unix time).",
            &[],
            r.applied_unix as f64,
        );
    }
    if let Some(revision) = r.revision {
        m.gauge(
            "flynode_routing_revision",
            "The etcd revision the current routing map was read at.",
            &[],
            revision as f64,
        );
    }
    m.flag(
        "flynode_control_plane_connected",
        "1 while the routing source is connected and watching (a file: always 1).",
        &[],
        r.connected,
    );
    m.gauge(
        "flynode_routing_rejected_records",
        "Records of the routing source rejected by validation (the rest applies).",
        &[],
        r.rejected.len() as f64,
    );
    for (name, help, n) in [
        (
            "flynode_routing_nodes",
            "Nodes in the routing map.",
            r.nodes,
        ),
        (
            "flynode_routing_services",
            "Services in the routing map.",
            r.services,
        ),
        (
            "flynode_routing_service_endpoints",
            "(anycast address, port) pairs in the XDP services map.",
            r.service_endpoints,
        ),
    ] {
        m.gauge(name, help, &[], n as f64);
    }
}

fn xdp(m: &Exposition, s: &Status) {
    let x = &s.xdp;
    m.gauge(
        "flynode_xdp_info",
        "Always 1; the labels say where and how the XDP program runs.",
        &[
            ("interface", &x.interface),
            ("mode", &x.mode),
            ("backend", &x.backend),
        ],
        1.0,
    );
    for (verdict, n) in &x.verdicts {
        m.counter(
            "flynode_xdp_packets_total",
            "Frames the XDP program handled, by verdict (summed over CPUs).",
            &[("verdict", verdict)],
            *n,
        );
    }
    // Every counter slot, in the family of its verdict, so that each family sums to
    // its verdict's total.
    for c in Counter::ALL {
        let Some(n) = x.counters.get(c.name()) else {
            continue;
        };
        let (family, help, prefix) = match c.verdict() {
            Verdict::Userspace => (
                "flynode_xdp_redirects_total",
                "Frames redirected to an AF_XDP socket, by kind.",
                "userspace_",
            ),
            Verdict::Pass => (
                "flynode_xdp_passes_total",
                "Frames passed to the kernel's stack, by reason.",
                "pass_",
            ),
            Verdict::Drop => (
                "flynode_xdp_drops_total",
                "Frames dropped by the XDP program, by reason.",
                "drop_",
            ),
        };
        let reason = c.name().strip_prefix(prefix).unwrap_or(c.name());
        m.counter(family, help, &[("reason", reason)], *n);
    }
    for (name, n) in &x.ingress {
        m.counter(
            &format!("flynode_ingress_{name}_total"),
            &format!("Ingress counter {name} of `flynode status`."),
            &[],
            *n,
        );
    }
    m.gauge(
        "flynode_ingress_socket_failures",
        "Service endpoints whose socket could not be opened.",
        &[],
        x.socket_failures.len() as f64,
    );
    let names = service_names(s);
    for (id, t) in &x.services {
        let Some(service) = names.get(id.as_str()) else {
            continue;
        };
        m.counter(
            "flynode_service_received_datagrams_total",
            "Service datagrams received by this node as an edge.",
            &[("service", service)],
            t.datagrams,
        );
        m.counter(
            "flynode_service_received_bytes_total",
            "UDP payload bytes of the service datagrams received as an edge.",
            &[("service", service)],
            t.bytes,
        );
    }
}

/// Service id (as `flynode status` keys it) → name, for the services in the map.
fn service_names(s: &Status) -> std::collections::BTreeMap<String, &str> {
    s.forwarding
        .services
        .iter()
        .map(|(name, f)| (f.id.to_string(), name.as_str()))
        .collect()
}

fn tunnel(m: &Exposition, s: &Status, now: u64) {
    let mesh = &s.mesh;
    m.gauge(
        "flynode_tunnel_mtu_bytes",
        "MTU of the mesh's TUN device.",
        &[],
        f64::from(mesh.mtu),
    );
    // Fleet-level: always there, whatever [metrics] max_peer_series leaves of the
    // per-peer series below.
    let sum = &mesh.peer_summary;
    for (state, n) in [
        ("configured", sum.configured),
        ("warm", sum.warm),
        ("active", sum.active),
        ("with_session", sum.with_session),
        ("unreachable", sum.unreachable),
    ] {
        m.gauge(
            "flynode_peers",
            "Peers of the mesh by state: configured (in the map), warm (kept up without traffic), active (holding session state), with_session, unreachable (not answering handshakes).",
            &[("state", state)],
            n as f64,
        );
    }
    for p in &mesh.peers {
        let peer = [("peer", p.node.as_str())];
        for (name, help, n) in [
            (
                "flynode_peer_rx_bytes_total",
                "Bytes received from the peer (decrypted).",
                p.rx_bytes,
            ),
            (
                "flynode_peer_tx_bytes_total",
                "Bytes sent to the peer (before encryption).",
                p.tx_bytes,
            ),
            (
                "flynode_peer_rx_packets_total",
                "Packets received from the peer.",
                p.rx_packets,
            ),
            (
                "flynode_peer_tx_packets_total",
                "Packets sent to the peer.",
                p.tx_packets,
            ),
            (
                "flynode_peer_handshakes_total",
                "Completed WireGuard handshakes with the peer.",
                p.handshakes,
            ),
            (
                "flynode_peer_decryption_failures_total",
                "Packets from the peer that failed to decrypt.",
                p.decrypt_failures,
            ),
        ] {
            m.counter(name, help, &peer, n);
        }
        m.flag(
            "flynode_peer_session_up",
            "1 while a WireGuard session with the peer is established.",
            &peer,
            p.session_up,
        );
        // Absent until the first handshake: an age of "never" has no number.
        if let Some(t) = p.last_handshake_unix {
            m.gauge(
                "flynode_peer_last_handshake_timestamp_seconds",
                "When the last handshake with the peer completed (Unix time).",
                &peer,
                t as f64,
            );
            m.gauge(
                "flynode_peer_last_handshake_age_seconds",
                "Seconds since the last handshake with the peer completed.",
                &peer,
                now.saturating_sub(t) as f64,
            );
        }
    }
    for (reason, n) in &mesh.drops {
        m.counter(
            "flynode_tunnel_drops_total",
            "Datagrams and packets the tunnel dropped, by reason.",
            &[("reason", reason)],
            *n,
        );
    }
    for (name, n) in &mesh.counters {
        m.counter(
            &format!("flynode_tunnel_{name}_total"),
            &format!("Tunnel driver counter {name} of `flynode status`."),
            &[],
            *n,
        );
    }
}

fn forwarding(m: &Exposition, s: &Status) {
    let f = &s.forwarding;
    for (side, flows) in [("edge", &f.edge_flows), ("worker", &f.worker_flows)] {
        let labels = [("side", side)];
        m.gauge(
            "flynode_flows_active",
            "Flows in the flow table.",
            &labels,
            flows.active as f64,
        );
        m.gauge(
            "flynode_flows_capacity",
            "Flows the flow table holds at most.",
            &labels,
            flows.capacity as f64,
        );
        for (name, help, n) in [
            (
                "flynode_flows_inserted_total",
                "Flows created.",
                flows.inserted,
            ),
            (
                "flynode_flows_evicted_total",
                "Flows pushed out of a full table (least recently used first).",
                flows.evicted,
            ),
            (
                "flynode_flows_expired_total",
                "Flows forgotten after the idle timeout.",
                flows.expired,
            ),
            (
                "flynode_flows_invalidated_total",
                "Flows forgotten because a routing change removed their worker or container.",
                flows.invalidated,
            ),
        ] {
            m.counter(name, help, &labels, n);
        }
    }
    for (family, n) in [("ipv4", f.max_payload_v4), ("ipv6", f.max_payload_v6)] {
        m.gauge(
            "flynode_forwarding_max_payload_bytes",
            "The largest client datagram payload that fits the mesh MTU.",
            &[("family", family)],
            n as f64,
        );
    }
    for (service, t) in &f.services {
        for (direction, n) in &t.forwarded {
            m.counter(
                "flynode_forwarded_datagrams_total",
                "A service's datagrams passed on, by hop (client → edge → worker → container and back).",
                &[("service", service), ("direction", direction)],
                *n,
            );
        }
        for (reason, n) in &t.dropped {
            m.counter(
                "flynode_dropped_datagrams_total",
                "A service's datagrams dropped, by reason.",
                &[("service", service), ("reason", reason)],
                *n,
            );
        }
        m.counter(
            "flynode_forwarded_without_live_worker_total",
            "A service's datagrams sent to a worker although none looked alive.",
            &[("service", service)],
            t.no_live_worker,
        );
    }
    let names = service_names(s);
    for (id, workers) in &f.workers {
        let Some(service) = names.get(id.as_str()) else {
            continue;
        };
        for w in workers {
            let labels = [("service", *service), ("worker", w.node.as_str())];
            m.flag(
                "flynode_service_worker_healthy",
                "1 while the edge may choose the worker (its peer is alive, or it is this node).",
                &labels,
                w.healthy,
            );
            m.gauge(
                "flynode_service_worker_weight",
                "The worker's weight in the service.",
                &labels,
                f64::from(w.weight),
            );
        }
    }
    for (name, n) in &f.counters {
        m.counter(
            &format!("flynode_forwarding_{name}_total"),
            &format!(
                "Forwarding counter {name} of `flynode status` (node-wide, with datagrams no service can be named for)."
            ),
            &[],
            *n,
        );
    }
}

#[cfg(test)]
#[path = "metrics/tests.rs"]
mod tests;

/// Keeps the per-peer series of at most `max` peers (0: none): those with a session
/// first, then warm ones, then by name, so that a scrape of a node with thousands of
/// configured peers stays small and still shows the ones that matter. The fleet-level
/// `flynode_peers` gauges count all of them.
pub fn limit_peer_series(s: &mut Status, max: usize) {
    let peers = &mut s.mesh.peers;
    if peers.len() <= max {
        return;
    }
    peers.sort_by(|a, b| {
        (b.session_up, b.warm)
            .cmp(&(a.session_up, a.warm))
            .then_with(|| a.node.cmp(&b.node))
    });
    peers.truncate(max);
}
