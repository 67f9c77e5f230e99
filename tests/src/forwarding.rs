//! The end-to-end topology: flynode nodes on a LAN (see [`crate::mesh::Lan`]), a client
//! host on the same LAN, anycast addresses on the edges, and one container namespace
//! behind every worker running a UDP echo service that says who it is and what source
//! address it saw.
//!
//! Addresses: LAN 198.18.10.N / 2001:db8:10::N; client 198.18.10.100; anycast
//! 198.18.100.1 and 2001:db8:100::1 (port 7); container behind node N: 198.19.N.2 and
//! fd00:c:N::2 (the node's side .1 / ::1).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flynode::netns::{Netns, veth};

use crate::etcd::EtcdCluster;
use crate::mesh::{Host, Lan, no_dad, routing_for};
use crate::node::{Daemon, Prepared};

pub const ANYCAST4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const ANYCAST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
pub const PORT: u16 = 7;
/// The client's host number on the LAN.
pub const CLIENT: u8 = 100;

pub fn anycast(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((ANYCAST6, PORT))
    } else {
        SocketAddr::from((ANYCAST4, PORT))
    }
}

/// The container behind node `n`.
pub fn container(n: u8, v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::from((
            Ipv6Addr::new(0xfd00, 0xc, u16::from(n), 0, 0, 0, 0, 2),
            PORT,
        ))
    } else {
        SocketAddr::from((Ipv4Addr::new(198, 19, n, 2), PORT))
    }
}

/// A UDP echo server in a container: answers every datagram with
/// `"<name> saw <source> | <payload>"`.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The service sockets, for datagrams the container sends unasked.
    sockets: Vec<UdpSocket>,
}

impl Echo {
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let mut sockets = Vec::new();
        let threads = addrs
            .iter()
            .map(|addr| {
                let socket = ns
                    .enter(|| UdpSocket::bind(addr))
                    .expect("enter container")
                    .expect("bind echo");
                sockets.push(socket.try_clone().expect("clone socket"));
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let stop = Arc::clone(&stop);
                let name = name.to_owned();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((n, from)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        let mut reply = format!("{name} saw {from} | ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = socket.send_to(&reply, from);
                    }
                })
            })
            .collect();
        Echo {
            stop,
            threads,
            sockets,
        }
    }

    /// Sends `payload` from the service socket of `to`'s family to `to`, as a container
    /// answering nobody would.
    pub fn send_unasked(&self, to: SocketAddr, payload: &[u8]) {
        let socket = self
            .sockets
            .iter()
            .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == to.is_ipv6()))
            .expect("socket of that family");
        socket.send_to(payload, to).expect("send");
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A service of the routing map: id, anycast addresses, port 7, workers by node number
/// (weight 1 unless given).
pub struct ServiceSpec {
    pub id: u32,
    pub name: &'static str,
    pub workers: Vec<(u8, u32)>,
    pub proxy_protocol: bool,
    /// Every worker's targets (IPv4, IPv6) instead of its container's.
    pub targets: Option<[SocketAddr; 2]>,
}

impl ServiceSpec {
    pub fn echo(workers: &[u8]) -> ServiceSpec {
        ServiceSpec {
            id: 1,
            name: "echo",
            workers: workers.iter().map(|&n| (n, 1)).collect(),
            proxy_protocol: false,
            targets: None,
        }
    }

    pub fn toml(&self) -> String {
        let mut s = format!(
            "[[service]]\nid = {}\nname = \"{}\"\nanycast = [\"{ANYCAST4}\", \"{ANYCAST6}\"]\nports = [{PORT}]\nproxy_protocol = {}\n",
            self.id, self.name, self.proxy_protocol
        );
        for (n, weight) in &self.workers {
            let [v4, v6] = self
                .targets
                .unwrap_or([container(*n, false), container(*n, true)]);
            s.push_str(&format!(
                "  [[service.worker]]\n  node = \"node-{n}\"\n  target = [\"{v4}\", \"{v6}\"]\n  weight = {weight}\n",
            ));
        }
        s
    }
}

/// Nodes 1..=N on a LAN (every one an edge and a worker), a client, and containers.
pub struct Topology {
    // Field order is drop order: daemons and echo servers before the namespaces.
    pub daemons: Vec<Option<Daemon>>,
    /// The fleet's etcd (in the hub namespace), when the map comes from etcd.
    pub etcd: Option<EtcdCluster>,
    pub echoes: Vec<Echo>,
    pub containers: Vec<Netns>,
    /// The node map without services (every node's key), for [`Self::routing`].
    pub nodes_toml: String,
    pub lan: Lan,
}

