//! ICMP "fragmentation needed" / ICMPv6 "packet too big" to clients whose datagram
//! cannot cross the mesh whole, sent from the anycast address they wrote to.
//!
//! Raw sockets with `IPPROTO_RAW` (the header is ours: the source is the anycast
//! address, which is local on an edge), opened on first use, and a token bucket so a
//! flood of oversized datagrams cannot turn the edge into an ICMP cannon (RFC 4443
//! §2.4(f) asks for exactly this kind of limit).
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use parking_lot::Mutex;

use super::packet;

/// Messages per second, sustained; also the burst.
const RATE: f64 = 100.0;

pub struct Icmp {
    v4: Mutex<Option<OwnedFd>>,
    v6: Mutex<Option<OwnedFd>>,
    bucket: Mutex<(f64, Instant)>,
}

impl Default for Icmp {
    fn default() -> Self {
        Self::new()
    }
}

impl Icmp {
    pub fn new() -> Icmp {
        Icmp {
            v4: Mutex::new(None),
            v6: Mutex::new(None),
            bucket: Mutex::new((RATE, Instant::now())),
        }
    }

    /// Tells `client` that its datagram to `anycast` (payload `payload`) was too big,
    /// announcing `mtu`. Returns `Ok(false)` when the rate limit held it back.
    pub fn too_big(
        &self,
        client: SocketAddr,
        anycast: SocketAddr,
        payload: &[u8],
        mtu: u16,
    ) -> io::Result<bool> {
        if !self.take_token() {
            return Ok(false);
        }
        let mut out = [0u8; 1280];
        let len = packet::write_too_big(&mut out, anycast.ip(), client, anycast, payload, mtu)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mixed address families"))?;
        let socket = if client.is_ipv6() { &self.v6 } else { &self.v4 };
        let mut socket = socket.lock();
        if socket.is_none() {
            *socket = Some(open_raw(client.is_ipv6())?);
        }
        let fd = socket.as_ref().expect("just opened").as_raw_fd();
        // The port must be 0 for raw sockets; the header in `out` carries the addresses.
        let to = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(client.ip(), 0));
        nix::sys::socket::sendto(
            fd,
            &out[..len],
            &to,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(true)
    }

    fn take_token(&self) -> bool {
        let mut bucket = self.bucket.lock();
        let now = Instant::now();
        let (tokens, last) = *bucket;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * RATE).min(RATE);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return false;
        }
        *bucket = (tokens - 1.0, now);
        true
    }
}

fn open_raw(v6: bool) -> io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening a raw socket for ICMP (needs CAP_NET_RAW): {e}"),
        ));
    }
    // SAFETY: `fd` is a descriptor we just created and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_limits_bursts() {
        let icmp = Icmp::new();
        let allowed = (0..1000).filter(|_| icmp.take_token()).count();
        assert!((100..=101).contains(&allowed), "{allowed}");
    }
}
