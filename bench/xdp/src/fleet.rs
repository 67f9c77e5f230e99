//! Issue 6's benchmark: how long a routing change takes from the write to the new
//! verdict in the running daemon's XDP services map, through etcd and, as the
//! baseline, through the routing file. See bench/README.md "### Fleet" and bench/fleet.sh,
//! which sets up the namespace, etcd and the daemon and runs the three phases:
//!
//! 1. `etcd`: `flynode run` watches etcd; each change is a put of the service record
//!    `<prefix>services/bench` (etcd-client, the same library the daemon uses).
//! 2. `file`: the same daemon restarted with `[source] file = …`; each change rewrites
//!    the routing file (the node's record + the service) through a rename.
//! 3. `report`: both phases side by side, and the target.
//!
//! The same changes in both phases: the service `bench` always serves
//! [`ANYCAST`]:[`BASE_PORT`]; even changes add port `20000 + i`, odd ones take it away
//! again. t0 is taken just before the write (before the put is handed to the client's
//! runtime, or before the file is written); t1 when a poll of the services map (every
//! `poll`, opened by id through the daemon's attached program) first shows the new
//! state: the key present with the service's id, or gone. Between changes a
//! pseudo-random pause (same sequence in both phases) so that the writes do not fall
//! at the same phase of the daemon's 25 ms file watch every time.
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flynode::xdp::TableReader;
use flynode_xdp_common::{AddrKey, ServiceKey};

use crate::classify::pass_fail;
use crate::sys;

/// p99 from an etcd write to the XDP map, at most.
pub const TARGET_P99_MS: f64 = 500.0;
/// The bench service's anycast address (RFC 2544 range).
pub const ANYCAST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 53);
/// The port the service always serves, so that its port list is never empty.
pub const BASE_PORT: u16 = 19_999;
/// Change `i` adds or removes `FIRST_PORT + i` (rounded down to even `i`).
pub const FIRST_PORT: u16 = 20_000;
const SERVICE_ID: u32 = 100;
const SERVICE_NAME: &str = "bench";
/// The worker's container (on this node; RFC 2544 range).
const TARGET: &str = "198.19.0.2:53";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Etcd,
    File,
    Report,
}

