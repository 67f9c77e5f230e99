//! `worker_packet`: the forwarding layer's packet parse and rebuild
//! (`flynode::forward::packet`, with `forward::proxy` between), in the steps
//! `forward::engine` takes them.
//!
//! Input: one IP packet, used three ways.
//! 1. As an inner packet arriving at a worker from the mesh: parsed, its PROXY header
//!    decoded, and rebuilt towards a container CHECKSUM_PARTIAL (with and without the
//!    PROXY header, as `proxy_protocol` says). Completed as the kernel would, the
//!    rebuilt packet parses back to client → container with the same payload and valid
//!    IP and UDP checksums, and equals the fully summed `write_udp`. It is only refused
//!    when it would exceed 64 KiB.
//! 2. As a container's reply at the worker: wrapped with the reply TLV towards the edge,
//!    which parses it back to anycast → client with the same payload.
//! 3. As a client's datagram at the edge: forwarded to a worker and delivered by step 1
//!    to a container unchanged; and an ICMP "too big" about it is well-formed (checksums,
//!    type, MTU, the quoted datagram naming the client).
//!
//! Every parse is also checked against the bytes: the addresses, ports and payload
//! `parse_udp` returns are where the IP and UDP headers say.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flynode::forward::engine::TLV_REPLY;
use flynode::forward::packet::{self, Udp};
use flynode::forward::proxy;

use crate::checksum::{self, PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP};

/// The value of the reply TLV (`forward::engine`'s private `REPLY`).
const REPLY: &[u8] = b"R";
const EDGE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, 1);
const WORKER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf1, 0, 0, 0, 0, 0, 2);
const FORWARD_PORT: u16 = 51821;
/// `forward::engine`'s scratch buffer for packets to the mesh.
const SCRATCH: usize = 65536 + 256;

pub fn worker_packet(data: &[u8]) {
    if let Some((client, _, d)) = inbound(data) {
        let target = container(client.is_ipv6());
        deliver(client, target, &[&d.header, &d.payload]);
        deliver(client, target, &[&d.payload]);
    }
    let Ok(udp) = packet::parse_udp(data) else {
        return;
    };
    container_reply(&udp);
    edge_forward(&udp, data.len());
}

/// Step 1 up to the delivery: (client, anycast, header + payload split) of an inner packet
/// the worker accepts.
fn inbound(p: &[u8]) -> Option<(SocketAddr, SocketAddr, Delivered)> {
    let udp = packet::parse_udp(p).ok()?;
    located(p, &udp);
    udp.src.is_ipv6().then_some(())?;
    let (header, hlen) = proxy::decode(udp.payload).ok()?;
    let (client, anycast) = header.endpoints()?;
    if header.tlv(TLV_REPLY) == Some(REPLY) {
        return None; // a reply: sent to the client from a socket, no packet is built
    }
    Some((
        client,
        anycast,
        Delivered {
            header: udp.payload[..hlen].to_vec(),
            payload: udp.payload[hlen..].to_vec(),
        },
    ))
}

struct Delivered {
    header: Vec<u8>,
    payload: Vec<u8>,
}

/// A container address of the client's family (the service's target).
fn container(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 2).into(), 53)
    } else {
        SocketAddr::new(Ipv4Addr::new(10, 0, 0, 2).into(), 53)
    }
}

