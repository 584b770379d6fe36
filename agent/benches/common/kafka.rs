//! Kafka: steady Produce and Fetch exchanges on one client connection, encoded with the
//! kafka-protocol crate as librdkafka 2.16 speaks them (the parser's confluent fixtures: Produce
//! v10, Metadata v13, Fetch v16), and Fetch v12 as older clients speak it (topics by name).
//!
//! - Produce: one topic ("orders"), one partition, a record batch of one message (a key, a
//!   200-byte JSON value, a `traceparent` header; [`TRACED`] different trace contexts, used in
//!   turn); acks 1. Its response gives the message's offset: each Produce the next one.
//! - Fetch: the same partition from an offset; its response carries one record batch of
//!   [`FETCH_MESSAGES`] messages, the ones the Produce exchanges wrote at those offsets (a
//!   producer that batched them), headers included. Each Fetch starts where the last one
//!   ended.
//! - Before them, the connection's Metadata exchange (topic id → name, which Fetch v16 needs)
//!   and, for a consumer, a Heartbeat naming its group.
//!
//! Correlation ids go up by one per exchange, and offsets per message, rewritten in place in
//! the same bytes (raw, for the parser, or inside ring-buffer records, for the pipeline).

use bytes::{Bytes, BytesMut};
use std::sync::Arc;

use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, GroupId, HeartbeatRequest, HeartbeatResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, RequestHeader,
    ResponseHeader, TopicName,
    fetch_request::{FetchPartition, FetchTopic},
    fetch_response::{FetchableTopicResponse, PartitionData},
    metadata_request::MetadataRequestTopic,
    metadata_response::{MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic},
    produce_request::{PartitionProduceData, TopicProduceData},
    produce_response::{PartitionProduceResponse, TopicProduceResponse},
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use kspan::{
    clock::Clock,
    linker::Linker,
    pipeline::{Limits, Pipeline, SpanSink},
    process::{Discovery, Processes},
    protocols::Direction,
    stats::Stats,
    tracecontext::Sampler,
};

use super::{NoKernel, REMOTE_PORT, Side, close_record, connect_record, data_record};

pub const TOPIC: &str = "orders";
pub const TOPIC_ID: [u8; 16] = [
    0x63, 0x9f, 0x4e, 0x2a, 0x91, 0x0b, 0x4c, 0x5d, 0x8e, 0x17, 0x3a, 0x6f, 0x20, 0xd4, 0x55, 0xc1,
];
pub const PARTITION: i32 = 0;
pub const GROUP: &str = "order-processors";
pub const PRODUCER_CLIENT_ID: &str = "rdkafka-order-service";
pub const CONSUMER_CLIENT_ID: &str = "rdkafka-billing-service";
pub const PRODUCE_VERSION: i16 = 10;
const METADATA_VERSION: i16 = 13;
const HEARTBEAT_VERSION: i16 = 4;
/// Messages per Fetch response (one record batch).
pub const FETCH_MESSAGES: usize = 10;
/// Different trace contexts the produced messages carry, in turn (message at offset `o`:
/// context `o % TRACED`), so a Fetch of [`FETCH_MESSAGES`] messages links to as many.
pub const TRACED: usize = FETCH_MESSAGES;
const VALUE_LEN: usize = 200;

/// The `traceparent` header of the messages with context `i` (a producer with its own SDK).
pub fn traceparent(i: usize) -> String {
    format!("00-4bf92f3577b34da6a3ce929d0e0e{i:04x}-00f067aa0ba9{i:04x}-01")
}

/// What the connection carries after its warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Produce,
    /// Fetch at this version: 12 names topics, 13+ give their ids.
    Fetch(i16),
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Produce, Scenario::Fetch(12), Scenario::Fetch(16)];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Produce => "produce",
            Scenario::Fetch(12) => "fetch_v12",
            Scenario::Fetch(16) => "fetch_v16",
            Scenario::Fetch(_) => "fetch",
        }
    }

    /// Messages per exchange (the record counts of its batches).
    pub fn messages(self) -> usize {
        match self {
            Scenario::Produce => 1,
            Scenario::Fetch(_) => FETCH_MESSAGES,
        }
    }

    fn client_id(self) -> &'static str {
        match self {
            Scenario::Produce => PRODUCER_CLIENT_ID,
            Scenario::Fetch(_) => CONSUMER_CLIENT_ID,
        }
    }
}

