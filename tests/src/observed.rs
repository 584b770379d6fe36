//! kspan with every live output on: OTLP/gRPC to a real receiver (metrics every second) and a
//! Prometheus endpoint, the setup of the tests that compare what kspan exports.

use crate::otlp_receiver::OtlpReceiver;
use crate::{Kspan, free_port};

pub struct Observed {
    pub kspan: Kspan,
    /// Decodes what kspan sent.
    pub rx: OtlpReceiver,
    /// `--prometheus-port`, on 127.0.0.1.
    pub prom_port: u16,
}

impl Observed {
    /// kspan with `selection` (which processes to trace) exporting to a new receiver, metrics
    /// every second, and Prometheus on a free port.
    pub fn start(selection: &[&str]) -> Observed {
        let rx = OtlpReceiver::start_grpc(0);
        let prom_port = free_port();
        let endpoint = rx.endpoint();
        let prom_arg = prom_port.to_string();
        let mut args = selection.to_vec();
        args.extend([
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--prometheus-port",
            &prom_arg,
        ]);
        let kspan = Kspan::start_with_env(&args, &[("OTEL_METRIC_EXPORT_INTERVAL", "1000")]);
        Observed {
            kspan,
            rx,
            prom_port,
        }
    }
}
