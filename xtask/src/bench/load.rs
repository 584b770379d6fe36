//! The load generators: wrk (HTTP/1.1 at saturation), oha (a held request rate, and HTTP/2).
//! Each is pinned to CPU 1; nginx has CPU 0.

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::check_interrupted;
use crate::{command, display};

/// What a load generator reports for one run.
#[derive(Debug, PartialEq)]
pub struct Load {
    pub requests_per_sec: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// oha only (wrk's distribution stops at 99%).
    pub p999_us: Option<f64>,
    pub socket_errors: u64,
    pub non_2xx: u64,
}

impl Load {
    pub fn to_json(&self) -> Value {
        json!({
            "requests_per_sec": self.requests_per_sec,
            "requests": self.requests,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "socket_errors": self.socket_errors,
            "non_2xx_responses": self.non_2xx,
        })
    }
}

/// How a scenario loads nginx.
#[derive(Clone, Debug)]
pub enum Generator {
    /// wrk, one thread, as fast as nginx answers.
    Wrk { url: &'static str, connections: u32 },
    /// oha: at `rate` requests per second when given (open loop: latency counted from when
    /// each request was due, so a stall is not hidden), else as fast as it can; HTTP/2 with
    /// prior knowledge when `http2`.
    Oha {
        url: &'static str,
        connections: u32,
        rate: Option<u32>,
        http2: bool,
    },
}

impl Generator {
    pub fn run(&self, secs: u64) -> Result<Load> {
        let load = match self {
            Generator::Wrk { url, connections } => wrk(url, *connections, secs)?,
            Generator::Oha {
                url,
                connections,
                rate,
                http2,
            } => oha(url, *connections, *rate, *http2, secs)?,
        };
        if load.requests == 0 {
            bail!("the load generator completed no request");
        }
        let p999 = load
            .p999_us
            .map_or(String::new(), |v| format!(", p99.9 {v:.0} µs"));
        println!(
            "  {:.0} requests/s, {} requests, p50 {:.0} µs, p99 {:.0} µs{p999}",
            load.requests_per_sec, load.requests, load.p50_us, load.p99_us
        );
        if load.socket_errors > 0 || load.non_2xx > 0 {
            println!(
                "  warning: {} socket errors and {} non-2xx responses",
                load.socket_errors, load.non_2xx
            );
        }
        Ok(load)
    }
}

/// Run wrk on CPU 1 against nginx for `secs` seconds.
fn wrk(url: &str, connections: u32, secs: u64) -> Result<Load> {
    let mut cmd = command("taskset");
    cmd.args(["-c", "1", "wrk"])
        .arg("-t1")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", url]);
    let text = stdout_of(cmd)?;
    parse_wrk(&text).with_context(|| format!("cannot parse wrk's output:\n{text}"))
}

/// Runs a load generator to its end; its standard output.
fn stdout_of(mut cmd: std::process::Command) -> Result<String> {
    cmd.stdin(Stdio::null());
    let shown = display(&cmd);
    println!("$ {shown}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    check_interrupted()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(text)
}

fn parse_wrk(text: &str) -> Result<Load> {
    let (mut rps, mut requests, mut p50, mut p99) = (None, None, None, None);
    let (mut socket_errors, mut non_2xx) = (0, 0);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => rps = Some(value.parse::<f64>()?),
            [count, "requests", "in", ..] => requests = Some(count.parse::<u64>()?),
            ["50%", value] => p50 = Some(micros(value)?),
            ["99%", value] => p99 = Some(micros(value)?),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", counts @ ..] => {
                socket_errors = counts
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => non_2xx = count.parse()?,
            _ => {}
        }
    }
    Ok(Load {
        requests_per_sec: rps.context("no `Requests/sec:` line")?,
        requests: requests.context("no `N requests in` line")?,
        p50_us: p50.context("no 50% latency line (was --latency given?)")?,
        p99_us: p99.context("no 99% latency line (was --latency given?)")?,
        p999_us: None,
        socket_errors,
        non_2xx,
    })
}

/// A wrk duration (`512.00us`, `1.20ms`, `2.00s`, also `1.00m`, `1.00h`) in microseconds.
fn micros(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in wrk latency `{text}`"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("bad number in wrk latency `{text}`"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in wrk latency `{text}`"),
    };
    Ok(number * scale)
}

// ---------------------------------------------------------------------------------------------
// oha

