//! The WireGuard underlay socket: batched UDP with GSO on send and GRO on receive.
//!
//! # Why hand-written `recvmmsg`/`sendmmsg` rather than `quinn-udp`
//!
//! `quinn-udp` 0.6 is well kept and does GSO, GRO and the EIO fallback, and we
//! evaluated it for this edge. We did not take it because of the send side: it issues
//! one `sendmsg` per `Transmit` (one destination, one segment size) and dropped its
//! `sendmmsg` path. A mesh node's transmit batch mixes destinations (many peers) and
//! sizes (the UDP forwarding path carries arbitrary datagrams), so GSO runs are often
//! short and `quinn-udp` would cost one syscall per run, where one `sendmmsg` carries the
//! whole batch, GSO runs included. It also returns `WouldBlock` to the caller, reserves
//! per-packet cmsg space for ECN/PKTINFO we don't use, caps receive batches at 32 and does
//! not re-send a GSO message the kernel refused (QUIC retransmits; WireGuard carrying TCP
//! would pay a retransmit timeout). What we need is small: two syscalls, one cmsg each
//! way, sockaddr conversion. The `unsafe` surface is those syscalls and the cmsg
//! accessors, each with its safety argument below; all buffers are owned by the batches.
//!
//! # Shape
//!
//! - [`UdpSocket`] is `Sync`: one thread calls [`UdpSocket::recv_batch`] while another
//!   calls [`UdpSocket::send_batch`] (share it with `Arc`, or [`UdpSocket::try_clone`]).
//! - [`RecvBatch`]: one `recvmmsg(MSG_WAITFORONE)` fills up to N messages of 64 KiB; with
//!   UDP GRO a message carries several datagrams of one size from one source, which
//!   [`RecvBatch::iter`] splits again.
//! - [`SendBatch`]: the caller appends datagrams ([`SendBatch::push`], or
//!   [`SendBatch::reserve`] + [`SendBatch::commit`] to encrypt in place). At send time,
//!   consecutive datagrams to the same destination with the same length (the last of a
//!   run may be shorter) become one UDP GSO message (at most 64 segments / 64 KiB), and
//!   all messages go out in one `sendmmsg`.
//!
//! No allocation happens per datagram: batches grow to their high-water mark and stay.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::sys::{ResultExt, errno, getsockopt_int, last_error, poll_one, setsockopt_int};

/// Largest UDP payload we send or accept into a batch (IPv4: 65535 - 20 - 8).
pub const MAX_DATAGRAM: usize = 65_507;
/// Most segments in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 on older
/// kernels, 128 on newer ones).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message (fits IPv6: 65535 - 40 - 8).
pub const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;
/// Bytes per receive slot: a GRO message carries up to 64 KiB.
pub const RECV_SLOT_BYTES: usize = 65_536;
/// Default `SO_RCVTIMEO`: how long [`UdpSocket::recv_batch`] waits before returning 0.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_millis(200);
/// How long one [`UdpSocket::send_batch`] may wait for socket buffer space in total
/// before it drops the rest of the batch.
pub const SEND_WAIT_BUDGET: Duration = Duration::from_millis(20);

/// `sendmmsg`/`recvmmsg` take at most UIO_MAXIOV messages per call.
const MAX_MSGS_PER_CALL: usize = 1024;
const CMSG_BUF_BYTES: usize = 64;

/// Control-message space, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; CMSG_BUF_BYTES]);

/// A socket address in the C layout the kernel expects.
#[repr(C)]
#[derive(Clone, Copy)]
union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

fn raw_v4(a: &SocketAddrV4) -> (RawAddr, libc::socklen_t) {
    // SAFETY: sockaddr_in is plain old data for which all-zeroes is valid.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr = libc::in_addr {
        s_addr: u32::from_ne_bytes(a.ip().octets()),
    };
    (
        RawAddr { v4: s },
        size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
}

fn raw_v6(ip: Ipv6Addr, port: u16, flowinfo: u32, scope_id: u32) -> (RawAddr, libc::socklen_t) {
    // SAFETY: sockaddr_in6 is plain old data for which all-zeroes is valid.
    let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    s.sin6_port = port.to_be();
    s.sin6_flowinfo = flowinfo; // as std: the raw field value
    s.sin6_addr = libc::in6_addr {
        s6_addr: ip.octets(),
    };
    s.sin6_scope_id = scope_id;
    (
        RawAddr { v6: s },
        size_of::<libc::sockaddr_in6>() as libc::socklen_t,
    )
}

/// Converts a destination for a socket of the given family: IPv4 destinations on an
/// IPv6 (dual-stack) socket become `::ffff:a.b.c.d`; IPv4-mapped destinations on an IPv4
/// socket become plain IPv4. `None` if the socket cannot reach the address family.
fn to_raw(dst: &SocketAddr, socket_v6: bool) -> Option<(RawAddr, libc::socklen_t)> {
    match (dst, socket_v6) {
        (SocketAddr::V4(a), false) => Some(raw_v4(a)),
        (SocketAddr::V4(a), true) => Some(raw_v6(a.ip().to_ipv6_mapped(), a.port(), 0, 0)),
        (SocketAddr::V6(a), true) => Some(raw_v6(*a.ip(), a.port(), a.flowinfo(), a.scope_id())),
        (SocketAddr::V6(a), false) => a
            .ip()
            .to_ipv4_mapped()
            .map(|ip| raw_v4(&SocketAddrV4::new(ip, a.port()))),
    }
}

