//! Hand-built Ethernet frames for the benchmarks, with correct lengths and checksums (a
//! bad UDP checksum would make the socket receiver drop what AF_XDP delivers).
use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Link-layer addresses of a frame.
#[derive(Clone, Copy, Debug)]
pub struct Macs {
    pub dst: [u8; 6],
    pub src: [u8; 6],
}

impl Default for Macs {
    fn default() -> Self {
        Self {
            dst: [0x02, 0, 0xc6, 0x12, 0, 0x02],
            src: [0x02, 0, 0xc6, 0x12, 0, 0x01],
        }
    }
}

fn ethernet(macs: Macs, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&macs.dst);
    f.extend_from_slice(&macs.src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// One's-complement sum of `data` (big-endian 16-bit words) added to `sum`.
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload_len: usize) -> [u8; 20] {
    let total = (20 + payload_len) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    // ID 0 with DF set: an "atomic" datagram, as Linux sends with PMTU discovery on.
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let csum = fold(sum16(0, &h));
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut s = sum16(0, &src.octets());
    s = sum16(s, &dst.octets());
    s + u32::from(proto) + len as u32
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut s = sum16(0, &src.octets());
    s = sum16(s, &dst.octets());
    s + u32::from(proto) + len as u32
}

/// UDP header + payload with the checksum over `pseudo` filled in.
fn udp_segment(sport: u16, dport: u16, payload: &[u8], pseudo: u32) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut csum = fold(sum16(pseudo, &u));
    if csum == 0 {
        csum = 0xffff; // RFC 768: a computed 0 is sent as all ones
    }
    u[6..8].copy_from_slice(&csum.to_be_bytes());
    u
}

pub fn udp4(macs: Macs, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let udp = udp_segment(
        src.1,
        dst.1,
        payload,
        pseudo_v4(src.0, dst.0, IPPROTO_UDP, len),
    );
    let mut f = ethernet(macs, ETH_P_IPV4);
    f.extend_from_slice(&ipv4_header(src.0, dst.0, IPPROTO_UDP, len));
    f.extend_from_slice(&udp);
    f
}

pub fn udp6(macs: Macs, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let udp = udp_segment(
        src.1,
        dst.1,
        payload,
        pseudo_v6(src.0, dst.0, IPPROTO_UDP, len),
    );
    let mut f = ethernet(macs, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(len as u16).to_be_bytes());
    f.push(IPPROTO_UDP);
    f.push(64);
    f.extend_from_slice(&src.0.octets());
    f.extend_from_slice(&dst.0.octets());
    f.extend_from_slice(&udp);
    f
}

/// A TCP SYN (20-byte header, no options).
pub fn tcp4_syn(macs: Macs, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let csum = fold(sum16(pseudo_v4(src.0, dst.0, IPPROTO_TCP, 20), &t));
    t[16..18].copy_from_slice(&csum.to_be_bytes());
    let mut f = ethernet(macs, ETH_P_IPV4);
    f.extend_from_slice(&ipv4_header(src.0, dst.0, IPPROTO_TCP, 20));
    f.extend_from_slice(&t);
    f
}

/// A WireGuard transport-data message (type 4) carrying `plaintext_len` bytes of
/// (pretend) ciphertext: type, 3 reserved zero bytes, receiver index, 8-byte counter, the
/// ciphertext and the 16-byte tag, so `32 + plaintext_len` bytes in all. WireGuard pads
/// plaintext to a multiple of 16, so `plaintext_len` should be one.
pub fn wireguard_data(plaintext_len: usize) -> Vec<u8> {
    let mut p = vec![4u8, 0, 0, 0];
    p.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    p.extend_from_slice(&42u64.to_le_bytes());
    p.extend((0..plaintext_len + 16).map(|i| (i * 7 + 3) as u8));
    p
}

/// A payload of `len` bytes with a recognisable pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ 0x5a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifies a checksum the way a receiver does: the sum over the covered bytes
    /// (checksum field included) folds to zero.
    fn verifies(pseudo: u32, data: &[u8]) -> bool {
        fold(sum16(pseudo, data)) == 0
    }

    #[test]
    fn ipv4_udp_lengths_and_checksums() {
        let src = Ipv4Addr::new(198, 18, 71, 1);
        let dst = Ipv4Addr::new(198, 18, 71, 10);
        let f = udp4(Macs::default(), (src, 40000), (dst, 5353), &pattern(64));
        assert_eq!(f.len(), 14 + 20 + 8 + 64);
        let ip = &f[14..34];
        assert!(verifies(0, ip));
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 64);
        let udp = &f[34..];
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8 + 64);
        assert!(verifies(pseudo_v4(src, dst, IPPROTO_UDP, udp.len()), udp));
    }

    #[test]
    fn ipv6_udp_checksum() {
        let src: Ipv6Addr = "fd00:71::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00:71::10".parse().unwrap();
        let f = udp6(Macs::default(), (src, 40000), (dst, 5353), &pattern(33));
        assert_eq!(f.len(), 14 + 40 + 8 + 33);
        let udp = &f[54..];
        assert!(verifies(pseudo_v6(src, dst, IPPROTO_UDP, udp.len()), udp));
    }

    #[test]
    fn tcp_checksum() {
        let src = Ipv4Addr::new(198, 18, 71, 1);
        let dst = Ipv4Addr::new(198, 18, 71, 2);
        let f = tcp4_syn(Macs::default(), (src, 40000), (dst, 22));
        assert!(verifies(pseudo_v4(src, dst, IPPROTO_TCP, 20), &f[34..]));
    }

    #[test]
    fn wireguard_data_shape() {
        let p = wireguard_data(64);
        assert_eq!(p.len(), 96);
        assert_eq!(p.len() % 16, 0);
        assert_eq!(&p[..4], &[4, 0, 0, 0]);
    }
}