/// Where `cargo xtask bench` installs oha (crates.io, built once, pinned).
pub const OHA_VERSION: &str = "1.16.0";

pub fn oha_bin() -> std::path::PathBuf {
    crate::target_dir()
        .join("tools")
        .join(format!("oha-{OHA_VERSION}"))
        .join("bin")
        .join("oha")
}

/// Install oha if missing: `cargo install --locked` into target/tools (a few minutes once).
pub fn install_oha() -> Result<()> {
    let bin = oha_bin();
    if bin.exists() {
        return Ok(());
    }
    let root = bin
        .parent()
        .and_then(|p| p.parent())
        .expect("oha_bin has a root");
    println!("installing: oha {OHA_VERSION} (the fixed-rate and HTTP/2 load generator)");
    let mut cmd = command("cargo");
    cmd.args(["install", "--locked", "--version", OHA_VERSION, "--root"])
        .arg(root)
        .arg("oha");
    crate::run_cmd(&mut cmd)
}

fn oha(url: &str, connections: u32, rate: Option<u32>, http2: bool, secs: u64) -> Result<Load> {
    let mut cmd = command("taskset");
    cmd.args(["-c", "1"])
        .arg(oha_bin())
        .args(["--no-tui", "--output-format", "json"])
        .arg(format!("-c{connections}"))
        .arg(format!("-z{secs}s"));
    if let Some(rate) = rate {
        cmd.arg(format!("-q{rate}")).arg("--latency-correction");
    }
    if http2 {
        cmd.arg("--http2");
    }
    cmd.arg(url);
    let text = stdout_of(cmd)?;
    parse_oha(&text).with_context(|| format!("cannot parse oha's output:\n{text}"))
}

