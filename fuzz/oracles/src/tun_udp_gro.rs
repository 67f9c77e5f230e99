//! `tun_udp_gro`: the UDP coalescing on TUN writes (`flynode_tunnel::io::tun`'s
//! `udp_gro`, through `flynode_tunnel::fuzzing::UdpCoalescer`).
//!
//! Input: a batch of UDP datagrams, 5 bytes each (see [`Datagram::read`]): version,
//! flow, TTL/hop limit, TOS/traffic class, size, and now and then a packet that cannot
//! coalesce (an IPv4 fragment or options, a DF flag, an IPv6 flow label, a UDP length
//! that does not match). The payload is made here and names the datagram.
//!
//! Properties: every datagram is written exactly once; a lone one unchanged, a
//! super-packet well-formed (virtio header, lengths, IPv4 header checksum, the partial
//! checksum seed, 2..=64 segments, at most 64 KiB). Split again by the TUN reader's own
//! GSO split (`tun_recv`'s path), every segment carries valid checksums, and per flow the
//! datagrams come out in the order they went in, byte for byte (but for the IPv4 ID and
//! header checksum, which the kernel renumbers as the split does).
//!
//! The reproducer of issue 29's reordering (1200 B TTL 64, 1200 B TTL 63, 1000 B TTL 64
//! of one flow written 1200/64, 1000/64, 1200/63) is
//! `fuzz/artifacts/tun_udp_gro/issue-29-reorder-ttl`.
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flynode_tunnel::fuzzing::{Receiver, UdpCoalescer, VIRTIO_NET_HDR_LEN};

use crate::checksum::{self, PROTO_UDP};

const F_NEEDS_CSUM: u8 = 1;
const GSO_UDP_L4: u8 = 5;
const MAX_SEGMENTS: usize = 64;
/// `send_batch` coalesces at most this many packets at once (its `GRO_CHUNK`).
const MAX_PACKETS: usize = 1024;

thread_local! {
    static COALESCER: RefCell<UdpCoalescer> = RefCell::new(UdpCoalescer::new());
    static READER: RefCell<Receiver> = RefCell::new(Receiver::new(128, 65535));
}

/// One datagram of the batch, as the input describes it.
#[derive(Debug, Clone, Copy)]
pub struct Datagram {
    pub v6: bool,
    /// 0..8: source port 1000 + flow, `10.0.0.1 → 10.9.9.9:53` or `[fd00::1] → [fd00::9]:53`.
    pub flow: u8,
    /// 0..=4 plain; 5 cannot be parsed for coalescing (IPv4: MF set; IPv6: UDP length
    /// off by one); 6 IPv4 options / IPv6 flow label 0x12345; 7 IPv4 DF / flow label 1.
    pub variant: u8,
    pub ttl: u8,
    pub tos: u8,
    pub len: u16,
}

impl Datagram {
    /// `[flags][ttl][tos][len: u16 LE]`; flags: bit 0 IPv6, bits 1-3 flow, bits 4-6
    /// variant, bit 7 allows sizes past 1500 (up to 32767).
    pub fn read(b: [u8; 5]) -> Datagram {
        let mut len = u16::from_le_bytes([b[3], b[4]]) & 0x7fff;
        if b[0] & 0x80 == 0 {
            len %= 1501;
        }
        Datagram {
            v6: b[0] & 1 == 1,
            flow: (b[0] >> 1) & 7,
            variant: (b[0] >> 4) & 7,
            ttl: b[1],
            tos: b[2],
            len,
        }
    }

    /// The inverse of [`Datagram::read`].
    pub fn write(&self) -> [u8; 5] {
        let big = if self.len > 1500 { 0x80 } else { 0 };
        let [lo, hi] = self.len.to_le_bytes();
        [
            u8::from(self.v6) | (self.flow & 7) << 1 | (self.variant & 7) << 4 | big,
            self.ttl,
            self.tos,
            lo,
            hi,
        ]
    }

