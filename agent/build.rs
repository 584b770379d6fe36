//! Builds the eBPF programs (ebpf/, nightly toolchain, bpf-linker) and leaves the object in
//! OUT_DIR, where src/probes embeds it. `cargo xtask` installs the toolchain pieces.
fn main() -> anyhow::Result<()> {
    // common/ is compiled into the eBPF object too; aya-build only watches ebpf/.
    println!("cargo:rerun-if-changed=../common/src");
    let ebpf = aya_build::Package {
        name: "kspan-ebpf",
        root_dir: "../ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
