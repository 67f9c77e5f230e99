//! UDP coalescing for TUN writes: consecutive datagrams of one flow become one
//! `GSO_UDP_L4` super-packet (one `write`, one trip through the IP stack; the kernel
//! splits it again in front of the receiving socket).
//!
//! Ours rather than `tun-rs`'s GRO (which keeps TCP): that one copies every UDP
//! candidate into a fresh `Vec` and sums its checksum before appending the payload
//! (`bench_udp_gro_cost`: the per-packet cost on the receiving mesh thread). Here the
//! payload is appended straight from its buffer, and the checksums are not verified:
//! the super-packet is written CHECKSUM_PARTIAL, which the kernel takes as valid for
//! local delivery and completes itself on forwarding. Every packet on this path was
//! authenticated by WireGuard's AEAD, which is why Linux's own WireGuard marks what it
//! decrypts CHECKSUM_UNNECESSARY instead of verifying it (drivers/net/wireguard/receive.c).
//!
//! What coalesces, as the kernel's own UDP GRO requires: same addresses and ports, same
//! TOS/traffic class, TTL/hop limit, DF flag (IPv4) and flow label (IPv6); an IPv4
//! header without options and not a fragment; every datagram's payload the size of the
//! first, except the last, which may be shorter and ends the run; at most
//! [`MAX_SEGMENTS`] datagrams and 64 KiB. Anything else is written as it came. Per flow,
//! the order of datagrams is kept; between flows it may change.

use tun_rs::{VIRTIO_NET_HDR_LEN, VirtioNetHdr};

use super::{GSO_UDP_L4, MAX_IP_PACKET, PktBuf, Queued, VIRTIO_NET_HDR_F_NEEDS_CSUM};

/// Most datagrams in one super-packet: the kernel's UDP_MAX_SEGMENTS on 6.1 (later
/// kernels allow 128).
pub(super) const MAX_SEGMENTS: usize = 64;
/// Flows with a run open at once; one more closes the oldest run.
const OPEN_RUNS: usize = 8;
/// Bytes of a flow's identity: IP version (1), addresses (32), ports (4).
const FLOW_BYTES: usize = 37;
/// Bytes of the header fields that must also match for a datagram to join a run: IPv4
/// TOS, DF and TTL; IPv6 version/class/label word (4) and hop limit (1).
const ATTR_BYTES: usize = 5;

/// A UDP datagram that can be part of a run.
struct Datagram {
    /// IP header length: 20 (IPv4) or 40 (IPv6).
    ip_len: usize,
    payload: usize,
    /// Which flow it belongs to: the key open runs are looked up by.
    flow: [u8; FLOW_BYTES],
    /// What else must match the run's first datagram to join it.
    attrs: [u8; ATTR_BYTES],
}

/// Whether `pkt` (an IP packet) is UDP: such packets are all handled here, so that the
/// ones that cannot coalesce keep their place in their flow.
pub(super) fn is_udp(pkt: &[u8]) -> bool {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => pkt.len() >= 20 && pkt[9] == 17,
        Some(6) => pkt.len() >= 40 && pkt[6] == 17,
        _ => false,
    }
}

fn parse(pkt: &[u8]) -> Option<Datagram> {
    let mut flow = [0u8; FLOW_BYTES];
    let mut attrs = [0u8; ATTR_BYTES];
    let ip_len = match pkt.first()? >> 4 {
        4 => {
            // No options; not a fragment (MF clear, offset 0); lengths agree.
            if pkt.len() < 28 || pkt[0] & 0x0f != 5 || pkt[9] != 17 {
                return None;
            }
            if usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len()
                || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0
            {
                return None;
            }
            flow[0] = 4;
            flow[1..13].copy_from_slice(&pkt[12..24]); // addresses, ports
            attrs[0] = pkt[1]; // TOS
            attrs[1] = pkt[6] & 0x40; // DF
            attrs[2] = pkt[8]; // TTL
            20
        }
        6 => {
            if pkt.len() < 48 || pkt[6] != 17 {
                return None;
            }
            if usize::from(u16::from_be_bytes([pkt[4], pkt[5]])) != pkt.len() - 40 {
                return None;
            }
            flow[0] = 6;
            flow[1..37].copy_from_slice(&pkt[8..44]); // addresses, ports
            attrs[..4].copy_from_slice(&pkt[..4]); // version, class, flow label
            attrs[4] = pkt[7]; // hop limit
            40
        }
        _ => return None,
    };
    let udp_len = usize::from(u16::from_be_bytes([pkt[ip_len + 4], pkt[ip_len + 5]]));
    if udp_len != pkt.len() - ip_len || udp_len <= 8 {
        return None;
    }
    Some(Datagram {
        ip_len,
        payload: udp_len - 8,
        flow,
        attrs,
    })
}

