//! A node in a large map (issue 23): 2,000 configured peers that never answer, next to
//! two real nodes. Traffic between the real ones works; the silent ones get no stream
//! of handshakes (counted where their packets land: one socket on a third host, the
//! blackhole all their endpoints point at); the log stays quiet; status answers while
//! the big map is reloaded.
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use flynode_tests::mesh::{Lan, routing_for};
use flynode_tests::node::{Prepared, require_root};

const SILENT: u32 = 2_000;
const BLACKHOLE_PORT: u16 = 51999;

/// `SILENT` nodes whose endpoint is the blackhole on host 3, with keys nobody holds.
fn silent_nodes(blackhole: SocketAddr, extra: u32) -> String {
    let mut text = String::new();
    for i in 0..SILENT + extra {
        // The same keys at every call: a reload with one node more changes one node.
        let mut seed = [0u8; 32];
        seed[..4].copy_from_slice(&i.to_be_bytes());
        seed[31] = 0x40;
        let key = flynode_keys::PublicKey::from_bytes(seed);
        text.push_str(&format!(
            "[[node]]\nid = \"silent-{i}\"\nregion = \"far\"\npublic_key = \"{key}\"\nendpoint = \"{blackhole}\"\nmesh_address = \"fd00:f2::{:x}\"\n\n",
            i + 1
        ));
    }
    text
}

#[test]
fn two_thousand_silent_peers_get_no_handshake_stream_and_the_log_stays_quiet() {
    require_root();
    let lan = Lan::new(3);
    let blackhole = SocketAddr::from((lan.host(3).underlay4(), BLACKHOLE_PORT));
    // The blackhole: counts what arrives, answers nothing.
    let sink = lan
        .host(3)
        .ns
        .enter(|| UdpSocket::bind(blackhole))
        .expect("enter host 3")
        .expect("bind the blackhole");
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let arrived = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (arrived, stop) = (Arc::clone(&arrived), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Relaxed) {
                if sink.recv_from(&mut buf).is_ok() {
                    arrived.fetch_add(1, Relaxed);
                }
            }
        })
    };

    let prepared: Vec<Prepared> = (1..=2).map(|n| Prepared::new(lan.host(n).spec())).collect();
    let real = routing_for(
        &prepared
            .iter()
            .enumerate()
            .map(|(i, p)| (lan.host(i as u8 + 1), &p.spec, p.public_key))
            .collect::<Vec<_>>(),
    );
    let map = format!("{real}{}", silent_nodes(blackhole, 0));
    let mut daemons = Vec::new();
    for (i, p) in prepared.into_iter().enumerate() {
        daemons.push(p.start(&lan.host(i as u8 + 1).ns, &map));
    }
    // The real pair talks.
    let to = lan.host(2).mesh6().to_string();
    assert!(
        lan.host(1).ping_within(&to, Duration::from_secs(10)),
        "node-1 cannot reach node-2 in a map of {SILENT} silent peers\n{}",
        daemons[0].log()
    );
    let log_lines = |d: &flynode_tests::node::Daemon| d.log().lines().count();
    let lines_before = log_lines(&daemons[0]);
    // Twenty seconds of a daemon's life among them: the old timers sent every silent
    // peer an initiation at start and every 5 s after (thousands of datagrams here).
    std::thread::sleep(Duration::from_secs(20));
    let silent_packets = arrived.load(Relaxed);
    assert_eq!(
        silent_packets,
        0,
        "datagrams to peers nothing needs:\n{}",
        daemons[0].log()
    );
    let status = daemons[0].status();
    let summary = &status["mesh"]["peer_summary"];
    assert_eq!(summary["configured"], SILENT + 1, "{summary}");
    assert_eq!(summary["active"], 1, "{summary}");
    // No line per peer per event: what the daemon wrote in those 20 s (at debug level,
    // as the tests run it) is a handful, not thousands.
    let new_lines: Vec<String> = daemons[0]
        .log()
        .lines()
        .skip(lines_before)
        .map(str::to_owned)
        .collect();
    assert!(
        new_lines.len() <= 40 && !new_lines.iter().any(|l| l.contains("HANDSHAKE(")),
        "{} log lines in 20 s:\n{}",
        new_lines.len(),
        new_lines.join("\n")
    );
    // A reload of the big map (one more silent node): status keeps answering.
    daemons[0].reload_routing(&format!("{real}{}", silent_nodes(blackhole, 1)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = daemons[0].status();
        if s["routing"]["nodes"] == SILENT + 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the reload never applied");
    }
    assert!(
        lan.host(2)
            .ping_within(&lan.host(1).mesh6().to_string(), Duration::from_secs(10)),
        "the real pair after the reload"
    );
    assert_eq!(arrived.load(Relaxed), 0, "the reload sent to silent peers");
    stop.store(true, Relaxed);
    counter.join().unwrap();
    for d in daemons {
        assert!(d.stop().success());
    }
}
