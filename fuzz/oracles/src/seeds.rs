//! The seed corpus: a few dozen inputs per target that reach each entry point's main
//! paths (the unit tests' packets and files, and their near misses), so that fuzzing
//! starts from valid inputs rather than from random bytes. Written into
//! `fuzz/corpus/<target>/seed-<name>` by `cargo run -p flynode-fuzz-oracles --bin
//! fuzz-seeds`; `fuzz/run.sh` adds what fuzzing finds beside them.
use std::net::SocketAddr;

use flynode::forward::engine::TLV_REPLY;
use flynode::forward::{packet, proxy};

use crate::etcd_view::encode as etcd_records;
use crate::tun_udp_gro::Datagram;

/// `(target, name, input)` for every seed.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, list: Vec<(String, Vec<u8>)>| {
        out.extend(list.into_iter().map(|(n, b)| (target, n, b)));
    };
    add("ingress_frame", ingress_frame());
    add("proxy_v2", proxy_v2());
    add("worker_packet", worker_packet());
    add("tun_recv", tun_recv());
    add("tun_udp_gro", tun_udp_gro());
    add("wireguard_shape", wireguard_shape());
    add("routing_map", texts(ROUTING));
    add("node_config", texts(CONFIGS));
    add("etcd_view", etcd_view());
    out
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("a seed address")
}

fn udp_packet(src: &str, dst: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let len = packet::write_udp(&mut buf, sa(src), sa(dst), parts).expect("a seed packet");
    buf.truncate(len);
    buf
}

fn eth(ethertype: u16, vlan: bool, ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0, 5]);
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

fn named(list: Vec<(&str, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    list.into_iter().map(|(n, b)| (n.to_owned(), b)).collect()
}

fn ingress_frame() -> Vec<(String, Vec<u8>)> {
    let v4 = udp_packet("198.18.0.2:40000", "198.18.100.1:53", &[b"hello"]);
    let v6 = udp_packet("[2001:db8::2]:1", "[2001:db8:100::1]:443", &[b"quic"]);
    let mut options = v4.clone();
    options[0] = 0x46;
    options.splice(20..20, [1, 1, 1, 0]);
    let total = options.len() as u16;
    options[2..4].copy_from_slice(&total.to_be_bytes());
    let mut padded = eth(0x0800, true, &options);
    padded.extend_from_slice(&[0; 10]);
    let mut fragment = v4.clone();
    fragment[6] = 0x20;
    // IPv6 hop-by-hop (8 bytes) then destination options (16 bytes) before UDP.
    let mut ext = v6.clone();
    ext[6] = 0;
    let mut headers = vec![60, 0, 0, 0, 0, 0, 0, 0, 17, 1];
    headers.extend_from_slice(&[0; 14]);
    ext.splice(40..40, headers);
    let plen = (ext.len() - 40) as u16;
    ext[4..6].copy_from_slice(&plen.to_be_bytes());
    let wg = udp_packet(
        "198.18.0.2:51820",
        "198.18.0.1:51820",
        &[&[4, 0, 0, 0], &[0; 28]],
    );
    named(vec![
        ("ipv4", eth(0x0800, false, &v4)),
        ("ipv4-options-vlan-padding", padded),
        ("ipv6", eth(0x86dd, false, &v6)),
        ("ipv6-extension-headers", eth(0x86dd, false, &ext)),
        ("ipv4-fragment", eth(0x0800, false, &fragment)),
        ("ipv4-truncated", eth(0x0800, false, &v4[..v4.len() - 1])),
        ("arp", eth(0x0806, false, &[0; 28])),
        ("wireguard-keepalive", eth(0x0800, false, &wg)),
    ])
}

fn proxy_header(src: &str, dst: &str, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; 512];
    let n = proxy::encode_udp(sa(src), sa(dst), tlvs, &mut out).expect("a seed header");
    out.truncate(n);
    out
}

