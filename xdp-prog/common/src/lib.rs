//! The contract between flynode's XDP program and its userspace loader.
//!
//! Every type here is `#[repr(C)]` with explicit padding, because the kernel copies map
//! keys and values as raw bytes: a hidden padding byte with a random value would make two
//! equal keys hash differently. Maps are the whole interface between the control plane
//! and the data plane (DESIGN.md), so this file is the one place they are defined.
#![no_std]

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "flynode_xdp";
/// Name of the endpoints table: a one-element array whose value is a [`table::Table`]:
/// every (address, port) this node takes into userspace (service ports and its own
/// WireGuard endpoint(s)) and every service address, as an open-addressing hash table in
/// two halves, and the configuration saying which half is live (see [`table`]).
pub const SERVICE_TABLE_MAP: &str = "SERVICE_TABLE";
/// Name of the AF_XDP socket map: RX queue index -> socket.
pub const XSKS_MAP: &str = "XSKS";
/// Name of the per-CPU counters array, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";

/// The reply-capture program (tc ingress on the interfaces behind which this node's
/// containers live): a UDP datagram from a container's service endpoint is redirected
/// into the mesh TUN, where flynode matches it to its flow; everything else goes on.
pub const REPLY_PROGRAM_NAME: &str = "flynode_reply";
/// Name of its map: [`ServiceKey`] (container address, UDP source port) → the ifindex of
/// the TUN to redirect to.
pub const REPLY_ENDPOINTS_MAP: &str = "REPLY_ENDPOINTS";
/// A node runs at most this many container endpoints (both families).
pub const MAX_REPLY_ENDPOINTS: u32 = 8_192;

/// A host serves at most this many (address, port) pairs (its WireGuard endpoints
/// included).
pub const MAX_SERVICES: u32 = 16_384;
/// A host serves on at most this many distinct service addresses.
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

/// What an endpoint of the table stands for.
///
/// The node's own WireGuard endpoints live in the same table as the services, marked by
/// [`SERVICE_FLAG_WIREGUARD`]: one lookup decides both, and every lookup is a measurable
/// share of the classifier's budget (the benchmark in bench/xdp counts it).
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

/// The endpoints table: an open-addressing hash table (linear probing) laid out in a
/// `BPF_MAP_TYPE_ARRAY`, written by userspace through `mmap` and read by the program.
///
/// Why not a `BPF_MAP_TYPE_HASH`: a hash map lookup is a helper call that hashes the
/// whole key with jhash, about 17-19 ns on this kind of machine (measured by
/// `bench/xdp.sh`, "reference" lines), and the classifier needs up to two of them per
/// datagram, while its whole budget is a few tens of ns. An array lookup is inlined by
/// the verifier into a bounds check and an address computation; the hash is two
/// multiplications.
///
/// The whole table is the single value of a one-element array ([`Table`], 4 MiB): the
/// program makes one map lookup per datagram and reaches the configuration and every
/// slot by address arithmetic from it. Each map lookup is a call as far as LLVM knows
/// (the verifier inlines it only later), and a call clobbers five of the ten BPF
/// registers, so a lookup per probed slot made LLVM spill the key to the stack around
/// every probe.
///
/// Updates never disturb a reader: the table holds two halves of [`SLOTS`] slots; the
/// program reads the half [`Config::active`] names. Userspace builds the new table in
/// the other half, then switches `active` with one store. A half is written again only
/// after an RCU grace period has passed since it stopped being live (every XDP run is
/// an RCU read-side critical section), so no program ever reads a slot mid-write.
///
/// A table is built from scratch for every change (no deletions, no tombstones): a key
/// sits at most [`MAX_PROBES`] - 1 slots after its home slot, and a probe stops at the
/// first empty slot. Userspace picks new seeds if a key would land further away (at a
/// load of at most 31% that is rare, and bounded retries turn it into an error).
pub mod table {
    use super::ServiceValue;

    /// log2 of the slots in one half.
    pub const SLOTS_LOG2: u32 = 16;
    /// Slots in one half: [`super::MAX_SERVICES`] + [`super::MAX_SERVICE_ADDRS`] keys fill
    /// at most 31% of it, which keeps probe sequences short.
    pub const SLOTS: u32 = 1 << SLOTS_LOG2;
    /// Slots in the table: two halves.
    pub const ARRAY_ENTRIES: u32 = 2 * SLOTS;
    /// Longest probe sequence the program walks.
    pub const MAX_PROBES: u32 = 8;
    /// `BPF_F_MMAPABLE`: the maps are written by userspace through `mmap`.
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;

