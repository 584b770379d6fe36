//! Head sampling with OpenTelemetry SDK semantics (`OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`), plus kspan's `--sample-ratio` flag.

use super::SpanContext;

/// 2^63 as f64: the trace-id-ratio threshold scale.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;

/// A sampling policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keep this fraction of traces, decided deterministically from the trace id.
    TraceIdRatio(f64),
    /// Follow the parent's sampled flag; for root spans ask the inner (root) sampler.
    ParentBased(Box<Sampler>),
}

impl Default for Sampler {
    /// `parentbased_always_on`, the OpenTelemetry default.
    fn default() -> Self {
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
    }
}

impl Sampler {
    /// Builds the sampler from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` and the
    /// `--sample-ratio` flag.
    ///
    /// - The flag wins: `Some(r)` means `parentbased_traceidratio` with ratio `r` (an invalid `r`,
    ///   i.e. NaN or outside `[0, 1]`, logs a warning and uses 1.0).
    /// - Sampler names (`always_on`, `always_off`, `traceidratio`, `parentbased_always_on`,
    ///   `parentbased_always_off`, `parentbased_traceidratio`) are matched case-insensitively after
    ///   trimming; unset or empty means the default `parentbased_always_on`; an unknown or
    ///   unsupported name (e.g. `jaeger_remote`, `xray`) logs a warning and falls back to the default.
    /// - The argument is read only by the ratio samplers: unset or empty means 1.0; a value that is
    ///   not a number in `[0, 1]` logs a warning and uses 1.0. Other samplers ignore it.
    pub fn from_env_and_flag(
        sampler: Option<&str>,
        arg: Option<&str>,
        flag_ratio: Option<f64>,
    ) -> Sampler {
        if let Some(r) = flag_ratio {
            let ratio = if valid_ratio(r) {
                r
            } else {
                log::warn!("--sample-ratio {r} is not in [0, 1]; using 1.0");
                1.0
            };
            return Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(ratio)));
        }
        let name = sampler.map(str::trim).unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "" | "parentbased_always_on" => Sampler::default(),
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "traceidratio" => Sampler::TraceIdRatio(ratio_arg(arg)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(ratio_arg(arg))))
            }
            _ => {
                log::warn!(
                    "OTEL_TRACES_SAMPLER={:?} is not supported; using parentbased_always_on",
                    sampler.unwrap_or_default()
                );
                Sampler::default()
            }
        }
    }

    /// Decides for a span with this trace id and optional parent (`parent.sampled` is the parent's
    /// flag). A pure function of (trace id, parent sampled flag), so every span of a trace decides
    /// alike, in every process using the same ratio.
    pub fn should_sample(&self, trace_id: &[u8; 16], parent: Option<&SpanContext>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(ratio) => ratio_keeps(*ratio, trace_id),
            Sampler::ParentBased(root) => match parent {
                Some(p) => p.sampled,
                None => root.should_sample(trace_id, None),
            },
        }
    }
}

fn valid_ratio(r: f64) -> bool {
    (0.0..=1.0).contains(&r)
}

/// `OTEL_TRACES_SAMPLER_ARG` for the ratio samplers: default 1.0, invalid → warning and 1.0.
fn ratio_arg(arg: Option<&str>) -> f64 {
    let raw = arg.map(str::trim).unwrap_or("");
    if raw.is_empty() {
        return 1.0;
    }
    match raw.parse::<f64>() {
        Ok(r) if valid_ratio(r) => r,
        _ => {
            log::warn!("OTEL_TRACES_SAMPLER_ARG={raw:?} is not a ratio in [0, 1]; using 1.0");
            1.0
        }
    }
}

/// The OpenTelemetry SDKs' TraceIdRatioBased rule: the trace id's last 8 bytes as a big-endian
/// u64, shifted right by one, must be below `ratio * 2^63`.
fn ratio_keeps(ratio: f64, trace_id: &[u8; 16]) -> bool {
    // `as` saturates (NaN → 0), and 1.0 * 2^63 fits a u64, so 0 → never and 1 → always.
    let bound = (ratio * TWO_POW_63) as u64;
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    (u64::from_be_bytes(low) >> 1) < bound
}
