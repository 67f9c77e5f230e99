//! A real etcd (Debian's `etcd-server`, 3.4) for the tests: 1 or 3 members running inside
//! a test's hub namespace (see [`crate::mesh::Lan`]), each listening on its own address
//! on the hub's bridge `br0`, so that flynode daemons in the node namespaces reach it over
//! the LAN exactly as they would a real cluster.
//!
//! Addresses: member `i` is 198.18.10.(250 + i) on br0 (client port 2379, peer port
//! 2380). The LAN's hosts are 198.18.10.N for small N and the client host is .100, so
//! these never collide.
//!
//! Every member has its own temporary directory (data dir `data/`, everything it prints
//! in `etcd.log`). Members are killed by their PID (processes this fixture started) when
//! the cluster is dropped, including when a test panics; the data is deleted after that.
//! Declare the cluster after the `Lan`/`Topology` whose hub it runs in, so that it is
//! dropped first.
//!
//! The key-value helpers run `etcdctl` (API v3) inside the hub namespace. They target the
//! running members ([`EtcdCluster::client`]) or one member ([`EtcdCluster::via`]).
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use flynode::netns::{ChildGuard, Netns, wait_for};

pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// The bridge in the hub namespace the members' addresses go on.
pub const BRIDGE: &str = "br0";
/// How long [`EtcdCluster::start`] and [`EtcdCluster::restart`] wait for health.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(15);
/// etcdctl's command timeout for the key-value helpers unless [`EtcdClient::timeout`]
/// says otherwise.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The timeout of the health probes while waiting for health.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Member `i`'s address on the hub's bridge.
pub fn member_addr(i: usize) -> Ipv4Addr {
    assert!(i < 3, "at most 3 etcd members (198.18.10.250-252)");
    Ipv4Addr::new(198, 18, 10, 250 + i as u8)
}

fn member_name(i: usize) -> String {
    format!("m{i}")
}

fn client_url(i: usize) -> String {
    format!("http://{}:{CLIENT_PORT}", member_addr(i))
}

fn peer_url(i: usize) -> String {
    format!("http://{}:{PEER_PORT}", member_addr(i))
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

struct Member {
    // Declared before `dir`: the process dies before its data directory is removed.
    child: Option<ChildGuard>,
    dir: tempfile::TempDir,
}

impl Member {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn note(&self, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(f, "=== harness: {line} ===");
        }
    }
}

/// An etcd cluster in a hub namespace. See the module documentation.
pub struct EtcdCluster {
    members: Vec<Member>,
    hub: String,
    token: String,
}

impl EtcdCluster {
    /// Starts `members` (1 or 3) members in `hub`, which must have the bridge `br0`
    /// (as [`crate::mesh::Lan`]'s hub does), and waits until every one is healthy.
    ///
    /// For a test that kills etcd and brings it back ("forwarding survives etcd going
    /// away"), start one member and use [`Self::kill`] and [`Self::restart`]: the data
    /// directory is kept, so the restarted member has everything written before.
    pub fn start(hub: &Netns, members: usize) -> EtcdCluster {
        assert!(
            members == 1 || members == 3,
            "an etcd test cluster has 1 or 3 members, not {members}"
        );
        for program in ["etcd", "etcdctl"] {
            assert!(
                crate::mesh::have(program),
                "{program} is not installed (scripts/setup.sh installs etcd-server and etcd-client)"
            );
        }
        hub.ip(&["link", "set", "lo", "up"]).expect("hub lo up");
        for i in 0..members {
            hub.ip(&[
                "addr",
                "replace",
                &format!("{}/24", member_addr(i)),
                "dev",
                BRIDGE,
            ])
            .unwrap_or_else(|e| panic!("etcd member address on the hub's {BRIDGE}: {e}"));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let token = format!(
            "flynode-test-{}-{}-{nanos}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = EtcdCluster {
            members: (0..members)
                .map(|_| Member {
                    child: None,
                    dir: tempfile::Builder::new()
                        .prefix("flynode-etcd-")
                        .tempdir()
                        .expect("etcd tempdir"),
                })
                .collect(),
            hub: hub.name().to_owned(),
            token,
        };
        for i in 0..members {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy();
        cluster
    }

    /// The cluster token, unique to this cluster: it is on every member's command line.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, running or not ("http://198.18.10.250:2379", ...): what
    /// a flynode node's `[source]` is configured with.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(client_url).collect()
    }

    /// Member `i`'s client URL.
    pub fn member_endpoint(&self, i: usize) -> String {
        self.check(i);
        client_url(i)
    }

    /// The client URLs of the members this fixture has running.
    pub fn running_endpoints(&self) -> Vec<String> {
        (0..self.len())
            .filter(|&i| self.is_running(i))
            .map(client_url)
            .collect()
    }

    /// Whether member `i` is running as far as this fixture knows: started, and not killed
    /// or stopped by it (a member that crashes is noticed while waiting for health).
    pub fn is_running(&self, i: usize) -> bool {
        self.check(i);
        self.members[i].child.is_some()
    }

    /// Member `i`'s PID while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.check(i);
        self.members[i].child.as_ref().and_then(ChildGuard::id)
    }

