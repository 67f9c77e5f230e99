//! Part 2: datagrams per second delivered to a userspace consumer, AF_XDP against an
//! ordinary UDP socket, with the same generator.
//!
//! ```text
//!  netns fn-fxbgen-PID-n                       netns fn-fxbrx-PID-n
//!  fxg<pid>  198.18.71.1/24  <--- veth --->    fxr<pid>  198.18.71.2/24 + 198.18.71.10/32
//!  generator: BPF_PROG_RUN live frames         socket:  GRO on, no XDP, UdpSocket on
//!    of an XDP_TX program (CPU0)                        198.18.71.10:5353, recvmmsg
//!                                              af_xdp:  flynode's classifier (native),
//!                                                       AF_XDP socket on queue 0
//!                                              af_xdp_bare: a redirect-only program,
//!                                                       the same socket: the ceiling
//!                                              consumer thread and napi/fxr* kthread: CPU1
//! ```
//!
//! The generator runs the frame through a program that returns XDP_TX as if it had
//! arrived on the gen-side veth; live-frames mode turns that into a transmit out of the
//! veth, i.e. `veth_xdp_xmit` into the peer's ring (256 frames), which the peer's NAPI
//! drains. When the ring is full the frame is dropped and counted on the generator's
//! side (`tx_queue_0_xdp_xmit_errors`). Each run builds a fresh topology.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flynode::netns::{Netns, veth};
use flynode_xsk::rawbpf;

use crate::classify::pass_fail;
use crate::frames::{self, Macs};
use crate::pacer::Pacer;
use crate::sys::{self, CpuTimes, TaskStat};

const NET: &str = "198.18.71";
const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 71, 1);
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 71, 10);
pub const SERVICE_PORT: u16 = 5353;
const GEN_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0x47, 0x01];
const RX_MAC: [u8; 6] = [0x02, 0, 0xc6, 0x12, 0x47, 0x02];
/// Most frames per BPF_PROG_RUN call of the generator (about 0.2 s unpaced); paced calls
/// last about 0.1 s. The generator only sees `stop` between calls, and each call sets up
/// a page pool of its own, so calls should be neither long nor tiny.
const GEN_CHUNK: u32 = 1 << 20;
/// Upper bound of the generator program's loop rate (frames sent or recycled), used to
/// bound the frame count of a run.
const GEN_MAX_PPS: u64 = 30_000_000;
pub const TARGET_RATIO: f64 = 3.0;
/// Percent of one of our CPUs that other tasks may use during a window before the run
/// counts as disturbed (and is repeated, up to `Options::retries` times).
const DISTURBED: f64 = 10.0;
/// Busiest CPU share (percent) at which the machine counts as quiet enough to start a run.
const QUIET_BUSY: f64 = 10.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Socket,
    AfXdp,
    /// The ceiling of any AF_XDP receiver: a program that only redirects into the
    /// socket, and a consumer that reads one byte per frame.
    AfXdpBare,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Socket => "socket",
            Mode::AfXdp => "af_xdp",
            Mode::AfXdpBare => "af_xdp_bare",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub runs: usize,
    pub seconds: f64,
    pub warmup: f64,
    pub payload: usize,
    pub gen_cpu: usize,
    pub rx_cpu: usize,
    /// Frames per kernel batch in live-frames mode (1..=256).
    pub gen_batch: u32,
    /// Offered rates to step through, frames per second (`None`: as fast as the
    /// generator goes).
    pub rates: Vec<Option<f64>>,
    /// Run the consumer thread as SCHED_BATCH (no wakeup preemption of the napi thread).
    pub consumer_batch: bool,
    /// Client ports the generator cycles through (1: a single flow, GRO's best case).
    pub flows: u32,
    /// Messages per recvmmsg.
    pub recv_batch: usize,
    /// SO_RCVBUF(FORCE) of the UDP socket.
    pub rcvbuf: usize,
    /// Frames per AF_XDP receive batch.
    pub xsk_batch: usize,
    /// Entries of the AF_XDP RX and fill rings.
    pub xsk_ring: u32,
    /// Frames in the AF_XDP UMEM.
    pub xsk_frames: u32,
    pub modes: Vec<Mode>,
    pub verbose: bool,
    /// Seconds to wait for a quiet machine before each run.
    pub quiet_wait: f64,
    /// Times a run disturbed by other tasks is repeated.
    pub retries: usize,
}

