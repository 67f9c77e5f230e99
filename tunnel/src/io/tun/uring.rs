//! Writing a batch of packets to the TUN with one system call.
//!
//! A TUN device takes one packet per `write(2)`, and the kernel processes each packet
//! inside that call: forwarding, and delivery to a local receiver, waking it. When the
//! receiver shares the CPU (a container on a busy host, the benchmark's on CPU1), the
//! wakeup makes the scheduler switch to it as the `write` returns to userspace: it reads
//! one datagram and sleeps again, and writer and reader ping-pong once per packet. With
//! io_uring, all the writes of a batch are issued inside one `io_uring_enter`; the
//! receiver runs once the batch is in, and drains it with one `recvmmsg`. Measured on
//! this kind of machine (writer and reader on one CPU, 1228-byte packets): 2.6-3.9 µs
//! per packet with `write`, the reader getting 1.1 datagrams per call, against 1.9-2.6
//! µs with io_uring and 64 per call.
//!
//! TUN writes never block, so the kernel issues them inline, in submission order, during
//! the submitting call (no io-wq worker threads). Where io_uring is unavailable (kernels
//! with it disabled by `kernel.io_uring_disabled`, seccomp filters of container
//! runtimes), writes fall back to one `write(2)` each, the same results.
//!
//! The ring may only write (`IORING_REGISTER_RESTRICTIONS`). The systemd unit's
//! `SystemCallFilter=@system-service` includes the io_uring calls (`@aio`).
//!
//! The `io-uring` crate (tokio-rs) does the ring setup and memory ordering; the unsafe
//! part here is handing it buffer pointers, which stay borrowed until their completions
//! are reaped (every call waits for all of its writes).
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

/// Submission queue entries: the most writes in flight per system call.
const RING_ENTRIES: usize = 256;

enum Ring {
    /// Not needed yet (rings are created on the first batch, by the thread that owns
    /// the batch).
    Untried,
    Ready(Box<IoUring>),
    /// Setting one up failed: `write(2)` per packet.
    Unavailable,
}

/// One thread's means of writing batches to a TUN file descriptor.
pub(super) struct BatchWriter {
    ring: Ring,
}

impl BatchWriter {
    pub(super) fn new() -> BatchWriter {
        BatchWriter {
            ring: Ring::Untried,
        }
    }

    /// Whether batches go through io_uring (known after the first batch).
    pub(super) fn batched(&self) -> Option<bool> {
        match self.ring {
            Ring::Untried => None,
            Ring::Ready(_) => Some(true),
            Ring::Unavailable => Some(false),
        }
    }

    /// Writes packets `0..n` (`packet(i)` is the i-th, one `write(2)` each) to `fd`, in
    /// order, and reports each result: `done(i, Ok(bytes))` or `done(i, Err(errno))`.
    pub(super) fn write_all<'a>(
        &mut self,
        fd: RawFd,
        n: usize,
        packet: impl Fn(usize) -> &'a [u8],
        mut done: impl FnMut(usize, Result<usize, i32>),
    ) {
        if n == 0 {
            return;
        }
        if matches!(self.ring, Ring::Untried) {
            self.ring = match write_only_ring() {
                Ok(ring) => Ring::Ready(Box::new(ring)),
                Err(e) => {
                    tracing::info!(
                        error = %e,
                        "io_uring unavailable: TUN writes fall back to one write(2) per packet"
                    );
                    Ring::Unavailable
                }
            };
        }
        let Ring::Ready(ring) = &mut self.ring else {
            for i in 0..n {
                done(i, write_retrying(fd, packet(i)));
            }
            return;
        };
        let mut first = 0;
        while first < n {
            let count = (n - first).min(RING_ENTRIES);
            {
                let mut sq = ring.submission();
                for k in 0..count {
                    let p = packet(first + k);
                    let len = u32::try_from(p.len()).unwrap_or(u32::MAX);
                    let entry = opcode::Write::new(types::Fd(fd), p.as_ptr(), len)
                        .build()
                        .user_data(k as u64);
                    // SAFETY: the buffer `p` borrows outlives this call, and the call
                    // waits below for the completion of every entry it submits. The
                    // queue is empty here (every earlier round was reaped) and `count`
                    // is at most its size, so the push cannot fail.
                    unsafe { sq.push(&entry) }.expect("submission queue has room");
                }
            }
            let mut reaped = 0;
            while reaped < count {
                if let Err(e) = ring.submit_and_wait(count - reaped) {
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    // io_uring_enter itself failed (not a write): nothing can be
                    // assumed about the entries, so wait for them without submitting
                    // more, then finish this batch (and the next ones) with write(2).
                    tracing::warn!(error = %e, "io_uring_enter failed; TUN writes fall back to write(2)");
                    drain(ring, count - reaped, &mut |k, r| {
                        done(first + k, r);
                    });
                    self.ring = Ring::Unavailable;
                    for i in first + count..n {
                        done(i, write_retrying(fd, packet(i)));
                    }
                    return;
                }
                for cqe in ring.completion() {
                    let k = cqe.user_data() as usize;
                    let r = cqe.result();
                    done(first + k, if r >= 0 { Ok(r as usize) } else { Err(-r) });
                    reaped += 1;
                }
            }
            first += count;
        }
    }
}

