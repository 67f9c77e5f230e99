//! Internet checksums (RFC 1071) as a receiver verifies them, written here rather than
//! borrowed from the code under test so that a wrong sum there cannot agree with itself.
use std::net::IpAddr;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// The one's-complement sum of `data` (big-endian words, odd length padded with zero)
/// added to `initial`, folded to 16 bits; not complemented.
pub fn ones_sum(data: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The unfolded pseudo-header sum for `len` bytes of protocol `proto`.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let addr = |a: IpAddr| -> u64 {
        let bytes: Vec<u8> = match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        u64::from(ones_sum(&bytes, 0))
    };
    addr(src) + addr(dst) + u64::from(proto) + len as u64
}

/// Whether an IPv4 header (of `header.len()` bytes, options included) sums right.
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    ones_sum(header, 0) == 0xffff
}

/// Whether the transport segment `segment` (header and payload) of `proto` between
/// `src` and `dst` carries a checksum a receiver accepts. A UDP checksum of zero
/// ("none") is not accepted: flynode always sends one.
pub fn transport_ok(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> bool {
    if proto == PROTO_UDP && segment.get(6..8) == Some(&[0, 0]) {
        return false;
    }
    ones_sum(segment, pseudo_header(src, dst, proto, segment.len())) == 0xffff
}

/// Source and destination of an IPv4 or IPv6 header at the start of `p`.
pub fn addresses(p: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match p.first()? >> 4 {
        4 => {
            let src: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        6 => {
            let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

/// Completes a CHECKSUM_PARTIAL packet as the kernel does: the field at
/// `start + offset` holds the folded pseudo-header sum; the checksum covers `start..`.
pub fn complete_partial(p: &mut [u8], start: usize, offset: usize) {
    let at = start + offset;
    let initial = u16::from_be_bytes([p[at], p[at + 1]]);
    p[at..at + 2].fill(0);
    let mut check = !ones_sum(&p[start..], u64::from(initial));
    if check == 0 {
        check = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&check.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_1071_example() {
        assert_eq!(
            !ones_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0x220d
        );
    }
}
