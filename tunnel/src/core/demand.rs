//! Lazy sessions: when a peer gets a handshake or a keepalive, and when its session
//! state is let go.
//!
//! A map of thousands of nodes is mostly peers this node has nothing to say to. Each
//! costs its identity (key, addresses, endpoint) and this record, nothing more, until
//! traffic needs it:
//!
//! - **Cold** peers (the default) get no handshake and no keepalive of ours. The first
//!   packet for one creates its session state, queues behind a handshake and leaves
//!   when the handshake completes. Once nothing has moved either way (not even a
//!   keepalive) for [`IDLE_RELEASE_MS`], the session state is dropped again.
//! - **Warm** peers are the ones whose liveness this node must know without traffic:
//!   the daemon marks the workers of the map's services warm, because an edge chooses
//!   only workers whose session is alive, and must notice a dead one before it sends it
//!   a flow. A warm peer gets a handshake at once, our persistent keepalive, and is
//!   never let go.
//! - A cold peer **answers** a keepalive with one of its own (at most one per half
//!   interval, and only while the keepalive it answers is fresh): the warm side then
//!   hears from it every interval, which is how an edge sees that an idle worker is
//!   alive, while two cold peers never start keepalives and fall idle. An answer to an
//!   answer arrives when the answering side has just sent one, so no ping-pong starts.
//!
//! A peer that does not answer is retried with capped exponential backoff: one
//! initiation per attempt (not boringtun's retransmission every 5 s for 90 s), the
//! next attempt after 5 s, 10 s, 20 s ... up to [`BACKOFF_MAX_WARM_MS`] for a warm peer
//! (an edge finds a worker that came back within that) and [`BACKOFF_MAX_COLD_MS`] for a
//! cold one that traffic keeps asking for; with a jitter of ±1/8 so that a fleet
//! restarted at once does not retry in step. Packets that want a peer in backoff queue
//! behind its next attempt instead of sending initiations of their own.
//!
//! Everything here is atomics and plain arithmetic on a millisecond clock passed in, so
//! the decisions are unit-tested with a clock the test moves.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

/// How long an initiation may go unanswered before the attempt counts as failed
/// (WireGuard's REKEY_TIMEOUT).
pub(crate) const ATTEMPT_TIMEOUT_MS: u64 = 5_000;
/// The first backoff after a failed attempt.
pub(crate) const BACKOFF_MIN_MS: u64 = 5_000;
/// The longest backoff of a warm peer: how soon an edge finds a worker that is back.
pub(crate) const BACKOFF_MAX_WARM_MS: u64 = 30_000;
/// The longest backoff of a cold peer that traffic still asks for.
pub(crate) const BACKOFF_MAX_COLD_MS: u64 = 600_000;
/// A packet that wanted a session keeps its peer wanted this long.
pub(crate) const NEED_WINDOW_MS: u64 = 10_000;
/// A cold peer's session state is dropped after this long without any traffic.
pub(crate) const IDLE_RELEASE_MS: u64 = 120_000;
/// A keepalive is answered only within this long of its arrival.
const ANSWER_WINDOW_MS: u64 = 1_000;

/// What [`Demand::attempt`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// No initiation of ours in flight.
    None,
    /// One is in flight and may still be answered.
    Waiting,
    /// One went unanswered: counted, and the next one pushed back.
    Failed,
}

/// One peer's demand for a session. Times are milliseconds of the core's clock; 0 is
/// "never".
#[derive(Debug, Default)]
pub(crate) struct Demand {
    warm: AtomicBool,
    /// Seeds the jitter, so that peers do not retry in step.
    seed: u64,
    /// The last packet that wanted a session this peer did not have.
    need_ms: AtomicU64,
    /// When our initiation in flight was sent.
    attempt_ms: AtomicU64,
    /// No initiation before this.
    next_ms: AtomicU64,
    backoff_ms: AtomicU64,
    /// Attempts that went unanswered, ever.
    pub(crate) failures: AtomicU64,
    /// The first unanswered attempt since the peer last had a session.
    unreachable_since_ms: AtomicU64,
    /// The last data packet either way (keepalives are not data).
    data_ms: AtomicU64,
    ka_tx_ms: AtomicU64,
    ka_rx_ms: AtomicU64,
}

fn stamp(now: u64) -> u64 {
    now.max(1)
}

/// Stores `now` in `at` unless it holds a time less than a second older.
fn refresh(at: &AtomicU64, now: u64) {
    if now.saturating_sub(at.load(Relaxed)) >= 1_000 {
        at.store(stamp(now), Relaxed);
    }
}

fn since(now: u64, then: u64) -> u64 {
    if then == 0 {
        u64::MAX
    } else {
        now.saturating_sub(then)
    }
}

