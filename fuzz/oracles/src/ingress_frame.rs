//! `ingress_frame`: the AF_XDP path's frame parser (`flynode::ingress::frame::parse`).
//!
//! Input: one Ethernet frame, as it lies in a UMEM.
//!
//! Properties, for any frame:
//! - a datagram's payload lies inside the frame, right after a UDP header whose ports
//!   and length are the datagram's, and its addresses are the IP header's;
//! - it agrees with the worker's parser (`forward::packet::parse_udp`) on IPv4 and on
//!   IPv6 without extension headers, both ways: one finds a datagram iff the other does,
//!   and the same one;
//! - a datagram written afresh (`packet::write_udp`) into a frame parses back the same.
use std::net::IpAddr;

use flynode::forward::packet;
use flynode::ingress::frame;

pub fn ingress_frame(data: &[u8]) {
    let parsed = frame::parse(data);
    let (ethertype, l3) = match be16(data, 12) {
        Some(0x8100) => (be16(data, 16), 18),
        other => (other, 14),
    };
    let ip = data.get(l3..).unwrap_or_default();

    if let Some(d) = parsed {
        let start = (d.payload.as_ptr() as usize).wrapping_sub(data.as_ptr() as usize);
        assert!(
            start >= l3 + 8 && start + d.payload.len() <= data.len(),
            "payload outside the frame"
        );
        let udp = &data[start - 8..start];
        assert_eq!(be16(udp, 0), Some(d.src.port()), "source port");
        assert_eq!(be16(udp, 2), Some(d.dst.port()), "destination port");
        assert_eq!(
            be16(udp, 4).map(usize::from),
            Some(d.payload.len() + 8),
            "UDP length"
        );
        let (src, dst) = crate::checksum::addresses(ip).expect("an IP header");
        assert_eq!((d.src.ip(), d.dst.ip()), (src, dst), "addresses");
        match (ethertype, ip[0] >> 4, src) {
            (Some(0x0800), 4, IpAddr::V4(_)) | (Some(0x86dd), 6, IpAddr::V6(_)) => {}
            other => panic!("a datagram from ethertype/version/family {other:?}"),
        }
        round_trip(&data[..l3], d);
    }

    // The worker's parser sees IP packets; it reads IPv6 without extension headers only.
    let comparable = match (ethertype, ip.first().map(|b| b >> 4)) {
        (Some(0x0800), Some(4)) => true,
        (Some(0x86dd), Some(6)) => ip.get(6) == Some(&17),
        _ => false,
    };
    if comparable {
        let worker = packet::parse_udp(ip).ok();
        let ours = parsed.map(|d| (d.src, d.dst, d.payload));
        let theirs = worker.map(|u| (u.src, u.dst, u.payload));
        assert_eq!(ours, theirs, "frame parser and worker parser disagree");
    }
}

/// Rebuilds `d` behind the Ethernet header `eth` and parses it again.
fn round_trip(eth: &[u8], d: frame::Datagram<'_>) {
    let mut buf = vec![0u8; eth.len() + 48 + d.payload.len()];
    buf[..eth.len()].copy_from_slice(eth);
    let Some(len) = packet::write_udp(&mut buf[eth.len()..], d.src, d.dst, &[d.payload]) else {
        // Only a datagram too large for one IP packet cannot be rebuilt, and a frame
        // never holds one.
        panic!(
            "a parsed datagram of {} bytes cannot be rebuilt",
            d.payload.len()
        );
    };
    let again = frame::parse(&buf[..eth.len() + len]).expect("rebuilt frame parses");
    assert_eq!(again, d, "rebuilt frame parses to another datagram");
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}