impl std::str::FromStr for Phase {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Phase> {
        Ok(match s {
            "etcd" => Phase::Etcd,
            "file" => Phase::File,
            "report" => Phase::Report,
            other => bail!("unknown phase `{other}` (etcd, file, report)"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub phase: Phase,
    /// Samples are kept here between phases (`etcd.samples`, `file.samples`); the
    /// routing file of the file phase is `routing.toml` in it, holding the node's
    /// `[[node]]` table when the phase starts.
    pub dir: PathBuf,
    pub changes: usize,
    /// The interface the daemon's XDP program is attached to.
    pub interface: String,
    /// The daemon's node id (the service's worker runs there).
    pub node: String,
    pub etcd: String,
    pub prefix: String,
    pub poll: Duration,
    pub timeout: Duration,
}

/// One timed change.
#[derive(Clone, Copy, Debug)]
struct Sample {
    add: bool,
    /// t0 → seen in the map; `None`: not within the timeout.
    visible: Option<Duration>,
    /// t0 → etcd answered the put (etcd only).
    acked: Option<Duration>,
}

pub fn run(opts: &Options) -> Result<bool> {
    match opts.phase {
        Phase::Etcd | Phase::File => {
            measure(opts)?;
            Ok(true)
        }
        Phase::Report => report(opts),
    }
}

fn samples_path(dir: &Path, phase: Phase) -> PathBuf {
    dir.join(match phase {
        Phase::Etcd => "etcd.samples",
        _ => "file.samples",
    })
}

/// The service record with `ports`: the fields of a `[[service]]` table and its
/// workers, as a value in etcd (`[[worker]]`) or in the routing file
/// (`[[service]]` + `[[service.worker]]`).
fn service_toml(node: &str, ports: &[u16], in_file: bool) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut s = String::new();
    if in_file {
        s.push_str("\n[[service]]\n");
    }
    let _ = write!(
        s,
        "id = {SERVICE_ID}\nname = \"{SERVICE_NAME}\"\nanycast = [\"{ANYCAST}\"]\nports = [{}]\n\n[[{}worker]]\nnode = \"{node}\"\ntarget = \"{TARGET}\"\nweight = 1\n",
        ports.join(", "),
        if in_file { "service." } else { "" },
    );
    s
}

/// How the phase writes a change.
enum Writer {
    Etcd {
        runtime: tokio::runtime::Runtime,
        client: Box<etcd_client::Client>,
        key: String,
        node: String,
    },
    File {
        path: PathBuf,
        tmp: PathBuf,
        /// The node's `[[node]]` table (the file as the script left it).
        base: String,
        node: String,
    },
}

/// A write under way: for etcd the put runs on the runtime while the map is polled.
enum Pending {
    Etcd(tokio::task::JoinHandle<Result<Instant, etcd_client::Error>>),
    Done,
}

impl Writer {
    fn new(opts: &Options) -> Result<Writer> {
        Ok(match opts.phase {
            Phase::Etcd => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .context("tokio runtime")?;
                let client = runtime
                    .block_on(etcd_client::Client::connect([opts.etcd.as_str()], None))
                    .with_context(|| format!("connecting to etcd at {}", opts.etcd))?;
                Writer::Etcd {
                    runtime,
                    client: Box::new(client),
                    key: format!("{}services/{SERVICE_NAME}", opts.prefix),
                    node: opts.node.clone(),
                }
            }
            Phase::File => {
                let path = opts.dir.join("routing.toml");
                let base = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Writer::File {
                    tmp: opts.dir.join(".routing.toml.tmp"),
                    path,
                    base,
                    node: opts.node.clone(),
                }
            }
            Phase::Report => unreachable!("the report writes nothing"),
        })
    }

    /// Starts writing the service with `ports`.
    fn start(&mut self, ports: &[u16]) -> Result<Pending> {
        match self {
            Writer::Etcd {
                runtime,
                client,
                key,
                node,
            } => {
                let (mut client, key, value) = (
                    etcd_client::Client::clone(client),
                    key.clone(),
                    service_toml(node, ports, false),
                );
                Ok(Pending::Etcd(runtime.spawn(async move {
                    client.put(key, value, None).await?;
                    Ok(Instant::now())
                })))
            }
            Writer::File {
                path,
                tmp,
                base,
                node,
            } => {
                let text = format!("{base}{}", service_toml(node, ports, true));
                std::fs::write(&*tmp, text)
                    .with_context(|| format!("writing {}", tmp.display()))?;
                std::fs::rename(&*tmp, &*path)
                    .with_context(|| format!("renaming to {}", path.display()))?;
                Ok(Pending::Done)
            }
        }
    }

    /// Waits for the write to be acknowledged: when etcd answered.
    fn finish(&self, pending: Pending) -> Result<Option<Instant>> {
        match (self, pending) {
            (Writer::Etcd { runtime, .. }, Pending::Etcd(handle)) => {
                let acked = runtime
                    .block_on(async { tokio::time::timeout(Duration::from_secs(10), handle).await })
                    .context("etcd put: no answer within 10 s")?
                    .context("etcd put task")?
                    .context("etcd put")?;
                Ok(Some(acked))
            }
            _ => Ok(None),
        }
    }
}

/// Whether the daemon's live XDP table shows the bench service on `port`.
fn serves(table: &TableReader, port: u16) -> bool {
    let key = ServiceKey::new(AddrKey::from_ipv4(ANYCAST.octets()), port);
    table.get(&key).is_some_and(|v| v.service_id == SERVICE_ID)
}

/// Polls until `serves(port) == want`: the time it took, or `None` after `timeout`.
fn wait_for(
    map: &TableReader,
    port: u16,
    want: bool,
    t0: Instant,
    opts: &Options,
) -> Result<Option<Duration>> {
    loop {
        // Checked before the clock is read: t1 is the first poll that saw it.
        if serves(map, port) == want {
            return Ok(Some(t0.elapsed()));
        }
        if t0.elapsed() >= opts.timeout {
            return Ok(None);
        }
        sys::check_interrupted()?;
        std::thread::sleep(opts.poll);
    }
}

/// Pauses between changes, 5 to 45 ms; the same sequence in every phase.
struct Pauses(u64);

impl Pauses {
    fn next(&mut self) -> Duration {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(5_000 + self.0 % 40_000)
    }
}

fn measure(opts: &Options) -> Result<()> {
    let what = match opts.phase {
        Phase::Etcd => "etcd put",
        _ => "routing file rename",
    };
    // The daemon may still be starting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let map = loop {
        match TableReader::attached(&opts.interface) {
            Ok(map) => break map,
            Err(e) if Instant::now() >= deadline => {
                return Err(anyhow::Error::new(e).context("the daemon's XDP endpoints table"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut writer = Writer::new(opts)?;
    // The starting state, untimed.
    let pending = writer.start(&[BASE_PORT])?;
    writer.finish(pending)?;
    let settle = Options {
        timeout: Duration::from_secs(10),
        ..opts.clone()
    };
    if wait_for(&map, BASE_PORT, true, Instant::now(), &settle)?.is_none() {
        bail!("the daemon did not apply the bench service within 10 s ({what})");
    }
    std::thread::sleep(Duration::from_millis(200));

    let mut pauses = Pauses(0x9e37_79b9_7f4a_7c15);
    let mut samples = Vec::with_capacity(opts.changes);
    for i in 0..opts.changes {
        let add = i % 2 == 0;
        let port = FIRST_PORT + (i - i % 2) as u16;
        let ports: &[u16] = if add {
            &[BASE_PORT, port]
        } else {
            &[BASE_PORT]
        };
        let t0 = Instant::now();
        let pending = writer.start(ports)?;
        let visible = wait_for(&map, port, add, t0, opts)?;
        let acked = writer
            .finish(pending)?
            .map(|t| t.saturating_duration_since(t0));
        samples.push(Sample {
            add,
            visible,
            acked,
        });
        if visible.is_none() {
            // Counted as a failure; the next change only starts from the state this
            // one asked for.
            eprintln!(
                "fleet: change {i} ({} port {port}) not in the map after {:?}",
                if add { "add" } else { "remove" },
                opts.timeout
            );
            if wait_for(&map, port, add, Instant::now(), &settle)?.is_none() {
                bail!("the daemon stopped applying changes (change {i}, {what})");
            }
        }
        std::thread::sleep(pauses.next());
    }
    // Leave the map as found: no bench service.
    if opts.phase == Phase::Etcd
        && let Writer::Etcd {
            runtime,
            client,
            key,
            ..
        } = &writer
    {
        let mut client = etcd_client::Client::clone(client);
        runtime.block_on(client.delete(key.as_str(), None))?;
    }

    let path = samples_path(&opts.dir, opts.phase);
    std::fs::write(&path, encode(&samples))
        .with_context(|| format!("writing {}", path.display()))?;
    let stats = Stats::of(samples.iter().map(|s| s.visible));
    println!(
        "fleet {}: {} changes ({what}), {} not seen within {:?}; p50 {} ms, p99 {} ms",
        phase_name(opts.phase),
        samples.len(),
        stats.failed,
        opts.timeout,
        ms(stats.p(0.50)),
        ms(stats.p(0.99)),
    );
    Ok(())
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Etcd => "etcd",
        Phase::File => "file",
        Phase::Report => "report",
    }
}

/// One line per change: `add|remove visible_ms|timeout acked_ms|-`.
fn encode(samples: &[Sample]) -> String {
    let mut out = String::new();
    for s in samples {
        let f = |d: Option<Duration>, none: &str| {
            d.map_or(none.to_owned(), |d| format!("{:.3}", d.as_secs_f64() * 1e3))
        };
        let _ = writeln!(
            out,
            "{} {} {}",
            if s.add { "add" } else { "remove" },
            f(s.visible, "timeout"),
            f(s.acked, "-"),
        );
    }
    out
}

fn decode(text: &str) -> Result<Vec<Sample>> {
    let ms = |v: &str| -> Result<Option<Duration>> {
        Ok(match v {
            "timeout" | "-" => None,
            v => Some(Duration::from_secs_f64(v.parse::<f64>()? / 1e3)),
        })
    };
    text.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [kind, visible, acked] = f[..] else {
                bail!("bad sample line `{line}`");
            };
            Ok(Sample {
                add: kind == "add",
                visible: ms(visible)?,
                acked: ms(acked)?,
            })
        })
        .collect()
}

/// Latencies in ms, sorted; a change not seen counts as infinitely slow.
struct Stats {
    sorted: Vec<f64>,
    failed: usize,
}

impl Stats {
    fn of(values: impl Iterator<Item = Option<Duration>>) -> Stats {
        let mut sorted: Vec<f64> = values
            .map(|v| v.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3))
            .collect();
        sorted.sort_by(f64::total_cmp);
        let failed = sorted.iter().filter(|v| v.is_infinite()).count();
        Stats { sorted, failed }
    }

    /// Nearest-rank percentile.
    fn p(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.sorted.len() as f64).ceil() as usize).clamp(1, self.sorted.len());
        self.sorted[rank - 1]
    }
}

