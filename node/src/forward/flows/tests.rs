use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

const IDLE: Duration = Duration::from_secs(30);

fn ep(n: u32, port: u16) -> Endpoint {
    Endpoint::new(SocketAddr::from((
        [10, (n >> 16) as u8, (n >> 8) as u8, n as u8],
        port,
    )))
}

/// A distinct flow per `n`: a client of the 10/8 net towards one anycast address.
fn key(n: u32) -> FlowKey {
    (ep(n, 40_000 + (n % 1000) as u16), ep(0xff_ff_ff, 53))
}

fn at(ms: u64) -> Tick {
    Tick::from_millis(ms)
}

#[test]
fn sizes_are_as_documented() {
    assert_eq!(size_of::<Endpoint>(), 18);
    assert_eq!(align_of::<Endpoint>(), 1);
    assert_eq!(size_of::<FlowKey>(), 36);
    assert_eq!(size_of::<Entry<[u8; 24]>>(), 72);
    assert_eq!(size_of::<Tick>(), 4);
}

#[test]
fn endpoint_round_trips_both_families() {
    for s in [
        "192.0.2.7:53",
        "[2001:db8::1]:443",
        "0.0.0.0:0",
        "[::1]:65535",
    ] {
        let addr: SocketAddr = s.parse().unwrap();
        let e = Endpoint::from(addr);
        assert_eq!(e.socket_addr(), addr);
        assert_eq!(e.ip(), addr.ip());
        assert_eq!(e.port(), addr.port());
        assert_eq!(format!("{e}"), s);
    }
    let v4 = Endpoint::new("192.0.2.7:53".parse().unwrap());
    assert_eq!(
        &v4.octets()[..12],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
    );
    assert_eq!(&v4.octets()[12..], &[192, 0, 2, 7, 0, 53]);
    let k = (v4, Endpoint::new("[2001:db8::1]:443".parse().unwrap()));
    assert_eq!(flow_key_octets(&k)[..18], v4.octets());
    assert_eq!(flow_key_octets(&k)[34..], [1, 187]);
}

#[test]
fn get_insert_remove() {
    let t = FlowTable::<u32>::new(100, IDLE);
    assert!(t.is_empty());
    assert_eq!(t.get(&key(1), at(0)), None);
    t.insert(key(1), 10, at(0));
    t.insert(key(2), 20, at(0));
    assert_eq!(t.get(&key(1), at(1)), Some(10));
    assert_eq!(t.get(&key(2), at(1)), Some(20));
    t.insert(key(1), 11, at(2));
    assert_eq!(t.get(&key(1), at(3)), Some(11));
    assert_eq!(t.len(), 2);
    assert_eq!(t.remove(&key(1)), Some(11));
    assert_eq!(t.remove(&key(1)), None);
    assert_eq!(t.get(&key(1), at(4)), None);
    assert_eq!(t.len(), 1);
    assert_eq!(t.capacity(), 100);
    let c = t.counters();
    assert_eq!(
        (c.inserted, c.evicted, c.expired, c.invalidated),
        (2, 0, 0, 0)
    );
}

#[test]
fn get_or_insert_with_inserts_once() {
    let t = FlowTable::<u32>::new(100, IDLE);
    assert_eq!(t.get_or_insert_with(&key(1), at(0), || None), None);
    assert!(t.is_empty());
    assert_eq!(
        t.get_or_insert_with(&key(1), at(0), || Some(7)),
        Some((7, true))
    );
    let unused = || -> Option<u32> { panic!("make called for a present key") };
    assert_eq!(
        t.get_or_insert_with(&key(1), at(1), unused),
        Some((7, false))
    );
    assert_eq!(t.counters().inserted, 1);
}

#[test]
fn full_table_evicts_the_least_recently_used() {
    let t = FlowTable::<u32>::new(3, IDLE);
    t.insert(key(1), 1, at(0));
    t.insert(key(2), 2, at(1));
    t.insert(key(3), 3, at(2));
    // Recency now 3, 2, 1; using 1 makes 2 the least recent.
    assert_eq!(t.get(&key(1), at(3)), Some(1));
    t.insert(key(4), 4, at(4));
    assert_eq!(t.get(&key(2), at(5)), None);
    assert_eq!(t.len(), 3);
    // Recency 4, 1, 3: replacing 3 refreshes it, so 1 goes next.
    t.insert(key(3), 33, at(6));
    t.insert(key(5), 5, at(7));
    assert_eq!(t.keys_by_recency(), vec![key(5), key(3), key(4)]);
    let c = t.counters();
    assert_eq!((c.inserted, c.evicted, c.expired), (5, 2, 0));
}

