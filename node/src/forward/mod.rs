//! The forwarding layer: edge (service datagram → worker), worker (→ container), replies
//! (container → edge → client), with PROXY protocol v2 between edge and worker. See
//! [`engine`] for the data path.
pub mod capture;
pub mod counters;
pub mod engine;
pub mod flows;
pub mod hash;
pub mod host;
pub mod icmp;
pub mod packet;
pub mod proxy;
pub mod targets;