/// Builds client → target as the worker does (a TUN reservation of at most 64 KiB) and
/// checks the packet; returns it, completed.
fn deliver(client: SocketAddr, target: SocketAddr, parts: &[&[u8]]) -> Option<Vec<u8>> {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let max = packet::udp_overhead(client.is_ipv6()) + body;
    let mut buf = vec![0u8; max.min(65535)];
    let Some((len, start, offset)) = packet::write_udp_partial(&mut buf, client, target, parts)
    else {
        assert!(max > 65535, "a {max}-byte packet refused");
        return None;
    };
    assert!(max <= 65535, "a {max}-byte packet built");
    let ip = if client.is_ipv6() { 40 } else { 20 };
    assert_eq!((len, usize::from(start), offset), (max, ip, 6));
    let mut p = buf[..len].to_vec();
    checksum::complete_partial(&mut p, ip, 6);
    let joined: Vec<u8> = parts.concat();
    let udp = packet::parse_udp(&p).expect("a rebuilt packet parses");
    assert_eq!(
        (udp.src, udp.dst, udp.payload),
        (client, target, &joined[..])
    );
    well_formed(&p);
    let mut full = vec![0u8; len];
    assert_eq!(
        packet::write_udp(&mut full, client, target, parts),
        Some(len)
    );
    assert_eq!(
        full, p,
        "write_udp and a completed write_udp_partial differ"
    );
    Some(p)
}

/// Step 2: `udp` is container → client; the flow says which anycast address it was for.
fn container_reply(udp: &Udp<'_>) {
    let client = udp.dst;
    let anycast = anycast(client.is_ipv6());
    let mut header = [0u8; 64];
    let hlen = proxy::encode_udp(anycast, client, &[(TLV_REPLY, REPLY)], &mut header)
        .expect("a reply header fits 64 bytes");
    let edge = SocketAddr::new(EDGE.into(), FORWARD_PORT);
    let Some(p) = to_mesh(WORKER, edge, &header[..hlen], udp.payload) else {
        return;
    };
    let at_edge = packet::parse_udp(&p).expect("the edge parses the reply");
    let (h, n) = proxy::decode(at_edge.payload).expect("the edge decodes the reply header");
    assert_eq!(h.endpoints(), Some((anycast, client)));
    assert_eq!(h.tlv(TLV_REPLY), Some(REPLY));
    assert_eq!(&at_edge.payload[n..], udp.payload, "reply payload");
}

fn anycast(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1).into(),
            53,
        )
    } else {
        SocketAddr::new(Ipv4Addr::new(198, 18, 100, 1).into(), 53)
    }
}

/// Builds a mesh packet as `forward::engine` does (its scratch buffer) and checks it.
fn to_mesh(from: Ipv6Addr, to: SocketAddr, header: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; SCRATCH];
    let src = SocketAddr::new(from.into(), FORWARD_PORT);
    let body = header.len() + payload.len();
    let Some(len) = packet::write_udp(&mut buf, src, to, &[header, payload]) else {
        assert!(8 + body > 65535, "a mesh packet of {body} bytes refused");
        return None;
    };
    assert_eq!(len, 48 + body);
    let p = buf[..len].to_vec();
    well_formed(&p);
    let udp = packet::parse_udp(&p).expect("a mesh packet parses");
    assert_eq!((udp.src, udp.dst), (src, to));
    Some(p)
}

/// Step 3: `udp` is client → anycast, arriving at the edge.
fn edge_forward(udp: &Udp<'_>, packet_len: usize) {
    let (client, anycast) = (udp.src, udp.dst);
    let mut header = [0u8; 64];
    let hlen = proxy::encode_udp(client, anycast, &[], &mut header).expect("header fits");
    let worker = SocketAddr::new(WORKER.into(), FORWARD_PORT);
    if let Some(p) = to_mesh(EDGE, worker, &header[..hlen], udp.payload) {
        let (c, a, d) = inbound(&p).expect("the worker accepts what the edge sent");
        assert_eq!((c, a), (client, anycast));
        assert_eq!(d.payload, udp.payload);
        let target = container(client.is_ipv6());
        if let Some(p) = deliver(client, target, &[&d.payload]) {
            assert_eq!(packet::parse_udp(&p).map(|u| u.payload), Ok(udp.payload));
        }
    }
    too_big(
        client,
        anycast,
        udp.payload,
        1280 + (packet_len % 256) as u16,
    );
}

