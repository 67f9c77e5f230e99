//! Test fixtures: a throwaway network namespace with a veth pair, an XDP program on one
//! end redirecting into an XSKMAP, a raw packet sender on the other end, and frames that
//! carry a sequence number.

#![allow(dead_code)] // each test binary uses a different subset

use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flynode_xsk::rawbpf::{self, AttachMode};
use flynode_xsk::{XskConfig, XskSocket};

/// Root is needed for namespaces, BPF and AF_XDP; without it tests pass vacuously.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root");
    }
    root
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flyxsk-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        Netns { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a thread that has entered this namespace, so everything it creates
    /// (sockets, links, interface lookups) belongs there. A panic in `f` is re-raised.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open netns");
                // SAFETY: setns on a valid namespace fd; it changes this thread only,
                // and the thread ends with the scope.
                let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
                f()
            });
            match thread.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// A namespace holding veth `a` <-> `b`, both up, with IPv6 off so the kernel sends no
/// DAD/RS/MLD packets of its own.
pub fn veth_netns() -> Netns {
    let ns = Netns::new();
    ns.run(|| {
        for conf in ["all", "default"] {
            // Per-namespace sysctls resolve against the opening thread's namespace.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
        }
    });
    let netns = ns.name().to_owned();
    let ip_in_ns = |command: &str| {
        // `dev`/`name` spelled out: a bare `a` would parse as `address`.
        let mut args = vec!["-n", netns.as_str()];
        args.extend(command.split_whitespace());
        ip(&args);
    };
    ip_in_ns("link add name a type veth peer name b");
    ip_in_ns("link set dev a address 02:00:00:00:00:0a up");
    ip_in_ns("link set dev b address 02:00:00:00:00:0b up");
    // Carrier-on is applied by the kernel's linkwatch work, up to a second later; until
    // then `a` transmits through `noop` qdisc, which drops everything. Wait for it.
    let ready = eventually(Duration::from_secs(5), || {
        let out = Command::new("ip")
            .args(["-n", netns.as_str(), "-o", "link", "show"])
            .output()
            .expect("run ip");
        let links = String::from_utf8_lossy(&out.stdout);
        ["a@b", "b@a"].iter().all(|dev| {
            links
                .lines()
                .find(|line| line.contains(&format!(": {dev}:")))
                .is_some_and(|line| line.contains("state UP") && !line.contains("qdisc noop"))
        })
    });
    assert!(ready, "veth pair in {netns} did not come up");
    ns
}

/// `xdp_redirect_xsk(map, XDP_PASS)` attached to an interface; detached on drop.
pub struct Redirect {
    pub mode: AttachMode,
    pub map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl Redirect {
    /// Attaches in `mode`.
    pub fn attach(ifindex: u32, mode: AttachMode) -> io::Result<Redirect> {
        let map = rawbpf::create_xskmap(4)?;
        let prog = rawbpf::load_xdp(
            "xsk_test",
            &rawbpf::xdp_redirect_xsk(map.as_raw_fd(), rawbpf::XDP_PASS),
        )?;
        let link = rawbpf::attach_xdp(prog.as_fd(), ifindex, mode)?;
        Ok(Redirect {
            mode,
            map,
            _prog: prog,
            _link: link,
        })
    }

    /// Native if the device allows it, else generic.
    pub fn attach_best(ifindex: u32) -> Redirect {
        Redirect::attach(ifindex, AttachMode::Native)
            .or_else(|native| {
                eprintln!("native XDP refused ({native}); using generic");
                Redirect::attach(ifindex, AttachMode::Generic)
            })
            .expect("attach XDP")
    }

    pub fn register(&self, socket: &XskSocket) {
        rawbpf::map_update_u32(
            self.map.as_fd(),
            socket.queue(),
            socket.fd().as_raw_fd() as u32,
        )
        .expect("insert socket into XSKMAP");
    }
}

/// An XDP redirect on `b` in `mode` and a socket on `b` queue 0 registered with it.
/// Must run inside the namespace.
pub fn socket_on_b(mode: AttachMode, config: &XskConfig) -> (Redirect, XskSocket) {
    let b = rawbpf::ifindex("b").expect("ifindex b");
    let redirect = Redirect::attach(b, mode).expect("attach XDP to b");
    let socket = XskSocket::open(b, 0, config).expect("open AF_XDP socket on b");
    redirect.register(&socket);
    (redirect, socket)
}

/// An AF_PACKET socket that writes raw Ethernet frames out of one interface.
pub struct Sender {
    fd: OwnedFd,
    ifindex: u32,
}

impl Sender {
    pub fn on(ifname: &str) -> Sender {
        let ifindex = rawbpf::ifindex(ifname).expect("sender ifindex");
        // SAFETY: plain socket(2). Protocol 0: this socket receives nothing.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            raw >= 0,
            "socket(AF_PACKET): {}",
            io::Error::last_os_error()
        );
        // SAFETY: `raw` is a new fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Sender { fd, ifindex }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` is readable for its length; `addr` is a sockaddr_ll of the size
        // given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            frame.len() as isize,
            "sendto(AF_PACKET): {}",
            io::Error::last_os_error()
        );
    }
}

