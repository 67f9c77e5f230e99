//! `wireguard_shape`: the XDP program's check of what may be a WireGuard message
//! (`flynode_xdp_common::wireguard::plausible`) against the parser the tunnel runs,
//! boringtun's `Tunn::parse_incoming_packet`.
//!
//! Input: a UDP payload sent to the node's WireGuard port.
//!
//! Property: the program hands a payload to userspace if and only if boringtun parses
//! it. Too strict a check drops peers' traffic in the kernel; too loose one wakes
//! userspace for what boringtun throws away (and breaks WireGuard's silence towards the
//! unauthenticated no sooner). Like the program, the check reads the first four bytes
//! even of a shorter payload (here they are zero).
use boringtun::noise::Tunn;
use flynode_xdp_common::wireguard::plausible;

pub fn wireguard_shape(data: &[u8]) {
    let mut head = [0u8; 4];
    for (h, b) in head.iter_mut().zip(data) {
        *h = *b;
    }
    let ours = plausible(head, data.len());
    let boringtun = Tunn::parse_incoming_packet(data).is_ok();
    assert_eq!(
        ours,
        boringtun,
        "{} bytes starting {head:02x?}: the XDP check says {ours}, boringtun {boringtun}",
        data.len()
    );
}
