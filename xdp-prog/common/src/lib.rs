//! The contract between flynode's XDP program and its userspace loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding, because the kernel copies map
//! keys and values as raw bytes: a hidden padding byte with a random value would make two
//! equal keys hash differently. Maps are the whole interface between the control plane
//! and the data plane (DESIGN.md), so this file is the one place they are defined.
#![no_std]

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "flynode_xdp";
/// Name of the endpoints map: `ServiceKey -> ServiceValue`, every (address, port) this
/// node takes into userspace: service ports and its own WireGuard endpoint(s).
pub const SERVICES_MAP: &str = "SERVICES";
/// Name of the service addresses map: `AddrKey -> u32` (number of ports served on it).
pub const SERVICE_ADDRS_MAP: &str = "SERVICE_ADDRS";
/// Name of the AF_XDP socket map: RX queue index -> socket.
pub const XSKS_MAP: &str = "XSKS";
/// Name of the per-CPU counters array, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Capacity of the services map. A host serves at most this many (address, port) pairs.
pub const MAX_SERVICES: u32 = 16_384;
/// Capacity of the service addresses map.
pub const MAX_SERVICE_ADDRS: u32 = 4_096;
/// Capacity of the XSKMAP: the most RX queues a NIC may have for us.
pub const MAX_QUEUES: u32 = 256;
/// Most IPv6 extension headers the program walks before giving a packet to the kernel.
pub const MAX_IPV6_EXT_HEADERS: u32 = 6;

/// An IP address as the XDP program sees it: IPv6 as is, IPv4 mapped into
/// `::ffff:0:0/96` (RFC 4291 §2.5.5.2) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct AddrKey {
    pub addr: [u8; 16],
}

impl AddrKey {
    /// The IPv4-mapped form of `a.b.c.d`, from its four octets in wire order.
    #[inline(always)]
    pub const fn from_ipv4(octets: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2],
                octets[3],
            ],
        }
    }

    #[inline(always)]
    pub const fn from_ipv6(octets: [u8; 16]) -> Self {
        Self { addr: octets }
    }
}

/// Key of the services map: a destination address and UDP port that a service (or the
/// node's WireGuard) answers on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceKey {
    pub addr: AddrKey,
    /// UDP destination port in network byte order, exactly as it appears on the wire, so
    /// the XDP program compares without swapping.
    pub port_be: u16,
    pub _pad: u16,
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: AddrKey, port: u16) -> Self {
        Self {
            addr,
            port_be: port.to_be(),
            _pad: 0,
        }
    }

    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

/// Value of the services map.
///
/// The node's own WireGuard endpoints live in the same hash map as the services, marked
/// by [`SERVICE_FLAG_WIREGUARD`]: one lookup decides both, and every map lookup is a
/// measurable share of the classifier's budget (the benchmark in bench/xdp counts it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ServiceValue {
    /// The service's id from the routing map; userspace uses it to find the service
    /// without a second lookup by address. 0 for a WireGuard endpoint.
    pub service_id: u32,
    /// Bit set of `SERVICE_FLAG_*`.
    pub flags: u32,
}

impl ServiceValue {
    /// The node's own WireGuard endpoint.
    pub const WIREGUARD: ServiceValue = ServiceValue {
        service_id: 0,
        flags: SERVICE_FLAG_WIREGUARD,
    };

    pub const fn service(service_id: u32, flags: u32) -> Self {
        Self { service_id, flags }
    }

    #[inline(always)]
    pub const fn is_wireguard(&self) -> bool {
        self.flags & SERVICE_FLAG_WIREGUARD != 0
    }
}

/// Deliver datagrams of this service with their PROXY v2 header intact.
pub const SERVICE_FLAG_PROXY_PROTOCOL: u32 = 1 << 0;
/// Not a service: the node's own WireGuard endpoint. Only datagrams that can be
/// WireGuard messages go to userspace; others to this (address, port) are dropped.
pub const SERVICE_FLAG_WIREGUARD: u32 = 1 << 1;

/// WireGuard message sizes (the whitepaper, §5.4): what a datagram to our WireGuard
/// endpoint must look like to be handed up.
pub mod wireguard {
    pub const HANDSHAKE_INITIATION: u8 = 1;
    pub const HANDSHAKE_RESPONSE: u8 = 2;
    pub const COOKIE_REPLY: u8 = 3;
    pub const TRANSPORT_DATA: u8 = 4;
    pub const HANDSHAKE_INITIATION_LEN: usize = 148;
    pub const HANDSHAKE_RESPONSE_LEN: usize = 92;
    pub const COOKIE_REPLY_LEN: usize = 64;
    /// Header (16) + authentication tag (16): a keepalive.
    pub const TRANSPORT_DATA_MIN_LEN: usize = 32;