/// The Kafka name of the traced process's end.
pub fn side_name(side: Side) -> &'static str {
    match side {
        Side::Server => "broker",
        Side::Client => "client",
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

fn sized(body: BytesMut) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

fn request(key: ApiKey, version: i16, id: i32, client_id: &str, body: &impl Encodable) -> Vec<u8> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(id)
        .with_client_id(Some(s(client_id)))
        .encode(&mut buf, key.request_header_version(version))
        .expect("request header");
    body.encode(&mut buf, version).expect("request body");
    sized(buf)
}

fn response(key: ApiKey, version: i16, id: i32, body: &impl Encodable) -> Vec<u8> {
    let mut buf = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(id)
        .encode(&mut buf, key.response_header_version(version))
        .expect("response header");
    body.encode(&mut buf, version).expect("response body");
    sized(buf)
}

/// The message a producer wrote at `offset` (its batch's offsets: relative, from 0, in a
/// Produce request), the `index`-th of its batch, with trace context `context`.
fn message(offset: i64, index: i32, context: usize) -> Record {
    let n = 100_000 + context;
    let mut value = format!(
        "{{\"order_id\":{n},\"customer\":\"c-{n}\",\"currency\":\"EUR\",\"total\":42.50,\
         \"items\":[{{\"sku\":\"SKU-{n}\",\"qty\":2}}],\"note\":\""
    );
    value.push_str(&"x".repeat(VALUE_LEN - value.len() - 2));
    value.push_str("\"}");
    assert_eq!(value.len(), VALUE_LEN);
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: 0,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        // Not idempotent: the batch's base sequence is -1 (the encoder puts records in one
        // batch while offset - sequence stays the same).
        sequence: index - 1,
        timestamp: 1_777_291_200_000 + context as i64,
        key: Some(Bytes::from(format!("order-{n}"))),
        value: Some(Bytes::from(value)),
        headers: [(s("traceparent"), Some(Bytes::from(traceparent(context))))]
            .into_iter()
            .collect(),
    }
}

fn batch(records: &[Record]) -> Bytes {
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, records, &options).expect("record batch");
    buf.freeze()
}

/// Offsets in the encoded frames are `SENTINEL + d` (d small), found after encoding and
/// rewritten for each exchange to its first offset + d.
const SENTINEL: i64 = 0x0be7_c4f5_0000_0000;
/// Largest `d` used.
const SENTINEL_SPAN: i64 = 64;

fn produce_request(id: i32, context: usize) -> Vec<u8> {
    let body = ProduceRequest::default()
        .with_transactional_id(None)
        .with_acks(1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(s(TOPIC)))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(PARTITION)
                        .with_records(Some(batch(&[message(0, 0, context)]))),
                ]),
        ]);
    request(
        ApiKey::Produce,
        PRODUCE_VERSION,
        id,
        PRODUCER_CLIENT_ID,
        &body,
    )
}

fn produce_response(id: i32) -> Vec<u8> {
    let body = ProduceResponse::default().with_responses(vec![
        TopicProduceResponse::default()
            .with_name(TopicName(s(TOPIC)))
            .with_partition_responses(vec![
                PartitionProduceResponse::default()
                    .with_index(PARTITION)
                    .with_error_code(0)
                    .with_base_offset(SENTINEL)
                    .with_log_append_time_ms(-1)
                    .with_log_start_offset(0),
            ]),
    ]);
    response(ApiKey::Produce, PRODUCE_VERSION, id, &body)
}

fn fetch_request(version: i16, id: i32) -> Vec<u8> {
    let topic = FetchTopic::default().with_partitions(vec![
        FetchPartition::default()
            .with_partition(PARTITION)
            .with_current_leader_epoch(0)
            .with_fetch_offset(SENTINEL)
            .with_last_fetched_epoch(0)
            .with_log_start_offset(-1)
            .with_partition_max_bytes(1_048_576),
    ]);
    let topic = if version >= 13 {
        topic.with_topic_id(uuid::Uuid::from_bytes(TOPIC_ID))
    } else {
        topic.with_topic(TopicName(s(TOPIC)))
    };
    let body = FetchRequest::default()
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(52_428_800)
        .with_isolation_level(0)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![topic])
        .with_rack_id(s(""));
    request(ApiKey::Fetch, version, id, CONSUMER_CLIENT_ID, &body)
}

