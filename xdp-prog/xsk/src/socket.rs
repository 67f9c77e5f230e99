//! An AF_XDP socket bound to one RX queue, with its own UMEM, fill ring and RX ring.
//!
//! Receive only: flynode transmits through ordinary sockets (DESIGN.md). Adding TX means
//! a `ProducerRing<xdp_desc>` for `XDP_TX_RING` and mapping the completion ring (already
//! sized here, since the kernel insists on one) as a `ConsumerRing<u64>`, plus taking
//! frames for TX from `free_frames`.

use std::fmt;
use std::io;
use std::mem::{MaybeUninit, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::time::Duration;

use crate::error::{last_os_error, step_error};
use crate::mapping::Mapping;
use crate::ring::{ConsumerRing, ProducerRing};

/// How to bind: what the caller wants from the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    /// Zero-copy if the driver supports it, copy otherwise. Binds with neither
    /// `XDP_ZEROCOPY` nor `XDP_COPY`, which makes the kernel try zero-copy and fall back
    /// to copy on any driver error (`xp_assign_dev`), then asks which one it got.
    Auto,
    /// Copy mode (`XDP_COPY`): works on every device, with XDP in native or generic mode.
    Copy,
    /// Zero-copy (`XDP_ZEROCOPY`): fail rather than fall back to copying.
    ZeroCopy,
}

/// How a socket ended up bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XskMode {
    /// The kernel copies each frame into the UMEM.
    Copy,
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
}

impl fmt::Display for XskMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XskMode::Copy => "copy",
            XskMode::ZeroCopy => "zero-copy",
        })
    }
}

/// Sizes and flags of an AF_XDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskConfig {
    /// Frames in the UMEM. Frames beyond `ring_size` wait in a free list and enter the
    /// fill ring as it drains.
    pub frame_count: u32,
    /// Bytes per frame: a power of two from 2048 to the page size (4096).
    pub frame_size: u32,
    /// Entries of the RX and fill rings: a power of two.
    pub ring_size: u32,
    pub mode: BindMode,
    /// Bind with `XDP_USE_NEED_WAKEUP`: the driver stops polling an empty fill ring and
    /// raises a flag instead; [`XskSocket::recv_batch`] then kicks it with a syscall.
    /// Saves the driver's busy polling in zero-copy mode; no effect in copy mode.
    pub need_wakeup: bool,
}

impl Default for XskConfig {
    fn default() -> XskConfig {
        XskConfig {
            frame_count: 4096,
            frame_size: 2048,
            ring_size: 2048,
            mode: BindMode::Auto,
            need_wakeup: true,
        }
    }
}

impl XskConfig {
    /// Bytes of UMEM this configuration maps, or an error naming the bad field.
    fn umem_len(&self) -> io::Result<usize> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        if !self.frame_size.is_power_of_two() || self.frame_size < 2048 {
            return Err(invalid(format!(
                "AF_XDP frame_size {} must be a power of two of at least 2048",
                self.frame_size
            )));
        }
        if !self.ring_size.is_power_of_two() {
            return Err(invalid(format!(
                "AF_XDP ring_size {} must be a power of two",
                self.ring_size
            )));
        }
        if self.frame_count == 0 {
            return Err(invalid("AF_XDP frame_count must not be 0".into()));
        }
        (self.frame_count as usize)
            .checked_mul(self.frame_size as usize)
            .ok_or_else(|| invalid("AF_XDP UMEM size overflows".into()))
    }
}

/// Counters the kernel keeps per AF_XDP socket (`XDP_STATISTICS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStatistics {
    /// Frames dropped for any reason other than an invalid descriptor (e.g. no frame in
    /// the fill ring, frame too big for a chunk).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full (userspace too slow).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty.
    pub rx_fill_ring_empty_descs: u64,
    pub tx_ring_empty_descs: u64,
    /// False on kernels before 5.9, which report only the first three counters; the
    /// other three then read 0.
    pub extended: bool,
}

/// An AF_XDP socket receiving from one queue of one interface.
///
/// Put [`fd`](Self::fd) into the XSKMAP at [`queue`](Self::queue) so the XDP program can
/// redirect to it, then call [`recv_batch`](Self::recv_batch) in a loop, with
/// [`wait`](Self::wait) when it returns 0.
pub struct XskSocket {
    // Fields drop in declaration order: the socket is closed (and unbound from the
    // device) before its rings and its UMEM are unmapped.
    fd: OwnedFd,
    rx: ConsumerRing<libc::xdp_desc>,
    fill: ProducerRing<u64>,
    umem: Mapping,
    /// Clears the offset of a frame address within its chunk (aligned UMEM mode: the
    /// kernel hands out `chunk + XDP_PACKET_HEADROOM + metadata`, wants chunks back).
    chunk_mask: u64,
    /// Frames owned by userspace and not in the fill ring; capacity `frame_count`, so
    /// pushing never allocates.
    free_frames: Vec<u64>,
    ifindex: u32,
    queue: u32,
    mode: XskMode,
}

