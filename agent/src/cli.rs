//! Command line and the top-level run loop.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use kspan_common::{DEFAULT_CAPTURE, MAX_CAPTURE, MAX_CONNECTIONS};

use crate::{
    clock::Clock,
    export::{SpanExporter, json::JsonExporter, text::TextExporter},
    pipeline::{ChannelSink, Pipeline},
    probes::{ProbeOptions, Probes},
    process::{Processes, Selectors},
    spans::Span,
    stats::Stats,
};

/// Spans waiting for the exporter; past this, spans are dropped and counted.
const SPAN_QUEUE: usize = 16384;
/// The longest the event loop sleeps before checking for a stop signal.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
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
    /// Trace this process (and the children it forks). Repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace processes whose executable file name matches NAME (glob), or whose full path
    /// matches it when NAME contains '/'. Repeatable.
    #[arg(long = "exe", value_name = "NAME")]
    pub exes: Vec<String>,
    /// Trace processes listening on this TCP port. Repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Where spans go.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Bytes captured per syscall (1 to 16384). Enough for request and status lines and headers;
    /// bodies are skipped by length without being copied.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CAPTURE)]
    pub capture_bytes: u32,
    /// Kernel ring buffer size in MiB (power of two).
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub ring_mib: u32,
}

/// `kspan [run] ARGS`: `run` is optional, the default command.
pub fn main() -> std::process::ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("run") {
        argv.remove(1);
    }
    let args = Args::parse_from(argv);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .format_target(false)
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kspan: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.capture_bytes == 0 || args.capture_bytes as usize > MAX_CAPTURE {
        bail!("--capture-bytes must be between 1 and {MAX_CAPTURE}");
    }
    if !args.ring_mib.is_power_of_two() || args.ring_mib > 1024 {
        bail!("--ring-mib must be a power of two up to 1024");
    }
    let selectors = Selectors::new(args.pids.clone(), &args.exes, args.ports.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install signal handler")?;
    }

    let probes = Probes::load(&ProbeOptions {
        trace_all: selectors.trace_all(),
        capture_bytes: args.capture_bytes,
        ring_bytes: args.ring_mib * 1024 * 1024,
    })?;
    let Probes {
        _ebpf: ebpf,
        mut ring,
        maps,
    } = probes;

    let stats = Arc::new(Stats::default());
    let (sender, receiver) = mpsc::sync_channel::<Span>(SPAN_QUEUE);
    let exporter = spawn_exporter(args.output, receiver)?;
    let description = selectors.describe();
    let mut pipeline = Pipeline::new(
        maps,
        ChannelSink {
            sender,
            stats: stats.clone(),
        },
        Processes::new(selectors),
        MAX_CONNECTIONS as usize,
        Clock::calibrate(),
        stats.clone(),
    );
    pipeline.start();
    eprintln!(
        "kspan: ready: {} tracepoints attached, tracing {description}",
        crate::probes::TRACEPOINT_COUNT
    );

    while !stop.load(Ordering::Relaxed) {
        crate::probes::wait_for_events(&ring, POLL_INTERVAL);
        while let Some(record) = ring.next() {
            pipeline.handle_record(&record);
        }
    }
    // Everything the kernel queued before the signal.
    while let Some(record) = ring.next() {
        pipeline.handle_record(&record);
    }
    let kernel = pipeline.kernel().counters();
    drop(ring);
    drop(pipeline);
    drop(ebpf); // detaches every program
    exporter
        .join()
        .map_err(|_| anyhow::anyhow!("exporter thread panicked"))??;

    Stats::add(&stats.events_lost, kernel.events_lost);
    eprintln!(
        "kspan: stopped: events_received={} events_lost={} malformed_events={} parse_errors={} \
         spans_emitted={} spans_dropped={} connections_dropped={} kernel_read_errors={} \
         kernel_map_full={}",
        Stats::get(&stats.events_received),
        Stats::get(&stats.events_lost),
        Stats::get(&stats.malformed_events),
        Stats::get(&stats.parse_errors),
        Stats::get(&stats.spans_emitted),
        Stats::get(&stats.spans_dropped),
        Stats::get(&stats.connections_dropped),
        kernel.read_errors + kernel.socket_lookup_errors,
        kernel.args_map_full + kernel.connections_map_full + kernel.traced_pids_map_full,
    );
    Ok(())
}

fn spawn_exporter(
    output: Output,
    receiver: Receiver<Span>,
) -> Result<thread::JoinHandle<Result<()>>> {
    let mut exporter: Option<Box<dyn SpanExporter>> = match output {
        Output::Text => Some(Box::new(TextExporter::new(std::io::stdout()))),
        Output::Json => Some(Box::new(JsonExporter::new(std::io::stdout()))),
        Output::None => None,
    };
    let handle =
        thread::Builder::new()
            .name("kspan-export".into())
            .spawn(move || -> Result<()> {
                let mut batch = Vec::with_capacity(256);
                // Ends when the pipeline drops its sender, after the last span.
                while let Ok(span) = receiver.recv() {
                    batch.push(span);
                    while batch.len() < 256
                        && let Ok(span) = receiver.try_recv()
                    {
                        batch.push(span);
                    }
                    if let Some(exporter) = exporter.as_mut() {
                        exporter.export(&batch)?;
                        exporter.flush()?;
                    }
                    batch.clear();
                }
                if let Some(exporter) = exporter.as_mut() {
                    exporter.flush()?;
                }
                std::io::stdout().flush()?;
                Ok(())
            })?;
    Ok(handle)
}
