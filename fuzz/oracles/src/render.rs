//! Writes accepted values back as the TOML an operator would write, so that the oracles
//! can check that what flynode accepted is accepted again, as the same value. Written
//! here, field by field, rather than through serializers of the crate under test (where
//! one exists, `fleet::service_record`, it is checked against this).
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use flynode::config::{
    Config, FlowConfig, MetricsConfig, SchedPolicy, SourceConfig, WireguardConfig, XdpConfig,
};
use flynode::forward::host::ReplyCaptureChoice;
use flynode::routing::{Node, RoutingMap, Service, Worker};
use toml::{Table, Value};

fn s(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

fn int(v: impl TryInto<i64>) -> Value {
    Value::Integer(v.try_into().unwrap_or(i64::MAX))
}

fn path(p: &Path) -> Value {
    s(p.display())
}

/// Exact: seconds and nanoseconds, both of which humantime reads back without rounding.
fn duration(d: Duration) -> Value {
    s(format!("{}s {}ns", d.as_secs(), d.subsec_nanos()))
}

fn addrs(list: &[SocketAddr]) -> Value {
    Value::Array(list.iter().map(s).collect())
}

/// A `[[node]]` table, which is also a node's etcd record.
pub fn node(n: &Node) -> Table {
    let mut t = Table::new();
    t.insert("id".into(), s(n.id.as_str()));
    t.insert("region".into(), s(n.region.as_str()));
    t.insert("public_key".into(), s(n.public_key));
    t.insert("endpoint".into(), s(n.endpoint));
    t.insert("mesh_address".into(), s(n.mesh_address));
    if let Some(v4) = n.mesh_ipv4 {
        t.insert("mesh_ipv4".into(), s(v4));
    }
    t
}

/// A `[[service]]` table, which is also a service's etcd record.
pub fn service(sv: &Service) -> Table {
    let mut t = Table::new();
    t.insert("id".into(), int(sv.id.get()));
    t.insert("name".into(), s(sv.name.as_str()));
    t.insert(
        "anycast".into(),
        Value::Array(sv.anycast.iter().map(s).collect()),
    );
    t.insert(
        "ports".into(),
        Value::Array(sv.ports.iter().map(|&p| int(p)).collect()),
    );
    t.insert("proxy_protocol".into(), Value::Boolean(sv.proxy_protocol));
    let workers = sv
        .workers
        .iter()
        .map(|w| {
            let mut wt = Table::new();
            wt.insert("node".into(), s(w.node.as_str()));
            wt.insert("target".into(), addrs(&w.targets));
            wt.insert("weight".into(), int(w.weight));
            Value::Table(wt)
        })
        .collect();
    t.insert("worker".into(), Value::Array(workers));
    t
}

pub fn text(t: &Table) -> String {
    toml::to_string(t).expect("a table of strings, numbers and booleans serializes")
}

/// The whole map as a routing file.
pub fn routing_file(map: &RoutingMap) -> String {
    map_fields_written(map);
    let mut t = Table::new();
    let nodes = map.nodes.values().map(|n| Value::Table(node(n))).collect();
    t.insert("node".into(), Value::Array(nodes));
    t.insert("service".into(), services(map.services.values()));
    text(&t)
}

/// A services file (`flynode services apply`): `[[service]]` entries only.
pub fn services_file<'a>(list: impl Iterator<Item = &'a Service>) -> String {
    let mut t = Table::new();
    t.insert("service".into(), services(list));
    text(&t)
}

fn services<'a>(list: impl Iterator<Item = &'a Service>) -> Value {
    Value::Array(list.map(|sv| Value::Table(service(sv))).collect())
}

/// Names every field of the config's structs, without `..`: a field added to one of
/// them stops this crate from building until it is written out too (otherwise a round
/// trip would compare its default with its default and never look at it).
fn config_fields_written(c: &Config) {
    let Config {
        node_id: _,
        region: _,
        mesh_address: _,
        key_dir: _,
        control_socket: _,
        wireguard,
        xdp,
        source: _,
        metrics,
        flows,
    } = c;
    let WireguardConfig {
        listen_port: _,
        interface: _,
        mesh_ipv4: _,
        mtu: _,
        tun_queue_len: _,
        data_path_sched: _,
        tx_nice: _,
        key_grace: _,
        persistent_keepalive: _,
        forward_port: _,
        endpoint: _,
    } = wireguard;
    let XdpConfig {
        interface: _,
        mode: _,
        backend: _,
        anycast_prefixes: _,
    } = xdp;
    let MetricsConfig {
        enabled: _,
        listen: _,
        max_peer_series: _,
    } = metrics;
    let FlowConfig {
        edge_max: _,
        worker_max: _,
        idle_timeout: _,
        reply_capture: _,
        container_prefixes: _,
    } = flows;
}

