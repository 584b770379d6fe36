//! Prerequisites for building the eBPF programs and running the end-to-end tests: check each one,
//! install what is missing, print one line per prerequisite.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::{command, output, run_cmd, succeeds};

/// A Debian package: (package, command that also counts as present, why it is needed).
pub type Package = (&'static str, Option<&'static str>, &'static str);

const PACKAGES: &[Package] = &[
    ("llvm-22-dev", None, "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", None, "LLVM 22 for bpf-linker"),
    ("libzstd-dev", None, "linked by bpf-linker"),
    ("zlib1g-dev", None, "linked by bpf-linker"),
    ("curl", Some("curl"), "peer of the end-to-end tests"),
    ("python3", Some("python3"), "peer of the end-to-end tests"),
    (
        "nginx",
        None,
        "HTTP/2 peer of the end-to-end tests; the application `cargo xtask bench` loads",
    ),
    (
        "nodejs",
        Some("node"),
        "runs the @grpc/grpc-js peer of the end-to-end tests",
    ),
    (
        "npm",
        Some("npm"),
        "installs tests/node (@grpc/grpc-js) for the end-to-end tests",
    ),
    (
        "kcat",
        Some("kcat"),
        "Kafka peer of the end-to-end tests (older protocol versions)",
    ),
];

/// What `cargo xtask bench` needs on top: the load generator (nginx is in `PACKAGES`).
pub const BENCH_PACKAGES: &[Package] = &[("wrk", None, "the benchmark's load generator")];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const TRACEFS: &str = "/sys/kernel/tracing";

pub fn setup() -> Result<()> {
    setup_with(&[])
}

/// `setup`, also checking (and installing) `extra` Debian packages in the same apt step.
pub fn setup_with(extra: &[Package]) -> Result<()> {
    nightly()?;
    rust_src()?;
    packages(extra)?;
    bpf_linker()?;
    python_packages()?;
    node_packages()?;
    tracefs()
}

/// Python packages the end-to-end tests import, pinned: (pip requirement, a module it provides,
/// why it is needed). Present means the module imports and `importlib.metadata` reports the
/// pinned version; any other version is replaced by the pinned one.
const PYTHON_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "opentelemetry-api==1.45.2",
        "opentelemetry.propagate",
        "the trace-context tests run an app with its own OpenTelemetry SDK",
    ),
    (
        "opentelemetry-sdk==1.45.2",
        "opentelemetry.sdk",
        "the trace-context tests run an app with its own OpenTelemetry SDK",
    ),
    (
        "grpcio==1.78.0",
        "grpc",
        "the gRPC peers of the end-to-end tests (tests/servers/grpc_*.py)",
    ),
    (
        "confluent-kafka==2.16.1",
        "confluent_kafka",
        "the Kafka peers of the end-to-end tests: librdkafka's mock broker, producer, consumer \
         (tests/servers/kafka_*.py)",
    ),
];

/// True if python3 imports `module` and the installed distribution has the pinned version.
fn python_package_present(requirement: &str, module: &str) -> bool {
    let (dist, version) = requirement
        .split_once("==")
        .expect("PYTHON_PACKAGES pins every requirement with ==");
    let probe = format!(
        "import importlib.metadata, {module}, sys; \
         sys.exit(importlib.metadata.version({dist:?}) != {version:?})"
    );
    succeeds(command("python3").args(["-c", &probe]))
}

