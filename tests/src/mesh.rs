//! A LAN of namespaces for mesh tests: a hub namespace with a bridge, and one namespace
//! per node joined to it by a veth (`eth0`, 198.18.10.N/24 and 2001:db8:10::N/64).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use flynode::netns::{Netns, run, veth};
use flynode_keys::PublicKey;

use crate::node::{Daemon, NodeSpec, Prepared};

pub struct Lan {
    // Declared first so it is dropped last: the bridge outlives the node ends.
    pub nodes: Vec<Host>,
    pub hub: Netns,
}

/// One host on the LAN.
pub struct Host {
    pub ns: Netns,
    /// 1-based index: addresses end in it.
    pub n: u8,
}

impl Host {
    pub fn underlay4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10, self.n)
    }

    pub fn mesh6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, u16::from(self.n))
    }

    pub fn mesh4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 250, self.n)
    }

    pub fn id(&self) -> String {
        format!("node-{}", self.n)
    }

    /// The spec of a flynode node on this host.
    pub fn spec(&self) -> NodeSpec {
        NodeSpec {
            id: self.id(),
            mesh_address: self.mesh6().to_string(),
            mesh_ipv4: Some(self.mesh4().to_string()),
            interface: "eth0".into(),
            mode: "generic".into(),
            wireguard: Vec::new(),
            flows: Vec::new(),
            etcd: Vec::new(),
            metrics: Vec::new(),
        }
    }

    /// `ping` from this host; true when all replies came back.
    pub fn ping(&self, dst: &str, count: u32) -> bool {
        self.ns
            .command("ping")
            .args(["-c", &count.to_string(), "-i", "0.2", "-W", "2", "-q", dst])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Pings until one succeeds or `timeout` passes.
    pub fn ping_within(&self, dst: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.ping(dst, 1) {
                return true;
            }
        }
        false
    }
}

impl Lan {
    pub fn new(hosts: u8) -> Lan {
        let hub = Netns::create("hub").expect("netns");
        hub.ip(&["link", "add", "br0", "type", "bridge"])
            .expect("bridge");
        hub.ip(&["link", "set", "br0", "up"]).expect("bridge up");
        let mut nodes = Vec::new();
        for n in 1..=hosts {
            let ns = Netns::create(&format!("h{n}")).expect("netns");
            no_dad(&ns);
            let port = format!("p{n}");
            veth(&hub, &port, &ns, "eth0").expect("veth");
            hub.ip(&["link", "set", &port, "master", "br0"])
                .expect("enslave");
            let host = Host { ns, n };
            host.ns
                .ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", host.underlay4()),
                    "dev",
                    "eth0",
                ])
                .expect("addr");
            host.ns
                .ip(&[
                    "addr",
                    "add",
                    &format!("2001:db8:10::{n}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])
                .expect("addr6");
            nodes.push(host);
        }
        Lan { nodes, hub }
    }

    pub fn host(&self, n: u8) -> &Host {
        &self.nodes[usize::from(n) - 1]
    }
}

/// Turns off IPv6 duplicate address detection for the interfaces `ns` will get: with
/// it, a new link sends no neighbour discovery for about a second (its link-local
/// address is still tentative), which stalls the first IPv6 datagrams of a test.
pub fn no_dad(ns: &Netns) {
    for key in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
    ] {
        ns.sysctl(key, "0").expect("sysctl accept_dad");
    }
}

/// One `[[node]]` entry of a routing map.
pub fn node_entry(spec: &NodeSpec, public_key: &PublicKey, endpoint: SocketAddr) -> String {
    let mut s = format!(
        "[[node]]\nid = \"{}\"\nregion = \"test\"\npublic_key = \"{public_key}\"\nendpoint = \"{endpoint}\"\nmesh_address = \"{}\"\n",
        spec.id, spec.mesh_address
    );
    if let Some(v4) = &spec.mesh_ipv4 {
        s.push_str(&format!("mesh_ipv4 = \"{v4}\"\n"));
    }
    s.push('\n');
    s
}

/// The routing map listing `nodes` (spec, key) on the LAN.
pub fn routing_for(nodes: &[(&Host, &NodeSpec, PublicKey)]) -> String {
    nodes
        .iter()
        .map(|(h, spec, key)| node_entry(spec, key, SocketAddr::from((h.underlay4(), 51820))))
        .collect()
}

/// Starts one flynode per host (all hosts of the LAN), each with the full map.
pub fn start_mesh(lan: &Lan, tweak: impl Fn(&mut NodeSpec)) -> Vec<Daemon> {
    let prepared: Vec<Prepared> = lan
        .nodes
        .iter()
        .map(|h| {
            let mut spec = h.spec();
            tweak(&mut spec);
            Prepared::new(spec)
        })
        .collect();
    let map = routing_for(
        &lan.nodes
            .iter()
            .zip(&prepared)
            .map(|(h, p)| (h, &p.spec, p.public_key))
            .collect::<Vec<_>>(),
    );
    lan.nodes
        .iter()
        .zip(prepared)
        .map(|(h, p)| p.start(&h.ns, &map))
        .collect()
}

/// A bounded stream of sequence-numbered datagrams at a fixed rate, from a socket in
/// `from` to `to` (a mesh address), and the receiver's tally.
pub struct Stream {
    pub sent: u32,
    pub received: Vec<u32>,
}

impl Stream {
    /// Lost sequence numbers.
    pub fn lost(&self) -> Vec<u32> {
        let mut seen = vec![false; self.sent as usize];
        for &s in &self.received {
            if let Some(slot) = seen.get_mut(s as usize) {
                *slot = true;
            }
        }
        seen.iter()
            .enumerate()
            .filter(|(_, s)| !**s)
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// Runs `during` while `count` datagrams go from `from` to `to`:port at `rate` per second.
pub fn stream_while<R: Send>(
    from: &Netns,
    to_ns: &Netns,
    to: SocketAddr,
    count: u32,
    rate: u32,
    during: impl FnOnce() -> R + Send,
) -> (Stream, R) {
    let receiver = to_ns
        .enter(|| {
            let s = UdpSocket::bind(to).expect("bind receiver");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            s
        })
        .expect("enter receiver ns");
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    std::thread::scope(|scope| {
        let rx = scope.spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            let mut idle = 0;
            // Stops after 3 s of silence once the sender is done (bounded).
            while idle < 15 {
                match receiver.recv(&mut buf) {
                    Ok(4) => {
                        idle = 0;
                        got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    }
                    Ok(_) => {}
                    Err(_) => idle += 1,
                }
            }
            got
        });
        let tx = scope.spawn(|| {
            from.enter(|| {
                let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                    .expect("bind sender");
                let start = Instant::now();
                for i in 0..count {
                    let due = start + interval * i;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    // A send error (no route yet) is a loss the receiver will count.
                    let _ = s.send_to(&i.to_be_bytes(), to);
                }
            })
            .expect("enter sender ns")
        });
        let result = during();
        tx.join().expect("sender");
        let received = rx.join().expect("receiver");
        (
            Stream {
                sent: count,
                received,
            },
            result,
        )
    })
}

/// `ip netns exec NS wg ...`, failing loudly.
pub fn wg(ns: &Netns, args: &[&str]) {
    run(ns.command("wg").args(args)).expect("wg");
}

/// Whether a program is installed.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
