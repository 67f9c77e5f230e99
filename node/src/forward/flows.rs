//! The flow table: a bounded LRU map from a flow to what the forwarder decided for it,
//! with idle expiry, shared by the receive threads.
//!
//! A flow is `(client, anycast)` at the edge and `(container, client)` at the worker (see
//! DESIGN.md, "Flows and replies"); the value is whatever the caller remembers for it (the
//! chosen worker, the edge and anycast address a reply must go back through).
//!
//! # Why bounded LRU plus idle expiry
//!
//! UDP has no connection teardown, and the source of a datagram is whatever the sender
//! wrote in it: a flood of spoofed sources creates a new "flow" per datagram. So the
//! capacity is a hard limit: inserting into a full table evicts the least recently used
//! entry instead of allocating. A real flow touches its entry with every datagram and so
//! stays near the recent end of the list while the flood churns through the old end
//! (counted in [`FlowCounters::evicted`], the signal that the table is too small or under
//! attack). Idle expiry is the normal end of a flow: an entry not used for the idle
//! timeout is gone, whether [`FlowTable::get`] finds it stale or [`FlowTable::expire`]
//! sweeps it. Because the list is in recency order the sweep walks from the old end and
//! stops at the first live entry: its cost is the number of entries it removes.
//!
//! # Why sharded mutexes
//!
//! Every forwarded datagram does one lookup, on several receive threads at once, and a
//! lookup *writes* (it moves the entry to the recent end). A single lock would serialise
//! the threads; a concurrent map without recency would lose the LRU bound. The table is
//! split into up to 64 shards (a power of two), each an independent LRU behind a
//! `parking_lot` mutex held for a few dozen nanoseconds, chosen by bits of the key's hash.
//! Each shard holds an exact share of the capacity, so eviction is LRU within the shard:
//! an approximation of global LRU that is indistinguishable from it at realistic sizes.
//! Small tables get fewer shards (at least 256 entries each) so that approximation stays
//! good. The counters live inside the shards too, so no cache line is shared by threads
//! that touch different shards; [`FlowTable::counters`] sums them.
//!
//! The hash is foldhash seeded at random per table: an attacker who can choose source
//! addresses must not be able to aim them all at one shard or one probe sequence.
//!
//! # Memory
//!
//! Per shard, a slab `Vec<Entry>` holds each entry once (key 36 bytes, value, last-use
//! time 4 bytes, and `u32` previous/next indices of an intrusive doubly linked recency
//! list: 48 bytes plus the value) and a `hashbrown::HashTable<u32>` indexes the slab (4
//! bytes plus a control byte per bucket, at most 7/8 full). Freed slots are reused through
//! a free list. The slab grows on demand (doubling, capped at the shard's capacity), so an
//! empty table costs a few kilobytes however large its capacity; after a flood the memory
//! stays at its high-water mark, which the capacity bounds. With a 24-byte value an entry
//! is 72 bytes, and about 86 bytes with all overheads at a million entries (measured by
//! the `a_million_entries_fit_in_128_mib` test via [`FlowTable::heap_bytes`]).
//!
//! # Time
//!
//! Entries store their last use as a [`Tick`]: milliseconds in a wrapping `u32`, compared
//! with serial-number arithmetic (RFC 1982). An age is right while it is below 2^31 ms
//! (24.8 days): the idle timeout is capped below that, and [`FlowTable::expire`] (which
//! the daemon runs every few seconds) removes entries long before their age becomes
//! ambiguous. A tick taken by another thread a moment earlier than an entry's last use
//! reads as age zero, never as "very old".

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::Mutex;

/// An address and port of either family in 18 bytes: IPv4 as IPv4-mapped IPv6.
///
/// `repr(C)` with byte-array fields only: alignment 1 and no padding, so a [`FlowKey`] is
/// 36 bytes and packs tightly into an entry. The IPv6 scope id and flow label are not
/// kept (flows are between routable addresses). An IPv6 socket address that is itself
/// IPv4-mapped comes back from [`Endpoint::socket_addr`] as IPv4.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct Endpoint {
    addr: [u8; 16],
    /// Network byte order.
    port: [u8; 2],
}

