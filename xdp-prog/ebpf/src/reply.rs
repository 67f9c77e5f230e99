use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use flynode_xdp_common::{AddrKey, MAX_IPV6_EXT_HEADERS, MAX_REPLY_ENDPOINTS, ServiceKey};

#[map]
static REPLY_ENDPOINTS: HashMap<ServiceKey, u32> =
    HashMap::with_max_entries(MAX_REPLY_ENDPOINTS, 0);

// The program is attached only to Ethernet devices (userspace checks), where tc
// ingress sees the frame from its MAC header: offsets start at ETH_HLEN.
use crate::wire::*;

#[classifier]
pub fn flynode_reply(ctx: TcContext) -> i32 {
    match target(&ctx) {
        // SAFETY: a plain helper call; the kernel checks the ifindex at redirect time.
        Some(ifindex) => unsafe { bpf_redirect(ifindex, 0) as i32 },
        None => TC_ACT_OK as i32,
    }
}

/// The TUN to redirect to, if this is a datagram from a container endpoint.
#[inline(always)]
fn target(ctx: &TcContext) -> Option<u32> {
    // skb->protocol is the ethertype in network byte order.
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    let (addr, port) = match protocol {
        ETH_P_IPV4 => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };
    lookup(addr, port)
}

/// (source address, source port) of a UDP datagram. A fragment after the first carries
/// no port and is not ours: the kernel routes it, as it would with policy rules, whose
/// port match cannot see it either.
#[inline(always)]
fn ipv4(ctx: &TcContext) -> Option<(AddrKey, u16)> {
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if ver_ihl >> 4 != 4 || proto != IPPROTO_UDP {
        return None;
    }
    let src: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
    let addr = AddrKey::from_ipv4(src);
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    if frag & IPV4_OFFSET_MASK != 0 {
        return None;
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let port = u16::from_be(ctx.load::<u16>(ETH_HLEN + ihl).ok()?);
    Some((addr, port))
}

/// (source address, source port) of a UDP datagram, after at most
/// `MAX_IPV6_EXT_HEADERS` extension headers (the walk the kernel's flow dissector does
/// for a policy rule's port match). Anything else, a fragment after the first included,
/// is not ours.
#[inline(always)]
fn ipv6(ctx: &TcContext) -> Option<(AddrKey, u16)> {
    let src: [u8; 16] = ctx.load(ETH_HLEN + 8).ok()?;
    let addr = AddrKey::from_ipv6(src);
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let mut offset = ETH_HLEN + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => break,
            // Hop-by-hop, routing, destination options: (length + 1) * 8 bytes.
            IPV6_NEXTHDR_HOP | IPV6_NEXTHDR_ROUTING | IPV6_NEXTHDR_DEST => {
                let len: u8 = ctx.load(offset + 1).ok()?;
                next = ctx.load(offset).ok()?;
                offset += (usize::from(len) + 1) * 8;
            }
            // Fragment: 8 bytes; only the first fragment carries the UDP header.
            IPV6_NEXTHDR_FRAGMENT => {
                next = ctx.load(offset).ok()?;
                let frag = u16::from_be(ctx.load::<u16>(offset + 2).ok()?);
                if frag & IPV6_OFFSET_MASK != 0 {
                    return None;
                }
                offset += IPV6_FRAG_HLEN;
            }
            // Authentication header: (length + 2) * 4 bytes.
            IPV6_NEXTHDR_AUTH => {
                let len: u8 = ctx.load(offset + 1).ok()?;
                next = ctx.load(offset).ok()?;
                offset += (usize::from(len) + 2) * 4;
            }
            _ => return None,
        }
        // Keeps the offset a bounded scalar for the verifier.
        offset &= OFFSET_MASK;
    }
    if next != IPPROTO_UDP {
        return None;
    }
    let port = u16::from_be(ctx.load::<u16>(offset).ok()?);
    Some((addr, port))
}

#[inline(always)]
fn lookup(addr: AddrKey, port: u16) -> Option<u32> {
    let key = ServiceKey::new(addr, port);
    // SAFETY: the value is a plain u32 copied out while the RCU read lock is held.
    unsafe { REPLY_ENDPOINTS.get(&key) }.copied()
}
