//! The XDP classifier on a real veth: one namespace sends crafted frames, flynode is
//! attached to the other end, and every counter read back through `flynode status`
//! must equal exactly what was sent, in native and in generic mode.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use flynode::netns::wait_for;
use flynode_tests::frames::*;
use flynode_tests::node::{Daemon, require_root};
use flynode_tests::xdp::{quiet_pair, send_frames};
use flynode_xdp_common::Counter;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ANYCAST4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const ANYCAST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const PORT: u16 = 53;
/// The node's own WireGuard endpoint in the routing map.
const NODE4: Ipv4Addr = OTHER4;
const WG_PORT: u16 = 51820;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

/// A UDP payload shaped like a WireGuard message of `len` bytes (type, three zero
/// bytes, then filler): what the XDP program can check without keys.
fn wg_message(kind: u8, len: usize) -> Vec<u8> {
    let mut m = vec![0xa5u8; len];
    if len >= 4 {
        m[..4].copy_from_slice(&[kind, 0, 0, 0]);
    }
    m
}

/// An IPv6 frame to the service address whose extension headers are `headers`
/// (type, length byte), followed by `last` (the protocol of `tail`) and `tail`.
fn ext6(headers: &[(u8, u8)], last: u8, tail: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (kind, len)) in headers.iter().enumerate() {
        let next = headers.get(i + 1).map_or(last, |h| h.0);
        let size = if *kind == IPV6_AH {
            (usize::from(*len) + 2) * 4
        } else {
            (usize::from(*len) + 1) * 8
        };
        let mut h = vec![0u8; size];
        h[0] = next;
        h[1] = *len;
        if *kind == IPV6_DSTOPTS || *kind == IPV6_HOPOPTS {
            // PadN option filling the rest of the header.
            h[2] = 1;
            h[3] = (size - 4) as u8;
        }
        chain.extend_from_slice(&h);
    }
    chain.extend_from_slice(tail);
    let first = headers.first().map_or(last, |h| h.0);
    ethernet(ETH_P_IPV6, None, &ipv6(CLIENT6, ANYCAST6, first, &chain))
}

fn routing(public_key: &flynode_keys::PublicKey) -> String {
    format!(
        r#"[[node]]
id = "test-node"
region = "test"
public_key = "{public_key}"
endpoint = "198.18.0.1:51820"
mesh_address = "fd00:f1::1"

[[service]]
id = 7
name = "dns"
anycast = ["{ANYCAST4}", "{ANYCAST6}"]
ports = [{PORT}]
  [[service.worker]]
  node = "test-node"
  target = ["198.18.200.2:53", "[fd00:c8::2]:53"]
"#
    )
}

