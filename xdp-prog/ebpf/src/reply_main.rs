//! flynode's reply-capture program: tc ingress on the interfaces behind which this node's
//! containers live. A UDP datagram from a container's service endpoint (address, source
//! port) is redirected into the mesh TUN, where the forwarding layer matches it to its
//! flow and sends it back through the edge that received the request (or drops and counts
//! it); every other packet goes on untouched.
//!
//! Why not policy rules (`from <container> ipproto udp sport <port> lookup <table>`): any
//! custom rule sends every IPv4 route lookup of the host through the rule list, with a
//! flow dissection for the port match and a full reverse-path source check (the kernel
//! skips both when there are none). On a worker that is every datagram written into the
//! TUN for a container, and the walk grows with the number of containers. Here the
//! lookup is one hash-map probe, and only for packets that come from containers.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod reply;
#[cfg(target_arch = "bpf")]
mod wire;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here, so it never runs.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
