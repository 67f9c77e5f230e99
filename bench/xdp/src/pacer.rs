//! The generator's XDP program and its rate limiter.
//!
//! Live-frames mode runs the program on every generated frame: XDP_TX sends the frame out
//! of the gen veth, XDP_DROP recycles it at once (into the test run's own page pool,
//! without touching the veth). The program paces what it sends: it waits (spinning on
//! the clock, inside the program) until `now >= next`, sends, and sets
//! `next = max(next + interval, now - credit)`, so frames go out evenly at one per
//! `interval` ns (catching up at most [`BURST`] frames after a stall), or as fast as the
//! generator loops when `interval` is 0. Userspace changes the rate in the map between
//! measurements. Waiting rather than dropping the frames in excess matters: every frame
//! the generator runs but does not send goes back to its page pool through the pool's
//! shared ring, whose lock the receiver also takes for every frame it returns.
//!
//! Why pace at all: a veth's receive ring holds 256 frames. Frames offered beyond what
//! the receiver drains are dropped by the *sender* (`tx_queue_0_xdp_xmit_errors`), which
//! returns their pages to the generator's page pool from CPU0 while the receiver returns
//! the pages of the frames it consumed to the same pool from CPU1: both contend for the
//! pool's ring lock, and under heavy overload that lock costs the receiver more than its
//! own work. A NIC recycles its pages locally, so that cost would be an artefact of the
//! generator; the sweep over offered rates shows both regimes.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use flynode_xsk::rawbpf::{Insn, XDP_DROP, XDP_TX};

use crate::bpfsys::{self, Asm};

const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_KTIME_GET_NS: i32 = 5;

/// The map value: `[next_ns, interval_ns, credit_ns, frames_sent]`.
type Bucket = [u64; 4];

/// Frames the pacer may send back to back to catch up after the generator stalled (a
/// syscall boundary, a slow flush): enough to keep the average rate, few enough not to
/// overflow the receiver's 256-frame ring in one burst.
const BURST: u64 = 32;

/// The one-entry array map holding the bucket.
pub struct Pacer {
    map: OwnedFd,
    /// The rate last set, frames per second as f64 bits (0.0: unpaced).
    rate: AtomicU64,
}

impl Pacer {
    pub fn new() -> io::Result<Self> {
        let map = bpfsys::create_map(bpfsys::BPF_MAP_TYPE_ARRAY, 4, size_of::<Bucket>(), 1)?;
        Ok(Self {
            map,
            rate: AtomicU64::new(0),
        })
    }

    /// The rate last set (`None`: unpaced).
    pub fn rate(&self) -> Option<f64> {
        Some(f64::from_bits(self.rate.load(Ordering::Relaxed))).filter(|r| *r > 0.0)
    }