    /// The IP packet, number `index` of the batch.
    pub fn packet(&self, index: usize) -> Vec<u8> {
        let mut payload = vec![index as u8; usize::from(self.len)];
        if let Some(head) = payload.get_mut(..2) {
            head.copy_from_slice(&(index as u16).to_be_bytes());
        }
        let sport = 1000 + u16::from(self.flow);
        let udp_len = 8 + payload.len();
        let (src, dst): (IpAddr, IpAddr) = if self.v6 {
            (
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9).into(),
            )
        } else {
            (
                Ipv4Addr::new(10, 0, 0, 1).into(),
                Ipv4Addr::new(10, 9, 9, 9).into(),
            )
        };
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&payload);
        let mut check =
            !checksum::ones_sum(&udp, checksum::pseudo_header(src, dst, PROTO_UDP, udp_len));
        if check == 0 {
            check = 0xffff;
        }
        udp[6..8].copy_from_slice(&check.to_be_bytes());
        let mut p = Vec::with_capacity(48 + udp_len);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let options = self.variant == 6;
                let hlen = if options { 24 } else { 20 };
                let frag: u16 = match self.variant {
                    5 => 0x2000,
                    7 => 0x4000,
                    _ => 0,
                };
                p.push(0x40 | (hlen / 4) as u8);
                p.push(self.tos);
                p.extend_from_slice(&((hlen + udp_len) as u16).to_be_bytes());
                p.extend_from_slice(&(index as u16).to_be_bytes());
                p.extend_from_slice(&frag.to_be_bytes());
                p.extend_from_slice(&[self.ttl, PROTO_UDP, 0, 0]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                if options {
                    p.extend_from_slice(&[1, 1, 1, 0]); // NOPs, end of options
                }
                let hc = !checksum::ones_sum(&p, 0);
                p[10..12].copy_from_slice(&hc.to_be_bytes());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let label: u32 = match self.variant {
                    6 => 0x12345,
                    7 => 1,
                    _ => 0,
                };
                let word = 6 << 28 | u32::from(self.tos) << 20 | label;
                p.extend_from_slice(&word.to_be_bytes());
                p.extend_from_slice(&(udp_len as u16).to_be_bytes());
                p.extend_from_slice(&[PROTO_UDP, self.ttl]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                if self.variant == 5 {
                    udp[4..6].copy_from_slice(&(udp_len as u16 + 1).to_be_bytes());
                }
            }
            _ => unreachable!("one family"),
        }
        p.extend_from_slice(&udp);
        p
    }
}

/// The datagrams an input describes (at most [`MAX_PACKETS`]).
pub fn datagrams(data: &[u8]) -> Vec<Datagram> {
    data.chunks_exact(5)
        .take(MAX_PACKETS)
        .map(|c| Datagram::read([c[0], c[1], c[2], c[3], c[4]]))
        .collect()
}

/// Packets per flow, in order: the flow is the addresses and ports.
type Flows = BTreeMap<Vec<u8>, Vec<Vec<u8>>>;

