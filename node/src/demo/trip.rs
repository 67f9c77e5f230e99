//! One datagram's round trip, as the demo observes it: the client sends it and waits for
//! the reply; the path comes from the nodes themselves (the forwarding counters of every
//! node's `flynode status`, read before and after), and what the container saw comes
//! back inside the reply.
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::dns::{self, Data, Message};
use super::services::{DNS_NAME, WHOAMI};
use super::topology::{Kind, Node, ServiceDef, container_ip, container_name, node_id};
use crate::netns::{Netns, wait_for};

/// How long one attempt waits for its reply, and how many attempts a trip gets.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
const ATTEMPTS: u32 = 3;

/// A client flow: one socket, so one (client address:port, anycast address:port).
pub struct Flow {
    pub label: char,
    pub service: &'static ServiceDef,
    pub v6: bool,
    pub client: SocketAddr,
    socket: UdpSocket,
}

impl Flow {
    pub fn open(
        ns: &Netns,
        label: char,
        service: &'static ServiceDef,
        client: SocketAddr,
    ) -> anyhow::Result<Flow> {
        let socket = ns
            .enter(|| UdpSocket::bind(client))?
            .with_context(|| format!("binding the client's socket {client}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Flow {
            label,
            service,
            v6: client.is_ipv6(),
            client,
            socket,
        })
    }

    pub fn anycast(&self) -> SocketAddr {
        self.service.anycast(self.v6)
    }

    pub fn family(&self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }

    /// What this flow sends as datagram number `seq`.
    fn request(&self, seq: usize) -> (Vec<u8>, String) {
        match self.service.kind {
            Kind::Echo => {
                let text = format!("hello #{seq} from flow {}", self.label);
                (text.clone().into_bytes(), format!("\"{text}\""))
            }
            Kind::Dns => {
                let qtype = if self.v6 { dns::TYPE_AAAA } else { dns::TYPE_A };
                let query = Message::query(dns_id(seq), DNS_NAME, qtype);
                let bytes = query.encode().unwrap_or_default();
                let shown = format!(
                    "query id {:#06x}: {DNS_NAME} {}? (+nsid)",
                    dns_id(seq),
                    dns::type_name(qtype)
                );
                (bytes, shown)
            }
        }
    }
}

fn dns_id(seq: usize) -> u16 {
    0xd000 | (seq as u16 & 0x0fff)
}

/// What came back to the client.
pub struct Reply {
    pub from: SocketAddr,
    /// The container that answered, in its own words (echo text, DNS NSID).
    pub container: Option<String>,
    /// The source address the container saw.
    pub saw: Option<SocketAddr>,
    pub shown: String,
}

/// The nodes (by number) whose counter moved between two snapshots.
#[derive(Debug, PartialEq, Eq)]
pub struct Path {
    /// How the edge's XDP program handed the datagram over.
    pub ingress: &'static str,
    /// Sent the datagram into the mesh (`edge_forwarded`) or straight to a local
    /// container (`edge_local`).
    pub edges: Vec<u8>,
    /// Wrote it into the TUN for a container (`worker_delivered`).
    pub workers: Vec<u8>,
    /// Sent the container's reply back into the mesh (`reply_forwarded`, `reply_local`).
    pub reply_workers: Vec<u8>,
    /// Sent the reply to the client from the anycast address (`client_replies`).
    pub reply_edges: Vec<u8>,
}

pub struct Trip {
    pub seq: usize,
    /// The edge the client's route pointed at.
    pub via: u8,
    pub sent: String,
    pub attempts: u32,
    pub rtt: Option<Duration>,
    pub reply: Option<Reply>,
    pub path: Path,
}

type Counters = Vec<BTreeMap<String, u64>>;

/// The XDP verdicts that hand a service datagram to flynode, as counter names.
const XDP_AF_XDP: &str = "xdp:userspace_service";
const XDP_SOCKET: &str = "xdp:socket_service";

/// Every node's forwarding counters, plus the XDP service verdicts.
fn counters(nodes: &[Node]) -> anyhow::Result<Counters> {
    nodes
        .iter()
        .map(|n| {
            n.status().map(|s| {
                let mut c = s.forwarding.counters;
                for name in [XDP_AF_XDP, XDP_SOCKET] {
                    let xdp = name.trim_start_matches("xdp:");
                    c.insert(name.into(), s.xdp.counters.get(xdp).copied().unwrap_or(0));
                }
                c
            })
        })
        .collect()
}

