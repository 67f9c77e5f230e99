//! Where a worker may deliver clients' datagrams: to its own containers, nowhere else.
//!
//! The routing map names each worker's targets, and a map can be wrong or written by
//! someone it should not trust. Without a check a worker writes clients' datagrams,
//! with the clients' addresses, towards any host it can reach (a target of
//! `192.0.2.53:53` on a host whose default route leads there would do). So every local
//! target is judged here, and `Forwarding` refuses (and counts, as
//! `worker_target_refused`) a datagram for a target judged out:
//!
//! - with `[flows] container_prefixes`: the target must be inside one of them;
//! - without: the kernel must reach it on the link of an interface that is neither the
//!   XDP interface (the uplink) nor the mesh (a container's veth, a bridge), or it must
//!   be an address of this host. A route through a gateway, out of the uplink, into the
//!   mesh, or none at all, is refused.
//!
//! Containers come and go while the map stays the same, so the daemon judges the local
//! targets again after every map change and every few seconds (one route lookup per
//! target, a handful per host): a container that comes up after its map entry is served,
//! and one whose route has gone is refused before its address could lead anywhere else.
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use flynode_tunnel::io::route::{self, Reach};
use ipnet::IpNet;

use super::engine::Forwarding;
use crate::config::Config;

/// What a local target is judged against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPolicy {
    /// `[flows] container_prefixes`.
    Prefixes(Vec<IpNet>),
    /// The kernel's routes: on the link of an interface other than these two.
    Routed { uplink: String, mesh: String },
}

impl TargetPolicy {
    pub fn from_config(config: &Config) -> TargetPolicy {
        match &config.flows.container_prefixes {
            Some(prefixes) => TargetPolicy::Prefixes(prefixes.clone()),
            None => TargetPolicy::Routed {
                uplink: config.xdp.interface.clone(),
                mesh: config.wireguard.interface.clone(),
            },
        }
    }

    /// Why `target` must not be delivered to, or `None` when it may.
    pub fn judge(&self, target: IpAddr) -> Option<String> {
        match self {
            TargetPolicy::Prefixes(prefixes) => {
                if prefixes.iter().any(|p| p.contains(&target)) {
                    return None;
                }
                let list: Vec<String> = prefixes.iter().map(ToString::to_string).collect();
                Some(format!(
                    "not inside [flows] container_prefixes ({})",
                    list.join(", ")
                ))
            }
            TargetPolicy::Routed { uplink, mesh } => {
                let index = |name: &str| crate::xdp::ifindex(name).ok();
                judge_reach(
                    route::reach(target),
                    &[(index(uplink), uplink), (index(mesh), mesh)],
                )
            }
        }
    }

    /// The targets of `targets` that are refused, with the reason for each.
    pub fn refused(&self, targets: &[SocketAddr]) -> HashMap<SocketAddr, String> {
        targets
            .iter()
            .filter_map(|t| self.judge(t.ip()).map(|why| (*t, why)))
            .collect()
    }
}

/// This worker's local targets as last judged; kept by the daemon, which calls
/// [`TargetGate::judge`] after every map change and every few seconds.
#[derive(Debug)]
pub struct TargetGate {
    policy: TargetPolicy,
    refused: HashMap<SocketAddr, String>,
}

impl TargetGate {
    pub fn new(policy: TargetPolicy) -> TargetGate {
        TargetGate {
            policy,
            refused: HashMap::new(),
        }
    }

    /// Judges `forwarding`'s local targets now and makes it refuse those judged out.
    /// Each change is logged once: a target refused, or served again.
    pub fn judge(&mut self, forwarding: &Forwarding) {
        let refused = self.policy.refused(&forwarding.local_targets());
        if refused == self.refused {
            return;
        }
        for (target, why) in &refused {
            if self.refused.get(target) != Some(why) {
                tracing::warn!(
                    %target,
                    reason = %why,
                    "refusing to deliver clients' datagrams to a routing-map target: it is no container of this host"
                );
            }
        }
        for target in self.refused.keys().filter(|t| !refused.contains_key(t)) {
            tracing::info!(%target, "delivering to a routing-map target again: it is now a container of this host");
        }
        forwarding.refuse_targets(refused.keys().copied());
        self.refused = refused;
    }

