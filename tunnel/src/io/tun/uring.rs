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
//! Reading works the same way in the other direction ([`BatchReader`]): a TUN gives one
//! packet per `read(2)`, and a local sender (a container, the benchmark's iperf3) that
//! outruns the mesh leaves hundreds queued. The reads of a round are issued inline in
//! one `io_uring_enter` with `RWF_NOWAIT`, so a read that finds the queue empty
//! completes at once with EAGAIN. `bench_tun_read_rounds` (1392-byte datagrams, same
//! run): `recv_batch` costs 822 ns per datagram with `read(2)`, 696 ns in rounds. The
//! reader also waits through io_uring after a busy batch ([`BatchReader::wait_readable`]).
//!
//! The `io-uring` crate (tokio-rs) does the ring setup and memory ordering; the unsafe
//! part here is handing it buffer pointers, which stay borrowed until their completions
//! are reaped (every call waits for all of its reads and writes).
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

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

impl Ring {
    /// Sets up the ring on first use, allowed only `ops`; where that fails, says so
    /// once and stays unavailable (`what` falls back to one `call` per packet).
    fn ensure(&mut self, ops: &[u8], what: &str, call: &str) {
        if !matches!(self, Ring::Untried) {
            return;
        }
        *self = match restricted_ring(ops) {
            Ok(ring) => Ring::Ready(Box::new(ring)),
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "io_uring unavailable: TUN {what} fall back to one {call} per packet"
                );
                Ring::Unavailable
            }
        };
    }

    fn batched(&self) -> Option<bool> {
        match self {
            Ring::Untried => None,
            Ring::Ready(_) => Some(true),
            Ring::Unavailable => Some(false),
        }
    }
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
        self.ring.batched()
    }

    /// Writes packets `0..n` (`packet(i)` is the i-th, one `write(2)` each) to `fd`, in
    /// order, and reports each result: `done(i, Ok(bytes))` or `done(i, Err(errno))`.
    /// Two or more go through io_uring, one system call for all; a single packet is a
    /// plain `write(2)`.
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
        if n == 1 {
            // One packet (a ping, an idle mesh): `write(2)`. One system call either
            // way, but the first io_uring_enter after the thread slept cost about 15 µs
            // more than a write on this VM (the ring's pages and the submission path
            // come in cold): in one side-by-side comparison an idle mesh ping went from
            // 0.326 to 0.296 ms (`bench/ping-ab.sh`; see bench/README.md for later runs).
            done(0, write_retrying(fd, packet(0)));
            return;
        }
        self.ring
            .ensure(&[opcode::Write::CODE], "writes", "write(2)");
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
                    // waits below (`reap`) for the completion of every entry the kernel
                    // takes, also when io_uring_enter fails. The
                    // queue is empty here (every earlier round was reaped) and `count`
                    // is at most its size, so the push cannot fail.
                    unsafe { sq.push(&entry) }.expect("submission queue has room");
                }
            }
            let reaped = reap(
                ring,
                count,
                |_| true,
                &mut |k, r| {
                    done(
                        first + k as usize,
                        if r >= 0 { Ok(r as usize) } else { Err(-r) },
                    );
                },
                submit_and_wait,
            );
            if let Err(f) = reaped {
                // io_uring_enter itself failed (not a write): `reap` waited for every
                // write the kernel took; the rest of the batch, from the first write it
                // never took, goes out with write(2), in order.
                tracing::warn!(error = %f.error, "io_uring_enter failed; TUN writes fall back to write(2)");
                self.ring = Ring::Unavailable;
                for i in first + count - f.untaken..n {
                    done(i, write_retrying(fd, packet(i)));
                }
                return;
            }
            first += count;
        }
    }
}

/// `user_data` of the readiness poll (reads carry their index in the round).
const POLL_TAG: u64 = u64::MAX;

