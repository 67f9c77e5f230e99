//! The `flynode` command.
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flynode::config::Config;
use flynode::routing::RoutingMap;
use flynode::{NotYetImplemented, control, exit};
use flynode_keys::{KeyDir, KeyError, PrivateKey, rfc3339_utc};

const DEFAULT_CONFIG: &str = "/etc/flynode/flynode.toml";

#[derive(Parser)]
#[command(
    name = "flynode",
    version,
    about = "UDP anycast edge and worker: XDP on the NIC, a userspace WireGuard mesh between hosts",
    after_help = "Exit codes:\n  0   success\n  1   the operation failed (attach, I/O, kernel refused)\n  2   command-line usage error\n  3   the configuration or routing map is invalid\n  4   a key is missing, unreadable, too widely readable, or would be overwritten\n  5   no daemon answers on the control socket\n  6   keys rotate: not every peer moved to the new key within --wait\n  69  the capability is not built yet"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (systemd runs it this way).
    #[command(after_help = "Example:\n  flynode run --config /etc/flynode/flynode.toml")]
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration (and the routing file it names) without touching the system.
    #[command(after_help = "Example:\n  flynode check-config /etc/flynode/flynode.toml")]
    CheckConfig {
        #[arg(default_value = DEFAULT_CONFIG)]
        path: PathBuf,
    },
    /// Manage the node's WireGuard keys.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
    /// Ask the running daemon for its state (root only, over the control socket).
    #[command(after_help = "Examples:\n  flynode status\n  flynode status --json")]
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Talk to this control socket instead of the one the config names.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
    /// Manage the fleet's services in etcd (the config's [source.etcd], or --etcd).
    Services {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(subcommand)]
        command: ServicesCmd,
    },
    /// Build a throwaway topology of network namespaces and show flynode at work (root).
    #[command(after_help = "Example:\n  sudo flynode demo")]
    Demo,
}

#[derive(clap::Args)]
struct EtcdArgs {
    /// Read [source.etcd] (endpoints, prefix) from this config.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// etcd endpoints (comma-separated `http://host:port`), instead of the config's.
    #[arg(long, global = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix, with --etcd.
    #[arg(long, global = true, default_value = "/flynode/")]
    prefix: String,
}

#[derive(Subcommand)]
enum ServicesCmd {
    /// Validate a file of [[service]] entries against etcd, then write them (one
    /// transaction; each replaces the service of the same name).
    #[command(after_help = "Example:\n  flynode services apply services.toml")]
    Apply { file: PathBuf },
    /// List the services in etcd (and records that fail validation).
    List,
    /// Remove a service by name.
    #[command(after_help = "Example:\n  flynode services remove dns")]
    Remove { name: String },
}