    /// Whether a UDP payload of `len` bytes starting with `head` (its first four bytes)
    /// can be a WireGuard message: a known type, three reserved zero bytes, and the
    /// length that type has. Transport data only has a minimum: the protocol pads the
    /// plaintext to 16 bytes, but boringtun does not pad, so a stricter check would drop
    /// its traffic.
    #[inline(always)]
    pub const fn plausible(head: [u8; 4], len: usize) -> bool {
        if head[1] != 0 || head[2] != 0 || head[3] != 0 {
            return false;
        }
        match head[0] {
            HANDSHAKE_INITIATION => len == HANDSHAKE_INITIATION_LEN,
            HANDSHAKE_RESPONSE => len == HANDSHAKE_RESPONSE_LEN,
            COOKIE_REPLY => len == COOKIE_REPLY_LEN,
            TRANSPORT_DATA => len >= TRANSPORT_DATA_MIN_LEN,
            _ => false,
        }
    }
}

/// One slot of the per-CPU counters array. Every frame the program sees increments
/// exactly one counter, so the counters sum to the number of frames; the verdict a
/// counter stands for is given by [`Counter::verdict`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A datagram for a service (address and port both served): redirected to the
    /// AF_XDP socket of its RX queue.
    UserspaceService = 0,
    /// A WireGuard message to this node's endpoint: redirected to AF_XDP.
    UserspaceWireguard = 1,
    /// A service datagram on an RX queue with no AF_XDP socket (socket fallback, or a
    /// queue not yet bound): passed to the kernel, which delivers it to flynode's UDP
    /// socket for the service.
    SocketService = 2,
    /// A WireGuard message on a queue with no AF_XDP socket: passed to the mesh socket.
    SocketWireguard = 3,
    /// Not IPv4/IPv6 (ARP, LLDP, a second VLAN tag, ...): passed to the kernel.
    PassNotIp = 4,
    /// IP but not UDP (TCP, ICMP, ESP, no next header, ...): passed.
    PassNotUdp = 5,
    /// UDP to an (address, port) that is neither a service address nor our WireGuard
    /// endpoint: passed (the host's own traffic).
    PassNotService = 6,
    /// The first fragment of a fragmented IPv4/IPv6 datagram: passed so the kernel
    /// reassembles it (and delivers the whole datagram to flynode's socket).
    PassFragmentFirst = 7,
    /// A later fragment (offset > 0): no UDP header to classify; passed to reassembly.
    PassFragmentLater = 8,
    /// An IPv6 packet with more extension headers than the program walks
    /// ([`MAX_IPV6_EXT_HEADERS`]): passed; the kernel parses it fully.
    PassIpv6ExtLimit = 9,
    /// Shorter than an Ethernet header, or than the 802.1Q tag it announces.
    DropMalformedEthernet = 10,
    /// IPv4 header truncated, IHL below 5, version not 4, or total length that does
    /// not fit the header or the frame.
    DropMalformedIpv4 = 11,
    /// IPv6 header or an extension header truncated, version not 6, or payload length
    /// beyond the frame.
    DropMalformedIpv6 = 12,
    /// UDP header truncated, or UDP length below 8 or beyond the IP payload.
    DropMalformedUdp = 13,
    /// UDP to a service address on a port that no service there answers.
    DropUnknownPort = 14,
    /// To our WireGuard endpoint, but its size and type cannot be a WireGuard message.
    DropNotWireguard = 15,
}

/// Number of slots in the counters array.
pub const COUNTER_SLOTS: u32 = 16;

/// What the XDP program did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Redirected into an AF_XDP socket.
    Userspace,
    /// `XDP_PASS`: the kernel's stack takes it.
    Pass,
    /// `XDP_DROP`.
    Drop,
}