impl Topology {
    /// Starts `nodes` flynode nodes (native XDP, 1 s keepalives so a dead worker is
    /// noticed within 3 s) with `services`, a client (host [`CLIENT`]) routed to edge 1.
    pub fn start(nodes: u8, services: &[ServiceSpec]) -> Topology {
        Self::start_with(nodes, services, |_| {})
    }

    /// As [`Self::start`], with each node's spec adjusted by `tweak`.
    pub fn start_with(
        nodes: u8,
        services: &[ServiceSpec],
        tweak: impl Fn(&mut crate::node::NodeSpec),
    ) -> Topology {
        Self::start_inner(nodes, services, tweak, 0)
    }

    /// As [`Self::start_with`], the map from an etcd of `members` members in the hub
    /// namespace (nodes register themselves with a 2 s lease; `services` are written with
    /// `flynode services apply` before the daemons start).
    pub fn start_fleet(
        nodes: u8,
        members: usize,
        services: &[ServiceSpec],
        tweak: impl Fn(&mut crate::node::NodeSpec),
    ) -> Topology {
        assert!(members > 0);
        Self::start_inner(nodes, services, tweak, members)
    }

    fn start_inner(
        nodes: u8,
        services: &[ServiceSpec],
        tweak: impl Fn(&mut crate::node::NodeSpec),
        members: usize,
    ) -> Topology {
        let lan = Lan::new(nodes);
        let etcd = (members > 0).then(|| EtcdCluster::start(&lan.hub, members));
        let client = Netns::create("client").expect("netns");
        no_dad(&client);
        veth(&lan.hub, "pc", &client, "eth0").expect("veth");
        lan.hub
            .ip(&["link", "set", "pc", "master", "br0"])
            .expect("enslave");
        client
            .ip(&["addr", "add", "198.18.10.100/24", "dev", "eth0"])
            .expect("addr");
        client
            .ip(&["addr", "add", "2001:db8:10::100/64", "dev", "eth0", "nodad"])
            .expect("addr6");
        let mut containers = Vec::new();
        let mut echoes = Vec::new();
        for host in &lan.nodes {
            let n = host.n;
            for (addr, dev) in [
                (format!("{ANYCAST4}/32"), "lo"),
                (format!("{ANYCAST6}/128"), "lo"),
            ] {
                host.ns
                    .ip(&["addr", "add", &addr, "dev", dev])
                    .expect("anycast");
            }
            let ctr = Netns::create(&format!("c{n}")).expect("netns");
            no_dad(&ctr);
            veth(&host.ns, "ctr0", &ctr, "eth0").expect("veth");
            host.ns
                .ip(&["addr", "add", &format!("198.19.{n}.1/24"), "dev", "ctr0"])
                .expect("addr");
            host.ns
                .ip(&[
                    "addr",
                    "add",
                    &format!("fd00:c:{n}::1/64"),
                    "dev",
                    "ctr0",
                    "nodad",
                ])
                .expect("addr");
            ctr.ip(&["addr", "add", &format!("198.19.{n}.2/24"), "dev", "eth0"])
                .expect("addr");
            ctr.ip(&[
                "addr",
                "add",
                &format!("fd00:c:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ])
            .expect("addr");
            ctr.ip(&["route", "add", "default", "via", &format!("198.19.{n}.1")])
                .expect("route");
            ctr.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:c:{n}::1"),
            ])
            .expect("route6");
            host.ns.sysctl("net.ipv4.ip_forward", "1").expect("sysctl");
            host.ns
                .sysctl("net.ipv6.conf.all.forwarding", "1")
                .expect("sysctl");
            echoes.push(Echo::start(
                &ctr,
                &format!("worker-{n}"),
                &[container(n, false), container(n, true)],
            ));
            containers.push(ctr);
        }
        let prepared: Vec<Prepared> = lan
            .nodes
            .iter()
            .map(|h| {
                let mut spec = h.spec();
                spec.mode = "native".into();
                spec.wireguard.push("persistent_keepalive = \"1s\"".into());
                if let Some(etcd) = &etcd {
                    let endpoints: Vec<String> = etcd
                        .endpoints()
                        .iter()
                        .map(|e| format!("\"{e}\""))
                        .collect();
                    spec.etcd = vec![
                        format!("endpoints = [{}]", endpoints.join(", ")),
                        "lease_ttl = \"2s\"".into(),
                    ];
                }
                tweak(&mut spec);
                Prepared::new(spec)
            })
            .collect();
        let nodes_toml = routing_for(
            &lan.nodes
                .iter()
                .zip(&prepared)
                .map(|(h, p)| (h, &p.spec, p.public_key))
                .collect::<Vec<_>>(),
        );
        let map = Self::map(&nodes_toml, services);
        if let Some(etcd) = &etcd {
            apply_services(&lan.hub, etcd, services);
        }
        let daemons = lan
            .nodes
            .iter()
            .zip(prepared)
            .map(|(h, p)| Some(p.start(&h.ns, &map)))
            .collect();
        let topology = Topology {
            daemons,
            etcd,
            echoes,
            containers,
            nodes_toml,
            lan,
        };
        // The client joins last so that Lan's drop order still removes it: keep it in
        // `containers` (all are plain namespaces).
        let mut topology = topology;
        topology.containers.push(client);
        topology.route_client_to(1);
        topology
    }

    fn map(nodes: &str, services: &[ServiceSpec]) -> String {
        let mut map = nodes.to_owned();
        for s in services {
            map.push_str(&s.toml());
        }
        map
    }

    /// The routing map with `services`.
    pub fn routing(&self, services: &[ServiceSpec]) -> String {
        Self::map(&self.nodes_toml, services)
    }

    /// The fleet's etcd.
    pub fn etcd(&self) -> &EtcdCluster {
        self.etcd.as_ref().expect("a fleet topology (start_fleet)")
    }

    pub fn etcd_mut(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("a fleet topology (start_fleet)")
    }

    /// Runs `flynode services <args>` against the fleet's etcd from the hub namespace.
    pub fn services_cli(&self, args: &[&str]) -> std::process::Output {
        services_cli(&self.lan.hub, self.etcd(), args)
    }

    /// Writes `services` into every running node's routing file.
    pub fn set_services(&self, services: &[ServiceSpec]) {
        let map = self.routing(services);
        for d in self.daemons.iter().flatten() {
            d.write_routing(&map);
        }
    }

    pub fn client(&self) -> &Netns {
        self.containers.last().expect("client namespace")
    }

    pub fn host(&self, n: u8) -> &Host {
        self.lan.host(n)
    }

    pub fn daemon(&self, n: u8) -> &Daemon {
        self.daemons[usize::from(n) - 1].as_ref().expect("running")
    }

    /// Stops node `n`'s daemon cleanly, changes its spec with `tweak` and starts it
    /// again with the same keys and routing map (peers re-handshake: wait for the mesh).
    pub fn restart_with(&mut self, n: u8, tweak: impl FnOnce(&mut crate::node::NodeSpec)) {
        let slot = &mut self.daemons[usize::from(n) - 1];
        let (status, mut prepared) = slot.take().expect("running").stop_for_restart();
        assert!(status.success(), "node {n} stopped with {status}");
        let mut spec = prepared.spec.clone();
        tweak(&mut spec);
        prepared.set_spec(spec);
        let routing =
            std::fs::read_to_string(prepared.dir().join("routing.toml")).expect("routing map");
        *slot = Some(prepared.start(&self.lan.host(n).ns, &routing));
    }

    /// Sends the client's traffic for the anycast addresses to edge `n`.
    pub fn route_client_to(&self, n: u8) {
        let c = self.client();
        c.ip(&[
            "route",
            "replace",
            &format!("{ANYCAST4}/32"),
            "via",
            &format!("198.18.10.{n}"),
        ])
        .expect("route");
        c.ip(&[
            "-6",
            "route",
            "replace",
            &format!("{ANYCAST6}/128"),
            "via",
            &format!("2001:db8:10::{n}"),
        ])
        .expect("route6");
    }

    /// A client socket bound in the client namespace on `port` (0: any).
    pub fn client_socket(&self, v6: bool, port: u16) -> UdpSocket {
        let addr: SocketAddr = if v6 {
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100), port))
        } else {
            SocketAddr::from((Ipv4Addr::new(198, 18, 10, CLIENT), port))
        };
        let s = self
            .client()
            .enter(|| UdpSocket::bind(addr))
            .expect("enter client")
            .expect("bind client");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    }

    /// Waits until every node sees every other as a live peer (sessions up, recent
    /// traffic), so that all workers can be chosen.
    pub fn wait_for_mesh(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.daemons.iter().flatten().all(|d| {
                d.try_status().is_ok_and(|s| {
                    s["forwarding"]["workers"]
                        .as_object()
                        .is_some_and(|services| {
                            services.values().all(|ws| {
                                ws.as_array()
                                    .is_some_and(|ws| ws.iter().all(|w| w["healthy"] == true))
                            })
                        })
                })
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "workers not healthy in time: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn logs(&self) -> String {
        self.daemons
            .iter()
            .flatten()
            .map(|d| format!("--- {} ---\n{}", d.spec().id, d.log()))
            .collect()
    }
}

/// `flynode services --etcd <endpoints> <args>`, run in `hub`.
pub fn services_cli(hub: &Netns, etcd: &EtcdCluster, args: &[&str]) -> std::process::Output {
    hub.command(crate::node::flynode_bin().to_str().expect("utf-8 path"))
        .arg("services")
        .arg("--etcd")
        .arg(etcd.endpoints().join(","))
        .args(args)
        .output()
        .expect("run flynode services")
}

/// Writes `services` to etcd with `flynode services apply`, failing loudly.
pub fn apply_services(hub: &Netns, etcd: &EtcdCluster, services: &[ServiceSpec]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("services.toml");
    let text: String = services.iter().map(ServiceSpec::toml).collect();
    std::fs::write(&path, text).expect("services file");
    let out = services_cli(hub, etcd, &["apply", path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "flynode services apply failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One request/reply: sends `payload` from `socket` to `to`, returns the reply and where
/// it came from, retrying a few times (the first datagram of a flow may meet a mesh
/// that is still handshaking).
pub fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<(String, SocketAddr)> {
    let mut buf = [0u8; 65536];
    for _ in 0..10 {
        socket.send_to(payload, to).ok()?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            return Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
    }
    None
}

/// The worker name and the source address in an echo reply.
pub fn parse_echo(reply: &str) -> (String, SocketAddr) {
    let (head, _) = reply.split_once(" | ").expect("echo reply format");
    let (name, saw) = head.split_once(" saw ").expect("echo reply format");
    (name.to_owned(), saw.parse().expect("address"))
}

/// The client's address as the containers must see it.
pub fn client_addr(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100)),
            port,
        )
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 10, CLIENT)), port)
    }
}