/// An open run: datagrams appended to the buffer of its first.
struct Run {
    head: usize,
    /// Its entry in the write queue.
    queued: usize,
    /// IP header length: 20 (IPv4) or 40 (IPv6); the flow tells the versions apart.
    ip_len: usize,
    gso_size: usize,
    count: usize,
    flow: [u8; FLOW_BYTES],
    attrs: [u8; ATTR_BYTES],
}

/// The runs open while coalescing one batch; kept with the batch so that coalescing
/// allocates nothing.
#[derive(Default)]
pub(super) struct UdpGro {
    open: Vec<Run>,
}

impl UdpGro {
    /// Coalesces the UDP packets `bufs` (each a virtio-header gap and an IP packet for
    /// which [`is_udp`] holds) and queues one write per run or lone packet; queue
    /// indexes are `base +` the index in `bufs`. The virtio header of every written
    /// buffer is filled in.
    pub(super) fn queue(&mut self, bufs: &mut [PktBuf], base: usize, queued: &mut Vec<Queued>) {
        let open = &mut self.open;
        open.clear();
        for j in 0..bufs.len() {
            let Some(d) = parse(&bufs[j].data[VIRTIO_NET_HDR_LEN..bufs[j].len]) else {
                // Written as it came. It may belong to an open run's flow (a fragment or
                // a packet with options has no comparable key): close every run so that
                // nothing after it is written before it.
                for run in open.drain(..) {
                    finish(bufs, &run, queued);
                }
                single(&mut bufs[j], base + j, queued);
                continue;
            };
            // Runs are found by flow alone: a datagram of the flow that cannot join its
            // open run (another TTL, ECN mark, a larger size) closes it, as Linux's GRO
            // flushes the flow, so that no later datagram of the flow can join the
            // older run and overtake it.
            if let Some(at) = open.iter().position(|r| r.flow == d.flow) {
                let run = &mut open[at];
                if run.attrs == d.attrs && append(bufs, run, j, &d) {
                    if d.payload < run.gso_size || run.count == MAX_SEGMENTS {
                        let run = open.swap_remove(at);
                        finish(bufs, &run, queued);
                    }
                    continue;
                }
                let run = open.swap_remove(at);
                finish(bufs, &run, queued);
            } else if open.len() == OPEN_RUNS {
                let run = open.remove(0);
                finish(bufs, &run, queued);
            }
            queued.push(Queued {
                index: base + j,
                from: 0,
                segments: 1,
            });
            open.push(Run {
                head: j,
                queued: queued.len() - 1,
                ip_len: d.ip_len,
                gso_size: d.payload,
                count: 1,
                flow: d.flow,
                attrs: d.attrs,
            });
        }
        for run in open.drain(..) {
            finish(bufs, &run, queued);
        }
    }
}

/// Appends datagram `j`'s payload to `run` if it fits: no larger than the run's size,
/// and the result within 64 KiB.
fn append(bufs: &mut [PktBuf], run: &mut Run, j: usize, d: &Datagram) -> bool {
    if d.payload > run.gso_size {
        return false;
    }
    let (left, right) = bufs.split_at_mut(j);
    let (head, pkt) = (&mut left[run.head], &right[0]);
    let end = head.len + d.payload;
    // The IPv4 total length, or the IPv6 payload length, must fit 16 bits.
    let length_field = end - VIRTIO_NET_HDR_LEN - if run.ip_len == 40 { 40 } else { 0 };
    if length_field > MAX_IP_PACKET {
        return false;
    }
    if end > head.data.len() {
        head.data.resize(end, 0);
    }
    let from = VIRTIO_NET_HDR_LEN + d.ip_len + 8;
    head.data[head.len..end].copy_from_slice(&pkt.data[from..pkt.len]);
    head.len = end;
    run.count += 1;
    true
}

/// Queues a packet to be written unchanged.
fn single(b: &mut PktBuf, index: usize, queued: &mut Vec<Queued>) {
    write_hdr(b, &VirtioNetHdr::default());
    queued.push(Queued {
        index,
        from: 0,
        segments: 1,
    });
}

fn write_hdr(b: &mut PktBuf, hdr: &VirtioNetHdr) {
    hdr.encode(&mut b.data[..VIRTIO_NET_HDR_LEN])
        .expect("a virtio-net header fits its headroom");
}

