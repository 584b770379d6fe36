//! `cargo xtask bench`: what tracing costs a real application, and what kspan itself costs.
//!
//! nginx (one worker pinned to CPU 0) answers a fixed 200 on keep-alive connections; the load
//! generator (pinned to CPU 1) loads it. Each scenario (HTTP/1 at saturation, HTTP/1 at a held
//! rate, HTTP/2, HTTPS) runs rounds of three modes back to back, the order rotating: no probes;
//! the floor (kspan's tracepoints attached with programs that return at once, `--bench-floor`);
//! kspan tracing nginx. Beside the load generator's figures: the machine's kernel and user CPU
//! time (/proc/stat), the agent's CPU time and peak RSS (/proc), its eBPF programs' run time
//! (fdinfo, kernel.bpf_stats_enabled), and its longest busy stretch (its counters line). Then
//! the scale runs: 1,000 and 10,000 connections, 20 to 200 traced processes. Results go to the
//! terminal and to target/bench/results.json.
//!
//! The bench fails only when something could not be measured, never because a target is missed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Steps, build, cargo, command, display, kspan_bin, output, run_cmd, setup, target_dir};

mod load;
use load::{Generator, Load};

const ADDR: &str = "127.0.0.1:18080";
const URL: &str = "http://127.0.0.1:18080/";
/// The same `return 200` over TLS (nginx's OpenSSL: Debian's libssl.so.3, uprobes attached).
const TLS_ADDR: &str = "127.0.0.1:18443";
const TLS_URL: &str = "https://127.0.0.1:18443/";
/// nginx's HTTP/2 cleartext server (prior knowledge, no upgrade).
const HTTP2_ADDR: &str = "127.0.0.1:18082";
const HTTP2_URL: &str = "http://127.0.0.1:18082/";
/// Keep-alive connections of the mode-by-mode scenarios.
const CONNECTIONS: u32 = 16;
/// The connection counts of the scale runs; the last one's peak RSS has a target.
const SCALE_CONNECTION_STEPS: [u32; 2] = [1_000, SCALE_CONNECTIONS];
const SCALE_CONNECTIONS: u32 = 10_000;
/// Descriptors wrk and nginx need for it, with room for the rest.
const OPEN_FILES: u32 = SCALE_CONNECTIONS + 1024;
/// Traced client processes of the scale runs, and each one's request rate.
const SCALE_PROCESS_STEPS: [u32; 3] = [20, 100, 200];
const CURL_RATE: u32 = 20;
const WARMUP_SECS: u64 = 3;
/// kspan parses the kernel's BTF and attaches its programs before `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// kspan promises to exit this soon after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub struct Options {
    pub duration: u64,
    pub rounds: u32,
    pub skip_criterion: bool,
}

pub fn bench(options: &Options) -> Result<()> {
    let mut steps = Steps::default();
    let result = (|| {
        steps.run("setup", || {
            setup::setup_with(setup::BENCH_PACKAGES)?;
            load::install_oha()
        })?;
        steps.run("build (release)", || build(false))?;
        steps.run("overhead on nginx", || overhead(options))?;
        if options.skip_criterion {
            println!("\nskipped: criterion micro-benchmarks (--skip-criterion)");
            return Ok(());
        }
        steps.run("criterion", criterion)
    })();
    steps.print_summary();
    result
}

// ---------------------------------------------------------------------------------------------
// The overhead measurement

/// What runs beside nginx during a measured run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// Nothing attached.
    NoProbes,
    /// kspan's tracepoints, each running a program that returns at once (`--bench-floor`): what
    /// any agent on these hooks pays before doing anything.
    Floor,
    /// kspan tracing nginx.
    Kspan,
}

const MODES: [Mode; 3] = [Mode::NoProbes, Mode::Floor, Mode::Kspan];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoProbes => "none",
            Mode::Floor => "floor",
            Mode::Kspan => "kspan",
        }
    }
}

/// One way of loading nginx, measured in every mode, round after round.
struct Scenario {
    name: &'static str,
    what: String,
    generator: Generator,
    /// As fast as nginx answers (the throughput ratios mean something), or at a held rate (the
    /// latencies do).
    saturation: bool,
}

