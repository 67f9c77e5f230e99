//! The core with byte buffers only: nodes exchange datagrams through an in-memory
//! "network" (a queue), so every protocol path runs without sockets.
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use x25519_dalek::{PublicKey, StaticSecret};

use super::*;

fn secret(seed: u8) -> StaticSecret {
    let mut bytes = [seed; 32];
    bytes[0] = seed.wrapping_mul(7).wrapping_add(1);
    StaticSecret::from(bytes)
}

fn public(s: &StaticSecret) -> [u8; 32] {
    PublicKey::from(s).to_bytes()
}

struct TestNode {
    name: &'static str,
    core: Core,
    udp: SocketAddr,
    mesh: Ipv6Addr,
    mesh4: Ipv4Addr,
    /// Inner packets delivered to this node: (from peer, packet).
    delivered: Vec<(Arc<str>, Vec<u8>)>,
}

fn node(n: u8, name: &'static str) -> TestNode {
    TestNode {
        name,
        core: Core::new(secret(n)),
        udp: SocketAddr::from(([198, 18, 0, n], 51820)),
        mesh: Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, u16::from(n)),
        mesh4: Ipv4Addr::new(198, 18, 250, n),
        delivered: Vec::new(),
    }
}

fn peer_config(of: &TestNode) -> PeerConfig {
    PeerConfig {
        name: Arc::from(of.name),
        public_key: of.core.public_key(),
        endpoint: Some(of.udp),
        allowed: vec![IpAddr::V6(of.mesh), IpAddr::V4(of.mesh4)],
        keepalive: 0,
        warm: false,
    }
}

/// A minimal IPv6/UDP packet (boringtun checks the IP header's length only).
fn packet6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    let plen = (8 + payload.len()) as u16;
    p[4..6].copy_from_slice(&plen.to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&4000u16.to_be_bytes());
    p[42..44].copy_from_slice(&4000u16.to_be_bytes());
    p[44..46].copy_from_slice(&plen.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn packet4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    let len = (28 + payload.len()) as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// Datagrams in flight: (from, to, bytes).
#[derive(Default)]
struct Net {
    queue: VecDeque<(SocketAddr, SocketAddr, Vec<u8>)>,
}

impl Net {
    fn send(&mut self, from: &TestNode, payload: Vec<u8>) {
        let mut out = vec![0u8; payload.len() + 200];
        match from.core.encapsulate(&payload, &mut out) {
            Encap::Send { dst, len } => self.queue.push_back((from.udp, dst, out[..len].to_vec())),
            Encap::Queued => {}
            Encap::Dropped(d) => panic!("{} dropped an inner packet: {d}", from.name),
        }
    }

    /// Delivers until quiet. Returns the drops seen.
    fn run(&mut self, nodes: &mut [&mut TestNode]) -> Vec<Drop> {
        let mut drops = Vec::new();
        let mut steps = 0;
        while let Some((from, to, bytes)) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 10_000, "the exchange does not settle");
            let Some(node) = nodes.iter_mut().find(|n| n.udp == to) else {
                continue;
            };
            let mut out = vec![0u8; bytes.len() + 200];
            let mut replies = Vec::new();
            let r = node
                .core
                .decapsulate(from, &bytes, &mut out, &mut |dst, b| {
                    replies.push((dst, b.to_vec()))
                });
            for (dst, b) in replies {
                self.queue.push_back((node.udp, dst, b));
            }
            match r {
                Decap::Inner { peer, len } => node
                    .delivered
                    .push((Arc::clone(&peer.name), out[..len].to_vec())),
                Decap::Done => {}
                Decap::Dropped(d) => drops.push(d),
            }
        }
        drops
    }

    fn timers(&mut self, node: &TestNode) {
        let mut scratch = vec![0u8; 256];
        node.core.update_timers(&mut scratch, &mut |dst, b| {
            self.queue.push_back((node.udp, dst, b.to_vec()))
        });
    }
}

