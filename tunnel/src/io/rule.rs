//! Source-port policy routing: the rules (and the sysctls around them) that send a
//! worker's container replies into the mesh, and nothing else of their traffic.
//!
//! On a worker, containers answer clients (arbitrary internet addresses) from their
//! service address and port. A routing table of flynode's own holds a default route into
//! the TUN ([`super::route::add_route_in`]), and one rule per service endpoint selects it:
//! `from <container ip> ipproto udp sport <port> lookup <table>`. Everything else the
//! containers send still goes through the main table.
//!
//! The rule messages (`struct fib_rule_hdr` and FRA_* attributes, linux/fib_rules.h) are
//! encoded here on top of the transport in the `netlink` module. Like the routes, every
//! call opens its own netlink socket in the calling thread's network namespace.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;

use super::netlink::{
    Msg, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, Netlink, RTM_DELRULE, RTM_GETRULE, RTM_NEWRULE,
    attrs, family_of, ip_bytes, ip_from_bytes, table_byte, u16_at, u32_at,
};
use super::sys::{context, context_detail, os_error_of};

// --- UAPI constants (linux/fib_rules.h).
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TUN_ID: u16 = 12;
const FRA_TABLE: u16 = 15;
const FRA_OIFNAME: u16 = 17;
const FRA_L3MDEV: u16 = 19;
const FRA_UID_RANGE: u16 = 20;
const FRA_IP_PROTO: u16 = 22;
const FRA_SPORT_RANGE: u16 = 23;
const FRA_DPORT_RANGE: u16 = 24;

/// Selectors a rule of ours never has; a dumped rule carrying one is someone else's.
const OTHER_SELECTORS: [u16; 8] = [
    FRA_DST,
    FRA_IIFNAME,
    FRA_OIFNAME,
    FRA_FWMARK,
    FRA_TUN_ID,
    FRA_L3MDEV,
    FRA_UID_RANGE,
    FRA_DPORT_RANGE,
];

const FR_ACT_TO_TBL: u8 = 1;
const FIB_RULE_INVERT: u32 = 0x2;
const IPPROTO_UDP: u8 = 17;
const FIB_RULE_HDR_LEN: usize = 12;

/// A policy rule selecting the replies of one UDP service endpoint:
/// `from <src>/32 (or /128) ipproto udp sport <sport> lookup <table> priority <priority>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourcePortRule {
    /// The container's service address (a host address: the rule matches /32 or /128).
    pub src: IpAddr,
    /// The service's UDP port, the source port of its replies.
    pub sport: u16,
    /// The routing table the matching replies are looked up in.
    pub table: u32,
    /// The rule's preference: lower numbers are consulted first.
    pub priority: u32,
}

impl fmt::Display for SourcePortRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The words of `ip rule`, so an operator can paste them.
        write!(
            f,
            "from {} ipproto udp sport {} lookup {} priority {}",
            self.src, self.sport, self.table, self.priority
        )
    }
}

impl SourcePortRule {
    /// Rejects rules the kernel would refuse or misread, before anything is sent.
    fn validate(&self) -> io::Result<()> {
        let problem = if self.table == 0 {
            // RT_TABLE_UNSPEC: to the kernel, "no table".
            Some("table 0 is not a routing table")
        } else if self.sport == 0 {
            // A zero port range means "no port selector": the rule would match every
            // UDP reply of the container.
            Some("source port 0 cannot be matched")
        } else if self.sport == u16::MAX {
            // fib_rule_port_range_valid() (include/net/fib_rules.h) requires end < 0xffff.
            Some("the kernel refuses port ranges ending at 65535")
        } else {
            None
        };
        match problem {
            Some(p) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("rule {self}: {p}"),
            )),
            None => Ok(()),
        }
    }

    /// The RTM_NEWRULE / RTM_DELRULE request for this rule.
    fn message(&self, ty: u16, flags: u16) -> Msg {
        let mut msg = Msg::new(ty, flags);
        msg.header(&fib_rule_hdr(
            family_of(self.src),
            host_prefix_len(self.src),
            table_byte(self.table),
            FR_ACT_TO_TBL,
        ));
        msg.attr(FRA_SRC, &ip_bytes(&self.src));
        msg.attr_u32(FRA_TABLE, self.table);
        msg.attr_u32(FRA_PRIORITY, self.priority);
        msg.attr(FRA_IP_PROTO, &[IPPROTO_UDP]);
        msg.attr(FRA_SPORT_RANGE, &port_range(self.sport, self.sport));
        msg
    }
}

