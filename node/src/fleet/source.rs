//! The etcd source: publishes this node's record under a lease it keeps alive, and
//! watches the prefix, handing every new [`View`] to the daemon.
//!
//! One task owns the etcd session. A session: connect, grant a lease, put the node's
//! record under it, read the whole prefix (the revision it was read at), then watch
//! from the next revision. Any failure (etcd unreachable, a member killed, the watch
//! cancelled because its revision was compacted, the lease expired while
//! disconnected) ends the session; the next one starts after a backoff (100 ms doubling
//! to 2 s) and reads the prefix again, so the daemon always gets a complete view and
//! applies it as a diff. Between sessions the daemon keeps its last good map, and
//! [`Health`] says why the source is down.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions, WatchStream,
};
use tokio::sync::watch;

use super::{Kv, Layout, View};

/// The source's state, for status, metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub connected: bool,
    /// Empty when connected; else why not (the last error).
    pub detail: String,
    /// Since when the state holds.
    pub since: SystemTime,
    /// The revision of the last view handed over.
    pub revision: Option<i64>,
}

/// What the task needs to run a session.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub layout: Layout,
    /// This node's key (`<prefix>nodes/<id>`).
    pub own_key: String,
    pub lease_ttl: Duration,
}

/// The running source. Dropping it stops the task (the lease then expires); call
/// [`Source::shutdown`] first to remove the record at once.
pub struct Source {
    views: watch::Receiver<Option<Arc<View>>>,
    health: Arc<Mutex<Health>>,
    record: watch::Sender<String>,
    task: tokio::task::JoinHandle<()>,
    settings: Settings,
    lease: Arc<Mutex<Option<i64>>>,
}

impl Source {
    /// Starts the task; `record` is this node's record (see [`super::node_record`]).
    pub fn spawn(settings: Settings, record: String) -> Source {
        let (views_tx, views) = watch::channel(None);
        let (record_tx, record_rx) = watch::channel(record);
        let health = Arc::new(Mutex::new(Health {
            connected: false,
            detail: "connecting".to_owned(),
            since: SystemTime::now(),
            revision: None,
        }));
        let lease = Arc::new(Mutex::new(None));
        let task = tokio::spawn(run(
            settings.clone(),
            views_tx,
            Arc::clone(&health),
            record_rx,
            Arc::clone(&lease),
        ));
        Source {
            views,
            health,
            record: record_tx,
            task,
            settings,
            lease,
        }
    }

