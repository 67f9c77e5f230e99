//! Value parsers shared by the node config and the routing map.
//!
//! Every check on a single value happens inside `Deserialize`, so the TOML deserializer
//! attaches that value's span to the error and the operator is pointed at it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected, Visitor};

use super::toml_error::quoted;

/// Deserialize a string and convert it with `parse`, whose error text becomes the message.
/// `expecting` is what a value of the wrong type is told it should have been.
pub(crate) fn parse_str<'de, D, T, F>(
    d: D,
    expecting: &'static str,
    parse: F,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    // The check runs inside the visitor: an error returned from there passes back
    // through the deserializer, which attaches the value's span. An error raised after
    // `deserialize_str` returned would only get the span of the enclosing array.
    struct StrVisitor<F> {
        expecting: &'static str,
        parse: F,
    }
    impl<T, F: FnOnce(&str) -> Result<T, String>> Visitor<'_> for StrVisitor<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(StrVisitor { expecting, parse })
}

/// Deserialize an integer in `range`; `expecting` names the range for the operator.
pub(crate) fn int_in<'de, D>(
    d: D,
    expecting: &'static str,
    range: RangeInclusive<i64>,
) -> Result<i64, D::Error>
where
    D: Deserializer<'de>,
{
    struct IntVisitor(&'static str, RangeInclusive<i64>);
    impl Visitor<'_> for IntVisitor {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            if self.1.contains(&v) {
                Ok(v)
            } else {
                Err(E::invalid_value(Unexpected::Signed(v), &self))
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            match i64::try_from(v) {
                Ok(v) => self.visit_i64(v),
                Err(_) => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
            }
        }
    }
    d.deserialize_i64(IntVisitor(expecting, range))
}

/// A UDP or TCP port; 0 means "any" to the kernel and is never what a file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = int_in(d, "a port number (1..=65535)", 1..=65535)?;
        // The range check above makes this infallible; no panic path on input.
        u16::try_from(v).map(Port).map_err(de::Error::custom)
    }
}

pub(crate) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    Port::deserialize(d).map(|p| p.0)
}

/// A limit on a number of things: at least one.
pub(crate) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = int_in(d, "a count (an integer >= 1)", 1..=i64::MAX)?;
    usize::try_from(v).map_err(|_| de::Error::custom(format!("{v} is too large for this host")))
}

/// A count that may be 0 (0 turns the thing off).
pub(crate) fn count_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = int_in(d, "a count (an integer >= 0)", 0..=i64::MAX)?;
    usize::try_from(v).map_err(|_| de::Error::custom(format!("{v} is too large for this host")))
}

/// A mesh address: the overlay only ever uses unique local addresses, so anything else
/// is a typo or a public address pasted into the wrong field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct UlaAddr(pub Ipv6Addr);

const ULA_EXPECTED: &str = "must be an IPv6 unique local address (fc00::/7, e.g. fd00:f1::1)";

impl<'de> Deserialize<'de> for UlaAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(
            d,
            "an IPv6 unique local address (fc00::/7)",
            |s| match s.parse::<IpAddr>() {
                Ok(IpAddr::V6(a)) if a.segments()[0] & 0xfe00 == 0xfc00 => Ok(UlaAddr(a)),
                Ok(IpAddr::V6(a)) => Err(format!("{ULA_EXPECTED}, got {a}")),
                Ok(IpAddr::V4(a)) => Err(format!("{ULA_EXPECTED}, got IPv4 address {a}")),
                Err(_) => Err(format!("{ULA_EXPECTED}, got {}", quoted(s))),
            },
        )
    }
}

pub(crate) fn ula<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv6Addr, D::Error> {
    UlaAddr::deserialize(d).map(|a| a.0)
}

/// A mesh IPv4 address: private (RFC 1918), shared (100.64.0.0/10) or benchmarking
/// (198.18.0.0/15) space, never a global address the host might also reach directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct MeshV4(pub Ipv4Addr);

const MESH_V4_EXPECTED: &str =
    "must be a private IPv4 address (10/8, 172.16/12, 192.168/16, 100.64/10 or 198.18/15)";

