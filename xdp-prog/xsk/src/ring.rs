//! Single-producer/single-consumer rings shared with the kernel (the fill, RX, and later
//! TX and completion rings of an AF_XDP socket).
//!
//! Same protocol as libxdp's `xsk.h`: each side keeps cached copies of both indexes,
//! reads the other side's index (Acquire) only when its cache cannot satisfy a whole
//! batch, and publishes its own index (Release) once per batch. (libxdp's consumer
//! refreshes only when its cache is empty; refreshing when short of a batch costs the
//! same one load and yields fuller batches.) Indexes are free-running `u32`s; an entry's
//! slot is `index & mask`.

use std::io;
use std::mem::{align_of, size_of};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::mapping::Mapping;

/// One mapped ring: its pages, and where the kernel said the indexes and entries are.
struct RingMap<T> {
    /// Owned only to keep the pages mapped: the pointers below point into them.
    _map: Mapping,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    entries: *mut T,
    mask: u32,
    size: u32,
}

// SAFETY: the pointers all point into `_map`, which this struct owns; like `Mapping`, the
// ring has no affinity to a thread, and exclusive access goes with `&mut self`.
unsafe impl<T: Send> Send for RingMap<T> {}

impl<T: Copy> RingMap<T> {
    /// Interprets `map` as a ring of `size` entries using the offsets from
    /// `XDP_MMAP_OFFSETS`, checking that they lie inside the mapping and are aligned.
    fn new(map: Mapping, size: u32, off: &libc::xdp_ring_offset) -> io::Result<RingMap<T>> {
        let len = map.len() as u64;
        let entries_end = (size as u64)
            .checked_mul(size_of::<T>() as u64)
            .and_then(|bytes| bytes.checked_add(off.desc));
        let fits = |at: u64, bytes: u64, align: usize| {
            at.checked_add(bytes).is_some_and(|end| end <= len) && at.is_multiple_of(align as u64)
        };
        let ok = size.is_power_of_two()
            && fits(off.producer, 4, align_of::<AtomicU32>())
            && fits(off.consumer, 4, align_of::<AtomicU32>())
            && fits(off.flags, 4, align_of::<AtomicU32>())
            && entries_end.is_some_and(|end| end <= len)
            && off.desc.is_multiple_of(align_of::<T>() as u64);
        if !ok {
            return Err(io::Error::other(format!(
                "ring offsets from XDP_MMAP_OFFSETS do not fit a {len}-byte mapping of \
                 {size} entries: {off:?}"
            )));
        }
        // In bounds and aligned, as just checked; dereferenced only while `map` lives.
        let base = map.as_ptr();
        let producer = base.wrapping_add(off.producer as usize) as *const AtomicU32;
        let consumer = base.wrapping_add(off.consumer as usize) as *const AtomicU32;
        let flags = base.wrapping_add(off.flags as usize) as *const AtomicU32;
        let entries = base.wrapping_add(off.desc as usize) as *mut T;
        Ok(RingMap {
            _map: map,
            producer,
            consumer,
            flags,
            entries,
            mask: size - 1,
            size,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: in bounds and aligned (checked in `new`), valid while `self._map` lives;
        // the kernel only accesses it atomically (READ_ONCE/smp_store_release).
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.consumer }
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { &*self.flags }
    }

    /// The entry for `index`: in bounds, since `index & mask < size` and `new` checked
    /// that `size` entries fit the mapping.
    fn slot(&self, index: u32) -> *mut T {
        self.entries.wrapping_add((index & self.mask) as usize)
    }

    #[cfg(test)]
    fn mapping(&self) -> &Mapping {
        &self._map
    }
}

/// The side of a ring that userspace fills and the kernel drains (fill ring, TX ring).
pub(crate) struct ProducerRing<T> {
    ring: RingMap<T>,
    cached_prod: u32,
    /// The kernel's consumer index plus the ring size: `cached_cons - cached_prod` is the
    /// number of free slots as of the last look.
    cached_cons: u32,
}

impl<T: Copy> ProducerRing<T> {
    pub(crate) fn new(
        map: Mapping,
        size: u32,
        off: &libc::xdp_ring_offset,
    ) -> io::Result<ProducerRing<T>> {
        let ring = RingMap::new(map, size, off)?;
        let cached_prod = ring.producer().load(Ordering::Relaxed);
        let cached_cons = ring.consumer().load(Ordering::Acquire).wrapping_add(size);
        Ok(ProducerRing {
            ring,
            cached_prod,
            cached_cons,
        })
    }

