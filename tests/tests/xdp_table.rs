//! The XDP endpoints table under change, in the kernel: while one thread runs the real
//! program on a service datagram millions of times (`BPF_PROG_RUN`), the main thread
//! rewrites the table over and over around that service. Every single run must classify
//! the datagram as the service's: a reader that saw a half-written table, or a switch
//! without its seeds, would count it as passed or dropped.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use flynode::xdp::{XdpClassifier, addr_key};
use flynode_tests::frames::udp4;
use flynode_tests::node::require_root;
use flynode_xdp_common::{Counter, ServiceKey, ServiceValue};
use flynode_xsk::rawbpf;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STEADY: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const PORT: u16 = 53;

fn key(addr: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey::new(addr_key(addr.into()), port)
}

/// The steady service plus `n` others that change with `round`: other ports on the same
/// address, other addresses, a WireGuard endpoint that comes and goes.
fn endpoints(round: u32, n: u32) -> BTreeMap<ServiceKey, ServiceValue> {
    let mut out = BTreeMap::from([(key(STEADY, PORT), ServiceValue::service(7, 0))]);
    for i in 0..n {
        let x = round.wrapping_mul(2_654_435_761).wrapping_add(i * 40_503);
        let [_, _, c, d] = x.to_be_bytes();
        let port = 1000 + (x >> 20) as u16 % 5000;
        let addr = if i % 3 == 0 {
            STEADY
        } else {
            Ipv4Addr::new(198, 19, c, d)
        };
        out.insert(key(addr, port), ServiceValue::service(100 + i, i % 2));
    }
    if round.is_multiple_of(2) {
        out.insert(
            key(Ipv4Addr::new(198, 18, 0, 1), 51820),
            ServiceValue::WIREGUARD,
        );
    }
    out
}

#[test]
fn an_unchanged_endpoint_is_classified_the_same_through_every_table_switch() {
    require_root();
    let mut classifier = XdpClassifier::load().expect("load the XDP program");
    classifier
        .apply_endpoints(&endpoints(0, 50))
        .expect("first table");
    let program = classifier
        .program_fd()
        .expect("program fd")
        .try_clone_to_owned()
        .expect("dup");
    let frame = udp4(None, CLIENT, STEADY, PORT, b"steady");
    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut runs = 0u64;
            // Bounded: at most 2000 calls of 10k runs (a few seconds).
            while !stop.load(Ordering::Relaxed) && runs < 20_000_000 {
                rawbpf::test_run(std::os::fd::AsFd::as_fd(&program), &frame, 10_000)
                    .expect("BPF_PROG_RUN");
                runs += 10_000;
            }
            runs
        })
    };
    let before = classifier.counters().expect("counters");
    let mut switches = 0;
    for round in 1..=60 {
        let diff = classifier
            .apply_endpoints(&endpoints(round, 50 + round % 7))
            .expect("apply");
        switches += usize::from(diff.added + diff.changed + diff.removed > 0);
        assert_eq!(
            classifier.endpoint(&key(STEADY, PORT)),
            Some(ServiceValue::service(7, 0))
        );
    }
    stop.store(true, Ordering::Relaxed);
    let runs = runner.join().expect("runner");
    let after = classifier.counters().expect("counters");
    assert!(
        switches >= 55,
        "only {switches} of 60 rounds changed the table"
    );
    assert!(
        runs >= 10_000,
        "the program did not run during the switches"
    );
    // No AF_XDP socket is registered, so a service hit falls back to the socket path.
    for c in Counter::ALL {
        let n = after.get(c) - before.get(c);
        let expected = if c == Counter::SocketService { runs } else { 0 };
        assert_eq!(n, expected, "{c:?} counted {n} of {runs} runs");
    }

    // And the last table is the one in force: a port dropped by it is no longer served.
    let last = endpoints(60, 50 + 60 % 7);
    let removed = endpoints(59, 50 + 59 % 7)
        .into_keys()
        .find(|k| !last.contains_key(k) && k.addr == addr_key(STEADY.into()))
        .expect("round 60 removes a port of the steady address");
    let gone = udp4(None, CLIENT, STEADY, removed.port(), b"gone");
    let before = classifier.counters().expect("counters");
    rawbpf::test_run(classifier.program_fd().expect("fd"), &gone, 1).expect("run");
    let after = classifier.counters().expect("counters");
    assert_eq!(
        after.get(Counter::DropUnknownPort) - before.get(Counter::DropUnknownPort),
        1
    );
}