/// Every frame of the catalogue with the one counter it must land in.
fn catalogue() -> Vec<(&'static str, Vec<u8>, Counter)> {
    use Counter::*;
    let payload = b"flynode";
    let v4 = udp4(None, CLIENT4, ANYCAST4, PORT, payload);
    let v6 = udp6(None, CLIENT6, ANYCAST6, PORT, payload);
    let udp_v4 = |dport, len_field: Option<u16>| {
        let mut u = udp(&CLIENT4.octets(), &ANYCAST4.octets(), 40000, dport, payload);
        if let Some(l) = len_field {
            u[4..6].copy_from_slice(&l.to_be_bytes());
        }
        u
    };
    let mut padded = v4.clone();
    padded.resize(96, 0);
    let ipv4_options = ethernet(
        ETH_P_IPV4,
        None,
        &ipv4(
            CLIENT4,
            ANYCAST4,
            IPPROTO_UDP,
            &[1, 1, 1, 0, 1, 1, 1, 0],
            0,
            &udp_v4(PORT, None),
        ),
    );
    let with = |mut f: Vec<u8>, at: usize, bytes: &[u8]| {
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let qinq = {
        let mut f = ethernet(ETH_P_8021Q, Some(10), &[0, 20, 0x08, 0x00]);
        f[12..14].copy_from_slice(&ETH_P_8021AD.to_be_bytes());
        f.extend_from_slice(&ipv4(
            CLIENT4,
            ANYCAST4,
            IPPROTO_UDP,
            &[],
            0,
            &udp_v4(PORT, None),
        ));
        f
    };
    let frag6 = {
        let mut frag_hdr = vec![IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 1];
        frag_hdr.extend_from_slice(&udp(
            &CLIENT6.octets(),
            &ANYCAST6.octets(),
            1,
            PORT,
            payload,
        ));
        ethernet(
            ETH_P_IPV6,
            None,
            &ipv6(CLIENT6, ANYCAST6, IPPROTO_FRAGMENT, &frag_hdr),
        )
    };
    let frag_later_hdr = [IPPROTO_UDP, 0, 0x00, 0x08, 0, 0, 0, 2];
    let frag6_later = ethernet(
        ETH_P_IPV6,
        None,
        &ipv6(CLIENT6, ANYCAST6, IPPROTO_FRAGMENT, &frag_later_hdr),
    );
    let v6_udp = udp(&CLIENT6.octets(), &ANYCAST6.octets(), 40000, PORT, payload);
    vec![
        ("IPv4 to the service", v4.clone(), UserspaceService),
        ("IPv6 to the service", v6.clone(), UserspaceService),
        (
            "802.1Q IPv4 to the service",
            udp4(Some(5), CLIENT4, ANYCAST4, PORT, payload),
            UserspaceService,
        ),
        (
            "802.1Q IPv6 to the service",
            udp6(Some(5), CLIENT6, ANYCAST6, PORT, payload),
            UserspaceService,
        ),
        (
            "IPv4 with options to the service",
            ipv4_options,
            UserspaceService,
        ),
        ("IPv4 with Ethernet padding", padded, UserspaceService),
        (
            "IPv4 to an unserved port",
            udp4(None, CLIENT4, ANYCAST4, 5353, payload),
            DropUnknownPort,
        ),
        (
            "IPv6 to an unserved port",
            udp6(None, CLIENT6, ANYCAST6, 5353, payload),
            DropUnknownPort,
        ),
        (
            "IPv4 to another address",
            udp4(None, CLIENT4, OTHER4, PORT, payload),
            PassNotService,
        ),
        (
            "IPv6 to another address",
            udp6(None, CLIENT6, OTHER6, PORT, payload),
            PassNotService,
        ),
        ("ARP", ethernet(ETH_P_ARP, None, &[0u8; 28]), PassNotIp),
        ("QinQ (two tags)", qinq, PassNotIp),
        (
            "IPv4 TCP",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(CLIENT4, ANYCAST4, IPPROTO_TCP, &[], 0, &[0u8; 20]),
            ),
            PassNotUdp,
        ),
        (
            "IPv6 ICMPv6",
            ethernet(
                ETH_P_IPV6,
                None,
                &ipv6(
                    CLIENT6,
                    ANYCAST6,
                    IPPROTO_ICMPV6,
                    &[128, 0, 0, 0, 0, 0, 0, 0],
                ),
            ),
            PassNotUdp,
        ),
        (
            "IPv4 first fragment",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(
                    CLIENT4,
                    ANYCAST4,
                    IPPROTO_UDP,
                    &[],
                    0x2000,
                    &udp_v4(PORT, None),
                ),
            ),
            PassFragmentFirst,
        ),
        (
            "IPv4 later fragment",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(CLIENT4, ANYCAST4, IPPROTO_UDP, &[], 0x0003, payload),
            ),
            PassFragmentLater,
        ),
        ("IPv6 atomic fragment (offset 0)", frag6, PassFragmentFirst),
        ("IPv6 later fragment", frag6_later, PassFragmentLater),
        (
            "IPv6 hop-by-hop + destination options to the service",
            ext6(
                &[(IPV6_HOPOPTS, 0), (IPV6_DSTOPTS, 1)],
                IPPROTO_UDP,
                &v6_udp,
            ),
            UserspaceService,
        ),
        (
            "IPv6 routing + AH to the service",
            ext6(&[(IPV6_ROUTING, 0), (IPV6_AH, 4)], IPPROTO_UDP, &v6_udp),
            UserspaceService,
        ),
        (
            "IPv6 six extension headers to the service",
            ext6(&[(IPV6_DSTOPTS, 0); 6], IPPROTO_UDP, &v6_udp),
            UserspaceService,
        ),
        (
            "IPv6 seven extension headers",
            ext6(&[(IPV6_DSTOPTS, 0); 7], IPPROTO_UDP, &v6_udp),
            PassIpv6ExtLimit,
        ),
        (
            "IPv6 hop-by-hop then fragment",
            ext6(&[(IPV6_HOPOPTS, 0)], IPPROTO_FRAGMENT, &frag_later_hdr),
            PassFragmentLater,
        ),
        (
            "IPv6 destination options then TCP",
            ext6(&[(IPV6_DSTOPTS, 0)], IPPROTO_TCP, &[0u8; 20]),
            PassNotUdp,
        ),
        (
            "IPv6 extension header cut short",
            {
                let mut f = ext6(&[(IPV6_DSTOPTS, 0)], IPPROTO_UDP, &v6_udp);
                // Payload length ends inside the options header: the frame holds it,
                // the header's own length runs past the end of the frame.
                f.truncate(L3 + 40 + 1);
                f[L3 + 4..L3 + 6].copy_from_slice(&1u16.to_be_bytes());
                f
            },
            DropMalformedIpv6,
        ),
        (
            "IPv6 extension header beyond the payload length",
            {
                let mut f = ext6(&[(IPV6_DSTOPTS, 5)], IPPROTO_UDP, &v6_udp);
                f[L3 + 4..L3 + 6].copy_from_slice(&8u16.to_be_bytes());
                f
            },
            DropMalformedIpv6,
        ),
        (
            "WireGuard handshake initiation",
            udp4(None, CLIENT4, NODE4, WG_PORT, &wg_message(1, 148)),
            UserspaceWireguard,
        ),
        (
            "WireGuard transport data (unpadded, as boringtun sends it)",
            udp4(None, CLIENT4, NODE4, WG_PORT, &wg_message(4, 136)),
            UserspaceWireguard,
        ),
        (
            "WireGuard port, data shorter than a keepalive",
            udp4(None, CLIENT4, NODE4, WG_PORT, &wg_message(4, 31)),
            DropNotWireguard,
        ),
        (
            "WireGuard port, initiation of the wrong size",
            udp4(None, CLIENT4, NODE4, WG_PORT, &wg_message(1, 92)),
            DropNotWireguard,
        ),
        (
            "WireGuard port, unknown type",
            udp4(None, CLIENT4, NODE4, WG_PORT, &wg_message(9, 32)),
            DropNotWireguard,
        ),
        (
            "WireGuard port, empty",
            udp4(None, CLIENT4, NODE4, WG_PORT, &[]),
            DropNotWireguard,
        ),
        (
            "the node's address, another port",
            udp4(None, CLIENT4, NODE4, 22, payload),
            PassNotService,
        ),
        (
            "802.1Q tag cut short",
            with(ethernet(ETH_P_8021Q, None, &[0, 5]), 12, &[0x81, 0x00]),
            DropMalformedEthernet,
        ),
        (
            "IPv4 header cut short",
            v4[..L3 + 12].to_vec(),
            DropMalformedIpv4,
        ),
        (
            "IPv4 IHL 4",
            with(v4.clone(), L3, &[0x44]),
            DropMalformedIpv4,
        ),
        (
            "IPv4 total length beyond frame",
            with(v4.clone(), L3 + 2, &[0x05, 0xdc]),
            DropMalformedIpv4,
        ),
        (
            "IPv4 total length below IHL",
            with(v4.clone(), L3 + 2, &[0x00, 0x10]),
            DropMalformedIpv4,
        ),
        (
            "IPv6 version in an IPv4 frame",
            with(v4.clone(), L3, &[0x65]),
            DropMalformedIpv4,
        ),
        (
            "IPv6 header cut short",
            v6[..L3 + 30].to_vec(),
            DropMalformedIpv6,
        ),
        (
            "IPv6 payload length beyond frame",
            with(v6.clone(), L3 + 4, &[0x05, 0xdc]),
            DropMalformedIpv6,
        ),
        (
            "IPv4 version in an IPv6 frame",
            with(v6.clone(), L3, &[0x45]),
            DropMalformedIpv6,
        ),
        (
            "UDP header cut short (IPv4)",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(CLIENT4, ANYCAST4, IPPROTO_UDP, &[], 0, &[0, 1, 0, 53]),
            ),
            DropMalformedUdp,
        ),
        (
            "UDP length beyond IP payload (IPv4)",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(
                    CLIENT4,
                    ANYCAST4,
                    IPPROTO_UDP,
                    &[],
                    0,
                    &udp_v4(PORT, Some(200)),
                ),
            ),
            DropMalformedUdp,
        ),
        (
            "UDP length below 8 (IPv4)",
            ethernet(
                ETH_P_IPV4,
                None,
                &ipv4(
                    CLIENT4,
                    ANYCAST4,
                    IPPROTO_UDP,
                    &[],
                    0,
                    &udp_v4(PORT, Some(4)),
                ),
            ),
            DropMalformedUdp,
        ),
        (
            "UDP length beyond IP payload (IPv6)",
            with(v6.clone(), L3 + 40 + 4, &[0x01, 0x00]),
            DropMalformedUdp,
        ),
        (
            "UDP header cut short (IPv6)",
            ethernet(
                ETH_P_IPV6,
                None,
                &ipv6(CLIENT6, ANYCAST6, IPPROTO_UDP, &[0, 1, 0, 53]),
            ),
            DropMalformedUdp,
        ),
    ]
}

