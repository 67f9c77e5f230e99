//! Test harness for flynode's integration tests: frame builders, a raw-frame sender, and
//! a fixture that runs a real `flynode` daemon inside a network namespace.
//!
//! These tests need root (namespaces, veths, XDP). They only ever send inside the
//! namespaces they create, using RFC 2544 (198.18.0.0/15) and documentation prefixes.
pub mod etcd;
pub mod forwarding;
pub mod frames;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod packet;
pub mod xdp;