impl XskSocket {
    /// Creates an AF_XDP socket with a fresh UMEM and binds it to `queue` of the
    /// interface `ifindex` (in the calling thread's network namespace).
    ///
    /// Binding needs no XDP program; frames arrive once a program redirects them into an
    /// XSKMAP holding this socket at index `queue`.
    ///
    /// Errors name the failing step and keep the errno ([`crate::errno`]). Notable ones
    /// from bind: `ENODEV` (no such ifindex), `EINVAL` (no such queue), `EOPNOTSUPP`
    /// (zero-copy demanded from a driver without it, e.g. veth), and `EBUSY` (queue taken).
    /// `EBUSY` also happens for a few tens of milliseconds after the previous socket on
    /// the queue was dropped: the kernel releases the queue from a workqueue, after
    /// `close` returns; retry to reopen a queue.
    pub fn open(ifindex: u32, queue: u32, config: &XskConfig) -> io::Result<XskSocket> {
        let umem_len = config.umem_len()?;
        let ring_size = config.ring_size;

        // SAFETY: plain socket(2); the returned fd is checked before use.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(last_os_error("socket(AF_XDP)"));
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let umem = Mapping::anonymous_huge(umem_len, "UMEM")?;
        let reg = libc::xdp_umem_reg {
            addr: umem.as_ptr() as u64,
            len: umem_len as u64,
            chunk_size: config.frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        set_opt(fd.as_fd(), libc::XDP_UMEM_REG, &reg).map_err(|e| {
            step_error(
                format!(
                    "XDP_UMEM_REG ({} frames of {} bytes)",
                    config.frame_count, config.frame_size
                ),
                e,
            )
        })?;
        for (opt, name) in [
            (libc::XDP_UMEM_FILL_RING, "XDP_UMEM_FILL_RING"),
            (libc::XDP_UMEM_COMPLETION_RING, "XDP_UMEM_COMPLETION_RING"),
            (libc::XDP_RX_RING, "XDP_RX_RING"),
        ] {
            set_opt(fd.as_fd(), opt, &ring_size)
                .map_err(|e| step_error(format!("ring setup: {name} ({ring_size} entries)"), e))?;
        }

        let off = mmap_offsets(fd.as_fd())?;
        let fill_len = off.fr.desc as usize + ring_size as usize * size_of::<u64>();
        let fill_map = Mapping::shared(
            fd.as_fd(),
            fill_len,
            libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            "ring setup: fill ring",
        )?;
        let mut fill = ProducerRing::<u64>::new(fill_map, ring_size, &off.fr)?;
        let rx_len = off.rx.desc as usize + ring_size as usize * size_of::<libc::xdp_desc>();
        let rx_map = Mapping::shared(
            fd.as_fd(),
            rx_len,
            libc::XDP_PGOFF_RX_RING,
            "ring setup: RX ring",
        )?;
        let rx = ConsumerRing::<libc::xdp_desc>::new(rx_map, ring_size, &off.rx)?;

        // Filled before bind, so a zero-copy driver has buffers the moment it starts.
        let frame_size = u64::from(config.frame_size);
        let initial = fill.free(config.frame_count.min(ring_size));
        for i in 0..initial {
            fill.write(i, u64::from(i) * frame_size);
        }
        fill.submit(initial);
        let mut free_frames = Vec::with_capacity(config.frame_count as usize);
        free_frames.extend((initial..config.frame_count).map(|i| u64::from(i) * frame_size));

        bind(fd.as_fd(), ifindex, queue, config)?;
        let mode = bound_mode(fd.as_fd())?;

        Ok(XskSocket {
            fd,
            rx,
            fill,
            umem,
            chunk_mask: !(frame_size - 1),
            free_frames,
            ifindex,
            queue,
            mode,
        })
    }

    /// The socket, to insert into an XSKMAP at index [`queue`](Self::queue).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// Whether the kernel copies frames into the UMEM or the driver writes them there.
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// Calls `f` with each of up to `max` received frames (Ethernet header first, no XDP
    /// metadata: if the program added some with `bpf_xdp_adjust_meta`, the kernel copies
    /// it into the UMEM just before the frame, outside the slice), in arrival order, then
    /// gives their buffers back to the kernel. Returns how many
    /// frames `f` saw; 0 when none were waiting (then [`wait`](Self::wait)).
    ///
    /// The shared ring indexes are read and written once per batch, the fill ring is
    /// refilled once per batch, and nothing allocates. A syscall happens only when the
    /// driver asked to be woken up (zero-copy with `need_wakeup`). If `f` panics, no
    /// frame of the batch is consumed: the next call delivers them again.
    pub fn recv_batch(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> usize {
        let wanted = max.min(self.rx.size() as usize) as u32;
        let count = self.rx.available(wanted);
        if count == 0 {
            self.refill(0);
            return 0;
        }
        for i in 0..count {
            let desc = self.rx.read(i);
            f(self.frame(desc.addr, desc.len));
        }
        self.refill(count);
        self.rx.release(count);
        count as usize
    }

    /// Moves the chunks of the first `received` RX descriptors, then free frames, into
    /// the fill ring, as far as it has room; the rest go to the free list.
    fn refill(&mut self, received: u32) {
        let pending = received as usize + self.free_frames.len();
        if pending > 0 {
            let space = self.fill.free(pending.min(u32::MAX as usize) as u32);
            let mut written = 0;
            for i in 0..received {
                let chunk = self.rx.read(i).addr & self.chunk_mask;
                if written < space {
                    self.fill.write(written, chunk);
                    written += 1;
                } else {
                    self.free_frames.push(chunk);
                }
            }
            while written < space {
                let Some(chunk) = self.free_frames.pop() else {
                    break;
                };
                self.fill.write(written, chunk);
                written += 1;
            }
            self.fill.submit(written);
        }
        if self.fill.needs_wakeup() {
            self.kick();
        }
    }

    /// The bytes of a received frame. The kernel only produces descriptors inside the
    /// UMEM; one that is not (a kernel bug) reads as an empty frame.
    fn frame(&self, addr: u64, len: u32) -> &[u8] {
        let in_umem = addr
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= self.umem.len() as u64);
        if !in_umem {
            return &[];
        }
        let start = self.umem.as_ptr().wrapping_add(addr as usize);
        // SAFETY: [addr, addr + len) lies inside the UMEM mapping (checked above), which
        // lives as long as `self`. The frame is ours until its chunk goes back to the fill
        // ring, which happens only after the borrow handed to the caller has ended, so
        // the kernel does not write to it while the slice exists.
        unsafe { std::slice::from_raw_parts(start, len as usize) }
    }

    /// Tells the driver the fill ring has buffers again.
    fn kick(&self) {
        // SAFETY: recvfrom with a null zero-length buffer and no address: the kernel
        // writes nothing. The result is irrelevant: the call only wakes up the driver.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
                ptr::null_mut(),
            );
        }
    }

    /// Waits up to `timeout` for frames; true if the RX ring has some. An interrupted
    /// wait returns false.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up, so a sub-millisecond timeout still sleeps rather than spins.
        let millis = timeout
            .as_nanos()
            .div_ceil(1_000_000)
            .min(libc::c_int::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd, count 1.
        let ret = unsafe { libc::poll(&mut pfd, 1, millis) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(step_error("poll(AF_XDP socket)", err));
        }
        if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other(format!(
                "poll(AF_XDP socket): revents {:#x}",
                pfd.revents
            )));
        }
        Ok(pfd.revents & libc::POLLIN != 0)
    }

    /// The kernel's counters for this socket.
    pub fn statistics(&self) -> io::Result<XskStatistics> {
        let (stats, len) = get_opt::<libc::xdp_statistics>(self.fd.as_fd(), libc::XDP_STATISTICS)
            .map_err(|e| step_error("getsockopt(XDP_STATISTICS)", e))?;
        // Kernels before 5.9 fill in only `struct xdp_statistics_v1` and say so in optlen.
        let extended = len >= size_of::<libc::xdp_statistics>();
        Ok(XskStatistics {
            rx_dropped: stats.rx_dropped,
            rx_invalid_descs: stats.rx_invalid_descs,
            tx_invalid_descs: stats.tx_invalid_descs,
            rx_ring_full: if extended { stats.rx_ring_full } else { 0 },
            rx_fill_ring_empty_descs: if extended {
                stats.rx_fill_ring_empty_descs
            } else {
                0
            },
            tx_ring_empty_descs: if extended {
                stats.tx_ring_empty_descs
            } else {
                0
            },
            extended,
        })
    }
}

