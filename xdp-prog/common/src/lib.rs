//! The contract between flynode's XDP program and its userspace loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding, because the kernel copies map
//! keys and values as raw bytes: a hidden padding byte with a random value would make two
//! equal keys hash differently. Maps are the whole interface between the control plane
//! and the data plane (DESIGN.md), so this file is the one place they are defined.
#![no_std]

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "flynode_xdp";
/// Name of the services map: `ServiceKey -> ServiceValue`.
pub const SERVICES_MAP: &str = "SERVICES";
/// Name of the service addresses map: `AddrKey -> u32` (number of ports served on it).
pub const SERVICE_ADDRS_MAP: &str = "SERVICE_ADDRS";
/// Name of the per-CPU counters array, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Capacity of the services map. A host serves at most this many (address, port) pairs.
pub const MAX_SERVICES: u32 = 16_384;
/// Capacity of the service addresses map.
pub const MAX_SERVICE_ADDRS: u32 = 4_096;

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

/// Key of the services map: a destination address and UDP port that a service answers on.
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
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// The service's id from the routing map; userspace uses it to find the service
    /// without a second lookup by address.
    pub service_id: u32,
    /// Bit set of `SERVICE_FLAG_*`.
    pub flags: u32,
}

/// Deliver datagrams of this service with their PROXY v2 header intact.
pub const SERVICE_FLAG_PROXY_PROTOCOL: u32 = 1 << 0;

/// One slot of the per-CPU counters array. Every frame the program sees increments
/// exactly one counter, so the counters sum to the number of frames; the verdict a
/// counter stands for is given by [`Counter::verdict`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A datagram for a service (address and port both served): handed to userspace.
    UserspaceService = 0,
    /// Not IPv4/IPv6 (ARP, LLDP, a second VLAN tag, ...): passed to the kernel.
    PassNotIp = 1,
    /// IP but not UDP (TCP, ICMP, ...): passed.
    PassNotUdp = 2,
    /// UDP to an address that no service uses: passed (the host's own traffic).
    PassNotService = 3,
    /// An IP fragment: passed so the kernel reassembles it.
    PassFragment = 4,
    /// Shorter than an Ethernet header, or than the 802.1Q tag it announces.
    DropMalformedEthernet = 5,
    /// IPv4 header truncated, IHL below 5, version not 4, or total length that does
    /// not fit the header or the frame.
    DropMalformedIpv4 = 6,
    /// IPv6 header truncated, version not 6, or payload length beyond the frame.
    DropMalformedIpv6 = 7,
    /// UDP header truncated, or UDP length below 8 or beyond the IP payload.
    DropMalformedUdp = 8,
    /// UDP to a service address on a port that no service there answers.
    DropUnknownPort = 9,
}

/// Number of slots in the counters array.
pub const COUNTER_SLOTS: u32 = 10;

/// What the XDP program did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Userspace,
    Pass,
    Drop,
}

impl Counter {
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::UserspaceService,
        Counter::PassNotIp,
        Counter::PassNotUdp,
        Counter::PassNotService,
        Counter::PassFragment,
        Counter::DropMalformedEthernet,
        Counter::DropMalformedIpv4,
        Counter::DropMalformedIpv6,
        Counter::DropMalformedUdp,
        Counter::DropUnknownPort,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Counter::UserspaceService => Verdict::Userspace,
            Counter::PassNotIp
            | Counter::PassNotUdp
            | Counter::PassNotService
            | Counter::PassFragment => Verdict::Pass,
            Counter::DropMalformedEthernet
            | Counter::DropMalformedIpv4
            | Counter::DropMalformedIpv6
            | Counter::DropMalformedUdp
            | Counter::DropUnknownPort => Verdict::Drop,
        }
    }

    /// Stable snake_case name, used in status output and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::UserspaceService => "userspace_service",
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassNotUdp => "pass_not_udp",
            Counter::PassNotService => "pass_not_service",
            Counter::PassFragment => "pass_fragment",
            Counter::DropMalformedEthernet => "drop_malformed_ethernet",
            Counter::DropMalformedIpv4 => "drop_malformed_ipv4",
            Counter::DropMalformedIpv6 => "drop_malformed_ipv6",
            Counter::DropMalformedUdp => "drop_malformed_udp",
            Counter::DropUnknownPort => "drop_unknown_port",
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