/// Converts a kernel-filled source address; IPv4-mapped IPv6 becomes IPv4.
fn from_raw(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the kernel wrote a sockaddr_in, which fits in (and
            // has no stricter alignment than) sockaddr_storage.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the kernel wrote a sockaddr_in6, which fits in (and
            // has no stricter alignment than) sockaddr_storage.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// linux/in6.h; not in the libc crate.
const IPV6_FREEBIND: libc::c_int = 78;

/// A UDP socket for WireGuard traffic. See the [module documentation](self).
#[derive(Debug)]
pub struct UdpSocket {
    sock: Socket,
    local: SocketAddr,
    socket_v6: bool,
    gro: bool,
    gso_supported: bool,
    /// Shared with clones: a kernel refusal of GSO holds for the underlying socket.
    gso: Arc<AtomicBool>,
}

/// What one [`UdpSocket::send_batch`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// Datagrams accepted by the kernel.
    pub sent: usize,
    /// Datagrams dropped: no buffer space within [`SEND_WAIT_BUDGET`], unreachable
    /// destination, address family mismatch, or another per-message error.
    pub dropped: usize,
    /// Messages accepted by the kernel (a GSO message carries several datagrams).
    pub messages: usize,
    /// `sendmmsg` calls made.
    pub syscalls: usize,
    /// The errno of the last per-message error, if any (for rate-limited logging).
    pub last_errno: Option<i32>,
}

impl SendStats {
    /// The last per-message error as an `io::Error`.
    pub fn last_error(&self) -> Option<io::Error> {
        self.last_errno.map(io::Error::from_raw_os_error)
    }
}

fn set_buffer(sock: &Socket, force: i32, plain: i32, what: &str, bytes: usize) -> io::Result<()> {
    // The kernel doubles the value; keep it within int range.
    let val = bytes.min(i32::MAX as usize / 2) as i32;
    match setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, force, val) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            tracing::warn!(
                requested = bytes,
                "no CAP_NET_ADMIN for {what}FORCE; the {what} is capped by the net.core sysctl"
            );
            setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, plain, val)
                .ctx(|| format!("set {what} to {bytes} bytes"))
        }
        Err(e) => Err(super::sys::context(
            e,
            format!("set {what}FORCE to {bytes} bytes"),
        )),
    }
}

impl UdpSocket {
    /// Binds a UDP socket for WireGuard traffic.
    ///
    /// `[::]:port` makes a dual-stack socket (IPV6_V6ONLY off) that also serves IPv4;
    /// other IPv6 addresses are IPv6-only. Receive and send buffers are set to
    /// `buffer_bytes` with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` (falling back to the capped
    /// plain options without CAP_NET_ADMIN; 0 keeps the defaults). UDP GRO is enabled
    /// when the kernel has it, and GSO is used when the kernel supports `UDP_SEGMENT`.
    /// The socket is blocking with a [`DEFAULT_READ_TIMEOUT`] receive timeout.
    pub fn bind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<UdpSocket> {
        Self::bind_with(addr, buffer_bytes, false)
    }

    /// [`bind`](Self::bind) with `IP_FREEBIND`/`IPV6_FREEBIND`: the address need not be
    /// configured on the host yet (an anycast service address that arrives with the
    /// routing map before the operator's routing daemon announces it).
    pub fn bind_freebind(addr: SocketAddr, buffer_bytes: usize) -> io::Result<UdpSocket> {
        Self::bind_with(addr, buffer_bytes, true)
    }