/// One thread's means of reading rounds of packets from a non-blocking TUN descriptor,
/// and of waiting for the next packet.
pub(super) struct BatchReader {
    ring: Ring,
    /// A readiness poll is submitted and has not completed yet (it stays armed across
    /// a wait that timed out).
    poll_armed: bool,
    /// The last round's results.
    results: [i32; RING_ENTRIES],
}

impl BatchReader {
    pub(super) fn new() -> BatchReader {
        BatchReader {
            ring: Ring::Untried,
            poll_armed: false,
            results: [-libc::EAGAIN; RING_ENTRIES],
        }
    }

    /// Waits up to `timeout` for `fd` to become readable, where rounds go through
    /// io_uring (returns `None` otherwise: the caller polls with `poll(2)`).
    ///
    /// Why not `poll(2)`: its wait-queue entry stays on the device until the waiting
    /// thread runs again, so every packet queued meanwhile calls the wakeup, in the
    /// sender's `write` (the sender shares the CPU, and `mesh-tx` at SCHED_BATCH only
    /// runs when the sender's slice ends). A one-shot io_uring poll unhooks itself at
    /// the first packet, so the rest are queued without waking anything.
    pub(super) fn wait_readable(
        &mut self,
        fd: RawFd,
        timeout: Duration,
    ) -> Option<io::Result<bool>> {
        let Ring::Ready(ring) = &mut self.ring else {
            return None;
        };
        if !self.poll_armed {
            let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                .build()
                .user_data(POLL_TAG);
            // SAFETY: a poll references no memory of ours. Reads are only queued inside
            // `read_round`, which reaps them all, so the queue has room.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                return Some(Err(io::Error::other("io_uring submission queue full")));
            }
            self.poll_armed = true;
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        let ready = match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => true,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => false,
            Err(e) => return Some(Err(e)),
        };
        for cqe in ring.completion() {
            if cqe.user_data() == POLL_TAG {
                self.poll_armed = false;
            }
        }
        Some(Ok(ready && !self.poll_armed))
    }

    /// A reader that never tries io_uring: one `read(2)` per packet.
    #[cfg(test)]
    pub(super) fn unavailable() -> BatchReader {
        BatchReader {
            ring: Ring::Unavailable,
            poll_armed: false,
            results: [-libc::EAGAIN; RING_ENTRIES],
        }
    }

    /// Whether rounds go through io_uring (known after the first round).
    pub(super) fn batched(&self) -> Option<bool> {
        self.ring.batched()
    }

    /// Issues one read into each of `bufs` (at most [`RING_ENTRIES`]) on the
    /// non-blocking `fd`, in order, with one system call. Returns each read's result as
    /// the kernel gave it: bytes read, or `-errno` (`-EAGAIN`: the queue was empty).
    /// Reads run in submission order, so the packets of the successful ones are in the
    /// order the device queued them. `None`, having read nothing, where io_uring is
    /// unavailable: the caller reads with `read(2)`.
    pub(super) fn read_round(&mut self, fd: RawFd, bufs: &mut [Box<[u8]>]) -> Option<&[i32]> {
        self.ring.ensure(
            &[opcode::Read::CODE, opcode::PollAdd::CODE],
            "reads",
            "read(2)",
        );
        let Ring::Ready(ring) = &mut self.ring else {
            return None;
        };
        let count = bufs.len().min(RING_ENTRIES);
        {
            let mut sq = ring.submission();
            for (k, buf) in bufs[..count].iter_mut().enumerate() {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                // RWF_NOWAIT: on a pollable file, O_NONBLOCK alone makes io_uring wait
                // for data (it arms a poll) instead of completing with EAGAIN.
                let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data(k as u64);
                // SAFETY: `bufs` stays mutably borrowed for this whole call, which waits
                // below (`reap`) for the completion of every entry the kernel takes, also
                // when io_uring_enter fails, so the kernel writes only into live,
                // unaliased buffers.
                // The queue is empty here and `count` is at most its size.
                unsafe { sq.push(&entry) }.expect("submission queue has room");
            }
        }
        let results = &mut self.results[..count];
        results.fill(-libc::EAGAIN);
        let poll_armed = &mut self.poll_armed;
        // A completion of the readiness poll can come in among the reads.
        let mut record = |tag: u64, r: i32| match usize::try_from(tag) {
            Ok(k) if k < count => results[k] = r,
            _ => *poll_armed = false,
        };
        // The readiness poll does not count towards the round's completions.
        // Reads the kernel never took keep their -EAGAIN: nothing was read into them.
        if let Err(f) = reap(
            ring,
            count,
            |tag| tag != POLL_TAG,
            &mut record,
            submit_and_wait,
        ) {
            tracing::warn!(error = %f.error, "io_uring_enter failed; TUN reads fall back to read(2)");
            self.ring = Ring::Unavailable;
        }
        if results.iter().all(|&r| r == -libc::EOPNOTSUPP) {
            // A kernel whose TUN lacks non-blocking reads through io_uring (RWF_NOWAIT):
            // nothing was read.
            tracing::info!("io_uring reads of the TUN unsupported: one read(2) per packet");
            self.ring = Ring::Unavailable;
            return None;
        }
        Some(results)
    }
}