pub fn tun_udp_gro(data: &[u8]) {
    let packets: Vec<Vec<u8>> = datagrams(data)
        .iter()
        .enumerate()
        .map(|(i, d)| d.packet(i))
        .collect();
    if packets.is_empty() {
        return;
    }
    let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
    let writes = COALESCER
        .with_borrow_mut(|c| c.coalesce(&refs))
        .expect("every packet goes to the UDP coalescing");
    let mut got = Flows::new();
    let mut written = 0;
    for w in &writes {
        let (hdr, pkt) = w.bytes.split_at(VIRTIO_NET_HDR_LEN);
        let (flags, gso_type) = (hdr[0], hdr[1]);
        let u16_at = |at: usize| u16::from_ne_bytes([hdr[at], hdr[at + 1]]);
        if gso_type == 0 {
            assert_eq!(w.segments, 1);
            assert_eq!(flags, 0, "a lone packet is written as it came");
            got.entry(flow(pkt)).or_default().push(norm(pkt));
            written += 1;
            continue;
        }
        assert_eq!(
            (gso_type, flags),
            (GSO_UDP_L4, F_NEEDS_CSUM),
            "virtio header"
        );
        assert!(
            (2..=MAX_SEGMENTS).contains(&w.segments),
            "{} segments",
            w.segments
        );
        let ip = if pkt[0] >> 4 == 4 {
            assert_eq!(pkt[0], 0x45);
            assert!(pkt.len() <= 65535, "{}-byte IPv4 super-packet", pkt.len());
            assert_eq!(usize::from(u16::from_be_bytes([pkt[2], pkt[3]])), pkt.len());
            assert!(checksum::ipv4_header_ok(&pkt[..20]), "IPv4 header checksum");
            20
        } else {
            assert!(
                pkt.len() - 40 <= 65535,
                "{}-byte IPv6 super-packet",
                pkt.len()
            );
            assert_eq!(
                usize::from(u16::from_be_bytes([pkt[4], pkt[5]])),
                pkt.len() - 40
            );
            40
        };
        let (hdr_len, gso_size, csum_start, csum_offset) =
            (u16_at(2), u16_at(4), u16_at(6), u16_at(8));
        assert_eq!(
            (usize::from(csum_start), csum_offset, usize::from(hdr_len)),
            (ip, 6, ip + 8)
        );
        let udp_len = pkt.len() - ip;
        assert_eq!(
            usize::from(u16::from_be_bytes([pkt[ip + 4], pkt[ip + 5]])),
            udp_len
        );
        let (src, dst) = checksum::addresses(pkt).expect("addresses");
        let seed = checksum::ones_sum(&[], checksum::pseudo_header(src, dst, PROTO_UDP, udp_len));
        assert_eq!(
            u16::from_be_bytes([pkt[ip + 6], pkt[ip + 7]]),
            seed,
            "partial checksum seed"
        );
        assert!(usize::from(gso_size) < udp_len, "gso_size");
        let segments: Vec<Vec<u8>> = READER.with_borrow_mut(|rx| {
            assert!(
                rx.absorb(0, &w.bytes),
                "a super-packet does not fit an empty batch"
            );
            rx.packets().map(<[u8]>::to_vec).collect()
        });
        assert_eq!(
            segments.len(),
            w.segments,
            "the reader splits it differently"
        );
        for s in &segments {
            let (src, dst) = checksum::addresses(s).expect("addresses");
            if ip == 20 {
                assert!(
                    checksum::ipv4_header_ok(&s[..20]),
                    "segment IPv4 header checksum"
                );
            }
            assert!(
                checksum::transport_ok(src, dst, PROTO_UDP, &s[ip..]),
                "segment checksum"
            );
            got.entry(flow(s)).or_default().push(norm(s));
        }
        written += segments.len();
    }
    assert_eq!(written, packets.len(), "every packet written exactly once");
    let mut sent = Flows::new();
    for p in &packets {
        sent.entry(flow(p)).or_default().push(norm(p));
    }
    for (key, want) in &sent {
        let order = |ps: &[Vec<u8>]| -> Vec<Option<u16>> { ps.iter().map(|p| index(p)).collect() };
        let have = got.get(key).cloned().unwrap_or_default();
        assert!(
            &have == want,
            "flow {key:02x?}: packets or their order changed (by batch index: sent {:?}, written {:?})",
            order(want),
            order(&have),
        );
    }
}

/// The batch index a packet's payload starts with ([`Datagram::packet`]).
fn index(p: &[u8]) -> Option<u16> {
    let ip = if p[0] >> 4 == 4 {
        usize::from(p[0] & 0x0f) * 4
    } else {
        40
    };
    let b = p.get(ip + 8..ip + 10)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// A packet's flow: IP version, addresses and ports.
fn flow(p: &[u8]) -> Vec<u8> {
    let (addresses, l4) = if p[0] >> 4 == 4 {
        (&p[12..20], usize::from(p[0] & 0x0f) * 4)
    } else {
        (&p[8..40], 40)
    };
    let mut key = vec![p[0] >> 4];
    key.extend_from_slice(addresses);
    key.extend_from_slice(&p[l4..l4 + 4]);
    key
}

/// A packet as compared: the IPv4 ID and header checksum left out.
fn norm(p: &[u8]) -> Vec<u8> {
    let mut p = p.to_vec();
    if p[0] >> 4 == 4 {
        p[4..6].fill(0);
        p[10..12].fill(0);
    }
    p
}
