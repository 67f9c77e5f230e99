//! AF_XDP sockets for flynode, and the few `bpf(2)` calls needed to feed them.
//!
//! DESIGN.md ("Why AF_XDP"): XDP on the physical NIC classifies packets and redirects
//! the ones for flynode into an XSKMAP, indexed by RX queue. This crate owns the other
//! end: per RX queue, an [`XskSocket`] with its UMEM, fill ring and RX ring. The ring
//! protocol follows the kernel's `tools/lib/bpf/xsk.c` / libxdp (cached indexes,
//! Acquire/Release on the shared producer and consumer words), written here without a C
//! dependency; [`rawbpf`] loads the small programs tests and benchmarks need.
//!
//! ```no_run
//! use std::os::fd::{AsFd, AsRawFd};
//! use flynode_xsk::{rawbpf, XskConfig, XskSocket};
//!
//! # fn main() -> std::io::Result<()> {
//! let ifindex = rawbpf::ifindex("eth0")?;
//! let xsks = rawbpf::create_xskmap(64)?;
//! let prog = rawbpf::load_xdp("to_xsk", &rawbpf::xdp_redirect_xsk(xsks.as_raw_fd(), rawbpf::XDP_PASS))?;
//! let _link = rawbpf::attach_xdp(prog.as_fd(), ifindex, rawbpf::AttachMode::Native)?;
//! let mut socket = XskSocket::open(ifindex, 0, &XskConfig::default())?;
//! rawbpf::map_update_u32(xsks.as_fd(), socket.queue(), socket.fd().as_raw_fd() as u32)?;
//! loop {
//!     if socket.recv_batch(64, |frame| println!("{} bytes", frame.len())) == 0 {
//!         socket.wait(std::time::Duration::from_millis(100))?;
//!     }
//! }
//! # }
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

mod error;
mod mapping;
pub mod rawbpf;
mod ring;
mod socket;

use std::io;

pub use error::{XskError, errno};
pub use socket::{BindMode, XskConfig, XskMode, XskSocket, XskStatistics};

/// Number of RX queues of the interface `ifname` (at least 1), in the calling thread's
/// network namespace: the driver's channel counts (`ETHTOOL_GCHANNELS`, rx-only plus
/// combined), else the `rx-*` entries of `/sys/class/net/IF/queues` (sysfs shows the
/// network namespace it was mounted in, so that is only the fallback).
pub fn rx_queue_count(ifname: &str) -> io::Result<u32> {
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {ifname:?}"),
        ));
    }
    match ethtool_channels(ifname) {
        Ok(n) if n > 0 => return Ok(n),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
        // EOPNOTSUPP (no get_channels in the driver) and the like: ask sysfs.
        Err(_) => {}
    }
    let dir = format!("/sys/class/net/{ifname}/queues");
    let mut count = 0u32;
    for entry in std::fs::read_dir(&dir).map_err(|e| error::step_error(format!("read {dir}"), e))? {
        let entry = entry.map_err(|e| error::step_error(format!("read {dir}"), e))?;
        if entry.file_name().as_encoded_bytes().starts_with(b"rx-") {
            count += 1;
        }
    }
    Ok(count.max(1))
}

/// `rx_count + combined_count` from the SIOCETHTOOL ETHTOOL_GCHANNELS ioctl.
fn ethtool_channels(ifname: &str) -> io::Result<u32> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    // struct ethtool_channels: cmd, then max_{rx,tx,other,combined}, then
    // {rx,tx,other,combined}_count, all u32.
    let mut channels = [0u32; 9];
    channels[0] = ETHTOOL_GCHANNELS;
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {ifname:?} too long"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: channels.as_mut_ptr().cast(),
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a plain datagram socket for the ioctl; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `req` is a valid ifreq whose data points at a live ethtool_channels-sized
    // buffer for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            SIOCETHTOOL,
            &mut req as *mut IfReq,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODEV) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {ifname} does not exist"),
            ));
        }
        return Err(e);
    }
    Ok(channels[5] + channels[8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_at_least_one_rx_queue() {
        assert!(rx_queue_count("lo").unwrap() >= 1);
    }

    #[test]
    fn queue_count_of_missing_or_bad_interface_is_an_error() {
        assert_eq!(
            rx_queue_count("no-such-if0").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            rx_queue_count("../..").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn socket_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<XskSocket>();
    }
}
