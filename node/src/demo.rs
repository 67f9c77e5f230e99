//! `flynode demo`: the whole data path on one machine. A throwaway topology of network
//! namespaces (a client, two edges, two workers with a container each, on a LAN bridge;
//! see [`topology`]) runs four real `flynode run` processes. The containers run a UDP
//! echo and a small DNS server ([`services`]); the client sends a few flows over IPv4 and
//! IPv6, switches its route from edge 1 to edge 2 halfway, and the demo prints each
//! datagram's trip ([`trip`]): the edge and worker it crossed (from the nodes' own
//! forwarding counters), the source address the container saw, and the address the
//! reply came from. Everything is torn down at the end, also on Ctrl-C, and the demo
//! exits non-zero if any trip went wrong.
mod dns;
mod services;
mod topology;
mod trip;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use topology::{
    DNS, ECHO, EDGES, Topology, WORKERS, client_ip, container_ip, container_name, lan, node_id,
};
use trip::{Flow, Trip};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Every wait in the demo calls this, so Ctrl-C unwinds to the teardown within a
/// fraction of a second.
fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the demo topology down");
    }
    Ok(())
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
    let started = Instant::now();
    println!("== flynode demo: client → edge → worker → container, and back ==\n");
    let result = Topology::build().and_then(|mut topology| {
        let outcome = tell(&mut topology);
        teardown(topology);
        outcome
    });
    remove_leftovers();
    let trips = match result {
        Ok(trips) => trips,
        // Ctrl-C also reaches the `ip` commands the demo runs; their failure is not news.
        Err(_) if INTERRUPTED.load(Ordering::SeqCst) => {
            bail!("interrupted: everything the demo set up is removed")
        }
        Err(e) => return Err(e),
    };
    println!(
        "\n✓ {trips} datagrams made the round trip in {:.1} s: each container saw the client's own \
         address,\n  every reply came from the anycast address through the edge the request used, \
         and every\n  flow kept its worker when the client moved to the other edge",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Deletes any namespace this process created that a guard does not cover: one whose
/// `ip netns add` was interrupted by Ctrl-C after creating it. Only names carrying this
/// process's PID (see [`crate::netns::Netns::create`]) are touched.
fn remove_leftovers() {
    let Ok(out) = crate::netns::run(std::process::Command::new("ip").args(["netns", "list"]))
    else {
        return;
    };
    let pid = std::process::id().to_string();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let parts: Vec<&str> = name.split('-').collect();
        if let ["fn", _, p, _] = parts[..]
            && p == pid
        {
            let _ =
                crate::netns::run(std::process::Command::new("ip").args(["netns", "del", name]));
        }
    }
}

/// The story; returns the number of trips when every check passed.
fn tell(topology: &mut Topology) -> anyhow::Result<usize> {
    print_topology(topology);
    println!(
        "\nstarting `flynode run` on node-1..4 (keys, configs, routing map and logs in {})",
        topology.dir().display()
    );
    let statuses = topology.start_daemons()?;
    for s in &statuses {
        println!(
            "  {:<7} flynode {} up: XDP {} on {}, ingress {}; mesh {} (mtu {}), {} peers",
            s.node_id,
            s.version,
            s.xdp.mode,
            s.xdp.interface,
            s.xdp.backend,
            s.mesh.interface,
            s.mesh.mtu,
            s.mesh.peers.len(),
        );
    }
    print!("waiting until every node sees both workers healthy (WireGuard sessions up) ... ");
    std::io::stdout().flush()?;
    let took = topology.wait_for_mesh(Duration::from_secs(20))?;
    println!("ready after {} ms", took.as_millis());

    let flows = [
        ('A', &ECHO, false, 40001),
        ('B', &ECHO, false, 40002),
        ('C', &ECHO, true, 40003),
        ('D', &ECHO, true, 40004),
        ('E', &DNS, false, 40053),
        ('F', &DNS, true, 40054),
    ]
    .into_iter()
    .map(|(label, service, v6, port)| {
        Flow::open(
            &topology.client,
            label,
            service,
            SocketAddr::new(client_ip(v6), port),
        )
    })
    .collect::<anyhow::Result<Vec<Flow>>>()?;

    println!(
        "\nlegend: → plain IP on a link   ⇒ through the WireGuard mesh (a PROXY v2 header, then \
         the datagram, encrypted)\n        each path is read from the nodes' own counters before \
         and after the datagram\n        (XDP verdicts, edge_forwarded, worker_delivered, \
         reply_forwarded, client_replies)"
    );
    let mut trips: Vec<(usize, Trip)> = Vec::new();
    for (phase, &edge) in EDGES.iter().enumerate() {
        topology.route_client_to(edge)?;
        if phase == 0 {
            println!(
                "\n── the client's routes to the anycast prefixes point at edge {} ({}) ──",
                node_id(edge),
                lan(edge, false)
            );
        } else {
            println!(
                "\n── route switched: the client now reaches the anycast prefixes through edge {} ({}) ──",
                node_id(edge),
                lan(edge, false)
            );
        }
        for (i, flow) in flows.iter().enumerate() {
            let trip = Trip::run(flow, trips.len() + 1, edge, &topology.nodes)?;
            trip.print(flow);
            for problem in trip.problems(flow) {
                println!("     ✗ {problem}");
            }
            trips.push((i, trip));
        }
    }

    print_switch(&flows, &trips);
    print_counters(topology)?;

    let mut problems = 0;
    for (i, trip) in &trips {
        problems += trip.problems(&flows[*i]).len();
    }
    for (i, flow) in flows.iter().enumerate() {
        if !kept_worker(&trips, i) {
            problems += 1;
            println!(
                "✗ flow {} changed worker when the client changed edge",
                flow.label
            );
        }
    }
    if problems > 0 {
        for node in &topology.nodes {
            println!(
                "\n--- the end of {}'s log ---\n{}",
                node.id(),
                node.log_tail(15)
            );
        }
        bail!("{problems} check(s) failed (marked ✗ above)");
    }
    Ok(trips.len())
}

