//! The operating-system edges of the tunnel: batched UDP and the TUN device.
//!
//! Everything here is on the data path of a WireGuard implementation whose cost is
//! dominated by syscalls per packet, so every edge moves packets in batches and owns
//! reusable buffers (no allocation per packet once a batch has reached its high-water
//! mark):
//!
//! - [`udp`]: the underlay socket. `recvmmsg` with UDP GRO on receive, `sendmmsg` with
//!   UDP GSO on transmit (runs of same-size datagrams to one destination become one
//!   message), with a remembered fallback when the kernel or device refuses GSO.
//! - [`tun`]: the node's mesh interface, through `tun-rs` with the Linux virtio-net
//!   offloads (TSO/USO on read, GRO coalescing on write), switchable off.
//! - [`route`]: per-peer kernel routes into the TUN over rtnetlink, in the main table or
//!   a numbered one.
//! - [`rule`]: on a worker, the source-port policy rules that send container replies
//!   into the TUN through such a table, and the sysctls around them.
//!
//! Threading model: [`udp::UdpSocket`] and [`tun::TunDevice`] are `Sync`; one thread may
//! receive while another sends on the same object. Batches are owned by one thread each.
//!
//! Every `unsafe` block in this module tree carries a `SAFETY:` comment with its argument.

pub mod link;
pub mod route;
pub mod rule;
pub mod tun;
pub mod udp;

mod netlink;
mod sys;

#[cfg(test)]
mod testutil;
