//! The mesh at work: threads that move packets between the TUN, the UDP socket and the
//! [`Core`].
//!
//! Work is split by direction, one thread each, because on a 2-core host the two
//! directions are the two independent streams of work and each one is a pipeline that
//! batches best when a single thread owns it end to end:
//!
//! - `mesh-tx`: TUN → encrypt → UDP. Reads batches from the TUN (with offloads, one
//!   read returns a whole TSO super-packet, split into MTU-sized packets), encrypts each
//!   for the peer owning its destination, and sends them with one `sendmmsg` carrying
//!   UDP GSO runs.
//! - `mesh-rx`: UDP → decrypt → TUN (or the forwarding layer). Receives with
//!   `recvmmsg` + UDP GRO, decrypts, and writes the inner packets to the TUN coalesced
//!   (GRO), a whole batch in one `io_uring_enter`, or, for the forwarding port on our
//!   mesh address, hands them to the [`Forwarder`] in the same thread, without touching
//!   the kernel. After a light batch it also sends what the kernel answered inside its
//!   write (an echo reply, an ACK), which would otherwise wait for `mesh-tx` to wake;
//!   one lock (`tun_reader`, uncontended but for that moment) keeps TUN reads and their
//!   sends in order between the two threads.
//!
//! The forwarding layer plugs in through [`Forwarder`]: it sees inner packets for the
//! forwarding port (after decryption, on the receiving thread) and TUN packets to
//! addresses no peer owns (containers' replies, on `mesh-tx`), and answers through a
//! [`Port`]: packets into the TUN, inner packets into the mesh, batched with the
//! thread's own output.
//! - `mesh-timers`: boringtun's timers every 100 ms (rekey, keepalive, retransmits).
//!
//! The threads share the [`Core`] without a global lock (see its docs): they contend
//! only on one peer's session mutex at the same instant.
use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use x25519_dalek::StaticSecret;

use crate::core::{
    Core, DATA_OVERHEAD, Decap, Drop, Encap, MIN_OUT_BUF, Peer, PeerConfig, PeersDiff,
};
use crate::io::route;
use crate::io::tun::{TunConfig, TunDevice, TunRecvBatch, TunSendBatch, VIRTIO_NET_HDR_LEN};
use crate::io::udp::{RecvBatch, SendBatch, UdpSocket};
use crate::sched::ThreadPolicy;

/// Room for any message we build: a 64 KiB inner packet plus overhead.
const BUF: usize = 65536 + 64;
const TIMER_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Where the WireGuard socket listens (`[::]:51820`: dual-stack).
    pub listen: SocketAddr,
    /// SO_RCVBUF/SO_SNDBUF of the UDP socket.
    pub socket_buffer: usize,
    pub tun: TunConfig,
    /// Inner UDP port on our mesh address whose packets go to the [`Forwarder`].
    pub forward_port: u16,
    /// Scheduling of `mesh-tx` (see [`crate::sched`]).
    pub tx_policy: ThreadPolicy,
    /// Scheduling of `mesh-rx`.
    pub rx_policy: ThreadPolicy,
}

/// The forwarding layer's hooks into the mesh's data path. Both run on the mesh's own
/// threads (and on AF_XDP consumer threads), once per packet: no blocking, no
/// per-packet allocation.
pub trait Forwarder: Send + Sync + 'static {
    /// A decrypted inner packet for the forwarding port on our mesh address, from peer
    /// `from` (its source address already checked against the peer's addresses).
    fn inbound(&self, from: &Peer, packet: &[u8], port: &mut Port<'_>);
    /// A packet read from the TUN whose destination no peer owns: a container's reply
    /// routed into the TUN by policy rules. Without a forwarder these are dropped as
    /// `no_route`.
    fn unrouted(&self, packet: &[u8], port: &mut Port<'_>);
}

/// What became of a packet offered to [`Port::build_tun_partial`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunBuilt {
    /// In the TUN batch, written with it.
    Queued,
    /// The builder made nothing (the packet cannot be built: too large for IP).
    NotBuilt,
    /// The batch refused what was built (counted in `tun_tx_errors`).
    Refused,
}