/// The messages at offsets `SENTINEL..SENTINEL + FETCH_MESSAGES` (contexts 0.., as the
/// offsets the benchmarks fetch are multiples of [`FETCH_MESSAGES`]), one batch.
fn fetch_response(version: i16, id: i32) -> Vec<u8> {
    let messages: Vec<Record> = (0..FETCH_MESSAGES)
        .map(|i| message(SENTINEL + i as i64, i as i32, i))
        .collect();
    let end = SENTINEL + FETCH_MESSAGES as i64;
    let data = FetchableTopicResponse::default().with_partitions(vec![
        PartitionData::default()
            .with_partition_index(PARTITION)
            .with_error_code(0)
            .with_high_watermark(end)
            .with_last_stable_offset(end)
            .with_log_start_offset(0)
            .with_aborted_transactions(None)
            .with_preferred_read_replica(BrokerId(-1))
            .with_records(Some(batch(&messages))),
    ]);
    let data = if version >= 13 {
        data.with_topic_id(uuid::Uuid::from_bytes(TOPIC_ID))
    } else {
        data.with_topic(TopicName(s(TOPIC)))
    };
    let body = FetchResponse::default()
        .with_throttle_time_ms(0)
        .with_error_code(0)
        .with_session_id(0)
        .with_responses(vec![data]);
    response(ApiKey::Fetch, version, id, &body)
}

fn metadata_request(id: i32, client_id: &str) -> Vec<u8> {
    let body = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(TopicName(s(TOPIC)))),
    ]));
    request(ApiKey::Metadata, METADATA_VERSION, id, client_id, &body)
}

fn metadata_response(id: i32) -> Vec<u8> {
    let body = MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(s("kafka-1.example.internal"))
                .with_port(9092),
        ])
        .with_cluster_id(Some(s("q1Sh-9_ISia_zwGINzRvyQ")))
        .with_controller_id(BrokerId(1))
        .with_topics(vec![
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(s(TOPIC))))
                .with_topic_id(uuid::Uuid::from_bytes(TOPIC_ID))
                .with_partitions(vec![
                    MetadataResponsePartition::default()
                        .with_partition_index(PARTITION)
                        .with_leader_id(BrokerId(1))
                        .with_replica_nodes(vec![BrokerId(1)])
                        .with_isr_nodes(vec![BrokerId(1)]),
                ]),
        ]);
    response(ApiKey::Metadata, METADATA_VERSION, id, &body)
}

fn heartbeat_request(id: i32) -> Vec<u8> {
    let body = HeartbeatRequest::default()
        .with_group_id(GroupId(s(GROUP)))
        .with_generation_id(3)
        .with_member_id(s(
            "rdkafka-billing-service-5d2c1a6e-7b1f-4f0e-9a53-0c6f2f1d8e44",
        ));
    request(
        ApiKey::Heartbeat,
        HEARTBEAT_VERSION,
        id,
        CONSUMER_CLIENT_ID,
        &body,
    )
}

fn heartbeat_response(id: i32) -> Vec<u8> {
    let body = HeartbeatResponse::default().with_error_code(0);
    response(ApiKey::Heartbeat, HEARTBEAT_VERSION, id, &body)
}

/// The connection's first exchanges, before the steady ones: Metadata (and, for a consumer, a
/// Heartbeat naming its group), as (the client wrote it, bytes), correlation ids from 1.
pub fn warm_up(scenario: Scenario) -> Vec<(bool, Vec<u8>)> {
    let mut frames = vec![
        (true, metadata_request(1, scenario.client_id())),
        (false, metadata_response(1)),
    ];
    if let Scenario::Fetch(_) = scenario {
        frames.push((true, heartbeat_request(2)));
        frames.push((false, heartbeat_response(2)));
    }
    frames
}

