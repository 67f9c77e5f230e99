use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, XskMap},
    programs::XdpContext,
};
use flynode_xdp_common::{
    COUNTER_SLOTS, Counter, MAX_IPV6_EXT_HEADERS, MAX_QUEUES,
    table::{self, BPF_F_MMAPABLE, KIND_ADDRESS, KIND_ENDPOINT, Slot, Table},
    wireguard,
};

#[map]
static SERVICE_TABLE: Array<Table> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

use crate::wire::*;

const VLAN_HLEN: usize = 4;
const ETH_P_8021Q: u16 = 0x8100;
const IPV4_HLEN_MIN: usize = 20;
const UDP_HLEN: usize = 8;
/// IPv4 "more fragments" flag, in host order of the 16-bit field.
const IPV4_MF: u16 = 0x2000;

#[xdp]
pub fn flynode_xdp(ctx: XdpContext) -> u32 {
    let counter = classify(&ctx);
    // Counter slots are ordered by verdict (userspace, pass, drop; checked by a test in
    // flynode-xdp-common), so the verdict is two comparisons and the counter is
    // incremented in one place.
    let (counter, action) = if (counter as u32) < Counter::SocketService as u32 {
        // XDP_PASS in the flags' low bits is what bpf_redirect_map returns when the
        // queue has no socket: the kernel stack then delivers the datagram to
        // flynode's UDP socket (the socket fallback), and it is counted as such.
        match XSKS.redirect(ctx.rx_queue_index(), xdp_action::XDP_PASS as u64) {
            Ok(action) => (counter, action),
            Err(action) => (counter.socket_fallback(), action),
        }
    } else if (counter as u32) < Counter::DropMalformedEthernet as u32 {
        (counter, xdp_action::XDP_PASS)
    } else {
        (counter, xdp_action::XDP_DROP)
    };
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, so no other program instance writes it concurrently.
        unsafe { *slot += 1 };
    }
    action
}

/// Packet loads of one instruction each.
///
/// Header fields sit at any alignment (a 14-byte Ethernet header puts IPv4 addresses at
/// 2 mod 4). The BPF machine has no alignment traps: the verifier accepts misaligned
/// packet loads (unless a program is loaded with BPF_F_STRICT_ALIGNMENT) and the JITs
/// emit plain loads. LLVM's BPF backend, however, assumes strict alignment and splits
/// every `read_unaligned` into single-byte loads, shifts and ors (7 instructions for a
/// `u32`), a measurable share of a classifier whose budget is a few tens of ns. So the
/// loads are written in BPF assembly. Each takes the address of bytes that the caller
/// has checked to lie inside the frame (the verifier checks it again).
mod load {
    use core::arch::asm;

    macro_rules! loader {
        ($name:ident, $t:ty, $insn:literal) => {
            /// # Safety
            /// `addr..addr + size_of::<T>()` lies inside the frame.
            #[inline(always)]
            pub unsafe fn $name(addr: usize) -> $t {
                let value: u64;
                // SAFETY: the caller's contract; the asm only reads that memory.
                unsafe {
                    asm!($insn, v = lateout(reg) value, p = in(reg) addr,
                        options(readonly, nostack, preserves_flags, pure))
                };
                value as $t
            }
        };
    }
    loader!(u8_at, u8, "{v} = *(u8 *)({p} + 0)");
    loader!(u16_at, u16, "{v} = *(u16 *)({p} + 0)");
    loader!(u32_at, u32, "{v} = *(u32 *)({p} + 0)");
    loader!(u64_at, u64, "{v} = *(u64 *)({p} + 0)");
}

/// The address of `N` bytes at `offset` when they lie inside the frame. Every packet
/// read goes through here: the comparison against `data_end` is what the verifier needs
/// to see before any load.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<usize> {
    let at = ctx.data() + (offset & OFFSET_MASK);
    if at + N > ctx.data_end() {
        return None;
    }
    Some(at)
}

/// Whether the frame is at least `len` bytes long. A comparison rather than
/// `data_end - data`: the verifier refuses pointer subtraction without CAP_PERFMON, and
/// each verifier privilege the program leans on is one the daemon must be granted.
#[inline(always)]
fn frame_holds(ctx: &XdpContext, len: usize) -> bool {
    ctx.data() + len <= ctx.data_end()
}

