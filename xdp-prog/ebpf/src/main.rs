//! flynode's XDP program: classify every frame arriving on the NIC.
//!
//! Ethernet (+ one 802.1Q tag) → IPv4 (with options) / IPv6 → UDP, then up to two lookups
//! in the endpoints table (SERVICE_TABLE, an array-backed hash table; see
//! `flynode_xdp_common::table`): `(destination address, port)` decides "to userspace",
//! and the address alone decides "a service address on a port nothing serves" (drop).
//! Everything else passes to the kernel untouched. Every frame increments exactly one
//! slot of COUNTERS, so the counters add up to the frames seen.
//!
//! The program is small and branch-light on purpose (Katran's balancer_kern is the
//! model): every policy decision is a map lookup, nothing is configured by recompiling.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod program;
#[cfg(target_arch = "bpf")]
mod wire;

// Host builds (`cargo check --workspace`) only need something to link.
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