#[test]
fn idle_entries_are_gone_on_get() {
    let t = FlowTable::<u32>::new(10, Duration::from_millis(100));
    t.insert(key(1), 1, at(1000));
    assert_eq!(t.get(&key(1), at(1099)), Some(1));
    // Used at 1099: alive until 1199.
    assert_eq!(t.get(&key(1), at(1198)), Some(1));
    assert_eq!(t.get(&key(1), at(1298)), None);
    assert!(t.is_empty());
    assert_eq!(t.counters().expired, 1);
}

#[test]
fn idle_entry_is_replaced_as_a_new_flow() {
    let t = FlowTable::<u32>::new(10, Duration::from_millis(100));
    t.insert(key(1), 1, at(0));
    assert_eq!(
        t.get_or_insert_with(&key(1), at(500), || Some(2)),
        Some((2, true))
    );
    t.insert(key(2), 1, at(0));
    t.insert(key(2), 3, at(500));
    t.insert(key(3), 1, at(0));
    assert_eq!(t.get_or_insert_with(&key(3), at(500), || None), None);
    assert_eq!(t.len(), 2);
    let c = t.counters();
    assert_eq!((c.inserted, c.expired), (5, 3));
}

#[test]
fn expire_sweeps_the_idle_and_keeps_the_live() {
    let t = FlowTable::<u32>::with_shards(100, Duration::from_millis(100), 1);
    for n in 0..10 {
        t.insert(key(n), n, at(u64::from(n) * 10));
    }
    // At 150 the entries last used at 0..=50 are idle.
    assert_eq!(t.expire(at(150)), 6);
    assert_eq!(t.len(), 4);
    assert_eq!(t.expire(at(150)), 0);
    assert_eq!(t.get(&key(6), at(150)), Some(6));
    assert_eq!(t.expire(at(1000)), 4);
    assert!(t.is_empty());
    assert_eq!(t.counters().expired, 10);
}

#[test]
fn expire_empties_a_large_shard_in_batches() {
    let t = FlowTable::<u32>::with_shards(5000, Duration::from_millis(100), 1);
    for n in 0..5000 {
        t.insert(key(n), n, at(0));
    }
    assert_eq!(t.expire(at(100)), 5000);
    assert!(t.is_empty());
}

#[test]
fn ages_survive_the_tick_wrapping_around() {
    let t = FlowTable::<u32>::new(10, Duration::from_millis(100));
    let before_wrap = u64::from(u32::MAX) - 10;
    t.insert(key(1), 1, at(before_wrap));
    t.insert(key(2), 2, at(before_wrap));
    // 60 ms later, past the wrap: still live.
    assert_eq!(at(before_wrap + 60).as_millis(), 49);
    assert_eq!(t.get(&key(1), at(before_wrap + 60)), Some(1));
    assert_eq!(t.expire(at(before_wrap + 60)), 0);
    // A tick another thread took just before ours is age zero, not ancient.
    assert_eq!(t.get(&key(1), at(before_wrap + 50)), Some(1));
    assert_eq!(t.expire(at(before_wrap + 120)), 1);
    assert_eq!(t.get(&key(1), at(before_wrap + 159)), Some(1));
    assert_eq!(t.get(&key(1), at(before_wrap + 260)), None);
    assert_eq!(at(before_wrap + 60).millis_since(at(before_wrap)), 60);
    assert_eq!(at(before_wrap).millis_since(at(before_wrap + 60)), 0);
}

#[test]
fn tick_now_is_monotonic() {
    let a = Tick::now();
    let b = Tick::now();
    assert!(b.millis_since(a) < 1000);
    assert_eq!(a.millis_since(b), 0);
}

#[test]
fn retain_keeps_matching_entries_and_counts_the_rest_as_invalidated() {
    let t = FlowTable::<u32>::new(1000, IDLE);
    for n in 0..100 {
        t.insert(key(n), n % 3, at(0));
    }
    assert_eq!(t.retain(|_, &worker| worker != 1), 33);
    assert_eq!(t.len(), 67);
    assert_eq!(t.get(&key(1), at(1)), None);
    assert_eq!(t.get(&key(2), at(1)), Some(2));
    assert_eq!(t.retain(|&(a, _), _| a != key(0).0), 1);
    assert_eq!(t.counters().invalidated, 34);
}