/// A forwarding counter of a node's `flynode status`.
pub fn counter(daemon: &Daemon, name: &str) -> u64 {
    daemon.status()["forwarding"]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no forwarding counter {name}"))
}

/// For each flow (client port), the worker that answered it.
pub fn workers_of(topo: &Topology, ports: std::ops::Range<u16>, v6: bool) -> Vec<String> {
    try_workers_of(topo, ports.clone(), v6)
        .into_iter()
        .zip(ports)
        .map(|(w, p)| w.unwrap_or_else(|| panic!("no reply for port {p}; logs:\n{}", topo.logs())))
        .collect()
}

/// As [`workers_of`], `None` for a flow that got no reply.
pub fn try_workers_of(
    topo: &Topology,
    ports: std::ops::Range<u16>,
    v6: bool,
) -> Vec<Option<String>> {
    ports
        .map(|p| {
            let socket = topo.client_socket(v6, p);
            let (reply, from) = ask(&socket, anycast(v6), b"which")?;
            assert_eq!(from, anycast(v6));
            Some(parse_echo(&reply).0)
        })
        .collect()
}

/// Waits until `name` on `daemon` reaches `target` (up to 5 s) and returns its value
/// then, so the caller asserts on it instead of sleeping a guessed time.
pub fn counter_reaching(daemon: &Daemon, name: &str, target: u64) -> u64 {
    flynode::netns::wait_for(Duration::from_secs(5), || {
        Some(counter(daemon, name)).filter(|v| *v >= target)
    })
    .unwrap_or_else(|| counter(daemon, name))
}

impl Topology {
    /// Waits until every running node's status satisfies `ready` (a routing change
    /// applied everywhere, say).
    pub fn wait_until_all(&self, what: &str, ready: impl Fn(&serde_json::Value) -> bool) {
        let ok = flynode::netns::wait_for(Duration::from_secs(10), || {
            self.daemons
                .iter()
                .flatten()
                .all(|d| d.try_status().is_ok_and(|s| ready(&s)))
                .then_some(())
        });
        assert!(
            ok.is_some(),
            "not every node got to: {what}; logs:\n{}",
            self.logs()
        );
    }

    /// Waits until every node runs a map whose service 1 has `workers` workers (0: the
    /// service is gone).
    pub fn wait_for_workers(&self, workers: usize) {
        self.wait_until_all(&format!("service 1 with {workers} workers"), |s| {
            s["forwarding"]["workers"]["1"]
                .as_array()
                .map_or(0, Vec::len)
                == workers
        });
    }
}