/// The two namespaces and their veth, deleted on drop.
pub struct Topology {
    pub gen_ns: Netns,
    pub rx_ns: Netns,
    pub gen_dev: String,
    pub rx_dev: String,
    /// A veth (peer in the gen namespace too) that carries no traffic: the generator's
    /// program is attached to it only to stay in the XDP dispatcher.
    pub anchor_dev: String,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let gen_ns = Netns::create("fxbgen")?;
        let rx_ns = Netns::create("fxbrx")?;
        // Short names (napi kthreads are called "napi/<dev>-<id>", cut to 15 characters),
        // unique per process so our kthreads can be told apart from anyone else's.
        let pid = std::process::id();
        let gen_dev = format!("fxg{pid:x}");
        let rx_dev = format!("fxr{pid:x}");
        for ns in [&gen_ns, &rx_ns] {
            // No IPv6 on the link: no DAD/RS/MLD frames in the counters.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        veth(&gen_ns, &gen_dev, &rx_ns, &rx_dev)?;
        gen_ns.ip(&["link", "set", &gen_dev, "address", &mac(GEN_MAC)])?;
        rx_ns.ip(&["link", "set", &rx_dev, "address", &mac(RX_MAC)])?;
        gen_ns.ip(&["addr", "add", &format!("{NET}.1/24"), "dev", &gen_dev])?;
        rx_ns.ip(&["addr", "add", &format!("{NET}.2/24"), "dev", &rx_dev])?;
        rx_ns.ip(&["addr", "add", &format!("{SERVICE_ADDR}/32"), "dev", &rx_dev])?;
        let anchor_dev = format!("fxa{pid:x}");
        gen_ns.ip(&[
            "link",
            "add",
            &anchor_dev,
            "type",
            "veth",
            "peer",
            "name",
            &format!("fxp{pid:x}"),
        ])?;
        Ok(Self {
            gen_ns,
            rx_ns,
            gen_dev,
            rx_dev,
            anchor_dev,
        })
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The frame every run sends: IPv4/UDP to the service, `payload` bytes.
pub fn service_frame(payload: usize) -> Vec<u8> {
    frames::udp4(
        Macs {
            dst: RX_MAC,
            src: GEN_MAC,
        },
        (GEN_ADDR, 40000),
        (SERVICE_ADDR, SERVICE_PORT),
        &frames::pattern(payload),
    )
}

pub fn service_addr() -> SocketAddr {
    SocketAddr::from((SERVICE_ADDR, SERVICE_PORT))
}

/// State shared between the consumer thread and the rest.
#[derive(Default)]
pub struct Shared {
    pub delivered: AtomicU64,
    /// Sum of one payload byte per datagram (keeps the read real).
    pub checksum: AtomicU64,
    pub stop: AtomicBool,
    /// Thread ids of the consumer and the generator (0 until they start).
    pub tid: AtomicI32,
    pub gen_tid: AtomicI32,
}

/// What a consumer reports when it stops.
#[derive(Debug, Default)]
pub struct ConsumerReport {
    pub where_ran: String,
    /// Receiver-specific lines (socket buffer size, AF_XDP statistics, classifier
    /// counters...).
    pub details: Vec<String>,
    pub stats: BTreeMap<String, u64>,
}

/// A receiver: sets up the rx side, then consumes on its own thread.
pub trait Receiver: Sync {
    /// Prepares the rx namespace before the consumer starts (GRO, XDP attach...).
    fn prepare(&self, topo: &Topology) -> Result<()>;
    /// Runs on the consumer thread (already in the rx namespace and pinned): opens its
    /// socket, sends `Ok(())` on `ready`, consumes until `shared.stop`.
    fn consume(
        &self,
        topo: &Topology,
        opts: &Options,
        shared: &Shared,
        ready: &mpsc::Sender<Result<()>>,
    ) -> Result<ConsumerReport>;
}

pub struct SocketReceiver;

impl Receiver for SocketReceiver {
    fn prepare(&self, topo: &Topology) -> Result<()> {
        // veth only accepts XDP frames from its peer when it has NAPI (GRO or XDP), and
        // GRO is the socket path's best case anyway.
        flynode::netns::run(
            topo.rx_ns
                .command("ethtool")
                .args(["-K", &topo.rx_dev, "gro", "on"]),
        )?;
        Ok(())
    }

    fn consume(
        &self,
        _topo: &Topology,
        opts: &Options,
        shared: &Shared,
        ready: &mpsc::Sender<Result<()>>,
    ) -> Result<ConsumerReport> {
        use flynode_tunnel::io::udp::{RecvBatch, UdpSocket};
        let sock = match UdpSocket::bind(service_addr(), opts.rcvbuf) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(anyhow!("bind {}: {e}", service_addr())));
                return Err(e.into());
            }
        };
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut batch = RecvBatch::new(opts.recv_batch);
        let _ = ready.send(Ok(()));
        let mut sum = 0u64;
        let mut calls = 0u64;
        let mut messages = 0u64;
        while !shared.stop.load(Ordering::Relaxed) {
            let n = sock.recv_batch(&mut batch)?;
            if n == 0 {
                continue;
            }
            calls += 1;
            messages += n as u64;
            let mut count = 0u64;
            for (_, d) in batch.iter() {
                sum = sum.wrapping_add(u64::from(d[d.len() - 1]));
                count += 1;
            }
            shared.delivered.fetch_add(count, Ordering::Relaxed);
        }
        shared.checksum.store(sum, Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        Ok(ConsumerReport {
            where_ran: where_ran(),
            details: vec![format!(
                "UDP socket: SO_RCVBUF {} B (kernel-doubled), UDP_GRO {}, {} recvmmsg \
                 calls returning data, {:.1} messages/call, {:.1} datagrams/message",
                sock.recv_buffer_size()?,
                if sock.gro_enabled() { "on" } else { "off" },
                calls,
                messages as f64 / calls.max(1) as f64,
                delivered as f64 / messages.max(1) as f64
            )],
            stats: BTreeMap::new(),
        })
    }
}

