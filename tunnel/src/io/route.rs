//! Kernel routes into the TUN device, over rtnetlink.
//!
//! Per-peer routes are installed in the main table with `proto static`, scope link
//! (IPv4) or universe (IPv6), no gateway: "this prefix lives behind the mesh interface".
//! On a worker, the same kind of route also goes into a numbered table of its own (a
//! default route into the TUN) that the source-port rules of [`super::rule`] select.
//! The calls are synchronous and open a netlink socket each (they are control-plane
//! operations, a handful per peer change), in the calling thread's network namespace.

use std::io;
use std::net::IpAddr;

use super::netlink::{Netlink, RT_TABLE_MAIN, RTN_LOCAL, RTN_UNICAST, RouteOp};
use super::sys::{context, ifname_or_index, os_error_of};

/// Checks a prefix: length within the family's range and no host bits set.
fn validate(dst: IpAddr, prefix_len: u8) -> io::Result<()> {
    let (bits, max) = match dst {
        IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32u8),
        IpAddr::V6(a) => (u128::from(a), 128u8),
    };
    if prefix_len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("route {dst}/{prefix_len}: prefix length exceeds {max}"),
        ));
    }
    let host_mask = u128::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
    if bits & host_mask != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("route {dst}/{prefix_len}: address has bits set beyond the prefix length"),
        ));
    }
    Ok(())
}

/// `dst/len dev name (#index)`, plus `table N` outside the main table, for messages.
fn describe(table: u32, ifindex: u32, dst: IpAddr, prefix_len: u8) -> String {
    let dev = ifname_or_index(ifindex);
    if table == RT_TABLE_MAIN {
        format!("{dst}/{prefix_len} dev {dev}")
    } else {
        format!("{dst}/{prefix_len} dev {dev} table {table}")
    }
}

/// How the kernel reaches an address (`ip route get DST`, main policy, no source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// An address of this host.
    Local,
    /// On the link of interface `oif`: no router in between.
    Link { oif: u32 },
    /// Through a router, out of `oif` where the route names one.
    Gateway { oif: Option<u32> },
    /// No usable route: none at all, or a blackhole, unreachable or prohibit route.
    Nowhere,
}

/// How the kernel would reach `dst` now.
pub fn reach(dst: IpAddr) -> io::Result<Reach> {
    let mut nl = Netlink::open()?;
    let Some(route) = nl.route_to(dst)? else {
        return Ok(Reach::Nowhere);
    };
    Ok(match (route.route_type, route.gateway, route.oif) {
        (RTN_LOCAL, _, _) => Reach::Local,
        (RTN_UNICAST, true, oif) => Reach::Gateway { oif },
        (RTN_UNICAST, false, Some(oif)) => Reach::Link { oif },
        _ => Reach::Nowhere,
    })
}

/// The interface index the kernel routes `dst` out of (`ip route get DST`), or `None`
/// when it has no route (or a route without a device, such as a blackhole).
pub fn output_interface(dst: IpAddr) -> io::Result<Option<u32>> {
    let mut nl = Netlink::open()?;
    Ok(nl.route_to(dst)?.and_then(|r| r.oif))
}

/// Adds the main-table route `dst/prefix_len dev <ifindex>`; see [`add_route_in`].
pub fn add_route(ifindex: u32, dst: IpAddr, prefix_len: u8) -> io::Result<()> {
    add_route_in(RT_TABLE_MAIN, ifindex, dst, prefix_len)
}

/// Deletes the main-table route `dst/prefix_len dev <ifindex>`; see [`del_route_in`].
pub fn del_route(ifindex: u32, dst: IpAddr, prefix_len: u8) -> io::Result<()> {
    del_route_in(RT_TABLE_MAIN, ifindex, dst, prefix_len)
}

/// Adds the route `dst/prefix_len dev <ifindex>` to routing table `table`, replacing an
/// existing route for the same prefix there (`NLM_F_CREATE | NLM_F_REPLACE`), so it is
/// idempotent and also moves a prefix from another device. The table is created on
/// first use.
pub fn add_route_in(table: u32, ifindex: u32, dst: IpAddr, prefix_len: u8) -> io::Result<()> {
    validate(dst, prefix_len)?;
    Netlink::open()
        .and_then(|mut nl| nl.route(RouteOp::Replace, table, ifindex, dst, prefix_len))
        .map_err(|e| {
            context(
                e,
                format!("add route {}", describe(table, ifindex, dst, prefix_len)),
            )
        })
}

