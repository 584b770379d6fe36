//! aarch64: kspan cross-built on this x86_64 host (Debian's gcc-aarch64-linux-gnu as linker and
//! C compiler, for mimalloc's C), its eBPF object built for the aarch64 syscall layout
//! (agent/build.rs passes the target arch), and the agent's unit tests run under qemu-user
//! (Debian's qemu-user-static; binfmt_misc is not needed: cargo's runner calls it).

use std::process::Command;

use anyhow::{Result, bail};

use crate::{cargo, command, output, run_cmd, setup};

pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// What a cross build and its tests need on top of the native build's prerequisites.
pub const PACKAGES: &[setup::Package] = &[
    (
        "gcc-aarch64-linux-gnu",
        None,
        "links kspan for aarch64 and compiles mimalloc's C",
    ),
    (
        "libc6-dev-arm64-cross",
        None,
        "the aarch64 C library kspan links against",
    ),
    (
        "qemu-user-static",
        None,
        "runs the aarch64 unit tests on this host",
    ),
];

/// Install the cross toolchain: the Debian packages and rustup's aarch64 standard library.
pub fn setup() -> Result<()> {
    setup::build_prerequisites()?;
    setup::packages(&[PACKAGES])?;
    let installed = output(command("rustup").args(["target", "list", "--installed"]))
        .is_some_and(|list| list.lines().any(|t| t.trim() == AARCH64));
    if !installed {
        run_cmd(command("rustup").args(["target", "add", AARCH64]))?;
    }
    Ok(())
}

/// `cargo ARGS --target aarch64-unknown-linux-gnu`, with the cross linker, C compiler and the
/// qemu-user runner.
pub fn cargo_for(target: &str, args: &[&str]) -> Result<Command> {
    if target != AARCH64 {
        bail!("cross builds go to {AARCH64} only, not {target}");
    }
    let mut cmd = cargo(args);
    cmd.args(["--target", AARCH64])
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        .env("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc")
        .env("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar")
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64-static -L /usr/aarch64-linux-gnu",
        );
    Ok(cmd)
}

/// The agent's unit tests for aarch64, built (`run: false`, for a warm-up) or run.
pub fn unit_tests(run: bool) -> Result<Command> {
    let mut args = vec!["test", "-p", "kspan", "--lib"];
    if !run {
        args.push("--no-run");
    }
    cargo_for(AARCH64, &args)
}
