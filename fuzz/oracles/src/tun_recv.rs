//! `tun_recv`: the TUN receive path (`flynode_tunnel::io::tun`, through
//! `flynode_tunnel::fuzzing::Receiver`): virtio-net header, checksum completion, GSO
//! split into the batch's slots.
//!
//! Input: `[select: 1][raw read]`. Bit 7 of `select` picks the batch (64 slots of 1400
//! bytes, or 128 of 64 KiB); the low bits are the slots already taken. The raw read is a
//! virtio-net header (10 bytes, native byte order) and an IP packet.
//!
//! Properties, for any read:
//! - a plain packet comes out unchanged, except for a completed checksum that then sums
//!   right (at the even offsets the kernel uses), or is dropped (no room in a slot, checksum field outside the packet);
//! - a super-packet is split into segments whose payloads, concatenated, are its
//!   payload; every segment's payload is `gso_size` bytes but the last; headers are the
//!   super-packet's but for lengths, IPv4 ID and checksums (TCP: sequence numbers and
//!   flags as segmentation sets them). It is only left pending when it does not fit the
//!   rest of a non-empty batch and fits an empty one;
//! - a super-packet as the kernel makes them (lengths, protocol and offsets consistent)
//!   is never dropped, and every segment is a well-formed packet with valid IPv4
//!   header and TCP/UDP checksums.
use std::cell::RefCell;

use flynode_tunnel::fuzzing::{Receiver, VIRTIO_NET_HDR_LEN};

use crate::checksum::{self, PROTO_TCP, PROTO_UDP};

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

thread_local! {
    static SMALL: RefCell<Receiver> = RefCell::new(Receiver::new(64, 1400));
    static LARGE: RefCell<Receiver> = RefCell::new(Receiver::new(128, 65535));
}

pub fn tun_recv(data: &[u8]) {
    let Some((&select, raw)) = data.split_first() else {
        return;
    };
    let batch = if select & 0x80 == 0 { &SMALL } else { &LARGE };
    batch.with_borrow_mut(|rx| check(rx, usize::from(select & 0x7f), raw));
}

