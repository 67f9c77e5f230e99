use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use flynode_xdp_common::{
    AddrKey, COUNTER_SLOTS, Counter, MAX_SERVICE_ADDRS, MAX_SERVICES, ServiceKey, ServiceValue,
};

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map]
static SERVICE_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_SERVICE_ADDRS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;
const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
/// IPv4 "more fragments" flag and fragment offset mask, in host order of the 16-bit field.
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

#[xdp]
pub fn flynode_xdp(ctx: XdpContext) -> u32 {
    let counter = classify(&ctx);
    count(counter);
    match counter.verdict() {
        // No AF_XDP socket exists yet (a later issue adds the XSKMAP redirect): the
        // kernel's own UDP stack receives service datagrams, which is the socket fallback.
        flynode_xdp_common::Verdict::Userspace => xdp_action::XDP_PASS,
        flynode_xdp_common::Verdict::Pass => xdp_action::XDP_PASS,
        flynode_xdp_common::Verdict::Drop => xdp_action::XDP_DROP,
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
    // Any fragment, first or later, goes to the kernel, which reassembles it: a later
    // fragment has no UDP header to classify, and a first one does not hold the whole
    // datagram.
    let frag = be16(ip[6], ip[7]);
    if frag & (IPV4_MF | IPV4_OFFSET_MASK) != 0 {
        return Counter::PassFragment;
    }
    let dst = AddrKey::from_ipv4([ip[16], ip[17], ip[18], ip[19]]);
    let Some(udp) = bytes_at::<UDP_HLEN>(ctx, l3 + (ihl & 0x3c)) else {
        return Counter::DropMalformedUdp;
    };
    let udp_len = be16(udp[4], udp[5]) as usize;
    if udp_len < UDP_HLEN || udp_len > total_len - ihl {
        return Counter::DropMalformedUdp;
    }
    lookup(dst, be16(udp[2], udp[3]))
}

#[inline(always)]
fn classify_ipv6(ctx: &XdpContext, l3: usize) -> Counter {
    let Some(ip) = bytes_at::<IPV6_HLEN>(ctx, l3) else {
        return Counter::DropMalformedIpv6;
    };
    if ip[0] >> 4 != 6 {
        return Counter::DropMalformedIpv6;
    }
    let payload_len = be16(ip[4], ip[5]) as usize;
    if !frame_holds(ctx, l3 + IPV6_HLEN + payload_len) {
        return Counter::DropMalformedIpv6;
    }
    match ip[6] {
        IPPROTO_UDP => {}
        IPV6_NEXTHDR_FRAGMENT => return Counter::PassFragment,
        _ => return Counter::PassNotUdp,
    }
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&ip[24..40]);
    let Some(udp) = bytes_at::<UDP_HLEN>(ctx, l3 + IPV6_HLEN) else {
        return Counter::DropMalformedUdp;
    };
    let udp_len = be16(udp[4], udp[5]) as usize;
    if udp_len < UDP_HLEN || udp_len > payload_len {
        return Counter::DropMalformedUdp;
    }
    lookup(AddrKey::from_ipv6(dst), be16(udp[2], udp[3]))
}

#[inline(always)]
fn lookup(dst: AddrKey, port: u16) -> Counter {
    let key = ServiceKey::new(dst, port);
    if SERVICES.get_ptr(&key).is_some() {
        return Counter::UserspaceService;
    }
    if SERVICE_ADDRS.get_ptr(&dst).is_some() {
        return Counter::DropUnknownPort;
    }
    Counter::PassNotService
}
