//! Loads flynode's XDP program, attaches it to the NIC, owns the contents of its maps and
//! reads its counters. This module is the only code that talks to the data plane: the
//! rest of the daemon hands it the desired state and it applies the difference.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{MapData, PerCpuArray, XskMap};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode as AyaXdpMode};
use aya::{Ebpf, include_bytes_aligned};
use flynode_xdp_common::{
    AddrKey, COUNTER_SLOTS, COUNTERS_MAP, Counter, PROGRAM_NAME, SERVICE_FLAG_PROXY_PROTOCOL,
    SERVICE_TABLE_MAP, ServiceKey, ServiceValue, Verdict, XSKS_MAP,
};
use serde::Serialize;

use crate::config::XdpMode;
use crate::routing::RoutingMap;

pub mod table;

pub use table::{TableError, TableReader};

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
    #[error("inspecting the XDP state of `{interface}`: {source}")]
    Inspect {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{interface}` already has an XDP program that is not flynode's (id {id}, name `{name}`); flynode never replaces another program: detach it first (`ip link set dev {interface} xdp off`)"
    )]
    Foreign {
        interface: String,
        id: u32,
        name: String,
    },
    #[error(
        "flynode's XDP program (id {id}) on `{interface}` is held by a live bpf_link: another flynode daemon runs on this interface"
    )]
    Busy { interface: String, id: u32 },
    #[error("mapping BPF map `{map}` into memory: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the XDP endpoints table: {0}")]
    Table(#[from] TableError),
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

/// flynode's XDP program and its maps: loaded by [`XdpClassifier::load`], attached to
/// one interface by [`XdpClassifier::attach`]. Dropping it detaches the program (the
/// attachment is a bpf_link owned by this process, so a crash detaches it too).
///
/// Maps are not pinned: a restart starts the counters from zero (Prometheus' `rate()`
/// and `increase()` treat that as the counter reset it is), and nothing of a previous
/// run survives in bpffs to be mistaken for current state. Pinning would need per
/// network namespace paths (several daemons share one bpffs in tests and on hosts that
/// run one flynode per netns) and a migration whenever a map's layout changes.
pub struct XdpClassifier {
    ebpf: Ebpf,
    attached: Option<Attached>,
    table: table::TableWriter,
    /// The endpoints the table holds (what [`Self::apply_endpoints`] last applied).
    endpoints: BTreeMap<ServiceKey, ServiceValue>,
    xsks: XskMap<MapData>,
    counters: PerCpuArray<MapData, u64>,
}

struct Attached {
    interface: String,
    mode: AttachedMode,
    link: XdpLinkId,
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
    /// Loads the program into the kernel and takes its maps; nothing is attached yet.
    pub fn load() -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT).map_err(XdpError::Load)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(XdpError::Program)?;
        program.load().map_err(XdpError::Program)?;
        let map = take_map(&mut ebpf, SERVICE_TABLE_MAP, array_data)?;
        let table = table::TableWriter::new(map.fd().as_fd()).map_err(|source| XdpError::Mmap {
            map: SERVICE_TABLE_MAP,
            source,
        })?;
        let xsks = take_map(&mut ebpf, XSKS_MAP, XskMap::try_from)?;
        let counters = take_map(&mut ebpf, COUNTERS_MAP, PerCpuArray::try_from)?;
        Ok(Self {
            ebpf,
            attached: None,
            table,
            endpoints: BTreeMap::new(),
            xsks,
            counters,
        })
    }

    /// Loads the program and attaches it to `interface` (see [`Self::attach`]).
    pub fn load_and_attach(interface: &str, mode: XdpMode) -> Result<Self, XdpError> {
        let mut classifier = Self::load()?;
        classifier.attach(interface, mode)?;
        Ok(classifier)
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        self.ebpf
            .program(PROGRAM_NAME)
            .ok_or(XdpError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(XdpError::Program)
    }

    /// The loaded program, e.g. for `BPF_PROG_RUN` in benchmarks.
    pub fn program_fd(&self) -> Result<BorrowedFd<'_>, XdpError> {
        Ok(self.program()?.fd().map_err(XdpError::Program)?.as_fd())
    }

    /// Attaches the program to `interface`. `Auto` tries native first and falls back to
    /// generic, logging why; `Native` and `Generic` are what they say. A flynode program
    /// left attached by a previous run through netlink is replaced; any other program on
    /// the interface is an error (we never detach someone else's program).
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AttachedMode, XdpError> {
        if self.attached.is_some() {
            self.detach();
        }
        clear_stale_program(interface)?;
        let program: &mut Xdp = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(XdpError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(XdpError::Program)?;
        let mut attach = |mode: AttachedMode| {
            let aya_mode = match mode {
                AttachedMode::Native => AyaXdpMode::Driver,
                AttachedMode::Generic => AyaXdpMode::Skb,
            };
            program
                .attach(interface, aya_mode)
                .map(|link| (mode, link))
                .map_err(|source| XdpError::Attach {
                    interface: interface.to_owned(),
                    mode,
                    source,
                })
        };
        let (mode, link) = match mode {
            XdpMode::Native => attach(AttachedMode::Native)?,
            XdpMode::Generic => attach(AttachedMode::Generic)?,
            XdpMode::Auto => match attach(AttachedMode::Native) {
                Ok(attached) => attached,
                Err(native_error) => {
                    tracing::warn!(
                        interface,
                        error = %native_error,
                        "native XDP unavailable, falling back to generic mode"
                    );
                    attach(AttachedMode::Generic)?
                }
            },
        };
        self.attached = Some(Attached {
            interface: interface.to_owned(),
            mode,
            link,
        });
        Ok(mode)
    }

    /// Detaches the program from its interface (a no-op when not attached).
    pub fn detach(&mut self) {
        let Some(attached) = self.attached.take() else {
            return;
        };
        let detached = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
            .map(|p| p.detach(attached.link));
        if let Some(Err(e)) = detached {
            tracing::warn!(interface = %attached.interface, error = %e, "detaching XDP failed");
        }
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> Option<&str> {
        self.attached.as_ref().map(|a| a.interface.as_str())
    }

    /// The mode the program is attached in.
    pub fn mode(&self) -> Option<AttachedMode> {
        self.attached.as_ref().map(|a| a.mode)
    }

    /// Makes the endpoints table hold exactly `desired` (services and the node's own
    /// WireGuard endpoints). The new table is built aside and switched in with one store
    /// (see [`table`]): the program classifies every datagram by either the old or the
    /// new table, never a mix, so unchanged entries are never disturbed.
    pub fn apply_endpoints(
        &mut self,
        desired: &BTreeMap<ServiceKey, ServiceValue>,
    ) -> Result<ServiceMapDiff, XdpError> {
        let mut diff = ServiceMapDiff::default();
        for (key, value) in desired {
            match self.endpoints.get(key) {
                Some(v) if v == value => {}
                Some(_) => diff.changed += 1,
                None => diff.added += 1,
            }
        }
        diff.removed = self
            .endpoints
            .keys()
            .filter(|k| !desired.contains_key(k))
            .count();
        if diff != ServiceMapDiff::default() || self.table.live().is_none() {
            self.table.publish(table::build(desired)?);
            self.endpoints = desired.clone();
        }
        Ok(diff)
    }

    /// The value the program finds for `key` now.
    pub fn endpoint(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.table.live().and_then(|t| t.get(key))
    }

    /// Registers the AF_XDP socket bound to RX queue `queue`: from now on the program
    /// redirects that queue's userspace datagrams into it.
    pub fn register_socket(&mut self, queue: u32, socket: BorrowedFd<'_>) -> Result<(), XdpError> {
        self.xsks
            .set(queue, socket.as_raw_fd(), 0)
            .map_err(|source| XdpError::Map {
                map: XSKS_MAP,
                source,
            })
    }

    /// Unregisters queue `queue`'s socket: its datagrams go to the kernel (and flynode's
    /// UDP sockets) again.
    pub fn unregister_socket(&mut self, queue: u32) -> Result<(), XdpError> {
        match self.xsks.unset(queue) {
            Ok(()) => Ok(()),
            // Not registered: nothing to undo.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(())
            }
            Err(source) => Err(XdpError::Map {
                map: XSKS_MAP,
                source,
            }),
        }
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

impl Drop for XdpClassifier {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Makes sure nothing stale sits on `interface`: a flynode program attached through
/// netlink by an earlier run (it outlives its process) is detached; a flynode program
/// held by a live bpf_link means another daemon runs on this interface; any other
/// program belongs to someone else and is left alone, with an error.
fn clear_stale_program(interface: &str) -> Result<(), XdpError> {
    let inspect = |source| XdpError::Inspect {
        interface: interface.to_owned(),
        source,
    };
    let attachment = flynode_tunnel::io::link::xdp_attachment(interface).map_err(inspect)?;
    let Some(attachment) = attachment else {
        return Ok(());
    };
    let id = attachment.program_id;
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .unwrap_or_default();
    if name != PROGRAM_NAME {
        return Err(XdpError::Foreign {
            interface: interface.to_owned(),
            id,
            name,
        });
    }
    let held = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .any(|l| l.program_id() == id);
    if held {
        return Err(XdpError::Busy {
            interface: interface.to_owned(),
            id,
        });
    }
    let ifindex = ifindex(interface).map_err(inspect)?;
    flynode_tunnel::io::link::detach_xdp(ifindex, interface, attachment.mode).map_err(inspect)?;
    tracing::warn!(
        interface,
        program_id = id,
        "detached a stale flynode XDP program left attached by an earlier run"
    );
    Ok(())
}

pub(crate) fn ifindex(interface: &str) -> std::io::Result<u32> {
    let name = std::ffi::CString::new(interface).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        index => Ok(index),
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

impl TableReader {
    /// The live endpoints table of flynode's program attached to `interface` (in this
    /// network namespace), found through the program's maps: for tools and tests that
    /// watch a running daemon's data plane.
    pub fn attached(interface: &str) -> Result<Self, XdpError> {
        let inspect = |source| XdpError::Inspect {
            interface: interface.to_owned(),
            source,
        };
        let id = flynode_tunnel::io::link::xdp_attachment(interface)
            .map_err(inspect)?
            .ok_or_else(|| inspect(std::io::Error::other("no XDP program attached")))?
            .program_id;
        let program = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == id)
            .ok_or_else(|| inspect(std::io::Error::other(format!("program {id} not found"))))?;
        let name = program.name_as_str().unwrap_or_default();
        if name != PROGRAM_NAME {
            return Err(XdpError::Foreign {
                interface: interface.to_owned(),
                id,
                name: name.to_owned(),
            });
        }
        let ids = program
            .map_ids()
            .map_err(|e| inspect(std::io::Error::other(e)))?
            .unwrap_or_default();
        let find = |wanted: &'static str| -> Result<MapData, XdpError> {
            for map_id in &ids {
                let data = MapData::from_id(*map_id).map_err(|source| XdpError::Map {
                    map: wanted,
                    source,
                })?;
                let info = data.info().map_err(|source| XdpError::Map {
                    map: wanted,
                    source,
                })?;
                if info.name_as_str() == Some(wanted) {
                    return Ok(data);
                }
            }
            Err(XdpError::Missing(wanted))
        };
        let map = find(SERVICE_TABLE_MAP)?;
        TableReader::new(map.fd().as_fd()).map_err(|source| XdpError::Mmap {
            map: SERVICE_TABLE_MAP,
            source,
        })
    }
}

fn array_data(map: aya::maps::Map) -> Result<MapData, aya::maps::MapError> {
    match map {
        aya::maps::Map::Array(data) => Ok(data),
        _ => Err(aya::maps::MapError::InvalidMapType { map_type: 0 }),
    }
}

pub fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(a) => AddrKey::from_ipv4(a.octets()),
        IpAddr::V6(a) => AddrKey::from_ipv6(a.octets()),
    }
}

/// The endpoints map a routing map asks for: one entry per (anycast address, port) of
/// every service, plus this node's own WireGuard endpoint (`own_wireguard`).
pub fn endpoint_entries(
    map: &RoutingMap,
    own_wireguard: &[SocketAddr],
    anycast_prefixes: Option<&[ipnet::IpNet]>,
) -> BTreeMap<ServiceKey, ServiceValue> {
    let mut entries = service_entries(map);
    if let Some(prefixes) = anycast_prefixes {
        entries.retain(|key, _| {
            // Keys hold IPv4 addresses in their IPv4-mapped form.
            let v6 = std::net::Ipv6Addr::from(key.addr.addr);
            let addr = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            prefixes.iter().any(|p| p.contains(&addr))
        });
    }
    for endpoint in own_wireguard {
        entries.insert(
            ServiceKey::new(addr_key(endpoint.ip()), endpoint.port()),
            ServiceValue::WIREGUARD,
        );
    }
    entries
}

/// The (anycast address, port) pairs of `map` outside `prefixes` (`[xdp]
/// anycast_prefixes`), with their service's name: what [`endpoint_entries`] leaves out.
/// A map may name any address as a service's anycast address; without the list, this
/// node's XDP program would take over any traffic to it (the host's own DNS or NTP on
/// its own address, say).
pub fn refused_anycast(map: &RoutingMap, prefixes: &[ipnet::IpNet]) -> Vec<(SocketAddr, String)> {
    map.service_endpoints()
        .filter(|(addr, _, _)| !prefixes.iter().any(|p| p.contains(addr)))
        .map(|(addr, port, s)| (SocketAddr::new(addr, port), s.name.to_string()))
        .collect()
}

/// The services a routing map asks for: one entry per (anycast address, port).
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

#[cfg(test)]
mod anycast_tests {
    use super::*;

    /// A map may name any address as a service's; with `[xdp] anycast_prefixes` only
    /// those inside are steered, and the rest are reported (issue 29 item 7).
    #[test]
    fn services_outside_the_anycast_prefixes_are_not_steered() {
        let map = RoutingMap::parse(
            "[[node]]\nid = \"n1\"\nregion = \"r\"\npublic_key = \"0aWsmgFfrC73s0FnNjVRKhUR9B/jfREbJn8DnuxdT1g=\"\nendpoint = \"198.18.0.1:51820\"\nmesh_address = \"fd00:f1::1\"\n\n\
             [[service]]\nid = 1\nname = \"dns\"\nanycast = [\"198.18.100.1\", \"2001:db8:100::1\"]\nports = [53]\n  [[service.worker]]\n  node = \"n1\"\n  target = [\"198.19.1.2:53\", \"[fd00:c::2]:53\"]\n\n\
             [[service]]\nid = 2\nname = \"hijack\"\nanycast = [\"198.18.0.1\"]\nports = [123]\n  [[service.worker]]\n  node = \"n1\"\n  target = [\"198.19.1.2:123\"]\n",
            std::path::Path::new("routing.toml"),
        )
        .unwrap();
        let all = endpoint_entries(&map, &[], None);
        assert_eq!(all.len(), 3);
        let prefixes: Vec<ipnet::IpNet> = vec![
            "198.18.100.0/24".parse().unwrap(),
            "2001:db8:100::/48".parse().unwrap(),
        ];
        let allowed = endpoint_entries(&map, &[], Some(&prefixes));
        assert_eq!(allowed.len(), 2);
        assert!(allowed.values().all(|v| v.service_id == 1));
        assert_eq!(
            refused_anycast(&map, &prefixes),
            vec![("198.18.0.1:123".parse().unwrap(), "hijack".to_owned())]
        );
    }
}
