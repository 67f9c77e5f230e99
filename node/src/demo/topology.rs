//! The demo's throwaway network, all network namespaces on this machine:
//!
//! ```text
//!                        LAN bridge (hub): 198.18.10.0/24, 2001:db8:10::/64
//!   client .100 ───┬────────────┬────────────┬────────────┐
//!               node-1 .1    node-2 .2    node-3 .3    node-4 .4     flynode on each eth0
//!               edge         edge         worker       worker        (native XDP)
//!               anycast      anycast         │            │
//!               on lo        on lo         ctr-3        ctr-4        containers:
//!                                    198.19.3.2   198.19.4.2         echo :7, dns :53
//!                                    fd00:c:3::2  fd00:c:4::2
//! ```
//!
//! Every node runs a real `flynode run` with its own key, config and routing map in a
//! temporary directory; the mesh (fd00:f1::N) is flynode's userspace WireGuard. Every
//! node could be an edge and a worker; the client is routed to nodes 1–2 and the
//! services' workers are nodes 3–4, so each trip crosses the mesh. Addresses are RFC 2544
//! (198.18.0.0/15), documentation (2001:db8::/32) and ULA (fd00::/8) only.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use flynode_keys::{KeyDir, PublicKey};

use super::check_interrupted;
use super::services::Services;
use crate::control::{self, Status};
use crate::netns::{ChildGuard, Netns, run, veth, wait_for};

pub const EDGES: [u8; 2] = [1, 2];
pub const WORKERS: [u8; 2] = [3, 4];
pub const NODES: [u8; 4] = [1, 2, 3, 4];
/// The client's host number on the LAN.
const CLIENT: u8 = 100;
/// The prefixes the client routes to an edge (the anycast announcement, in miniature).
const ANYCAST_PREFIX4: &str = "198.18.100.0/24";
const ANYCAST_PREFIX6: &str = "2001:db8:100::/64";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Echo,
    Dns,
}

/// A service of the routing map; every worker's container serves it on `port`.
#[derive(Debug)]
pub struct ServiceDef {
    pub id: u32,
    pub kind: Kind,
    pub name: &'static str,
    pub anycast4: Ipv4Addr,
    pub anycast6: Ipv6Addr,
    pub port: u16,
}

impl ServiceDef {
    pub fn anycast(&self, v6: bool) -> SocketAddr {
        if v6 {
            SocketAddr::from((self.anycast6, self.port))
        } else {
            SocketAddr::from((self.anycast4, self.port))
        }
    }
}

pub const ECHO: ServiceDef = ServiceDef {
    id: 1,
    kind: Kind::Echo,
    name: "echo",
    anycast4: Ipv4Addr::new(198, 18, 100, 1),
    anycast6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1),
    port: 7,
};

pub const DNS: ServiceDef = ServiceDef {
    id: 2,
    kind: Kind::Dns,
    name: "dns",
    anycast4: Ipv4Addr::new(198, 18, 100, 53),
    anycast6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x53),
    port: 53,
};

pub const SERVICES: [&ServiceDef; 2] = [&ECHO, &DNS];

pub fn node_id(n: u8) -> String {
    format!("node-{n}")
}

pub fn container_name(n: u8) -> String {
    format!("ctr-{n}")
}

pub fn lan(n: u8, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, u16::from(n)).into()
    } else {
        Ipv4Addr::new(198, 18, 10, n).into()
    }
}

pub fn client_ip(v6: bool) -> IpAddr {
    // 2001:db8:10::100 reads like the IPv4 host number: hex 0x100.
    if v6 {
        Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100).into()
    } else {
        lan(CLIENT, false)
    }
}

fn mesh(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, u16::from(n))
}

/// The container behind worker `n` (`.2`; the worker's side of the veth is `.1`).
pub fn container_ip(n: u8, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0xc, u16::from(n), 0, 0, 0, 0, 2).into()
    } else {
        Ipv4Addr::new(198, 19, n, 2).into()
    }
}

fn gateway_ip(n: u8, v6: bool) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0xfd00, 0xc, u16::from(n), 0, 0, 0, 0, 1).into()
    } else {
        Ipv4Addr::new(198, 19, n, 1).into()
    }
}

/// One host of the LAN running flynode.
pub struct Node {
    // Before `ns`: the daemon is gone before its namespace is deleted.
    daemon: Option<ChildGuard>,
    pub n: u8,
    pub ns: Netns,
    dir: PathBuf,
    public_key: PublicKey,
}

