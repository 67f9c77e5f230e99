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
