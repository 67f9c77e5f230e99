//! flynode's XDP benchmark (issue 4, "Benchmark"): see `--help` and
//! bench/README.md "### XDP".
//!
//! - `classify`: ns/packet of flynode's XDP classifier against a trivial XDP_DROP program,
//!   with `BPF_PROG_RUN` on representative frames. Target: trivial/classifier ≥ 0.6.
//! - `deliver`: datagrams per second delivered to a userspace consumer through AF_XDP
//!   (flynode's classifier + an AF_XDP socket) against an ordinary UDP socket (recvmmsg,
//!   GRO), fed by a live-frames generator over a veth between two network namespaces.
//!   Target: AF_XDP ≥ 3x the socket.
//!
//! - `forward`: issue 5's end-to-end benchmark, client → edge → worker → container through
//!   flynode against plain kernel routing in the same namespaces (delivered rate, loss,
//!   CPU per host, round-trip latency, memory with a million flows); see [`forward`].
//! - `fleet`: issue 6's benchmark, time from a routing change (etcd put, or the routing
//!   file as the baseline) to the new entry in a running daemon's XDP services map; run
//!   by bench/fleet.sh, see [`fleet`].
//!
//! Everything runs in network namespaces this process creates (addresses from
//! 198.18.0.0/15) and is removed when it ends, on error and on Ctrl-C too.
mod afxdp;
mod bpfsys;
mod classify;
mod deliver;
mod fleet;
mod forward;
mod frames;
mod pacer;
mod sys;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "flynode XDP benchmarks (run as root)")]
struct Cli {
    #[command(subcommand)]
    what: Option<What>,
    /// Exit with status 1 when a target is missed.
    #[arg(long, global = true, env = "BENCH_STRICT", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    strict: bool,
    #[command(flatten)]
    classify: ClassifyArgs,
    #[command(flatten)]
    deliver: DeliverArgs,
    #[command(flatten)]
    forward: ForwardArgs,
    #[command(flatten)]
    fleet: FleetArgs,
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    /// Classifier cost (BPF_PROG_RUN).
    Classify,
    /// Delivered datagrams per second (live-frames generator over a veth).
    Deliver,
    /// Classify and deliver (the default).
    All,
    /// End to end through flynode vs plain routing (issue 5; bench/forward.sh). Shares
    /// --runs, --seconds, --warmup, --gen-batch, --rcvbuf, --recv-batch, --retries,
    /// --quiet-wait and --verbose with deliver.
    Forward,
    /// Routing change → XDP map latency, etcd vs routing file (issue 6; one phase per
    /// call, in the namespace bench/fleet.sh sets up: --fleet-phase etcd, file, report).
    Fleet,
}

#[derive(clap::Args, Debug)]
struct ClassifyArgs {
    /// Runs per BPF_PROG_RUN call.
    #[arg(
        long,
        global = true,
        env = "BENCH_REPEAT",
        default_value_t = 10_000_000
    )]
    repeat: u32,
    /// Timed calls per program and frame (the median is reported).
    #[arg(long, global = true, env = "BENCH_ROUNDS", default_value_t = 5)]
    rounds: usize,
    /// Time the classifier without an AF_XDP socket in its XSKMAP (hits then fall back
    /// to XDP_PASS instead of XDP_REDIRECT).
    #[arg(long, global = true)]
    no_socket: bool,
}

