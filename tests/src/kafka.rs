//! Peers of the Kafka tests (`tests/kafka.rs`):
//!
//! * [`KafkaBroker`] starts `servers/kafka_broker.py`: librdkafka's mock cluster (one broker on
//!   127.0.0.1, topics of one partition) inside a python process, which makes no connection of
//!   its own: producers and consumers are other processes, connecting over loopback TCP,
//! * [`KafkaProducer`] starts `servers/kafka_producer.py` (confluent-kafka), idle until
//!   [`KafkaProducer::go`]; one Produce request per message, or one for all of them,
//! * [`KafkaConsumer`] starts `servers/kafka_consumer.py` (confluent-kafka, a consumer group),
//!   idle until [`KafkaConsumer::go`],
//! * [`kcat_produce`] and [`kcat_consume`] run Debian's kcat (librdkafka 2.0: older protocol
//!   versions, Produce v7 and Fetch v11, and a consumer without a group),
//! * [`start_kspan`] / [`stop_kspan`] run kspan with `--output json` and parse its spans with
//!   [`check_kafka_span_shape`], which also accepts PRODUCER and CONSUMER spans and their
//!   `links`.
//!
//! Each peer must be installed (`cargo xtask setup` pins confluent-kafka and installs kcat); a
//! missing one fails the test with a message saying so.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use super::{
    Kspan, LinePump, Run, check_span_shape, ensure_python_package, helper_timeout, kill_and_reap,
    peer_on_path, pretty, spawn_python_script, wait_success, wait_timeout,
};

/// The confluent-kafka version `cargo xtask setup` installs.
pub const CONFLUENT_KAFKA_VERSION: &str = "2.16.1";

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

/// Panics unless [`python()`] imports confluent_kafka at [`CONFLUENT_KAFKA_VERSION`].
pub fn ensure_confluent_kafka() {
    ensure_python_package(
        "confluent-kafka",
        "confluent_kafka",
        CONFLUENT_KAFKA_VERSION,
        "the Kafka tests",
    );
}

/// The `kcat` executable (canonical path), or a failed test saying how to install it.
pub fn kcat_bin() -> &'static Path {
    static KCAT: OnceLock<PathBuf> = OnceLock::new();
    KCAT.get_or_init(|| peer_on_path("kcat", "kcat (Debian package kcat)"))
}

/// The executable file name of kcat, what `--exe` selects.
pub fn kcat_exe_name() -> String {
    kcat_bin()
        .file_name()
        .expect("kcat has a file name")
        .to_string_lossy()
        .into_owned()
}

/// SIGTERM, then SIGKILL if `child` has not exited within helper_timeout().
fn terminate(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if wait_timeout(child, helper_timeout()).is_none() {
            kill_and_reap(child);
        }
    }
}

/// The next stdout line, which must start with `prefix`: the rest of it, trimmed; or a failed
/// test (the child killed) with its stderr.
fn expect_line(
    child: &mut Child,
    stdout: &LinePump,
    stderr: &mut LinePump,
    prefix: &str,
    what: &str,
) -> String {
    match stdout.lines.recv_timeout(helper_timeout()) {
        Ok(Some(line)) if line.starts_with(prefix) => line[prefix.len()..].trim().to_string(),
        other => {
            kill_and_reap(child);
            panic!(
                "{what}: expected a line `{prefix}...`, got {other:?}\n--- stderr ---\n{}",
                stderr.finish()
            )
        }
    }
}