/// Turns a run's head buffer into the super-packet (or leaves a run of one as it came).
fn finish(bufs: &mut [PktBuf], run: &Run, queued: &mut [Queued]) {
    let b = &mut bufs[run.head];
    if run.count == 1 {
        write_hdr(b, &VirtioNetHdr::default());
        return;
    }
    queued[run.queued].segments = run.count;
    let pkt = &mut b.data[VIRTIO_NET_HDR_LEN..b.len];
    let ip = run.ip_len;
    let udp_len = pkt.len() - ip;
    // Lengths fit 16 bits: `append` keeps the IP packet within 64 KiB.
    let udp_len16 = udp_len as u16;
    pkt[ip + 4..ip + 6].copy_from_slice(&udp_len16.to_be_bytes());
    let pseudo = if ip == 40 {
        pkt[4..6].copy_from_slice(&udp_len16.to_be_bytes());
        pseudo_header(&pkt[8..24], &pkt[24..40], udp_len16)
    } else {
        let total = pkt.len() as u16;
        pkt[2..4].copy_from_slice(&total.to_be_bytes());
        pkt[10..12].fill(0);
        let check = !tun_rs::checksum(&pkt[..20], 0);
        pkt[10..12].copy_from_slice(&check.to_be_bytes());
        pseudo_header(&pkt[12..16], &pkt[16..20], udp_len16)
    };
    // The partial form: the folded pseudo-header sum, not complemented.
    let seed = tun_rs::checksum(&[], pseudo);
    pkt[ip + 6..ip + 8].copy_from_slice(&seed.to_be_bytes());
    let hdr = VirtioNetHdr {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gso_type: GSO_UDP_L4,
        hdr_len: (ip + 8) as u16,
        gso_size: run.gso_size as u16,
        csum_start: ip as u16,
        csum_offset: 6,
    };
    write_hdr(b, &hdr);
}

