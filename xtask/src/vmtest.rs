//! `cargo xtask vmtest`: the end-to-end tests on other kernels, in QEMU guests.
//!
//! KVM is not usable on the development machines, so guests run under QEMU's software emulation
//! (TCG). A guest boots a Debian kernel with a small busybox initramfs whose init mounts the
//! host's root over virtio-9p, read-only, under a tmpfs overlay: the host's test binaries, python
//! and curl run unchanged. The guest runs a command script (written into the cache directory,
//! which the guest sees at the same path), prints its exit status on the console and powers off.
//! QEMU itself always exits 0, so the status is read back from the console.
//!
//! Everything downloaded is kept in `$KSPAN_VMTEST_DIR` (default `/var/cache/kspan/vmtest`, which
//! survives fresh clones):
//! - `qemu/`: QEMU and busybox-static extracted from Debian packages. They are downloaded, never
//!   installed: installing qemu-system-x86 would remove the host's qemu-utils 10.x.
//! - `apt/`: a private apt configuration whose sources add the Debian suites the kernels come from.
//! - `kernels/NAME/`: `vmlinux`, `initrd.gz` and `kernel.json`, written last: a directory holding
//!   it is complete and is reused without network. Delete it to pick up a newer kernel.
//! - `run/KERNEL-PID/`: a running guest's command script and copies of the binaries it runs.
//!
//! Downloads go to temporary directories renamed into place at the end, under a lock on the cache,
//! so an interrupted or concurrent run never leaves a half-prepared kernel behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use std::{cmp, env, thread};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::setup::{self, Package};
use crate::{build, cargo, command, display, kspan_bin, output, quote, target_dir};

/// A kernel of the matrix: the newest Debian package of a family, resolved at download time.
pub struct Kernel {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// The family is every package named `{prefix}{abi}{suffix}` whose `abi` holds no `-`, which
    /// leaves out the `-rt` and `-cloud` flavours sharing the prefix. Only the standard flavours
    /// will do: the cloud ones lack 9p.
    prefix: &'static str,
    suffix: &'static str,
    /// The packages to download, `{abi}` replaced by the newest one found.
    packages: &'static [&'static str],
    /// Run by `cargo xtask test` (CI) too, not only by `cargo xtask vmtest`.
    pub in_ci: bool,
    /// Virtual CPUs of the guest: 2 where the kernel brings the second one up under icount
    /// (see `QEMU_FLAGS`); 5.10 and 6.1 (RT too) hang at "Booting SMP configuration" there.
    cpus: u8,
    /// The 9p mount's `msize` (largest message). 5.10's 9p client hands QEMU a reply buffer of
    /// the whole msize with every request (newer ones size it by the reply), and a guest makes
    /// one request per stat over this root: with 512000, a stat took 2.4 ms and `python3 -c
    /// pass` 5 s of guest time on 5.10 (0.15 ms and 0.95 s with 16384; 6.1 and 7.2 do not care).
    /// Newer kernels keep 512000, which reads large files (kspan, node) in fewer requests.
    msize: u32,
    /// Host time of the suite in a guest of this kernel, in percent of 6.1's, to balance the
    /// guests (see `guest_seconds`): measured at 15a300f (5.10 526 s, 6.1 538 s, 6.12 600 s,
    /// 7.2 575 s); 6.1-rt estimated (its kspan stops take ~4 s of guest time instead of 0.6).
    cost: u32,
}

/// The kernels `vmtest` and `test` run the end-to-end tests on, oldest first.
pub const MATRIX: &[Kernel] = &[
    // bullseye(-security)
    Kernel {
        name: "5.10",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        packages: &["linux-image-5.10.0-{abi}-amd64-unsigned"],
        in_ci: true,
        cpus: 1,
        msize: 16384,
        cost: 98,
    },
    // bookworm(-security)
    Kernel {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        packages: &["linux-image-6.1.0-{abi}-amd64-unsigned"],
        in_ci: true,
        cpus: 1,
        msize: 512000,
        cost: 100,
    },
    Kernel {
        name: "6.1-rt",
        prefix: "linux-image-6.1.0-",
        suffix: "-rt-amd64-unsigned",
        packages: &["linux-image-6.1.0-{abi}-rt-amd64-unsigned"],
        in_ci: false,
        cpus: 1,
        msize: 512000,
        cost: 140,
    },
    // bookworm-security (+deb12) and trixie (+deb13) both carry it.
    Kernel {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "-amd64-unsigned",
        packages: &["linux-image-6.12.{abi}-amd64-unsigned"],
        in_ci: true,
        cpus: 2,
        msize: 512000,
        cost: 112,
    },
    // sid: newer Debian packaging splits the image (linux-binary-*), the modules, and the
    // modules.builtin list and config (linux-base-*).
    Kernel {
        name: "7.2",
        prefix: "linux-binary-unsigned-7.2.",
        suffix: "-amd64",
        packages: &[
            "linux-binary-unsigned-7.2.{abi}-amd64",
            "linux-modules-7.2.{abi}-amd64",
            "linux-base-7.2.{abi}-amd64",
        ],
        in_ci: true,
        cpus: 2,
        msize: 512000,
        cost: 107,
    },
];

/// Debian packages `vmtest` needs on the host, checked by `setup`: decompressors for the kernels
/// and modules (gzip is essential), the key that verifies the kernels.
pub const PACKAGES: &[Package] = &[
    (
        "xz-utils",
        Some("xz"),
        "decompresses kernels for the QEMU guests",
    ),
    (
        "zstd",
        Some("zstd"),
        "decompresses kernels for the QEMU guests",
    ),
    (
        "debian-archive-keyring",
        None,
        "verifies the kernels for the QEMU guests",
    ),
];

/// `--kernel NAME`: a kernel of the matrix, or an error listing them.
pub fn parse_kernel(name: &str) -> Result<&'static Kernel, String> {
    MATRIX.iter().find(|k| k.name == name).ok_or_else(|| {
        let names: Vec<&str> = MATRIX.iter().map(|k| k.name).collect();
        format!(
            "no kernel `{name}` in the matrix; choose among {}",
            names.join(", ")
        )
    })
}

/// Modules the guest's init loads (with their dependencies) to mount the host's root.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
const DEFAULT_CACHE: &str = "/var/cache/kspan/vmtest";
/// A guest that runs longer is killed (`KSPAN_VMTEST_TIMEOUT=SECS` changes it): a whole
/// kernel's suite in one guest takes ~10 minutes on an idle CI machine, twice that on a loaded one.
const DEFAULT_TIMEOUT_SECS: u64 = 30 * 60;
/// The e2e harness's deadlines stretch by this in the guests (`KSPAN_E2E_TIME_SCALE`): software
/// emulation is 5-15x slower, and on 6.1-rt the kernel takes ~20 s to detach kspan's 29
/// tracepoints (docs/architecture.md, "Kernels").
const GUEST_TIME_SCALE: u32 = 5;
/// Marks a complete directory in the cache; written last.
const QEMU_DONE: &str = "packages.txt";
const KERNEL_DONE: &str = "kernel.json";
/// The Debian suites the private apt configuration adds: (archive, suite).
const SUITES: &[(&str, &str)] = &[
    ("debian", "bullseye"),
    ("debian-security", "bullseye-security"),
    ("debian", "bookworm"),
    ("debian-security", "bookworm-security"),
    ("debian", "bookworm-backports"),
    ("debian", "trixie"),
    ("debian", "sid"),
];
pub(crate) const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Options {
    /// Empty: the whole matrix.
    pub kernels: Vec<&'static Kernel>,
    /// Guests run at once.
    pub jobs: usize,
    /// Run this shell command in the guests instead of the tests.
    pub run: Option<String>,
    /// Passed to every test binary.
    pub test_args: Vec<String>,
}

/// `cargo xtask vmtest`.
pub fn vmtest(options: &Options) -> Result<()> {
    let mut kernels: Vec<&'static Kernel> = Vec::new();
    for &kernel in &options.kernels {
        if !kernels.iter().any(|k| k.name == kernel.name) {
            kernels.push(kernel);
        }
    }
    if kernels.is_empty() {
        kernels = MATRIX.iter().collect();
    }
    setup::setup_with(PACKAGES)?;
    build(false)?;
    let binaries;
    let command = match &options.run {
        Some(shell) => GuestCommand::Shell(shell),
        None => {
            binaries = e2e_binaries()?;
            GuestCommand::Tests {
                binaries: &binaries,
                args: &options.test_args,
            }
        }
    };
    run_matrix(&kernels, &command, options.jobs)
}

/// An end-to-end test binary, built by cargo.
#[derive(Clone)]
pub struct TestBinary {
    pub executable: PathBuf,
    /// Its package's directory: cargo runs test binaries there.
    pub package_dir: PathBuf,
    /// What cargo shows for it, like `tests/http1.rs`.
    pub source: String,
}

impl TestBinary {
    /// `http1` for `tests/http1.rs`, `lib` for `src/lib.rs`.
    fn stem(&self) -> &str {
        Path::new(&self.source)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("tests")
    }
}