fn overhead(options: &Options) -> Result<()> {
    if !setup::is_root() {
        bail!("the benchmark loads eBPF programs and sets {BPF_STATS}: run it as root");
    }
    let machine = machine()?;
    let nproc = machine["nproc"].as_u64().unwrap_or(1);
    let text = |key: &str| machine[key].as_str().unwrap_or("").to_string();
    println!(
        "machine: {nproc} CPUs, {}, kernel {}, load average {}",
        text("model_name"),
        text("kernel"),
        text("loadavg")
    );
    if nproc < 2 {
        bail!("the benchmark pins nginx to CPU 0 and the load to CPU 1: it needs at least 2 CPUs");
    }
    let load = loadavg().0;
    if load > 0.5 {
        println!(
            "warning: load average {load} before the benchmark: other work on this machine will \
             skew the figures"
        );
    }
    let dir = target_dir().join("bench");
    fs::create_dir_all(dir.join("tmp"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    catch_interrupt();
    raise_open_files_limit()?;

    let nginx = Nginx::start(&dir)?;
    let _stats = BpfStats::enable()?;
    let mut results = Vec::new();
    // HTTP/1 at saturation first: its no-probes maximum sets the held rate.
    let http1 = Scenario {
        name: "http1",
        what: format!("HTTP/1.1 keep-alive, wrk -t1 -c{CONNECTIONS}, saturation"),
        generator: Generator::Wrk {
            url: URL,
            connections: CONNECTIONS,
        },
        saturation: true,
    };
    results.push(run_scenario(nginx.pid(), http1, options)?);
    // The held rate: half of what oha itself reaches without probes, so that the client keeps
    // up with its schedule and the latencies are nginx's (wrk's maximum is beyond oha's).
    println!("\n== the no-probes maximum of oha -c{CONNECTIONS} (for the held rate)");
    let oha_max = Generator::Oha {
        url: URL,
        connections: CONNECTIONS,
        rate: None,
        http2: false,
    }
    .run(options.duration)?;
    let rate = (oha_max.requests_per_sec / 2.0) as u32;
    let more = [
        Scenario {
            name: "http1-rate",
            what: format!(
                "HTTP/1.1 keep-alive, oha -c{CONNECTIONS} at {rate} req/s (half of its no-probes \
                 maximum), open loop"
            ),
            generator: Generator::Oha {
                url: URL,
                connections: CONNECTIONS,
                rate: Some(rate),
                http2: false,
            },
            saturation: false,
        },
        Scenario {
            name: "http2",
            what: format!("HTTP/2 cleartext (prior knowledge), oha -c{CONNECTIONS}, saturation"),
            generator: Generator::Oha {
                url: HTTP2_URL,
                connections: CONNECTIONS,
                rate: None,
                http2: true,
            },
            saturation: true,
        },
        Scenario {
            name: "https",
            what: format!(
                "HTTP/1.1 over TLS (OpenSSL uprobes), wrk -t1 -c{CONNECTIONS}, saturation"
            ),
            generator: Generator::Wrk {
                url: TLS_URL,
                connections: CONNECTIONS,
            },
            saturation: true,
        },
    ];
    for scenario in more {
        results.push(run_scenario(nginx.pid(), scenario, options)?);
    }
    let scale = scale(nginx.pid(), options)?;
    drop(nginx);
    let mut machine = machine;
    machine["loadavg_after"] = loadavg().1.into();

    println!();
    print_modes(&results);
    println!();
    print_ebpf(&results);
    println!();
    scale.print();
    let rows = rows(&results, &scale);
    println!();
    print_table(&rows);
    let json = json!({
        "machine": machine,
        "settings": {
            "duration_secs": options.duration,
            "rounds": options.rounds,
            "warmup_secs": WARMUP_SECS,
            "connections": CONNECTIONS,
            "nginx_cpu": 0,
            "load_cpu": 1,
            "oha_version": load::OHA_VERSION,
            "oha_no_probes_max_per_sec": oha_max.requests_per_sec,
            "held_rate_per_sec": rate,
        },
        "scenarios": results.iter().map(ScenarioResult::to_json).collect::<Vec<_>>(),
        "scale": scale.to_json(),
        "targets": rows.iter().filter(|r| r.target.is_some()).map(Row::to_json).collect::<Vec<_>>(),
        "all_targets_met": rows.iter().all(|r| r.met() != Some(false)),
    });
    let path = dir.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// 10,000 connections need as many descriptors in wrk and in nginx's worker (children inherit
/// the soft limit; raising the hard one needs CAP_SYS_RESOURCE, so it is only checked).
fn raise_open_files_limit() -> Result<()> {
    let wanted = u64::from(OPEN_FILES);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit for this process to fill, then to set.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "cannot read the open-files limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_max < wanted {
        bail!(
            "the open-files hard limit is {}; the {SCALE_CONNECTIONS}-connection run needs              {wanted}: raise it (`ulimit -Hn {wanted}` as root, or LimitNOFILE)",
            limit.rlim_max
        );
    }
    limit.rlim_cur = limit.rlim_cur.max(wanted);
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        bail!(
            "cannot raise the open-files limit to {wanted}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `options.rounds` rounds of the three modes back to back, the order rotating from round to
/// round so that drift (thermal, other load) favours no mode.
fn run_scenario(nginx_pid: u32, scenario: Scenario, options: &Options) -> Result<ScenarioResult> {
    println!("\n== {}: {}", scenario.name, scenario.what);
    println!("warm-up ({WARMUP_SECS}s, discarded)");
    scenario.generator.run(WARMUP_SECS)?;
    let mut rounds = Vec::new();
    for number in 0..options.rounds {
        let mut order = MODES;
        order.rotate_left(number as usize % MODES.len());
        let mut runs = Vec::new();
        for mode in order {
            println!(
                "\n{} round {}/{}: {}",
                scenario.name,
                number + 1,
                options.rounds,
                mode.name()
            );
            runs.push(measure(
                nginx_pid,
                &scenario.generator,
                mode,
                options.duration,
            )?);
        }
        runs.sort_by_key(|r| r.mode);
        rounds.push(runs);
    }
    Ok(ScenarioResult { scenario, rounds })
}

/// One run of the load in one mode, with what the agent and the kernel spent meanwhile.
fn measure(nginx_pid: u32, generator: &Generator, mode: Mode, secs: u64) -> Result<Run> {
    let pid = nginx_pid.to_string();
    let kspan = match mode {
        Mode::NoProbes => None,
        Mode::Floor => Some(Kspan::start(&["--pid", &pid, "--bench-floor"])?),
        Mode::Kspan => Some(Kspan::start(&["--pid", &pid])?),
    };
    // Readings after `ready`, so that startup (BTF parsing, loading, attaching) is left out.
    let before = kspan
        .as_ref()
        .map(|k| AgentReading::take(k.pid()))
        .transpose()?;
    let cpu_before = SystemCpu::read()?;
    let load = generator.run(secs)?;
    let system = SystemCpu::read()?.since(&cpu_before);
    let agent = match (kspan, before) {
        (Some(kspan), Some(before)) => {
            let after = AgentReading::take(kspan.pid())?;
            let peak_rss_kib = vm_hwm_kib(kspan.pid())?;
            let names = program_names(kspan.pid())?;
            let counters = kspan.stop()?;
            let agent = Agent::between(
                &before,
                &after,
                peak_rss_kib,
                &names,
                &counters,
                load.requests,
            )?;
            agent.print();
            Some(agent)
        }
        _ => None,
    };
    println!(
        "  machine: kernel {:.2} µs, user {:.2} µs per request, {:.0}% idle",
        system.kernel_secs * 1e6 / load.requests as f64,
        system.user_secs * 1e6 / load.requests as f64,
        system.idle_share() * 100.0
    );
    Ok(Run {
        mode,
        load,
        system,
        agent,
    })
}

// ---------------------------------------------------------------------------------------------
// Results

struct ScenarioResult {
    scenario: Scenario,
    /// Per round, the runs in `MODES` order.
    rounds: Vec<Vec<Run>>,
}

impl ScenarioResult {
    fn runs(&self, mode: Mode) -> impl Iterator<Item = &Run> {
        self.rounds.iter().map(move |round| &round[mode as usize])
    }

    fn median(&self, mode: Mode, f: impl Fn(&Run) -> f64) -> f64 {
        median(self.runs(mode).map(f).collect())
    }

    /// Median over rounds of a figure's ratio between two modes of the same round.
    fn ratio(&self, over: Mode, under: Mode, f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
        let ratios: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|round| Some(f(&round[over as usize])? / f(&round[under as usize])?))
            .collect();
        (!ratios.is_empty()).then(|| median(ratios))
    }

    fn agent_median(&self, mode: Mode, f: impl Fn(&Agent) -> f64) -> Option<f64> {
        let values: Vec<f64> = self
            .runs(mode)
            .filter_map(|r| r.agent.as_ref().map(&f))
            .collect();
        (!values.is_empty()).then(|| median(values))
    }

    fn events_lost(&self) -> u64 {
        self.runs(Mode::Kspan)
            .filter_map(|r| r.agent.as_ref())
            .map(|a| a.events_lost)
            .sum()
    }

    fn peak_rss_mib(&self) -> f64 {
        self.runs(Mode::Kspan)
            .filter_map(|r| r.agent.as_ref())
            .map(Agent::peak_rss_mib)
            .fold(0.0, f64::max)
    }

    /// The kspan figures above the floor's, per request.
    fn ebpf_above_floor_ns(&self) -> Option<f64> {
        Some(
            self.agent_median(Mode::Kspan, Agent::ebpf_ns_per_request)?
                - self.agent_median(Mode::Floor, Agent::ebpf_ns_per_request)?,
        )
    }

    fn to_json(&self) -> Value {
        let mut modes = serde_json::Map::new();
        for mode in MODES {
            modes.insert(
                mode.name().into(),
                json!({
                    "requests_per_sec": self.median(mode, |r| r.load.requests_per_sec),
                    "p50_us": self.median(mode, |r| r.load.p50_us),
                    "p99_us": self.median(mode, |r| r.load.p99_us),
                    "p999_us": self.scenario.generator_has_p999().then(|| self.median(mode, |r| r.load.p999_us.unwrap_or(f64::NAN))),
                    "kernel_us_per_request": self.median(mode, Run::kernel_us_per_request),
                    "user_us_per_request": self.median(mode, Run::user_us_per_request),
                    "idle_share": self.median(mode, |r| r.system.idle_share()),
                    "agent_cpu_us_per_request": self.agent_median(mode, Agent::cpu_us_per_request),
                    "ebpf_ns_per_request": self.agent_median(mode, Agent::ebpf_ns_per_request),
                    "ebpf_program_runs_per_request": self.agent_median(mode, Agent::ebpf_runs_per_request),
                    "runs": self.runs(mode).map(Run::to_json).collect::<Vec<_>>(),
                }),
            );
        }
        let ratios = |over, under| {
            json!({
                "throughput": self.ratio(over, under, |r| Some(r.load.requests_per_sec)),
                "p50": self.ratio(over, under, |r| Some(r.load.p50_us)),
                "p99": self.ratio(over, under, |r| Some(r.load.p99_us)),
                "p999": self.ratio(over, under, |r| r.load.p999_us),
            })
        };
        json!({
            "name": self.scenario.name,
            "what": self.scenario.what,
            "saturation": self.scenario.saturation,
            "modes": modes,
            "ratios": {
                "kspan/none": ratios(Mode::Kspan, Mode::NoProbes),
                "floor/none": ratios(Mode::Floor, Mode::NoProbes),
                "kspan/floor": ratios(Mode::Kspan, Mode::Floor),
            },
            "ebpf_above_floor_ns_per_request": self.ebpf_above_floor_ns(),
            "events_lost_total": self.events_lost(),
            "peak_rss_mib_max": self.peak_rss_mib(),
        })
    }
}

impl Scenario {
    fn generator_has_p999(&self) -> bool {
        matches!(self.generator, Generator::Oha { .. })
    }
}

struct Run {
    mode: Mode,
    load: Load,
    system: SystemCpu,
    /// None without probes.
    agent: Option<Agent>,
}

impl Run {
    fn kernel_us_per_request(&self) -> f64 {
        self.system.kernel_secs * 1e6 / self.load.requests as f64
    }

    fn user_us_per_request(&self) -> f64 {
        self.system.user_secs * 1e6 / self.load.requests as f64
    }

    fn to_json(&self) -> Value {
        let mut value = self.load.to_json();
        value["system"] = json!({
            "kernel_secs": self.system.kernel_secs,
            "user_secs": self.system.user_secs,
            "idle_secs": self.system.idle_secs,
        });
        if let Some(agent) = &self.agent {
            value["kspan"] = agent.to_json();
        }
        value
    }
}

/// The whole machine's CPU time by kind, from /proc/stat (all CPUs; the agent's share included).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SystemCpu {
    user_secs: f64,
    /// system + irq + softirq: the syscalls and everything the hooks add to them.
    kernel_secs: f64,
    idle_secs: f64,
}

impl SystemCpu {
    fn read() -> Result<SystemCpu> {
        let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        parse_proc_stat(&stat, clock_ticks_per_sec()?).context("no `cpu` line in /proc/stat")
    }

    fn since(&self, before: &SystemCpu) -> SystemCpu {
        SystemCpu {
            user_secs: self.user_secs - before.user_secs,
            kernel_secs: self.kernel_secs - before.kernel_secs,
            idle_secs: self.idle_secs - before.idle_secs,
        }
    }

    fn idle_share(&self) -> f64 {
        self.idle_secs / (self.user_secs + self.kernel_secs + self.idle_secs)
    }
}

/// `cpu  user nice system idle iowait irq softirq steal ...` in clock ticks.
fn parse_proc_stat(stat: &str, ticks_per_sec: f64) -> Option<SystemCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / ticks_per_sec;
    Some(SystemCpu {
        user_secs: at(0) + at(1),
        kernel_secs: at(2) + at(5) + at(6),
        idle_secs: at(3) + at(4),
    })
}

/// kspan's CPU time and its programs' counters at one moment.
struct AgentReading {
    cpu_ticks: u64,
    programs: BTreeMap<u64, ProgramStats>,
}

impl AgentReading {
    fn take(pid: u32) -> Result<AgentReading> {
        Ok(AgentReading {
            cpu_ticks: cpu_ticks(pid)?,
            programs: bpf_programs(pid)?,
        })
    }
}

/// What kspan (or the floor) cost during a run.
struct Agent {
    requests: u64,
    /// kspan's user + system CPU time during the run.
    cpu_secs: f64,
    /// Run time and invocations of its eBPF programs during the run, summed.
    ebpf_ns: u64,
    ebpf_runs: u64,
    bpf_programs: usize,
    peak_rss_kib: u64,
    events_lost: u64,
    spans_emitted: u64,
    /// The agent's longest stretch of work between two waits for events.
    longest_busy_us: u64,
    /// Per program, most time first.
    by_program: Vec<ProgramRun>,
}

struct ProgramRun {
    /// Tracepoint name, from the program's link.
    name: String,
    ns: u64,
    runs: u64,
}

impl Agent {
    fn between(
        before: &AgentReading,
        after: &AgentReading,
        peak_rss_kib: u64,
        names: &BTreeMap<u64, String>,
        counters: &BTreeMap<String, u64>,
        requests: u64,
    ) -> Result<Agent> {
        let mut ebpf_ns = 0;
        let mut ebpf_runs = 0;
        let mut by_program = Vec::new();
        for (id, now) in &after.programs {
            let then = before.programs.get(id).copied().unwrap_or_default();
            let ns = now.run_time_ns.saturating_sub(then.run_time_ns);
            let runs = now.run_cnt.saturating_sub(then.run_cnt);
            ebpf_ns += ns;
            ebpf_runs += runs;
            if runs > 0 {
                let name = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("prog {id}"));
                by_program.push(ProgramRun { name, ns, runs });
            }
        }
        by_program.sort_by_key(|p| std::cmp::Reverse(p.ns));
        let counter = |name: &str| {
            counters
                .get(name)
                .copied()
                .with_context(|| format!("kspan's counters line has no {name}="))
        };
        Ok(Agent {
            requests,
            cpu_secs: after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64
                / clock_ticks_per_sec()?,
            ebpf_ns,
            ebpf_runs,
            bpf_programs: after.programs.len(),
            peak_rss_kib,
            events_lost: counter("events_lost")?,
            spans_emitted: counter("spans_emitted")?,
            longest_busy_us: counter("longest_busy_us")?,
            by_program,
        })
    }

    fn per_request(&self, value: f64) -> f64 {
        value / self.requests as f64
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.per_request(self.cpu_secs * 1e6)
    }

    fn ebpf_ns_per_request(&self) -> f64 {
        self.per_request(self.ebpf_ns as f64)
    }

    fn ebpf_runs_per_request(&self) -> f64 {
        self.per_request(self.ebpf_runs as f64)
    }

    fn spans_per_request(&self) -> f64 {
        self.per_request(self.spans_emitted as f64)
    }

    fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }

    fn print(&self) {
        println!(
            "  agent: {:.2} µs CPU/request, {:.0} ns eBPF/request ({:.1} program runs/request, {} \
             programs), peak RSS {:.1} MiB, events lost {}, spans {} for {} requests, longest \
             busy stretch {} µs",
            self.cpu_us_per_request(),
            self.ebpf_ns_per_request(),
            self.ebpf_runs_per_request(),
            self.bpf_programs,
            self.peak_rss_mib(),
            self.events_lost,
            self.spans_emitted,
            self.requests,
            self.longest_busy_us,
        );
        // Where the eBPF time goes: the traced process's hooks and everyone else's.
        let parts: Vec<String> = self
            .by_program
            .iter()
            .take(8)
            .map(|p| {
                format!(
                    "{} {:.0} ns/run × {:.2}",
                    p.name,
                    p.ns as f64 / p.runs as f64,
                    self.per_request(p.runs as f64)
                )
            })
            .collect();
        println!("  eBPF by program (runs/request): {}", parts.join(", "));
    }

    fn to_json(&self) -> Value {
        json!({
            "cpu_secs": self.cpu_secs,
            "cpu_us_per_request": self.cpu_us_per_request(),
            "ebpf_ns": self.ebpf_ns,
            "ebpf_ns_per_request": self.ebpf_ns_per_request(),
            "ebpf_program_runs": self.ebpf_runs,
            "ebpf_program_runs_per_request": self.ebpf_runs_per_request(),
            "bpf_programs": self.bpf_programs,
            "peak_rss_kib": self.peak_rss_kib,
            "events_lost": self.events_lost,
            "spans_emitted": self.spans_emitted,
            "spans_per_request": self.spans_per_request(),
            "longest_busy_us": self.longest_busy_us,
            "ebpf_by_program": self.by_program.iter().map(|p| json!({
                "tracepoint": p.name,
                "ns_per_run": p.ns as f64 / p.runs as f64,
                "runs_per_request": self.per_request(p.runs as f64),
                "ns_per_request": self.per_request(p.ns as f64),
            })).collect::<Vec<_>>(),
        })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Every mode of every scenario (medians over the rounds), each scenario followed by its three
/// ratios (medians of the per-round ratios) in the same columns: one table.
fn print_modes(results: &[ScenarioResult]) {
    let line = |cells: [&str; 16]| {
        let widths = [11, 11, 9, 8, 8, 9, 9, 9, 6, 10, 9, 7, 8, 8, 5, 7];
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i < 2 {
                let _ = write!(text, "{cell:<width$} ");
            } else {
                let _ = write!(text, "{cell:>width$} ");
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut out = line([
        "scenario",
        "mode",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "kern µs/r",
        "user µs/r",
        "idle",
        "agent µs/r",
        "eBPF ns/r",
        "runs/r",
        "busy µs",
        "spans/r",
        "lost",
        "RSS MiB",
    ]);
    let optional = |v: Option<f64>, decimals: usize| {
        v.filter(|v| v.is_finite())
            .map_or("-".to_string(), |v| format!("{v:.decimals$}"))
    };
    for result in results {
        let name = result.scenario.name;
        for mode in MODES {
            let agent = |f: fn(&Agent) -> f64| result.agent_median(mode, f);
            let p999 = result
                .scenario
                .generator_has_p999()
                .then(|| result.median(mode, |r| r.load.p999_us.unwrap_or(f64::NAN)));
            let lost = (mode != Mode::NoProbes).then(|| {
                result
                    .runs(mode)
                    .filter_map(|r| r.agent.as_ref())
                    .map(|a| a.events_lost as f64)
                    .sum::<f64>()
            });
            let rss = (mode != Mode::NoProbes).then(|| {
                result
                    .runs(mode)
                    .filter_map(|r| r.agent.as_ref())
                    .map(Agent::peak_rss_mib)
                    .fold(0.0, f64::max)
            });
            out += &line([
                name,
                mode.name(),
                &format!("{:.0}", result.median(mode, |r| r.load.requests_per_sec)),
                &format!("{:.0}", result.median(mode, |r| r.load.p50_us)),
                &format!("{:.0}", result.median(mode, |r| r.load.p99_us)),
                &optional(p999, 0),
                &format!("{:.2}", result.median(mode, Run::kernel_us_per_request)),
                &format!("{:.2}", result.median(mode, Run::user_us_per_request)),
                &format!(
                    "{:.0}%",
                    result.median(mode, |r| r.system.idle_share()) * 100.0
                ),
                &optional(agent(Agent::cpu_us_per_request), 2),
                &optional(agent(Agent::ebpf_ns_per_request), 0),
                &optional(agent(Agent::ebpf_runs_per_request), 1),
                &optional(agent(|a| a.longest_busy_us as f64), 0),
                &optional(agent(Agent::spans_per_request), 3),
                &optional(lost, 0),
                &optional(rss, 1),
            ]);
        }
        for (over, under) in [
            (Mode::Kspan, Mode::NoProbes),
            (Mode::Floor, Mode::NoProbes),
            (Mode::Kspan, Mode::Floor),
        ] {
            let ratio = |f: fn(&Run) -> Option<f64>| optional(result.ratio(over, under, f), 3);
            out += &line([
                name,
                &format!("{}/{}", over.name(), under.name()),
                &ratio(|r| Some(r.load.requests_per_sec)),
                &ratio(|r| Some(r.load.p50_us)),
                &ratio(|r| Some(r.load.p99_us)),
                &ratio(|r| r.load.p999_us),
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            ]);
        }
    }
    print!("{out}");
}

/// eBPF time per program in kspan's mode, from the median run of each scenario.
fn print_ebpf(results: &[ScenarioResult]) {
    for result in results {
        let floor = result.agent_median(Mode::Floor, Agent::ebpf_ns_per_request);
        let kspan = result.agent_median(Mode::Kspan, Agent::ebpf_ns_per_request);
        let (Some(floor), Some(kspan)) = (floor, kspan) else {
            continue;
        };
        println!(
            "{}: eBPF {kspan:.0} ns/request with kspan, {floor:.0} with the floor's empty programs \
             (+{:.0} ns)",
            result.scenario.name,
            kspan - floor
        );
    }
}

#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// One line of the targets table.
struct Row {
    metric: String,
    value: f64,
    unit: &'static str,
    decimals: usize,
    target: Option<Bound>,
}

impl Row {
    fn met(&self) -> Option<bool> {
        match self.target? {
            Bound::AtLeast(min) => Some(self.value >= min),
            Bound::AtMost(max) => Some(self.value <= max),
        }
    }

    fn value_text(&self) -> String {
        let unit = if self.unit.is_empty() { "" } else { " " };
        format!("{:.*}{unit}{}", self.decimals, self.value, self.unit)
    }

    fn target_text(&self) -> String {
        let unit = if self.unit.is_empty() { "" } else { " " };
        match self.target {
            None => "-".into(),
            Some(Bound::AtLeast(min)) => format!(">= {min}{unit}{}", self.unit),
            Some(Bound::AtMost(0.0)) => "= 0".into(),
            Some(Bound::AtMost(max)) => format!("<= {max}{unit}{}", self.unit),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "target": self.target_text(),
            "met": self.met(),
        })
    }
}

/// The issue's targets, from the HTTP/1 scenarios and the scale runs.
fn rows(results: &[ScenarioResult], scale: &Scale) -> Vec<Row> {
    let row = |metric: String, value: Option<f64>, unit, decimals, target| Row {
        metric,
        value: value.unwrap_or(f64::NAN),
        unit,
        decimals,
        target: Some(target),
    };
    let mut rows = Vec::new();
    for result in results {
        let name = result.scenario.name;
        let ratio = |over, under, f: fn(&Run) -> Option<f64>| result.ratio(over, under, f);
        if result.scenario.saturation {
            rows.push(row(
                format!("{name}: throughput kspan/floor"),
                ratio(Mode::Kspan, Mode::Floor, |r| Some(r.load.requests_per_sec)),
                "",
                3,
                Bound::AtLeast(0.95),
            ));
            rows.push(row(
                format!("{name}: p99 kspan/floor"),
                ratio(Mode::Kspan, Mode::Floor, |r| Some(r.load.p99_us)),
                "",
                3,
                Bound::AtMost(1.25),
            ));
            rows.push(row(
                format!("{name}: events lost (all kspan runs)"),
                Some(result.events_lost() as f64),
                "",
                0,
                Bound::AtMost(0.0),
            ));
        } else {
            rows.push(row(
                format!("{name}: p99 kspan/none"),
                ratio(Mode::Kspan, Mode::NoProbes, |r| Some(r.load.p99_us)),
                "",
                3,
                Bound::AtMost(1.10),
            ));
            rows.push(row(
                format!("{name}: p99.9 kspan/none"),
                ratio(Mode::Kspan, Mode::NoProbes, |r| r.load.p999_us),
                "",
                3,
                Bound::AtMost(1.25),
            ));
        }
        if name.starts_with("http1") {
            rows.push(row(
                format!("{name}: agent CPU per request"),
                result.agent_median(Mode::Kspan, Agent::cpu_us_per_request),
                "µs",
                2,
                Bound::AtMost(1.0),
            ));
            rows.push(row(
                format!("{name}: eBPF time above the floor"),
                result.ebpf_above_floor_ns(),
                "ns",
                0,
                Bound::AtMost(600.0),
            ));
            rows.push(row(
                format!("{name}: agent's longest busy stretch (max)"),
                result
                    .runs(Mode::Kspan)
                    .filter_map(|r| r.agent.as_ref())
                    .map(|a| a.longest_busy_us as f64)
                    .reduce(f64::max),
                "µs",
                0,
                Bound::AtMost(500.0),
            ));
        }
    }
    if let Some(widest) = scale.connections.last() {
        rows.push(row(
            format!("peak RSS with {} connections", widest.connections),
            Some(widest.agent.peak_rss_mib()),
            "MiB",
            1,
            Bound::AtMost(64.0),
        ));
    }
    rows
}

fn print_table(rows: &[Row]) {
    let mut out = format!(
        "{:<46} {:>12} {:>12} {:>4}\n",
        "target", "value", "target", "met"
    );
    for row in rows {
        let met = match row.met() {
            None => "-",
            Some(true) => "yes",
            Some(false) => "no",
        };
        let _ = writeln!(
            out,
            "{:<46} {:>12} {:>12} {:>4}",
            row.metric,
            row.value_text(),
            row.target_text(),
            met
        );
    }
    print!("{out}");
}

// ---------------------------------------------------------------------------------------------
// Scale: many connections, many traced processes

/// Many keep-alive connections at once, with kspan (agent CPU and memory as the connection
/// table grows).
struct ConnectionsRun {
    connections: u32,
    load: Load,
    agent: Agent,
}

/// Many traced client processes (curl at a held rate each).
struct ProcessesRun {
    processes: u32,
    /// Agent CPU over the measured seconds, as a share of one CPU.
    agent_cpu_share: f64,
    rss_mib: f64,
}

struct Scale {
    connections: Vec<ConnectionsRun>,
    processes: Vec<ProcessesRun>,
    processes_spans: u64,
    processes_events_lost: u64,
}

/// Connection counts, then traced-process counts, each measured once with kspan.
fn scale(nginx_pid: u32, options: &Options) -> Result<Scale> {
    let mut connections = Vec::new();
    for count in SCALE_CONNECTION_STEPS {
        println!("\n== scale: {count} keep-alive connections (wrk -t1 -c{count}), kspan");
        let generator = Generator::Wrk {
            url: URL,
            connections: count,
        };
        let run = measure(nginx_pid, &generator, Mode::Kspan, options.duration)?;
        connections.push(ConnectionsRun {
            connections: count,
            load: run.load,
            agent: run.agent.expect("kspan mode has an agent"),
        });
    }

    println!(
        "\n== scale: traced processes (curl --rate {CURL_RATE}/s each, kspan --exe curl --pid nginx)"
    );
    let pid = nginx_pid.to_string();
    let kspan = Kspan::start(&["--exe", "curl", "--pid", &pid])?;
    let mut clients = Clients::default();
    let mut processes = Vec::new();
    for count in SCALE_PROCESS_STEPS {
        clients.grow_to(count)?;
        // Let the new processes start and the agent learn them before measuring.
        thread::sleep(Duration::from_secs(2));
        check_interrupted()?;
        let ticks = cpu_ticks(kspan.pid())?;
        let started = Instant::now();
        thread::sleep(Duration::from_secs(options.duration));
        check_interrupted()?;
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_ticks(kspan.pid())?.saturating_sub(ticks) as f64 / clock_ticks_per_sec()?;
        let run = ProcessesRun {
            processes: count,
            agent_cpu_share: cpu / secs,
            rss_mib: vm_rss_kib(kspan.pid())? as f64 / 1024.0,
        };
        println!(
            "  {count} processes: agent {:.1}% of a CPU, RSS {:.1} MiB",
            run.agent_cpu_share * 100.0,
            run.rss_mib
        );
        processes.push(run);
    }
    drop(clients);
    let counters = kspan.stop()?;
    Ok(Scale {
        connections,
        processes,
        processes_spans: counters.get("spans_emitted").copied().unwrap_or(0),
        processes_events_lost: counters.get("events_lost").copied().unwrap_or(0),
    })
}

impl Scale {
    fn print(&self) {
        println!(
            "{:<12} {:>9} {:>8} {:>10} {:>8} {:>6} {:>9}",
            "connections", "req/s", "p99 µs", "agent µs/r", "RSS MiB", "lost", "spans/r"
        );
        for run in &self.connections {
            println!(
                "{:<12} {:>9.0} {:>8.0} {:>10.2} {:>8.1} {:>6} {:>9.3}",
                run.connections,
                run.load.requests_per_sec,
                run.load.p99_us,
                run.agent.cpu_us_per_request(),
                run.agent.peak_rss_mib(),
                run.agent.events_lost,
                run.agent.spans_per_request()
            );
        }
        println!(
            "{:<12} {:>10} {:>8}   (each curl --rate {CURL_RATE}/s; {} spans, {} events lost in all)",
            "processes", "agent CPU", "RSS MiB", self.processes_spans, self.processes_events_lost
        );
        for run in &self.processes {
            println!(
                "{:<12} {:>9.1}% {:>8.1}",
                run.processes,
                run.agent_cpu_share * 100.0,
                run.rss_mib
            );
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "connections": self.connections.iter().map(|r| {
                let mut value = r.load.to_json();
                value["connections"] = r.connections.into();
                value["kspan"] = r.agent.to_json();
                value
            }).collect::<Vec<_>>(),
            "processes": {
                "curl_rate_per_sec": CURL_RATE,
                "spans_emitted": self.processes_spans,
                "events_lost": self.processes_events_lost,
                "steps": self.processes.iter().map(|r| json!({
                    "processes": r.processes,
                    "agent_cpu_share": r.agent_cpu_share,
                    "rss_mib": r.rss_mib,
                })).collect::<Vec<_>>(),
            },
        })
    }
}

/// The curl clients of the process-scale run, killed when dropped.
#[derive(Default)]
struct Clients {
    children: Vec<Child>,
}

impl Clients {
    fn grow_to(&mut self, count: u32) -> Result<()> {
        while self.children.len() < count as usize {
            // A URL range makes one curl send requests one after another on one keep-alive
            // connection, at the held rate, for longer than the run.
            let child = command("curl")
                .args(["-s", "--rate", &format!("{CURL_RATE}/s")])
                .arg(format!("{URL}[1-1000000]"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start curl")?;
            self.children.push(child);
        }
        Ok(())
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

/// CPU count, CPU model, kernel release, load average and package versions, for the record.
fn machine() -> Result<Value> {
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let kernel = output(command("uname").arg("-r")).context("`uname -r` failed")?;
    let version = |package| {
        output(command("dpkg-query").args(["-W", "-f=${Version}", package])).unwrap_or_default()
    };
    Ok(json!({
        "nproc": nproc,
        "model_name": model,
        "kernel": kernel.trim(),
        "loadavg": loadavg().1,
        "nginx_version": version("nginx"),
        "wrk_version": version("wrk"),
        "curl_version": version("curl"),
    }))
}

/// The 1-minute load average, and the 1, 5 and 15-minute ones as text.
fn loadavg() -> (f64, String) {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three: Vec<&str> = text.split_whitespace().take(3).collect();
    let one = three.first().and_then(|l| l.parse().ok()).unwrap_or(0.0);
    (one, three.join(" "))
}

// ---------------------------------------------------------------------------------------------
// nginx

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    let nofile = OPEN_FILES;
    format!(
        r#"# Written by `cargo xtask bench`; the system nginx configuration is not used.
worker_processes 1;
worker_cpu_affinity 01;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

worker_rlimit_nofile {nofile};

events {{
    worker_connections {nofile};
}}

http {{
    access_log off;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type text/plain;

    server {{
        listen {ADDR};
        location / {{
            return 200 "ok\n";
        }}
    }}

    server {{
        listen {HTTP2_ADDR} http2;
        location / {{
            return 200 "ok\n";
        }}
    }}

    server {{
        listen {TLS_ADDR} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location / {{
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

/// A self-signed P-256 certificate for the HTTPS server, by the `openssl` command.
fn make_certificate(dir: &Path) -> Result<()> {
    let mut cmd = command("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
    ])
    .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
    .arg("-keyout")
    .arg(dir.join("key.pem"))
    .arg("-out")
    .arg(dir.join("cert.pem"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    run_cmd(&mut cmd)
}

/// nginx in the foreground with our configuration; stopped when dropped.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Nginx> {
        for addr in [ADDR, HTTP2_ADDR, TLS_ADDR] {
            if TcpStream::connect(addr).is_ok() {
                bail!("something already listens on {addr}; stop it first");
            }
        }
        make_certificate(dir)?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(dir))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut cmd = command("nginx");
        // -e: the log for errors before the configuration is read (not the system's).
        cmd.arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null());
        let shown = display(&cmd);
        println!("$ {shown}");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let mut nginx = Nginx { child };
        let deadline = Instant::now() + NGINX_START_TIMEOUT;
        while TcpStream::connect(ADDR).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) before listening; see {}",
                    dir.join("nginx-error.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx does not answer on {ADDR} after {NGINX_START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let workers = fs::read_to_string(format!("/proc/{0}/task/{0}/children", nginx.pid()))
            .unwrap_or_default();
        println!(
            "nginx listening on {ADDR}: master {}, worker {} (CPU 0)",
            nginx.pid(),
            workers.trim()
        );
        Ok(nginx)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker, then exits. SIGKILL would orphan the worker.
        signal(self.pid(), libc::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            eprintln!("nginx ignored SIGTERM; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// kspan

/// kspan tracing nginx, its stderr read on a thread; killed if dropped before `stop`.
struct Kspan {
    child: Child,
    lines: Receiver<String>,
    stderr: Vec<String>,
}

impl Kspan {
    /// Start kspan with `args` (`--pid` of the nginx master selects its worker too) and wait
    /// for `ready`.
    fn start(args: &[&str]) -> Result<Kspan> {
        let mut cmd = command(kspan_bin());
        cmd.args(args)
            .args(["--output", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = display(&cmd);
        println!("$ {shown}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut kspan = Kspan {
            child,
            lines,
            stderr: Vec::new(),
        };
        kspan.wait_ready()?;
        Ok(kspan)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = is_ready_line(&line);
                    self.stderr.push(line);
                    if ready {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "kspan printed no `ready` line within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.stderr.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    check_interrupted()?;
                    let status = self.child.wait()?;
                    bail!(
                        "kspan exited ({status}) before `ready`; its stderr:\n{}",
                        self.stderr.join("\n")
                    );
                }
            }
        }
    }

    /// SIGINT, wait for the exit, return the counters from its last stderr line.
    fn stop(mut self) -> Result<BTreeMap<String, u64>> {
        signal(self.pid(), libc::SIGINT);
        let Some(status) = wait_exit(&mut self.child, STOP_TIMEOUT) else {
            bail!("kspan did not exit within {STOP_TIMEOUT:?} of SIGINT");
        };
        // The process is gone, so its stderr reaches end of file shortly.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(line);
        }
        if !status.success() {
            bail!(
                "kspan exited with {status} after SIGINT; its stderr:\n{}",
                self.stderr.join("\n")
            );
        }
        let last = self.stderr.last().map_or("", String::as_str);
        if !last.contains("events_lost=") {
            bail!("kspan's last stderr line is not its counters line: {last:?}");
        }
        let mut counters = parse_counters(last);
        // The line before it: the agent's longest busy stretch.
        if let Some(busy) = self
            .stderr
            .iter()
            .rev()
            .find(|l| l.contains("longest_busy_us="))
        {
            counters.extend(parse_counters(busy));
        }
        Ok(counters)
    }
}

impl Drop for Kspan {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kspan: ready: ...`; "already" and the like do not count.
fn is_ready_line(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word == "ready")
}

/// The `name=N` fields of kspan's `stopped:` line.
fn parse_counters(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|field| {
            let (name, value) = field.split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// /proc readers

/// User + system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}: {stat}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces: count fields after its closing one.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of proc(5) (utime, stime); fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> Result<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(ticks as f64)
}

/// Peak resident set size (VmHWM) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmHWM:")
}

/// Resident memory now.
fn vm_rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no {field} line in {path}"))
}

#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct ProgramStats {
    run_time_ns: u64,
    run_cnt: u64,
}

/// Run time and invocations of every BPF program a process holds an fd of, by program id.
fn bpf_programs(pid: u32) -> Result<BTreeMap<u64, ProgramStats>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut programs = BTreeMap::new();
    let mut without_stats = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        // An fd closed since the listing is simply skipped.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        match parse_program_fdinfo(&text) {
            Some((id, Some(stats))) => {
                programs.insert(id, stats);
            }
            Some((_, None)) => without_stats += 1,
            None => {}
        }
    }
    if programs.is_empty() && without_stats > 0 {
        bail!(
            "the fdinfo of kspan's BPF programs has no run_time_ns/run_cnt on this kernel: eBPF \
             time cannot be measured"
        );
    }
    if programs.is_empty() {
        bail!("no BPF program among the fds in {}", dir.display());
    }
    Ok(programs)
}

/// For a BPF program's fdinfo (it has `prog_type:`; a link's has `link_type:` and `prog_id:`
/// too, but no `prog_type:`): its id, and its statistics if the kernel reports them.
fn parse_program_fdinfo(text: &str) -> Option<(u64, Option<ProgramStats>)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    field("prog_type")?;
    let id = field("prog_id")?.parse().ok()?;
    let stats = (|| {
        Some(ProgramStats {
            run_time_ns: field("run_time_ns")?.parse().ok()?,
            run_cnt: field("run_cnt")?.parse().ok()?,
        })
    })();
    Some((id, stats))
}

/// Tracepoint names of the programs a process has linked, by program id (from the links' fdinfo);
/// a program attached to several tracepoints is named after all of them (`a+b`, sorted).
fn program_names(pid: u32) -> Result<BTreeMap<u64, String>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut names: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some((id, name)) = parse_link_fdinfo(&text) {
            names.entry(id).or_default().insert(name);
        }
    }
    Ok(names
        .into_iter()
        .map(|(id, names)| (id, names.into_iter().collect::<Vec<_>>().join("+")))
        .collect())
}

/// For a tracepoint link's fdinfo: the program id and the tracepoint name.
fn parse_link_fdinfo(text: &str) -> Option<(u64, String)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    field("link_type")?;
    let id = field("prog_id")?.parse().ok()?;
    Some((id, field("tp_name")?.to_string()))
}

/// kernel.bpf_stats_enabled set to 1; the previous value is restored when dropped.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_string();
        println!("$ echo 1 > {BPF_STATS}   (was {previous}; restored at the end)");
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        println!("$ echo {} > {BPF_STATS}", self.previous);
        if let Err(err) = fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "warning: cannot restore {BPF_STATS} to {}: {err}",
                self.previous
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and signals

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Wait up to `timeout` for the child to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C also reaches nginx, wrk and kspan (same process group), which stop. Instead of dying at
/// once, note it and fail after the current step, so that the guards still run.
fn catch_interrupt() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Criterion micro-benchmarks

/// Minimum pipeline throughput on one core, spans per second.
const PIPELINE_TARGET: f64 = 300_000.0;

/// kspan's bench targets (agent/benches/), all run: the HTTP/1 parser, the HTTP/2 parser and
/// whole path (gRPC), the Kafka parser and whole path (Produce, Fetch), the whole path
/// (HTTP/1), heap allocations.
const BENCHES: &[&str] = &["http1", "http2", "kafka", "pipeline", "allocations"];

/// `cargo bench -p kspan`: criterion's report, then the `BENCH <name> <value> <unit>` summary
/// lines each bench prints, added to the table and to target/bench/results.json, with the
/// per-protocol comparison (HTTP/1 keep-alive, HTTP/2 gRPC server and client sides, Kafka
/// producer and consumer).
fn criterion() -> Result<()> {
    let targets = bench_targets("kspan")?;
    let missing: Vec<&str> = BENCHES
        .iter()
        .copied()
        .filter(|b| !targets.iter().any(|t| t == b))
        .collect();
    if !missing.is_empty() {
        bail!(
            "kspan lacks the bench targets {} (agent/benches/, [[bench]] in agent/Cargo.toml)",
            missing.join(", ")
        );
    }
    let mut cmd = cargo(&["bench", "-p", "kspan"]);
    for bench in BENCHES {
        cmd.args(["--bench", bench]);
    }
    println!("$ {}", display(&cmd));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!("`cargo bench -p kspan` failed ({})", out.status);
    }
    let figures = bench_lines(&stdout);
    if figures.is_empty() {
        bail!("the criterion benchmarks printed no `BENCH` summary line");
    }
    println!("\n{:<48} {:>14}  unit", "micro-benchmark", "value");
    for (name, value, unit) in &figures {
        println!("{name:<48} {value:>14.2}  {unit}");
    }
    let pipeline = figures
        .iter()
        .find(|(name, ..)| name == "pipeline_keepalive_spans_per_sec")
        .map(|(_, value, _)| *value);
    if let Some(spans) = pipeline {
        println!(
            "pipeline on one core: {spans:.0} spans/s, target >= {PIPELINE_TARGET:.0}: {}",
            if spans >= PIPELINE_TARGET {
                "met"
            } else {
                "not met"
            }
        );
    }
    let protocols = protocol_rows(&figures);
    println!();
    print!("{}", protocol_table(&protocols));
    let path = target_dir().join("bench").join("results.json");
    let mut results: Value = fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    results["micro"] = figures
        .iter()
        .map(|(name, value, unit)| {
            (
                name.clone(),
                serde_json::json!({"value": value, "unit": unit}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    results["pipeline_target_met"] = serde_json::json!(pipeline.map(|s| s >= PIPELINE_TARGET));
    results["protocols"] = protocols_json(&protocols);
    fs::create_dir_all(path.parent().expect("results.json has a parent"))?;
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    let unmeasured = unmeasured(&protocols);
    if !unmeasured.is_empty() {
        bail!(
            "the benchmarks printed no `BENCH` line for {}",
            unmeasured.join(", ")
        );
    }
    Ok(())
}

/// Columns of the per-protocol comparison.
const COLUMNS: usize = 5;

/// The columns of the per-protocol comparison: JSON key and heading.
const PROTOCOLS: [(&str, &str); COLUMNS] = [
    ("http1_keepalive_server", "HTTP/1 server"),
    ("http2_grpc_server", "gRPC server"),
    ("http2_grpc_client", "gRPC client"),
    ("kafka_produce_client", "Kafka producer"),
    ("kafka_fetch_v16_client", "Kafka consumer"),
];

/// One figure per protocol column (HTTP/1 keep-alive as the server sees it; gRPC unary calls
/// on one HTTP/2 connection, server side and client side; Kafka on a client's connection,
/// Produce v10 of one message and Fetch v16 of ten), from the `BENCH` lines.
struct ProtocolRow {
    /// JSON key.
    key: &'static str,
    metric: &'static str,
    unit: &'static str,
    decimals: usize,
    /// `BENCH` names of the columns' figures.
    sources: [&'static str; COLUMNS],
    /// Per column; None when its line is missing.
    values: [Option<f64>; COLUMNS],
}

fn protocol_rows(figures: &[(String, f64, String)]) -> Vec<ProtocolRow> {
    let get = |name: &str| {
        figures
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, value, _)| *value)
    };
    // `http1_factor`: the HTTP/1 parser's figure is messages per second, two per exchange.
    let row = |key, metric, unit, decimals, sources: [&'static str; COLUMNS], http1_factor: f64| {
        let factors: [f64; COLUMNS] =
            std::array::from_fn(|i| if i == 0 { http1_factor } else { 1.0 });
        ProtocolRow {
            key,
            metric,
            unit,
            decimals,
            sources,
            values: std::array::from_fn(|i| get(sources[i]).map(|v| v * factors[i])),
        }
    };
    vec![
        row(
            "parser_exchanges_per_sec",
            "parser, one core",
            "exchanges/s",
            0,
            [
                "http1_keepalive_msgs_per_sec",
                "http2_grpc_server_calls_per_sec",
                "http2_grpc_client_calls_per_sec",
                "kafka_produce_client_exchanges_per_sec",
                "kafka_fetch_v16_client_exchanges_per_sec",
            ],
            0.5,
        ),
        row(
            "parser_allocs_per_exchange",
            "parser allocations",
            "allocs/exchange",
            2,
            [
                "http1_parser_allocs_per_request",
                "http2_parser_server_allocs_per_call",
                "http2_parser_client_allocs_per_call",
                "kafka_parser_produce_client_allocs_per_exchange",
                "kafka_parser_fetch_v16_client_allocs_per_exchange",
            ],
            1.0,
        ),
        row(
            "parser_bytes_per_exchange",
            "parser heap bytes",
            "bytes/exchange",
            0,
            [
                "http1_parser_bytes_per_request",
                "http2_parser_server_bytes_per_call",
                "http2_parser_client_bytes_per_call",
                "kafka_parser_produce_client_bytes_per_exchange",
                "kafka_parser_fetch_v16_client_bytes_per_exchange",
            ],
            1.0,
        ),
        row(
            "pipeline_spans_per_sec",
            "whole path, one core",
            "spans/s",
            0,
            [
                "pipeline_keepalive_spans_per_sec",
                "pipeline_http2_server_spans_per_sec",
                "pipeline_http2_client_spans_per_sec",
                "pipeline_kafka_producer_spans_per_sec",
                "pipeline_kafka_consumer_spans_per_sec",
            ],
            1.0,
        ),
        row(
            "pipeline_allocs_per_span",
            "whole path allocations",
            "allocs/span",
            2,
            [
                "pipeline_keepalive_allocs_per_span",
                "pipeline_http2_server_allocs_per_span",
                "pipeline_http2_client_allocs_per_span",
                "pipeline_kafka_producer_allocs_per_span",
                "pipeline_kafka_consumer_allocs_per_span",
            ],
            1.0,
        ),
        row(
            "pipeline_bytes_per_span",
            "whole path heap bytes",
            "bytes/span",
            0,
            [
                "pipeline_keepalive_bytes_per_span",
                "pipeline_http2_server_bytes_per_span",
                "pipeline_http2_client_bytes_per_span",
                "pipeline_kafka_producer_bytes_per_span",
                "pipeline_kafka_consumer_bytes_per_span",
            ],
            1.0,
        ),
    ]
}

fn protocol_table(rows: &[ProtocolRow]) -> String {
    let mut out = format!("{:<40}", "per protocol");
    for (_, heading) in PROTOCOLS {
        let _ = write!(out, " {heading:>14}");
    }
    out.push_str("  unit\n");
    for row in rows {
        let _ = write!(out, "{:<40}", row.metric);
        for value in row.values {
            match value {
                Some(v) => {
                    let _ = write!(out, " {v:>14.*}", row.decimals);
                }
                None => {
                    let _ = write!(out, " {:>14}", "-");
                }
            }
        }
        let _ = writeln!(out, "  {}", row.unit);
    }
    out
}

/// `{"http1_keepalive_server": {"parser_exchanges_per_sec": …, …}, "http2_grpc_server": …}`;
/// null for a figure that was not printed.
fn protocols_json(rows: &[ProtocolRow]) -> Value {
    PROTOCOLS
        .iter()
        .enumerate()
        .map(|(i, (protocol, _))| {
            let figures = rows
                .iter()
                .map(|row| (row.key.to_string(), json!(row.values[i])))
                .collect::<serde_json::Map<_, _>>();
            (protocol.to_string(), Value::Object(figures))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `BENCH` names the per-protocol comparison needs and did not get.
fn unmeasured(rows: &[ProtocolRow]) -> Vec<&'static str> {
    rows.iter()
        .flat_map(|row| {
            row.sources
                .iter()
                .zip(row.values)
                .filter(|(_, value)| value.is_none())
                .map(|(source, _)| *source)
        })
        .collect()
}

/// `BENCH <name> <value> <unit>` lines.
fn bench_lines(text: &str) -> Vec<(String, f64, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.strip_prefix("BENCH ")?.split_whitespace();
            let name = parts.next()?.to_string();
            let value = parts.next()?.parse().ok()?;
            let unit = parts.next()?.to_string();
            Some((name, value, unit))
        })
        .collect()
}

/// Names of the package's bench targets.
fn bench_targets(package: &str) -> Result<Vec<String>> {
    let metadata = output(&mut cargo(&[
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))
    .context("`cargo metadata` failed")?;
    let metadata: Value = serde_json::from_str(&metadata).context("bad `cargo metadata` JSON")?;
    let is_bench = |t: &Value| {
        t["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"))
    };
    Ok(metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == package)
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| is_bench(t))
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_kernel_time_counts_interrupts() {
        let stat = "cpu  1000 10 300 5000 40 20 30 0 0 0\ncpu0 500 5 150 2500 20 10 15 0 0 0\n";
        let cpu = parse_proc_stat(stat, 100.0).unwrap();
        assert_eq!(
            cpu,
            SystemCpu {
                user_secs: 10.1,
                kernel_secs: 3.5,
                idle_secs: 50.4,
            }
        );
        assert!(parse_proc_stat("cpu0 1 2 3\n", 100.0).is_none());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    #[test]
    fn ready_line_is_a_word() {
        assert!(is_ready_line(
            "kspan: ready: 29 tracepoints attached, tracing pid 1"
        ));
        assert!(!is_ready_line("[INFO] map already present"));
    }

    #[test]
    fn counters_line() {
        let counters = parse_counters(
            "kspan: stopped: events_received=31 events_lost=0 malformed_events=0 parse_errors=0 \
             spans_emitted=0 spans_sampled_out=0 spans_dropped=0 spans_exported=0 \
             export_failures=0 links_ambiguous=0 links_mismatched=0 connections_dropped=0 \
             kernel_read_errors=0 kernel_map_full=0",
        );
        assert_eq!(counters["events_lost"], 0);
        assert_eq!(counters["spans_emitted"], 0);
        assert_eq!(counters["events_received"], 31);
        assert_eq!(counters.len(), 14);
    }

    #[test]
    fn cpu_ticks_after_a_command_name_with_spaces() {
        let stat = "4242 (kspan (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 157 43 0 0 20 0 4 \
                    0 100 123456 789 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("4242 (kspan) S 1"), None);
    }

    /// /proc/PID/fdinfo of kspan's fds on Linux 6.18 (bpf_stats_enabled was 0).
    const FDINFO_PROGRAM: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
        prog_type:\t5\nprog_jited:\t1\nprog_tag:\tc156e564c87910bd\nmemlock:\t4096\n\
        prog_id:\t6602\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t0\n\
        verified_insns:\t103\n";
    const FDINFO_LINK: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\n\
        link_type:\tperf\nlink_id:\t5744\nprog_tag:\tc156e564c87910bd\nprog_id:\t6602\n\
        tp_name:\tsys_enter_read\nevent_type:\ttracepoint\ncookie:\t0\n";
    const FDINFO_MAP: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
        map_type:\t1\nkey_size:\t8\nvalue_size:\t48\nmax_entries:\t16384\nmap_flags:\t0x0\n\
        map_extra:\t0x0\nmemlock:\t1967200\nmap_id:\t1813\nfrozen:\t0\n";

    #[test]
    fn program_fdinfo_but_not_link_or_map() {
        let stats = ProgramStats::default();
        assert_eq!(
            parse_program_fdinfo(FDINFO_PROGRAM),
            Some((6602, Some(stats)))
        );
        let counting = FDINFO_PROGRAM
            .replace("run_time_ns:\t0", "run_time_ns:\t123456")
            .replace("run_cnt:\t0", "run_cnt:\t789");
        let stats = ProgramStats {
            run_time_ns: 123456,
            run_cnt: 789,
        };
        assert_eq!(parse_program_fdinfo(&counting), Some((6602, Some(stats))));
        // A kernel without program statistics in fdinfo.
        let old = FDINFO_PROGRAM.replace("run_time_ns:\t0\nrun_cnt:\t0\n", "");
        assert_eq!(parse_program_fdinfo(&old), Some((6602, None)));
        assert_eq!(parse_program_fdinfo(FDINFO_LINK), None);
        assert_eq!(parse_program_fdinfo(FDINFO_MAP), None);
    }

    #[test]
    fn link_fdinfo_names_its_program() {
        assert_eq!(
            parse_link_fdinfo(FDINFO_LINK),
            Some((6602, "sys_enter_read".to_string()))
        );
        assert_eq!(parse_link_fdinfo(FDINFO_PROGRAM), None);
        assert_eq!(parse_link_fdinfo(FDINFO_MAP), None);
    }
}

#[cfg(test)]
mod bench_line_tests {
    use super::*;

    #[test]
    fn reads_summary_lines_and_ignores_the_rest() {
        let text = "pipeline keepalive: 2769 ns/span\nBENCH pipeline_keepalive_spans_per_sec 361121 spans/s\nBENCH broken\nBENCH x 1.5 allocs/span\n";
        assert_eq!(
            bench_lines(text),
            vec![
                (
                    "pipeline_keepalive_spans_per_sec".to_string(),
                    361121.0,
                    "spans/s".to_string()
                ),
                ("x".to_string(), 1.5, "allocs/span".to_string()),
            ]
        );
    }

    /// What http1, http2, kafka, pipeline and allocations print, but the gRPC client side's
    /// whole-path lines.
    const FIGURES: &str = "\
BENCH http1_keepalive_msgs_per_sec 4000000 msgs/s
BENCH http1_keepalive_bytes_per_sec 1000000000 bytes/s
BENCH http2_grpc_server_calls_per_sec 1500000 calls/s
BENCH http2_grpc_server_ns_per_call 667 ns/call
BENCH http2_grpc_client_calls_per_sec 1400000 calls/s
BENCH http2_grpc_client_ns_per_call 714 ns/call
BENCH pipeline_keepalive_spans_per_sec 361121 spans/s
BENCH pipeline_http2_server_spans_per_sec 300000 spans/s
BENCH pipeline_keepalive_allocs_per_span 9.50 allocs/span
BENCH pipeline_keepalive_bytes_per_span 1500 bytes/span
BENCH pipeline_http2_server_allocs_per_span 11.25 allocs/span
BENCH pipeline_http2_server_bytes_per_span 1800 bytes/span
BENCH http1_parser_allocs_per_request 2.00 allocs/request
BENCH http1_parser_bytes_per_request 300 bytes/request
BENCH http2_parser_server_allocs_per_call 3.00 allocs/call
BENCH http2_parser_server_bytes_per_call 400 bytes/call
BENCH http2_parser_client_allocs_per_call 3.00 allocs/call
BENCH http2_parser_client_bytes_per_call 410 bytes/call
BENCH kafka_produce_client_exchanges_per_sec 900000 exchanges/s
BENCH kafka_produce_client_ns_per_exchange 1111 ns/exchange
BENCH kafka_produce_broker_exchanges_per_sec 850000 exchanges/s
BENCH kafka_fetch_v16_client_exchanges_per_sec 500000 exchanges/s
BENCH kafka_fetch_v16_broker_exchanges_per_sec 450000 exchanges/s
BENCH pipeline_kafka_producer_spans_per_sec 400000 spans/s
BENCH pipeline_kafka_consumer_spans_per_sec 120000 spans/s
BENCH pipeline_kafka_producer_allocs_per_span 13.17 allocs/span
BENCH pipeline_kafka_producer_bytes_per_span 2371 bytes/span
BENCH pipeline_kafka_consumer_allocs_per_span 46.00 allocs/span
BENCH pipeline_kafka_consumer_bytes_per_span 6988 bytes/span
BENCH kafka_parser_produce_client_allocs_per_exchange 10.00 allocs/exchange
BENCH kafka_parser_produce_client_bytes_per_exchange 1428 bytes/exchange
BENCH kafka_parser_fetch_v16_client_allocs_per_exchange 37.00 allocs/exchange
BENCH kafka_parser_fetch_v16_client_bytes_per_exchange 4884 bytes/exchange
";

    #[test]
    fn per_protocol_figures() {
        let rows = protocol_rows(&bench_lines(FIGURES));
        let row = |key: &str| rows.iter().find(|r| r.key == key).unwrap().values;
        // Two HTTP/1 messages per exchange; Kafka: the client's side, Fetch v16.
        assert_eq!(
            row("parser_exchanges_per_sec"),
            [Some(2e6), Some(1.5e6), Some(1.4e6), Some(9e5), Some(5e5)]
        );
        assert_eq!(
            row("pipeline_spans_per_sec"),
            [
                Some(361121.0),
                Some(300000.0),
                None,
                Some(400000.0),
                Some(120000.0)
            ]
        );
        assert_eq!(
            row("parser_allocs_per_exchange"),
            [Some(2.0), Some(3.0), Some(3.0), Some(10.0), Some(37.0)]
        );
        assert_eq!(
            unmeasured(&rows),
            [
                "pipeline_http2_client_spans_per_sec",
                "pipeline_http2_client_allocs_per_span",
                "pipeline_http2_client_bytes_per_span"
            ]
        );

        let json = protocols_json(&rows);
        assert_eq!(
            json["http1_keepalive_server"]["parser_exchanges_per_sec"],
            2e6
        );
        assert_eq!(json["http2_grpc_server"]["pipeline_allocs_per_span"], 11.25);
        assert!(json["http2_grpc_client"]["pipeline_spans_per_sec"].is_null());
        assert_eq!(
            json["kafka_fetch_v16_client"]["pipeline_allocs_per_span"],
            46.0
        );
        assert_eq!(json.as_object().unwrap().len(), 5);
        assert_eq!(
            json["http2_grpc_client"].as_object().unwrap().len(),
            rows.len()
        );

        let table = protocol_table(&rows);
        let line = |metric: &str| {
            table
                .lines()
                .find(|l| l.starts_with(metric))
                .unwrap()
                .split_whitespace()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("whole path, one core"),
            ["spans/s", "120000", "400000", "-", "300000", "361121"]
        );
        assert_eq!(
            line("parser allocations"),
            ["allocs/exchange", "37.00", "10.00", "3.00", "3.00", "2.00"]
        );
        let heading = table.lines().next().unwrap();
        assert!(heading.contains("gRPC client") && heading.ends_with("Kafka consumer  unit"));
    }

    #[test]
    fn every_protocol_figure_has_a_bench_line() {
        let all: String = FIGURES.to_string()
            + "BENCH pipeline_http2_client_spans_per_sec 1 spans/s\n\
               BENCH pipeline_http2_client_allocs_per_span 1 allocs/span\n\
               BENCH pipeline_http2_client_bytes_per_span 1 bytes/span\n";
        assert!(unmeasured(&protocol_rows(&bench_lines(&all))).is_empty());
    }
}
