//! `etcd_view`: assembling the routing map from the records under the etcd prefix
//! (`flynode::fleet::View::assemble`, `RoutingMap::assemble_cached`).
//!
//! Input: records separated by `0xff` bytes, each `[meta][name or key] 0x00 [value]`
//! (see [`records`]); key and value are read as etcd's are (`Kv::of`: invalid UTF-8
//! replaced).
//!
//! Properties: every key is accounted for exactly once, as the node or service it names
//! or as rejected; the map holds what `RoutingMap` documents, with workers only on nodes
//! it has (see `routing_map::check_map`), and is accepted again unchanged as a file and
//! as records; services named for absent workers are in the map and their nodes are
//! not. Parsing through a cache warmed with other values for the same keys gives what a
//! fresh assembly gives, and so does a second pass.
use std::collections::BTreeMap;

use flynode::config::NodeId;
use flynode::fleet::{Kv, Layout, View};
use flynode::routing::{Assembled, RecordCache, RecordKind};

use crate::routing_map::{check_map, reaccepted};

pub const PREFIX: &str = "/flynode/";

/// The view an input describes. `meta` bits 0-1 pick how the key is made from the name:
/// `nodes/<name>`, `services/<name>` (both under [`PREFIX`]), `<PREFIX><name>`, or the
/// name as the whole key; bits 2-7 are the record's creation revision.
pub fn records(data: &[u8]) -> View {
    let mut records = BTreeMap::new();
    for chunk in data.split(|&b| b == 0xff) {
        let Some((&meta, rest)) = chunk.split_first() else {
            continue;
        };
        let (name, value) = match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        let name = String::from_utf8_lossy(name);
        let key = match meta & 3 {
            0 => format!("{PREFIX}nodes/{name}"),
            1 => format!("{PREFIX}services/{name}"),
            2 => format!("{PREFIX}{name}"),
            _ => name.into_owned(),
        };
        let kv = Kv {
            value: String::from_utf8_lossy(value).into_owned(),
            create_revision: i64::from(meta >> 2),
        };
        records.insert(key, kv);
    }
    View {
        revision: 1,
        records,
    }
}

/// The inverse of [`records`] for keys under [`PREFIX`]: `(kind, name, value, revision)`.
pub fn encode(records: &[(u8, &str, &str, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (kind, name, value, revision)) in records.iter().enumerate() {
        if i > 0 {
            out.push(0xff);
        }
        out.push(kind & 3 | revision << 2);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

pub fn etcd_view(data: &[u8]) {
    let view = records(data);
    let layout = Layout::new(PREFIX);
    let fresh = view.assemble(&layout);
    accounted(&view, &layout, &fresh);
    check_map(&fresh.map);
    reaccepted(&fresh.map);
    for (service, nodes) in &fresh.absent_workers {
        assert!(
            fresh
                .map
                .services
                .values()
                .any(|s| s.name.as_str() == service),
            "absent workers named for service `{service}`, which is not in the map"
        );
        for n in nodes {
            assert!(
                !fresh.map.nodes.contains_key(n),
                "node {n} is absent and present"
            );
        }
    }

    // The same keys with other values first (each value cut in half), then the view.
    let mut older = view.clone();
    for kv in older.records.values_mut() {
        let mut cut = kv.value.len() / 2;
        while !kv.value.is_char_boundary(cut) {
            cut -= 1;
        }
        kv.value.truncate(cut);
    }
    let mut cache = RecordCache::default();
    older.assemble_cached(&layout, &mut cache);
    same(
        &fresh,
        &view.assemble_cached(&layout, &mut cache),
        "after other values",
    );
    same(
        &fresh,
        &view.assemble_cached(&layout, &mut cache),
        "on a second pass",
    );
}

fn accounted(view: &View, layout: &Layout, a: &Assembled) {
    for key in a.rejected.keys() {
        assert!(
            view.records.contains_key(key),
            "rejected {key:?}, which is not in etcd"
        );
    }
    for key in view.records.keys() {
        let accepted = match layout.classify(key) {
            Some((RecordKind::Node, name)) => name
                .parse::<NodeId>()
                .is_ok_and(|id| a.map.nodes.contains_key(&id)),
            Some((RecordKind::Service, name)) => {
                a.map.services.values().any(|s| s.name.as_str() == name)
            }
            None => false,
        };
        let rejected = a.rejected.contains_key(key);
        assert!(
            accepted != rejected,
            "{key:?}: accepted {accepted}, rejected {rejected}"
        );
    }
    assert_eq!(
        a.map.nodes.len() + a.map.services.len() + a.rejected.len(),
        view.records.len(),
        "records and outcomes do not add up"
    );
}

fn same(fresh: &Assembled, cached: &Assembled, when: &str) {
    assert!(
        cached.map == fresh.map,
        "cached assembly differs {when}: map"
    );
    assert_eq!(
        cached.rejected, fresh.rejected,
        "cached assembly differs {when}"
    );
    assert_eq!(
        cached.absent_workers, fresh.absent_workers,
        "cached assembly differs {when}"
    );
}
