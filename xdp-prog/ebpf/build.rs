// Rebuild the eBPF object when bpf-linker changes (an upgrade links differently).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run scripts/setup.sh"),
    }
}
