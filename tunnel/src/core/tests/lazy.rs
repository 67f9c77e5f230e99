//! Lazy sessions (`core::demand`) with the real protocol between in-memory nodes and a
//! clock the test moves: who gets handshakes, keepalives and backoff, and when session
//! state is let go.
use super::*;

/// Moves both nodes' clocks by `by`, a timer tick at a time (100 ms ticks would take
/// too long over minutes: ticks of `step`), running each node's timers and the network.
fn elapse(net: &mut Net, nodes: &mut [&mut TestNode], by: Duration, step: Duration) {
    let mut t = Duration::ZERO;
    while t < by {
        for n in nodes.iter() {
            n.core.advance(step);
        }
        for n in nodes.iter() {
            net.timers(n);
        }
        net.run(nodes);
        t += step;
    }
}

fn warm(mut cfg: PeerConfig, keepalive: u16) -> PeerConfig {
    cfg.warm = true;
    cfg.keepalive = keepalive;
    cfg
}

/// Datagrams a node's timers send in `by` (the network swallows them: the peer is
/// silent), ticking every `step`.
fn sent_to_a_silent_peer(node: &TestNode, by: Duration, step: Duration) -> usize {
    let mut sent = 0;
    let mut scratch = vec![0u8; 256];
    let mut t = Duration::ZERO;
    while t < by {
        node.core.advance(step);
        node.core.update_timers(&mut scratch, &mut |_, _| sent += 1);
        t += step;
    }
    sent
}

#[test]
fn peers_with_nothing_to_say_get_no_packets_at_all() {
    let (mut net, mut a, mut b) = pair();
    a.core.initiate_all(&mut [0u8; 256], &mut |_, _| {
        panic!("a cold peer got a handshake")
    });
    elapse(
        &mut net,
        &mut [&mut a, &mut b],
        Duration::from_secs(600),
        Duration::from_secs(1),
    );
    assert!(net.queue.is_empty());
    for n in [&a, &b] {
        let p = &n.core.peers()[0];
        assert!(!p.active && !p.session_up && p.handshakes == 0, "{p:?}");
    }
}

#[test]
fn a_silent_warm_peer_is_retried_with_capped_backoff_not_every_five_seconds() {
    let net = Net::default();
    let a = node(1, "a");
    let b = node(2, "b");
    let mut net = net;
    set_peers(&mut net, &a, vec![warm(peer_config(&b), 25)]);
    let hour = Duration::from_secs(3600);
    let sent = sent_to_a_silent_peer(&a, hour, Duration::from_millis(500));
    // Attempts after 0, 5+5, 10+5, 20+5, then every 30+5 s (±1/8): about 105 in an hour,
    // where boringtun's own timers send one every 5 s (720).
    assert!((80..=130).contains(&sent), "{sent} initiations in an hour");
    let p = &a.core.peers()[0];
    assert!(p.handshake_failures as usize >= sent - 1, "{p:?}");
    assert!(p.unreachable_secs.is_some_and(|s| s >= 3590), "{p:?}");
    assert_eq!(a.core.counters.initiations.load(Relaxed) as usize, sent);
}

#[test]
fn traffic_to_a_silent_cold_peer_backs_off_to_ten_minutes() {
    let mut net = Net::default();
    let a = node(1, "a");
    let b = node(2, "b");
    set_peers(&mut net, &a, vec![peer_config(&b)]);
    // A packet a second for an hour, none answered.
    let mut initiations = 0;
    let mut scratch = vec![0u8; 256];
    for _ in 0..3600 {
        let mut out = vec![0u8; 300];
        if let Encap::Send { .. } = a.core.encapsulate(&packet6(a.mesh, b.mesh, b"x"), &mut out) {
            assert_eq!(out[0], 1, "only handshakes without a session");
            initiations += 1;
        }
        a.core.advance(Duration::from_secs(1));
        a.core.update_timers(&mut scratch, &mut |_, m| {
            assert_eq!(m[0], 1);
            initiations += 1
        });
    }
    // 5+5, 10+5, ... 320+5, then 600+5: about 14 in the hour.
    assert!((8..=20).contains(&initiations), "{initiations}");
}

#[test]
fn a_cold_peers_session_is_made_by_traffic_and_let_go_when_idle() {
    let (mut net, mut a, mut b) = pair();
    for n in [&a, &b] {
        n.core.set_idle_release(Duration::from_secs(60));
    }
    let p = packet6(a.mesh, b.mesh, b"first");
    net.send(&a, p.clone());
    net.run(&mut [&mut a, &mut b]);
    assert_eq!(b.delivered.len(), 1);
    assert!(a.core.peers()[0].active && a.core.peers()[0].session_up);
    // Two idle minutes: no keepalives between cold peers, and the state goes.
    elapse(
        &mut net,
        &mut [&mut a, &mut b],
        Duration::from_secs(120),
        Duration::from_secs(1),
    );
    for n in [&a, &b] {
        let s = &n.core.peers()[0];
        assert!(!s.active && !s.session_up, "{} {s:?}", n.name);
        assert_eq!(s.tx_packets + s.rx_packets, 1, "{} sent keepalives", n.name);
    }
    assert_eq!(a.core.counters.sessions_released.load(Relaxed), 1);
    // The next packet makes a new session and arrives.
    let p2 = packet6(a.mesh, b.mesh, b"again");
    net.send(&a, p2.clone());
    assert!(net.run(&mut [&mut a, &mut b]).is_empty());
    assert_eq!(b.delivered.last().unwrap().1, p2);
}

