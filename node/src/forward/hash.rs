//! Weighted rendezvous (highest random weight) hashing: which worker gets a new flow.
//!
//! Every edge decides on its own, with no coordination, so the decision must be a pure
//! function of the flow and the candidates: the same on every process, machine and
//! version. Hence no `RandomState`, no `DefaultHasher` (its algorithm may change between
//! Rust releases) and no libm (`f64::ln` may differ in the last bit between C libraries):
//! a small fixed mixer and a logarithm made of IEEE 754 basic operations, which Rust
//! evaluates identically everywhere.
//!
//! For each candidate, `h = hash(flow, candidate id)` is mapped to `u` in the open
//! interval (0, 1) and scored `weight / -ln(u)`; the highest score wins (ties, which need
//! equal weights and a 52-bit collision, go to the smallest id). `-ln(u)` is exponentially
//! distributed, so a score is exponential with rate `1/weight` and a candidate wins with
//! probability `weight / total weight` (Schindelhauer and Schomaker, "Weighted Distributed
//! Hash Tables", 2005). A candidate's score does not depend on the other candidates: when
//! one leaves, only its flows move; when one joins, it takes only the flows it now wins.
//!
//! The mixer is not cryptographic. It does not need to be: the flow is chosen by the
//! client anyway, and a client that aims its flows at one worker only loads that worker
//! as much as it could by sending more datagrams.

/// The seed of [`flow_hash`]: the first 64 bits of the fractional part of pi ("nothing up
/// my sleeve"). Changing it moves every flow.
const SEED: u64 = 0x243f_6a88_85a3_08d3;
/// 2^64 / golden ratio: spreads a length or a step apart from zero.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// MurmurHash3's 64-bit finalizer: a bijection in which every input bit affects every
/// output bit with probability close to 1/2.
const fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Hashes `bytes` in 8-byte little-endian words (the last one zero-padded), each folded
/// in through `fmix64`, with the length mixed into the start so padding is unambiguous.
fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(GOLDEN);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        h = fmix64(h ^ u64::from_le_bytes(w)).wrapping_add(GOLDEN);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = fmix64(h ^ u64::from_le_bytes(w)).wrapping_add(GOLDEN);
    }
    fmix64(h)
}

/// The deterministic 64-bit hash of a flow's bytes (e.g. `flows::flow_key_octets`).
pub fn flow_hash(flow: &[u8]) -> u64 {
    hash_bytes(SEED, flow)
}

/// 1/1, 1/3, ... 1/13: the coefficients of the series in [`ln_unit`] (correctly rounded
/// at compile time, so the same everywhere).
const ODD_RECIPROCALS: [f64; 7] = [
    1.0,
    1.0 / 3.0,
    1.0 / 5.0,
    1.0 / 7.0,
    1.0 / 9.0,
    1.0 / 11.0,
    1.0 / 13.0,
];