impl fmt::Debug for XskSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XskSocket")
            .field("fd", &self.fd.as_raw_fd())
            .field("ifindex", &self.ifindex)
            .field("queue", &self.queue)
            .field("mode", &self.mode)
            .field("umem_bytes", &self.umem.len())
            .field("rx_ring", &self.rx.size())
            .finish()
    }
}

fn bind(fd: BorrowedFd<'_>, ifindex: u32, queue: u32, config: &XskConfig) -> io::Result<()> {
    let mut flags = match config.mode {
        BindMode::Auto => 0,
        BindMode::Copy => libc::XDP_COPY,
        BindMode::ZeroCopy => libc::XDP_ZEROCOPY,
    };
    if config.need_wakeup {
        flags |= libc::XDP_USE_NEED_WAKEUP;
    }
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: 0,
    };
    // SAFETY: `addr` is a valid sockaddr_xdp and the length passed is its size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_xdp).cast(),
            size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        let mode = match config.mode {
            BindMode::Auto => "auto",
            BindMode::Copy => "copy",
            BindMode::ZeroCopy => "zero-copy",
        };
        return Err(last_os_error(format!(
            "bind AF_XDP socket to ifindex {ifindex} queue {queue} ({mode} mode)"
        )));
    }
    Ok(())
}

