//! `flynode demo`: a throwaway topology on this machine that shows the XDP classifier at
//! work. Two network namespaces joined by a veth: `client` sends datagrams, `edge` runs a
//! real `flynode run` with the program attached to its end. The demo prints what it sent
//! and the live counters the daemon reports, then tears everything down, also on Ctrl-C.
//! (The end-to-end forwarding demo, client → edge → worker → container, replaces this
//! once forwarding exists.)
use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use flynode_xdp_common::Counter;

use crate::control;
use crate::netns::{ChildGuard, Netns, veth, wait_for};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the demo topology down");
    }
    Ok(())
}

const ANYCAST_V4: &str = "198.18.100.1";
const ANYCAST_V6: &str = "2001:db8:100::1";
const SERVICE_PORT: u16 = 53;

struct Send {
    what: &'static str,
    to: SocketAddr,
    count: usize,
    expect: Counter,
}

pub fn run() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`flynode demo` creates network namespaces and attaches XDP: run it as root");
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        for sig in [
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
        ] {
            nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::Handler(on_interrupt))
                .context("installing the Ctrl-C handler")?;
        }
    }
    let result = run_topology();
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!("interrupted: namespaces and the daemon are gone");
    }
    result
}

fn run_topology() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    println!("== flynode demo: XDP classifier on a veth ==");
    let client = Netns::create("client")?;
    let edge = Netns::create("edge")?;
    veth(&client, "eth0", &edge, "eth0")?;
    for (ns, v4, v6) in [
        (&client, "198.18.0.2/24", "2001:db8::2/64"),
        (&edge, "198.18.0.1/24", "2001:db8::1/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", "eth0"])?;
        ns.ip(&["addr", "add", v6, "dev", "eth0", "nodad"])?;
    }
    edge.ip(&["addr", "add", &format!("{ANYCAST_V4}/32"), "dev", "lo"])?;
    edge.ip(&["addr", "add", &format!("{ANYCAST_V6}/128"), "dev", "lo"])?;
    client.ip(&[
        "route",
        "add",
        &format!("{ANYCAST_V4}/32"),
        "via",
        "198.18.0.1",
    ])?;
    client.ip(&[
        "-6",
        "route",
        "add",
        &format!("{ANYCAST_V6}/128"),
        "via",
        "2001:db8::1",
    ])?;
    println!(
        "namespaces: {} (198.18.0.2, 2001:db8::2) <-veth-> {} (198.18.0.1, 2001:db8::1; anycast {ANYCAST_V4}, {ANYCAST_V6})",
        client.name(),
        edge.name()
    );

    let config = write_demo_files(dir.path())?;
    let log_path = dir.path().join("flynode.log");
    let log = std::fs::File::create(&log_path)?;
    let exe = std::env::current_exe().context("finding the flynode binary")?;
    let exe = exe.to_str().context("flynode's path is not UTF-8")?;
    let daemon = ChildGuard::spawn(
        edge.command(exe)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let socket = dir.path().join("control.sock");
    let status = wait_for(Duration::from_secs(10), || {
        check_interrupted().ok()?;
        control::status(&socket).ok()
    })
    .with_context(|| {
        format!(
            "the daemon did not come up; its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        )
    })?;
    println!(
        "flynode {} running in {}: XDP {} mode on {}, {} service endpoint(s)",
        status.version,
        edge.name(),
        status.xdp.mode,
        status.xdp.interface,
        status.routing.service_endpoints
    );

    // The classifier hands service datagrams to the daemon (AF_XDP, or its service
    // sockets), which counts them per service until forwarding consumes them.
    let plan = plan();
    edge.enter(|| client_send(&client, &plan))??;
    std::thread::sleep(Duration::from_millis(300));
    check_interrupted()?;

    let status = control::status(&socket)?;
    println!(
        "\n{:<46} {:>6}  {:<24}",
        "sent from the client", "count", "expected counter"
    );
    for s in &plan {
        println!(
            "{:<46} {:>6}  {}",
            format!("{} ({})", s.what, s.to),
            s.count,
            s.expect.name()
        );
    }
    println!("\ningress: {}", status.xdp.backend);
    for (id, t) in &status.xdp.services {
        println!(
            "service {id} received {} datagram(s), {} bytes, in the daemon",
            t.datagrams, t.bytes
        );
    }
    println!("\n{:<26} {:<10} {:>8}", "XDP counter", "verdict", "frames");
    for c in Counter::ALL {
        let v = status.xdp.counters.get(c.name()).copied().unwrap_or(0);
        println!("{:<26} {:<10} {:>8}", c.name(), c.verdict().name(), v);
    }
    println!("(pass_not_ip / pass_not_udp include the kernel's own ARP and neighbour discovery)");
    let exit = daemon.terminate(Duration::from_secs(5))?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    println!("\ndaemon log:");
    for line in log.lines() {
        println!("  {line}");
    }
    println!("daemon stopped ({exit}); removing namespaces");
    std::io::stdout().flush()?;
    // Service and unserved-port datagrams are only ever ours, so those counters must
    // hold exactly what was sent; the pass counters also see the kernel's own traffic.
    let mut sent: std::collections::BTreeMap<&str, u64> = Default::default();
    for s in &plan {
        *sent.entry(s.expect.name()).or_default() += s.count as u64;
    }
    for (name, want) in sent {
        let got = status.xdp.counters.get(name).copied().unwrap_or(0);
        let exact = matches!(name, "userspace_service" | "drop_unknown_port");
        if (exact && got != want) || got < want {
            bail!("counter {name} is {got}, but {want} such datagrams were sent");
        }
    }
    Ok(())
}

fn anycast_v6() -> std::net::IpAddr {
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1))
}

