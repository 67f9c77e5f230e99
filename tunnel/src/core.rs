//! The sans-IO WireGuard core: peers, own keys, cryptokey routing, key rotation.
//!
//! Nothing here touches a socket or a device. Callers hand in byte buffers (an inner IP
//! packet to encrypt, a UDP datagram to decrypt) and get back what to send where; the
//! [`crate::driver`] moves the bytes. Everything is `&self` so that the encrypting and the
//! decrypting thread can work at once:
//!
//! - The lookup tables (mesh address → peer, public key → peer, session index → slot) are
//!   an immutable snapshot behind an [`ArcSwap`]: the hot path takes no lock to find a
//!   peer. Control operations (peers changed, key rotated, a handshake to a key we had no
//!   session for) build a new snapshot under the `control` mutex and publish it.
//! - Each boringtun [`Tunn`] sits in its own mutex (its methods take `&mut self`), so two
//!   threads contend only when they work on the same peer at the same instant.
//!
//! A *slot* is one [`Tunn`]: one (own static key, peer static key) pair. A peer normally
//! has one slot. During a rotation it has two: the old pair keeps carrying traffic until
//! the new pair's session is confirmed, then traffic moves and the old slot retires.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use parking_lot::{MappedMutexGuard, Mutex, MutexGuard};
use x25519_dalek::{PublicKey, StaticSecret};

mod demand;
#[cfg(test)]
mod tests;

use demand::{Attempt, Demand};

/// WireGuard's per-packet overhead: 16-byte data header and 16-byte tag.
pub const DATA_OVERHEAD: usize = 32;
/// Smallest output buffer `encapsulate` accepts (a handshake initiation is 148 bytes).
pub const MIN_OUT_BUF: usize = 148;
/// Handshake messages per second per own key before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// A retired slot (old key pair) is dropped once the new pair carries traffic and the
/// old one has been silent this long (packets still in flight on the old session).
const RETIRE_IDLE: Duration = Duration::from_secs(3);

const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_HANDSHAKE_RESP: u8 = 2;
const MSG_COOKIE_REPLY: u8 = 3;

/// What the caller knows about a peer (from the routing map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The node's id in the routing map.
    pub name: Arc<str>,
    pub public_key: [u8; 32],
    /// Where to send until the peer roams; `None` for a peer that only dials in.
    pub endpoint: Option<SocketAddr>,
    /// The inner addresses this peer owns (its mesh addresses): packets to them are
    /// encrypted for this peer, and packets from this peer must come from one of them.
    pub allowed: Vec<IpAddr>,
    /// Persistent keepalive interval in seconds (0 = off), sent only while `warm`
    /// (a cold peer answers the other side's; see `demand`).
    pub keepalive: u16,
    /// Keep a session with this peer without traffic (a worker whose liveness the
    /// edge needs); other peers get one when a packet needs it (see `demand`).
    pub warm: bool,
}

/// Why a datagram or packet was dropped. Counted, never logged per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Drop {
    /// Not a WireGuard message (bad type, length).
    Malformed,
    /// A handshake whose MAC1 matches none of our keys.
    BadMac,
    /// A handshake from a static key that is not in the routing map.
    UnknownPeer,
    /// A handshake that failed to authenticate (bad encryption, replayed timestamp).
    HandshakeFailed,
    /// A response, cookie or data message for a session index we do not know.
    UnknownIndex,
    /// A data message that failed to decrypt or was replayed.
    DecryptFailed,
    /// A decrypted packet whose source is not among the peer's allowed addresses.
    SourceNotAllowed,
    /// A decrypted packet that is not a valid IP packet.
    BadInnerPacket,
    /// Handshake under load without a valid cookie and no source address.
    UnderLoad,
    /// An inner packet to an address no peer owns.
    NoRoute,
    /// An inner packet to a peer with no known endpoint.
    NoEndpoint,
    /// Output buffer too small (a bug in the caller; counted, not fatal).
    BufferTooSmall,
}

impl Drop {
    pub const ALL: [Drop; 12] = [
        Drop::Malformed,
        Drop::BadMac,
        Drop::UnknownPeer,
        Drop::HandshakeFailed,
        Drop::UnknownIndex,
        Drop::DecryptFailed,
        Drop::SourceNotAllowed,
        Drop::BadInnerPacket,
        Drop::UnderLoad,
        Drop::NoRoute,
        Drop::NoEndpoint,
        Drop::BufferTooSmall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::BadMac => "bad_mac",
            Drop::UnknownPeer => "unknown_peer",
            Drop::HandshakeFailed => "handshake_failed",
            Drop::UnknownIndex => "unknown_index",
            Drop::DecryptFailed => "decrypt_failed",
            Drop::SourceNotAllowed => "source_not_allowed",
            Drop::BadInnerPacket => "bad_inner_packet",
            Drop::UnderLoad => "under_load",
            Drop::NoRoute => "no_route",
            Drop::NoEndpoint => "no_endpoint",
            Drop::BufferTooSmall => "buffer_too_small",
        }
    }
}

impl fmt::Display for Drop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of [`Core::encapsulate`].
#[derive(Debug, PartialEq, Eq)]
pub enum Encap {
    /// `out[..len]` is a WireGuard message for `dst` (data, or a handshake initiation
    /// when the packet was queued behind a handshake).
    Send {
        dst: SocketAddr,
        len: usize,
    },
    /// Queued inside the session until its handshake completes; nothing to send now.
    Queued,
    Dropped(Drop),
}

/// The result of [`Core::decapsulate`].
#[derive(Debug)]
pub enum Decap {
    /// `out[..len]` is an inner IP packet from `peer`, its source checked against the
    /// peer's allowed addresses.
    Inner {
        peer: Arc<Peer>,
        len: usize,
    },
    /// Handled (handshake, keepalive, cookie); any replies went to the sink.
    Done,
    Dropped(Drop),
}

/// One of this node's static keys.
pub struct OwnKey {
    secret: StaticSecret,
    public: PublicKey,
    /// Outer limiter: checks MAC1 and demands cookies when handshakes flood in.
    limiter: Arc<RateLimiter>,
    /// Handed to this key's [`Tunn`]s: checks MAC1 again but never counts as load (the
    /// outer limiter already did, and counting twice would halve the budget).
    inner_limiter: Arc<RateLimiter>,
}

