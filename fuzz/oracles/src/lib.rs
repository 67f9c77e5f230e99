//! The oracles of flynode's fuzz targets: one function per entry point that takes the
//! fuzzer's bytes, drives flynode's own code with them and panics when a property the
//! code promises does not hold. Not only "does not panic": round trips, agreement with
//! an independent parser (boringtun's for WireGuard), per-flow order after coalescing,
//! valid checksums on every packet we build, and re-validation of everything accepted.
//!
//! Two drivers share these functions:
//! - `fuzz/fuzz_targets/<name>.rs` (cargo-fuzz, nightly, `fuzz/run.sh`): one target per
//!   entry of [`TARGETS`], coverage-guided;
//! - `tests/replay.rs` (stable `cargo test`, so CI): every file under
//!   `fuzz/corpus/<name>/` and `fuzz/artifacts/<name>/` through the oracle `<name>`.
//!
//! Each module opens with its input format and the properties it checks. Inputs that
//! the format cannot use are ignored, never an error: any byte string is a valid input.

mod checksum;
mod etcd_view;
mod ingress_frame;
mod node_config;
mod proxy_v2;
mod render;
mod routing_map;
pub mod seeds;
mod tun_recv;
mod tun_udp_gro;
mod wireguard_shape;
mod worker_packet;

pub use etcd_view::etcd_view;
pub use ingress_frame::ingress_frame;
pub use node_config::node_config;
pub use proxy_v2::proxy_v2;
pub use routing_map::routing_map;
pub use tun_recv::tun_recv;
pub use tun_udp_gro::tun_udp_gro;
pub use wireguard_shape::wireguard_shape;
pub use worker_packet::worker_packet;

/// An oracle: panics when `data` shows a property violated.
pub type Oracle = fn(&[u8]);

/// Every fuzz target by name: the name of its `fuzz_targets/` file and of its corpus
/// and artifacts directories.
pub const TARGETS: &[(&str, Oracle)] = &[
    ("ingress_frame", ingress_frame),
    ("proxy_v2", proxy_v2),
    ("worker_packet", worker_packet),
    ("tun_recv", tun_recv),
    ("tun_udp_gro", tun_udp_gro),
    ("wireguard_shape", wireguard_shape),
    ("routing_map", routing_map),
    ("node_config", node_config),
    ("etcd_view", etcd_view),
];

/// The oracle called `name`.
pub fn oracle(name: &str) -> Option<Oracle> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
