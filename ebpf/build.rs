//! Rebuild when bpf-linker changes: the eBPF object is linked by it, an undeclared dependency.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
