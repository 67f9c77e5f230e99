//! The socket backend: one UDP socket per service (address, port), bound with FREEBIND
//! so an anycast address can be served before it is configured on the host, drained by
//! one thread with poll() + recvmmsg (GRO on: a burst from one client arrives as one
//! message). The same sockets catch, with the AF_XDP backend, what the XDP program
//! leaves to the kernel: reassembled fragments and queues without an AF_XDP socket.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use flynode_tunnel::io::udp::{RecvBatch, UdpSocket};
use parking_lot::Mutex;

use super::{Datagram, Endpoints, HandlerFactory, IngressCounters};

/// How long poll() waits; also how late the thread notices a changed socket set.
const POLL_WAIT: Duration = Duration::from_millis(20);

struct Shared {
    endpoints: Arc<ArcSwap<Endpoints>>,
    buffer: usize,
    sockets: Mutex<BTreeMap<SocketAddr, Arc<UdpSocket>>>,
    failures: Mutex<BTreeMap<SocketAddr, String>>,
    /// Bumped on every change of `sockets`, so the thread rebuilds its poll set.
    generation: AtomicU64,
    /// The same sockets for senders (the edge's replies to clients), republished on
    /// every change.
    published: crate::forward::engine::ServiceSockets,
    counters: Arc<IngressCounters>,
    stop: AtomicBool,
}

pub struct SocketIngress {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SocketIngress {
    pub fn start(
        endpoints: Arc<ArcSwap<Endpoints>>,
        buffer: usize,
        handlers: HandlerFactory,
        counters: Arc<IngressCounters>,
        published: crate::forward::engine::ServiceSockets,
    ) -> anyhow::Result<SocketIngress> {
        let shared = Arc::new(Shared {
            endpoints,
            buffer,
            sockets: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            generation: AtomicU64::new(0),
            published,
            counters,
            stop: AtomicBool::new(false),
        });
        let mut ingress = SocketIngress {
            shared: Arc::clone(&shared),
            thread: None,
        };
        ingress.reconcile();
        let thread = std::thread::Builder::new()
            .name("ingress-sockets".to_owned())
            .spawn(move || run(&shared, handlers))
            .context("starting the service socket thread")?;
        ingress.thread = Some(thread);
        Ok(ingress)
    }

    /// Opens a socket for every service endpoint in the table that lacks one and
    /// closes those whose service is gone. A socket that cannot be opened (the port is
    /// taken by another program, say) is logged and listed in [`Self::failures`]; the
    /// other endpoints are unaffected.
    pub fn reconcile(&mut self) {
        let shared = &*self.shared;
        let endpoints = shared.endpoints.load();
        let mut sockets = shared.sockets.lock();
        let mut failures = shared.failures.lock();
        let desired: BTreeSet<SocketAddr> = endpoints.services().collect();
        let before = sockets.len();
        sockets.retain(|addr, _| desired.contains(addr));
        failures.retain(|addr, _| desired.contains(addr));
        let mut changed = sockets.len() != before;
        for addr in &desired {
            if sockets.contains_key(addr) {
                continue;
            }
            match UdpSocket::bind_freebind(*addr, shared.buffer) {
                Ok(socket) => {
                    failures.remove(addr);
                    sockets.insert(*addr, Arc::new(socket));
                    changed = true;
                }
                Err(e) => {
                    let message = e.to_string();
                    if failures.get(addr) != Some(&message) {
                        tracing::error!(endpoint = %addr, error = %message, "cannot open the service socket; datagrams the kernel receives for it are lost");
                    }
                    failures.insert(*addr, message);
                }
            }
        }
        if changed {
            shared.generation.fetch_add(1, Relaxed);
            shared.published.store(Arc::new(
                sockets.iter().map(|(a, s)| (*a, Arc::clone(s))).collect(),
            ));
        }
    }

    pub fn failures(&self) -> BTreeMap<SocketAddr, String> {
        self.shared.failures.lock().clone()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SocketIngress {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(shared: &Shared, handlers: HandlerFactory) {
    let mut handler = handlers();
    let mut batch = RecvBatch::new(32);
    let mut generation = u64::MAX;
    let mut set: Vec<(SocketAddr, Arc<UdpSocket>)> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !shared.stop.load(Relaxed) {
        let current = shared.generation.load(Relaxed);
        if current != generation {
            generation = current;
            set = shared
                .sockets
                .lock()
                .iter()
                .map(|(a, s)| (*a, Arc::clone(s)))
                .collect();
            fds = set
                .iter()
                .map(|(_, s)| libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
        }
        if fds.is_empty() {
            std::thread::sleep(POLL_WAIT);
            continue;
        }
        // SAFETY: `fds` is a valid array of pollfd for its length; the descriptors stay
        // open while `set` holds their sockets.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                POLL_WAIT.as_millis() as libc::c_int,
            )
        };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                shared.counters.error("poll", &e);
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if ready == 0 {
            continue;
        }
        let endpoints = shared.endpoints.load();
        for (pfd, (dst, socket)) in fds.iter().zip(&set) {
            if pfd.revents == 0 {
                continue;
            }
            // Readable: recvmmsg(MSG_WAITFORONE) returns at once with what is queued.
            let received = socket.recv_batch(&mut batch);
            if batch.dropped() > 0 {
                shared
                    .counters
                    .socket_dropped
                    .fetch_add(batch.dropped(), Relaxed);
            }
            match received {
                Ok(0) => continue,
                Ok(_) => {}
                Err(e) => {
                    shared.counters.error("service socket receive", &e);
                    continue;
                }
            }
            let Some(service) = endpoints.get(dst) else {
                continue;
            };
            let mut n = 0u64;
            for (src, payload) in batch.iter() {
                n += 1;
                handler.service(
                    service,
                    &Datagram {
                        src,
                        dst: *dst,
                        payload,
                    },
                );
            }
            shared.counters.socket_datagrams.fetch_add(n, Relaxed);
        }
        handler.flush();
    }
}
