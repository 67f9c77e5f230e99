//! The benchmark's namespaces: the end-to-end test topology of `flynode-tests`
//! (`forwarding::Topology`, two nodes on a bridged LAN, a client, a container behind
//! each node) with real `flynode run` daemons, plus what the benchmark needs on top: a
//! generator port in the hub, CPU placement, threaded NAPI, and the switch to plain
//! kernel routing once the daemons are stopped.
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use flynode::netns::{Netns, run};
use flynode_tests::forwarding::{self, Echo, ServiceSpec, Topology};

use crate::frames::{self, Macs};
use crate::sys;

/// Node 1 receives the client's traffic (the client is routed to it).
pub const EDGE: u8 = 1;
/// Node 2 is the service's only worker.
pub const WORKER: u8 = 2;
/// The hub's end of the edge's veth: the generator sends out of it, so frames arrive on
/// the edge's `eth0` the way they would from a NIC, past the bridge.
pub const GEN_DEV: &str = "p1";
/// A veth in the hub that carries nothing: the generator's program stays attached to it
/// so that the kernel's XDP dispatcher keeps it between test runs.
const ANCHOR_DEV: &str = "fwdanchor";
/// The base client port; the generator cycles through `flows` ports from here.
pub const CLIENT_PORT: u16 = 40000;

/// A kernel thread doing one host's receive work (threaded NAPI), pinned to the CPU of
/// the system under test.
#[derive(Clone, Debug)]
pub struct Napi {
    pub host: u8,
    pub pid: i32,
    pub comm: String,
}

/// Which data path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// client → anycast → edge (XDP, AF_XDP, WireGuard) → worker → TUN → container.
    Flynode,
    /// client → container address, forwarded by the kernel on the edge and the worker.
    Plain,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Flynode => "flynode",
            Path::Plain => "plain routing",
        }
    }

    /// Where the client sends.
    pub fn destination(self) -> SocketAddr {
        match self {
            Path::Flynode => forwarding::anycast(false),
            Path::Plain => forwarding::container(WORKER, false),
        }
    }
}

pub struct Lab {
    // Dropped first: the daemons stop (their XDP programs go) before the namespaces do.
    pub topo: Topology,
    pub path: Path,
    pub gen_cpu: usize,
    pub sut_cpu: usize,
    edge_mac: [u8; 6],
    client_mac: [u8; 6],
    pub napi: Vec<Napi>,
    /// Whether the daemons serve their metrics endpoint (the default config does).
    pub metrics: bool,
}