impl Node {
    pub fn id(&self) -> String {
        node_id(self.n)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        control::status(&self.socket())
            .with_context(|| format!("asking {} for its status", self.id()))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("flynode.log")
    }

    /// The last `lines` lines the daemon logged.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

pub struct Topology {
    // Field order is drop order: service threads and daemons before the namespaces
    // they live in, the LAN bridge last, the directory (keys, configs) after everything.
    pub services: Services,
    pub nodes: Vec<Node>,
    pub containers: Vec<Netns>,
    pub client: Netns,
    /// Holds the LAN bridge; only ever dropped.
    _hub: Netns,
    dir: tempfile::TempDir,
}

impl Topology {
    /// Creates the namespaces, links, addresses and routes, the nodes' keys, configs and
    /// routing map, and starts the containers' services. No daemon runs yet.
    pub fn build() -> anyhow::Result<Topology> {
        let dir = tempfile::Builder::new()
            .prefix("flynode-demo.")
            .tempdir()
            .context("creating a temporary directory")?;
        let hub = namespace("hub")?;
        hub.ip(&["link", "add", "br0", "type", "bridge"])?;
        hub.ip(&["link", "set", "br0", "up"])?;
        let client = namespace("client")?;
        attach(&hub, "pc", &client)?;
        address(&client, CLIENT)?;
        check_interrupted()?;

        let mut nodes = Vec::new();
        for n in NODES {
            let ns = namespace(&format!("node{n}"))?;
            attach(&hub, &format!("p{n}"), &ns)?;
            address(&ns, n)?;
            let node_dir = dir.path().join(node_id(n));
            std::fs::create_dir(&node_dir)?;
            let public_key = KeyDir::create(node_dir.join("keys"))
                .and_then(|k| k.generate(false))
                .with_context(|| format!("generating {}'s key", node_id(n)))?;
            nodes.push(Node {
                daemon: None,
                n,
                ns,
                dir: node_dir,
                public_key,
            });
            check_interrupted()?;
        }
        for node in nodes.iter().filter(|node| EDGES.contains(&node.n)) {
            for service in SERVICES {
                for v6 in [false, true] {
                    let plen = if v6 { 128 } else { 32 };
                    let addr = format!("{}/{plen}", service.anycast(v6).ip());
                    node.ns.ip(&["addr", "add", &addr, "dev", "lo"])?;
                }
            }
        }
        let mut services = Services::default();
        let mut containers = Vec::new();
        for node in nodes.iter().filter(|node| WORKERS.contains(&node.n)) {
            let n = node.n;
            let ctr = namespace(&format!("ctr{n}"))?;
            veth(&node.ns, "ctr0", &ctr, "eth0")?;
            for v6 in [false, true] {
                let (plen, family) = if v6 { (64, "-6") } else { (24, "-4") };
                let gw = gateway_ip(n, v6);
                add_address(&node.ns, &format!("{gw}/{plen}"), "ctr0", v6)?;
                let ip = container_ip(n, v6);
                add_address(&ctr, &format!("{ip}/{plen}"), "eth0", v6)?;
                ctr.ip(&[family, "route", "add", "default", "via", &gw.to_string()])?;
            }
            // The worker routes the containers' traffic; flynode's own rules send the
            // services' replies into its mesh TUN.
            node.ns.sysctl("net.ipv4.ip_forward", "1")?;
            node.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            for service in SERVICES {
                for v6 in [false, true] {
                    let at = SocketAddr::new(container_ip(n, v6), service.port);
                    match service.kind {
                        Kind::Echo => services.echo(&ctr, &container_name(n), at),
                        Kind::Dns => services.dns(&ctr, &container_name(n), at),
                    }
                    .with_context(|| format!("starting {} in {}", service.name, ctr.name()))?;
                }
            }
            containers.push(ctr);
            check_interrupted()?;
        }
        let topology = Topology {
            services,
            nodes,
            containers,
            client,
            _hub: hub,
            dir,
        };
        topology.write_files()?;
        topology.route_client_to(EDGES[0])?;
        Ok(topology)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn namespaces(&self) -> usize {
        self.nodes.len() + self.containers.len() + 2
    }

    /// The routing map every node reads, and each node's config.
    fn write_files(&self) -> anyhow::Result<()> {
        let mut map = String::from("# flynode demo: the routing map, the same on every node\n");
        for node in &self.nodes {
            map.push_str(&format!(
                "\n[[node]]\nid = \"{id}\"\nregion = \"demo\"\npublic_key = \"{key}\"\n\
                 endpoint = \"{endpoint}\"\nmesh_address = \"{mesh}\"\n",
                id = node.id(),
                key = node.public_key,
                endpoint = SocketAddr::new(lan(node.n, false), 51820),
                mesh = mesh(node.n),
            ));
        }
        for service in SERVICES {
            map.push_str(&format!(
                "\n[[service]]\nid = {}\nname = \"{}\"\nanycast = [\"{}\", \"{}\"]\nports = [{}]\n",
                service.id, service.name, service.anycast4, service.anycast6, service.port
            ));
            for n in WORKERS {
                map.push_str(&format!(
                    "  [[service.worker]]\n  node = \"{}\"\n  target = [\"{}\", \"{}\"]\n",
                    node_id(n),
                    SocketAddr::new(container_ip(n, false), service.port),
                    SocketAddr::new(container_ip(n, true), service.port),
                ));
            }
        }
        for node in &self.nodes {
            let dir = &node.dir;
            std::fs::write(dir.join("routing.toml"), &map)?;
            // Native XDP on the veth (AF_XDP ingress); 1 s keepalives, because a worker
            // counts as healthy only after a recent authenticated packet.
            let config = format!(
                "node_id = \"{id}\"\nregion = \"demo\"\nmesh_address = \"{mesh}\"\n\
                 key_dir = \"{dir}/keys\"\ncontrol_socket = \"{dir}/control.sock\"\n\n\
                 [wireguard]\ninterface = \"fly0\"\npersistent_keepalive = \"1s\"\n\n\
                 [xdp]\ninterface = \"eth0\"\nmode = \"native\"\n\n\
                 [source]\nfile = \"{dir}/routing.toml\"\n",
                id = node.id(),
                mesh = mesh(node.n),
                dir = dir.display(),
            );
            std::fs::write(dir.join("flynode.toml"), config)?;
        }
        Ok(())
    }

    /// Starts `flynode run` on every node and waits until each answers on its control
    /// socket.
    pub fn start_daemons(&mut self) -> anyhow::Result<Vec<Status>> {
        let exe = std::env::current_exe().context("finding the flynode binary")?;
        let exe = exe.to_str().context("flynode's path is not UTF-8")?;
        for node in &mut self.nodes {
            let log = std::fs::File::create(node.log_path())?;
            let mut cmd = node.ns.command(exe);
            cmd.arg("run")
                .arg("--config")
                .arg(node.dir.join("flynode.toml"))
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: Ctrl-C reaches the demo only, which stops the
                // daemons in order (SIGTERM, so each removes its rules and TUN).
                .process_group(0);
            // SAFETY: prctl(2) is async-signal-safe; the closure touches nothing else.
            // If the demo itself is killed, the daemon gets SIGTERM instead of living on.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            node.daemon = Some(
                ChildGuard::spawn(&mut cmd)
                    .with_context(|| format!("starting flynode on {}", node.id()))?,
            );
        }
        let mut statuses = Vec::new();
        for node in &mut self.nodes {
            let up = wait_for(Duration::from_secs(10), || {
                if check_interrupted().is_err() {
                    return Some(None);
                }
                if let Some(Ok(Some(exit))) = node.daemon.as_mut().map(ChildGuard::try_wait) {
                    return Some(Some(Err(exit)));
                }
                control::status(&node.socket()).ok().map(|s| Some(Ok(s)))
            });
            match up {
                Some(Some(Ok(status))) => statuses.push(status),
                Some(None) => check_interrupted()?,
                Some(Some(Err(exit))) => bail!(
                    "flynode on {} exited at start ({exit}); its log:\n{}",
                    node.id(),
                    node.log_tail(30)
                ),
                None => bail!(
                    "flynode on {} did not answer on its control socket within 10 s; its log:\n{}",
                    node.id(),
                    node.log_tail(30)
                ),
            }
        }
        Ok(statuses)
    }

