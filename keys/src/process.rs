//! Keeping private keys out of core dumps.
//!
//! A crash of a process that holds a key must not write the key to disk: under
//! systemd-coredump (or any `core_pattern`) a dump of the daemon would hold the node's
//! private key, and boringtun's copies of it, in the journal's core store. Advising
//! each allocation that holds key material (`MADV_DONTDUMP`) cannot reach boringtun's
//! own copies inside its session state, so the whole process is made non-dumpable
//! instead, as OpenSSH's ssh-agent does (`platform_disable_tracing`): no core file, no
//! ptrace attach by other users, /proc/PID/mem readable only by root.
use std::io;

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0) with a core size limit of 0.
///
/// Both, because each covers a case the other misses: with `fs.suid_dumpable=2`
/// (which systemd's coredump configuration sets) the kernel still dumps a non-dumpable
/// process to a pipe handler, and systemd-coredump discards a dump only when the
/// process's `RLIMIT_CORE` is 0; a file `core_pattern` honours `RLIMIT_CORE` but the
/// limit can be raised again by the process, while dumpable 0 cannot be undone by a
/// later exec of the same binary.
pub fn forbid_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; prctl with integer arguments only.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_becomes_non_dumpable_with_no_core_limit() {
        forbid_core_dumps().unwrap();
        // SAFETY: prctl/getrlimit with integer arguments and a struct we own.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0), 0);
            let mut lim = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut lim), 0);
            assert_eq!((lim.rlim_cur, lim.rlim_max), (0, 0));
        }
    }
}
