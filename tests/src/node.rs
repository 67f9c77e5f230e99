//! A real `flynode run` inside a network namespace, with its own key directory, config,
//! routing map and control socket in a temporary directory.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use flynode::netns::{ChildGuard, Netns, wait_for};
use flynode_keys::{KeyDir, PublicKey};

/// The `flynode` binary of this build: next to the test executable's profile directory
/// (target/<profile>/flynode), or `FLYNODE_BIN`. scripts/test.sh builds it first.
pub fn flynode_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLYNODE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("flynode");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p flynode` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Panics with a clear message unless running as root: these tests create namespaces
/// and attach XDP programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests need root (network namespaces, veth, XDP)"
    );
}

/// How a test node is configured; [`NodeSpec::new`] gives the single-node defaults.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub mesh_address: String,
    pub mesh_ipv4: Option<String>,
    /// The underlay interface XDP attaches to (its MTU sets the mesh MTU).
    pub interface: String,
    /// auto | native | generic
    pub mode: String,
    /// Extra `key = value` lines for the `[wireguard]` section.
    pub wireguard: Vec<String>,
    /// Extra `key = value` lines for the `[flows]` section.
    pub flows: Vec<String>,
    /// `[source.etcd]` lines (endpoints, lease_ttl, ...); empty: the routing file.
    pub etcd: Vec<String>,
    /// Extra `key = value` lines for the `[metrics]` section (the default endpoint,
    /// 127.0.0.1:9477, is one per namespace).
    pub metrics: Vec<String>,
}

impl NodeSpec {
    pub fn new(interface: &str, mode: &str) -> NodeSpec {
        NodeSpec {
            id: "test-node".into(),
            mesh_address: "fd00:f1::1".into(),
            mesh_ipv4: None,
            interface: interface.into(),
            mode: mode.into(),
            wireguard: Vec::new(),
            flows: Vec::new(),
            etcd: Vec::new(),
            metrics: Vec::new(),
        }
    }
}

/// A node's directory (keys, config) before its daemon runs, or after it was killed:
/// the routing map needs every node's public key before any daemon starts.
pub struct Prepared {
    dir: tempfile::TempDir,
    pub spec: NodeSpec,
    pub public_key: PublicKey,
}

impl Prepared {
    pub fn new(spec: NodeSpec) -> Prepared {
        let dir = tempfile::tempdir().expect("tempdir");
        let public_key = KeyDir::create(dir.path().join("keys"))
            .and_then(|k| k.generate(false))
            .expect("node key");
        write_config(dir.path(), &spec);
        Prepared {
            dir,
            spec,
            public_key,
        }
    }

    /// Changes the config of a node that is not running (its keys stay).
    pub fn set_spec(&mut self, spec: NodeSpec) {
        write_config(self.dir.path(), &spec);
        self.spec = spec;
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Writes the routing map, starts `flynode run` in `ns` and waits until its control
    /// socket answers.
    pub fn start(self, ns: &Netns, routing: &str) -> Daemon {
        self.start_wrapped(ns, routing, &[])
    }

    /// As [`Prepared::start`], with `wrapper` (a program and its arguments, e.g.
    /// `setpriv ... --`) placed before the flynode binary.
    pub fn start_wrapped(self, ns: &Netns, routing: &str, wrapper: &[String]) -> Daemon {
        let dir = self.dir.path();
        std::fs::write(dir.join("routing.toml"), routing).expect("routing");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("flynode.log"))
            .expect("log");
        let bin = flynode_bin();
        let bin = bin.to_str().expect("utf-8 path");
        let (program, args) = match wrapper.split_first() {
            Some((program, args)) => (program.as_str(), args),
            None => (bin, &[][..]),
        };
        let mut cmd = ns.command(program);
        cmd.args(args);
        if !wrapper.is_empty() {
            cmd.arg(bin);
        }
        let child = ChildGuard::spawn(
            cmd.arg("run")
                .arg("--config")
                .arg(dir.join("flynode.toml"))
                .env("RUST_LOG", "debug,boringtun=info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log),
        )
        .expect("spawn flynode");
        let mut daemon = Daemon {
            prepared: self,
            child: Some(child),
        };
        let up = wait_for(Duration::from_secs(10), || {
            if let Some(Ok(Some(status))) = daemon.child.as_mut().map(ChildGuard::try_wait) {
                panic!("flynode exited early ({status}); log:\n{}", daemon.log());
            }
            daemon.try_status().ok()
        });
        assert!(
            up.is_some(),
            "flynode did not answer within 10 s; log:\n{}",
            daemon.log()
        );
        daemon
    }
}

/// Writes `flynode.toml` for `spec` into `dir` (keys in `dir/keys`).
fn write_config(dir: &Path, spec: &NodeSpec) {
    let mut wireguard = String::from("[wireguard]\ninterface = \"fly0\"\n");
    if let Some(v4) = &spec.mesh_ipv4 {
        wireguard.push_str(&format!("mesh_ipv4 = \"{v4}\"\n"));
    }
    wireguard.push_str(&lines(&spec.wireguard));
    let config = format!(
        "node_id = \"{id}\"\nregion = \"test\"\nmesh_address = \"{mesh}\"\n\
         key_dir = \"{dir}/keys\"\ncontrol_socket = \"{dir}/control.sock\"\n\
         {wireguard}\
         [xdp]\ninterface = \"{interface}\"\nmode = \"{mode}\"\n\
         {source}\
         [flows]\n{flows}\
         [metrics]\n{metrics}",
        id = spec.id,
        mesh = spec.mesh_address,
        dir = dir.display(),
        interface = spec.interface,
        mode = spec.mode,
        flows = lines(&spec.flows),
        source = if spec.etcd.is_empty() {
            format!("[source]\nfile = \"{}/routing.toml\"\n", dir.display())
        } else {
            format!("[source.etcd]\n{}", lines(&spec.etcd))
        },
        metrics = lines(&spec.metrics),
    );
    std::fs::write(dir.join("flynode.toml"), config).expect("config");
}

fn lines(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

pub struct Daemon {
    prepared: Prepared,
    child: Option<ChildGuard>,
}

impl Daemon {
    /// Starts `flynode run` in `ns`, attached to `interface` in `mode`
    /// (auto/native/generic), with the routing map `routing(public_key)`, and waits until
    /// its control socket answers.
    pub fn start(
        ns: &Netns,
        interface: &str,
        mode: &str,
        routing: impl FnOnce(&PublicKey) -> String,
    ) -> Daemon {
        Self::start_wrapped(ns, interface, mode, routing, &[])
    }

    /// As [`Daemon::start`], with `wrapper` placed before the flynode binary.
    pub fn start_wrapped(
        ns: &Netns,
        interface: &str,
        mode: &str,
        routing: impl FnOnce(&PublicKey) -> String,
        wrapper: &[String],
    ) -> Daemon {
        let prepared = Prepared::new(NodeSpec::new(interface, mode));
        let routing = routing(&prepared.public_key);
        prepared.start_wrapped(ns, &routing, wrapper)
    }

    pub fn public_key(&self) -> PublicKey {
        self.prepared.public_key
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.prepared.spec
    }

    /// SIGKILL, no cleanup by the daemon; the directory (keys, config) stays for a
    /// restart.
    pub fn kill(mut self) -> Prepared {
        let mut child = self.child.take().expect("running");
        if let Some(c) = child.child_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(child);
        let Daemon { prepared, .. } = self;
        prepared
    }

    /// The daemon's PID (`ip netns exec` and `setpriv` exec, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("running")
    }

    pub fn dir(&self) -> &Path {
        self.prepared.dir()
    }

    pub fn socket(&self) -> PathBuf {
        self.prepared.socket()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("flynode.log")).unwrap_or_default()
    }

    /// `flynode status --json`, run as an operator would.
    pub fn try_status(&self) -> Result<serde_json::Value, String> {
        let out = Command::new(flynode_bin())
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("flynode status failed: {e}; log:\n{}", self.log()))
    }

    /// The XDP counters by name, summed over CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let status = self.status();
        serde_json::from_value(status["xdp"]["counters"].clone()).expect("counters object")
    }

    /// Replaces the routing file and sends SIGHUP, as an operator would after an edit.
    pub fn reload_routing(&self, routing: &str) {
        std::fs::write(self.dir().join("routing.toml"), routing).expect("routing");
        let pid = self
            .child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("running");
        // SAFETY: kill(2) on the PID of the child this fixture started.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP to flynode");
    }

    /// Replaces the routing file the way configuration management does (a new file
    /// renamed over the old one) and nothing else: the daemon watches the file.
    pub fn write_routing(&self, routing: &str) {
        let tmp = self.dir().join(".routing.toml.new");
        std::fs::write(&tmp, routing).expect("routing");
        std::fs::rename(&tmp, self.dir().join("routing.toml")).expect("rename routing");
    }

    /// SIGTERM and wait for a clean exit; the directory (keys, config) stays for a
    /// restart ([`Prepared::set_spec`] changes the config first).
    pub fn stop_for_restart(mut self) -> (ExitStatus, Prepared) {
        let status = self
            .child
            .take()
            .expect("running")
            .terminate(Duration::from_secs(10))
            .expect("terminate flynode");
        let Daemon { prepared, .. } = self;
        (status, prepared)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> ExitStatus {
        self.child
            .take()
            .expect("running")
            .terminate(Duration::from_secs(10))
            .expect("terminate flynode")
    }
}