#[test]
fn eviction_counts_live_entries_and_expiry_counts_idle_ones() {
    let t = FlowTable::<u32>::with_shards(2, Duration::from_millis(100), 1);
    t.insert(key(1), 1, at(0));
    t.insert(key(2), 2, at(0));
    t.insert(key(3), 3, at(10)); // pushes out 1, live
    t.insert(key(4), 4, at(500)); // pushes out 2, idle
    let c = t.counters();
    assert_eq!((c.inserted, c.evicted, c.expired), (4, 1, 1));
}

#[test]
fn a_spoofed_flood_neither_grows_the_table_nor_evicts_a_live_flow() {
    let t = FlowTable::<u32>::new(1000, IDLE);
    let legit = (ep(0xfe_00_01, 5353), ep(0xff_ff_ff, 53));
    t.insert(legit, 42, at(0));
    for n in 0..100_000 {
        let now = at(u64::from(n) / 100);
        if n % 100 == 0 {
            assert_eq!(t.get(&legit, now), Some(42), "live flow lost after {n}");
        }
        t.insert(key(n), n, now);
        assert!(t.len() <= t.capacity());
    }
    assert_eq!(t.len(), 1000);
    let c = t.counters();
    assert_eq!(c.inserted, 100_001);
    assert_eq!(c.evicted, 100_001 - 1000);
    assert!(t.heap_bytes() < 1000 * 200, "{} bytes", t.heap_bytes());
}

#[test]
fn threads_share_the_table() {
    let t = FlowTable::<u32>::new(100_000, IDLE);
    std::thread::scope(|s| {
        for thread in 0..4u32 {
            let t = &t;
            s.spawn(move || {
                for n in thread * 10_000..(thread + 1) * 10_000 {
                    t.insert(key(n), n, at(0));
                    assert_eq!(t.get(&key(n), at(1)), Some(n));
                    let other = key(n ^ 1);
                    assert_eq!(
                        t.get_or_insert_with(&other, at(1), || Some(n ^ 1))
                            .map(|v| v.0),
                        Some(n ^ 1)
                    );
                }
            });
        }
    });
    assert_eq!(t.len(), 40_000);
    assert_eq!(t.counters().inserted, 40_000);
    for n in 0..40_000 {
        assert_eq!(t.get(&key(n), at(2)), Some(n));
    }
}

#[test]
fn an_empty_table_allocates_little() {
    let t = FlowTable::<[u8; 24]>::new(1 << 20, IDLE);
    assert!(t.heap_bytes() < 64 * 1024, "{} bytes", t.heap_bytes());
}

#[test]
fn a_million_entries_fit_in_128_mib() {
    let t = FlowTable::<[u8; 24]>::new(1 << 20, IDLE);
    for n in 0..1_000_000u32 {
        let k = (ep(n, 1024 + (n >> 24) as u16), ep(0, 53));
        t.insert(k, [n as u8; 24], at(0));
    }
    assert_eq!(t.len(), 1_000_000);
    let bytes = t.heap_bytes();
    eprintln!(
        "flow table: {bytes} bytes for 1M entries, {:.1} bytes/entry",
        bytes as f64 / 1e6
    );
    assert!(bytes <= 128 << 20, "{bytes} bytes");
}

/// The table's semantics for one shard, spelled out on a `VecDeque` (most recent
/// first).
struct Model {
    cap: usize,
    idle_ms: u32,
    lru: VecDeque<(u8, u32, Tick)>,
    counters: FlowCounters,
}

impl Model {
    fn idle(&self, pos: usize, now: Tick) -> bool {
        now.millis_since(self.lru[pos].2) >= self.idle_ms
    }

    fn find(&self, k: u8) -> Option<usize> {
        self.lru.iter().position(|e| e.0 == k)
    }

    fn push_new(&mut self, k: u8, v: u32, now: Tick) {
        if self.lru.len() == self.cap {
            if self.idle(self.lru.len() - 1, now) {
                self.counters.expired += 1;
            } else {
                self.counters.evicted += 1;
            }
            self.lru.pop_back();
        }
        self.lru.push_front((k, v, now));
        self.counters.inserted += 1;
    }

    fn get(&mut self, k: u8, now: Tick) -> Option<u32> {
        let pos = self.find(k)?;
        let e = self.lru.remove(pos)?;
        if now.millis_since(e.2) >= self.idle_ms {
            self.counters.expired += 1;
            return None;
        }
        self.lru.push_front((k, e.1, now));
        Some(e.1)
    }