/// The virtio-net header fields.
#[derive(Debug, Clone, Copy)]
struct Hdr {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

fn check(rx: &mut Receiver, used: usize, raw: &[u8]) {
    let cap = rx.capacity();
    let used = used.min(cap);
    let dropped = rx.dropped();
    let fits = rx.absorb(used, raw);
    let out: Vec<Vec<u8>> = rx.packets().map(<[u8]>::to_vec).collect();
    let was_dropped = rx.dropped() > dropped;
    assert!(used + out.len() <= cap, "more packets than slots");
    assert!(
        out.iter().all(|p| p.len() <= rx.slot_len()),
        "a packet larger than a slot"
    );
    if !fits {
        assert!(
            out.is_empty() && !was_dropped,
            "left pending and also consumed"
        );
    }
    if raw.len() <= VIRTIO_NET_HDR_LEN || raw.len() >= Receiver::RAW_BUF_BYTES {
        assert!(
            fits && out.is_empty() && was_dropped,
            "a read without a packet"
        );
        return;
    }
    let u16_at = |at: usize| u16::from_ne_bytes([raw[at], raw[at + 1]]);
    let hdr = Hdr {
        flags: raw[0],
        gso_type: raw[1],
        gso_size: u16_at(4),
        csum_start: u16_at(6),
        csum_offset: u16_at(8),
    };
    let pkt = &raw[VIRTIO_NET_HDR_LEN..];
    if hdr.gso_type == GSO_NONE {
        plain(rx, used, hdr, pkt, fits, &out, was_dropped);
    } else {
        segmented(rx, used, hdr, pkt, fits, &out, was_dropped);
    }
}

fn plain(
    rx: &Receiver,
    used: usize,
    hdr: Hdr,
    pkt: &[u8],
    fits: bool,
    out: &[Vec<u8>],
    dropped: bool,
) {
    if used == rx.capacity() {
        assert!(!fits, "a packet taken into a full batch");
        return;
    }
    assert!(fits);
    let needs = hdr.flags & F_NEEDS_CSUM != 0;
    let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
    if (needs && at + 2 > pkt.len()) || pkt.len() > rx.slot_len() {
        assert!(
            out.is_empty() && dropped,
            "a packet that cannot be taken was"
        );
        return;
    }
    assert!(!dropped && out.len() == 1, "a plain packet lost");
    let got = &out[0];
    assert_eq!(got.len(), pkt.len());
    if needs {
        let start = usize::from(hdr.csum_start);
        assert_eq!(got[..at], pkt[..at]);
        assert_eq!(got[at + 2..], pkt[at + 2..]);
        // The kernel's offsets are 6 (UDP) or 16 (TCP): a field at an odd offset straddles
        // two 16-bit words of the sum, and no value written there sums right.
        if hdr.csum_offset.is_multiple_of(2) {
            let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
            assert_eq!(
                checksum::ones_sum(&got[start..], u64::from(initial)),
                0xffff,
                "completed checksum"
            );
        }
    } else {
        assert_eq!(got, pkt, "a plain packet changed");
    }
}

/// What the reader must make of a super-packet: the transport, header length (the
/// kernel's `hdr_len` is not trusted: taken from `csum_start` and the transport header,
/// as wireguard-go does) and the number of segments; `None` if it is to be dropped.
struct Gso {
    v6: bool,
    proto: u8,
    hdr_len: usize,
    segments: usize,
}

fn expected(hdr: Hdr, pkt: &[u8]) -> Option<Gso> {
    if hdr.gso_size == 0 {
        return None;
    }
    let v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let proto = match (hdr.gso_type & !GSO_ECN, hdr.gso_type & GSO_ECN != 0, v6) {
        (GSO_TCPV4, _, false) | (GSO_TCPV6, _, true) => PROTO_TCP,
        (GSO_UDP_L4, false, _) => PROTO_UDP,
        _ => return None,
    };
    let cs = usize::from(hdr.csum_start);
    let hdr_len = if proto == PROTO_UDP {
        cs + 8
    } else {
        let tcp = usize::from(*pkt.get(cs + 12)? >> 4) * 4;
        if !(20..=60).contains(&tcp) {
            return None;
        }
        cs + tcp
    };
    u16::try_from(hdr_len).ok()?;
    let payload = pkt.len().checked_sub(hdr_len)?;
    Some(Gso {
        v6,
        proto,
        hdr_len,
        segments: payload.div_ceil(usize::from(hdr.gso_size)),
    })
}

/// Whether the super-packet is one the kernel could have made: every length, offset
/// and protocol field agrees with the bytes, and its segments fit a slot.
fn consistent(hdr: Hdr, pkt: &[u8], g: &Gso, slot_len: usize) -> bool {
    let cs = usize::from(hdr.csum_start);
    let ip_ok = if g.v6 {
        pkt.len() >= 40
            && cs == 40
            && pkt[6] == g.proto
            && usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) + 40 == pkt.len()
    } else {
        pkt.len() >= 20
            && usize::from(pkt[0] & 0x0f) * 4 == cs
            && cs >= 20
            && pkt[9] == g.proto
            && usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) == pkt.len()
    };
    let offset = if g.proto == PROTO_UDP { 6 } else { 16 };
    let largest = g.hdr_len + (pkt.len() - g.hdr_len).min(usize::from(hdr.gso_size));
    ip_ok && usize::from(hdr.csum_offset) == offset && largest <= slot_len && g.segments > 0
}

