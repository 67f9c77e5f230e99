//! Builders for Ethernet frames, well-formed or deliberately broken, byte for byte.
use std::net::{Ipv4Addr, Ipv6Addr};

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_FRAGMENT: u8 = 44;

/// Ethernet header; `vlan` adds one 802.1Q tag with that VLAN id.
pub fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    if let Some(id) = vlan {
        f.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        f.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn checksum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn sum_words(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// An IPv4 header (with `options`, a multiple of 4 bytes) and payload. `frag` is the
/// flags/fragment-offset field as on the wire (e.g. 0x2000 = more fragments).
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    frag: u16,
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0, "IPv4 options pad to 32-bit words");
    let hlen = 20 + options.len();
    let total = (hlen + payload.len()) as u16;
    let mut h = vec![0u8; 20];
    h[0] = 0x40 | (hlen / 4) as u8;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h.extend_from_slice(options);
    let csum = checksum_fold(sum_words(&h));
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An IPv6 header and payload.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// A UDP header and payload with a correct checksum over the given pseudo-header
/// addresses (16 bytes for IPv6, 4 for IPv4).
pub fn udp(src: &[u8], dst: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len as usize);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    let mut csum = checksum_fold(sum_words(&pseudo) + sum_words(&u));
    if csum == 0 {
        csum = 0xffff;
    }
    u[6..8].copy_from_slice(&csum.to_be_bytes());
    u
}

/// A complete IPv4/UDP frame from source port 40000.
pub fn udp4(
    vlan: Option<u16>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    udp4_from(vlan, (src, 40000), (dst, dport), payload)
}

/// A complete IPv4/UDP frame between the given addresses and ports.
pub fn udp4_from(
    vlan: Option<u16>,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let u = udp(&src.0.octets(), &dst.0.octets(), src.1, dst.1, payload);
    ethernet(
        ETH_P_IPV4,
        vlan,
        &ipv4(src.0, dst.0, IPPROTO_UDP, &[], 0, &u),
    )
}

/// A complete IPv6/UDP frame from source port 40000.
pub fn udp6(
    vlan: Option<u16>,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    udp6_from(vlan, (src, 40000), (dst, dport), payload)
}

/// A complete IPv6/UDP frame between the given addresses and ports.
pub fn udp6_from(
    vlan: Option<u16>,
    src: (Ipv6Addr, u16),
    dst: (Ipv6Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let u = udp(&src.0.octets(), &dst.0.octets(), src.1, dst.1, payload);
    ethernet(ETH_P_IPV6, vlan, &ipv6(src.0, dst.0, IPPROTO_UDP, &u))
}

/// Offset of the IPv4 header in an untagged frame.
pub const L3: usize = 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let h = ipv4(
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(198, 18, 0, 1),
            17,
            &[1, 1, 1, 0],
            0,
            &[],
        );
        assert_eq!(checksum_fold(sum_words(&h[..24])), 0);
    }

    #[test]
    fn udp_checksum_verifies_to_zero_over_pseudo_header() {
        let (s, d) = (Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED);
        let u = udp(&s.octets(), &d.octets(), 1, 2, b"odd");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&s.octets());
        pseudo.extend_from_slice(&d.octets());
        pseudo.extend_from_slice(&[0, IPPROTO_UDP, 0, u.len() as u8]);
        assert_eq!(checksum_fold(sum_words(&pseudo) + sum_words(&u)), 0);
    }

    #[test]
    fn vlan_tag_sits_between_macs_and_ethertype() {
        let f = ethernet(ETH_P_IPV4, Some(42), &[]);
        assert_eq!(&f[12..18], &[0x81, 0x00, 0x00, 42, 0x08, 0x00]);
    }
}