fn host_prefix_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// `struct fib_rule_hdr`: family, dst_len, src_len, tos, table, res1, res2, action, flags.
fn fib_rule_hdr(family: u8, src_len: u8, table: u8, action: u8) -> [u8; FIB_RULE_HDR_LEN] {
    [family, 0, src_len, 0, table, 0, 0, action, 0, 0, 0, 0]
}

/// `struct fib_rule_port_range { __u16 start; __u16 end; }`, in host byte order.
fn port_range(start: u16, end: u16) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&start.to_ne_bytes());
    b[2..].copy_from_slice(&end.to_ne_bytes());
    b
}

/// Reads a dumped rule (fib_rule_hdr and attributes) back as a [`SourcePortRule`];
/// `None` for rules of any other shape (other actions or selectors, inverted, not a host
/// source, not exactly one UDP source port).
fn parse_rule(payload: &[u8]) -> Option<SourcePortRule> {
    let hdr = payload.get(..FIB_RULE_HDR_LEN)?;
    let (family, dst_len, src_len, tos, action) = (hdr[0], hdr[1], hdr[2], hdr[3], hdr[7]);
    let flags = u32_at(hdr, 8)?;
    if action != FR_ACT_TO_TBL || dst_len != 0 || tos != 0 || flags & FIB_RULE_INVERT != 0 {
        return None;
    }
    let mut table = u32::from(hdr[4]);
    let (mut src, mut priority, mut proto, mut sport) = (None, 0, None, None);
    for (ty, v) in attrs(payload.get(FIB_RULE_HDR_LEN..)?) {
        match ty {
            FRA_SRC => src = ip_from_bytes(v),
            FRA_TABLE => table = u32_at(v, 0)?,
            // The kernel leaves the attribute out for preference 0.
            FRA_PRIORITY => priority = u32_at(v, 0)?,
            FRA_IP_PROTO => proto = v.first().copied(),
            FRA_SPORT_RANGE => sport = Some((u16_at(v, 0)?, u16_at(v, 2)?)),
            t if OTHER_SELECTORS.contains(&t) => return None,
            _ => {}
        }
    }
    let src = src?;
    let (start, end) = sport?;
    let family_matches = family == family_of(src);
    if !family_matches || src_len != host_prefix_len(src) || proto != Some(IPPROTO_UDP) {
        return None;
    }
    if start != end {
        return None;
    }
    Some(SourcePortRule {
        src,
        sport: start,
        table,
        priority,
    })
}

/// Adds `rule`. An identical rule (same selectors, table and priority) already being
/// there is not an error, and does not add a second copy.
pub fn add_rule(rule: &SourcePortRule) -> io::Result<()> {
    rule.validate()?;
    // Without NLM_F_EXCL the kernel silently appends a duplicate; with it, a duplicate is
    // EEXIST, which is the idempotence we want.
    let res = Netlink::open().and_then(|mut nl| {
        nl.transact(
            rule.message(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL),
            |_, _| {},
        )
    });
    match res {
        Ok(()) => Ok(()),
        Err(e) if os_error_of(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(context(e, format!("add rule {rule}"))),
    }
}

/// Deletes `rule`. A rule that does not exist is not an error.
pub fn del_rule(rule: &SourcePortRule) -> io::Result<()> {
    rule.validate()?;
    let res =
        Netlink::open().and_then(|mut nl| nl.transact(rule.message(RTM_DELRULE, 0), |_, _| {}));
    match res {
        Ok(()) => Ok(()),
        Err(e) if os_error_of(&e) == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(context(e, format!("delete rule {rule}"))),
    }
}

/// Every source-port rule (IPv4 and IPv6) that looks up `table`, e.g. to remove the
/// leftovers of a previous run. Rules of other shapes in the table are left out.
pub fn list_rules(table: u32) -> io::Result<Vec<SourcePortRule>> {
    let what = || format!("list rules of table {table}");
    let mut nl = Netlink::open().map_err(|e| context(e, what()))?;
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let mut msg = Msg::new(RTM_GETRULE, NLM_F_DUMP);
        msg.header(&fib_rule_hdr(family as u8, 0, 0, 0));
        nl.transact(msg, |ty, payload| {
            if ty == RTM_NEWRULE
                && let Some(rule) = parse_rule(payload)
                && rule.table == table
            {
                out.push(rule);
            }
        })
        .map_err(|e| context(e, what()))?;
    }
    Ok(out)
}

