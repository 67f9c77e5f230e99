//! The node's mesh interface: a Linux TUN device with virtio-net offloads.
//!
//! Creation goes through `tun-rs` (TUNSETIFF, IFF_VNET_HDR and TUNSETOFFLOAD with
//! TSO4/TSO6/USO when `offload` is on); MTU, link state and addresses are set over
//! rtnetlink (addresses with IFA_F_NODAD, so they are usable at once).
//!
//! # Offload
//!
//! With offload on, the kernel hands us TCP/UDP "super-packets" of up to 64 KiB plus a
//! virtio-net header (one `read` for up to ~45 MTU-sized packets), and accepts the same
//! on `write` (one `write` and one trip through the stack for a whole coalesced flow).
//! - Read: [`TunDevice::recv_batch`] reads until its batch is full or the device is
//!   empty, splitting super-packets into plain IP packets (≤ MTU) with `tun-rs`'s
//!   `gso_split` and completing partial checksums. A super-packet that does not fit the
//!   rest of the batch stays pending for the next call (never truncated or lost).
//! - Write: [`TunDevice::send_batch`] coalesces TCP with `tun-rs`'s GRO table (same
//!   flow, consecutive sequence numbers, valid checksums) and UDP with our own
//!   (`udp_gro`: equal-size datagrams of one flow, no copy into a temporary and no
//!   checksum pass), and writes each result. Each write is accounted separately: a
//!   packet the kernel rejects is counted, not fatal.
//!
//! The device's `gso_max_segs` is set to [`TUN_GSO_MAX_SEGS`] so that no super-packet
//! has more segments than an empty receive batch has slots (the kernel segments larger
//! ones in software), whatever MSS a TCP peer advertises.
//!
//! With offload off, every `read`/`write` is one IP packet, as with a classic TUN.
//!
//! Measured here (release build, one thread reading a TCP flow from the TUN, splitting,
//! re-coalescing and writing it back, CPU time of that thread including the kernel
//! work in its syscalls): about 2.6 µs per packet with offload off, 1.05 µs with it on,
//! and ~38 packets per `read`/`write` instead of one.
//!
//! Buffers: [`TunSendBatch`] keeps [`VIRTIO_NET_HDR_LEN`] bytes of headroom in front
//! of every packet, so the decryptor writes plaintext straight into the slice from
//! [`TunSendBatch::reserve`] and the header is filled in place, without a copy.
//!
//! Caveats, from `tun-rs` 2.8: `gso_split`, `VirtioNetHdr`, `checksum` and
//! `GROTable::apply_gro` are public but `#[doc(hidden)]` (pin the minor version), and its
//! GRO copies each candidate packet into a temporary `Vec` (one small allocation per
//! packet, inside the dependency; ~250 ns per 1400-byte TCP packet, checksum
//! verification and copies included; for UDP 172 ns against 47 for `udp_gro` in
//! `bench_udp_gro_cost`, which is why UDP no longer goes through it). Send buffers whose
//! virtio header GRO did not write were merged into another buffer; that is how
//! [`TunDevice::send_batch`] knows which buffers to write (see `write_coalesced`).

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, ExpandBuffer, GROTable, SyncDevice, VirtioNetHdr};

pub use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::netlink::{Netlink, RTN_LOCAL};
use super::sys::{ResultExt, context, os_error_of, poll_one};

#[doc(hidden)]
pub mod fuzzing;
mod udp_gro;
mod uring;

/// Smallest MTU: the device always carries IPv6, which needs 1280.
pub const MIN_MTU: u16 = 1280;
/// How long [`TunDevice::recv_batch`] waits for a first packet.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_millis(200);
/// Most segments the kernel may put in one super-packet for our device (set as the
/// link's `gso_max_segs`; beyond it the kernel segments in software). Every receive
/// batch has at least this many slots, so any super-packet fits an empty batch.
pub const TUN_GSO_MAX_SEGS: usize = 64;
/// How long `create` waits for its addresses to become usable.
const ADDRESS_READY_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest IP packet.
const MAX_IP_PACKET: usize = 65_535;
/// Bytes for one raw read: virtio header + the largest (IPv6) GSO packet, rounded up.
const RAW_BUF_BYTES: usize = 96 * 1024;
/// Most TUN reads in one io_uring round (and raw buffers per receive batch).
const READ_ROUND: usize = 64;
/// Fewest reads a round asks for.
const MIN_READ_ROUND: usize = 8;
/// Reads in a batch that make the next wait one for a loaded device.
const LOADED_READS: usize = 16;
/// Send buffers large enough for any coalesced packet (tun-rs requires capacity for
/// 2 × headroom + packet before it appends).
const GRO_BUF_BYTES: usize = 2 * VIRTIO_NET_HDR_LEN + MAX_IP_PACKET;
/// Packets handed to one GRO pass.
const GRO_CHUNK: usize = 1024;
/// Marks a send buffer whose virtio header GRO did not write (merged into another).
const UNWRITTEN: u8 = 0xff;

const GSO_NONE: u8 = 0;
/// virtio-net header flag: the checksum at `csum_start + csum_offset` is to be completed.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;
const F_NEEDS_CSUM: u8 = 1;

/// How to create the mesh interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name (1–15 bytes, no '/', ':' or whitespace).
    pub name: String,
    /// MTU, at least [`MIN_MTU`].
    pub mtu: u16,
    /// The node's mesh address, assigned as /128.
    pub ipv6: Ipv6Addr,
    /// Optional IPv4 address, assigned as /32.
    pub ipv4: Option<Ipv4Addr>,
    /// Use virtio-net offloads (TSO/USO/GRO). Off: one packet per read/write.
    pub offload: bool,
    /// Packets the kernel queues for us to read (the TUN's `txqueuelen`, the size of
    /// its ring; see [`DEFAULT_TX_QUEUE_LEN`]). 0 keeps the kernel's default (500).
    pub tx_queue_len: u32,
}

/// The TUN ring we ask for. The kernel's 500 packets overflow whenever the reading
/// thread loses its CPU for one scheduler slice to a sender on the same CPU: a sender
/// queues a packet every ~2.5 µs here, so one 2-3 ms slice is ~1000 packets, and the
/// ring drops the rest (tail drop; the TUN gives no backpressure, it orphans each
/// packet from its socket). Measured with `bench/tunnel.sh` (iperf3 UDP at full rate,
/// sender and mesh thread on one CPU): 500 → 45% loss, 0.11 Mpps delivered; 1024 →
/// 16%, 0.17-0.18 Mpps; 2048, 4096 and 8192 → under 1% (up to 5% at the receiver),
/// 0.20-0.21 Mpps. 4096 is twice the knee. Memory is only held for packets actually
/// queued; the cost is latency under overload: a full ring is ~20 ms of packets at
/// that rate.
pub const DEFAULT_TX_QUEUE_LEN: u32 = 4096;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn validate(cfg: &TunConfig) -> io::Result<()> {
    let n = &cfg.name;
    if n.is_empty() || n.len() >= libc::IFNAMSIZ {
        return Err(invalid(format!(
            "TUN device name {n:?} must be 1 to {} bytes",
            libc::IFNAMSIZ - 1
        )));
    }
    if n == "."
        || n == ".."
        || n.chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        return Err(invalid(format!(
            "TUN device name {n:?} is not a valid interface name"
        )));
    }
    if cfg.mtu < MIN_MTU {
        return Err(invalid(format!(
            "TUN device {n}: MTU {} is below {MIN_MTU}, the minimum for IPv6",
            cfg.mtu
        )));
    }
    if cfg.ipv6.is_unspecified() || cfg.ipv6.is_multicast() {
        return Err(invalid(format!(
            "TUN device {n}: {} is not a unicast address",
            cfg.ipv6
        )));
    }
    if let Some(v4) = cfg.ipv4
        && (v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
    {
        return Err(invalid(format!(
            "TUN device {n}: {v4} is not a unicast address"
        )));
    }
    Ok(())
}

/// Cumulative receive-side counters of a [`TunRecvBatch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TunRecvStats {
    /// Reads (each one packet or one super-packet).
    pub reads: u64,
    /// Super-packets split.
    pub gso_packets: u64,
    /// io_uring read rounds (each one system call for up to 64 reads).
    pub read_rounds: u64,
    /// Packets delivered through [`TunRecvBatch::iter`].
    pub packets: u64,
    /// Reads dropped: malformed virtio header, unsupported GSO type, packet larger than
    /// a slot, or more segments than the whole batch holds.
    pub dropped: u64,
}

/// Cumulative transmit-side counters of a [`TunSendBatch`] (see
/// [`TunSendBatch::stats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TunSendStats {
    /// IP packets the kernel accepted.
    pub packets: u64,
    /// IP packets in writes the kernel rejected.
    pub rejected: u64,
    /// Packets refused by `commit`/`push` (not IPv4/IPv6, too short or too long); they
    /// were never written.
    pub invalid: u64,
    /// `write` calls (fewer than `packets` when GRO coalesced).
    pub writes: u64,
    /// The errno of the last rejected write.
    pub last_errno: Option<i32>,
}

/// The mesh TUN device. `Sync`: one thread may receive while another sends.
pub struct TunDevice {
    dev: SyncDevice,
    name: String,
    ifindex: u32,
    mtu: u16,
    offload: bool,
    udp_offload: bool,
    read_timeout_ms: AtomicU64,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("ifindex", &self.ifindex)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload)
            .field("udp_offload", &self.udp_offload)
            .finish()
    }
}