    /// The targets refused now, with the reason for each.
    pub fn refused(&self) -> &HashMap<SocketAddr, String> {
        &self.refused
    }
}

/// The routed rule on what the kernel answered; `excluded` are the interfaces a
/// container cannot be behind (index where it exists, name).
fn judge_reach(reach: io::Result<Reach>, excluded: &[(Option<u32>, &str)]) -> Option<String> {
    let hint = "list the containers' prefixes in [flows] container_prefixes if that is wrong";
    match reach {
        Ok(Reach::Local) => None,
        Ok(Reach::Link { oif }) => {
            excluded
                .iter()
                .find(|(index, _)| *index == Some(oif))
                .map(|(_, name)| {
                    format!(
                        "the kernel routes it out of {name}, which no container is behind ({hint})"
                    )
                })
        }
        Ok(Reach::Gateway { .. }) => Some(format!(
            "the kernel routes it through a gateway, so it is no container on this host ({hint})"
        )),
        Ok(Reach::Nowhere) => Some("the kernel has no route to it (is the container up?)".into()),
        Err(e) => Some(format!("its route could not be looked up: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_allow_exactly_what_they_contain() {
        let p = TargetPolicy::Prefixes(vec![net("198.19.0.0/16"), net("fd00:c::/48")]);
        for ok in ["198.19.2.2", "198.19.255.1", "fd00:c::2", "fd00:c:0:9::1"] {
            assert_eq!(p.judge(ok.parse().unwrap()), None, "{ok}");
        }
        for no in ["198.18.0.1", "192.0.2.53", "fd00:d::2", "::1"] {
            let why = p.judge(no.parse().unwrap()).unwrap();
            assert!(why.contains("198.19.0.0/16, fd00:c::/48"), "{why}");
        }
    }

    #[test]
    fn routed_allows_this_host_and_links_other_than_the_uplink_and_mesh() {
        let excluded = [(Some(2), "eth0"), (Some(5), "fly0")];
        assert_eq!(judge_reach(Ok(Reach::Local), &excluded), None);
        assert_eq!(judge_reach(Ok(Reach::Link { oif: 7 }), &excluded), None);
        let why = judge_reach(Ok(Reach::Link { oif: 2 }), &excluded).unwrap();
        assert!(why.contains("out of eth0"), "{why}");
        let why = judge_reach(Ok(Reach::Link { oif: 5 }), &excluded).unwrap();
        assert!(why.contains("out of fly0"), "{why}");
        for reach in [
            Reach::Gateway { oif: Some(7) },
            Reach::Gateway { oif: None },
        ] {
            let why = judge_reach(Ok(reach), &excluded).unwrap();
            assert!(why.contains("gateway"), "{why}");
        }
        assert!(judge_reach(Ok(Reach::Nowhere), &excluded).is_some());
        assert!(judge_reach(Err(io::Error::other("netlink")), &excluded).is_some());
        // An interface that does not exist (index None) excludes nothing.
        assert_eq!(
            judge_reach(Ok(Reach::Link { oif: 2 }), &[(None, "eth9")]),
            None
        );
    }

    /// The real kernel's answers, in this process's namespace: loopback addresses are
    /// this host's; a documentation address with no route is refused.
    #[test]
    fn routed_asks_the_kernel() {
        let p = TargetPolicy::Routed {
            uplink: "flynode-none0".into(),
            mesh: "flynode-none1".into(),
        };
        assert_eq!(p.judge("127.0.0.1".parse().unwrap()), None);
        let refused = p.refused(&["127.0.0.1:7".parse().unwrap()]);
        assert!(refused.is_empty(), "{refused:?}");
    }
}
