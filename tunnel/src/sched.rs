//! How the kernel schedules the mesh's data-path threads (`mesh-tx`, `mesh-rx`).
//!
//! Each of them drains a queue another party fills without backpressure: the TUN (a
//! local sender's datagrams are dropped at its tail once it is full, after the sender
//! has paid for them) and the UDP socket. Two things decide how much a thread gets
//! through when it shares its CPU with the senders, both measured with
//! `bench/tunnel.sh` (UDP at full rate, iperf3 on the mesh thread's CPU):
//!
//! - **Batch size.** A thread that preempts the sender at every wakeup reads one packet
//!   per wakeup, and a wakeup (poll, schedule, read) costs more than the packet. With
//!   `SCHED_BATCH` the thread does not preempt on wakeup: it runs when the current
//!   task's slice ends and finds the queue full, so one wakeup moves a whole batch.
//! - **Share.** At equal weight the scheduler gives a local sender and `mesh-tx` half
//!   the CPU each; a sender that makes a datagram in less time than the mesh encrypts
//!   and sends it then fills the TUN faster than it drains, and the surplus is dropped
//!   at the tail after the sender paid for it. A nice value below the sender's (`-5`:
//!   3x the weight of a nice-0 task) lets `mesh-tx` take the larger share it needs and
//!   leaves the sender the rest, so what is sent is what gets through. `mesh-rx` is
//!   the other way round: the receivers it feeds are the ones that must keep up, so it
//!   stays at nice 0 (at -5 the receiving iperf3 dropped 5% at its socket).
//!
//! Together they took 1392-byte UDP at full rate from 0.27 Mpps delivered with 50%
//! lost at the sender's TUN to 0.33 Mpps with 1% lost; a higher weight without
//! `SCHED_BATCH` halved it (0.15 Mpps: every datagram woke the thread). The price is
//! latency under CPU contention: a packet that arrives while another task runs waits
//! for that task's slice (a few milliseconds at most) instead of preempting it. On an
//! idle CPU nothing waits.
use std::io;

/// The scheduling of one data-path thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadPolicy {
    /// `SCHED_BATCH` instead of `SCHED_OTHER`.
    pub batch: bool,
    /// The thread's nice value, -20..=19. Below 0 needs CAP_SYS_NICE or an
    /// `RLIMIT_NICE` that allows it (systemd's `LimitNICE=`).
    pub nice: i8,
}

impl ThreadPolicy {
    /// `mesh-tx` unless configured otherwise: it drains what local senders put into
    /// the TUN.
    pub const MESH_TX: ThreadPolicy = ThreadPolicy {
        batch: true,
        nice: -5,
    };
    /// `mesh-rx`: its input is the network and its output goes to local receivers,
    /// which a larger share would starve (their sockets would drop what it decrypted).
    pub const MESH_RX: ThreadPolicy = ThreadPolicy {
        batch: true,
        nice: 0,
    };
    /// The kernel's default: `SCHED_OTHER`, nice 0.
    pub const NORMAL: ThreadPolicy = ThreadPolicy {
        batch: false,
        nice: 0,
    };

    /// Applies the policy to the calling thread (on Linux both the policy and the nice
    /// value are per thread). Both are attempted; the first failure is returned.
    pub fn apply_to_current_thread(&self) -> io::Result<()> {
        let (policy, policy_name) = if self.batch {
            (libc::SCHED_BATCH, "SCHED_BATCH")
        } else {
            (libc::SCHED_OTHER, "SCHED_OTHER")
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param; pid 0 is the calling thread.
        let sched = if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            Err(io::Error::new(
                e.kind(),
                format!("sched_setscheduler({policy_name}): {e}"),
            ))
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // SAFETY: plain system call on this thread's id.
        let nice = if unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, self.nice.into())
        } == 0
        {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EACCES)
                || e.raw_os_error() == Some(libc::EPERM)
            {
                " (a negative nice value needs CAP_SYS_NICE or RLIMIT_NICE, e.g. systemd's LimitNICE=)"
            } else {
                ""
            };
            Err(io::Error::new(
                e.kind(),
                format!("setting nice {}: {e}{hint}", self.nice),
            ))
        };
        sched.and(nice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> (libc::c_int, libc::c_int) {
        // SAFETY: plain queries on the calling thread.
        unsafe {
            let tid = libc::gettid();
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
            assert_eq!(*libc::__errno_location(), 0, "getpriority failed");
            (libc::sched_getscheduler(0), nice)
        }
    }

    #[test]
    fn applies_policy_and_nice_to_the_calling_thread_only() {
        let main_before = current();
        let seen = std::thread::spawn(|| {
            // Raising the nice value needs no privilege, so this runs as any user.
            ThreadPolicy {
                batch: true,
                nice: 7,
            }
            .apply_to_current_thread()
            .unwrap();
            current()
        })
        .join()
        .unwrap();
        assert_eq!(seen, (libc::SCHED_BATCH, 7));
        assert_eq!(current(), main_before, "another thread was changed");
    }

    #[test]
    fn the_data_path_policy_applies_as_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (a negative nice value)");
            return;
        }
        let seen = std::thread::spawn(|| {
            ThreadPolicy::MESH_TX.apply_to_current_thread().unwrap();
            let batch = current();
            ThreadPolicy::NORMAL.apply_to_current_thread().unwrap();
            (batch, current())
        })
        .join()
        .unwrap();
        assert_eq!(seen.0, (libc::SCHED_BATCH, -5));
        assert_eq!(seen.1, (libc::SCHED_OTHER, 0));
    }
}
