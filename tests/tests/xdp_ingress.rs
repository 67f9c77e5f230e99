//! The ingress on real veths: datagrams the XDP program selects reach a handler with
//! their addresses, ports and payload intact, through AF_XDP (native and generic XDP)
//! and through the socket fallback; fragments reach the service socket after the
//! kernel reassembles them; stale and foreign XDP programs are handled at attach.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use flynode::config::XdpMode;
use flynode::ingress::{BackendChoice, Ingress, IngressConfig};
use flynode::netns::Netns;
use flynode::xdp::{XdpClassifier, addr_key};
use flynode_tests::frames::*;
use flynode_tests::node::require_root;
use flynode_tests::xdp::{Seen, capture, collect, quiet_pair, send_frames};
use flynode_xdp_common::{ServiceKey, ServiceValue};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ANYCAST4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const ANYCAST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const PORT: u16 = 53;
const WG_PORT: u16 = 51820;
const SERVICE: u32 = 7;

fn entries() -> BTreeMap<ServiceKey, ServiceValue> {
    BTreeMap::from([
        (
            ServiceKey::new(addr_key(ANYCAST4.into()), PORT),
            ServiceValue::service(SERVICE, 0),
        ),
        (
            ServiceKey::new(addr_key(ANYCAST6.into()), PORT),
            ServiceValue::service(SERVICE, 0),
        ),
        (
            ServiceKey::new(addr_key(NODE4.into()), WG_PORT),
            ServiceValue::WIREGUARD,
        ),
    ])
}

/// A payload that differs in every datagram, of a size that varies from 1 to 1400.
fn payload(i: usize) -> Vec<u8> {
    let len = 1 + (i * 97) % 1400;
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

/// Service datagrams of every shape the classifier hands up (no WireGuard), with what
/// the handler must see for each.
fn service_datagrams(n: usize, vlan: bool) -> Vec<(Vec<u8>, Seen)> {
    (0..n)
        .map(|i| {
            let p = payload(i);
            let sport = 40000 + i as u16;
            let tag = (vlan && i % 3 == 0).then_some(5);
            let (frame, src, dst) = if i % 2 == 0 {
                let (src, dst) = ((CLIENT4, sport), (ANYCAST4, PORT));
                (udp4_from(tag, src, dst, &p), src.into(), dst.into())
            } else {
                let (src, dst) = ((CLIENT6, sport), (ANYCAST6, PORT));
                (udp6_from(tag, src, dst, &p), src.into(), dst.into())
            };
            (
                frame,
                Seen::Service {
                    id: SERVICE,
                    src,
                    dst,
                    payload: p,
                },
            )
        })
        .collect()
}

fn wg_datagrams() -> Vec<(Vec<u8>, Seen)> {
    [(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 1440)]
        .into_iter()
        .map(|(kind, len)| {
            let mut m: Vec<u8> = (0..len).map(|j| j as u8 ^ kind).collect();
            m[..4].copy_from_slice(&[kind, 0, 0, 0]);
            (
                udp4(None, CLIENT4, NODE4, WG_PORT, &m),
                Seen::Wireguard {
                    src: SocketAddr::from((CLIENT4, 40000)),
                    dst: SocketAddr::from((NODE4, WG_PORT)),
                    payload: m,
                },
            )
        })
        .collect()
}

struct Running {
    classifier: XdpClassifier,
    ingress: Option<Ingress>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(ingress) = self.ingress.take() {
            ingress.stop(&mut self.classifier);
        }
    }
}

fn start(
    node: &Netns,
    mode: XdpMode,
    backend: BackendChoice,
    handlers: flynode::ingress::HandlerFactory,
) -> Running {
    node.enter(move || {
        let mut classifier = XdpClassifier::load_and_attach("eth0", mode).expect("attach XDP");
        classifier.apply_endpoints(&entries()).expect("maps");
        let ingress = Ingress::start(
            &IngressConfig {
                interface: "eth0".into(),
                backend,
                generic_xdp: mode == XdpMode::Generic,
                socket_buffer: 4 << 20,
            },
            &mut classifier,
            &entries(),
            handlers,
            Default::default(),
        )
        .expect("ingress");
        Running {
            classifier,
            ingress: Some(ingress),
        }
    })
    .expect("enter node namespace")
}

fn af_xdp_delivers_exact_bytes(mode: XdpMode) {
    require_root();
    let (sender, node) = quiet_pair();
    let (handlers, rx) = capture();
    let running = start(&node, mode, BackendChoice::AfXdp, handlers);
    let backend = running.ingress.as_ref().unwrap().backend().to_string();
    assert!(backend.starts_with("af_xdp"), "{backend}");

    let mut cases = service_datagrams(300, true);
    cases.extend(wg_datagrams());
    let frames: Vec<Vec<u8>> = cases.iter().map(|(f, _)| f.clone()).collect();
    let expected: Vec<Seen> = cases.into_iter().map(|(_, s)| s).collect();
    send_frames(&sender, &frames);
    let seen = collect(
        &rx,
        expected.len(),
        Duration::from_secs(5),
        Duration::from_millis(200),
    );
    // One RX queue, one consumer: the order is the wire's.
    assert_eq!(seen.len(), expected.len(), "deliveries");
    for (i, (s, e)) in seen.iter().zip(&expected).enumerate() {
        assert_eq!(s, e, "datagram {i}");
    }
    let counters = running.classifier.counters().unwrap();
    assert_eq!(
        counters.get(flynode_xdp_common::Counter::UserspaceService),
        300
    );
    assert_eq!(
        counters.get(flynode_xdp_common::Counter::UserspaceWireguard),
        5
    );
    let ingress = running.ingress.as_ref().unwrap().counters().snapshot();
    assert_eq!(ingress["xsk_datagrams"], 305, "{ingress:?}");
    assert_eq!(ingress["socket_datagrams"], 0, "{ingress:?}");
}