/// The integers after `prefix` on the line of `out` that starts with it.
fn numbers_after(out: &str, prefix: &str, what: &str) -> Vec<i64> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("{what} printed no `{prefix}` line:\n{out}"));
    line.split_whitespace()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|e| panic!("{what}: bad number {n:?} in {line:?}: {e}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------

/// `servers/kafka_broker.py`: librdkafka's mock cluster of one broker on 127.0.0.1, serving.
/// Stopped on drop.
pub struct KafkaBroker {
    child: Child,
    pub pid: u32,
    /// `127.0.0.1:<port>`, the bootstrap address.
    pub addr: String,
    pub port: u16,
    _stdin: Option<ChildStdin>,
    stderr: LinePump,
}

impl KafkaBroker {
    /// Starts the broker with `topics` (one partition each).
    pub fn start(topics: &[&str]) -> KafkaBroker {
        Self::start_with(topics, &[])
    }

    /// Like [`KafkaBroker::start`]; the first Produce requests (one per code, in order) are
    /// answered with the Kafka error codes `produce_errors` for every partition they write.
    pub fn start_with(topics: &[&str], produce_errors: &[i16]) -> KafkaBroker {
        assert!(!topics.is_empty(), "a broker needs topics");
        ensure_confluent_kafka();
        let codes: Vec<String> = produce_errors.iter().map(i16::to_string).collect();
        let mut args: Vec<String> = Vec::new();
        if !codes.is_empty() {
            args.push("--produce-errors".into());
            args.push(codes.join(","));
        }
        args.extend(topics.iter().map(|t| t.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut child, stdout, mut stderr) = spawn_python_script("kafka_broker.py", &args);
        let stdin = child.stdin.take();
        let addr = expect_line(
            &mut child,
            &stdout,
            &mut stderr,
            "BROKER ",
            "kafka_broker.py",
        );
        let port = addr
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| {
                kill_and_reap(&mut child);
                panic!("kafka_broker.py: bad address {addr:?} (expected 127.0.0.1:PORT)")
            });
        drop(stdout);
        KafkaBroker {
            pid: child.id(),
            child,
            addr,
            port,
            _stdin: stdin,
            stderr,
        }
    }

    /// Panics if the broker died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "kafka_broker.py (pid {}) exited: {st}\n--- its stderr ---\n{}",
                self.pid,
                self.stderr.finish()
            );
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Producer
// ---------------------------------------------------------------------------

/// What a [`KafkaProducer`] run reported.
#[derive(Debug)]
pub struct ProducerResult {
    /// The offset the broker gave each message, in message order.
    pub offsets: Vec<i64>,
    pub stdout: String,
}

/// `servers/kafka_producer.py`, started and waiting for [`KafkaProducer::go`].
pub struct KafkaProducer {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

/// Options of a [`KafkaProducer`] beyond its messages.
#[derive(Debug, Default, Clone)]
pub struct ProducerOptions<'a> {
    /// (message index, value): that message carries the header `traceparent: value`.
    pub traceparents: &'a [(usize, &'a str)],
    /// All the messages in ONE Produce request (one record batch), instead of one request each.
    pub one_request: bool,
    /// Before producing, send not-Kafka bytes and a malformed Produce request to the broker,
    /// each on its own connection, which the broker resets.
    pub garbage_first: bool,
}