/// The counter a catalogue frame lands in with the daemon attached in `mode`. In
/// generic mode the daemon uses the socket backend (so service datagrams are passed to
/// the kernel, `socket_service`) and leaves the WireGuard port to the mesh socket (so
/// frames to it are the host's traffic, `pass_not_service`).
fn in_mode(counter: Counter, mode: &str) -> Counter {
    use Counter::*;
    match (mode, counter) {
        ("generic", UserspaceService) => SocketService,
        ("generic", UserspaceWireguard | DropNotWireguard) => PassNotService,
        _ => counter,
    }
}

fn counters_equal_frames_sent(mode: &str) {
    require_root();
    let (sender, node) = quiet_pair();
    let daemon = Daemon::start(&node, "eth0", mode, routing);
    assert_eq!(daemon.status()["xdp"]["mode"], mode);
    let before = daemon.counters();
    assert!(
        before.values().all(|v| *v == 0),
        "counters start at zero: {before:?}"
    );

    let catalogue = catalogue();
    let repeat = 3u64;
    let frames: Vec<Vec<u8>> = (0..repeat)
        .flat_map(|_| catalogue.iter().map(|(_, frame, _)| frame.clone()))
        .collect();
    send_frames(&sender, &frames);
    let sent = frames.len() as u64;
    let counters = counters_after(&daemon, sent);

    let mut expected: BTreeMap<String, u64> = Counter::ALL
        .iter()
        .map(|c| (c.name().to_owned(), 0))
        .collect();
    for (_, _, counter) in &catalogue {
        let counter = in_mode(*counter, mode);
        *expected.get_mut(counter.name()).expect("known counter") += repeat;
    }
    let expectations: Vec<String> = catalogue
        .iter()
        .map(|(what, _, counter)| format!("  {what} -> {}", in_mode(*counter, mode).name()))
        .collect();
    assert_eq!(
        counters,
        expected,
        "counters after {sent} frames ({mode} mode); each frame x{repeat}:\n{}",
        expectations.join("\n")
    );

    let status = daemon.stop();
    assert!(
        status.success(),
        "flynode exits cleanly on SIGTERM: {status}"
    );
    let link = node
        .command("ip")
        .args(["link", "show", "eth0"])
        .output()
        .expect("ip link");
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "XDP program still attached after stop: {link}"
    );
}

