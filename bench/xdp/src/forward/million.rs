//! A million active flows: the generator sends one datagram per client (address, port)
//! — [`PORTS`] ports from each of as many source addresses in 198.18.128.0/17 as needed
//! — through the edge to the worker, then the daemons' flow tables and resident memory
//! are read. Nothing answers the clients (the container's socket only counts), so the
//! edge needs no route back to those addresses.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use flynode::forward::engine::FlowStatus;

use super::lab::{EDGE, Lab, WORKER};
use super::load::{self, LoadOptions, StopOnDrop};
use super::traffic::{self, Count, Injector};
use crate::pacer::Pacer;
use crate::sys;

/// Client ports per source address (the most the pacer's port rotation does).
const PORTS: u32 = 4096;
/// Passes over all flows at most (a pass re-creates the flows an earlier one lost).
const PASSES: usize = 4;
/// Frames per live-frames call.
const CHUNK: u32 = 64;
/// The pacer's rate within a chunk: the lowest at which it never skips a frame.
const CHUNK_PPS: f64 = 100_000.0;
/// The counters a pass reports: where datagrams were dropped, and how many each stage
/// passed on.
const STAGES: &[&str] = &[
    "drop",
    "error",
    "no_worker",
    "edge_forwarded",
    "worker_delivered",
    "InDatagrams",
    "Rcvbuf",
];
/// Flows sent beyond the target: a few datagrams of every pass are lost (see the
/// counters), and the tables have room for 1,048,576.
const MARGIN: f64 = 1.024;

pub struct FillResult {
    pub target: u64,
    pub sources: u32,
    pub sent: u64,
    pub seconds: f64,
    pub passes: usize,
    pub delivered: u64,
    pub edge: FlowStatus,
    pub worker: FlowStatus,
    /// (VmRSS, VmHWM) in KiB, before and after.
    pub edge_mem: [(u64, u64); 2],
    pub worker_mem: [(u64, u64); 2],
}

/// Fills the flow tables with `target` flows at `rate` datagrams/s.
pub fn fill(lab: &Lab, opts: &LoadOptions, target: u64, rate: f64) -> Result<FillResult> {
    let sources = ((target as f64 * MARGIN) as u64).div_ceil(u64::from(PORTS)) as u32;
    if sources > 30_000 {
        bail!("{target} flows need more than 30000 source addresses");
    }
    let (edge_pid, worker_pid) = (
        lab.daemon_pid(EDGE).context("edge daemon")?,
        lab.daemon_pid(WORKER).context("worker daemon")?,
    );
    let before = [memory(edge_pid)?, memory(worker_pid)?];
    let count = Count::default();
    let payload = 64;
    let start = Instant::now();
    let (sent, passes) = std::thread::scope(|s| -> Result<(u64, usize)> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let count = &count;
        let consumer = s.spawn(move || traffic::consume(lab, opts, payload, count, &ready_tx));
        let _stop = StopOnDrop(&count.stop);
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("counting socket")),
            Err(_) => bail!("the counting socket did not start"),
        }
        let mut sent = 0u64;
        let mut passes = 0;
        while passes < PASSES {
            passes += 1;
            let before = load::path_counters(lab);
            let pass_start = Instant::now();
            sent += send_pass(lab, opts, sources, payload, rate)?;
            let pass_secs = pass_start.elapsed().as_secs_f64();
            settle(lab)?;
            let (e, w) = flows(lab)?;
            println!(
                "  pass {passes} ({pass_secs:.1} s), counters (nonzero): {}",
                load::delta(&load::path_counters(lab), &before)
                    .iter()
                    .filter(|(k, _)| STAGES.iter().any(|s| k.contains(s)))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            );
            if e.active as u64 >= target && w.active as u64 >= target {
                break;
            }
            println!(
                "  pass {passes}: {} edge / {} worker flows active, sending every flow again",
                e.active, w.active
            );
        }
        count.stop.store(true, Ordering::Relaxed);
        consumer
            .join()
            .map_err(|_| anyhow!("consumer panicked"))??;
        Ok((sent, passes))
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let (edge, worker) = flows(lab)?;
    Ok(FillResult {
        target,
        sources,
        sent,
        seconds,
        passes,
        delivered: count.datagrams.load(Ordering::Relaxed),
        edge,
        worker,
        edge_mem: [before[0], memory(edge_pid)?],
        worker_mem: [before[1], memory(worker_pid)?],
    })
}

/// One datagram per flow: for each source address a program whose frame carries it,
/// cycling [`PORTS`] client ports. The pacer sends each chunk at [`CHUNK_PPS`] or more
/// (slower, it skips frames instead of waiting, and the port rotation would not reach
/// every port); sleeping between chunks brings the average down to `rate`.
fn send_pass(
    lab: &Lab,
    opts: &LoadOptions,
    sources: u32,
    payload: usize,
    rate: f64,
) -> Result<u64> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| -> Result<u64> {
            let injector = Injector::on_this_thread(lab, opts.gen_batch)?;
            let pacer = Pacer::new()?;
            let start = Instant::now();
            let mut sent = 0u64;
            for i in 0..sources {
                let frame = lab.frame(lab.path, payload, load::fill_source(i));
                let loaded = injector.load(&pacer, &frame, PORTS)?;
                // A fresh bucket per source: the port rotation starts at its first port.
                pacer.set_rate(Some(rate.max(CHUNK_PPS)))?;
                for _ in 0..PORTS / CHUNK {
                    sys::check_interrupted()?;
                    injector.send(&loaded, &frame, CHUNK)?;
                    sent += u64::from(CHUNK);
                    let due = start + Duration::from_secs_f64(sent as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            Ok(sent)
        })
        .join()
        .map_err(|_| anyhow!("generator panicked"))?
    })
}

/// Waits until the edge's forwarded count stops moving (bounded).
fn settle(lab: &Lab) -> Result<()> {
    let socket = lab.daemon_socket(EDGE).context("edge daemon")?;
    let mut last = None;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        let now = flynode::control::status(&socket)?
            .forwarding
            .counters
            .get("edge_forwarded")
            .copied();
        if now == last {
            break;
        }
        last = now;
    }
    Ok(())
}

/// The edge's edge-flow table and the worker's worker-flow table, as `flynode status`
/// reports them.
fn flows(lab: &Lab) -> Result<(FlowStatus, FlowStatus)> {
    let edge = flynode::control::status(&lab.daemon_socket(EDGE).context("edge daemon")?)?;
    let worker = flynode::control::status(&lab.daemon_socket(WORKER).context("worker daemon")?)?;
    Ok((edge.forwarding.edge_flows, worker.forwarding.worker_flows))
}

/// (VmRSS, VmHWM) of a process, KiB.
pub fn memory(pid: i32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
