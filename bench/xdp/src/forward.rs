//! Issue 5's benchmark: client → edge → worker → container through flynode against the
//! same namespaces with plain kernel routing, in one run. See bench/README.md "### Forwarding".
//!
//! ```text
//!  hub (br0)            h1: edge, node-1              h2: worker, node-2        c2
//!  generator ── p1 ──── eth0 198.18.10.1 ─┐      ┌─── eth0 198.18.10.2   ctr0 ── eth0
//!  (live frames,        XDP → AF_XDP →    │ br0  │    XDP → AF_XDP →           198.19.2.2:7
//!   CPU0)               PROXY v2 + WG  ───┴──────┘    WG → TUN → kernel ──────> counting socket
//!  client 198.18.10.100 (ping-pong only), on br0 too
//! ```
//!
//! Order: flynode first (latency, throughput, a million flows), then the daemons stop
//! and the same namespaces route in the kernel (latency, throughput). The two paths
//! cannot interleave (the daemons own the XDP programs and the reply rules), so each
//! is measured `runs` times in a row and medians are compared.
mod lab;
mod latency;
mod load;
mod metrics;
mod million;
mod traffic;

use std::collections::BTreeMap;

use anyhow::Result;

use crate::classify::pass_fail;
use crate::sys;
use lab::{Lab, Path};
use latency::Latency;
use load::{Run, Step};
use million::FillResult;

pub use lab::default_flynode_bin;
pub use load::LoadOptions;

/// 1200-byte delivered rate through flynode / through plain routing, at least.
pub const TARGET_RATIO: f64 = 0.4;
/// Added median round-trip time, at most.
pub const TARGET_ADDED_P50_US: f64 = 150.0;
/// Resident memory of each daemon with a million active flows, at most.
pub const TARGET_RSS_MIB: f64 = 256.0;
/// The payload size the ratio target is about.
const TARGET_PAYLOAD: usize = 1200;
/// The flow-table fill's rate as a share of flynode's 64-byte peak: every datagram of
/// the fill creates a flow at the edge and at the worker, which costs more than
/// forwarding on a known flow, and a datagram lost costs a pass.
const FILL_SHARE: f64 = 0.4;

#[derive(Clone, Debug)]
pub struct Options {
    pub load: LoadOptions,
    pub runs: usize,
    pub payloads: Vec<usize>,
    pub pings: usize,
    /// Flows of the flow-table fill (0: skipped).
    pub million: u64,
    /// Datagrams/s of the fill (`None`: 0.4 x the measured 64-byte peak, 0.02..0.3 Mpps).
    pub million_rate: Option<f64>,
    pub throughput: bool,
    pub latency: bool,
    /// Throughput with the daemons' metrics endpoints scraped vs disabled (issue 6).
    pub metrics: bool,
    pub retries: usize,
    pub quiet_wait: f64,
    pub gen_cpu: usize,
    pub sut_cpu: usize,
    pub verbose: bool,
}

/// Per payload, every run of one path with its round.
type RoundsByPayload = BTreeMap<usize, Vec<(usize, Run)>>;

#[derive(Default)]
struct PathResult {
    /// Per payload, the runs that count (see [`keep_clean`]).
    runs: BTreeMap<usize, Vec<Run>>,
    /// Per payload, the round of each of `runs`.
    rounds: BTreeMap<usize, Vec<usize>>,
    latency: Option<Latency>,
}

impl PathResult {
    /// Peak delivered rate per round, for `payload`.
    fn peaks_by_round(&self, payload: usize) -> BTreeMap<usize, f64> {
        match (self.runs.get(&payload), self.rounds.get(&payload)) {
            (Some(runs), Some(rounds)) => rounds
                .iter()
                .copied()
                .zip(runs.iter().map(|r| r.peak().delivered_pps))
                .collect(),
            _ => BTreeMap::new(),
        }
    }
}

