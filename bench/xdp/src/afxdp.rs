//! The AF_XDP receiver: flynode's own classifier attached natively to the rx veth with the
//! benchmark's service in its endpoints map, and one AF_XDP socket (copy mode on veth,
//! need_wakeup) on queue 0 registered in the classifier's XSKMAP.
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use flynode::config::XdpMode;
use flynode::netns::Netns;
use flynode::xdp::XdpClassifier;
use flynode_xdp_common::{AddrKey, Counter, ServiceKey, ServiceValue};
use flynode_xsk::{BindMode, XskConfig, XskSocket, rawbpf};

use crate::deliver::{
    ConsumerReport, Options, Receiver, SERVICE_ADDR, SERVICE_PORT, Shared, Topology,
};
use crate::sys;

/// `bare: false`: flynode's classifier. `bare: true`: the ceiling of any AF_XDP receiver
/// on this path, a program that does nothing but `bpf_redirect_map` into the socket (no
/// parsing, no lookup, no counter), with the same socket and consumer: what the kernel's
/// copy-mode AF_XDP path costs by itself.
pub struct AfXdpReceiver {
    pub bare: bool,
}

/// What redirects frames into the socket; dropped (detached) with the receiver.
enum Redirector {
    Classifier(Box<XdpClassifier>),
    Bare {
        _link: OwnedFd,
        _prog: OwnedFd,
        _xsks: OwnedFd,
    },
}

impl Redirector {
    /// Attaches the redirector natively to `dev` and registers `xsk` for queue 0;
    /// returns it and a description.
    fn attach(bare: bool, dev: &str, xsk: &XskSocket) -> Result<(Redirector, String)> {
        let ifindex = rawbpf::ifindex(dev)?;
        if bare {
            let xsks = rawbpf::create_xskmap(1)?;
            rawbpf::map_update_u32(xsks.as_fd(), 0, xsk.fd().as_raw_fd() as u32)?;
            let prog = rawbpf::load_xdp(
                "fxb_bare_xsk",
                &rawbpf::xdp_redirect_xsk(xsks.as_raw_fd(), rawbpf::XDP_PASS),
            )?;
            let link = rawbpf::attach_xdp(prog.as_fd(), ifindex, rawbpf::AttachMode::Native)
                .with_context(|| format!("attach the redirect-only program natively to {dev}"))?;
            let desc = format!("redirect-only program (bpf_redirect_map, nothing else) on {dev}");
            return Ok((
                Redirector::Bare {
                    _link: link,
                    _prog: prog,
                    _xsks: xsks,
                },
                desc,
            ));
        }
        let mut classifier = XdpClassifier::load().context("load flynode's classifier")?;
        let attached = classifier
            .attach(dev, XdpMode::Native)
            .with_context(|| format!("attach natively to {dev}"))?;
        classifier.apply_endpoints(&BTreeMap::from([(
            ServiceKey::new(AddrKey::from_ipv4(SERVICE_ADDR.octets()), SERVICE_PORT),
            ServiceValue::service(1, 0),
        )]))?;
        classifier.register_socket(0, xsk.fd())?;
        let desc = format!("flynode classifier attached {attached} to {dev}");
        Ok((Redirector::Classifier(Box::new(classifier)), desc))
    }

    /// The classifier's non-zero counters, by name.
    fn counters(&self) -> Result<Vec<(String, u64)>> {
        let Redirector::Classifier(c) = self else {
            return Ok(Vec::new());
        };
        let counters = c.counters()?;
        Ok(Counter::ALL
            .iter()
            .map(|&k| (format!("classifier_{}", k.name()), counters.get(k)))
            .filter(|(_, v)| *v != 0)
            .collect())
    }
}

/// How the benchmark sizes its AF_XDP socket.
pub fn xsk_config(opts: &Options) -> XskConfig {
    XskConfig {
        frame_count: opts.xsk_frames,
        ring_size: opts.xsk_ring,
        mode: BindMode::Auto,
        need_wakeup: true,
        ..XskConfig::default()
    }
}