#[test]
fn counters_equal_frames_sent_in_native_mode() {
    counters_equal_frames_sent("native");
}

#[test]
fn counters_equal_frames_sent_in_generic_mode() {
    counters_equal_frames_sent("generic");
}

/// Waits until the counters have moved by `frames` in total and returns them.
fn counters_after(daemon: &Daemon, total: u64) -> BTreeMap<String, u64> {
    wait_for(Duration::from_secs(5), || {
        let c = daemon.counters();
        (c.values().sum::<u64>() >= total).then_some(c)
    })
    .unwrap_or_else(|| panic!("fewer than {total} frames seen: {:?}", daemon.counters()))
}

#[test]
fn a_port_added_then_removed_in_the_routing_file_changes_verdicts_after_sighup() {
    require_root();
    let (sender, node) = quiet_pair();
    let daemon = Daemon::start(&node, "eth0", "auto", routing);
    let to_5353 = || vec![udp4(None, CLIENT4, ANYCAST4, 5353, b"x"); 4];
    let to_53 = || vec![udp6(None, CLIENT6, ANYCAST6, PORT, b"y"); 2];

    send_frames(&sender, &to_5353());
    let c = counters_after(&daemon, 4);
    assert_eq!(c["drop_unknown_port"], 4, "{c:?}");

    let with_5353 = routing(&daemon.public_key()).replace("ports = [53]", "ports = [53, 5353]");
    daemon.reload_routing(&with_5353);
    wait_for(Duration::from_secs(5), || {
        (daemon.status()["routing"]["service_endpoints"] == 4).then_some(())
    })
    .expect("the reload adds two endpoints");
    send_frames(&sender, &to_5353());
    send_frames(&sender, &to_53());
    let c = counters_after(&daemon, 10);
    assert_eq!(c["userspace_service"], 6, "{c:?}");
    assert_eq!(c["drop_unknown_port"], 4, "{c:?}");

    // A broken file is rejected and the last good map stays.
    daemon.reload_routing("[[service]]\nid = \"nope\"\n");
    wait_for(Duration::from_secs(5), || {
        daemon.log().contains("routing map rejected").then_some(())
    })
    .unwrap_or_else(|| panic!("the broken file is not rejected:\n{}", daemon.log()));
    assert_eq!(daemon.status()["routing"]["service_endpoints"], 4);

    daemon.reload_routing(&routing(&daemon.public_key()));
    wait_for(Duration::from_secs(5), || {
        (daemon.status()["routing"]["service_endpoints"] == 2).then_some(())
    })
    .expect("the reload removes the 5353 endpoints");
    send_frames(&sender, &to_5353());
    send_frames(&sender, &to_53());
    let c = counters_after(&daemon, 16);
    assert_eq!(c["drop_unknown_port"], 8, "{c:?}");
    assert_eq!(c["userspace_service"], 8, "{c:?}");
    assert_eq!(
        c.values().sum::<u64>(),
        16,
        "nothing else on the wire: {c:?}"
    );
}