    /// SIGKILLs member `i` (by the PID this fixture started) and reaps it. Its data
    /// directory stays for [`Self::restart`].
    pub fn kill(&mut self, i: usize) {
        self.check(i);
        let member = &mut self.members[i];
        let mut child = member
            .child
            .take()
            .unwrap_or_else(|| panic!("etcd member {i} is not running"));
        if let Some(c) = child.child_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        member.note("killed (SIGKILL)");
    }

    /// Starts the killed member `i` again on its data directory
    /// (`--initial-cluster-state existing`) and waits until it is healthy, which needs a
    /// quorum of members running (for the first of several members brought back, use
    /// [`Self::restart_no_wait`]).
    pub fn restart(&mut self, i: usize) {
        self.restart_no_wait(i);
        let ok = wait_for(HEALTHY_WITHIN, || {
            self.check_alive();
            self.via(i)
                .timeout(PROBE_TIMEOUT)
                .is_healthy()
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "etcd member {i} not healthy {HEALTHY_WITHIN:?} after its restart; logs:\n{}",
            self.logs()
        );
    }

    /// As [`Self::restart`], without waiting for health.
    pub fn restart_no_wait(&mut self, i: usize) {
        self.check(i);
        assert!(
            !self.is_running(i),
            "etcd member {i} is running: kill it before restarting it"
        );
        self.spawn(i, "existing");
    }

    /// Stops every running member: SIGTERM, then SIGKILL after 5 s.
    pub fn stop_all(&mut self) {
        for member in &mut self.members {
            if let Some(child) = member.child.take() {
                let status = child.terminate(Duration::from_secs(5));
                member.note(&format!("stopped: {status:?}"));
            }
        }
    }

    /// A client for the running members.
    pub fn client(&self) -> EtcdClient<'_> {
        EtcdClient {
            cluster: self,
            endpoints: self.running_endpoints(),
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// A client that talks to member `i` only.
    pub fn via(&self, i: usize) -> EtcdClient<'_> {
        EtcdClient {
            cluster: self,
            endpoints: vec![self.member_endpoint(i)],
            timeout: CLIENT_TIMEOUT,
        }
    }

    /// Waits until every running member is healthy (it serves a linearizable read, so
    /// the cluster has a leader and a quorum).
    pub fn wait_healthy(&mut self) {
        let ok = wait_for(HEALTHY_WITHIN, || {
            self.check_alive();
            (0..self.len())
                .filter(|&i| self.is_running(i))
                .all(|i| self.via(i).timeout(PROBE_TIMEOUT).is_healthy())
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "etcd cluster ({} members) not healthy within {HEALTHY_WITHIN:?}; logs:\n{}",
            self.len(),
            self.logs()
        );
    }

    /// The member the running members report as leader, if they agree on one.
    pub fn leader(&self) -> Option<usize> {
        let mut leaders = (0..self.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.via(i).timeout(PROBE_TIMEOUT).status().ok());
        let first = leaders.next()??;
        if first.leader == 0 || !leaders.all(|s| s.is_some_and(|s| s.leader == first.leader)) {
            return None;
        }
        (0..self.len()).find(|&i| {
            self.is_running(i)
                && self
                    .via(i)
                    .status()
                    .is_ok_and(|s| s.member_id == first.leader)
        })
    }

    /// Everything every member printed, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let log = std::fs::read_to_string(m.log_path()).unwrap_or_default();
            let _ = writeln!(
                out,
                "--- etcd {} ({}) ---\n{log}",
                member_name(i),
                member_addr(i)
            );
        }
        out
    }