/// Where a [`Forwarder`] (or any caller holding a [`MeshReceiver`]) sends its output:
/// the calling thread's own batches, written out when the thread ends its batch.
pub struct Port<'a> {
    shared: &'a Shared,
    tun: &'a mut TunSendBatch,
    udp: &'a mut SendBatch,
}

impl Port<'_> {
    /// Queues an IP packet for the TUN: the kernel receives it as if it had arrived on
    /// the mesh interface. Returns false (and counts a TUN error) when the packet is
    /// not a valid IP packet for the TUN.
    pub fn to_tun(&mut self, packet: &[u8]) -> bool {
        if self.tun.is_full() {
            self.shared.write_tun(self.tun);
        }
        let ok = self.tun.push(packet);
        if !ok {
            self.shared.counters.tun_tx_errors.fetch_add(1, Relaxed);
        }
        ok
    }

    /// Builds a packet for the TUN in place whose transport checksum the kernel completes:
    /// `build` gets a buffer of `max_len` bytes and returns `(length, csum_start,
    /// csum_offset)` with the folded pseudo-header sum in the checksum field (see
    /// [`TunSendBatch::commit_partial`]), or `None` for nothing. Says what became of it,
    /// so that the caller counts only what was queued as delivered.
    pub fn build_tun_partial(
        &mut self,
        max_len: usize,
        build: impl FnOnce(&mut [u8]) -> Option<(usize, u16, u16)>,
    ) -> TunBuilt {
        if self.tun.is_full() {
            self.shared.write_tun(self.tun);
        }
        let Some((len, start, offset)) = build(self.tun.reserve(max_len)) else {
            return TunBuilt::NotBuilt;
        };
        if !self.tun.commit_partial(len, start, offset) {
            self.shared.counters.tun_tx_errors.fetch_add(1, Relaxed);
            return TunBuilt::Refused;
        }
        TunBuilt::Queued
    }

    /// Encrypts an inner IP packet for the peer that owns its destination address and
    /// queues it for the network.
    pub fn to_mesh(&mut self, packet: &[u8]) -> Result<(), Drop> {
        let core = &self.shared.core;
        let sent = self
            .shared
            .encrypt_into(self.udp, packet, |p, out| Some(core.encapsulate(p, out)));
        sent.unwrap_or(Ok(())) // `encapsulate` counts a packet no peer owns itself
    }

    /// Encrypts an inner IP packet for `peer` and queues it for the network.
    pub fn to_peer(&mut self, peer: &Peer, packet: &[u8]) -> Result<(), Drop> {
        let core = &self.shared.core;
        let sent = self.shared.encrypt_into(self.udp, packet, |p, out| {
            Some(core.encapsulate_for(peer, p, out))
        });
        sent.unwrap_or(Ok(())) // always `Some`: the peer is given
    }

    /// The mesh's core (peer lookups).
    pub fn core(&self) -> &Core {
        &self.shared.core
    }
}

/// Placeholder destination of a reservation whose peer the encryption decides.
const UNROUTED: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);

/// Counters of the driver (the core counts protocol drops itself).
#[derive(Debug, Default)]
pub struct DriverCounters {
    pub tun_rx_packets: AtomicU64,
    pub tun_tx_packets: AtomicU64,
    pub tun_tx_errors: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    pub udp_tx_datagrams: AtomicU64,
    pub udp_tx_dropped: AtomicU64,
    /// Datagrams the mesh socket received but could not use (truncated data or
    /// control messages; see [`crate::io::udp::RecvBatch::dropped`]).
    pub udp_rx_dropped: AtomicU64,
    /// Inner packets handed to the forwarder.
    pub forwarded: AtomicU64,
    /// TUN packets to no peer handed to the forwarder.
    pub unrouted: AtomicU64,
    /// TUN packets (of `tun_rx_packets`) read by a receiving thread right after its
    /// own write, not by `mesh-tx` (see [`MeshReceiver::flush`]).
    pub tun_rx_inline: AtomicU64,
    pub io_errors: AtomicU64,
}

