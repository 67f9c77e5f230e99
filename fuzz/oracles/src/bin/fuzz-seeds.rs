//! Writes the seed corpus (`seeds::all`) into `fuzz/corpus/<target>/seed-<name>` and the
//! issue 29 reproducer into `fuzz/artifacts/tun_udp_gro/`. Run after changing a seed:
//! `cargo run -p flynode-fuzz-oracles --bin fuzz-seeds`.
use std::path::Path;

use flynode_fuzz_oracles::seeds;

fn main() -> std::io::Result<()> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut written = 0;
    for (target, name, bytes) in seeds::all() {
        let dir = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        written += 1;
    }
    let artifacts = fuzz.join("artifacts").join("tun_udp_gro");
    std::fs::create_dir_all(&artifacts)?;
    std::fs::write(
        artifacts.join("issue-29-reorder-ttl"),
        seeds::issue_29_reorder(),
    )?;
    println!(
        "{written} seeds and 1 reproducer written under {}",
        fuzz.display()
    );
    Ok(())
}
