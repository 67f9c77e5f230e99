//! PROXY protocol v2 (HAProxy `doc/proxy-protocol.txt`, section 2.2): the binary header the
//! edge puts in front of every forwarded datagram so the worker learns the client's address.
//!
//! A pure codec on the data path: no I/O and no allocation. [`decode`] borrows the TLVs
//! from its input; [`encode_udp`] and [`encode_local`] write into the caller's buffer
//! (typically headroom reserved in front of the payload).
//!
//! Receiver decisions where the spec leaves room:
//! - LOCAL: the spec has the receiver "discard the protocol block including the family",
//!   so the family byte is not interpreted (any value is accepted) and the `16 + length`
//!   bytes are skipped unread: `Addresses::Unspec`, `Transport::Unspec`, no TLVs. Like
//!   HAProxy, TLVs (a CRC32C included) of a LOCAL header are neither read nor verified.
//! - PROXY with the UNSPEC family: accepted as `Addresses::Unspec`. The spec defines no
//!   address layout for it and tells the receiver to ignore address information, so the
//!   block is skipped unread as with LOCAL: no TLVs.
//! - Family and transport are checked nibble by nibble and the family alone sets the size
//!   of the address block (the spec gives no other sizes), so INET with an UNSPEC transport
//!   is read like INET with DGRAM.
//! - IPv4-mapped IPv6 addresses stay INET6; nothing is converted.
//! - TLVs must tile the rest of the header exactly. Unknown types (custom ones included)
//!   and NOOP are kept and iterable. A CRC32C TLV must be unique, 4 bytes long and match.
use std::fmt;
use std::iter::FusedIterator;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Length of the fixed part: signature, version/command, family/transport, length.
pub const FIXED_LEN: usize = 16;
/// Size of the INET address block: two IPv4 addresses and two ports.
pub const ADDR_LEN_INET: usize = 12;
/// Size of the INET6 address block: two IPv6 addresses and two ports.
pub const ADDR_LEN_INET6: usize = 36;
/// Size of the UNIX address block: two 108-byte socket paths.
pub const ADDR_LEN_UNIX: usize = 216;

/// TLV type: application-layer protocol (ALPN), as negotiated by TLS.
pub const TLV_ALPN: u8 = 0x01;
/// TLV type: host name the client asked for (e.g. TLS SNI).
pub const TLV_AUTHORITY: u8 = 0x02;
/// TLV type: CRC32C of the whole header, verified by [`decode`] and filled in by [`encode_udp`].
pub const TLV_CRC32C: u8 = 0x03;
/// TLV type: padding, to be ignored.
pub const TLV_NOOP: u8 = 0x04;
/// TLV type: opaque connection identifier of up to 128 bytes.
pub const TLV_UNIQUE_ID: u8 = 0x05;
/// TLV type: TLS details, with sub-TLVs (not parsed here).
pub const TLV_SSL: u8 = 0x20;
/// TLV type: network namespace name.
pub const TLV_NETNS: u8 = 0x30;
/// First TLV type reserved for applications (`PP2_TYPE_MIN_CUSTOM`).
pub const TLV_CUSTOM_MIN: u8 = 0xE0;
/// Last TLV type reserved for applications (`PP2_TYPE_MAX_CUSTOM`).
pub const TLV_CUSTOM_MAX: u8 = 0xEF;

const VERSION: u8 = 2;
const TLV_HEADER_LEN: usize = 3;
const CRC32C_LEN: usize = 4;

/// Header length for UDP over IPv4 / IPv6 with no TLVs: 28 and 52.
pub const fn udp_header_len(v6: bool) -> usize {
    FIXED_LEN + if v6 { ADDR_LEN_INET6 } else { ADDR_LEN_INET }
}

/// What the receiver should do with the addresses (low nibble of byte 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Sent by the proxy on its own behalf (health checks): use the real endpoints.
    Local,
    /// Relayed on behalf of a client: the header carries the original endpoints.
    Proxy,
}

/// Transport protocol of the original connection (low nibble of byte 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Unknown or unspecified.
    Unspec,
    /// `SOCK_STREAM` (TCP, UNIX stream).
    Stream,
    /// `SOCK_DGRAM` (UDP, UNIX datagram).
    Dgram,
}

/// Address family of the original connection (high nibble of byte 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Unknown or unspecified: no address block.
    Unspec,
    /// IPv4.
    Inet,
    /// IPv6.
    Inet6,
    /// UNIX socket paths.
    Unix,
}

