//! Delivered datagrams per second at the container, for one path and payload size: the
//! generator ([`super::traffic`]) sends from the hub out of the edge's veth while a
//! recvmmsg socket in the container counts; the offered rate steps up to the
//! generator's maximum.
//!
//! Placement: the generator (which spins while it paces) has `gen_cpu` to itself;
//! everything of the system under test — both daemons, both NAPI threads, the container's
//! counting socket, softirqs — runs on `sut_cpu`. Per window the CPU time of each of
//! those tasks is read from /proc (`utime + stime`; with tick accounting and no
//! IRQ_TIME_ACCOUNTING, a softirq that interrupts a task is charged to that task).
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::lab::{EDGE, GEN_DEV, Lab, WORKER};
use super::traffic::{Count, Injector, consume};
use crate::pacer::Pacer;
use crate::sys::{self, CpuTimes};

/// Upper bound of the generator's loop rate, to bound the frames of a run.
const GEN_MAX_PPS: f64 = 30_000_000.0;
/// Most frames per live-frames call: the generator sees `stop` between calls.
const GEN_CHUNK: u32 = 1 << 20;
/// Percent of the system under test's CPU other tasks may take in a window before the
/// run counts as disturbed.
pub const DISTURBED: f64 = 10.0;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub seconds: f64,
    pub warmup: f64,
    pub rates: Vec<Option<f64>>,
    pub flows: u32,
    pub gen_batch: u32,
    pub rcvbuf: usize,
    pub recv_batch: usize,
}

/// A task whose CPU time is attributed.
#[derive(Clone, Debug)]
pub struct Task {
    pub label: String,
    /// A whole process (/proc/PID/stat: every thread, live and exited) or one thread.
    pub pid: i32,
    pub tid: Option<i32>,
}

/// The tasks of the system under test: each daemon, each NAPI thread, ksoftirqd of the
/// SUT's CPU, the counting socket's thread; then the generator.
pub fn tasks(lab: &Lab, consumer: i32, generator: i32) -> Vec<Task> {
    let mut out = Vec::new();
    for (n, role) in [(EDGE, "edge"), (WORKER, "worker")] {
        if let Some(pid) = lab.daemon_pid(n) {
            out.push(Task {
                label: format!("{role} flynode"),
                pid,
                tid: None,
            });
        }
        for napi in lab.napi.iter().filter(|t| t.host == n) {
            out.push(Task {
                label: format!("{role} {}", napi.comm),
                pid: napi.pid,
                tid: Some(napi.pid),
            });
        }
    }
    let ksoftirqd = format!("ksoftirqd/{}", lab.sut_cpu);
    for (pid, comm) in sys::kthreads_named(&ksoftirqd) {
        if comm == ksoftirqd {
            out.push(Task {
                label: comm,
                pid,
                tid: Some(pid),
            });
        }
    }
    let me = std::process::id() as i32;
    out.push(Task {
        label: "container socket".into(),
        pid: me,
        tid: Some(consumer),
    });
    out.push(Task {
        label: "generator".into(),
        pid: me,
        tid: Some(generator),
    });
    out
}