#[derive(clap::Args)]
struct KeyDirArgs {
    /// The key directory (default: key_dir from the config, else /var/lib/flynode/keys).
    #[arg(long)]
    key_dir: Option<PathBuf>,
    /// Read key_dir from this config.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Generate the node's private key (never overwrites one without --force).
    #[command(after_help = "Example:\n  flynode keys generate --key-dir /var/lib/flynode/keys")]
    Generate {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// Replace an existing key (peers that know the old one lose this node).
        #[arg(long)]
        force: bool,
    },
    /// Show the node's public key(s) and their ages.
    #[command(after_help = "Examples:\n  flynode keys show\n  flynode keys show --private")]
    Show {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// Also print the current private key (base64, as `wg genkey` writes it).
        #[arg(long)]
        private: bool,
    },
    /// Print the public key of a private key read from FILE or stdin, exactly as `wg pubkey`.
    #[command(after_help = "Example:\n  flynode keys pubkey < /var/lib/flynode/keys/private.key")]
    Pubkey {
        /// A private key file; `-` or absent reads stdin.
        file: Option<PathBuf>,
    },
    /// Make a new key current and keep the previous one for a grace period.
    ///
    /// With a daemon running (its control socket answers), the daemon rotates: it answers
    /// on the new key at once and keeps the old one until every peer has moved to the new
    /// key (peers learn it from the routing map) or the grace period ends. This command
    /// prints the new public key, then reports how many peers have moved, for up to
    /// --wait; it exits 0 when all moved, 6 when some had not yet. Without a daemon the
    /// key directory is rotated on disk.
    #[command(after_help = "Examples:\n  flynode keys rotate\n  flynode keys rotate --wait 5m")]
    Rotate {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// Talk to this control socket instead of the one the config names.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// How long to wait for every peer to move to the new key.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // Before any key is read: most commands read one (the daemon, `keys`, the demo's
    // nodes), and none of them needs a core dump more than the key needs keeping out of
    // one.
    if let Err(e) = flynode_keys::forbid_core_dumps() {
        tracing::warn!(error = %e, "could not disable core dumps; a crash may write key material to disk");
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::from(exit::OK as u8),
        Err(e) => {
            eprintln!("flynode: {e:#}");
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // boringtun logs its timers per peer per event (a retried handshake, an
        // expired session): thousands of lines a minute with a large map. The mesh sums
        // them up itself (`peers unreachable`, once a minute); RUST_LOG can bring them
        // back.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,boringtun=off"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.is::<NotYetImplemented>() {
            return exit::NOT_YET;
        }
        if cause.is::<flynode::config::ConfigError>()
            || cause.is::<flynode::routing::RoutingError>()
        {
            return exit::CONFIG;
        }
        if cause.is::<KeyError>() {
            return exit::KEYS;
        }
        if cause.is::<RotationIncomplete>() {
            return exit::ROTATION_INCOMPLETE;
        }
        if let Some(control::ControlError::Connect { .. }) = cause.downcast_ref() {
            return exit::DAEMON_UNREACHABLE;
        }
    }
    exit::FAILURE
}

fn dispatch(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Run { config } => flynode::daemon::run(Config::load(&config)?),
        Cmd::CheckConfig { path } => check_config(&path),
        Cmd::Keys { command } => keys(command),
        Cmd::Status {
            config,
            socket,
            json,
        } => status(&config, socket, json),
        Cmd::Services { etcd, command } => services(&etcd, command),
        Cmd::Demo => flynode::demo::run(),
    }
}

fn etcd_target(args: &EtcdArgs) -> anyhow::Result<flynode::fleet::services::Target> {
    use flynode::fleet::Layout;
    if !args.etcd.is_empty() {
        return Ok(flynode::fleet::services::Target {
            endpoints: args.etcd.clone(),
            layout: Layout::new(&args.prefix),
        });
    }
    match Config::load(&args.config)?.source {
        flynode::config::SourceConfig::Etcd {
            endpoints, prefix, ..
        } => Ok(flynode::fleet::services::Target {
            endpoints,
            layout: Layout::new(&prefix),
        }),
        flynode::config::SourceConfig::File { path } => anyhow::bail!(
            "{}: the routing map comes from the file {}, not etcd; edit that file, or pass --etcd",
            args.config.display(),
            path.display()
        ),
    }
}