    /// Number of free slots, at most `wanted`; reads the kernel's consumer index only if
    /// the cached view has fewer than `wanted`.
    pub(crate) fn free(&mut self, wanted: u32) -> u32 {
        let free = self.cached_cons.wrapping_sub(self.cached_prod);
        if free >= wanted {
            return wanted;
        }
        // Acquire: the kernel is done with the entries it consumed before we reuse them.
        self.cached_cons = self
            .ring
            .consumer()
            .load(Ordering::Acquire)
            .wrapping_add(self.ring.size);
        self.cached_cons.wrapping_sub(self.cached_prod).min(wanted)
    }

    /// Writes `value` into the `nth` slot after the last submitted one. The caller must
    /// have seen at least `nth + 1` slots from [`free`](Self::free) and not yet submitted
    /// them; writing elsewhere is memory-safe but corrupts the ring's contents.
    pub(crate) fn write(&mut self, nth: u32, value: T) {
        let slot = self.ring.slot(self.cached_prod.wrapping_add(nth));
        // SAFETY: `slot` is in bounds (masked); a free slot is not read by the kernel
        // until we publish it with `submit`.
        unsafe { slot.write(value) }
    }

    /// Publishes the `count` slots written since the last submit.
    pub(crate) fn submit(&mut self, count: u32) {
        if count == 0 {
            return;
        }
        self.cached_prod = self.cached_prod.wrapping_add(count);
        // Release: the entries are written before the kernel can see the new index.
        self.ring
            .producer()
            .store(self.cached_prod, Ordering::Release);
    }

    /// Whether the kernel asked for a syscall to notice new entries (`XDP_RING_NEED_WAKEUP`,
    /// only ever set when bound with `XDP_USE_NEED_WAKEUP`).
    pub(crate) fn needs_wakeup(&self) -> bool {
        self.ring.flags().load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    #[cfg(test)]
    pub(crate) fn mapping(&self) -> &Mapping {
        self.ring.mapping()
    }
}

/// The side of a ring that the kernel fills and userspace drains (RX ring, completion
/// ring).
pub(crate) struct ConsumerRing<T> {
    ring: RingMap<T>,
    cached_prod: u32,
    cached_cons: u32,
}

impl<T: Copy> ConsumerRing<T> {
    pub(crate) fn new(
        map: Mapping,
        size: u32,
        off: &libc::xdp_ring_offset,
    ) -> io::Result<ConsumerRing<T>> {
        let ring = RingMap::new(map, size, off)?;
        let cached_prod = ring.producer().load(Ordering::Acquire);
        let cached_cons = ring.consumer().load(Ordering::Relaxed);
        Ok(ConsumerRing {
            ring,
            cached_prod,
            cached_cons,
        })
    }

    /// Number of entries ready to read, at most `wanted`; reads the kernel's producer
    /// index only if the cached view has fewer than `wanted`. Does not consume them.
    pub(crate) fn available(&mut self, wanted: u32) -> u32 {
        let ready = self.cached_prod.wrapping_sub(self.cached_cons);
        if ready >= wanted {
            return wanted;
        }
        // Acquire: entries written by the kernel before it published this index are
        // visible to our reads below.
        self.cached_prod = self.ring.producer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons).min(wanted)
    }

    /// The `nth` entry after the last released one; `nth` must be below what
    /// [`available`](Self::available) returned (else: memory-safe, but a stale entry).
    pub(crate) fn read(&self, nth: u32) -> T {
        let slot = self.ring.slot(self.cached_cons.wrapping_add(nth));
        // SAFETY: `slot` is in bounds (masked) and aligned; an available entry is not
        // written by the kernel until we release it.
        unsafe { slot.read() }
    }

    /// Hands the next `count` entries back to the kernel.
    pub(crate) fn release(&mut self, count: u32) {
        if count == 0 {
            return;
        }
        self.cached_cons = self.cached_cons.wrapping_add(count);
        // Release: our reads of the entries happen before the kernel may overwrite them.
        self.ring
            .consumer()
            .store(self.cached_cons, Ordering::Release);
    }

    pub(crate) fn size(&self) -> u32 {
        self.ring.size
    }

    #[cfg(test)]
    pub(crate) fn mapping(&self) -> &Mapping {
        self.ring.mapping()
    }
}

#[cfg(test)]
mod tests {
    //! The ring protocol against a ring in anonymous memory, with the test playing the
    //! kernel's side through the same atomics.
    use super::*;

    const SIZE: u32 = 8;