fn moved(nodes: &[Node], before: &Counters, after: &Counters, names: &[&str]) -> Vec<u8> {
    nodes
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| {
            names
                .iter()
                .any(|name| a.get(*name).copied().unwrap_or(0) > b.get(*name).copied().unwrap_or(0))
        })
        .map(|(node, _)| node.n)
        .collect()
}

impl Trip {
    /// Sends datagram `seq` on `flow` (retrying twice if no reply comes) and records its
    /// path through `nodes`.
    pub fn run(flow: &Flow, seq: usize, via: u8, nodes: &[Node]) -> anyhow::Result<Trip> {
        let (payload, sent) = flow.request(seq);
        let before = counters(nodes)?;
        let mut attempts = 0;
        let mut rtt = None;
        let mut reply = None;
        while reply.is_none() && attempts < ATTEMPTS {
            super::check_interrupted()?;
            attempts += 1;
            let started = Instant::now();
            flow.socket
                .send_to(&payload, flow.anycast())
                .with_context(|| format!("sending from {} to {}", flow.client, flow.anycast()))?;
            let mut buf = [0u8; 2048];
            while started.elapsed() < REPLY_TIMEOUT {
                super::check_interrupted()?;
                let Ok((n, from)) = flow.socket.recv_from(&mut buf) else {
                    continue;
                };
                // A late answer to an earlier attempt or datagram is not this one's.
                if let Some(r) = parse_reply(flow, seq, &buf[..n], from) {
                    rtt = Some(started.elapsed());
                    reply = Some(r);
                    break;
                }
            }
        }
        // The edge counts a reply right after handing it to the kernel, so the client
        // can see it a moment before the counter moves.
        let mut after = counters(nodes)?;
        if reply.is_some() {
            after = wait_for(Duration::from_secs(1), || {
                let now = counters(nodes).ok()?;
                (!moved(nodes, &before, &now, &["client_replies"]).is_empty()).then_some(now)
            })
            .unwrap_or(after);
        }
        let ingress = if !moved(nodes, &before, &after, &[XDP_AF_XDP]).is_empty() {
            "XDP → AF_XDP"
        } else if !moved(nodes, &before, &after, &[XDP_SOCKET]).is_empty() {
            "XDP → socket"
        } else {
            "XDP → ?"
        };
        let path = Path {
            ingress,
            edges: moved(nodes, &before, &after, &["edge_forwarded", "edge_local"]),
            workers: moved(nodes, &before, &after, &["worker_delivered"]),
            reply_workers: moved(nodes, &before, &after, &["reply_forwarded", "reply_local"]),
            reply_edges: moved(nodes, &before, &after, &["client_replies"]),
        };
        Ok(Trip {
            seq,
            via,
            sent,
            attempts,
            rtt,
            reply,
            path,
        })
    }

    /// The worker that served this trip, if exactly one did.
    pub fn worker(&self) -> Option<u8> {
        match self.path.workers[..] {
            [n] => Some(n),
            _ => None,
        }
    }

    pub fn edge(&self) -> Option<u8> {
        match self.path.edges[..] {
            [n] => Some(n),
            _ => None,
        }
    }

    /// What is wrong with this trip, if anything: the demo's checks.
    pub fn problems(&self, flow: &Flow) -> Vec<String> {
        let mut out = Vec::new();
        let Some(reply) = &self.reply else {
            out.push(format!("no reply after {} attempts", self.attempts));
            return out;
        };
        if reply.from != flow.anycast() {
            out.push(format!(
                "the reply came from {}, not the anycast address {}",
                reply.from,
                flow.anycast()
            ));
        }
        if reply.saw != Some(flow.client) {
            out.push(format!(
                "the container saw {}, not the client's {}",
                show(reply.saw),
                flow.client
            ));
        }
        if self.path.edges != [self.via] {
            out.push(format!(
                "the client routed to {} but the counters show edge(s) {:?}",
                node_id(self.via),
                self.path.edges
            ));
        }
        match self.worker() {
            None => out.push(format!(
                "expected one worker, the counters show {:?}",
                self.path.workers
            )),
            Some(w) => {
                if reply.container.as_deref() != Some(container_name(w).as_str()) {
                    out.push(format!(
                        "{} delivered it, but {} answered",
                        node_id(w),
                        reply.container.as_deref().unwrap_or("nobody we know")
                    ));
                }
                if self.path.reply_workers != [w] {
                    out.push(format!(
                        "the reply left through worker(s) {:?}",
                        self.path.reply_workers
                    ));
                }
            }
        }
        if self.path.reply_edges != self.path.edges {
            out.push(format!(
                "the reply went out through edge(s) {:?}, the request came in through {:?}",
                self.path.reply_edges, self.path.edges
            ));
        }
        out
    }