#[derive(clap::Args, Debug)]
struct DeliverArgs {
    /// Runs per receiver (the median is reported).
    #[arg(long, global = true, env = "BENCH_RUNS", default_value_t = 3)]
    runs: usize,
    /// Measured seconds per offered rate.
    #[arg(long, global = true, env = "BENCH_SECONDS", default_value_t = 1.0)]
    seconds: f64,
    /// Seconds of generation at each offered rate before its window opens.
    #[arg(long, global = true, env = "BENCH_WARMUP", default_value_t = 0.3)]
    warmup: f64,
    /// UDP payload bytes.
    #[arg(long, global = true, env = "BENCH_PAYLOAD", default_value_t = 64)]
    payload: usize,
    /// Frames per live-frames kernel batch (1..=256).
    #[arg(long, global = true, default_value_t = 64)]
    gen_batch: u32,
    /// Offered rates to step through in each run, in Mpps; `max` is the generator's
    /// full rate (comma-separated).
    #[arg(
        long,
        global = true,
        env = "BENCH_RATES",
        value_delimiter = ',',
        default_value = "0.25,0.5,0.75,1,1.25,1.5,2,2.5,3,4,max"
    )]
    rates: Vec<String>,
    /// Scheduling policy of the consumer threads: batch (SCHED_BATCH: a consumer that
    /// wakes up does not preempt the napi kthread it shares CPU1 with) or other.
    #[arg(
        long,
        global = true,
        env = "BENCH_CONSUMER_SCHED",
        default_value = "batch"
    )]
    consumer_sched: String,
    /// Workloads: numbers of client ports (flows) the generator cycles through, powers
    /// of two; 1 is a single flow, which GRO coalesces best (comma-separated).
    #[arg(
        long,
        global = true,
        env = "BENCH_FLOWS",
        value_delimiter = ',',
        default_value = "1,256"
    )]
    flows: Vec<u32>,
    /// Messages per recvmmsg (socket receiver).
    #[arg(long, global = true, default_value_t = 256)]
    recv_batch: usize,
    /// SO_RCVBUF of the socket receiver, bytes (set with SO_RCVBUFFORCE).
    #[arg(long, global = true, default_value_t = 64 << 20)]
    rcvbuf: usize,
    /// Frames per AF_XDP receive batch.
    #[arg(long, global = true, default_value_t = 256)]
    xsk_batch: usize,
    /// Entries of the AF_XDP RX and fill rings (power of two).
    #[arg(long, global = true, default_value_t = 8192)]
    xsk_ring: u32,
    /// Frames in the AF_XDP UMEM (2 KiB each: 32 MiB by default, the socket gets a
    /// 64 MiB receive buffer).
    #[arg(long, global = true, default_value_t = 16384)]
    xsk_frames: u32,
    /// Receivers to measure: socket, af_xdp, af_xdp_bare (comma-separated). af_xdp_bare
    /// is the ceiling of any AF_XDP receiver here: a program that only redirects into
    /// the socket.
    #[arg(
        long,
        global = true,
        env = "BENCH_ONLY",
        value_delimiter = ',',
        default_value = "socket,af_xdp,af_xdp_bare"
    )]
    only: Vec<String>,
    /// Seconds to wait, before each run, for no CPU to be more than 10% busy.
    #[arg(long, global = true, env = "BENCH_QUIET_WAIT", default_value_t = 30.0)]
    quiet_wait: f64,
    /// Times a run is repeated when other tasks took more than 10% of one of our CPUs
    /// during one of its windows.
    #[arg(long, global = true, env = "BENCH_RETRIES", default_value_t = 1)]
    retries: usize,
    /// Print where each part ran for every run, not only the first.
    #[arg(long, short, global = true)]
    verbose: bool,
}