fn segmented(
    rx: &Receiver,
    used: usize,
    hdr: Hdr,
    pkt: &[u8],
    fits: bool,
    out: &[Vec<u8>],
    dropped: bool,
) {
    let Some(g) = expected(hdr, pkt) else {
        assert!(
            fits && out.is_empty() && dropped,
            "a bad super-packet taken"
        );
        return;
    };
    let free = rx.capacity() - used;
    if g.segments > free {
        if used > 0 && g.segments <= rx.capacity() {
            assert!(
                !fits,
                "a super-packet that fits an empty batch was not kept"
            );
        } else {
            assert!(
                fits && out.is_empty() && dropped,
                "an oversized super-packet taken"
            );
        }
        return;
    }
    assert!(fits, "a super-packet that fits was left pending");
    if consistent(hdr, pkt, &g, rx.slot_len()) {
        assert!(!dropped, "a well-formed super-packet dropped");
        assert_eq!(out.len(), g.segments, "segments");
    }
    if out.is_empty() {
        return;
    }
    assert_eq!(out.len(), g.segments, "segments");
    let gso = usize::from(hdr.gso_size);
    let cs = usize::from(hdr.csum_start);
    let mut joined = Vec::with_capacity(pkt.len());
    for (i, seg) in out.iter().enumerate() {
        let last = i + 1 == out.len();
        let data = &seg[g.hdr_len..];
        assert!(data.len() == gso || (last && !data.is_empty() && data.len() <= gso));
        joined.extend_from_slice(data);
        same_headers(pkt, seg, &g, cs, i, last, hdr.gso_size);
        if consistent(hdr, pkt, &g, rx.slot_len()) {
            well_formed(seg, &g, cs);
        }
    }
    assert_eq!(
        joined,
        &pkt[g.hdr_len..],
        "segments do not add up to the payload"
    );
}

/// A segment's headers are the super-packet's, but for what segmentation rewrites.
fn same_headers(pkt: &[u8], seg: &[u8], g: &Gso, cs: usize, i: usize, last: bool, gso: u16) {
    let mut want = pkt[..g.hdr_len].to_vec();
    let mut got = seg[..g.hdr_len].to_vec();
    let blank = |h: &mut Vec<u8>, r: std::ops::Range<usize>| h[r].fill(0);
    if g.v6 {
        for h in [&mut want, &mut got] {
            blank(h, 4..6);
        }
    } else {
        for h in [&mut want, &mut got] {
            blank(h, 2..6);
            blank(h, 10..12);
        }
    }
    if g.proto == PROTO_UDP {
        for h in [&mut want, &mut got] {
            blank(h, cs + 4..cs + 8);
        }
    } else {
        let seq = |h: &[u8]| u32::from_be_bytes([h[cs + 4], h[cs + 5], h[cs + 6], h[cs + 7]]);
        let expected = seq(pkt).wrapping_add(u32::from(gso) * i as u32);
        assert_eq!(seq(seg), expected, "TCP sequence number of segment {i}");
        let flags = seg[cs + 13];
        let mut allowed = pkt[cs + 13];
        if i > 0 {
            allowed &= !0x80; // CWR only on the first
        }
        if !last {
            allowed &= !0x09; // FIN and PSH only on the last
        }
        assert_eq!(flags, allowed, "TCP flags of segment {i}");
        for h in [&mut want, &mut got] {
            blank(h, cs + 4..cs + 8);
            blank(h, cs + 13..cs + 14);
            blank(h, cs + 16..cs + 18);
        }
    }
    assert_eq!(got, want, "segment {i} headers");
}

fn well_formed(seg: &[u8], g: &Gso, cs: usize) {
    let (src, dst) = checksum::addresses(seg).expect("an IP header");
    if g.v6 {
        assert_eq!(
            usize::from(u16::from_be_bytes([seg[4], seg[5]])) + 40,
            seg.len()
        );
    } else {
        assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
        assert!(checksum::ipv4_header_ok(&seg[..cs]), "IPv4 header checksum");
    }
    let l4 = &seg[cs..];
    if g.proto == PROTO_UDP {
        assert_eq!(
            usize::from(u16::from_be_bytes([l4[4], l4[5]])),
            l4.len(),
            "UDP length"
        );
    }
    assert!(
        checksum::transport_ok(src, dst, g.proto, l4),
        "transport checksum"
    );
}