/// A ring restricted to `IORING_OP_WRITE` (IORING_REGISTER_RESTRICTIONS, set while the
/// ring is still disabled): whatever else goes wrong, it can do nothing but the writes
/// this module submits.
fn write_only_ring() -> io::Result<IoUring> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(RING_ENTRIES as u32)?;
    let submitter = ring.submitter();
    submitter.register_restrictions(&mut [io_uring::register::Restriction::sqe_op(
        opcode::Write::CODE,
    )])?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// Reaps up to `left` outstanding completions, for up to a second (the writes were
/// issued inline; this only matters if a kernel punted one to a worker). Writes still
/// outstanding after that are not reported.
fn drain(ring: &mut IoUring, mut left: usize, done: &mut impl FnMut(usize, Result<usize, i32>)) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while left > 0 && std::time::Instant::now() < deadline {
        if let Err(e) = ring.submitter().submit_and_wait(1)
            && e.raw_os_error() != Some(libc::EINTR)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for cqe in ring.completion() {
            let r = cqe.result();
            done(
                cqe.user_data() as usize,
                if r >= 0 { Ok(r as usize) } else { Err(-r) },
            );
            left = left.saturating_sub(1);
        }
    }
}

fn write_retrying(fd: RawFd, p: &[u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: `p` is a valid readable buffer of `p.len()` bytes.
        let rc = unsafe { libc::write(fd, p.as_ptr().cast(), p.len()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if errno != libc::EINTR {
            return Err(errno);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    /// More writes than the ring holds, in several rounds: every one reported once, and
    /// the bytes arrive in submission order.
    #[test]
    fn writes_arrive_in_order_across_rounds() {
        let (mut rx, tx) = pipe();
        let packets: Vec<Vec<u8>> = (0..600u32)
            .map(|i| format!("{i:05};").into_bytes())
            .collect();
        let mut writer = BatchWriter::new();
        let mut results = vec![None; packets.len()];
        writer.write_all(
            tx.as_raw_fd(),
            packets.len(),
            |i| &packets[i],
            |i, r| {
                assert!(results[i].is_none(), "write {i} reported twice");
                results[i] = Some(r);
            },
        );
        assert_eq!(writer.batched(), Some(true), "io_uring is available here");
        assert!(results.iter().all(|r| *r == Some(Ok(6))), "{results:?}");
        drop(tx);
        let mut got = String::new();
        rx.read_to_string(&mut got).unwrap();
        let want: String = packets.iter().map(|p| String::from_utf8_lossy(p)).collect();
        assert_eq!(got, want);
    }

    /// A failed write is reported with its errno and the others still happen.
    #[test]
    fn errors_are_reported_per_write() {
        let (rx, tx) = pipe();
        // No reader: EPIPE (Rust's runtime ignores SIGPIPE).
        drop(rx);
        let mut writer = BatchWriter::new();
        let mut results = Vec::new();
        writer.write_all(tx.as_raw_fd(), 3, |_| b"x", |i, r| results.push((i, r)));
        results.sort();
        assert_eq!(
            results,
            vec![
                (0, Err(libc::EPIPE)),
                (1, Err(libc::EPIPE)),
                (2, Err(libc::EPIPE))
            ]
        );
    }

    /// The ring refuses every operation but a write.
    #[test]
    fn the_ring_may_only_write() {
        let mut ring = write_only_ring().expect("ring");
        // SAFETY: a no-op entry references no memory.
        unsafe {
            ring.submission()
                .push(&opcode::Nop::new().build().user_data(7))
        }
        .unwrap();
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().expect("completion");
        assert_eq!((cqe.user_data(), cqe.result()), (7, -libc::EACCES));
    }
}