impl OwnKey {
    pub fn new(secret: StaticSecret) -> OwnKey {
        let public = PublicKey::from(&secret);
        OwnKey {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            inner_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            secret,
            public,
        }
    }

    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

impl fmt::Debug for OwnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnKey")
            .field("public", &fingerprint(&self.public.to_bytes()))
            .finish_non_exhaustive()
    }
}

/// The short form of a key that logs and status print.
pub fn fingerprint(key: &[u8; 32]) -> String {
    flynode_keys::PublicKey::from_bytes(*key).fingerprint()
}

/// Per-peer counters; plain atomics so reading them (status, metrics) never blocks the
/// data path.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub handshakes: AtomicU64,
    /// Unix seconds of the last completed handshake, 0 = never.
    pub last_handshake_unix: AtomicU64,
    pub decrypt_failures: AtomicU64,
}

/// A peer node.
pub struct Peer {
    pub name: Arc<str>,
    config: ArcSwap<PeerConfig>,
    endpoint: ArcSwapOption<SocketAddr>,
    /// All slots of this peer (usually one).
    slots: ArcSwap<Vec<Arc<Slot>>>,
    /// The slot outgoing traffic uses.
    primary: ArcSwap<Slot>,
    pub counters: PeerCounters,
    /// Whether and when it gets a handshake or a keepalive (lazy sessions).
    demand: Demand,
    /// On the timers' list.
    queued: AtomicBool,
    /// No longer in the map (the timers drop it).
    removed: AtomicBool,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.load().as_deref().copied()
    }

    pub fn config(&self) -> Arc<PeerConfig> {
        self.config.load_full()
    }

    fn allows(&self, src: IpAddr) -> bool {
        self.config.load().allowed.contains(&src)
    }
}

/// One boringtun session state machine: (own key, peer key).
struct Slot {
    /// Our 24-bit session index prefix (boringtun uses `index << 8 | n`).
    index: u32,
    own: Arc<OwnKey>,
    peer_key: [u8; 32],
    /// The session state, made on first need and dropped again when a cold peer has
    /// been idle (`None` costs nothing but this word).
    tunn: Mutex<Option<Box<Tunn>>>,
    /// `tunn` is `Some`: read without the lock by the timers, which skip idle peers.
    held: AtomicBool,
    /// Milliseconds since [`Core`] start of the last authenticated packet on this slot.
    last_rx_ms: AtomicU64,
    /// A session on this slot has carried data both ways (boringtun's "current" session).
    confirmed: AtomicBool,
}

impl Slot {
    /// Whether boringtun has a confirmed current session.
    fn has_session(&self) -> bool {
        self.confirmed.load(Relaxed) || {
            let up = self
                .tunn
                .lock()
                .as_ref()
                .is_some_and(|t| t.stats().0.is_some());
            if up {
                self.confirmed.store(true, Relaxed);
            }
            up
        }
    }

    /// The session state, made now if there is none.
    fn tunn(&self) -> MappedMutexGuard<'_, Tunn> {
        MutexGuard::map(self.tunn.lock(), |t| {
            &mut **t.get_or_insert_with(|| self.new_tunn())
        })
    }

    /// Drops the session state (`guard` is this slot's lock, held).
    fn release(&self, guard: &mut Option<Box<Tunn>>) {
        *guard = None;
        self.held.store(false, Relaxed);
        self.confirmed.store(false, Relaxed);
    }

    fn new_tunn(&self) -> Box<Tunn> {
        self.held.store(true, Relaxed);
        // No persistent keepalive inside boringtun: `demand` decides who sends them.
        Box::new(Tunn::new(
            self.own.secret.clone(),
            PublicKey::from(self.peer_key),
            None,
            None,
            self.index,
            Some(Arc::clone(&self.own.inner_limiter)),
        ))
    }
}

/// The immutable lookup tables of one moment.
#[derive(Default)]
struct Tables {
    by_addr: HashMap<IpAddr, Arc<Peer>>,
    /// Current and still-live previous public keys of every peer.
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, (Arc<Peer>, Arc<Slot>)>,
    by_name: HashMap<Arc<str>, Arc<Peer>>,
    peers: Vec<Arc<Peer>>,
}

/// Own keys: the current one and, during a rotation, the previous one.
#[derive(Clone)]
struct Keys {
    current: Arc<OwnKey>,
    previous: Option<Arc<OwnKey>>,
}

/// Global (not per-peer) counters.
#[derive(Debug, Default)]
pub struct CoreCounters {
    drops: [AtomicU64; Drop::ALL.len()],
    pub cookies_sent: AtomicU64,
    /// Handshake initiations sent by the lazy-session timers (not rekeys).
    pub initiations: AtomicU64,
    /// Cold peers' session state dropped after idling.
    pub sessions_released: AtomicU64,
}

impl CoreCounters {
    pub fn drops(&self) -> Vec<(Drop, u64)> {
        Drop::ALL
            .iter()
            .map(|d| (*d, self.drops[*d as usize].load(Relaxed)))
            .collect()
    }

    pub fn get(&self, d: Drop) -> u64 {
        self.drops[d as usize].load(Relaxed)
    }

    fn count(&self, d: Drop) {
        self.drops[d as usize].fetch_add(1, Relaxed);
    }
}

/// Summary of what [`Core::set_peers`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeersDiff {
    pub added: Vec<Arc<str>>,
    pub removed: Vec<Arc<str>>,
    /// Peers whose public key changed (a handshake to the new key has started).
    pub rekeyed: Vec<Arc<str>>,
    /// Peers whose endpoint or allowed addresses changed.
    pub updated: Vec<Arc<str>>,
}

impl PeersDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.rekeyed.is_empty()
            && self.updated.is_empty()
    }
}

/// How far a key rotation has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationProgress {
    /// Peers whose traffic uses a session on our current key.
    pub moved: usize,
    pub total: usize,
}