impl TunDevice {
    /// Creates the device (or attaches to an existing, unused TUN of that name), sets its
    /// MTU, brings it up and assigns `ipv6/128` and `ipv4/32` (without duplicate address
    /// detection, so they are usable at once). Fails clearly if the name belongs to a
    /// device that is not a TUN, or to a TUN in use. The device, and every route into it,
    /// disappears when the `TunDevice` is dropped (unless it was made persistent).
    pub fn create(cfg: &TunConfig) -> io::Result<TunDevice> {
        validate(cfg)?;
        let name = &cfg.name;
        let mut nl = Netlink::open().ctx(|| format!("create TUN device {name}"))?;
        if let Some(link) = nl.link_by_name(name)?
            && link.kind.as_deref() != Some("tun")
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot create TUN device {name}: an interface of that name exists and is not a TUN device (kind: {})",
                    link.kind.as_deref().unwrap_or("none")
                ),
            ));
        }
        let dev = DeviceBuilder::new()
            .name(name.as_str())
            .offload(cfg.offload)
            .build_sync()
            .map_err(|e| {
                let hint = match os_error_of(&e) {
                    Some(libc::EBUSY) => {
                        " (a TUN device of that name is in use by another process)"
                    }
                    Some(libc::EPERM) => " (needs CAP_NET_ADMIN)",
                    Some(libc::EINVAL) => {
                        " (an existing device of that name has other flags, e.g. TAP)"
                    }
                    _ => "",
                };
                context(
                    e,
                    format!(
                        "create TUN device {name} (offload {}){hint}",
                        if cfg.offload { "on" } else { "off" }
                    ),
                )
            })?;
        let offload = dev.tcp_gso();
        let udp_offload = dev.udp_gso();
        if cfg.offload && !offload {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("TUN device {name}: the kernel did not accept virtio-net offloads"),
            ));
        }
        dev.set_nonblocking(true)
            .ctx(|| format!("set TUN device {name} non-blocking"))?;
        let ifindex = dev
            .if_index()
            .ctx(|| format!("read interface index of TUN device {name}"))?;
        if offload {
            // Bound super-packets by our batch size. Failure only costs drops of
            // super-packets with more segments than a batch (counted), so go on.
            if let Err(e) = nl.set_gso_max_segs(ifindex, TUN_GSO_MAX_SEGS as u32) {
                tracing::warn!(device = %name, error = %e, "cannot set gso_max_segs on TUN device");
            }
        }
        if cfg.tx_queue_len > 0 {
            nl.set_tx_queue_len(ifindex, cfg.tx_queue_len)
                .ctx(|| format!("set txqueuelen {} on TUN device {name}", cfg.tx_queue_len))?;
        }
        nl.set_link(ifindex, Some(true), Some(u32::from(cfg.mtu)))
            .ctx(|| format!("set MTU {} and bring up TUN device {name}", cfg.mtu))?;
        nl.add_address(ifindex, cfg.ipv6.into(), 128)
            .ctx(|| format!("assign {}/128 to TUN device {name}", cfg.ipv6))?;
        if let Some(v4) = cfg.ipv4 {
            nl.add_address(ifindex, v4.into(), 32)
                .ctx(|| format!("assign {v4}/32 to TUN device {name}"))?;
        }
        // IPv6 finishes configuring an address (its local route) in a kernel work item
        // after the netlink ack; packets to it are dropped until then. Wait for it.
        for addr in std::iter::once(IpAddr::V6(cfg.ipv6)).chain(cfg.ipv4.map(IpAddr::V4)) {
            wait_until_local(&mut nl, addr)
                .ctx(|| format!("address {addr} on TUN device {name}"))?;
        }
        Ok(TunDevice {
            dev,
            name: name.clone(),
            ifindex,
            mtu: cfg.mtu,
            offload,
            udp_offload,
            read_timeout_ms: AtomicU64::new(DEFAULT_READ_TIMEOUT.as_millis() as u64),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Interface index (for [`super::route`]).
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The MTU set at creation.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Whether virtio-net offloads (TSO, GRO on write) are on.
    pub fn offload_enabled(&self) -> bool {
        self.offload
    }

    /// Whether UDP segmentation offload (USO; kernel ≥ 6.2) is on as well.
    pub fn udp_offload_enabled(&self) -> bool {
        self.udp_offload
    }

    /// Changes how long [`recv_batch`](Self::recv_batch) waits for a first packet
    /// (millisecond resolution).
    pub fn set_read_timeout(&self, timeout: Duration) {
        let ms = timeout.as_millis().min(u128::from(u64::MAX)) as u64;
        self.read_timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// A receive batch of `capacity` packets with slots of exactly this device's MTU
    /// (less memory than [`TunRecvBatch::new`], but packets beyond the MTU, should it be
    /// raised at run time, are dropped).
    pub fn new_recv_batch(&self, capacity: usize) -> TunRecvBatch {
        TunRecvBatch::with_capacity(capacity, usize::from(self.mtu))
    }

    /// A send batch of `capacity` packets sized for this device (64 KiB buffers with
    /// offload, so GRO can coalesce into them; MTU-sized otherwise).
    pub fn new_send_batch(&self, capacity: usize) -> TunSendBatch {
        if self.offload {
            let mut batch = TunSendBatch::with_capacity(capacity, MAX_IP_PACKET);
            batch.vnet = true;
            batch
        } else {
            TunSendBatch::with_capacity(capacity, usize::from(self.mtu))
        }
    }

    /// Reads packets until `batch` is full or the device has no more, waiting up to the
    /// read timeout for the first. Returns the number of IP packets (each ≤ MTU) now in
    /// `batch`; `Ok(0)` on timeout.
    ///
    /// With offload on, reads go in rounds of up to [`READ_ROUND`] through io_uring
    /// (one system call per round, see [`uring`]), one `read(2)` each where it is
    /// unavailable.
    pub fn recv_batch(&self, batch: &mut TunRecvBatch) -> io::Result<usize> {
        self.recv(batch, true)
    }

    /// As [`recv_batch`](Self::recv_batch), without waiting: `Ok(0)` when nothing is
    /// queued. With [`wait_readable`](Self::wait_readable), a reader that must hold a
    /// lock while it reads (and not while it waits) reads in two steps.
    pub fn recv_queued(&self, batch: &mut TunRecvBatch) -> io::Result<usize> {
        self.recv(batch, false)
    }

    /// Waits until the device has a packet to read, at most the read timeout (the
    /// wait of [`recv_batch`](Self::recv_batch) when it finds nothing queued).
    pub fn wait_readable(&self, batch: &mut TunRecvBatch) -> io::Result<()> {
        let timeout = Duration::from_millis(self.read_timeout_ms.load(Ordering::Relaxed));
        self.wait(batch, timeout)
    }

    fn wait(&self, batch: &mut TunRecvBatch, timeout: Duration) -> io::Result<()> {
        // After a batch of many reads, wait through io_uring (see
        // `BatchReader::wait_readable`: the packets queued meanwhile wake nothing);
        // otherwise with poll(2), whose wakeup is quicker (median 16 against 33 µs in
        // `bench_tun_wakeup`).
        let fd = self.dev.as_raw_fd();
        let loaded = std::mem::take(&mut batch.loaded);
        match loaded
            .then(|| batch.reader.wait_readable(fd, timeout))
            .flatten()
        {
            Some(res) => res.map(drop),
            None => poll_one(fd, libc::POLLIN, timeout).map(drop),
        }
        .ctx(|| format!("poll TUN device {}", self.name))
    }

    fn recv(&self, batch: &mut TunRecvBatch, wait: bool) -> io::Result<usize> {
        batch.count = 0;
        if !batch.absorb_pending() {
            batch.stats.packets += batch.count as u64;
            return Ok(batch.count);
        }
        let mut deadline: Option<Instant> = None;
        let mut reads_here = 0;
        while batch.count < batch.slots.len() {
            let res = if self.offload {
                // The first two reads of a batch are plain `read(2)`s: a lone packet
                // (an idle mesh, a ping) is read and the queue found empty at the
                // lowest latency. Only a queue of more goes on in io_uring rounds.
                let round = if reads_here >= 2 {
                    self.read_round(batch)
                } else {
                    None
                };
                match round {
                    Some(res) => res,
                    None => self.dev.recv(&mut batch.raws[0]).map(|n| {
                        batch.stats.reads += 1;
                        if !batch.absorb(0, n) {
                            batch.pending.push_back((0, n));
                        }
                        1
                    }),
                }
            } else {
                let (slot, raw) = (&mut batch.slots[batch.count], &mut batch.raws[0]);
                self.dev
                    .recv_vectored(&mut [IoSliceMut::new(slot), IoSliceMut::new(raw)])
                    .map(|n| {
                        batch.stats.reads += 1;
                        if n > batch.slot_len {
                            batch.stats.dropped += 1;
                        } else {
                            batch.sizes[batch.count] = n;
                            batch.count += 1;
                        }
                        1
                    })
            };
            match res {
                Ok(0) => break,
                Ok(_) if !batch.pending.is_empty() => break, // waits for the next batch
                Ok(n) => reads_here += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if batch.count > 0 {
                        batch.loaded = reads_here >= LOADED_READS;
                        break;
                    }
                    if !wait {
                        return Ok(0);
                    }
                    let now = Instant::now();
                    let timeout =
                        Duration::from_millis(self.read_timeout_ms.load(Ordering::Relaxed));
                    let until = *deadline.get_or_insert(now + timeout);
                    if now >= until {
                        return Ok(0);
                    }
                    self.wait(batch, until - now)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if batch.count > 0 {
                        break;
                    }
                    return Ok(0);
                }
                Err(e) => {
                    if batch.count > 0 {
                        break; // deliver what we have; the error will come back
                    }
                    return Err(context(e, format!("read from TUN device {}", self.name)));
                }
            }
        }
        batch.stats.packets += batch.count as u64;
        Ok(batch.count)
    }

    /// One round of reads through io_uring into `batch`'s raw buffers, absorbed in
    /// order (what does not fit stays pending). `Ok(reads)`; `Err(WouldBlock)` if the
    /// device had nothing; `None` if io_uring is unavailable.
    fn read_round(&self, batch: &mut TunRecvBatch) -> Option<io::Result<usize>> {
        let free = batch.slots.len() - batch.count;
        let k = batch.want.min(free).clamp(1, batch.raws.len());
        let fd = self.dev.as_raw_fd();
        // Copied out (a few hundred bytes per round): absorbing needs the whole batch.
        let mut results = [0i32; READ_ROUND];
        let round = batch.reader.read_round(fd, &mut batch.raws[..k])?;
        results[..round.len()].copy_from_slice(round);
        let mut reads = 0;
        let mut error = None;
        for (i, &r) in results[..k].iter().enumerate() {
            match usize::try_from(r) {
                Ok(n) => {
                    reads += 1;
                    if !batch.pending.is_empty() || !batch.absorb(i, n) {
                        batch.pending.push_back((i, n));
                    }
                }
                Err(_) if r == -libc::EAGAIN => {}
                Err(_) => {
                    error.get_or_insert(-r);
                }
            }
        }
        batch.stats.reads += reads as u64;
        batch.stats.read_rounds += 1;
        // Ask for as many as the device had, plus room to grow: a full round doubles,
        // one that emptied the queue sizes the next to twice what it found.
        batch.want = if reads == k {
            (2 * k).min(READ_ROUND)
        } else {
            (2 * reads).clamp(MIN_READ_ROUND, READ_ROUND)
        };
        Some(match (reads, error) {
            (0, Some(errno)) => Err(io::Error::from_raw_os_error(errno)),
            (0, None) => Err(io::ErrorKind::WouldBlock.into()),
            (n, _) => Ok(n),
        })
    }

    /// Writes every packet of `batch` (coalescing with GRO when offload is on) and clears
    /// it: one system call for the whole batch where io_uring is available (see
    /// [`uring`]). Returns the number of IP packets the kernel accepted. A write the
    /// kernel rejects is counted in [`TunSendBatch::stats`] (`rejected`), not returned as
    /// an error; `Err` only if the device is gone (the batch is cleared anyway).
    pub fn send_batch(&self, batch: &mut TunSendBatch) -> io::Result<usize> {
        let n = batch.count;
        let before = batch.stats.packets;
        let mut res = Ok(());
        let mut start = 0;
        while start < n && res.is_ok() {
            let end = (start + GRO_CHUNK).min(n);
            batch.queued.clear();
            let chunk = &mut batch.bufs[start..end];
            res = if self.offload {
                self.queue_coalesced(chunk, &mut batch.gro, &mut batch.udp_gro, &mut batch.queued)
            } else {
                queue_plain(chunk, &mut batch.queued);
                Ok(())
            };
            if res.is_ok() {
                res = self.write_queued(
                    &batch.bufs[start..end],
                    &batch.queued,
                    &mut batch.writer,
                    &mut batch.stats,
                );
            }
            start = end;
        }
        batch.clear();
        res.map(|()| (batch.stats.packets - before) as usize)
    }

    /// Queues the writes of a batch with offload on: UDP through our own coalescing (see
    /// `udp_gro`) where the device takes UDP super-packets, the rest with complete
    /// checksums through `tun-rs`'s GRO (TCP), and the CHECKSUM_PARTIAL ones with their
    /// own virtio header.
    fn queue_coalesced(
        &self,
        bufs: &mut [PktBuf],
        gro: &mut GROTable,
        udp_gro: &mut udp_gro::UdpGro,
        queued: &mut Vec<Queued>,
    ) -> io::Result<()> {
        let udp = self.udp_offload;
        let class = |b: &PktBuf| -> u8 {
            if b.partial.is_some() {
                2
            } else if udp && udp_gro::is_udp(&b.data[VIRTIO_NET_HDR_LEN..b.len]) {
                1
            } else {
                0
            }
        };
        let first = bufs.first().map(class);
        if bufs.iter().any(|b| Some(class(b)) != first) {
            // Mixed (a receive batch that carried both TCP and UDP, or forwarded
            // datagrams and mesh traffic): each kind is written separately. Stable, so
            // no flow is reordered.
            bufs.sort_by_key(class);
        }
        let tcp = bufs.partition_point(|b| class(b) == 0);
        let whole = bufs.partition_point(|b| class(b) < 2);
        if tcp > 0 {
            self.queue_gro(&mut bufs[..tcp], gro, queued)?;
        }
        udp_gro.queue(&mut bufs[tcp..whole], tcp, queued);
        for (index, b) in bufs.iter_mut().enumerate().skip(whole) {
            let (csum_start, csum_offset) = b.partial.take().unwrap_or_default();
            let hdr = VirtioNetHdr {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                gso_type: GSO_NONE,
                hdr_len: csum_start + csum_offset + 2,
                gso_size: 0,
                csum_start,
                csum_offset,
            };
            hdr.encode(&mut b.data[..VIRTIO_NET_HDR_LEN])
                .ctx(|| format!("virtio header for TUN device {}", self.name))?;
            queued.push(Queued {
                index,
                from: 0,
                segments: 1,
            });
        }
        Ok(())
    }

    fn queue_gro(
        &self,
        bufs: &mut [PktBuf],
        gro: &mut GROTable,
        queued: &mut Vec<Queued>,
    ) -> io::Result<()> {
        for b in bufs.iter_mut() {
            b.data[0] = UNWRITTEN;
            b.data[1] = UNWRITTEN;
        }
        // GRO writes a virtio header in front of every buffer that is to be written and
        // leaves the buffers it merged into others untouched (still UNWRITTEN).
        // UDP is coalesced by `udp_gro` where the device takes it.
        gro.apply_gro(bufs, VIRTIO_NET_HDR_LEN, false)
            .ctx(|| format!("coalesce packets for TUN device {}", self.name))?;
        for (index, b) in bufs.iter().enumerate() {
            if b.data[0] == UNWRITTEN && b.data[1] == UNWRITTEN {
                continue;
            }
            queued.push(Queued {
                index,
                from: 0,
                segments: segments_of(&b.data[..b.len]),
            });
        }
        Ok(())
    }

    /// Writes the queued buffers of `bufs` and accounts for each.
    fn write_queued(
        &self,
        bufs: &[PktBuf],
        queued: &[Queued],
        writer: &mut uring::BatchWriter,
        stats: &mut TunSendStats,
    ) -> io::Result<()> {
        let mut gone = None;
        writer.write_all(
            self.dev.as_raw_fd(),
            queued.len(),
            |i| {
                let q = &queued[i];
                let b = &bufs[q.index];
                &b.data[q.from..b.len]
            },
            |i, result| {
                let segments = queued[i].segments as u64;
                match result {
                    Ok(_) => {
                        stats.writes += 1;
                        stats.packets += segments;
                    }
                    Err(errno) if errno == libc::EBADFD || errno == libc::EBADF => {
                        gone = Some(errno);
                    }
                    Err(errno) => {
                        stats.rejected += segments;
                        stats.last_errno = Some(errno);
                    }
                }
            },
        );
        match gone {
            Some(errno) => Err(context(
                io::Error::from_raw_os_error(errno),
                format!("write to TUN device {}", self.name),
            )),
            None => Ok(()),
        }
    }
}

/// One write of a send batch: buffer `index` of the chunk, from byte `from` (past the
/// virtio header without offload) to its end, carrying `segments` IP packets.
struct Queued {
    index: usize,
    from: usize,
    segments: usize,
}

/// Queues the writes of a batch without offload: each packet as is.
fn queue_plain(bufs: &mut [PktBuf], queued: &mut Vec<Queued>) {
    for (index, b) in bufs.iter_mut().enumerate() {
        if let Some((start, offset)) = b.partial.take() {
            // A batch made for a device with virtio headers, used with one without.
            complete_checksum(&mut b.data[VIRTIO_NET_HDR_LEN..b.len], start, offset);
        }
        queued.push(Queued {
            index,
            from: VIRTIO_NET_HDR_LEN,
            segments: 1,
        });
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

/// Waits until the kernel routes `addr` locally.
fn wait_until_local(nl: &mut Netlink, addr: IpAddr) -> io::Result<()> {
    let deadline = Instant::now() + ADDRESS_READY_TIMEOUT;
    loop {
        if nl.route_type_to(addr)? == Some(RTN_LOCAL) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "not usable (no local route) {} s after assignment",
                    ADDRESS_READY_TIMEOUT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Number of IP packets a buffer (virtio header + packet) written to the TUN carries.
fn segments_of(buf: &[u8]) -> usize {
    let Ok(hdr) = VirtioNetHdr::decode(buf) else {
        return 1;
    };
    if hdr.gso_type == GSO_NONE || hdr.gso_size == 0 {
        return 1;
    }
    let pkt_len = buf.len().saturating_sub(VIRTIO_NET_HDR_LEN);
    pkt_len
        .saturating_sub(usize::from(hdr.hdr_len))
        .div_ceil(usize::from(hdr.gso_size))
        .max(1)
}

/// Validates a GSO header against its packet and fixes `hdr_len` the way wireguard-go
/// does (the kernel's value can't be trusted on the forwarding path). Returns
/// `(is_v6, segments)`.
fn prepare_gso(hdr: &mut VirtioNetHdr, pkt: &[u8]) -> Option<(bool, usize)> {
    if hdr.gso_size == 0 {
        return None;
    }
    let is_v6 = match pkt.first()? >> 4 {
        4 => false,
        6 => true,
        _ => return None,
    };
    let udp = match hdr.gso_type & !GSO_ECN {
        GSO_TCPV4 if !is_v6 => false,
        GSO_TCPV6 if is_v6 => false,
        GSO_UDP_L4 if hdr.gso_type & GSO_ECN == 0 => true,
        _ => return None,
    };
    let cs = usize::from(hdr.csum_start);
    let hdr_len = if udp {
        cs + 8
    } else {
        let tcp_hlen = usize::from(*pkt.get(cs + 12)? >> 4) * 4;
        if !(20..=60).contains(&tcp_hlen) {
            return None;
        }
        cs + tcp_hlen
    };
    if hdr_len > pkt.len() {
        return None;
    }
    hdr.hdr_len = u16::try_from(hdr_len).ok()?;
    let segments = (pkt.len() - hdr_len).div_ceil(usize::from(hdr.gso_size));
    Some((is_v6, segments))
}

/// Completes a CHECKSUM_PARTIAL packet: the field at `start + offset` holds the
/// pseudo-header sum; the checksum covers `start..`.
fn complete_checksum(pkt: &mut [u8], start: u16, offset: u16) -> bool {
    let start = usize::from(start);
    let at = start + usize::from(offset);
    if at + 2 > pkt.len() {
        return false;
    }
    let initial = u16::from_be_bytes([pkt[at], pkt[at + 1]]);
    pkt[at] = 0;
    pkt[at + 1] = 0;
    let sum = !tun_rs::checksum(&pkt[start..], u64::from(initial));
    // 0 and 0xffff are the same in one's complement; UDP needs the latter.
    let sum = if sum == 0 { 0xffff } else { sum };
    pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Reusable receive buffers for [`TunDevice::recv_batch`].
pub struct TunRecvBatch {
    /// One read round's raw reads (virtio header + packet or super-packet);
    /// `raws[0]` is the overflow area without offload. Pages are only touched by what
    /// is read into them: an MTU-sized packet uses one.
    raws: Vec<Box<[u8]>>,
    /// Reads (raw buffer, length) that did not fit the batch, oldest first: they go
    /// into the next batch before anything new is read.
    pending: VecDeque<(usize, usize)>,
    reader: uring::BatchReader,
    /// Reads to ask for in the next round (adapts to what the device has queued).
    want: usize,
    /// The last batch emptied a queue of at least [`LOADED_READS`] packets.
    loaded: bool,
    slots: Vec<Box<[u8]>>,
    sizes: Vec<usize>,
    slot_len: usize,
    count: usize,
    stats: TunRecvStats,
}

impl std::fmt::Debug for TunRecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunRecvBatch")
            .field("capacity", &self.slots.len())
            .field("slot_len", &self.slot_len)
            .field("packets", &self.count)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for TunRecvBatch {
    fn default() -> Self {
        TunRecvBatch::new()
    }
}

impl TunRecvBatch {
    /// Room for [`IDEAL_BATCH_SIZE`] packets of any size up to 64 KiB, so it works for
    /// any MTU, also one changed at run time. Memory: 8 MiB of address space, of which
    /// only the parts packets are written to (a page per MTU-sized packet) get used.
    pub fn new() -> TunRecvBatch {
        TunRecvBatch::with_capacity(IDEAL_BATCH_SIZE, MAX_IP_PACKET)
    }

    /// Room for `capacity` packets (at least [`TUN_GSO_MAX_SEGS`], so that any
    /// super-packet fits) of up to `max_packet` bytes each (at least 1280).
    pub fn with_capacity(capacity: usize, max_packet: usize) -> TunRecvBatch {
        let n = capacity.max(TUN_GSO_MAX_SEGS);
        let slot_len = max_packet.clamp(usize::from(MIN_MTU), MAX_IP_PACKET);
        TunRecvBatch {
            raws: (0..READ_ROUND)
                .map(|_| vec![0u8; RAW_BUF_BYTES].into_boxed_slice())
                .collect(),
            pending: VecDeque::with_capacity(READ_ROUND),
            reader: uring::BatchReader::new(),
            want: READ_ROUND,
            loaded: false,
            slots: (0..n)
                .map(|_| vec![0u8; slot_len].into_boxed_slice())
                .collect(),
            sizes: vec![0; n],
            slot_len,
            count: 0,
            stats: TunRecvStats::default(),
        }
    }

    /// Number of packets from the last `recv_batch`.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the last `recv_batch` returned nothing.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether packets already read (segments of a split super-packet that did not
    /// fit) wait for the next receive: they come before anything still queued.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Cumulative counters.
    pub fn stats(&self) -> TunRecvStats {
        self.stats
    }

    /// The IP packets of the last `recv_batch`, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.slots[..self.count]
            .iter()
            .zip(&self.sizes)
            .map(|(s, &n)| &s[..n])
    }

    /// The same, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut [u8]> + '_ {
        self.slots[..self.count]
            .iter_mut()
            .zip(&self.sizes)
            .map(|(s, &n)| &mut s[..n])
    }

    /// Whether reads go through io_uring (`None` until the first read round).
    pub fn io_uring(&self) -> Option<bool> {
        self.reader.batched()
    }

    /// Reads with one `read(2)` per packet, as where io_uring is unavailable.
    #[cfg(test)]
    fn without_io_uring(mut self) -> TunRecvBatch {
        self.reader = uring::BatchReader::unavailable();
        self
    }

    /// Absorbs the reads left pending by the previous batch, in order. Returns false if
    /// some still do not fit (the batch is full).
    fn absorb_pending(&mut self) -> bool {
        while let Some(&(buf, len)) = self.pending.front() {
            if !self.absorb(buf, len) {
                return false;
            }
            self.pending.pop_front();
        }
        true
    }

    /// Turns the raw read of `len` bytes in `raws[buf]` into packets. Returns false if
    /// it is a super-packet that does not fit the rest of this batch (the caller keeps
    /// it pending).
    fn absorb(&mut self, buf: usize, len: usize) -> bool {
        let Some(input) = self.raws[buf].get_mut(..len) else {
            self.stats.dropped += 1;
            return true;
        };
        if len <= VIRTIO_NET_HDR_LEN || len == RAW_BUF_BYTES {
            self.stats.dropped += 1;
            return true;
        }
        let Ok(mut hdr) = VirtioNetHdr::decode(input) else {
            self.stats.dropped += 1;
            return true;
        };
        let pkt = &mut input[VIRTIO_NET_HDR_LEN..];
        if hdr.gso_type == GSO_NONE {
            if self.count == self.slots.len() {
                return false; // a read of the same round filled the batch
            }
            if hdr.flags & F_NEEDS_CSUM != 0
                && !complete_checksum(pkt, hdr.csum_start, hdr.csum_offset)
            {
                self.stats.dropped += 1;
                return true;
            }
            if pkt.len() > self.slot_len {
                self.stats.dropped += 1;
                return true;
            }
            self.slots[self.count][..pkt.len()].copy_from_slice(pkt);
            self.sizes[self.count] = pkt.len();
            self.count += 1;
            return true;
        }
        let Some((is_v6, segments)) = prepare_gso(&mut hdr, pkt) else {
            self.stats.dropped += 1;
            return true;
        };
        let free = self.slots.len() - self.count;
        if segments > free {
            if self.count > 0 && segments <= self.slots.len() {
                return false;
            }
            self.stats.dropped += 1;
            return true;
        }
        match tun_rs::gso_split(
            pkt,
            hdr,
            &mut self.slots[self.count..],
            &mut self.sizes[self.count..],
            0,
            is_v6,
        ) {
            Ok(k) => {
                self.count += k;
                self.stats.gso_packets += 1;
            }
            Err(_) => self.stats.dropped += 1,
        }
        true
    }
}

/// One send buffer: `VIRTIO_NET_HDR_LEN` bytes of headroom, then the packet. `data` is
/// fully initialized; `len` is the used part (headroom included).
struct PktBuf {
    data: Vec<u8>,
    len: usize,
    /// `(csum_start, csum_offset)` of a packet committed with
    /// [`TunSendBatch::commit_partial`] for the kernel to complete: written with its own
    /// virtio header, outside GRO.
    partial: Option<(u16, u16)>,
}

impl PktBuf {
    fn new(bytes: usize) -> PktBuf {
        PktBuf {
            data: vec![0u8; bytes],
            len: 0,
            partial: None,
        }
    }
}

impl AsRef<[u8]> for PktBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for PktBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl ExpandBuffer for PktBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.data.len() {
            self.data.resize(new_len, 0);
        }
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

/// Reusable transmit buffers for [`TunDevice::send_batch`].
pub struct TunSendBatch {
    bufs: Vec<PktBuf>,
    count: usize,
    reserved: Option<usize>,
    capacity: usize,
    buf_bytes: usize,
    gro: GROTable,
    udp_gro: udp_gro::UdpGro,
    stats: TunSendStats,
    /// The writes of the chunk being sent.
    queued: Vec<Queued>,
    writer: uring::BatchWriter,
    /// Made for a device with virtio-net headers: [`Self::commit_partial`] leaves the
    /// transport checksum to the kernel.
    vnet: bool,
}

impl std::fmt::Debug for TunSendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunSendBatch")
            .field("packets", &self.count)
            .field("capacity", &self.capacity)
            .field("buf_bytes", &self.buf_bytes)
            .finish()
    }
}

impl Default for TunSendBatch {
    fn default() -> Self {
        TunSendBatch::new()
    }
}

impl TunSendBatch {
    /// A batch of [`IDEAL_BATCH_SIZE`] buffers able to hold coalesced 64 KiB packets
    /// (usable with or without offload). Memory: 128 × 64 KiB of address space, used as
    /// written.
    pub fn new() -> TunSendBatch {
        TunSendBatch::with_capacity(IDEAL_BATCH_SIZE, MAX_IP_PACKET)
    }

    /// A batch of `capacity` buffers holding packets of up to `packet_bytes` (GRO only
    /// coalesces within that size, so use 65535 with offload).
    pub fn with_capacity(capacity: usize, packet_bytes: usize) -> TunSendBatch {
        let n = capacity.max(1);
        let buf_bytes =
            (2 * VIRTIO_NET_HDR_LEN + packet_bytes.min(MAX_IP_PACKET)).min(GRO_BUF_BYTES);
        TunSendBatch {
            bufs: (0..n).map(|_| PktBuf::new(buf_bytes)).collect(),
            count: 0,
            reserved: None,
            capacity: n,
            buf_bytes,
            gro: GROTable::new(),
            udp_gro: udp_gro::UdpGro::default(),
            stats: TunSendStats::default(),
            queued: Vec::with_capacity(n),
            writer: uring::BatchWriter::new(),
            vnet: false,
        }
    }

    /// Whether this batch's writes go through io_uring, one system call per batch
    /// (`None` until its first send of two or more writes, a lone one being a plain
    /// `write(2)`; `Some(false)`: one `write` per packet, io_uring being unavailable).
    pub fn io_uring(&self) -> Option<bool> {
        self.writer.batched()
    }

    /// Cumulative counters of every commit and send of this batch.
    pub fn stats(&self) -> TunSendStats {
        self.stats
    }

    /// Packets committed.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the nominal capacity is reached: time to send.
    pub fn is_full(&self) -> bool {
        self.count >= self.capacity
    }

    /// Drops all committed packets and any reservation (counters stay).
    pub fn clear(&mut self) {
        self.count = 0;
        self.reserved = None;
    }

    /// Room for one IP packet of up to `max_len` bytes (capped at 65535), e.g. for
    /// boringtun to decrypt into. Nothing is added until [`commit`](Self::commit). The
    /// slice's initial contents are unspecified.
    pub fn reserve(&mut self, max_len: usize) -> &mut [u8] {
        let max_len = max_len.min(MAX_IP_PACKET);
        if self.count == self.bufs.len() {
            self.bufs.push(PktBuf::new(self.buf_bytes));
        }
        let b = &mut self.bufs[self.count];
        let need = VIRTIO_NET_HDR_LEN + max_len;
        if b.data.len() < need {
            b.data.resize(need, 0);
        }
        self.reserved = Some(max_len);
        &mut b.data[VIRTIO_NET_HDR_LEN..need]
    }

    /// Adds the first `len` bytes of the reservation as a packet. Returns false (and
    /// counts it in [`TunSendStats::invalid`]) if it is not an IPv4/IPv6 packet with a
    /// complete fixed header.
    ///
    /// # Panics
    /// If there is no reservation or `len` exceeds it: both are bugs in the caller.
    pub fn commit(&mut self, len: usize) -> bool {
        let max = self
            .reserved
            .take()
            .expect("TunSendBatch::commit called without a reservation");
        assert!(
            len <= max,
            "TunSendBatch::commit({len}) exceeds the reservation of {max} bytes"
        );
        let b = &mut self.bufs[self.count];
        let pkt = &b.data[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
        let ok = match pkt.first().map(|v| v >> 4) {
            Some(4) => (20..=len).contains(&(usize::from(pkt[0] & 0x0f) * 4)),
            Some(6) => len >= 40,
            _ => false,
        };
        if !ok {
            self.stats.invalid += 1;
            return false;
        }
        b.len = VIRTIO_NET_HDR_LEN + len;
        b.partial = None;
        self.count += 1;
        true
    }

    /// As [`commit`](Self::commit), for a packet whose transport checksum is left to
    /// complete: the 16-bit field at `csum_start + csum_offset` holds the folded
    /// pseudo-header sum (not complemented), and the checksum covers `csum_start..`.
    ///
    /// On a device with virtio-net headers the packet is written with
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`, so the kernel takes it as CHECKSUM_PARTIAL: a local
    /// receiver (a container behind a veth) never computes the sum, and a device without
    /// checksum offload has the kernel complete it on transmit. This saves summing every
    /// payload byte in userspace (the forwarding layer's worker delivers every datagram
    /// this way). Such packets bypass GRO. Without virtio headers the checksum is
    /// completed here.
    pub fn commit_partial(&mut self, len: usize, csum_start: u16, csum_offset: u16) -> bool {
        if usize::from(csum_start) + usize::from(csum_offset) + 2 > len {
            self.reserved = None;
            self.stats.invalid += 1;
            return false;
        }
        if !self.commit(len) {
            return false;
        }
        let b = &mut self.bufs[self.count - 1];
        if self.vnet {
            b.partial = Some((csum_start, csum_offset));
        } else {
            complete_checksum(
                &mut b.data[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len],
                csum_start,
                csum_offset,
            );
        }
        true
    }

    /// Adds the packet at `buf[VIRTIO_NET_HDR_LEN..][..len]` (e.g. decrypted there, past
    /// room for the virtio header) without copying it: `buf` is swapped with a free buffer of the batch, which the caller keeps for the next
    /// packet (at least as large as the one it gave). False (counted as
    /// [`commit`](Self::commit) does, `buf` unchanged) if it is not an IPv4/IPv6 packet.
    ///
    /// # Panics
    /// If `buf` is shorter than `VIRTIO_NET_HDR_LEN + len`: a bug in the caller.
    pub fn push_buffer(&mut self, buf: &mut Vec<u8>, len: usize) -> bool {
        let size = buf.len();
        assert!(
            VIRTIO_NET_HDR_LEN + len <= size,
            "TunSendBatch::push_buffer: {len} bytes do not fit a buffer of {size}"
        );
        if len > MAX_IP_PACKET {
            self.stats.invalid += 1;
            return false;
        }
        self.reserve(len);
        std::mem::swap(&mut self.bufs[self.count].data, buf);
        if !self.commit(len) {
            std::mem::swap(&mut self.bufs[self.count].data, buf);
            return false;
        }
        if buf.len() < size {
            buf.resize(size, 0);
        }
        true
    }

    /// Copies one IP packet into the batch; false if it is not IPv4/IPv6.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        if packet.len() > MAX_IP_PACKET {
            self.stats.invalid += 1;
            return false;
        }
        self.reserve(packet.len()).copy_from_slice(packet);
        self.commit(packet.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::route::add_route;
    use crate::io::testutil::{
        Rng, in_netns, ip, ipv4_udp, ipv6_udp, tcp_packet, transport_checksum_ok, udp_partial_seed,
    };
    use crate::io::udp::{SendBatch, UdpSocket};
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, UdpSocket as StdUdp};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const A4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

    fn make(name: &str, offload: bool, mtu: u16) -> TunDevice {
        let dev = TunDevice::create(&TunConfig {
            name: name.into(),
            mtu,
            ipv6: A6,
            ipv4: Some(A4),
            offload,
            tx_queue_len: 0,
        })
        .expect("create TUN");
        add_route(dev.ifindex(), "198.19.1.0".parse().unwrap(), 24).unwrap();
        add_route(dev.ifindex(), "fd00:1::".parse().unwrap(), 64).unwrap();
        dev
    }

    #[test]
    fn tun_device_is_sync_and_send() {
        fn check<T: Send + Sync>() {}
        check::<TunDevice>();
        check::<TunRecvBatch>();
        check::<TunSendBatch>();
    }

    /// GRO over random batches (valid TCP/UDP flows with gaps, odd sizes, PSH/FIN/SYN,
    /// corrupted checksums, and garbage): never panics, and every committed packet is
    /// accounted for exactly once by the buffers that would be written.
    #[test]
    fn gro_accounts_for_every_packet_of_random_batches() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut batch = TunSendBatch::with_capacity(IDEAL_BATCH_SIZE, MAX_IP_PACKET);
        let mut coalesced_rounds = 0;
        for round in 0..400 {
            let n = 1 + rng.below(IDEAL_BATCH_SIZE as u64) as usize;
            let mut seq = [1000u32; 4];
            for _ in 0..n {
                let kind = rng.below(10);
                let pkt = match kind {
                    0..=5 => {
                        let flow = rng.below(4) as usize;
                        let v6 = flow % 2 == 1;
                        let len = if rng.below(4) == 0 {
                            1 + rng.below(1300) as usize
                        } else {
                            1300
                        };
                        let flags = match rng.below(20) {
                            0 => 0x18, // PSH|ACK
                            1 => 0x11, // FIN|ACK
                            2 => 0x02, // SYN
                            _ => 0x10, // ACK
                        };
                        if rng.below(25) == 0 {
                            seq[flow] = seq[flow].wrapping_add(7); // a gap
                        }
                        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        let mut p =
                            tcp_packet(v6, 4000 + flow as u16, 80, seq[flow], 1, flags, &payload);
                        seq[flow] = seq[flow].wrapping_add(len as u32);
                        if rng.below(30) == 0 {
                            let at = p.len() - 1;
                            p[at] ^= 0x55; // corrupt the checksum
                        }
                        p
                    }
                    6..=7 => {
                        let len = if rng.below(3) == 0 {
                            rng.below(1200) as usize
                        } else {
                            1000
                        };
                        let payload = vec![rng.next() as u8; len];
                        if rng.below(2) == 0 {
                            ipv4_udp(B4, 5000, A4, 7777, &payload)
                        } else {
                            ipv6_udp(B6, 5000, A6, 7777, &payload)
                        }
                    }
                    _ => {
                        let len = 40 + rng.below(200) as usize;
                        let mut p: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                        p[0] = if rng.below(2) == 0 { 0x45 } else { 0x60 };
                        p
                    }
                };
                assert!(batch.push(&pkt), "round {round}");
            }
            assert_eq!(batch.len(), n);
            let bufs = &mut batch.bufs[..n];
            for b in bufs.iter_mut() {
                b.data[0] = UNWRITTEN;
                b.data[1] = UNWRITTEN;
            }
            batch
                .gro
                .apply_gro(bufs, VIRTIO_NET_HDR_LEN, true)
                .expect("apply_gro");
            let mut accounted = 0;
            let mut writes = 0;
            for b in bufs.iter() {
                if b.data[0] == UNWRITTEN && b.data[1] == UNWRITTEN {
                    continue;
                }
                writes += 1;
                accounted += segments_of(&b.data[..b.len]);
                assert!(b.len - VIRTIO_NET_HDR_LEN <= MAX_IP_PACKET);
            }
            assert_eq!(
                accounted, n,
                "round {round}: every packet written exactly once"
            );
            if writes < n {
                coalesced_rounds += 1;
            }
            batch.clear();
        }
        assert!(
            coalesced_rounds > 100,
            "GRO coalesced in {coalesced_rounds} rounds"
        );
    }

    /// The receive path on random virtio headers and packets: never panics, never
    /// yields a packet larger than a slot.
    #[test]
    fn absorb_survives_random_virtio_input() {
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let mut rb = TunRecvBatch::with_capacity(64, 1400);
        for _ in 0..20_000 {
            rb.count = rng.below(64) as usize;
            rb.pending.clear();
            let len = rng.below(4000) as usize;
            for b in rb.raws[0][..len].iter_mut() {
                *b = rng.next() as u8;
            }
            // Make the header plausible half of the time.
            if len > VIRTIO_NET_HDR_LEN + 60 && rng.below(2) == 0 {
                let gso = [GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4][rng.below(4) as usize];
                rb.raws[0][0] = (rng.below(2)) as u8;
                rb.raws[0][1] = gso;
                let cs: u16 = if rng.below(2) == 0 { 20 } else { 40 };
                rb.raws[0][6..8].copy_from_slice(&cs.to_ne_bytes());
                let off: u16 = if gso == GSO_UDP_L4 { 6 } else { 16 };
                rb.raws[0][8..10].copy_from_slice(&off.to_ne_bytes());
                let gs = 1 + rng.below(1400) as u16;
                rb.raws[0][4..6].copy_from_slice(&gs.to_ne_bytes());
                rb.raws[0][VIRTIO_NET_HDR_LEN] = if cs == 20 { 0x45 } else { 0x60 };
            }
            let before = rb.count;
            rb.absorb(0, len);
            assert!(rb.count >= before && rb.count <= 64);
            for i in before..rb.count {
                assert!(rb.sizes[i] <= rb.slot_len);
            }
        }
    }

    #[test]
    fn tun_config_validation() {
        let ok = TunConfig {
            name: "fly0".into(),
            mtu: 1420,
            ipv6: A6,
            ipv4: None,
            offload: true,
            tx_queue_len: 0,
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            TunConfig {
                name: "".into(),
                ..ok.clone()
            },
            TunConfig {
                name: "a-very-long-name0".into(),
                ..ok.clone()
            },
            TunConfig {
                name: "a/b".into(),
                ..ok.clone()
            },
            TunConfig {
                name: "a b".into(),
                ..ok.clone()
            },
            TunConfig {
                mtu: 1279,
                ..ok.clone()
            },
            TunConfig {
                ipv6: Ipv6Addr::UNSPECIFIED,
                ..ok.clone()
            },
            TunConfig {
                ipv4: Some(Ipv4Addr::BROADCAST),
                ..ok.clone()
            },
        ] {
            let e = validate(&bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn tun_create_configures_device() {
        in_netns("tun_create_configures_device", || {
            let dev = TunDevice::create(&TunConfig {
                name: "fly0".into(),
                mtu: 1400,
                ipv6: A6,
                ipv4: Some(A4),
                offload: false,
                tx_queue_len: DEFAULT_TX_QUEUE_LEN,
            })
            .expect("create");
            assert_eq!(dev.name(), "fly0");
            assert_eq!(dev.mtu(), 1400);
            assert!(!dev.offload_enabled());
            assert!(dev.ifindex() > 1);
            let out = ip(&["addr", "show", "dev", "fly0"]);
            assert!(out.contains("mtu 1400"), "{out}");
            assert!(
                out.contains(&format!("qlen {DEFAULT_TX_QUEUE_LEN}")),
                "{out}"
            );
            assert!(out.contains(",UP"), "{out}");
            assert!(out.contains("inet 198.18.0.1/32"), "{out}");
            assert!(out.contains("inet6 fd00::1/128"), "{out}");
            assert!(!out.contains("tentative"), "DAD disabled: {out}");

            // The name is in use by our open device.
            let e = TunDevice::create(&TunConfig {
                name: "fly0".into(),
                mtu: 1400,
                ipv6: A6,
                ipv4: None,
                offload: false,
                tx_queue_len: 0,
            })
            .unwrap_err();
            assert!(e.to_string().contains("fly0"), "{e}");

            // A name taken by a non-TUN device.
            let e = TunDevice::create(&TunConfig {
                name: "lo".into(),
                mtu: 1400,
                ipv6: A6,
                ipv4: None,
                offload: false,
                tx_queue_len: 0,
            })
            .unwrap_err();
            eprintln!("error for a non-TUN name: {e}");
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
            assert!(e.to_string().contains("not a TUN"), "{e}");

            drop(dev);
            // The device goes away with its descriptor; the name can be reused, with
            // offload this time.
            let dev = TunDevice::create(&TunConfig {
                name: "fly0".into(),
                mtu: 1500,
                ipv6: A6,
                ipv4: None,
                offload: true,
                tx_queue_len: 0,
            })
            .expect("re-create with offload");
            assert!(dev.offload_enabled());
            let out = ip(&["-d", "link", "show", "dev", "fly0"]);
            assert!(out.contains("gso_max_segs 64"), "{out}");
        });
    }

    /// Reads until a packet matching `pred` shows up (other traffic, e.g. MLD, is
    /// skipped).
    fn read_until(
        dev: &TunDevice,
        batch: &mut TunRecvBatch,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while Instant::now() < deadline {
            dev.recv_batch(batch).unwrap();
            let mut done = false;
            for p in batch.iter() {
                if pred(p) {
                    out.push(p.to_vec());
                    done = true;
                }
            }
            if done {
                return out;
            }
        }
        panic!("no matching packet read from the TUN");
    }

    fn recv_routed_udp(offload: bool) {
        let dev = make("flyrx0", offload, 1400);
        let mut batch = dev.new_recv_batch(IDEAL_BATCH_SIZE);
        // IPv4
        let s4 = StdUdp::bind((A4, 0)).unwrap();
        s4.send_to(b"hello over v4", (B4, 9999)).unwrap();
        let got = read_until(&dev, &mut batch, |p| p[0] >> 4 == 4 && p[9] == 17);
        let p = &got[0];
        assert_eq!(&p[12..16], &A4.octets());
        assert_eq!(&p[16..20], &B4.octets());
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 9999);
        assert_eq!(&p[28..], b"hello over v4");
        assert!(transport_checksum_ok(p), "UDP checksum completed");
        // IPv6
        let s6 = StdUdp::bind((A6, 0)).unwrap();
        s6.send_to(b"hello over v6", (B6, 9999)).unwrap();
        let got = read_until(&dev, &mut batch, |p| p[0] >> 4 == 6 && p[6] == 17);
        let p = &got[0];
        assert_eq!(&p[8..24], &A6.octets());
        assert_eq!(&p[24..40], &B6.octets());
        assert_eq!(&p[48..], b"hello over v6");
        assert!(transport_checksum_ok(p));

        // A GSO burst from our own batched socket: 10 datagrams, one message with GSO.
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V6(A6), 0), 1 << 20).unwrap();
        let mut sb = SendBatch::new(16);
        let dst = SocketAddr::new(IpAddr::V6(B6), 4242);
        for i in 0..10u8 {
            sb.push(dst, &[i; 1000]);
        }
        sb.push(dst, &[10; 77]);
        let st = sock.send_batch(&mut sb).unwrap();
        assert_eq!(st.sent, 11, "{st:?}");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 11 && Instant::now() < deadline {
            dev.recv_batch(&mut batch).unwrap();
            for p in batch.iter() {
                if p[0] >> 4 == 6 && p[6] == 17 && p[42..44] == 4242u16.to_be_bytes() {
                    assert!(p.len() <= 1400);
                    assert!(transport_checksum_ok(p));
                    seen.push(p[48..].to_vec());
                }
            }
        }
        assert_eq!(seen.len(), 11, "each datagram arrives as its own packet");
        for (i, d) in seen.iter().enumerate() {
            let want = if i < 10 {
                vec![i as u8; 1000]
            } else {
                vec![10; 77]
            };
            assert_eq!(d, &want);
        }
        let stats = batch.stats();
        eprintln!(
            "offload={offload} udp_offload={} sock_gso={} recv stats {stats:?}",
            dev.udp_offload_enabled(),
            sock.gso_enabled()
        );
        if offload && dev.udp_offload_enabled() && sock.gso_enabled() {
            assert!(stats.gso_packets >= 1, "USO super-packet split: {stats:?}");
        }
    }

    /// Many reads queued at once, single datagrams and USO super-packets mixed, into a
    /// batch too small for one round: every datagram once, in order, and far fewer
    /// io_uring rounds than reads.
    fn recv_queued_in_order(offload: bool) {
        let dev = make("flyrx1", offload, 1400);
        let mut batch = dev.new_recv_batch(TUN_GSO_MAX_SEGS);
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V6(A6), 0), 4 << 20).unwrap();
        let dst = SocketAddr::new(IpAddr::V6(B6), 4343);
        let mut sb = SendBatch::new(64);
        let mut next = 0u32;
        for round in 0..12 {
            // Even rounds: 40 equal datagrams (one GSO message where the socket has
            // it); odd rounds: 40 of different sizes (one message each).
            for i in 0..40u32 {
                let len = if round % 2 == 0 {
                    900
                } else {
                    8 + (i as usize * 37) % 1200
                };
                let mut d = vec![0u8; len];
                d[..4].copy_from_slice(&next.to_be_bytes());
                next += 1;
                sb.push(dst, &d);
            }
            let st = sock.send_batch(&mut sb).unwrap();
            assert_eq!(st.sent, 40, "{st:?}");
        }
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < next as usize && Instant::now() < deadline {
            dev.recv_batch(&mut batch).unwrap();
            assert!(batch.len() <= TUN_GSO_MAX_SEGS);
            for p in batch.iter() {
                if p[0] >> 4 == 6 && p[6] == 17 && p[42..44] == 4343u16.to_be_bytes() {
                    assert!(transport_checksum_ok(p));
                    seen.push(u32::from_be_bytes([p[48], p[49], p[50], p[51]]));
                }
            }
        }
        let want: Vec<u32> = (0..next).collect();
        assert_eq!(seen, want, "every datagram once, in order");
        let stats = batch.stats();
        eprintln!(
            "offload={offload} io_uring={:?} {stats:?}",
            batch.io_uring()
        );
        if offload {
            assert_eq!(batch.io_uring(), Some(true), "io_uring is available here");
            assert!(
                stats.read_rounds * 4 <= stats.reads,
                "reads come in rounds: {stats:?}"
            );
        } else {
            assert_eq!(stats.read_rounds, 0);
        }
    }

    /// Waiting for the first packet: an idle device times out after the read timeout
    /// (also again, with the readiness poll of the first wait still armed), and a packet
    /// that arrives during a wait ends it at once. With `busy`, each phase starts right
    /// after a batch that emptied a queue of 20, so its first wait is the io_uring one.
    fn recv_waits(batch: TunRecvBatch, dev: &TunDevice, busy: bool) {
        let mut batch = batch;
        let sock = StdUdp::bind((A4, 0)).unwrap();
        let load = |batch: &mut TunRecvBatch| {
            if !busy {
                return;
            }
            for _ in 0..20 {
                sock.send_to(b"load", (B4, 9999)).unwrap();
            }
            let mut got = 0;
            while got < 20 {
                dev.recv_batch(batch).unwrap();
                got += batch.iter().filter(|p| p.ends_with(b"load")).count();
            }
            assert!(batch.loaded, "a batch of 20 reads marks the device loaded");
        };
        dev.set_read_timeout(Duration::from_millis(60));
        load(&mut batch);
        // The kernel's own IPv6 packets (MLD, router solicitations) may end a wait;
        // what matters is that the waits that find nothing last the timeout.
        let mut timeouts = 0;
        for _ in 0..20 {
            let t = Instant::now();
            if dev.recv_batch(&mut batch).unwrap() > 0 {
                continue;
            }
            let waited = t.elapsed();
            assert!(
                waited >= Duration::from_millis(55) && waited < Duration::from_secs(2),
                "{waited:?}"
            );
            timeouts += 1;
            if timeouts == 2 {
                break;
            }
        }
        assert_eq!(timeouts, 2);
        dev.set_read_timeout(Duration::from_secs(5));
        load(&mut batch);
        let sender = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            StdUdp::bind((A4, 0))
                .unwrap()
                .send_to(b"wake up", (B4, 9999))
                .unwrap();
        });
        let t = Instant::now();
        let mut got = false;
        while !got && t.elapsed() < Duration::from_secs(4) {
            dev.recv_batch(&mut batch).unwrap();
            got = batch.iter().any(|p| p.ends_with(b"wake up"));
        }
        sender.join().unwrap();
        assert!(
            got && t.elapsed() < Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn tun_recv_waits_io_uring_and_poll() {
        in_netns("tun_recv_waits_io_uring_and_poll", || {
            let dev = make("flyrw0", true, 1400);
            recv_waits(dev.new_recv_batch(IDEAL_BATCH_SIZE), &dev, true);
            recv_waits(dev.new_recv_batch(IDEAL_BATCH_SIZE), &dev, false);
            recv_waits(
                dev.new_recv_batch(IDEAL_BATCH_SIZE).without_io_uring(),
                &dev,
                true,
            );
        });
    }

    /// `recv_queued` returns at once when nothing is queued; `wait_readable` waits the
    /// read timeout for a packet, or returns as one is queued.
    fn queued_and_wait(dev: &TunDevice, mut batch: TunRecvBatch) {
        dev.set_read_timeout(Duration::from_millis(60));
        let mut timeouts = 0;
        // The kernel's own IPv6 packets (MLD, router solicitations) may end a wait.
        for _ in 0..20 {
            while dev.recv_queued(&mut batch).unwrap() > 0 {}
            let t = Instant::now();
            assert_eq!(dev.recv_queued(&mut batch).unwrap(), 0);
            assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
            dev.wait_readable(&mut batch).unwrap();
            let waited = t.elapsed();
            if dev.recv_queued(&mut batch).unwrap() > 0 {
                continue;
            }
            assert!(
                waited >= Duration::from_millis(55) && waited < Duration::from_secs(2),
                "{waited:?}"
            );
            timeouts += 1;
            if timeouts == 2 {
                break;
            }
        }
        assert_eq!(timeouts, 2);
        dev.set_read_timeout(Duration::from_secs(5));
        let sender = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            StdUdp::bind((A4, 0))
                .unwrap()
                .send_to(b"wake up", (B4, 9999))
                .unwrap();
        });
        let t = Instant::now();
        let mut got = false;
        while !got && t.elapsed() < Duration::from_secs(4) {
            dev.wait_readable(&mut batch).unwrap();
            while dev.recv_queued(&mut batch).unwrap() > 0 {
                got |= batch.iter().any(|p| p.ends_with(b"wake up"));
            }
        }
        sender.join().unwrap();
        let took = t.elapsed();
        assert!(got && took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn tun_recv_queued_does_not_wait() {
        in_netns("tun_recv_queued_does_not_wait", || {
            for (name, offload) in [("flyrq0", false), ("flyrq1", true)] {
                let dev = make(name, offload, 1400);
                queued_and_wait(&dev, dev.new_recv_batch(IDEAL_BATCH_SIZE));
            }
        });
    }

    #[test]
    fn tun_recv_queued_in_order_plain() {
        in_netns("tun_recv_queued_in_order_plain", || {
            recv_queued_in_order(false)
        });
    }

    #[test]
    fn tun_recv_queued_in_order_offload() {
        in_netns("tun_recv_queued_in_order_offload", || {
            recv_queued_in_order(true)
        });
    }

    #[test]
    fn tun_recv_routed_udp_plain() {
        in_netns("tun_recv_routed_udp_plain", || recv_routed_udp(false));
    }

    #[test]
    fn tun_recv_routed_udp_offload() {
        in_netns("tun_recv_routed_udp_offload", || recv_routed_udp(true));
    }

    fn send_to_local_socket(offload: bool) {
        let dev = make("flytx0", offload, 1400);
        let rx6 = StdUdp::bind((A6, 7777)).unwrap();
        let rx4 = StdUdp::bind((A4, 7777)).unwrap();
        rx6.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        rx4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sb = dev.new_send_batch(IDEAL_BATCH_SIZE);
        // One IPv6 packet, zero-copy form.
        let p = ipv6_udp(B6, 5000, A6, 7777, b"single v6 datagram");
        let buf = sb.reserve(2000);
        buf[..p.len()].copy_from_slice(&p);
        assert!(sb.commit(p.len()));
        // A run of one flow (coalescable), then an IPv4 run, and junk.
        let mut want6 = vec![b"single v6 datagram".to_vec()];
        for i in 0..20u8 {
            let payload = vec![i; if i == 19 { 300 } else { 1200 }];
            assert!(sb.push(&ipv6_udp(B6, 5001, A6, 7777, &payload)));
            want6.push(payload);
        }
        let mut want4 = Vec::new();
        for i in 0..8u8 {
            let payload = vec![i + 100; 900];
            assert!(sb.push(&ipv4_udp(B4, 5002, A4, 7777, &payload)));
            want4.push(payload);
        }
        assert!(!sb.push(&[0x50; 60]), "not IP");
        assert!(!sb.push(&[0x45; 10]), "too short");
        let written = dev.send_batch(&mut sb).unwrap();
        assert!(sb.is_empty());
        assert_eq!(written, 29);
        let st = sb.stats();
        assert_eq!(st.packets, 29, "{st:?}");
        assert_eq!(st.rejected, 0, "{st:?}");
        assert_eq!(st.invalid, 2, "{st:?}");
        if offload && dev.udp_offload_enabled() {
            assert!(st.writes < 10, "GRO coalesced the runs: {st:?}");
        } else {
            assert_eq!(st.writes, 29, "{st:?}");
        }
        eprintln!("offload={offload}: {st:?}");
        let mut buf = [0u8; 2048];
        for (i, want) in want6.iter().enumerate() {
            let (n, from) = rx6.recv_from(&mut buf).unwrap_or_else(|e| {
                let snmp =
                    std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap_or_default();
                let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
                panic!("v6 datagram {i}: {e}\n{snmp}\n{dev}")
            });
            assert_eq!(&buf[..n], &want[..]);
            assert_eq!(from.ip(), IpAddr::V6(B6));
        }
        for want in &want4 {
            let (n, from) = rx4.recv_from(&mut buf).expect("v4 datagram");
            assert_eq!(&buf[..n], &want[..]);
            assert_eq!(from.ip(), IpAddr::V4(B4));
        }
        // Packets left for the kernel to checksum (CHECKSUM_PARTIAL), mixed into one
        // batch with a coalescable run: every one arrives, in order per flow. Without
        // offload the batch completes them itself, and a wrong sum would make the
        // receiving socket drop them.
        let mut want4 = Vec::new();
        let mut want6: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
        for i in 0..12u8 {
            if i % 3 == 0 {
                let payload = vec![i; 1100];
                assert!(sb.push(&ipv6_udp(B6, 5003, A6, 7777, &payload)));
                want6.entry(5003).or_default().push(payload);
            } else {
                let payload = vec![i + 50; 700 + usize::from(i)];
                let p = if i % 2 == 0 {
                    ipv4_udp(B4, 5004, A4, 7777, &payload)
                } else {
                    ipv6_udp(B6, 5005, A6, 7777, &payload)
                };
                let reserved = sb.reserve(p.len());
                reserved.copy_from_slice(&p);
                let (start, offset) = to_partial(reserved);
                assert!(sb.commit_partial(p.len(), start, offset));
                if i % 2 == 0 {
                    want4.push(payload)
                } else {
                    want6.entry(5005).or_default().push(payload)
                }
            }
        }
        sb.reserve(60)
            .copy_from_slice(&ipv4_udp(B4, 5004, A4, 7777, &[0; 32]));
        assert!(
            !sb.commit_partial(60, 20, 40),
            "checksum field beyond the packet"
        );
        assert_eq!(dev.send_batch(&mut sb).unwrap(), 12);
        assert_eq!(sb.stats().rejected, 0);
        // This kind of machine has io_uring: the batch went out in one system call.
        assert_eq!(sb.io_uring(), Some(true));

        // A device that is down refuses every write: counted, not an error, and the
        // batch goes on to the next packet.
        let down = std::process::Command::new("ip")
            .args(["link", "set", "flytx0", "down"])
            .status()
            .unwrap();
        assert!(down.success());
        let rejected = sb.stats().rejected;
        for _ in 0..3 {
            assert!(sb.push(&ipv4_udp(B4, 5006, A4, 7777, b"nobody hears")));
        }
        assert_eq!(dev.send_batch(&mut sb).unwrap(), 0);
        assert_eq!(sb.stats().rejected, rejected + 3);
        assert_eq!(sb.stats().last_errno, Some(libc::EIO));
        let mut got6: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
        for _ in 0..want6.values().map(Vec::len).sum::<usize>() {
            let (n, from) = rx6.recv_from(&mut buf).expect("v6 datagram");
            got6.entry(from.port()).or_default().push(buf[..n].to_vec());
        }
        assert_eq!(got6, want6);
        for want in &want4 {
            let (n, _) = rx4.recv_from(&mut buf).expect("v4 datagram");
            assert_eq!(&buf[..n], &want[..]);
        }
    }

    /// Turns a UDP packet's checksum into the partial form: the folded pseudo-header sum.
    fn to_partial(p: &mut [u8]) -> (u16, u16) {
        let ip_len = if p[0] >> 4 == 4 {
            usize::from(p[0] & 0x0f) * 4
        } else {
            40
        };
        let seed = udp_partial_seed(p);
        p[ip_len + 6..ip_len + 8].copy_from_slice(&seed.to_be_bytes());
        (ip_len as u16, 6)
    }

    #[test]
    fn tun_send_delivers_to_local_socket_plain() {
        in_netns("tun_send_delivers_to_local_socket_plain", || {
            send_to_local_socket(false)
        });
    }

    #[test]
    fn tun_send_delivers_to_local_socket_offload() {
        in_netns("tun_send_delivers_to_local_socket_offload", || {
            send_to_local_socket(true)
        });
    }

    /// Reflects every TCP packet read from the TUN back into it with source and
    /// destination addresses swapped (checksums stay valid), so a local client talking
    /// to B reaches a local server on A through the TUN twice per direction.
    fn reflector(
        dev: Arc<TunDevice>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<(usize, TunRecvStats, u64, u64, Duration)> {
        std::thread::spawn(move || {
            let mut rb = dev.new_recv_batch(IDEAL_BATCH_SIZE);
            let mut sb = dev.new_send_batch(IDEAL_BATCH_SIZE);
            let mut max_len = 0;
            while !stop.load(Ordering::Relaxed) {
                dev.recv_batch(&mut rb).unwrap();
                for p in rb.iter() {
                    max_len = max_len.max(p.len());
                    let tcp = match p[0] >> 4 {
                        4 => p[9] == 6,
                        6 => p[6] == 6,
                        _ => false,
                    };
                    if !tcp {
                        continue;
                    }
                    let b = sb.reserve(p.len());
                    b.copy_from_slice(p);
                    if p[0] >> 4 == 4 {
                        let (src, dst) = b[12..20].split_at_mut(4);
                        src.swap_with_slice(dst);
                    } else {
                        let (src, dst) = b[8..40].split_at_mut(16);
                        src.swap_with_slice(dst);
                    }
                    sb.commit(p.len());
                }
                if !sb.is_empty() {
                    dev.send_batch(&mut sb).unwrap();
                }
            }
            let st = sb.stats();
            assert_eq!(st.rejected, 0, "{st:?}");
            (
                max_len,
                rb.stats(),
                st.writes,
                st.packets,
                thread_cpu_time(),
            )
        })
    }

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// CPU time of the calling thread, to the nanosecond (`CLOCK_THREAD_CPUTIME_ID`).
    fn thread_cpu_clock() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a live timespec for clock_gettime to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// CPU time (user + system) of the calling thread: what the TUN edge cost, including
    /// the kernel's work done in our read/write syscalls, independent of other load.
    fn thread_cpu_time() -> Duration {
        // SAFETY: all-zeroes is a valid rusage; getrusage writes one into the pointer.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a live rusage; RUSAGE_THREAD has no other preconditions.
        unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }

    /// Returns the reflector's CPU nanoseconds per packet.
    fn tcp_through_tun(offload: bool, v6: bool, bytes: usize) -> f64 {
        let mtu = 1400;
        let dev = Arc::new(make(
            if offload { "flytcp1" } else { "flytcp0" },
            offload,
            mtu,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let refl = reflector(Arc::clone(&dev), Arc::clone(&stop));
        let (a, b): (IpAddr, IpAddr) = if v6 {
            (A6.into(), B6.into())
        } else {
            (A4.into(), B4.into())
        };
        let listener = TcpListener::bind((a, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), b, "the reflected connection comes from B");
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0usize;
            let mut k = 0u8;
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                for &x in &buf[..n] {
                    assert_eq!(x, k, "byte {total} corrupted");
                    k = k.wrapping_add(1).wrapping_rem(251);
                    total += 1;
                }
            }
            total
        });
        let domain = if v6 {
            socket2::Domain::IPV6
        } else {
            socket2::Domain::IPV4
        };
        let c = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
        c.bind(&SocketAddr::new(a, 0).into()).unwrap();
        c.connect_timeout(&SocketAddr::new(b, port).into(), Duration::from_secs(5))
            .expect("connect through the TUN reflector");
        let mut c: std::net::TcpStream = c.into();
        let chunk: Vec<u8> = (0..251 * 1024).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            c.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let received = server.join().unwrap();
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let (max_len, rstats, writes, packets, cpu) = refl.join().unwrap();
        assert_eq!(received, bytes);
        assert!(
            max_len <= usize::from(mtu),
            "packets read are ≤ MTU after split ({max_len})"
        );
        let mbps = bytes as f64 * 8.0 / secs / 1e6;
        let ns_per_packet = cpu.as_nanos() as f64 / rstats.packets.max(1) as f64;
        eprintln!(
            "TCP via TUN reflector (v6={v6}, offload={offload}): {} MiB in {secs:.2}s = {mbps:.0} Mbit/s; \
             reflector CPU {:.2}s = {ns_per_packet:.0} ns/packet read+written; read {rstats:?}; \
             wrote {packets} packets in {writes} writes",
            bytes >> 20,
            cpu.as_secs_f64()
        );
        if offload {
            assert!(
                rstats.gso_packets > 0,
                "TSO super-packets were read and split"
            );
            assert!(writes < packets, "GRO coalesced on write");
        } else {
            assert_eq!(rstats.gso_packets, 0);
            assert_eq!(writes, packets);
        }
        ns_per_packet
    }

    #[test]
    fn tun_tcp_through_reflector_plain() {
        in_netns("tun_tcp_through_reflector_plain", || {
            tcp_through_tun(false, false, 4 << 20);
        });
    }

    #[test]
    fn tun_tcp_through_reflector_offload_v4() {
        in_netns("tun_tcp_through_reflector_offload_v4", || {
            tcp_through_tun(true, false, 8 << 20);
        });
    }

    #[test]
    fn tun_tcp_through_reflector_offload_v6() {
        in_netns("tun_tcp_through_reflector_offload_v6", || {
            tcp_through_tun(true, true, 8 << 20);
        });
    }

    /// CPU cost of the TUN edge per packet with offload on vs. off, measured as the
    /// reflector thread's CPU time (robust to other load on the machine). Run with
    /// `--ignored --nocapture`, ideally in release mode.
    #[test]
    #[ignore = "benchmark"]
    fn bench_tun_offload_effect() {
        in_netns("bench_tun_offload_effect", || {
            let mut off = Vec::new();
            let mut on = Vec::new();
            for _ in 0..3 {
                off.push(tcp_through_tun(false, false, 256 << 20));
                on.push(tcp_through_tun(true, false, 1 << 30));
            }
            let (off, on) = (median(off), median(on));
            eprintln!(
                "median reflector CPU per packet: offload off {off:.0} ns, on {on:.0} ns: {:.1}x less",
                off / on
            );
        });
    }

    /// CPU time of `recv_batch` per packet, io_uring rounds against one `read(2)` per
    /// packet, in the same run: bursts of 256 datagrams of 1392 bytes (the tunnel
    /// benchmark's UDP size) queued by a local socket, then drained. Run with
    /// `cargo test --release -p flynode-tunnel bench_tun_read_rounds -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn bench_tun_read_rounds() {
        in_netns("bench_tun_read_rounds", || {
            let dev = make("flyrb0", true, 1420);
            let sock = StdUdp::bind((A4, 0)).unwrap();
            let payload = [0x5au8; 1392];
            let run = |mut batch: TunRecvBatch| -> f64 {
                let (mut cpu, mut packets) = (Duration::ZERO, 0u64);
                for _ in 0..400 {
                    for _ in 0..256 {
                        sock.send_to(&payload, (B4, 9999)).unwrap();
                    }
                    let mut got = 0;
                    while got < 256 {
                        let t = thread_cpu_clock();
                        let n = dev.recv_batch(&mut batch).unwrap();
                        cpu += thread_cpu_clock() - t;
                        got += batch.iter().filter(|p| p.len() == 20 + 8 + 1392).count();
                        assert!(n > 0, "datagrams were lost");
                    }
                    packets += got as u64;
                }
                cpu.as_nanos() as f64 / packets as f64
            };
            let (mut syscall, mut rounds) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                syscall.push(run(dev.new_recv_batch(IDEAL_BATCH_SIZE).without_io_uring()));
                rounds.push(run(dev.new_recv_batch(IDEAL_BATCH_SIZE)));
            }
            let (syscall, rounds) = (median(syscall), median(rounds));
            eprintln!(
                "median recv_batch CPU per 1392-byte datagram: read(2) {syscall:.0} ns, io_uring rounds {rounds:.0} ns ({:.2}x)",
                syscall / rounds
            );
        });
    }

    /// Wakeup latency of an idle reader: one datagram every 2 ms from another thread
    /// on the same CPU, time from `send_to` to `recv_batch` returning it (median of
    /// 500), io_uring's readiness poll against `poll(2)`. Run with
    /// `cargo test --release -p flynode-tunnel bench_tun_wakeup -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn bench_tun_wakeup() {
        in_netns("bench_tun_wakeup", || {
            let dev = Arc::new(make("flywk0", true, 1420));
            let pin = || {
                // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity
                // only touch the set we pass and the calling thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(0, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                }
            };
            let run = |batch: TunRecvBatch| -> Duration {
                let start = Arc::new(parking_lot::Mutex::new(Vec::<Instant>::new()));
                let (d, st) = (Arc::clone(&dev), Arc::clone(&start));
                let reader = std::thread::spawn(move || {
                    pin();
                    let mut batch = batch;
                    let mut lat = Vec::new();
                    while lat.len() < 500 {
                        d.recv_batch(&mut batch).unwrap();
                        let now = Instant::now();
                        for p in batch.iter() {
                            if p.len() == 20 + 8 + 8 && p.ends_with(b"wakeup!!") {
                                let t = *st.lock().last().unwrap();
                                lat.push(now - t);
                            }
                        }
                    }
                    lat
                });
                pin();
                let sock = StdUdp::bind((A4, 0)).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                for _ in 0..500 {
                    std::thread::sleep(Duration::from_millis(2));
                    start.lock().push(Instant::now());
                    sock.send_to(b"wakeup!!", (B4, 9999)).unwrap();
                }
                let mut lat = reader.join().unwrap();
                lat.sort();
                lat[lat.len() / 2]
            };
            for _ in 0..3 {
                let polled = run(dev.new_recv_batch(IDEAL_BATCH_SIZE).without_io_uring());
                let uring = run(dev.new_recv_batch(IDEAL_BATCH_SIZE));
                eprintln!(
                    "median wakeup latency: poll(2) + read(2) {polled:?}, io_uring {uring:?}"
                );
            }
        });
    }

    /// A decrypted packet joins the batch by buffer swap: the batch holds its bytes, the
    /// caller gets back a buffer at least as large, and a non-IP packet is refused and
    /// counted with the caller's buffer left as it was.
    #[test]
    fn push_buffer_swaps_without_copying() {
        let mut batch = TunSendBatch::with_capacity(4, 1500);
        let p = ipv4_udp(
            Ipv4Addr::new(198, 18, 0, 1),
            1,
            Ipv4Addr::new(198, 18, 0, 2),
            2,
            b"hi",
        );
        let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN + 65_600];
        buf[VIRTIO_NET_HDR_LEN..][..p.len()].copy_from_slice(&p);
        let given = buf.as_ptr();
        assert!(batch.push_buffer(&mut buf, p.len()));
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch.bufs[0].data.as_ptr(),
            given,
            "the same allocation, not a copy"
        );
        assert_eq!(
            batch.bufs[0].as_ref(),
            &[&[0u8; VIRTIO_NET_HDR_LEN][..], &p].concat()
        );
        assert!(buf.len() >= VIRTIO_NET_HDR_LEN + 65_600, "{}", buf.len());
        buf[VIRTIO_NET_HDR_LEN] = 0x50;
        let before = buf.clone();
        assert!(!batch.push_buffer(&mut buf, 40));
        assert_eq!(buf, before);
        assert_eq!((batch.len(), batch.stats().invalid), (1, 1));
    }

    /// Cost of coalescing UDP per packet, ours (`udp_gro`) against `tun-rs`'s GRO in the
    /// same run: 128 datagrams of 1392 bytes (iperf3's size in `bench/tunnel.sh`) of
    /// one flow, pushes measured separately and subtracted.
    #[test]
    #[ignore = "benchmark"]
    fn bench_udp_gro_cost() {
        let pkts: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
            .map(|i| {
                ipv4_udp(
                    Ipv4Addr::new(198, 18, 0, 1),
                    5000,
                    Ipv4Addr::new(198, 18, 0, 2),
                    5201,
                    &[i as u8; 1392],
                )
            })
            .collect();
        let mut batch = TunSendBatch::new();
        let rounds = 2000;
        let n = (rounds * IDEAL_BATCH_SIZE) as f64;
        let mut run = |coalesce: &mut dyn FnMut(&mut TunSendBatch) -> usize| {
            let mut writes = 0;
            let t = thread_cpu_time();
            for _ in 0..rounds {
                for p in &pkts {
                    batch.push(p);
                }
                writes += coalesce(&mut batch);
                batch.clear();
            }
            ((thread_cpu_time() - t).as_nanos() as f64 / n, writes)
        };
        let mut results = Vec::new();
        for _ in 0..5 {
            let (push, _) = run(&mut |_| 0);
            let (ours, w1) = run(&mut |b| {
                let mut queued = Vec::new();
                b.udp_gro
                    .queue(&mut b.bufs[..IDEAL_BATCH_SIZE], 0, &mut queued);
                queued.len()
            });
            let (theirs, w2) = run(&mut |b| {
                let bufs = &mut b.bufs[..IDEAL_BATCH_SIZE];
                for x in bufs.iter_mut() {
                    x.data[0] = UNWRITTEN;
                    x.data[1] = UNWRITTEN;
                }
                b.gro.apply_gro(bufs, VIRTIO_NET_HDR_LEN, true).unwrap();
                bufs.iter().filter(|x| x.data[0] != UNWRITTEN).count()
            });
            assert_eq!(w1, w2, "both coalesce into the same number of writes");
            results.push((ours - push, theirs - push));
        }
        let ours = median(results.iter().map(|r| r.0).collect());
        let theirs = median(results.iter().map(|r| r.1).collect());
        eprintln!(
            "UDP coalescing per 1392-byte datagram (median of 5): ours {ours:.0} ns, tun-rs {theirs:.0} ns => {:.2}x",
            theirs / ours
        );
    }

    /// Cost of coalescing alone (tun-rs GRO: checksum validation, copies) per packet,
    /// for 128 full-size segments of one TCP flow; pushes measured separately.
    #[test]
    #[ignore = "benchmark"]
    fn bench_gro_cost() {
        let pkts: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE as u32)
            .map(|i| tcp_packet(false, 4000, 80, 1000 + i * 1360, 1, 0x10, &[7u8; 1360]))
            .collect();
        let mut batch = TunSendBatch::new();
        let rounds = 2000;
        let t = Instant::now();
        for _ in 0..rounds {
            for p in &pkts {
                batch.push(p);
            }
            batch.clear();
        }
        let push = t.elapsed();
        let t = Instant::now();
        let mut writes = 0;
        for _ in 0..rounds {
            for p in &pkts {
                batch.push(p);
            }
            let bufs = &mut batch.bufs[..IDEAL_BATCH_SIZE];
            for b in bufs.iter_mut() {
                b.data[0] = UNWRITTEN;
                b.data[1] = UNWRITTEN;
            }
            batch.gro.apply_gro(bufs, VIRTIO_NET_HDR_LEN, true).unwrap();
            writes += bufs.iter().filter(|b| b.data[0] != UNWRITTEN).count();
            batch.clear();
        }
        let total = t.elapsed();
        let n = (rounds * IDEAL_BATCH_SIZE) as f64;
        eprintln!(
            "push {:.0} ns/packet; push+GRO {:.0} ns/packet => GRO {:.0} ns/packet ({} packets per write)",
            push.as_nanos() as f64 / n,
            total.as_nanos() as f64 / n,
            (total - push).as_nanos() as f64 / n,
            n as usize / writes
        );
    }
}
