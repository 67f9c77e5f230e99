use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const ORIGIN: &str = "/etc/flynode/flynode.toml";

const FULL: &str = r#"node_id = "ams-1"
region = "ams"
mesh_address = "fd00:f1::1"
key_dir = "/srv/flynode/keys"
control_socket = "/run/fn.sock"

[wireguard]
listen_port = 51821
tun_queue_len = 8192
data_path_sched = "normal"
tx_nice = 3

[xdp]
interface = "enp1s0f0"
mode = "native"
backend = "socket"

[source.etcd]
endpoints = ["http://127.0.0.1:2379", "https://[fd00::2]:2379"]
prefix = "/mesh/"

[metrics]
listen = "[::1]:9100"

[flows]
edge_max = 4096
worker_max = 2048
idle_timeout = "1m 30s"
"#;

pub(crate) const MINIMAL: &str = r#"region = "ams"
mesh_address = "fd00:f1::1"

[xdp]
interface = "eth0"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with_hostname(text, Path::new(ORIGIN), || Ok("web-3.example.com\n".into()))
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_config_parses_every_field() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.node_id.as_str(), "ams-1");
    assert_eq!(config.region.as_str(), "ams");
    assert_eq!(
        config.mesh_address,
        "fd00:f1::1".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(config.key_dir, PathBuf::from("/srv/flynode/keys"));
    assert_eq!(config.control_socket, PathBuf::from("/run/fn.sock"));
    assert_eq!(config.wireguard.listen_port, 51821);
    assert_eq!(config.wireguard.tun_queue_len, 8192);
    assert_eq!(
        config.wireguard.data_path(),
        (
            ThreadPolicy {
                batch: false,
                nice: 3
            },
            ThreadPolicy::NORMAL
        )
    );
    assert_eq!(config.xdp.interface, "enp1s0f0");
    assert_eq!(config.xdp.mode, XdpMode::Native);
    assert_eq!(config.xdp.backend, crate::ingress::BackendChoice::Socket);
    assert_eq!(
        config.source,
        SourceConfig::Etcd {
            endpoints: vec![
                "http://127.0.0.1:2379".into(),
                "https://[fd00::2]:2379".into()
            ],
            prefix: "/mesh/".into(),
            lease_ttl: std::time::Duration::from_secs(10),
        }
    );
    assert_eq!(
        config.metrics.listen,
        "[::1]:9100".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.flows.edge_max, 4096);
    assert_eq!(config.flows.worker_max, 2048);
    assert_eq!(config.flows.idle_timeout, Duration::from_secs(90));
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let config = parse(MINIMAL).unwrap();
    // From the (fake) hostname: first label, so a FQDN works.
    assert_eq!(config.node_id.as_str(), "web-3");
    assert_eq!(config.key_dir, PathBuf::from("/var/lib/flynode/keys"));
    assert_eq!(
        config.control_socket,
        PathBuf::from("/run/flynode/control.sock")
    );
    assert_eq!(config.wireguard.listen_port, 51820);
    assert_eq!(config.wireguard.tun_queue_len, 4096);
    assert_eq!(
        config.wireguard.data_path(),
        (ThreadPolicy::MESH_TX, ThreadPolicy::MESH_RX)
    );
    assert_eq!(config.xdp.mode, XdpMode::Auto);
    assert_eq!(config.xdp.backend, crate::ingress::BackendChoice::Auto);
    assert_eq!(
        config.source,
        SourceConfig::File {
            path: PathBuf::from("/etc/flynode/routing.toml")
        }
    );
    assert_eq!(
        config.metrics.listen,
        "127.0.0.1:9477".parse::<SocketAddr>().unwrap()
    );
    assert!(config.metrics.enabled);
    assert_eq!(config.flows.edge_max, 1_048_576);
    assert_eq!(config.flows.worker_max, 1_048_576);
    assert_eq!(config.flows.idle_timeout, Duration::from_secs(120));
}

#[test]
fn etcd_prefix_defaults_and_file_source_parses() {
    let etcd = parse(&format!(
        "{MINIMAL}[source.etcd]\nendpoints = [\"http://e:2379\"]\n"
    ))
    .unwrap();
    assert_eq!(
        etcd.source,
        SourceConfig::Etcd {
            endpoints: vec!["http://e:2379".into()],
            prefix: "/flynode/".into(),
            lease_ttl: std::time::Duration::from_secs(10),
        }
    );
    let file = parse(&format!("{MINIMAL}[source]\nfile = \"/srv/r.toml\"\n")).unwrap();
    assert_eq!(
        file.source,
        SourceConfig::File {
            path: "/srv/r.toml".into()
        }
    );
}