fn services(args: &EtcdArgs, command: ServicesCmd) -> anyhow::Result<()> {
    use flynode::fleet::services;
    let target = etcd_target(args)?;
    match command {
        ServicesCmd::Apply { file } => {
            let applied = services::apply(&target, &file)?;
            println!(
                "applied {} service(s) at revision {}: {}",
                applied.services.len(),
                applied.revision,
                applied.services.join(", ")
            );
            if !applied.absent_nodes.is_empty() {
                println!(
                    "note: no node record (yet) for worker node(s) {}; their workers count once they register",
                    applied.absent_nodes.join(", ")
                );
            }
        }
        ServicesCmd::List => {
            let (list, broken) = services::list(&target)?;
            println!(
                "{:<6} {:<20} {:<40} {:<16} workers",
                "id", "name", "anycast", "ports"
            );
            for s in &list {
                let anycast: Vec<String> = s.anycast.iter().map(ToString::to_string).collect();
                let ports: Vec<String> = s.ports.iter().map(ToString::to_string).collect();
                let workers: Vec<String> = s
                    .workers
                    .iter()
                    .map(|w| format!("{}(w{})", w.node, w.weight))
                    .collect();
                println!(
                    "{:<6} {:<20} {:<40} {:<16} {}",
                    s.id.to_string(),
                    s.name.to_string(),
                    anycast.join(","),
                    ports.join(","),
                    workers.join(" ")
                );
            }
            for (key, error) in &broken {
                println!("invalid: {key}: {error}");
            }
        }
        ServicesCmd::Remove { name } => {
            services::remove(&target, &name)?;
            println!("removed service {name}");
        }
    }
    Ok(())
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    match &config.source {
        flynode::config::SourceConfig::File { path: routing } => {
            let map = RoutingMap::load(routing)?;
            println!(
                "{}: ok (node {}, region {}); {}: ok ({} nodes, {} services)",
                path.display(),
                config.node_id,
                config.region,
                routing.display(),
                map.nodes.len(),
                map.services.len()
            );
        }
        flynode::config::SourceConfig::Etcd { .. } => {
            println!("{}: ok (routing map from etcd)", path.display());
        }
    }
    Ok(())
}

/// The config a keys command reads: --config, else the default one if it exists.
fn config_path(args: &KeyDirArgs) -> Option<PathBuf> {
    match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    }
}

fn key_dir_path(args: &KeyDirArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.key_dir {
        return Ok(dir.clone());
    }
    Ok(match config_path(args) {
        Some(path) => Config::load(&path)?.key_dir,
        None => PathBuf::from("/var/lib/flynode/keys"),
    })
}

/// The peers have not all moved to the new key within --wait.
#[derive(Debug, thiserror::Error)]
#[error(
    "{moved} of {total} peers moved to the new key within the wait; the previous key stays valid for {grace_left}s more (peers learn the new key from the routing map)"
)]
struct RotationIncomplete {
    moved: usize,
    total: usize,
    grace_left: u64,
}

