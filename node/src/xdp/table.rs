//! Userspace side of the XDP program's endpoints table (`flynode_xdp_common::table`, where
//! the layout and the reasons for it are described): building a table for a set of
//! endpoints, publishing it into the program's maps without disturbing a reader, and
//! reading the live table back.
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use flynode_xdp_common::table::{
    self, ARRAY_ENTRIES, CONFIG_OFFSET, Config, KIND_ADDRESS, KIND_EMPTY, KIND_ENDPOINT,
    MAX_PROBES, SLOTS, Slot,
};
use flynode_xdp_common::{AddrKey, MAX_SERVICE_ADDRS, MAX_SERVICES, ServiceKey, ServiceValue};

/// Why a set of endpoints has no table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error(
        "{0} endpoints (service ports and WireGuard endpoints); the XDP table holds at most {MAX_SERVICES}"
    )]
    TooManyEndpoints(usize),
    #[error("{0} service addresses; the XDP table holds at most {MAX_SERVICE_ADDRS}")]
    TooManyAddresses(usize),
    #[error("port 0 is not a UDP destination port (endpoint {0})")]
    PortZero(String),
    #[error(
        "no hash seed among {SEED_ATTEMPTS} places every endpoint within {MAX_PROBES} slots of its home (a bug: the table is at most 31% full)"
    )]
    Unplaceable,
}

/// Seeds tried before [`TableError::Unplaceable`]. At a load of at most 31%, one seed
/// fails rarely (see [`place`]); 32 in a row do not happen.
const SEED_ATTEMPTS: u64 = 32;

/// One half's worth of slots and the seeds they were placed with.
#[derive(Clone, PartialEq, Eq)]
pub struct Built {
    slots: Vec<Slot>,
    seeds: [u64; 2],
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let used = self.slots.iter().filter(|s| s.kind != KIND_EMPTY).count();
        write!(f, "Built {{ used: {used}, seeds: {:x?} }}", self.seeds)
    }
}

impl Built {
    /// The value of `key`, probing exactly as the XDP program does.
    pub fn get(&self, key: &ServiceKey) -> Option<ServiceValue> {
        probe(
            &self.slots,
            self.seeds,
            table::addr_words(&key.addr.addr),
            key.port_be,
            KIND_ENDPOINT,
        )
        .map(|s| s.value)
    }

    /// Whether `addr` is a service address (a datagram to an unserved port on it is
    /// dropped).
    pub fn is_service_address(&self, addr: &AddrKey) -> bool {
        probe(
            &self.slots,
            self.seeds,
            table::addr_words(&addr.addr),
            0,
            KIND_ADDRESS,
        )
        .is_some()
    }
}

/// One half's slots probed as the XDP program probes them.
fn probe(
    slots: &[Slot],
    seeds: [u64; 2],
    addr: [u64; 2],
    port_be: u16,
    kind: u16,
) -> Option<&Slot> {
    table::probe(|i| slots.get(i as usize), seeds, addr, port_be, kind)
}

/// The `attempt`-th pair of seeds: odd 64-bit multipliers from SplitMix64. Deterministic,
/// which is enough: keys come from the routing map, never from a sender, so there is
/// nothing to randomise against; a failed placement just moves on to the next pair.
fn seeds(attempt: u64) -> [u64; 2] {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let base = attempt
        .wrapping_mul(2)
        .wrapping_add(1)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [
        mix(base) | 1,
        mix(base.wrapping_add(0x9e37_79b9_7f4a_7c15)) | 1,
    ]
}