/// "CPU1 (affinity 1)" for the calling thread.
pub fn where_ran() -> String {
    let tid = sys::gettid();
    let st = sys::thread_stat(tid).unwrap_or_default();
    format!(
        "tid {tid}, last on CPU{}, affinity {}",
        st.processor,
        sys::affinity(tid).unwrap_or_else(|e| e.to_string())
    )
}

/// One point in time during a run.
struct Snapshot {
    at: Instant,
    gen_dev: sys::DevCounters,
    delivered: u64,
    rx_eth: BTreeMap<String, u64>,
    gen_eth: BTreeMap<String, u64>,
    snmp: BTreeMap<String, u64>,
    cpus: Vec<CpuTimes>,
    napi: Vec<TaskStat>,
    consumer: TaskStat,
    generator: TaskStat,
}

fn snapshot(topo: &Topology, shared: &Shared, napi: &[(i32, String)]) -> Snapshot {
    // The offered rate comes from the generator veth's /proc/net/dev counters (a veth
    // counts what its peer received in tx_packets and what the peer's full ring refused
    // in tx_dropped), read right next to the consumer's count. `ethtool` runs as a child
    // process for tens of ms, so its counters only serve as totals over the window.
    let gen_dev = sys::dev_counters(&topo.gen_ns, &topo.gen_dev).unwrap_or_default();
    let at = Instant::now();
    let delivered = shared.delivered.load(Ordering::Relaxed);
    Snapshot {
        at,
        gen_dev,
        gen_eth: sys::ethtool_stats(&topo.gen_ns, &topo.gen_dev).unwrap_or_default(),
        delivered,
        cpus: sys::cpu_times().unwrap_or_default(),
        napi: napi
            .iter()
            .map(|(pid, _)| sys::task_stat(*pid, *pid).unwrap_or_default())
            .collect(),
        consumer: sys::thread_stat(shared.tid.load(Ordering::Relaxed)).unwrap_or_default(),
        generator: sys::thread_stat(shared.gen_tid.load(Ordering::Relaxed)).unwrap_or_default(),
        // Counters of the receiver: only reported as totals over the window.
        rx_eth: sys::ethtool_stats(&topo.rx_ns, &topo.rx_dev).unwrap_or_default(),
        snmp: sys::udp_snmp(&topo.rx_ns).unwrap_or_default(),
    }
}

/// `b - a` for every counter of `b`, zeros left out.
fn delta(b: &BTreeMap<String, u64>, a: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(a.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v != 0)
        .collect()
}

/// Sum of the counters whose name starts with `prefix` and ends with `suffix`.
fn sum_of(m: &BTreeMap<String, u64>, prefix: &str, suffix: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix) && k.ends_with(suffix))
        .map(|(_, v)| v)
        .sum()
}

struct GenReport {
    /// Frames run through the generator program (sent or recycled at once).
    frames: u64,
    where_ran: String,
}