impl Demand {
    pub(crate) fn new(warm: bool, seed: u64) -> Demand {
        Demand {
            warm: AtomicBool::new(warm),
            seed,
            ..Demand::default()
        }
    }

    pub(crate) fn warm(&self) -> bool {
        self.warm.load(Relaxed)
    }

    pub(crate) fn set_warm(&self, warm: bool) {
        self.warm.store(warm, Relaxed);
    }

    /// Whether the peer should have a session now: warm, or asked for by a packet.
    pub(crate) fn wanted(&self, now: u64) -> bool {
        self.warm() || since(now, self.need_ms.load(Relaxed)) < NEED_WINDOW_MS
    }

    /// A packet wanted a session the peer does not have.
    pub(crate) fn needed(&self, now: u64) {
        refresh(&self.need_ms, now);
    }

    /// Whether an initiation may go out now: none in flight and the backoff over.
    pub(crate) fn may_initiate(&self, now: u64) -> bool {
        self.attempt_ms.load(Relaxed) == 0 && now >= self.next_ms.load(Relaxed)
    }

    /// An initiation went out.
    pub(crate) fn initiated(&self, now: u64) {
        self.attempt_ms.store(stamp(now), Relaxed);
    }

    /// The state of our attempt in flight; a timed-out one is counted and backed off.
    pub(crate) fn attempt(&self, now: u64) -> Attempt {
        let at = self.attempt_ms.load(Relaxed);
        if at == 0 {
            return Attempt::None;
        }
        if now.saturating_sub(at) < ATTEMPT_TIMEOUT_MS {
            return Attempt::Waiting;
        }
        let max = if self.warm() {
            BACKOFF_MAX_WARM_MS
        } else {
            BACKOFF_MAX_COLD_MS
        };
        let backoff = (self.backoff_ms.load(Relaxed) * 2).clamp(BACKOFF_MIN_MS, max);
        self.backoff_ms.store(backoff, Relaxed);
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        // ±1/8 of the backoff, varying by peer and attempt.
        let spread = backoff / 4;
        let mix = (self.seed ^ failures.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            >> 32;
        let jittered = backoff - spread / 2 + mix % spread.max(1);
        self.next_ms.store(now + jittered, Relaxed);
        self.attempt_ms.store(0, Relaxed);
        if self.unreachable_since_ms.load(Relaxed) == 0 {
            self.unreachable_since_ms.store(stamp(at), Relaxed);
        }
        Attempt::Failed
    }

    /// The peer has a session: no attempt in flight, no backoff.
    pub(crate) fn reachable(&self) {
        if self.attempt_ms.load(Relaxed) != 0 || self.backoff_ms.load(Relaxed) != 0 {
            self.attempt_ms.store(0, Relaxed);
            self.backoff_ms.store(0, Relaxed);
            self.next_ms.store(0, Relaxed);
        }
        self.unreachable_since_ms.store(0, Relaxed);
    }

    /// Since when the peer has not answered (its first unanswered attempt), if it has
    /// not had a session since.
    pub(crate) fn unreachable_since(&self) -> Option<u64> {
        Some(self.unreachable_since_ms.load(Relaxed)).filter(|t| *t != 0)
    }

    /// A data packet went either way. Called for every packet by both mesh threads:
    /// the stamp is rewritten only once it is a second old (idleness is judged in
    /// minutes), so the line stays shared instead of bouncing between the cores.
    pub(crate) fn data(&self, now: u64) {
        refresh(&self.data_ms, now);
    }

    pub(crate) fn keepalive_sent(&self, now: u64) {
        self.ka_tx_ms.store(stamp(now), Relaxed);
    }

    pub(crate) fn keepalive_received(&self, now: u64) {
        self.ka_rx_ms.store(stamp(now), Relaxed);
    }

    /// Whether to send a keepalive now, on a session with keepalive `interval_ms`
    /// (0: none): a warm peer's every interval; a cold peer's only to answer a fresh
    /// keepalive, at most once per half interval.
    pub(crate) fn keepalive_due(&self, now: u64, interval_ms: u64) -> bool {
        if interval_ms == 0 {
            return false;
        }
        let sent = since(now, self.ka_tx_ms.load(Relaxed));
        if self.warm() {
            return sent >= interval_ms;
        }
        since(now, self.ka_rx_ms.load(Relaxed)) <= ANSWER_WINDOW_MS && sent >= interval_ms / 2
    }

    /// Whether a cold peer's session state may be dropped: nothing either way (`last_rx`:
    /// the last authenticated packet from it) and no packet wanting it for
    /// `idle_release` ms.
    pub(crate) fn idle(&self, now: u64, last_rx: u64, idle_release: u64) -> bool {
        !self.warm()
            && [
                self.data_ms.load(Relaxed),
                self.need_ms.load(Relaxed),
                self.ka_tx_ms.load(Relaxed),
                last_rx,
            ]
            .into_iter()
            .all(|t| since(now, t) >= idle_release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_peer_is_wanted_only_shortly_after_a_packet_asked_for_it() {
        let d = Demand::new(false, 1);
        assert!(!d.wanted(1_000_000));
        d.needed(1_000_000);
        assert!(d.wanted(1_000_000 + NEED_WINDOW_MS - 1));
        assert!(!d.wanted(1_000_000 + NEED_WINDOW_MS));
        assert!(Demand::new(true, 1).wanted(5));
    }

    #[test]
    fn unanswered_attempts_back_off_exponentially_to_the_cap_with_jitter() {
        for (warm, cap) in [(true, BACKOFF_MAX_WARM_MS), (false, BACKOFF_MAX_COLD_MS)] {
            let d = Demand::new(warm, 42);
            let mut now = 1_000;
            let mut gaps = Vec::new();
            for _ in 0..12 {
                assert!(d.may_initiate(now));
                d.initiated(now);
                assert!(!d.may_initiate(now), "one initiation per attempt");
                assert_eq!(d.attempt(now + ATTEMPT_TIMEOUT_MS - 1), Attempt::Waiting);
                now += ATTEMPT_TIMEOUT_MS;
                assert_eq!(d.attempt(now), Attempt::Failed);
                let next = d.next_ms.load(Relaxed);
                gaps.push(next - now);
                assert!(!d.may_initiate(next - 1));
                now = next;
            }
            assert_eq!(d.failures.load(Relaxed), 12);
            assert_eq!(d.unreachable_since(), Some(1_000));
            for (i, gap) in gaps.iter().enumerate() {
                let nominal = (BACKOFF_MIN_MS << i).min(cap);
                assert!(
                    *gap >= nominal - nominal / 8 && *gap <= nominal + nominal / 8,
                    "attempt {i}: {gap} ms, nominal {nominal}"
                );
            }
            d.reachable();
            assert!(d.may_initiate(now));
            assert_eq!(d.unreachable_since(), None);
        }
    }

    #[test]
    fn peers_do_not_retry_in_step() {
        let next = |seed| {
            let d = Demand::new(true, seed);
            d.initiated(1);
            d.attempt(1 + ATTEMPT_TIMEOUT_MS);
            d.next_ms.load(Relaxed)
        };
        let all: std::collections::HashSet<u64> = (0..50).map(next).collect();
        assert!(all.len() > 25, "{all:?}");
    }

    #[test]
    fn warm_peers_keep_alive_cold_ones_only_answer_fresh_keepalives() {
        let warm = Demand::new(true, 1);
        assert!(warm.keepalive_due(100_000, 25_000));
        warm.keepalive_sent(100_000);
        assert!(!warm.keepalive_due(124_999, 25_000));
        assert!(warm.keepalive_due(125_000, 25_000));
        assert!(!warm.keepalive_due(125_000, 0), "keepalive off");

        let cold = Demand::new(false, 1);
        assert!(
            !cold.keepalive_due(100_000, 25_000),
            "cold peers start none"
        );
        cold.keepalive_received(100_000);
        assert!(cold.keepalive_due(100_100, 25_000), "answers a fresh one");
        cold.keepalive_sent(100_100);
        // The warm side's answer-to-the-answer never comes (warm peers do not answer);
        // another cold side's would arrive while ours is fresh: no ping-pong.
        cold.keepalive_received(100_300);
        assert!(!cold.keepalive_due(100_300, 25_000));
        assert!(
            !cold.keepalive_due(113_000, 25_000),
            "stale by the time it may"
        );
        // The warm side's next one, an interval later, is answered again.
        cold.keepalive_received(125_000);
        assert!(cold.keepalive_due(125_050, 25_000));
    }

    #[test]
    fn only_a_cold_peer_silent_both_ways_is_idle() {
        let d = Demand::new(false, 1);
        let t = 1_000_000;
        d.data(t);
        assert!(!d.idle(t + IDLE_RELEASE_MS - 1, 0, IDLE_RELEASE_MS));
        assert!(d.idle(t + IDLE_RELEASE_MS, 0, IDLE_RELEASE_MS));
        // Keepalives from the other side keep it: that side wants us warm.
        assert!(!d.idle(t + IDLE_RELEASE_MS, t + 5, IDLE_RELEASE_MS));
        d.set_warm(true);
        assert!(!d.idle(t + 10 * IDLE_RELEASE_MS, 0, IDLE_RELEASE_MS));
    }
}
