//! Small system helpers: CPU pinning, where a task ran, /proc counters, namespaces,
//! Ctrl-C.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use flynode::netns::{Netns, run};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag that every loop polls, so that the run unwinds
/// normally and every guard (namespaces, attached programs, sockets) is dropped.
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores into an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then handler set).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("sigaction");
        }
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// The kernel's id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Pins task `tid` (0: the calling thread) to one CPU.
pub fn pin(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; CPU_SET writes within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes the calling thread SCHED_BATCH: a CPU-bound batch consumer that does not
/// preempt other tasks when it wakes up.
pub fn set_sched_batch() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: valid policy and parameter for the calling thread (pid 0).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs task `tid` may run on, as a list ("1", "0-1").
pub fn affinity(tid: i32) -> io::Result<String> {
    // SAFETY: as in `pin`; CPU_ISSET reads within the set.
    let cpus: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    };
    Ok(cpu_list(&cpus))
}

fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

/// Per-task numbers from /proc/<tid>/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskStat {
    /// CPU the task last ran on (field 39, `processor`).
    pub processor: i64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// Reads the stat file of thread `tid` of this process.
pub fn thread_stat(tid: i32) -> io::Result<TaskStat> {
    task_stat(std::process::id() as i32, tid)
}

/// Reads /proc/<pid>/task/<tid>/stat (/proc/<tid>/stat would sum the whole thread
/// group). A kernel thread is its own group: pid == tid.
pub fn task_stat(pid: i32, tid: i32) -> io::Result<TaskStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))?;
    // comm (field 2) is in parentheses and may contain spaces: split after the last ')'.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state).
    let field = |n: usize| -> io::Result<i64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("stat field {n} missing")))
    };
    Ok(TaskStat {
        processor: field(39)?,
        cpu_ticks: (field(14)? + field(15)?) as u64,
    })
}

pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Kernel threads (pid == tid for kthreads) whose comm starts with `prefix`.
pub fn kthreads_named(prefix: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm")) {
            let comm = comm.trim_end();
            if comm.starts_with(prefix) {
                out.push((pid, comm.to_owned()));
            }
        }
    }
    out.sort();
    out
}

/// Per-CPU time split from /proc/stat, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub user: u64,
    pub system: u64,
    pub softirq: u64,
    pub idle: u64,
    /// irq + steal.
    pub other: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn busy(&self) -> u64 {
        self.user + self.system + self.softirq + self.other
    }

    pub fn total(&self) -> u64 {
        self.user + self.system + self.softirq + self.idle + self.other
    }

    pub fn minus(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            idle: self.idle.saturating_sub(earlier.idle),
            other: self.other.saturating_sub(earlier.other),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    /// "usr 12% sys 40% sirq 3% idle 45%" over an interval.
    pub fn describe(&self) -> String {
        let t = self.total().max(1) as f64;
        let pct = |v: u64| 100.0 * v as f64 / t;
        format!(
            "usr {:.0}% sys {:.0}% sirq {:.0}% steal {:.0}% idle {:.0}%",
            pct(self.user),
            pct(self.system),
            pct(self.softirq),
            pct(self.steal),
            pct(self.idle)
        )
    }
}

/// `cpuN` lines of /proc/stat.
pub fn cpu_times() -> io::Result<Vec<CpuTimes>> {
    let s = fs::read_to_string("/proc/stat")?;
    let mut out = Vec::new();
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let Some(name) = it.next() else { continue };
        if !name.starts_with("cpu") || name == "cpu" {
            continue;
        }
        let v: Vec<u64> = it.filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal guest guest_nice
        if v.len() < 8 {
            continue;
        }
        out.push(CpuTimes {
            user: v[0] + v[1],
            system: v[2],
            idle: v[3] + v[4],
            softirq: v[6],
            other: v[5] + v[7],
            steal: v[7],
        });
    }
    Ok(out)
}