/// A ring restricted to one operation (IORING_REGISTER_RESTRICTIONS, set while the ring
/// is still disabled): whatever else goes wrong, it can do nothing but the reads or the
/// writes this module submits.
fn restricted_ring(ops: &[u8]) -> io::Result<IoUring> {
    let ring = IoUring::builder()
        .setup_r_disabled()
        .build(RING_ENTRIES as u32)?;
    let submitter = ring.submitter();
    let mut allowed: Vec<_> = ops
        .iter()
        .map(|&op| io_uring::register::Restriction::sqe_op(op))
        .collect();
    submitter.register_restrictions(&mut allowed)?;
    submitter.register_enable_rings()?;
    Ok(ring)
}

/// Submits what is queued on `ring` and reaps until `count` completions that `counted`
/// accepts (by `user_data`) have come, handing each completion to `on(user_data,
/// result)`. `enter` is io_uring_enter: [`submit_and_wait`] outside tests.
///
/// The kernel owns the buffer of every entry it has taken from the submission queue
/// until that entry's completion is posted, and the callers reuse their buffers as soon
/// as this returns, so it never returns while such an entry is outstanding. If
/// io_uring_enter itself fails (not EINTR), it submits nothing more and watches the
/// completion queue, which the kernel fills in shared memory without being called,
/// until every entry the kernel took has completed, however long that takes (TUN reads
/// with RWF_NOWAIT and TUN writes complete inline, so in practice at once). Entries the
/// kernel never took stay in the submission queue and are discarded with the ring; the
/// error says how many of the round's last entries that is, for the caller to do their
/// work with plain system calls.
fn reap(
    ring: &mut IoUring,
    count: usize,
    counted: impl Fn(u64) -> bool,
    on: &mut impl FnMut(u64, i32),
    mut enter: impl FnMut(&mut IoUring, usize) -> io::Result<usize>,
) -> Result<(), RoundFailed> {
    let mut reaped = 0;
    let mut failed: Option<RoundFailed> = None;
    let mut waiting_since: Option<std::time::Instant> = None;
    while reaped < count {
        match &failed {
            None => match enter(ring, count - reaped) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(error) => {
                    // Without SQPOLL the kernel takes entries only inside io_uring_enter:
                    // what is still queued now it will never see.
                    let untaken = ring.submission().len();
                    failed = Some(RoundFailed { error, untaken });
                }
            },
            Some(f) if reaped + f.untaken >= count => break,
            Some(f) => {
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= Duration::from_secs(1) {
                    tracing::warn!(
                        error = %f.error,
                        outstanding = count - reaped - f.untaken,
                        "io_uring_enter failed with entries in flight; waiting for their completions before their buffers are reused"
                    );
                    waiting_since = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for cqe in ring.completion() {
            if counted(cqe.user_data()) {
                reaped += 1;
            }
            on(cqe.user_data(), cqe.result());
        }
    }
    failed.map_or(Ok(()), Err)
}

/// io_uring_enter: submits what is queued and waits for `want` completions.
fn submit_and_wait(ring: &mut IoUring, want: usize) -> io::Result<usize> {
    ring.submitter().submit_and_wait(want)
}

/// A round whose io_uring_enter failed: the error, and how many of the round's last
/// entries the kernel never took (so never ran).
#[derive(Debug)]
struct RoundFailed {
    error: io::Error,
    untaken: usize,
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

    fn set_nonblocking(fd: RawFd) {
        // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0);
        }
    }

    fn write_bytes(fd: &OwnedFd, b: &[u8]) {
        // SAFETY: `b` is a valid readable buffer of `b.len()` bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(n, b.len() as isize);
    }

    /// A read round on an empty non-blocking descriptor completes at once with EAGAIN
    /// (it must not wait for data), and reads what is there when there is something.
    #[test]
    fn read_rounds_never_wait() {
        let (rx, tx) = pipe();
        set_nonblocking(rx.as_raw_fd());
        let mut reader = BatchReader::new();
        let mut bufs: Vec<Box<[u8]>> = (0..3).map(|_| vec![0u8; 16].into()).collect();
        let t = std::time::Instant::now();
        let r = reader
            .read_round(rx.as_raw_fd(), &mut bufs)
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![-libc::EAGAIN; 3]);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(reader.batched(), Some(true), "io_uring is available here");
        write_bytes(&tx, b"abc");
        let r = reader
            .read_round(rx.as_raw_fd(), &mut bufs[..2])
            .unwrap()
            .to_vec();
        assert_eq!(r, vec![3, -libc::EAGAIN]);
        assert_eq!(&bufs[0][..3], b"abc");
    }

    /// Waiting: an idle descriptor times out (twice: also with the first wait's poll
    /// still armed), data ends a wait at once, and a poll that completes during a read
    /// round is noticed there (the next wait arms a new one).
    #[test]
    fn waits_time_out_and_wake() {
        let (rx, tx) = pipe();
        set_nonblocking(rx.as_raw_fd());
        let fd = rx.as_raw_fd();
        let mut reader = BatchReader::new();
        let mut bufs: Vec<Box<[u8]>> = vec![vec![0u8; 16].into()];
        reader.read_round(fd, &mut bufs).unwrap();
        for _ in 0..2 {
            let t = std::time::Instant::now();
            let ready = reader.wait_readable(fd, Duration::from_millis(50)).unwrap();
            assert!(!ready.unwrap());
            assert!(
                t.elapsed() >= Duration::from_millis(45),
                "{:?}",
                t.elapsed()
            );
            assert!(reader.poll_armed);
        }
        // The armed poll completes in the round that reads the data.
        write_bytes(&tx, b"x");
        assert_eq!(reader.read_round(fd, &mut bufs).unwrap(), &[1]);
        assert!(
            !reader.poll_armed,
            "the poll's completion was taken in the round"
        );
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            write_bytes(&tx, b"y");
            tx
        });
        let t = std::time::Instant::now();
        let ready = reader.wait_readable(fd, Duration::from_secs(5)).unwrap();
        assert!(ready.unwrap());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(!reader.poll_armed);
        drop(writer.join().unwrap());
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

    /// A lone packet is a plain write(2): the ring is not even set up for it, and the
    /// result is reported like any other.
    #[test]
    fn a_lone_write_skips_the_ring() {
        let (mut rx, tx) = pipe();
        let mut writer = BatchWriter::new();
        let mut results = Vec::new();
        writer.write_all(tx.as_raw_fd(), 1, |_| b"lone", |i, r| results.push((i, r)));
        assert_eq!(results, vec![(0, Ok(4))]);
        assert_eq!(writer.batched(), None, "no ring for a single write");
        writer.write_all(tx.as_raw_fd(), 2, |_| b"xy", |i, r| results.push((i, r)));
        results[1..].sort();
        assert_eq!(results, vec![(0, Ok(4)), (0, Ok(2)), (1, Ok(2))]);
        assert_eq!(
            writer.batched(),
            Some(true),
            "two writes go through io_uring"
        );
        drop(tx);
        let mut got = String::new();
        rx.read_to_string(&mut got).unwrap();
        assert_eq!(got, "lonexyxy");
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

    /// io_uring_enter fails after the kernel took a read that has not completed: the
    /// read's buffer is the kernel's until its completion, so the round must not end
    /// before it (the old code gave up after a second and let the caller reuse the
    /// buffer under the kernel).
    #[test]
    fn a_failed_enter_still_waits_for_what_the_kernel_took() {
        let (rx, tx) = pipe(); // blocking: the read waits for data inside the kernel
        let mut ring = restricted_ring(&[opcode::Read::CODE]).expect("ring");
        let mut buf = [0u8; 8];
        let entry = opcode::Read::new(types::Fd(rx.as_raw_fd()), buf.as_mut_ptr(), 8)
            .build()
            .user_data(0);
        // SAFETY: `buf` outlives the ring's use of it: `reap` below returns only after
        // the read's completion (what this test checks), and `buf` lives past that.
        unsafe { ring.submission().push(&entry) }.unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            write_bytes(&tx, b"late");
            tx
        });
        let mut calls = 0;
        let failing_enter = |ring: &mut IoUring, _: usize| {
            calls += 1;
            if calls == 1 {
                ring.submitter().submit()?; // the kernel takes the read ...
            }
            Err(io::Error::from_raw_os_error(libc::EBUSY)) // ... and enter "fails"
        };
        let mut got = Vec::new();
        let t = std::time::Instant::now();
        let failed = reap(
            &mut ring,
            1,
            |_| true,
            &mut |k, r| got.push((k, r)),
            failing_enter,
        )
        .expect_err("the failure is reported");
        assert_eq!(failed.untaken, 0);
        assert_eq!(got, vec![(0, 4)], "returned before the read completed");
        assert!(
            t.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(&buf[..4], b"late");
        assert_eq!(calls, 1, "nothing more is submitted after a failure");
        drop(writer.join().unwrap());
    }

    /// io_uring_enter fails before the kernel took anything: nothing is waited for, and
    /// the caller learns that none of the round ran.
    #[test]
    fn a_failed_enter_that_took_nothing_returns_at_once() {
        let (rx, _tx) = pipe();
        let mut ring = restricted_ring(&[opcode::Read::CODE]).expect("ring");
        let mut bufs = [[0u8; 8]; 3];
        for (k, b) in bufs.iter_mut().enumerate() {
            let entry = opcode::Read::new(types::Fd(rx.as_raw_fd()), b.as_mut_ptr(), 8)
                .build()
                .user_data(k as u64);
            // SAFETY: the kernel never takes these entries (enter is never really
            // called), and the ring is dropped before `bufs`.
            unsafe { ring.submission().push(&entry) }.unwrap();
        }
        let t = std::time::Instant::now();
        let failed = reap(
            &mut ring,
            3,
            |_| true,
            &mut |_, _| panic!("nothing completes"),
            |_: &mut IoUring, _: usize| Err(io::Error::from_raw_os_error(libc::ENOMEM)),
        )
        .expect_err("the failure is reported");
        assert_eq!(failed.untaken, 3);
        assert_eq!(failed.error.raw_os_error(), Some(libc::ENOMEM));
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        drop(ring);
    }

    /// The ring refuses every operation but a write.
    #[test]
    fn the_ring_may_only_write() {
        let mut ring = restricted_ring(&[opcode::Write::CODE]).expect("ring");
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