/// A peer as status and metrics see it.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub name: Arc<str>,
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub allowed: Vec<IpAddr>,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub handshakes: u64,
    pub last_handshake_unix: Option<u64>,
    pub decrypt_failures: u64,
    /// The own public key the outgoing session uses.
    pub own_key: [u8; 32],
    /// Whether the outgoing slot has a confirmed session.
    pub session_up: bool,
    /// Number of slots (2 while a key change is in flight).
    pub slots: usize,
    /// Kept up without traffic (see `demand`).
    pub warm: bool,
    /// Holds session state now (a cold peer's is dropped when idle).
    pub active: bool,
    /// Handshake attempts that went unanswered, ever.
    pub handshake_failures: u64,
    /// How long it has not answered (since its first unanswered attempt), if it has not
    /// had a session since.
    pub unreachable_secs: Option<u64>,
}

/// What [`Core::unreachable`] sums up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unreachable {
    pub peers: usize,
    /// The one that has not answered the longest, and for how long.
    pub oldest: Option<Arc<str>>,
    pub oldest_secs: u64,
    /// Unanswered handshake attempts of all peers, ever.
    pub failures: u64,
}

/// The sans-IO mesh core.
pub struct Core {
    tables: ArcSwap<Tables>,
    keys: ArcSwap<Keys>,
    /// Serializes every change to `tables`/`keys` (never taken on the data path except
    /// when a handshake arrives for a key pair that has no slot yet).
    control: Mutex<()>,
    next_index: AtomicU32,
    retire_idle_ms: AtomicU64,
    idle_release_ms: AtomicU64,
    /// The peers the timers visit (see [`Core::activate`]).
    active: Mutex<Vec<Arc<Peer>>>,
    /// Added to the clock (tests move time forward with it).
    clock_offset_ms: AtomicU64,
    pub counters: CoreCounters,
}

impl Core {
    pub fn new(own: StaticSecret) -> Core {
        let mut seed = [0u8; 4];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        Core {
            tables: ArcSwap::from_pointee(Tables::default()),
            keys: ArcSwap::from_pointee(Keys {
                current: Arc::new(OwnKey::new(own)),
                previous: None,
            }),
            control: Mutex::new(()),
            next_index: AtomicU32::new(u32::from_le_bytes(seed) & 0x00ff_ffff),
            retire_idle_ms: AtomicU64::new(RETIRE_IDLE.as_millis() as u64),
            idle_release_ms: AtomicU64::new(demand::IDLE_RELEASE_MS),
            active: Mutex::new(Vec::new()),
            clock_offset_ms: AtomicU64::new(0),
            counters: CoreCounters::default(),
        }
    }

    /// How long a superseded key pair must be silent before it is dropped (tests
    /// shorten it).
    pub fn set_retire_idle(&self, idle: Duration) {
        self.retire_idle_ms.store(idle.as_millis() as u64, Relaxed);
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.keys.load().current.public()
    }

    pub fn previous_public_key(&self) -> Option<[u8; 32]> {
        self.keys.load().previous.as_ref().map(|k| k.public())
    }

    /// How long a cold peer's session state lives without traffic (tests shorten it).
    pub fn set_idle_release(&self, idle: Duration) {
        self.idle_release_ms.store(idle.as_millis() as u64, Relaxed);
    }

    fn now_ms(&self) -> u64 {
        crate::clock::coarse_ms() + self.clock_offset_ms.load(Relaxed)
    }

    /// Moves the core's clock forward (tests of timers).
    #[cfg(test)]
    fn advance(&self, by: Duration) {
        self.clock_offset_ms
            .fetch_add(by.as_millis() as u64, Relaxed);
    }