/// The generator thread: enters the gen namespace, pins itself, runs `frame` through the
/// pacer's program in live-frames mode, in calls of GEN_CHUNK frames, until `stop` or
/// `max_frames`.
fn generate(
    topo: &Topology,
    opts: &Options,
    pacer: &Pacer,
    frame: &[u8],
    stop: &AtomicBool,
    max_frames: u64,
    tid: &AtomicI32,
) -> Result<GenReport> {
    tid.store(sys::gettid(), Ordering::Relaxed);
    sys::enter_netns(&topo.gen_ns).context("generator: enter gen namespace")?;
    sys::pin(0, opts.gen_cpu).context("generator: pin")?;
    let prog = rawbpf::load_xdp("fxb_gen_tx", &pacer.program(frame, opts.flows))?;
    let ifindex = rawbpf::ifindex(&topo.gen_dev)?;
    // Keep the program in the kernel's XDP dispatcher for the whole run: every test run
    // otherwise adds it and removes it again, two synchronize_rcu() per call that leave
    // the generator asleep for milliseconds.
    let anchor = rawbpf::ifindex(&topo.anchor_dev)?;
    let _anchor_link = rawbpf::attach_xdp(prog.as_fd(), anchor, rawbpf::AttachMode::Native)
        .context("attach the generator program to the anchor veth")?;
    let mut frames = 0u64;
    while !stop.load(Ordering::Relaxed) && frames < max_frames && !sys::interrupted() {
        let per_call = match pacer.rate() {
            Some(pps) => ((pps / 10.0) as u32).clamp(4096, GEN_CHUNK),
            None => GEN_CHUNK,
        };
        let n = per_call.min((max_frames - frames) as u32);
        match rawbpf::test_run_live(prog.as_fd(), ifindex, 0, frame, n, opts.gen_batch) {
            Ok(()) => frames += u64::from(n),
            // A signal (Ctrl-C) interrupts the run; the loop condition ends it.
            Err(e) if flynode_xsk::errno(&e) == Some(libc::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(GenReport {
        frames,
        where_ran: where_ran(),
    })
}

/// One offered rate of one run.
pub struct Step {
    /// The rate asked of the pacer (`None`: unpaced).
    pub target: Option<f64>,
    /// Frames the generator handed to the veth per second (sent + dropped on a full
    /// ring), as counted by the kernel on the generator's side.
    pub offered_pps: f64,
    /// Frames offered over the window according to ethtool (xdp_xmit + xdp_xmit_errors),
    /// a cross-check of `offered_pps` read a few ms apart from it.
    pub offered_ethtool: u64,
    /// Datagrams per second counted by the consumer.
    pub delivered_pps: f64,
    /// Generator-side veth counters over the window (xdp_xmit, xdp_xmit_errors: dropped
    /// because the receiver's 256-frame ring was full).
    pub gen_eth: BTreeMap<String, u64>,
    /// Receiver-side veth counters over the window.
    pub rx_eth: BTreeMap<String, u64>,
    /// /proc/net/snmp Udp counters of the rx namespace over the window.
    pub snmp: BTreeMap<String, u64>,
    pub cpu_split: Vec<String>,
    /// CPU time of the receiver (napi kthread + consumer) per delivered datagram, ns.
    pub rx_ns_per_datagram: f64,
    /// Share of each of our CPUs used by tasks other than ours during the window.
    pub foreign: [(usize, f64); 2],
}

/// Result of one run of one receiver.
pub struct RunResult {
    pub mode: Mode,
    pub steps: Vec<Step>,
    /// Frames the generator program ran on (sent, or skipped after waiting too long).
    pub gen_frames: u64,
    pub delivered_total: u64,
    pub consumer: ConsumerReport,
    pub gen_where: String,
    pub napi_where: Vec<String>,
    pub checksum: u64,
}

impl RunResult {
    /// The worst share of one of our CPUs that other tasks took during a window, if
    /// above [`DISTURBED`].
    pub fn disturbed(&self) -> Option<(usize, f64)> {
        self.steps
            .iter()
            .flat_map(|s| s.foreign)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, share)| *share > DISTURBED)
    }

    /// The step with the highest delivered rate.
    pub fn peak(&self) -> &Step {
        self.steps
            .iter()
            .max_by(|a, b| a.delivered_pps.total_cmp(&b.delivered_pps))
            .expect("a run has at least one step")
    }
}

/// Enables threaded NAPI on the rx veth and pins its kthread(s) to `cpu`; returns them.
fn thread_napi(topo: &Topology, cpu: usize) -> Result<Vec<(i32, String)>> {
    let prefix = format!("napi/{}", topo.rx_dev);
    let prefix = &prefix[..prefix.len().min(15)];
    let before = sys::kthreads_named(prefix);
    sys::write_sysfs_net(&topo.rx_ns, &topo.rx_dev, "threaded", "1")?;
    let threads = flynode::netns::wait_for(Duration::from_secs(2), || {
        let now: Vec<_> = sys::kthreads_named(prefix)
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect();
        (!now.is_empty()).then_some(now)
    })
    .ok_or_else(|| anyhow!("no {prefix}* kernel thread appeared after threaded=1"))?;
    for (pid, comm) in &threads {
        sys::pin(*pid, cpu).with_context(|| format!("pin {comm} (pid {pid}) to CPU{cpu}"))?;
    }
    Ok(threads)
}

fn step_from(
    target: Option<f64>,
    a: &Snapshot,
    b: &Snapshot,
    napi: &[(i32, String)],
    opts: &Options,
) -> Step {
    let window = (b.at - a.at).as_secs_f64();
    let gen_eth = delta(&b.gen_eth, &a.gen_eth);
    let sent = sum_of(&gen_eth, "tx_queue_", "_xdp_xmit")
        + sum_of(&gen_eth, "tx_queue_", "_xdp_xmit_errors");
    let ticks = sys::clock_ticks_per_second() as f64 * window;
    let share =
        |b: &TaskStat, a: &TaskStat| 100.0 * b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks;
    let cpu_delta: Vec<CpuTimes> = b
        .cpus
        .iter()
        .zip(&a.cpus)
        .map(|(b, a)| b.minus(a))
        .collect();
    let mut cpu_split: Vec<String> = cpu_delta
        .iter()
        .enumerate()
        .map(|(i, d)| format!("CPU{i}: {}", d.describe()))
        .collect();
    let napi_share: f64 = b.napi.iter().zip(&a.napi).map(|(b, a)| share(b, a)).sum();
    let consumer_share = share(&b.consumer, &a.consumer);
    let gen_share = share(&b.generator, &a.generator);
    for (i, (sb, sa)) in b.napi.iter().zip(&a.napi).enumerate() {
        cpu_split.push(format!("{} {:.0}%", napi[i].1, share(sb, sa)));
    }
    cpu_split.push(format!("consumer {consumer_share:.0}%"));
    cpu_split.push(format!("generator {gen_share:.0}%"));
    let busy = |cpu: usize| {
        cpu_delta
            .get(cpu)
            .map_or(0.0, |d| 100.0 * d.busy() as f64 / d.total().max(1) as f64)
    };
    let delivered_pps = b.delivered.saturating_sub(a.delivered) as f64 / window;
    Step {
        target,
        offered_pps: (b.gen_dev.tx_packets + b.gen_dev.tx_drop)
            .saturating_sub(a.gen_dev.tx_packets + a.gen_dev.tx_drop) as f64
            / window,
        offered_ethtool: sent,
        delivered_pps,
        rx_ns_per_datagram: (napi_share + consumer_share) / 100.0 * 1e9 / delivered_pps.max(1.0),
        gen_eth,
        rx_eth: delta(&b.rx_eth, &a.rx_eth),
        snmp: delta(&b.snmp, &a.snmp),
        cpu_split,
        foreign: [
            (opts.gen_cpu, (busy(opts.gen_cpu) - gen_share).max(0.0)),
            (
                opts.rx_cpu,
                (busy(opts.rx_cpu) - napi_share - consumer_share).max(0.0),
            ),
        ],
    }
}

pub fn run_once(mode: Mode, receiver: &dyn Receiver, opts: &Options) -> Result<RunResult> {
    let topo = Topology::new()?;
    receiver.prepare(&topo)?;
    let frame = service_frame(opts.payload);
    let shared = Shared::default();
    let gen_stop = AtomicBool::new(false);
    let pacer = Pacer::new()?;
    pacer.set_rate(opts.rates[0])?;
    let total_secs = (opts.warmup + opts.seconds) * opts.rates.len() as f64 + 2.0;
    let max_frames = (total_secs * GEN_MAX_PPS as f64) as u64;
    sys::pin(0, opts.gen_cpu)?;

    std::thread::scope(|s| -> Result<RunResult> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let consumer = s.spawn(|| -> Result<ConsumerReport> {
            let ready = ready_tx;
            let setup = sys::enter_netns(&topo.rx_ns)
                .context("consumer: enter rx namespace")
                .and_then(|()| sys::pin(0, opts.rx_cpu).context("consumer: pin"));
            if let Err(e) = setup {
                let _ = ready.send(Err(anyhow!("{e:#}")));
                return Err(e);
            }
            shared.tid.store(sys::gettid(), Ordering::Relaxed);
            if opts.consumer_batch
                && let Err(e) = sys::set_sched_batch()
            {
                let _ = ready.send(Err(anyhow!("consumer: SCHED_BATCH: {e}")));
                return Err(e.into());
            }
            receiver.consume(&topo, opts, &shared, &ready)
        });
        // Whatever happens next, the consumer must be told to stop before the scope
        // joins it.
        let stop_consumer = StopOnDrop(&shared.stop);
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("consumer setup")),
            Err(_) => {
                drop(stop_consumer);
                return Err(consumer
                    .join()
                    .map_err(|_| anyhow!("consumer panicked"))?
                    .err()
                    .unwrap_or_else(|| anyhow!("consumer never became ready")));
            }
        }
        // After XDP is attached / GRO is on: NAPI exists, so it can become a thread.
        let napi = thread_napi(&topo, opts.rx_cpu)?;

        let stop_gen = StopOnDrop(&gen_stop);
        let generator = s.spawn(|| {
            generate(
                &topo,
                opts,
                &pacer,
                &frame,
                &gen_stop,
                max_frames,
                &shared.gen_tid,
            )
        });
        let mut steps = Vec::new();
        for &target in &opts.rates {
            pacer.set_rate(target)?;
            sleep_checked(opts.warmup)?;
            if generator.is_finished() {
                break;
            }
            let a = snapshot(&topo, &shared, &napi);
            sleep_checked(opts.seconds)?;
            let b = snapshot(&topo, &shared, &napi);
            steps.push(step_from(target, &a, &b, &napi, opts));
        }
        drop(stop_gen);
        let generated = generator
            .join()
            .map_err(|_| anyhow!("generator panicked"))??;
        if steps.len() < opts.rates.len() {
            bail!("the generator stopped early");
        }
        // Let the consumer drain what is queued, for the totals.
        let mut last = shared.delivered.load(Ordering::Relaxed);
        let drain_deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < drain_deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = shared.delivered.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        let napi_where = napi
            .iter()
            .map(|(pid, comm)| {
                let st = sys::task_stat(*pid, *pid).unwrap_or_default();
                format!(
                    "{comm} (pid {pid}): last on CPU{}, affinity {}",
                    st.processor,
                    sys::affinity(*pid).unwrap_or_else(|e| e.to_string())
                )
            })
            .collect();
        drop(stop_consumer);
        let consumer = consumer
            .join()
            .map_err(|_| anyhow!("consumer panicked"))??;
        Ok(RunResult {
            mode,
            steps,
            gen_frames: generated.frames,
            delivered_total: shared.delivered.load(Ordering::Relaxed),
            consumer,
            gen_where: generated.where_ran,
            napi_where,
            checksum: shared.checksum.load(Ordering::Relaxed),
        })
    })
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn sleep_checked(seconds: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        sys::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(deadline - Instant::now()));
    }
    Ok(())
}