/// `ln(x)` for `x` in (0, 1], from IEEE basic operations only, so it is bit-identical on
/// every machine. Relative error below 1e-11, far finer than weights need.
fn ln_unit(x: f64) -> f64 {
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln x = e ln 2 + ln m, and with
    // s = (m - 1) / (m + 1), |s| <= 0.172: ln m = 2 (s + s^3/3 + s^5/5 + ...).
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // s2 <= 0.0295: the first term left out, s^15/15, is below 2e-12 of the sum (ample:
    // what matters is that every machine computes the same value, not the last digit).
    let mut series = 0.0;
    for c in ODD_RECIPROCALS.iter().rev() {
        series = series * s2 + c;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * s * series
}

/// The score of a candidate with identity hash input `id` and `weight` for the flow
/// whose [`flow_hash`] is `flow`.
fn score(flow: u64, id: &[u8], weight: u32) -> f64 {
    f64::from(weight) / -ln_unit(unit(hash_bytes(flow, id)))
}

/// `h` mapped into the open interval (0, 1): its top 52 bits, centred in their interval
/// (exact: 53 significant bits at most), so in [2^-53, 1 - 2^-53] and -ln of it is > 0.
fn unit(h: u64) -> f64 {
    ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// The candidate that gets `flow`: weighted rendezvous over `candidates`, identified by
/// `id` (e.g. the node id's bytes) and weighted by `weight`; `None` when there is no
/// candidate with a weight above 0.
pub fn choose<'a, T: 'a>(
    flow: &[u8],
    candidates: impl IntoIterator<Item = &'a T>,
    id: impl Fn(&T) -> &[u8],
    weight: impl Fn(&T) -> u32,
) -> Option<&'a T> {
    choose_by_hash(flow_hash(flow), candidates, id, weight)
}

/// [`choose`] for a flow already hashed with [`flow_hash`].
pub fn choose_by_hash<'a, T: 'a>(
    flow: u64,
    candidates: impl IntoIterator<Item = &'a T>,
    id: impl Fn(&T) -> &[u8],
    weight: impl Fn(&T) -> u32,
) -> Option<&'a T> {
    let mut best: Option<(&'a T, f64)> = None;
    for c in candidates {
        let w = weight(c);
        if w == 0 {
            continue;
        }
        let s = score(flow, id(c), w);
        let wins = match best {
            None => true,
            Some((b, bs)) => s > bs || (s == bs && id(c) < id(b)),
        };
        if wins {
            best = Some((c, s));
        }
    }
    best.map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Worker {
        id: String,
        weight: u32,
    }

    fn workers(spec: &[(&str, u32)]) -> Vec<Worker> {
        spec.iter()
            .map(|&(id, weight)| Worker {
                id: id.to_owned(),
                weight,
            })
            .collect()
    }

    fn pick<'a>(flow: &[u8], ws: &'a [Worker]) -> Option<&'a str> {
        choose(flow, ws, |w| w.id.as_bytes(), |w| w.weight).map(|w| w.id.as_str())
    }

    /// Deterministic pseudo-random flows (splitmix64), 36 bytes like a flow key.
    fn flows(n: usize) -> impl Iterator<Item = [u8; 36]> {
        let mut state = 0x1234_5678_9abc_def0u64;
        (0..n).map(move |_| {
            let mut out = [0; 36];
            for chunk in out.chunks_mut(8) {
                state = state.wrapping_add(GOLDEN);
                let r = fmix64(state);
                chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
            }
            out
        })
    }

    fn shares(ws: &[Worker], n: usize) -> Vec<f64> {
        let mut counts = vec![0usize; ws.len()];
        for f in flows(n) {
            let id = pick(&f, ws).unwrap();
            counts[ws.iter().position(|w| w.id == id).unwrap()] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn answers_are_fixed_forever() {
        // Golden values: if one changes, every edge of a mixed-version fleet would send
        // the same flow to different workers. Change them only on purpose.
        assert_eq!(flow_hash(b""), 0x7acd_bb98_b134_4213);
        assert_eq!(flow_hash(b"flynode"), 0x0d7a_9cce_bd0e_bc70);
        let ws = workers(&[("fra-1", 1), ("ams-1", 1), ("par-1", 2)]);
        let picks: Vec<&str> = (0u8..8).map(|i| pick(&[i; 36], &ws).unwrap()).collect();
        assert_eq!(
            picks,
            [
                "par-1", "fra-1", "ams-1", "ams-1", "fra-1", "par-1", "ams-1", "par-1"
            ]
        );
    }

    #[test]
    fn no_candidates_no_choice() {
        assert_eq!(pick(b"flow", &[]), None);
        assert_eq!(pick(b"flow", &workers(&[("a", 0), ("b", 0)])), None);
        assert_eq!(pick(b"flow", &workers(&[("a", 0), ("b", 1)])), Some("b"));
    }

    #[test]
    fn candidate_order_does_not_matter() {
        let ws = workers(&[("a", 1), ("b", 2), ("c", 3), ("d", 1)]);
        let rev: Vec<Worker> = ws
            .iter()
            .rev()
            .map(|w| Worker {
                id: w.id.clone(),
                weight: w.weight,
            })
            .collect();
        for f in flows(2000) {
            assert_eq!(pick(&f, &ws), pick(&f, &rev));
        }
    }

    #[test]
    fn identical_candidates_resolve_to_the_first() {
        // Different ids never tie in practice (equal weights and a 52-bit collision), so
        // only a duplicated id shows the tie rule: the first of equals is kept.
        let ws = workers(&[("a", 1), ("a", 1)]);
        let c = choose(b"x", &ws, |w| w.id.as_bytes(), |w| w.weight).unwrap();
        assert!(std::ptr::eq(c, &ws[0]));
    }

    #[test]
    fn equal_weights_split_evenly() {
        let s = shares(&workers(&[("w1", 1), ("w2", 1)]), 100_000);
        assert!((s[0] - 0.5).abs() < 0.02, "{s:?}");
    }

    #[test]
    fn weights_are_honoured() {
        let s = shares(&workers(&[("w1", 1), ("w2", 3)]), 100_000);
        assert!((s[0] - 0.25).abs() < 0.02, "{s:?}");
        assert!((s[1] - 0.75).abs() < 0.02, "{s:?}");
        let s = shares(&workers(&[("a", 100), ("b", 200), ("c", 700)]), 100_000);
        for (got, want) in s.iter().zip([0.1, 0.2, 0.7]) {
            assert!((got - want).abs() < 0.02, "{s:?}");
        }
    }

    #[test]
    fn a_leaving_worker_moves_only_its_own_flows() {
        let three = workers(&[("w1", 1), ("w2", 2), ("w3", 1)]);
        let two = workers(&[("w1", 1), ("w3", 1)]);
        let mut moved = 0;
        for f in flows(100_000) {
            let before = pick(&f, &three).unwrap();
            let after = pick(&f, &two).unwrap();
            if before == "w2" {
                moved += 1;
            } else {
                assert_eq!(before, after);
            }
        }
        assert!(moved > 40_000, "{moved}");
    }

    #[test]
    fn a_joining_worker_takes_its_share_and_nothing_else_moves() {
        let three = workers(&[("w1", 1), ("w2", 1), ("w3", 1)]);
        let four = workers(&[("w1", 1), ("w2", 1), ("w3", 1), ("w4", 1)]);
        let n = 100_000;
        let mut moved = 0;
        for f in flows(n) {
            let before = pick(&f, &three).unwrap();
            let after = pick(&f, &four).unwrap();
            if before != after {
                assert_eq!(after, "w4");
                moved += 1;
            }
        }
        let share = moved as f64 / n as f64;
        assert!((share - 0.25).abs() < 0.03, "{share}");
    }

    #[test]
    fn every_hash_scores_finite_and_positive() {
        for h in [0, 1, 1 << 12, u64::MAX / 2, u64::MAX - (1 << 12), u64::MAX] {
            let u = unit(h);
            assert!(u > 0.0 && u < 1.0, "{h:#x}: {u}");
            let neg_ln = -ln_unit(u);
            assert!(neg_ln > 0.0 && neg_ln.is_finite(), "{h:#x}: {neg_ln}");
        }
        assert!(unit(0) < unit(1 << 12) && unit(u64::MAX - (1 << 12)) < unit(u64::MAX));
    }

    #[test]
    fn the_logarithm_matches_libm() {
        let mut x = 1.0f64;
        while x > 1e-16 {
            for y in [x, x * 0.707, x * 0.708, x * 0.99999] {
                let (ours, libm) = (ln_unit(y), y.ln());
                assert!(
                    ours == libm || ((ours - libm) / libm).abs() < 1e-11,
                    "{y}: {ours} vs {libm}"
                );
            }
            x *= 0.93;
        }
        assert_eq!(ln_unit(1.0), 0.0);
        assert_eq!(ln_unit(0.5), -std::f64::consts::LN_2);
    }
}
