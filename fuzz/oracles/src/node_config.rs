//! `node_config`: the node config (`flynode::config::Config::parse`).
//!
//! Input: the file's text (bytes that are not UTF-8 are ignored: `load` refuses them
//! before parsing). Without `node_id` the parse reads the host name, as it does for
//! the daemon.
//!
//! Properties: an accepted config holds what `Config` documents (a ULA mesh address,
//! absolute paths, valid interface names, an etcd prefix that starts and ends with '/',
//! a whole-second lease of at least 2 s, non-zero durations, counts and ports, container
//! and anycast prefixes without host bits); written back with every field
//! (`render::config`, which names them all) it parses to the same config. A refusal is
//! one line that names the file.
use std::path::Path;
use std::time::Duration;

use flynode::config::{Config, SourceConfig};

use crate::render;
use crate::routing_map::one_line;

const ORIGIN: &str = "/fuzz/flynode.toml";

pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, Path::new(ORIGIN)) {
        Ok(c) => c,
        Err(e) => return one_line(&e.to_string(), ORIGIN),
    };
    check(&config);
    let written = render::config(&config);
    let again = Config::parse(&written, Path::new(ORIGIN))
        .unwrap_or_else(|e| panic!("an accepted config written back is refused: {e}\n{written}"));
    assert!(
        again == config,
        "an accepted config written back parses differently:\n{written}"
    );
}

fn check(c: &Config) {
    assert_eq!(
        c.mesh_address.segments()[0] & 0xfe00,
        0xfc00,
        "mesh address not ULA"
    );
    assert!(c.key_dir.is_absolute() && c.control_socket.is_absolute());
    let w = &c.wireguard;
    for name in [&w.interface, &c.xdp.interface] {
        let bad = name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|ch: char| ch == '/' || ch == ':' || ch == '\0' || ch.is_whitespace());
        assert!(!bad, "interface name {name:?} accepted");
    }
    assert!(w.listen_port != 0 && w.forward_port != 0 && c.metrics.listen.port() != 0);
    assert!(w.mtu.is_none_or(|m| (1280..=9000).contains(&m)));
    assert!((16..=1_000_000).contains(&w.tun_queue_len));
    assert!((-20..=19).contains(&w.tx_nice));
    assert!(w.endpoint.is_none_or(|e| e.port() != 0));
    for d in [w.key_grace, w.persistent_keepalive, c.flows.idle_timeout] {
        assert!(d > Duration::ZERO, "a zero duration accepted");
    }
    assert!(c.flows.edge_max >= 1 && c.flows.worker_max >= 1);
    let prefixes = c
        .flows
        .container_prefixes
        .iter()
        .chain(&c.xdp.anycast_prefixes);
    for p in prefixes.flatten() {
        assert_eq!(p.trunc(), *p, "prefix {p} with host bits accepted");
    }
    match &c.source {
        SourceConfig::File { path } => assert!(path.is_absolute()),
        SourceConfig::Etcd {
            endpoints,
            prefix,
            lease_ttl,
        } => {
            assert!(!endpoints.is_empty());
            for e in endpoints {
                assert!(e.starts_with("http://") || e.starts_with("https://"), "{e}");
            }
            assert!(
                prefix.starts_with('/') && prefix.ends_with('/'),
                "prefix {prefix:?}"
            );
            assert!(*lease_ttl >= Duration::from_secs(2) && lease_ttl.subsec_nanos() == 0);
        }
    }
    for name in [c.node_id.as_str(), c.region.as_str()] {
        assert!(!name.is_empty() && name.len() <= 63, "name {name:?}");
    }
}