/// The correlation id of the first exchange after [`warm_up`].
pub fn first_id(scenario: Scenario) -> i32 {
    warm_up(scenario).len() as i32 / 2 + 1
}

// ---------------------------------------------------------------------------------------------
// Steady exchanges

/// A frame whose correlation id and offsets are rewritten in place for each exchange.
struct Frame {
    bytes: Vec<u8>,
    correlation_at: usize,
    /// (position of an offset field, its value - the exchange's first offset).
    offsets: Vec<(usize, i64)>,
}

impl Frame {
    /// `bytes[at..]` is the frame (its size included): a request (`request`: api key and
    /// version before the correlation id) or a response.
    fn new(bytes: Vec<u8>, at: usize, request: bool) -> Self {
        let offsets = (at..bytes.len().saturating_sub(7))
            .filter_map(|i| {
                let value = i64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
                let d = value.wrapping_sub(SENTINEL);
                (0..=SENTINEL_SPAN).contains(&d).then_some((i, d))
            })
            .collect();
        Frame {
            bytes,
            correlation_at: at + if request { 8 } else { 4 },
            offsets,
        }
    }

    fn set(&mut self, correlation_id: i32, first_offset: i64) {
        let at = self.correlation_at;
        self.bytes[at..at + 4].copy_from_slice(&correlation_id.to_be_bytes());
        for &(at, d) in &self.offsets {
            self.bytes[at..at + 8].copy_from_slice(&(first_offset + d).to_be_bytes());
        }
    }
}

/// Steady exchanges of a [`Scenario`] on one connection: each [`next`] is the following one,
/// correlation id + 1, offsets + its messages (back to `offsets.start` at `offsets.end`), as
/// bytes (for the parser) or as ring-buffer records (for the pipeline).
///
/// [`next`]: KafkaExchanges::next
pub struct KafkaExchanges {
    /// Request variants, used in turn (Produce: one per trace context; Fetch: one).
    requests: Vec<Frame>,
    response: Frame,
    next_id: i32,
    next_offset: i64,
    offsets: std::ops::Range<i64>,
    step: i64,
}

impl KafkaExchanges {
    /// The exchanges after the warm-up, as raw bytes, from offset 0.
    pub fn bytes(scenario: Scenario) -> Self {
        Self::build(scenario, |_, bytes| (bytes, 0))
    }

    /// The exchanges after the warm-up, as Data records of connection `conn_id` seen from
    /// `side`: the request at 2 ms, the response 300 µs later (every exchange has the same
    /// times, as in the other benchmarks' records).
    pub fn records(scenario: Scenario, side: Side, conn_id: u64) -> Self {
        let t = 2_000_000;
        Self::build(scenario, |client, bytes| {
            let ingress = side.direction(client) == Direction::Ingress;
            let t = if client { t } else { t + 300_000 };
            (
                data_record(conn_id, ingress, &bytes, t),
                kspan_common::EVENT_HEADER_LEN,
            )
        })
    }

    fn build(scenario: Scenario, wrap: impl Fn(bool, Vec<u8>) -> (Vec<u8>, usize)) -> Self {
        let first = first_id(scenario);
        let frame = |client: bool, bytes: Vec<u8>| {
            let (bytes, at) = wrap(client, bytes);
            Frame::new(bytes, at, client)
        };
        let (requests, response, offset_fields) = match scenario {
            Scenario::Produce => (
                (0..TRACED)
                    .map(|c| frame(true, produce_request(first, c)))
                    .collect::<Vec<_>>(),
                frame(false, produce_response(first)),
                // The response's base offset.
                [0, 1],
            ),
            Scenario::Fetch(version) => (
                vec![frame(true, fetch_request(version, first))],
                frame(false, fetch_response(version, first)),
                // The fetch offset; the batch's base offset, high watermark, last stable
                // offset.
                [1, 3],
            ),
        };
        assert!(
            requests.iter().all(|r| r.offsets.len() == offset_fields[0])
                && response.offsets.len() == offset_fields[1],
            "offset fields of {} not found where expected: {:?}, {:?}",
            scenario.name(),
            requests.iter().map(|r| &r.offsets).collect::<Vec<_>>(),
            response.offsets,
        );
        let step = scenario.messages() as i64;
        KafkaExchanges {
            requests,
            response,
            next_id: first,
            next_offset: 0,
            offsets: 0..i64::MAX,
            step,
        }
    }

