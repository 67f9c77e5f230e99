//! A millisecond clock cheap enough to read once per packet.
//!
//! The data path reads the time for every datagram (a session's last receive, a flow's
//! last use, whether a worker's session is alive), always to compare ages of hundreds
//! of milliseconds or more. `CLOCK_MONOTONIC_COARSE` is the monotonic clock as of the
//! last timer tick (1-4 ms old): reading it copies two words from the vDSO page, where
//! `Instant::now` (`CLOCK_MONOTONIC`) also reads and scales the TSC.

/// Milliseconds of `CLOCK_MONOTONIC_COARSE` (since boot, advancing in ticks of 1-4 ms).
pub fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on
    // every Linux since 2.6.32, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn coarse_clock_follows_the_monotonic_clock() {
        let (c0, i0) = (coarse_ms(), Instant::now());
        std::thread::sleep(Duration::from_millis(60));
        let (c1, i1) = (coarse_ms(), Instant::now());
        let coarse = c1 - c0;
        let fine = (i1 - i0).as_millis() as u64;
        // Each reading is up to one tick (at most 10 ms, HZ=100) behind.
        assert!(
            coarse + 10 >= fine && coarse <= fine + 10,
            "coarse {coarse} ms, fine {fine} ms"
        );
    }
}