/// Builds the table for `entries`: every endpoint, plus one address entry per service
/// address (WireGuard endpoints are not service addresses: UDP to other ports of the
/// host's own address is the host's business).
pub fn build(entries: &BTreeMap<ServiceKey, ServiceValue>) -> Result<Built, TableError> {
    if entries.len() > MAX_SERVICES as usize {
        return Err(TableError::TooManyEndpoints(entries.len()));
    }
    let mut keys: Vec<Slot> = Vec::with_capacity(entries.len() + 16);
    let mut addresses = std::collections::BTreeSet::new();
    for (key, value) in entries {
        if key.port_be == 0 {
            return Err(TableError::PortZero(format!("{:?}", key.addr.addr)));
        }
        let addr = table::addr_words(&key.addr.addr);
        keys.push(Slot {
            addr,
            port_be: key.port_be,
            kind: KIND_ENDPOINT,
            _pad: 0,
            value: *value,
        });
        if !value.is_wireguard() {
            addresses.insert(addr);
        }
    }
    if addresses.len() > MAX_SERVICE_ADDRS as usize {
        return Err(TableError::TooManyAddresses(addresses.len()));
    }
    keys.extend(addresses.into_iter().map(|addr| Slot {
        addr,
        port_be: 0,
        kind: KIND_ADDRESS,
        _pad: 0,
        value: ServiceValue::default(),
    }));
    (0..SEED_ATTEMPTS)
        .map(seeds)
        .find_map(|seeds| place(&keys, seeds).map(|slots| Built { slots, seeds }))
        .ok_or(TableError::Unplaceable)
}

/// Places `keys` with Robin Hood linear probing: a key that has come further from its
/// home takes the slot of one that has come less far. This keeps the longest
/// displacement short (4-7 slots at the table's 31% load in simulation, against 7-17
/// for plain linear probing), so a bound of [`MAX_PROBES`] slots almost never fails.
/// Lookups are unchanged: every slot between a key's home and its place is occupied,
/// so a probe that stops at the first empty slot finds every key. `None` when a key
/// would sit [`MAX_PROBES`] or more slots from home.
fn place(keys: &[Slot], seeds: [u64; 2]) -> Option<Vec<Slot>> {
    let mut slots = vec![Slot::default(); SLOTS as usize];
    let mut displacement = vec![0u32; SLOTS as usize];
    for key in keys {
        let (mut key, mut distance) = (*key, 0u32);
        let mut index = table::home(key.addr, key.port_be, key.kind, seeds);
        loop {
            if distance >= MAX_PROBES {
                return None;
            }
            let i = (index & (SLOTS - 1)) as usize;
            if slots[i].kind == KIND_EMPTY {
                slots[i] = key;
                displacement[i] = distance;
                break;
            }
            if displacement[i] < distance {
                std::mem::swap(&mut slots[i], &mut key);
                std::mem::swap(&mut displacement[i], &mut distance);
            }
            index = index.wrapping_add(1);
            distance += 1;
        }
    }
    Some(slots)
}

/// A shared mapping of part of a `BPF_F_MMAPABLE` array map's values.
struct Mapping<T> {
    ptr: NonNull<T>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain memory shared with the kernel; access goes through the
// methods below, which take `&mut self` to write.
unsafe impl<T> Send for Mapping<T> {}

impl<T: Copy> Mapping<T> {
    /// Maps `len` values of type `T` that start `offset` bytes (a multiple of the page
    /// size) into the values of the array `map`, which must have been created with
    /// `BPF_F_MMAPABLE` and be large enough.
    fn new(map: BorrowedFd<'_>, offset: usize, len: usize, writable: bool) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len * size_of::<T>()).div_ceil(page) * page;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a map fd; the kernel checks the length
        // against the map's size and refuses maps without BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?,
            len,
            bytes,
        })
    }

    fn read(&self, index: usize) -> T {
        assert!(index < self.len);
        // SAFETY: in bounds of the mapping; volatile because the kernel or another
        // process may write the memory.
        unsafe { self.ptr.as_ptr().add(index).read_volatile() }
    }

    /// Overwrites `values.len()` values from `start`. Only for memory no program reads
    /// (the inactive half).
    fn write(&mut self, start: usize, values: &[T]) {
        assert!(start + values.len() <= self.len);
        // SAFETY: in bounds; nothing reads this range concurrently (the caller's
        // contract), and `T` is plain old data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.as_ptr().add(start),
                values.len(),
            )
        };
    }

    fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Mapping<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// The program's table maps, mapped into this process: the writer (the daemon).
