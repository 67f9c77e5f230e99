//! Round-trip latency at low rate: sequential request/replies from a client socket to
//! the container's echo service (through the anycast address on the flynode path, to
//! the container's own address over plain routing), one outstanding at a time.
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use super::lab::Lab;
use crate::sys;

/// Requests sent before the timed ones (ARP, flow creation, caches).
const WARMUP: usize = 100;
const PAYLOAD: usize = 64;

#[derive(Clone, Debug)]
pub struct Latency {
    pub count: usize,
    pub lost: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// `count` timed request/replies from the client namespace (on `lab.gen_cpu`, idle
/// while this runs) to `to`; the echo server must run.
pub fn ping_pong(lab: &Lab, to: SocketAddr, count: usize) -> Result<Latency> {
    let client = lab.client_ip();
    let cpu = lab.gen_cpu;
    let samples = lab.client().enter(move || -> Result<(Vec<f64>, usize)> {
        sys::pin(0, cpu)?;
        let socket = UdpSocket::bind((client, 0)).context("bind the client socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut samples = Vec::with_capacity(count);
        let mut lost = 0;
        let mut buf = [0u8; 2048];
        for seq in 0..(WARMUP + count) as u32 {
            sys::check_interrupted()?;
            let mut payload = vec![0x5au8; PAYLOAD];
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            let start = Instant::now();
            socket.send_to(&payload, to)?;
            // Replies to earlier (timed-out) requests are skipped: the echo ends its
            // reply with the request.
            let rtt = loop {
                match socket.recv(&mut buf) {
                    Ok(n) if buf[..n].ends_with(&payload) => break Some(start.elapsed()),
                    Ok(_) => continue,
                    Err(_) => break None,
                }
            };
            if (seq as usize) < WARMUP {
                continue;
            }
            match rtt {
                Some(d) => samples.push(d.as_secs_f64() * 1e6),
                None => lost += 1,
            }
        }
        Ok((samples, lost))
    })??;
    let (mut samples, lost) = samples;
    if samples.is_empty() {
        return Err(anyhow!("no reply from {to} in {count} requests"));
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        count,
        lost,
        p50_us: at(0.5),
        p99_us: at(0.99),
        mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
        max_us: at(1.0),
    })
}