    /// Sends at most `pps` frames per second (`None`: as fast as the generator loops).
    pub fn set_rate(&self, pps: Option<f64>) -> io::Result<()> {
        self.rate
            .store(pps.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        let interval = match pps {
            Some(r) if r > 0.0 => (1e9 / r).round() as u64,
            _ => 0,
        };
        let value: Bucket = [0, interval, interval * BURST, 0];
        let bytes: Vec<u8> = value.iter().flat_map(|v| v.to_ne_bytes()).collect();
        bpfsys::update_elem(&self.map, &0u32.to_ne_bytes(), &bytes)?;
        Ok(())
    }

    /// The generator program for `frame`, reading its bucket from this pacer's map.
    ///
    /// Before a frame is sent, the program writes `frame` over it again. Live-frames mode
    /// initialises a page's data only when the page is first allocated and recycles
    /// pages through a page pool; the receiver's stack may write into the frames it got
    /// (GRO rewrites the IP and UDP lengths and checksum of the first datagram of a
    /// merged train in place), and those pages come back to the pool. Without the
    /// rewrite, recycled frames go out with corrupt headers and the IP layer drops them.
    ///
    /// With `flows` > 1 (a power of two), consecutive frames come from `flows` different
    /// client ports, round robin: the UDP source port becomes `sport + k` and the first
    /// payload word `word - k`, which keeps the UDP checksum valid (the one's complement
    /// sum does not change). Frames must be IPv4/UDP without options with at least two
    /// payload bytes.
    pub fn program(&self, frame: &[u8], flows: u32) -> Vec<Insn> {
        let mut a = Asm::default();
        let [map_lo, map_hi] = Insn::ld_map_fd(1, self.map.as_raw_fd());
        a.op(Insn::new(0xbf, 6, 1, 0, 0)); // r6 = r1 (ctx)
        a.op(Insn::new(0x62, 10, 0, -4, 0)); // *(u32 *)(r10 - 4) = 0
        a.op(Insn::new(0xbf, 2, 10, 0, 0)); // r2 = r10
        a.op(Insn::new(0x07, 2, 0, 0, -4)); // r2 += -4
        a.op(map_lo); // r1 = map
        a.op(map_hi);
        a.op(Insn::call(BPF_FUNC_MAP_LOOKUP_ELEM));
        a.jump(Insn::new(0x15, 0, 0, 0, 0), "drop"); // if r0 == 0 goto drop
        a.op(Insn::new(0xbf, 8, 0, 0, 0)); // r8 = bucket
        a.op(Insn::call(BPF_FUNC_KTIME_GET_NS));
        a.op(Insn::new(0xbf, 7, 0, 0, 0)); // r7 = now
        a.op(Insn::new(0x79, 1, 8, 0, 0)); // r1 = next
        a.jump(Insn::new(0x3d, 7, 1, 0, 0), "send"); // if now >= next goto send
        // Busy-wait for `next` (bounded: WAIT_SPINS clock reads), so that the generator
        // runs (and recycles) no more frames than it sends.
        a.op(Insn::mov64_imm(9, WAIT_SPINS));
        a.label("wait");
        a.op(Insn::call(BPF_FUNC_KTIME_GET_NS));
        a.op(Insn::new(0xbf, 7, 0, 0, 0)); // r7 = now
        a.op(Insn::new(0x79, 1, 8, 0, 0)); // r1 = next
        a.jump(Insn::new(0x3d, 7, 1, 0, 0), "send"); // if now >= next goto send
        a.op(Insn::new(0x07, 9, 0, 0, -1)); // r9 -= 1
        a.jump(Insn::new(0x55, 9, 0, 0, 0), "wait"); // if r9 != 0 goto wait
        a.jump(Insn::new(0x05, 0, 0, 0, 0), "drop"); // waited too long: skip this frame
        a.label("send");
        a.op(Insn::new(0x79, 1, 8, 0, 0)); // r1 = next
        a.op(Insn::new(0x79, 2, 8, 8, 0)); // r2 = interval
        a.op(Insn::new(0x0f, 1, 2, 0, 0)); // r1 += r2
        a.op(Insn::new(0x79, 3, 8, 16, 0)); // r3 = credit
        a.op(Insn::new(0xbf, 4, 7, 0, 0)); // r4 = now
        a.op(Insn::new(0x1f, 4, 3, 0, 0)); // r4 -= r3
        a.op(Insn::new(0x3d, 1, 4, 1, 0)); // if r1 >= now - credit skip the next
        a.op(Insn::new(0xbf, 1, 4, 0, 0)); // r1 = now - credit (bounded catch-up)
        a.op(Insn::new(0x7b, 8, 1, 0, 0)); // next = r1
        // Restore the frame: r2 = data, r3 = data_end, bounds check, then stores.
        a.op(Insn::ldx_w(2, 6, 0));
        a.op(Insn::ldx_w(3, 6, 4));
        a.op(Insn::new(0xbf, 4, 2, 0, 0)); // r4 = r2
        a.op(Insn::new(0x07, 4, 0, 0, frame.len() as i32)); // r4 += len
        a.jump(Insn::new(0x2d, 4, 3, 0, 0), "drop"); // if r4 > data_end goto drop
        let mut off = 0;
        while off + 8 <= frame.len() {
            let v = u64::from_le_bytes(frame[off..off + 8].try_into().expect("8 bytes"));
            // r5 = v (ld_imm64: low half in the first slot, high half in the second)
            a.op(Insn::new(0x18, 5, 0, 0, v as u32 as i32));
            a.op(Insn::new(0, 0, 0, 0, (v >> 32) as u32 as i32));
            a.op(Insn::new(0x7b, 2, 5, off as i16, 0)); // *(u64 *)(r2 + off) = r5
            off += 8;
        }
        if off + 4 <= frame.len() {
            let v = u32::from_le_bytes(frame[off..off + 4].try_into().expect("4 bytes"));
            a.op(Insn::new(0x62, 2, 0, off as i16, v as i32)); // *(u32 *)(r2 + off) = v
            off += 4;
        }
        if off + 2 <= frame.len() {
            let v = u16::from_le_bytes(frame[off..off + 2].try_into().expect("2 bytes"));
            a.op(Insn::new(0x6a, 2, 0, off as i16, i32::from(v))); // *(u16 *)
            off += 2;
        }
        if off < frame.len() {
            a.op(Insn::new(0x72, 2, 0, off as i16, i32::from(frame[off]))); // *(u8 *)
        }
        if flows > 1 {
            assert!(flows.is_power_of_two() && flows <= 4096 && frame.len() >= PAYLOAD_AT + 2);
            let sport = u16::from_be_bytes([frame[SPORT_AT], frame[SPORT_AT + 1]]);
            let word = u16::from_be_bytes([frame[PAYLOAD_AT], frame[PAYLOAD_AT + 1]]);
            // Neither field may wrap, or the checksum compensation breaks.
            assert!(u32::from(sport) + flows <= 0xffff && u32::from(word) >= flows);
            a.op(Insn::new(0x79, 1, 8, 24, 0)); // r1 = frames_sent
            a.op(Insn::new(0xbf, 3, 1, 0, 0)); // r3 = r1
            a.op(Insn::new(0x07, 3, 0, 0, 1)); // r3 += 1
            a.op(Insn::new(0x7b, 8, 3, 24, 0)); // frames_sent = r3
            a.op(Insn::new(0x57, 1, 0, 0, (flows - 1) as i32)); // r1 &= flows - 1 (k)
            a.op(Insn::mov64_imm(3, i32::from(sport))); // r3 = sport
            a.op(Insn::new(0x0f, 3, 1, 0, 0)); // r3 += k
            a.op(Insn::new(0xdc, 3, 0, 0, 16)); // r3 = htons(r3)
            a.op(Insn::new(0x6b, 2, 3, SPORT_AT as i16, 0)); // *(u16 *)(data + 34) = r3
            a.op(Insn::mov64_imm(4, i32::from(word))); // r4 = word
            a.op(Insn::new(0x1f, 4, 1, 0, 0)); // r4 -= k
            a.op(Insn::new(0xdc, 4, 0, 0, 16)); // r4 = htons(r4)
            a.op(Insn::new(0x6b, 2, 4, PAYLOAD_AT as i16, 0)); // *(u16 *)(data + 42) = r4
        }
        a.op(Insn::mov64_imm(0, XDP_TX as i32));
        a.op(Insn::exit());
        a.label("drop");
        a.op(Insn::mov64_imm(0, XDP_DROP as i32));
        a.op(Insn::exit());
        a.finish()
    }
}

/// Offsets of the UDP source port and of the payload in an untagged IPv4 frame without
/// options.
const SPORT_AT: usize = 14 + 20;
const PAYLOAD_AT: usize = 14 + 20 + 8;

/// Clock reads the program spins for at most while waiting for its next slot (about
/// 25 ns each here: several microseconds, more than the interval of any rate we offer).
const WAIT_SPINS: i32 = 512;