fn proxy_v2() -> Vec<(String, Vec<u8>)> {
    let v4 = proxy_header("198.18.0.2:40000", "198.18.100.1:53", &[]);
    let v6 = proxy_header("[2001:db8::2]:40000", "[2001:db8:100::1]:53", &[]);
    let crc = proxy_header(
        "198.18.0.2:40000",
        "198.18.100.1:53",
        &[
            (proxy::TLV_CRC32C, &[0; 4]),
            (proxy::TLV_AUTHORITY, b"example.com"),
            (proxy::TLV_NOOP, b""),
        ],
    );
    let reply = proxy_header(
        "[2001:db8:100::1]:53",
        "[2001:db8::2]:1",
        &[(TLV_REPLY, b"R")],
    );
    let mut local = vec![0u8; 16];
    proxy::encode_local(&mut local).expect("LOCAL");
    let mut with_payload = v4.clone();
    with_payload.extend_from_slice(b"payload");
    let mut stream = v4.clone();
    stream[13] = 0x11;
    let mut unspec = proxy::SIGNATURE.to_vec();
    unspec.extend_from_slice(&[0x21, 0x00, 0, 4, 1, 2, 3, 4]);
    let mut unix = proxy::SIGNATURE.to_vec();
    unix.extend_from_slice(&[0x21, 0x32, 0, 216]);
    unix.extend_from_slice(&[0; 216]);
    let mut bad_crc = crc.clone();
    let at = bad_crc.len() - 1;
    bad_crc[at - 17] ^= 1;
    // Encode side: [family][src][dst][ports, buffer][TLVs].
    let mut to_send = vec![1u8];
    to_send.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    to_send.extend_from_slice(&[0xfd, 0, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    to_send.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 128]);
    to_send.extend_from_slice(&[3, 4, 0, 0, 0, 0, 0xe0, 1, b'R']);
    named(vec![
        ("inet-dgram", v4),
        ("inet6-dgram", v6.clone()),
        ("inet-crc32c-tlvs", crc),
        ("inet-bad-crc32c", bad_crc),
        ("inet6-reply-tlv", reply),
        ("local", local),
        ("inet-with-payload", with_payload),
        ("inet-stream", stream),
        ("proxy-unspec", unspec),
        ("proxy-unix", unix),
        ("inet6-truncated", v6[..30].to_vec()),
        (
            "v1-text",
            b"PROXY TCP4 198.18.0.2 198.18.100.1 40000 53\r\n".to_vec(),
        ),
        ("encode-inet6-crc-and-custom", to_send),
    ])
}

fn worker_packet() -> Vec<(String, Vec<u8>)> {
    let (edge, worker) = ("[fd00:f1::1]:51821", "[fd00:f1::2]:51821");
    let h4 = proxy_header("198.18.0.2:40000", "198.18.100.1:53", &[]);
    let h6 = proxy_header("[2001:db8::2]:40000", "[2001:db8:100::1]:53", &[]);
    let reply = proxy_header("198.18.100.1:53", "198.18.0.2:40000", &[(TLV_REPLY, b"R")]);
    let big = vec![0x5a; 1400];
    named(vec![
        (
            "mesh-ipv4-client",
            udp_packet(edge, worker, &[&h4, b"query"]),
        ),
        ("mesh-ipv6-client", udp_packet(edge, worker, &[&h6, &big])),
        ("mesh-reply", udp_packet(worker, edge, &[&reply, b"answer"])),
        (
            "mesh-no-proxy-header",
            udp_packet(edge, worker, &[b"plain"]),
        ),
        (
            "client-ipv4",
            udp_packet("198.18.0.2:40000", "198.18.100.1:53", &[b"q"]),
        ),
        (
            "client-ipv6-large",
            udp_packet("[2001:db8::2]:1", "[2001:db8:100::1]:53", &[&big]),
        ),
        (
            "container-reply-ipv4",
            udp_packet("10.0.0.2:53", "198.18.0.2:40000", &[b"a"]),
        ),
        (
            "client-ipv4-empty",
            udp_packet("198.18.0.2:40000", "198.18.100.1:53", &[]),
        ),
    ])
}

/// A virtio-net header (native byte order, as the device writes it) and a packet.
fn virtio(
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    pkt: &[u8],
) -> Vec<u8> {
    let mut v = vec![flags, gso_type];
    for f in [0u16, gso_size, csum_start, csum_offset] {
        v.extend_from_slice(&f.to_ne_bytes());
    }
    v.extend_from_slice(pkt);
    v
}

/// A TCP segment with a valid checksum (`flags`: TCP flags).
fn tcp_packet(v6: bool, payload: &[u8], flags: u8) -> Vec<u8> {
    let (src, dst) = if v6 {
        (sa("[fd00::1]:4000"), sa("[fd00:1::2]:80"))
    } else {
        (sa("198.18.0.1:4000"), sa("198.19.1.2:80"))
    };
    // Built as UDP of the right size, then turned into TCP: header and checksum redone.
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut p = udp_packet(
        &src.to_string(),
        &dst.to_string(),
        &[&vec![0; tcp.len() - 8]],
    );
    let ip = if v6 { 40 } else { 20 };
    p.truncate(ip);
    p.extend_from_slice(&tcp);
    if v6 {
        p[6] = crate::checksum::PROTO_TCP;
    } else {
        p[9] = crate::checksum::PROTO_TCP;
        p[10..12].fill(0);
        let hc = !crate::checksum::ones_sum(&p[..20], 0);
        p[10..12].copy_from_slice(&hc.to_be_bytes());
    }
    let sum =
        crate::checksum::pseudo_header(src.ip(), dst.ip(), crate::checksum::PROTO_TCP, tcp.len());
    let check = !crate::checksum::ones_sum(&p[ip..], sum);
    p[ip + 16..ip + 18].copy_from_slice(&check.to_be_bytes());
    p
}