    fn get_or_insert(&mut self, k: u8, make: Option<u32>, now: Tick) -> Option<(u32, bool)> {
        match self.find(k) {
            Some(pos) if !self.idle(pos, now) => self.get(k, now).map(|v| (v, false)),
            Some(pos) => {
                self.lru.remove(pos);
                self.counters.expired += 1;
                let v = make?;
                self.counters.inserted += 1;
                self.lru.push_front((k, v, now));
                Some((v, true))
            }
            None => {
                let v = make?;
                self.push_new(k, v, now);
                Some((v, true))
            }
        }
    }

    fn insert(&mut self, k: u8, v: u32, now: Tick) {
        match self.find(k) {
            Some(pos) => {
                if self.idle(pos, now) {
                    self.counters.expired += 1;
                    self.counters.inserted += 1;
                }
                self.lru.remove(pos);
                self.lru.push_front((k, v, now));
            }
            None => self.push_new(k, v, now),
        }
    }

    fn remove(&mut self, k: u8) -> Option<u32> {
        let pos = self.find(k)?;
        self.lru.remove(pos).map(|e| e.1)
    }

    fn expire(&mut self, now: Tick) -> usize {
        let before = self.lru.len();
        let idle_ms = self.idle_ms;
        self.lru.retain(|e| now.millis_since(e.2) < idle_ms);
        let n = before - self.lru.len();
        self.counters.expired += n as u64;
        n
    }

    fn invalidate(&mut self, modulus: u8) -> usize {
        let before = self.lru.len();
        self.lru.retain(|e| e.0 % modulus != 0);
        let n = before - self.lru.len();
        self.counters.invalidated += n as u64;
        n
    }
}

#[derive(Clone, Debug)]
enum Op {
    Get(u8),
    GetOrInsert(u8, Option<u32>),
    Insert(u8, u32),
    Remove(u8),
    Expire,
    Retain(u8),
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..12u8;
    prop_oneof![
        4 => k.clone().prop_map(Op::Get),
        2 => (k.clone(), proptest::option::of(any::<u32>())).prop_map(|(k, v)| Op::GetOrInsert(k, v)),
        4 => (k.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
        1 => k.prop_map(Op::Remove),
        1 => Just(Op::Expire),
        1 => (1..6u8).prop_map(Op::Retain),
        3 => (0..60u16).prop_map(Op::Wait),
    ]
}

fn model_key(k: u8) -> FlowKey {
    key(u32::from(k) * 7919)
}

proptest! {
    #[test]
    fn one_shard_behaves_like_the_reference_lru(
        cap in 1..8usize,
        start in prop_oneof![Just(0u64), Just(u64::from(u32::MAX) - 300)],
        ops in proptest::collection::vec(op(), 0..200),
    ) {
        let t = FlowTable::<u32>::with_shards(cap, Duration::from_millis(100), 1);
        let mut m = Model { cap, idle_ms: 100, lru: VecDeque::new(), counters: FlowCounters::default() };
        let mut ms = start;
        for op in ops {
            let now = at(ms);
            match op {
                Op::Get(k) => prop_assert_eq!(t.get(&model_key(k), now), m.get(k, now)),
                Op::GetOrInsert(k, v) => prop_assert_eq!(
                    t.get_or_insert_with(&model_key(k), now, || v),
                    m.get_or_insert(k, v, now)
                ),
                Op::Insert(k, v) => {
                    t.insert(model_key(k), v, now);
                    m.insert(k, v, now);
                }
                Op::Remove(k) => prop_assert_eq!(t.remove(&model_key(k)), m.remove(k)),
                Op::Expire => prop_assert_eq!(t.expire(now), m.expire(now)),
                Op::Retain(modulus) => {
                    let ks: Vec<FlowKey> = (0..12).filter(|k| k % modulus == 0).map(model_key).collect();
                    prop_assert_eq!(t.retain(|k, _| !ks.contains(k)), m.invalidate(modulus));
                }
                Op::Wait(d) => ms += u64::from(d),
            }
            prop_assert_eq!(t.len(), m.lru.len());
            prop_assert_eq!(t.counters(), m.counters);
            let order: Vec<FlowKey> = m.lru.iter().map(|e| model_key(e.0)).collect();
            prop_assert_eq!(t.keys_by_recency(), order);
        }
    }
}