impl<'de> Deserialize<'de> for MeshV4 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a private IPv4 address", |s| match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                let [x, y, ..] = a.octets();
                let shared = x == 100 && (64..128).contains(&y);
                let bench = x == 198 && (y == 18 || y == 19);
                if (a.is_private() || shared || bench) && !a.is_broadcast() {
                    Ok(MeshV4(a))
                } else {
                    Err(format!("{MESH_V4_EXPECTED}, got {a}"))
                }
            }
            Ok(IpAddr::V6(a)) => Err(format!("{MESH_V4_EXPECTED}, got IPv6 address {a}")),
            Err(_) => Err(format!("{MESH_V4_EXPECTED}, got {}", quoted(s))),
        })
    }
}

pub(crate) fn mesh_v4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    MeshV4::deserialize(d).map(|a| Some(a.0))
}

/// `address:port`, with IPv6 addresses in brackets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SockAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for SockAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(
            d,
            "a socket address such as \"192.0.2.1:53\"",
            |s| match s.parse::<SocketAddr>() {
                Ok(a) if a.port() == 0 => Err(format!("port 0 is not allowed in {a}")),
                Ok(a) => Ok(SockAddr(a)),
                Err(_) => Err(format!(
                    "expected a socket address such as 192.0.2.1:53 or [2001:db8::1]:53, got {}",
                    quoted(s)
                )),
            },
        )
    }
}

pub(crate) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    SockAddr::deserialize(d).map(|a| a.0)
}

pub(crate) fn opt_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    SockAddr::deserialize(d).map(|a| Some(a.0))
}

/// A positive duration in humantime syntax ("90s", "2m", "1h 30m").
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parse_str(
        d,
        "a duration such as \"2m\" or \"90s\"",
        |s| match humantime::parse_duration(s) {
            Ok(v) if v.is_zero() => Err("must be longer than zero".to_owned()),
            Ok(v) => Ok(v),
            Err(e) => Err(format!(
                "invalid duration {}: {e} (write e.g. \"2m\" or \"90s\")",
                quoted(s)
            )),
        },
    )
}

/// A tunnel MTU: at least IPv6's minimum, at most what a jumbo underlay can carry.
pub(crate) fn mtu<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let v = int_in(d, "an MTU (1280..=9000)", 1280..=9000)?;
    u16::try_from(v).map(Some).map_err(de::Error::custom)
}

/// A queue length in packets (a TUN's `txqueuelen`).
pub(crate) fn queue_len<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = int_in(
        d,
        "a queue length in packets (16..=1000000)",
        16..=1_000_000,
    )?;
    u32::try_from(v).map_err(de::Error::custom)
}

/// A nice value.
pub(crate) fn nice<'de, D: Deserializer<'de>>(d: D) -> Result<i8, D::Error> {
    let v = int_in(d, "a nice value (-20..=19)", -20..=19)?;
    i8::try_from(v).map_err(de::Error::custom)
}

/// An absolute path: the daemon runs with `/` as its working directory, so a relative
/// path would silently mean something other than what the operator saw in their shell.
pub(crate) fn abs_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    parse_str(d, "an absolute path", |s| {
        let path = PathBuf::from(s);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(format!("must be an absolute path, got {}", quoted(s)))
        }
    })
}

/// A Linux network interface name, by the kernel's own rules (`dev_valid_name`).
pub(crate) fn interface<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parse_str(d, "a network interface name", |s| {
        let bad = s.is_empty()
            || s.len() > 15
            || s == "."
            || s == ".."
            || s.chars()
                .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
        if bad {
            Err(format!(
                "invalid interface name {}: 1 to 15 bytes, no '/', ':' or whitespace",
                quoted(s)
            ))
        } else {
            Ok(s.to_owned())
        }
    })
}

/// A network prefix in CIDR form ("198.19.0.0/16", "fd00:c::/48"), host bits clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefix(pub ipnet::IpNet);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(
            d,
            "a prefix such as \"198.19.0.0/16\"",
            |s| match s.parse::<ipnet::IpNet>() {
                Ok(net) if net.trunc() != net => Err(format!(
                    "{} has bits set past its prefix length; did you mean {}?",
                    quoted(s),
                    net.trunc()
                )),
                Ok(net) => Ok(Prefix(net)),
                Err(_) => Err(format!(
                    "expected a prefix such as 198.19.0.0/16 or fd00:c::/48, got {}",
                    quoted(s)
                )),
            },
        )
    }
}

pub(crate) fn opt_prefixes<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ipnet::IpNet>>, D::Error> {
    Vec::<Prefix>::deserialize(d).map(|v| Some(v.into_iter().map(|p| p.0).collect()))
}