pub struct TableWriter {
    slots: Mapping<Slot>,
    config: Mapping<Config>,
    /// What the live half holds, when this process published it.
    live: Option<Built>,
    /// The grace period started by the last switch: the inactive half may be written
    /// once it has ended.
    grace: Option<JoinHandle<()>>,
}

impl TableWriter {
    /// Maps the program's `SERVICE_TABLE`, freshly created (all zero: half 0 live and
    /// empty).
    pub fn new(map: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            slots: Mapping::new(map, 0, ARRAY_ENTRIES as usize, true)?,
            config: Mapping::new(map, CONFIG_OFFSET, 1, true)?,
            live: None,
            grace: None,
        })
    }

    /// The table the program reads now.
    pub fn live(&self) -> Option<&Built> {
        self.live.as_ref()
    }

    /// Makes the program read `built`: written into the inactive half, then one store
    /// switches halves. Callers publish only what changed ([`super::XdpClassifier`]
    /// compares endpoint sets, far cheaper than comparing two 2 MiB halves).
    pub fn publish(&mut self, built: Built) {
        if let Some(grace) = self.grace.take() {
            // Waits out the rest of the grace period of the previous switch (a few ms,
            // started then, so usually long over): a program that read the old
            // `active` may still be walking this half until it ends.
            let _ = grace.join();
        }
        let config_ptr = self.config.as_ptr();
        // SAFETY: the config mapping holds one `Config`; `active` is a 4-byte aligned u32
        // that only this process writes.
        let active = unsafe { AtomicU32::from_ptr(&raw mut (*config_ptr).active) };
        let live = active.load(Ordering::Relaxed) & 1;
        let next = live ^ 1;
        self.slots.write((next * SLOTS) as usize, &built.slots);
        // SAFETY: in bounds; the seeds of the inactive half are read by no program.
        unsafe { (&raw mut (*config_ptr).seeds[next as usize]).write_volatile(built.seeds) };
        // Release: the slots and seeds above are visible before the switch. The program
        // loads `active` first and indexes the seeds and slots with it (an address
        // dependency), so it never sees the new half without its contents.
        active.store(next, Ordering::Release);
        self.live = Some(built);
        self.grace = Some(std::thread::spawn(grace_period));
    }
}

