//! Link-level facts the XDP loader needs from rtnetlink: which XDP program (if any) is
//! attached to an interface, and detaching one that was attached through netlink (a
//! program attached through a bpf_link goes away when its last descriptor closes; a
//! netlink attachment outlives the process that made it).

use std::io;

use super::netlink::{Link, Netlink};
use super::sys::context;

/// How an XDP program is attached (`XDP_ATTACHED_*` in linux/if_link.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// In the driver (native).
    Driver,
    /// In the generic (skb) hook.
    Generic,
    /// Offloaded to the NIC.
    Hardware,
    /// Several programs in different modes.
    Multi,
}

impl XdpAttachMode {
    fn from_attached(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Driver),
            2 => Some(Self::Generic),
            3 => Some(Self::Hardware),
            4 => Some(Self::Multi),
            _ => None,
        }
    }

    /// The `XDP_FLAGS_*` mode flag that detaches a program attached this way.
    fn detach_flags(self) -> u32 {
        match self {
            Self::Generic => 1 << 1,
            Self::Driver => 1 << 2,
            Self::Hardware => 1 << 3,
            Self::Multi => 0,
        }
    }
}

/// The XDP program attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    /// Kernel id of the program (`bpftool prog show id N`).
    pub program_id: u32,
    pub mode: XdpAttachMode,
}

/// The link named `interface`; NotFound if there is none.
fn existing_link(interface: &str) -> io::Result<Link> {
    let mut nl = Netlink::open()?;
    nl.link_by_name(interface)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("interface {interface} does not exist"),
        )
    })
}

/// Whether `interface` is an Ethernet device (`ARPHRD_ETHER`: veth, bridges, NICs),
/// whose frames start with a MAC header.
pub fn is_ethernet(interface: &str) -> io::Result<bool> {
    let link = existing_link(interface)?;
    Ok(link.hw_type == 1)
}

/// The XDP program attached to `interface`, if any.
pub fn xdp_attachment(interface: &str) -> io::Result<Option<XdpAttachment>> {
    let link = existing_link(interface)?;
    Ok(link.xdp.and_then(|(program_id, attached)| {
        XdpAttachMode::from_attached(attached).map(|mode| XdpAttachment { program_id, mode })
    }))
}

/// Detaches the netlink-attached XDP program of `interface` (index `ifindex`) that was
/// attached in `mode`. Fails with EBUSY when the program is held by a bpf_link.
pub fn detach_xdp(ifindex: u32, interface: &str, mode: XdpAttachMode) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    nl.detach_xdp(ifindex, mode.detach_flags())
        .map_err(|e| context(e, format!("detach the XDP program of {interface}")))
}