fn plan() -> Vec<Send> {
    let v4 = |port: u16| SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 100, 1).into(), port);
    let v6 = |port: u16| SocketAddr::new(anycast_v6(), port);
    vec![
        Send {
            what: "service, IPv4",
            to: v4(SERVICE_PORT),
            count: 5,
            expect: Counter::UserspaceService,
        },
        Send {
            what: "service, IPv6",
            to: v6(SERVICE_PORT),
            count: 5,
            expect: Counter::UserspaceService,
        },
        Send {
            what: "unserved port, IPv4",
            to: v4(5353),
            count: 3,
            expect: Counter::DropUnknownPort,
        },
        Send {
            what: "unserved port, IPv6",
            to: v6(5353),
            count: 3,
            expect: Counter::DropUnknownPort,
        },
        Send {
            what: "the edge's own address",
            to: SocketAddr::new(std::net::Ipv4Addr::new(198, 18, 0, 1).into(), 9),
            count: 4,
            expect: Counter::PassNotService,
        },
    ]
}

fn client_send(client: &Netns, sends: &[Send]) -> std::io::Result<()> {
    client.enter(|| -> std::io::Result<()> {
        for s in sends {
            let unspecified: std::net::IpAddr = if s.to.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            };
            let sock = UdpSocket::bind((unspecified, 0))?;
            for i in 0..s.count {
                sock.send_to(format!("flynode demo datagram {i}").as_bytes(), s.to)?;
            }
        }
        Ok(())
    })?
}

fn write_demo_files(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let keys = dir.join("keys");
    let key_dir = flynode_keys::KeyDir::create(&keys)?;
    let public = key_dir.generate(false)?;
    let routing = dir.join("routing.toml");
    std::fs::write(
        &routing,
        format!(
            r#"[[node]]
id = "demo-edge"
region = "demo"
public_key = "{public}"
endpoint = "198.18.0.1:51820"
mesh_address = "fd00:f1::1"

[[service]]
id = 1
name = "dns"
anycast = ["{ANYCAST_V4}", "{ANYCAST_V6}"]
ports = [{SERVICE_PORT}]
  [[service.worker]]
  node = "demo-edge"
  target = "198.18.200.2:53"
"#
        ),
    )?;
    let config = dir.join("flynode.toml");
    std::fs::write(
        &config,
        format!(
            r#"node_id = "demo-edge"
region = "demo"
mesh_address = "fd00:f1::1"
key_dir = "{keys}"
control_socket = "{socket}"

[xdp]
interface = "eth0"
mode = "auto"

[source]
file = "{routing}"
"#,
            keys = keys.display(),
            socket = dir.join("control.sock").display(),
            routing = routing.display(),
        ),
    )?;
    Ok(config)
}