/// Median over the rounds both paths kept of flynode's peak / plain routing's peak.
fn paired_ratio(fly: &PathResult, plain: &PathResult, payload: usize) -> Option<(f64, Vec<f64>)> {
    let p = plain.peaks_by_round(payload);
    let ratios: Vec<f64> = fly
        .peaks_by_round(payload)
        .iter()
        .filter_map(|(round, f)| Some(f / p.get(round)?.max(1.0)))
        .collect();
    Some((median(ratios.clone())?, ratios))
}

pub fn run(opts: &Options) -> Result<bool> {
    println!(
        "== forward: client → edge → worker → container, flynode vs plain routing ==\n\
         {} run(s) per path and payload ({} B), offered rates {} Mpps, {:.1} s window \
         (+{:.1} s settling) each, {} client ports; generator on CPU{}, everything else \
         (daemons, NAPI threads, container socket, softirqs) on CPU{}",
        opts.runs,
        opts.payloads
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" B, "),
        opts.load
            .rates
            .iter()
            .map(|r| rate_name(*r))
            .collect::<Vec<_>>()
            .join(","),
        opts.load.seconds,
        opts.load.warmup,
        opts.load.flows,
        opts.gen_cpu,
        opts.sut_cpu
    );
    sys::wait_until_quiet(opts.quiet_wait, 10.0)?;
    // Helper processes (ip, ethtool) and short-lived threads inherit this: keep them off
    // the system under test's CPU.
    sys::pin(0, opts.gen_cpu)?;
    let mut lab = Lab::start(opts.gen_cpu, opts.sut_cpu)?;
    print_topology(&lab);
    let mut ok = true;
    if opts.metrics {
        ok &= metrics::compare(&mut lab, opts)?;
    }
    if !(opts.throughput || opts.latency || opts.million > 0) {
        return Ok(ok);
    }
    // Rounds: each builds the topology, measures flynode, stops the daemons and measures
    // plain routing in the same namespaces, so each run of one path has a partner of the
    // other taken minutes, not a whole phase, apart. On this shared VM a path's peak
    // drifts by up to 1.5x over a few minutes; the median of the rounds' own ratios
    // cancels that drift, where the ratio of the two paths' medians keeps it.
    let rounds = if opts.throughput { opts.runs.max(1) } else { 1 };
    let mut raw: BTreeMap<&'static str, RoundsByPayload> = BTreeMap::new();
    let mut results: BTreeMap<&'static str, PathResult> = BTreeMap::new();
    let mut fill = None;
    let mut lab = Some(lab);
    for round in 0..rounds {
        let mut current = match lab.take() {
            Some(l) => l,
            None => {
                println!("\n-- round {}: a fresh topology --", round + 1);
                sys::wait_until_quiet(opts.quiet_wait.min(QUIET_WAIT_PER_RUN), 10.0)?;
                let l = Lab::start(opts.gen_cpu, opts.sut_cpu)?;
                print_topology(&l);
                l
            }
        };
        for path in [Path::Flynode, Path::Plain] {
            if path == Path::Plain {
                println!(
                    "\n-- round {}: stopping the daemons; the same namespaces now route in the kernel --",
                    round + 1
                );
                current.switch_to_plain_routing()?;
            }
            let result = results.entry(path.name()).or_default();
            if round == 0 && opts.latency {
                result.latency = Some(measure_latency(&current, opts.pings)?);
            }
            if opts.throughput {
                for (payload, r) in throughput(&current, opts, round)? {
                    raw.entry(path.name())
                        .or_default()
                        .entry(payload)
                        .or_default()
                        .push((round, r));
                }
            }
            if round == 0 && path == Path::Flynode && opts.million > 0 {
                let peak64 = raw
                    .get(path.name())
                    .and_then(|m| m.get(&64))
                    .and_then(|runs| runs.first())
                    .map(|(_, r)| r.peak().delivered_pps);
                let rate = opts.million_rate.unwrap_or_else(|| {
                    peak64.map_or(40_000.0, |p| (p * FILL_SHARE).clamp(2e4, 3e5))
                });
                println!(
                    "\n-- {} flows: one 64-byte datagram per client (address, port), {:.2} Mpps --",
                    opts.million,
                    rate / 1e6
                );
                let f = million::fill(&current, &opts.load, opts.million, rate)?;
                print_fill(&f);
                fill = Some(f);
            }
        }
        drop(current);
    }
    for (path, by_payload) in raw {
        let result = results.entry(path).or_default();
        for (payload, runs) in by_payload {
            let (rounds, runs): (Vec<usize>, Vec<Run>) =
                keep_clean(path, payload, runs).into_iter().unzip();
            result.runs.insert(payload, runs);
            result.rounds.insert(payload, rounds);
        }
    }
    Ok(print_summary(opts, &results, fill.as_ref()) && ok)
}