    /// Waits until every node lists every worker of every service as healthy: sessions
    /// up and a recent authenticated packet from each peer. Returns how long it took.
    pub fn wait_for_mesh(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last: BTreeMap<String, String> = BTreeMap::new();
        let ready = wait_for(timeout, || {
            if check_interrupted().is_err() {
                return Some(false);
            }
            let all = self.nodes.iter().all(|node| {
                let Ok(status) = node.status() else {
                    last.insert(node.id(), "no answer on the control socket".into());
                    return false;
                };
                let workers = &status.forwarding.workers;
                let unhealthy: Vec<String> = SERVICES
                    .iter()
                    .flat_map(|s| {
                        let listed = workers.get(&s.id.to_string());
                        WORKERS.iter().filter_map(move |&n| {
                            let id = node_id(n);
                            let healthy = listed
                                .is_some_and(|ws| ws.iter().any(|w| w.node == id && w.healthy));
                            (!healthy).then(|| format!("{} for {}", id, s.name))
                        })
                    })
                    .collect();
                last.insert(node.id(), unhealthy.join(", "));
                unhealthy.is_empty()
            });
            all.then_some(true)
        });
        match ready {
            Some(true) => Ok(started.elapsed()),
            Some(false) => {
                check_interrupted()?;
                Ok(started.elapsed())
            }
            None => {
                let mut why = String::new();
                for (node, unhealthy) in last.iter().filter(|(_, u)| !u.is_empty()) {
                    why.push_str(&format!("\n  {node} sees unhealthy: {unhealthy}"));
                }
                let logs: String = self
                    .nodes
                    .iter()
                    .map(|n| format!("\n--- {} ---\n{}", n.id(), n.log_tail(15)))
                    .collect();
                bail!(
                    "the mesh did not come up within {} s:{why}\nthe daemons' logs end with:{logs}",
                    timeout.as_secs()
                )
            }
        }
    }