fn set_peers(net: &mut Net, node: &TestNode, peers: Vec<PeerConfig>) -> PeersDiff {
    let mut scratch = vec![0u8; 256];
    node.core.set_peers(peers, &mut scratch, &mut |dst, b| {
        net.queue.push_back((node.udp, dst, b.to_vec()))
    })
}

fn pair() -> (Net, TestNode, TestNode) {
    let mut net = Net::default();
    let a = node(1, "a");
    let b = node(2, "b");
    set_peers(&mut net, &a, vec![peer_config(&b)]);
    set_peers(&mut net, &b, vec![peer_config(&a)]);
    (net, a, b)
}

#[test]
fn first_packet_waits_for_the_handshake_then_arrives_intact() {
    let (mut net, mut a, mut b) = pair();
    let p = packet6(a.mesh, b.mesh, b"hello over the mesh");
    net.send(&a, p.clone());
    assert_eq!(
        net.queue.len(),
        1,
        "a handshake initiation, the packet queued behind it"
    );
    assert_eq!(net.queue[0].2[0], 1);
    let drops = net.run(&mut [&mut a, &mut b]);
    assert!(drops.is_empty(), "{drops:?}");
    assert_eq!(b.delivered, vec![(Arc::from("a"), p)]);
    // And back, IPv4 this time, on the established session.
    let back = packet4(b.mesh4, a.mesh4, b"and back");
    net.send(&b, back.clone());
    assert_eq!(net.queue[0].2[0], 4, "a data message, no new handshake");
    assert!(net.run(&mut [&mut a, &mut b]).is_empty());
    assert_eq!(a.delivered, vec![(Arc::from("b"), back)]);
    let sa = &a.core.peers()[0];
    assert_eq!((sa.tx_packets, sa.rx_packets, sa.handshakes), (1, 1, 1));
    assert!(sa.session_up);
    assert_eq!(sa.own_key, a.core.public_key());
    assert!(sa.last_handshake_unix.is_some());
}

#[test]
fn cryptokey_routing_by_destination_and_source_check() {
    let (mut net, mut a, mut b) = pair();
    net.send(&a, packet6(a.mesh, b.mesh, b"x"));
    net.run(&mut [&mut a, &mut b]);
    // No peer owns this destination.
    let mut out = vec![0u8; 512];
    let stray = packet6(a.mesh, "fd00:99::1".parse().unwrap(), b"x");
    assert_eq!(
        a.core.encapsulate(&stray, &mut out),
        Encap::Dropped(Drop::NoRoute)
    );
    assert_eq!(a.core.counters.get(Drop::NoRoute), 1);
    // b sends a packet whose inner source b does not own: a drops it after decrypting.
    let spoofed = packet6("fd00:f1::77".parse().unwrap(), a.mesh, b"spoof");
    let peer_a = b.core.peer("a").unwrap();
    let Encap::Send { dst, len } = b.core.encapsulate_for(&peer_a, &spoofed, &mut out) else {
        panic!("b has a session")
    };
    net.queue.push_back((b.udp, dst, out[..len].to_vec()));
    assert_eq!(net.run(&mut [&mut a, &mut b]), vec![Drop::SourceNotAllowed]);
    assert!(a.delivered.is_empty());
}

