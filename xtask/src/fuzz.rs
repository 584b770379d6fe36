//! `cargo xtask fuzz`: builds the cargo-fuzz targets of agent/fuzz (nightly, libFuzzer, address
//! sanitizer, debug assertions) and runs each for a while, one after the other. `cargo xtask test`
//! runs each briefly from an unoptimized build ([`Build::Dev`]).
//!
//! Each target starts from its committed seeds (agent/fuzz/corpus/<target>, read only) and grows
//! a working corpus in <target dir>/fuzz/corpus/<target> that is kept between runs but not
//! committed. A crash stops that target: libFuzzer writes the input to
//! agent/fuzz/artifacts/<target>/, which the corpus-replay test of agent/src/fuzzing.rs runs in
//! every `cargo test` once committed.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{command, display, run_cmd, setup};

/// How the targets are compiled. Both have the address sanitizer, debug assertions and overflow
/// checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimized (`cargo fuzz build -a`): 7.5 min to build from nothing here, then thousands of
    /// executions per second; for the long runs.
    Release,
    /// Unoptimized (`cargo fuzz build --dev`): 1.5 min to build, a few hundred executions per
    /// second; CI's brief run, which checks that every target builds and survives its seeds and
    /// a few thousand mutations.
    Dev,
}

pub struct Options {
    /// Seconds per target.
    pub time: u64,
    /// Executions per target instead of a time limit.
    pub runs: Option<u64>,
    /// Targets to run; empty: all of them.
    pub targets: Vec<String>,
    pub build: Build,
}

fn fuzz_dir() -> PathBuf {
    crate::root().join("agent").join("fuzz")
}

/// The targets: agent/fuzz/fuzz_targets/<name>.rs, sorted.
fn all_targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem()
        {
            names.push(stem.to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// `rustup run nightly cargo fuzz SUBCOMMAND -a|--dev ...` in agent/fuzz; `-a`: debug
/// assertions and overflow checks (on by default in `--dev`), so arithmetic that would wrap
/// silently in the agent is a finding too. The build and every run pass the same flags, so the
/// runs reuse the build.
fn cargo_fuzz(subcommand: &str, build: Build) -> Command {
    let mut cmd = command("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .arg(match build {
            Build::Release => "-a",
            Build::Dev => "--dev",
        })
        .current_dir(fuzz_dir())
        // A relative CARGO_TARGET_DIR would be taken from agent/fuzz: pass ours, absolute. The
        // targets land in <target>/<triple>/, beside the workspace's own builds, and share its
        // eBPF object (agent/build.rs).
        .env("CARGO_TARGET_DIR", crate::target_dir());
    cmd
}

/// The command that builds the targets, for `cargo xtask test` to start in the background.
pub fn build_command(build: Build) -> Command {
    cargo_fuzz("build", build)
}

/// One target's run: what libFuzzer's final stats say.
struct Outcome {
    target: String,
    executions: Option<u64>,
    execs_per_sec: Option<u64>,
    seconds: f64,
    /// The reproducer libFuzzer wrote, if the target crashed.
    crash: Option<String>,
    ok: bool,
}

pub fn fuzz(options: &Options) -> Result<()> {
    setup::cargo_fuzz()?;
    let all = all_targets()?;
    let targets = if options.targets.is_empty() {
        all.clone()
    } else {
        for t in &options.targets {
            if !all.contains(t) {
                bail!("no fuzz target `{t}` (targets: {})", all.join(", "));
            }
        }
        options.targets.clone()
    };

    let build_start = Instant::now();
    run_cmd(&mut build_command(options.build))?;
    println!(
        "fuzz targets built in {:.0} s",
        build_start.elapsed().as_secs_f64()
    );

    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(target, options)?);
    }

    match options.runs {
        Some(runs) => println!("\n==> fuzz summary ({runs} executions per target)"),
        None => println!("\n==> fuzz summary ({} s per target)", options.time),
    }
    let show = |n: Option<u64>| n.map_or_else(|| "?".to_string(), |n| n.to_string());
    for o in &outcomes {
        println!(
            "  {:<7} {:<13} {:>12} execs {:>8} execs/s {:>7.0} s",
            if o.ok { "ok" } else { "FAILED" },
            o.target,
            show(o.executions),
            show(o.execs_per_sec),
            o.seconds
        );
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for o in &failed {
        match &o.crash {
            Some(path) => println!(
                "{}: reproducer {path}; replay it with `cd agent/fuzz && rustup run nightly \
                 cargo fuzz run {} {} {path}`",
                o.target,
                match options.build {
                    Build::Release => "-a",
                    Build::Dev => "--dev",
                },
                o.target
            ),
            None => println!(
                "{}: failed without a reproducer (see its log in {})",
                o.target,
                log_path(&o.target).display()
            ),
        }
    }
    bail!(
        "{} fuzz target(s) failed: {}",
        failed.len(),
        failed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn log_path(target: &str) -> PathBuf {
    crate::target_dir()
        .join("fuzz")
        .join(format!("{target}.log"))
}

fn run_target(target: &str, options: &Options) -> Result<Outcome> {
    let work = crate::target_dir().join("fuzz").join("corpus").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let log = log_path(target);
    let mut log_file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;

    let mut cmd = cargo_fuzz("run", options.build);
    // libFuzzer writes new inputs to the first corpus directory only: the seeds stay as committed.
    let limit = match options.runs {
        Some(runs) => format!("-runs={runs}"),
        None => format!("-max_total_time={}", options.time),
    };
    cmd.arg(target).arg(&work).arg(&seeds).args([
        "--".to_string(),
        limit.clone(),
        // A hang is a finding too (the default is 20 minutes per input).
        "-timeout=10".to_string(),
        "-print_final_stats=1".to_string(),
    ]);
    println!("\n==> fuzz {target} ({limit}; log: {})", log.display());
    println!("$ {}", display(&cmd));
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start cargo fuzz (`cargo xtask setup` installs it)")?;
    // libFuzzer reports on stderr; cargo's output is short. Both go to the log; the lines that
    // matter are printed.
    let stdout = child.stdout.take().expect("piped");
    let stdout_thread = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut executions = None;
    let mut execs_per_sec = None;
    let mut crash = None;
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let _ = writeln!(log_file, "{line}");
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            executions = n.trim().parse().ok();
        } else if let Some(n) = line.strip_prefix("stat::average_exec_per_sec:") {
            execs_per_sec = n.trim().parse().ok();
        } else if let Some(rest) = line.split_once("Test unit written to ") {
            crash = Some(rest.1.trim().to_string());
        }
        if line.contains("DONE") || line.starts_with("==") || line.contains("panicked") {
            println!("  {line}");
        }
        tail.push(line);
        if tail.len() > 60 {
            tail.remove(0);
        }
    }
    for line in stdout_thread.join().unwrap_or_default() {
        let _ = writeln!(log_file, "{line}");
    }
    let status = child.wait().context("cannot wait for cargo fuzz")?;
    let ok = status.success();
    if !ok {
        println!("  --- last lines of {} ---", log.display());
        for line in &tail {
            println!("  {line}");
        }
    }
    Ok(Outcome {
        target: target.to_string(),
        executions,
        execs_per_sec,
        seconds: start.elapsed().as_secs_f64(),
        crash,
        ok,
    })
}