/// The ICMP message `forward::icmp` sends about a datagram that does not fit the mesh
/// (into its 1280-byte buffer).
fn too_big(client: SocketAddr, anycast: SocketAddr, payload: &[u8], mtu: u16) {
    let mut out = [0u8; 1280];
    let from = anycast.ip();
    let len = packet::write_too_big(&mut out, from, client, anycast, payload, mtu)
        .expect("an ICMP message for a same-family datagram");
    let p = &out[..len];
    match (from, client.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => {
            assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), len);
            assert!(checksum::ipv4_header_ok(&p[..20]), "IPv4 header checksum");
            assert_eq!(p[9], PROTO_ICMP);
            let icmp = &p[20..];
            assert_eq!(checksum::ones_sum(icmp, 0), 0xffff, "ICMP checksum");
            assert_eq!((icmp[0], icmp[1]), (3, 4));
            assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu);
            quoted(&icmp[8..], client, anycast);
        }
        (IpAddr::V6(_), IpAddr::V6(_)) => {
            assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, len);
            assert_eq!(p[6], PROTO_ICMPV6);
            assert!(len <= 1280, "ICMPv6 error larger than the minimum MTU");
            let icmp = &p[40..];
            assert!(
                checksum::transport_ok(from, client.ip(), PROTO_ICMPV6, icmp),
                "ICMPv6 checksum"
            );
            assert_eq!(icmp[0], 2);
            assert_eq!(
                u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
                u32::from(mtu)
            );
            quoted(&icmp[8..], client, anycast);
        }
        _ => unreachable!("same family by construction"),
    }
}

/// The quoted original names client → anycast.
fn quoted(q: &[u8], client: SocketAddr, anycast: SocketAddr) {
    let (src, dst) = checksum::addresses(q).expect("a quoted IP header");
    assert_eq!((src, dst), (client.ip(), anycast.ip()), "quoted addresses");
    let ip = if client.is_ipv6() { 40 } else { 20 };
    let udp = &q[ip..ip + 8];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), client.port());
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), anycast.port());
}

/// IP header checksum (IPv4) and UDP checksum are right; lengths agree with the bytes.
fn well_formed(p: &[u8]) {
    let (src, dst) = checksum::addresses(p).expect("an IP header");
    let ip = if p[0] >> 4 == 4 {
        assert_eq!(p[0], 0x45);
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert!(checksum::ipv4_header_ok(&p[..20]), "IPv4 header checksum");
        assert_eq!(p[9], PROTO_UDP);
        20
    } else {
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])) + 40, p.len());
        assert_eq!(p[6], PROTO_UDP);
        40
    };
    let udp = &p[ip..];
    assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
    assert!(
        checksum::transport_ok(src, dst, PROTO_UDP, udp),
        "UDP checksum"
    );
}

/// What `parse_udp` returned is where the packet's headers say.
fn located(p: &[u8], udp: &Udp<'_>) {
    let (src, dst) = checksum::addresses(p).expect("an IP header");
    assert_eq!((udp.src.ip(), udp.dst.ip()), (src, dst));
    let start = (udp.payload.as_ptr() as usize).wrapping_sub(p.as_ptr() as usize);
    assert!(
        start >= 28 && start + udp.payload.len() <= p.len(),
        "payload outside"
    );
    let h = &p[start - 8..start];
    assert_eq!(u16::from_be_bytes([h[0], h[1]]), udp.src.port());
    assert_eq!(u16::from_be_bytes([h[2], h[3]]), udp.dst.port());
    assert_eq!(
        usize::from(u16::from_be_bytes([h[4], h[5]])),
        udp.payload.len() + 8
    );
    let ip_end = if p[0] >> 4 == 4 {
        assert_eq!(
            start - 8,
            usize::from(p[0] & 0x0f) * 4,
            "UDP after the IPv4 header"
        );
        usize::from(u16::from_be_bytes([p[2], p[3]]))
    } else {
        assert_eq!(start - 8, 40, "UDP right after the IPv6 header");
        40 + usize::from(u16::from_be_bytes([p[4], p[5]]))
    };
    assert!(
        start + udp.payload.len() <= ip_end,
        "payload past the IP packet"
    );
}