impl Lab {
    /// Starts the topology (flynode daemons on both nodes, the service on node 2 only),
    /// waits for the mesh, stops the test echo servers (the benchmark binds its own
    /// sockets), puts every daemon thread on `sut_cpu` and makes the nodes' `eth0`
    /// receive work a NAPI thread there.
    pub fn start(gen_cpu: usize, sut_cpu: usize) -> Result<Lab> {
        if !flynode_bin().exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p flynode` (bench/forward.sh does)",
                flynode_bin().display()
            );
        }
        // The test fixtures panic on failure; their guards clean up while unwinding.
        let topo = std::panic::catch_unwind(|| {
            let topo = Topology::start(2, &[ServiceSpec::echo(&[WORKER])]);
            topo.wait_for_mesh(Duration::from_secs(20));
            topo
        })
        .map_err(|_| anyhow!("starting the flynode topology failed (the message is above)"))?;
        let mut topo = topo;
        topo.echoes.clear();
        let edge_mac = mac_of(&topo.host(EDGE).ns, "eth0")?;
        let client_mac = mac_of(topo.client(), "eth0")?;
        topo.lan.hub.ip(&[
            "link",
            "add",
            ANCHOR_DEV,
            "type",
            "veth",
            "peer",
            "name",
            "fwdanchorp",
        ])?;
        let mut lab = Lab {
            topo,
            path: Path::Flynode,
            gen_cpu,
            sut_cpu,
            edge_mac,
            client_mac,
            napi: Vec::new(),
            metrics: true,
        };
        for n in [EDGE, WORKER] {
            let pid = lab.daemon_pid(n).context("daemon not running")?;
            pin_process(pid, sut_cpu)?;
        }
        lab.napi = lab.thread_napi()?;
        Ok(lab)
    }

    pub fn hub(&self) -> &Netns {
        &self.topo.lan.hub
    }

    pub fn host(&self, n: u8) -> &Netns {
        &self.topo.host(n).ns
    }

    /// The container namespace behind the worker.
    pub fn container(&self) -> &Netns {
        &self.topo.containers[usize::from(WORKER) - 1]
    }

    pub fn client(&self) -> &Netns {
        self.topo.client()
    }

    pub fn anchor_dev(&self) -> &'static str {
        ANCHOR_DEV
    }

    /// The PID of node `n`'s daemon while it runs.
    pub fn daemon_pid(&self, n: u8) -> Option<i32> {
        self.topo.daemons[usize::from(n) - 1]
            .as_ref()
            .map(|d| d.pid() as i32)
    }

    /// The control socket of node `n`'s daemon while it runs.
    pub fn daemon_socket(&self, n: u8) -> Option<PathBuf> {
        self.topo.daemons[usize::from(n) - 1]
            .as_ref()
            .map(|d| d.socket())
    }

    /// The frame the generator sends on `path`: IPv4/UDP from the client's address and
    /// [`CLIENT_PORT`], `payload` bytes, addressed to the edge's `eth0`.
    pub fn frame(&self, path: Path, payload: usize, src: Ipv4Addr) -> Vec<u8> {
        let dst = path.destination();
        let std::net::IpAddr::V4(dst_ip) = dst.ip() else {
            unreachable!("IPv4 destinations only");
        };
        frames::udp4(
            Macs {
                dst: self.edge_mac,
                src: self.client_mac,
            },
            (src, CLIENT_PORT),
            (dst_ip, dst.port()),
            &frames::pattern(payload),
        )
    }

    /// The client's own address on the LAN.
    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10, forwarding::CLIENT)
    }

    /// Starts a UDP echo server in the container (for the ping-pong), its thread on the
    /// CPU of the system under test.
    pub fn start_echo(&self) -> Result<Echo> {
        let sut = self.sut_cpu;
        let container = self.container();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<Echo> {
                // The echo's thread inherits this thread's affinity.
                sys::pin(0, sut)?;
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Echo::start(
                        container,
                        "worker-2",
                        &[forwarding::container(WORKER, false)],
                    )
                }))
                .map_err(|_| anyhow!("starting the echo server failed"))
            })
            .join()
            .map_err(|_| anyhow!("echo starter panicked"))?
        })
    }

    /// Restarts both daemons with the metrics endpoint on or off (same keys, map and
    /// placement), unless they already run that way.
    pub fn set_metrics(&mut self, enabled: bool) -> Result<()> {
        if self.metrics == enabled {
            return Ok(());
        }
        let topo = &mut self.topo;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for n in [EDGE, WORKER] {
                topo.restart_with(n, |spec| {
                    spec.metrics = vec![format!("enabled = {enabled}")];
                });
            }
            topo.wait_for_mesh(Duration::from_secs(20));
        }))
        .map_err(|_| anyhow!("restarting the daemons failed (the message is above)"))?;
        self.metrics = enabled;
        for n in [EDGE, WORKER] {
            let pid = self.daemon_pid(n).context("daemon not running")?;
            pin_process(pid, self.sut_cpu)?;
        }
        // The new XDP programs brought new NAPI instances; their threads are made again.
        for n in [EDGE, WORKER] {
            sys::write_sysfs_net(self.host(n), "eth0", "threaded", "0")?;
        }
        self.napi = self.thread_napi()?;
        Ok(())
    }

    /// Enables threaded NAPI on `eth0` of the edge and the worker and pins the threads
    /// to the system under test's CPU. Each device must have NAPI already (an XDP
    /// program, or GRO on), and threaded NAPI off.
    fn thread_napi(&self) -> Result<Vec<Napi>> {
        let mut out = Vec::new();
        for n in [EDGE, WORKER] {
            let before = sys::kthreads_named("napi/eth0-");
            sys::write_sysfs_net(self.host(n), "eth0", "threaded", "1")?;
            let new = flynode::netns::wait_for(Duration::from_secs(3), || {
                let now: Vec<_> = sys::kthreads_named("napi/eth0-")
                    .into_iter()
                    .filter(|t| !before.contains(t))
                    .collect();
                (!now.is_empty()).then_some(now)
            })
            .ok_or_else(|| anyhow!("no napi/eth0-* thread appeared for node {n}"))?;
            for (pid, comm) in new {
                sys::pin(pid, self.sut_cpu)
                    .with_context(|| format!("pin {comm} (pid {pid}) to CPU{}", self.sut_cpu))?;
                out.push(Napi { host: n, pid, comm });
            }
        }
        Ok(out)
    }

    /// Stops both daemons (they remove their XDP programs, TUNs and rules) and turns the
    /// same namespaces into plain IPv4 routers: client → 198.19.2.0/24 via the edge, the
    /// edge → via the worker, the worker has the container on `ctr0`. GRO gives both
    /// `eth0`s NAPI again (veth needs it to accept the generator's XDP frames), in
    /// threads on the system under test's CPU.
    pub fn switch_to_plain_routing(&mut self) -> Result<()> {
        for d in &mut self.topo.daemons {
            if let Some(d) = d.take() {
                d.stop();
            }
        }
        self.path = Path::Plain;
        let net = format!("198.19.{WORKER}.0/24");
        self.client().ip(&[
            "route",
            "replace",
            &net,
            "via",
            &format!("198.18.10.{EDGE}"),
        ])?;
        self.host(EDGE).ip(&[
            "route",
            "replace",
            &net,
            "via",
            &format!("198.18.10.{WORKER}"),
        ])?;
        for n in [EDGE, WORKER] {
            self.host(n).sysctl("net.ipv4.ip_forward", "1")?;
        }
        let mut napi = Vec::new();
        for n in [EDGE, WORKER] {
            let before = sys::kthreads_named("napi/eth0-");
            run(self
                .host(n)
                .command("ethtool")
                .args(["-K", "eth0", "gro", "on"]))?;
            sys::write_sysfs_net(self.host(n), "eth0", "threaded", "1")?;
            let new = flynode::netns::wait_for(Duration::from_secs(3), || {
                let now: Vec<_> = sys::kthreads_named("napi/eth0-")
                    .into_iter()
                    .filter(|t| !before.contains(t))
                    .collect();
                (!now.is_empty()).then_some(now)
            })
            .ok_or_else(|| anyhow!("no napi/eth0-* thread appeared for node {n} (GRO on)"))?;
            for (pid, comm) in new {
                sys::pin(pid, self.sut_cpu)?;
                napi.push(Napi { host: n, pid, comm });
            }
        }
        self.napi = napi;
        Ok(())
    }
}

/// The flynode binary the fixtures start: `FLYNODE_BIN` (set by `main` to the release
/// binary next to this one unless the caller chose).
fn flynode_bin() -> PathBuf {
    flynode_tests::node::flynode_bin()
}

/// Makes `FLYNODE_BIN` point at the release `flynode` next to this executable unless it
/// is set; the fixtures would otherwise look for it in the wrong place.
pub fn default_flynode_bin() {
    if std::env::var_os("FLYNODE_BIN").is_some() {
        return;
    }
    if let Some(bin) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("flynode")))
    {
        // SAFETY: called from `main` before any other thread exists.
        unsafe { std::env::set_var("FLYNODE_BIN", bin) };
    }
}

/// Puts every thread of process `pid` on `cpu`.
pub fn pin_process(pid: i32, cpu: usize) -> Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("threads of pid {pid}"))?;
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) {
            sys::pin(tid, cpu).with_context(|| format!("pin thread {tid} of pid {pid}"))?;
        }
    }
    Ok(())
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = run(std::process::Command::new("ip").args([
        "-n",
        ns.name(),
        "-o",
        "link",
        "show",
        "dev",
        dev,
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_once("link/ether ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .ok_or_else(|| anyhow!("no link/ether address for {dev} in {}", ns.name()))?;
    let bytes: Vec<u8> = mac
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| anyhow!("bad MAC address `{mac}` for {dev}"))
}