/// The UDP pseudo-header sum (unfolded) for `len` bytes of UDP header and payload.
fn pseudo_header(src: &[u8], dst: &[u8], len: u16) -> u64 {
    let sum = tun_rs::checksum_no_fold(src, 0);
    tun_rs::checksum_no_fold(dst, sum) + 17 + u64::from(len)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::io::testutil::{
        Rng, ipv4_udp, ipv6_udp, ones_sum, transport_checksum_ok, udp_partial_seed,
    };
    use crate::io::tun::{GRO_BUF_BYTES, prepare_gso};

    const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 2);

    /// Packets per flow, in order.
    type Flows = BTreeMap<(u8, u16), Vec<Vec<u8>>>;

    fn buf(p: &[u8]) -> PktBuf {
        let mut b = PktBuf::new(GRO_BUF_BYTES);
        b.data[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + p.len()].copy_from_slice(p);
        b.len = VIRTIO_NET_HDR_LEN + p.len();
        b
    }

    /// A packet as compared: the IPv4 ID and header checksum left out (the kernel
    /// numbers the segments of a super-packet from the first one's ID).
    fn norm(p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        if p[0] >> 4 == 4 {
            p[4..6].fill(0);
            p[10..12].fill(0);
        }
        p
    }

    /// A flow's id in a test packet: (IP version, source port).
    fn flow(p: &[u8]) -> (u8, u16) {
        let ip = if p[0] >> 4 == 4 { 20 } else { 40 };
        (p[0] >> 4, u16::from_be_bytes([p[ip], p[ip + 1]]))
    }

    /// Coalesces `pkts`, then takes every write apart as the kernel would (the
    /// reader's own GSO split) and returns the packets per flow, in order, and the
    /// number of writes. Every write must be well-formed.
    fn roundtrip(pkts: &[Vec<u8>]) -> (Flows, usize) {
        let mut bufs: Vec<PktBuf> = pkts.iter().map(|p| buf(p)).collect();
        let mut queued = Vec::new();
        UdpGro::default().queue(&mut bufs, 0, &mut queued);
        let mut got = Flows::new();
        let mut slots = vec![vec![0u8; 2048]; MAX_SEGMENTS];
        let mut sizes = vec![0usize; MAX_SEGMENTS];
        let mut packets = 0;
        for q in &queued {
            let b = &bufs[q.index];
            assert_eq!(q.from, 0);
            let mut hdr = VirtioNetHdr::decode(&b.data[..b.len]).unwrap();
            let pkt = &b.data[VIRTIO_NET_HDR_LEN..b.len];
            if hdr.gso_type == 0 {
                assert_eq!(q.segments, 1);
                assert_eq!(hdr.flags, 0, "a lone packet is written as it came");
                got.entry(flow(pkt)).or_default().push(norm(pkt));
                packets += 1;
                continue;
            }
            assert_eq!(hdr.gso_type, GSO_UDP_L4);
            assert_eq!(hdr.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert!(pkt.len() <= MAX_IP_PACKET + if pkt[0] >> 4 == 6 { 40 } else { 0 });
            if pkt[0] >> 4 == 4 {
                assert_eq!(ones_sum(&pkt[..20], 0), 0xffff, "IPv4 header checksum");
                assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            } else {
                assert_eq!(
                    usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
                    pkt.len() - 40
                );
            }
            // The checksum field holds the folded pseudo-header sum over the whole
            // super-packet (what the kernel completes from, and adjusts per segment).
            let ip = usize::from(hdr.csum_start);
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[ip + 4], pkt[ip + 5]])),
                pkt.len() - ip
            );
            assert_eq!(
                u16::from_be_bytes([pkt[ip + 6], pkt[ip + 7]]),
                udp_partial_seed(pkt),
                "partial checksum seed"
            );
            assert_eq!((hdr.csum_offset, hdr.hdr_len), (6, ip as u16 + 8));
            let (is_v6, segments) = prepare_gso(&mut hdr, pkt).expect("valid GSO header");
            assert_eq!(segments, q.segments);
            assert!((2..=MAX_SEGMENTS).contains(&segments), "{segments}");
            let n = tun_rs::gso_split(&mut pkt.to_vec(), hdr, &mut slots, &mut sizes, 0, is_v6)
                .unwrap();
            assert_eq!(n, segments);
            for (s, &len) in slots.iter().zip(&sizes).take(n) {
                let p = &s[..len];
                assert!(transport_checksum_ok(p), "segment checksum");
                got.entry(flow(p)).or_default().push(norm(p));
            }
            packets += n;
        }
        assert_eq!(packets, pkts.len(), "every packet written once");
        (got, queued.len())
    }

    fn per_flow(pkts: &[Vec<u8>]) -> Flows {
        let mut m = Flows::new();
        for p in pkts {
            m.entry(flow(p)).or_default().push(norm(p));
        }
        m
    }

    #[test]
    fn runs_coalesce_and_split_back_into_the_same_packets() {
        let mut pkts = Vec::new();
        // Two IPv4 flows interleaved, the first ending in a short datagram.
        for i in 0..30u8 {
            let len = if i == 28 { 300 } else { 1200 };
            pkts.push(ipv4_udp(A4, 1000 + u16::from(i % 2), B4, 53, &vec![i; len]));
        }
        // An IPv6 run longer than one super-packet may be (64 segments).
        for i in 0..150u16 {
            pkts.push(ipv6_udp(A6, 2000, B6, 53, &[i as u8; 100]));
        }
        // An IPv6 run of 1400-byte datagrams: 64 KiB ends a super-packet at 46.
        for i in 0..50u8 {
            pkts.push(ipv6_udp(A6, 2001, B6, 53, &vec![i; 1400]));
        }
        let (got, writes) = roundtrip(&pkts);
        assert!(got == per_flow(&pkts), "packets or their order changed");
        // v4: flow 1000 has 15 packets, the 15th (i == 28) short: one run; flow 1001:
        // one run. v6 2000: 64 + 64 + 22. v6 2001: 46 + 4.
        assert_eq!(writes, 2 + 3 + 2, "writes");
    }

    #[test]
    fn what_cannot_coalesce_keeps_its_place() {
        let mut pkts = Vec::new();
        let mut next = |p: Vec<u8>| pkts.push(p);
        for i in 0..5u8 {
            next(ipv4_udp(A4, 3000, B4, 53, &[i; 500]));
        }
        // A larger datagram cannot join the run: it starts the next.
        next(ipv4_udp(A4, 3000, B4, 53, &[9; 600]));
        next(ipv4_udp(A4, 3000, B4, 53, &[10; 600]));
        // A fragment of the same flow (MF set), written as it came.
        let mut frag = ipv4_udp(A4, 3000, B4, 53, &[11; 600]);
        frag[6] |= 0x20;
        frag[10..12].fill(0);
        let hc = !ones_sum(&frag[..20], 0);
        frag[10..12].copy_from_slice(&hc.to_be_bytes());
        next(frag);
        for i in 12..15u8 {
            next(ipv4_udp(A4, 3000, B4, 53, &[i; 600]));
        }
        // A different TTL is a different run; so is an empty datagram.
        let mut ttl = ipv4_udp(A4, 3000, B4, 53, &[15; 600]);
        ttl[8] = 7;
        ttl[10..12].fill(0);
        let hc = !ones_sum(&ttl[..20], 0);
        ttl[10..12].copy_from_slice(&hc.to_be_bytes());
        next(ttl);
        next(ipv4_udp(A4, 3000, B4, 53, &[]));
        next(ipv4_udp(A4, 3000, B4, 53, &[16; 600]));
        let (got, writes) = roundtrip(&pkts);
        assert!(got == per_flow(&pkts), "order within the flow");
        // [5 × 500] [600 600] [fragment] [600 × 3] [ttl 7] [empty] [600]
        assert_eq!(writes, 7);
    }

    /// Sets an IPv4 test packet's TTL and TOS, and its header checksum to match.
    fn v4_ttl_tos(mut p: Vec<u8>, ttl: u8, tos: u8) -> Vec<u8> {
        p[8] = ttl;
        p[1] = tos;
        p[10..12].fill(0);
        let hc = !ones_sum(&p[..20], 0);
        p[10..12].copy_from_slice(&hc.to_be_bytes());
        p
    }

    #[test]
    fn a_datagram_that_cannot_join_its_flows_run_is_never_overtaken() {
        // The fuzzing run's find: 1200/TTL 64, 1200/TTL 63, 1000/TTL 64 of one flow
        // came out 1200/64, 1000/64, 1200/63 when runs were looked up by the whole key.
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 9, 9, 9));
        let pkts = vec![
            v4_ttl_tos(ipv4_udp(a, 1000, b, 53, &[1; 1200]), 64, 0),
            v4_ttl_tos(ipv4_udp(a, 1000, b, 53, &[2; 1200]), 63, 0),
            v4_ttl_tos(ipv4_udp(a, 1000, b, 53, &[3; 1000]), 64, 0),
        ];
        let (got, writes) = roundtrip(&pkts);
        assert!(got == per_flow(&pkts), "order within the flow");
        assert_eq!(writes, 3);
        // An ECN mark flipping on a QUIC flow does the same.
        let mut pkts = Vec::new();
        for (i, tos) in [0u8, 0, 1, 1, 0, 2, 0].into_iter().enumerate() {
            pkts.push(v4_ttl_tos(
                ipv4_udp(a, 443, b, 443, &[i as u8; 1200]),
                64,
                tos,
            ));
        }
        let (got, writes) = roundtrip(&pkts);
        assert!(got == per_flow(&pkts), "order within the flow");
        // [0 0] [1 1] [0] [2] [0]
        assert_eq!(writes, 5);
        // And IPv6: a hop limit or traffic class change closes the run.
        let mut pkts = Vec::new();
        for (i, hop) in [64u8, 63, 64, 64].into_iter().enumerate() {
            let mut p = ipv6_udp(A6, 7000, B6, 53, &[i as u8; 900]);
            p[7] = hop;
            pkts.push(p);
        }
        let (got, writes) = roundtrip(&pkts);
        assert!(got == per_flow(&pkts), "order within the flow");
        assert_eq!(writes, 3);
    }

    #[test]
    fn many_flows_and_random_batches() {
        let mut rng = Rng(0x5eed_0bad_cafe);
        for round in 0..300 {
            let flows = 1 + rng.below(12) as u16;
            let n = 1 + rng.below(200) as usize;
            let mut sizes: Vec<usize> = (0..flows).map(|_| 1 + rng.below(1400) as usize).collect();
            let pkts: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let f = rng.below(u64::from(flows)) as u16;
                    if rng.below(10) == 0 {
                        sizes[usize::from(f)] = 1 + rng.below(1400) as usize;
                    }
                    let payload = vec![i as u8; sizes[usize::from(f)]];
                    if f.is_multiple_of(2) {
                        // Now and then another TTL or ECN mark within the flow.
                        let (ttl, tos) = match rng.below(16) {
                            0 => (63, 0),
                            1 => (64, 1),
                            _ => (64, 0),
                        };
                        v4_ttl_tos(ipv4_udp(A4, 4000 + f, B4, 53, &payload), ttl, tos)
                    } else {
                        ipv6_udp(A6, 4000 + f, B6, 53, &payload)
                    }
                })
                .collect();
            let (got, writes) = roundtrip(&pkts);
            assert!(
                got == per_flow(&pkts),
                "round {round}: packets or order changed"
            );
            assert!(writes <= n);
        }
    }
}