/// Rotates through the running daemon and follows the peers moving over.
fn rotate_live(socket: &Path, wait: std::time::Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut r = control::rotate_key(socket)?;
    println!("{}", r.current);
    let mut last = None;
    loop {
        if last != Some(r.moved) {
            eprintln!(
                "rotation: {} of {} peers moved to the new key",
                r.moved, r.total
            );
            last = Some(r.moved);
        }
        if r.moved >= r.total || r.previous.is_none() {
            eprintln!("rotation complete: every peer uses the new key");
            return Ok(());
        }
        if started.elapsed() >= wait {
            return Err(RotationIncomplete {
                moved: r.moved,
                total: r.total,
                grace_left: r.grace_left_secs.unwrap_or(0),
            }
            .into());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        r = control::rotation(socket)?;
    }
}

fn keys(command: KeysCmd) -> anyhow::Result<()> {
    match command {
        KeysCmd::Generate { dir, force } => {
            let dir = KeyDir::create(key_dir_path(&dir)?)?;
            let public = dir.generate(force)?;
            println!("{public}");
        }
        KeysCmd::Show { dir, private } => {
            let dir = KeyDir::open(key_dir_path(&dir)?)?;
            let state = dir.state()?;
            let current = dir.load_current()?;
            println!("current   {}", current.public_key());
            if let Some(rec) = &state.current {
                println!("          created {}", rfc3339_utc(rec.created_at));
            }
            if let Some(prev) = &state.previous {
                println!("previous  {}", prev.public_key);
                println!("          rotated {}", rfc3339_utc(prev.rotated_at));
            }
            if private {
                println!("private   {}", current.to_base64().as_str());
            }
        }
        KeysCmd::Pubkey { file } => {
            let mut text = zeroize::Zeroizing::new(String::new());
            match file.as_deref().filter(|p| *p != Path::new("-")) {
                Some(path) => {
                    std::fs::File::open(path)
                        .and_then(|mut f| f.read_to_string(&mut text))
                        .with_context(|| format!("reading {}", path.display()))?;
                }
                None => {
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading a private key from stdin")?;
                }
            }
            let key = PrivateKey::from_base64(&text).map_err(|e| KeyError::InvalidKey {
                path: file.unwrap_or_else(|| PathBuf::from("<stdin>")),
                reason: e.to_string(),
            })?;
            println!("{}", key.public_key());
        }
        KeysCmd::Rotate { dir, socket, wait } => {
            let socket = match socket {
                Some(s) => Some(s),
                None => config_path(&dir)
                    .map(|p| Config::load(&p))
                    .transpose()?
                    .map(|c| c.control_socket),
            };
            if let Some(socket) = socket.filter(|s| control::daemon_answers(s)) {
                return rotate_live(&socket, wait);
            }
            let dir = KeyDir::open(key_dir_path(&dir)?)?;
            let rotation = dir.rotate()?;
            println!("{}", rotation.new);
            eprintln!(
                "rotated on disk (no daemon running): new key {} is current, previous key {} is kept until the daemon's grace period ends",
                rotation.new.fingerprint(),
                rotation.old.fingerprint()
            );
        }
    }
    Ok(())
}

fn status(config: &Path, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let socket = match socket {
        Some(s) => s,
        None => Config::load(config)?.control_socket,
    };
    let status = control::status(&socket)?;
    if json {
        // Indented for a person at a terminal; one compact line for a pipe (`jq`, a
        // script): with thousands of peers the status is megabytes, and indenting it
        // costs as much as the daemon's whole answer.
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            serde_json::to_writer_pretty(&mut out, &status)?;
        } else {
            serde_json::to_writer(&mut out, &status)?;
        }
        std::io::Write::write_all(&mut out, b"\n")?;
        std::io::Write::flush(&mut out)?;
        return Ok(());
    }
    println!(
        "node      {} (region {}), flynode {}",
        status.node_id, status.region, status.version
    );
    println!(
        "key       {} ({}), {}",
        status.public_key_fingerprint,
        status.public_key,
        status
            .key_age_secs
            .map_or("age unknown".to_owned(), |s| format!(
                "made {} ago",
                humantime::format_duration(std::time::Duration::from_secs(s))
            ))
    );
    println!("uptime    {}s", status.uptime_secs);
    println!(
        "routing   {}: {} nodes, {} services, {} service endpoints",
        status.routing.source,
        status.routing.nodes,
        status.routing.services,
        status.routing.service_endpoints
    );
    let applied_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(status.routing.applied_unix);
    println!(
        "          {}; map generation {}{}, applied {applied_ago}s ago",
        status.routing.state,
        status.routing.generation,
        status
            .routing
            .revision
            .map_or_else(String::new, |r| format!(" (etcd revision {r})")),
    );
    for (key, error) in &status.routing.rejected {
        println!("  rejected {key}: {error}");
    }
    println!(
        "xdp       {} mode on {}, ingress {}",
        status.xdp.mode, status.xdp.interface, status.xdp.backend
    );
    for (endpoint, error) in &status.xdp.socket_failures {
        println!("  no socket for {endpoint}: {error}");
    }
    for (verdict, n) in &status.xdp.verdicts {
        println!("  {verdict:<10} {n}");
    }
    for (name, n) in &status.xdp.counters {
        println!("    {name:<26} {n}");
    }
    let ingress: Vec<String> = status
        .xdp
        .ingress
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!("ingress   {}", ingress.join(", "));
    for (id, t) in &status.xdp.services {
        println!("  service {id:<8} {} datagrams, {} B", t.datagrams, t.bytes);
    }
    let mesh = &status.mesh;
    let sum = &mesh.peer_summary;
    println!(
        "mesh      {} mtu {}, udp port {}, {} peers ({} warm, {} active, {} with a session, {} unreachable)",
        mesh.interface,
        mesh.mtu,
        mesh.listen_port,
        mesh.peers.len(),
        sum.warm,
        sum.active,
        sum.with_session,
        sum.unreachable
    );
    if let Some(previous) = &mesh.rotation.previous {
        println!(
            "rotation  {} of {} peers moved off {}; previous key wiped in {}s at the latest",
            mesh.rotation.moved,
            mesh.rotation.total,
            &previous[..8.min(previous.len())],
            mesh.rotation.grace_left_secs.unwrap_or(0)
        );
    }
    let now = flynode_keys::unix_now();
    // Peers with nothing going on are one line for all of them: a map of thousands
    // would otherwise print thousands of idle lines.
    let idle = |p: &&flynode::mesh::PeerInfo| {
        !p.warm && !p.active && !p.session_up && p.unreachable_secs.is_none()
    };
    let idle_peers = mesh.peers.iter().filter(idle).count();
    for p in mesh.peers.iter().filter(|p| !idle(p)) {
        let state = match (p.session_up, p.unreachable_secs) {
            (true, _) => "up  ".to_owned(),
            (false, Some(secs)) => format!("unreachable {secs}s"),
            (false, None) => "down".to_owned(),
        };
        let handshake = match p.last_handshake_unix {
            Some(t) => format!("{}s ago", now.saturating_sub(t)),
            None => "never".to_owned(),
        };
        println!(
            "  {:<16} {:<8} {state}{} {:<24} handshake {handshake} ({} total), rx {} pkts/{} B, tx {} pkts/{} B, decrypt failures {}, our key {}",
            p.node,
            &p.public_key[..8.min(p.public_key.len())],
            if p.warm { " warm" } else { "" },
            p.endpoint.as_deref().unwrap_or("-"),
            p.handshakes,
            p.rx_packets,
            p.rx_bytes,
            p.tx_packets,
            p.tx_bytes,
            p.decrypt_failures,
            p.own_key
        );
    }
    if idle_peers > 0 {
        println!(
            "  ... and {idle_peers} idle peers (no session, nothing to send; `flynode status --json` lists them)"
        );
    }
    let drops: Vec<String> = mesh
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    if !drops.is_empty() {
        println!("  dropped: {}", drops.join(", "));
    }
    let fwd = &status.forwarding;
    println!(
        "flows     edge {}/{} ({} evicted, {} expired), worker {}/{} ({} evicted, {} expired); largest client datagram {} B (IPv4), {} B (IPv6)",
        fwd.edge_flows.active,
        fwd.edge_flows.capacity,
        fwd.edge_flows.evicted,
        fwd.edge_flows.expired,
        fwd.worker_flows.active,
        fwd.worker_flows.capacity,
        fwd.worker_flows.evicted,
        fwd.worker_flows.expired,
        fwd.max_payload_v4,
        fwd.max_payload_v6
    );
    for (id, workers) in &fwd.workers {
        let list: Vec<String> = workers
            .iter()
            .map(|w| {
                format!(
                    "{}{} (weight {}, {})",
                    w.node,
                    if w.local { " [this node]" } else { "" },
                    w.weight,
                    if w.healthy { "healthy" } else { "DOWN" }
                )
            })
            .collect();
        println!("  service {id:<8} workers: {}", list.join(", "));
    }
    let counters: Vec<String> = fwd
        .counters
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "forwarding {}",
        if counters.is_empty() {
            "idle".to_owned()
        } else {
            counters.join(", ")
        }
    );
    for (name, s) in &fwd.services {
        let nonzero = |m: &std::collections::BTreeMap<String, u64>| -> String {
            let items: Vec<String> = m
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(", ")
            }
        };
        println!(
            "  service {name} (id {}): forwarded {}; dropped {}{}",
            s.id,
            nonzero(&s.forwarded),
            nonzero(&s.dropped),
            if s.no_live_worker > 0 {
                format!("; {} sent with no live worker", s.no_live_worker)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