/// Waits up to `max_wait` seconds until no CPU is more than `busy_pct` percent busy over
/// half a second (other people's builds on a shared machine skew every number). Says so
/// when it waits, and when it gives up.
pub fn wait_until_quiet(max_wait: f64, busy_pct: f64) -> Result<()> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        let a = cpu_times()?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let b = cpu_times()?;
        let busiest = b
            .iter()
            .zip(&a)
            .map(|(b, a)| {
                let d = b.minus(a);
                100.0 * d.busy() as f64 / d.total().max(1) as f64
            })
            .fold(0.0, f64::max);
        if busiest <= busy_pct {
            return Ok(());
        }
        let waited = start.elapsed().as_secs_f64();
        if waited >= max_wait {
            println!(
                "  (machine still busy after {waited:.0} s: a CPU is {busiest:.0}% busy; going \
                 ahead)"
            );
            return Ok(());
        }
        if !said {
            println!("  (waiting for a quiet machine: a CPU is {busiest:.0}% busy)");
            said = true;
        }
        check_interrupted()?;
    }
}

/// Enters network namespace `ns` for the calling thread only (setns(2) with CLONE_NEWNET
/// affects the calling thread). Used by long-lived threads (generator, consumer).
pub fn enter_netns(ns: &Netns) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{}", ns.name()))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on the calling thread inside `ns`, then returns the thread to the namespace
/// it was in (for objects that must be created in `ns` but are not `Send`).
pub fn in_netns<R>(ns: &Netns, f: impl FnOnce() -> R) -> io::Result<R> {
    let home = File::open("/proc/thread-self/ns/net")?;
    enter_netns(ns)?;
    let r = f();
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Staying in the wrong namespace would silently skew everything after: give up.
        panic!(
            "cannot return to the original network namespace: {}",
            io::Error::last_os_error()
        );
    }
    Ok(r)
}

/// `name: value` counters of `ethtool -S dev` inside `ns`, read with the ETHTOOL_GSTATS
/// ioctl on a short-lived thread in the namespace (what `ethtool -S` does, without a
/// child process per read: the readings are taken every window, on the generator's CPU).
pub fn ethtool_stats(ns: &Netns, dev: &str) -> Result<BTreeMap<String, u64>> {
    let dev = dev.to_owned();
    ns.enter(move || ethtool::stats(&dev))?
        .with_context(|| "ETHTOOL_GSTATS")
}

/// The SIOCETHTOOL calls behind [`ethtool_stats`] (include/uapi/linux/ethtool.h).
mod ethtool {
    use std::collections::BTreeMap;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x03;
    const ETHTOOL_GSTRINGS: u32 = 0x1b;
    const ETHTOOL_GSTATS: u32 = 0x1d;
    const ETH_SS_STATS: u32 = 1;
    const ETH_GSTRING_LEN: usize = 32;

    /// `struct ifreq` with the `ifr_data` member of its union.
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    const _: () = assert!(size_of::<Ifreq>() == 40);

    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const _: () = assert!(size_of::<DrvInfo>() == 196);

    /// One SIOCETHTOOL call for `dev` with `data` as the command buffer.
    ///
    /// # Safety
    /// `data` must point to a buffer that starts with the command word and is as large as
    /// the kernel writes for that command.
    unsafe fn call(sock: &OwnedFd, dev: &str, data: *mut libc::c_void) -> io::Result<()> {
        let mut ifr = Ifreq {
            name: [0; 16],
            data,
            _pad: [0; 16],
        };
        let n = dev.len().min(15);
        ifr.name[..n].copy_from_slice(&dev.as_bytes()[..n]);
        // SAFETY: a valid socket, a valid ifreq whose data pointer the caller vouches for.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn stats(dev: &str) -> io::Result<BTreeMap<String, u64>> {
        // SAFETY: plain socket(2); the fd is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };

        // SAFETY: DrvInfo is plain old data; all-zeroes is valid.
        let mut info: DrvInfo = unsafe { std::mem::zeroed() };
        info.cmd = ETHTOOL_GDRVINFO;
        // SAFETY: `info` is a whole ethtool_drvinfo.
        unsafe { call(&sock, dev, (&mut info as *mut DrvInfo).cast())? };
        let n = info.n_stats as usize;

        // struct ethtool_gstrings { u32 cmd, string_set, len; u8 data[len * 32]; }
        let mut strings = vec![0u32; 3 + n * ETH_GSTRING_LEN / 4];
        strings[0] = ETHTOOL_GSTRINGS;
        strings[1] = ETH_SS_STATS;
        strings[2] = n as u32;
        // SAFETY: the buffer holds the header and `n` strings, as announced in `len`.
        unsafe { call(&sock, dev, strings.as_mut_ptr().cast())? };

        // struct ethtool_stats { u32 cmd, n_stats; u64 data[n_stats]; }
        let mut values = vec![0u64; 1 + n];
        values[0] = u64::from(ETHTOOL_GSTATS) | ((n as u64) << 32);
        // SAFETY: the buffer holds the header and `n` values, as announced in n_stats.
        unsafe { call(&sock, dev, values.as_mut_ptr().cast())? };

        let names: Vec<u8> = strings[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(names
            .chunks_exact(ETH_GSTRING_LEN)
            .zip(&values[1..])
            .map(|(name, v)| {
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                (String::from_utf8_lossy(&name[..end]).into_owned(), *v)
            })
            .collect())
    }
}

/// Transmit counters of one device from /proc/net/dev, as seen from inside `ns`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DevCounters {
    pub tx_packets: u64,
    pub tx_drop: u64,
}