/// `/proc/sys/<key>` for a key like `net/ipv4/conf/flynode0/rp_filter`. Dots are not
/// accepted as separators: interface names may contain them (`eth0.100`).
fn sysctl_path(key: &str) -> io::Result<String> {
    let bad_part = key
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..");
    if key.is_empty() || bad_part || key.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "sysctl key {key:?}: expected a path under /proc/sys such as \
                 net/ipv4/conf/flynode0/rp_filter"
            ),
        ));
    }
    Ok(format!("/proc/sys/{key}"))
}

/// Explains the errors whose bare errno would mislead an operator.
fn sysctl_error(err: io::Error, what: String) -> io::Error {
    match os_error_of(&err) {
        Some(libc::ENOENT) => context_detail(
            err,
            what,
            "no such key in this network namespace; for a per-interface key, does the \
             interface exist?"
                .into(),
        ),
        Some(libc::EINVAL) => context_detail(err, what, "the kernel refused the value".into()),
        _ => context(err, what),
    }
}

/// Writes `value` to the sysctl `key` (a path under /proc/sys, e.g.
/// `net/ipv4/conf/flynode0/rp_filter`); `net/` keys are those of the calling thread's
/// network namespace.
pub fn set_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = sysctl_path(key)?;
    let what = || format!("set sysctl {key} = {value:?}");
    let mut file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| sysctl_error(e, what()))?;
    // One write: a sysctl parses each write(2) on its own.
    file.write_all(value.as_bytes())
        .map_err(|e| sysctl_error(e, what()))
}

