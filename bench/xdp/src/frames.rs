//! Frames for the benchmarks: the test suite's builders (`flynode_tests::frames`, correct
//! lengths and checksums — a bad UDP checksum would make the socket receiver drop what
//! AF_XDP delivers) with the benchmark's MAC addresses.
use std::net::{Ipv4Addr, Ipv6Addr};

use flynode_tests::frames as f;

pub const ETH_HLEN: usize = 14;

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

/// A frame from the test suite's builders with its MAC addresses replaced.
fn with_macs(mut frame: Vec<u8>, macs: Macs) -> Vec<u8> {
    frame[0..6].copy_from_slice(&macs.dst);
    frame[6..12].copy_from_slice(&macs.src);
    frame
}

/// IPv4 "don't fragment", as Linux sends with path MTU discovery on.
const DF: u16 = 0x4000;

pub fn udp4(macs: Macs, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let u = f::udp(&src.0.octets(), &dst.0.octets(), src.1, dst.1, payload);
    let ip = f::ipv4(src.0, dst.0, f::IPPROTO_UDP, &[], DF, &u);
    with_macs(f::ethernet(f::ETH_P_IPV4, None, &ip), macs)
}

pub fn udp6(macs: Macs, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    with_macs(f::udp6_from(None, src, dst, payload), macs)
}

/// A TCP SYN (20-byte header, no options). Only the classifier benchmark uses it, with
/// BPF_PROG_RUN, so the TCP checksum is left zero.
pub fn tcp4_syn(macs: Macs, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&src.1.to_be_bytes());
    t[2..4].copy_from_slice(&dst.1.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let ip = f::ipv4(src.0, dst.0, f::IPPROTO_TCP, &[], DF, &t);
    with_macs(f::ethernet(f::ETH_P_IPV4, None, &ip), macs)
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

    #[test]
    fn frames_carry_the_given_macs_and_lengths() {
        let macs = Macs::default();
        let src = Ipv4Addr::new(198, 18, 71, 1);
        let dst = Ipv4Addr::new(198, 18, 71, 10);
        let f = udp4(macs, (src, 40000), (dst, 5353), &pattern(64));
        assert_eq!(f.len(), ETH_HLEN + 20 + 8 + 64);
        assert_eq!(f[0..6], macs.dst);
        assert_eq!(f[6..12], macs.src);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 20 + 8 + 64);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 8 + 64);
        let v6 = udp6(
            macs,
            ("fd00:71::1".parse().unwrap(), 40000),
            ("fd00:71::10".parse().unwrap(), 5353),
            &pattern(33),
        );
        assert_eq!(v6.len(), ETH_HLEN + 40 + 8 + 33);
        assert_eq!(v6[0..6], macs.dst);
    }

    #[test]
    fn wireguard_data_shape() {
        let p = wireguard_data(64);
        assert_eq!(p.len(), 96);
        assert_eq!(&p[..4], &[4, 0, 0, 0]);
    }
}