impl Endpoint {
    /// The endpoint of `addr`.
    pub fn new(addr: SocketAddr) -> Endpoint {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Endpoint {
            addr: ip.octets(),
            port: addr.port().to_be_bytes(),
        }
    }

    /// The socket address, IPv4 again for an IPv4-mapped address.
    pub fn socket_addr(&self) -> SocketAddr {
        match self.ip() {
            IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, self.port())),
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, self.port(), 0, 0)),
        }
    }

    /// The address, IPv4 again for an IPv4-mapped address.
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    /// The 18 bytes: the (IPv4-mapped) IPv6 address, then the port in network byte order.
    pub fn octets(&self) -> [u8; 18] {
        let mut out = [0; 18];
        out[..16].copy_from_slice(&self.addr);
        out[16..].copy_from_slice(&self.port);
        out
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint::new(addr)
    }
}

impl From<Endpoint> for SocketAddr {
    fn from(e: Endpoint) -> SocketAddr {
        e.socket_addr()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint({})", self.socket_addr())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.socket_addr().fmt(f)
    }
}

/// A flow: `(client, anycast)` at the edge, `(container, client)` at the worker. 36 bytes.
pub type FlowKey = (Endpoint, Endpoint);

/// The 36 bytes of a flow key, `a` then `b` (the input of [`super::hash::choose`]).
pub fn flow_key_octets(key: &FlowKey) -> [u8; 36] {
    let mut out = [0; 36];
    out[..18].copy_from_slice(&key.0.octets());
    out[18..].copy_from_slice(&key.1.octets());
    out
}

/// A coarse clock for flow tables: milliseconds of the monotonic clock, wrapping.
///
/// Stored as a `u32` so an entry spends 4 bytes on it; see the module docs for how
/// wrap-around is handled. Take one with [`Tick::now`] per batch of datagrams.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Tick(u32);

/// The longest age that serial-number arithmetic on a `u32` can tell apart from "in the
/// future", and so the cap on the idle timeout (about 24.8 days).
const MAX_AGE_MS: u32 = i32::MAX as u32;

impl Tick {
    /// The current time, from the monotonic clock as of its last tick (1-4 ms old;
    /// see [`flynode_tunnel::clock`]: it is read per datagram).
    pub fn now() -> Tick {
        // Truncation is the wrap-around the comparisons are built for.
        Tick(flynode_tunnel::clock::coarse_ms() as u32)
    }

    /// The tick `ms` milliseconds after the (arbitrary) origin, wrapping at 2^32.
    pub const fn from_millis(ms: u64) -> Tick {
        Tick(ms as u32)
    }

    /// The raw wrapping millisecond count.
    pub const fn as_millis(self) -> u32 {
        self.0
    }

    /// Milliseconds from `earlier` to `self`; 0 when `earlier` is in fact later (a tick
    /// another thread took a moment after ours).
    pub const fn millis_since(self, earlier: Tick) -> u32 {
        let d = self.0.wrapping_sub(earlier.0);
        if d > MAX_AGE_MS { 0 } else { d }
    }
}

/// What a flow table has done since it was created, summed over its shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Entries created (a key that was absent or whose entry had expired).
    pub inserted: u64,
    /// Live entries pushed out by an insert into a full shard (capacity pressure).
    pub evicted: u64,
    /// Entries that reached the idle timeout (found stale, swept, or pushed out stale).
    pub expired: u64,
    /// Entries removed by [`FlowTable::retain`] (flow invalidation).
    pub invalidated: u64,
}

impl FlowCounters {
    fn add(&mut self, other: &FlowCounters) {
        self.inserted += other.inserted;
        self.evicted += other.evicted;
        self.expired += other.expired;
        self.invalidated += other.invalidated;
    }
}

/// No entry: the end of the recency list or of the free list.
const NIL: u32 = u32::MAX;
/// The most entries one shard can index with `u32` slots (`NIL` excluded).
const MAX_SHARD_ENTRIES: usize = (NIL - 1) as usize;
/// Shards for a large table: enough that a handful of receive threads rarely meet on one.
const MAX_SHARDS: usize = 64;
/// Fewer shards for small tables, so per-shard LRU stays close to global LRU.
const MIN_SHARD_ENTRIES: usize = 256;
/// Sweep at most this many entries per lock acquisition, so a mass expiry after a flood
/// does not stall a receive thread behind the shard's lock.
const EXPIRE_BATCH: usize = 256;
/// The first slab allocation of a shard, in entries.
const MIN_SLAB_GROWTH: usize = 16;