impl Family {
    /// Size of this family's address block.
    pub const fn address_len(self) -> usize {
        match self {
            Family::Unspec => 0,
            Family::Inet => ADDR_LEN_INET,
            Family::Inet6 => ADDR_LEN_INET6,
            Family::Unix => ADDR_LEN_UNIX,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Unspec => "UNSPEC",
            Family::Inet => "INET",
            Family::Inet6 => "INET6",
            Family::Unix => "UNIX",
        })
    }
}

/// The original endpoints carried by a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// No addresses (LOCAL, or the UNSPEC family).
    Unspec,
    /// IPv4 source and destination.
    Inet {
        /// The client.
        src: SocketAddrV4,
        /// The address the client sent to.
        dst: SocketAddrV4,
    },
    /// IPv6 source and destination; flow info and scope id are always 0 (not on the wire).
    Inet6 {
        /// The client.
        src: SocketAddrV6,
        /// The address the client sent to.
        dst: SocketAddrV6,
    },
    /// UNIX socket paths, skipped.
    Unix,
}

impl Addresses {
    /// The family these addresses were sent as.
    pub const fn family(&self) -> Family {
        match self {
            Addresses::Unspec => Family::Unspec,
            Addresses::Inet { .. } => Family::Inet,
            Addresses::Inet6 { .. } => Family::Inet6,
            Addresses::Unix => Family::Unix,
        }
    }
}

/// A decoded header, borrowing its TLVs from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// LOCAL or PROXY.
    pub command: Command,
    /// Transport of the original connection (`Unspec` for LOCAL).
    pub transport: Transport,
    /// Original endpoints (`Unspec` for LOCAL).
    pub addresses: Addresses,
    /// The TLV area, already checked to tile exactly into TLVs.
    tlvs: &'a [u8],
}

impl<'a> Header<'a> {
    /// (source, destination) as SocketAddr for INET/INET6 with the PROXY command, else None.
    pub fn endpoints(&self) -> Option<(SocketAddr, SocketAddr)> {
        match (self.command, self.addresses) {
            (Command::Proxy, Addresses::Inet { src, dst }) => Some((src.into(), dst.into())),
            (Command::Proxy, Addresses::Inet6 { src, dst }) => Some((src.into(), dst.into())),
            _ => None,
        }
    }

    /// The TLVs in wire order, NOOP, CRC32C and unknown types included.
    pub fn tlvs(&self) -> Tlvs<'a> {
        Tlvs { rest: self.tlvs }
    }

    /// The value of the first TLV of type `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&'a [u8]> {
        self.tlvs()
            .find(|tlv| tlv.kind == kind)
            .map(|tlv| tlv.value)
    }
}

/// One type-length-value extension of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The type byte (`TLV_*`).
    pub kind: u8,
    /// The value, borrowed from the decoded input.
    pub value: &'a [u8],
}

/// Iterator over the TLVs of a [`Header`].
#[derive(Debug, Clone)]
pub struct Tlvs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Tlvs<'a> {
    type Item = Tlv<'a>;

    fn next(&mut self) -> Option<Tlv<'a>> {
        // `decode` checked the area, so this only ends at its end.
        let (tlv, rest) = split_tlv(self.rest)?;
        self.rest = rest;
        Some(tlv)
    }
}

impl FusedIterator for Tlvs<'_> {}

/// Why bytes are not a valid v2 header. Offsets count from the start of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the 16-byte fixed header, or than 16 + the length field.
    #[error("PROXY v2 header truncated: needs {needed} bytes, got {have}")]
    Truncated {
        /// Bytes the header occupies (16 while the fixed part is incomplete).
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The first bytes are not the v2 signature (not PROXY v2, or v1 text).
    #[error("not a PROXY v2 header: bad signature")]
    BadSignature,
    /// The version nibble is not 2.
    #[error("PROXY header version {0} unsupported (only 2)")]
    BadVersion(u8),
    /// The command nibble is neither LOCAL (0) nor PROXY (1).
    #[error("PROXY v2 header: unknown command {0:#x}")]
    BadCommand(u8),
    /// The family nibble is not 0..=3 (PROXY command only).
    #[error("PROXY v2 header: unknown address family {0:#x}")]
    BadFamily(u8),
    /// The transport nibble is not 0..=2 (PROXY command only).
    #[error("PROXY v2 header: unknown transport {0:#x}")]
    BadTransport(u8),
    /// The length field is smaller than the family's address block.
    #[error("PROXY v2 header: {family} needs a {needed}-byte address block, length is {have}")]
    AddressBlockTooShort {
        /// The family announced.
        family: Family,
        /// Size of its address block.
        needed: usize,
        /// The length field.
        have: usize,
    },
    /// A TLV's 3-byte header or its value runs past the end of the header.
    #[error("PROXY v2 header: TLV at offset {offset} runs past the end of the header")]
    TlvTruncated {
        /// Where the TLV starts.
        offset: usize,
    },
    /// A second CRC32C TLV: which field to zero for the check would be ambiguous.
    #[error("PROXY v2 header: second CRC32C TLV at offset {offset}")]
    DuplicateChecksum {
        /// Where the second one starts.
        offset: usize,
    },
    /// A CRC32C TLV whose value is not 4 bytes.
    #[error("PROXY v2 header: CRC32C TLV at offset {offset} has {len} bytes, not 4")]
    BadChecksumLength {
        /// Where the TLV starts.
        offset: usize,
        /// Its value length.
        len: usize,
    },
    /// The CRC32C TLV does not match the header.
    #[error("PROXY v2 header: CRC32C is {expected:#010x}, header sums to {computed:#010x}")]
    BadChecksum {
        /// The value in the TLV.
        expected: u32,
        /// The checksum of the received header.
        computed: u32,
    },
}

