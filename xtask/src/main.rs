//! `cargo xtask`: kspan's developer task runner and CI entry point.
//!
//! Every task first runs `setup` (checks the eBPF build prerequisites and the end-to-end test
//! peers, installing what is missing), so a fresh machine needs nothing but Rust and this repo.

mod bench;
mod cross;
mod deploy;
mod fuzz;
mod setup;
mod vmtest;
mod vmtest_arm64;

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use std::{env, fmt::Write as _};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "kspan developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check what `cargo xtask test` needs (eBPF build prerequisites, end-to-end test peers,
    /// guest packages, cargo-fuzz, the aarch64 cross toolchain); install what is missing.
    Setup,
    /// Install what building needs (not the test peers), then build the agent (release unless
    /// --debug). The container image's builder runs this (deploy/Dockerfile).
    Build {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
        /// Cross-build for this target (aarch64-unknown-linux-gnu), installing Debian's cross
        /// toolchain and rustup's target first.
        #[arg(long, value_name = "TRIPLE")]
        target: Option<String>,
    },
    /// Set up, build the release agent, run the unit tests, then the end-to-end tests on this
    /// kernel and in QEMU guests on each kernel of the matrix (see `vmtest`); while the guests
    /// run, `lint`'s clippy runs at the lowest priority to fill its cache.
    Test,
    /// Set up, then check formatting (rustfmt) and lints (clippy -D warnings).
    Lint,
    /// Lint and render the Helm chart (deploy/helm/kspan), validate the manifests against the
    /// Kubernetes schemas, assert least privilege, probes and RBAC, and that
    /// deploy/kubernetes/kspan.yaml is the default rendering. Installs helm and
    /// kubernetes-validate if missing.
    DeployCheck {
        /// Rewrite deploy/kubernetes/kspan.yaml from the chart first.
        #[arg(long)]
        write_manifest: bool,
    },
    /// Set up, build the release agent, then replace this process with it: `run -- ARGS...`.
    Run {
        /// Arguments passed to kspan (everything after `--`).
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Set up, build the release agent, measure kspan's overhead on nginx (no probes, the hooks'
    /// floor and kspan, side by side; results in target/bench/results.json), then run the
    /// criterion micro-benchmarks. Needs root.
    Bench {
        /// Seconds per measured run.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        duration: u64,
        /// Rounds of the three modes (none, floor, kspan) per scenario; the order rotates.
        #[arg(long, value_name = "N", default_value_t = 3)]
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Skip the criterion micro-benchmarks (`cargo bench -p kspan`).
        #[arg(long)]
        skip_criterion: bool,
    },
    /// Install cargo-fuzz if missing, build the fuzz targets of agent/fuzz (nightly, libFuzzer)
    /// and run each for SECS: `fuzz [--time SECS] [TARGET]...`. Fails on a crash, whose
    /// reproducer lands in agent/fuzz/artifacts/<target>/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        time: u64,
        /// Stop each target after this many executions instead (the README's long run:
        /// `--runs 10000000`); with it, --time is not a limit.
        #[arg(long, value_name = "N")]
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        runs: Option<u64>,
        /// Build unoptimized: 1.5 min instead of 7.5, but ~30 times fewer executions per
        /// second (what `cargo xtask test` runs, 5 s per target).
        #[arg(long)]
        dev: bool,
        /// Targets to run (default: all of them).
        #[arg(value_name = "TARGET")]
        targets: Vec<String>,
    },
    /// Set up, build, run the end-to-end tests in QEMU guests booting other kernels (Debian's
    /// 5.10, 6.1, 6.1-rt, 6.12, 7.2), downloaded and cached in $KSPAN_VMTEST_DIR (default
    /// /var/cache/kspan/vmtest): `vmtest [--kernel NAME]... [-- TEST ARGS]`.
    Vmtest {
        /// A kernel of the matrix (repeatable; default: all of them).
        #[arg(long = "kernel", value_name = "NAME", value_parser = vmtest::parse_kernel)]
        kernels: Vec<&'static vmtest::Kernel>,
        /// Guests booted at once; with more than one, each guest's console is printed when it ends.
        #[arg(long, value_name = "N", default_value_t = 1)]
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        jobs: u32,
        /// Run this shell command in the guests (in the current directory) instead of the tests.
        #[arg(long, value_name = "CMD")]
        run: Option<String>,
        /// Arguments passed to every test binary (everything after `--`).
        #[arg(last = true, value_name = "TEST ARGS")]
        test_args: Vec<String>,
    },
    /// Cross-build kspan and the http1 e2e tests for aarch64, then run the HTTP/1 smoke tests in
    /// a QEMU guest booting Debian's arm64 kernel with an arm64 userland (debootstrap), all
    /// cached in $KSPAN_VMTEST_DIR/arm64: `vmtest-arm64 [--all] [-- TEST ARGS]`. Not part of
    /// `test`.
    VmtestArm64 {
        /// Run every test of tests/http1.rs, not only the smoke tests.
        #[arg(long)]
        all: bool,
        /// Arguments passed to the http1 test binary; test names given here replace the smoke
        /// tests.
        #[arg(last = true, value_name = "TEST ARGS")]
        test_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run_task(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}`: the whole cause chain on one line, without anyhow's backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup_for_tests(),
        Task::Build { debug, target } => match target {
            Some(target) => {
                cross::setup()?;
                let mut args = vec!["build", "-p", "kspan"];
                if !debug {
                    args.insert(1, "--release");
                }
                run_cmd(&mut cross::cargo_for(&target, &args)?)
            }
            None => {
                setup::build_prerequisites()?;
                build(debug)
            }
        },
        Task::Test => test(),
        Task::Lint => lint(),
        Task::DeployCheck { write_manifest } => deploy::check(write_manifest),
        Task::Run { args } => run(&args),
        Task::Bench {
            duration,
            rounds,
            skip_criterion,
        } => bench::bench(&bench::Options {
            duration,
            rounds,
            skip_criterion,
        }),
        Task::Fuzz {
            time,
            runs,
            dev,
            targets,
        } => fuzz::fuzz(&fuzz::Options {
            time,
            runs,
            targets,
            build: if dev {
                fuzz::Build::Dev
            } else {
                fuzz::Build::Release
            },
        }),
        Task::Vmtest {
            kernels,
            jobs,
            run,
            test_args,
        } => vmtest::vmtest(&vmtest::Options {
            kernels,
            jobs: jobs as usize,
            run,
            test_args,
        }),
        Task::VmtestArm64 { all, test_args } => vmtest_arm64::vmtest_arm64(all, &test_args),
    }
}

/// The workspace root: the parent of this crate's directory, wherever cargo was invoked from.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
        .to_path_buf()
}

/// Where cargo puts build output for commands run from the root.
fn target_dir() -> PathBuf {
    // A relative CARGO_TARGET_DIR is relative to the cwd, which is the root for our commands.
    root().join(env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()))
}

fn kspan_bin() -> PathBuf {
    target_dir().join("release").join("kspan")
}

fn build(debug: bool) -> Result<()> {
    let mut args = vec!["build", "-p", "kspan"];
    if !debug {
        args.insert(1, "--release");
    }
    run_cmd(&mut cargo(&args))
}

/// The e2e test file CI runs on the host kernel only (see `test`).
const HOST_ONLY_E2E: &str = "tests/hostile.rs";

/// Guests booted at once by `cargo xtask test`: the CI machine has two cores.
const MATRIX_JOBS: usize = 2;

/// `cargo xtask test`'s fuzzing: each target this long, from the quick-to-build unoptimized build.
const FUZZ_SECONDS: u64 = 5;
const FUZZ_BUILD: fuzz::Build = fuzz::Build::Dev;

/// Everything `cargo xtask test` needs: the build's and the tests' prerequisites, the guests'
/// packages, cargo-fuzz and the aarch64 cross toolchain (`cargo xtask setup` is the same).
fn setup_for_tests() -> Result<()> {
    setup::setup_with(vmtest::PACKAGES)?;
    setup::cargo_fuzz()?;
    cross::setup()
}

fn test() -> Result<()> {
    let mut steps = Steps::default();
    let result = (|| {
        steps.run("setup", setup_for_tests)?;
        steps.run("build (release)", || build(false))?;
        // The unit tests and the end-to-end tests select the same packages (the workspace), so
        // cargo resolves the dependencies' features once and the e2e step builds only its own
        // test targets: with `--exclude kspan-e2e` then `-p kspan-e2e`, tokio, hyper, tonic,
        // tower, axum, opentelemetry_sdk and a dozen more were built twice, with each step's
        // features. The unit tests are every library's and binary's own tests (the e2e
        // harness's included: they need no kernel) and the doc tests; the end-to-end tests are
        // the integration tests (`tests/tests/*.rs`, the workspace's only ones).
        steps.run("unit tests", || {
            run_cmd(&mut cargo(&["test", "--workspace", "--lib", "--bins"]))?;
            // cargo takes `--doc` alone.
            run_cmd(&mut cargo(&["test", "--workspace", "--doc"]))
        })?;
        steps.run("deployment files", || deploy::check(false))?;
        // The e2e test binaries are built first and then run directly (not through `cargo
        // test`, which would hold the build directory's lock while they run): the warm-ups start
        // as soon as the binaries exist and use the cores the host tests leave idle (the
        // slowloris minute, servers starting, agents waiting for their collectors).
        let mut binaries = Vec::new();
        steps.run("e2e test binaries", || {
            binaries = vmtest::e2e_binaries()?;
            Ok(())
        })?;
        // `cargo xtask lint`'s clippy, the fuzz targets' and the aarch64 unit tests' builds,
        // started now at the lowest priority: they run on the cores the host tests and then the
        // guests leave idle (a guest waiting on a timer or a kernel grace period sleeps in real
        // time, see vmtest's QEMU_FLAGS), and the later steps find their builds done.
        let warmups = start_warmups();
        // Not `?`: the matrix runs whatever the host kernel said, one failure does not hide
        // the others.
        let host = steps.run("end-to-end tests", || run_host_e2e(&binaries));
        // The hostile-traffic suite (a slowloris minute, 10,000 connections, 500 processes) ran
        // on the host kernel above; it takes 2 minutes there, and the guests' emulation is 5-15
        // times slower (not measured for this suite): on four kernels that would take CI past 30
        // minutes. `cargo xtask vmtest` runs it.
        binaries.retain(|b| !b.source.ends_with(HOST_ONLY_E2E));
        // Two guests at once, one per core (each guest is one emulation thread); every kernel
        // runs, one failing does not hide the others' results.
        let matrix = steps.run("e2e on the kernel matrix", || {
            // 5.10, 6.1, 6.12 and 7.2; 6.1-rt runs with `cargo xtask vmtest` (green there too):
            // its ~7.5 guest-minutes would take CI past 30 minutes on two cores.
            let kernels: Vec<&'static vmtest::Kernel> =
                vmtest::MATRIX.iter().filter(|k| k.in_ci).collect();
            let command = vmtest::GuestCommand::Tests {
                binaries: &binaries,
                args: &[],
            };
            vmtest::run_matrix(&kernels, &command, MATRIX_JOBS)
        });
        // Not a check of its own (the lint and fuzz steps report the builds' findings).
        let _ = steps.run("warm-ups (waiting)", || {
            warmups
                .join()
                .map_err(|_| anyhow::anyhow!("the warm-up thread panicked"))
        });
        // The agent cross-built for aarch64 (its eBPF object too, for that syscall layout),
        // its unit tests run under qemu-user; built during the matrix above.
        let aarch64 = steps.run("aarch64 unit tests (qemu-user)", || {
            run_cmd(&mut cross::unit_tests(true)?)
        });
        // Every fuzz target briefly, from its seeds: they build, and survive a few thousand
        // mutations each. `cargo xtask fuzz` runs them for longer, optimized.
        let fuzzing = steps.run(
            &format!("fuzz ({FUZZ_SECONDS} s per target, unoptimized)"),
            || {
                fuzz::fuzz(&fuzz::Options {
                    time: FUZZ_SECONDS,
                    runs: None,
                    targets: Vec::new(),
                    build: FUZZ_BUILD,
                })
            },
        );
        // The criterion benchmarks are run by `cargo xtask bench`; `cargo xtask lint` (clippy
        // on all targets) checks that they compile, without building them a third time here.
        host.and(matrix).and(aarch64).and(fuzzing)
    })();
    steps.print_summary();
    result
}

/// Run the end-to-end test binaries on this machine's kernel, one after the other, each from
/// its package's directory as cargo would, one test at a time (they share the kernel's probes).
/// Every binary runs; the step fails if any failed.
fn run_host_e2e(binaries: &[vmtest::TestBinary]) -> Result<()> {
    let mut failed = Vec::new();
    for binary in binaries {
        println!(
            "\n     Running {} ({})",
            binary.source,
            binary.executable.display()
        );
        let mut cmd = command(&binary.executable);
        cmd.arg("--test-threads=1")
            .current_dir(&binary.package_dir)
            .env("KSPAN_BIN", kspan_bin());
        if run_cmd(&mut cmd).is_err() {
            failed.push(binary.source.clone());
        }
    }
    if !failed.is_empty() {
        bail!("end-to-end tests failed in {}", failed.join(", "));
    }
    Ok(())
}

fn lint() -> Result<()> {
    let mut steps = Steps::default();
    let result = (|| {
        steps.run("setup", setup::setup)?;
        // Both checks run, so one failing does not hide the other's findings.
        let fmt = steps.run("rustfmt", || {
            run_cmd(&mut cargo(&["fmt", "--all", "--", "--check"]))
        });
        let clippy = steps.run("clippy", || run_cmd(&mut cargo(CLIPPY)));
        fmt.and(clippy)
    })();
    steps.print_summary();
    result
}

/// `cargo xtask lint`'s clippy. The warm-up in `test` runs exactly this, so that the lint step
/// finds every crate checked (cargo keys its cache on these arguments too).
const CLIPPY: &[&str] = &[
    "clippy",
    "--workspace",
    "--all-targets",
    "--",
    "-D",
    "warnings",
];

/// Start the builds that `test`'s last steps need, one after the other in a background thread,
/// each under `nice -n 19` with its output in a log file: [`CLIPPY`] (a cache warm-up for `cargo
/// xtask lint`, whatever its result), the fuzz targets' unoptimized build and the aarch64 unit
/// tests' cross build. The fuzz and aarch64 steps build again in the foreground, so a failure
/// here is reported there.
fn start_warmups() -> std::thread::JoinHandle<()> {
    let mut clippy = command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    clippy.args(CLIPPY);
    let mut warmups = vec![
        (
            "clippy (for `cargo xtask lint`)",
            clippy,
            "clippy-warmup.log",
        ),
        (
            "the fuzz targets (for the fuzz step)",
            fuzz::build_command(FUZZ_BUILD),
            "fuzz-warmup.log",
        ),
    ];
    match cross::unit_tests(false) {
        Ok(cmd) => warmups.push(("the aarch64 unit tests", cmd, "aarch64-warmup.log")),
        Err(err) => println!("no aarch64 warm-up: {err:#}"),
    }
    std::thread::spawn(move || {
        for (what, cmd, log) in warmups {
            let log = target_dir().join(log);
            match run_niced(&cmd, &log) {
                Ok(status) => println!("warm-up of {what}: {status} (output in {})", log.display()),
                Err(err) => println!("warm-up of {what} did not run: {err:#}"),
            }
        }
    })
}

/// Run CMD under `nice -n 19`, stdout and stderr into LOG.
fn run_niced(cmd: &Command, log: &Path) -> Result<std::process::ExitStatus> {
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut niced = command("nice");
    niced
        .args(["-n", "19"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => niced.env(key, value),
            None => niced.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        niced.current_dir(dir);
    }
    println!("$ {} (in the background)", display(&niced));
    niced
        .status()
        .with_context(|| format!("cannot run {}", display(&niced)))
}

fn run(args: &[OsString]) -> Result<()> {
    setup::setup()?;
    build(false)?;
    let mut cmd = command(kspan_bin());
    cmd.args(args);
    println!("$ {}", display(&cmd));
    // exec only returns on failure; on success kspan gets our pid, stdio and signals.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", kspan_bin().display()))
}

/// Named steps with a header before each and a timed summary at the end.
#[derive(Default)]
struct Steps {
    done: Vec<(String, Duration, bool)>,
}

impl Steps {
    fn run(&mut self, name: &str, step: impl FnOnce() -> Result<()>) -> Result<()> {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = step();
        self.done
            .push((name.to_string(), start.elapsed(), result.is_ok()));
        result.with_context(|| format!("step `{name}` failed"))
    }

    fn print_summary(&self) {
        let mut out = String::from("\n==> summary\n");
        let mut total = Duration::ZERO;
        for (name, took, ok) in &self.done {
            let status = if *ok { "ok" } else { "FAILED" };
            let secs = took.as_secs_f64();
            let _ = writeln!(out, "  {status:<7} {name:<20} {secs:>8.1}s");
            total += *took;
        }
        let _ = writeln!(
            out,
            "  {:<7} {:<20} {:>8.1}s",
            "",
            "total",
            total.as_secs_f64()
        );
        print!("{out}");
    }
}

/// A command whose PATH also holds cargo's bin directory (bpf-linker, rustup proxies live there).
fn command(program: impl AsRef<OsStr>) -> Command {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo").join("bin"));
    }
    let current: Vec<PathBuf> =
        env::split_paths(&env::var_os("PATH").unwrap_or_default()).collect();
    dirs.retain(|d| !current.contains(d));
    dirs.extend(current);
    let mut cmd = Command::new(program);
    if let Ok(path) = env::join_paths(dirs) {
        cmd.env("PATH", path);
    }
    cmd.current_dir(root());
    cmd
}

/// `cargo ARGS`, using the cargo that runs us.
fn cargo(args: &[&str]) -> Command {
    let mut cmd = command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args);
    cmd
}

/// Print the command, run it with inherited stdio, fail unless it exits successfully.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Run a probe quietly; true if it started and exited successfully.
fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run a probe and capture its stdout, if it exited successfully.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `VAR=value program args`, as a shell would show it (PATH left out: we always set it).
pub(crate) fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter(|(k, _)| *k != "PATH")
        .filter_map(|(k, v)| Some(format!("{}={}", k.display(), v?.display())))
        .collect();
    let program = Path::new(cmd.get_program());
    // Show `cargo` rather than the toolchain path in $CARGO.
    let name = match program.file_name() {
        Some(n) if n == "cargo" => n,
        _ => cmd.get_program(),
    };
    parts.push(name.display().to_string());
    parts.extend(cmd.get_args().map(|a| quote(&a.display().to_string())));
    parts.join(" ")
}

/// Single-quote an argument that a shell would otherwise split or expand.
fn quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=./:,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