    /// Points the client's routes to the anycast prefixes at edge `n` (what BGP does
    /// when the nearest edge changes).
    pub fn route_client_to(&self, n: u8) -> anyhow::Result<()> {
        for (family, prefix, v6) in [
            ("-4", ANYCAST_PREFIX4, false),
            ("-6", ANYCAST_PREFIX6, true),
        ] {
            let via = lan(n, v6).to_string();
            self.client
                .ip(&[family, "route", "replace", prefix, "via", &via])?;
        }
        Ok(())
    }

    /// Stops the service threads and the daemons (SIGTERM, in parallel, SIGKILL after
    /// 5 s); the namespaces go when `self` is dropped.
    pub fn stop(&mut self) -> Vec<(String, std::io::Result<ExitStatus>)> {
        std::mem::take(&mut self.services);
        std::thread::scope(|scope| {
            let stopping: Vec<_> = self
                .nodes
                .iter_mut()
                .filter_map(|node| {
                    let id = node.id();
                    let daemon = node.daemon.take()?;
                    Some(scope.spawn(move || (id, daemon.terminate(Duration::from_secs(5)))))
                })
                .collect();
            stopping.into_iter().filter_map(|t| t.join().ok()).collect()
        })
    }
}

/// A new namespace whose interfaces skip IPv6 duplicate address detection. Without
/// this, a link-local address stays tentative for about a second after its link comes
/// up, and the kernel sends no neighbour solicitation from an interface with no usable
/// link-local: the first datagram a worker forwards to its container over IPv6 would
/// wait a full retransmit interval (1 s) for neighbour discovery.
fn namespace(role: &str) -> anyhow::Result<Netns> {
    let ns = Netns::create(role)?;
    run(ns.command("sysctl").args([
        "-q",
        "-w",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]))?;
    Ok(ns)
}

/// Joins `ns` to the LAN bridge: `port` in the hub, `eth0` in `ns`.
fn attach(hub: &Netns, port: &str, ns: &Netns) -> anyhow::Result<()> {
    veth(hub, port, ns, "eth0")?;
    hub.ip(&["link", "set", port, "master", "br0"])?;
    Ok(())
}

/// LAN host `n`'s addresses on its `eth0`.
fn address(ns: &Netns, n: u8) -> anyhow::Result<()> {
    let v4 = format!("{}/24", lan(n, false));
    let v6 = if n == CLIENT {
        format!("{}/64", client_ip(true))
    } else {
        format!("{}/64", lan(n, true))
    };
    add_address(ns, &v4, "eth0", false)?;
    add_address(ns, &v6, "eth0", true)
}

fn add_address(ns: &Netns, cidr: &str, dev: &str, v6: bool) -> anyhow::Result<()> {
    // No duplicate address detection: the address is usable at once, and nothing else
    // on these links could hold it.
    let mut args = vec!["addr", "add", cidr, "dev", dev];
    if v6 {
        args.push("nodad");
    }
    ns.ip(&args)?;
    Ok(())
}