/// An edge keeps its worker warm; the worker (cold toward the edge) answers each
/// keepalive, so the edge sees it alive through idle hours, and neither side lets the
/// session go.
#[test]
fn a_warm_peer_stays_alive_through_idle_hours_by_answered_keepalives() {
    let mut net = Net::default();
    let mut edge = node(1, "edge");
    let mut worker = node(2, "worker");
    set_peers(&mut net, &edge, vec![warm(peer_config(&worker), 25)]);
    let mut cold = peer_config(&edge);
    cold.keepalive = 25;
    set_peers(&mut net, &worker, vec![cold]);
    for n in [&edge, &worker] {
        n.core.set_idle_release(Duration::from_secs(60));
    }
    edge.core.initiate_all(&mut [0u8; 256], &mut |dst, b| {
        net.queue.push_back((edge.udp, dst, b.to_vec()))
    });
    net.run(&mut [&mut edge, &mut worker]);
    elapse(
        &mut net,
        &mut [&mut edge, &mut worker],
        Duration::from_secs(2 * 3600),
        Duration::from_millis(500),
    );
    let ep = edge.core.peer("worker").unwrap();
    assert!(
        edge.core.peer_alive(&ep, Duration::from_secs(60)),
        "the edge lost its worker"
    );
    let w = &worker.core.peers()[0];
    assert!(w.active && w.session_up, "{w:?}");
    assert!(!w.warm);
    // One handshake at the start; keepalives, not new handshakes, after it.
    assert_eq!(
        edge.core.counters.initiations.load(Relaxed),
        1,
        "re-handshakes"
    );
}

/// A node with thousands of configured peers it never talks to: its timers' cost
/// stays per-peer flat (no handshakes, no session state), and the two it talks to work.
#[test]
fn thousands_of_quiet_peers_cost_no_packets_and_no_session_state() {
    let mut net = Net::default();
    let mut a = node(1, "a");
    let mut b = node(2, "b");
    let mut peers = vec![peer_config(&b)];
    for i in 0..2000u32 {
        let secret = StaticSecret::from([(i % 251) as u8 + 3; 32].map(|x| x ^ (i >> 8) as u8));
        peers.push(PeerConfig {
            name: Arc::from(format!("quiet-{i}").as_str()),
            public_key: public(&secret),
            endpoint: Some(SocketAddr::from((
                [198, 19, (i >> 8) as u8, i as u8],
                51820,
            ))),
            allowed: vec![IpAddr::V6(Ipv6Addr::new(
                0xfd00, 0xf2, 0, 0, 0, 0, 1, i as u16,
            ))],
            keepalive: 25,
            warm: false,
        });
    }
    set_peers(&mut net, &a, peers);
    set_peers(&mut net, &b, vec![peer_config(&a)]);
    let p = packet6(a.mesh, b.mesh, b"to the one that answers");
    net.send(&a, p.clone());
    net.run(&mut [&mut a, &mut b]);
    assert_eq!(b.delivered.len(), 1);
    let mut quiet_packets = 0;
    let mut scratch = vec![0u8; 256];
    for _ in 0..120 {
        a.core.advance(Duration::from_millis(500));
        a.core.update_timers(&mut scratch, &mut |dst, _| {
            if dst != b.udp {
                quiet_packets += 1
            }
        });
    }
    assert_eq!(quiet_packets, 0);
    let active = a.core.peers().iter().filter(|p| p.active).count();
    assert_eq!(active, 1, "only the peer with traffic holds session state");
    assert_eq!(
        a.core.active.lock().len(),
        1,
        "the timers visit only the peer with something going on"
    );
}

/// A map change that gives an idle cold peer a new key sends it nothing: the new key
/// pair is met at the next packet (a warm peer, or one with a session, is rekeyed at
/// once).
#[test]
fn a_new_key_for_an_idle_cold_peer_sends_nothing() {
    let (mut net, a, b) = pair();
    let mut cfg = peer_config(&b);
    cfg.public_key = public(&secret(77));
    set_peers(&mut net, &a, vec![cfg.clone()]);
    assert!(net.queue.is_empty(), "an initiation to an idle cold peer");
    cfg.public_key = public(&secret(78));
    set_peers(&mut net, &a, vec![warm(cfg, 25)]);
    assert_eq!(net.queue.len(), 1, "a warm peer is rekeyed at once");
}