impl Counter {
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::UserspaceService,
        Counter::UserspaceWireguard,
        Counter::SocketService,
        Counter::SocketWireguard,
        Counter::PassNotIp,
        Counter::PassNotUdp,
        Counter::PassNotService,
        Counter::PassFragmentFirst,
        Counter::PassFragmentLater,
        Counter::PassIpv6ExtLimit,
        Counter::DropMalformedEthernet,
        Counter::DropMalformedIpv4,
        Counter::DropMalformedIpv6,
        Counter::DropMalformedUdp,
        Counter::DropUnknownPort,
        Counter::DropNotWireguard,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Counter::UserspaceService | Counter::UserspaceWireguard => Verdict::Userspace,
            Counter::SocketService
            | Counter::SocketWireguard
            | Counter::PassNotIp
            | Counter::PassNotUdp
            | Counter::PassNotService
            | Counter::PassFragmentFirst
            | Counter::PassFragmentLater
            | Counter::PassIpv6ExtLimit => Verdict::Pass,
            Counter::DropMalformedEthernet
            | Counter::DropMalformedIpv4
            | Counter::DropMalformedIpv6
            | Counter::DropMalformedUdp
            | Counter::DropUnknownPort
            | Counter::DropNotWireguard => Verdict::Drop,
        }
    }

    /// The counter a datagram classified as `self` (a `Userspace*` counter) lands in when
    /// its queue has no AF_XDP socket and the redirect falls back to `XDP_PASS`.
    #[inline(always)]
    pub const fn socket_fallback(self) -> Counter {
        match self {
            Counter::UserspaceWireguard => Counter::SocketWireguard,
            _ => Counter::SocketService,
        }
    }

    /// Stable snake_case name, used in status output and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::UserspaceService => "userspace_service",
            Counter::UserspaceWireguard => "userspace_wireguard",
            Counter::SocketService => "socket_service",
            Counter::SocketWireguard => "socket_wireguard",
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotUdp => "pass_not_udp",
            Counter::PassNotService => "pass_not_service",
            Counter::PassFragmentFirst => "pass_fragment_first",
            Counter::PassFragmentLater => "pass_fragment_later",
            Counter::PassIpv6ExtLimit => "pass_ipv6_ext_limit",
            Counter::DropMalformedEthernet => "drop_malformed_ethernet",
            Counter::DropMalformedIpv4 => "drop_malformed_ipv4",
            Counter::DropMalformedIpv6 => "drop_malformed_ipv6",
            Counter::DropMalformedUdp => "drop_malformed_udp",
            Counter::DropUnknownPort => "drop_unknown_port",
            Counter::DropNotWireguard => "drop_not_wireguard",
        }
    }
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Userspace => "userspace",
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, #[repr(C)], no padding left implicit, every bit pattern valid.
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn counters_cover_every_slot_once_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as u32 as usize, i, "{c:?} is not at its own index");
        }
    }

    #[test]
    fn counter_names_are_unique() {
        let mut names: std::vec::Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
    }

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<AddrKey>(), 16);
        assert_eq!(core::mem::size_of::<ServiceKey>(), 20);
        assert_eq!(core::mem::size_of::<ServiceValue>(), 8);
    }

    #[test]
    fn wireguard_sizes() {
        use wireguard::plausible;
        assert!(plausible([1, 0, 0, 0], 148));
        assert!(!plausible([1, 0, 0, 0], 149));
        assert!(plausible([2, 0, 0, 0], 92));
        assert!(plausible([3, 0, 0, 0], 64));
        assert!(plausible([4, 0, 0, 0], 32));
        assert!(plausible([4, 0, 0, 0], 1440));
        assert!(plausible([4, 0, 0, 0], 136), "boringtun does not pad");
        assert!(!plausible([4, 0, 0, 0], 31));
        assert!(!plausible([4, 0, 0, 0], 16));
        assert!(!plausible([4, 1, 0, 0], 32));
        assert!(!plausible([5, 0, 0, 0], 32));
        assert!(!plausible([0, 0, 0, 0], 32));
    }

    #[test]
    fn socket_fallback_is_a_pass() {
        for c in [Counter::UserspaceService, Counter::UserspaceWireguard] {
            assert_eq!(c.verdict(), Verdict::Userspace);
            assert_eq!(c.socket_fallback().verdict(), Verdict::Pass);
        }
    }

    #[test]
    fn ipv4_is_mapped_into_ipv6() {
        let k = AddrKey::from_ipv4([198, 18, 0, 1]);
        let v6 = core::net::Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped();
        assert_eq!(k.addr, v6.octets());
    }

    #[test]
    fn service_key_port_is_stored_as_on_the_wire() {
        let k = ServiceKey::new(AddrKey::default(), 53);
        let bytes = k.port_be.to_ne_bytes();
        assert_eq!(bytes, [0, 53]);
        assert_eq!(k.port(), 53);
    }
}