#[test]
fn xdp_mode_displays_lowercase() {
    assert_eq!(XdpMode::Auto.to_string(), "auto");
    assert_eq!(XdpMode::Native.to_string(), "native");
    assert_eq!(XdpMode::Generic.to_string(), "generic");
}

#[test]
fn unknown_top_level_field_is_located_and_lists_valid_fields() {
    assert_eq!(
        err(&format!("colour = \"red\"\n{MINIMAL}")),
        "/etc/flynode/flynode.toml:1:1: unknown field `colour` at top level, expected one of \
         `node_id`, `region`, `mesh_address`, `key_dir`, `control_socket`, `wireguard`, `xdp`, \
         `source`, `metrics`, `flows`"
    );
}

#[test]
fn unknown_nested_field_names_its_table() {
    assert_eq!(
        err(&format!("{MINIMAL}speed = 10\n")),
        "/etc/flynode/flynode.toml:6:1: xdp: unknown field `speed`, expected one of `interface`, `mode`, `backend`, `anycast_prefixes`"
    );
    assert_eq!(
        err(&format!(
            "{MINIMAL}[source.etcd]\nendpoints = [\"http://e:1\"]\nuser = \"x\"\n"
        )),
        "/etc/flynode/flynode.toml:8:1: source.etcd: unknown field `user`, expected one of `endpoints`, `prefix`, `lease_ttl`"
    );
}

#[test]
fn wrong_type_names_field_and_expectation() {
    assert_eq!(
        err(&format!("{MINIMAL}\n[flows]\nedge_max = \"lots\"\n")),
        "/etc/flynode/flynode.toml:8:12: flows.edge_max: invalid type: string \"lots\", expected a count (an integer >= 1)"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[flows]\nidle_timeout = 120\n")),
        "/etc/flynode/flynode.toml:7:16: flows.idle_timeout: invalid type: integer `120`, expected a duration such as \"2m\" or \"90s\""
    );
}

#[test]
fn bad_enum_variant_lists_variants() {
    assert_eq!(
        err(&format!("{MINIMAL}mode = \"fast\"\n")),
        "/etc/flynode/flynode.toml:6:8: xdp.mode: unknown variant `fast`, expected one of `auto`, `native`, `generic`"
    );
}

#[test]
fn non_ula_mesh_address_is_rejected_at_the_value() {
    let text = MINIMAL.replace("fd00:f1::1", "2001:db8::1");
    assert_eq!(
        err(&text),
        "/etc/flynode/flynode.toml:2:16: mesh_address: must be an IPv6 unique local address \
         (fc00::/7, e.g. fd00:f1::1), got 2001:db8::1"
    );
    let text = MINIMAL.replace("fd00:f1::1", "10.0.0.1");
    assert_eq!(
        err(&text),
        "/etc/flynode/flynode.toml:2:16: mesh_address: must be an IPv6 unique local address \
         (fc00::/7, e.g. fd00:f1::1), got IPv4 address 10.0.0.1"
    );
}

#[test]
fn missing_required_field_points_at_its_table() {
    let text = "region = \"ams\"\nmesh_address = \"fd00::1\"\n\n[xdp]\nmode = \"auto\"\n";
    assert_eq!(
        err(text),
        "/etc/flynode/flynode.toml:4:1: xdp.interface: missing field"
    );
    assert_eq!(
        err("mesh_address = \"fd00::1\"\n[xdp]\ninterface = \"eth0\"\n"),
        "/etc/flynode/flynode.toml:1:1: region: missing field"
    );
    assert_eq!(
        err("region = \"ams\"\nmesh_address = \"fd00::1\"\n"),
        "/etc/flynode/flynode.toml:1:1: xdp: missing field"
    );
}

#[test]
fn toml_syntax_error_is_located() {
    assert_eq!(
        err(&format!("{MINIMAL}mode = \"auto\n")),
        "/etc/flynode/flynode.toml:6:13: TOML syntax error: invalid basic string"
    );
    assert_eq!(
        err("region = = 1\n"),
        "/etc/flynode/flynode.toml:1:10: TOML syntax error: invalid string; expected `\"`, `'`"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[xdp]\n")),
        "/etc/flynode/flynode.toml:6:1: TOML syntax error: invalid table header; duplicate key `xdp` in document root"
    );
}

