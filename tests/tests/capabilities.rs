//! The daemon works with exactly the capabilities the systemd unit grants: the bounding
//! set is read from packaging/flynode.service, so changing either side without the
//! other fails here rather than on an operator's host.
use flynode::netns::{Netns, veth};
use flynode_tests::node::{Daemon, require_root};
use flynode_tunnel::sched::ThreadPolicy;

fn unit() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/flynode.service"
    ))
    .expect("packaging/flynode.service")
}

/// The unit's `LimitNICE=` as the lowest nice value it allows.
fn unit_nice_limit() -> i32 {
    let unit = unit();
    let v = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNICE="))
        .expect("the unit sets LimitNICE=");
    assert!(v.starts_with('-'), "LimitNICE= as a signed nice value");
    v.parse().expect("LimitNICE= is an integer")
}

/// `(scheduling policy, nice)` of the daemon's thread named `name`.
fn thread_sched(pid: u32, name: &str) -> (i32, i32) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).expect("task stat");
        // Fields after the parenthesised command: state is field 3; nice is 19 and
        // policy 41 (proc_pid_stat(5)).
        let rest: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
            .split(' ')
            .collect();
        return (
            rest[41 - 3].parse().expect("policy"),
            rest[19 - 3].parse().expect("nice"),
        );
    }
    panic!("no thread named {name}");
}

/// The effective capability set of process `pid`.
fn capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff")
}

fn own_capabilities() -> u64 {
    capabilities(std::process::id())
}

fn unit_capabilities() -> Vec<String> {
    let unit = unit();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    line.split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("unexpected capability `{c}`"))
                .to_lowercase()
        })
        .collect()
}

#[test]
fn the_daemon_attaches_and_serves_with_only_the_units_capabilities() {
    require_root();
    let caps = unit_capabilities();
    assert!(
        !caps.iter().any(|c| c == "sys_admin"),
        "CAP_SYS_ADMIN must not be needed"
    );
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    // systemd applies LimitNICE= as RLIMIT_NICE (20 - nice) before exec. Raising a
    // hard limit needs CAP_SYS_RESOURCE, which some sandboxes withhold even from root;
    // there the daemon must still run, at nice 0, and say why.
    let nice_limit = unit_nice_limit();
    let tx_nice = i32::from(ThreadPolicy::MESH_TX.nice);
    assert!(
        nice_limit <= tx_nice,
        "LimitNICE= must allow tx_nice's default {tx_nice}"
    );
    let can_raise_rlimit = own_capabilities() & (1 << 24) != 0; // CAP_SYS_RESOURCE
    let rlimit = format!("--nice={}", 20 - nice_limit);
    let mut wrapper = Vec::new();
    if can_raise_rlimit {
        wrapper.extend(["prlimit", &rlimit, "--"]);
    } else {
        eprintln!("no CAP_SYS_RESOURCE: the unit's LimitNICE= cannot be applied here");
    }
    wrapper.extend(["setpriv", "--bounding-set", &bounding, "--"]);
    let wrapper: Vec<String> = wrapper.into_iter().map(String::from).collect();

    let peer = Netns::create("capspeer").expect("netns");
    let node = Netns::create("caps").expect("netns");
    veth(&peer, "eth0", &node, "eth0").expect("veth");
    let daemon = Daemon::start_wrapped(&node, "eth0", "native", |_| String::new(), &wrapper);

    let pid = daemon.pid();
    let cap_eff = capabilities(pid);
    // CAP_SYS_ADMIN is capability 21.
    assert_eq!(
        cap_eff & (1 << 21),
        0,
        "the daemon ran without CAP_SYS_ADMIN"
    );
    assert_eq!(daemon.status()["xdp"]["mode"], "native");
    // CAP_SYS_NICE (23) is not granted: the unit's RLIMIT_NICE is what lets mesh-tx
    // take its default nice value; mesh-rx keeps its own.
    assert_eq!(
        cap_eff & (1 << 23),
        0,
        "the daemon ran without CAP_SYS_NICE"
    );
    let policy = |p: ThreadPolicy| {
        if p.batch {
            libc::SCHED_BATCH
        } else {
            libc::SCHED_OTHER
        }
    };
    let (tx, rx) = (ThreadPolicy::MESH_TX, ThreadPolicy::MESH_RX);
    if can_raise_rlimit {
        assert_eq!(thread_sched(pid, "mesh-tx"), (policy(tx), tx_nice));
    } else {
        assert_eq!(thread_sched(pid, "mesh-tx"), (policy(tx), 0));
        let log = daemon.log();
        assert!(
            log.contains("data-path scheduling not applied") && log.contains("RLIMIT_NICE"),
            "the daemon says why mesh-tx runs at nice 0:\n{log}"
        );
    }
    assert_eq!(
        thread_sched(pid, "mesh-rx"),
        (policy(rx), i32::from(rx.nice))
    );
    assert!(daemon.stop().success());
}
