//! Owned `mmap` regions: the UMEM (anonymous memory the kernel pins) and the rings (pages
//! of the AF_XDP socket).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};

use crate::error::last_os_error;

/// A shared or anonymous mapping, unmapped on drop.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is plain memory owned by this value alone; nothing about it is tied
// to the thread that created it, and moving it moves the only handle to the memory.
unsafe impl Send for Mapping {}

impl Mapping {
    /// `len` bytes of private anonymous memory, zero-filled.
    pub(crate) fn anonymous(len: usize, step: &str) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping aliases nothing; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Mapping::from_mmap(ptr, len, step)
    }

    /// `len` bytes of private anonymous memory, zero-filled, aligned to 2 MiB and marked
    /// for transparent huge pages (`MADV_HUGEPAGE`), for the UMEM. A consumer walks its
    /// frames in ring order, thousands of 4 KiB pages, one TLB miss per frame; with huge
    /// pages a whole 8 MiB UMEM is four TLB entries. Where THP is off (`never`) the
    /// advice is refused or ignored and the memory is ordinary pages: same behaviour,
    /// no error.
    pub(crate) fn anonymous_huge(len: usize, step: &str) -> io::Result<Mapping> {
        const HUGE: usize = 2 << 20;
        if len < HUGE {
            return Mapping::anonymous(len, step);
        }
        let raw = Mapping::anonymous(len + HUGE, step)?;
        let base = raw.as_ptr() as usize;
        let trim = huge_trim(base, len, HUGE, page_size());
        std::mem::forget(raw);
        // SAFETY: [base, base + len + HUGE) is the mapping just made, now owned here
        // alone (forgotten above); we unmap its unaligned head and tail, keep
        // [aligned, aligned + len) (rounded up to whole pages), and advise only that.
        unsafe {
            if trim.head > 0 {
                libc::munmap(base as *mut libc::c_void, trim.head);
            }
            if trim.tail_len > 0 {
                libc::munmap(trim.tail_start as *mut libc::c_void, trim.tail_len);
            }
            libc::madvise(trim.aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Mapping::from_mmap(trim.aligned as *mut libc::c_void, len, step)
    }

    /// `len` bytes of the object behind `fd` at page offset `offset`, shared and
    /// pre-faulted (an AF_XDP ring: `XDP_PGOFF_RX_RING`, `XDP_UMEM_PGOFF_FILL_RING`, ...).
    pub(crate) fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        offset: libc::off_t,
        step: &str,
    ) -> io::Result<Mapping> {
        // SAFETY: a new shared mapping of the socket's ring pages; the kernel picks the
        // address, so it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            )
        };
        Mapping::from_mmap(ptr, len, step)
    }

    fn from_mmap(ptr: *mut libc::c_void, len: usize, step: &str) -> io::Result<Mapping> {
        if ptr == libc::MAP_FAILED {
            return Err(last_os_error(format!("{step}: mmap of {len} bytes")));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other(format!("{step}: mmap returned NULL")))?;
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and every pointer derived
        // from them lives in a struct that owns (and so drops before or with) this one.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// How a mapping of `len + huge` bytes at `base` is cut down to `len` bytes aligned to
/// `huge`: unmap `head` bytes at `base` and `tail_len` at `tail_start`.
#[derive(Debug, PartialEq, Eq)]
struct HugeTrim {
    head: usize,
    aligned: usize,
    tail_start: usize,
    tail_len: usize,
}

/// munmap works in whole pages and fails (EINVAL, leaving everything mapped) at an
/// address that is not page-aligned; the kept range's own munmap at drop rounds its
/// length up. So the tail starts at the page boundary after `aligned + len`.
fn huge_trim(base: usize, len: usize, huge: usize, page: usize) -> HugeTrim {
    let aligned = base.next_multiple_of(huge);
    let tail_start = aligned + len.next_multiple_of(page);
    HugeTrim {
        head: aligned - base,
        aligned,
        tail_start,
        tail_len: (base + len + huge).next_multiple_of(page) - tail_start,
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length that is not a whole number of pages still leaves nothing of the
    /// oversized mapping behind: the tail is cut at a page boundary (an unaligned
    /// munmap fails and would leak the whole tail, up to 2 MiB per UMEM).
    #[test]
    fn the_trim_of_an_unaligned_length_is_page_aligned_and_complete() {
        const HUGE: usize = 2 << 20;
        let page = 4096;
        for base in [0x7f00_0000_0000usize, 0x7f00_0000_1000, 0x7f00_001f_f000] {
            for len in [HUGE, 3 * HUGE + 4096, 3 * HUGE + 100, 5 * HUGE - 1] {
                let t = huge_trim(base, len, HUGE, page);
                assert_eq!(t.aligned % HUGE, 0);
                assert_eq!(base + t.head, t.aligned);
                assert_eq!(t.tail_start % page, 0, "base {base:x} len {len}");
                assert!(t.tail_start >= t.aligned + len);
                // Everything mapped (whole pages) is either kept or unmapped.
                let end = (base + len + HUGE).next_multiple_of(page);
                assert_eq!(t.tail_start + t.tail_len, end);
                assert_eq!(t.head + (t.tail_start - t.aligned) + t.tail_len, end - base);
            }
        }
    }

    /// The UMEM mapping is 2 MiB-aligned (what lets the kernel back it with huge
    /// pages), exactly as long as asked, zero-filled and writable end to end; small
    /// requests are ordinary mappings.
    #[test]
    fn huge_mapping_is_aligned_zeroed_and_usable() {
        const HUGE: usize = 2 << 20;
        for len in [4 * HUGE, 3 * HUGE + 4096, 3 * HUGE + 100] {
            let m = Mapping::anonymous_huge(len, "test UMEM").expect("mmap");
            assert_eq!(m.as_ptr() as usize % HUGE, 0, "len {len}");
            assert_eq!(m.len(), len);
            // SAFETY: the mapping is `len` bytes of private memory owned by `m`.
            let bytes = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), len) };
            assert!(bytes.iter().step_by(4096).all(|b| *b == 0));
            bytes[0] = 1;
            bytes[len - 1] = 2;
            assert_eq!((bytes[0], bytes[len - 1]), (1, 2));
        }
        let small = Mapping::anonymous_huge(8192, "small").expect("mmap");
        assert_eq!(small.len(), 8192);
    }
}