fn mpps(pps: f64) -> String {
    format!("{:.3}", pps / 1e6)
}

fn target_name(t: Option<f64>) -> String {
    match t {
        Some(r) => format!("{:.2}", r / 1e6),
        None => "max".to_owned(),
    }
}

/// Receiver-side counters worth a column: drops and what XDP did.
fn rx_summary(s: &Step) -> String {
    let g = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    let mut parts = vec![format!(
        "ring-full {}",
        sum_of(&s.gen_eth, "tx_queue_", "_xdp_xmit_errors")
    )];
    for (k, v) in &s.rx_eth {
        if k.starts_with("rx_queue_") && !k.contains("bytes") {
            parts.push(format!("{}={v}", k.trim_start_matches("rx_queue_")));
        }
    }
    for k in ["RcvbufErrors", "InErrors", "InCsumErrors", "NoPorts"] {
        if g(&s.snmp, k) != 0 {
            parts.push(format!("Udp.{k}={}", g(&s.snmp, k)));
        }
    }
    parts.join(" ")
}

fn print_run(i: usize, r: &RunResult, verbose: bool) {
    println!(
        "  run {} {}: totals: generated {}, delivered {}, payload-byte sum {}",
        i + 1,
        r.mode.name(),
        r.gen_frames,
        r.delivered_total,
        r.checksum
    );
    for s in &r.steps {
        println!(
            "    target {:>5} Mpps  offered {:>6}  delivered {:>6} Mpps  [{}]",
            target_name(s.target),
            mpps(s.offered_pps),
            mpps(s.delivered_pps),
            rx_summary(s)
        );
        if s.foreign.iter().any(|(_, f)| *f > DISTURBED) {
            println!(
                "      WARNING: other tasks used {} during this window: numbers are skewed",
                s.foreign
                    .iter()
                    .map(|(c, f)| format!("{f:.0}% of CPU{c}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            );
        }
        if verbose {
            println!("      CPU time: {}", s.cpu_split.join("; "));
            println!(
                "      offered per ethtool over its (looser) window: {} frames",
                s.offered_ethtool
            );
        }
    }
    if !r.consumer.stats.is_empty() {
        println!(
            "    consumer totals: {}",
            r.consumer
                .stats
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for d in &r.consumer.details {
        println!("    {d}");
    }
    if verbose || i == 0 {
        println!("    where: generator {}", r.gen_where);
        println!("           consumer  {}", r.consumer.where_ran);
        for n in &r.napi_where {
            println!("           {n}");
        }
        let peak = r.peak();
        println!(
            "    CPU time at the peak (target {}): {}",
            target_name(peak.target),
            peak.cpu_split.join("; ")
        );
    }
}

/// The outcome of part 2 for one workload.
pub struct Summary {
    pub flows: u32,
    /// Median over runs of each run's best delivered rate, per receiver.
    pub peak: BTreeMap<&'static str, f64>,
    /// Median delivered rate at the generator's full rate, per receiver.
    pub at_max: BTreeMap<&'static str, f64>,
    /// Median receiver CPU ns per datagram at each run's peak, per receiver.
    pub ns_per_datagram: BTreeMap<&'static str, f64>,
}

impl Summary {
    pub fn ratio(&self) -> Option<f64> {
        Some(self.peak.get("af_xdp")? / self.peak.get("socket")?)
    }

    /// The redirect-only receiver against the socket: no AF_XDP receiver can beat it.
    pub fn ceiling(&self) -> Option<f64> {
        Some(self.peak.get("af_xdp_bare")? / self.peak.get("socket")?)
    }
}

pub fn flows_name(flows: u32) -> String {
    if flows == 1 {
        "1 flow (GRO's best case)".to_owned()
    } else {
        format!("{flows} flows (client ports round robin)")
    }
}

/// Runs part 2 for one workload and prints its tables.
pub fn run(opts: &Options, receivers: &[(Mode, &dyn Receiver)]) -> Result<Summary> {
    let frame_len = service_frame(opts.payload).len();
    println!(
        "== deliver, {}: {}-byte UDP payloads ({frame_len}-byte frames) to {}, {} run(s) \
         per receiver, offered rates {} Mpps, {:.1} s window (+{:.1} s settling) each; \
         generator on CPU{}, receiver (consumer + napi kthread) on CPU{}, consumer {} ==",
        flows_name(opts.flows),
        opts.payload,
        service_addr(),
        opts.runs,
        opts.rates
            .iter()
            .map(|r| target_name(*r))
            .collect::<Vec<_>>()
            .join(","),
        opts.seconds,
        opts.warmup,
        opts.gen_cpu,
        opts.rx_cpu,
        if opts.consumer_batch {
            "SCHED_BATCH"
        } else {
            "SCHED_OTHER"
        }
    );
    let mut results: BTreeMap<&'static str, Vec<RunResult>> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    for i in 0..opts.runs {
        // Interleave the receivers so that drift on the machine hits both alike.
        for (mode, receiver) in receivers {
            let mut attempt = 0;
            loop {
                sys::check_interrupted()?;
                sys::wait_until_quiet(opts.quiet_wait, QUIET_BUSY)?;
                match run_once(*mode, *receiver, opts) {
                    Ok(r) => {
                        let disturbed = r.disturbed();
                        if let Some((cpu, share)) = disturbed
                            && attempt < opts.retries
                        {
                            attempt += 1;
                            println!(
                                "  run {} {}: other tasks used {share:.0}% of CPU{cpu} during a \
                                 window, repeating the run ({attempt}/{})",
                                i + 1,
                                mode.name(),
                                opts.retries
                            );
                            continue;
                        }
                        print_run(i, &r, opts.verbose);
                        results.entry(mode.name()).or_default().push(r);
                    }
                    Err(e) if sys::interrupted() => return Err(e),
                    Err(e) => {
                        println!("  run {} {} FAILED: {e:#}", i + 1, mode.name());
                        failures.push(format!("{}: {e:#}", mode.name()));
                    }
                }
                break;
            }
        }
    }
    println!();
    println!("delivered datagrams/s (median over runs), by offered rate:");
    println!(
        "{:<8} {:>12} {:>14} {:>16} {:>11} {:>12}",
        "receiver", "target Mpps", "offered Mpps", "delivered Mpps", "delivered%", "rx ns/dgram"
    );
    let mut summary = Summary {
        flows: opts.flows,
        peak: BTreeMap::new(),
        at_max: BTreeMap::new(),
        ns_per_datagram: BTreeMap::new(),
    };
    for (mode, _) in receivers {
        let Some(rs) = results.get(mode.name()) else {
            println!("{:<8} (no successful run)", mode.name());
            continue;
        };
        for (k, target) in opts.rates.iter().enumerate() {
            let mut off: Vec<f64> = rs.iter().map(|r| r.steps[k].offered_pps).collect();
            let mut del: Vec<f64> = rs.iter().map(|r| r.steps[k].delivered_pps).collect();
            let mut ns: Vec<f64> = rs.iter().map(|r| r.steps[k].rx_ns_per_datagram).collect();
            let (off, del, ns) = (
                sys::median(&mut off),
                sys::median(&mut del),
                sys::median(&mut ns),
            );
            println!(
                "{:<8} {:>12} {:>14} {:>16} {:>10.1}% {:>12.0}",
                mode.name(),
                target_name(*target),
                mpps(off),
                mpps(del),
                100.0 * del / off.max(1.0),
                ns
            );
            if target.is_none() {
                summary.at_max.insert(mode.name(), del);
            }
        }
        let mut p: Vec<f64> = rs.iter().map(|r| r.peak().delivered_pps).collect();
        summary.peak.insert(mode.name(), sys::median(&mut p));
        let mut ns: Vec<f64> = rs.iter().map(|r| r.peak().rx_ns_per_datagram).collect();
        summary
            .ns_per_datagram
            .insert(mode.name(), sys::median(&mut ns));
    }
    if summary.peak.is_empty() && !failures.is_empty() {
        bail!("receivers failed: {}", failures.join("; "));
    }
    println!();
    Ok(summary)
}

/// Prints the final table over workloads; returns whether every ratio met the target.
pub fn print_summary(summaries: &[Summary]) -> bool {
    println!("== deliver: summary (medians over runs) ==");
    println!(
        "{:<38} {:>13} {:>13} {:>12} {:>14} {:>14}  target >= {TARGET_RATIO}x",
        "workload", "socket peak", "af_xdp peak", "ratio", "ns/dgram s/x", "ratio at max"
    );
    let mut ok = true;
    for s in summaries {
        let cell = |m: &BTreeMap<&str, f64>, k: &str| m.get(k).map_or("-".to_owned(), |v| mpps(*v));
        let ratio = s.ratio();
        let at_max = match (s.at_max.get("af_xdp"), s.at_max.get("socket")) {
            (Some(x), Some(y)) => format!("{:.2}x", x / y.max(1.0)),
            _ => "-".to_owned(),
        };
        let ns = format!(
            "{}/{}",
            s.ns_per_datagram
                .get("socket")
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            s.ns_per_datagram
                .get("af_xdp")
                .map_or("-".to_owned(), |v| format!("{v:.0}"))
        );
        let verdict = match ratio {
            Some(r) => {
                ok &= r >= TARGET_RATIO;
                pass_fail(r >= TARGET_RATIO)
            }
            None => "-",
        };
        println!(
            "{:<38} {:>9} Mpps {:>8} Mpps {:>11} {:>14} {:>14}  {verdict}",
            flows_name(s.flows),
            cell(&s.peak, "socket"),
            cell(&s.peak, "af_xdp"),
            ratio.map_or("-".to_owned(), |r| format!("{r:.2}x")),
            ns,
            at_max
        );
        if let Some(c) = s.ceiling() {
            println!(
                "  ceiling: redirect-only program {} Mpps = {c:.2}x the socket{}",
                cell(&s.peak, "af_xdp_bare"),
                if c < TARGET_RATIO {
                    format!(
                        " < {TARGET_RATIO}x: no AF_XDP receiver can meet the target on this \
                         workload here"
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    println!(
        "peak: each run's best delivered rate over the offered rates (median over runs); \
         ns/dgram: receiver CPU time (napi kthread + consumer) per delivered datagram at the \
         peak; ratio at max: delivered rates with the generator unpaced."
    );
    ok
}