/// utime + stime of a task, clock ticks.
pub fn task_ticks(t: &Task) -> u64 {
    let path = match t.tid {
        Some(tid) => format!("/proc/{}/task/{tid}/stat", t.pid),
        None => format!("/proc/{}/stat", t.pid),
    };
    let Ok(s) = std::fs::read_to_string(path) else {
        return 0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // `f[0]` is field 3; utime and stime are fields 14 and 15.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Per-CPU dropped packets of the input backlogs (/proc/net/softnet_stat, 2nd column):
/// netif_rx() queues full. Machine-wide: other namespaces count too.
fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// Named counters along the path, for the loss breakdown: the generator port's ring
/// (hub), the nodes' `eth0` queues, the daemons' XDP, ingress, forwarding and mesh
/// counters, the container's UDP counters, the backlog drops.
pub fn path_counters(lab: &Lab) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut put = |prefix: &str, m: BTreeMap<String, u64>| {
        for (k, v) in m {
            out.insert(format!("{prefix}{k}"), v);
        }
    };
    let keep = |m: BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        m.into_iter()
            .filter(|(k, _)| !k.contains("bytes") && k != "peer_ifindex")
            .collect()
    };
    // A veth counts what its peer's full ring (or queue) refused as its own tx_dropped.
    let dev = |ns: &flynode::netns::Netns, name: &str| -> BTreeMap<String, u64> {
        let mut m = keep(sys::ethtool_stats(ns, name).unwrap_or_default());
        if let Ok(d) = sys::dev_counters(ns, name) {
            m.insert("tx_dropped".into(), d.tx_drop);
        }
        m
    };
    put("hub p1 ", dev(lab.hub(), GEN_DEV));
    put("hub p2 ", dev(lab.hub(), "p2"));
    for (n, role) in [(EDGE, "edge"), (WORKER, "worker")] {
        put(&format!("{role} eth0 "), dev(lab.host(n), "eth0"));
        if let Some(socket) = lab.daemon_socket(n)
            && let Ok(s) = flynode::control::status(&socket)
        {
            put(&format!("{role} xdp "), s.xdp.counters);
            put(&format!("{role} ingress "), s.xdp.ingress);
            put(&format!("{role} forward "), s.forwarding.counters);
            put(&format!("{role} mesh "), s.mesh.counters);
            put(&format!("{role} mesh drop "), s.mesh.drops);
        }
    }
    put("worker ctr0 ", dev(lab.host(WORKER), "ctr0"));
    let snmp = sys::udp_snmp(lab.container()).unwrap_or_default();
    put("container Udp ", snmp);
    out.insert("softnet backlog drops (all CPUs)".into(), softnet_drops());
    out
}

struct Snapshot {
    at: Instant,
    offered: u64,
    delivered: u64,
    odd: u64,
    tasks: Vec<u64>,
    cpus: Vec<CpuTimes>,
    rcvbuf_errors: u64,
    softnet_drops: u64,
    no_worker: u64,
}

/// Datagrams the edge dropped because no worker was healthy (0 without a daemon).
fn no_worker(lab: &Lab) -> u64 {
    lab.daemon_socket(EDGE)
        .and_then(|s| flynode::control::status(&s).ok())
        .and_then(|s| s.forwarding.counters.get("edge_no_worker").copied())
        .unwrap_or(0)
}

fn snapshot(lab: &Lab, count: &Count, tasks: &[Task]) -> Snapshot {
    // The offered rate: what the generator's port handed to the edge's ring plus what
    // the full ring refused (a veth counts both on the sending side).
    let dev = sys::dev_counters(lab.hub(), GEN_DEV).unwrap_or_default();
    let at = Instant::now();
    let delivered = count.datagrams.load(Ordering::Relaxed);
    Snapshot {
        at,
        offered: dev.tx_packets + dev.tx_drop,
        delivered,
        odd: count.odd.load(Ordering::Relaxed),
        tasks: tasks.iter().map(task_ticks).collect(),
        cpus: sys::cpu_times().unwrap_or_default(),
        rcvbuf_errors: sys::udp_snmp(lab.container())
            .ok()
            .and_then(|m| m.get("RcvbufErrors").copied())
            .unwrap_or(0),
        softnet_drops: softnet_drops(),
        no_worker: no_worker(lab),
    }
}

/// One offered rate of one run.
#[derive(Clone, Debug)]
pub struct Step {
    pub target: Option<f64>,
    pub offered_pps: f64,
    pub delivered_pps: f64,
    pub odd: u64,
    pub rcvbuf_errors: u64,
    pub softnet_drops: u64,
    /// Datagrams the edge dropped for want of a healthy worker.
    pub no_worker: u64,
    /// CPU seconds per second of each task of [`tasks`], in order.
    pub task_cpu: Vec<(String, f64)>,
    /// The SUT CPU's busy share (0..1) and its softirq share as /proc/stat counts it.
    pub sut_busy: f64,
    pub sut_softirq: f64,
    /// Time the hypervisor ran something else on the SUT's vCPU (part of `sut_busy`).
    pub sut_steal: f64,
    /// Share of the SUT CPU not explained by our tasks (other work on the machine,
    /// softirqs that interrupted the idle task).
    pub unattributed: f64,
    /// Counters along the path over this step (the full-rate step only).
    pub breakdown: BTreeMap<String, u64>,
}