/// Waits until every XDP program run that started before the call has finished.
///
/// XDP runs inside an RCU read-side critical section (rcu_read_lock / bh disabled), and
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is `synchronize_rcu()` (kernel/sched/membarrier.c);
/// it takes 8-40 ms here. Kernels with nohz_full refuse that command: a program run
/// takes microseconds, so a 200 ms pause is then used instead.
fn grace_period() {
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, libc::MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The live table of a running daemon's program, mapped read-only (for tools and tests
/// in another process).
pub struct TableReader {
    slots: Mapping<Slot>,
    config: Mapping<Config>,
}

impl TableReader {
    pub fn new(map: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            slots: Mapping::new(map, 0, ARRAY_ENTRIES as usize, false)?,
            config: Mapping::new(map, CONFIG_OFFSET, 1, false)?,
        })
    }

    /// The value the program finds for `key` now.
    pub fn get(&self, key: &ServiceKey) -> Option<ServiceValue> {
        let config = self.config.read(0);
        let half = config.active & 1;
        let seeds = config.seeds[half as usize];
        let addr = table::addr_words(&key.addr.addr);
        let base = (half * SLOTS) as usize;
        table::probe(
            |i| Some(self.slots.read(base + i as usize)),
            seeds,
            addr,
            key.port_be,
            KIND_ENDPOINT,
        )
        .map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8, port: u16) -> ServiceKey {
        ServiceKey::new(AddrKey::from_ipv4([198, 18, 0, last]), port)
    }

    #[test]
    fn every_entry_is_found_and_nothing_else() {
        let mut entries = BTreeMap::new();
        for i in 0..200u16 {
            entries.insert(
                v4((i % 50) as u8, 1000 + i),
                ServiceValue::service(u32::from(i) + 1, 0),
            );
        }
        entries.insert(v4(200, 51820), ServiceValue::WIREGUARD);
        let built = build(&entries).expect("table");
        for (k, v) in &entries {
            assert_eq!(built.get(k), Some(*v), "{k:?}");
        }
        assert_eq!(built.get(&v4(0, 999)), None);
        assert_eq!(built.get(&v4(201, 1000)), None);
        assert!(built.is_service_address(&v4(3, 0).addr));
        assert!(
            !built.is_service_address(&v4(200, 0).addr),
            "a WireGuard endpoint is not a service address"
        );
        assert!(!built.is_service_address(&v4(201, 0).addr));
    }

    #[test]
    fn a_full_table_places_every_key() {
        // The most endpoints and addresses allowed, IPv6, with adjacent addresses and
        // ports: the densest and most regular key set there can be.
        let mut entries = BTreeMap::new();
        for i in 0..MAX_SERVICES {
            let mut addr = [0xfdu8, 0, 0, 0x72, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            let a = (i % MAX_SERVICE_ADDRS) as u16;
            addr[14..16].copy_from_slice(&a.to_be_bytes());
            let port = 1 + (i / MAX_SERVICE_ADDRS) as u16;
            entries.insert(
                ServiceKey::new(AddrKey::from_ipv6(addr), port),
                ServiceValue::service(i + 1, 0),
            );
        }
        let built = build(&entries).expect("a full table places");
        assert!(entries.iter().all(|(k, v)| built.get(k) == Some(*v)));
    }

    #[test]
    fn limits_and_bad_keys_are_errors() {
        let mut entries = BTreeMap::new();
        entries.insert(v4(1, 0), ServiceValue::service(1, 0));
        assert!(matches!(build(&entries), Err(TableError::PortZero(_))));
        let too_many: BTreeMap<_, _> = (0..=MAX_SERVICES)
            .map(|i| {
                (
                    v4((i % 200) as u8, 1 + (i / 200) as u16),
                    ServiceValue::service(1, 0),
                )
            })
            .collect();
        assert_eq!(
            build(&too_many),
            Err(TableError::TooManyEndpoints(MAX_SERVICES as usize + 1))
        );
        let addresses: BTreeMap<_, _> = (0..=MAX_SERVICE_ADDRS)
            .map(|i| {
                let [a, b] = (i as u16).to_be_bytes();
                (
                    ServiceKey::new(AddrKey::from_ipv4([198, 19, a, b]), 53),
                    ServiceValue::service(1, 0),
                )
            })
            .collect();
        assert_eq!(
            build(&addresses),
            Err(TableError::TooManyAddresses(MAX_SERVICE_ADDRS as usize + 1))
        );
    }

    /// Random full key sets: the first seed places nearly all of them (the margin the
    /// bound of 32 seeds rests on).
    #[test]
    fn random_full_tables_place_with_the_first_seeds() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut first_seed = 0;
        for _ in 0..8 {
            let mut keys = Vec::new();
            for _ in 0..(MAX_SERVICES + MAX_SERVICE_ADDRS) {
                let r = next().to_le_bytes();
                let mut addr = [0u8; 16];
                addr[..8].copy_from_slice(&r);
                keys.push(Slot {
                    addr: table::addr_words(&addr),
                    port_be: (next() as u16) | 1,
                    kind: KIND_ENDPOINT,
                    _pad: 0,
                    value: ServiceValue::service(1, 0),
                });
            }
            let placed = (0..SEED_ATTEMPTS).position(|a| place(&keys, seeds(a)).is_some());
            assert!(placed.is_some(), "no seed placed a random full key set");
            first_seed += usize::from(placed == Some(0));
        }
        assert!(
            first_seed >= 6,
            "the first seed placed only {first_seed} of 8 full key sets"
        );
    }

    #[test]
    fn seeds_are_odd_and_distinct() {
        let all: Vec<[u64; 2]> = (0..SEED_ATTEMPTS).map(seeds).collect();
        assert!(all.iter().flatten().all(|s| s % 2 == 1));
        let mut flat: Vec<u64> = all.iter().flatten().copied().collect();
        flat.sort_unstable();
        flat.dedup();
        assert_eq!(flat.len(), 2 * SEED_ATTEMPTS as usize);
    }
}
