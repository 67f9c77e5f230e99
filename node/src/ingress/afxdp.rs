//! The AF_XDP backend: one socket per RX queue, one consumer thread per socket.
//!
//! Each thread drains its socket's RX ring in batches (the frames go back to the fill
//! ring in the same pass, see flynode-xsk), parses each frame ([`super::frame`]), looks
//! its destination up in the endpoints table and hands it to its own [`Handler`].
//! Nothing is allocated per datagram; the table is loaded once per batch.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use flynode_xsk::{XskConfig, XskMode, XskSocket};

use super::{Endpoints, Handler, HandlerFactory, IngressCounters, frame};
use crate::xdp::XdpClassifier;

/// Frames taken from the RX ring per pass.
const BATCH: usize = 64;
/// How long a consumer sleeps in poll() when its ring is empty; bounds how late it
/// notices a stop.
const IDLE_WAIT: Duration = Duration::from_millis(100);

pub struct XskIngress {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    queues: u32,
    mode: XskMode,
}

impl XskIngress {
    /// Opens a socket on every RX queue of `interface` and registers them all; any
    /// failure closes what was opened and returns the error (the caller decides whether
    /// sockets serve instead).
    pub fn start(
        interface: &str,
        classifier: &mut XdpClassifier,
        endpoints: Arc<ArcSwap<Endpoints>>,
        handlers: HandlerFactory,
        counters: Arc<IngressCounters>,
    ) -> anyhow::Result<XskIngress> {
        let ifindex = flynode_xsk::rawbpf::ifindex(interface)
            .with_context(|| format!("interface `{interface}`"))?;
        let queues = flynode_xsk::rx_queue_count(interface)
            .with_context(|| format!("counting the RX queues of `{interface}`"))?;
        let config = XskConfig::default();
        let mut sockets = Vec::with_capacity(queues as usize);
        for queue in 0..queues {
            let socket = open_retrying(ifindex, queue, &config)
                .with_context(|| format!("AF_XDP socket on `{interface}` queue {queue}"))?;
            sockets.push(socket);
        }
        for socket in &sockets {
            if let Err(e) = classifier.register_socket(socket.queue(), socket.fd()) {
                for s in &sockets {
                    let _ = classifier.unregister_socket(s.queue());
                }
                return Err(e).context("registering AF_XDP sockets in the XSKMAP");
            }
        }
        let mode = sockets.first().map_or(XskMode::Copy, XskSocket::mode);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(sockets.len());
        for socket in sockets {
            let queue = socket.queue();
            let consumer = Consumer {
                socket,
                endpoints: Arc::clone(&endpoints),
                handler: handlers(),
                counters: Arc::clone(&counters),
                stop: Arc::clone(&stop),
            };
            let thread = std::thread::Builder::new()
                .name(format!("xsk-rx-{queue}"))
                .spawn(move || consumer.run());
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    let partial = XskIngress {
                        threads,
                        stop,
                        queues,
                        mode,
                    };
                    partial.stop(classifier);
                    return Err(e).context("starting an AF_XDP consumer thread");
                }
            }
        }
        tracing::info!(interface, queues, mode = %mode, "AF_XDP sockets bound");
        Ok(XskIngress {
            threads,
            stop,
            queues,
            mode,
        })
    }

    pub fn queues(&self) -> u32 {
        self.queues
    }

    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// Unregisters the sockets (their queues fall back to `XDP_PASS` at once), then
    /// stops the consumers, which close them.
    pub fn stop(self, classifier: &mut XdpClassifier) {
        for queue in 0..self.queues {
            if let Err(e) = classifier.unregister_socket(queue) {
                tracing::warn!(queue, error = %e, "unregistering an AF_XDP socket failed");
            }
        }
        self.stop.store(true, Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Opens a socket, retrying while the queue is busy: the kernel frees a closed AF_XDP
/// socket's queue in deferred work some tens of milliseconds after `close`, so a daemon
/// restarted at once (or a test reopening the queue) would otherwise find it taken.
fn open_retrying(ifindex: u32, queue: u32, config: &XskConfig) -> std::io::Result<XskSocket> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match XskSocket::open(ifindex, queue, config) {
            Err(e)
                if flynode_xsk::errno(&e) == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

struct Consumer {
    socket: XskSocket,
    endpoints: Arc<ArcSwap<Endpoints>>,
    handler: Box<dyn Handler>,
    counters: Arc<IngressCounters>,
    stop: Arc<AtomicBool>,
}

impl Consumer {
    fn run(mut self) {
        while !self.stop.load(Relaxed) {
            let endpoints = self.endpoints.load();
            let handler = &mut self.handler;
            let (mut unparsed, mut stale) = (0u64, 0u64);
            let delivered = self.socket.recv_batch(BATCH, |bytes| {
                let Some(datagram) = frame::parse(bytes) else {
                    unparsed += 1;
                    return;
                };
                match endpoints.get(&datagram.dst) {
                    Some(v) if v.is_wireguard() => handler.wireguard(&datagram),
                    Some(v) => handler.service(v, &datagram),
                    None => stale += 1,
                }
            });
            if delivered == 0 {
                if let Err(e) = self.socket.wait(IDLE_WAIT) {
                    self.counters.error("AF_XDP poll", &e);
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            handler.flush();
            let c = &self.counters;
            c.xsk_datagrams
                .fetch_add(delivered as u64 - unparsed - stale, Relaxed);
            if unparsed > 0 {
                c.xsk_unparsed.fetch_add(unparsed, Relaxed);
            }
            if stale > 0 {
                c.xsk_stale.fetch_add(stale, Relaxed);
            }
        }
    }
}