    /// Offsets cycle through `offsets` (a consumer group that reads the same messages again).
    pub fn cycle_offsets(mut self, offsets: std::ops::Range<i64>) -> Self {
        assert_eq!((offsets.end - offsets.start) % self.step, 0);
        self.next_offset = offsets.start;
        self.offsets = offsets;
        self
    }

    /// The next exchange: (correlation id, its first offset, request, response).
    pub fn next(&mut self) -> (i32, i64, &[u8], &[u8]) {
        let id = self.next_id;
        self.next_id = id.checked_add(1).expect("correlation ids exhausted");
        let offset = self.next_offset;
        self.next_offset += self.step;
        if self.next_offset >= self.offsets.end {
            self.next_offset = self.offsets.start;
        }
        let variant = (offset as usize) % self.requests.len();
        let request = &mut self.requests[variant];
        request.set(id, offset);
        self.response.set(id, offset);
        (id, offset, &request.bytes, &self.response.bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// Whole path

/// A pipeline like [`super::pipeline`] with another sink (the checks keep the spans).
pub fn pipeline_with<S: SpanSink>(sink: S) -> Pipeline<NoKernel, S> {
    Pipeline::new(
        NoKernel,
        sink,
        Processes::new(Discovery::default()),
        Limits::default(),
        Clock::with_offset(0),
        Arc::new(Stats::default()),
        Linker::new(Sampler::default()),
    )
}

/// Connects connection `conn_id` (from port `port`) and feeds the warm-up of `scenario` on it
/// as its client.
fn open<S: SpanSink>(p: &mut Pipeline<NoKernel, S>, scenario: Scenario, conn_id: u64, port: u16) {
    p.handle_record(&connect_record(conn_id, port, 1_000_000));
    for (i, (client, bytes)) in warm_up(scenario).iter().enumerate() {
        p.handle_record(&data_record(
            conn_id,
            !client,
            bytes,
            1_100_000 + i as u64 * 10_000,
        ));
    }
}

/// A producer's pipeline: connection 1 opened by a Connect, its Metadata exchange, then
/// `warm` Produce exchanges (resource cache, reusable buffers warm); and the Produce exchanges
/// that follow.
pub fn warm_kafka_producer<S: SpanSink>(
    p: &mut Pipeline<NoKernel, S>,
    warm: usize,
) -> KafkaExchanges {
    open(p, Scenario::Produce, 1, REMOTE_PORT);
    let mut exchanges = KafkaExchanges::records(Scenario::Produce, Side::Client, 1);
    for _ in 0..warm {
        let (_, _, request, response) = exchanges.next();
        p.handle_record(request);
        p.handle_record(response);
    }
    exchanges
}

/// Messages produced before a consumer's fetches start, which they then read again and again.
pub const PRODUCED: usize = 1000;

/// A consumer's pipeline, on a host where the producer is traced too: a producer connection
/// (1) writes [`PRODUCED`] messages, one per Produce, and closes (the PRODUCER spans remember
/// their offsets); then connection 2, the consumer's, has its Metadata (topic id → name) and
/// Heartbeat (group) exchanges and `warm` Fetch v16 exchanges. Returns the Fetch exchanges
/// that follow: the same offsets, over and over (CONSUMER spans linked to the messages'
/// contexts).
pub fn warm_kafka_consumer<S: SpanSink>(
    p: &mut Pipeline<NoKernel, S>,
    warm: usize,
) -> KafkaExchanges {
    warm_kafka_producer(p, PRODUCED);
    p.handle_record(&close_record(1, 3_000_000));
    let scenario = Scenario::Fetch(16);
    open(p, scenario, 2, REMOTE_PORT + 1);
    let mut exchanges =
        KafkaExchanges::records(scenario, Side::Client, 2).cycle_offsets(0..PRODUCED as i64);
    for _ in 0..warm {
        let (_, _, request, response) = exchanges.next();
        p.handle_record(request);
        p.handle_record(response);
    }
    exchanges
}