const MARKER: &[u8; 6] = b"FLYXSK";
const PAYLOAD_AT: usize = 14 + 20 + 8;
pub const UDP_PORT: u16 = 51820;

/// An Ethernet/IPv4/UDP frame of exactly `frame_len` bytes (at least 52), a -> b,
/// 198.18.0.1 -> 198.18.0.2, whose payload is a marker, `seq`, and bytes derived from
/// `seq` (so a mix-up between frames shows).
pub fn udp_frame(seq: u32, frame_len: usize) -> Vec<u8> {
    assert!(frame_len >= PAYLOAD_AT + MARKER.len() + 4);
    let mut f = Vec::with_capacity(frame_len);
    f.extend_from_slice(&MAC_B);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (frame_len - 14) as u16;
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&ip_len.to_be_bytes());
    iph[4..6].copy_from_slice(&(seq as u16).to_be_bytes());
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&[198, 18, 0, 1]);
    iph[16..20].copy_from_slice(&[198, 18, 0, 2]);
    let checksum = ipv4_checksum(&iph);
    iph[10..12].copy_from_slice(&checksum.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&UDP_PORT.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend_from_slice(MARKER);
    f.extend_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761);
    while f.len() < frame_len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        f.push((x >> 16) as u8);
    }
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number of a frame made by [`udp_frame`], None for anything else.
pub fn test_seq(frame: &[u8]) -> Option<u32> {
    let marker = frame.get(PAYLOAD_AT..PAYLOAD_AT + MARKER.len())?;
    if marker != MARKER || frame[6..12] != MAC_A {
        return None;
    }
    let seq = frame.get(PAYLOAD_AT + MARKER.len()..PAYLOAD_AT + MARKER.len() + 4)?;
    Some(u32::from_be_bytes(seq.try_into().ok()?))
}

/// Receives until `want` test frames arrived or `timeout` passed; returns them (other
/// frames are ignored).
pub fn receive(socket: &mut XskSocket, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::with_capacity(want);
    while got.len() < want && Instant::now() < deadline {
        let n = socket.recv_batch(64, |frame| {
            if test_seq(frame).is_some() {
                got.push(frame.to_vec());
            }
        });
        if n == 0 {
            socket.wait(Duration::from_millis(10)).expect("wait");
        }
    }
    got
}

/// Waits until `cond` holds, up to `timeout`; returns whether it did.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the kernel counted, for failure messages: the socket's counters and both veth
/// ends' driver statistics (XDP verdicts, drops). Must run inside the namespace.
pub fn diagnose(socket: &XskSocket) -> String {
    let mut out = format!("socket: {:?}\n", socket.statistics());
    for dev in ["a", "b"] {
        if let Ok(o) = Command::new("ethtool").args(["-S", dev]).output() {
            let stats = String::from_utf8_lossy(&o.stdout);
            let nonzero: Vec<&str> = stats
                .lines()
                .filter(|l| !l.trim_end().ends_with(": 0"))
                .collect();
            out += &format!("{dev}: {}\n", nonzero.join(" "));
        }
    }
    if let Ok(o) = Command::new("ip").args(["-s", "-d", "link"]).output() {
        out += &String::from_utf8_lossy(&o.stdout);
    }
    out
}