#[test]
fn af_xdp_delivers_exact_bytes_native() {
    af_xdp_delivers_exact_bytes(XdpMode::Native);
}

#[test]
fn af_xdp_delivers_exact_bytes_generic() {
    af_xdp_delivers_exact_bytes(XdpMode::Generic);
}

/// Makes the node's kernel accept the test's datagrams itself: the anycast addresses on
/// loopback, routes back to the clients (so reverse-path filtering passes), IPv6 on the
/// veth. (No VLAN device: this kernel has no 802.1Q module, so tagged frames are not
/// part of the socket test; the AF_XDP tests cover them.)
fn kernel_receives(node: &Netns) {
    node.sysctl("net.ipv6.conf.eth0.disable_ipv6", "0")
        .expect("sysctl");
    for args in [
        &["addr", "add", "198.18.100.1/32", "dev", "lo"][..],
        &["-6", "addr", "add", "2001:db8:100::1/128", "dev", "lo"],
        &["route", "add", "198.18.0.0/24", "dev", "eth0"],
        &["-6", "route", "add", "2001:db8::/64", "dev", "eth0"],
        &["link", "set", "lo", "up"],
    ] {
        node.ip(args).expect("ip");
    }
}

#[test]
fn socket_fallback_delivers_the_same_datagrams() {
    require_root();
    let (sender, node) = quiet_pair();
    kernel_receives(&node);
    let (handlers, rx) = capture();
    let running = start(&node, XdpMode::Native, BackendChoice::Socket, handlers);
    let backend = running.ingress.as_ref().unwrap().backend().to_string();
    assert!(backend.starts_with("socket"), "{backend}");

    let cases = service_datagrams(300, false);
    let frames: Vec<Vec<u8>> = cases.iter().map(|(f, _)| f.clone()).collect();
    let mut expected: Vec<Seen> = cases.into_iter().map(|(_, s)| s).collect();
    send_frames(&sender, &frames);
    let mut seen = collect(
        &rx,
        expected.len(),
        Duration::from_secs(5),
        Duration::from_millis(200),
    );
    // Two sockets (IPv4 and IPv6) drained by one thread: compare as sets.
    seen.sort();
    expected.sort();
    assert_eq!(seen.len(), expected.len(), "deliveries");
    assert!(seen == expected, "the sockets deliver the same datagrams");
    let counters = running.classifier.counters().unwrap();
    assert_eq!(
        counters.get(flynode_xdp_common::Counter::SocketService),
        300,
        "every service datagram passed to the kernel for want of an AF_XDP socket"
    );
    let ingress = running.ingress.as_ref().unwrap().counters().snapshot();
    assert_eq!(ingress["socket_datagrams"], 300, "{ingress:?}");
}

#[test]
fn fragments_are_reassembled_by_the_kernel_and_reach_the_service_socket() {
    require_root();
    let (sender, node) = quiet_pair();
    kernel_receives(&node);
    let (handlers, rx) = capture();
    let running = start(&node, XdpMode::Native, BackendChoice::AfXdp, handlers);

    let p: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
    let whole = udp(&CLIENT4.octets(), &ANYCAST4.octets(), 40000, PORT, &p);
    let (first, rest) = whole.split_at(304);
    let frames = vec![
        ethernet(
            ETH_P_IPV4,
            None,
            &ipv4(CLIENT4, ANYCAST4, IPPROTO_UDP, &[], 0x2000, first),
        ),
        ethernet(
            ETH_P_IPV4,
            None,
            &ipv4(CLIENT4, ANYCAST4, IPPROTO_UDP, &[], 304 / 8, rest),
        ),
    ];
    send_frames(&sender, &frames);
    let seen = collect(&rx, 1, Duration::from_secs(5), Duration::from_millis(200));
    assert_eq!(
        seen,
        vec![Seen::Service {
            id: SERVICE,
            src: SocketAddr::from((CLIENT4, 40000)),
            dst: SocketAddr::from((ANYCAST4, PORT)),
            payload: p,
        }]
    );
    let counters = running.classifier.counters().unwrap();
    use flynode_xdp_common::Counter::*;
    assert_eq!(counters.get(PassFragmentFirst), 1);
    assert_eq!(counters.get(PassFragmentLater), 1);
    let ingress = running.ingress.as_ref().unwrap().counters().snapshot();
    assert_eq!(ingress["socket_datagrams"], 1, "{ingress:?}");
}

#[test]
fn a_foreign_xdp_program_is_never_replaced() {
    require_root();
    let (_sender, node) = quiet_pair();
    let err = node
        .enter(|| {
            let ifindex = flynode_xsk::rawbpf::ifindex("eth0").unwrap();
            let prog =
                flynode_xsk::rawbpf::load_xdp("someone_else", &flynode_xsk::rawbpf::xdp_return(2))
                    .unwrap();
            let _link = flynode_xsk::rawbpf::attach_xdp(
                std::os::fd::AsFd::as_fd(&prog),
                ifindex,
                flynode_xsk::rawbpf::AttachMode::Generic,
            )
            .unwrap();
            XdpClassifier::load_and_attach("eth0", XdpMode::Generic)
                .err()
                .map(|e| e.to_string())
        })
        .unwrap()
        .expect("attaching over another program fails");
    assert!(
        err.contains("not flynode's") && err.contains("someone_else"),
        "{err}"
    );
}