fn tun_recv() -> Vec<(String, Vec<u8>)> {
    let v4 = udp_packet("198.18.0.1:5000", "198.19.1.2:7777", &[&[7; 3000]]);
    let v6 = udp_packet("[fd00::1]:5000", "[fd00:1::2]:7777", &[&[6; 3000]]);
    let small = udp_packet("198.18.0.1:5000", "198.19.1.2:7777", &[b"ping"]);
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
    let mut partial = small.clone();
    let seed = crate::checksum::ones_sum(
        &[],
        crate::checksum::pseudo_header(
            sa("198.18.0.1:1").ip(),
            sa("198.19.1.2:1").ip(),
            17,
            partial.len() - 20,
        ),
    );
    partial[26..28].copy_from_slice(&seed.to_be_bytes());
    let tcp4 = tcp_packet(false, &[3; 2900], 0x18);
    let tcp6 = tcp_packet(true, &[4; 2900], 0x19);
    let with = |select: u8, raw: Vec<u8>| -> Vec<u8> {
        let mut v = vec![select];
        v.extend_from_slice(&raw);
        v
    };
    named(vec![
        ("plain", with(0, virtio(0, 0, 0, 0, 0, &small))),
        (
            "plain-needs-csum",
            with(0, virtio(1, 0, 0, 20, 6, &partial)),
        ),
        ("plain-batch-full", with(64, virtio(0, 0, 0, 0, 0, &small))),
        (
            "gso-udp4-3-segments",
            with(0x80, virtio(1, 5, 1200, 20, 6, &v4)),
        ),
        (
            "gso-udp6-3-segments",
            with(0x80, virtio(1, 5, 1200, 40, 6, &v6)),
        ),
        (
            "gso-udp4-into-small-slots",
            with(0, virtio(1, 5, 1000, 20, 6, &v4)),
        ),
        ("gso-udp4-pending", with(62, virtio(1, 5, 1000, 20, 6, &v4))),
        ("gso-tcp4", with(0x80, virtio(1, 1, 1000, 20, 16, &tcp4))),
        (
            "gso-tcp6-psh-fin",
            with(0x80, virtio(1, 4, 1000, 40, 16, &tcp6)),
        ),
        (
            "gso-tcp4-ecn",
            with(0x80, virtio(1, 0x81, 1000, 20, 16, &tcp4)),
        ),
        (
            "gso-udp-ecn-refused",
            with(0x80, virtio(1, 0x85, 1000, 20, 6, &v4)),
        ),
    ])
}

fn gro_input(list: &[Datagram]) -> Vec<u8> {
    list.iter().flat_map(|d| d.write()).collect()
}

fn dg(v6: bool, flow: u8, variant: u8, ttl: u8, tos: u8, len: u16) -> Datagram {
    Datagram {
        v6,
        flow,
        variant,
        ttl,
        tos,
        len,
    }
}

/// The reproducer of issue 29's reordering, committed under `fuzz/artifacts/`.
pub fn issue_29_reorder() -> Vec<u8> {
    gro_input(&[
        dg(false, 0, 0, 64, 0, 1200),
        dg(false, 0, 0, 63, 0, 1200),
        dg(false, 0, 0, 64, 0, 1000),
    ])
}

