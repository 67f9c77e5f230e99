use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use flynode_xdp_common::{
    AddrKey, COUNTER_SLOTS, Counter, MAX_IPV6_EXT_HEADERS, MAX_QUEUES, MAX_SERVICE_ADDRS,
    MAX_SERVICES, ServiceKey, ServiceValue, wireguard,
};

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
static SERVICE_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_SERVICE_ADDRS, 0);

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;
const IPV6_NEXTHDR_HOP: u8 = 0;
const IPV6_NEXTHDR_ROUTING: u8 = 43;
const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
const IPV6_NEXTHDR_AUTH: u8 = 51;
const IPV6_NEXTHDR_DEST: u8 = 60;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV6_FRAG_HLEN: usize = 8;
const UDP_HLEN: usize = 8;
/// IPv4 "more fragments" flag and fragment offset mask, in host order of the 16-bit field.
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// Fragment offset mask of the IPv6 fragment header's 16-bit offset/flags field.
const IPV6_OFFSET_MASK: u16 = 0xfff8;
/// Upper bound on any offset into the frame: keeps every computed offset a bounded
/// scalar for the verifier (frames are never longer than 64 KiB).
const OFFSET_MASK: usize = 0xffff;

#[xdp]
pub fn flynode_xdp(ctx: XdpContext) -> u32 {
    let counter = classify(&ctx);
    match counter {
        Counter::UserspaceService | Counter::UserspaceWireguard => {
            // XDP_PASS in the flags' low bits is what bpf_redirect_map returns when the
            // queue has no socket: the kernel stack then delivers the datagram to
            // flynode's UDP socket (the socket fallback), and it is counted as such.
            match XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
                Ok(action) => {
                    count(counter);
                    action
                }
                Err(action) => {
                    count(counter.socket_fallback());
                    action
                }
            }
        }
        _ => {
            count(counter);
            match counter.verdict() {
                flynode_xdp_common::Verdict::Drop => xdp_action::XDP_DROP,
                _ => xdp_action::XDP_PASS,
            }
        }
    }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, so no other program instance writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// `Some(pointer)` to `N` bytes at `offset` when they lie inside the frame. Every packet
/// read goes through here: the comparison against `data_end` is what the verifier needs
/// to see before any load.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    let offset = offset & OFFSET_MASK;
    if start + offset + N > end {
        return None;
    }
    // SAFETY: the range [start+offset, start+offset+N) was just checked to be in the frame.
    Some(unsafe { &*((start + offset) as *const [u8; N]) })
}

/// Whether the frame is at least `len` bytes long. A comparison rather than
/// `data_end - data`: the verifier refuses pointer subtraction without CAP_PERFMON, and
/// each verifier privilege the program leans on is one the daemon must be granted.
#[inline(always)]
fn frame_holds(ctx: &XdpContext, len: usize) -> bool {
    ctx.data() + len <= ctx.data_end()
}