#[derive(clap::Args, Debug)]
struct ForwardArgs {
    /// forward: offered rates in Mpps, `max` = unpaced (comma-separated). Steps of
    /// about 10% around where both paths peak: the reported peak is the best step, so a
    /// coarse grid under-reports a path by up to the gap (a path that tops out just
    /// under 0.10 Mpps reads 0.08 with 0.08/0.10/0.12 steps).
    #[arg(
        long,
        global = true,
        env = "BENCH_FWD_RATES",
        value_delimiter = ',',
        default_value = "0.02,0.04,0.06,0.07,0.08,0.09,0.1,0.11,0.12,0.135,0.15,0.175,0.2,0.225,0.25,0.275,0.3,0.4,0.5,max"
    )]
    fwd_rates: Vec<String>,
    /// forward: UDP payload sizes, bytes (comma-separated).
    #[arg(
        long,
        global = true,
        env = "BENCH_FWD_PAYLOADS",
        value_delimiter = ',',
        default_value = "64,1200"
    )]
    fwd_payloads: Vec<usize>,
    /// forward: client ports the generator cycles through (a power of two up to 4096).
    #[arg(long, global = true, env = "BENCH_FWD_FLOWS", default_value_t = 256)]
    fwd_flows: u32,
    /// forward: timed request/replies of the latency ping-pong.
    #[arg(long, global = true, env = "BENCH_PINGS", default_value_t = 2000)]
    pings: usize,
    /// forward: flows of the flow-table fill (0: skip it).
    #[arg(
        long,
        global = true,
        env = "BENCH_MILLION",
        default_value_t = 1_000_000
    )]
    million: u64,
    /// forward: rate of the flow-table fill in Mpps (default: 0.4 x flynode's 64-byte
    /// peak, 0.02 to 0.3).
    #[arg(long, global = true, env = "BENCH_MILLION_RATE")]
    million_rate: Option<f64>,
    /// forward: parts to run: throughput, latency, flows, metrics (comma-separated;
    /// metrics, the cost of the metrics endpoint, only when named).
    #[arg(
        long,
        global = true,
        env = "BENCH_FWD_ONLY",
        value_delimiter = ',',
        default_value = "throughput,latency,flows"
    )]
    fwd_only: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct FleetArgs {
    /// fleet: etcd (time etcd puts), file (time routing-file rewrites), report (both
    /// side by side, and the target).
    #[arg(
        long,
        global = true,
        env = "BENCH_FLEET_PHASE",
        default_value = "report"
    )]
    fleet_phase: fleet::Phase,
    /// fleet: directory for the samples between phases; holds the file phase's
    /// routing.toml (with the node's [[node]] table when the phase starts).
    #[arg(long, global = true, env = "BENCH_FLEET_DIR", default_value = ".")]
    fleet_dir: std::path::PathBuf,
    /// fleet: timed changes per phase.
    #[arg(
        long,
        global = true,
        env = "BENCH_FLEET_CHANGES",
        default_value_t = 100
    )]
    fleet_changes: usize,
    /// fleet: the interface the daemon's XDP program is attached to.
    #[arg(long, global = true, default_value = "v0")]
    fleet_interface: String,
    /// fleet: the daemon's node id (the bench service's worker).
    #[arg(long, global = true, default_value = "fleet-1")]
    fleet_node: String,
    /// fleet: etcd endpoint.
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379")]
    fleet_etcd: String,
    /// fleet: the daemon's etcd prefix.
    #[arg(long, global = true, default_value = "/flynode/")]
    fleet_prefix: String,
    /// fleet: microseconds between two reads of the services map.
    #[arg(long, global = true, default_value_t = 200)]
    fleet_poll_us: u64,
    /// fleet: seconds a change may take before it counts as failed.
    #[arg(long, global = true, default_value_t = 5.0)]
    fleet_timeout: f64,
}

fn main() -> ExitCode {
    // Before any thread exists (set_var): the daemons of `forward` are the release
    // flynode next to this binary unless FLYNODE_BIN says otherwise.
    forward::default_flynode_bin();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if cli.strict => ExitCode::FAILURE,
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("needs root (BPF programs, network namespaces, AF_XDP)");
    }
    sys::install_signal_handlers()?;
    let what = cli.what.unwrap_or(What::All);
    let mut ok = true;
    if matches!(what, What::Classify | What::All) {
        sys::wait_until_quiet(cli.deliver.quiet_wait, 10.0)?;
        let opts = classify::Options {
            repeat: cli.classify.repeat,
            rounds: cli.classify.rounds.max(1),
            cpu: 1,
            with_socket: !cli.classify.no_socket,
        };
        ok &= classify::run(&opts)?;
        println!();
    }
    if what == What::Forward {
        ok &= forward::run(&forward_options(cli)?)?;
    }
    if what == What::Fleet {
        let f = &cli.fleet;
        ok &= fleet::run(&fleet::Options {
            phase: f.fleet_phase,
            dir: f.fleet_dir.clone(),
            changes: f.fleet_changes.clamp(1, 10_000),
            interface: f.fleet_interface.clone(),
            node: f.fleet_node.clone(),
            etcd: f.fleet_etcd.clone(),
            prefix: if f.fleet_prefix.ends_with('/') {
                f.fleet_prefix.clone()
            } else {
                format!("{}/", f.fleet_prefix)
            },
            poll: std::time::Duration::from_micros(f.fleet_poll_us.max(1)),
            timeout: std::time::Duration::from_secs_f64(f.fleet_timeout.max(0.001)),
        })?;
    }
    if matches!(what, What::Deliver | What::All) {
        let d = &cli.deliver;
        let mut modes = Vec::new();
        for m in &d.only {
            modes.push(match m.trim() {
                "socket" => deliver::Mode::Socket,
                "af_xdp" | "afxdp" | "xsk" => deliver::Mode::AfXdp,
                "af_xdp_bare" => deliver::Mode::AfXdpBare,
                other => {
                    anyhow::bail!("unknown receiver `{other}` (socket, af_xdp, af_xdp_bare)")
                }
            });
        }
        let rates = parse_rates(&d.rates)?;
        let opts = deliver::Options {
            runs: d.runs.max(1),
            seconds: d.seconds,
            warmup: d.warmup,
            payload: d.payload,
            gen_cpu: 0,
            rx_cpu: 1,
            gen_batch: d.gen_batch.clamp(1, 256),
            rates,
            consumer_batch: match d.consumer_sched.as_str() {
                "batch" => true,
                "other" => false,
                other => anyhow::bail!("unknown consumer policy `{other}` (batch, other)"),
            },
            flows: 1,
            recv_batch: d.recv_batch,
            rcvbuf: d.rcvbuf,
            xsk_batch: d.xsk_batch,
            xsk_ring: d.xsk_ring,
            xsk_frames: d.xsk_frames,
            modes,
            verbose: d.verbose,
            quiet_wait: d.quiet_wait,
            retries: d.retries,
        };
        let socket = deliver::SocketReceiver;
        let af_xdp = afxdp::AfXdpReceiver { bare: false };
        let af_xdp_bare = afxdp::AfXdpReceiver { bare: true };
        let receivers: Vec<(deliver::Mode, &dyn deliver::Receiver)> = opts
            .modes
            .iter()
            .map(|m| match m {
                deliver::Mode::Socket => (*m, &socket as &dyn deliver::Receiver),
                deliver::Mode::AfXdp => (*m, &af_xdp as &dyn deliver::Receiver),
                deliver::Mode::AfXdpBare => (*m, &af_xdp_bare as &dyn deliver::Receiver),
            })
            .collect();
        let mut summaries = Vec::new();
        for &flows in &d.flows {
            if !flows.is_power_of_two() || flows > 4096 {
                anyhow::bail!("--flows: {flows} is not a power of two up to 4096");
            }
            let opts = deliver::Options {
                flows,
                ..opts.clone()
            };
            summaries.push(deliver::run(&opts, &receivers)?);
        }
        ok &= deliver::print_summary(&summaries);
    }
    Ok(ok)
}