/// Deletes the route `dst/prefix_len dev <ifindex>` from routing table `table`. A route
/// that does not exist (or a device or table that is gone) is not an error.
pub fn del_route_in(table: u32, ifindex: u32, dst: IpAddr, prefix_len: u8) -> io::Result<()> {
    validate(dst, prefix_len)?;
    let res = Netlink::open()
        .and_then(|mut nl| nl.route(RouteOp::Delete, table, ifindex, dst, prefix_len));
    match res {
        Ok(()) => Ok(()),
        // ESRCH: the route, or (for a numbered table) the whole table, does not exist.
        Err(e)
            if matches!(
                os_error_of(&e),
                Some(libc::ENOENT | libc::ESRCH | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(context(
            e,
            format!("delete route {}", describe(table, ifindex, dst, prefix_len)),
        )),
    }
}

/// Lists the unicast main-table routes (both families) whose output device is
/// `ifindex`, as `(prefix, prefix_len)`. Useful to reconcile the kernel's state with the
/// peer set after a restart. Includes routes the kernel adds itself for the device's
/// addresses (e.g. IPv6 `fe80::/64`, the address's own prefix).
pub fn list_routes(ifindex: u32) -> io::Result<Vec<(IpAddr, u8)>> {
    let mut nl = Netlink::open()
        .map_err(|e| context(e, format!("list routes of {}", ifname_or_index(ifindex))))?;
    let mut out = Vec::new();
    for ipv6 in [false, true] {
        let routes = nl
            .routes(ipv6)
            .map_err(|e| context(e, format!("list routes of {}", ifname_or_index(ifindex))))?;
        out.extend(
            routes
                .into_iter()
                .filter(|r| {
                    r.oif == Some(ifindex)
                        && r.table == RT_TABLE_MAIN
                        && r.route_type == RTN_UNICAST
                })
                .map(|r| (r.dst, r.prefix_len)),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::testutil::{in_netns, ip};
    use crate::io::tun::{TunConfig, TunDevice};
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn prefix_validation() {
        let v4 = |s: &str| IpAddr::V4(s.parse::<Ipv4Addr>().unwrap());
        let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().unwrap());
        assert!(validate(v4("198.18.0.0"), 15).is_ok());
        assert!(validate(v4("198.18.0.1"), 32).is_ok());
        assert!(validate(v4("0.0.0.0"), 0).is_ok());
        assert!(validate(v4("198.18.0.1"), 24).is_err());
        assert!(validate(v4("198.18.0.0"), 33).is_err());
        assert!(validate(v6("fd00:1::"), 64).is_ok());
        assert!(validate(v6("fd00:1::1"), 128).is_ok());
        assert!(validate(v6("fd00:1::1"), 64).is_err());
        assert!(validate(v6("::"), 0).is_ok());
        assert!(validate(v6("fd00::"), 129).is_err());
        let e = validate(v6("fd00:1::1"), 64).unwrap_err();
        assert!(e.to_string().contains("fd00:1::1/64"), "{e}");
    }

    #[test]
    fn add_and_delete_routes() {
        in_netns("add_and_delete_routes", || {
            let dev = TunDevice::create(&TunConfig {
                name: "flyrt0".into(),
                mtu: 1420,
                ipv6: "fd00::1".parse().unwrap(),
                ipv4: Some("198.18.0.1".parse().unwrap()),
                offload: false,
                tx_queue_len: 0,
            })
            .expect("create TUN");
            let idx = dev.ifindex();
            let p6: IpAddr = "fd00:1::".parse().unwrap();
            let p4: IpAddr = "198.19.7.0".parse().unwrap();

            add_route(idx, p6, 64).expect("add v6 route");
            add_route(idx, p6, 64).expect("re-adding replaces, not an error");
            add_route(idx, p4, 24).expect("add v4 route");
            let out6 = ip(&["-6", "route", "show", "dev", "flyrt0"]);
            assert!(out6.contains("fd00:1::/64"), "ip -6 route: {out6}");
            let out4 = ip(&["-4", "route", "show", "dev", "flyrt0"]);
            assert!(out4.contains("198.19.7.0/24"), "ip -4 route: {out4}");
            assert_eq!(out6.matches("fd00:1::/64").count(), 1, "{out6}");
            let listed = list_routes(idx).unwrap();
            assert!(listed.contains(&(p6, 64)), "{listed:?}");
            assert!(listed.contains(&(p4, 24)), "{listed:?}");

            del_route(idx, p6, 64).expect("delete v6 route");
            del_route(idx, p4, 24).expect("delete v4 route");
            let out6 = ip(&["-6", "route", "show", "dev", "flyrt0"]);
            assert!(!out6.contains("fd00:1::/64"), "ip -6 route: {out6}");
            let out4 = ip(&["-4", "route", "show", "dev", "flyrt0"]);
            assert!(!out4.contains("198.19.7.0/24"), "ip -4 route: {out4}");
            // Deleting again is fine.
            del_route(idx, p6, 64).expect("deleting a missing route is Ok");
            assert!(!list_routes(idx).unwrap().contains(&(p6, 64)));

            // Errors name the route and the device.
            let e = add_route(99_999, p6, 64).unwrap_err();
            let msg = e.to_string();
            eprintln!("error for a missing device: {msg}");
            assert!(
                msg.contains("fd00:1::/64") && msg.contains("99999"),
                "{msg}"
            );
            assert!(add_route(idx, "fd00:1::1".parse().unwrap(), 64).is_err());
        });
    }

    #[test]
    fn default_routes_in_a_numbered_table() {
        in_netns("default_routes_in_a_numbered_table", || {
            let dev = TunDevice::create(&TunConfig {
                name: "flyrt1".into(),
                mtu: 1420,
                ipv6: "fd00::1".parse().unwrap(),
                ipv4: Some("198.18.0.1".parse().unwrap()),
                offload: false,
                tx_queue_len: 0,
            })
            .expect("create TUN");
            let idx = dev.ifindex();
            let any4: IpAddr = "0.0.0.0".parse().unwrap();
            let any6: IpAddr = "::".parse().unwrap();

            // 51821 needs RTA_TABLE; 200 fits the rtmsg byte. Adding twice replaces.
            for table in [51821, 51821, 200] {
                add_route_in(table, idx, any4, 0).expect("add v4 default");
                add_route_in(table, idx, any6, 0).expect("add v6 default");
            }
            for table in ["51821", "200"] {
                let out4 = ip(&["-4", "route", "show", "table", table]);
                assert_eq!(
                    out4.trim(),
                    "default dev flyrt1 proto static scope link",
                    "table {table}"
                );
                let out6 = ip(&["-6", "route", "show", "table", table]);
                assert!(
                    out6.starts_with("default dev flyrt1 "),
                    "table {table}: {out6}"
                );
                assert_eq!(out6.lines().count(), 1, "table {table}: {out6}");
            }
            // Nothing leaked into the main table.
            assert!(!ip(&["-4", "route", "show"]).contains("default"));
            assert!(!ip(&["-6", "route", "show"]).contains("default"));
            assert!(list_routes(idx).unwrap().iter().all(|(_, len)| *len != 0));

            del_route_in(51821, idx, any4, 0).expect("delete v4 default");
            del_route_in(51821, idx, any6, 0).expect("delete v6 default");
            assert_eq!(ip(&["-4", "route", "show", "table", "51821"]).trim(), "");
            assert_eq!(ip(&["-6", "route", "show", "table", "51821"]).trim(), "");
            assert!(ip(&["-4", "route", "show", "table", "200"]).contains("default"));
            // Deleting again, or from a table that never existed, is fine.
            del_route_in(51821, idx, any4, 0).expect("deleting a missing route is Ok");
            del_route_in(51821, idx, any6, 0).expect("deleting a missing route is Ok");
            del_route_in(4242, idx, any4, 0).expect("a missing table is Ok");

            let e = add_route_in(51821, 99_999, any4, 0).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("0.0.0.0/0") && msg.contains("table 51821"),
                "{msg}"
            );
        });
    }
}
