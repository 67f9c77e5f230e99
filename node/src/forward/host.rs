//! What a worker host needs so that containers' replies come back to flynode, and
//! nowhere else.
//!
//! - Routing table [`REPLY_TABLE`]: a default route (IPv4 and IPv6) into the mesh TUN.
//! - One policy rule per local container endpoint: `from <container ip> ipproto udp
//!   sport <container port> lookup REPLY_TABLE`, priority [`RULE_PRIORITY`]. Only the
//!   service's replies are captured; the container's other traffic (DNS lookups,
//!   downloads) routes as before.
//! - On the TUN: `rp_filter` off (datagrams written into it carry the client's address,
//!   which routes out of another interface), IPv4 forwarding on, IPv6
//!   `force_forwarding` on (kernels from 6.17; older ones need global IPv6 forwarding).
//!
//! Rules left behind by a crash are found by their table and removed at start; at stop
//! the rules are removed and the table's routes vanish with the TUN.
//!
//! Where it can, the worker captures replies without rules (`[flows] reply_capture =
//! "auto"`, the default): flynode's tc program on the container's interface redirects
//! the endpoint's datagrams into the TUN ([`super::capture`], and why). An endpoint the
//! program cannot cover (no route, no Ethernet header, the kernel refuses the program)
//! gets its rule, and the reason is logged.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context as _;
use flynode_tunnel::io::route::add_route_in;

use super::capture::{Placement, ReplyCapture};
use flynode_tunnel::io::rule::{
    SourcePortRule, add_rule, del_rule, list_rules, set_sysctl, sysctl,
};

/// The routing table that sends container replies into the TUN.
pub const REPLY_TABLE: u32 = 51821;
/// Priority of the reply rules: before the main table (32766).
pub const RULE_PRIORITY: u32 = 1000;

pub struct HostRoutes {
    rules: BTreeSet<SourcePortRule>,
    capture: Option<ReplyCapture>,
    /// Endpoints left to rules, with the reason last logged for each.
    fallbacks: BTreeMap<SocketAddr, String>,
}

/// How container replies are captured (`[flows] reply_capture`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplyCaptureChoice {
    /// The tc program where it can work, a policy rule elsewhere.
    #[default]
    Auto,
    /// Policy rules only.
    Rules,
}

impl HostRoutes {
    /// Prepares the host around the TUN `tun` (index `ifindex`): leftover rules removed,
    /// the reply table's routes, the TUN's sysctls. Problems that only limit delivery
    /// (global forwarding off) are logged as warnings.
    pub fn setup(
        tun: &str,
        ifindex: u32,
        choice: ReplyCaptureChoice,
    ) -> anyhow::Result<HostRoutes> {
        let stale = list_rules(REPLY_TABLE).context("listing policy rules")?;
        for rule in &stale {
            del_rule(rule).with_context(|| format!("removing a stale rule `{rule}`"))?;
        }
        if !stale.is_empty() {
            tracing::info!(
                count = stale.len(),
                table = REPLY_TABLE,
                "removed reply rules left by a previous run"
            );
        }
        add_route_in(REPLY_TABLE, ifindex, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
            .context("adding the IPv4 reply route")?;
        add_route_in(REPLY_TABLE, ifindex, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
            .context("adding the IPv6 reply route")?;
        set_sysctl(&format!("net/ipv4/conf/{tun}/rp_filter"), "0")?;
        set_sysctl(&format!("net/ipv4/conf/{tun}/forwarding"), "1")?;
        let force = format!("net/ipv6/conf/{tun}/force_forwarding");
        if set_sysctl(&force, "1").is_err() && !enabled("net/ipv6/conf/all/forwarding") {
            tracing::warn!(
                "this kernel has no per-interface IPv6 forwarding and net.ipv6.conf.all.forwarding is 0: IPv6 datagrams cannot reach containers"
            );
        }
        if sysctl("net/ipv4/conf/all/rp_filter").is_ok_and(|v| v.trim() == "1") {
            tracing::warn!(
                "net.ipv4.conf.all.rp_filter = 1 (strict) overrides the TUN's setting: IPv4 datagrams from clients will be dropped on their way to containers; set it to 0 or 2"
            );
        }
        let capture = match choice {
            ReplyCaptureChoice::Rules => None,
            ReplyCaptureChoice::Auto => match ReplyCapture::load(ifindex) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "the tc reply-capture program cannot run here; container replies are captured with policy rules");
                    None
                }
            },
        };
        Ok(HostRoutes {
            rules: BTreeSet::new(),
            capture,
            fallbacks: BTreeMap::new(),
        })
    }

    /// Captures the replies of `targets` (this node's container endpoints): with the tc
    /// program where it can, with a rule each elsewhere. Errors are logged; the other
    /// endpoints are still applied.
    pub fn apply(&mut self, targets: &[SocketAddr]) {
        let ruled: Vec<SocketAddr> = match &mut self.capture {
            None => targets.to_vec(),
            Some(capture) => {
                let mut ruled = Vec::new();
                let mut fallbacks = BTreeMap::new();
                for (target, placement) in capture.apply(targets) {
                    if let Placement::Rule(why) = placement {
                        if self.fallbacks.get(&target) != Some(&why) {
                            tracing::warn!(target = %target, reason = %why, "this container's replies are captured with a policy rule");
                        }
                        fallbacks.insert(target, why);
                        ruled.push(target);
                    }
                }
                self.fallbacks = fallbacks;
                ruled
            }
        };
        self.apply_rules(&ruled);
    }

    /// Makes the reply rules exactly those of `ruled`.
    fn apply_rules(&mut self, ruled: &[SocketAddr]) {
        let wanted: BTreeSet<SourcePortRule> = ruled
            .iter()
            .map(|t| SourcePortRule {
                src: t.ip(),
                sport: t.port(),
                table: REPLY_TABLE,
                priority: RULE_PRIORITY,
            })
            .collect();
        for rule in self.rules.difference(&wanted).copied().collect::<Vec<_>>() {
            match del_rule(&rule) {
                Ok(()) => {
                    self.rules.remove(&rule);
                }
                Err(e) => tracing::error!(error = %e, "removing a reply rule failed"),
            }
        }
        for rule in wanted.difference(&self.rules.clone()) {
            match add_rule(rule) {
                Ok(()) => {
                    self.rules.insert(*rule);
                }
                Err(e) => {
                    tracing::error!(error = %e, "adding a reply rule failed; that container's replies cannot reach flynode")
                }
            }
        }
        // Only routed replies need the container interfaces to forward; the tc program
        // hands its replies to the TUN without routing them.
        if !wanted.is_empty() {
            for (key, family) in [
                ("net/ipv4/conf/all/forwarding", "IPv4"),
                ("net/ipv6/conf/all/forwarding", "IPv6"),
            ] {
                if ruled.iter().any(|t| t.is_ipv6() == (family == "IPv6")) && !enabled(key) {
                    tracing::warn!(
                        "{key} is 0: {family} replies from containers are not forwarded unless their interfaces enable forwarding"
                    );
                }
            }
        }
    }

    /// Removes every rule this node installed.
    pub fn remove(&mut self) {
        for rule in std::mem::take(&mut self.rules) {
            if let Err(e) = del_rule(&rule) {
                tracing::error!(error = %e, "removing a reply rule failed");
            }
        }
    }
}

impl Drop for HostRoutes {
    fn drop(&mut self) {
        self.remove();
    }
}

fn enabled(key: &str) -> bool {
    sysctl(key).is_ok_and(|v| v.trim() == "1")
}
