//! The daemon works with exactly the capabilities the systemd unit grants: the bounding
//! set is read from packaging/flynode.service, so changing either side without the
//! other fails here rather than on an operator's host.
use flynode::netns::{Netns, veth};
use flynode_tests::node::{Daemon, require_root};

fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/flynode.service"
    ))
    .expect("packaging/flynode.service");
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
    let wrapper = ["setpriv", "--bounding-set", &bounding, "--"].map(String::from);

    let peer = Netns::create("capspeer").expect("netns");
    let node = Netns::create("caps").expect("netns");
    veth(&peer, "eth0", &node, "eth0").expect("veth");
    let daemon = Daemon::start_wrapped(&node, "eth0", "native", |_| String::new(), &wrapper);

    let pid = daemon.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    // CAP_SYS_ADMIN is capability 21.
    assert_eq!(
        cap_eff & (1 << 21),
        0,
        "the daemon ran without CAP_SYS_ADMIN"
    );
    assert_eq!(daemon.status()["xdp"]["mode"], "native");
    assert!(daemon.stop().success());
}
