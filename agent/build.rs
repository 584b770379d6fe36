//! Builds the eBPF programs (ebpf/, nightly toolchain, bpf-linker) and leaves the object in
//! OUT_DIR, where src/probes embeds it. `cargo xtask` installs the toolchain pieces.
//!
//! What aya-build's `build_ebpf` does, with one difference: the nested cargo's target directory
//! is shared by every profile (`<target>/ebpf`) instead of living in this profile's OUT_DIR. The
//! object is always built `--release` for the BPF target, so it is the same for `build
//! --release`, `test` and `clippy`; with aya-build each of them rebuilt it, `core` included
//! (`-Z build-std`), 40-90 s apiece on the 2-core CI machine.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

const PACKAGE: &str = "kspan-ebpf";

fn main() -> Result<()> {
    // common/ is compiled into the eBPF object too.
    println!("cargo:rerun-if-changed=../ebpf");
    println!("cargo:rerun-if-changed=../common/src");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // One directory per target architecture: the object differs (`bpf_target_arch`), and a
    // shared one would be rebuilt at every switch between an x86_64 and an aarch64 build.
    let target_dir = shared_target_dir(&out_dir).join("ebpf").join(&arch);

    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        PACKAGE,
        "--bins",
    ])
    .args(["--release", "--target", target, "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    // The programs' BTF (for the verifier's messages and bpftool) and the target arch the
    // syscall argument layout depends on. Separator: 0x1f, as CARGO_ENCODED_RUSTFLAGS wants.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    )
    // The outer cargo's compiler and wrappers (clippy-driver under `cargo clippy`) are not
    // the nightly toolchain's.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("CARGO_TARGET_DIR");
    let output = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}: is rustup on PATH? (`cargo xtask setup`)"))?;
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        println!("cargo:warning={line}");
    }
    if !output.status.success() {
        bail!(
            "building the eBPF programs failed ({}); `cargo xtask setup` installs the nightly \
             toolchain with rust-src and bpf-linker",
            output.status
        );
    }
    let object = target_dir.join(target).join("release").join(PACKAGE);
    std::fs::copy(&object, out_dir.join(PACKAGE))
        .with_context(|| format!("cannot copy {}", object.display()))?;
    Ok(())
}

/// The workspace's target directory: OUT_DIR is `<target>/[<triple>/]<profile>/build/<pkg>/out`,
/// and cargo marks `<target>` with a CACHEDIR.TAG (and `<triple>` too, so the outermost one
/// within those five levels: a `--target` build such as the fuzz targets' shares the object).
/// Falls back to OUT_DIR itself (a build per profile, as before) if the layout is not the
/// expected one.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .skip(1)
        .take(5)
        .filter(|dir| dir.join("CACHEDIR.TAG").is_file())
        .last()
        .unwrap_or(out_dir)
        .to_path_buf()
}