    /// An unused slot (all zero bytes): ends every probe sequence.
    pub const KIND_EMPTY: u16 = 0;
    /// An (address, port) endpoint; `value` says what it is.
    pub const KIND_ENDPOINT: u16 = 1;
    /// A service address (port 0): a datagram to it on a port with no endpoint is
    /// dropped as "unknown port".
    pub const KIND_ADDRESS: u16 = 2;

    /// One slot: 32 bytes, so a slot never straddles two cache lines.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Slot {
        /// The address ([`super::AddrKey`]) as two little-endian 64-bit words, the way
        /// the program loads it from the packet.
        pub addr: [u64; 2],
        /// UDP port as on the wire (see [`super::ServiceKey::port_be`]); 0 for
        /// [`KIND_ADDRESS`].
        pub port_be: u16,
        pub kind: u16,
        pub _pad: u32,
        pub value: ServiceValue,
    }

    /// The value of the one-element `SERVICE_TABLE` array: both halves, then the
    /// configuration. The configuration starts at [`CONFIG_OFFSET`] (4 MiB, a page
    /// boundary), so userspace maps the slots and the configuration separately.
    #[repr(C)]
    pub struct Table {
        pub slots: [Slot; ARRAY_ENTRIES as usize],
        pub config: Config,
    }

    /// Byte offset of [`Table::config`].
    pub const CONFIG_OFFSET: usize = ARRAY_ENTRIES as usize * core::mem::size_of::<Slot>();
    const _: () = assert!(core::mem::offset_of!(Table, config) == CONFIG_OFFSET);
    const _: () = assert!(CONFIG_OFFSET.is_multiple_of(4096));

    /// The table's configuration.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Config {
        /// The live half: 0 or 1 (the program masks it).
        pub active: u32,
        pub _pad: u32,
        /// Hash seeds of each half (odd multipliers; see [`home`]).
        pub seeds: [[u64; 2]; 2],
    }

    /// The 16 bytes of an address as the table's two words.
    #[inline(always)]
    pub const fn addr_words(addr: &[u8; 16]) -> [u64; 2] {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            lo[i] = addr[i];
            hi[i] = addr[8 + i];
            i += 1;
        }
        [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
    }

    /// The second word of an IPv4-mapped address (`::ffff:a.b.c.d`) whose four octets,
    /// in wire order, were loaded as one little-endian `u32`.
    #[inline(always)]
    pub const fn ipv4_word(octets_le: u32) -> u64 {
        0xffff_0000 | ((octets_le as u64) << 32)
    }

    /// Home slot of a key, in `0..SLOTS`: multiply-shift hashing (Dietzfelbinger et al.)
    /// of the key folded to 64 bits with a seed-dependent multiplication, so no two keys
    /// collide for every seed. Keys are ours (the routing map), never chosen by senders,
    /// so the hash only has to spread them; a datagram with any address walks at most
    /// [`MAX_PROBES`] slots.
    #[inline(always)]
    pub const fn home(addr: [u64; 2], port_be: u16, kind: u16, seeds: [u64; 2]) -> u32 {
        let tail = tail(port_be, kind);
        let x =
            (addr[0].wrapping_mul(seeds[0]) ^ addr[1]).wrapping_add(tail.wrapping_mul(seeds[0]));
        (x.wrapping_mul(seeds[1]) >> (64 - SLOTS_LOG2)) as u32
    }

    /// A slot as a probe reads it: a reference into a map or slice, or a copy.
    pub trait SlotRef {
        fn slot(&self) -> &Slot;
    }

    impl SlotRef for &Slot {
        #[inline(always)]
        fn slot(&self) -> &Slot {
            self
        }
    }

    impl SlotRef for Slot {
        #[inline(always)]
        fn slot(&self) -> &Slot {
            self
        }
    }

    /// The probe sequence, the one definition the XDP program and userspace share:
    /// from the key's home slot, at most [`MAX_PROBES`] slots of one half (`slot(i)`
    /// reads slot `i` of it, `0..SLOTS`), stopping at the first empty one.
    #[inline(always)]
    pub fn probe<S: SlotRef>(
        slot: impl Fn(u32) -> Option<S>,
        seeds: [u64; 2],
        addr: [u64; 2],
        port_be: u16,
        kind: u16,
    ) -> Option<S> {
        let tail = tail(port_be, kind);
        let mut index = home(addr, port_be, kind, seeds);
        for _ in 0..MAX_PROBES {
            let s = slot(index & (SLOTS - 1))?;
            let found = s.slot();
            let found_tail = found.tail();
            if found_tail == tail && found.addr[1] == addr[1] && found.addr[0] == addr[0] {
                return Some(s);
            }
            // Only an empty slot has kind 0, and it is all zero.
            if found_tail == 0 {
                return None;
            }
            index = index.wrapping_add(1);
        }
        None
    }

    /// `port_be`, `kind` and the zero padding after them as one little-endian word: the
    /// 8 bytes of a [`Slot`] at offset 16, compared with one load instead of three.
    #[inline(always)]
    pub const fn tail(port_be: u16, kind: u16) -> u64 {
        (port_be as u64) | ((kind as u64) << 16)
    }

    const _: () = assert!(core::mem::offset_of!(Slot, port_be) == 16);
    const _: () = assert!(core::mem::offset_of!(Slot, kind) == 18);
    const _: () = assert!(core::mem::offset_of!(Slot, _pad) == 20);
    #[cfg(not(target_endian = "little"))]
    compile_error!("Slot::tail reads port_be, kind and _pad as one little-endian word");

    impl Slot {
        /// [`tail`] of this slot, read as one 8-byte load.
        #[inline(always)]
        pub fn tail(&self) -> u64 {
            // SAFETY: bytes 16..24 of a `Slot` (checked above) are `port_be`, `kind` and
            // `_pad`, plain integers, 8-aligned because `Slot` is (it holds u64s); the
            // pointer comes from `&self`, so it may read all of the slot.
            unsafe {
                (self as *const Slot)
                    .cast::<u8>()
                    .add(16)
                    .cast::<u64>()
                    .read()
            }
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
    unsafe impl aya::Pod for super::table::Slot {}
    unsafe impl aya::Pod for super::table::Config {}
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
        assert_eq!(core::mem::size_of::<table::Slot>(), 32);
        assert_eq!(core::mem::size_of::<table::Config>(), 40);
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

    /// The program derives the verdict from the slot number (xdp-prog/ebpf, `flynode_xdp`).
    #[test]
    fn counter_slots_are_ordered_by_verdict() {
        for c in Counter::ALL {
            let slot = c as u32;
            let expected = if slot < Counter::SocketService as u32 {
                Verdict::Userspace
            } else if slot < Counter::DropMalformedEthernet as u32 {
                Verdict::Pass
            } else {
                Verdict::Drop
            };
            assert_eq!(c.verdict(), expected, "{c:?}");
        }
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
    fn ipv4_word_is_the_second_word_of_the_mapped_address() {
        let octets = [198, 18, 0, 1];
        let mapped = AddrKey::from_ipv4(octets);
        let words = table::addr_words(&mapped.addr);
        assert_eq!(words[0], 0);
        assert_eq!(words[1], table::ipv4_word(u32::from_le_bytes(octets)));
    }

    #[test]
    fn home_is_in_range_and_depends_on_every_part_of_the_key() {
        let seeds = [0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9];
        let a = table::addr_words(&AddrKey::from_ipv4([198, 18, 0, 1]).addr);
        let b = table::addr_words(&AddrKey::from_ipv4([198, 18, 0, 2]).addr);
        let h = |addr, port: u16, kind| table::home(addr, port.to_be(), kind, seeds);
        assert!(h(a, 53, table::KIND_ENDPOINT) < table::SLOTS);
        assert_ne!(
            h(a, 53, table::KIND_ENDPOINT),
            h(b, 53, table::KIND_ENDPOINT)
        );
        assert_ne!(
            h(a, 53, table::KIND_ENDPOINT),
            h(a, 54, table::KIND_ENDPOINT)
        );
        assert_ne!(h(a, 0, table::KIND_ENDPOINT), h(a, 0, table::KIND_ADDRESS));
        let v6 = [0xfd, 0, 0, 0x72, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let mut other = v6;
        other[3] = 0x73;
        assert_ne!(
            h(table::addr_words(&v6), 53, 1),
            h(table::addr_words(&other), 53, 1)
        );
    }

    #[test]
    fn service_key_port_is_stored_as_on_the_wire() {
        let k = ServiceKey::new(AddrKey::default(), 53);
        let bytes = k.port_be.to_ne_bytes();
        assert_eq!(bytes, [0, 53]);
        assert_eq!(k.port(), 53);
    }
}