#[inline(always)]
fn be16(hi: u8, lo: u8) -> u16 {
    ((hi as u16) << 8) | lo as u16
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Counter {
    let Some(eth) = bytes_at::<ETH_HLEN>(ctx, 0) else {
        return Counter::DropMalformedEthernet;
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        let Some(tag) = bytes_at::<VLAN_HLEN>(ctx, ETH_HLEN) else {
            return Counter::DropMalformedEthernet;
        };
        ethertype = be16(tag[2], tag[3]);
        l3 = ETH_HLEN + VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IPV4 => classify_ipv4(ctx, l3),
        ETH_P_IPV6 => classify_ipv6(ctx, l3),
        // Includes a second (QinQ) tag: only one tag is ours to look through.
        _ => Counter::PassNotIp,
    }
}

#[inline(always)]
fn classify_ipv4(ctx: &XdpContext, l3: usize) -> Counter {
    let Some(ip) = bytes_at::<IPV4_HLEN_MIN>(ctx, l3) else {
        return Counter::DropMalformedIpv4;
    };
    if ip[0] >> 4 != 4 {
        return Counter::DropMalformedIpv4;
    }
    // IHL is 4 bits, so the header (with options) is 20..=60 bytes: a bound the verifier
    // can carry into the UDP offset below.
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total_len = be16(ip[2], ip[3]) as usize;
    // Frames may carry Ethernet padding after the datagram, never less than it.
    if ihl < IPV4_HLEN_MIN || total_len < ihl || !frame_holds(ctx, l3 + total_len) {
        return Counter::DropMalformedIpv4;
    }
    if ip[9] != IPPROTO_UDP {
        return Counter::PassNotUdp;
    }
    // Fragments go to the kernel, which reassembles them: a later fragment has no UDP
    // header to classify, and a first one does not hold the whole datagram. flynode
    // keeps a UDP socket on every service port, so the reassembled datagram reaches it.
    let frag = be16(ip[6], ip[7]);
    if frag & IPV4_OFFSET_MASK != 0 {
        return Counter::PassFragmentLater;
    }
    if frag & IPV4_MF != 0 {
        return Counter::PassFragmentFirst;
    }
    let dst = AddrKey::from_ipv4([ip[16], ip[17], ip[18], ip[19]]);
    classify_udp(ctx, dst, l3 + (ihl & 0x3c), l3 + total_len)
}

#[inline(always)]
fn classify_ipv6(ctx: &XdpContext, l3: usize) -> Counter {
    let Some(ip) = bytes_at::<IPV6_HLEN>(ctx, l3) else {
        return Counter::DropMalformedIpv6;
    };
    if ip[0] >> 4 != 6 {
        return Counter::DropMalformedIpv6;
    }
    let ip_end = l3 + IPV6_HLEN + be16(ip[4], ip[5]) as usize;
    if !frame_holds(ctx, ip_end) {
        return Counter::DropMalformedIpv6;
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    let mut next = ip[6];
    let mut offset = l3 + IPV6_HLEN;
    // A bounded walk of the extension headers (RFC 8200 §4): each iteration reads one
    // header's next-header and length bytes; the verifier sees at most
    // MAX_IPV6_EXT_HEADERS iterations, each offset bounded by OFFSET_MASK.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => return classify_udp(ctx, AddrKey::from_ipv6(dst), offset, ip_end),
            IPV6_NEXTHDR_HOP | IPV6_NEXTHDR_ROUTING | IPV6_NEXTHDR_DEST => {
                let Some(h) = bytes_at::<2>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                next = h[0];
                offset = (offset + (h[1] as usize + 1) * 8) & OFFSET_MASK;
            }
            IPV6_NEXTHDR_AUTH => {
                let Some(h) = bytes_at::<2>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                next = h[0];
                offset = (offset + (h[1] as usize + 2) * 4) & OFFSET_MASK;
            }
            IPV6_NEXTHDR_FRAGMENT => {
                let Some(h) = bytes_at::<IPV6_FRAG_HLEN>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                // An atomic fragment (offset 0, no more fragments; RFC 6946) is a whole
                // datagram, but the kernel handles it as a fragment: so do we.
                return if be16(h[2], h[3]) & IPV6_OFFSET_MASK != 0 {
                    Counter::PassFragmentLater
                } else {
                    Counter::PassFragmentFirst
                };
            }
            // TCP, ICMPv6, ESP, "no next header", ...
            _ => return Counter::PassNotUdp,
        }
        if offset > ip_end {
            return Counter::DropMalformedIpv6;
        }
    }
    if next == IPPROTO_UDP {
        return classify_udp(ctx, AddrKey::from_ipv6(dst), offset, ip_end);
    }
    Counter::PassIpv6ExtLimit
}

/// The UDP header at `offset`, inside an IP datagram that ends at `ip_end`.
#[inline(always)]
fn classify_udp(ctx: &XdpContext, dst: AddrKey, offset: usize, ip_end: usize) -> Counter {
    let Some(udp) = bytes_at::<UDP_HLEN>(ctx, offset) else {
        return Counter::DropMalformedUdp;
    };
    let udp_len = be16(udp[4], udp[5]) as usize;
    if udp_len < UDP_HLEN || offset + udp_len > ip_end {
        return Counter::DropMalformedUdp;
    }
    let key = ServiceKey::new(dst, be16(udp[2], udp[3]));
    if let Some(value) = SERVICES.get_ptr(&key) {
        // SAFETY: a map value pointer from a successful lookup, valid for this program run.
        let value = unsafe { &*value };
        if !value.is_wireguard() {
            return Counter::UserspaceService;
        }
        let payload_len = udp_len - UDP_HLEN;
        return match bytes_at::<4>(ctx, offset + UDP_HLEN) {
            Some(head) if wireguard::plausible(*head, payload_len) => Counter::UserspaceWireguard,
            _ => Counter::DropNotWireguard,
        };
    }
    if SERVICE_ADDRS.get_ptr(&dst).is_some() {
        return Counter::DropUnknownPort;
    }
    Counter::PassNotService
}
