//! The two ends of the traffic: the generator, which sends from the hub out of the
//! edge's veth (so frames reach the edge's `eth0` as from a NIC) with the repo's
//! live-frames pacer ([`crate::pacer`]), and the counting socket in the container.
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use flynode_tunnel::io::udp::{RecvBatch, UdpSocket};
use flynode_xsk::rawbpf;

use super::lab::{GEN_DEV, Lab, Path};
use super::load::LoadOptions;
use crate::pacer::Pacer;
use crate::sys;

/// The generator, on a thread that has entered the hub namespace.
pub struct Injector {
    ifindex: u32,
    anchor: u32,
    batch: u32,
}

/// A generator program, kept in the XDP dispatcher by its anchor link.
pub struct Loaded {
    prog: OwnedFd,
    _anchor: OwnedFd,
}

impl Injector {
    /// Moves the calling thread into the hub and onto `lab.gen_cpu`.
    pub fn on_this_thread(lab: &Lab, batch: u32) -> Result<Injector> {
        sys::enter_netns(lab.hub()).context("generator: enter the hub namespace")?;
        sys::pin(0, lab.gen_cpu).context("generator: pin")?;
        Ok(Injector {
            ifindex: rawbpf::ifindex(GEN_DEV)?,
            anchor: rawbpf::ifindex(lab.anchor_dev())?,
            batch: batch.clamp(1, 256),
        })
    }

    /// Loads the pacer's program for `frame` (cycling `flows` client ports).
    pub fn load(&self, pacer: &Pacer, frame: &[u8], flows: u32) -> Result<Loaded> {
        let prog = rawbpf::load_xdp("fwd_gen_tx", &pacer.program(frame, flows))?;
        let anchor = rawbpf::attach_xdp(prog.as_fd(), self.anchor, rawbpf::AttachMode::Native)
            .context("attach the generator program to the anchor veth")?;
        Ok(Loaded {
            prog,
            _anchor: anchor,
        })
    }

    /// Runs the program on `frame` `n` times in live-frames mode (each XDP_TX leaves
    /// the hub towards the edge). A signal ends the call early.
    pub fn send(&self, loaded: &Loaded, frame: &[u8], n: u32) -> Result<()> {
        match rawbpf::test_run_live(loaded.prog.as_fd(), self.ifindex, 0, frame, n, self.batch) {
            Ok(()) => Ok(()),
            Err(e) if flynode_xsk::errno(&e) == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Datagrams counted by the container's socket.
#[derive(Default)]
pub struct Count {
    pub datagrams: AtomicU64,
    /// Datagrams whose size was not the one sent (should stay 0).
    pub odd: AtomicU64,
    pub stop: AtomicBool,
    pub tid: AtomicI32,
}

/// The counting socket: bound to the container's service address (where flynode
/// delivers and where plain routing sends), 64 MiB buffer, recvmmsg; runs on the
/// calling thread, in the container, on `lab.sut_cpu`, until `count.stop`.
pub fn consume(
    lab: &Lab,
    opts: &LoadOptions,
    payload: usize,
    count: &Count,
    ready: &mpsc::Sender<Result<()>>,
) -> Result<()> {
    let setup = || -> Result<UdpSocket> {
        sys::enter_netns(lab.container()).context("consumer: enter the container")?;
        sys::pin(0, lab.sut_cpu).context("consumer: pin")?;
        count.tid.store(sys::gettid(), Ordering::Relaxed);
        let addr = Path::Plain.destination();
        let sock = UdpSocket::bind(addr, opts.rcvbuf).with_context(|| format!("bind {addr}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(sock)
    };
    let sock = match setup() {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let mut batch = RecvBatch::new(opts.recv_batch);
    while !count.stop.load(Ordering::Relaxed) {
        if sock.recv_batch(&mut batch)? == 0 {
            continue;
        }
        let (mut n, mut odd) = (0u64, 0u64);
        for (_, d) in batch.iter() {
            n += 1;
            odd += u64::from(d.len() != payload);
        }
        count.datagrams.fetch_add(n, Ordering::Relaxed);
        if odd > 0 {
            count.odd.fetch_add(odd, Ordering::Relaxed);
        }
    }
    Ok(())
}
