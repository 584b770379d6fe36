//! Command line and the top-level run loop.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, ValueEnum};
use kspan_common::{DEFAULT_CAPTURE, EVENT_HEADER_LEN, MAX_CAPTURE, MAX_CONNECTIONS};

use crate::{
    clock::Clock,
    config::ConfigFile,
    export::{
        self, SpanExporter,
        json::JsonExporter,
        otlp::{OtlpSettings, Signal, metrics::OtlpMetricsPusher, traces::OtlpTraceExporter},
        prometheus,
        text::TextExporter,
        tree::{TraceFilter, TreeExporter, TreeStyle},
    },
    linker::{LinkCounters, Linker},
    metrics::MetricsHub,
    pipeline::{ChannelSink, Finished, Limits, Pipeline, SPAN_BATCH},
    probes::{KernelCounters, ProbeOptions, Probes},
    process::{Discovery, Processes, Rule},
    stats::Stats,
    top::LiveTable,
    tracecontext::Sampler,
};

/// Spans waiting for the export thread; past this, spans are dropped and counted.
const SPAN_QUEUE: usize = 16384;
/// While events flow, the event loop drains the ring this often: each drain is then a small
/// slice of work. A 20 ms batch at 170k requests/s held a CPU for 12 ms at a time, and the traced
/// service waited behind it (p99 ×28 in `cargo xtask bench`).
const BUSY_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// When a drain found nothing, the next wait is this long, so an idle host is not woken a
/// thousand times a second. The kernel also wakes the agent when an eighth of the ring is full
/// (waking per event would cost a context switch per syscall); the interval bounds how late a
/// span can be.
const IDLE_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Ring records handled before the agent offers its CPU (`sched_yield`) and checks the stop
/// flag: ~0.3-0.7 ms of work. Smaller slices cut the p99 at saturation but interleave the agent
/// with the traced service so finely that the service's own eBPF programs run twice as slow
/// (docs/architecture.md, Overhead).
const DRAIN_SLICE: usize = 512;
/// The export thread's longest sleep without spans.
const EXPORT_TICK: Duration = Duration::from_millis(250);
/// How often the kernel's drop counters are mirrored into the agent's stats.
const KERNEL_COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Colour on stdout: `auto` asks for a terminal and no `NO_COLOR` (https://no-color.org).
    fn on_stdout(self) -> bool {
        use std::io::IsTerminal;
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// Each trace as a tree once it completes: nesting by parent, a time bar per span.
    Tree,
    /// One readable line per span.
    Text,
    /// One JSON object per span per line.
    Json,
    /// Nothing on stdout.
    None,
}

/// Zero-code tracing: eBPF on syscall tracepoints turns the HTTP traffic of unmodified processes
/// into OpenTelemetry spans.
#[derive(Debug, Parser)]
#[command(name = "kspan", version, about)]
pub struct Args {
    /// Settings and discovery rules from this YAML file (or the KSPAN_CONFIG variable); flags
    /// win over it. SIGHUP rereads its discovery rules. See the README's configuration
    /// reference.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Trace this process (and the children it forks). Repeatable. Selection flags replace the
    /// config file's include rules.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes whose executable file name matches NAME (glob), or whose full path
    /// matches it when NAME contains '/'. Repeatable.
    #[arg(long = "exe", value_name = "NAME")]
    pub exes: Vec<String>,
    /// Trace processes listening on this TCP port. Repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Where spans go on stdout. Default: tree on a terminal, text when stdout is not one
    /// (scripts keep one line per span), none when an OTLP endpoint is configured.
    #[arg(long, value_enum)]
    pub output: Option<Output>,
    /// Colour in the tree view: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// Tree view: show only traces with a span at least this long (`250us`, `10ms`, `1s`).
    #[arg(long, value_name = "DURATION", value_parser = crate::export::tree::parse_duration)]
    pub min_duration: Option<u64>,
    /// Tree view: show only traces with an error span.
    #[arg(long)]
    pub errors_only: bool,
    /// Tree view: show only traces with a span of this service (`service.name`).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// OTLP collector base URL (e.g. http://localhost:4318 for http/protobuf, :4317 for grpc).
    /// Wins over OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (default, as in the OpenTelemetry specification).
    /// Wins over OTEL_EXPORTER_OTLP_PROTOCOL.
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Serve metrics in Prometheus text format on 127.0.0.1:PORT (GET /metrics).
    #[arg(long, value_name = "PORT", conflicts_with = "prometheus_address")]
    pub prometheus_port: Option<u16>,
    /// Serve metrics in Prometheus text format on this address (e.g. 0.0.0.0:9464 for every
    /// interface, or the pod IP in a DaemonSet).
    #[arg(long, value_name = "ADDR:PORT")]
    pub prometheus_address: Option<std::net::SocketAddr>,
    /// Keep this fraction of traces (0 to 1): parent-based trace-id ratio sampling. Wins over
    /// OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (default: parentbased_always_on).
    #[arg(long, value_name = "RATIO")]
    pub sample_ratio: Option<f64>,
    /// Bytes captured per syscall (1 to 16384; default 4096). Enough for request and status
    /// lines and headers; bodies are skipped by length without being copied.
    #[arg(long, value_name = "N")]
    pub capture_bytes: Option<u32>,
    /// Kernel ring buffer size in MiB (power of two; default 8).
    #[arg(long, value_name = "MIB")]
    pub ring_mib: Option<u32>,
    /// Memory the protocol parsers may hold in all, in MiB (partial messages, requests in
    /// flight, HPACK tables; default 32). Past it the connections with the oldest partial
    /// messages lose their parser state (counted as parser_evictions_budget).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub parser_memory: Option<u32>,
    /// Seconds a message may stay incomplete (headers trickled in, slowloris) before its
    /// connection's parser state is dropped (counted as parser_evictions_timeout; default 30).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub partial_timeout: Option<u64>,
    /// Benchmarks only: attach programs that return at once to every tracepoint and TLS uprobe
    /// instead of kspan's (no events): the cost of the hooks alone (`cargo xtask bench`).
    #[arg(long, hide = true)]
    pub bench_floor: bool,
}

/// What the flags, the config file and the defaults say together: flags first, then the file.
/// (The OpenTelemetry environment variables come after both, where they apply.)
pub struct Settings {
    /// Reread on SIGHUP.
    config_path: Option<PathBuf>,
    /// The `--pid`, `--exe` and `--port` rules, kept for the rereads.
    flag_rules: Vec<Rule>,
    pub discovery: Discovery,
    pub output: Option<Output>,
    pub color: ColorChoice,
    pub trace_filter: TraceFilter,
    pub otlp: OtlpSettings,
    pub prometheus_address: Option<std::net::SocketAddr>,
    pub sample_ratio: Option<f64>,
    pub capture_bytes: u32,
    pub ring_mib: u32,
    pub parser_memory_mib: u32,
    pub partial_timeout: Duration,
    pub bench_floor: bool,
}

impl Settings {
    pub fn resolve(args: Args) -> Result<Settings> {
        let config_path = args.config.clone().or_else(|| {
            std::env::var_os("KSPAN_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let config = match &config_path {
            Some(path) => ConfigFile::load(path)?,
            None => ConfigFile::default(),
        };
        let mut flag_rules: Vec<Rule> = args.pids.iter().map(|&pid| Rule::pid(pid)).collect();
        for exe in &args.exes {
            flag_rules.push(Rule::exe(exe)?);
        }
        flag_rules.extend(args.ports.iter().map(|&port| Rule::port(port)));
        let discovery = Discovery::from_config(&config.discovery, flag_rules.clone());

        let capture_bytes = args
            .capture_bytes
            .or(config.capture.bytes.map(|v| v.0))
            .unwrap_or(DEFAULT_CAPTURE);
        if capture_bytes == 0 || capture_bytes as usize > MAX_CAPTURE {
            bail!("--capture-bytes must be between 1 and {MAX_CAPTURE}");
        }
        let ring_mib = args
            .ring_mib
            .or(config.capture.ring_mib.map(|v| v.0))
            .unwrap_or(8);
        if !ring_mib.is_power_of_two() || ring_mib > 1024 {
            bail!("--ring-mib must be a power of two up to 1024");
        }
        let sample_ratio = args.sample_ratio.or(config.sampling.ratio.map(|v| v.0));
        if let Some(ratio) = args.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            bail!("--sample-ratio must be between 0 and 1, got {ratio}");
        }
        // Loopback unless asked: the metrics describe the host's traffic.
        let prometheus_address = args
            .prometheus_address
            .or_else(|| {
                args.prometheus_port
                    .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            })
            .or(config.prometheus.address);
        Ok(Settings {
            config_path,
            flag_rules,
            discovery,
            output: args.output.or(config.output),
            color: args.color,
            trace_filter: TraceFilter {
                min_duration_ns: args.min_duration,
                errors_only: args.errors_only,
                service: args.service.clone(),
            },
            otlp: OtlpSettings {
                endpoint_flag: args.otlp_endpoint.or(config.otlp.endpoint),
                protocol_flag: args
                    .otlp_protocol
                    .or(config.otlp.protocol.map(|p| p.as_str().to_string())),
            },
            prometheus_address,
            sample_ratio,
            capture_bytes,
            ring_mib,
            parser_memory_mib: args
                .parser_memory
                .or(config.limits.parser_memory_mib.map(|v| v.0))
                .unwrap_or(32),
            partial_timeout: Duration::from_secs(
                args.partial_timeout
                    .or(config.limits.partial_timeout_secs.map(|v| v.0))
                    .unwrap_or(30),
            ),
            bench_floor: args.bench_floor,
        })
    }

    /// SIGHUP: the config file's discovery rules as they are now (the flags' still replace its
    /// include rules). Other settings need a restart.
    fn reread_discovery(&self) -> Result<Option<Discovery>> {
        let Some(path) = &self.config_path else {
            return Ok(None);
        };
        let config = ConfigFile::load(path)?;
        Ok(Some(Discovery::from_config(
            &config.discovery,
            self.flag_rules.clone(),
        )))
    }
}

/// `kspan graph`: traces like `kspan run`, then prints the service graph's edges.
#[derive(Debug, Parser)]
#[command(name = "kspan graph", version)]
pub struct GraphArgs {
    /// `text`: one line per edge; `dot`: a Graphviz digraph (`| dot -Tsvg > graph.svg`).
    #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
    pub format: GraphFormat,
    /// Stop after this long (`30s`, `5m` is `300s`); without it, at Ctrl-C or SIGTERM.
    #[arg(long, value_name = "DURATION", value_parser = crate::export::tree::parse_duration)]
    pub duration: Option<u64>,
    #[command(flatten)]
    pub run: Args,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
}

/// What a run does besides tracing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `kspan [run]`: spans to stdout and the configured exporters.
    Run,
    /// `kspan graph`: the service graph printed at the stop (spans not printed unless
    /// `--output` asks).
    Graph {
        format: GraphFormat,
        duration: Option<Duration>,
    },
    /// `kspan top`: a full-screen live view per service and route.
    Top,
}

/// `argv` parsed as `T`'s arguments, its help and errors naming the subcommand (`kspan top`,
/// not `kspan`).
fn parse_command<T: Parser>(
    argv: Vec<String>,
    name: &'static str,
    about: Option<&'static str>,
) -> T {
    let matches = subcommand::<T>(name, about).get_matches_from(argv);
    T::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `T`'s command line under the usage name `name`.
fn subcommand<T: CommandFactory>(name: &'static str, about: Option<&'static str>) -> clap::Command {
    let command = T::command().bin_name(name);
    match about {
        Some(about) => command.about(about),
        None => command,
    }
}

/// `kspan [run] ARGS`: `run` is optional, the default command; `check`, `graph` and `top` are
/// the others.
pub fn main() -> std::process::ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    let command = argv.get(1).cloned().unwrap_or_default();
    if command == "check" {
        return crate::check::main();
    }
    if ["run", "graph", "top"].contains(&command.as_str()) {
        argv.remove(1);
    }
    let (args, mode) = match command.as_str() {
        "graph" => {
            let graph: GraphArgs = parse_command(argv, "kspan graph", None);
            let mode = Mode::Graph {
                format: graph.format,
                duration: graph.duration.map(Duration::from_nanos),
            };
            (graph.run, mode)
        }
        "top" => {
            let about = "`kspan top`: traces like `kspan run` and shows requests per second, \
                         errors and latency per service and route, live, full screen";
            (parse_command(argv, "kspan top", Some(about)), Mode::Top)
        }
        _ => (Args::parse_from(argv), Mode::Run),
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    logger.format_timestamp(None).format_target(false);
    if mode == Mode::Top {
        // The screen is the view's: log lines would tear it. They are kept and printed after
        // the view closes.
        logger.target(env_logger::Target::Pipe(Box::new(
            crate::top::LogBuffer::shared(),
        )));
    }
    logger.init();
    match run_mode(args, mode) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kspan: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything downstream of the span queue: stdout and OTLP span exporters, RED metrics.
struct Exports {
    exporters: Vec<Box<dyn SpanExporter>>,
    metrics: Option<Arc<MetricsHub>>,
    metrics_pusher: Option<OtlpMetricsPusher>,
    /// `kspan top`'s rows.
    live: Option<Arc<Mutex<LiveTable>>>,
}

impl Exports {
    fn start(
        settings: &Settings,
        mode: Mode,
        processes: &mut Processes,
        stats: &Arc<Stats>,
        health: &Arc<prometheus::Health>,
    ) -> Result<Self> {
        let traces = settings.otlp.target(Signal::Traces)?;
        let metrics_target = settings.otlp.target(Signal::Metrics)?;
        let default_output = if traces.is_some() {
            Output::None
        } else if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Output::Tree
        } else {
            Output::Text
        };
        let mut exporters: Vec<Box<dyn SpanExporter>> = Vec::new();
        match settings.output.unwrap_or(default_output) {
            Output::Tree => exporters.push(Box::new(
                TreeExporter::new(
                    std::io::stdout(),
                    TreeStyle {
                        width: terminal_width(),
                        color: settings.color.on_stdout(),
                    },
                    settings.trace_filter.clone(),
                )
                .with_stats(stats.clone()),
            )),
            Output::Text => exporters.push(Box::new(TextExporter::new(std::io::stdout()))),
            Output::Json => exporters.push(Box::new(JsonExporter::new(std::io::stdout()))),
            Output::None => {}
        }
        if let Some(target) = &traces {
            log::info!("exporting traces over OTLP ({target:?})");
            exporters.push(Box::new(OtlpTraceExporter::start(target, stats.clone())?));
        }
        let prometheus_address = settings.prometheus_address;
        let graph = matches!(mode, Mode::Graph { .. });
        let metrics = if metrics_target.is_some() || prometheus_address.is_some() || graph {
            let agent = processes.resource(std::process::id());
            Some(Arc::new(MetricsHub::new(&agent, stats.clone())))
        } else {
            None
        };
        let metrics_pusher = match (&metrics_target, &metrics) {
            (Some(target), Some(hub)) => Some(OtlpMetricsPusher::start(
                target,
                hub.clone(),
                stats.clone(),
            )?),
            _ => None,
        };
        if let (Some(address), Some(hub)) = (prometheus_address, &metrics) {
            let hub = hub.clone();
            let collect = Arc::new(move || hub.collect());
            let (bound, _thread) = prometheus::serve(address, collect, health.clone())
                .with_context(|| format!("cannot serve Prometheus metrics on {address}"))?;
            log::info!("Prometheus metrics on http://{bound}/metrics");
        }
        Ok(Exports {
            exporters,
            metrics,
            metrics_pusher,
            live: (mode == Mode::Top).then(|| Arc::new(Mutex::new(LiveTable::new()))),
        })
    }

    /// The export thread: record metrics for every span, hand batches to each exporter. Returns
    /// when the pipeline drops its sender, after the last span.
    fn spawn(
        mut self,
        receiver: Receiver<Vec<Finished>>,
        stats: Arc<Stats>,
    ) -> Result<thread::JoinHandle<Result<Self>>> {
        let handle =
            thread::Builder::new()
                .name("kspan-export".into())
                .spawn(move || -> Result<Self> {
                    let mut batch = Vec::with_capacity(2 * SPAN_BATCH);
                    loop {
                        // Woken at least this often: an exporter holding spans for a while
                        // (the trace view waits for late children) prints them on time.
                        let first = match receiver.recv_timeout(EXPORT_TICK) {
                            Ok(first) => first,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                export::tick_all(&mut self.exporters, &stats);
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        };
                        let mut next = Some(first);
                        while let Some(finished_spans) = next {
                            for finished in finished_spans {
                                // Metrics count every request; only sampled traces are exported.
                                if let Some(hub) = &self.metrics {
                                    hub.record(&finished.span);
                                }
                                if let Some(live) = &self.live
                                    && let Ok(mut live) = live.lock()
                                {
                                    live.record(&finished.span);
                                }
                                if finished.metrics_only {
                                    // An empty Kafka fetch: a metrics point, not a span.
                                } else if finished.sampled {
                                    batch.push(finished.span);
                                } else {
                                    Stats::add(&stats.spans_sampled_out, 1);
                                }
                            }
                            next = if batch.len() < SPAN_BATCH {
                                receiver.try_recv().ok()
                            } else {
                                None
                            };
                        }
                        if batch.is_empty() {
                            continue;
                        }
                        export::export_to_all(&mut self.exporters, &batch, &stats);
                        batch.clear();
                    }
                    Ok(self)
                })?;
        Ok(handle)
    }

    /// Deliver what is queued: span exporters and the final metrics push run side by side, each
    /// bounded in time.
    fn shutdown(mut self) {
        let pusher = self
            .metrics_pusher
            .take()
            .map(|mut pusher| thread::spawn(move || pusher.shutdown()));
        for exporter in &mut self.exporters {
            if let Err(error) = exporter.shutdown() {
                log::warn!("exporter shutdown: {error}");
            }
        }
        if let Some(pusher) = pusher {
            let _ = pusher.join();
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    run_mode(args, Mode::Run)
}

pub fn run_mode(args: Args, mode: Mode) -> Result<()> {
    schedule_as_batch();
    let mut settings = Settings::resolve(args)?;
    match mode {
        // The screen is the live view's.
        Mode::Top => settings.output = Some(Output::None),
        // The graph is the output; spans only when asked for.
        Mode::Graph { .. } => settings.output = settings.output.or(Some(Output::None)),
        Mode::Run => {}
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install signal handler")?;
    }
    let reread = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reread.clone())
        .context("cannot install signal handler")?;

    let stats = Arc::new(Stats::default());
    let mut processes = Processes::new(settings.discovery.clone());
    // In a Kubernetes pod (or with a kubeconfig): the pods of this node, watched in the
    // background. Nothing on a plain host.
    if let Some(source) = crate::kubernetes::start(stats.clone()) {
        processes.set_kubernetes(source);
    }
    // /healthz and /readyz, served with the Prometheus metrics.
    let health = Arc::new(prometheus::Health::new());
    let exports = Exports::start(&settings, mode, &mut processes, &stats, &health)?;
    let live = exports.live.clone();

    let probes = Probes::load(&ProbeOptions {
        trace_all: processes.discovery().trace_all(),
        capture_bytes: settings.capture_bytes,
        ring_bytes: settings.ring_mib * 1024 * 1024,
        exe_names: processes.discovery().plain_exe_names(),
        floor: settings.bench_floor,
    })?;
    let Probes {
        mut attached,
        mut ring,
        maps,
        census,
    } = probes;
    let census_thread = spawn_census(census, stats.clone(), stop.clone())?;

    let (sender, receiver) = mpsc::sync_channel::<Vec<Finished>>(SPAN_QUEUE / SPAN_BATCH);
    let export_thread = exports.spawn(receiver, stats.clone())?;
    let sampler = Sampler::from_env_and_flag(
        std::env::var("OTEL_TRACES_SAMPLER").ok().as_deref(),
        std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().as_deref(),
        settings.sample_ratio,
    );
    log::debug!("sampler: {sampler:?}");
    let description = processes.discovery().describe();
    let mut pipeline = Pipeline::new(
        maps,
        ChannelSink::new(sender, stats.clone()),
        processes,
        Limits {
            connections: MAX_CONNECTIONS as usize,
            parser_memory: (settings.parser_memory_mib as usize) << 20,
            partial_timeout: settings.partial_timeout,
        },
        Clock::calibrate(),
        stats.clone(),
        Linker::new(sampler),
    );
    pipeline.start();
    // The host's libssl, then the TLS libraries of the processes selected at start, are
    // attached before kspan says it is ready.
    if settings.bench_floor {
        eprintln!(
            "kspan: --bench-floor: every tracepoint and uprobe runs a program that returns at once"
        );
    }
    if crate::probes::tls::uprobes_available() {
        Stats::add(
            &stats.tls_libraries_attached,
            attached.attach_host_tls_libraries(),
        );
    }
    attach_tls_libraries(&mut attached, &mut pipeline, &stats);
    health.set_ready(true);
    eprintln!(
        "kspan: ready: {} tracepoints attached, {}, tracing {description}",
        crate::probes::TRACEPOINT_COUNT,
        if crate::probes::tls::uprobes_available() {
            "uprobes available (TLS plaintext read from OpenSSL)"
        } else {
            "uprobes unavailable (CONFIG_UPROBE_EVENTS off: TLS traffic is not seen)"
        }
    );

    let view = match (mode, live) {
        (Mode::Top, Some(live)) => {
            let (stats, stop) = (stats.clone(), stop.clone());
            Some(
                thread::Builder::new()
                    .name("kspan-top".into())
                    .spawn(move || crate::top::run(live, stats, stop))?,
            )
        }
        _ => None,
    };
    if let Mode::Graph {
        duration: Some(duration),
        ..
    } = mode
    {
        let stop = stop.clone();
        thread::Builder::new()
            .name("kspan-duration".into())
            .spawn(move || {
                thread::sleep(duration);
                stop.store(true, Ordering::Relaxed);
            })?;
    }

    let mut counters_read = Instant::now();
    let mut losses = 0;
    // The longest stretch of work between two waits, in this thread's CPU time: while the
    // agent works it holds a CPU the traced services may want (reported at the stop, measured
    // by `cargo xtask bench`).
    let mut busy_since = thread_cpu_time();
    let mut longest_busy = Duration::ZERO;
    // Records the last slice handled: a full slice means a backlog, none means idle.
    let mut drained_last = 0;
    let mut housekept = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        health.record_pass();
        longest_busy = longest_busy.max(thread_cpu_time().saturating_sub(busy_since));
        if drained_last == DRAIN_SLICE {
            // More is waiting: no wait, but the CPU is offered to whatever else is runnable
            // on it (the traced service) between two slices, so that a backlog is worked off
            // in slices rather than in one stretch of milliseconds.
            // SAFETY: no arguments.
            unsafe { libc::sched_yield() };
        } else {
            let wait = if drained_last > 0 {
                BUSY_POLL_INTERVAL
            } else {
                IDLE_POLL_INTERVAL
            };
            crate::probes::wait_for_events(&ring, wait);
        }
        busy_since = thread_cpu_time();
        // Bounded slices, so that under sustained load the stop flag, the flushes and the
        // counters are still served between them.
        let mut drained = 0;
        while drained < DRAIN_SLICE
            && let Some(record) = ring.next()
        {
            pipeline.handle_record(&record);
            drained += 1;
        }
        drained_last = drained;
        // Within a backlog the rest (flushes, counters, TLS attachments) runs once a
        // millisecond, not after every slice.
        if drained == DRAIN_SLICE && housekept.elapsed() < BUSY_POLL_INTERVAL {
            continue;
        }
        housekept = Instant::now();
        if reread.swap(false, Ordering::Relaxed) {
            reread_discovery(&settings, &mut pipeline);
        }
        pipeline.poll_kubernetes();
        attach_tls_libraries(&mut attached, &mut pipeline, &stats);
        pipeline.flush();
        mirror_link_counters(&stats, &pipeline.linker().counters);
        if counters_read.elapsed() >= KERNEL_COUNTERS_INTERVAL {
            let kernel = pipeline.kernel().counters();
            mirror_kernel_counters(&stats, &kernel);
            // A lost event may have been a response's start: no thread is left serving a
            // request that ended unseen.
            let now_lost = kernel.events_lost + kernel.program_misses;
            if now_lost > losses {
                pipeline.on_events_lost();
                losses = now_lost;
            }
            counters_read = Instant::now();
        }
    }
    // The programs first stop copying (selected processes: the pre-filter says none is
    // traced). Detaching them waits for a kernel grace period per tracepoint, serialized in the
    // kernel, seconds when every core is busy in syscalls: it starts now, alongside the last
    // drain and the export flush (the maps stay alive: they are the pipeline's). The ring is
    // drained of what it held at the signal and no more, since until detached the programs may
    // refill it as fast as it is read (trace-all has no pre-filter): it holds at most this many
    // records (each is a header at least, behind the ring's 8-byte record header).
    let stopping = Instant::now();
    health.set_ready(false);
    pipeline.kernel().silence();
    let detach = thread::spawn(move || {
        attached.detach();
        log::debug!("stop: programs detached after {:?}", stopping.elapsed());
    });
    let queued_at_most = settings.ring_mib as usize * 1024 * 1024 / (8 + EVENT_HEADER_LEN);
    let mut drained = 0;
    while drained < queued_at_most
        && let Some(record) = ring.next()
    {
        pipeline.handle_record(&record);
        drained += 1;
    }
    pipeline.shutdown();
    log::debug!(
        "stop: {drained} records drained in {:?}",
        stopping.elapsed()
    );
    let kernel = pipeline.kernel().counters();
    mirror_kernel_counters(&stats, &kernel);
    let skipped = pipeline.kernel().skipped_programs();
    if !skipped.is_empty() {
        log::warn!(
            "the kernel skipped runs of kspan's programs, because another BPF program was running \
             on the CPU (a program preempted inside, where syscall tracepoints are preemptible): \
             {skipped:?}; those syscalls were not seen"
        );
    }
    mirror_link_counters(&stats, &pipeline.linker().counters);
    drop(ring);
    drop(pipeline); // closes the span queue: the export thread finishes
    let _ = census_thread.join();
    let exports = export_thread
        .join()
        .map_err(|_| anyhow::anyhow!("export thread panicked"))??;
    if let Some(view) = view {
        // It saw the stop flag (or set it) and has restored the terminal.
        let _ = view.join();
        crate::top::LogBuffer::print_to_stderr();
    }
    if let (Mode::Graph { format, .. }, Some(hub)) = (mode, &exports.metrics) {
        let edges = hub.service_graph_edges();
        let text = match format {
            GraphFormat::Text => crate::service_graph::render_text(&edges),
            GraphFormat::Dot => crate::service_graph::render_dot(&edges),
        };
        print!("{text}");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    exports.shutdown();
    log::debug!("stop: exports flushed after {:?}", stopping.elapsed());
    let _ = detach.join();

    eprintln!(
        "kspan: longest stretch of work between two waits for events: longest_busy_us={}",
        longest_busy.as_micros()
    );
    eprintln!("kspan: stopped: {}", stats.stop_line());
    Ok(())
}

/// SIGHUP: the config file's discovery rules again, every process judged by them. A file that
/// does not read leaves the running rules in place.
fn reread_discovery<K: crate::probes::KernelControl, S: crate::pipeline::SpanSink>(
    settings: &Settings,
    pipeline: &mut Pipeline<K, S>,
) {
    let discovery = match settings.reread_discovery() {
        Ok(Some(discovery)) => discovery,
        Ok(None) => {
            log::info!("SIGHUP: no config file to reread (--config or KSPAN_CONFIG)");
            return;
        }
        Err(error) => {
            log::error!("SIGHUP: {error:#}; the running discovery rules stay");
            return;
        }
    };
    let description = discovery.describe();
    match pipeline.reselect(discovery) {
        Ok(change) => eprintln!(
            "kspan: rules reread: tracing {description} ({} more processes, {} fewer)",
            change.newly_selected.len(),
            change.dropped
        ),
        Err(error) => log::error!("SIGHUP: {error:#}; the running discovery rules stay"),
    }
}

/// The looks at processes' maps for TLS libraries the pipeline asked for, with the uprobes
/// they attach (milliseconds per new library file; nothing for a file already examined).
fn attach_tls_libraries(
    attached: &mut crate::probes::Attached,
    pipeline: &mut Pipeline<crate::probes::KernelMaps, ChannelSink>,
    stats: &Stats,
) {
    for pid in pipeline.take_tls_scans() {
        let scan = attached.scan_tls_libraries(pid);
        if let Some(scan) = scan
            && scan.attached > 0
        {
            Stats::add(&stats.tls_libraries_attached, scan.attached);
        }
        pipeline.tls_scanned(pid, scan.map(|s| s.visible));
    }
}

fn mirror_kernel_counters(stats: &Stats, kernel: &KernelCounters) {
    Stats::set(&stats.events_lost, kernel.events_lost);
    Stats::set(&stats.program_misses, kernel.program_misses);
    Stats::set(
        &stats.kernel_read_errors,
        kernel.read_errors + kernel.socket_lookup_errors,
    );
    Stats::set(
        &stats.kernel_map_full,
        kernel.connections_map_full + kernel.traced_pids_map_full,
    );
    Stats::set(&stats.in_flight_collisions, kernel.in_flight_collisions);
    Stats::set(&stats.scratch_busy, kernel.scratch_busy);
    Stats::set(&stats.tls_unbound, kernel.tls_unbound);
}

/// Three stores per loop, not per event: the linker's counters stay plain integers.
/// How often the kernel maps' fill levels are counted (see `probes::census`).
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);

/// The census thread: counts the kernel maps every [`CENSUS_INTERVAL`] into the stats' gauges
/// until `stop`.
fn spawn_census(
    census: crate::probes::census::MapCensus,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("kspan-census".into())
        .spawn(move || {
            let mut counted: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) {
                if counted.is_none_or(|at| at.elapsed() >= CENSUS_INTERVAL) {
                    let fill = census.count();
                    Stats::set(&stats.kernel_connections, fill.connections);
                    Stats::set(&stats.kernel_traced_pids, fill.traced_pids);
                    Stats::set(&stats.kernel_prefilter_slots, fill.prefilter_slots);
                    counted = Some(Instant::now());
                }
                // Short sleeps: the stop is not held up by a whole interval.
                thread::sleep(Duration::from_millis(100));
            }
        })
        .context("cannot start the map census thread")
}

fn mirror_link_counters(stats: &Stats, links: &LinkCounters) {
    Stats::set(&stats.links_ambiguous, links.ambiguous);
    Stats::set(&stats.links_mismatched, links.mismatched);
    Stats::set(&stats.links_late, links.late);
    Stats::set(&stats.links_dropped, links.dropped);
}

/// Every thread of kspan (they inherit it) under SCHED_BATCH: a kspan thread that wakes does
/// not preempt the service thread running on its CPU, it runs when that thread's slice ends.
/// The ring buffer absorbs the wait. Without it the agent's wake-ups cut into nginx's slices
/// and showed as p99 spikes (`cargo xtask bench`).
fn schedule_as_batch() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param for the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        log::debug!(
            "cannot schedule kspan as SCHED_BATCH: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Columns of the terminal on stdout: `COLUMNS`, else the terminal's size, else 120.
fn terminal_width() -> usize {
    if let Some(columns) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return columns;
    }
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize; a non-terminal stdout fails and leaves it zeroed.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        120
    }
}