fn tun_udp_gro() -> Vec<(String, Vec<u8>)> {
    let interleaved: Vec<Datagram> = (0..30)
        .map(|i| dg(false, i % 2, 0, 64, 0, if i == 28 { 300 } else { 1200 }))
        .collect();
    let long_v6: Vec<Datagram> = (0..150).map(|_| dg(true, 0, 0, 64, 0, 100)).collect();
    let limit_v6: Vec<Datagram> = (0..50).map(|_| dg(true, 1, 0, 64, 0, 1400)).collect();
    let ecn: Vec<Datagram> = [0u8, 0, 1, 1, 0, 2, 0]
        .iter()
        .map(|&tos| dg(false, 3, 0, 64, tos, 1200))
        .collect();
    let mut mixed = vec![dg(false, 2, 0, 64, 0, 500); 5];
    mixed.push(dg(false, 2, 0, 64, 0, 600));
    mixed.push(dg(false, 2, 5, 64, 0, 600)); // a fragment
    mixed.extend([dg(false, 2, 0, 64, 0, 600); 3]);
    mixed.push(dg(false, 2, 6, 64, 0, 600)); // options
    mixed.push(dg(false, 2, 0, 64, 0, 0));
    mixed.push(dg(false, 2, 7, 64, 0, 600)); // DF
    mixed.push(dg(true, 2, 6, 64, 0, 600)); // flow label
    mixed.push(dg(true, 2, 5, 64, 0, 600)); // bad UDP length
    let hops: Vec<Datagram> = [64u8, 63, 64, 64]
        .iter()
        .map(|&h| dg(true, 7, 0, h, 0, 900))
        .collect();
    let jumbo = vec![
        dg(false, 4, 0, 64, 0, 9000),
        dg(false, 4, 0, 64, 0, 9000),
        dg(false, 4, 0, 64, 0, 2),
    ];
    named(vec![
        ("two-flows-interleaved", gro_input(&interleaved)),
        ("ipv6-more-than-64-segments", gro_input(&long_v6)),
        ("ipv6-64k-limit", gro_input(&limit_v6)),
        ("ecn-marks-within-a-flow", gro_input(&ecn)),
        ("what-cannot-coalesce", gro_input(&mixed)),
        ("hop-limit-change", gro_input(&hops)),
        ("jumbo", gro_input(&jumbo)),
        ("ttl-change", issue_29_reorder()),
    ])
}

fn wireguard_shape() -> Vec<(String, Vec<u8>)> {
    let msg = |kind: u8, len: usize| -> Vec<u8> {
        let mut m = vec![0x42u8; len];
        if let Some(h) = m.get_mut(..4) {
            h.copy_from_slice(&[kind, 0, 0, 0][..4]);
        }
        m
    };
    let mut reserved = msg(1, 148);
    reserved[2] = 1;
    named(vec![
        ("initiation", msg(1, 148)),
        ("initiation-149", msg(1, 149)),
        ("response", msg(2, 92)),
        ("cookie-reply", msg(3, 64)),
        ("keepalive", msg(4, 32)),
        ("data-31", msg(4, 31)),
        ("data-unpadded", msg(4, 136)),
        ("reserved-byte-set", reserved),
        ("type-5", msg(5, 32)),
        ("three-bytes", vec![4, 0, 0]),
        ("empty", Vec::new()),
    ])
}

fn texts(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    list.iter()
        .map(|(n, t)| ((*n).to_owned(), t.as_bytes().to_vec()))
        .collect()
}

const NODE_AMS: &str = r#"id = "ams-1"
region = "ams"
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.1:51820"
mesh_address = "fd00:f1::1"
mesh_ipv4 = "10.99.0.1"
"#;

const NODE_FRA: &str = r#"id = "fra-1"
region = "fra"
public_key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="
endpoint = "[2001:db8::2]:51820"
mesh_address = "fd00:f1::2"
"#;

const SERVICE_DNS: &str = r#"id = 1
name = "dns"
anycast = ["198.18.100.1", "2001:db8:100::1"]
ports = [53, 5353]
proxy_protocol = true
[[worker]]
node = "ams-1"
target = ["198.18.200.2:53", "[fd00:c::2]:53"]
[[worker]]
node = "fra-1"
target = ["198.18.200.3:53", "[fd00:c::3]:53"]
weight = 3
[[worker]]
node = "down-1"
target = ["198.18.200.4:53", "[fd00:c::4]:53"]
"#;

const SERVICE_NTP: &str = r#"id = 2
name = "ntp"
anycast = ["198.18.100.2"]
ports = [123]
[[worker]]
node = "fra-1"
target = "198.18.200.3:123"
"#;