/// Offered rates: Mpps values or `max` (unpaced), in frames per second.
fn parse_rates(rates: &[String]) -> Result<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for r in rates {
        out.push(match r.trim() {
            "max" => None,
            v => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| anyhow::anyhow!("bad rate `{v}` (Mpps or `max`)"))?
                    * 1e6,
            ),
        });
    }
    if out.is_empty() {
        anyhow::bail!("no offered rates");
    }
    Ok(out)
}

fn forward_options(cli: &Cli) -> Result<forward::Options> {
    let (d, f) = (&cli.deliver, &cli.forward);
    if !f.fwd_flows.is_power_of_two() || f.fwd_flows > 4096 {
        anyhow::bail!(
            "--fwd-flows: {} is not a power of two up to 4096",
            f.fwd_flows
        );
    }
    if f.fwd_payloads.iter().any(|&p| !(2..=1300).contains(&p)) {
        anyhow::bail!("--fwd-payloads: sizes from 2 to 1300 bytes (the mesh MTU bounds them)");
    }
    let (mut throughput, mut latency, mut flows, mut metrics) = (false, false, false, false);
    for part in &f.fwd_only {
        match part.trim() {
            "throughput" => throughput = true,
            "latency" => latency = true,
            "flows" => flows = true,
            "metrics" => metrics = true,
            other => {
                anyhow::bail!("unknown part `{other}` (throughput, latency, flows, metrics)")
            }
        }
    }
    Ok(forward::Options {
        load: forward::LoadOptions {
            seconds: d.seconds,
            warmup: d.warmup,
            rates: parse_rates(&f.fwd_rates)?,
            flows: f.fwd_flows,
            gen_batch: d.gen_batch.clamp(1, 256),
            rcvbuf: d.rcvbuf,
            recv_batch: d.recv_batch,
        },
        runs: d.runs.max(1),
        payloads: f.fwd_payloads.clone(),
        pings: f.pings.max(1),
        million: if flows { f.million } else { 0 },
        million_rate: f.million_rate.map(|r| r * 1e6),
        throughput,
        latency,
        metrics,
        retries: d.retries,
        quiet_wait: d.quiet_wait,
        gen_cpu: 0,
        sut_cpu: 1,
        verbose: d.verbose,
    })
}

pub use afxdp::xsk_for_test_run;
