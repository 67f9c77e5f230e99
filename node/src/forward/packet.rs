//! IP/UDP packets as the forwarding layer reads and writes them: parsed without copying,
//! built straight into the output buffer from parts (a PROXY v2 header and the datagram
//! are two slices, never joined first), checksums computed here.
//!
//! Written by hand rather than with a packet crate: the forwarding path needs exactly
//! plain IPv4 (options skipped) / IPv6 (no extension headers) with UDP, and builds
//! from several slices into a borrowed buffer, which the crates we looked at (etherparse,
//! pnet) do only with intermediate allocations or copies.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const IPV4_HEADER: usize = 20;
pub const IPV6_HEADER: usize = 40;
pub const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const TTL: u8 = 64;

/// A UDP datagram inside an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// Why a packet is not a UDP datagram we can forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotUdp {
    /// Shorter than its headers say, or a header field is inconsistent.
    Malformed,
    /// Another transport protocol (or IPv6 extension headers before UDP).
    OtherProtocol,
    /// An IPv4 fragment.
    Fragment,
}

/// Parses an IPv4 or IPv6 packet carrying UDP. The UDP length must fit the IP payload
/// (trailing bytes beyond it are ignored, as the kernel does); the checksum is not
/// verified (packets come from the kernel or from an authenticated tunnel peer).
pub fn parse_udp(p: &[u8]) -> Result<Udp<'_>, NotUdp> {
    let (src, dst, l4) = match p.first().map(|b| b >> 4) {
        Some(4) => {
            if p.len() < IPV4_HEADER {
                return Err(NotUdp::Malformed);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if ihl < IPV4_HEADER || total < ihl || total > p.len() {
                return Err(NotUdp::Malformed);
            }
            if u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 {
                return Err(NotUdp::Fragment);
            }
            if p[9] != PROTO_UDP {
                return Err(NotUdp::OtherProtocol);
            }
            let src = IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]));
            (src, dst, &p[ihl..total])
        }
        Some(6) => {
            if p.len() < IPV6_HEADER {
                return Err(NotUdp::Malformed);
            }
            let payload = usize::from(u16::from_be_bytes([p[4], p[5]]));
            if IPV6_HEADER + payload > p.len() {
                return Err(NotUdp::Malformed);
            }
            if p[6] != PROTO_UDP {
                return Err(NotUdp::OtherProtocol);
            }
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap()));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap()));
            (src, dst, &p[IPV6_HEADER..IPV6_HEADER + payload])
        }
        _ => return Err(NotUdp::Malformed),
    };
    if l4.len() < UDP_HEADER {
        return Err(NotUdp::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    if len < UDP_HEADER || len > l4.len() {
        return Err(NotUdp::Malformed);
    }
    Ok(Udp {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        payload: &l4[UDP_HEADER..len],
    })
}

/// The IP + UDP header length for a datagram between addresses of this family.
pub const fn udp_overhead(v6: bool) -> usize {
    if v6 {
        IPV6_HEADER + UDP_HEADER
    } else {
        IPV4_HEADER + UDP_HEADER
    }
}

/// Writes an IP/UDP packet `src → dst` whose payload is the concatenation of `parts`
/// into `out`, checksums included. Returns its length, or `None` when `src` and `dst`
/// differ in family, the packet does not fit `out`, or it exceeds the 64 KiB limit.
pub fn write_udp(
    out: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    parts: &[&[u8]],
) -> Option<usize> {
    let (ip, udp_len) = write_udp_unsummed(out, src, dst, parts)?;
    let udp = &mut out[ip..ip + udp_len];
    let sum = pseudo_header_sum(src.ip(), dst.ip(), PROTO_UDP, udp_len) + sum_bytes(udp);
    let mut check = fold(sum);
    if check == 0 {
        // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
        check = 0xffff;
    }
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    Some(ip + udp_len)
}

/// As [`write_udp`], but the UDP checksum is left for the kernel to complete
/// (CHECKSUM_PARTIAL): its field holds the folded pseudo-header sum. Returns the
/// length, `csum_start` (the UDP header's offset) and `csum_offset` (6), the virtio-net
/// header's fields. Summing 1200 payload bytes is a few hundred ns that a datagram
/// delivered to a local container never needs.
pub fn write_udp_partial(
    out: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    parts: &[&[u8]],
) -> Option<(usize, u16, u16)> {
    let (ip, udp_len) = write_udp_unsummed(out, src, dst, parts)?;
    let pseudo = !fold(pseudo_header_sum(src.ip(), dst.ip(), PROTO_UDP, udp_len));
    out[ip + 6..ip + 8].copy_from_slice(&pseudo.to_be_bytes());
    Some((ip + udp_len, ip as u16, 6))
}

/// The IP header, UDP header (checksum 0) and payload: `(IP header length, UDP length)`.
fn write_udp_unsummed(
    out: &mut [u8],
    src: SocketAddr,
    dst: SocketAddr,
    parts: &[&[u8]],
) -> Option<(usize, usize)> {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let udp_len = UDP_HEADER + payload;
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = IPV4_HEADER + udp_len;
            if total > usize::from(u16::MAX) || total > out.len() {
                return None;
            }
            write_ipv4_header(&mut out[..IPV4_HEADER], s, d, PROTO_UDP, total as u16);
            IPV4_HEADER
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let total = IPV6_HEADER + udp_len;
            if udp_len > usize::from(u16::MAX) || total > out.len() {
                return None;
            }
            write_ipv6_header(&mut out[..IPV6_HEADER], s, d, PROTO_UDP, udp_len as u16);
            IPV6_HEADER
        }
        _ => return None,
    };
    let udp = &mut out[ip..ip + udp_len];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[6..8].fill(0);
    let mut at = UDP_HEADER;
    for part in parts {
        udp[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Some((ip, udp_len))
}

fn write_ipv4_header(h: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, proto: u8, total: u16) {
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[4..6].fill(0); // identification: DF is set, never fragmented
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[8] = TTL;
    h[9] = proto;
    h[10..12].fill(0);
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let check = fold(sum_bytes(h));
    h[10..12].copy_from_slice(&check.to_be_bytes());
}

fn write_ipv6_header(h: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: u16) {
    h[0..4].copy_from_slice(&0x6000_0000u32.to_be_bytes());
    h[4..6].copy_from_slice(&payload.to_be_bytes());
    h[6] = next;
    h[7] = TTL;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
}

/// Writes an ICMP "fragmentation needed" (IPv4, type 3 code 4) or ICMPv6 "packet too
/// big" (type 2) from `from` to the sender of the datagram `quoted` (`client → to`,
/// its UDP payload `payload`), announcing `mtu` as the largest IP packet that passes.
/// The quoted original is rebuilt from its addresses (IP header + UDP header + as much
/// payload as the message allows), which is what the client's stack matches its socket
/// with. Returns the length of the complete IP packet in `out`.
pub fn write_too_big(
    out: &mut [u8],
    from: IpAddr,
    client: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    mtu: u16,
) -> Option<usize> {
    // The quoted packet: IPv4 quotes header + 8 bytes (RFC 792); IPv6 as much as fits
    // the minimum MTU (RFC 4443: 1280 - 40 - 8).
    let mut quote = [0u8; 1232];
    match (from, client.ip(), to.ip()) {
        (IpAddr::V4(f), IpAddr::V4(c), IpAddr::V4(t)) => {
            let original_len = IPV4_HEADER + UDP_HEADER + payload.len();
            write_ipv4_header(
                &mut quote[..IPV4_HEADER],
                c,
                t,
                PROTO_UDP,
                original_len.min(usize::from(u16::MAX)) as u16,
            );
            let udp = &mut quote[IPV4_HEADER..IPV4_HEADER + UDP_HEADER];
            udp[0..2].copy_from_slice(&client.port().to_be_bytes());
            udp[2..4].copy_from_slice(&to.port().to_be_bytes());
            let udp_len = (UDP_HEADER + payload.len()).min(usize::from(u16::MAX)) as u16;
            udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
            let quoted = &quote[..IPV4_HEADER + UDP_HEADER];
            let len = IPV4_HEADER + 8 + quoted.len();
            if out.len() < len {
                return None;
            }
            write_ipv4_header(&mut out[..IPV4_HEADER], f, c, PROTO_ICMP, len as u16);
            let icmp = &mut out[IPV4_HEADER..len];
            icmp[0] = 3;
            icmp[1] = 4;
            icmp[2..4].fill(0);
            icmp[4..6].fill(0);
            icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
            icmp[8..].copy_from_slice(quoted);
            let check = fold(sum_bytes(icmp));
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
            Some(len)
        }
        (IpAddr::V6(f), IpAddr::V6(c), IpAddr::V6(_)) => {
            let original = write_udp(&mut quote, client, to, &[payload]).unwrap_or(0);
            let original_ip_len = IPV6_HEADER + UDP_HEADER + payload.len();
            let quoted_len = if original == 0 {
                // Too long to rebuild whole: header + UDP header + what fits.
                let cut = 1232 - IPV6_HEADER - UDP_HEADER;
                write_udp(
                    &mut quote,
                    client,
                    to,
                    &[&payload[..cut.min(payload.len())]],
                )?;
                let q = &mut quote[..IPV6_HEADER];
                q[4..6].copy_from_slice(
                    &((original_ip_len - IPV6_HEADER).min(usize::from(u16::MAX)) as u16)
                        .to_be_bytes(),
                );
                1232
            } else {
                original
            };
            let icmp_len = 8 + quoted_len;
            let len = IPV6_HEADER + icmp_len;
            if out.len() < len {
                return None;
            }
            write_ipv6_header(&mut out[..IPV6_HEADER], f, c, PROTO_ICMPV6, icmp_len as u16);
            let icmp = &mut out[IPV6_HEADER..len];
            icmp[0] = 2;
            icmp[1] = 0;
            icmp[2..4].fill(0);
            icmp[4..8].copy_from_slice(&u32::from(mtu).to_be_bytes());
            icmp[8..].copy_from_slice(&quote[..quoted_len]);
            let sum = pseudo_header_sum(IpAddr::V6(f), IpAddr::V6(c), PROTO_ICMPV6, icmp_len)
                + sum_bytes(icmp);
            let check = fold(sum);
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
            Some(len)
        }
        _ => None,
    }
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let addrs = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum_bytes(&s.octets()) + sum_bytes(&d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum_bytes(&s.octets()) + sum_bytes(&d.octets()),
        _ => 0,
    };
    addrs + u64::from(proto) + len as u64
}

/// The one's-complement sum of `data` as big-endian 16-bit words (odd length padded
/// with a zero byte), not yet folded. Sums 4 bytes at a time into a u64: the carries
/// accumulate in the upper half and are folded once at the end.
fn sum_bytes(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum + u64::from(u32::from_be_bytes(tail))
}

/// Folds a sum to 16 bits and complements it.
fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Verifies a packet's checksums the way a receiver does: summing with the stored
    /// checksum must give all ones.
    fn checksums_ok(p: &[u8]) -> bool {
        let u = parse_udp(p).unwrap();
        let (ip_len, ip_ok) = match u.src {
            SocketAddr::V4(_) => (IPV4_HEADER, fold(sum_bytes(&p[..IPV4_HEADER])) == 0),
            SocketAddr::V6(_) => (IPV6_HEADER, true),
        };
        let udp = &p[ip_len..ip_len + UDP_HEADER + u.payload.len()];
        let sum = pseudo_header_sum(u.src.ip(), u.dst.ip(), PROTO_UDP, udp.len()) + sum_bytes(udp);
        ip_ok && fold(sum) == 0
    }

    #[test]
    fn v4_round_trip_with_parts_and_checksums() {
        let mut buf = [0u8; 2048];
        let len = write_udp(
            &mut buf,
            sa("198.18.0.2:40000"),
            sa("198.18.200.2:53"),
            &[b"PROXY", b"hello"],
        )
        .unwrap();
        assert_eq!(len, 20 + 8 + 10);
        let u = parse_udp(&buf[..len]).unwrap();
        assert_eq!(u.src, sa("198.18.0.2:40000"));
        assert_eq!(u.dst, sa("198.18.200.2:53"));
        assert_eq!(u.payload, b"PROXYhello");
        assert!(checksums_ok(&buf[..len]));
    }

    #[test]
    fn v6_round_trip_with_checksums() {
        let mut buf = [0u8; 2048];
        for n in [0usize, 1, 2, 3, 7, 1200] {
            let payload = vec![0xa5u8; n];
            let len = write_udp(
                &mut buf,
                sa("[2001:db8::2]:40000"),
                sa("[fd00:c::2]:53"),
                &[&payload],
            )
            .unwrap();
            let u = parse_udp(&buf[..len]).unwrap();
            assert_eq!(u.payload, &payload[..]);
            assert!(checksums_ok(&buf[..len]), "len {n}");
        }
    }

    /// Completing a partial packet the way the kernel does (sum from `csum_start` with
    /// the field as the initial value) gives exactly what `write_udp` writes.
    #[test]
    fn partial_checksum_completes_to_the_full_one() {
        for (src, dst) in [
            ("198.18.0.2:40000", "198.18.200.2:53"),
            ("[2001:db8::2]:40000", "[fd00:c::2]:53"),
        ] {
            for n in [0usize, 1, 2, 3, 7, 1200] {
                let payload = vec![0x5au8; n];
                let mut full = [0u8; 2048];
                let mut partial = [0u8; 2048];
                let len = write_udp(&mut full, sa(src), sa(dst), &[b"PROXY", &payload]).unwrap();
                let (plen, start, offset) =
                    write_udp_partial(&mut partial, sa(src), sa(dst), &[b"PROXY", &payload])
                        .unwrap();
                assert_eq!((plen, offset), (len, 6));
                let (start, at) = (usize::from(start), usize::from(start + offset));
                assert_eq!(start, if src.starts_with('[') { 40 } else { 20 });
                let initial = u16::from_be_bytes([partial[at], partial[at + 1]]);
                partial[at..at + 2].fill(0);
                let mut check = fold(sum_bytes(&partial[start..len]) + u64::from(initial));
                if check == 0 {
                    check = 0xffff;
                }
                partial[at..at + 2].copy_from_slice(&check.to_be_bytes());
                assert_eq!(&partial[..len], &full[..len], "{src} {n}");
            }
        }
    }

    #[test]
    fn checksum_matches_a_known_packet() {
        // RFC 1071's example words: 0x0001 f203 f4f5 f6f7 → sum 0xddf2, checksum 0x220d.
        assert_eq!(
            fold(sum_bytes(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0x220d
        );
    }

    #[test]
    fn mixed_families_and_small_buffers_are_refused() {
        let mut buf = [0u8; 64];
        assert_eq!(
            write_udp(&mut buf, sa("198.18.0.2:1"), sa("[fd00::1]:2"), &[]),
            None
        );
        assert_eq!(
            write_udp(
                &mut buf,
                sa("198.18.0.2:1"),
                sa("198.18.0.3:2"),
                &[&[0; 64]]
            ),
            None
        );
    }

    #[test]
    fn parse_rejects_what_it_cannot_forward() {
        let mut buf = [0u8; 128];
        let len = write_udp(&mut buf, sa("198.18.0.2:1"), sa("198.18.0.3:2"), &[b"x"]).unwrap();
        for cut in 0..len {
            assert_eq!(
                parse_udp(&buf[..cut]),
                Err(NotUdp::Malformed),
                "cut at {cut}"
            );
        }
        let mut frag = buf;
        frag[6] = 0x20; // MF
        assert_eq!(parse_udp(&frag[..len]), Err(NotUdp::Fragment));
        let mut tcp = buf;
        tcp[9] = 6;
        assert_eq!(parse_udp(&tcp[..len]), Err(NotUdp::OtherProtocol));
        let mut bad_udp_len = buf;
        bad_udp_len[20 + 5] = 200;
        assert_eq!(parse_udp(&bad_udp_len[..len]), Err(NotUdp::Malformed));
        assert_eq!(parse_udp(&[0x55; 60]), Err(NotUdp::Malformed));
    }

    #[test]
    fn too_big_messages_are_well_formed() {
        let mut out = [0u8; 1500];
        let payload = vec![1u8; 1400];
        let len = write_too_big(
            &mut out,
            "198.18.100.1".parse().unwrap(),
            sa("198.18.0.2:40000"),
            sa("198.18.100.1:53"),
            &payload,
            1372,
        )
        .unwrap();
        assert_eq!(len, 20 + 8 + 28);
        assert_eq!(out[9], PROTO_ICMP);
        assert_eq!(fold(sum_bytes(&out[..20])), 0);
        assert_eq!(fold(sum_bytes(&out[20..len])), 0);
        assert_eq!(&out[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1372);
        // The quoted header names the client's datagram and its original length.
        assert_eq!(&out[28 + 12..28 + 16], &[198, 18, 0, 2]);
        assert_eq!(u16::from_be_bytes([out[30], out[31]]), 1428);

        let len = write_too_big(
            &mut out,
            "2001:db8:100::1".parse().unwrap(),
            sa("[2001:db8::2]:40000"),
            sa("[2001:db8:100::1]:53"),
            &payload,
            1348,
        )
        .unwrap();
        assert_eq!(len, 40 + 8 + 1232);
        assert_eq!(out[6], PROTO_ICMPV6);
        assert_eq!(out[40], 2);
        let sum = pseudo_header_sum(
            "2001:db8:100::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            PROTO_ICMPV6,
            len - 40,
        ) + sum_bytes(&out[40..len]);
        assert_eq!(fold(sum), 0);
        // Quoted IPv6 header: payload length of the original (8 + 1400).
        assert_eq!(u16::from_be_bytes([out[48 + 4], out[48 + 5]]), 1408);
    }
}