#[derive(Clone, Copy)]
struct Entry<V> {
    key: FlowKey,
    value: V,
    /// `Tick::as_millis` of the last use.
    last_used: u32,
    /// Towards the most recently used entry (`NIL` at the head).
    prev: u32,
    /// Towards the least recently used entry (`NIL` at the tail); the free list's link
    /// for a free slot.
    next: u32,
}

/// One independent LRU: slab, index, recency list, free list, counters.
struct Shard<V> {
    /// Slab indices, hashed by the key of the entry they point to (the key is stored once).
    index: HashTable<u32>,
    slab: Vec<Entry<V>>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    /// First free slot of the slab.
    free: u32,
    len: u32,
    cap: u32,
    idle_ms: u32,
    counters: FlowCounters,
}

impl<V: Copy> Shard<V> {
    fn new(cap: u32, idle_ms: u32) -> Shard<V> {
        Shard {
            index: HashTable::new(),
            slab: Vec::new(),
            head: NIL,
            tail: NIL,
            free: NIL,
            len: 0,
            cap,
            idle_ms,
            counters: FlowCounters::default(),
        }
    }

    fn find(&self, hash: u64, key: &FlowKey) -> Option<u32> {
        let slab = &self.slab;
        self.index
            .find(hash, |&i| slab[i as usize].key == *key)
            .copied()
    }

    fn is_idle(&self, i: u32, now: Tick) -> bool {
        now.millis_since(Tick(self.slab[i as usize].last_used)) >= self.idle_ms
    }