/// The status' count of datagrams the daemon received for service 7.
fn service_datagrams(daemon: &Daemon) -> u64 {
    daemon.status()["xdp"]["services"]["7"]["datagrams"]
        .as_u64()
        .unwrap_or(0)
}

/// Waits until the daemon serves `n` endpoints; returns how long that took.
fn until_endpoints(daemon: &Daemon, n: u64) -> Duration {
    let start = std::time::Instant::now();
    wait_for(Duration::from_secs(5), || {
        (daemon.status()["routing"]["service_endpoints"] == n).then_some(())
    })
    .unwrap_or_else(|| panic!("the daemon never served {n} endpoints:\n{}", daemon.log()));
    start.elapsed()
}

#[test]
fn a_service_added_then_removed_in_the_watched_file_leaves_other_traffic_alone() {
    require_root();
    let (sender, node) = quiet_pair();
    let daemon = Daemon::start(&node, "eth0", "native", routing);
    let stream: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| udp4(None, CLIENT4, ANYCAST4, PORT, &i.to_be_bytes()))
        .collect();
    let probe = || vec![udp4(None, CLIENT4, ANYCAST4, 5353, b"probe"); 20];
    let (added, removed) = std::thread::scope(|s| {
        // Service 7 on port 53 receives a steady stream (bursts of 20 every 2 ms) while
        // port 5353 is added and removed.
        let streaming = s.spawn(|| {
            for burst in stream.chunks(20) {
                send_frames(&sender, burst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let with_5353 = routing(&daemon.public_key()).replace("ports = [53]", "ports = [53, 5353]");
        daemon.write_routing(&with_5353);
        let added = until_endpoints(&daemon, 4);
        send_frames(&sender, &probe());
        daemon.write_routing(&routing(&daemon.public_key()));
        let removed = until_endpoints(&daemon, 2);
        send_frames(&sender, &probe());
        streaming.join().expect("stream");
        (added, removed)
    });
    eprintln!(
        "watched file to applied map (as seen through `flynode status`): add {added:?}, remove {removed:?}"
    );
    wait_for(Duration::from_secs(5), || {
        (service_datagrams(&daemon) == 2020).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "service 7 received {} datagrams, expected 2000 streamed + 20 probes: {}",
            service_datagrams(&daemon),
            daemon.status()["xdp"]
        )
    });
    let c = daemon.counters();
    assert_eq!(c["userspace_service"], 2020, "{c:?}");
    assert_eq!(c["drop_unknown_port"], 20, "{c:?}");
    assert_eq!(c.values().sum::<u64>(), 2040, "nothing else: {c:?}");
    assert_eq!(daemon.status()["xdp"]["ingress"]["xsk_datagrams"], 2020);
}

/// Pins a BPF object (program or map) at `path` (BPF_OBJ_PIN).
fn pin_bpf_object(fd: std::os::fd::BorrowedFd<'_>, path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct PinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let attr = PinAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    const BPF_OBJ_PIN: libc::c_long = 6;
    // SAFETY: bpf(2) with a correctly sized, initialised attribute struct whose path
    // pointer outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr as *const PinAttr,
            std::mem::size_of::<PinAttr>(),
        )
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
}

fn attached_xdp(node: &flynode::netns::Netns) -> String {
    let out = node
        .command("ip")
        .args(["-d", "link", "show", "eth0"])
        .output()
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter(|l| l.contains("xdp") || l.contains("prog/xdp"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_killed_daemon_leaves_no_program_and_a_restart_replaces_a_stale_one() {
    require_root();
    let (_sender, node) = quiet_pair();
    let daemon = Daemon::start(&node, "eth0", "generic", routing);
    assert!(!attached_xdp(&node).is_empty(), "attached while running");
    let prepared = daemon.kill();
    // The attachment is a bpf_link owned by the process: SIGKILL closes it.
    assert_eq!(attached_xdp(&node), "", "nothing left after kill -9");

    // A flynode program attached through netlink (what an older kernel without bpf_link
    // gets) outlives its process. Make one: load the program, pin it, attach the pin
    // with iproute2, unpin.
    // `ip -n` remounts /sys for the namespace, so the pin lives on a bpffs of our own.
    let bpffs = tempfile::tempdir().expect("tempdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(bpffs.path())
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount bpffs");
    let pin = bpffs.path().join("stale");
    node.enter(|| {
        let classifier = flynode::xdp::XdpClassifier::load().expect("load");
        pin_bpf_object(classifier.program_fd().expect("fd"), &pin);
    })
    .unwrap();
    let attach = node.ip(&[
        "link",
        "set",
        "dev",
        "eth0",
        "xdpgeneric",
        "pinned",
        pin.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&pin);
    let _ = std::process::Command::new("umount")
        .arg(bpffs.path())
        .status();
    attach.expect("attach the stale program through netlink");
    let stale = attached_xdp(&node);
    assert!(!stale.is_empty(), "stale program attached");

    let routing_text = routing(&prepared.public_key);
    let daemon = prepared.start(&node, &routing_text);
    assert!(
        daemon
            .log()
            .contains("detached a stale flynode XDP program"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.status()["xdp"]["mode"], "generic");
    let now = attached_xdp(&node);
    assert!(!now.is_empty() && now != stale, "a new program: {now}");
    assert!(daemon.stop().success());
    assert_eq!(attached_xdp(&node), "", "nothing left after stop");
}