fn bound_mode(fd: BorrowedFd<'_>) -> io::Result<XskMode> {
    let (options, _) = get_opt::<libc::xdp_options>(fd, libc::XDP_OPTIONS)
        .map_err(|e| step_error("getsockopt(XDP_OPTIONS)", e))?;
    Ok(if options.flags & libc::XDP_OPTIONS_ZEROCOPY != 0 {
        XskMode::ZeroCopy
    } else {
        XskMode::Copy
    })
}

/// Where the indexes and entries of each ring are in its mapping.
fn mmap_offsets(fd: BorrowedFd<'_>) -> io::Result<libc::xdp_mmap_offsets> {
    let (mut off, len) = get_opt::<libc::xdp_mmap_offsets>(fd, libc::XDP_MMAP_OFFSETS)
        .map_err(|e| step_error("ring setup: getsockopt(XDP_MMAP_OFFSETS)", e))?;
    if len == size_of::<libc::xdp_mmap_offsets_v1>() {
        // Before 5.4 there was no flags word; the kernel filled in the v1 layout, which
        // puts the rings' fields at different places in our buffer. As libxdp does, place
        // the (never set) flags right after the consumer index.
        // SAFETY: the kernel wrote a `xdp_mmap_offsets_v1` (len says so), which is
        // smaller than and as aligned as the buffer; all fields are integers.
        let v1: libc::xdp_mmap_offsets_v1 =
            unsafe { ptr::read((&off as *const libc::xdp_mmap_offsets).cast()) };
        let convert = |r: libc::xdp_ring_offset_v1| libc::xdp_ring_offset {
            producer: r.producer,
            consumer: r.consumer,
            desc: r.desc,
            flags: r.consumer + size_of::<u32>() as u64,
        };
        off = libc::xdp_mmap_offsets {
            rx: convert(v1.rx),
            tx: convert(v1.tx),
            fr: convert(v1.fr),
            cr: convert(v1.cr),
        };
    } else if len != size_of::<libc::xdp_mmap_offsets>() {
        return Err(io::Error::other(format!(
            "ring setup: XDP_MMAP_OFFSETS returned {len} bytes, expected {}",
            size_of::<libc::xdp_mmap_offsets>()
        )));
    }
    Ok(off)
}

fn set_opt<T>(fd: BorrowedFd<'_>, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and the length passed is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt(SOL_XDP, opt)` into a zeroed `T`; also returns how many bytes the kernel
/// wrote. `T` must be a plain-integer struct (all-zero is a valid value).
fn get_opt<T: Copy>(fd: BorrowedFd<'_>, opt: libc::c_int) -> io::Result<(T, usize)> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the buffer is writable for `len` bytes, and `len` is a valid in/out length.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            opt,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised above and `T` is made of integers (this function's
    // contract), so every byte pattern the kernel may have left is a valid `T`.
    let value = unsafe { value.assume_init() };
    Ok((value, len as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let config = XskConfig::default();
        assert_eq!(config.umem_len().unwrap(), 4096 * 2048);
        assert_eq!(config.mode, BindMode::Auto);
        assert!(config.need_wakeup);
    }

    #[test]
    fn invalid_sizes_are_refused_before_any_syscall() {
        for config in [
            XskConfig {
                frame_size: 3000,
                ..Default::default()
            },
            XskConfig {
                frame_size: 1024,
                ..Default::default()
            },
            XskConfig {
                ring_size: 1000,
                ..Default::default()
            },
            XskConfig {
                frame_count: 0,
                ..Default::default()
            },
        ] {
            let err = XskSocket::open(1, 0, &config).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{config:?}: {err}");
        }
    }

    #[test]
    fn modes_display_as_operators_say_them() {
        assert_eq!(XskMode::Copy.to_string(), "copy");
        assert_eq!(XskMode::ZeroCopy.to_string(), "zero-copy");
    }
}
