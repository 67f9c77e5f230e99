//! The TUN device's packet handling without a device, for the fuzz targets in `fuzz/`
//! (see `fuzz/oracles`): one raw read through the receive path (virtio-net header,
//! checksum completion, GSO split) and one batch of UDP packets through the send-side
//! coalescing. Not an API: reached through `flynode_tunnel::fuzzing`, hidden from docs.
//!
//! A child of `tun` so that it drives the same private code the device does
//! ([`TunRecvBatch`]'s `absorb`, `udp_gro`) on the same buffers, rather than a copy of it.

pub use tun_rs::{VIRTIO_NET_HDR_LEN, VirtioNetHdr};

use super::{RAW_BUF_BYTES, TunRecvBatch, TunSendBatch, udp_gro};

/// A receive batch fed with reads from memory instead of the device.
pub struct Receiver {
    batch: TunRecvBatch,
    used: usize,
}

impl Receiver {
    /// A batch of `capacity` slots of `max_packet` bytes (clamped as
    /// [`TunRecvBatch::with_capacity`] does).
    pub fn new(capacity: usize, max_packet: usize) -> Receiver {
        Receiver {
            batch: TunRecvBatch::with_capacity(capacity, max_packet),
            used: 0,
        }
    }

    /// Packets one batch holds.
    pub fn capacity(&self) -> usize {
        self.batch.slots.len()
    }

    /// Largest packet a slot holds.
    pub fn slot_len(&self) -> usize {
        self.batch.slot_len
    }

    /// Largest read the device path makes; a read of exactly this size is taken as
    /// truncated.
    pub const RAW_BUF_BYTES: usize = RAW_BUF_BYTES;

    /// Runs `raw` (virtio-net header and packet, as one `read` returns it; cut at
    /// [`Self::RAW_BUF_BYTES`]) through the receive path of a batch whose first `used`
    /// slots (at most [`Self::capacity`]) are already taken. Returns false if it is a
    /// super-packet that does not fit the rest of the batch (the device path keeps it
    /// for the next one); [`Self::packets`] then are what it added.
    pub fn absorb(&mut self, used: usize, raw: &[u8]) -> bool {
        let used = used.min(self.capacity());
        let len = raw.len().min(RAW_BUF_BYTES);
        self.batch.count = used;
        self.batch.pending.clear();
        self.used = used;
        self.batch.raws[0][..len].copy_from_slice(&raw[..len]);
        self.batch.absorb(0, len)
    }

    /// The packets the last [`Self::absorb`] added, in order.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.batch.slots[self.used..self.batch.count]
            .iter()
            .zip(&self.batch.sizes[self.used..])
            .map(|(s, &n)| &s[..n])
    }

    /// Reads dropped so far.
    pub fn dropped(&self) -> u64 {
        self.batch.stats.dropped
    }
}

/// One write the send path would make: `bytes` is the virtio-net header and the IP
/// packet, carrying `segments` datagrams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub bytes: Vec<u8>,
    pub segments: usize,
}

/// A send batch whose UDP packets are coalesced as [`super::TunDevice::send_batch`]
/// does with UDP offload on, and handed back instead of written.
pub struct UdpCoalescer {
    batch: TunSendBatch,
}

impl Default for UdpCoalescer {
    fn default() -> Self {
        UdpCoalescer::new()
    }
}

impl UdpCoalescer {
    /// The batch a device with offload uses.
    pub fn new() -> UdpCoalescer {
        UdpCoalescer {
            batch: TunSendBatch::new(),
        }
    }

    /// Whether the send path hands `packet` to the UDP coalescing.
    pub fn is_udp(packet: &[u8]) -> bool {
        udp_gro::is_udp(packet)
    }

    /// The writes for `packets`, in order; `None` if one of them is not for the UDP
    /// coalescing ([`Self::is_udp`]) or the batch refuses it.
    pub fn coalesce(&mut self, packets: &[&[u8]]) -> Option<Vec<Write>> {
        let batch = &mut self.batch;
        batch.clear();
        for p in packets {
            if !udp_gro::is_udp(p) || !batch.push(p) {
                batch.clear();
                return None;
            }
        }
        let n = batch.count;
        batch.queued.clear();
        batch
            .udp_gro
            .queue(&mut batch.bufs[..n], 0, &mut batch.queued);
        let writes = batch
            .queued
            .iter()
            .map(|q| {
                let b = &batch.bufs[q.index];
                Write {
                    bytes: b.data[q.from..b.len].to_vec(),
                    segments: q.segments,
                }
            })
            .collect();
        batch.clear();
        Some(writes)
    }
}