    fn unlink(&mut self, i: u32) {
        let Entry { prev, next, .. } = self.slab[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.slab[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slab[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        let e = &mut self.slab[i as usize];
        e.prev = NIL;
        e.next = old;
        match old {
            NIL => self.tail = i,
            o => self.slab[o as usize].prev = i,
        }
        self.head = i;
    }

    /// Marks entry `i` used at `now`: most recent, and its last use no earlier than `now`.
    fn touch(&mut self, i: u32, now: Tick) {
        let e = &mut self.slab[i as usize];
        if now.millis_since(Tick(e.last_used)) > 0 {
            e.last_used = now.0;
        }
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Takes entry `i` (whose key hashes to `hash`) out of the index and the recency list
    /// and puts its slot on the free list.
    fn release(&mut self, hash: u64, i: u32) {
        if let Ok(slot) = self.index.find_entry(hash, |&j| j == i) {
            slot.remove();
        } else {
            debug_assert!(false, "flow table slot {i} missing from its index");
        }
        self.unlink(i);
        self.slab[i as usize].next = self.free;
        self.free = i;
        self.len -= 1;
    }

    /// Inserts an absent key as the most recent entry, first pushing out the least recent
    /// one if the shard is full.
    fn insert_new(&mut self, hasher: &RandomState, hash: u64, key: FlowKey, value: V, now: Tick) {
        if self.len >= self.cap {
            let lru = self.tail;
            if self.is_idle(lru, now) {
                self.counters.expired += 1;
            } else {
                self.counters.evicted += 1;
            }
            let lru_hash = key_hash(hasher, &self.slab[lru as usize].key);
            self.release(lru_hash, lru);
        }
        let entry = Entry {
            key,
            value,
            last_used: now.0,
            prev: NIL,
            next: NIL,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.slab[i as usize].next;
            self.slab[i as usize] = entry;
            i
        } else {
            // No free slot, so every slot holds an entry and len < cap: there is room.
            let len = self.slab.len();
            if len == self.slab.capacity() {
                let room = self.cap as usize - len;
                self.slab.reserve_exact(len.max(MIN_SLAB_GROWTH).min(room));
            }
            self.slab.push(entry);
            len as u32
        };
        let Shard { index, slab, .. } = self;
        index.insert_unique(hash, i, |&j| key_hash(hasher, &slab[j as usize].key));
        self.push_front(i);
        self.len += 1;
        self.counters.inserted += 1;
    }

    fn heap_bytes(&self) -> usize {
        self.slab.capacity() * size_of::<Entry<V>>() + self.index.allocation_size()
    }
}

/// A mutex on a cache line of its own, so threads working on neighbouring shards do not
/// invalidate each other's lines (128: adjacent-line prefetch pairs 64-byte lines).
#[repr(align(128))]
struct Padded<T>(T);

/// A bounded LRU flow table with idle expiry, safe to share between threads (see the
/// module docs).
pub struct FlowTable<V: Copy> {
    shards: Box<[Padded<Mutex<Shard<V>>>]>,
    /// `shards.len() - 1`; the length is a power of two.
    shard_mask: usize,
    hasher: RandomState,
    capacity: usize,
    idle_ms: u32,
}

/// The table's hash of a key: three folded multiplies, seeded per table.
fn key_hash(hasher: &RandomState, key: &FlowKey) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u128(u128::from_ne_bytes(key.0.addr));
    h.write_u128(u128::from_ne_bytes(key.1.addr));
    let (a, b) = (key.0.port, key.1.port);
    h.write_u32(u32::from_ne_bytes([a[0], a[1], b[0], b[1]]));
    h.finish()
}

/// The number of shards for a table of `capacity` entries: a power of two, at most
/// `MAX_SHARDS`, with at least `MIN_SHARD_ENTRIES` per shard when there are several.
fn shard_count(capacity: usize) -> usize {
    match capacity / MIN_SHARD_ENTRIES {
        0 => 1,
        n => (1 << n.ilog2()).min(MAX_SHARDS),
    }
}

impl<V: Copy> FlowTable<V> {
    /// A table of `capacity` entries at most (at least 1) whose entries expire after
    /// `idle` without use (rounded to milliseconds, between 1 ms and about 24.8 days).
    pub fn new(capacity: usize, idle: Duration) -> FlowTable<V> {
        FlowTable::with_shards(capacity, idle, shard_count(capacity.max(1)))
    }

    /// `new` with an explicit number of shards (a power of two, at most `capacity`).
    fn with_shards(capacity: usize, idle: Duration, shards: usize) -> FlowTable<V> {
        debug_assert!(shards.is_power_of_two());
        let capacity = capacity.max(shards);
        let idle_ms = idle.as_millis().clamp(1, MAX_AGE_MS as u128) as u32;
        // An exact split: the first `extra` shards hold one entry more.
        let (base, extra) = (capacity / shards, capacity % shards);
        let caps = (0..shards).map(|i| (base + usize::from(i < extra)).min(MAX_SHARD_ENTRIES));
        let shards: Box<[_]> = caps
            .map(|cap| Padded(Mutex::new(Shard::new(cap as u32, idle_ms))))
            .collect();
        FlowTable {
            capacity: shards.iter().map(|s| s.0.lock().cap as usize).sum(),
            shard_mask: shards.len() - 1,
            shards,
            hasher: RandomState::default(),
            idle_ms,
        }
    }

    fn hash(&self, key: &FlowKey) -> u64 {
        key_hash(&self.hasher, key)
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard<V>> {
        // hashbrown takes the bucket from the low bits and the tag from the top 7: the
        // shard comes from bits in between, so all three stay independent.
        &self.shards[(hash >> 32) as usize & self.shard_mask].0
    }

    /// The value for `key`, refreshing its recency and last use; `None` when absent or
    /// idle too long (an idle entry found here is removed and counted as expired).
    pub fn get(&self, key: &FlowKey, now: Tick) -> Option<V> {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        let i = shard.find(hash, key)?;
        if shard.is_idle(i, now) {
            shard.release(hash, i);
            shard.counters.expired += 1;
            return None;
        }
        shard.touch(i, now);
        Some(shard.slab[i as usize].value)
    }

    /// The value for `key` and `false`, or else `make()`'s value inserted and `true`;
    /// `None` when absent and `make` gives nothing. One lock acquisition: `make` runs
    /// under the shard's lock, so it must be quick and must not use this table.
    pub fn get_or_insert_with(
        &self,
        key: &FlowKey,
        now: Tick,
        make: impl FnOnce() -> Option<V>,
    ) -> Option<(V, bool)> {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        match shard.find(hash, key) {
            Some(i) if !shard.is_idle(i, now) => {
                shard.touch(i, now);
                Some((shard.slab[i as usize].value, false))
            }
            Some(i) => {
                // The old flow is over; this datagram starts a new one in the same slot.
                shard.counters.expired += 1;
                let Some(value) = make() else {
                    shard.release(hash, i);
                    return None;
                };
                shard.counters.inserted += 1;
                shard.slab[i as usize].value = value;
                shard.touch(i, now);
                Some((value, true))
            }
            None => {
                let value = make()?;
                shard.insert_new(&self.hasher, hash, *key, value, now);
                Some((value, true))
            }
        }
    }

    /// Inserts `value` for `key` or replaces the current one, as the most recent entry;
    /// pushes out the shard's least recently used entry when the shard is full.
    pub fn insert(&self, key: FlowKey, value: V, now: Tick) {
        let hash = self.hash(&key);
        let mut shard = self.shard(hash).lock();
        match shard.find(hash, &key) {
            Some(i) => {
                if shard.is_idle(i, now) {
                    shard.counters.expired += 1;
                    shard.counters.inserted += 1;
                }
                shard.slab[i as usize].value = value;
                shard.touch(i, now);
            }
            None => shard.insert_new(&self.hasher, hash, key, value, now),
        }
    }

    /// Removes `key`, returning its value (even if idle). Not counted.
    pub fn remove(&self, key: &FlowKey) -> Option<V> {
        let hash = self.hash(key);
        let mut shard = self.shard(hash).lock();
        let i = shard.find(hash, key)?;
        shard.release(hash, i);
        Some(shard.slab[i as usize].value)
    }

    /// Keeps the entries for which `pred` is true and removes the others, like
    /// `Vec::retain` (flow invalidation, e.g. when a worker leaves); returns how many were
    /// removed. Holds each shard's lock in turn for a walk of that shard: control plane.
    pub fn retain(&self, mut pred: impl FnMut(&FlowKey, &V) -> bool) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock();
            let mut i = shard.head;
            while i != NIL {
                let Entry {
                    key, value, next, ..
                } = shard.slab[i as usize];
                if !pred(&key, &value) {
                    shard.release(self.hash(&key), i);
                    shard.counters.invalidated += 1;
                    removed += 1;
                }
                i = next;
            }
        }
        removed
    }

    /// Removes the entries idle for the idle timeout or longer at `now`, oldest first, and
    /// returns how many. Walks from each shard's least recent end and stops at the first
    /// live entry, releasing the lock every few hundred removals.
    pub fn expire(&self, now: Tick) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            'shard: loop {
                let mut shard = shard.0.lock();
                for _ in 0..EXPIRE_BATCH {
                    let lru = shard.tail;
                    if lru == NIL || !shard.is_idle(lru, now) {
                        break 'shard;
                    }
                    let hash = self.hash(&shard.slab[lru as usize].key);
                    shard.release(hash, lru);
                    shard.counters.expired += 1;
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The number of entries (idle ones not yet removed included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len as usize).sum()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.0.lock().len == 0)
    }

    /// The most entries the table holds (the requested capacity, at least 1).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The idle timeout, in milliseconds.
    pub fn idle_millis(&self) -> u32 {
        self.idle_ms
    }

    /// The counters, summed over the shards.
    pub fn counters(&self) -> FlowCounters {
        let mut sum = FlowCounters::default();
        for shard in self.shards.iter() {
            sum.add(&shard.0.lock().counters);
        }
        sum
    }

    /// The bytes the table has allocated: shards, slabs and indexes.
    pub fn heap_bytes(&self) -> usize {
        let shards = size_of_val::<[Padded<Mutex<Shard<V>>>]>(&self.shards);
        shards
            + self
                .shards
                .iter()
                .map(|s| s.0.lock().heap_bytes())
                .sum::<usize>()
    }

    /// Every key, most recent first, shard by shard (for tests against a model).
    #[cfg(test)]
    fn keys_by_recency(&self) -> Vec<FlowKey> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.0.lock();
            let mut i = shard.head;
            while i != NIL {
                let e = &shard.slab[i as usize];
                keys.push(e.key);
                i = e.next;
            }
        }
        keys
    }
}

impl<V: Copy> fmt::Debug for FlowTable<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowTable")
            .field("capacity", &self.capacity)
            .field("shards", &self.shards.len())
            .field("idle_ms", &self.idle_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