#[test]
fn junk_is_counted_by_reason_and_changes_nothing() {
    let (mut net, mut a, mut b) = pair();
    net.send(&a, packet6(a.mesh, b.mesh, b"x"));
    net.run(&mut [&mut a, &mut b]);
    let attacker = SocketAddr::from(([198, 18, 9, 9], 666));
    let mut init = vec![0u8; 148];
    init[0] = 1;
    let mut data = vec![0u8; 64];
    data[0] = 4;
    data[4..8].copy_from_slice(&0x00ab_cdefu32.to_le_bytes());
    let cases: Vec<(Vec<u8>, Drop)> = vec![
        (vec![], Drop::Malformed),
        (vec![1, 0, 0], Drop::Malformed),
        (vec![9; 100], Drop::Malformed),
        (vec![1; 147], Drop::Malformed),
        (init, Drop::BadMac),
        (data, Drop::UnknownIndex),
    ];
    for (bytes, want) in cases {
        net.queue.push_back((attacker, b.udp, bytes));
        assert_eq!(net.run(&mut [&mut a, &mut b]), vec![want]);
    }
    // A data message with b's real session index but garbage ciphertext.
    let idx = b
        .core
        .tables
        .load()
        .by_index
        .keys()
        .next()
        .copied()
        .unwrap()
        << 8;
    let mut forged = vec![0u8; 80];
    forged[0] = 4;
    for i in 0..8 {
        forged[4..8].copy_from_slice(&(idx | i).to_le_bytes());
        net.queue.push_back((attacker, b.udp, forged.clone()));
    }
    let drops = net.run(&mut [&mut a, &mut b]);
    assert!(
        drops
            .iter()
            .all(|d| *d == Drop::DecryptFailed || *d == Drop::UnknownIndex),
        "{drops:?}"
    );
    assert!(drops.contains(&Drop::DecryptFailed));
    // Nothing roamed to the attacker, and the session still works.
    assert_eq!(b.core.peer("a").unwrap().endpoint(), Some(a.udp));
    let p = packet6(a.mesh, b.mesh, b"still fine");
    net.send(&a, p.clone());
    assert!(net.run(&mut [&mut a, &mut b]).is_empty());
    assert_eq!(b.delivered.last().unwrap().1, p);
}

#[test]
fn handshake_from_a_key_not_in_the_map_is_refused() {
    let mut net = Net::default();
    let a = node(1, "a");
    let mut b = node(2, "b");
    let mut stranger = node(3, "stranger");
    // The stranger knows b, b does not know the stranger.
    set_peers(&mut net, &stranger, vec![peer_config(&b)]);
    set_peers(&mut net, &b, vec![peer_config(&a)]);
    net.send(&stranger, packet6(stranger.mesh, b.mesh, b"let me in"));
    assert_eq!(
        net.run(&mut [&mut b, &mut stranger]),
        vec![Drop::UnknownPeer]
    );
    assert!(b.delivered.is_empty());
}

#[test]
fn endpoint_roams_only_after_an_authenticated_packet() {
    let (mut net, mut a, mut b) = pair();
    net.send(&a, packet6(a.mesh, b.mesh, b"x"));
    net.run(&mut [&mut a, &mut b]);
    // b moves to a new address and port.
    b.udp = SocketAddr::from(([198, 18, 7, 2], 40000));
    net.send(&b, packet6(b.mesh, a.mesh, b"from my new address"));
    assert!(net.run(&mut [&mut a, &mut b]).is_empty());
    assert_eq!(a.core.peer("b").unwrap().endpoint(), Some(b.udp));
    // a's replies now go there.
    net.send(&a, packet6(a.mesh, b.mesh, b"found you"));
    assert_eq!(net.queue[0].1, b.udp);
    assert!(net.run(&mut [&mut a, &mut b]).is_empty());
    assert_eq!(b.delivered.len(), 2);
}

