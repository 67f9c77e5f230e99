//! `flynode services apply|list|remove`: the operator's side of the etcd layout.
//!
//! `apply` validates the file completely before writing (syntax, every field, and
//! uniqueness of ids, names and (anycast, port) pairs against the services already in
//! etcd), then writes all its services in one transaction that only succeeds if none
//! of them changed since they were read, so two operators cannot overwrite each other
//! unknowingly.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use super::Layout;
use crate::routing::{RoutingMap, Service};

/// How the CLI reaches etcd.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub layout: Layout,
}

/// Bounds every CLI operation: an unreachable etcd is an error, not a hang.
const DEADLINE: Duration = Duration::from_secs(10);

async fn connect(target: &Target) -> anyhow::Result<Client> {
    super::source::connect(&target.endpoints).await
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn bounded<T>(
    what: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    runtime()?.block_on(async {
        match tokio::time::timeout(DEADLINE, f).await {
            Ok(r) => r,
            Err(_) => bail!(
                "{what}: etcd did not answer within {}",
                humantime::format_duration(DEADLINE)
            ),
        }
    })
}

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    pub services: Vec<String>,
    pub revision: i64,
    /// Nodes named by workers that have no record (down, or not yet started).
    pub absent_nodes: Vec<String>,
}

/// Validates `path` against etcd and writes its services.
pub fn apply(target: &Target, path: &Path) -> anyhow::Result<Applied> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read services file", path.display()))?;
    bounded("services apply", async {
        let mut client = connect(target).await?;
        let view = super::read_view(&mut client, &target.layout).await?;
        // The names the file replaces, from a first parse against an empty map (which
        // also catches every error inside the file itself).
        let (own, _) = RoutingMap::parse_services(&text, path, &RoutingMap::default())?;
        let mut existing = view.assemble(&target.layout).map;
        existing
            .services
            .retain(|_, s| !own.iter().any(|o| o.name == s.name));
        let (services, absent) = RoutingMap::parse_services(&text, path, &existing)?;
        if services.is_empty() {
            bail!("{}: no [[service]] entries", path.display());
        }
        let mut compare = Vec::new();
        let mut puts = Vec::new();
        for service in &services {
            let key = target.layout.service_key(service.name.as_str());
            // Unchanged since read: same modification, or still absent.
            let seen = view.records.contains_key(&key);
            compare.push(if seen {
                Compare::mod_revision(key.as_str(), CompareOp::Less, view.revision + 1)
            } else {
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
            });
            puts.push(TxnOp::put(key, super::service_record(service), None));
        }
        let response = client
            .txn(Txn::new().when(compare).and_then(puts))
            .await
            .context("writing the services")?;
        if !response.succeeded() {
            bail!("a service in the file was changed in etcd while this ran; run it again");
        }
        Ok(Applied {
            services: services.iter().map(|s| s.name.to_string()).collect(),
            revision: response.header().map_or(0, |h| h.revision()),
            absent_nodes: absent.iter().map(ToString::to_string).collect(),
        })
    })
}

/// The services in etcd, and records that are broken (key → error).
pub fn list(target: &Target) -> anyhow::Result<(Vec<Service>, BTreeMap<String, String>)> {
    bounded("services list", async {
        let mut client = connect(target).await?;
        let view = super::read_view(&mut client, &target.layout).await?;
        let assembled = view.assemble(&target.layout);
        let services = assembled.map.services.into_values().collect();
        let services_prefix = target.layout.services();
        let broken = assembled
            .rejected
            .into_iter()
            .filter(|(k, _)| k.starts_with(&services_prefix))
            .collect();
        Ok((services, broken))
    })
}

/// Removes one service; an error if it is not there.
pub fn remove(target: &Target, name: &str) -> anyhow::Result<()> {
    bounded("services remove", async {
        let mut client = connect(target).await?;
        let key = target.layout.service_key(name);
        let deleted = client
            .delete(key.as_str(), None)
            .await
            .with_context(|| format!("deleting {key}"))?
            .deleted();
        if deleted == 0 {
            bail!("no service `{name}` in etcd ({key} does not exist)");
        }
        Ok(())
    })
}