impl KafkaProducer {
    /// Starts a producer of `count` messages to partition 0 of `topic`.
    pub fn start(addr: &str, topic: &str, count: usize, options: ProducerOptions) -> KafkaProducer {
        ensure_confluent_kafka();
        let mut args: Vec<String> = vec![addr.into(), topic.into(), count.to_string()];
        for (index, value) in options.traceparents {
            assert!(*index < count, "traceparent for message {index} of {count}");
            args.push("--traceparent".into());
            args.push(format!("{index}={value}"));
        }
        if options.one_request {
            args.push("--one-request".into());
        }
        if options.garbage_first {
            args.push("--garbage-first".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (mut child, stdout, mut stderr) = spawn_python_script("kafka_producer.py", &args);
        expect_line(
            &mut child,
            &stdout,
            &mut stderr,
            "READY",
            "kafka_producer.py",
        );
        KafkaProducer {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// Lets the producer connect and produce; waits for it to exit 0 (every message
    /// delivered) and returns the offsets.
    pub fn go(mut self) -> ProducerResult {
        let mut stdin = self.stdin.take().expect("released once");
        stdin
            .write_all(b"go\n")
            .expect("write to kafka_producer.py");
        drop(stdin);
        let what = format!("kafka_producer.py (pid {})", self.pid);
        let (out, _err) = wait_success(&mut self.child, &mut self.stdout, &mut self.stderr, &what);
        ProducerResult {
            offsets: numbers_after(&out, "DONE", &what),
            stdout: out,
        }
    }
}

impl Drop for KafkaProducer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Consumer
// ---------------------------------------------------------------------------

/// One message as the consumer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedMessage {
    pub partition: i32,
    pub offset: i64,
    pub value: String,
    pub traceparent: Option<String>,
}

/// What a [`KafkaConsumer`] run reported.
#[derive(Debug)]
pub struct ConsumerResult {
    pub messages: Vec<ConsumedMessage>,
    pub stdout: String,
}

/// `servers/kafka_consumer.py`, started and waiting for [`KafkaConsumer::go`].
pub struct KafkaConsumer {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

impl KafkaConsumer {
    /// Starts a consumer of `count` messages of `topic` in consumer group `group`.
    pub fn start(addr: &str, topic: &str, group: &str, count: usize) -> KafkaConsumer {
        ensure_confluent_kafka();
        let count = count.to_string();
        let (mut child, stdout, mut stderr) =
            spawn_python_script("kafka_consumer.py", &[addr, topic, group, &count]);
        expect_line(
            &mut child,
            &stdout,
            &mut stderr,
            "READY",
            "kafka_consumer.py",
        );
        KafkaConsumer {
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
        }
    }

    /// Lets the consumer join its group and consume; waits for it to exit 0 (every message
    /// received, consumer closed) and returns the messages.
    pub fn go(mut self) -> ConsumerResult {
        let mut stdin = self.stdin.take().expect("released once");
        stdin
            .write_all(b"go\n")
            .expect("write to kafka_consumer.py");
        drop(stdin);
        let what = format!("kafka_consumer.py (pid {})", self.pid);
        let (out, _err) = wait_success(&mut self.child, &mut self.stdout, &mut self.stderr, &what);
        let mut messages = Vec::new();
        for line in out.lines() {
            let Some(rest) = line.strip_prefix("MESSAGE ") else {
                continue;
            };
            let words: Vec<&str> = rest.split_whitespace().collect();
            let bad = || -> ! { panic!("{what}: bad MESSAGE line {line:?}") };
            if words.len() < 3 {
                bad();
            }
            messages.push(ConsumedMessage {
                partition: words[0].parse().unwrap_or_else(|_| bad()),
                offset: words[1].parse().unwrap_or_else(|_| bad()),
                value: words[2].to_string(),
                traceparent: words
                    .get(3)
                    .and_then(|w| w.strip_prefix("traceparent="))
                    .map(str::to_string),
            });
        }
        let offsets = numbers_after(&out, "DONE", &what);
        assert_eq!(
            offsets,
            messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
            "{what}: DONE does not list the MESSAGE lines' offsets:\n{out}"
        );
        ConsumerResult {
            messages,
            stdout: out,
        }
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// kcat
// ---------------------------------------------------------------------------

/// One finished kcat run.
#[derive(Debug)]
pub struct KcatRun {
    /// kcat's pid (the traced process).
    pub pid: u32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `kcat` with `args`, `input` on its stdin (then closed); asserts it exits 0 within
/// helper_timeout().
fn kcat(args: &[&str], input: &str) -> KcatRun {
    let bin = kcat_bin();
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let pid = child.id();
    let mut stdout = LinePump::new(child.stdout.take().expect("piped stdout"));
    let mut stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("write to kcat {args:?}: {e}"));
    }
    let what = format!("kcat {args:?} (pid {pid})");
    let Some(status) = wait_timeout(&mut child, helper_timeout()) else {
        kill_and_reap(&mut child);
        panic!(
            "{what} did not finish within {:?}.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            helper_timeout(),
            stdout.finish(),
            stderr.finish()
        );
    };
    let (out, err) = (stdout.finish(), stderr.finish());
    assert!(
        status.success(),
        "{what} failed ({status}).\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    KcatRun {
        pid,
        stdout: out,
        stderr: err,
    }
}

/// `kcat -P`: produces each of `messages` (one line each, no newline inside) to partition 0 of
/// `topic`, one Produce request per message (`linger.ms=0`, `batch.num.messages=1`: a message
/// set holds one message, and a request for one partition carries one message set).
pub fn kcat_produce(addr: &str, topic: &str, messages: &[&str]) -> KcatRun {
    assert!(messages.iter().all(|m| !m.contains('\n') && !m.is_empty()));
    let input: String = messages.iter().map(|m| format!("{m}\n")).collect();
    kcat(
        &[
            "-P",
            "-b",
            addr,
            "-t",
            topic,
            "-p",
            "0",
            "-X",
            "linger.ms=0",
            "-X",
            "batch.num.messages=1",
            "-X",
            "acks=all",
        ],
        &input,
    )
}

/// `kcat -C`: consumes `count` messages of `topic` from the beginning (no consumer group),
/// exits at the end of the partition; returns the run with one message value per stdout line.
pub fn kcat_consume(addr: &str, topic: &str, count: usize) -> KcatRun {
    let count = count.to_string();
    kcat(
        &[
            "-C",
            "-b",
            addr,
            "-t",
            topic,
            "-c",
            &count,
            "-e",
            "-o",
            "beginning",
        ],
        "",
    )
}

// ---------------------------------------------------------------------------
// kspan and its spans
// ---------------------------------------------------------------------------

/// Starts kspan with `args` plus `--output json` (and `env`), waiting for `ready`. Stop it with
/// [`stop_kspan`], which parses the spans with [`check_kafka_span_shape`].
pub fn start_kspan(args: &[&str], env: &[(&str, &str)]) -> Kspan {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--output", "json"]);
    // Raw: the harness's own parsing knows SERVER and CLIENT spans only.
    Kspan::start_raw_with_env(&full, env)
}

/// Stops kspan (see [`Kspan::stop`]) and fills `spans` from its JSON output, every line
/// checked by [`check_kafka_span_shape`].
pub fn stop_kspan(kspan: Kspan) -> Run {
    let mut run = kspan.stop();
    let mut spans = Vec::new();
    for (i, line) in run.stdout.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "kspan stdout line {} is not JSON ({e}):\n{line}\n--- kspan stderr ---\n{}",
                i + 1,
                run.stderr
            )
        });
        if let Err(problem) = check_kafka_span_shape(&v) {
            panic!(
                "kspan stdout line {} does not follow the span schema: {problem}\n{}",
                i + 1,
                pretty(&v)
            );
        }
        spans.push(v);
    }
    run.spans = spans;
    run
}

fn is_hex_id(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// [`check_span_shape`] extended to messaging spans: kind PRODUCER or CONSUMER too, and the
/// optional `links` field, a non-empty array of `{"trace_id": 32 hex, "span_id": 16 hex}`.
pub fn check_kafka_span_shape(v: &Value) -> Result<(), String> {
    let mut copy = v.clone();
    let obj = copy.as_object_mut().ok_or("not a JSON object")?;
    if matches!(
        obj.get("kind").and_then(Value::as_str),
        Some("PRODUCER" | "CONSUMER")
    ) {
        // The rest of the shape is the same as for CLIENT spans.
        obj.insert("kind".into(), Value::from("CLIENT"));
    }
    let links = obj.remove("links");
    check_span_shape(&copy)?;
    match links {
        None => Ok(()),
        Some(Value::Array(links)) if !links.is_empty() => {
            for link in &links {
                let l = link
                    .as_object()
                    .ok_or_else(|| format!("a link is not an object: {link}"))?;
                let keys: BTreeSet<&str> = l.keys().map(String::as_str).collect();
                if keys != BTreeSet::from(["trace_id", "span_id"]) {
                    return Err(format!(
                        "a link must have trace_id and span_id only: {link}"
                    ));
                }
                let t = l["trace_id"].as_str().unwrap_or("");
                let s = l["span_id"].as_str().unwrap_or("");
                if !is_hex_id(t, 32) || !is_hex_id(s, 16) {
                    return Err(format!("a link's ids are not 32 / 16 hex digits: {link}"));
                }
            }
            Ok(())
        }
        Some(other) => Err(format!(
            "`links` must be a non-empty array when present, got {other}"
        )),
    }
}

/// A span's links as (trace id, span id), in order; empty without `links`.
pub fn links(span: &Value) -> Vec<(String, String)> {
    span.get("links")
        .and_then(Value::as_array)
        .map(|links| {
            links
                .iter()
                .map(|l| {
                    (
                        l["trace_id"].as_str().unwrap_or("").to_string(),
                        l["span_id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many messages a PRODUCER or CONSUMER span stands for: `messaging.batch.message_count`,
/// else 1.
pub fn message_count(span: &Value) -> i64 {
    super::attr_i64(span, "messaging.batch.message_count").unwrap_or(1)
}