/// Sends `n` numbered packets each way, interleaved with timer ticks, and checks every
/// one arrives.
fn stream(net: &mut Net, a: &mut TestNode, b: &mut TestNode, from: u32, n: u32) {
    if from == 0 {
        // One side initiates; both initiating at once is a race boringtun resolves with
        // a second handshake, which is not what these tests are about.
        net.send(a, packet6(a.mesh, b.mesh, b"warm-up"));
        assert!(net.run(&mut [a, b]).is_empty());
    }
    for i in from..from + n {
        let pa = packet6(a.mesh, b.mesh, &i.to_be_bytes());
        let pb = packet6(b.mesh, a.mesh, &i.to_be_bytes());
        net.send(a, pa.clone());
        net.send(b, pb.clone());
        let drops = net.run(&mut [a, b]);
        assert!(drops.is_empty(), "packet {i}: {drops:?}");
        assert_eq!(
            b.delivered.last().map(|d| &d.1),
            Some(&pa),
            "a→b packet {i} lost"
        );
        assert_eq!(
            a.delivered.last().map(|d| &d.1),
            Some(&pb),
            "b→a packet {i} lost"
        );
        if i % 10 == 0 {
            net.timers(a);
            net.timers(b);
            assert!(net.run(&mut [a, b]).is_empty());
        }
    }
}

#[test]
fn rotation_moves_traffic_to_the_new_key_without_losing_a_packet() {
    let (mut net, mut a, mut b) = pair();
    a.core.set_retire_idle(Duration::from_millis(50));
    b.core.set_retire_idle(Duration::from_millis(50));
    stream(&mut net, &mut a, &mut b, 0, 20);
    let old = a.core.public_key();
    a.core.rotate_key(secret(11));
    assert_eq!(a.core.previous_public_key(), Some(old));
    assert_eq!(
        a.core.rotation_progress(),
        RotationProgress { moved: 0, total: 1 }
    );
    // Traffic keeps flowing on the old pair while b has not heard of the new key.
    stream(&mut net, &mut a, &mut b, 20, 20);
    // b learns a's new key from its routing map: a handshake to the new key starts,
    // the old session keeps carrying traffic meanwhile.
    let diff = set_peers(&mut net, &b, vec![peer_config(&a)]);
    assert_eq!(diff.rekeyed, vec![Arc::from("a")]);
    stream(&mut net, &mut a, &mut b, 40, 20);
    assert_eq!(
        a.core.rotation_progress(),
        RotationProgress { moved: 1, total: 1 }
    );
    assert_eq!(a.core.peers()[0].own_key, a.core.public_key());
    assert_eq!(b.core.peers()[0].public_key, a.core.public_key());
    // Old pairs retire once idle.
    std::thread::sleep(Duration::from_millis(60));
    net.timers(&a);
    net.timers(&b);
    net.run(&mut [&mut a, &mut b]);
    assert_eq!(a.core.peers()[0].slots, 1);
    assert_eq!(b.core.peers()[0].slots, 1);
    // The old key goes; traffic does not notice.
    a.core.wipe_previous_key();
    stream(&mut net, &mut a, &mut b, 60, 20);
    // Now b rotates too.
    b.core.rotate_key(secret(12));
    stream(&mut net, &mut a, &mut b, 80, 10);
    set_peers(&mut net, &a, vec![peer_config(&b)]);
    stream(&mut net, &mut a, &mut b, 90, 10);
    assert_eq!(
        b.core.rotation_progress(),
        RotationProgress { moved: 1, total: 1 }
    );
    assert_eq!(a.core.counters.drops().iter().map(|d| d.1).sum::<u64>(), 0);
    assert_eq!(b.core.counters.drops().iter().map(|d| d.1).sum::<u64>(), 0);
}

#[test]
fn after_the_grace_period_the_old_key_is_unusable() {
    let (mut net, mut a, mut b) = pair();
    stream(&mut net, &mut a, &mut b, 0, 5);
    let old_secret = secret(1);
    a.core.rotate_key(secret(11));
    // Grace ends before b learned the new key: b's old session is gone.
    a.core.wipe_previous_key();
    net.send(&b, packet6(b.mesh, a.mesh, b"old session"));
    assert_eq!(net.run(&mut [&mut a, &mut b]), vec![Drop::UnknownIndex]);
    // A fresh handshake to the old key fails its MAC1 check: the key is gone.
    let mut stale = Tunn::new(
        secret(2),
        PublicKey::from(public(&old_secret)),
        None,
        None,
        77,
        None,
    );
    let mut out = vec![0u8; 256];
    let TunnResult::WriteToNetwork(init) = stale.format_handshake_initiation(&mut out, true) else {
        panic!("no initiation")
    };
    net.queue.push_back((b.udp, a.udp, init.to_vec()));
    assert_eq!(net.run(&mut [&mut a, &mut b]), vec![Drop::BadMac]);
    // Once b learns the new key, everything works again.
    set_peers(&mut net, &b, vec![peer_config(&a)]);
    net.run(&mut [&mut a, &mut b]);
    stream(&mut net, &mut a, &mut b, 5, 5);
}

