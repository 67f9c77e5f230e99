//! Names an operator writes in the config and the routing map. They end up in metrics
//! labels, log lines and etcd keys, hence the restrictive, DNS-label-like charset.

/// A name that failed its charset or length rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {}: {rule}", super::toml_error::quoted(.value))]
pub struct InvalidName {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

/// Checks `value` against `[a-z0-9][a-z0-9-<extra>]{0,62}`.
pub(crate) fn check_label(
    value: &str,
    what: &'static str,
    extra: &[u8],
    rule: &'static str,
) -> Result<(), InvalidName> {
    let bytes = value.as_bytes();
    let inner_ok =
        |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || extra.contains(b);
    let ok = match bytes.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_lowercase() || first.is_ascii_digit())
                && rest.len() <= 62
                && rest.iter().all(inner_ok)
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            value: value.to_owned(),
            rule,
        })
    }
}

/// Defines a validated string newtype: it can only be built through `FromStr` (and hence
/// `Deserialize`), so holding one means the name is valid.
macro_rules! label_type {
    ($(#[$meta:meta])* $name:ident, $what:literal, extra = $extra:expr, rule = $rule:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::config::InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::config::names::check_label(s, $what, $extra, $rule)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                $crate::config::de::parse_str(d, concat!("a ", $what), |s| {
                    s.parse().map_err(|e: $crate::config::InvalidName| e.to_string())
                })
            }
        }
    };
}
pub(crate) use label_type;

label_type!(
    /// A node's name, unique in the mesh (`ams-1`).
    NodeId,
    "node id",
    extra = b"",
    rule = "use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
);

label_type!(
    /// A region, the unit anycast traffic is steered within (`ams`).
    Region,
    "region",
    extra = b"",
    rule = "use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
);

/// The node id to use when the config does not set one: the host's name up to the
/// first dot, lowercased, since hostnames are case-insensitive and often fully qualified.
pub(crate) fn node_id_from_hostname(hostname: &str) -> Result<NodeId, InvalidName> {
    let hostname = hostname.trim();
    let short = hostname.split('.').next().unwrap_or(hostname);
    short.to_ascii_lowercase().parse()
}