/// Cargo's selection of the end-to-end tests: every integration test (`tests/tests/*.rs`, the
/// workspace's only `[[test]]` targets), without the harness's own unit tests (`tests/src`), which
/// do not depend on the kernel and run with the unit tests. `--workspace` resolves dependency
/// features as `cargo xtask test`'s unit-test step does (`--workspace --lib --bins`), so the
/// dependencies built there are reused, not built again with the e2e crate's features alone.
pub const E2E_SELECTION: &[&str] = &["--workspace", "--test", "*"];

/// Build the end-to-end test binaries without running them.
pub fn e2e_binaries() -> Result<Vec<TestBinary>> {
    // json-render-diagnostics: warnings still reach the terminal, the artifacts come as JSON.
    let mut args = vec!["test"];
    args.extend_from_slice(E2E_SELECTION);
    args.extend(["--no-run", "--message-format=json-render-diagnostics"]);
    let mut cmd = cargo(&args);
    let shown = display(&cmd);
    println!("$ {shown}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let binaries = parse_test_artifacts(&String::from_utf8_lossy(&out.stdout))?;
    if binaries.is_empty() {
        bail!("`{shown}` built no test binary");
    }
    Ok(binaries)
}

/// The test executables in cargo's JSON messages.
pub(crate) fn parse_test_artifacts(json_lines: &str) -> Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for line in json_lines.lines().filter(|l| l.starts_with('{')) {
        let message: Value = serde_json::from_str(line).context("cargo printed invalid JSON")?;
        let is_test =
            message["reason"] == "compiler-artifact" && message["profile"]["test"] == true;
        let (Some(executable), Some(manifest)) = (
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        if !is_test {
            continue;
        }
        let package_dir = Path::new(manifest).parent().unwrap_or(Path::new("/"));
        let src = Path::new(message["target"]["src_path"].as_str().unwrap_or(executable));
        binaries.push(TestBinary {
            executable: executable.into(),
            package_dir: package_dir.to_path_buf(),
            source: src
                .strip_prefix(package_dir)
                .unwrap_or(src)
                .display()
                .to_string(),
        });
    }
    Ok(binaries)
}

/// What a guest runs.
#[derive(Clone, Copy)]
pub enum GuestCommand<'a> {
    /// Every binary, one after the other, with `--test-threads=1` and `args`.
    Tests {
        binaries: &'a [TestBinary],
        args: &'a [String],
    },
    /// A shell command line, in the current directory.
    Shell(&'a str),
}

/// One guest's work: a kernel of the run and what the guest runs.
struct Unit<'a> {
    /// Index into the run's kernels.
    kernel: usize,
    /// Names the guest in headers, the summary, its log and its run directory: `6.1`, or
    /// `6.1-http1` when the kernel's tests are split over several guests.
    label: String,
    command: GuestCommand<'a>,
}

