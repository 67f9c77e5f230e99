//! Reply capture without policy rules: flynode's tc program (`xdp-prog/ebpf`,
//! `flynode-reply`) on the ingress of each interface behind which a local container
//! endpoint lives redirects the endpoint's UDP datagrams into the mesh TUN.
//!
//! Why: any custom policy rule makes every IPv4 route lookup on the host walk the rule
//! list, dissect the flow for the rule's port match and run the full reverse-path source
//! check, which the kernel skips when there are no custom rules. On a worker that is every
//! datagram written into the TUN for a container (measured on the 1200-byte forwarding
//! benchmark: `fib_rules_lookup` + `__fib_validate_source` + the flow dissector, about 8%
//! of the CPU the whole path runs on), and the walk grows with the number of containers.
//! The program costs one hash lookup, and only for packets that come from containers.
//!
//! The program is attached with TCX links (kernel 6.6+; aya falls back to a netlink
//! `clsact` filter on older kernels): a TCX link goes away with the daemon, so a crash
//! leaves nothing behind.
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::net::SocketAddr;

use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::tc::{SchedClassifier, SchedClassifierLinkId, TcAttachType};
use aya::{Ebpf, include_bytes_aligned};
use flynode_tunnel::io::{link, route};
use flynode_xdp_common::{REPLY_ENDPOINTS_MAP, REPLY_PROGRAM_NAME, ServiceKey};

use crate::xdp::addr_key;

/// The tc object built by build.rs next to the XDP one.
static REPLY_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flynode-reply"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the reply-capture object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the reply-capture object has no program or map named `{0}` (build mismatch)")]
    Missing(&'static str),
    #[error("the kernel rejected the reply-capture program: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("BPF map `{REPLY_ENDPOINTS_MAP}`: {0}")]
    Map(#[source] aya::maps::MapError),
}

/// Where a container endpoint's replies are captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The tc program sees them.
    Captured,
    /// It cannot (no route, a device without an Ethernet header, attach refused): a
    /// policy rule has to do it. The reason, for the log.
    Rule(String),
}

pub struct ReplyCapture {
    ebpf: Ebpf,
    tun_ifindex: u32,
    /// Interfaces the program is attached to.
    links: BTreeMap<String, SchedClassifierLinkId>,
    /// Endpoints in the map.
    entries: BTreeSet<ServiceKey>,
}

impl ReplyCapture {
    /// Loads the program (not attached anywhere yet); replies will go to the TUN with
    /// index `tun_ifindex`.
    pub fn load(tun_ifindex: u32) -> Result<ReplyCapture, CaptureError> {
        let mut ebpf = Ebpf::load(REPLY_OBJECT).map_err(CaptureError::Load)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(REPLY_PROGRAM_NAME)
            .ok_or(CaptureError::Missing(REPLY_PROGRAM_NAME))?
            .try_into()
            .map_err(CaptureError::Program)?;
        program.load().map_err(CaptureError::Program)?;
        Ok(ReplyCapture {
            ebpf,
            tun_ifindex,
            links: BTreeMap::new(),
            entries: BTreeSet::new(),
        })
    }

    /// Makes the capture cover exactly `targets` (this node's container endpoints) where
    /// it can; returns, per target, where its replies are captured. Interfaces no target
    /// uses any more are released.
    pub fn apply(&mut self, targets: &[SocketAddr]) -> Vec<(SocketAddr, Placement)> {
        let mut placed = Vec::with_capacity(targets.len());
        let mut wanted_links = BTreeSet::new();
        let mut wanted_keys = BTreeSet::new();
        for &target in targets {
            let placement = match self.interface_for(target) {
                Ok(interface) => match self.attach(&interface) {
                    Ok(()) => {
                        wanted_keys.insert(ServiceKey::new(addr_key(target.ip()), target.port()));
                        wanted_links.insert(interface);
                        Placement::Captured
                    }
                    Err(why) => Placement::Rule(why),
                },
                Err(why) => Placement::Rule(why),
            };
            placed.push((target, placement));
        }
        self.sync_map(&wanted_keys);
        for interface in self.links.keys().cloned().collect::<Vec<_>>() {
            if !wanted_links.contains(&interface) {
                self.detach(&interface);
            }
        }
        placed
    }