/// The body of one mesh thread.
type ThreadBody = Box<dyn FnOnce(&Arc<Shared>) + Send>;

/// What the mesh threads share.
struct Shared {
    core: Arc<Core>,
    udp: UdpSocket,
    tun: TunDevice,
    stop: AtomicBool,
    counters: DriverCounters,
    local: Local,
    forwarder: Option<Arc<dyn Forwarder>>,
    /// Held by whoever reads the TUN and sends what it read (`mesh-tx`, or a receiver
    /// answering inline, see [`MeshReceiver::flush`]), from the read until the send: a
    /// packet read later can never leave before one read earlier.
    tun_reader: Mutex<()>,
}

/// A running mesh: TUN, socket, threads.
pub struct Mesh {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Kernel routes we installed into the TUN (one per peer address).
    routes: Mutex<BTreeSet<IpAddr>>,
    /// For [`Mesh::send_to`] and control operations, which run on other threads.
    sender: Mutex<(SendBatch, Vec<u8>)>,
}

impl Mesh {
    /// Creates the TUN and the socket and starts the threads. Peers come with
    /// [`Mesh::set_peers`]; packets for the forwarding port go to `forwarder` (without
    /// one they are dropped and counted as `forwarded`).
    pub fn start(
        config: MeshConfig,
        key: StaticSecret,
        forwarder: Option<Arc<dyn Forwarder>>,
    ) -> io::Result<Mesh> {
        let tun = TunDevice::create(&config.tun).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("creating TUN device `{}`: {e}", config.tun.name),
            )
        })?;
        let udp = UdpSocket::bind(config.listen, config.socket_buffer)
            .map_err(|e| io::Error::new(e.kind(), format!("binding UDP {}: {e}", config.listen)))?;
        let shared = Arc::new(Shared {
            core: Arc::new(Core::new(key)),
            udp,
            tun,
            stop: AtomicBool::new(false),
            counters: DriverCounters::default(),
            local: Local {
                v6: config.tun.ipv6,
                v4: config.tun.ipv4,
                forward_port: config.forward_port,
            },
            forwarder,
            tun_reader: Mutex::new(()),
        });
        let spawn = |name: &str, policy: Option<ThreadPolicy>, f: ThreadBody| {
            let shared = Arc::clone(&shared);
            let thread = name.to_owned();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    if let Some(policy) = policy
                        && let Err(e) = policy.apply_to_current_thread()
                    {
                        // Still correct, only slower when senders share the CPU.
                        tracing::warn!(thread, "data-path scheduling not applied: {e}");
                    }
                    f(&shared)
                })
                .map_err(|e| io::Error::new(e.kind(), format!("starting thread {name}: {e}")))
        };
        let threads = vec![
            spawn("mesh-tx", Some(config.tx_policy), Box::new(|s| s.tx_loop()))?,
            spawn("mesh-rx", Some(config.rx_policy), Box::new(Shared::rx_loop))?,
            spawn("mesh-timers", None, Box::new(|s| s.timer_loop()))?,
        ];
        Ok(Mesh {
            shared,
            threads,
            routes: Mutex::new(BTreeSet::new()),
            sender: Mutex::new((SendBatch::new(64), vec![0u8; BUF])),
        })
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.shared.core
    }

    pub fn counters(&self) -> &DriverCounters {
        &self.shared.counters
    }

    pub fn tun_name(&self) -> &str {
        self.shared.tun.name()
    }

    pub fn mtu(&self) -> u16 {
        self.shared.tun.mtu()
    }

    pub fn tun_ifindex(&self) -> u32 {
        self.shared.tun.ifindex()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.udp.local_addr()
    }

    /// Applies a new peer set (see [`Core::set_peers`]) and makes the kernel route
    /// exactly the peers' addresses into the TUN. A route the kernel refuses is
    /// returned as an error after everything else was applied.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) -> io::Result<PeersDiff> {
        let wanted: BTreeSet<IpAddr> = peers.iter().flat_map(|p| p.allowed.clone()).collect();
        let diff = {
            let mut sender = self.sender.lock();
            let (batch, scratch) = &mut *sender;
            let diff = self
                .shared
                .core
                .set_peers(peers, scratch, &mut |dst, msg| batch.push(dst, msg));
            self.flush(batch);
            diff
        };
        let mut routes = self.routes.lock();
        let mut first_error = None;
        let ifindex = self.shared.tun.ifindex();
        for addr in routes.difference(&wanted).copied().collect::<Vec<_>>() {
            match route::del_route(ifindex, addr, host_prefix(addr)) {
                Ok(()) => {
                    routes.remove(&addr);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for addr in wanted.difference(&routes.clone()) {
            match route::add_route(ifindex, *addr, host_prefix(*addr)) {
                Ok(()) => {
                    routes.insert(*addr);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(diff),
        }
    }

    /// Starts handshakes with every peer that has no session yet.
    pub fn initiate_all(&self) {
        let mut sender = self.sender.lock();
        let (batch, scratch) = &mut *sender;
        self.shared
            .core
            .initiate_all(scratch, &mut |dst, msg| batch.push(dst, msg));
        self.flush(batch);
    }

    /// Encrypts an inner IP packet for the node `name` and sends it.
    pub fn send_to(&self, name: &str, packet: &[u8]) -> Result<(), Drop> {
        let mut sender = self.sender.lock();
        let (batch, out) = &mut *sender;
        let result = match self.shared.core.encapsulate_to(name, packet, out) {
            Encap::Send { dst, len } => {
                batch.push(dst, &out[..len]);
                Ok(())
            }
            Encap::Queued => Ok(()),
            Encap::Dropped(d) => Err(d),
        };
        self.flush(batch);
        result
    }

    pub fn rotate_key(&self, key: StaticSecret) {
        self.shared.core.rotate_key(key);
    }

    /// A receive path for WireGuard datagrams that arrive somewhere other than the
    /// mesh's own socket (AF_XDP): each receiving thread owns one.
    pub fn receiver(&self) -> MeshReceiver {
        MeshReceiver::new(Arc::clone(&self.shared))
    }

    fn flush(&self, batch: &mut SendBatch) {
        self.shared.send(batch);
    }

    /// Stops the threads and removes the TUN (and with it every route into it).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl std::ops::Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn host_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl Shared {
    /// Encrypts `packet` straight into a reservation in `batch` (the ciphertext is
    /// written once, where `sendmmsg` reads it; a full batch is sent first) and commits
    /// it to the destination the encryption chose. `encap` returns `None` when no peer
    /// owns the packet, and so does this; a packet queued behind a handshake, or
    /// dropped, leaves the batch as it was.
    fn encrypt_into(
        &self,
        batch: &mut SendBatch,
        packet: &[u8],
        encap: impl FnOnce(&[u8], &mut [u8]) -> Option<Encap>,
    ) -> Option<Result<(), Drop>> {
        if batch.is_full() {
            self.send(batch);
        }
        let room = (packet.len() + DATA_OVERHEAD).max(MIN_OUT_BUF);
        let slot = batch.reserve(UNROUTED, room);
        Some(match encap(packet, slot)? {
            Encap::Send { dst, len } => {
                batch.commit_to(dst, len);
                Ok(())
            }
            Encap::Queued => Ok(()),
            Encap::Dropped(d) => Err(d),
        })
    }

    fn send(&self, batch: &mut SendBatch) {
        if batch.is_empty() {
            return;
        }
        match self.udp.send_batch(batch) {
            Ok(stats) => {
                let c = &self.counters;
                c.udp_tx_datagrams.fetch_add(stats.sent as u64, Relaxed);
                c.udp_tx_dropped.fetch_add(stats.dropped as u64, Relaxed);
            }
            Err(_) => {
                self.counters.io_errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// Whether a batch receive produced something to process. I/O errors are counted
    /// and the loop goes on, after a pause so a persistent error does not spin a core.
    fn received(&self, result: io::Result<usize>, what: &str) -> bool {
        match result {
            Ok(n) => n > 0,
            Err(e) => {
                self.io_error(what, &e);
                false
            }
        }
    }

    fn io_error(&self, what: &str, e: &io::Error) {
        let n = self.counters.io_errors.fetch_add(1, Relaxed);
        if n.is_power_of_two() {
            tracing::warn!(error = %e, count = n + 1, "mesh {what} failed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    fn tx_loop(&self) {
        let mut tun_batch = self.tun.new_recv_batch(128);
        let mut out_batch = SendBatch::new(128);
        // Output of the forwarder (replies it sends back into the TUN, e.g. ICMP).
        let mut tun_out = self.tun.new_send_batch(64);
        while !self.stop.load(Relaxed) {
            let read = {
                let _reading = self.tun_reader.lock();
                let read = self.tun.recv_queued(&mut tun_batch);
                if let Ok(n @ 1..) = read {
                    self.route_from_tun(&tun_batch, &mut out_batch, &mut tun_out);
                    self.counters.tun_rx_packets.fetch_add(n as u64, Relaxed);
                }
                read
            };
            match read {
                Ok(0) => {
                    if let Err(e) = self.tun.wait_readable(&mut tun_batch) {
                        self.io_error("TUN wait", &e);
                    }
                }
                Ok(_) => {}
                Err(e) => self.io_error("TUN read", &e),
            }
        }
    }

    /// Encrypts and sends what a TUN read returned: each packet to the peer owning its
    /// destination, or to the forwarder (a container's reply leaving through the edge).
    /// The caller holds `tun_reader`.
    fn route_from_tun(
        &self,
        tun_batch: &TunRecvBatch,
        out_batch: &mut SendBatch,
        tun_out: &mut TunSendBatch,
    ) {
        let mut unrouted = 0u64;
        for packet in tun_batch.iter() {
            let routed = self.encrypt_into(out_batch, packet, |p, out| {
                self.core.encapsulate_routed(p, out)
            });
            if routed.is_some() {
                continue;
            }
            match &self.forwarder {
                Some(forwarder) => {
                    unrouted += 1;
                    let mut port = Port {
                        shared: self,
                        tun: tun_out,
                        udp: out_batch,
                    };
                    forwarder.unrouted(packet, &mut port);
                }
                None => {
                    self.core.no_route();
                }
            }
        }
        self.counters.unrouted.fetch_add(unrouted, Relaxed);
        self.send(out_batch);
        self.write_tun(tun_out);
    }

    fn rx_loop(self: &Arc<Self>) {
        let mut in_batch = RecvBatch::new(64);
        let mut receiver = MeshReceiver::new(Arc::clone(self));
        while !self.stop.load(Relaxed) {
            let received = self.udp.recv_batch(&mut in_batch);
            if in_batch.dropped() > 0 {
                self.counters
                    .udp_rx_dropped
                    .fetch_add(in_batch.dropped(), Relaxed);
            }
            if !self.received(received, "UDP receive") {
                continue;
            }
            for (src, datagram) in in_batch.iter() {
                receiver.push(src, datagram);
            }
            receiver.flush();
        }
    }

    fn write_tun(&self, batch: &mut TunSendBatch) {
        if batch.is_empty() {
            return;
        }
        let failed = |b: &TunSendBatch| {
            let s = b.stats();
            s.rejected + s.invalid
        };
        let before = failed(batch);
        match self.tun.send_batch(batch) {
            Ok(written) => {
                let c = &self.counters;
                c.tun_tx_packets.fetch_add(written as u64, Relaxed);
                c.tun_tx_errors
                    .fetch_add(failed(batch).saturating_sub(before), Relaxed);
            }
            Err(e) => {
                self.counters.tun_tx_errors.fetch_add(1, Relaxed);
                self.io_error("TUN write", &e);
            }
        }
    }

    fn timer_loop(&self) {
        let mut batch = SendBatch::new(64);
        let mut scratch = vec![0u8; BUF];
        let mut reported = std::time::Instant::now();
        let mut last = (0, 0);
        while !self.stop.load(Relaxed) {
            std::thread::sleep(TIMER_TICK);
            self.core
                .update_timers(&mut scratch, &mut |dst, msg| batch.push(dst, msg));
            self.send(&mut batch);
            if reported.elapsed() >= UNREACHABLE_REPORT {
                reported = std::time::Instant::now();
                last = report_unreachable(&self.core, last);
            }
        }
    }
}

/// How often peers that do not answer are summed up in the log: one line for all of
/// them, never one per peer per attempt (a map of thousands of nodes with hundreds
/// down would otherwise write gigabytes a day).
const UNREACHABLE_REPORT: Duration = Duration::from_secs(60);

/// Logs how many wanted peers do not answer, when there are any or their number
/// changed since `last` (count, failures); returns the new (count, failures).
fn report_unreachable(core: &Core, last: (usize, u64)) -> (usize, u64) {
    let s = core.unreachable();
    let now = (s.peers, s.failures);
    if s.peers > 0 {
        tracing::warn!(
            peers = s.peers,
            oldest_secs = s.oldest_secs,
            oldest = %s.oldest.as_deref().unwrap_or("-"),
            unanswered_handshakes = s.failures,
            "{} peers unreachable, the oldest for {} s; retried with backoff",
            s.peers,
            s.oldest_secs
        );
    } else if last.0 > 0 {
        tracing::info!("every wanted peer answers again");
    }
    now
}

/// The receive half of the mesh for one thread: WireGuard datagrams in (from the mesh's
/// UDP socket, or from AF_XDP), decrypted packets out to the TUN or the forwarding
/// queue, handshake replies out through the mesh socket. Batches are per receiver, so
/// several threads receive in parallel without sharing buffers.
pub struct MeshReceiver {
    shared: Arc<Shared>,
    tun_batch: TunSendBatch,
    replies: SendBatch,
    out: Vec<u8>,
    datagrams: u64,
    /// Reads and writes of the inline answer (see [`Self::flush`]), made on first use.
    inline: Option<Box<(TunRecvBatch, TunSendBatch)>>,
    /// A packet queued for the TUN since the last flush may be answered by the kernel
    /// at once (anything but UDP: an echo request, a TCP segment).
    answerable: bool,
}

/// A flush of at most this many datagrams looks for the kernel's answers in the TUN
/// itself (see [`MeshReceiver::flush`]); a larger one leaves them to `mesh-tx`.
const INLINE_MAX_DATAGRAMS: u64 = 4;

impl MeshReceiver {
    fn new(shared: Arc<Shared>) -> MeshReceiver {
        MeshReceiver {
            tun_batch: shared.tun.new_send_batch(128),
            shared,
            replies: SendBatch::new(64),
            // Decrypted into at the TUN batch's headroom and handed over whole.
            out: vec![0u8; VIRTIO_NET_HDR_LEN + BUF],
            datagrams: 0,
            inline: None,
            answerable: false,
        }
    }

    /// This receiver's output, for a caller that produces packets itself (the edge
    /// forwarding service datagrams on an ingress thread). Flushed by [`Self::flush`].
    pub fn port(&mut self) -> Port<'_> {
        Port {
            shared: &self.shared,
            tun: &mut self.tun_batch,
            udp: &mut self.replies,
        }
    }

    /// Processes one WireGuard datagram from `src`. Outputs are batched until
    /// [`flush`](Self::flush) (or until a batch fills).
    pub fn push(&mut self, src: SocketAddr, datagram: &[u8]) {
        let shared = &*self.shared;
        self.datagrams += 1;
        let replies = &mut self.replies;
        let decap = shared.core.decapsulate(
            src,
            datagram,
            &mut self.out[VIRTIO_NET_HDR_LEN..],
            &mut |dst, msg| replies.push(dst, msg),
        );
        if self.replies.is_full() {
            shared.send(&mut self.replies);
        }
        let Decap::Inner { peer, len } = decap else {
            return;
        };
        let packet = &self.out[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
        if shared.local.is_forwarded(packet) {
            shared.counters.forwarded.fetch_add(1, Relaxed);
            if let Some(forwarder) = &shared.forwarder {
                let mut port = Port {
                    shared,
                    tun: &mut self.tun_batch,
                    udp: &mut self.replies,
                };
                forwarder.inbound(&peer, packet, &mut port);
            }
        } else {
            if self.tun_batch.is_full() {
                shared.write_tun(&mut self.tun_batch);
            }
            self.answerable |= !is_udp(packet);
            // No copy: the buffer it was decrypted into joins the batch.
            self.tun_batch.push_buffer(&mut self.out, len);
        }
    }

    /// Writes what the datagrams so far produced: packets to the TUN, replies to peers.
    ///
    /// After a light batch (an idle mesh, a request and its answer) that wrote anything
    /// but UDP, the receiver then reads the TUN itself: what the kernel answered inside
    /// our write (an echo reply, a TCP ACK) is queued there already, and sending it
    /// from this thread saves the switch to `mesh-tx` and its wakeup (`bench/ping-ab.sh`,
    /// 8 rounds of 100, both orientations: the idle ping 7-8% faster). Only while `mesh-tx` is not
    /// reading (`tun_reader` is free) and one read's worth: under load, and for what a
    /// local sender queues by itself, `mesh-tx` reads. UDP is not answered inside the
    /// write (its receiver replies when it runs), so a stream of it costs no reads.
    pub fn flush(&mut self) {
        let datagrams = std::mem::take(&mut self.datagrams);
        self.shared
            .counters
            .udp_rx_datagrams
            .fetch_add(datagrams, Relaxed);
        let answerable = std::mem::take(&mut self.answerable);
        self.shared.write_tun(&mut self.tun_batch);
        if answerable && datagrams <= INLINE_MAX_DATAGRAMS {
            self.answer_inline();
        }
        self.shared.send(&mut self.replies);
    }

    fn answer_inline(&mut self) {
        let shared = &*self.shared;
        let Some(_reading) = shared.tun_reader.try_lock() else {
            return; // `mesh-tx` is reading: it takes what is queued
        };
        let (rx, tun_out) = &mut **self.inline.get_or_insert_with(|| {
            Box::new((shared.tun.new_recv_batch(16), shared.tun.new_send_batch(8)))
        });
        // Until nothing read is left over: segments of a split super-packet must leave
        // before `mesh-tx` reads what was queued after them.
        while let Ok(n @ 1..) = shared.tun.recv_queued(rx) {
            shared.route_from_tun(rx, &mut self.replies, tun_out);
            let c = &shared.counters;
            c.tun_rx_packets.fetch_add(n as u64, Relaxed);
            c.tun_rx_inline.fetch_add(n as u64, Relaxed);
            if !rx.has_pending() {
                break;
            }
        }
    }
}

/// Whether an IP packet carries UDP (IPv6: as its first next header).
fn is_udp(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) => p.get(9) == Some(&17),
        Some(6) => p.get(6) == Some(&17),
        _ => false,
    }
}

#[derive(Clone, Copy)]
struct Local {
    v6: Ipv6Addr,
    v4: Option<Ipv4Addr>,
    forward_port: u16,
}

impl Local {
    /// An inner UDP packet to our mesh address on the forwarding port.
    fn is_forwarded(&self, p: &[u8]) -> bool {
        match p.first().map(|b| b >> 4) {
            Some(6) if p.len() >= 48 => {
                p[6] == 17
                    && p[24..40] == self.v6.octets()
                    && u16::from_be_bytes([p[42], p[43]]) == self.forward_port
            }
            Some(4) if p.len() >= 28 => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
                self.v4.is_some_and(|v4| p[16..20] == v4.octets())
                    && p[9] == 17
                    && frag == 0
                    && ihl >= 20
                    && p.len() >= ihl + 8
                    && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == self.forward_port
            }
            _ => false,
        }
    }
}