#[test]
fn out_of_range_port_is_rejected() {
    assert_eq!(
        err(&format!("{MINIMAL}[wireguard]\nlisten_port = 70000\n")),
        "/etc/flynode/flynode.toml:7:15: wireguard.listen_port: invalid value: integer `70000`, expected a port number (1..=65535)"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[wireguard]\nlisten_port = 0\n")),
        "/etc/flynode/flynode.toml:7:15: wireguard.listen_port: invalid value: integer `0`, expected a port number (1..=65535)"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[metrics]\nlisten = \"127.0.0.1:0\"\n")),
        "/etc/flynode/flynode.toml:7:10: metrics.listen: port 0 is not allowed in 127.0.0.1:0"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[wireguard]\ntun_queue_len = 0\n")),
        "/etc/flynode/flynode.toml:7:17: wireguard.tun_queue_len: invalid value: integer `0`, expected a queue length in packets (16..=1000000)"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[wireguard]\ntx_nice = -21\n")),
        "/etc/flynode/flynode.toml:7:11: wireguard.tx_nice: invalid value: integer `-21`, expected a nice value (-20..=19)"
    );
    assert!(
        err(&format!(
            "{MINIMAL}[wireguard]\ndata_path_sched = \"fifo\"\n"
        ))
        .contains("unknown variant `fifo`, expected `batch` or `normal`")
    );
}

#[test]
fn counts_and_durations_must_be_positive() {
    assert_eq!(
        err(&format!("{MINIMAL}[flows]\nworker_max = 0\n")),
        "/etc/flynode/flynode.toml:7:14: flows.worker_max: invalid value: integer `0`, expected a count (an integer >= 1)"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[flows]\nidle_timeout = \"0s\"\n")),
        "/etc/flynode/flynode.toml:7:16: flows.idle_timeout: must be longer than zero"
    );
    assert_eq!(
        err(&format!(
            "{MINIMAL}[flows]\nidle_timeout = \"2 fortnights\"\n"
        )),
        "/etc/flynode/flynode.toml:7:16: flows.idle_timeout: invalid duration `2 fortnights`: \
         unknown time unit \"fortnights\", supported units: ns, us/µs, ms, sec, min, hours, days, \
         weeks, months, years (and few variations) (write e.g. \"2m\" or \"90s\")"
    );
}

#[test]
fn names_and_interface_are_checked() {
    assert_eq!(
        err(&format!("node_id = \"AMS_1\"\n{MINIMAL}")),
        "/etc/flynode/flynode.toml:1:11: node_id: invalid node id `AMS_1`: use 1 to 63 lowercase \
         letters, digits and '-', starting with a letter or digit"
    );
    assert_eq!(
        err(&MINIMAL.replace("\"ams\"", "\"-ams\"")),
        "/etc/flynode/flynode.toml:1:10: region: invalid region `-ams`: use 1 to 63 lowercase \
         letters, digits and '-', starting with a letter or digit"
    );
    assert_eq!(
        err(&MINIMAL.replace("eth0", "a-very-long-ifname0")),
        "/etc/flynode/flynode.toml:5:13: xdp.interface: invalid interface name \
         `a-very-long-ifname0`: 1 to 15 bytes, no '/', ':' or whitespace"
    );
    let long = "a".repeat(64);
    assert!(err(&format!("node_id = \"{long}\"\n{MINIMAL}")).contains("invalid node id"));
    assert!(parse(&format!("node_id = \"{}\"\n{MINIMAL}", &long[1..])).is_ok());
}

#[test]
fn paths_must_be_absolute() {
    assert_eq!(
        err(&format!("key_dir = \"keys\"\n{MINIMAL}")),
        "/etc/flynode/flynode.toml:1:11: key_dir: must be an absolute path, got `keys`"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[source]\nfile = \"routing.toml\"\n")),
        "/etc/flynode/flynode.toml:7:8: source.file: must be an absolute path, got `routing.toml`"
    );
}

#[test]
fn source_must_be_file_or_etcd_with_valid_settings() {
    assert_eq!(
        err(&format!(
            "{MINIMAL}[source]\nfile = \"/r.toml\"\n[source.etcd]\nendpoints = [\"http://e:1\"]\n"
        )),
        "/etc/flynode/flynode.toml:6:1: source: set either `file` or [source.etcd], not both"
    );
    assert_eq!(
        err(&format!("{MINIMAL}[source.etcd]\nendpoints = []\n")),
        "/etc/flynode/flynode.toml:7:13: source.etcd.endpoints: must list at least one etcd endpoint"
    );
    assert_eq!(
        err(&format!(
            "{MINIMAL}[source.etcd]\nendpoints = [\"http://e:1\", \"e:2379\"]\n"
        )),
        "/etc/flynode/flynode.toml:7:28: source.etcd.endpoints[1]: expected an etcd endpoint \
         http://host:port or https://host:port, got `e:2379`"
    );
    assert_eq!(
        err(&format!(
            "{MINIMAL}[source.etcd]\nendpoints = [\"http://e:1\"]\nprefix = \"fly\"\n"
        )),
        "/etc/flynode/flynode.toml:8:10: source.etcd.prefix: must start with '/', got `fly`"
    );
}