fn print_topology(lab: &Lab) {
    println!(
        "topology up: edge pid {}, worker pid {}, NAPI threads {}",
        lab.daemon_pid(lab::EDGE).unwrap_or(0),
        lab.daemon_pid(lab::WORKER).unwrap_or(0),
        lab.napi
            .iter()
            .map(|n| format!("{} (node {}, pid {})", n.comm, n.host, n.pid))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn measure_latency(lab: &Lab, pings: usize) -> Result<Latency> {
    let _echo = lab.start_echo()?;
    let to = lab.path.destination();
    let l = latency::ping_pong(lab, to, pings)?;
    println!(
        "\n{}: ping-pong to {to}: {} requests, p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, \
         max {:.0} µs, lost {}",
        lab.path.name(),
        l.count,
        l.p50_us,
        l.p99_us,
        l.mean_us,
        l.max_us,
        l.lost
    );
    Ok(l)
}

/// Seconds to wait for an idle machine before each run, at most.
const QUIET_WAIT_PER_RUN: f64 = 5.0;

/// One run per payload on the lab's current path, round `round` (0-based).
fn throughput(lab: &Lab, opts: &Options, round: usize) -> Result<Vec<(usize, Run)>> {
    let mut out = Vec::new();
    for &payload in &opts.payloads {
        let mut attempt = 0;
        let r = loop {
            sys::check_interrupted()?;
            sys::wait_until_quiet(opts.quiet_wait.min(QUIET_WAIT_PER_RUN), 10.0)?;
            let r = load::run_once(lab, &opts.load, payload)?;
            match r.disturbed() {
                Some(share) if attempt < opts.retries => {
                    attempt += 1;
                    println!(
                        "  run {} {} {payload} B: other work took {:.0}% of CPU{} in a \
                         window, repeating ({attempt}/{})",
                        round + 1,
                        lab.path.name(),
                        share * 100.0,
                        opts.sut_cpu,
                        opts.retries
                    );
                }
                _ => break r,
            }
        };
        print_run(lab.path, round, &r, opts.verbose || round == 0);
        out.push((payload, r));
    }
    Ok(out)
}

/// Runs that other work disturbed even after the retries only count when no run was
/// clean.
fn keep_clean(path: &str, payload: usize, runs: Vec<(usize, Run)>) -> Vec<(usize, Run)> {
    let clean = runs.iter().filter(|(_, r)| r.disturbed().is_none()).count();
    if clean == 0 || clean == runs.len() {
        return runs;
    }
    let (keep, drop): (Vec<_>, Vec<_>) =
        runs.into_iter().partition(|(_, r)| r.disturbed().is_none());
    println!(
        "  {path} {payload} B: run(s) {} left out of the medians (disturbed by other work)",
        drop.iter()
            .map(|(i, _)| (i + 1).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    keep
}

fn rate_name(r: Option<f64>) -> String {
    r.map_or("max".to_owned(), |r| format!("{:.2}", r / 1e6))
}

fn mpps(pps: f64) -> String {
    format!("{:.3}", pps / 1e6)
}

fn print_run(path: Path, i: usize, r: &Run, details: bool) {
    println!(
        "\n  run {} {}, {} B: generated {} frames, the container counted {}",
        i + 1,
        path.name(),
        r.payload,
        r.generated,
        r.delivered_total
    );
    println!(
        "    {:>6} {:>9} {:>10} {:>7} {:>9} {:>9} {:>10} {:>9} {:>11} {:>10}",
        "target",
        "offered",
        "delivered",
        "loss",
        "SUT busy",
        "SUT sirq",
        "SUT steal",
        "RcvbufE",
        "backlog drp",
        "no worker"
    );
    for s in &r.steps {
        println!(
            "    {:>6} {:>9} {:>10} {:>6.1}% {:>8.0}% {:>8.0}% {:>9.0}% {:>9} {:>11} {:>10}{}",
            rate_name(s.target),
            mpps(s.offered_pps),
            mpps(s.delivered_pps),
            100.0 * s.loss(),
            100.0 * s.sut_busy,
            100.0 * s.sut_softirq,
            100.0 * s.sut_steal,
            s.rcvbuf_errors,
            s.softnet_drops,
            s.no_worker,
            if s.odd > 0 {
                format!("  ({} datagrams of another size!)", s.odd)
            } else {
                String::new()
            }
        );
    }
    if !details {
        return;
    }
    let peak = r.peak();
    println!(
        "    CPU at the peak ({} Mpps delivered), CPU-seconds per second: {}",
        mpps(peak.delivered_pps),
        cpu_line(peak)
    );
    if let Some(max) = r.at_max() {
        println!("    counters over the full-rate step (nonzero):");
        let mut line = String::new();
        for (k, v) in &max.breakdown {
            let item = format!("{k}={v}");
            if line.len() + item.len() > 100 {
                println!("      {line}");
                line.clear();
            }
            if !line.is_empty() {
                line.push_str("  ");
            }
            line.push_str(&item);
        }
        if !line.is_empty() {
            println!("      {line}");
        }
    }
}

fn cpu_line(s: &Step) -> String {
    let mut parts: Vec<String> = s
        .task_cpu
        .iter()
        .map(|(l, v)| format!("{l} {v:.2}"))
        .collect();
    parts.push(format!("unattributed {:.2}", s.unattributed));
    parts.join(", ")
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| sys::median(&mut v))
}

/// Median over runs of each run's best delivered rate.
fn peak(r: &PathResult, payload: usize) -> Option<f64> {
    median(
        r.runs
            .get(&payload)?
            .iter()
            .map(|r| r.peak().delivered_pps)
            .collect(),
    )
}

/// Medians over runs of the numbers at each run's peak.
struct AtPeak {
    delivered: f64,
    edge: f64,
    worker: f64,
    edge_daemon: f64,
    worker_daemon: f64,
    container: f64,
    ksoftirqd: f64,
    unattributed: f64,
    busy: f64,
}

fn at_peak(runs: &[Run]) -> Option<AtPeak> {
    let m = |f: &dyn Fn(&Step) -> f64| median(runs.iter().map(|r| f(r.peak())).collect());
    Some(AtPeak {
        delivered: m(&|s| s.delivered_pps)?,
        edge: m(&|s| s.cpu_of("edge "))?,
        worker: m(&|s| s.cpu_of("worker "))?,
        edge_daemon: m(&|s| s.cpu_of("edge flynode"))?,
        worker_daemon: m(&|s| s.cpu_of("worker flynode"))?,
        container: m(&|s| s.cpu_of("container"))?,
        ksoftirqd: m(&|s| s.cpu_of("ksoftirqd"))?,
        unattributed: m(&|s| s.unattributed)?,
        busy: m(&|s| s.sut_busy)?,
    })
}

fn print_summary(
    opts: &Options,
    results: &BTreeMap<&'static str, PathResult>,
    fill: Option<&FillResult>,
) -> bool {
    let fly = &results[Path::Flynode.name()];
    let plain = &results[Path::Plain.name()];
    let mut ok = true;
    println!("\n== forward: summary (medians over runs; the target is on the paired ratio) ==");
    println!(
        "{:<40} {:>16} {:>16} {:>9}  target",
        "", "flynode", "plain routing", "ratio"
    );
    for &payload in &opts.payloads {
        let (f, p) = (peak(fly, payload), peak(plain, payload));
        let ratio = f.zip(p).map(|(f, p)| f / p.max(1.0));
        // The verdict is on the paired ratio (see `run`): the median over rounds of each
        // round's flynode / plain routing, both measured minutes apart.
        let paired = paired_ratio(fly, plain, payload);
        let verdict = match &paired {
            Some((r, _)) if payload == TARGET_PAYLOAD => {
                ok &= *r >= TARGET_RATIO;
                format!(">= {TARGET_RATIO}x  {}", pass_fail(*r >= TARGET_RATIO))
            }
            _ => String::new(),
        };
        let each = |r: &PathResult| {
            r.runs.get(&payload).map_or("-".to_owned(), |runs| {
                runs.iter()
                    .map(|r| format!("{:.3}", r.peak().delivered_pps / 1e6))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        };
        println!(
            "{:<40} {:>16} {:>16} {:>9}",
            format!("{payload} B: peak delivered, Mpps"),
            f.map_or("-".into(), mpps),
            p.map_or("-".into(), mpps),
            ratio.map_or("-".into(), |r| format!("{r:.3}x")),
        );
        if let Some((r, each)) = &paired {
            println!(
                "{:<40} {:>33} {:>9}  {verdict}",
                "  paired: median of each round's ratio",
                each.iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                format!("{r:.3}x"),
            );
        }
        println!(
            "{:<40} {:>16} {:>16}",
            "  each run's peak",
            each(fly),
            each(plain)
        );
        let loss = |r: &PathResult| -> Option<String> {
            let runs = r.runs.get(&payload)?;
            let loss = median(
                runs.iter()
                    .filter_map(|r| Some(r.at_max()?.loss()))
                    .collect(),
            )?;
            let offered = median(
                runs.iter()
                    .filter_map(|r| Some(r.at_max()?.offered_pps))
                    .collect(),
            )?;
            Some(format!("{:.1}% of {}", 100.0 * loss, mpps(offered)))
        };
        println!(
            "{:<40} {:>16} {:>16}",
            format!("{payload} B: loss at full offered rate"),
            loss(fly).unwrap_or("-".into()),
            loss(plain).unwrap_or("-".into())
        );
        let rcvbuf = |r: &PathResult| -> String {
            r.runs
                .get(&payload)
                .and_then(|runs| {
                    median(
                        runs.iter()
                            .filter_map(|r| Some(r.at_max()?.rcvbuf_errors as f64))
                            .collect(),
                    )
                })
                .map_or("-".into(), |v| format!("{v:.0}"))
        };
        println!(
            "{:<40} {:>16} {:>16}",
            format!("{payload} B: container RcvbufErrors at full rate"),
            rcvbuf(fly),
            rcvbuf(plain)
        );
    }
    let (lf, lp) = (fly.latency.as_ref(), plain.latency.as_ref());
    let show = |l: Option<&Latency>| {
        l.map_or("-".to_owned(), |l| {
            format!("{:.0} / {:.0}", l.p50_us, l.p99_us)
        })
    };
    let added = lf.zip(lp).map(|(f, p)| f.p50_us - p.p50_us);
    let verdict = added.map_or(String::new(), |a| {
        ok &= a <= TARGET_ADDED_P50_US;
        format!(
            "added p50 {a:.0} µs <= {TARGET_ADDED_P50_US:.0}  {}",
            pass_fail(a <= TARGET_ADDED_P50_US)
        )
    });
    println!(
        "{:<40} {:>16} {:>16} {:>9}  {verdict}",
        format!("RTT p50 / p99, µs ({} ping-pongs)", opts.pings),
        show(lf),
        show(lp),
        ""
    );
    if let Some(f) = fill {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let edge_ok = mib(f.edge_mem[1].0) <= TARGET_RSS_MIB;
        let worker_ok = mib(f.worker_mem[1].0) <= TARGET_RSS_MIB;
        let flows_ok = f.edge.active as u64 >= f.target && f.worker.active as u64 >= f.target;
        ok &= edge_ok && worker_ok && flows_ok;
        println!(
            "{:<40} {:>16} {:>16} {:>9}  <= {TARGET_RSS_MIB:.0} MiB each  {}",
            format!("{} flows: VmRSS edge / worker, MiB", f.target),
            format!(
                "{:.0} / {:.0}",
                mib(f.edge_mem[1].0),
                mib(f.worker_mem[1].0)
            ),
            "",
            "",
            pass_fail(edge_ok && worker_ok && flows_ok)
        );
        println!(
            "{:<40} {:>16}",
            "  active flows edge / worker",
            format!("{} / {}", f.edge.active, f.worker.active)
        );
    }
    println!(
        "\nCPU at each path's peak, CPU-seconds per second of traffic [µs per delivered datagram]:"
    );
    for &payload in &opts.payloads {
        for (path, r) in [(Path::Flynode, fly), (Path::Plain, plain)] {
            let Some(p) = r.runs.get(&payload).and_then(|runs| at_peak(runs)) else {
                continue;
            };
            let us = |v: f64| 1e6 * v / p.delivered.max(1.0);
            let hosts = match path {
                Path::Flynode => format!(
                    "edge {:.2} (daemon {:.2} + NAPI {:.2}) [{:.1}], worker {:.2} (daemon {:.2} + \
                     NAPI {:.2}) [{:.1}]",
                    p.edge,
                    p.edge_daemon,
                    p.edge - p.edge_daemon,
                    us(p.edge),
                    p.worker,
                    p.worker_daemon,
                    p.worker - p.worker_daemon,
                    us(p.worker)
                ),
                Path::Plain => format!(
                    "edge + worker forwarding {:.2} [{:.1}] (all in the edge's NAPI thread; the \
                     worker's NAPI thread {:.2})",
                    p.edge,
                    us(p.edge),
                    p.worker
                ),
            };
            println!(
                "  {payload:>5} B {:<14} {hosts}, container socket {:.2} [{:.1}], ksoftirqd {:.2}, \
                 unattributed {:.2}; CPU{} busy {:.0}% [{:.1} in all]",
                path.name(),
                p.container,
                us(p.container),
                p.ksoftirqd,
                p.unattributed,
                opts.sut_cpu,
                100.0 * p.busy,
                us(p.busy)
            );
        }
    }
    println!(
        "  A host is its flynode daemon (all threads, /proc/PID/stat utime+stime) and its eth0 \
         NAPI thread. Tick-based accounting (no IRQ_TIME_ACCOUNTING): softirq work (bridge, veth \
         backlogs, the kernel's delivery of the worker's TUN writes into the container) is \
         charged to the task it interrupted; softirqs on an idle CPU and other processes are \
         'unattributed'. Not included: the generator (CPU{}); the hub's (bridge) work is \
         softirq on CPU{}, inside the numbers above.",
        opts.gen_cpu, opts.sut_cpu
    );
    ok
}

fn print_fill(f: &FillResult) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "  sent {} datagrams from {} addresses x 4096 ports in {:.1} s ({} pass(es)); the \
         container counted {}",
        f.sent, f.sources, f.seconds, f.passes, f.delivered
    );
    for (name, flows, mem) in [
        ("edge   (edge_flows)", &f.edge, f.edge_mem),
        ("worker (worker_flows)", &f.worker, f.worker_mem),
    ] {
        println!(
            "  {name}: active {} of {}, inserted {}, evicted {}, expired {}; VmRSS {:.1} → \
             {:.1} MiB (peak {:.1} MiB)",
            flows.active,
            flows.capacity,
            flows.inserted,
            flows.evicted,
            flows.expired,
            mib(mem[0].0),
            mib(mem[1].0),
            mib(mem[1].1)
        );
    }
}
