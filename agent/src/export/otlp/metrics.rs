//! Periodic push of the metrics hub to an OTLP collector (OTEL_METRIC_EXPORT_INTERVAL, default
//! 60 s), with a final push at shutdown so short runs are not lost.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;

use super::{Signal, SignalTarget, build_metric_exporter, export_timeout, traces::Stop};
use crate::{metrics::MetricsHub, stats::Stats};

/// Time allowed at shutdown for the final push.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(1500);

pub fn export_interval() -> Duration {
    std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(60))
}

pub struct OtlpMetricsPusher {
    stop: Arc<Stop>,
    worker: Option<thread::JoinHandle<()>>,
}

impl OtlpMetricsPusher {
    pub fn start(target: &SignalTarget, hub: Arc<MetricsHub>, stats: Arc<Stats>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the OTLP metrics runtime")?;
        let exporter = {
            let _guard = runtime.enter();
            build_metric_exporter(target).context("cannot configure the OTLP metric exporter")?
        };
        let interval = export_interval();
        let timeout = export_timeout(Signal::Metrics);
        let stop = Arc::new(Stop::new(SHUTDOWN_BUDGET));
        let worker_stop = stop.clone();
        let worker = thread::Builder::new()
            .name("kspan-otlp-metrics".into())
            .spawn(move || {
                // One request per resource; after a stop request everything must end by the
                // stop's deadline.
                let push = |budget: Duration, interruptible: bool| {
                    let end = if interruptible {
                        Instant::now() + budget
                    } else {
                        worker_stop.deadline()
                    };
                    for metrics in hub.collect() {
                        let left = end.saturating_duration_since(Instant::now());
                        let result = runtime.block_on(async {
                            let export = tokio::time::timeout(left, exporter.export(&metrics));
                            if interruptible {
                                worker_stop.within_budget(export).await
                            } else {
                                Some(export.await)
                            }
                        });
                        match result {
                            Some(Ok(Ok(()))) => {}
                            None => return,
                            Some(failure) => {
                                Stats::add(&stats.export_failures, 1);
                                log::warn!("OTLP metrics export failed: {failure:?}");
                            }
                        }
                    }
                };
                loop {
                    runtime.block_on(async {
                        worker_stop
                            .unless_stopped(tokio::time::sleep(interval))
                            .await
                    });
                    if worker_stop.requested() {
                        break;
                    }
                    push(timeout, true);
                }
                push(SHUTDOWN_BUDGET, false);
                let _ = exporter.shutdown();
            })?;
        Ok(OtlpMetricsPusher {
            stop,
            worker: Some(worker),
        })
    }

    /// Final push, then stop, all within SHUTDOWN_BUDGET of the call.
    pub fn shutdown(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.stop.request();
            let _ = worker.join();
        }
    }
}

impl Drop for OtlpMetricsPusher {
    fn drop(&mut self) {
        self.shutdown();
    }
}