/// oha's JSON: seconds in `latencyPercentiles`, counts in `statusCodeDistribution` and
/// `errorDistribution`.
fn parse_oha(text: &str) -> Result<Load> {
    let report: Value = serde_json::from_str(text).context("not JSON")?;
    let seconds = |key: &str| {
        report["latencyPercentiles"][key]
            .as_f64()
            .map(|s| s * 1e6)
            .with_context(|| format!("no latencyPercentiles.{key}"))
    };
    let count = |key: &str| -> u64 {
        report[key]
            .as_object()
            .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
    };
    let codes = report["statusCodeDistribution"]
        .as_object()
        .context("no statusCodeDistribution")?;
    let ok: u64 = codes
        .iter()
        .filter(|(code, _)| code.starts_with('2') || code.starts_with('3'))
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    let requests = count("statusCodeDistribution");
    let total_secs = report["summary"]["total"]
        .as_f64()
        .context("no summary.total")?;
    Ok(Load {
        requests_per_sec: requests as f64 / total_secs,
        requests,
        p50_us: seconds("p50")?,
        p99_us: seconds("p99")?,
        p999_us: Some(seconds("p99.9")?),
        socket_errors: count("errorDistribution"),
        non_2xx: requests - ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `taskset -c 1 wrk -t1 -c16 -d2s --latency` against the bench's nginx on a busy machine.
    const WRK_NGINX: &str = "\
Running 2s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    2.17ms  16.33ms   85.60%
    Req/Sec    26.82k     4.15k   35.22k    70.00%
  Latency Distribution
     50%  186.00us
     75%    2.36ms
     90%    4.46ms
     99%    8.89ms
  53646 requests in 2.01s, 7.67MB read
Requests/sec:  26669.99
Transfer/sec:      3.82MB
";

    /// `wrk -t1 -c4 -d2s --latency` against `python3 -m http.server`, for a missing file.
    const WRK_404: &str = "\
Running 2s test @ http://127.0.0.1:18081/no-such-file
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.44ms    4.42ms  53.04ms   91.19%
    Req/Sec     1.03k   150.64     1.30k    80.00%
  Latency Distribution
     50%    3.15ms
     75%    5.56ms
     90%    8.39ms
     99%   23.57ms
  2056 requests in 2.01s, 1.02MB read
  Non-2xx or 3xx responses: 2056
Requests/sec:   1022.91
Transfer/sec:    519.54KB
";

    /// `wrk -t1 -c64 -d3s --timeout 1s --latency` against `python3 -m http.server`.
    const WRK_TIMEOUTS: &str = "\
Running 3s test @ http://127.0.0.1:18081/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    29.43ms   91.93ms 881.03ms   96.18%
    Req/Sec   520.73    114.29   737.00     66.67%
  Latency Distribution
     50%   11.73ms
     75%   18.58ms
     90%   28.56ms
     99%  606.34ms
  1559 requests in 3.01s, 6.00MB read
  Socket errors: connect 0, read 0, write 0, timeout 6
Requests/sec:    517.88
Transfer/sec:      1.99MB
";

    #[test]
    fn wrk_output_with_mixed_latency_units() {
        let wrk = parse_wrk(WRK_NGINX).unwrap();
        assert_eq!(
            wrk,
            Load {
                requests_per_sec: 26669.99,
                requests: 53646,
                p50_us: 186.0,
                p99_us: 8890.0,
                p999_us: None,
                socket_errors: 0,
                non_2xx: 0,
            }
        );
    }

    #[test]
    fn wrk_output_with_errors() {
        let wrk = parse_wrk(WRK_404).unwrap();
        assert_eq!(
            (wrk.requests, wrk.non_2xx, wrk.socket_errors),
            (2056, 2056, 0)
        );
        assert_eq!((wrk.p50_us, wrk.p99_us), (3150.0, 23570.0));
        let wrk = parse_wrk(WRK_TIMEOUTS).unwrap();
        assert_eq!((wrk.requests, wrk.non_2xx, wrk.socket_errors), (1559, 0, 6));
        assert_eq!(wrk.requests_per_sec, 517.88);
        assert_eq!(wrk.p99_us, 606340.0);
    }

    #[test]
    fn wrk_output_without_latency_distribution() {
        let without: String = WRK_NGINX
            .lines()
            .filter(|l| {
                !l.trim_start()
                    .starts_with(|c: char| c.is_ascii_digit() && l.contains('%'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let err = parse_wrk(&without).unwrap_err().to_string();
        assert!(err.contains("50%"), "{err}");
        assert!(parse_wrk("unable to connect to 127.0.0.1:18080 Connection refused\n").is_err());
    }

    #[test]
    fn micros_converts_wrk_units() {
        assert_eq!(micros("512.00us").unwrap(), 512.0);
        assert_eq!(micros("1.25ms").unwrap(), 1250.0);
        assert_eq!(micros("2.00s").unwrap(), 2e6);
        assert_eq!(micros("1.50m").unwrap(), 90e6);
        assert!(micros("3.00xs").is_err());
        assert!(micros("12").is_err());
    }

    /// `oha --no-tui --output-format json -n 20 -c 2` against `python3 -m http.server`, for a
    /// missing file (histograms and per-request details cut).
    const OHA_404: &str = r#"{"summary":{"successRate":1.0,"total":0.015420579,"slowest":0.007005006,
"fastest":0.000346892,"average":0.0014001810500000001,"requestsPerSec":1296.968161831018,
"totalData":6700,"sizePerRequest":335,"sizePerSec":434484.33421339106},
"latencyPercentiles":{"p10":0.000394601,"p25":0.00062861,"p50":0.00081637,"p75":0.001184199,
"p90":0.006883622,"p95":0.007005006,"p99":0.007005006,"p99.9":0.007005006,"p99.99":0.007005006},
"statusCodeDistribution":{"404":20},"errorDistribution":{}}"#;

    #[test]
    fn oha_output_in_microseconds_with_status_counts() {
        let load = parse_oha(OHA_404).unwrap();
        assert_eq!(
            (load.requests, load.non_2xx, load.socket_errors),
            (20, 20, 0)
        );
        assert!((load.p50_us - 816.37).abs() < 1e-6, "{load:?}");
        assert!((load.p999_us.unwrap() - 7005.006).abs() < 1e-6, "{load:?}");
        assert!((load.requests_per_sec - 20.0 / 0.015420579).abs() < 1e-6);
        let ok = OHA_404.replace(r#""404":20"#, r#""200":18"#).replace(
            r#""errorDistribution":{}"#,
            r#""errorDistribution":{"connection closed":2}"#,
        );
        let load = parse_oha(&ok).unwrap();
        assert_eq!(
            (load.requests, load.non_2xx, load.socket_errors),
            (18, 0, 2)
        );
        assert!(parse_oha(&OHA_404.replace("p99.9", "p99_9")).is_err());
        assert!(parse_oha("Error: connection refused").is_err());
    }
}