/// Why a header could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// Source and destination are not both IPv4 or both IPv6.
    #[error("PROXY v2 header: {src} and {dst} are of different address families")]
    MixedFamilies {
        /// The source given.
        src: SocketAddr,
        /// The destination given.
        dst: SocketAddr,
    },
    /// The output buffer cannot hold the header.
    #[error("PROXY v2 header needs {needed} bytes, buffer has {have}")]
    BufferTooSmall {
        /// Header length.
        needed: usize,
        /// Buffer length.
        have: usize,
    },
    /// A TLV value longer than its 16-bit length field allows.
    #[error("PROXY v2 TLV {kind:#04x}: value of {len} bytes exceeds 65535")]
    TlvTooLong {
        /// Its type.
        kind: u8,
        /// Its value length.
        len: usize,
    },
    /// Addresses and TLVs together exceed the 16-bit length field.
    #[error("PROXY v2 header: {len} bytes after the fixed part exceed 65535")]
    HeaderTooLong {
        /// Their total length.
        len: usize,
    },
    /// More than one CRC32C TLV given.
    #[error("PROXY v2 header: more than one CRC32C TLV")]
    DuplicateChecksum,
    /// A CRC32C TLV placeholder whose value is not 4 bytes.
    #[error("PROXY v2 header: CRC32C TLV has {len} bytes, not 4")]
    BadChecksumLength {
        /// Its value length.
        len: usize,
    },
}

/// Decodes the header at the start of `bytes`; returns it and the number of bytes it takes.
///
/// The payload is `bytes[len..]`; the header's TLVs borrow from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<(Header<'_>, usize), DecodeError> {
    // A short input is only "truncated" if what there is could still be a header.
    if !(bytes.starts_with(&SIGNATURE) || SIGNATURE.starts_with(bytes)) {
        return Err(DecodeError::BadSignature);
    }
    let Some(&[.., ver_cmd, fam, len_hi, len_lo]) = bytes.first_chunk::<FIXED_LEN>() else {
        return Err(DecodeError::Truncated {
            needed: FIXED_LEN,
            have: bytes.len(),
        });
    };
    let version = ver_cmd >> 4;
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let command = match ver_cmd & 0x0F {
        0x0 => Command::Local,
        0x1 => Command::Proxy,
        other => return Err(DecodeError::BadCommand(other)),
    };
    let block_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let (family, transport) = match command {
        Command::Local => (Family::Unspec, Transport::Unspec),
        Command::Proxy => parse_family_transport(fam)?,
    };
    let addr_len = family.address_len();
    if block_len < addr_len {
        return Err(DecodeError::AddressBlockTooShort {
            family,
            needed: addr_len,
            have: block_len,
        });
    }
    let total = FIXED_LEN + block_len;
    let Some(header) = bytes.get(..total) else {
        return Err(DecodeError::Truncated {
            needed: total,
            have: bytes.len(),
        });
    };
    let unspec = Header {
        command,
        transport,
        addresses: Addresses::Unspec,
        tlvs: &[],
    };
    let tlv_start = FIXED_LEN + addr_len;
    let addr = header.get(FIXED_LEN..tlv_start).unwrap_or_default();
    let addresses = match family {
        // See the module docs: no layout to find TLVs in, so the block is skipped.
        Family::Unspec => return Ok((unspec, total)),
        Family::Inet => read_pair(addr).map(|(src, dst, sport, dport)| Addresses::Inet {
            src: SocketAddrV4::new(Ipv4Addr::from(src), sport),
            dst: SocketAddrV4::new(Ipv4Addr::from(dst), dport),
        }),
        Family::Inet6 => read_pair(addr).map(|(src, dst, sport, dport)| Addresses::Inet6 {
            src: SocketAddrV6::new(Ipv6Addr::from(src), sport, 0, 0),
            dst: SocketAddrV6::new(Ipv6Addr::from(dst), dport, 0, 0),
        }),
        Family::Unix => Some(Addresses::Unix),
    };
    // Always `Some`: `block_len >= addr_len` was checked above.
    let addresses = addresses.ok_or(DecodeError::AddressBlockTooShort {
        family,
        needed: addr_len,
        have: block_len,
    })?;
    let tlvs = check_tlvs(header, tlv_start)?;
    Ok((
        Header {
            addresses,
            tlvs,
            ..unspec
        },
        total,
    ))
}