/// As [`config_fields_written`], for the routing map's structs.
fn map_fields_written(map: &RoutingMap) {
    for n in map.nodes.values() {
        let Node {
            id: _,
            region: _,
            public_key: _,
            endpoint: _,
            mesh_address: _,
            mesh_ipv4: _,
        } = n;
    }
    for sv in map.services.values() {
        let Service {
            id: _,
            name: _,
            anycast: _,
            ports: _,
            proxy_protocol: _,
            workers,
        } = sv;
        for w in workers {
            let Worker {
                node: _,
                targets: _,
                weight: _,
            } = w;
        }
    }
}

/// The node config, every field written out.
pub fn config(c: &Config) -> String {
    config_fields_written(c);
    let mut t = Table::new();
    t.insert("node_id".into(), s(c.node_id.as_str()));
    t.insert("region".into(), s(c.region.as_str()));
    t.insert("mesh_address".into(), s(c.mesh_address));
    t.insert("key_dir".into(), path(&c.key_dir));
    t.insert("control_socket".into(), path(&c.control_socket));

    let w = &c.wireguard;
    let mut wg = Table::new();
    wg.insert("listen_port".into(), int(w.listen_port));
    wg.insert("interface".into(), s(&w.interface));
    if let Some(v4) = w.mesh_ipv4 {
        wg.insert("mesh_ipv4".into(), s(v4));
    }
    if let Some(mtu) = w.mtu {
        wg.insert("mtu".into(), int(mtu));
    }
    wg.insert("tun_queue_len".into(), int(w.tun_queue_len));
    let sched = match w.data_path_sched {
        SchedPolicy::Batch => "batch",
        SchedPolicy::Normal => "normal",
    };
    wg.insert("data_path_sched".into(), s(sched));
    wg.insert("tx_nice".into(), int(w.tx_nice));
    wg.insert("key_grace".into(), duration(w.key_grace));
    wg.insert(
        "persistent_keepalive".into(),
        duration(w.persistent_keepalive),
    );
    wg.insert("forward_port".into(), int(w.forward_port));
    if let Some(e) = w.endpoint {
        wg.insert("endpoint".into(), s(e));
    }
    t.insert("wireguard".into(), Value::Table(wg));

    let mut xdp = Table::new();
    xdp.insert("interface".into(), s(&c.xdp.interface));
    xdp.insert("mode".into(), s(c.xdp.mode));
    xdp.insert("backend".into(), s(c.xdp.backend));
    if let Some(prefixes) = &c.xdp.anycast_prefixes {
        let list = prefixes.iter().map(s).collect();
        xdp.insert("anycast_prefixes".into(), Value::Array(list));
    }
    t.insert("xdp".into(), Value::Table(xdp));

    let mut source = Table::new();
    match &c.source {
        SourceConfig::File { path: p } => {
            source.insert("file".into(), path(p));
        }
        SourceConfig::Etcd {
            endpoints,
            prefix,
            lease_ttl,
        } => {
            let mut etcd = Table::new();
            etcd.insert(
                "endpoints".into(),
                Value::Array(endpoints.iter().map(s).collect()),
            );
            etcd.insert("prefix".into(), s(prefix));
            etcd.insert("lease_ttl".into(), duration(*lease_ttl));
            source.insert("etcd".into(), Value::Table(etcd));
        }
    }
    t.insert("source".into(), Value::Table(source));

    let mut metrics = Table::new();
    metrics.insert("enabled".into(), Value::Boolean(c.metrics.enabled));
    metrics.insert("listen".into(), s(c.metrics.listen));
    metrics.insert(
        "max_peer_series".into(),
        int(c.metrics.max_peer_series as u64),
    );
    t.insert("metrics".into(), Value::Table(metrics));

    let f = &c.flows;
    let mut flows = Table::new();
    flows.insert("edge_max".into(), int(f.edge_max as u64));
    flows.insert("worker_max".into(), int(f.worker_max as u64));
    flows.insert("idle_timeout".into(), duration(f.idle_timeout));
    let capture = match f.reply_capture {
        ReplyCaptureChoice::Auto => "auto",
        ReplyCaptureChoice::Rules => "rules",
    };
    flows.insert("reply_capture".into(), s(capture));
    if let Some(prefixes) = &f.container_prefixes {
        let list = prefixes.iter().map(s).collect();
        flows.insert("container_prefixes".into(), Value::Array(list));
    }
    t.insert("flows".into(), Value::Table(flows));
    text(&t)
}