fn python_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &(requirement, module, reason) in PYTHON_PACKAGES {
        if python_package_present(requirement, module) {
            ok(&format!("python {requirement}"));
        } else {
            installing(
                &format!("python {requirement}"),
                &format!("not importable at that version; {reason}"),
            );
            missing.push(requirement);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    run_cmd(
        command("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--root-user-action=ignore")
            .args(&missing),
    )
    .context("pip could not install the pinned Python packages of the end-to-end tests")?;
    for &(requirement, module, _) in PYTHON_PACKAGES {
        if !python_package_present(requirement, module) {
            bail!(
                "pip installed {requirement} but python3 still cannot import {module} at that \
                 version; check `python3 -m pip show {}`",
                requirement.split_once("==").map_or(requirement, |(d, _)| d)
            );
        }
    }
    Ok(())
}

/// The Node.js peers of the end-to-end tests (`tests/node`, @grpc/grpc-js) from its
/// package-lock.json: `npm ci` when `node_modules` is missing, older than the lock file, or
/// does not satisfy package.json.
fn node_packages() -> Result<()> {
    let dir = crate::root().join("tests").join("node");
    let lock = dir.join("package-lock.json");
    let installed_lock = dir.join("node_modules").join(".package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let fresh = match (modified(&installed_lock), modified(&lock)) {
        (Some(installed), Some(wanted)) => installed >= wanted,
        _ => false,
    };
    let what = "node packages of tests/node (@grpc/grpc-js)";
    if fresh && succeeds(command("npm").args(["ls", "--all", "--prefix"]).arg(&dir)) {
        ok(what);
        return Ok(());
    }
    installing(
        what,
        "tests/node/node_modules is missing, older than package-lock.json or incomplete; the \
         Node.js peers of the end-to-end tests need it",
    );
    if !succeeds(command("npm").arg("--version")) {
        bail!("npm does not run (`npm --version` fails); install the Debian package npm");
    }
    run_cmd(
        command("npm")
            .args([
                "ci",
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&dir),
    )
    .with_context(|| {
        format!(
            "npm ci in {} failed: the npm registry must be reachable, and package-lock.json \
             match package.json (regenerate it with `npm install --package-lock-only`)",
            dir.display()
        )
    })
}

fn ok(what: &str) {
    println!("ok: {what} (already present)");
}

fn installing(what: &str, reason: &str) {
    println!("installing: {what} ({reason})");
}

pub fn is_root() -> bool {
    output(command("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

fn nightly() -> Result<()> {
    // RUSTUP_AUTO_INSTALL=0: never try to download a toolchain while probing.
    let found = succeeds(
        command("rustup")
            .args(["run", "nightly", "rustc", "--version"])
            .env("RUSTUP_AUTO_INSTALL", "0"),
    );
    if !found {
        bail!(
            "the nightly Rust toolchain is missing (rustup run nightly rustc fails); the eBPF \
             programs are built with it and it cannot be downloaded on this machine: provision \
             the machine with the nightly toolchain (1.97, LLVM 22)"
        );
    }
    ok("nightly toolchain");
    Ok(())
}

fn rust_src() -> Result<()> {
    let installed = output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|list| list.lines().any(|l| l.trim() == "rust-src"));
    if installed {
        ok("rust-src");
        return Ok(());
    }
    installing("rust-src", "nightly component needed for -Z build-std=core");
    run_cmd(command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn package_installed(package: &str) -> bool {
    output(command("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn packages(extra: &[Package]) -> Result<()> {
    let mut missing = Vec::new();
    for &(package, probe, reason) in PACKAGES.iter().chain(extra) {
        let present = package_installed(package)
            || probe.is_some_and(|p| succeeds(command(p).arg("--version")));
        if present {
            ok(package);
        } else {
            installing(package, &format!("Debian package not installed; {reason}"));
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!("Debian packages missing; run as root: apt-get update && apt-get install -y {list}");
    }
    run_cmd(command("apt-get").arg("update"))?;
    run_cmd(
        command("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker() -> Result<()> {
    // `command` puts $CARGO_HOME/bin and ~/.cargo/bin on PATH, where cargo install puts it.
    let runs = || succeeds(command("bpf-linker").arg("--version"));
    if runs() {
        ok("bpf-linker");
        return Ok(());
    }
    installing(
        "bpf-linker",
        "links the eBPF programs; cargo install takes a few minutes",
    );
    run_cmd(
        crate::cargo(&[
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if !runs() {
        bail!("bpf-linker was installed but `bpf-linker --version` still fails");
    }
    Ok(())
}

/// cargo-fuzz, pinned: `cargo xtask fuzz` only (not part of `setup`).
const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// Installs cargo-fuzz at [`CARGO_FUZZ_VERSION`] unless that version runs; checks the nightly
/// toolchain the fuzz targets build with.
pub fn cargo_fuzz() -> Result<()> {
    nightly()?;
    // `command` puts $CARGO_HOME/bin and ~/.cargo/bin on PATH, where cargo install puts it.
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let runs =
        || output(command("cargo-fuzz").arg("--version")).is_some_and(|v| v.trim() == wanted);
    if runs() {
        ok(&wanted);
        return Ok(());
    }
    installing(
        &wanted,
        "runs the fuzz targets of agent/fuzz; cargo install takes a few minutes",
    );
    run_cmd(&mut crate::cargo(&[
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))?;
    if !runs() {
        bail!("cargo-fuzz was installed but `cargo-fuzz --version` is not `{wanted}`");
    }
    Ok(())
}

fn tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        ok("tracefs");
        return Ok(());
    }
    installing("tracefs", &format!("not mounted at {TRACEFS}; mounting it"));
    if !is_root() {
        bail!("tracefs is not mounted; run as root: mount -t tracefs nodev {TRACEFS}");
    }
    run_cmd(command("mount").args(["-t", "tracefs", "nodev", TRACEFS]))
        .context("the end-to-end tests read tracepoint formats from tracefs")
}