fn ms(v: f64) -> String {
    if v.is_infinite() {
        "timeout".to_owned()
    } else if v.is_nan() {
        "-".to_owned()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn report(opts: &Options) -> Result<bool> {
    let load = |phase| -> Result<Vec<Sample>> {
        let path = samples_path(&opts.dir, phase);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        decode(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let etcd = load(Phase::Etcd)?;
    let file = load(Phase::File)?;
    println!(
        "== fleet: routing change → new verdict in the daemon's XDP services map ==\n\
         {} changes per source (service `{SERVICE_NAME}` on {ANYCAST}: even changes add port \
         {FIRST_PORT}+i, odd ones remove it); t0 before the write, t1 at the first poll of \
         the map ({} µs) that shows it; {:?} timeout per change",
        etcd.len(),
        opts.poll.as_micros(),
        opts.timeout,
    );
    println!(
        "{:<22} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}   {:>10} {:>10}",
        "source (ms)", "changes", "failed", "p50", "p90", "p99", "max", "add p50", "remove p50"
    );
    let row = |name: &str, samples: &[Sample], which: fn(&Sample) -> Option<Duration>| {
        let all = Stats::of(samples.iter().map(which));
        let adds = Stats::of(samples.iter().filter(|s| s.add).map(which));
        let removes = Stats::of(samples.iter().filter(|s| !s.add).map(which));
        println!(
            "{:<22} {:>7} {:>7} {:>9} {:>9} {:>9} {:>9}   {:>10} {:>10}",
            name,
            samples.len(),
            all.failed,
            ms(all.p(0.50)),
            ms(all.p(0.90)),
            ms(all.p(0.99)),
            ms(all.sorted.last().copied().unwrap_or(f64::NAN)),
            ms(adds.p(0.50)),
            ms(removes.p(0.50)),
        );
        all
    };
    let ours = row("etcd put → XDP map", &etcd, |s| s.visible);
    row("  etcd put → put acked", &etcd, |s| s.acked);
    let base = row("file rename → XDP map", &file, |s| s.visible);
    let (p99, base_p99) = (ours.p(0.99), base.p(0.99));
    if p99.is_finite() && base_p99.is_finite() {
        println!(
            "etcd vs file: p50 {} vs {} ms, p99 {} vs {} ms (the file watcher polls every 25 ms \
             and applies after one stable interval)",
            ms(ours.p(0.50)),
            ms(base.p(0.50)),
            ms(p99),
            ms(base_p99),
        );
    }
    let ok = ours.failed == 0 && p99 <= TARGET_P99_MS;
    println!(
        "target: etcd write → XDP map p99 ≤ {TARGET_P99_MS} ms: {} ({} ms{})",
        pass_fail(ok),
        ms(p99),
        if ours.failed > 0 {
            format!(", {} change(s) not seen", ours.failed)
        } else {
            String::new()
        }
    );
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_count_timeouts_as_slowest() {
        let ms = |v: u64| Some(Duration::from_millis(v));
        let s = Stats::of((1..=99).map(ms).chain([None]));
        assert_eq!(s.p(0.50), 50.0);
        assert_eq!(s.p(0.99), 99.0);
        assert!(s.p(1.0).is_infinite());
        assert_eq!(s.failed, 1);
    }

    #[test]
    fn samples_round_trip() {
        let samples = vec![
            Sample {
                add: true,
                visible: Some(Duration::from_micros(1500)),
                acked: Some(Duration::from_micros(900)),
            },
            Sample {
                add: false,
                visible: None,
                acked: None,
            },
        ];
        let back = decode(&encode(&samples)).unwrap();
        assert_eq!(back.len(), 2);
        assert!(back[0].add && !back[1].add);
        assert_eq!(back[0].visible, Some(Duration::from_micros(1500)));
        assert_eq!(back[1].visible, None);
    }

    #[test]
    fn records_parse_as_the_daemon_reads_them() {
        use flynode::routing::{Record, RecordKind, RoutingMap};
        let file = service_toml("n1", &[BASE_PORT, FIRST_PORT], true);
        let (services, absent) =
            RoutingMap::parse_services(&file, Path::new("routing.toml"), &RoutingMap::default())
                .unwrap();
        assert_eq!(services[0].ports, [BASE_PORT, FIRST_PORT]);
        assert_eq!(services[0].id.get(), SERVICE_ID);
        assert_eq!(absent.len(), 1);
        let value = service_toml("n1", &[BASE_PORT], false);
        let assembled = RoutingMap::assemble([Record {
            key: "/flynode/services/bench",
            kind: RecordKind::Service,
            name: SERVICE_NAME,
            text: &value,
        }]);
        assert!(assembled.rejected.is_empty(), "{:?}", assembled.rejected);
        assert_eq!(assembled.map.services.len(), 1);
    }
}