#[test]
fn node_id_falls_back_to_a_usable_hostname_only() {
    let origin = Path::new(ORIGIN);
    let bad = Config::parse_with_hostname(MINIMAL, origin, || Ok("Web_3".into())).unwrap_err();
    assert_eq!(
        bad.to_string(),
        "/etc/flynode/flynode.toml: node_id: not set, and the hostname cannot be used instead \
         (invalid node id `web_3`: use 1 to 63 lowercase letters, digits and '-', starting with \
         a letter or digit); set node_id"
    );
    let unreadable = Config::parse_with_hostname(MINIMAL, origin, || {
        Err(io::Error::new(io::ErrorKind::NotFound, "no /proc"))
    })
    .unwrap_err();
    assert!(
        matches!(unreadable, ConfigError::NoNodeId { .. }),
        "{unreadable}"
    );
    // An explicit node_id never consults the hostname.
    let explicit =
        Config::parse_with_hostname(&format!("node_id = \"x\"\n{MINIMAL}"), origin, || {
            panic!("hostname read although node_id is set")
        });
    assert_eq!(explicit.unwrap().node_id.as_str(), "x");
}

#[test]
fn load_reads_the_file_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flynode.toml");
    std::fs::write(&path, FULL).unwrap();
    assert_eq!(Config::load(&path).unwrap().node_id.as_str(), "ams-1");

    let missing = dir.path().join("nope.toml");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "{}: cannot read config file: No such file or directory (os error 2)",
            missing.display()
        )
    );

    std::fs::write(&path, b"region = \"\xff\"\n").unwrap();
    assert_eq!(
        Config::load(&path).unwrap_err().to_string(),
        format!("{}:1:11: file is not valid UTF-8", path.display())
    );
}

/// Deterministic xorshift, so a failure reproduces.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Damage at every position (a few substitutions from bytes that matter to TOML, a
/// deletion, some truncations) plus random multi-byte damage. Deterministic, so a failure
/// reproduces; sized to keep debug-build test time down.
pub(crate) fn mutations(valid: &str, seed: u64) -> Vec<Vec<u8>> {
    const BYTES: &[u8] = b"\"'[]={},.\n #\\0-9aZ\x00\xff";
    let base = valid.as_bytes();
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for i in 0..base.len() {
        for _ in 0..3 {
            let mut m = base.to_vec();
            m[i] = BYTES[rng.below(BYTES.len())];
            out.push(m);
        }
        let mut deleted = base.to_vec();
        deleted.remove(i);
        out.push(deleted);
        if i % 5 == 0 {
            out.push(base[..i].to_vec());
        }
    }
    for _ in 0..800 {
        let mut m = base.to_vec();
        for _ in 0..1 + rng.below(6) {
            if m.is_empty() {
                break;
            }
            let at = rng.below(m.len());
            match rng.below(3) {
                0 => m[at] = BYTES[rng.below(BYTES.len())],
                1 => {
                    m.remove(at);
                }
                _ => {
                    let from = rng.below(base.len());
                    let len = rng.below(20).min(base.len() - from);
                    m.splice(at..at, base[from..from + len].iter().copied());
                }
            }
        }
        out.push(m);
    }
    out
}

#[test]
fn garbled_config_never_panics_and_errors_stay_one_line() {
    let origin = Path::new(ORIGIN);
    for bytes in mutations(FULL, 0x5eed_f1f1) {
        let result = match toml_error::utf8(&bytes, origin) {
            Ok(text) => parse(text),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            let line = e.to_string();
            assert!(!line.contains('\n'), "multi-line error: {line}");
            if let ConfigError::Invalid(e) = &e {
                assert!(e.location.is_some(), "unlocated error: {line}");
            }
        }
    }
}

#[test]
fn metrics_can_be_turned_off_and_reject_unknown_fields() {
    let config = parse(&format!("{MINIMAL}[metrics]\nenabled = false\n")).unwrap();
    assert!(!config.metrics.enabled);
    assert_eq!(config.metrics.listen, MetricsConfig::default().listen);
    assert_eq!(
        err(&format!("{MINIMAL}[metrics]\nenable = false\n")),
        "/etc/flynode/flynode.toml:7:1: metrics: unknown field `enable`, expected one of `enabled`, `listen`, `max_peer_series`"
    );
}