    /// Prints the trip: what was sent, the way there, what the container saw, the way
    /// back.
    pub fn print(&self, flow: &Flow) {
        println!(
            "#{:<2} flow {}  {} over {}  {} → {}  {}",
            self.seq,
            flow.label,
            flow.service.name,
            flow.family(),
            flow.client,
            flow.anycast(),
            self.sent
        );
        let edge = hop(&self.path.edges);
        let worker = hop(&self.path.workers);
        let container = match self.worker() {
            Some(w) => format!(
                "{} {}",
                container_name(w),
                SocketAddr::new(container_ip(w, flow.v6), flow.service.port)
            ),
            None => "?".into(),
        };
        let retries = match self.attempts {
            1 => String::new(),
            n => format!("  ({n} attempts)"),
        };
        println!(
            "     there  client → edge {edge} ({}) ⇒ worker {worker} → {container}{retries}",
            self.path.ingress
        );
        let Some(reply) = &self.reply else {
            println!("     back   ✗ no reply");
            return;
        };
        let mark = |ok: bool| if ok { "✓" } else { "✗" };
        let who = reply.container.as_deref().unwrap_or("the container");
        let saw_client = reply.saw == Some(flow.client);
        println!(
            "     seen   {who} saw the datagram come from {} {}",
            show(reply.saw),
            if saw_client {
                "✓ the client's own address"
            } else {
                "✗ not the client's address"
            }
        );
        let rtt = self
            .rtt
            .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
            .unwrap_or_default();
        println!(
            "     back   {who} → worker {} ⇒ edge {} → client, from {} {}  {rtt}",
            hop(&self.path.reply_workers),
            hop(&self.path.reply_edges),
            reply.from,
            mark(reply.from == flow.anycast()),
        );
        println!("     reply  {}", reply.shown);
    }
}

fn hop(nodes: &[u8]) -> String {
    match nodes {
        [] => "?".into(),
        ns => ns.iter().map(|&n| node_id(n)).collect::<Vec<_>>().join("+"),
    }
}

fn show(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "?".into(), |a| a.to_string())
}

/// The reply to datagram `seq` of `flow`, or `None` for anything else.
fn parse_reply(flow: &Flow, seq: usize, bytes: &[u8], from: SocketAddr) -> Option<Reply> {
    match flow.service.kind {
        Kind::Echo => {
            let text = std::str::from_utf8(bytes).ok()?;
            let (head, payload) = text.split_once(" | ")?;
            if payload != format!("hello #{seq} from flow {}", flow.label) {
                return None;
            }
            let (name, saw) = head.split_once(" saw ")?;
            Some(Reply {
                from,
                container: Some(name.to_owned()),
                saw: saw.parse().ok(),
                shown: format!("\"{text}\""),
            })
        }
        Kind::Dns => {
            let m = Message::decode(bytes).ok()?;
            if !m.flags.response || m.id != dns_id(seq) {
                return None;
            }
            let mut answers: Vec<String> = m
                .answers
                .iter()
                .map(|r| match &r.data {
                    Data::A(a) => format!("{} A {a}", r.name),
                    Data::Aaaa(a) => format!("{} AAAA {a}", r.name),
                    Data::Txt(t) => format!("{} TXT {t:?}", r.name),
                    Data::Other { rtype, .. } => format!("{} {}", r.name, dns::type_name(*rtype)),
                })
                .collect();
            if answers.is_empty() {
                answers.push("no answer".into());
            }
            let saw = m.additional.iter().find_map(|r| match &r.data {
                Data::Txt(t) if r.name == WHOAMI => t.first()?.parse().ok(),
                _ => None,
            });
            let nsid = m
                .edns
                .as_ref()
                .and_then(|e| e.nsid.as_ref())
                .map(|n| String::from_utf8_lossy(n).into_owned());
            let extra = match (&nsid, saw) {
                (Some(n), Some(s)) => format!("; NSID \"{n}\", {WHOAMI} TXT \"{s}\""),
                (Some(n), None) => format!("; NSID \"{n}\""),
                _ => String::new(),
            };
            Some(Reply {
                from,
                container: nsid,
                saw,
                shown: format!(
                    "id {:#06x} {}: {}{extra}",
                    m.id,
                    dns::rcode_name(m.flags.rcode),
                    answers.join(", ")
                ),
            })
        }
    }
}