    fn bind_with(addr: SocketAddr, buffer_bytes: usize, freebind: bool) -> io::Result<UdpSocket> {
        let domain = if addr.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
            .ctx(|| format!("create UDP socket for {addr}"))?;
        if let SocketAddr::V6(a) = addr {
            let dual = a.ip().is_unspecified() || a.ip().to_ipv4_mapped().is_some();
            sock.set_only_v6(!dual)
                .ctx(|| format!("set IPV6_V6ONLY={} on UDP socket for {addr}", !dual))?;
        }
        if buffer_bytes > 0 {
            set_buffer(
                &sock,
                libc::SO_RCVBUFFORCE,
                libc::SO_RCVBUF,
                "SO_RCVBUF",
                buffer_bytes,
            )?;
            set_buffer(
                &sock,
                libc::SO_SNDBUFFORCE,
                libc::SO_SNDBUF,
                "SO_SNDBUF",
                buffer_bytes,
            )?;
        }
        sock.set_read_timeout(Some(DEFAULT_READ_TIMEOUT))
            .ctx(|| "set SO_RCVTIMEO on UDP socket".to_string())?;
        if freebind {
            let (level, opt) = if addr.is_ipv4() {
                (libc::SOL_IP, libc::IP_FREEBIND)
            } else {
                (libc::SOL_IPV6, IPV6_FREEBIND)
            };
            setsockopt_int(sock.as_raw_fd(), level, opt, 1)
                .ctx(|| format!("set FREEBIND on UDP socket for {addr}"))?;
        }
        sock.bind(&addr.into())
            .ctx(|| format!("bind UDP socket to {addr}"))?;
        let fd = sock.as_raw_fd();
        let gro = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok();
        let gso_supported = getsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT).is_ok();
        let local = sock
            .local_addr()
            .and_then(|a| {
                a.as_socket().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "not an IP socket address")
                })
            })
            .ctx(|| format!("read local address of UDP socket bound to {addr}"))?;
        Ok(UdpSocket {
            sock,
            local,
            socket_v6: addr.is_ipv6(),
            gro,
            gso_supported,
            gso: Arc::new(AtomicBool::new(gso_supported)),
        })
    }

    /// The bound address (with the port the kernel chose for port 0). Read once at
    /// bind time, so this never fails; `io::Result` for symmetry with `std`.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    /// A second handle on the same socket (shares the GSO state).
    pub fn try_clone(&self) -> io::Result<UdpSocket> {
        Ok(UdpSocket {
            sock: self
                .sock
                .try_clone()
                .ctx(|| "duplicate UDP socket".to_string())?,
            local: self.local,
            socket_v6: self.socket_v6,
            gro: self.gro,
            gso_supported: self.gso_supported,
            gso: Arc::clone(&self.gso),
        })
    }

    /// Whether UDP GRO is enabled on receive.
    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    /// Whether sends currently use UDP GSO (false if unsupported, switched off, or
    /// refused by the kernel once).
    pub fn gso_enabled(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Switches GSO on or off (e.g. to measure its effect). Switching on has no effect
    /// if the kernel lacks `UDP_SEGMENT`.
    pub fn set_gso(&self, on: bool) {
        self.gso.store(on && self.gso_supported, Ordering::Relaxed);
    }

    /// Sets how long [`recv_batch`](Self::recv_batch) waits for a first datagram
    /// (`None`: forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock
            .set_read_timeout(timeout)
            .ctx(|| "set SO_RCVTIMEO on UDP socket".to_string())
    }

    /// The effective receive buffer size (as reported by the kernel, i.e. doubled).
    pub fn recv_buffer_size(&self) -> io::Result<usize> {
        self.sock.recv_buffer_size()
    }

    /// The effective send buffer size (as reported by the kernel, i.e. doubled).
    pub fn send_buffer_size(&self) -> io::Result<usize> {
        self.sock.send_buffer_size()
    }

    /// Receives up to `batch.capacity()` messages with one `recvmmsg`, waiting up to the
    /// read timeout for the first. Returns the number of messages (each may carry several
    /// datagrams; see [`RecvBatch::iter`]); `Ok(0)` on timeout or signal.
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.count = 0;
        let n = batch.meta.len();
        let raw = &mut batch.raw;
        let data = batch.data.as_mut_ptr();
        for (i, iov) in raw.iovs.iter_mut().enumerate() {
            iov.iov_base = data.wrapping_add(i * RECV_SLOT_BYTES).cast();
            iov.iov_len = RECV_SLOT_BYTES;
        }
        let iovs = raw.iovs.as_mut_ptr();
        let names = raw.names.as_mut_ptr();
        let ctrls = raw.ctrls.as_mut_ptr();
        for (i, h) in raw.hdrs.iter_mut().enumerate() {
            h.msg_len = 0;
            h.msg_hdr.msg_name = names.wrapping_add(i).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iovs.wrapping_add(i);
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = ctrls.wrapping_add(i).cast();
            h.msg_hdr.msg_controllen = CMSG_BUF_BYTES as _;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: `hdrs` holds `n` initialized mmsghdrs whose name, iovec and control
        // pointers point into `names`, `iovs`, `ctrls` and `data`, all owned by `batch`,
        // sized as declared (namelen, iov_len, controllen), and not otherwise borrowed
        // during the call. The kernel writes at most those sizes.
        let rc = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                raw.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let err = last_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(0),
                _ => Err(super::sys::context(
                    err,
                    format!("receive on UDP socket {}", self.local),
                )),
            };
        }
        let got = rc as usize;
        let mut count = 0;
        batch.dropped = 0;
        for i in 0..got {
            let h = &raw.hdrs[i];
            if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                batch.dropped += 1;
                continue;
            }
            let Some(src) = from_raw(&raw.names[i]) else {
                continue;
            };
            let len = h.msg_len as usize;
            let seg = gro_segment_size(&h.msg_hdr);
            if seg == 0 && h.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
                // The control data did not fit (another option set on the socket added
                // a message): whether this is several coalesced datagrams, and their
                // size, was in what is missing. Delivering it whole could glue
                // datagrams together, so it is dropped and counted.
                batch.dropped += 1;
                continue;
            }
            let seg = if seg == 0 || seg >= len { len } else { seg };
            batch.meta[count] = RecvMeta {
                slot: i,
                src,
                len,
                seg,
            };
            count += 1;
        }
        batch.count = count;
        Ok(count)
    }

    /// Sends every datagram of `batch` and clears it. Never blocks longer than
    /// [`SEND_WAIT_BUDGET`] in total; what cannot be sent is counted in
    /// [`SendStats::dropped`]. Returns `Err` only when the socket itself is unusable
    /// (the batch is cleared anyway).
    pub fn send_batch(&self, batch: &mut SendBatch) -> io::Result<SendStats> {
        let res = self.send_entries(batch);
        batch.clear();
        res
    }

    fn send_entries(&self, batch: &mut SendBatch) -> io::Result<SendStats> {
        let mut stats = SendStats::default();
        if batch.oversize > 0 {
            stats.dropped += batch.oversize;
            stats.last_errno = Some(libc::EMSGSIZE);
        }
        let n = batch.entries.len();
        let mut start = 0;
        let mut deadline: Option<Instant> = None;
        // Once refused in this call, never retry GSO in it (even if someone switches it
        // back on concurrently), so every retry makes progress.
        let mut refused = false;
        // Entries before this index are sent one per message (a GSO message of theirs
        // exceeded the path MTU).
        let mut singles_until = 0;
        'plan: while start < n {
            let gso = !refused && self.gso.load(Ordering::Relaxed);
            let (m, end) = batch.plan(start, gso, singles_until, self.socket_v6, &mut stats);
            let mut i = 0;
            while i < m {
                stats.syscalls += 1;
                // SAFETY: `plan` initialized hdrs[0..m]; each points at its own RawAddr,
                // iovec (into `batch.data`, within `used`) and, for GSO messages, a
                // CmsgBuf holding one UDP_SEGMENT cmsg of the declared length, all owned
                // by `batch` and not borrowed elsewhere during the call. sendmmsg only
                // reads them (and writes msg_len).
                let rc = unsafe {
                    libc::sendmmsg(
                        self.sock.as_raw_fd(),
                        batch.raw.hdrs.as_mut_ptr().wrapping_add(i),
                        (m - i) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc > 0 {
                    for g in &batch.raw.groups[i..i + rc as usize] {
                        stats.sent += g.count;
                        stats.messages += 1;
                    }
                    i += rc as usize;
                    continue;
                }
                let code = if rc == 0 { libc::EAGAIN } else { errno() };
                match code {
                    libc::EINTR => {}
                    libc::EAGAIN | libc::ENOBUFS => {
                        let now = Instant::now();
                        let until = *deadline.get_or_insert(now + SEND_WAIT_BUDGET);
                        if now >= until {
                            // Out of patience: drop the rest of the batch.
                            let rest: usize = batch.raw.groups[i..m].iter().map(|g| g.count).sum();
                            stats.dropped += rest + (n - end);
                            stats.last_errno = Some(code);
                            return Ok(stats);
                        }
                        if code == libc::EAGAIN {
                            poll_one(self.sock.as_raw_fd(), libc::POLLOUT, until - now)
                                .ctx(|| format!("poll UDP socket {}", self.local))?;
                        } else {
                            // ENOBUFS: no wakeup to wait for; back off briefly.
                            std::thread::sleep(Duration::from_micros(200).min(until - now));
                        }
                    }
                    libc::EIO | libc::EINVAL if batch.raw.groups[i].count > 1 => {
                        // The kernel or the egress device refuses UDP_SEGMENT: remember,
                        // and re-send the same datagrams one per message.
                        if self.gso.swap(false, Ordering::Relaxed) {
                            tracing::warn!(
                                local = %self.local,
                                error = %io::Error::from_raw_os_error(code),
                                "UDP GSO refused by the kernel; sending one datagram per message from now on"
                            );
                        }
                        refused = true;
                        start = batch.raw.groups[i].first;
                        continue 'plan;
                    }
                    libc::EMSGSIZE if batch.raw.groups[i].count > 1 => {
                        // Segments larger than the path MTU: a property of this path,
                        // not of GSO. Send these datagrams one per message, which lets
                        // the kernel fragment (or refuse) each as it would without GSO.
                        let g = batch.raw.groups[i];
                        singles_until = g.first + g.count;
                        start = g.first;
                        continue 'plan;
                    }
                    libc::EBADF | libc::ENOTSOCK | libc::EFAULT => {
                        return Err(super::sys::context(
                            io::Error::from_raw_os_error(code),
                            format!("send on UDP socket {}", self.local),
                        ));
                    }
                    _ => {
                        // A per-destination problem (unreachable, EMSGSIZE, EPERM from a
                        // firewall, ...): drop this message, go on with the next.
                        stats.dropped += batch.raw.groups[i].count;
                        stats.last_errno = Some(code);
                        i += 1;
                    }
                }
            }
            start = end;
        }
        Ok(stats)
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for UdpSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Reads the UDP_GRO segment size from a received message's control data (0 if none).
fn gro_segment_size(hdr: &libc::msghdr) -> usize {
    let mut seg = 0usize;
    // SAFETY: `hdr` was filled by recvmmsg: msg_control points at our CmsgBuf and
    // msg_controllen is the number of bytes of well-formed cmsgs the kernel wrote there.
    // CMSG_FIRSTHDR/CMSG_NXTHDR never return a header extending past msg_controllen, and
    // we read the payload only after checking cmsg_len covers an int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::SOL_UDP
                && h.cmsg_type == libc::UDP_GRO
                && h.cmsg_len as usize >= libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize
            {
                let v = libc::CMSG_DATA(c).cast::<libc::c_int>().read_unaligned();
                seg = usize::try_from(v).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    seg
}

#[derive(Clone, Copy, Debug)]
struct RecvMeta {
    slot: usize,
    src: SocketAddr,
    len: usize,
    /// Segment size: every datagram in the slot has this length, except possibly the
    /// last, which is shorter. Equals `len` without GRO.
    seg: usize,
}

/// The kernel-facing arrays of a [`RecvBatch`]. They hold raw pointers into the batch's
/// own buffers, rewritten before every `recvmmsg`.
struct RecvRaw {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrls: Vec<CmsgBuf>,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` are only ever set to point into buffers owned
// by the same `RecvBatch` (heap allocations that do not move with it), are rewritten
// before each syscall, and are never dereferenced by Rust code. Moving the batch to
// another thread therefore cannot create shared mutable access.
unsafe impl Send for RecvRaw {}

/// Reusable receive buffers for [`UdpSocket::recv_batch`].
pub struct RecvBatch {
    data: Box<[u8]>,
    meta: Vec<RecvMeta>,
    count: usize,
    /// Messages the last `recv_batch` received but could not deliver.
    dropped: u64,
    raw: RecvRaw,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.meta.len())
            .field("messages", &self.count)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl RecvBatch {
    /// Buffers for up to `messages` messages per call (clamped to 1..=1024), 64 KiB each
    /// (so memory is `messages` × 64 KiB, touched only as used).
    pub fn new(messages: usize) -> RecvBatch {
        let n = messages.clamp(1, MAX_MSGS_PER_CALL);
        let unspecified = SocketAddr::from(([0u8; 4], 0));
        RecvBatch {
            data: vec![0u8; n * RECV_SLOT_BYTES].into_boxed_slice(),
            meta: vec![
                RecvMeta {
                    slot: 0,
                    src: unspecified,
                    len: 0,
                    seg: 0,
                };
                n
            ],
            count: 0,
            dropped: 0,
            raw: RecvRaw {
                // SAFETY: mmsghdr, iovec and sockaddr_storage are plain C structs of
                // integers and pointers, for which all-zeroes (null pointers) is valid.
                hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
                // SAFETY: as above.
                iovs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
                // SAFETY: as above.
                names: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
                ctrls: vec![CmsgBuf([0; CMSG_BUF_BYTES]); n],
            },
        }
    }

    /// Maximum messages per `recv_batch`.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Messages received by the last `recv_batch`.
    pub fn messages(&self) -> usize {
        self.count
    }

    /// Datagrams received by the last `recv_batch` (GRO messages split).
    pub fn datagrams(&self) -> usize {
        self.meta[..self.count]
            .iter()
            .map(|m| m.len.div_ceil(m.seg.max(1)))
            .sum()
    }

    /// Messages the last `recv_batch` received and dropped: the datagram did not fit a
    /// slot (cannot happen for datagrams ≤ 64 KiB), or its control data was cut short
    /// (`MSG_CTRUNC`) so that its GRO segment size may be lost. The caller counts them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The datagrams of the last `recv_batch`, in arrival order: `(source, payload)`.
    /// Sources that are IPv4-mapped IPv6 addresses are given as IPv4. Zero-length
    /// datagrams are skipped.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.meta[..self.count].iter().flat_map(move |m| {
            let base = m.slot * RECV_SLOT_BYTES;
            self.data[base..base + m.len]
                .chunks(m.seg.max(1))
                .map(move |d| (m.src, d))
        })
    }

    /// Like [`iter`](Self::iter), with mutable payloads (e.g. to decrypt in place).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SocketAddr, &mut [u8])> + '_ {
        let mut metas = self.meta[..self.count].iter().peekable();
        self.data
            .chunks_mut(RECV_SLOT_BYTES)
            .enumerate()
            .filter_map(move |(i, chunk)| {
                if metas.peek()?.slot == i {
                    metas.next().map(|m| (m, chunk))
                } else {
                    None
                }
            })
            .flat_map(|(m, chunk)| {
                chunk[..m.len]
                    .chunks_mut(m.seg.max(1))
                    .map(move |d| (m.src, d))
            })
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    dst: SocketAddr,
    off: usize,
    len: usize,
}

/// One message of a planned `sendmmsg`: entries `first..first + count`.
#[derive(Clone, Copy, Debug, Default)]
struct Group {
    first: usize,
    count: usize,
}

/// The kernel-facing arrays of a [`SendBatch`], with raw pointers into the batch's own
/// buffers, rewritten by every plan.
struct SendRaw {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<RawAddr>,
    ctrls: Vec<CmsgBuf>,
    groups: Vec<Group>,
}

// SAFETY: as for RecvRaw: the raw pointers only point into heap buffers owned by the same
// `SendBatch`, are rewritten before each syscall and never dereferenced by Rust code.
unsafe impl Send for SendRaw {}

/// Reusable transmit buffer for [`UdpSocket::send_batch`]. Datagrams are stored back to
/// back in one buffer, so runs of equal-size datagrams are already laid out as GSO
/// messages.
pub struct SendBatch {
    /// Always fully initialized; `used` bytes hold committed datagrams.
    data: Vec<u8>,
    used: usize,
    entries: Vec<Entry>,
    reserved: Option<(SocketAddr, usize)>,
    /// Datagrams refused by `push` for being larger than MAX_DATAGRAM.
    oversize: usize,
    capacity: usize,
    raw: SendRaw,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("datagrams", &self.entries.len())
            .field("bytes", &self.used)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl SendBatch {
    /// A batch meant to hold about `datagrams` datagrams before it is flushed
    /// ([`is_full`](Self::is_full) turns true there). It grows past that if the caller
    /// keeps appending.
    pub fn new(datagrams: usize) -> SendBatch {
        let n = datagrams.max(1);
        SendBatch {
            data: vec![0u8; n * 2048],
            used: 0,
            entries: Vec::with_capacity(n),
            reserved: None,
            oversize: 0,
            capacity: n,
            raw: SendRaw {
                hdrs: Vec::new(),
                iovs: Vec::new(),
                addrs: Vec::new(),
                ctrls: Vec::new(),
                groups: Vec::new(),
            },
        }
    }

    /// Number of committed datagrams.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no datagram is committed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the batch holds its nominal capacity: time to send it.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Payload bytes committed.
    pub fn bytes(&self) -> usize {
        self.used
    }

    /// Drops every committed datagram and any reservation.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
        self.reserved = None;
        self.oversize = 0;
    }

    /// Reserves room for one datagram of up to `max_len` bytes (capped at
    /// [`MAX_DATAGRAM`]) to `dst`, and returns it for the caller to fill (e.g. with
    /// ciphertext). Nothing is added until [`commit`](Self::commit); a new `reserve`
    /// abandons an uncommitted one. The slice's initial contents are unspecified.
    pub fn reserve(&mut self, dst: SocketAddr, max_len: usize) -> &mut [u8] {
        let max_len = max_len.min(MAX_DATAGRAM);
        let need = self.used + max_len;
        if need > self.data.len() {
            let grown = need.max(self.data.len() * 2);
            self.data.resize(grown, 0);
        }
        self.reserved = Some((dst, max_len));
        &mut self.data[self.used..need]
    }

    /// Adds the first `len` bytes of the last reservation as a datagram.
    ///
    /// # Panics
    /// If there is no reservation or `len` exceeds it: both are bugs in the caller.
    pub fn commit(&mut self, len: usize) {
        let (dst, max) = self
            .reserved
            .take()
            .expect("SendBatch::commit called without a reservation");
        assert!(
            len <= max,
            "SendBatch::commit({len}) exceeds the reservation of {max} bytes"
        );
        self.entries.push(Entry {
            dst,
            off: self.used,
            len,
        });
        self.used += len;
    }

    /// As [`commit`](Self::commit), to `dst` instead of the destination given to
    /// `reserve` (for callers that learn it while filling the reservation, e.g. from
    /// the encryption that decides the peer's endpoint).
    ///
    /// # Panics
    /// As `commit`.
    pub fn commit_to(&mut self, dst: SocketAddr, len: usize) {
        if let Some((reserved_dst, _)) = &mut self.reserved {
            *reserved_dst = dst;
        }
        self.commit(len);
    }

    /// Copies one datagram into the batch. A payload larger than [`MAX_DATAGRAM`] cannot
    /// be a UDP datagram: it is not added, and is counted in [`SendStats::dropped`] (with
    /// `EMSGSIZE`) by the next send.
    pub fn push(&mut self, dst: SocketAddr, payload: &[u8]) {
        if payload.len() > MAX_DATAGRAM {
            self.oversize += 1;
            return;
        }
        self.reserve(dst, payload.len()).copy_from_slice(payload);
        self.commit(payload.len());
    }

    /// Groups entries `start..` into at most MAX_MSGS_PER_CALL messages (coalescing only
    /// from entry `singles_until` on) and fills the mmsghdr array. Entries whose
    /// destination the socket cannot reach are counted as dropped. Returns (messages,
    /// first entry not planned).
    fn plan(
        &mut self,
        start: usize,
        gso: bool,
        singles_until: usize,
        socket_v6: bool,
        stats: &mut SendStats,
    ) -> (usize, usize) {
        let raw = &mut self.raw;
        raw.groups.clear();
        let entries = &self.entries;
        let mut i = start;
        while i < entries.len() && raw.groups.len() < MAX_MSGS_PER_CALL {
            let first = entries[i];
            let mut count = 1;
            let mut bytes = first.len;
            if gso && first.len > 0 && i >= singles_until {
                let seg = first.len;
                while let Some(next) = entries.get(i + count) {
                    let prev = entries[i + count - 1];
                    if next.dst != first.dst
                        || prev.len != seg
                        || next.len == 0
                        || next.len > seg
                        || count >= MAX_GSO_SEGMENTS
                        || bytes + next.len > MAX_GSO_BYTES
                    {
                        break;
                    }
                    debug_assert_eq!(next.off, prev.off + prev.len);
                    count += 1;
                    bytes += next.len;
                }
            }
            let Some((addr, _)) = to_raw(&first.dst, socket_v6) else {
                stats.dropped += count;
                stats.last_errno = Some(libc::EAFNOSUPPORT);
                i += count;
                continue;
            };
            let j = raw.groups.len();
            if raw.addrs.len() <= j {
                // Grow the kernel-facing arrays to a new high-water mark.
                // SAFETY: all-zeroes is a valid value of these plain C structs.
                raw.hdrs.push(unsafe { std::mem::zeroed() });
                // SAFETY: as above.
                raw.iovs.push(unsafe { std::mem::zeroed() });
                raw.addrs.push(addr);
                raw.ctrls.push(CmsgBuf([0; CMSG_BUF_BYTES]));
            }
            raw.addrs[j] = addr;
            raw.iovs[j].iov_base = self.data[first.off..].as_ptr() as *mut libc::c_void;
            raw.iovs[j].iov_len = bytes;
            if count > 1 {
                write_segment_cmsg(&mut raw.ctrls[j], first.len as u16);
            }
            raw.groups.push(Group { first: i, count });
            i += count;
        }
        let m = raw.groups.len();
        let addrs = raw.addrs.as_mut_ptr();
        let iovs = raw.iovs.as_mut_ptr();
        let ctrls = raw.ctrls.as_mut_ptr();
        // `to_raw` always produces the socket's own family.
        let addr_len = if socket_v6 {
            size_of::<libc::sockaddr_in6>()
        } else {
            size_of::<libc::sockaddr_in>()
        };
        for (j, (h, g)) in raw.hdrs.iter_mut().zip(&raw.groups).enumerate() {
            h.msg_len = 0;
            h.msg_hdr.msg_name = addrs.wrapping_add(j).cast();
            h.msg_hdr.msg_namelen = addr_len as libc::socklen_t;
            h.msg_hdr.msg_iov = iovs.wrapping_add(j);
            h.msg_hdr.msg_iovlen = 1;
            if g.count > 1 {
                h.msg_hdr.msg_control = ctrls.wrapping_add(j).cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_hdr.msg_controllen =
                    unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as _;
            } else {
                h.msg_hdr.msg_control = std::ptr::null_mut();
                h.msg_hdr.msg_controllen = 0;
            }
            h.msg_hdr.msg_flags = 0;
        }
        (m, i)
    }
}

/// Writes one `SOL_UDP/UDP_SEGMENT` cmsg carrying `seg` at the start of `buf`.
fn write_segment_cmsg(buf: &mut CmsgBuf, seg: u16) {
    // SAFETY: all-zeroes is a valid cmsghdr (integers and, on some libcs, padding).
    let mut h: libc::cmsghdr = unsafe { std::mem::zeroed() };
    // SAFETY: CMSG_LEN is a pure size computation.
    h.cmsg_len = unsafe { libc::CMSG_LEN(size_of::<u16>() as u32) } as _;
    h.cmsg_level = libc::SOL_UDP;
    h.cmsg_type = libc::UDP_SEGMENT;
    let c = buf.0.as_mut_ptr().cast::<libc::cmsghdr>();
    // SAFETY: `buf` is 8-aligned (repr(align(8))) and CMSG_BUF_BYTES (64) is larger than
    // CMSG_SPACE(2) (24), so both the header and the u16 at CMSG_DATA lie inside `buf`.
    unsafe {
        c.write(h);
        libc::CMSG_DATA(c).cast::<u16>().write_unaligned(seg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// The mixed workload of the round-trip tests: (destination is v6?, length) runs.
    fn workload() -> Vec<(bool, Vec<u8>)> {
        let mut out = Vec::new();
        let mut k = 0u32;
        let mut add = |v6: bool, len: usize, out: &mut Vec<(bool, Vec<u8>)>| {
            k += 1;
            let d: Vec<u8> = (0..len)
                .map(|j| (j as u32 ^ k.wrapping_mul(31)) as u8)
                .collect();
            out.push((v6, d));
        };
        // (v6, len, count): same-size runs for GSO, odd sizes, a short tail, a run longer
        // than 64 segments, alternating destinations.
        let plan: &[(bool, usize, usize)] = &[
            (false, 1200, 30),
            (false, 700, 1),
            (true, 1400, 25),
            (true, 33, 1),
            (false, 1, 1),
            (true, 100, 70),
            (false, 999, 1),
            (true, 999, 1),
            (false, 1452, 40),
            (false, 57, 1),
            (true, 1280, 20),
            (false, 8000, 5),
            (true, 65_000, 1),
            (false, 3, 1),
            (true, 12, 1),
            (false, 512, 1),
        ];
        for &(v6, len, count) in plan {
            for _ in 0..count {
                add(v6, len, &mut out);
            }
        }
        assert_eq!(out.len(), 200);
        out
    }

    fn roundtrip(gso: bool) {
        let rx = UdpSocket::bind("[::]:0".parse().unwrap(), 8 << 20).expect("bind rx");
        let tx = UdpSocket::bind("[::]:0".parse().unwrap(), 8 << 20).expect("bind tx");
        tx.set_gso(gso);
        let port = rx.local_addr().unwrap().port();
        let to4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let to6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
        let work = workload();

        let mut batch = SendBatch::new(256);
        for (v6, d) in &work {
            let dst = if *v6 { to6 } else { to4 };
            if d.len() % 2 == 0 {
                batch.push(dst, d);
            } else {
                // Zero-copy form, with an over-sized reservation.
                let buf = batch.reserve(dst, d.len() + 32);
                buf[..d.len()].copy_from_slice(d);
                batch.commit(d.len());
            }
        }
        assert_eq!(batch.len(), 200);
        let stats = tx.send_batch(&mut batch).expect("send_batch");
        assert!(batch.is_empty());
        assert_eq!(stats.sent, 200, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
        if gso && tx.gso_enabled() {
            assert!(stats.messages < 100, "GSO should coalesce runs: {stats:?}");
        } else {
            assert_eq!(stats.messages, 200, "{stats:?}");
        }
        assert!(stats.syscalls <= 2, "{stats:?}");

        let mut rb = RecvBatch::new(64);
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut messages = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 200 && Instant::now() < deadline {
            let n = rx.recv_batch(&mut rb).expect("recv_batch");
            messages += n;
            assert_eq!(rb.messages(), n);
            got.extend(rb.iter().map(|(s, d)| (s, d.to_vec())));
        }
        assert_eq!(got.len(), 200, "all datagrams arrive");
        let tx_port = tx.local_addr().unwrap().port();
        for (i, ((v6, want), (src, d))) in work.iter().zip(&got).enumerate() {
            assert_eq!(d, want, "datagram {i} (len {}) differs", want.len());
            if *v6 {
                assert_eq!(
                    *src,
                    format!("[::1]:{tx_port}").parse::<SocketAddr>().unwrap()
                );
            } else {
                assert_eq!(
                    *src,
                    format!("127.0.0.1:{tx_port}")
                        .parse::<SocketAddr>()
                        .unwrap()
                );
            }
        }
        if gso && tx.gso_enabled() && rx.gro_enabled() {
            assert!(
                messages < 200,
                "GRO should deliver super-buffers ({messages} messages)"
            );
        }
        eprintln!(
            "gso={gso}: {} datagrams in {} messages / {} syscalls sent, {messages} messages received",
            stats.sent, stats.messages, stats.syscalls
        );
    }

    #[test]
    fn udp_batch_roundtrip_gso_gro_mixed_v4_v6() {
        roundtrip(true);
    }

    #[test]
    fn udp_batch_roundtrip_without_gso() {
        roundtrip(false);
    }

    /// When the control data is cut short (MSG_CTRUNC: here, options someone set on the
    /// socket add messages that do not fit our control buffer), a datagram without its
    /// GRO segment size may be several glued together: it is dropped and counted, never
    /// delivered whole.
    #[test]
    fn a_datagram_whose_control_data_was_cut_short_is_dropped_and_counted() {
        let rx = UdpSocket::bind("[::]:0".parse().unwrap(), 1 << 20).unwrap();
        let tx = UdpSocket::bind("[::]:0".parse().unwrap(), 1 << 20).unwrap();
        let fd = rx.as_raw_fd();
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1).unwrap();
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1).unwrap();
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1).unwrap();
        let to: SocketAddr = format!("[::1]:{}", rx.local_addr().unwrap().port())
            .parse()
            .unwrap();
        let mut batch = SendBatch::new(4);
        batch.push(to, b"first");
        tx.send_batch(&mut batch).unwrap();
        let mut rb = RecvBatch::new(8);
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.recv_batch(&mut rb).unwrap() == 0 && rb.dropped() == 0 {
            assert!(Instant::now() < deadline, "nothing arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!((rb.messages(), rb.dropped()), (0, 1));
        assert_eq!(rb.iter().count(), 0);
        // Without the extra options the same datagram is delivered.
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0).unwrap();
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 0).unwrap();
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 0).unwrap();
        batch.push(to, b"second");
        tx.send_batch(&mut batch).unwrap();
        while rx.recv_batch(&mut rb).unwrap() == 0 {
            assert!(Instant::now() < deadline, "nothing arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(rb.dropped(), 0);
        let got: Vec<_> = rb.iter().map(|(_, p)| p.to_vec()).collect();
        assert_eq!(got, vec![b"second".to_vec()]);
    }

    #[test]
    fn udp_gso_fallback_when_kernel_refuses_segmentation() {
        // With SO_NO_CHECK (no UDP checksums over IPv4) the kernel refuses UDP_SEGMENT
        // with EINVAL while plain sends work: a real kernel refusal.
        let rx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 4 << 20).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 4 << 20).unwrap();
        if !tx.gso_enabled() {
            eprintln!("SKIP: kernel without UDP GSO");
            return;
        }
        setsockopt_int(tx.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new(64);
        for i in 0..50u8 {
            batch.push(to, &[i; 1000]);
        }
        let stats = tx.send_batch(&mut batch).unwrap();
        assert_eq!(stats.sent, 50, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
        assert_eq!(
            stats.messages, 50,
            "fell back to one datagram per message: {stats:?}"
        );
        assert!(!tx.gso_enabled(), "the refusal is remembered");
        // The next batch goes without GSO straight away.
        for i in 0..10u8 {
            batch.push(to, &[100 + i; 1000]);
        }
        let stats = tx.send_batch(&mut batch).unwrap();
        assert_eq!(
            (stats.sent, stats.messages, stats.syscalls),
            (10, 10, 1),
            "{stats:?}"
        );

        let mut rb = RecvBatch::new(64);
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 60 && Instant::now() < deadline {
            rx.recv_batch(&mut rb).unwrap();
            got.extend(rb.iter().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got.len(), 60);
        for (i, d) in got.iter().enumerate() {
            let want = if i < 50 {
                i as u8
            } else {
                100 + (i - 50) as u8
            };
            assert_eq!(d, &vec![want; 1000]);
        }
    }

    #[test]
    fn udp_gso_segments_beyond_path_mtu_are_resent_singly() {
        use crate::io::testutil::in_netns;
        use crate::io::tun::{TunConfig, TunDevice};
        in_netns("udp_gso_segments_beyond_path_mtu_are_resent_singly", || {
            // A path with MTU 1280 (a TUN device), datagrams of 1400 bytes: a GSO
            // message is refused (EMSGSIZE on current kernels), each datagram alone is
            // fragmented by the kernel as without GSO.
            let dev = TunDevice::create(&TunConfig {
                name: "flymtu0".into(),
                mtu: 1280,
                ipv6: "fd00::1".parse().unwrap(),
                ipv4: Some("198.18.0.1".parse().unwrap()),
                offload: false,
                tx_queue_len: 0,
            })
            .unwrap();
            crate::io::route::add_route(dev.ifindex(), "198.19.2.0".parse().unwrap(), 24).unwrap();
            let tx = UdpSocket::bind("198.18.0.1:0".parse().unwrap(), 1 << 20).unwrap();
            let gso_before = tx.gso_enabled();
            let mut b = SendBatch::new(16);
            let to: SocketAddr = "198.19.2.2:5555".parse().unwrap();
            for i in 0..10u8 {
                b.push(to, &[i; 1400]);
            }
            let st = tx.send_batch(&mut b).unwrap();
            assert_eq!((st.sent, st.dropped), (10, 0), "{st:?}");
            assert_eq!(st.messages, 10, "{st:?}");
            eprintln!(
                "gso before {gso_before}, after {}: {st:?}",
                tx.gso_enabled()
            );
            let mut rb = dev.new_recv_batch(64);
            let mut frags = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while frags < 20 && Instant::now() < deadline {
                dev.recv_batch(&mut rb).unwrap();
                for p in rb.iter() {
                    if p[0] >> 4 == 4 && p[9] == 17 {
                        assert!(p.len() <= 1280);
                        frags += 1;
                    }
                }
            }
            assert_eq!(frags, 20, "each datagram arrives in two fragments");
        });
    }

    #[test]
    fn udp_unreachable_family_is_dropped_not_fatal() {
        let rx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let to = rx.local_addr().unwrap();
        let mut batch = SendBatch::new(8);
        batch.push("[2001:db8::1]:51820".parse().unwrap(), b"nope");
        batch.push(to, b"yes");
        // Too large to be a datagram: not added, counted as dropped.
        batch.push(to, &vec![0; MAX_DATAGRAM + 1]);
        // An IPv4-mapped IPv6 destination works on an IPv4 socket.
        let mapped = SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), to.port());
        batch.push(mapped, b"mapped");
        assert_eq!(batch.len(), 3);
        let stats = tx.send_batch(&mut batch).unwrap();
        assert_eq!((stats.sent, stats.dropped), (2, 2), "{stats:?}");
        assert!(stats.last_errno.is_some());
        let mut rb = RecvBatch::new(4);
        let mut got = Vec::new();
        while got.len() < 2 {
            assert!(rx.recv_batch(&mut rb).unwrap() > 0);
            got.extend(rb.iter().map(|(_, d)| d.to_vec()));
        }
        assert_eq!(got, vec![b"yes".to_vec(), b"mapped".to_vec()]);
        assert!(batch.is_empty());
        let stats = tx.send_batch(&mut batch).unwrap();
        assert_eq!(stats, SendStats::default(), "the oversize count was reset");
    }

    #[test]
    fn udp_recv_times_out_with_zero() {
        let rx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut rb = RecvBatch::new(4);
        let t = Instant::now();
        assert_eq!(rx.recv_batch(&mut rb).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(40));
        assert_eq!(rb.iter().count(), 0);
    }

    #[test]
    fn udp_bind_options() {
        let s = UdpSocket::bind("[::]:0".parse().unwrap(), 4 << 20).unwrap();
        assert!(!s.sock.only_v6().unwrap(), "[::] is dual-stack");
        if super::super::sys::is_root() {
            // FORCE bypasses net.core.rmem_max; the kernel reports double.
            assert!(s.recv_buffer_size().unwrap() >= 4 << 20);
            assert!(s.send_buffer_size().unwrap() >= 4 << 20);
        }
        let s6 = UdpSocket::bind("[::1]:0".parse().unwrap(), 0).unwrap();
        assert!(s6.sock.only_v6().unwrap());
        let c = s.try_clone().unwrap();
        c.set_gso(false);
        assert!(!s.gso_enabled(), "clones share GSO state");
        assert_eq!(c.local_addr().unwrap(), s.local_addr().unwrap());
        let taken = s.local_addr().unwrap();
        let e = UdpSocket::bind(taken, 0).unwrap_err();
        assert!(e.to_string().contains(&taken.to_string()), "{e}");
    }

    #[test]
    fn udp_recv_iter_mut_and_concurrent_send_recv() {
        let rx = Arc::new(UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 4 << 20).unwrap());
        let to = rx.local_addr().unwrap();
        let tx = Arc::clone(&rx); // the same socket sends (to itself) from another thread
        let h = std::thread::spawn(move || {
            let mut b = SendBatch::new(16);
            for i in 0..16u8 {
                b.push(to, &[i; 300]);
            }
            tx.send_batch(&mut b).unwrap()
        });
        let mut rb = RecvBatch::new(16);
        let mut seen = 0;
        while seen < 16 {
            rx.recv_batch(&mut rb).unwrap();
            for (_, d) in rb.iter_mut() {
                d[0] ^= 0xff;
                assert_eq!(d[0], (seen as u8) ^ 0xff);
                seen += 1;
            }
        }
        assert_eq!(h.join().unwrap().sent, 16);
    }

    /// Loopback throughput of 1452-byte datagrams (a WireGuard data packet for a 1420
    /// MTU) with and without GSO/GRO; receiver on its own thread. Run with
    /// `--ignored --nocapture`, ideally in release mode.
    #[test]
    #[ignore = "benchmark"]
    fn bench_udp_gso_effect() {
        fn run(gso: bool, total: usize) -> (f64, usize) {
            let rx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 32 << 20).unwrap();
            let tx = UdpSocket::bind("127.0.0.1:0".parse().unwrap(), 32 << 20).unwrap();
            tx.set_gso(gso);
            let to = rx.local_addr().unwrap();
            let t = Instant::now();
            let recv = std::thread::spawn(move || {
                let mut rb = RecvBatch::new(64);
                let mut got = 0;
                let mut idle = 0;
                while got < total && idle < 5 {
                    let n = rx.recv_batch(&mut rb).unwrap();
                    if n == 0 {
                        idle += 1;
                    }
                    got += rb.datagrams();
                }
                got
            });
            let mut b = SendBatch::new(128);
            let payload = [0x5au8; 1452];
            let mut syscalls = 0;
            let mut sent = 0;
            while sent < total {
                for _ in 0..128 {
                    b.push(to, &payload);
                }
                let st = tx.send_batch(&mut b).unwrap();
                syscalls += st.syscalls;
                sent += 128;
            }
            let got = recv.join().unwrap();
            let secs = t.elapsed().as_secs_f64();
            eprintln!(
                "gso={gso}: {got}/{sent} datagrams received in {secs:.2}s = {:.0} kpps ({:.2} Gbit/s payload), {syscalls} sendmmsg calls",
                got as f64 / secs / 1e3,
                got as f64 * 1452.0 * 8.0 / secs / 1e9
            );
            (got as f64 / secs, got)
        }
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..3 {
            off.push(run(false, 500_000).0);
            on.push(run(true, 500_000).0);
        }
        off.sort_by(f64::total_cmp);
        on.sort_by(f64::total_cmp);
        eprintln!(
            "median: GSO off {:.0} kpps, on {:.0} kpps, ratio {:.1}x",
            off[1] / 1e3,
            on[1] / 1e3,
            on[1] / off[1]
        );
    }
}