    /// Allocates a fresh 24-bit session index not in `used`, and marks it used.
    fn alloc_index(&self, used: &mut HashSet<u32>) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Relaxed) & 0x00ff_ffff;
            if used.insert(i) {
                return i;
            }
        }
    }

    fn used_indices(&self) -> HashSet<u32> {
        self.tables.load().by_index.keys().copied().collect()
    }

    fn new_slot(
        &self,
        used: &mut HashSet<u32>,
        own: &Arc<OwnKey>,
        peer_key: [u8; 32],
    ) -> Arc<Slot> {
        let index = self.alloc_index(used);
        Arc::new(Slot {
            index,
            own: Arc::clone(own),
            peer_key,
            tunn: Mutex::new(None),
            held: AtomicBool::new(false),
            last_rx_ms: AtomicU64::new(self.now_ms()),
            confirmed: AtomicBool::new(false),
        })
    }

    /// Rebuilds the lookup tables from a peer list (slots come from each peer).
    fn publish(&self, peers: Vec<Arc<Peer>>) {
        let mut t = Tables::default();
        for peer in &peers {
            t.by_name.insert(Arc::clone(&peer.name), Arc::clone(peer));
            for addr in &peer.config.load().allowed {
                t.by_addr.insert(*addr, Arc::clone(peer));
            }
            for slot in peer.slots.load().iter() {
                t.by_key.insert(slot.peer_key, Arc::clone(peer));
                t.by_index
                    .insert(slot.index, (Arc::clone(peer), Arc::clone(slot)));
            }
        }
        t.peers = peers;
        self.tables.store(Arc::new(t));
    }

    /// Makes the peer set equal to `wanted`: new peers get a slot on our current key,
    /// removed peers lose every session, a changed public key starts a handshake to the
    /// new key while the old session keeps carrying traffic. Returns what changed; the
    /// handshake initiations for rekeyed peers are sent through `net`.
    pub fn set_peers(
        &self,
        wanted: Vec<PeerConfig>,
        scratch: &mut [u8],
        net: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> PeersDiff {
        let _guard = self.control.lock();
        let old = self.tables.load_full();
        let keys = self.keys.load_full();
        let mut used = self.used_indices();
        let mut diff = PeersDiff::default();
        let mut existing: HashMap<&str, &Arc<Peer>> =
            old.peers.iter().map(|p| (&*p.name, p)).collect();
        let mut peers = Vec::with_capacity(wanted.len());
        for cfg in wanted {
            let Some(peer) = existing.remove(&*cfg.name) else {
                let slot = self.new_slot(&mut used, &keys.current, cfg.public_key);
                diff.added.push(Arc::clone(&cfg.name));
                peers.push(Arc::new(Peer {
                    name: Arc::clone(&cfg.name),
                    endpoint: ArcSwapOption::from_pointee(cfg.endpoint),
                    demand: Demand::new(cfg.warm, u64::from(slot.index)),
                    queued: AtomicBool::new(false),
                    removed: AtomicBool::new(false),
                    slots: ArcSwap::from_pointee(vec![Arc::clone(&slot)]),
                    primary: ArcSwap::new(slot),
                    counters: PeerCounters::default(),
                    config: ArcSwap::from_pointee(cfg),
                }));
                continue;
            };
            let before = peer.config.load_full();
            if *before == cfg {
                peers.push(Arc::clone(peer));
                continue;
            }
            peer.demand.set_warm(cfg.warm);
            if before.endpoint != cfg.endpoint {
                // The map's endpoint wins over a roamed one only when the map changed.
                peer.endpoint.store(cfg.endpoint.map(Arc::new));
            }
            if before.public_key != cfg.public_key {
                diff.rekeyed.push(Arc::clone(&cfg.name));
                let primary = peer.primary.load_full();
                let slots = peer.slots.load_full();
                if !slots
                    .iter()
                    .any(|s| s.peer_key == cfg.public_key && Arc::ptr_eq(&s.own, &primary.own))
                {
                    // A new slot for the new key; the old one keeps carrying traffic
                    // until the new session is confirmed.
                    let slot = self.new_slot(&mut used, &primary.own, cfg.public_key);
                    let mut next: Vec<Arc<Slot>> = slots.iter().cloned().collect();
                    next.push(Arc::clone(&slot));
                    peer.slots.store(Arc::new(next));
                    peer.config.store(Arc::new(cfg));
                    // Only a session in use, or a warm peer, needs the new key pair
                    // now; an idle cold peer meets it at its next packet.
                    if peer.demand.warm() || primary.has_session() {
                        initiate(peer, &slot, scratch, net);
                    }
                    peers.push(Arc::clone(peer));
                    continue;
                }
            } else {
                diff.updated.push(Arc::clone(&cfg.name));
            }
            peer.config.store(Arc::new(cfg));
            peers.push(Arc::clone(peer));
        }
        for gone in existing.values() {
            gone.removed.store(true, Relaxed);
        }
        diff.removed = existing.into_keys().map(Arc::from).collect();
        diff.added.sort();
        diff.removed.sort();
        let now = self.now_ms();
        for peer in &peers {
            if self.busy(peer, now) {
                self.activate(peer);
            }
        }
        self.publish(peers);
        diff
    }

    /// Adopts `new` as the current key; the old current key stays valid (it answers
    /// handshakes and keeps its sessions) until [`Core::wipe_previous_key`]. Sessions on
    /// the new key start when peers, having learned the new public key, handshake to it.
    /// A rotation while one is in flight wipes the older previous key first.
    pub fn rotate_key(&self, new: StaticSecret) {
        let _guard = self.control.lock();
        let keys = self.keys.load_full();
        let next = Keys {
            current: Arc::new(OwnKey::new(new)),
            previous: Some(Arc::clone(&keys.current)),
        };
        if let Some(older) = &keys.previous {
            self.drop_slots_of(older);
        }
        self.keys.store(Arc::new(next));
    }

    /// Restores a rotation in flight after a restart: `previous` stays valid next to the
    /// current key.
    pub fn set_previous_key(&self, previous: StaticSecret) {
        let _guard = self.control.lock();
        let keys = self.keys.load_full();
        self.keys.store(Arc::new(Keys {
            current: Arc::clone(&keys.current),
            previous: Some(Arc::new(OwnKey::new(previous))),
        }));
    }

    /// Forgets the previous key: its sessions end, handshakes to it fail.
    pub fn wipe_previous_key(&self) {
        let _guard = self.control.lock();
        let keys = self.keys.load_full();
        if let Some(prev) = &keys.previous {
            self.drop_slots_of(prev);
            self.keys.store(Arc::new(Keys {
                current: Arc::clone(&keys.current),
                previous: None,
            }));
        }
    }

    /// Removes every slot using `own` (control lock held). A peer left without a slot
    /// gets a fresh one on the current key.
    fn drop_slots_of(&self, own: &Arc<OwnKey>) {
        let tables = self.tables.load_full();
        let keys = self.keys.load_full();
        let mut used = self.used_indices();
        for peer in &tables.peers {
            let slots: Vec<Arc<Slot>> = peer
                .slots
                .load()
                .iter()
                .filter(|s| !Arc::ptr_eq(&s.own, own))
                .cloned()
                .collect();
            let slots = if slots.is_empty() {
                let cfg = peer.config.load();
                vec![self.new_slot(&mut used, &keys.current, cfg.public_key)]
            } else {
                slots
            };
            if !slots.iter().any(|s| Arc::ptr_eq(s, &peer.primary.load())) {
                peer.primary
                    .store(best_slot(&slots, &peer.config.load().public_key));
            }
            peer.slots.store(Arc::new(slots));
        }
        self.publish(tables.peers.clone());
    }

    /// How many peers already talk to us on our current key.
    pub fn rotation_progress(&self) -> RotationProgress {
        let keys = self.keys.load();
        let tables = self.tables.load();
        let moved = tables
            .peers
            .iter()
            .filter(|p| {
                p.slots
                    .load()
                    .iter()
                    .any(|s| Arc::ptr_eq(&s.own, &keys.current) && s.has_session())
            })
            .count();
        RotationProgress {
            moved,
            total: tables.peers.len(),
        }
    }

    /// Encrypts an inner IP packet for the peer that owns its destination address.
    /// `out` must hold `packet.len() + 32` and at least 148 bytes.
    pub fn encapsulate(&self, packet: &[u8], out: &mut [u8]) -> Encap {
        self.encapsulate_routed(packet, out)
            .unwrap_or_else(|| self.no_route())
    }

    /// Like [`Self::encapsulate`], but a packet whose destination no peer owns is
    /// returned as `None`, not counted: the caller has another use for it.
    pub fn encapsulate_routed(&self, packet: &[u8], out: &mut [u8]) -> Option<Encap> {
        let dst = Tunn::dst_address(packet)?;
        let tables = self.tables.load();
        let peer = tables.by_addr.get(&dst)?;
        Some(self.encapsulate_for(peer, packet, out))
    }

    /// Counts a packet dropped for want of a peer owning its destination.
    pub fn no_route(&self) -> Encap {
        self.drop_tx(Drop::NoRoute)
    }

    /// Encrypts an inner IP packet for a named peer (the forwarding layer knows the node
    /// it wants, not only an address).
    pub fn encapsulate_to(&self, name: &str, packet: &[u8], out: &mut [u8]) -> Encap {
        let tables = self.tables.load();
        match tables.by_name.get(name) {
            Some(peer) => self.encapsulate_for(peer, packet, out),
            None => self.drop_tx(Drop::NoRoute),
        }
    }

    /// The peer a name refers to, for callers that send many packets to it.
    pub fn peer(&self, name: &str) -> Option<Arc<Peer>> {
        self.tables.load().by_name.get(name).cloned()
    }

    pub fn encapsulate_for(&self, peer: &Peer, packet: &[u8], out: &mut [u8]) -> Encap {
        if out.len() < (packet.len() + DATA_OVERHEAD).max(MIN_OUT_BUF) {
            return self.drop_tx(Drop::BufferTooSmall);
        }
        let Some(dst) = peer.endpoint() else {
            return self.drop_tx(Drop::NoEndpoint);
        };
        let mut slot = peer.primary.load();
        // While a newer key pair is being negotiated the primary is the old, working
        // one; nothing to do here. If the primary has no session but another slot does
        // (the peer rekeyed and the old pair still works), use that one meanwhile.
        if !slot.has_session()
            && let Some(other) = peer
                .slots
                .load()
                .iter()
                .find(|s| !Arc::ptr_eq(s, &slot) && s.has_session())
        {
            slot = arc_swap::Guard::from_inner(Arc::clone(other));
        }
        let now = self.now_ms();
        self.activate_named(peer);
        let result = slot.tunn().encapsulate(packet, out);
        match result {
            TunnResult::WriteToNetwork(msg) => {
                let len = msg.len();
                if out[0] == MSG_HANDSHAKE_INIT {
                    // No session: boringtun queued the packet behind a handshake. It
                    // goes out unless the peer is in backoff; then the packet waits
                    // for the timers' next attempt.
                    peer.demand.needed(now);
                    if !peer.demand.may_initiate(now) {
                        return Encap::Queued;
                    }
                    peer.demand.initiated(now);
                } else if len == packet.len() + DATA_OVERHEAD && out[0] == 4 {
                    peer.demand.data(now);
                    peer.counters.tx_packets.fetch_add(1, Relaxed);
                    peer.counters
                        .tx_bytes
                        .fetch_add(packet.len() as u64, Relaxed);
                }
                Encap::Send { dst, len }
            }
            TunnResult::Done => {
                // Queued behind a handshake in flight.
                peer.demand.needed(now);
                Encap::Queued
            }
            TunnResult::Err(_) => self.drop_tx(Drop::BufferTooSmall),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => Encap::Queued,
        }
    }

    fn drop_tx(&self, d: Drop) -> Encap {
        self.counters.count(d);
        Encap::Dropped(d)
    }

    fn drop_rx(&self, d: Drop) -> Decap {
        self.counters.count(d);
        Decap::Dropped(d)
    }

    /// Processes one UDP datagram from `src`. Plaintext lands in `out` (which must be at
    /// least as long as the datagram); handshake replies, cookies and packets that were
    /// queued behind a handshake go to `net`.
    pub fn decapsulate(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        net: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Decap {
        let packet = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.drop_rx(Drop::Malformed),
        };
        let (peer, slot) = match packet {
            Packet::HandshakeInit(ref init) => {
                match self.route_initiation(src, datagram, init, out, net) {
                    Ok(found) => found,
                    Err(decap) => return decap,
                }
            }
            Packet::HandshakeResponse(ref p) => match self.by_index(p.receiver_idx) {
                Some(found) => found,
                None => return self.drop_rx(Drop::UnknownIndex),
            },
            Packet::PacketCookieReply(ref p) => match self.by_index(p.receiver_idx) {
                Some(found) => found,
                None => return self.drop_rx(Drop::UnknownIndex),
            },
            Packet::PacketData(ref p) => match self.by_index(p.receiver_idx) {
                Some(found) => found,
                None => return self.drop_rx(Drop::UnknownIndex),
            },
        };
        let msg_type = datagram[0];
        self.activate(&peer);
        let mut tunn = slot.tunn();
        match tunn.decapsulate(Some(src.ip()), datagram, out) {
            TunnResult::WriteToNetwork(reply) => {
                let reply_type = reply.first().copied();
                net(src, reply);
                if reply_type == Some(MSG_COOKIE_REPLY) {
                    // Under load: we asked for a cookie; nothing was authenticated.
                    self.counters.cookies_sent.fetch_add(1, Relaxed);
                    return Decap::Done;
                }
                // A handshake (init → our response, or response → our keepalive) is
                // complete: flush what queued behind it.
                let mut flushed = (0u64, 0u64);
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], out) {
                    if queued.first() == Some(&4) {
                        flushed.0 += 1;
                        flushed.1 += (queued.len() - DATA_OVERHEAD) as u64;
                    }
                    net(src, queued);
                }
                drop(tunn);
                self.authenticated(&peer, &slot, src);
                if msg_type == MSG_HANDSHAKE_RESP || msg_type == MSG_HANDSHAKE_INIT {
                    // Packets that queued behind the handshake and just left are counted
                    // here (they bypassed `encapsulate_for`'s count).
                    peer.counters.tx_packets.fetch_add(flushed.0, Relaxed);
                    peer.counters.tx_bytes.fetch_add(flushed.1, Relaxed);
                }
                if msg_type == MSG_HANDSHAKE_INIT || msg_type == MSG_HANDSHAKE_RESP {
                    peer.counters.handshakes.fetch_add(1, Relaxed);
                    peer.counters.last_handshake_unix.store(unix_now(), Relaxed);
                }
                if msg_type == MSG_HANDSHAKE_RESP {
                    // We initiated and it completed: this slot now has a session.
                    slot.confirmed.store(true, Relaxed);
                    self.consider_primary(&peer, &slot);
                }
                Decap::Done
            }
            TunnResult::WriteToTunnelV4(plain, src_ip) => {
                let len = plain.len();
                drop(tunn);
                self.inner(peer, &slot, src, IpAddr::V4(src_ip), len)
            }
            TunnResult::WriteToTunnelV6(plain, src_ip) => {
                let len = plain.len();
                drop(tunn);
                self.inner(peer, &slot, src, IpAddr::V6(src_ip), len)
            }
            TunnResult::Done => {
                drop(tunn);
                if msg_type != MSG_COOKIE_REPLY {
                    // A keepalive: authenticated data.
                    self.authenticated(&peer, &slot, src);
                    self.confirm(&peer, &slot);
                    peer.demand.keepalive_received(self.now_ms());
                }
                Decap::Done
            }
            TunnResult::Err(e) => {
                drop(tunn);
                let d = match e {
                    WireGuardError::InvalidAeadTag
                    | WireGuardError::InvalidCounter
                    | WireGuardError::DuplicateCounter
                    | WireGuardError::NoCurrentSession => {
                        peer.counters.decrypt_failures.fetch_add(1, Relaxed);
                        Drop::DecryptFailed
                    }
                    WireGuardError::InvalidPacket | WireGuardError::IncorrectPacketLength => {
                        if msg_type == 4 {
                            Drop::BadInnerPacket
                        } else {
                            Drop::Malformed
                        }
                    }
                    WireGuardError::UnderLoad => Drop::UnderLoad,
                    WireGuardError::DestinationBufferTooSmall => Drop::BufferTooSmall,
                    WireGuardError::WrongIndex if msg_type == 4 => Drop::UnknownIndex,
                    other => {
                        // Includes a response that lost a simultaneous-initiation race
                        // (UnexpectedPacket): harmless, the other handshake wins.
                        tracing::trace!(error = ?other, "handshake failed");
                        Drop::HandshakeFailed
                    }
                };
                self.drop_rx(d)
            }
        }
    }

    fn inner(
        &self,
        peer: Arc<Peer>,
        slot: &Arc<Slot>,
        src: SocketAddr,
        inner_src: IpAddr,
        len: usize,
    ) -> Decap {
        // Authenticated even if the inner source is wrong: the peer has the key.
        self.authenticated(&peer, slot, src);
        self.confirm(&peer, slot);
        if !peer.allows(inner_src) {
            return self.drop_rx(Drop::SourceNotAllowed);
        }
        peer.demand.data(self.now_ms());
        peer.counters.rx_packets.fetch_add(1, Relaxed);
        peer.counters.rx_bytes.fetch_add(len as u64, Relaxed);
        Decap::Inner { peer, len }
    }

    /// Roaming: the endpoint follows the last authenticated packet.
    fn authenticated(&self, peer: &Peer, slot: &Slot, src: SocketAddr) {
        slot.last_rx_ms.store(self.now_ms(), Relaxed);
        if peer.endpoint() != Some(src) {
            peer.endpoint.store(Some(Arc::new(src)));
        }
    }

    /// Data arrived on `slot`: its session is confirmed in both directions.
    fn confirm(&self, peer: &Peer, slot: &Arc<Slot>) {
        if !slot.confirmed.load(Relaxed) {
            slot.confirmed.store(true, Relaxed);
            self.consider_primary(peer, slot);
        }
    }

    /// Moves outgoing traffic to `slot` if it is a better key pair than the primary:
    /// our current key over the previous one, the peer's configured key over an old one.
    fn consider_primary(&self, peer: &Peer, slot: &Arc<Slot>) {
        let primary = peer.primary.load();
        if Arc::ptr_eq(&primary, slot) {
            return;
        }
        let keys = self.keys.load();
        let peer_key = peer.config.load().public_key;
        let rank = |s: &Slot| {
            (
                Arc::ptr_eq(&s.own, &keys.current) as u8,
                (s.peer_key == peer_key) as u8,
            )
        };
        if rank(slot) > rank(&primary) || !primary.has_session() {
            peer.primary.store(Arc::clone(slot));
        }
    }

    fn by_index(&self, receiver_idx: u32) -> Option<(Arc<Peer>, Arc<Slot>)> {
        self.tables
            .load()
            .by_index
            .get(&(receiver_idx >> 8))
            .cloned()
    }

    /// Finds (or creates) the slot a handshake initiation is for: which of our keys it
    /// is addressed to (MAC1, checked by the rate limiter, which also demands a cookie
    /// under load), then who sent it (decrypting the initiator's static key).
    fn route_initiation(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        init: &boringtun::noise::HandshakeInit,
        out: &mut [u8],
        net: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Result<(Arc<Peer>, Arc<Slot>), Decap> {
        let keys = self.keys.load_full();
        let mut own = None;
        for key in std::iter::once(&keys.current).chain(keys.previous.as_ref()) {
            match key.limiter.verify_packet(Some(src.ip()), datagram, out) {
                Ok(_) => {
                    own = Some(key);
                    break;
                }
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    net(src, cookie);
                    self.counters.cookies_sent.fetch_add(1, Relaxed);
                    return Err(Decap::Done);
                }
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => continue,
                Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                    return Err(self.drop_rx(Drop::UnderLoad));
                }
                Err(_) => return Err(self.drop_rx(Drop::Malformed)),
            }
        }
        let Some(own) = own else {
            return Err(self.drop_rx(Drop::BadMac));
        };
        let half = parse_handshake_anon(&own.secret, &own.public, init)
            .map_err(|_| self.drop_rx(Drop::HandshakeFailed))?;
        let tables = self.tables.load();
        let Some(peer) = tables.by_key.get(&half.peer_static_public) else {
            return Err(self.drop_rx(Drop::UnknownPeer));
        };
        if let Some(slot) = peer
            .slots
            .load()
            .iter()
            .find(|s| Arc::ptr_eq(&s.own, own) && s.peer_key == half.peer_static_public)
        {
            return Ok((Arc::clone(peer), Arc::clone(slot)));
        }
        // First handshake for this key pair (a peer moving to our new key, or to its
        // own new key before our map says so): add a slot.
        let peer = Arc::clone(peer);
        drop(tables);
        let _guard = self.control.lock();
        let tables = self.tables.load_full();
        if !tables.peers.iter().any(|p| Arc::ptr_eq(p, &peer)) {
            return Err(self.drop_rx(Drop::UnknownPeer));
        }
        if let Some(slot) = peer
            .slots
            .load()
            .iter()
            .find(|s| Arc::ptr_eq(&s.own, own) && s.peer_key == half.peer_static_public)
        {
            return Ok((Arc::clone(&peer), Arc::clone(slot)));
        }
        let mut used = self.used_indices();
        let slot = self.new_slot(&mut used, own, half.peer_static_public);
        let mut slots: Vec<Arc<Slot>> = peer.slots.load().iter().cloned().collect();
        slots.push(Arc::clone(&slot));
        peer.slots.store(Arc::new(slots));
        self.publish(tables.peers.clone());
        Ok((peer, slot))
    }

    /// Drives boringtun's timers (rekey, keepalive, retransmit, expiry) for every slot,
    /// resets the handshake rate limiters once a second, and retires old key pairs whose
    /// replacement carries traffic. Call every ~100-250 ms.
    pub fn update_timers(&self, scratch: &mut [u8], net: &mut dyn FnMut(SocketAddr, &[u8])) {
        let keys = self.keys.load_full();
        keys.current.limiter.reset_count();
        if let Some(p) = &keys.previous {
            p.limiter.reset_count();
        }
        let now = self.now_ms();
        let mut retire = false;
        // Only the peers with something going on (see `activate`): a large map's idle
        // peers cost the timers nothing, not even a visit.
        let mut active = std::mem::take(&mut *self.active.lock());
        active.retain(|peer| {
            if !peer.removed.load(Relaxed) {
                self.tick(peer, now, &mut retire, scratch, net);
                if self.busy(peer, now) {
                    return true;
                }
            }
            peer.queued.store(false, Relaxed);
            // Something may have made it busy since the check: then it stays (or was
            // queued again by whoever did, and is in the list already).
            !peer.removed.load(Relaxed) && self.busy(peer, now) && !peer.queued.swap(true, Relaxed)
        });
        self.active.lock().append(&mut active);
        if retire {
            self.retire_slots();
        }
    }

    /// One peer's timers, every key pair of it.
    fn tick(
        &self,
        peer: &Peer,
        now: u64,
        retire: &mut bool,
        scratch: &mut [u8],
        net: &mut dyn FnMut(SocketAddr, &[u8]),
    ) {
        let primary = peer.primary.load_full();
        for slot in peer.slots.load().iter() {
            let is_primary = Arc::ptr_eq(slot, &primary);
            if !is_primary && primary.has_session() {
                // Superseded: keep it only while packets still arrive on it, and let it
                // neither keepalive nor rekey.
                if now.saturating_sub(slot.last_rx_ms.load(Relaxed))
                    >= self.retire_idle_ms.load(Relaxed)
                {
                    *retire = true;
                }
                continue;
            }
            let Some(dst) = peer.endpoint() else { continue };
            if is_primary {
                self.drive(peer, slot, dst, now, scratch, net);
                continue;
            }
            // A key pair being negotiated next to a primary without a session.
            let mut guard = slot.tunn.lock();
            let Some(tunn) = guard.as_mut() else { continue };
            match tunn.update_timers(scratch) {
                TunnResult::WriteToNetwork(msg) => net(dst, msg),
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    slot.confirmed.store(false, Relaxed);
                }
                _ => {}
            }
        }
    }

    /// Whether a peer needs its timers: it holds session state, has a second key pair,
    /// or is wanted (warm, or asked for by a packet).
    fn busy(&self, peer: &Peer, now: u64) -> bool {
        let slots = peer.slots.load();
        slots.len() > 1 || slots.iter().any(|s| s.held.load(Relaxed)) || peer.demand.wanted(now)
    }

    /// Puts a peer that something just made busy on the timers' list (once).
    fn activate(&self, peer: &Arc<Peer>) {
        if !peer.queued.load(Relaxed) && !peer.queued.swap(true, Relaxed) {
            self.active.lock().push(Arc::clone(peer));
        }
    }

    /// [`Self::activate`] for a caller holding the peer by reference only.
    fn activate_named(&self, peer: &Peer) {
        if !peer.queued.load(Relaxed)
            && let Some(p) = self.tables.load().by_name.get(&peer.name)
        {
            self.activate(p);
        }
    }

    /// The timers of a peer's primary key pair (see `demand`): boringtun's own (rekey,
    /// passive keepalive, expiry) while there is a session, our keepalive, letting an
    /// idle cold peer go; without a session, one handshake per attempt for a peer that
    /// is wanted, with backoff, and nothing at all for one that is not.
    fn drive(
        &self,
        peer: &Peer,
        slot: &Slot,
        dst: SocketAddr,
        now: u64,
        scratch: &mut [u8],
        net: &mut dyn FnMut(SocketAddr, &[u8]),
    ) {
        let demand = &peer.demand;
        let idle_release = self.idle_release_ms.load(Relaxed);
        let mut guard = slot.tunn.lock();
        let session = guard.as_ref().is_some_and(|t| t.stats().0.is_some());
        if let (true, Some(tunn)) = (session, guard.as_mut()) {
            demand.reachable();
            match tunn.update_timers(scratch) {
                TunnResult::WriteToNetwork(msg) => {
                    if msg.first() == Some(&4) && msg.len() == DATA_OVERHEAD {
                        demand.keepalive_sent(now);
                    }
                    net(dst, msg);
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    slot.confirmed.store(false, Relaxed);
                }
                _ => {}
            }
            if tunn.stats().0.is_none() {
                // Session expired (no handshake for 3 minutes): not up any more.
                slot.confirmed.store(false, Relaxed);
                return;
            }
            let interval = u64::from(peer.config.load().keepalive) * 1000;
            if demand.keepalive_due(now, interval)
                && let TunnResult::WriteToNetwork(msg) = tunn.encapsulate(&[], scratch)
            {
                net(dst, msg);
                demand.keepalive_sent(now);
            }
            if demand.idle(now, slot.last_rx_ms.load(Relaxed), idle_release)
                && peer.slots.load().len() == 1
            {
                slot.release(&mut guard);
                self.counters.sessions_released.fetch_add(1, Relaxed);
            }
            return;
        }
        slot.confirmed.store(false, Relaxed);
        if demand.attempt(now) == Attempt::Waiting {
            return;
        }
        if !demand.wanted(now) {
            // Nothing wants it: drop what a failed attempt left (queued packets are
            // stale by now), once it has been quiet for as long as a session would.
            if guard.is_some() && demand.idle(now, slot.last_rx_ms.load(Relaxed), idle_release) {
                slot.release(&mut guard);
            }
            return;
        }
        if demand.may_initiate(now) {
            let tunn = guard.get_or_insert_with(|| slot.new_tunn());
            if let TunnResult::WriteToNetwork(msg) = tunn.format_handshake_initiation(scratch, true)
            {
                net(dst, msg);
                demand.initiated(now);
                self.counters.initiations.fetch_add(1, Relaxed);
            }
        }
    }

    fn retire_slots(&self) {
        let _guard = self.control.lock();
        let tables = self.tables.load_full();
        let now = self.now_ms();
        let mut changed = false;
        for peer in &tables.peers {
            let primary = peer.primary.load_full();
            if !primary.has_session() {
                continue;
            }
            let slots = peer.slots.load();
            let keep: Vec<Arc<Slot>> = slots
                .iter()
                .filter(|s| {
                    Arc::ptr_eq(s, &primary)
                        || now.saturating_sub(s.last_rx_ms.load(Relaxed))
                            < self.retire_idle_ms.load(Relaxed)
                })
                .cloned()
                .collect();
            if keep.len() != slots.len() {
                changed = true;
                peer.slots.store(Arc::new(keep));
            }
        }
        if changed {
            self.publish(tables.peers.clone());
        }
    }

    /// Starts a handshake with every warm peer that has no session and is not in
    /// backoff (used at start, so that workers' sessions exist before the first
    /// packet); cold peers wait for traffic.
    pub fn initiate_all(&self, scratch: &mut [u8], net: &mut dyn FnMut(SocketAddr, &[u8])) {
        let now = self.now_ms();
        for peer in &self.tables.load().peers {
            let slot = peer.primary.load_full();
            if peer.demand.warm() && !slot.has_session() && peer.demand.may_initiate(now) {
                initiate(peer, &slot, scratch, net);
                peer.demand.initiated(now);
                self.counters.initiations.fetch_add(1, Relaxed);
            }
        }
    }

    /// Whether `peer` is alive: one of its key pairs has a session, and something
    /// authenticated (data or a keepalive) arrived on it within `max_silence`. With
    /// persistent keepalives an idle but healthy peer talks every keepalive interval.
    pub fn peer_alive(&self, peer: &Peer, max_silence: Duration) -> bool {
        let now = self.now_ms();
        let max = max_silence.as_millis() as u64;
        peer.slots
            .load()
            .iter()
            .any(|s| now.saturating_sub(s.last_rx_ms.load(Relaxed)) <= max && s.has_session())
    }

    /// Peers that do not answer our handshakes (wanted, no session since their first
    /// unanswered attempt), for one summary line instead of one per peer.
    pub fn unreachable(&self) -> Unreachable {
        let now = self.now_ms();
        let mut out = Unreachable::default();
        for p in &self.tables.load().peers {
            out.failures += p.demand.failures.load(Relaxed);
            let Some(since) = p.demand.unreachable_since() else {
                continue;
            };
            out.peers += 1;
            let secs = now.saturating_sub(since) / 1000;
            if out.oldest.is_none() || secs > out.oldest_secs {
                out.oldest_secs = secs;
                out.oldest = Some(Arc::clone(&p.name));
            }
        }
        out
    }

    pub fn peers(&self) -> Vec<PeerStatus> {
        let now = self.now_ms();
        self.tables
            .load()
            .peers
            .iter()
            .map(|p| {
                let primary = p.primary.load();
                let c = &p.counters;
                let cfg = p.config.load();
                PeerStatus {
                    name: Arc::clone(&p.name),
                    public_key: cfg.public_key,
                    endpoint: p.endpoint(),
                    allowed: cfg.allowed.clone(),
                    rx_packets: c.rx_packets.load(Relaxed),
                    rx_bytes: c.rx_bytes.load(Relaxed),
                    tx_packets: c.tx_packets.load(Relaxed),
                    tx_bytes: c.tx_bytes.load(Relaxed),
                    handshakes: c.handshakes.load(Relaxed),
                    last_handshake_unix: Some(c.last_handshake_unix.load(Relaxed))
                        .filter(|t| *t > 0),
                    decrypt_failures: c.decrypt_failures.load(Relaxed),
                    own_key: primary.own.public(),
                    session_up: primary.has_session(),
                    slots: p.slots.load().len(),
                    warm: p.demand.warm(),
                    active: p.slots.load().iter().any(|s| s.held.load(Relaxed)),
                    handshake_failures: p.demand.failures.load(Relaxed),
                    unreachable_secs: p
                        .demand
                        .unreachable_since()
                        .map(|t| now.saturating_sub(t) / 1000),
                }
            })
            .collect()
    }
}

fn initiate(peer: &Peer, slot: &Slot, scratch: &mut [u8], net: &mut dyn FnMut(SocketAddr, &[u8])) {
    let Some(dst) = peer.endpoint() else { return };
    if let TunnResult::WriteToNetwork(msg) = slot.tunn().format_handshake_initiation(scratch, false)
    {
        net(dst, msg);
    }
}

/// The slot to use when the primary went away: one with a session, preferring the
/// peer's configured key.
fn best_slot(slots: &[Arc<Slot>], peer_key: &[u8; 32]) -> Arc<Slot> {
    slots
        .iter()
        .max_by_key(|s| (s.has_session(), s.peer_key == *peer_key))
        .cloned()
        .expect("caller guarantees at least one slot")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