fn print_topology(topology: &Topology) {
    println!(
        "topology: {} network namespaces on a LAN bridge (198.18.10.0/24, 2001:db8:10::/64), removed at the end",
        topology.namespaces()
    );
    println!(
        "  client  {:<14} {:<18} sends the traffic",
        client_ip(false).to_string(),
        client_ip(true).to_string()
    );
    for n in EDGES {
        println!(
            "  {:<7} {:<14} {:<18} edge: the anycast addresses on lo, XDP on eth0",
            node_id(n),
            lan(n, false).to_string(),
            lan(n, true).to_string()
        );
    }
    for n in WORKERS {
        println!(
            "  {:<7} {:<14} {:<18} worker: container {} behind it at {}, {}",
            node_id(n),
            lan(n, false).to_string(),
            lan(n, true).to_string(),
            container_name(n),
            container_ip(n, false),
            container_ip(n, true)
        );
    }
    println!("services (the routing map every node reads), both served by node-3 and node-4:");
    for s in topology::SERVICES {
        let what = match s.kind {
            topology::Kind::Echo => "UDP echo: replies \"<container> saw <source> | <payload>\"",
            topology::Kind::Dns => "DNS: demo.flynode.test A and AAAA, with NSID and a whoami TXT",
        };
        println!(
            "  {:<5} {:<17} {:<22} {what}",
            s.name,
            s.anycast(false).to_string(),
            s.anycast(true).to_string(),
        );
    }
}

/// Whether flow `i` was served by the same worker before and after the switch.
fn kept_worker(trips: &[(usize, Trip)], i: usize) -> bool {
    let workers: Vec<Option<u8>> = trips
        .iter()
        .filter(|(f, _)| *f == i)
        .map(|(_, t)| t.worker())
        .collect();
    workers.first().is_some_and(|w| w.is_some()) && workers.windows(2).all(|w| w[0] == w[1])
}

fn print_switch(flows: &[Flow], trips: &[(usize, Trip)]) {
    println!(
        "\n── each flow across the switch (rendezvous hashing: every edge picks the same worker) ──"
    );
    println!(
        "{:<5} {:<10} {:<26} {:<20} {:<20} worker",
        "flow", "service", "client", "before the switch", "after"
    );
    for (i, flow) in flows.iter().enumerate() {
        let legs: Vec<String> = trips
            .iter()
            .filter(|(f, _)| *f == i)
            .map(|(_, t)| {
                let name = |n: Option<u8>| n.map_or_else(|| "?".into(), node_id);
                format!("{} ⇒ {}", name(t.edge()), name(t.worker()))
            })
            .collect();
        println!(
            "{:<5} {:<10} {:<26} {:<20} {:<20} {}",
            flow.label,
            format!("{} {}", flow.service.name, flow.family()),
            flow.client.to_string(),
            legs.first().map_or("-", String::as_str),
            legs.get(1).map_or("-", String::as_str),
            if kept_worker(trips, i) {
                "kept ✓"
            } else {
                "changed ✗"
            }
        );
    }
}

fn print_counters(topology: &Topology) -> anyhow::Result<()> {
    println!("\n── counters, as `flynode status --json` shows them ──");
    let headers = [
        "xdp: userspace_service",
        "edge_forwarded",
        "worker_delivered",
        "reply_forwarded",
        "client_replies",
        "reply_no_flow",
        "flows: edge",
        "worker",
    ];
    println!("node    {}", headers.join("  "));
    for node in &topology.nodes {
        let s = node.status()?;
        let f = &s.forwarding;
        let counter = |name: &str| f.counters.get(name).copied().unwrap_or(0);
        let values = [
            s.xdp
                .counters
                .get("userspace_service")
                .copied()
                .unwrap_or(0),
            counter("edge_forwarded"),
            counter("worker_delivered"),
            counter("reply_forwarded"),
            counter("client_replies"),
            counter("reply_no_flow"),
            f.edge_flows.active as u64,
            f.worker_flows.active as u64,
        ];
        let cells: Vec<String> = headers
            .iter()
            .zip(values)
            .map(|(h, v)| format!("{v:>width$}", width = h.chars().count()))
            .collect();
        println!("{:<7} {}", node.id(), cells.join("  "));
    }
    Ok(())
}

fn teardown(mut topology: Topology) {
    println!("\ntearing down: stopping the daemons (SIGTERM) and the containers' services");
    for (node, exit) in topology.stop() {
        match exit {
            Ok(status) if status.success() => println!("  {node}: flynode exited cleanly"),
            Ok(status) => println!("  {node}: flynode stopped ({status})"),
            Err(e) => println!("  {node}: could not stop flynode: {e}"),
        }
    }
    let namespaces = topology.namespaces();
    let dir = topology.dir().display().to_string();
    drop(topology);
    println!("  removed {namespaces} network namespaces and {dir}");
}
