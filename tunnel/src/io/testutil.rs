//! Test helpers: private network namespaces and hand-built packets.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use super::netlink::Netlink;
use super::sys::is_root;

/// Runs `body` on a dedicated thread that has unshared into a fresh network namespace
/// (with `lo` up). Threads spawned by `body` inherit that namespace. The namespace, and
/// every device created in it, disappears when the last thread and descriptor using it
/// are gone. Skips (with a message) when not root or when namespaces are unavailable.
pub(crate) fn in_netns<F: FnOnce() + Send + 'static>(test: &str, body: F) {
    if !is_root() {
        eprintln!("SKIP {test}: needs root (CAP_NET_ADMIN) for a private network namespace");
        return;
    }
    let name = test.to_string();
    let handle = std::thread::Builder::new()
        .name(format!("netns-{test}"))
        .spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) only changes the calling thread's network
            // namespace; it has no memory-safety preconditions.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "SKIP {name}: unshare(CLONE_NEWNET) failed: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            let mut nl = Netlink::open().expect("netlink in new netns");
            nl.set_link(1, Some(true), None).expect("bring lo up");
            body();
        })
        .expect("spawn netns thread");
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `ip ARGS` (in the calling thread's namespace) and returns stdout; panics on
/// failure.
pub(crate) fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip(8)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// RFC 1071 one's-complement sum, folded, not inverted.
pub(crate) fn ones_sum(data: &[u8], mut acc: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [b] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*b) << 8);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// An IPv6/UDP packet with correct checksum.
pub(crate) fn ipv6_udp(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let mut p = Vec::with_capacity(40 + ulen as usize);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&ulen.to_be_bytes());
    p.push(17);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&ulen.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(ulen).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let s = ones_sum(&p[40..], u32::from(ones_sum(&pseudo, 0)));
    let c = !s;
    let c = if c == 0 { 0xffff } else { c };
    p[46..48].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv4/UDP packet with correct checksums.
pub(crate) fn ipv4_udp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let tot = 20 + ulen;
    let mut p = Vec::with_capacity(tot as usize);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&tot.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let hc = !ones_sum(&p[..20], 0);
    p[10..12].copy_from_slice(&hc.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&ulen.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&ulen.to_be_bytes());
    let s = ones_sum(&p[20..], u32::from(ones_sum(&pseudo, 0)));
    let c = !s;
    let c = if c == 0 { 0xffff } else { c };
    p[26..28].copy_from_slice(&c.to_be_bytes());
    p
}

/// The UDP checksum's partial form for an IPv4 (no options) or IPv6 packet: the folded
/// pseudo-header sum over its addresses and UDP length (the rest of the packet).
pub(crate) fn udp_partial_seed(p: &[u8]) -> u16 {
    let (ip_len, addrs) = if p[0] >> 4 == 4 {
        (usize::from(p[0] & 0x0f) * 4, 12..20)
    } else {
        (40, 8..40)
    };
    let udp_len = (p.len() - ip_len) as u16;
    let mut pseudo = p[addrs].to_vec();
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    ones_sum(&pseudo, 0)
}

/// Verifies the transport (TCP/UDP) checksum of an IPv4 or IPv6 packet without
/// extension headers / options beyond IHL.
pub(crate) fn transport_checksum_ok(p: &[u8]) -> bool {
    let mut pseudo = Vec::new();
    let (l4, proto) = match p[0] >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            pseudo.extend_from_slice(&p[12..20]);
            pseudo.extend_from_slice(&[0, p[9]]);
            pseudo.extend_from_slice(&((p.len() - ihl) as u16).to_be_bytes());
            (&p[ihl..], p[9])
        }
        6 => {
            pseudo.extend_from_slice(&p[8..40]);
            pseudo.extend_from_slice(&((p.len() - 40) as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, p[6]]);
            (&p[40..], p[6])
        }
        _ => return false,
    };
    let _ = proto;
    ones_sum(l4, u32::from(ones_sum(&pseudo, 0))) == 0xffff
}

#[test]
fn built_packets_have_valid_checksums() {
    let p = ipv6_udp(
        "fd00::2".parse().unwrap(),
        1,
        "fd00::1".parse().unwrap(),
        2,
        b"hello",
    );
    assert!(transport_checksum_ok(&p));
    let p = ipv4_udp(
        "198.18.0.2".parse().unwrap(),
        1,
        "198.18.0.1".parse().unwrap(),
        2,
        b"hi!",
    );
    assert!(transport_checksum_ok(&p));
    assert_eq!(ones_sum(&p[..20], 0), 0xffff);
}

/// An IPv4 or IPv6 TCP packet (20-byte header, no options) with correct checksums.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tcp_packet(
    v6: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let tcp_len = tcp.len();
    let mut p = Vec::new();
    let mut pseudo = Vec::new();
    if v6 {
        let (s, d) = (
            "fd00:1::2".parse::<Ipv6Addr>().unwrap(),
            "fd00::1".parse::<Ipv6Addr>().unwrap(),
        );
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&p[8..40]);
        pseudo.extend_from_slice(&(tcp_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
    } else {
        let (s, d) = (Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(198, 18, 0, 1));
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        p.extend_from_slice(&s.octets());
        p.extend_from_slice(&d.octets());
        let hc = !ones_sum(&p[..20], 0);
        p[10..12].copy_from_slice(&hc.to_be_bytes());
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    }
    let c = !ones_sum(&tcp, u32::from(ones_sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&tcp);
    p
}

/// A small deterministic PRNG (xorshift64*) for randomized tests.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