/// Boot each kernel (at most `jobs` guests at once) and run `command` in it; print a summary,
/// fail if the command failed on any kernel. With more than one job, the longest guests go first,
/// so the slots stay busy to the end; with fewer kernels than jobs, each kernel's test binaries
/// are split over enough guests of about equal length to fill the slots.
pub fn run_matrix(kernels: &[&'static Kernel], command: &GuestCommand, jobs: usize) -> Result<()> {
    let cache = Cache::open()?;
    let (qemu, prepared) = {
        let _lock = cache.lock()?;
        let qemu = cache.qemu()?;
        let mut apt = Apt::new(&cache.dir);
        let prepared: Vec<Result<Prepared>> = kernels
            .iter()
            .map(|&k| cache.kernel(k, &qemu, &mut apt))
            .collect();
        (qemu, prepared)
    };

    // Guests per kernel: as many as fill the slots. With at least as many kernels as slots (CI:
    // four kernels, two slots) one guest runs a kernel's whole suite: every guest boots and
    // warms its page cache through 9p (~15 s of host time), and suites of about equal length
    // balance the slots by themselves, longest first. One kernel with `--jobs 2` is split over
    // two guests of about equal length.
    let per_kernel = jobs.div_ceil(kernels.len().max(1));
    let groups = match *command {
        GuestCommand::Tests { binaries, .. } if per_kernel > 1 => {
            split_binaries(binaries, per_kernel)
        }
        GuestCommand::Tests { binaries, .. } => vec![binaries.to_vec()],
        _ => Vec::new(),
    };
    // (unit, expected seconds)
    let mut units: Vec<(Unit, u32)> = Vec::new();
    for (i, kernel) in kernels.iter().enumerate() {
        match *command {
            GuestCommand::Tests { args, .. } => {
                for group in &groups {
                    let stems: Vec<&str> = group.iter().map(TestBinary::stem).collect();
                    let seconds: u32 = stems.iter().map(|s| guest_seconds(s)).sum();
                    let label = if groups.len() > 1 {
                        format!("{}-{}", kernel.name, stems.join("+"))
                    } else {
                        kernel.name.to_string()
                    };
                    units.push((
                        Unit {
                            kernel: i,
                            label,
                            command: GuestCommand::Tests {
                                binaries: group,
                                args,
                            },
                        },
                        seconds * kernel.cost / 100,
                    ));
                }
            }
            command => units.push((
                Unit {
                    kernel: i,
                    label: kernel.name.to_string(),
                    command,
                },
                0,
            )),
        }
    }
    // The longest guests first (stable: equal ones keep their order); one at a time, the
    // kernels' order.
    if jobs > 1 {
        units.sort_by_key(|(_, weight)| cmp::Reverse(*weight));
    }
    let units: Vec<Unit> = units.into_iter().map(|(unit, _)| unit).collect();

    let jobs = jobs.clamp(1, units.len().max(1));
    // Per unit: how long it took and how it went.
    type Outcome = Mutex<Option<(Duration, Result<()>)>>;
    let results: Vec<Outcome> = units.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let print = Mutex::new(());
    // With one job the console streams live; with more, each guest's console is printed whole
    // when it ends, so outputs do not interleave.
    let live = jobs == 1;
    thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(unit) = units.get(i) else { break };
                    let start = Instant::now();
                    let result = match &prepared[unit.kernel] {
                        Ok(prepared) => matrix_guest(&cache, &qemu, prepared, unit, live, &print),
                        Err(err) => Err(anyhow::anyhow!("{err:#}")),
                    };
                    if let Err(err) = &result {
                        let _guard = print.lock();
                        eprintln!("error: linux {}: {err:#}", unit.label);
                    }
                    *results[i].lock().unwrap() = Some((start.elapsed(), result));
                }
            });
        }
    });

    println!("\n==> vmtest summary");
    let mut failed = Vec::new();
    for (unit, result) in units.iter().zip(results) {
        let (took, result) = result.into_inner().unwrap().expect("every guest ran");
        let release = prepared[unit.kernel]
            .as_ref()
            .map_or("-", |p| p.release.as_str());
        let status = if result.is_ok() { "ok" } else { "FAILED" };
        let secs = took.as_secs_f64();
        println!(
            "  {status:<7} linux {:<16} {release:<24} {secs:>8.1}s",
            unit.label
        );
        if result.is_err() {
            failed.push(unit.label.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("failed on linux {}", failed.join(", "));
    }
    Ok(())
}

/// About how long a test binary's suite takes in a guest, in seconds of host time (a guest is
/// one emulation thread, one core), to balance the guests; binaries not listed count as short.
/// Measured on 6.12 and 7.2 (QEMU's CPU time per binary; guest time for otlp and http2, scaled
/// like http1's) at 10c5852, without the ~5 s of the harness resolving python3 through a pyenv
/// shim (the guests now get it from the host, `ScriptEnv::python`). kafka: 29 s of guest time on
/// 6.12 against http1's 43 (18 against 25 on 5.10), a first measurement of a suite still being
/// written.
fn guest_seconds(stem: &str) -> u32 {
    match stem {
        "context" => 170,
        "grpc" => 150,
        "http1" => 110,
        "kafka" => 80,
        "otlp" => 45,
        "http2" => 22,
        "terminal" => 25,
        _ => 10,
    }
}

/// The binaries in `jobs` groups of about equal length: the longest first, each into the group
/// that is shortest so far.
fn split_binaries(binaries: &[TestBinary], jobs: usize) -> Vec<Vec<TestBinary>> {
    let mut sorted: Vec<&TestBinary> = binaries.iter().collect();
    sorted.sort_by_key(|b| cmp::Reverse(guest_seconds(b.stem())));
    let mut groups: Vec<(u32, Vec<TestBinary>)> = vec![(0, Vec::new()); jobs];
    for binary in sorted {
        let shortest = groups
            .iter_mut()
            .min_by_key(|(seconds, _)| *seconds)
            .expect("jobs > 0");
        shortest.0 += guest_seconds(binary.stem());
        shortest.1.push(binary.clone());
    }
    groups
        .into_iter()
        .map(|(_, group)| group)
        .filter(|group| !group.is_empty())
        .collect()
}

/// One guest of the matrix, with a header; its console is printed whole at its end unless `live`.
/// `print` serializes the output of parallel guests.
fn matrix_guest(
    cache: &Cache,
    qemu: &Qemu,
    prepared: &Prepared,
    unit: &Unit,
    live: bool,
    print: &Mutex<()>,
) -> Result<()> {
    let (label, release) = (&unit.label, &prepared.release);
    let log = log_path(label);
    if live {
        println!("\n==> linux {label} ({release})");
        return guest(cache, qemu, prepared, label, &unit.command, true);
    }
    {
        let _guard = print.lock();
        println!("\n==> linux {label}: booting, console in {}", log.display());
    }
    let result = guest(cache, qemu, prepared, label, &unit.command, false);
    let _guard = print.lock();
    println!("\n==> linux {label} ({release}): console");
    let mut out = io::stdout().lock();
    let _ = out.write_all(&fs::read(&log).unwrap_or_default());
    let _ = out.flush();
    result
}

fn log_path(label: &str) -> PathBuf {
    target_dir().join("vmtest").join(format!("{label}.log"))
}

/// Run `command` in a guest of the prepared kernel; Ok if it exited 0.
fn guest(
    cache: &Cache,
    qemu: &Qemu,
    kernel: &Prepared,
    label: &str,
    command: &GuestCommand,
    live: bool,
) -> Result<()> {
    let run = RunDir::create(&cache.dir.join("run"), label)?;
    // The guest runs copies of the binaries: cargo may rebuild them on the host during the
    // minutes the tests take, and a binary rewritten under the guest's 9p mount (cache=loose) can
    // be read torn, crashing with SIGILL or SIGSEGV.
    let mut env = ScriptEnv::of_host()?;
    env.kspan_bin = run.copy(&env.kspan_bin)?;
    let copies;
    let command = match command {
        GuestCommand::Tests { binaries, args } => {
            copies = binaries
                .iter()
                .map(|b| {
                    Ok(TestBinary {
                        executable: run.copy(&b.executable)?,
                        package_dir: b.package_dir.clone(),
                        source: b.source.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            GuestCommand::Tests {
                binaries: &copies,
                args,
            }
        }
        GuestCommand::Shell(shell) => GuestCommand::Shell(shell),
    };
    let script = run.dir.join("command.sh");
    fs::write(&script, guest_script(&command, &env))
        .with_context(|| format!("cannot write {}", script.display()))?;
    let log = log_path(label);
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match boot(qemu, kernel, &script, &log, live)? {
        0 => Ok(()),
        status => {
            let what = match command {
                GuestCommand::Tests { .. } => "the tests failed",
                GuestCommand::Shell(_) => "the command failed",
            };
            bail!(
                "{what} in the guest (exit status {status}); console in {}",
                log.display()
            )
        }
    }
}

/// A guest's directory in the cache (`run/KERNEL-PID`): its command script and binaries. Removed
/// when dropped; one left by a killed run is removed by the next.
pub(crate) struct RunDir {
    pub(crate) dir: PathBuf,
}

impl RunDir {
    pub(crate) fn create(parent: &Path, label: &str) -> Result<RunDir> {
        for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('-').next().unwrap_or_default();
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = parent.join(format!("{label}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(RunDir { dir })
    }

    pub(crate) fn copy(&self, file: &Path) -> Result<PathBuf> {
        let to = self
            .dir
            .join(file.file_name().context("a binary has no file name")?);
        fs::copy(file, &to)
            .with_context(|| format!("cannot copy {} to {}", file.display(), to.display()))?;
        Ok(to)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The guest's command script

/// What the guest's command script takes from the host's environment.
struct ScriptEnv {
    path: String,
    home: String,
    cwd: PathBuf,
    kspan_bin: PathBuf,
    /// The host's `RUST_LOG`, if set: kspan's debug logs from a guest without editing the script.
    rust_log: Option<String>,
    /// The Python interpreter the harness runs its helpers with (`KSPAN_E2E_PYTHON`), resolved
    /// on the host. Without it, every test binary in a guest resolves it itself by running
    /// `python3` through PATH, a pyenv shim here: ~0.95 s of guest time (~5 s of host time) per
    /// binary and guest, against ~0.45 s for the interpreter itself.
    /// The guest sees the host's root, so the host's answer is the guest's.
    python: Option<String>,
}

impl ScriptEnv {
    fn of_host() -> Result<ScriptEnv> {
        let var = |name| env::var_os(name).unwrap_or_default().display().to_string();
        Ok(ScriptEnv {
            path: var("PATH"),
            home: var("HOME"),
            cwd: env::current_dir().context("cannot read the current directory")?,
            kspan_bin: kspan_bin(),
            rust_log: env::var("RUST_LOG").ok(),
            python: host_python(),
        })
    }
}

/// `KSPAN_E2E_PYTHON` if set, else what the harness would resolve (`kspan_e2e::python`):
/// `python3` on PATH asked for `sys.executable`, canonicalized. None if that fails: the guests'
/// harness then resolves it itself and reports what is wrong.
fn host_python() -> Option<String> {
    if let Some(python) = env::var_os("KSPAN_E2E_PYTHON").filter(|p| !p.is_empty()) {
        return Some(python.display().to_string());
    }
    let mut cmd = command("python3");
    cmd.args(["-c", "import sys; print(sys.executable)"]);
    let printed = output(&mut cmd)?;
    let path = fs::canonicalize(printed.trim()).ok()?;
    Some(path.display().to_string())
}

/// The bash script the guest runs: the host's PATH and HOME, then the tests (each binary, even
/// after one failed, exiting with the last failure's status) or the shell command.
fn guest_script(command: &GuestCommand, env: &ScriptEnv) -> String {
    let path = |p: &Path| quote(&p.display().to_string());
    let mut script = format!(
        "# generated by cargo xtask vmtest\nexport PATH={} HOME={} KSPAN_BIN={} \
         KSPAN_E2E_TIME_SCALE={GUEST_TIME_SCALE}\n",
        quote(&env.path),
        quote(&env.home),
        path(&env.kspan_bin)
    );
    if let Some(rust_log) = &env.rust_log {
        script.push_str(&format!("export RUST_LOG={}\n", quote(rust_log)));
    }
    if let Some(python) = &env.python {
        script.push_str(&format!("export KSPAN_E2E_PYTHON={}\n", quote(python)));
    }
    match command {
        GuestCommand::Tests { binaries, args } => {
            // Each binary's guest time (see QEMU_FLAGS), for `guest_seconds`: /proc/uptime in
            // hundredths, read by shell builtins (no program loaded through 9p).
            script.push_str(
                "status=0\n\
                 uptime_cs() { local up; read -r up _ </proc/uptime; echo $((10#${up/./})); }\n",
            );
            for binary in *binaries {
                let exe = path(&binary.executable);
                let banner = format!(
                    "Running {} ({})",
                    binary.source,
                    binary.executable.display()
                );
                let mut run = format!("{exe} --test-threads=1");
                for arg in *args {
                    run.push(' ');
                    run.push_str(&quote(arg));
                }
                script.push_str(&format!(
                    "echo; echo {}\nstart=$(uptime_cs)\ncd {} && {run} || status=$?\n\
                     took=$(( $(uptime_cs) - start ))\n\
                     printf 'vmtest: %s took %d.%02d s of guest time\\n' {} \
                     $((took / 100)) $((took % 100))\n",
                    quote(&banner),
                    path(&binary.package_dir),
                    quote(&binary.source),
                ));
            }
            script.push_str("exit $status\n");
        }
        GuestCommand::Shell(shell) => {
            script.push_str(&format!("cd {} || exit 125\n{shell}\n", path(&env.cwd)));
        }
    }
    script
}

// ---------------------------------------------------------------------------------------------
// Booting

/// The guest's PID 1: mount the host's root (read-only, 9p) under a tmpfs overlay, switch to it,
/// run the script named by `vmtest=` on the kernel command line, report its status, power off.
/// While the power-off runs, PID 1 waits in a loop of shell builtins: exec'ing `sleep` from the
/// host's root fails as 9p shuts down, and PID 1 exiting panics the kernel (a noisy dump).
pub(crate) const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
S=$(sed -n 's/.*vmtest=\([^ ]*\).*/\1/p' /proc/cmdline)
M=$(sed -n 's/.*vmtest_msize=\([0-9]*\).*/\1/p' /proc/cmdline)
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "VMTEST: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=$M,cache=loose host /lower ||
  { echo "VMTEST: cannot mount the host root over 9p"; poweroff -f; }
mount -t tmpfs -o size=75% tmp /upper; mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot ||
  { echo "VMTEST: overlay failed, the root is read-only"; mount --move /lower /newroot; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
cd /newroot; mount -t tmpfs run run; mount -t tracefs tracefs sys/kernel/tracing
mount -t bpf bpf sys/fs/bpf; mount -t cgroup2 cgroup2 sys/fs/cgroup
mkdir -p dev/pts dev/shm; mount -t devpts devpts dev/pts; mount -t tmpfs shm dev/shm; cd /
ip link set lo up; hostname vmtest
[ -n "$S" ] || S=/dev/null
exec switch_root /newroot /bin/sh -c "/bin/bash $S </dev/null; printf '\\nVMTEST_EXIT=%s\\n' \$?; echo o >/proc/sysrq-trigger; while :; do :; done"
"#;

/// QEMU's flags but the kernel's: software emulation (KVM is not usable here) of a CPU with every
/// feature, the console on stdio, the host's root shared read-only.
/// - `thread=single`: with QEMU 7.2's multi-threaded TCG, a vCPU can run a stale int3 after the
///   kernel patched its text (as kspan attaches tracepoints), an `Oops: int3` that panics the
///   guest. One host thread for both vCPUs ran the e2e suite as fast here.
/// - `-icount shift=1`: guest time advances 2 ns per emulated instruction, so a program spans
///   as many timer ticks as on real hardware (while every vCPU is idle, guest time follows the
///   host's clock, QEMU's default `sleep=on`, and the guest's core is free: ~16% of a 7.2
///   guest's time, mostly kspan's stops). On the host's clock an emulated program runs some 50
///   times longer against the tick, and what is rare on hardware became common: on 7.2, whose
///   syscall tracepoint programs are preemptible, tasks were preempted inside kspan's programs
///   and the kernel skipped 10-20 program runs per concurrent test; cross-process links raced;
///   on 6.1-rt with two vCPUs each RCU grace period took ~0.7 s and kspan's stop (29 detaches,
///   each waiting for one under a mutex) 22 s. Suites also run faster (6.12 and 7.2 together:
///   6.5 minutes instead of 9).
/// - `-display none` rather than `-nographic`, with which SeaBIOS resets and clears the terminal
///   through the serial console.
const QEMU_FLAGS: &str = "-accel tcg,thread=single -icount shift=1 -cpu max -m 4G -display none \
    -nodefaults -no-reboot -serial mon:stdio \
    -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap";

/// Boot the kernel with `script` as the guest's command; its exit status. The console goes to
/// `log`, and to stdout too when `live`.
fn boot(qemu: &Qemu, kernel: &Prepared, script: &Path, log: &Path, live: bool) -> Result<i32> {
    let timeout = guest_timeout()?;
    let script = script.to_str().filter(|s| !s.contains(char::is_whitespace));
    let Some(script) = script else {
        bail!(
            "the cache path must not contain spaces (it goes on the kernel command line): set KSPAN_VMTEST_DIR"
        );
    };
    let log_file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let (reader, writer) = io::pipe().context("cannot create a pipe for the console")?;
    let child = {
        let mut cmd = qemu.command();
        cmd.args(QEMU_FLAGS.split_whitespace())
            .arg("-smp")
            .arg(kernel.kernel.cpus.to_string())
            .arg("-kernel")
            .arg(kernel.dir.join("vmlinux"))
            .arg("-initrd")
            .arg(kernel.dir.join("initrd.gz"))
            .arg("-append")
            // rcu_expedited: every kspan stop detaches 29 tracepoints, each waiting under a
            // mutex for RCU grace periods, and an idle guest waits for them in host time: 2.0 s
            // per stop on 6.12, 0.85 s expedited (~55 stops per suite). Only the kernel's RCU
            // latency changes; nothing kspan relies on.
            .arg(format!(
                "console=ttyS0 quiet panic=-1 rcupdate.rcu_expedited=1 vmtest_msize={} \
                 vmtest={script}",
                kernel.kernel.msize
            ))
            .stdin(Stdio::null())
            .stdout(
                writer
                    .try_clone()
                    .context("cannot duplicate the console pipe")?,
            )
            .stderr(writer);
        let shown = display(&cmd);
        println!("$ {shown}");
        cmd.spawn()
            .with_context(|| format!("cannot start `{shown}`"))?
        // `cmd` drops here with our ends of the pipe: the reader sees EOF when QEMU exits.
    };

    watch_guest(
        child,
        reader,
        log_file,
        live,
        timeout,
        log,
        "the host's root",
    )
}

/// Copy a running guest's console (its QEMU's stdout and stderr, `reader`) to `log_file` (and
/// to stdout when `live`), kill it past `timeout`, and return the exit status its command
/// reported. `root`: what the guest mounts as its root, for the error when it never reports.
pub(crate) fn watch_guest(
    mut child: std::process::Child,
    mut reader: io::PipeReader,
    mut log_file: File,
    live: bool,
    timeout: Duration,
    log: &Path,
    root: &str,
) -> Result<i32> {
    let console = thread::spawn(move || -> io::Result<ExitScanner> {
        let mut scanner = ExitScanner::default();
        let mut buf = [0u8; 8192];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Ok(scanner);
            }
            log_file.write_all(&buf[..n])?;
            if live {
                let mut out = io::stdout().lock();
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            scanner.feed(&buf[..n]);
        }
    });
    let deadline = Instant::now() + timeout;
    let timed_out = loop {
        if child.try_wait().context("cannot wait for QEMU")?.is_some() {
            break false;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let scanner = console
        .join()
        .expect("the console thread does not panic")
        .context("cannot copy the guest's console")?;
    if timed_out {
        bail!(
            "the guest did not finish within {} s and was killed (KSPAN_VMTEST_TIMEOUT=SECS \
             changes the limit); console in {}",
            timeout.as_secs(),
            log.display()
        );
    }
    match (scanner.status, scanner.panic) {
        (Some(status), _) => Ok(status),
        (None, Some(panic)) => bail!(
            "the guest kernel panicked ({panic}); console in {}",
            log.display()
        ),
        (None, None) => bail!(
            "the guest powered off without reporting the command's exit status (it did not \
             boot, or could not mount {root}); console in {}",
            log.display()
        ),
    }
}

pub(crate) fn guest_timeout() -> Result<Duration> {
    match env::var("KSPAN_VMTEST_TIMEOUT") {
        Ok(secs) => secs
            .trim()
            .parse()
            .map(Duration::from_secs)
            .with_context(|| format!("KSPAN_VMTEST_TIMEOUT={secs:?} is not a number of seconds")),
        Err(_) => Ok(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
    }
}

/// Finds the guest's `VMTEST_EXIT=N` line, or the kernel's panic message, in console output
/// arriving in arbitrary chunks.
#[derive(Default)]
pub(crate) struct ExitScanner {
    line: Vec<u8>,
    pub(crate) status: Option<i32>,
    pub(crate) panic: Option<String>,
}

impl ExitScanner {
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if byte == b'\n' {
                if let Some(status) = exit_line(&self.line) {
                    self.status = Some(status);
                }
                let line = String::from_utf8_lossy(&self.line);
                if self.panic.is_none()
                    && let Some(at) = line.find("Kernel panic - not syncing")
                {
                    self.panic = Some(line[at..].trim_end().to_string());
                }
                self.line.clear();
            } else if self.line.len() < 256 {
                // The lines looked for are short; longer ones need not be kept whole.
                self.line.push(byte);
            }
        }
    }
}

fn exit_line(line: &[u8]) -> Option<i32> {
    let line = std::str::from_utf8(line).ok()?.trim_matches('\r');
    line.strip_prefix("VMTEST_EXIT=")?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The cache: QEMU and busybox

pub(crate) struct Cache {
    pub(crate) dir: PathBuf,
}

impl Cache {
    pub(crate) fn open() -> Result<Cache> {
        let dir = env::var_os("KSPAN_VMTEST_DIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_CACHE), PathBuf::from);
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        fs::create_dir_all(&dir).with_context(|| {
            format!(
                "cannot create the vmtest cache {}: run as root, or set KSPAN_VMTEST_DIR to a \
                 writable directory",
                dir.display()
            )
        })?;
        Ok(Cache { dir })
    }

    /// Held while the cache is filled, so concurrent runs do not download the same files.
    pub(crate) fn lock(&self) -> Result<File> {
        let path = self.dir.join("lock");
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        if file.try_lock().is_err() {
            println!(
                "vmtest: waiting for another run to finish filling {}",
                self.dir.display()
            );
            file.lock()
                .with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Ok(file)
    }

    /// An empty temporary directory for building `name`; one left by an interrupted run (we hold
    /// the lock, so no other run uses it) is removed first.
    pub(crate) fn scratch(&self, name: &str) -> Result<PathBuf> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(tmp)
    }

    /// QEMU and busybox, downloaded and extracted on first use.
    fn qemu(&self) -> Result<Qemu> {
        let dir = self.dir.join("qemu");
        let qemu = Qemu::in_dir(&dir);
        if dir.join(QEMU_DONE).is_file() {
            if let Some(version) = qemu.version() {
                println!("vmtest: {version} (cached in {})", dir.display());
                return Ok(qemu);
            }
            println!(
                "vmtest: the cached QEMU in {} does not run; fetching it again",
                dir.display()
            );
        }
        let start = Instant::now();
        let tmp = self.scratch("qemu")?;
        let debs = tmp.join("debs");
        fs::create_dir_all(&debs)?;
        let mut packages = qemu_packages()?;
        packages.push("busybox-static".into());
        println!(
            "vmtest: downloading {} Debian packages for QEMU and busybox",
            packages.len()
        );
        let mut download = Command::new("apt-get");
        download
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(&packages)
            .current_dir(&debs);
        run_quiet(&mut download)?;
        let staged = Qemu::in_dir(&tmp);
        let busybox_root = tmp.join("busybox-root");
        fs::create_dir_all(&staged.root)?;
        fs::create_dir_all(&busybox_root)?;
        let files = files_with_extension(&debs, "deb")?;
        for deb in &files {
            let name = deb.file_name().unwrap_or_default().to_string_lossy();
            let into = if name.starts_with("busybox") {
                &busybox_root
            } else {
                &staged.root
            };
            dpkg_extract(deb, into)?;
        }
        fs::rename(busybox_root.join("bin/busybox"), &staged.busybox)
            .context("busybox-static holds no bin/busybox")?;
        let size = total_size(&files);
        fs::remove_dir_all(&debs)?;
        fs::remove_dir_all(&busybox_root)?;
        fs::write(tmp.join(QEMU_DONE), packages.join("\n") + "\n")?;
        replace_dir(&tmp, &dir)?;
        let Some(version) = qemu.version() else {
            bail!(
                "the QEMU extracted into {} does not run (`qemu-system-x86_64 --version` fails): \
                 a library it needs may be missing from the host",
                dir.display()
            );
        };
        println!(
            "vmtest: {version}: {} downloaded in {:.1} s",
            megabytes(size),
            start.elapsed().as_secs_f64()
        );
        Ok(qemu)
    }
}

/// The packages `apt-get install qemu-system-x86` would install on this host: QEMU and the
/// libraries the host lacks.
fn qemu_packages() -> Result<Vec<String>> {
    let dry_run = || {
        capture(Command::new("apt-get").args([
            "install",
            "-y",
            "--no-install-recommends",
            "--dry-run",
            "qemu-system-x86",
        ]))
    };
    let plan = match dry_run() {
        Ok(plan) => plan,
        // A fresh machine may have no package lists yet.
        Err(_) if setup::is_root() => {
            crate::run_cmd(Command::new("apt-get").arg("update"))?;
            dry_run()?
        }
        Err(err) => {
            return Err(err.context("run as root, or run apt-get update as root first"));
        }
    };
    // Installed on the host, these would be missing from the plan, yet they must be extracted.
    let mut packages: Vec<String> = [
        "qemu-system-x86",
        "qemu-system-common",
        "qemu-system-data",
        "seabios",
    ]
    .map(String::from)
    .into();
    for package in parse_dry_run(&plan) {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    Ok(packages)
}

/// The packages in the `Inst` lines of `apt-get install --dry-run`.
pub(crate) fn parse_dry_run(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// QEMU extracted from Debian packages: run with its libraries and firmware.
struct Qemu {
    root: PathBuf,
    busybox: PathBuf,
}

impl Qemu {
    fn in_dir(dir: &Path) -> Qemu {
        Qemu {
            root: dir.join("root"),
            busybox: dir.join("busybox"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(self.root.join("usr/bin/qemu-system-x86_64"));
        let libs = [
            self.root.join("usr/lib/x86_64-linux-gnu"),
            self.root.join("lib/x86_64-linux-gnu"),
        ];
        cmd.env("LD_LIBRARY_PATH", env::join_paths(libs).unwrap_or_default());
        cmd.arg("-L").arg(self.root.join("usr/share/qemu"));
        cmd.arg("-L").arg(self.root.join("usr/share/seabios"));
        cmd
    }

    /// `QEMU emulator version ...`, if it runs.
    fn version(&self) -> Option<String> {
        let out = crate::output(self.command().arg("--version"))?;
        Some(out.lines().next()?.trim().to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// The cache: kernels

/// The private apt configuration: the system's own configuration, with its own sources, lists
/// and archives, so the system's sources are never touched.
struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    fn new(cache: &Path) -> Apt {
        Apt {
            dir: cache.join("apt"),
            updated: false,
        }
    }

    fn command(&self, program: &str) -> Command {
        let dir = self.dir.display();
        let mut cmd = Command::new(program);
        for option in [
            format!("Dir::Etc::sourcelist={dir}/sources.list"),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::lists={dir}/lists"),
            format!("Dir::Cache::archives={dir}/archives"),
            format!("Dir::Cache::pkgcache={dir}/pkg.bin"),
            // Empty: no source cache (100 MB); pkg.bin alone keeps apt fast.
            "Dir::Cache::srcpkgcache=".into(),
            // Downloads go to our directories, which the sandbox user _apt cannot write.
            "APT::Sandbox::User=root".into(),
        ] {
            cmd.arg("-o").arg(option);
        }
        cmd
    }

    /// Refresh the lists, at most once per run (only runs that download a kernel get here).
    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !Path::new(KEYRING).is_file() {
            bail!("{KEYRING} is missing: apt-get install debian-archive-keyring");
        }
        for sub in ["lists/partial", "archives/partial"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        let mut system_sources = String::new();
        for file in fs::read_dir("/etc/apt/sources.list.d")
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = file.path();
            if path
                .extension()
                .is_some_and(|e| e == "sources" || e == "list")
            {
                system_sources += &fs::read_to_string(&path).unwrap_or_default();
            }
        }
        system_sources += &fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        let mirror = debian_mirror(&system_sources).unwrap_or_else(|| {
            println!("vmtest: no Debian mirror in the system's apt sources; using deb.debian.org");
            "http://deb.debian.org".into()
        });
        fs::write(self.dir.join("sources.list"), sources_list(&mirror))?;
        let start = Instant::now();
        let suites: Vec<&str> = SUITES.iter().map(|s| s.1).collect();
        println!(
            "vmtest: updating the private apt lists ({}) from {mirror}",
            suites.join(", ")
        );
        run_quiet(self.command("apt-get").args(["update", "-qq"]))?;
        println!(
            "vmtest: apt lists updated in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        self.updated = true;
        Ok(())
    }
}

/// The mirror the system's apt uses for Debian: the URI of its `…/debian` archive, without that
/// last component. Reads one-line (`deb [opts] URI suite…`) and deb822 (`URIs: …`) sources.
pub(crate) fn debian_mirror(sources: &str) -> Option<String> {
    sources.lines().find_map(|line| {
        let line = line.trim();
        let uris: Vec<&str> = if let Some(uris) = line.strip_prefix("URIs:") {
            uris.split_whitespace().collect()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            let mut words = rest.split_whitespace();
            let mut word = words.next()?;
            if word.starts_with('[') {
                while !word.ends_with(']') {
                    word = words.next()?;
                }
                word = words.next()?;
            }
            vec![word]
        } else {
            return None;
        };
        uris.into_iter()
            .find_map(|uri| uri.trim_end_matches('/').strip_suffix("/debian"))
            .map(String::from)
    })
}

fn sources_list(mirror: &str) -> String {
    SUITES
        .iter()
        .map(|(archive, suite)| {
            format!("deb [signed-by={KEYRING}] {mirror}/{archive} {suite} main\n")
        })
        .collect()
}

/// A kernel in the cache, ready to boot.
struct Prepared {
    dir: PathBuf,
    /// `uname -r`.
    release: String,
    /// The matrix entry it was prepared for.
    kernel: &'static Kernel,
}

/// A Debian package picked for a kernel.
#[derive(Debug, PartialEq)]
struct Resolved {
    name: String,
    version: String,
    suite: String,
}

impl Cache {
    /// The kernel, downloaded and turned into vmlinux + initramfs on first use.
    fn kernel(&self, kernel: &'static Kernel, qemu: &Qemu, apt: &mut Apt) -> Result<Prepared> {
        let dir = self.dir.join("kernels").join(kernel.name);
        let prepared = |release: String| Prepared {
            dir: dir.clone(),
            release,
            kernel,
        };
        let info: Value = fs::read_to_string(dir.join(KERNEL_DONE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        // Changing MODULES needs the packages again; changing INIT only a new initramfs.
        if let Some(release) = info["release"].as_str()
            && info["wanted_modules"] == json!(MODULES)
        {
            let packages: Vec<String> = info["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}={}",
                        p["name"].as_str().unwrap_or("?"),
                        p["version"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            println!(
                "linux {}: cached {release} ({})",
                kernel.name,
                packages.join(", ")
            );
            if info["init"] != INIT {
                println!(
                    "linux {}: the guest's init script changed; rebuilding the initramfs",
                    kernel.name
                );
                initramfs(&dir.join("modules"), &qemu.busybox, &dir.join("initrd.gz"))?;
                let mut info = info.clone();
                info["init"] = INIT.into();
                write_atomically(
                    &dir.join(KERNEL_DONE),
                    serde_json::to_string_pretty(&info)? + "\n",
                )?;
            }
            return Ok(prepared(release.to_string()));
        }
        let release = self
            .download_kernel(kernel, qemu, apt, &dir)
            .context("cannot download and prepare the kernel")?;
        Ok(prepared(release))
    }

    fn download_kernel(
        &self,
        kernel: &Kernel,
        qemu: &Qemu,
        apt: &mut Apt,
        dir: &Path,
    ) -> Result<String> {
        let start = Instant::now();
        apt.update()?;
        let packages = resolve(kernel, apt)?;
        for p in &packages {
            println!(
                "linux {}: {} {} from {}",
                kernel.name, p.name, p.version, p.suite
            );
        }

        let tmp = self.scratch(&format!("kernel-{}", kernel.name))?;
        let debs = tmp.join("debs");
        fs::create_dir_all(&debs)?;
        let download_start = Instant::now();
        let mut download = apt.command("apt-get");
        download.args(["-q", "download"]).current_dir(&debs);
        for p in &packages {
            download.arg(format!("{}={}", p.name, p.version));
        }
        run_quiet(&mut download)?;
        let download_secs = download_start.elapsed().as_secs_f64();
        let debs = files_with_extension(&debs, "deb")?;
        let size = total_size(&debs);
        println!(
            "linux {}: downloaded {} in {download_secs:.1} s",
            kernel.name,
            megabytes(size)
        );
        let root = tmp.join("root");
        for deb in &debs {
            dpkg_extract(deb, &root)?;
        }

        let out = tmp.join("out");
        fs::create_dir_all(&out)?;
        let modules_dir = single_dir(&root, &["lib/modules", "usr/lib/modules"])?;
        let release = modules_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let vmlinuz = find_vmlinuz(&root, &modules_dir)?;
        let bzimage =
            fs::read(&vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
        // An uncompressed ELF boots directly (PVH), skipping the bzImage's own decompressor,
        // which takes seconds under TCG.
        let scratch = tmp.join("payload");
        let image = match elf_vmlinux(&bzimage, &scratch) {
            Some(elf) => {
                fs::write(out.join("vmlinux"), elf)?;
                "ELF vmlinux"
            }
            None => {
                println!(
                    "linux {}: cannot decompress the ELF image; booting the bzImage",
                    kernel.name
                );
                fs::write(out.join("vmlinux"), &bzimage)?;
                "bzImage"
            }
        };
        let modules = gather_modules(&modules_dir, &out.join("modules"))?;
        initramfs(&out.join("modules"), &qemu.busybox, &out.join("initrd.gz"))?;
        println!(
            "linux {}: {release}, {image}, modules {}",
            kernel.name,
            modules.join(" ")
        );

        let info = json!({
            "name": kernel.name,
            "release": release,
            "packages": packages.iter().map(|p| json!({
                "name": p.name, "version": p.version, "suite": p.suite,
            })).collect::<Vec<_>>(),
            "download_bytes": size,
            "download_secs": download_secs,
            "image": image,
            "wanted_modules": MODULES,
            "modules": modules,
            "init": INIT,
        });
        fs::write(
            out.join(KERNEL_DONE),
            serde_json::to_string_pretty(&info)? + "\n",
        )?;
        replace_dir(&out, dir)?;
        fs::remove_dir_all(&tmp)?;
        println!(
            "linux {}: ready in {:.1} s",
            kernel.name,
            start.elapsed().as_secs_f64()
        );
        Ok(release)
    }
}

/// The newest package family member in the private apt lists, and its companion packages.
fn resolve(kernel: &Kernel, apt: &Apt) -> Result<Vec<Resolved>> {
    let pattern = format!(
        "^{}.*{}$",
        regex_escape(kernel.prefix),
        regex_escape(kernel.suffix)
    );
    let found = capture(
        apt.command("apt-cache")
            .args(["search", "--names-only", &pattern]),
    )?;
    let Some(abi) = newest_abi(kernel, &found) else {
        bail!(
            "no package {}<ABI>{} in the apt lists ({}): the kernel may have left the archive; \
             update the matrix in xtask/src/vmtest.rs",
            kernel.prefix,
            kernel.suffix,
            apt.dir.display()
        );
    };
    let mut resolved = Vec::new();
    for template in kernel.packages {
        let name = template.replace("{abi}", &abi);
        let policy = capture(apt.command("apt-cache").args(["policy", &name]))?;
        let Some((version, suite)) = parse_policy(&policy) else {
            bail!("apt has no candidate version of {name}");
        };
        resolved.push(Resolved {
            name,
            version,
            suite,
        });
    }
    Ok(resolved)
}

/// The newest `abi` among the `apt-cache search` results of the kernel's family.
fn newest_abi(kernel: &Kernel, search: &str) -> Option<String> {
    search
        .lines()
        .filter_map(|line| line.split(" - ").next())
        .filter_map(|name| {
            name.trim()
                .strip_prefix(kernel.prefix)?
                .strip_suffix(kernel.suffix)
        })
        .filter(|abi| !abi.is_empty() && !abi.contains('-'))
        .max_by(|a, b| compare_versions(a, b))
        .map(String::from)
}

/// Orders versions by their runs of digits (numerically) and of other characters (bytewise):
/// 57 > 9, 6.12.118+deb12 > 6.12.117+deb13.
pub(crate) fn compare_versions(a: &str, b: &str) -> cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(first) = rest.chars().next() {
            let digit = first.is_ascii_digit();
            let end = rest
                .find(|c: char| c.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    let key = |(digit, run): (bool, &str)| {
        let number = if digit {
            run.trim_start_matches('0').len()
        } else {
            0
        };
        (digit, number, run.trim_start_matches('0').to_string())
    };
    runs(a)
        .into_iter()
        .map(key)
        .cmp(runs(b).into_iter().map(key))
}

/// The candidate version in `apt-cache policy PACKAGE` output, and the suite it comes from.
pub(crate) fn parse_policy(policy: &str) -> Option<(String, String)> {
    let candidate = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))?
        .trim();
    if candidate == "(none)" {
        return None;
    }
    // Version table: "     VERSION PRIORITY" then "        PRIORITY URI SUITE/COMPONENT ARCH ...".
    let mut lines = policy.lines().skip_while(|l| !l.contains("Version table:"));
    let suite = loop {
        let Some(line) = lines.next() else {
            break "?".to_string();
        };
        let words: Vec<&str> = line
            .trim_start_matches([' ', '*'])
            .split_whitespace()
            .collect();
        if words.first() == Some(&candidate) {
            let source = lines.next().unwrap_or_default();
            let suite = source.split_whitespace().nth(2).unwrap_or("?");
            break suite.split('/').next().unwrap_or("?").to_string();
        }
    };
    Some((candidate.to_string(), suite))
}

/// Escape for apt's POSIX extended regular expressions.
pub(crate) fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".+*?()[]{}|^$\\".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The one directory under any of `parents` (relative to `root`).
pub(crate) fn single_dir(root: &Path, parents: &[&str]) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    for parent in parents {
        for entry in fs::read_dir(root.join(parent))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    match dirs.as_slice() {
        [dir] => Ok(dir.clone()),
        _ => bail!(
            "expected one kernel modules directory under {} in the packages, found {dirs:?}",
            parents.join(" or ")
        ),
    }
}

/// `/boot/vmlinuz-*`, or `vmlinuz*` next to the modules in the newer split packages.
fn find_vmlinuz(root: &Path, modules_dir: &Path) -> Result<PathBuf> {
    let candidates = fs::read_dir(root.join("boot"))
        .into_iter()
        .chain(fs::read_dir(modules_dir))
        .flatten()
        .flatten()
        .map(|e| e.path());
    for path in candidates {
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        {
            return Ok(path);
        }
    }
    bail!(
        "no vmlinuz in the kernel packages (looked in /boot and {})",
        modules_dir.display()
    )
}

/// The ELF kernel compressed inside a bzImage, if a tool here can decompress it completely.
fn elf_vmlinux(bzimage: &[u8], scratch: &Path) -> Option<Vec<u8>> {
    let payload = bzimage_payload(bzimage)?;
    let tool = decompressor(payload)?;
    fs::write(scratch, payload).ok()?;
    // The exit status is ignored: xz and zstd payloads end with the image size, which the tools
    // reject as trailing garbage after decompressing everything.
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(scratch)
        .output()
        .ok()?;
    let _ = fs::remove_file(scratch);
    complete_elf(&out.stdout).then_some(out.stdout)
}

/// The compressed kernel in a bzImage, located by the x86 boot protocol (2.08+) header.
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let protocol = u16::from_le_bytes(image.get(0x206..0x208)?.try_into().ok()?);
    if protocol < 0x208 {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    image.get(start..start.checked_add(len)?)
}

/// The command that decompresses data in this format to stdout (followed by a file name).
fn decompressor(data: &[u8]) -> Option<&'static [&'static str]> {
    if data.starts_with(b"\xfd7zXZ\0") {
        Some(&["xz", "-dc"])
    } else if data.starts_with(b"\x28\xb5\x2f\xfd") {
        Some(&["zstd", "-dcq"])
    } else if data.starts_with(b"\x1f\x8b") {
        Some(&["gzip", "-dc"])
    } else {
        None
    }
}

/// A 64-bit ELF file whose section headers (at its end) are all there: not cut short.
fn complete_elf(data: &[u8]) -> bool {
    let field = |at: usize, len: usize| {
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data.get(at..at + len)?);
        Some(u64::from_le_bytes(bytes))
    };
    let (Some(shoff), Some(shentsize), Some(shnum)) =
        (field(0x28, 8), field(0x3a, 2), field(0x3c, 2))
    else {
        return false;
    };
    data.starts_with(b"\x7fELF\x02") && shnum > 0 && shoff + shentsize * shnum <= data.len() as u64
}

// ---------------------------------------------------------------------------------------------
// The initramfs

/// Decompress the modules that mount the host's root, with their dependencies, into `into`
/// (busybox insmod cannot decompress), with their load order in `into/order`. Returns the order.
pub(crate) fn gather_modules(modules_dir: &Path, into: &Path) -> Result<Vec<String>> {
    let files = module_files(modules_dir)?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|l| Some(module_name(l.rsplit('/').next()?)))
        .collect();
    fs::create_dir_all(into).with_context(|| format!("cannot create {}", into.display()))?;
    let order = load_order(MODULES, |name| match files.get(name) {
        Some(path) => {
            let ko = read_module(path)?;
            fs::write(into.join(format!("{name}.ko")), &ko)?;
            Ok(Some(depends(&ko)))
        }
        None if builtin.contains(name) => Ok(None),
        None => bail!(
            "the kernel has no module {name} and does not build it in: the guest could not mount \
             the host's root (the cloud flavours lack 9p)"
        ),
    })?;
    fs::write(into.join("order"), order.join("\n") + "\n")?;
    Ok(order)
}

/// Write the gzipped initramfs: busybox, the modules gathered in `modules`, the init script.
fn initramfs(modules: &Path, busybox: &Path, output: &Path) -> Result<()> {
    let read =
        |path: &Path| fs::read(path).with_context(|| format!("cannot read {}", path.display()));
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "dev", "proc", "sys", "mods", "lower", "upper", "newroot",
    ] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &read(busybox)?);
    let applets = capture(Command::new(busybox).arg("--list"))?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let order = read(&modules.join("order"))?;
    for name in String::from_utf8_lossy(&order).split_whitespace() {
        let ko = read(&modules.join(format!("{name}.ko")))?;
        cpio.file(&format!("mods/{name}.ko"), 0o644, &ko);
    }
    cpio.file("mods/order", 0o644, &order);
    cpio.file("init", 0o755, INIT.as_bytes());

    let partial = output.with_extension("partial");
    let file =
        File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-1n")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot start gzip")?;
    gzip.stdin
        .take()
        .expect("piped")
        .write_all(&cpio.finish())?;
    if !gzip.wait()?.success() {
        bail!("gzip failed to compress the initramfs");
    }
    fs::rename(&partial, output).with_context(|| format!("cannot write {}", output.display()))
}

/// Every module under the kernel's modules directory, by name.
fn module_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut modules = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Some(file) = path.file_name().and_then(|n| n.to_str())
                && file.contains(".ko")
            {
                modules.insert(module_name(file), path);
            }
        }
    }
    Ok(modules)
}

/// `9pnet-virtio.ko.xz` → `9pnet_virtio`: the kernel treats `-` and `_` alike in module names.
fn module_name(file: &str) -> String {
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool: &[&str] = if name.ends_with(".xz") {
        &["xz", "-dc"]
    } else if name.ends_with(".zst") {
        &["zstd", "-dcq"]
    } else if name.ends_with(".gz") {
        &["gzip", "-dc"]
    } else {
        return fs::read(path).with_context(|| format!("cannot read {name}"));
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .output()
        .with_context(|| format!("cannot start {}", tool[0]))?;
    if !out.status.success() {
        bail!(
            "{} cannot decompress {name}: {}",
            tool[0],
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The modules a module needs, from the `depends=` entry of its `.modinfo` section.
fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let value = &value[..value.iter().position(|&b| b == 0).unwrap_or(value.len())];
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(module_name)
        .collect()
}

/// `wanted` with their dependencies, each after what it needs. `deps(name)` is None for a module
/// built into the kernel (nothing to load).
fn load_order(
    wanted: &[&str],
    mut deps: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        if let Some(needed) = deps(name)? {
            for dep in needed {
                visit(&dep, deps, seen, order)?;
            }
            order.push(name.to_string());
        }
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &mut deps, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// A cpio archive in the `newc` format the kernel unpacks as initramfs.
#[derive(Default)]
pub(crate) struct Cpio {
    data: Vec<u8>,
    inode: u32,
}

impl Cpio {
    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, 2, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | permissions, 1, (0, 0), data);
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, 1, (0, 0), target.as_bytes());
    }

    pub(crate) fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, 1, (major, minor), &[]);
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        links: u32,
        (major, minor): (u32, u32),
        data: &[u8],
    ) {
        self.inode += 1;
        let name_size = name.len() as u32 + 1;
        let fields = [
            self.inode,
            mode,
            0, // uid
            0, // gid
            links,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            major,
            minor,
            name_size,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.inode = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.data
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Run with inherited stdio without echoing the (long) command; name it if it fails.
pub(crate) fn run_quiet(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Run and capture stdout; on failure the error holds stderr.
pub(crate) fn capture(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn dpkg_extract(deb: &Path, into: &Path) -> Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(into)
        .status()
        .context("cannot start dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(())
}

pub(crate) fn files_with_extension(dir: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    Ok(files)
}

pub(crate) fn write_atomically(path: &Path, contents: String) -> Result<()> {
    let partial = path.with_extension("partial");
    fs::write(&partial, contents).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Move the finished `from` to `to`, replacing an older or incomplete `to`.
pub(crate) fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        fs::remove_dir_all(to).with_context(|| format!("cannot remove {}", to.display()))?;
    }
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

pub(crate) fn total_size(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

pub(crate) fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(name: &str) -> &'static Kernel {
        parse_kernel(name).unwrap()
    }

    #[test]
    fn unknown_kernel_lists_the_matrix() {
        let err = parse_kernel("5.4").err().unwrap();
        assert!(err.contains("5.10, 6.1, 6.1-rt, 6.12, 7.2"), "{err}");
    }

    /// `apt-cache search --names-only '^linux-image-6\.1\.0-.*-amd64-unsigned$'`, shortened.
    const SEARCH_6_1: &str = "\
linux-image-6.1.0-9-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-57-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-58-rt-amd64-unsigned - Linux 6.1 for 64-bit PCs, PREEMPT_RT
linux-image-6.1.0-57-rt-amd64-unsigned - Linux 6.1 for 64-bit PCs, PREEMPT_RT
";

    #[test]
    fn newest_abi_skips_other_flavours() {
        assert_eq!(newest_abi(kernel("6.1"), SEARCH_6_1).as_deref(), Some("57"));
        assert_eq!(
            newest_abi(kernel("6.1-rt"), SEARCH_6_1).as_deref(),
            Some("58")
        );
        assert_eq!(newest_abi(kernel("5.10"), SEARCH_6_1), None);
    }

    #[test]
    fn newest_abi_across_debian_releases() {
        let search = "\
linux-image-6.12.95+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.118+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.118+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.119+deb12-rt-amd64-unsigned - Linux 6.12 for 64-bit PCs, PREEMPT_RT
linux-image-6.12.117+deb13-amd64-unsigned - Linux 6.12 for 64-bit PCs
";
        assert_eq!(
            newest_abi(kernel("6.12"), search).as_deref(),
            Some("118+deb12")
        );
        let search = "\
linux-binary-unsigned-7.2.9+deb14-amd64 - Linux 7.2.9 for 64-bit PCs (unsigned kernel image)
linux-binary-unsigned-7.2.13+deb14-amd64 - Linux 7.2.13 for 64-bit PCs (unsigned kernel image)
linux-binary-unsigned-7.2.13+deb14-cloud-amd64 - Linux 7.2.13 for x86-64 cloud (unsigned kernel image)
";
        let sid = kernel("7.2");
        assert_eq!(newest_abi(sid, search).as_deref(), Some("13+deb14"));
        assert_eq!(
            sid.packages
                .iter()
                .map(|p| p.replace("{abi}", "13+deb14"))
                .collect::<Vec<_>>(),
            [
                "linux-binary-unsigned-7.2.13+deb14-amd64",
                "linux-modules-7.2.13+deb14-amd64",
                "linux-base-7.2.13+deb14-amd64",
            ]
        );
    }

    #[test]
    fn versions_compare_numerically() {
        use cmp::Ordering::*;
        assert_eq!(compare_versions("57", "9"), Greater);
        assert_eq!(compare_versions("118+deb12", "117+deb13"), Greater);
        assert_eq!(compare_versions("117+deb13", "117+deb12"), Greater);
        assert_eq!(compare_versions("13+deb14", "13+deb14"), Equal);
        assert_eq!(compare_versions("046", "46"), Equal);
    }

    #[test]
    fn policy_candidate_and_suite() {
        let policy = "\
linux-image-6.12.118+deb12-amd64-unsigned:
  Installed: (none)
  Candidate: 6.12.118-1~deb12u1
  Version table:
     6.12.118-1~deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
";
        assert_eq!(
            parse_policy(policy),
            Some(("6.12.118-1~deb12u1".into(), "bookworm-security".into()))
        );
        let installed = "\
busybox-static:
  Installed: 1:1.35.0-4+deb12u1+b1
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
 *** 1:1.35.0-4+deb12u1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
";
        assert_eq!(
            parse_policy(installed),
            Some(("1:1.35.0-4+deb12u1+b1".into(), "bookworm".into()))
        );
        let none = "foo:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n";
        assert_eq!(parse_policy(none), None);
    }

    #[test]
    fn dry_run_packages() {
        let plan = "\
Reading package lists...
Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]
Inst ipxe-qemu (1.0.0+git-20190125.36a4c85-5.1 Debian:12.15/oldstable [all])
Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b3 Debian:12.15/oldstable [amd64])
Conf ipxe-qemu (1.0.0+git-20190125.36a4c85-5.1 Debian:12.15/oldstable [all])
";
        assert_eq!(parse_dry_run(plan), ["ipxe-qemu", "qemu-system-x86"]);
    }

    #[test]
    fn mirror_from_system_sources() {
        let deb822 = "\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
";
        assert_eq!(
            debian_mirror(deb822).as_deref(),
            Some("http://deb.debian.org")
        );
        let one_line = "\
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/pub/debian/ bookworm main
";
        assert_eq!(
            debian_mirror(one_line).as_deref(),
            Some("http://mirror.example/pub")
        );
        assert_eq!(
            debian_mirror("URIs: http://deb.debian.org/debian-security\n"),
            None
        );
        let list = sources_list("http://m");
        assert!(list.contains(&format!(
            "deb [signed-by={KEYRING}] http://m/debian-security bullseye-security main\n"
        )));
        assert_eq!(list.lines().count(), SUITES.len());
    }

    #[test]
    fn modinfo_depends() {
        let ko = b"\x7fELF...\0license=GPL\0depends=9pnet,netfs\0intree=Y\0name=9p\0";
        assert_eq!(depends(ko), ["9pnet", "netfs"]);
        assert_eq!(
            depends(b"\0name=virtio_pci\0depends=\0"),
            Vec::<String>::new()
        );
        assert_eq!(
            depends(b"\0depends=virtio-pci-modern-dev\0"),
            ["virtio_pci_modern_dev"]
        );
        assert_eq!(module_name("9pnet_virtio.ko.xz"), "9pnet_virtio");
        assert_eq!(
            module_name("virtio-pci-legacy-dev.ko"),
            "virtio_pci_legacy_dev"
        );
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let deps = |name: &str| -> Result<Option<Vec<String>>> {
            let d: &[&str] = match name {
                "virtio_pci" => return Ok(None), // built in
                "9pnet_virtio" => &["9pnet", "virtio_ring"],
                "9p" => &["9pnet", "netfs"],
                "overlay" | "9pnet" | "netfs" | "virtio_ring" => &[],
                _ => bail!("unknown module {name}"),
            };
            Ok(Some(d.iter().map(|s| s.to_string()).collect()))
        };
        assert_eq!(
            load_order(MODULES, deps).unwrap(),
            [
                "9pnet",
                "virtio_ring",
                "9pnet_virtio",
                "netfs",
                "9p",
                "overlay"
            ]
        );
        let missing = |_: &str| -> Result<Option<Vec<String>>> { bail!("no module") };
        assert!(load_order(&["9p"], missing).is_err());
    }

    #[test]
    fn exit_status_from_console_chunks() {
        let console = "[    1.2] random: crng init done\r\nok\r\n\r\nVMTEST_EXIT=3\r\n[    9.1] reboot: Power down\r\n";
        for split in 0..console.len() {
            let mut scanner = ExitScanner::default();
            scanner.feed(&console.as_bytes()[..split]);
            scanner.feed(&console.as_bytes()[split..]);
            assert_eq!(scanner.status, Some(3), "split at {split}");
        }
        let mut scanner = ExitScanner::default();
        scanner.feed(b"echo VMTEST_EXIT=1\nVMTEST_EXIT=\nVMTEST_EXIT=0");
        assert_eq!(scanner.status, None, "only whole marker lines count");
        scanner.feed(b"\n");
        assert_eq!(scanner.status, Some(0));
        assert_eq!(scanner.panic, None);
        scanner.feed(b"[  326.14] Kernel panic - not syncing: Fatal exception in interrupt\r\n");
        assert_eq!(
            scanner.panic.as_deref(),
            Some("Kernel panic - not syncing: Fatal exception in interrupt")
        );
    }

    fn script_env() -> ScriptEnv {
        ScriptEnv {
            path: "/root/.cargo/bin:/usr/bin".into(),
            home: "/root".into(),
            cwd: "/work/main/my dir".into(),
            kspan_bin: "/work/main/target/release/kspan".into(),
            rust_log: None,
            python: Some("/usr/bin/python3.11".into()),
        }
    }

    #[test]
    fn binaries_split_into_guests_of_about_equal_length() {
        let binary = |source: &str| TestBinary {
            executable: format!("/t/{source}").into(),
            package_dir: "/t".into(),
            source: source.into(),
        };
        let binaries = [
            binary("tests/context.rs"),
            binary("tests/http1.rs"),
            binary("tests/http2.rs"),
            binary("tests/otlp.rs"),
        ];
        let stems = |groups: Vec<Vec<TestBinary>>| -> Vec<Vec<String>> {
            groups
                .iter()
                .map(|g| g.iter().map(|b| b.stem().to_string()).collect())
                .collect()
        };
        assert_eq!(
            stems(split_binaries(&binaries, 2)),
            [vec!["context"], vec!["http1", "otlp", "http2"]]
        );
        assert_eq!(
            stems(split_binaries(&binaries, 8)).len(),
            4,
            "no empty guests"
        );
    }

    #[test]
    fn script_runs_every_test_binary() {
        let binaries = [
            TestBinary {
                executable: "/w/target/debug/deps/http1-0a".into(),
                package_dir: "/w/tests".into(),
                source: "tests/http1.rs".into(),
            },
            TestBinary {
                executable: "/w/target/debug/deps/otlp-1b".into(),
                package_dir: "/w/tests".into(),
                source: "tests/otlp.rs".into(),
            },
        ];
        let args = ["--nocapture".to_string(), "a b".to_string()];
        let command = GuestCommand::Tests {
            binaries: &binaries,
            args: &args,
        };
        assert_eq!(
            guest_script(&command, &script_env()),
            "\
# generated by cargo xtask vmtest
export PATH=/root/.cargo/bin:/usr/bin HOME=/root KSPAN_BIN=/work/main/target/release/kspan KSPAN_E2E_TIME_SCALE=5
export KSPAN_E2E_PYTHON=/usr/bin/python3.11
status=0
uptime_cs() { local up; read -r up _ </proc/uptime; echo $((10#${up/./})); }
echo; echo 'Running tests/http1.rs (/w/target/debug/deps/http1-0a)'
start=$(uptime_cs)
cd /w/tests && /w/target/debug/deps/http1-0a --test-threads=1 --nocapture 'a b' || status=$?
took=$(( $(uptime_cs) - start ))
printf 'vmtest: %s took %d.%02d s of guest time\\n' tests/http1.rs $((took / 100)) $((took % 100))
echo; echo 'Running tests/otlp.rs (/w/target/debug/deps/otlp-1b)'
start=$(uptime_cs)
cd /w/tests && /w/target/debug/deps/otlp-1b --test-threads=1 --nocapture 'a b' || status=$?
took=$(( $(uptime_cs) - start ))
printf 'vmtest: %s took %d.%02d s of guest time\\n' tests/otlp.rs $((took / 100)) $((took % 100))
exit $status
"
        );
    }

    #[test]
    fn script_runs_a_shell_command_in_the_current_directory() {
        let script = guest_script(&GuestCommand::Shell("uname -r; exit 3"), &script_env());
        assert!(
            script.ends_with("cd '/work/main/my dir' || exit 125\nuname -r; exit 3\n"),
            "{script}"
        );
    }

    #[test]
    fn test_artifacts_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/tests#kspan-e2e@0.1.0","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"http1","src_path":"/w/tests/tests/http1.rs"},"profile":{"test":true},"executable":"/w/target/debug/deps/http1-0a","fresh":true}
{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["lib"],"name":"kspan_e2e","src_path":"/w/tests/src/lib.rs"},"profile":{"test":false},"executable":null}
{"reason":"build-finished","success":true}"#;
        let binaries = parse_test_artifacts(messages).unwrap();
        assert_eq!(binaries.len(), 1);
        assert_eq!(
            binaries[0].executable,
            Path::new("/w/target/debug/deps/http1-0a")
        );
        assert_eq!(binaries[0].package_dir, Path::new("/w/tests"));
        assert_eq!(binaries[0].source, "tests/http1.rs");
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::default();
        cpio.dir("bin");
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let data = cpio.finish();
        assert_eq!(data.len() % 4, 0);
        assert!(data.starts_with(b"070701"));
        // The second header starts after "bin\0" padded: 110 + 4 = 114 → 116.
        assert_eq!(&data[116..122], b"070701");
        assert_eq!(&data[116 + 14..116 + 22], b"000081ed", "regular file, 0755");
        let trailer = data.windows(10).position(|w| w == b"TRAILER!!!").unwrap();
        assert_eq!(&data[trailer - 110..trailer - 104], b"070701");
    }

    #[test]
    fn bzimage_header_locates_the_payload() {
        let mut image = vec![0u8; 8192];
        image[0x1f1] = 3; // setup sectors: the payload area starts at (3 + 1) * 512
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        image[2148..2154].copy_from_slice(b"\xfd7zXZ\0");
        let payload = bzimage_payload(&image).unwrap();
        assert_eq!(payload, b"\xfd7zXZ\0");
        assert_eq!(decompressor(payload), Some(&["xz", "-dc"][..]));
        image[0x24c..0x250].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert_eq!(bzimage_payload(&image), None, "payload beyond the file");
    }

    #[test]
    fn elf_completeness() {
        let mut elf = vec![0u8; 256];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x28..0x30].copy_from_slice(&128u64.to_le_bytes()); // section headers at 128
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        assert!(complete_elf(&elf));
        assert!(!complete_elf(&elf[..255]), "cut short");
        assert!(!complete_elf(b"MZ"));
    }
}
