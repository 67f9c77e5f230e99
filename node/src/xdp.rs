//! Loads flynode's XDP program, attaches it to the NIC, owns the contents of its maps and
//! reads its counters. This module is the only code that talks to the data plane: the
//! rest of the daemon hands it the desired state and it applies the difference.
use std::collections::BTreeMap;
use std::net::IpAddr;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, include_bytes_aligned};
use flynode_xdp_common::{
    AddrKey, COUNTER_SLOTS, COUNTERS_MAP, Counter, PROGRAM_NAME, SERVICE_ADDRS_MAP,
    SERVICE_FLAG_PROXY_PROTOCOL, SERVICES_MAP, ServiceKey, ServiceValue, Verdict,
};
use serde::Serialize;

use crate::config::XdpMode;
use crate::routing::RoutingMap;

/// The eBPF object built by build.rs, embedded so the binary is all an operator installs.
static PROGRAM_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flynode-xdp"));

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("loading the XDP object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no program or map named `{0}` (build mismatch)")]
    Missing(&'static str),
    #[error("the kernel rejected the XDP program: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("attaching XDP to `{interface}` in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: AttachedMode,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map `{map}`: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The mode the program actually runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    /// In the driver, before an skb is allocated.
    Native,
    /// In the kernel's generic hook, after skb allocation: works on every device.
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// The XDP classifier attached to one interface. Dropping it detaches the program (the
/// attachment is a bpf_link owned by this process, so a crash detaches it too).
pub struct XdpClassifier {
    // Holds the program and its link; never read, but dropping it detaches.
    _ebpf: Ebpf,
    interface: String,
    mode: AttachedMode,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    service_addrs: HashMap<MapData, AddrKey, u32>,
    counters: PerCpuArray<MapData, u64>,
}

/// What an update of the services map changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceMapDiff {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
}

/// Counters summed over every CPU, one per [`Counter`] slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot(pub [u64; COUNTER_SLOTS as usize]);

impl CounterSnapshot {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    pub fn verdict_total(&self, verdict: Verdict) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.verdict() == verdict)
            .map(|c| self.get(*c))
            .sum()
    }
}

impl XdpClassifier {
    /// Loads the program and attaches it to `interface`. `Auto` tries native first and
    /// falls back to generic, logging why; `Native` and `Generic` are what they say.
    pub fn attach(interface: &str, mode: XdpMode) -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT).map_err(XdpError::Load)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(XdpError::Program)?;
        program.load().map_err(XdpError::Program)?;
        let attach = |program: &mut Xdp, mode: AttachedMode| {
            let aya_mode = match mode {
                AttachedMode::Native => AyaXdpMode::Driver,
                AttachedMode::Generic => AyaXdpMode::Skb,
            };
            program
                .attach(interface, aya_mode)
                .map(|_| mode)
                .map_err(|source| XdpError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })
        };
        let mode = match mode {
            XdpMode::Native => attach(program, AttachedMode::Native)?,
            XdpMode::Generic => attach(program, AttachedMode::Generic)?,
            XdpMode::Auto => match attach(program, AttachedMode::Native) {
                Ok(mode) => mode,
                Err(native_error) => {
                    tracing::warn!(
                        interface,
                        error = %native_error,
                        "native XDP unavailable, falling back to generic mode"
                    );
                    attach(program, AttachedMode::Generic)?
                }
            },
        };
        let services = take_map(&mut ebpf, SERVICES_MAP, HashMap::try_from)?;
        let service_addrs = take_map(&mut ebpf, SERVICE_ADDRS_MAP, HashMap::try_from)?;
        let counters = take_map(&mut ebpf, COUNTERS_MAP, PerCpuArray::try_from)?;
        Ok(Self {
            _ebpf: ebpf,
            interface: interface.to_owned(),
            mode,
            services,
            service_addrs,
            counters,
        })
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn mode(&self) -> AttachedMode {
        self.mode
    }

    /// Makes the services maps hold exactly `desired`, touching only entries that differ:
    /// the program keeps classifying traffic for unchanged services throughout.
    pub fn apply_services(
        &mut self,
        desired: &BTreeMap<ServiceKey, ServiceValue>,
    ) -> Result<ServiceMapDiff, XdpError> {
        let mut diff = ServiceMapDiff::default();
        let map_err = |map| move |source| XdpError::Map { map, source };
        let current: Vec<(ServiceKey, ServiceValue)> = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(SERVICES_MAP))?;
        let current: BTreeMap<_, _> = current.into_iter().collect();

        // Addresses first on add, last on remove, so a datagram for a new service is
        // never counted as "unknown port" and one for a removed service never as
        // "service" after its address is gone.
        let desired_addrs = addr_port_counts(desired.keys());
        for (addr, ports) in &desired_addrs {
            self.service_addrs
                .insert(addr, ports, 0)
                .map_err(map_err(SERVICE_ADDRS_MAP))?;
        }
        for (key, value) in desired {
            match current.get(key) {
                Some(v) if v == value => continue,
                Some(_) => diff.changed += 1,
                None => diff.added += 1,
            }
            self.services
                .insert(key, value, 0)
                .map_err(map_err(SERVICES_MAP))?;
        }
        for key in current.keys().filter(|k| !desired.contains_key(k)) {
            self.services.remove(key).map_err(map_err(SERVICES_MAP))?;
            diff.removed += 1;
        }
        let stale_addrs: Vec<AddrKey> = self
            .service_addrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(SERVICE_ADDRS_MAP))?
            .into_iter()
            .filter(|a| !desired_addrs.contains_key(a))
            .collect();
        for addr in stale_addrs {
            self.service_addrs
                .remove(&addr)
                .map_err(map_err(SERVICE_ADDRS_MAP))?;
        }
        Ok(diff)
    }

    /// Reads every counter, summed over CPUs.
    pub fn counters(&self) -> Result<CounterSnapshot, XdpError> {
        let mut out = [0u64; COUNTER_SLOTS as usize];
        for (slot, total) in out.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(slot as u32), 0)
                .map_err(|source| XdpError::Map {
                    map: COUNTERS_MAP,
                    source,
                })?;
            *total = per_cpu.iter().sum();
        }
        Ok(CounterSnapshot(out))
    }
}

fn take_map<M>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, aya::maps::MapError>,
) -> Result<M, XdpError> {
    let map = ebpf.take_map(name).ok_or(XdpError::Missing(name))?;
    convert(map).map_err(|source| XdpError::Map { map: name, source })
}

fn addr_port_counts<'a>(keys: impl Iterator<Item = &'a ServiceKey>) -> BTreeMap<AddrKey, u32> {
    let mut out = BTreeMap::new();
    for key in keys {
        *out.entry(key.addr).or_insert(0) += 1;
    }
    out
}

pub fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(a) => AddrKey::from_ipv4(a.octets()),
        IpAddr::V6(a) => AddrKey::from_ipv6(a.octets()),
    }
}

/// The services map a routing map asks for: one entry per (anycast address, port).
pub fn service_entries(map: &RoutingMap) -> BTreeMap<ServiceKey, ServiceValue> {
    map.service_endpoints()
        .map(|(addr, port, service)| {
            let flags = if service.proxy_protocol {
                SERVICE_FLAG_PROXY_PROTOCOL
            } else {
                0
            };
            (
                ServiceKey::new(addr_key(addr), port),
                ServiceValue {
                    service_id: service.id.get(),
                    flags,
                },
            )
        })
        .collect()
}
