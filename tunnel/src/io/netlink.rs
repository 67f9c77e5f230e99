//! A minimal synchronous rtnetlink (NETLINK_ROUTE) client: just the link, address and
//! route operations the tunnel needs, plus the message builder and request/reply loop
//! that [`super::rule`] uses for policy rules.
//!
//! Why not `netlink-packet-route` + `netlink-sys`: they are sync-capable, but they bring
//! a large generic message model (and frequent breaking releases) for the five fixed
//! messages we send; the wire format below is the stable kernel UAPI and is encoded
//! without `unsafe` (headers are written field by field). The only `unsafe` is the
//! socket syscalls themselves.
//!
//! Each call opens its own socket (control-plane operations are rare), so the socket
//! lives in the network namespace of the calling thread.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::sys::{context, context_detail, last_error, setsockopt_int};

// --- UAPI constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h).
const NETLINK_ROUTE: i32 = 0;
const SOL_NETLINK: i32 = 270;
const NETLINK_CAP_ACK: i32 = 10;
const NETLINK_EXT_ACK: i32 = 11;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
pub(crate) const RTM_NEWRULE: u16 = 32;
pub(crate) const RTM_DELRULE: u16 = 33;
pub(crate) const RTM_GETRULE: u16 = 34;

const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_TXQLEN: u16 = 13;
const IFLA_LINKINFO: u16 = 18;
const IFLA_GSO_MAX_SEGS: u16 = 40;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_INFO_KIND: u16 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_MULTIPATH: u16 = 9;
const RTA_VIA: u16 = 18;
const RTA_TABLE: u16 = 15;

const RT_TABLE_UNSPEC: u8 = 0;
pub(crate) const RT_TABLE_MAIN: u32 = 254;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_NOWHERE: u8 = 255;
pub(crate) const RTN_UNICAST: u8 = 1;
pub(crate) const RTN_LOCAL: u8 = 2;

const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

const RECV_BUF: usize = 64 * 1024;
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A link as reported by RTM_GETLINK.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// `ifi_type`: the ARPHRD_* hardware type (1: Ethernet).
    pub hw_type: u16,
    pub mtu: Option<u32>,
    /// The XDP program attached to the link, if any: (program id, `XDP_ATTACHED_*`).
    pub xdp: Option<(u32, u8)>,
    /// `IFLA_INFO_KIND` ("tun" for TUN/TAP devices, "veth", ...); `None` for devices
    /// without rtnl link ops (e.g. loopback).
    pub kind: Option<String>,
}

/// A route as reported by an RTM_GETROUTE dump.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub oif: Option<u32>,
    pub table: u32,
    pub route_type: u8,
    /// Through a router (a gateway, `via`, or several next hops), not on a link.
    pub gateway: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteOp {
    /// RTM_NEWROUTE with NLM_F_CREATE | NLM_F_REPLACE.
    Replace,
    /// RTM_DELROUTE.
    Delete,
}