/// Reads `dev`'s line of /proc/net/dev inside `ns` (a plain file read on a short-lived
/// thread in the namespace: microseconds, where `ip netns exec ethtool` takes tens of
/// milliseconds, so the value belongs to a precise instant).
pub fn dev_counters(ns: &Netns, dev: &str) -> Result<DevCounters> {
    let text = ns
        .enter(|| fs::read_to_string("/proc/thread-self/net/dev"))?
        .context("read /proc/net/dev in the namespace")?;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() != dev {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets
        // errs drop ...
        if v.len() < 12 {
            bail!("short /proc/net/dev line for {dev}");
        }
        return Ok(DevCounters {
            tx_packets: v[9],
            tx_drop: v[11],
        });
    }
    bail!("{dev} not in /proc/net/dev")
}

/// The `Udp:` counters of /proc/net/snmp as seen from inside `ns`.
pub fn udp_snmp(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let text = ns
        .enter(|| fs::read_to_string("/proc/thread-self/net/snmp"))?
        .context("read /proc/net/snmp in the namespace")?;
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let [names, values] = lines[..] else {
        bail!("no Udp lines in /proc/net/snmp");
    };
    Ok(names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect())
}

/// Writes `value` to a file under /sys/class/net/<dev>/ as seen from `ns` (sysfs shows
/// the devices of the namespace it was mounted in; `ip netns exec` remounts it).
pub fn write_sysfs_net(ns: &Netns, dev: &str, file: &str, value: &str) -> Result<()> {
    run(ns
        .command("sh")
        .args(["-c", &format!("echo {value} > /sys/class/net/{dev}/{file}")]))?;
    Ok(())
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list(&[1]), "1");
        assert_eq!(cpu_list(&[0, 1]), "0-1");
        assert_eq!(cpu_list(&[0, 2, 3, 5]), "0,2-3,5");
    }

    #[test]
    fn own_stat_parses() {
        let s = thread_stat(gettid()).unwrap();
        assert!(s.processor >= 0);
    }

    /// The ioctl reader sees what the ethtool binary sees (needs root and ethtool).
    #[test]
    fn ethtool_ioctl_matches_ethtool_binary() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0
            || run(std::process::Command::new("ethtool").arg("--version")).is_err()
        {
            eprintln!("skipping: needs root and ethtool");
            return;
        }
        let a = Netns::create("fxbta").unwrap();
        let b = Netns::create("fxbtb").unwrap();
        flynode::netns::veth(&a, "fxt0", &b, "fxt1").unwrap();
        let ours = ethtool_stats(&a, "fxt0").unwrap();
        let out = run(a.command("ethtool").args(["-S", "fxt0"])).unwrap();
        let theirs: BTreeMap<String, u64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_owned(), v.trim().parse().ok()?))
            })
            .collect();
        assert!(!ours.is_empty());
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        assert!(ours.contains_key("tx_queue_0_xdp_xmit_errors"), "{ours:?}");
        let dev = dev_counters(&a, "fxt0").unwrap();
        assert_eq!(dev.tx_drop, 0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
