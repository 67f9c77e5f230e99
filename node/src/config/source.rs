//! `[source]`: where the routing map comes from.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::de;
use super::toml_error::quoted;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SourceTable")]
pub enum SourceConfig {
    /// A routing map file, re-read when it changes.
    File { path: PathBuf },
    /// Routing map entries under `prefix` in etcd.
    Etcd {
        /// `http://host:port` or `https://host:port`; at least one.
        endpoints: Vec<String>,
        /// Always starts and ends with '/'.
        prefix: String,
        /// TTL of the lease this node's record is published under: a node that dies
        /// disappears from the others' maps this long after its last keepalive.
        lease_ttl: std::time::Duration,
    },
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig::File {
            path: PathBuf::from("/etc/flynode/routing.toml"),
        }
    }
}

/// The table as written: `file = …` or a `[source.etcd]` sub-table, the choice checked
/// in `TryFrom` so the error points at `[source]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceTable {
    #[serde(default, deserialize_with = "some_abs_path")]
    file: Option<PathBuf>,
    etcd: Option<EtcdTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdTable {
    #[serde(deserialize_with = "endpoints")]
    endpoints: Vec<String>,
    #[serde(default = "default_prefix", deserialize_with = "prefix")]
    prefix: String,
    #[serde(default = "default_lease_ttl", deserialize_with = "lease_ttl")]
    lease_ttl: std::time::Duration,
}

fn default_lease_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

/// etcd leases have whole-second TTLs; below 2 s a keepalive every TTL/3 would race the
/// expiry on a loaded host.
fn lease_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let ttl = de::duration(d)?;
    if ttl < std::time::Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
        return Err(serde::de::Error::custom(format!(
            "must be a whole number of seconds, at least 2 s (got {})",
            humantime::format_duration(ttl)
        )));
    }
    Ok(ttl)
}

impl TryFrom<SourceTable> for SourceConfig {
    type Error = &'static str;
    fn try_from(table: SourceTable) -> Result<Self, Self::Error> {
        match (table.file, table.etcd) {
            (Some(_), Some(_)) => Err("set either `file` or [source.etcd], not both"),
            (Some(path), None) => Ok(SourceConfig::File { path }),
            (None, Some(etcd)) => Ok(SourceConfig::Etcd {
                endpoints: etcd.endpoints,
                prefix: etcd.prefix,
                lease_ttl: etcd.lease_ttl,
            }),
            (None, None) => Ok(SourceConfig::default()),
        }
    }
}

fn some_abs_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    de::abs_path(d).map(Some)
}

fn default_prefix() -> String {
    "/flynode/".to_owned()
}

fn prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    de::parse_str(d, "an etcd key prefix starting with '/'", |s| {
        if s.starts_with('/') {
            // Keys are `<prefix>nodes/<id>`: a prefix without the final '/' would
            // also match `/flynode-staging/...`.
            Ok(if s.ends_with('/') {
                s.to_owned()
            } else {
                format!("{s}/")
            })
        } else {
            Err(format!("must start with '/', got {}", quoted(s)))
        }
    })
}

struct Endpoint(String);

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::parse_str(
            d,
            "an etcd endpoint such as \"http://127.0.0.1:2379\"",
            |s| {
                if valid_endpoint(s) {
                    Ok(Endpoint(s.to_owned()))
                } else {
                    Err(format!(
                        "expected an etcd endpoint http://host:port or https://host:port, got {}",
                        quoted(s)
                    ))
                }
            },
        )
    }
}

fn endpoints<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<Endpoint>::deserialize(d)?;
    if list.is_empty() {
        return Err(serde::de::Error::custom(
            "must list at least one etcd endpoint",
        ));
    }
    Ok(list.into_iter().map(|e| e.0).collect())
}

/// `http[s]://host:port` and nothing more: a path, query or credentials in an endpoint
/// would be silently dropped by the etcd client, so they are refused here.
fn valid_endpoint(s: &str) -> bool {
    let Some(authority) = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    else {
        return false;
    };
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    let port_ok =
        matches!(port.parse::<u16>(), Ok(p) if p != 0) && port.bytes().all(|b| b.is_ascii_digit());
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::valid_endpoint;

    #[test]
    fn etcd_endpoints_must_be_scheme_host_port() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd-1.example.com:2379",
            "http://[::1]:2379",
        ] {
            assert!(valid_endpoint(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "http://:2379",
            "http://h:0",
            "http://h:+1",
            "http://h:2379/v3",
            "http://user@h:2379",
            "http://[zz]:2379",
            "ftp://h:1",
        ] {
            assert!(!valid_endpoint(bad), "{bad}");
        }
    }
}
