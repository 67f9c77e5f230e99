//! `proxy_v2`: the PROXY protocol v2 codec (`flynode::forward::proxy`).
//!
//! Input: any bytes, used twice.
//! 1. Decoded as received bytes. A header never claims more bytes than given, nor other
//!    than its length field says; its addresses are the bytes of its address block; its
//!    TLVs tile the rest; a CRC32C it accepted is right (checked with a CRC written
//!    here); an error that says "truncated" is about a prefix of a header. A PROXY
//!    INET/INET6 DGRAM header re-encodes to exactly its own bytes.
//! 2. Read as a header to send: `[family, src, dst, sport, dport, buffer size, TLVs...]`
//!    (see [`Wanted::read`]). `encode_udp` then `decode` gives back the addresses and
//!    the TLVs in order, with a correct CRC32C where one was asked for; a refusal names
//!    the real reason (buffer too small for the length it reports, a duplicate or
//!    misshapen CRC32C TLV).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use flynode::forward::proxy::{
    self, Addresses, Command, DecodeError, EncodeError, FIXED_LEN, SIGNATURE, TLV_CRC32C, Transport,
};

pub fn proxy_v2(data: &[u8]) {
    decode_side(data);
    if let Some(wanted) = Wanted::read(data) {
        encode_side(&wanted);
    }
    local_round_trip(data.len());
}

fn decode_side(data: &[u8]) {
    match proxy::decode(data) {
        Ok((header, len)) => {
            assert!(len <= data.len(), "claims {len} bytes of {}", data.len());
            assert!(
                data.starts_with(&SIGNATURE),
                "accepted without the signature"
            );
            let block = usize::from(u16::from_be_bytes([data[14], data[15]]));
            assert_eq!(len, FIXED_LEN + block, "length is not the length field's");
            assert_eq!(data[12] >> 4, 2, "version");
            let family = header.addresses.family();
            match header.command {
                Command::Local => {
                    assert_eq!(data[12] & 0x0f, 0);
                    assert_eq!(header.addresses, Addresses::Unspec);
                    assert_eq!(header.transport, Transport::Unspec);
                }
                Command::Proxy => {
                    assert_eq!(data[12] & 0x0f, 1);
                    assert!(data[13] >> 4 <= 3 && data[13] & 0x0f <= 2, "family byte");
                }
            }
            let addr = &data[FIXED_LEN..FIXED_LEN + family.address_len()];
            match header.addresses {
                Addresses::Inet { src, dst } => {
                    assert_eq!(data[13] >> 4, 1);
                    assert_eq!(&src.ip().octets()[..], &addr[..4]);
                    assert_eq!(&dst.ip().octets()[..], &addr[4..8]);
                    assert_eq!(src.port().to_be_bytes(), addr[8..10]);
                    assert_eq!(dst.port().to_be_bytes(), addr[10..12]);
                }
                Addresses::Inet6 { src, dst } => {
                    assert_eq!(data[13] >> 4, 2);
                    assert_eq!(&src.ip().octets()[..], &addr[..16]);
                    assert_eq!(&dst.ip().octets()[..], &addr[16..32]);
                    assert_eq!(src.port().to_be_bytes(), addr[32..34]);
                    assert_eq!(dst.port().to_be_bytes(), addr[34..36]);
                }
                Addresses::Unix => assert_eq!(data[13] >> 4, 3),
                Addresses::Unspec => {}
            }
            // The TLVs tile what follows the addresses; none where the block is skipped.
            let tlvs: Vec<_> = header.tlvs().collect();
            let tlv_bytes: usize = tlvs.iter().map(|t| 3 + t.value.len()).sum();
            let skipped = matches!(header.addresses, Addresses::Unspec);
            if skipped {
                assert!(tlvs.is_empty(), "TLVs read from a skipped block");
            } else {
                assert_eq!(
                    FIXED_LEN + family.address_len() + tlv_bytes,
                    len,
                    "TLV tiling"
                );
                let crcs = tlvs.iter().filter(|t| t.kind == TLV_CRC32C).count();
                assert!(crcs <= 1, "{crcs} CRC32C TLVs accepted");
                if crcs == 1 {
                    assert!(crc_ok(&data[..len], &tlvs), "a wrong CRC32C accepted");
                }
            }
            for t in &tlvs {
                assert!(header.tlv(t.kind).is_some(), "TLV {:#x} not found", t.kind);
            }
            // A header we could have sent is byte for byte what we would send.
            let ours = matches!(data[13], 0x12 | 0x22) && header.command == Command::Proxy;
            if let (true, Some((src, dst))) = (ours, header.endpoints()) {
                let list: Vec<(u8, &[u8])> = tlvs.iter().map(|t| (t.kind, t.value)).collect();
                let mut out = vec![0u8; len];
                let n = proxy::encode_udp(src, dst, &list, &mut out).expect("re-encode");
                assert_eq!(&out[..n], &data[..len], "re-encoded header differs");
            }
        }
        Err(DecodeError::Truncated { needed, have }) => {
            assert_eq!(have, data.len());
            assert!(needed > have, "truncated, but {needed} <= {have}");
            assert!(
                data.starts_with(&SIGNATURE) || SIGNATURE.starts_with(data),
                "truncated, but not a header's prefix"
            );
        }
        Err(DecodeError::BadSignature) => {
            assert!(!(data.starts_with(&SIGNATURE) || SIGNATURE.starts_with(data)));
        }
        Err(_) => assert!(data.len() >= FIXED_LEN && data.starts_with(&SIGNATURE)),
    }
}

/// A header the edge would send, read from fuzz bytes.
struct Wanted<'a> {
    src: SocketAddr,
    dst: SocketAddr,
    buffer: usize,
    tlvs: Vec<(u8, &'a [u8])>,
}