/// A 16-bit field as loaded (network order in memory) compared with a constant.
#[inline(always)]
const fn wire16(host: u16) -> u16 {
    host.to_be()
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Counter {
    let Some(eth) = bytes_at::<ETH_HLEN>(ctx, 0) else {
        return Counter::DropMalformedEthernet;
    };
    // SAFETY (every load below): inside the range its `bytes_at` checked.
    let mut ethertype = unsafe { load::u16_at(eth + 12) };
    let mut l3 = ETH_HLEN;
    if ethertype == wire16(ETH_P_8021Q) {
        let Some(tag) = bytes_at::<VLAN_HLEN>(ctx, ETH_HLEN) else {
            return Counter::DropMalformedEthernet;
        };
        ethertype = unsafe { load::u16_at(tag + 2) };
        l3 = ETH_HLEN + VLAN_HLEN;
    }
    if ethertype == wire16(ETH_P_IPV4) {
        classify_ipv4(ctx, l3)
    } else if ethertype == wire16(ETH_P_IPV6) {
        classify_ipv6(ctx, l3)
    } else {
        // Includes a second (QinQ) tag: only one tag is ours to look through.
        Counter::PassNotIp
    }
}

#[inline(always)]
fn classify_ipv4(ctx: &XdpContext, l3: usize) -> Counter {
    let Some(ip) = bytes_at::<IPV4_HLEN_MIN>(ctx, l3) else {
        return Counter::DropMalformedIpv4;
    };
    let version_ihl = unsafe { load::u8_at(ip) };
    if version_ihl >> 4 != 4 {
        return Counter::DropMalformedIpv4;
    }
    // IHL is 4 bits, so the header (with options) is 20..=60 bytes: a bound the verifier
    // can carry into the UDP offset below.
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be(unsafe { load::u16_at(ip + 2) }) as usize;
    // Frames may carry Ethernet padding after the datagram, never less than it.
    if ihl < IPV4_HLEN_MIN || total_len < ihl || !frame_holds(ctx, l3 + total_len) {
        return Counter::DropMalformedIpv4;
    }
    if unsafe { load::u8_at(ip + 9) } != IPPROTO_UDP {
        return Counter::PassNotUdp;
    }
    // Fragments go to the kernel, which reassembles them: a later fragment has no UDP
    // header to classify, and a first one does not hold the whole datagram. flynode
    // keeps a UDP socket on every service port, so the reassembled datagram reaches it.
    let frag = unsafe { load::u16_at(ip + 6) };
    if frag & wire16(IPV4_OFFSET_MASK | IPV4_MF) != 0 {
        return if frag & wire16(IPV4_OFFSET_MASK) != 0 {
            Counter::PassFragmentLater
        } else {
            Counter::PassFragmentFirst
        };
    }
    let dst = unsafe { load::u32_at(ip + 16) };
    classify_udp(
        ctx,
        [0, table::ipv4_word(dst)],
        l3 + (ihl & 0x3c),
        l3 + total_len,
    )
}

#[inline(always)]
fn classify_ipv6(ctx: &XdpContext, l3: usize) -> Counter {
    let Some(ip) = bytes_at::<IPV6_HLEN>(ctx, l3) else {
        return Counter::DropMalformedIpv6;
    };
    if unsafe { load::u8_at(ip) } >> 4 != 6 {
        return Counter::DropMalformedIpv6;
    }
    let ip_end = l3 + IPV6_HLEN + u16::from_be(unsafe { load::u16_at(ip + 4) }) as usize;
    if !frame_holds(ctx, ip_end) {
        return Counter::DropMalformedIpv6;
    }
    let dst = unsafe { [load::u64_at(ip + 24), load::u64_at(ip + 32)] };
    let mut next = unsafe { load::u8_at(ip + 6) };
    let mut offset = l3 + IPV6_HLEN;
    // A bounded walk of the extension headers (RFC 8200 §4): each iteration reads one
    // header's next-header and length bytes; the verifier sees at most
    // MAX_IPV6_EXT_HEADERS iterations, each offset bounded by OFFSET_MASK.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => return classify_udp(ctx, dst, offset, ip_end),
            IPV6_NEXTHDR_HOP | IPV6_NEXTHDR_ROUTING | IPV6_NEXTHDR_DEST => {
                let Some(h) = bytes_at::<2>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                let (n, len) = unsafe { (load::u8_at(h), load::u8_at(h + 1)) };
                next = n;
                offset = (offset + (len as usize + 1) * 8) & OFFSET_MASK;
            }
            IPV6_NEXTHDR_AUTH => {
                let Some(h) = bytes_at::<2>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                let (n, len) = unsafe { (load::u8_at(h), load::u8_at(h + 1)) };
                next = n;
                offset = (offset + (len as usize + 2) * 4) & OFFSET_MASK;
            }
            IPV6_NEXTHDR_FRAGMENT => {
                let Some(h) = bytes_at::<IPV6_FRAG_HLEN>(ctx, offset) else {
                    return Counter::DropMalformedIpv6;
                };
                // An atomic fragment (offset 0, no more fragments; RFC 6946) is a whole
                // datagram, but the kernel handles it as a fragment: so do we.
                let offset_flags = unsafe { load::u16_at(h + 2) };
                return if offset_flags & wire16(IPV6_OFFSET_MASK) != 0 {
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
        return classify_udp(ctx, dst, offset, ip_end);
    }
    Counter::PassIpv6ExtLimit
}

/// The UDP header at `offset`, inside an IP datagram that ends at `ip_end`, to the
/// address `dst` (as [`table::addr_words`]).
#[inline(always)]
fn classify_udp(ctx: &XdpContext, dst: [u64; 2], offset: usize, ip_end: usize) -> Counter {
    let Some(udp) = bytes_at::<UDP_HLEN>(ctx, offset) else {
        return Counter::DropMalformedUdp;
    };
    let udp_len = u16::from_be(unsafe { load::u16_at(udp + 4) }) as usize;
    if udp_len < UDP_HLEN || offset + udp_len > ip_end {
        return Counter::DropMalformedUdp;
    }
    let Some(table) = SERVICE_TABLE.get(0) else {
        return Counter::PassNotService;
    };
    let port_be = unsafe { load::u16_at(udp + 2) };
    if let Some(slot) = lookup(table, dst, port_be, KIND_ENDPOINT) {
        if !slot.value.is_wireguard() {
            return Counter::UserspaceService;
        }
        let payload_len = udp_len - UDP_HLEN;
        return match bytes_at::<4>(ctx, offset + UDP_HLEN) {
            Some(head)
                if wireguard::plausible(
                    unsafe { load::u32_at(head) }.to_le_bytes(),
                    payload_len,
                ) =>
            {
                Counter::UserspaceWireguard
            }
            _ => Counter::DropNotWireguard,
        };
    }
    if lookup(table, dst, 0, KIND_ADDRESS).is_some() {
        return Counter::DropUnknownPort;
    }
    Counter::PassNotService
}

/// The live half's slot holding `(addr, port_be, kind)`: at most [`table::MAX_PROBES`]
/// slots from the key's home slot, stopping at the first empty one. Slots are reached by
/// address arithmetic from the table's one map value; the index is a 17-bit mask, which
/// is how the verifier (and LLVM, which then drops the bounds check) see it in range.
#[inline(always)]
fn lookup(table: &'static Table, addr: [u64; 2], port_be: u16, kind: u16) -> Option<&'static Slot> {
    // One volatile load: userspace switches `active` while programs run, and the seeds
    // and the slots must come from the same half (LLVM could otherwise load it twice
    // rather than keep it in a register).
    // SAFETY: a plain aligned u32 inside the map value.
    let half = unsafe { (&raw const table.config.active).read_volatile() } & 1;
    let base = half << table::SLOTS_LOG2;
    table::probe(
        |i| table.slots.get((base | i) as usize),
        table.config.seeds[half as usize],
        addr,
        port_be,
        kind,
    )
}
