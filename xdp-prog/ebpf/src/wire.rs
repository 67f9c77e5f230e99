//! Header sizes, ethertypes and protocol numbers both programs parse.
pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV6_NEXTHDR_HOP: u8 = 0;
pub const IPV6_NEXTHDR_ROUTING: u8 = 43;
pub const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
pub const IPV6_NEXTHDR_AUTH: u8 = 51;
pub const IPV6_NEXTHDR_DEST: u8 = 60;
pub const IPV6_HLEN: usize = 40;
pub const IPV6_FRAG_HLEN: usize = 8;
/// IPv4 fragment offset mask, in host order of the 16-bit flags/offset field.
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// Fragment offset mask of the IPv6 fragment header's 16-bit offset/flags field.
pub const IPV6_OFFSET_MASK: u16 = 0xfff8;
/// Upper bound on any offset into the frame: keeps every computed offset a bounded
/// scalar for the verifier (frames are never longer than 64 KiB).
pub const OFFSET_MASK: usize = 0xffff;