impl<'a> Wanted<'a> {
    /// `[family: 1][src: 4|16][dst: 4|16][sport: 2][dport: 2][buffer: 2][TLVs]`: family
    /// bit 0 picks IPv6, bit 1 mixes the families (which must be refused); each TLV is
    /// `[kind: 1][len: 1][value: len]`.
    fn read(data: &'a [u8]) -> Option<Wanted<'a>> {
        let (&family, rest) = data.split_first()?;
        let v6 = family & 1 == 1;
        let n = if v6 { 16 } else { 4 };
        let (src_ip, rest) = rest.split_at_checked(n)?;
        let (dst_ip, rest) = rest.split_at_checked(n)?;
        let (ports, rest) = rest.split_first_chunk::<6>()?;
        let sport = u16::from_be_bytes([ports[0], ports[1]]);
        let dport = u16::from_be_bytes([ports[2], ports[3]]);
        let buffer = usize::from(u16::from_be_bytes([ports[4], ports[5]]));
        let addr = |ip: &[u8], port| -> SocketAddr {
            match <[u8; 16]>::try_from(ip) {
                Ok(a) => SocketAddrV6::new(Ipv6Addr::from(a), port, 0, 0).into(),
                Err(_) => {
                    let a = <[u8; 4]>::try_from(ip).unwrap_or_default();
                    SocketAddrV4::new(Ipv4Addr::from(a), port).into()
                }
            }
        };
        let src = addr(src_ip, sport);
        let mut dst = addr(dst_ip, dport);
        if family & 2 != 0 {
            dst = match dst {
                SocketAddr::V4(d) => SocketAddr::new(d.ip().to_ipv6_mapped().into(), dport),
                SocketAddr::V6(_) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dport),
            };
        }
        let mut tlvs = Vec::new();
        let mut rest = rest;
        while let Some((&[kind, len], tail)) = rest.split_first_chunk::<2>() {
            let (value, tail) = tail
                .split_at_checked(usize::from(len))
                .unwrap_or((tail, &[]));
            tlvs.push((kind, value));
            rest = tail;
        }
        Some(Wanted {
            src,
            dst,
            buffer,
            tlvs,
        })
    }
}

fn encode_side(w: &Wanted<'_>) {
    let mut out = vec![0u8; w.buffer];
    let crcs: Vec<usize> = w
        .tlvs
        .iter()
        .filter(|t| t.0 == TLV_CRC32C)
        .map(|t| t.1.len())
        .collect();
    let needed = FIXED_LEN
        + if w.src.is_ipv6() { 36 } else { 12 }
        + w.tlvs.iter().map(|t| 3 + t.1.len()).sum::<usize>();
    match proxy::encode_udp(w.src, w.dst, &w.tlvs, &mut out) {
        Ok(len) => {
            assert_eq!(len, needed);
            assert!(len <= out.len());
            let (header, used) = proxy::decode(&out).expect("our own header decodes");
            assert_eq!(used, len);
            assert_eq!(header.command, Command::Proxy);
            assert_eq!(header.transport, Transport::Dgram);
            assert_eq!(header.endpoints(), Some((w.src, w.dst)), "addresses");
            let got: Vec<_> = header.tlvs().map(|t| (t.kind, t.value)).collect();
            assert_eq!(got.len(), w.tlvs.len());
            for (g, want) in got.iter().zip(&w.tlvs) {
                assert_eq!(g.0, want.0);
                if g.0 != TLV_CRC32C {
                    assert_eq!(g.1, want.1, "TLV value");
                }
            }
        }
        Err(EncodeError::MixedFamilies { .. }) => {
            assert_ne!(w.src.is_ipv6(), w.dst.is_ipv6(), "refused as mixed");
        }
        Err(EncodeError::BufferTooSmall { needed: n, have }) => {
            assert_eq!((n, have), (needed, out.len()));
            assert!(n > have);
        }
        Err(EncodeError::DuplicateChecksum) => assert!(crcs.len() > 1),
        Err(EncodeError::BadChecksumLength { len }) => assert!(crcs.contains(&len) && len != 4),
        Err(e @ (EncodeError::TlvTooLong { .. } | EncodeError::HeaderTooLong { .. })) => {
            assert!(needed - FIXED_LEN > 65535, "{e} for {needed} bytes");
        }
    }
}

fn local_round_trip(size: usize) {
    let mut out = vec![0u8; size.min(64)];
    match proxy::encode_local(&mut out) {
        Ok(len) => {
            let (h, used) = proxy::decode(&out).expect("LOCAL decodes");
            assert_eq!(
                (h.command, h.addresses, used, len),
                (Command::Local, Addresses::Unspec, 16, 16)
            );
        }
        Err(EncodeError::BufferTooSmall { needed: 16, have }) => assert!(have < 16),
        Err(e) => panic!("encode_local: {e}"),
    }
}

/// Whether the header's CRC32C TLV is the CRC32C (Castagnoli) of the header with the
/// field zeroed.
fn crc_ok(header: &[u8], tlvs: &[proxy::Tlv<'_>]) -> bool {
    let Some(crc) = tlvs.iter().find(|t| t.kind == TLV_CRC32C) else {
        return true;
    };
    let at = (crc.value.as_ptr() as usize) - (header.as_ptr() as usize);
    let mut zeroed = header.to_vec();
    zeroed[at..at + 4].fill(0);
    let expected = u32::from_be_bytes(crc.value.try_into().unwrap_or_default());
    crc32c(&zeroed) == expected
}

/// Bitwise CRC32C, slow and obviously right.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(super::crc32c(b"123456789"), 0xE306_9283);
    }
}