const ROUTING: &[(&str, &str)] = &[
    (
        "two-nodes-dual-stack",
        r#"[[node]]
id = "ams-1"
region = "ams"
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.1:51820"
mesh_address = "fd00:f1::1"
mesh_ipv4 = "10.99.0.1"

[[node]]
id = "fra-1"
region = "fra"
public_key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="
endpoint = "[2001:db8::2]:51820"
mesh_address = "fd00:f1::2"

[[service]]
id = 1
name = "dns"
anycast = ["198.18.100.1", "2001:db8:100::1"]
ports = [53]
proxy_protocol = false
  [[service.worker]]
  node = "ams-1"
  target = ["198.18.200.2:53", "[fd00:c::2]:53"]
  [[service.worker]]
  node = "fra-1"
  target = ["198.18.200.3:53", "[fd00:c::3]:53"]
  weight = 3

[[service]]
id = 7
name = "quic_edge"
anycast = ["198.18.100.2"]
ports = [443, 8443]
  [[service.worker]]
  node = "fra-1"
  target = "198.18.200.3:443"
"#,
    ),
    ("empty", ""),
    (
        "duplicate-mesh-address",
        r#"[[node]]
id = "a"
region = "r"
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.1:51820"
mesh_address = "fd00::1"
[[node]]
id = "b"
region = "r"
public_key = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="
endpoint = "198.18.0.2:51820"
mesh_address = "fd00::1"
"#,
    ),
    (
        "worker-missing-ipv6-target",
        r#"[[node]]
id = "a"
region = "r"
public_key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
endpoint = "198.18.0.1:51820"
mesh_address = "fd00::1"
[[service]]
id = 1
name = "dns"
anycast = ["2001:db8:100::1", "198.18.100.1"]
ports = [53]
[[service.worker]]
node = "a"
target = "198.18.200.3:53"
"#,
    ),
    (
        "bad-values",
        r#"[[service]]
id = 0
name = "Bad Name"
anycast = ["::ffff:198.18.0.1", "224.0.0.1"]
ports = [0, 53, 53]
unknown = true
"#,
    ),
    ("syntax-error", "[[node]\nid = \"a\"\n"),
];

const CONFIGS: &[(&str, &str)] = &[
    (
        "minimal",
        r#"node_id = "ams-1"
region = "ams"
mesh_address = "fd00::1"
[xdp]
interface = "eth0"
"#,
    ),
    (
        "everything-etcd",
        r#"node_id = "ams-1"
region = "ams"
mesh_address = "fd00:f1::1"
key_dir = "/var/lib/flynode/keys"
control_socket = "/run/flynode/control.sock"

[wireguard]
listen_port = 51820
interface = "flynode0"
mesh_ipv4 = "10.99.0.1"
mtu = 1420
tun_queue_len = 4096
data_path_sched = "normal"
tx_nice = -5
key_grace = "10m"
persistent_keepalive = "25s"
forward_port = 51821
endpoint = "[2001:db8::1]:51820"

[xdp]
interface = "eth0"
mode = "native"
backend = "af_xdp"
anycast_prefixes = ["198.18.100.0/24", "2001:db8:100::/48"]

[source.etcd]
endpoints = ["http://127.0.0.1:2379", "https://[::1]:2379"]
prefix = "/flynode-staging"
lease_ttl = "15s"

[metrics]
enabled = false
listen = "[::1]:9477"
max_peer_series = 0

[flows]
edge_max = 1000
worker_max = 2000
idle_timeout = "1m 30s 5ms"
reply_capture = "rules"
container_prefixes = ["198.19.0.0/16", "fd00:c::/48"]
"#,
    ),
    (
        "file-source",
        r#"node_id = "fra-1"
region = "fra"
mesh_address = "fd00::2"
[xdp]
interface = "eth1"
mode = "generic"
backend = "socket"
[source]
file = "/etc/flynode/routing.toml"
"#,
    ),
    (
        "no-node-id",
        r#"region = "unset"
mesh_address = "fd00::1"
[xdp]
interface = "eth0"
"#,
    ),
    (
        "bad-values",
        r#"node_id = "ams-1"
region = "ams"
mesh_address = "2001:db8::1"
key_dir = "relative"
[wireguard]
mtu = 100
interface = "a/b"
[xdp]
interface = "eth0"
[source]
file = "/x"
[source.etcd]
endpoints = []
"#,
    ),
];

fn etcd_view() -> Vec<(String, Vec<u8>)> {
    let view = etcd_records(&[
        (0, "ams-1", NODE_AMS, 1),
        (0, "fra-1", NODE_FRA, 2),
        (1, "dns", SERVICE_DNS, 3),
        (1, "ntp", SERVICE_NTP, 4),
    ]);
    let conflicts = etcd_records(&[
        (0, "ams-1", NODE_AMS, 2),
        (0, "ams-2", &NODE_AMS.replace("ams-1", "ams-2"), 1),
        (1, "dns", SERVICE_DNS, 3),
        (1, "dns2", &SERVICE_DNS.replace("\"dns\"", "\"dns2\""), 1),
        (2, "other/key", "x = 1", 5),
        (0, "wrong-name", NODE_FRA, 6),
    ]);
    named(vec![
        ("nodes-and-services", view),
        ("conflicts-older-wins", conflicts),
        (
            "one-service-no-nodes",
            etcd_records(&[(1, "ntp", SERVICE_NTP, 1)]),
        ),
    ])
}