/// One message under construction. Headers are encoded field by field in native byte
/// order, as the kernel expects.
pub(crate) struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    /// A request of type `ty`; NLM_F_REQUEST is added to `flags`.
    pub(crate) fn new(ty: u16, flags: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        Msg { buf }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Appends a fixed family header (ifinfomsg, ifaddrmsg, rtmsg, fib_rule_hdr) given as
    /// bytes.
    pub(crate) fn header(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    /// Appends the attribute `ty` with payload `data`.
    pub(crate) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Appends the attribute `ty` with a native-order u32 payload.
    pub(crate) fn attr_u32(&mut self, ty: u16, v: u32) {
        self.attr(ty, &v.to_ne_bytes());
    }

    /// The payload after the netlink header (family header and attributes), as the
    /// kernel's reply to a dump would carry it.
    #[cfg(test)]
    pub(crate) fn body(&self) -> &[u8] {
        &self.buf[NLMSG_HDRLEN..]
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

fn ifinfomsg(family: u8, index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0] = family;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

fn ifaddrmsg(family: u8, prefix_len: u8, flags: u8, scope: u8, index: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = family;
    h[1] = prefix_len;
    h[2] = flags;
    h[3] = scope;
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h
}

fn rtmsg(family: u8, dst_len: u8, table: u8, protocol: u8, scope: u8, rtype: u8) -> [u8; 12] {
    [
        family, dst_len, 0, 0, table, protocol, scope, rtype, 0, 0, 0, 0,
    ]
}

/// The one-byte table field of `rtmsg` / `fib_rule_hdr`: tables above 255 only fit in
/// the u32 attribute (RTA_TABLE / FRA_TABLE), and the byte is then RT_TABLE_UNSPEC, as
/// iproute2 sends it.
pub(crate) fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC)
}

/// AF_INET or AF_INET6, as the family byte of a header.
pub(crate) fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

/// The address's octets in network order, as attribute payload.
pub(crate) fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An address from a 4- or 16-byte attribute payload.
pub(crate) fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// The native-order u16 at byte offset `at`, if there is one.
pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The native-order u32 at byte offset `at`, if there is one.
pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Iterates `(type, payload)` of the netlink attributes in `data`, stopping at the first
/// malformed one.
pub(crate) fn attrs(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(data, 0)?);
        let ty = u16_at(data, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let payload = &data[4..len];
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

fn msg_name(ty: u16) -> &'static str {
    match ty {
        RTM_NEWLINK => "RTM_NEWLINK",
        RTM_GETLINK => "RTM_GETLINK",
        RTM_NEWADDR => "RTM_NEWADDR",
        RTM_NEWROUTE => "RTM_NEWROUTE",
        RTM_DELROUTE => "RTM_DELROUTE",
        RTM_GETROUTE => "RTM_GETROUTE",
        RTM_NEWRULE => "RTM_NEWRULE",
        RTM_DELRULE => "RTM_DELRULE",
        RTM_GETRULE => "RTM_GETRULE",
        _ => "netlink request",
    }
}

pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a NETLINK_ROUTE socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(context(last_error(), "open rtnetlink socket"));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain old data for which all-zeroes is valid.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `sa` is a live sockaddr_nl and we pass its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(context(last_error(), "bind rtnetlink socket"));
        }
        // Best effort: extended acks give the kernel's own error text; capped acks keep
        // error replies small. Old kernels without them still work.
        let _ = setsockopt_int(fd.as_raw_fd(), SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = setsockopt_int(fd.as_raw_fd(), SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a live timeval and we pass its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(context(last_error(), "set rtnetlink receive timeout"));
        }
        Ok(Netlink {
            fd,
            seq: 0,
            buf: vec![0u8; RECV_BUF],
        })
    }

    /// Sends `msg` (with NLM_F_ACK) and processes replies until the ack or the end of a
    /// dump; `on_msg(type, payload)` sees every data message of this request.
    pub(crate) fn transact(
        &mut self,
        mut msg: Msg,
        mut on_msg: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let ty = u16_at(&msg.buf, 4).unwrap_or(0);
        let flags = u16_at(&msg.buf, 6).unwrap_or(0) | NLM_F_ACK;
        msg.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        let bytes = msg.finish(seq);
        // SAFETY: sockaddr_nl is plain old data; all-zeroes addresses the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `bytes` is a live buffer of the given length and `sa` a live
            // sockaddr_nl of the given size; the kernel only reads them.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                break;
            }
            let err = last_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(context(err, format!("send {}", msg_name(ty))));
            }
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        loop {
            // SAFETY: `self.buf` is a live, writable buffer of the given length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let err = last_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(context(
                    err,
                    format!("receive {} reply from the kernel", msg_name(ty)),
                ));
            }
            let mut data = &self.buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32_at(data, 0).unwrap_or(0) as usize;
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed netlink reply to {}", msg_name(ty)),
                    ));
                }
                let mty = u16_at(data, 4).unwrap_or(0);
                let mflags = u16_at(data, 6).unwrap_or(0);
                let mseq = u32_at(data, 8).unwrap_or(0);
                let payload = &data[NLMSG_HDRLEN..len];
                data = data.get((len + 3) & !3..).unwrap_or(&[]);
                if mseq != seq {
                    continue; // a stale reply to an earlier request
                }
                match mty {
                    NLMSG_ERROR => {
                        let code = u32_at(payload, 0).map(|c| c as i32).unwrap_or(-libc::EIO);
                        if code == 0 {
                            return Ok(()); // the ack
                        }
                        let err = io::Error::from_raw_os_error(-code);
                        let what = format!("netlink {}", msg_name(ty));
                        return Err(match ext_ack_message(payload, mflags) {
                            Some(text) => context_detail(err, what, format!("kernel: {text}")),
                            None => context(err, what),
                        });
                    }
                    NLMSG_DONE if dump => {
                        let code = u32_at(payload, 0).map(|c| c as i32).unwrap_or(0);
                        if code < 0 {
                            return Err(context(
                                io::Error::from_raw_os_error(-code),
                                format!("netlink {} dump", msg_name(ty)),
                            ));
                        }
                        return Ok(());
                    }
                    _ => on_msg(mty, payload),
                }
            }
        }
    }

    /// Looks a link up by name; `Ok(None)` if there is none.
    pub(crate) fn link_by_name(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = Msg::new(RTM_GETLINK, 0);
        msg.header(&ifinfomsg(libc::AF_UNSPEC as u8, 0, 0, 0));
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        msg.attr(IFLA_IFNAME, &cname);
        let mut found = None;
        let res = self.transact(msg, |ty, payload| {
            if ty == RTM_NEWLINK {
                found = parse_link(payload);
            }
        });
        match res {
            Ok(()) => Ok(found),
            Err(e) if super::sys::os_error_of(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(context(e, format!("look up interface {name}"))),
        }
    }

    /// Sets MTU and/or administrative state of a link.
    pub(crate) fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        mtu: Option<u32>,
    ) -> io::Result<()> {
        let (flags, change) = match up {
            Some(true) => (libc::IFF_UP as u32, libc::IFF_UP as u32),
            Some(false) => (0, libc::IFF_UP as u32),
            None => (0, 0),
        };
        let mut msg = Msg::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(libc::AF_UNSPEC as u8, index, flags, change));
        if let Some(mtu) = mtu {
            msg.attr_u32(IFLA_MTU, mtu);
        }
        self.transact(msg, |_, _| {})
    }

    /// Detaches a netlink-attached XDP program (`ip link set dev X xdp off`); `flags` are
    /// the `XDP_FLAGS_*` mode the program was attached with.
    pub(crate) fn detach_xdp(&mut self, index: u32, flags: u32) -> io::Result<()> {
        let mut nested = Msg { buf: Vec::new() };
        nested.attr(IFLA_XDP_FD, &(-1i32).to_ne_bytes());
        nested.attr_u32(IFLA_XDP_FLAGS, flags);
        let mut msg = Msg::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(libc::AF_UNSPEC as u8, index, 0, 0));
        msg.attr(IFLA_XDP | NLA_F_NESTED, &nested.buf);
        self.transact(msg, |_, _| {})
    }

    /// Sets the length of a link's transmit queue (`ip link set X txqueuelen N`): for a
    /// TUN, the ring between the kernel's senders and the reading process.
    pub(crate) fn set_tx_queue_len(&mut self, index: u32, len: u32) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(libc::AF_UNSPEC as u8, index, 0, 0));
        msg.attr_u32(IFLA_TXQLEN, len);
        self.transact(msg, |_, _| {})
    }

    /// Caps the number of segments the kernel puts in one GSO packet for this link.
    pub(crate) fn set_gso_max_segs(&mut self, index: u32, segs: u32) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWLINK, 0);
        msg.header(&ifinfomsg(libc::AF_UNSPEC as u8, index, 0, 0));
        msg.attr_u32(IFLA_GSO_MAX_SEGS, segs);
        self.transact(msg, |_, _| {})
    }

    /// Adds (or replaces) an address without duplicate address detection.
    pub(crate) fn add_address(&mut self, index: u32, ip: IpAddr, prefix_len: u8) -> io::Result<()> {
        let mut msg = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE);
        msg.header(&ifaddrmsg(
            family_of(ip),
            prefix_len,
            IFA_F_NODAD as u8,
            RT_SCOPE_UNIVERSE,
            index,
        ));
        let bytes = ip_bytes(&ip);
        if ip.is_ipv4() {
            msg.attr(IFA_LOCAL, &bytes);
        }
        msg.attr(IFA_ADDRESS, &bytes);
        msg.attr_u32(IFA_FLAGS, IFA_F_NODAD);
        self.transact(msg, |_, _| {})
    }

    /// Adds/replaces or deletes the route `dst/prefix_len dev index` in `table`.
    pub(crate) fn route(
        &mut self,
        op: RouteOp,
        table: u32,
        index: u32,
        dst: IpAddr,
        prefix_len: u8,
    ) -> io::Result<()> {
        let (ty, flags, proto, scope) = match op {
            RouteOp::Replace => {
                let scope = if dst.is_ipv4() {
                    RT_SCOPE_LINK
                } else {
                    RT_SCOPE_UNIVERSE
                };
                (
                    RTM_NEWROUTE,
                    NLM_F_CREATE | NLM_F_REPLACE,
                    RTPROT_STATIC,
                    scope,
                )
            }
            // Protocol 0 and scope NOWHERE match a route of any origin and scope, as
            // `ip route del` does; the device still has to match.
            RouteOp::Delete => (RTM_DELROUTE, 0, 0, RT_SCOPE_NOWHERE),
        };
        let mut msg = Msg::new(ty, flags);
        msg.header(&rtmsg(
            family_of(dst),
            prefix_len,
            table_byte(table),
            proto,
            scope,
            RTN_UNICAST,
        ));
        if prefix_len > 0 {
            msg.attr(RTA_DST, &ip_bytes(&dst));
        }
        msg.attr_u32(RTA_OIF, index);
        msg.attr_u32(RTA_TABLE, table);
        self.transact(msg, |_, _| {})
    }

    /// The type (RTN_LOCAL, RTN_UNICAST, ...) of the route the kernel would use to reach
    /// `dst`; `None` if it has none (unreachable).
    pub(crate) fn route_type_to(&mut self, dst: IpAddr) -> io::Result<Option<u8>> {
        Ok(self.route_to(dst)?.map(|r| r.route_type))
    }

    /// The route the kernel would use to reach `dst` (`ip route get`); `None` if it has
    /// none (unreachable).
    pub(crate) fn route_to(&mut self, dst: IpAddr) -> io::Result<Option<Route>> {
        let bits = if dst.is_ipv4() { 32 } else { 128 };
        let mut msg = Msg::new(RTM_GETROUTE, 0);
        msg.header(&rtmsg(family_of(dst), bits, 0, 0, 0, 0));
        msg.attr(RTA_DST, &ip_bytes(&dst));
        let mut found = None;
        let res = self.transact(msg, |ty, payload| {
            if ty == RTM_NEWROUTE {
                found = parse_route(payload);
            }
        });
        match res {
            Ok(()) => Ok(found),
            Err(e)
                if matches!(
                    super::sys::os_error_of(&e),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ESRCH)
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Dumps all routes of one address family (all tables).
    pub(crate) fn routes(&mut self, ipv6: bool) -> io::Result<Vec<Route>> {
        let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
        let mut msg = Msg::new(RTM_GETROUTE, NLM_F_DUMP);
        msg.header(&rtmsg(family, 0, 0, 0, 0, 0));
        let mut out = Vec::new();
        self.transact(msg, |ty, payload| {
            if ty == RTM_NEWROUTE
                && let Some(r) = parse_route(payload)
            {
                out.push(r);
            }
        })?;
        Ok(out)
    }
}

/// Finds NLMSGERR_ATTR_MSG in an error reply sent with NETLINK_CAP_ACK (the original
/// request's payload is then omitted, so the TLVs follow its 16-byte header).
fn ext_ack_message(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    // error code (4) + original nlmsghdr (16), payload capped.
    let tlvs = payload.get(4 + NLMSG_HDRLEN..)?;
    attrs(tlvs)
        .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
        .map(|(_, v)| {
            let v = v.split(|b| *b == 0).next().unwrap_or(&[]);
            String::from_utf8_lossy(v).into_owned()
        })
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    payload.get(..16)?; // ifinfomsg
    let mut link = Link {
        hw_type: u16_at(payload, 2)?,
        mtu: None,
        xdp: None,
        kind: None,
    };
    for (ty, v) in attrs(payload.get(16..)?) {
        match ty {
            IFLA_MTU => link.mtu = u32_at(v, 0),
            IFLA_XDP => {
                let (mut attached, mut prog) = (0u8, 0u32);
                for (xty, xv) in attrs(v) {
                    match xty {
                        IFLA_XDP_ATTACHED => attached = xv.first().copied().unwrap_or(0),
                        IFLA_XDP_PROG_ID => prog = u32_at(xv, 0).unwrap_or(0),
                        _ => {}
                    }
                }
                if attached != 0 {
                    link.xdp = Some((prog, attached));
                }
            }
            IFLA_LINKINFO => {
                for (ity, iv) in attrs(v) {
                    if ity == IFLA_INFO_KIND {
                        let iv = iv.split(|b| *b == 0).next().unwrap_or(&[]);
                        link.kind = Some(String::from_utf8_lossy(iv).into_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Some(link)
}

fn parse_route(payload: &[u8]) -> Option<Route> {
    let family = *payload.first()?;
    let prefix_len = *payload.get(1)?;
    let mut table = u32::from(*payload.get(4)?);
    let route_type = *payload.get(7)?;
    let mut dst = None;
    let mut oif = None;
    let mut gateway = false;
    for (ty, v) in attrs(payload.get(12..)?) {
        match ty {
            RTA_DST => dst = ip_from_bytes(v),
            RTA_OIF => oif = u32_at(v, 0),
            RTA_TABLE => table = u32_at(v, 0).unwrap_or(table),
            RTA_GATEWAY | RTA_VIA | RTA_MULTIPATH => gateway = true,
            _ => {}
        }
    }
    let dst = match dst {
        Some(d) => d,
        None if family == libc::AF_INET as u8 => IpAddr::from([0u8; 4]),
        None if family == libc::AF_INET6 as u8 => IpAddr::from([0u8; 16]),
        None => return None,
    };
    Some(Route {
        dst,
        prefix_len,
        oif,
        table,
        route_type,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_parse_and_stop_on_garbage() {
        let mut m = Msg::new(RTM_NEWROUTE, 0);
        m.attr_u32(RTA_OIF, 7);
        m.attr(RTA_DST, &[198, 18, 0, 0]);
        m.attr(IFLA_IFNAME, b"abc\0");
        let body = m.buf[NLMSG_HDRLEN..].to_vec();
        let v: Vec<_> = attrs(&body).collect();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], (RTA_OIF, &7u32.to_ne_bytes()[..]));
        assert_eq!(v[1].1, &[198, 18, 0, 0]);
        assert_eq!(v[2].1, b"abc\0");
        // A truncated attribute ends the iteration instead of panicking.
        assert_eq!(attrs(&body[..body.len() - 3]).count(), 2);
        assert_eq!(attrs(&[0xff, 0xff, 0, 0]).count(), 0);
        assert_eq!(attrs(&[]).count(), 0);
    }
}