    /// Views as they come: `changed()` resolves when a newer one is there (views that
    /// arrive while the daemon is busy are coalesced: it gets the latest).
    pub fn views(&self) -> watch::Receiver<Option<Arc<View>>> {
        self.views.clone()
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Publishes a new record for this node (after a key rotation): written at once
    /// when connected, else when the next session starts.
    pub fn publish(&self, record: String) {
        self.record.send_replace(record);
    }

    /// Stops the task and revokes the lease, so the others drop this node now rather
    /// than when the lease expires. Bounded: gives up after `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        self.task.abort();
        let lease = *self.lease.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(lease) = lease else { return };
        let revoke = async {
            let mut client = connect(&self.settings.endpoints).await?;
            client.lease_revoke(lease).await?;
            anyhow::Ok(())
        };
        match tokio::time::timeout(timeout, revoke).await {
            Ok(Ok(())) => tracing::info!("etcd: lease revoked, node record removed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "etcd: could not revoke the lease; the record expires with it")
            }
            Err(_) => {
                tracing::warn!("etcd: revoking the lease timed out; the record expires with it")
            }
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client to the first member, in `endpoints` order, that answers a linearizable read
/// (so has a leader). One endpoint per client on purpose: a client balanced over all
/// endpoints sends some requests to a dead member and fails them, where trying the next
/// member is what keeps the source up when one of three dies.
pub async fn connect(endpoints: &[String]) -> anyhow::Result<Client> {
    let mut errors = Vec::new();
    for endpoint in endpoints {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            // HTTP/2 pings find a dead server (or a cut path) without waiting for TCP.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster refuses instead of serving stale data.
            .with_require_leader(true);
        let probe = async {
            let mut client = Client::connect([endpoint], Some(options)).await?;
            client
                .get("/", Some(GetOptions::new().with_keys_only().with_limit(1)))
                .await?;
            anyhow::Ok(client)
        };
        match probe.await {
            Ok(client) => return Ok(client),
            Err(e) => errors.push(format!("{endpoint}: {}", root_cause(&e))),
        }
    }
    bail!("no etcd endpoint answered ({})", errors.join("; "))
}

/// The innermost error's text: tonic's outer layers repeat themselves.
fn root_cause(e: &anyhow::Error) -> String {
    e.chain()
        .last()
        .map_or_else(String::new, ToString::to_string)
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

async fn run(
    settings: Settings,
    views: watch::Sender<Option<Arc<View>>>,
    health: Arc<Mutex<Health>>,
    mut record: watch::Receiver<String>,
    lease: Arc<Mutex<Option<i64>>>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut logged_down = false;
    loop {
        let mut session = Session {
            settings: &settings,
            views: &views,
            health: &health,
            record: &mut record,
            lease: &lease,
            established: false,
        };
        let result = session.run().await;
        let established = session.established;
        let error = match result {
            Ok(()) => return, // the daemon is gone
            Err(e) => format!("{e:#}"),
        };
        if established {
            backoff = BACKOFF_MIN;
            logged_down = false;
        }
        {
            let mut h = health.lock().unwrap_or_else(PoisonError::into_inner);
            if h.connected {
                h.since = SystemTime::now();
            }
            h.connected = false;
            h.detail = error.clone();
        }
        // Logged once per outage, not once per retry.
        if !logged_down {
            tracing::warn!(
                error = %error,
                "etcd unreachable or session lost; forwarding continues on the last good map, retrying"
            );
            logged_down = true;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

struct Session<'a> {
    settings: &'a Settings,
    views: &'a watch::Sender<Option<Arc<View>>>,
    health: &'a Mutex<Health>,
    record: &'a mut watch::Receiver<String>,
    lease: &'a Mutex<Option<i64>>,
    /// Whether this session got as far as handing over a view.
    established: bool,
}

impl Session<'_> {
    /// Runs until an error; `Ok` only when the daemon dropped the source.
    async fn run(&mut self) -> anyhow::Result<()> {
        let s = self.settings;
        let mut client = connect(&s.endpoints).await?;
        let ttl = i64::try_from(s.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let lease = client
            .lease_grant(ttl, None)
            .await
            .context("granting the node's lease")?
            .id();
        *self.lease.lock().unwrap_or_else(PoisonError::into_inner) = Some(lease);
        let (mut keeper, mut keepalives) = client
            .lease_keep_alive(lease)
            .await
            .context("keeping the node's lease alive")?;
        let record = self.record.borrow_and_update().clone();
        client
            .put(
                s.own_key.as_str(),
                record,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .with_context(|| format!("publishing this node's record {}", s.own_key))?;
        tracing::info!(key = %s.own_key, lease = format!("{lease:x}"), ttl_secs = ttl, "etcd: node record published");

        let mut keepalive = tokio::time::interval(s.lease_ttl / 3);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // (Re)read the whole prefix, then watch from the next revision.
            let (mut view, mut stream) = self.resync(&mut client).await?;
            loop {
                tokio::select! {
                    message = stream.message() => {
                        let Some(response) = message.context("etcd watch")? else {
                            bail!("the etcd watch stream ended");
                        };
                        if response.canceled() {
                            if response.compact_revision() > 0 {
                                tracing::info!(
                                    compacted = response.compact_revision(),
                                    "etcd: watched revision compacted; reading the prefix again"
                                );
                                break;
                            }
                            bail!("etcd cancelled the watch: {}", response.cancel_reason());
                        }
                        if response.events().is_empty() {
                            continue; // created, or a progress notification
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let (key, record) = Kv::of(kv);
                            match event.event_type() {
                                EventType::Put => {
                                    view.records.insert(key, record);
                                }
                                EventType::Delete => {
                                    view.records.remove(&key);
                                }
                            }
                            view.revision = view.revision.max(kv.mod_revision());
                        }
                        if let Some(header) = response.header() {
                            view.revision = view.revision.max(header.revision());
                        }
                        self.hand_over(&view);
                    }
                    _ = keepalive.tick() => {
                        keeper.keep_alive().await.context("sending a lease keepalive")?;
                    }
                    answer = keepalives.message() => {
                        match answer.context("etcd lease keepalive")? {
                            Some(a) if a.ttl() > 0 => {}
                            _ => bail!("the node's lease expired; publishing the record again"),
                        }
                    }
                    changed = self.record.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        let record = self.record.borrow_and_update().clone();
                        client
                            .put(s.own_key.as_str(), record, Some(PutOptions::new().with_lease(lease)))
                            .await
                            .context("publishing this node's new record")?;
                        tracing::info!(key = %s.own_key, "etcd: node record updated");
                    }
                    _ = self.views.closed() => return Ok(()),
                }
            }
        }
    }

    async fn resync(&mut self, client: &mut Client) -> anyhow::Result<(View, WatchStream)> {
        let prefix = self.settings.layout.prefix();
        let view = super::read_view(client, &self.settings.layout).await?;
        let revision = view.revision;
        let stream = client
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await
            .with_context(|| format!("watching {prefix} in etcd"))?;
        {
            let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            if !h.connected {
                h.since = SystemTime::now();
                tracing::info!(
                    revision,
                    records = view.records.len(),
                    "etcd: connected, prefix read, watching"
                );
            }
            h.connected = true;
            h.detail.clear();
        }
        self.hand_over(&view);
        Ok((view, stream))
    }

    fn hand_over(&mut self, view: &View) {
        self.established = true;
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .revision = Some(view.revision);
        self.views.send_replace(Some(Arc::new(view.clone())));
    }
}