/// Writes a PROXY DGRAM header for `src` → `dst` plus `tlvs` at the start of `out`; returns its length.
///
/// `src` and `dst` must be of the same family; IPv4-mapped IPv6 addresses are sent as
/// INET6 as they are. IPv6 flow info and scope id are not representable and are dropped. A [`TLV_CRC32C`]
/// entry is a placeholder (4 bytes, at most one): its value is computed here.
pub fn encode_udp(
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: &[(u8, &[u8])],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let addresses = match (src, dst) {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => Addresses::Inet { src, dst },
        (SocketAddr::V6(src), SocketAddr::V6(dst)) => Addresses::Inet6 { src, dst },
        _ => return Err(EncodeError::MixedFamilies { src, dst }),
    };
    let family = addresses.family();
    let mut block_len = family.address_len();
    let mut has_crc = false;
    for &(kind, value) in tlvs {
        if value.len() > usize::from(u16::MAX) {
            return Err(EncodeError::TlvTooLong {
                kind,
                len: value.len(),
            });
        }
        if kind == TLV_CRC32C {
            if has_crc {
                return Err(EncodeError::DuplicateChecksum);
            }
            if value.len() != CRC32C_LEN {
                return Err(EncodeError::BadChecksumLength { len: value.len() });
            }
            has_crc = true;
        }
        block_len = block_len.saturating_add(TLV_HEADER_LEN + value.len());
    }
    let Ok(block_len_field) = u16::try_from(block_len) else {
        return Err(EncodeError::HeaderTooLong { len: block_len });
    };
    let total = FIXED_LEN + block_len;
    let have = out.len();
    let Some(header) = out.get_mut(..total) else {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            have,
        });
    };

    let mut cursor = Cursor {
        buf: header,
        pos: 0,
    };
    cursor.put(&SIGNATURE);
    match addresses {
        Addresses::Inet { src, dst } => {
            // v2 PROXY; INET DGRAM
            cursor.put(&[(VERSION << 4) | 0x1, 0x12]);
            cursor.put(&block_len_field.to_be_bytes());
            cursor.put(&src.ip().octets());
            cursor.put(&dst.ip().octets());
        }
        Addresses::Inet6 { src, dst } => {
            // v2 PROXY; INET6 DGRAM
            cursor.put(&[(VERSION << 4) | 0x1, 0x22]);
            cursor.put(&block_len_field.to_be_bytes());
            cursor.put(&src.ip().octets());
            cursor.put(&dst.ip().octets());
        }
        Addresses::Unspec | Addresses::Unix => {}
    }
    cursor.put(&src.port().to_be_bytes());
    cursor.put(&dst.port().to_be_bytes());
    let mut crc_at = None;
    for &(kind, value) in tlvs {
        // Length checked against u16::MAX in the first pass.
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        cursor.put(&[kind]);
        cursor.put(&len.to_be_bytes());
        if kind == TLV_CRC32C {
            crc_at = Some(cursor.pos);
            cursor.put(&[0; CRC32C_LEN]);
        } else {
            cursor.put(value);
        }
    }
    if let Some(at) = crc_at {
        // The field is still zero, as the spec's sender procedure requires.
        let crc = !crc32c_update(!0, cursor.buf);
        cursor.pos = at;
        cursor.put(&crc.to_be_bytes());
    }
    Ok(total)
}