/// Reads the sysctl `key` (a path under /proc/sys, e.g. `net/ipv4/ip_forward`), without
/// the trailing newline.
pub fn sysctl(key: &str) -> io::Result<String> {
    let path = sysctl_path(key)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| sysctl_error(e, format!("read sysctl {key}")))?;
    Ok(text.trim_end_matches('\n').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::route::{add_route_in, del_route_in};
    use crate::io::testutil::{in_netns, ip};
    use std::process::Command;

    const TABLE: u32 = 51821;

    fn rule(src: &str, sport: u16, priority: u32) -> SourcePortRule {
        SourcePortRule {
            src: src.parse().unwrap(),
            sport,
            table: TABLE,
            priority,
        }
    }

    /// Creates the veth pair `a` <-> `b`, both up (so both have carrier), and returns
    /// their ifindexes.
    fn veth_pair(a: &str, b: &str) -> (u32, u32) {
        ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        ip(&["link", "set", a, "up"]);
        ip(&["link", "set", b, "up"]);
        let index = |name: &str| -> u32 {
            let line = ip(&["-o", "link", "show", name]);
            line.split(':').next().unwrap().trim().parse().unwrap()
        };
        (index(a), index(b))
    }

    /// `ip route get` output, or the error text when there is no route.
    fn route_get(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip(8)");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        text
    }

    #[test]
    fn rule_messages_carry_the_udp_port_and_a_wide_table() {
        let r = rule("198.18.5.2", 53, 100);
        let msg = r.message(RTM_NEWRULE, 0);
        let body = msg.body();
        assert_eq!(body[0], libc::AF_INET as u8);
        assert_eq!(body[2], 32, "src_len: a host rule");
        assert_eq!(body[4], 0, "51821 does not fit the header byte");
        assert_eq!(body[7], FR_ACT_TO_TBL);
        let a: Vec<_> = attrs(&body[FIB_RULE_HDR_LEN..]).collect();
        assert!(a.contains(&(FRA_SRC, &[198, 18, 5, 2][..])), "{a:?}");
        assert!(a.contains(&(FRA_TABLE, &TABLE.to_ne_bytes()[..])), "{a:?}");
        assert!(
            a.contains(&(FRA_PRIORITY, &100u32.to_ne_bytes()[..])),
            "{a:?}"
        );
        assert!(a.contains(&(FRA_IP_PROTO, &[17][..])), "{a:?}");
        assert!(
            a.contains(&(FRA_SPORT_RANGE, &port_range(53, 53)[..])),
            "{a:?}"
        );
        // What we send reads back as the same rule (a dump uses the same layout).
        assert_eq!(parse_rule(body), Some(r));
        let r6 = rule("2001:db8::2", 5353, 7);
        assert_eq!(parse_rule(r6.message(RTM_NEWRULE, 0).body()), Some(r6));
    }

    #[test]
    fn dumped_rules_of_other_shapes_are_not_ours() {
        let base = rule("198.18.5.2", 53, 100);
        let with = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut body = base.message(RTM_NEWRULE, 0).body().to_vec();
            edit(&mut body);
            parse_rule(&body)
        };
        assert_eq!(with(&|_| {}), Some(base));
        let push_attr = |b: &mut Vec<u8>, ty: u16, data: &[u8]| {
            b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&ty.to_ne_bytes());
            b.extend_from_slice(data);
            while !b.len().is_multiple_of(4) {
                b.push(0);
            }
        };
        assert_eq!(with(&|b| b[7] = 6), None, "blackhole action");
        assert_eq!(with(&|b| b[2] = 24), None, "a /24 source");
        assert_eq!(with(&|b| b[8] |= FIB_RULE_INVERT as u8), None, "not from");
        assert_eq!(
            with(&|b| push_attr(b, FRA_IIFNAME, b"eth0\0")),
            None,
            "an extra selector"
        );
        // A later attribute overrides an earlier one, as in the kernel's parser.
        assert_eq!(
            with(&|b| push_attr(b, FRA_SPORT_RANGE, &port_range(53, 60))),
            None,
            "a port range"
        );
        assert_eq!(
            with(&|b| push_attr(b, FRA_IP_PROTO, &[6])),
            None,
            "ipproto tcp"
        );
        // Truncated or empty dumps are answered, not panicked on.
        let body = base.message(RTM_NEWRULE, 0).body().to_vec();
        for n in 0..body.len() {
            let _ = parse_rule(&body[..n]);
        }
    }

    #[test]
    fn rules_the_kernel_would_refuse_are_rejected_up_front() {
        for (r, needle) in [
            (
                SourcePortRule {
                    table: 0,
                    ..rule("198.18.5.2", 53, 1)
                },
                "table 0",
            ),
            (rule("198.18.5.2", 0, 1), "port 0"),
            (rule("2001:db8::2", 65535, 1), "65535"),
        ] {
            let e = add_rule(&r).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            let msg = e.to_string();
            assert!(
                msg.contains(needle) && msg.contains(&r.src.to_string()),
                "{msg}"
            );
            assert_eq!(
                del_rule(&r).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert!(rule("198.18.5.2", 65534, 1).validate().is_ok());
        assert!(rule("198.18.5.2", 1, 0).validate().is_ok());
    }

    #[test]
    fn rules_are_idempotent_listed_and_removable() {
        in_netns("rules_are_idempotent_listed_and_removable", || {
            let r4 = rule("198.18.5.2", 53, 100);
            let r6 = rule("2001:db8::5:2", 53, 101);
            for r in [&r4, &r6, &r4, &r6] {
                add_rule(r).unwrap_or_else(|e| panic!("add {r}: {e}"));
            }
            let out4 = ip(&["rule", "show"]);
            assert!(
                out4.contains("100:\tfrom 198.18.5.2 ipproto udp sport 53 lookup 51821"),
                "ip rule show: {out4}"
            );
            assert_eq!(
                out4.matches("198.18.5.2").count(),
                1,
                "added twice, one rule: {out4}"
            );
            let out6 = ip(&["-6", "rule", "show"]);
            assert!(
                out6.contains("101:\tfrom 2001:db8::5:2 ipproto udp sport 53 lookup 51821"),
                "ip -6 rule show: {out6}"
            );
            assert_eq!(out6.matches("2001:db8::5:2").count(), 1, "{out6}");

            // A rule added by someone else, for another table, is not listed.
            ip(&[
                "rule",
                "add",
                "from",
                "198.18.5.3",
                "lookup",
                "100",
                "pref",
                "102",
            ]);
            let mut listed = list_rules(TABLE).unwrap();
            listed.sort();
            assert_eq!(listed, vec![r4, r6]);
            assert_eq!(list_rules(TABLE + 1).unwrap(), vec![]);

            del_rule(&r4).expect("delete v4 rule");
            assert!(!ip(&["rule", "show"]).contains("198.18.5.2"));
            assert_eq!(list_rules(TABLE).unwrap(), vec![r6]);
            del_rule(&r4).expect("deleting a missing rule is Ok");
            del_rule(&r6).expect("delete v6 rule");
            assert!(!ip(&["-6", "rule", "show"]).contains("2001:db8::5:2"));
            assert_eq!(list_rules(TABLE).unwrap(), vec![]);
            // The foreign rule is untouched.
            assert!(ip(&["rule", "show"]).contains("198.18.5.3"));
        });
    }

    #[test]
    fn only_replies_from_the_service_port_are_routed_into_the_table() {
        in_netns(
            "only_replies_from_the_service_port_are_routed_into_the_table",
            || {
                // d0 stands in for the TUN; the container's address lives on d1, which also
                // carries the main table's default route (the host's uplink).
                let (tun, _) = veth_pair("d0", "d1");
                ip(&["addr", "add", "198.18.5.2/32", "dev", "d1"]);
                ip(&[
                    "-6",
                    "addr",
                    "add",
                    "2001:db8::5:2/128",
                    "dev",
                    "d1",
                    "nodad",
                ]);
                ip(&["route", "add", "default", "dev", "d1"]);
                ip(&["-6", "route", "add", "default", "dev", "d1"]);
                add_route_in(TABLE, tun, "0.0.0.0".parse().unwrap(), 0).unwrap();
                add_route_in(TABLE, tun, "::".parse().unwrap(), 0).unwrap();
                add_rule(&rule("198.18.5.2", 53, 100)).unwrap();
                add_rule(&rule("2001:db8::5:2", 53, 100)).unwrap();

                let get4 = |sport: &str| {
                    route_get(&[
                        "route",
                        "get",
                        "198.51.100.7",
                        "from",
                        "198.18.5.2",
                        "ipproto",
                        "udp",
                        "sport",
                        sport,
                    ])
                };
                let get6 = |sport: &str| {
                    route_get(&[
                        "-6",
                        "route",
                        "get",
                        "2001:db8:ffff::7",
                        "from",
                        "2001:db8::5:2",
                        "ipproto",
                        "udp",
                        "sport",
                        sport,
                    ])
                };
                for (fam, reply, other) in [
                    ("v4", get4("53"), get4("54")),
                    ("v6", get6("53"), get6("54")),
                ] {
                    assert!(
                        reply.contains("dev d0 table 51821"),
                        "{fam} reply from the service port: {reply}"
                    );
                    assert!(other.contains("dev d1"), "{fam} other port: {other}");
                    assert!(!other.contains("d0"), "{fam} other port: {other}");
                }
                // Other protocols from the service port stay in the main table too.
                let tcp = route_get(&[
                    "route",
                    "get",
                    "198.51.100.7",
                    "from",
                    "198.18.5.2",
                    "ipproto",
                    "tcp",
                    "sport",
                    "53",
                ]);
                assert!(tcp.contains("dev d1"), "tcp: {tcp}");

                del_rule(&rule("198.18.5.2", 53, 100)).unwrap();
                let after = get4("53");
                assert!(after.contains("dev d1"), "rule deleted: {after}");
                del_route_in(TABLE, tun, "0.0.0.0".parse().unwrap(), 0).unwrap();
            },
        );
    }

    #[test]
    fn sysctl_keys_are_paths_under_proc_sys() {
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/rp_filter").unwrap(),
            "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
        );
        for bad in [
            "",
            "/net/ipv4/ip_forward",
            "net//ipv4",
            "net/../../etc",
            "net/ipv4/",
            ".",
        ] {
            let e = set_sysctl(bad, "0").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
            assert_eq!(sysctl(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn sysctls_are_written_and_read_in_the_callers_namespace() {
        in_netns(
            "sysctls_are_written_and_read_in_the_callers_namespace",
            || {
                // d0 exists only in this namespace, so finding its key shows which one we
                // talk to.
                veth_pair("d0", "d1");
                let key = "net/ipv4/conf/d0/rp_filter";
                set_sysctl(key, "2").unwrap();
                assert_eq!(sysctl(key).unwrap(), "2");
                set_sysctl(key, "0").unwrap();
                assert_eq!(sysctl(key).unwrap(), "0");

                let e = set_sysctl("net/ipv4/conf/nosuch0/rp_filter", "0").unwrap_err();
                let msg = e.to_string();
                eprintln!("error for a missing interface: {msg}");
                assert_eq!(e.kind(), io::ErrorKind::NotFound);
                assert!(msg.contains("net/ipv4/conf/nosuch0/rp_filter"), "{msg}");
                let e = set_sysctl(key, "not a number").unwrap_err();
                assert!(e.to_string().contains(key), "{e}");
                let e = sysctl("net/ipv4/conf/nosuch0/rp_filter").unwrap_err();
                assert!(e.to_string().contains("nosuch0"), "{e}");
            },
        );
    }
}
