//! Throwaway network namespaces for `flynode demo` and the integration tests.
//!
//! Everything here is a guard: a namespace is deleted (with the veths inside it) and a
//! child process is killed, by its own PID, when the guard is dropped, including when a
//! test panics. Names carry the creating process's PID so parallel runs never collide.
use std::fs::File;
use std::io;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// A network namespace created by this process, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates `fn-<role>-<pid>-<n>`.
    pub fn create(role: &str) -> io::Result<Self> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("fn-{role}-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that will run `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// `ip -n <ns> <args>`, failing with ip's own message.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Writes a sysctl inside the namespace (net.* sysctls are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))
        .map(drop)
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets it opens live
    /// there. setns(2) with CLONE_NEWNET changes only the calling thread, which is why a
    /// scoped thread is used rather than the caller's.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> io::Result<R> {
        let file = File::open(format!("/run/netns/{}", self.name))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends in it, and so their peers.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins two namespaces with a veth pair named `a_dev` in `a` and `b_dev` in `b`. Each
/// end is created directly inside its namespace, so the names only need to be unique
/// there.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> io::Result<()> {
    run(Command::new("ip").args([
        "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns",
        &b.name,
    ]))?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

/// Runs a command to completion; a non-zero exit becomes an error carrying its stderr.
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A child process that is killed (by its PID, which we started) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        Ok(Self {
            child: Some(cmd.spawn()?),
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (SIGKILL after that).
    pub fn terminate(mut self, grace: Duration) -> io::Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("child already reaped"))?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return child.wait();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit and returns the status with everything the child printed, when
    /// its stdout/stderr were piped.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        self.child
            .take()
            .ok_or_else(|| io::Error::other("child already reaped"))?
            .wait_with_output()
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `condition` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = condition() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