/// Writes a LOCAL header (no addresses, no TLVs) into `out`; returns its length, 16.
pub fn encode_local(out: &mut [u8]) -> Result<usize, EncodeError> {
    let have = out.len();
    let Some(header) = out.first_chunk_mut::<FIXED_LEN>() else {
        return Err(EncodeError::BufferTooSmall {
            needed: FIXED_LEN,
            have,
        });
    };
    let mut cursor = Cursor {
        buf: header,
        pos: 0,
    };
    cursor.put(&SIGNATURE);
    // v2 LOCAL; UNSPEC UNSPEC; no bytes follow
    cursor.put(&[VERSION << 4, 0x00, 0x00, 0x00]);
    Ok(FIXED_LEN)
}

/// Writes into a buffer whose length was computed beforehand.
struct Cursor<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        // Sized by the caller to exactly the header; a miss would be a bug in this file.
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        debug_assert!(end <= self.buf.len(), "PROXY header buffer sized wrongly");
        self.pos = end;
    }
}

fn parse_family_transport(fam: u8) -> Result<(Family, Transport), DecodeError> {
    let family = match fam >> 4 {
        0x0 => Family::Unspec,
        0x1 => Family::Inet,
        0x2 => Family::Inet6,
        0x3 => Family::Unix,
        other => return Err(DecodeError::BadFamily(other)),
    };
    let transport = match fam & 0x0F {
        0x0 => Transport::Unspec,
        0x1 => Transport::Stream,
        0x2 => Transport::Dgram,
        other => return Err(DecodeError::BadTransport(other)),
    };
    Ok((family, transport))
}

/// Source address, destination address, source port, destination port.
fn read_pair<const N: usize>(block: &[u8]) -> Option<([u8; N], [u8; N], u16, u16)> {
    let (src, block) = block.split_first_chunk::<N>()?;
    let (dst, block) = block.split_first_chunk::<N>()?;
    let (sport, block) = block.split_first_chunk::<2>()?;
    let (dport, _) = block.split_first_chunk::<2>()?;
    Some((
        *src,
        *dst,
        u16::from_be_bytes(*sport),
        u16::from_be_bytes(*dport),
    ))
}

fn split_tlv(bytes: &[u8]) -> Option<(Tlv<'_>, &[u8])> {
    let (&[kind, len_hi, len_lo], rest) = bytes.split_first_chunk::<TLV_HEADER_LEN>()?;
    let (value, rest) = rest.split_at_checked(usize::from(u16::from_be_bytes([len_hi, len_lo])))?;
    Some((Tlv { kind, value }, rest))
}

/// Checks that the TLVs from `start` tile `header` exactly and that a CRC32C TLV, if
/// any, matches the header; returns the TLV area.
fn check_tlvs(header: &[u8], start: usize) -> Result<&[u8], DecodeError> {
    let area = header.get(start..).unwrap_or_default();
    let mut offset = start;
    let mut rest = area;
    let mut crc: Option<(usize, u32)> = None;
    while !rest.is_empty() {
        let Some((tlv, next)) = split_tlv(rest) else {
            return Err(DecodeError::TlvTruncated { offset });
        };
        if tlv.kind == TLV_CRC32C {
            if crc.is_some() {
                return Err(DecodeError::DuplicateChecksum { offset });
            }
            let Ok(value) = <[u8; CRC32C_LEN]>::try_from(tlv.value) else {
                return Err(DecodeError::BadChecksumLength {
                    offset,
                    len: tlv.value.len(),
                });
            };
            crc = Some((offset + TLV_HEADER_LEN, u32::from_be_bytes(value)));
        }
        offset += TLV_HEADER_LEN + tlv.value.len();
        rest = next;
    }
    if let Some((at, expected)) = crc {
        // RFC 4960 appendix B CRC over the whole header with the checksum field zeroed.
        let (before, field_and_after) = header.split_at_checked(at).unwrap_or((header, &[]));
        let after = field_and_after.get(CRC32C_LEN..).unwrap_or_default();
        let state = crc32c_update(crc32c_update(!0, before), &[0; CRC32C_LEN]);
        let computed = !crc32c_update(state, after);
        if computed != expected {
            return Err(DecodeError::BadChecksum { expected, computed });
        }
    }
    Ok(area)
}

/// Byte-wise table for CRC32C (Castagnoli, reflected polynomial 0x82F63B78). Headers are
/// short and the checksum rare, so the 1 KiB table beats anything cleverer.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < table.len() {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// Feeds `data` into a running (pre-inverted) CRC32C state.
fn crc32c_update(mut state: u32, data: &[u8]) -> u32 {
    for &byte in data {
        state = CRC32C_TABLE[usize::from(state as u8 ^ byte)] ^ (state >> 8);
    }
    state
}

#[cfg(test)]
mod tests;
