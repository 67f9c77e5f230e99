//! The userspace half of the classifier: pulls the addresses, ports and payload out of
//! an Ethernet frame that the XDP program redirected to AF_XDP.
//!
//! The XDP program has already validated every header it redirects, so this parser is
//! the same walk without the policy; it is still total (any byte string gives a
//! datagram or `None`), because a frame in a UMEM is input like any other.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flynode_xdp_common::MAX_IPV6_EXT_HEADERS;

/// A UDP datagram as it arrived on the NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The UDP datagram in `frame`, or `None` if it is not an unfragmented UDP datagram
/// with consistent lengths.
pub fn parse(frame: &[u8]) -> Option<Datagram<'_>> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    if ethertype == ETH_P_8021Q {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let ip = frame.get(l3..)?;
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ip),
        ETH_P_IPV6 => parse_ipv6(ip),
        _ => None,
    }
}

fn parse_ipv4(ip: &[u8]) -> Option<Datagram<'_>> {
    let first = *ip.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if first >> 4 != 4 || ihl < 20 || total < ihl || ip.len() < total {
        return None;
    }
    // Any fragment (more-fragments flag or an offset) is the kernel's to reassemble.
    if ip[9] != IPPROTO_UDP || be16(ip, 6)? & 0x3fff != 0 {
        return None;
    }
    let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    udp(src, dst, &ip[ihl..total])
}

fn parse_ipv6(ip: &[u8]) -> Option<Datagram<'_>> {
    if ip.first()? >> 4 != 6 {
        return None;
    }
    let end = 40 + usize::from(be16(ip, 4)?);
    let ip = ip.get(..end)?;
    let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
    let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
    let mut next = ip[6];
    let mut offset = 40;
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => return udp(src, dst, ip.get(offset..)?),
            // Hop-by-hop, routing, destination options: (length + 1) * 8 bytes.
            0 | 43 | 60 => {
                next = *ip.get(offset)?;
                offset += (usize::from(*ip.get(offset + 1)?) + 1) * 8;
            }
            // Authentication header: (length + 2) * 4 bytes.
            51 => {
                next = *ip.get(offset)?;
                offset += (usize::from(*ip.get(offset + 1)?) + 2) * 4;
            }
            _ => return None,
        }
    }
    None
}

/// The UDP datagram at the start of `l4`, which holds exactly the IP payload.
fn udp(src: IpAddr, dst: IpAddr, l4: &[u8]) -> Option<Datagram<'_>> {
    let len = usize::from(be16(l4, 4)?);
    if len < 8 || len > l4.len() {
        return None;
    }
    Some(Datagram {
        src: SocketAddr::new(src, be16(l4, 0)?),
        dst: SocketAddr::new(dst, be16(l4, 2)?),
        payload: &l4[8..len],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, vlan: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0, 5]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn udp_bytes(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((payload.len() + 8) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    fn ipv4(options: &[u8], frag: u16, l4: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let mut h = vec![0u8; 20];
        h[0] = 0x40 | (hlen / 4) as u8;
        h[2..4].copy_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[9] = IPPROTO_UDP;
        h[12..16].copy_from_slice(&[198, 18, 0, 2]);
        h[16..20].copy_from_slice(&[198, 18, 100, 1]);
        h.extend_from_slice(options);
        h.extend_from_slice(l4);
        h
    }

    fn ipv6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(rest.len() as u16).to_be_bytes());
        h[6] = next;
        h[8..24].copy_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        h[24..40].copy_from_slice(&"2001:db8:100::1".parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(rest);
        h
    }

    #[test]
    fn ipv4_with_options_vlan_and_padding() {
        let mut f = eth(
            ETH_P_IPV4,
            true,
            &ipv4(&[1, 1, 1, 0], 0, &udp_bytes(40000, 53, b"hello")),
        );
        f.extend_from_slice(&[0; 10]); // Ethernet padding
        let d = parse(&f).unwrap();
        assert_eq!(d.src, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(d.dst, "198.18.100.1:53".parse().unwrap());
        assert_eq!(d.payload, b"hello");
    }

    #[test]
    fn ipv6_through_extension_headers() {
        let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0]; // hop-by-hop -> dest opts
        ext.extend_from_slice(&[IPPROTO_UDP, 1]); // dest opts, 16 bytes -> UDP
        ext.extend_from_slice(&[0; 14]);
        ext.extend_from_slice(&udp_bytes(1, 443, b"quic"));
        let f = eth(ETH_P_IPV6, false, &ipv6(0, &ext));
        let d = parse(&f).unwrap();
        assert_eq!(d.dst, "[2001:db8:100::1]:443".parse().unwrap());
        assert_eq!(d.payload, b"quic");
    }

    #[test]
    fn fragments_and_junk_are_not_datagrams() {
        let l4 = udp_bytes(1, 53, b"x");
        assert!(parse(&eth(ETH_P_IPV4, false, &ipv4(&[], 0x2000, &l4))).is_none());
        assert!(parse(&eth(ETH_P_IPV4, false, &ipv4(&[], 0x0001, &l4))).is_none());
        let mut bad_len = udp_bytes(1, 53, b"x");
        bad_len[4..6].copy_from_slice(&100u16.to_be_bytes());
        assert!(parse(&eth(ETH_P_IPV4, false, &ipv4(&[], 0, &bad_len))).is_none());
        assert!(parse(&eth(0x0806, false, &[0; 28])).is_none());
        let good = eth(ETH_P_IPV6, false, &ipv6(IPPROTO_UDP, &l4));
        assert!(parse(&good).is_some());
        for cut in 0..good.len() {
            assert!(parse(&good[..cut]).is_none(), "truncated at {cut}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and many byte patterns.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 160) as usize;
            let mut f: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if len > 14 {
                f[12..14].copy_from_slice(if x & 1 == 0 {
                    &[0x08, 0]
                } else {
                    &[0x86, 0xdd]
                });
            }
            let _ = parse(&f);
        }
    }
}