    /// The interface the kernel routes `target` out of, if the program can work there.
    fn interface_for(&self, target: SocketAddr) -> Result<String, String> {
        let ifindex = route::output_interface(target.ip())
            .map_err(|e| format!("looking up the route to {}: {e}", target.ip()))?
            .ok_or_else(|| format!("no route to {}", target.ip()))?;
        if ifindex == self.tun_ifindex {
            return Err(format!("{} routes into the mesh TUN", target.ip()));
        }
        let name =
            ifname(ifindex).ok_or_else(|| format!("interface index {ifindex} has no name"))?;
        match link::is_ethernet(&name) {
            Ok(true) => Ok(name),
            Ok(false) => Err(format!("{name} has no Ethernet header")),
            Err(e) => Err(format!("inspecting {name}: {e}")),
        }
    }

    fn attach(&mut self, interface: &str) -> Result<(), String> {
        if self.links.contains_key(interface) {
            return Ok(());
        }
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(REPLY_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| "the reply-capture program is missing".to_owned())?;
        // aya uses TCX (a bpf_link) on 6.6+; older kernels need the clsact qdisc.
        if !tcx_kernel() {
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
        }
        let id = program
            .attach(interface, TcAttachType::Ingress)
            .map_err(|e| format!("attaching the tc program to {interface}: {e}"))?;
        tracing::info!(interface, "reply capture attached (tc ingress)");
        self.links.insert(interface.to_owned(), id);
        Ok(())
    }

    fn detach(&mut self, interface: &str) {
        let Some(id) = self.links.remove(interface) else {
            return;
        };
        let program: Option<&mut SchedClassifier> = self
            .ebpf
            .program_mut(REPLY_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok());
        match program.map(|p| p.detach(id)) {
            Some(Ok(())) => tracing::info!(interface, "reply capture detached"),
            Some(Err(e)) => {
                tracing::warn!(interface, error = %e, "detaching the reply-capture program failed")
            }
            None => tracing::warn!(interface, "the reply-capture program is missing"),
        }
    }

    fn sync_map(&mut self, wanted: &BTreeSet<ServiceKey>) {
        let current = std::mem::take(&mut self.entries);
        let tun = self.tun_ifindex;
        let mut map = match reply_map(&mut self.ebpf) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "reply-capture map unavailable; container replies cannot reach flynode");
                self.entries = current;
                return;
            }
        };
        for key in current.difference(wanted) {
            if let Err(e) = map.remove(key) {
                tracing::warn!(error = %e, "removing a reply-capture entry failed");
            }
        }
        let mut failed = BTreeSet::new();
        for key in wanted.difference(&current) {
            if let Err(e) = map.insert(key, tun, 0) {
                tracing::error!(error = %e, port = key.port(), "adding a reply-capture entry failed; that container's replies cannot reach flynode");
                failed.insert(*key);
            }
        }
        self.entries = wanted.difference(&failed).copied().collect();
    }
}

fn reply_map(ebpf: &mut Ebpf) -> Result<BpfHashMap<&mut MapData, ServiceKey, u32>, CaptureError> {
    let map = ebpf
        .map_mut(REPLY_ENDPOINTS_MAP)
        .ok_or(CaptureError::Missing(REPLY_ENDPOINTS_MAP))?;
    BpfHashMap::try_from(map).map_err(CaptureError::Map)
}

/// Kernels from 6.6 attach tc programs with TCX links.
fn tcx_kernel() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` is IF_NAMESIZE bytes, what if_indextoname writes at most (NUL
    // included); the result is checked for NULL before it is read.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    name.to_str().ok().map(str::to_owned)
}
