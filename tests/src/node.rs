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

pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
    pub public_key: PublicKey,
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

    /// As [`Daemon::start`], with `wrapper` (a program and its arguments, e.g.
    /// `setpriv ... --`) placed before the flynode binary.
    pub fn start_wrapped(
        ns: &Netns,
        interface: &str,
        mode: &str,
        routing: impl FnOnce(&PublicKey) -> String,
        wrapper: &[String],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        let public_key = KeyDir::create(&keys)
            .and_then(|k| k.generate(false))
            .expect("node key");
        std::fs::write(dir.path().join("routing.toml"), routing(&public_key)).expect("routing");
        let config = format!(
            "node_id = \"test-node\"\nregion = \"test\"\nmesh_address = \"fd00:f1::1\"\n\
             key_dir = \"{keys}\"\ncontrol_socket = \"{dir}/control.sock\"\n\
             [xdp]\ninterface = \"{interface}\"\nmode = \"{mode}\"\n\
             [source]\nfile = \"{dir}/routing.toml\"\n",
            keys = keys.display(),
            dir = dir.path().display(),
        );
        std::fs::write(dir.path().join("flynode.toml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("flynode.log")).expect("log");
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
                .arg(dir.path().join("flynode.toml"))
                .env("RUST_LOG", "debug")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log),
        )
        .expect("spawn flynode");
        let mut daemon = Daemon {
            dir,
            child: Some(child),
            public_key,
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

    /// The daemon's PID (`ip netns exec` and `setpriv` exec, so it is the child's).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("running")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("flynode.log")).unwrap_or_default()
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
        std::fs::write(self.dir.path().join("routing.toml"), routing).expect("routing");
        let pid = self
            .child
            .as_ref()
            .and_then(ChildGuard::id)
            .expect("running");
        // SAFETY: kill(2) on the PID of the child this fixture started.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP to flynode");
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