    // Shortcuts for `self.client()`.

    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.client().put(key, value)
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.client().get(key)
    }

    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.client().get_prefix(prefix)
    }

    pub fn delete(&self, key: &str) -> u64 {
        self.client().delete(key)
    }

    pub fn delete_prefix(&self, prefix: &str) -> u64 {
        self.client().delete_prefix(prefix)
    }

    pub fn revision(&self) -> i64 {
        self.client().revision()
    }

    pub fn compact(&self, revision: i64) {
        self.client().compact(revision)
    }

    pub fn compact_all(&self) -> i64 {
        self.client().compact_all()
    }

    fn check(&self, i: usize) {
        assert!(
            i < self.len(),
            "no etcd member {i} (the cluster has {})",
            self.len()
        );
    }

    /// Panics, with the logs, when a member this fixture considers running has exited.
    fn check_alive(&mut self) {
        for i in 0..self.len() {
            let exited = match self.members[i].child.as_mut().map(ChildGuard::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.members[i].child = None;
                self.members[i].note(&format!("exited: {status}"));
                panic!(
                    "etcd member {i} exited unexpectedly ({status}); logs:\n{}",
                    self.logs()
                );
            }
        }
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial_cluster = (0..self.len())
            .map(|j| format!("{}={}", member_name(j), peer_url(j)))
            .collect::<Vec<_>>()
            .join(",");
        let member = &self.members[i];
        let data = member.dir.path().join("data");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hub, "etcd"])
            .args(["--name", &member_name(i)])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url(i)])
            .args(["--advertise-client-urls", &client_url(i)])
            .args(["--listen-peer-urls", &peer_url(i)])
            .args(["--initial-advertise-peer-urls", &peer_url(i)])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // Fast elections for failover tests (defaults: 100 ms / 1000 ms).
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // 3.4 defaults to capnslog at info; zap at warn keeps the log readable.
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ]);
        clear_etcd_env(&mut cmd);
        member.note(&format!("starting ({state}): {cmd:?}"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(member.log_path())
            .expect("etcd log");
        let child = ChildGuard::spawn(
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log),
        )
        .unwrap_or_else(|e| panic!("spawn etcd member {i}: {e}"));
        self.members[i].child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // SIGKILL and reap every member (ChildGuard's drop), before the data goes.
        for m in &mut self.members {
            drop(m.child.take());
        }
        // The addresses go with the hub namespace; remove them in case it lives on.
        for i in 0..self.members.len() {
            let _ = Command::new("ip")
                .args(["-n", &self.hub, "addr", "del"])
                .arg(format!("{}/24", member_addr(i)))
                .args(["dev", BRIDGE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Neither etcd nor etcdctl may see the caller's ETCD*/ETCDCTL* variables: etcd refuses
/// to start when one shadows a flag, and they would change what etcdctl talks to.
fn clear_etcd_env(cmd: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(name);
        }
    }
}

/// One member's `etcdctl endpoint status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    pub member_id: u64,
    /// The member ID of the leader this member follows (0: none).
    pub leader: u64,
    pub raft_term: u64,
    pub revision: i64,
}

/// `etcdctl` against some endpoints of a cluster. Every call is a single attempt, bounded
/// by [`Self::timeout`] (5 s unless set): the `try_` forms return etcdctl's error, the
/// others panic with it and the members' logs.
pub struct EtcdClient<'a> {
    cluster: &'a EtcdCluster,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl EtcdClient<'_> {
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Sets etcdctl's command timeout (and its dial timeout, to at most that): a short
    /// one makes "etcd is down" checks quick.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `etcdctl <args>` in the hub namespace; `Ok(stdout)` on success.
    pub fn etcdctl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        if self.endpoints.is_empty() {
            return Err("no etcd member is running".into());
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.cluster.hub, "etcdctl"]);
        clear_etcd_env(&mut cmd);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .arg(format!(
                "--dial-timeout={}ms",
                self.timeout.min(Duration::from_secs(2)).as_millis()
            ))
            .arg(format!("--command-timeout={}ms", self.timeout.as_millis()))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn etcdctl: {e}"))?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input.as_bytes())
                .map_err(|e| format!("etcdctl stdin: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "etcdctl {args:?} against {:?} failed ({}): {}",
                self.endpoints,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        String::from_utf8(out.stdout).map_err(|e| format!("etcdctl output: {e}"))
    }

    fn json(&self, args: &[&str], stdin: Option<&str>) -> Result<serde_json::Value, String> {
        let mut with_json = vec!["-w", "json"];
        with_json.extend_from_slice(args);
        let out = self.etcdctl(&with_json, stdin)?;
        serde_json::from_str(&out).map_err(|e| format!("etcdctl {args:?} printed {out:?}: {e}"))
    }

    fn or_panic<T>(&self, r: Result<T, String>) -> T {
        r.unwrap_or_else(|e| panic!("{e}\netcd logs:\n{}", self.cluster.logs()))
    }

    /// Puts `value` (any text: multi-line, empty, starting with '-'); returns the
    /// revision of the write.
    pub fn try_put(&self, key: &str, value: &str) -> Result<i64, String> {
        // The value goes on stdin (no quoting, no argument size limit), except an empty
        // one, which etcdctl only takes as an argument.
        let v = if value.is_empty() {
            self.json(&["put", "--", key, ""], None)?
        } else {
            self.json(&["put", "--", key], Some(value))?
        };
        header_revision(&v)
    }

    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.or_panic(self.try_put(key, value))
    }

    pub fn try_get(&self, key: &str) -> Result<Option<String>, String> {
        let v = self.json(&["get", "--", key], None)?;
        Ok(kvs(&v)?.into_iter().next().map(|(_, value)| value))
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.or_panic(self.try_get(key))
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn try_get_prefix(&self, prefix: &str) -> Result<Vec<(String, String)>, String> {
        let v = self.json(&["get", "--prefix", "--", prefix], None)?;
        kvs(&v)
    }

    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.or_panic(self.try_get_prefix(prefix))
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub fn try_delete(&self, key: &str) -> Result<u64, String> {
        let v = self.json(&["del", "--", key], None)?;
        Ok(v["deleted"].as_u64().unwrap_or(0))
    }

    pub fn delete(&self, key: &str) -> u64 {
        self.or_panic(self.try_delete(key))
    }

    pub fn try_delete_prefix(&self, prefix: &str) -> Result<u64, String> {
        let v = self.json(&["del", "--prefix", "--", prefix], None)?;
        Ok(v["deleted"].as_u64().unwrap_or(0))
    }

    pub fn delete_prefix(&self, prefix: &str) -> u64 {
        self.or_panic(self.try_delete_prefix(prefix))
    }

    /// The store's current revision.
    pub fn try_revision(&self) -> Result<i64, String> {
        let v = self.json(&["get", "--keys-only", "--limit=1", "--", "/"], None)?;
        header_revision(&v)
    }

    pub fn revision(&self) -> i64 {
        self.or_panic(self.try_revision())
    }

    /// Compacts the history up to `revision` (physically: the old revisions are gone
    /// from the backend when this returns).
    pub fn try_compact(&self, revision: i64) -> Result<(), String> {
        self.etcdctl(&["compact", "--physical", &revision.to_string()], None)
            .map(drop)
    }

    pub fn compact(&self, revision: i64) {
        self.or_panic(self.try_compact(revision))
    }

    /// Compacts everything up to the current revision and returns it. Compacting a
    /// revision that already was is not an error here.
    pub fn compact_all(&self) -> i64 {
        let revision = self.revision();
        match self.try_compact(revision) {
            Ok(()) => revision,
            Err(e) if e.contains("required revision has been compacted") => revision,
            Err(e) => self.or_panic(Err(e)),
        }
    }

    /// `etcdctl endpoint health` against these endpoints: every one serves a
    /// linearizable read.
    pub fn is_healthy(&self) -> bool {
        self.etcdctl(&["endpoint", "health"], None).is_ok()
    }

    /// `etcdctl endpoint status` of the first endpoint.
    pub fn status(&self) -> Result<MemberStatus, String> {
        let v = self.json(&["endpoint", "status"], None)?;
        let s = &v[0]["Status"];
        let field = |v: &serde_json::Value, what: &str| {
            v.as_u64()
                .ok_or_else(|| format!("endpoint status without {what}: {s}"))
        };
        Ok(MemberStatus {
            member_id: field(&s["header"]["member_id"], "member_id")?,
            leader: field(&s["leader"], "leader")?,
            raft_term: field(&s["raftTerm"], "raftTerm")?,
            revision: header_revision(s)?,
        })
    }
}

fn header_revision(v: &serde_json::Value) -> Result<i64, String> {
    v["header"]["revision"]
        .as_i64()
        .ok_or_else(|| format!("etcdctl output without header.revision: {v}"))
}

/// The key-value pairs of `etcdctl get -w json` output (absent `kvs`: none).
fn kvs(v: &serde_json::Value) -> Result<Vec<(String, String)>, String> {
    let Some(kvs) = v.get("kvs") else {
        return Ok(Vec::new());
    };
    let decode = |field: &serde_json::Value| -> Result<String, String> {
        // An empty value is left out of the JSON.
        let b64 = field.as_str().unwrap_or("");
        let bytes = BASE64
            .decode(b64)
            .map_err(|e| format!("base64 {b64:?}: {e}"))?;
        String::from_utf8(bytes).map_err(|e| format!("non-UTF-8 etcd data: {e}"))
    };
    kvs.as_array()
        .ok_or_else(|| format!("kvs is not an array: {v}"))?
        .iter()
        .map(|kv| Ok((decode(&kv["key"])?, decode(&kv["value"])?)))
        .collect()
}