impl Receiver for AfXdpReceiver {
    fn prepare(&self, _topo: &Topology) -> Result<()> {
        // Everything happens on the consumer thread: the classifier is attached and the
        // socket bound from inside the rx namespace.
        Ok(())
    }

    fn consume(
        &self,
        topo: &Topology,
        opts: &Options,
        shared: &Shared,
        ready: &mpsc::Sender<Result<()>>,
    ) -> Result<ConsumerReport> {
        let setup = || -> Result<(Redirector, XskSocket, String)> {
            let ifindex = rawbpf::ifindex(&topo.rx_dev)?;
            let xsk = XskSocket::open(ifindex, 0, &xsk_config(opts))
                .context("open the AF_XDP socket on queue 0")?;
            let (redirector, attached) = Redirector::attach(self.bare, &topo.rx_dev, &xsk)?;
            let desc = format!(
                "{attached}, AF_XDP socket on queue 0 in {} mode, need_wakeup, ring {} / {} \
                 frames, batch {}",
                xsk.mode(),
                opts.xsk_ring,
                opts.xsk_frames,
                opts.xsk_batch
            );
            Ok((redirector, xsk, desc))
        };
        let (redirector, mut xsk, desc) = match setup() {
            Ok(v) => v,
            Err(e) => {
                let _ = ready.send(Err(anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let _ = ready.send(Ok(()));
        let mut sum = 0u64;
        let mut batches = 0u64;
        let mut waits = 0u64;
        let timeout = Duration::from_millis(10);
        loop {
            let n = xsk.recv_batch(opts.xsk_batch, |frame| {
                // The last byte is payload: one real read of the datagram per frame.
                sum = sum.wrapping_add(u64::from(frame[frame.len() - 1]));
            });
            if n == 0 {
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                waits += 1;
                xsk.wait(timeout)?;
                continue;
            }
            batches += 1;
            shared.delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        shared.checksum.store(sum, Ordering::Relaxed);
        let st = xsk.statistics()?;
        let counters = redirector.counters()?;
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let mut stats = BTreeMap::new();
        stats.insert("xsk_rx_dropped".to_owned(), st.rx_dropped);
        stats.insert("xsk_rx_ring_full".to_owned(), st.rx_ring_full);
        stats.insert(
            "xsk_rx_fill_ring_empty_descs".to_owned(),
            st.rx_fill_ring_empty_descs,
        );
        stats.insert("xsk_rx_invalid_descs".to_owned(), st.rx_invalid_descs);
        stats.extend(counters);
        Ok(ConsumerReport {
            where_ran: crate::deliver::where_ran(),
            details: vec![
                desc,
                format!(
                    "consumer: {batches} non-empty batches ({:.1} frames/batch), {waits} \
                     poll() waits",
                    delivered as f64 / batches.max(1) as f64
                ),
            ],
            stats,
        })
    }
}

/// An AF_XDP socket registered at queue 0 of `classifier`'s XSKMAP, so that
/// `BPF_PROG_RUN` of the classifier takes the same redirect path as on the wire. The
/// socket is bound to a veth in a namespace of its own; both live as long as the guard.
pub struct TestRunSocket {
    pub xsk: XskSocket,
    _ns: Netns,
}

pub fn xsk_for_test_run(classifier: &mut XdpClassifier) -> Result<TestRunSocket> {
    let ns = Netns::create("fxbcls")?;
    ns.ip(&[
        "link", "add", "fxc0", "type", "veth", "peer", "name", "fxc1",
    ])?;
    ns.ip(&["link", "set", "fxc0", "up"])?;
    ns.ip(&["link", "set", "fxc1", "up"])?;
    let xsk = sys::in_netns(&ns, || -> Result<XskSocket> {
        let ifindex = rawbpf::ifindex("fxc0")?;
        Ok(XskSocket::open(
            ifindex,
            0,
            &XskConfig {
                frame_count: 64,
                ring_size: 64,
                ..XskConfig::default()
            },
        )?)
    })??;
    classifier.register_socket(0, xsk.fd())?;
    Ok(TestRunSocket { xsk, _ns: ns })
}
