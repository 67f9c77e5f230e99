//! Shared set-up for the XDP tests: a quiet veth pair, raw frames sent through it, and
//! an ingress handler that captures what flynode delivers.
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use flynode::ingress::{Datagram, Handler, HandlerFactory};
use flynode::netns::{Netns, veth};
use flynode_xdp_common::ServiceValue;

use crate::packet::RawSender;

/// Two namespaces joined by a veth (`eth0` on both sides) with nothing of the kernel's
/// own on the wire: no addresses (so no ARP) and IPv6 disabled on the veth (so no
/// neighbour discovery or MLD). Every frame the classifier sees is one a test sent.
/// The node's end has the MAC address the frame builders send to.
pub fn quiet_pair() -> (Netns, Netns) {
    let sender = Netns::create("sender").expect("netns");
    let node = Netns::create("node").expect("netns");
    // Disabled on the veth only: the node's mesh TUN needs IPv6, and it sends nothing
    // on the wire.
    for ns in [&sender, &node] {
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
            .expect("sysctl");
    }
    veth(&sender, "eth0", &node, "eth0").expect("veth");
    node.sysctl("net.ipv6.conf.default.disable_ipv6", "0")
        .expect("sysctl");
    node.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:01"])
        .expect("mac");
    (sender, node)
}

/// Sends `frames` out of the sender's `eth0`, in order.
pub fn send_frames(sender: &Netns, frames: &[Vec<u8>]) {
    sender
        .enter(|| {
            let tx = RawSender::bind("eth0").expect("AF_PACKET socket");
            for f in frames {
                tx.send(f).expect("send frame");
            }
        })
        .expect("enter sender namespace");
}

/// What a capturing handler saw.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    Wireguard {
        src: SocketAddr,
        dst: SocketAddr,
        payload: Vec<u8>,
    },
    Service {
        id: u32,
        src: SocketAddr,
        dst: SocketAddr,
        payload: Vec<u8>,
    },
}

struct Capture(Sender<Seen>);

impl Handler for Capture {
    fn wireguard(&mut self, d: &Datagram<'_>) {
        let _ = self.0.send(Seen::Wireguard {
            src: d.src,
            dst: d.dst,
            payload: d.payload.to_vec(),
        });
    }

    fn service(&mut self, service: ServiceValue, d: &Datagram<'_>) {
        let _ = self.0.send(Seen::Service {
            id: service.service_id,
            src: d.src,
            dst: d.dst,
            payload: d.payload.to_vec(),
        });
    }

    fn flush(&mut self) {}
}

/// A handler factory whose handlers send everything they see to the receiver.
pub fn capture() -> (HandlerFactory, Receiver<Seen>) {
    let (tx, rx) = channel();
    let factory: HandlerFactory =
        std::sync::Arc::new(move || Box::new(Capture(tx.clone())) as Box<dyn Handler>);
    (factory, rx)
}

/// Collects `n` deliveries (or fewer after `timeout`), then waits `quiet` more to catch
/// anything unexpected.
pub fn collect(rx: &Receiver<Seen>, n: usize, timeout: Duration, quiet: Duration) -> Vec<Seen> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(s) => out.push(s),
            Err(_) => return out,
        }
    }
    while let Ok(s) = rx.recv_timeout(quiet) {
        out.push(s);
    }
    out
}