#[test]
fn three_nodes_every_pair_talks_and_a_removed_peer_is_cut_off() {
    let mut net = Net::default();
    let mut a = node(1, "a");
    let mut b = node(2, "b");
    let mut c = node(3, "c");
    for (me, others) in [(&a, [&b, &c]), (&b, [&a, &c]), (&c, [&a, &b])] {
        set_peers(
            &mut net,
            me,
            others.iter().map(|o| peer_config(o)).collect(),
        );
    }
    let pairs: [(usize, usize); 6] = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)];
    for (from, to) in pairs {
        let mut nodes = [&mut a, &mut b, &mut c];
        let p = packet6(nodes[from].mesh, nodes[to].mesh, &[from as u8, to as u8]);
        net.send(nodes[from], p.clone());
        assert!(net.run(&mut nodes).is_empty());
        assert_eq!(nodes[to].delivered.last().unwrap().1, p);
    }
    // c leaves a's map.
    let diff = set_peers(&mut net, &a, vec![peer_config(&b)]);
    assert_eq!(diff.removed, vec![Arc::from("c")]);
    let mut out = vec![0u8; 256];
    assert_eq!(
        a.core.encapsulate(&packet6(a.mesh, c.mesh, b"x"), &mut out),
        Encap::Dropped(Drop::NoRoute)
    );
    net.send(&c, packet6(c.mesh, a.mesh, b"still there?"));
    assert_eq!(
        net.run(&mut [&mut a, &mut b, &mut c]),
        vec![Drop::UnknownIndex]
    );
    // a↔b unaffected.
    net.send(&a, packet6(a.mesh, b.mesh, b"fine"));
    assert!(net.run(&mut [&mut a, &mut b, &mut c]).is_empty());
}

#[test]
fn a_handshake_flood_gets_cookies_not_sessions() {
    let (mut net, mut a, mut b) = pair();
    let mut replies = 0;
    let mut out = vec![0u8; 256];
    for i in 0..300u32 {
        // Valid-MAC initiations from a (who knows b), from many spoofed sources.
        let mut t = Tunn::new(
            secret(1),
            PublicKey::from(b.core.public_key()),
            None,
            None,
            i,
            None,
        );
        let TunnResult::WriteToNetwork(init) = t.format_handshake_initiation(&mut out, true) else {
            panic!()
        };
        let src = SocketAddr::from(([198, 18, 5, (i % 250) as u8], 1000 + i as u16));
        let mut buf = vec![0u8; 256];
        let mut sink = |_: SocketAddr, m: &[u8]| {
            if m[0] == 3 {
                replies += 1;
            }
        };
        b.core.decapsulate(src, init, &mut buf, &mut sink);
    }
    assert!(replies > 0, "no cookie replies under load");
    assert_eq!(b.core.counters.cookies_sent.load(Relaxed), replies);
    // The real a still gets through after the limiter resets.
    std::thread::sleep(Duration::from_millis(1100));
    net.timers(&b);
    net.send(&a, packet6(a.mesh, b.mesh, b"real"));
    net.run(&mut [&mut a, &mut b]);
    assert_eq!(b.delivered.len(), 1);
}

#[path = "tests/lazy.rs"]
mod lazy;
