//! Builds the XDP program (xdp-prog/ebpf) for bpfel-unknown-none with aya-build; the
//! objects (`flynode-xdp`, the XDP classifier, and `flynode-reply`, the tc reply-capture
//! program) land in OUT_DIR; src/xdp.rs and src/forward/capture.rs embed them with
//! include_bytes_aligned!.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../xdp-prog/ebpf");
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The eBPF crate needs -Z build-std=core. We build it with the same stable toolchain
    // as everything else and RUSTC_BOOTSTRAP=1 (DESIGN.md): one toolchain to install and
    // pin, and rustc's LLVM (22) matches the bpf-linker that scripts/setup.sh builds.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let package = aya_build::Package {
        name: "flynode-xdp-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable"))
}