impl Step {
    pub fn loss(&self) -> f64 {
        if self.offered_pps <= 0.0 {
            return 0.0;
        }
        (1.0 - self.delivered_pps / self.offered_pps).max(0.0)
    }

    /// CPU seconds per second of the tasks whose label starts with `prefix`.
    pub fn cpu_of(&self, prefix: &str) -> f64 {
        self.task_cpu
            .iter()
            .filter(|(l, _)| l.starts_with(prefix))
            .fold(0.0, |sum, (_, v)| sum + v)
    }
}

fn step_from(target: Option<f64>, a: &Snapshot, b: &Snapshot, tasks: &[Task], sut: usize) -> Step {
    let window = (b.at - a.at).as_secs_f64();
    let ticks = sys::clock_ticks_per_second() as f64 * window;
    let task_cpu: Vec<(String, f64)> = tasks
        .iter()
        .zip(b.tasks.iter().zip(&a.tasks))
        .map(|(t, (b, a))| (t.label.clone(), b.saturating_sub(*a) as f64 / ticks))
        .collect();
    let cpu = b
        .cpus
        .get(sut)
        .zip(a.cpus.get(sut))
        .map(|(b, a)| b.minus(a))
        .unwrap_or_default();
    let total = cpu.total().max(1) as f64;
    let sut_busy = cpu.busy() as f64 / total;
    let ours: f64 = task_cpu
        .iter()
        .filter(|(l, _)| l != "generator")
        .map(|(_, v)| v)
        .sum();
    Step {
        target,
        offered_pps: b.offered.saturating_sub(a.offered) as f64 / window,
        delivered_pps: b.delivered.saturating_sub(a.delivered) as f64 / window,
        odd: b.odd - a.odd,
        rcvbuf_errors: b.rcvbuf_errors.saturating_sub(a.rcvbuf_errors),
        softnet_drops: b.softnet_drops.saturating_sub(a.softnet_drops),
        no_worker: b.no_worker.saturating_sub(a.no_worker),
        task_cpu,
        sut_busy,
        sut_softirq: cpu.softirq as f64 / total,
        sut_steal: cpu.steal as f64 / total,
        unattributed: (sut_busy - ours).max(0.0),
        breakdown: BTreeMap::new(),
    }
}

/// One run: every offered rate once, for `payload`-byte datagrams on the lab's path.
pub struct Run {
    pub payload: usize,
    pub steps: Vec<Step>,
    pub generated: u64,
    pub delivered_total: u64,
}

impl Run {
    pub fn peak(&self) -> &Step {
        self.steps
            .iter()
            .max_by(|a, b| a.delivered_pps.total_cmp(&b.delivered_pps))
            .expect("a run has steps")
    }

    /// The unpaced step (the last one when `max` is among the rates).
    pub fn at_max(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.target.is_none())
    }

    /// The largest share of the SUT's CPU taken by something else in one window.
    pub fn disturbed(&self) -> Option<f64> {
        self.steps
            .iter()
            .map(|s| s.unattributed - s.sut_softirq)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            .filter(|v| *v * 100.0 > DISTURBED)
    }
}

