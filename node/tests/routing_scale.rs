//! The routing map's parse and validation grow linearly with the fleet: the work for a
//! map of 4,000 nodes is about four times that for 1,000 (issue 23). Work is counted,
//! not timed, so a fast or a loaded machine cannot fool it: allocations and bytes
//! allocated (a counting global allocator, this test binary's own), and the bytes
//! scanned to compute line numbers (`toml_error::bytes_scanned`), which a valid map
//! must not need at all.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use flynode::config::toml_error::bytes_scanned;
use flynode::routing::RoutingMap;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract is GlobalAlloc::alloc's, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counters are process-wide: the tests of this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A valid map of `n` nodes (distinct ids, keys, endpoints and mesh addresses) and a
/// service on two of them, as an operator would write it.
fn map_text(n: u32) -> String {
    let mut text = String::new();
    for i in 0..n {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        key[31] = 0x40;
        let key = flynode_keys::PublicKey::from_bytes(key);
        text.push_str(&format!(
            "[[node]]\nid = \"node-{i}\"\nregion = \"r{}\"\npublic_key = \"{key}\"\nendpoint = \"198.18.{}.{}:51820\"\nmesh_address = \"fd00:f1::{:x}\"\n\n",
            i % 16,
            (i / 250) % 256,
            i % 250 + 1,
            i + 1
        ));
    }
    text.push_str(
        "[[service]]\nid = 1\nname = \"echo\"\nanycast = [\"198.18.100.1\"]\nports = [7]\n  [[service.worker]]\n  node = \"node-1\"\n  target = [\"198.19.1.2:7\"]\n  [[service.worker]]\n  node = \"node-2\"\n  target = [\"198.19.2.2:7\"]\n",
    );
    text
}

/// (allocations, bytes allocated, bytes scanned for locations) of one parse.
fn work(text: &str) -> (u64, u64, u64) {
    let before = (ALLOCS.load(Relaxed), BYTES.load(Relaxed), bytes_scanned());
    let map = RoutingMap::parse(text, Path::new("routing.toml")).expect("valid map");
    let after = (ALLOCS.load(Relaxed), BYTES.load(Relaxed), bytes_scanned());
    drop(map);
    (after.0 - before.0, after.1 - before.1, after.2 - before.2)
}

#[test]
fn parsing_a_map_costs_work_linear_in_its_nodes() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (small, large) = (map_text(1_000), map_text(4_000));
    let a = work(&small);
    let b = work(&large);
    assert_eq!(
        (a.2, b.2),
        (0, 0),
        "a valid map computed line numbers it never printed"
    );
    // 4x the nodes: 4x the work, with room for hash tables doubling at other points.
    for (what, x, y) in [("allocations", a.0, b.0), ("bytes allocated", a.1, b.1)] {
        let ratio = y as f64 / x as f64;
        assert!(
            (3.5..=5.0).contains(&ratio),
            "{what}: {x} for 1,000 nodes, {y} for 4,000 ({ratio:.2}x)"
        );
    }
}

/// A duplicate near the end of a large map is still reported with the line of the first
/// definition, and locating it scans the text once or twice, not once per node.
#[test]
fn a_duplicate_is_located_with_a_bounded_scan() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = map_text(4_000);
    text.push_str(&map_text(1).replace("node-0", "node-17"));
    let before = bytes_scanned();
    let err = RoutingMap::parse(&text, Path::new("routing.toml")).unwrap_err();
    let scanned = bytes_scanned() - before;
    let msg = err.to_string();
    assert!(
        msg.contains("duplicate node id `node-17` (first defined at line 121)"),
        "{msg}"
    );
    assert!(
        scanned <= 4 * text.len() as u64,
        "scanned {scanned} bytes of a {}-byte map",
        text.len()
    );
}