    fn offsets() -> libc::xdp_ring_offset {
        // Kernel-like layout: indexes on separate cache lines, entries after them.
        libc::xdp_ring_offset {
            producer: 0,
            consumer: 64,
            flags: 128,
            desc: 192,
        }
    }

    fn mapping() -> Mapping {
        Mapping::anonymous(4096, "test ring").expect("mmap")
    }

    fn index(map: &Mapping, at: u64) -> &AtomicU32 {
        let ptr = map.as_ptr().wrapping_add(at as usize) as *const AtomicU32;
        // SAFETY: test-only; `at` is one of the aligned in-bounds offsets above.
        unsafe { &*ptr }
    }

    fn entry_ptr(map: &Mapping, slot: u32) -> *mut u64 {
        (map.as_ptr().wrapping_add(192) as *mut u64).wrapping_add(slot as usize)
    }

    fn entry(map: &Mapping, slot: u32) -> u64 {
        // SAFETY: test-only; slot < SIZE entries of u64 after `desc`, inside the page.
        unsafe { entry_ptr(map, slot).read() }
    }

    #[test]
    fn producer_fills_until_full_then_sees_kernel_consumption() {
        let mut ring = ProducerRing::<u64>::new(mapping(), SIZE, &offsets()).unwrap();
        assert_eq!(ring.free(100), SIZE);
        for i in 0..SIZE {
            ring.write(i, 1000 + i as u64);
        }
        ring.submit(SIZE);
        let map = ring.mapping();
        assert_eq!(index(map, 0).load(Ordering::Relaxed), SIZE);
        assert_eq!(entry(map, 3), 1003);
        assert_eq!(ring.free(1), 0);

        // The "kernel" consumes three entries; the index wraps past the end of the ring.
        index(ring.mapping(), 64).store(3, Ordering::Release);
        assert_eq!(ring.free(100), 3);
        for i in 0..3 {
            ring.write(i, 2000 + i as u64);
        }
        ring.submit(3);
        assert_eq!(entry(ring.mapping(), 0), 2000);
        assert_eq!(entry(ring.mapping(), 2), 2002);
        assert_eq!(index(ring.mapping(), 0).load(Ordering::Relaxed), SIZE + 3);
    }

    #[test]
    fn producer_indexes_wrap_around_u32() {
        let map = mapping();
        index(&map, 0).store(u32::MAX - 1, Ordering::Relaxed);
        index(&map, 64).store(u32::MAX - 1, Ordering::Relaxed);
        let mut ring = ProducerRing::<u64>::new(map, SIZE, &offsets()).unwrap();
        assert_eq!(ring.free(SIZE), SIZE);
        ring.write(0, 7);
        ring.write(1, 8);
        ring.write(2, 9);
        ring.submit(3);
        assert_eq!(index(ring.mapping(), 0).load(Ordering::Relaxed), 1);
        assert_eq!(ring.free(SIZE), SIZE - 3);
    }

    #[test]
    fn consumer_reads_only_published_entries_and_releases_them() {
        let mut ring = ConsumerRing::<u64>::new(mapping(), SIZE, &offsets()).unwrap();
        assert_eq!(ring.available(SIZE), 0);
        // The "kernel" writes two entries, then publishes them.
        for (slot, value) in [(0, 11), (1, 12)] {
            // SAFETY: test-only write into an unpublished slot of the entry array.
            unsafe { entry_ptr(ring.mapping(), slot).write(value) }
        }
        index(ring.mapping(), 0).store(2, Ordering::Release);
        assert_eq!(ring.available(1), 1);
        assert_eq!(ring.available(SIZE), 2);
        assert_eq!((ring.read(0), ring.read(1)), (11, 12));
        // Peeking does not consume.
        assert_eq!(ring.available(SIZE), 2);
        ring.release(2);
        assert_eq!(index(ring.mapping(), 64).load(Ordering::Relaxed), 2);
        assert_eq!(ring.available(SIZE), 0);
    }

    #[test]
    fn offsets_outside_the_mapping_are_refused() {
        let mut off = offsets();
        off.desc = 4096 - 8; // 8 entries of 8 bytes do not fit
        assert!(ConsumerRing::<u64>::new(mapping(), SIZE, &off).is_err());
        let mut off = offsets();
        off.consumer = 66; // misaligned
        assert!(ProducerRing::<u64>::new(mapping(), SIZE, &off).is_err());
        assert!(ProducerRing::<u64>::new(mapping(), 6, &offsets()).is_err());
    }
}