/// Measures one run. The counting socket and the generator live for the run only.
pub fn run_once(lab: &Lab, opts: &LoadOptions, payload: usize) -> Result<Run> {
    let frame = lab.frame(lab.path, payload, lab.client_ip());
    let pacer = Pacer::new()?;
    pacer.set_rate(opts.rates[0])?;
    let total_secs = (opts.warmup + opts.seconds) * opts.rates.len() as f64 + 3.0;
    let max_frames = (total_secs * GEN_MAX_PPS) as u64;
    let count = Count::default();
    let gen_stop = AtomicBool::new(false);
    let gen_tid = AtomicI32::new(0);
    std::thread::scope(|s| -> Result<Run> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let count = &count;
        let consumer = s.spawn(move || consume(lab, opts, payload, count, &ready_tx));
        let _stop_consumer = StopOnDrop(&count.stop);
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("counting socket")),
            Err(_) => bail!("the counting socket did not start"),
        }
        let stop_gen = StopOnDrop(&gen_stop);
        let generator = s.spawn(|| -> Result<u64> {
            gen_tid.store(sys::gettid(), Ordering::Relaxed);
            let injector = Injector::on_this_thread(lab, opts.gen_batch)?;
            let loaded = injector.load(&pacer, &frame, opts.flows)?;
            let mut frames = 0u64;
            while !gen_stop.load(Ordering::Relaxed) && frames < max_frames && !sys::interrupted() {
                let per_call = match pacer.rate() {
                    Some(pps) => ((pps / 10.0) as u32).clamp(4096, GEN_CHUNK),
                    None => GEN_CHUNK,
                };
                let n = per_call.min((max_frames - frames) as u32);
                injector.send(&loaded, &frame, n)?;
                frames += u64::from(n);
            }
            Ok(frames)
        });
        // Both threads have stored their ids once the generator runs.
        let tasks = flynode::netns::wait_for(Duration::from_secs(5), || {
            let (c, g) = (
                count.tid.load(Ordering::Relaxed),
                gen_tid.load(Ordering::Relaxed),
            );
            (c != 0 && g != 0).then(|| tasks(lab, c, g))
        })
        .ok_or_else(|| anyhow!("the generator did not start"))?;
        let mut steps = Vec::new();
        for &target in &opts.rates {
            pacer.set_rate(target)?;
            sleep_checked(opts.warmup)?;
            if generator.is_finished() {
                break;
            }
            let full = target.is_none();
            let before = full.then(|| path_counters(lab));
            let a = snapshot(lab, count, &tasks);
            sleep_checked(opts.seconds)?;
            let b = snapshot(lab, count, &tasks);
            let mut step = step_from(target, &a, &b, &tasks, lab.sut_cpu);
            if let Some(before) = before {
                step.breakdown = delta(&path_counters(lab), &before);
            }
            steps.push(step);
        }
        drop(stop_gen);
        let generated = generator
            .join()
            .map_err(|_| anyhow!("generator panicked"))??;
        if steps.len() < opts.rates.len() {
            bail!("the generator stopped early");
        }
        // Let the socket drain what is queued, for the totals.
        let mut last = count.datagrams.load(Ordering::Relaxed);
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(100));
            let now = count.datagrams.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        count.stop.store(true, Ordering::Relaxed);
        consumer
            .join()
            .map_err(|_| anyhow!("consumer panicked"))??;
        Ok(Run {
            payload,
            steps,
            generated,
            delivered_total: count.datagrams.load(Ordering::Relaxed),
        })
    })
}

/// `b - a` for every counter of `b`, zeros left out.
pub fn delta(b: &BTreeMap<String, u64>, a: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v != 0)
        .collect()
}

pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub fn sleep_checked(seconds: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        sys::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
    }
    Ok(())
}

/// The client addresses of the flow-table fill: 198.18.128.1 onwards.
pub fn fill_source(i: u32) -> Ipv4Addr {
    let i = i + 1;
    Ipv4Addr::new(198, 18, 128 + (i >> 8) as u8, (i & 0xff) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_sources_are_distinct_and_inside_198_18_128_0_17() {
        let all: Vec<Ipv4Addr> = (0..30_000).map(fill_source).collect();
        let unique: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
        for a in &all {
            let [x, y, z, _] = a.octets();
            assert_eq!((x, y), (198, 18), "{a}");
            assert!(z >= 128, "{a}");
        }
        assert_eq!(fill_source(0), Ipv4Addr::new(198, 18, 128, 1));
    }

    #[test]
    fn loss_is_the_share_offered_but_not_delivered() {
        let step = Step {
            target: None,
            offered_pps: 200.0,
            delivered_pps: 150.0,
            odd: 0,
            rcvbuf_errors: 0,
            softnet_drops: 0,
            no_worker: 0,
            task_cpu: vec![("edge flynode".into(), 0.25), ("edge napi".into(), 0.5)],
            sut_busy: 1.0,
            sut_softirq: 0.0,
            sut_steal: 0.0,
            unattributed: 0.0,
            breakdown: BTreeMap::new(),
        };
        assert_eq!(step.loss(), 0.25);
        assert_eq!(step.cpu_of("edge "), 0.75);
        assert_eq!(step.cpu_of("worker "), 0.0);
    }
}
