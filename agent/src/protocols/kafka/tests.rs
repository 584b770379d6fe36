//! Byte-fixture tests of the Kafka parser: frames encoded with the kafka-protocol crate, and
//! conversations recorded from librdkafka clients (fixtures/).

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, BrokerId, FetchRequest, FetchResponse, FindCoordinatorRequest,
    GroupId, JoinGroupRequest, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    RequestHeader, ResponseHeader, TopicName, TransactionalId,
    fetch_request::{FetchPartition, FetchTopic},
    fetch_response::{FetchableTopicResponse, PartitionData},
    metadata_request::MetadataRequestTopic,
    metadata_response::{MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic},
    produce_request::{PartitionProduceData, TopicProduceData},
    produce_response::{PartitionProduceResponse, TopicProduceResponse},
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use uuid::Uuid;

use super::connection::{DECOMPRESS_BUDGET, MAX_FRAME_PREFIX, MAX_IN_FLIGHT};
use super::messages::{MAX_MESSAGES, MAX_PARTITIONS, MAX_TOPICS};
use super::{KafkaApi, KafkaParser, KafkaPayload, REGISTRATION, detect};
use crate::protocols::{
    Chunk, Direction, Exchange, ExchangeError, ParserCounts, ParserOutput, Payload, ProtocolParser,
    RequestStart, Role,
};

const RX_TID: u32 = 11;
const TX_TID: u32 = 22;
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const TRACEPARENT_2: &str = "00-11111111111111111111111111111111-2222222222222222-01";
const ORDERS_ID: [u8; 16] = [0x63, 0x9f, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
const PAYMENTS_ID: [u8; 16] = [0x11; 16];

fn start(k: u64) -> u64 {
    k * 1000
}

fn end(k: u64) -> u64 {
    k * 1000 + 100
}

/// Who wrote bytes of a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Broker,
}

/// The direction of `side`'s bytes for a process in `role`.
fn direction(side: Side, role: Role) -> Direction {
    match (side, role) {
        (Side::Client, Role::Client) | (Side::Broker, Role::Server) => Direction::Egress,
        _ => Direction::Ingress,
    }
}

/// Feeds chunks with automatic times: the k-th call (1-based) runs from `start(k)` to `end(k)`.
struct Harness {
    parser: KafkaParser,
    role: Role,
    calls: u64,
    out: ParserOutput,
}

impl Harness {
    fn new(role: Role) -> Self {
        Harness {
            parser: KafkaParser::new(),
            role,
            calls: 0,
            out: ParserOutput::default(),
        }
    }

    /// One syscall of `side` that moved `full_len` bytes, of which `data` were captured.
    fn chunk(&mut self, side: Side, data: &[u8], full_len: u64) {
        self.calls += 1;
        let direction = direction(side, self.role);
        let chunk = Chunk {
            direction,
            data,
            tail: &[],
            full_len,
            start_ns: start(self.calls),
            end_ns: end(self.calls),
            tid: match direction {
                Direction::Ingress => RX_TID,
                Direction::Egress => TX_TID,
            },
        };
        self.parser.feed(&chunk, &mut self.out);
    }

    /// A syscall of `side` that moved `bytes`, captured as the kernel does for Kafka.
    fn syscall(&mut self, side: Side, bytes: &[u8]) {
        let capture = REGISTRATION.capture_bytes.unwrap() as usize;
        self.chunk(side, &bytes[..bytes.len().min(capture)], bytes.len() as u64);
    }

    fn client(&mut self, bytes: &[u8]) {
        self.syscall(Side::Client, bytes);
    }

    fn broker(&mut self, bytes: &[u8]) {
        self.syscall(Side::Broker, bytes);
    }

    fn close(&mut self) -> u64 {
        self.calls += 1;
        let t = end(self.calls);
        self.parser.close(t, &mut self.out);
        t
    }

    fn exchanges(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.out.exchanges)
    }

    fn starts(&mut self) -> Vec<RequestStart> {
        std::mem::take(&mut self.out.request_starts)
    }

    fn responses_started(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.out.responses_started)
    }

    fn counts(&self) -> ParserCounts {
        self.out.counts
    }
}

/// Everything a conversation produced.
#[derive(Debug, PartialEq)]
struct Outcome {
    starts: Vec<RequestStart>,
    responses_started: Vec<u64>,
    exchanges: Vec<Exchange>,
    counts: ParserCounts,
    gave_up: bool,
}

/// Feeds `chunks` (whole syscalls, as the kernel captures them) as a process in `role`, then
/// closes the connection.
fn run(chunks: &[(Side, Vec<u8>)], role: Role) -> Outcome {
    let mut h = Harness::new(role);
    for (side, bytes) in chunks {
        h.syscall(*side, bytes);
    }
    outcome(h)
}

fn outcome(mut h: Harness) -> Outcome {
    let gave_up = h.parser.gave_up();
    h.close();
    Outcome {
        starts: h.starts(),
        responses_started: h.responses_started(),
        exchanges: h.exchanges(),
        counts: h.counts(),
        gave_up,
    }
}

fn kafka(exchange: &Exchange) -> &KafkaPayload {
    let Payload::Kafka(kafka) = &exchange.payload else {
        panic!("not Kafka: {exchange:?}");
    };
    kafka
}

// ---- Frames, encoded with the kafka-protocol crate ----

fn sized(body: BytesMut) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

fn request(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    client_id: Option<&str>,
    body: &impl Encodable,
) -> Vec<u8> {
    let mut buf = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(client_id.map(|c| StrBytes::from_string(c.to_string())))
        .encode(&mut buf, key.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    sized(buf)
}

fn response(key: ApiKey, version: i16, correlation_id: i32, body: &impl Encodable) -> Vec<u8> {
    let mut buf = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut buf, key.response_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    sized(buf)
}

fn s(text: &str) -> StrBytes {
    StrBytes::from_string(text.to_string())
}

/// A message at `offset` with `headers` (a key and a 20-byte value).
fn record(offset: i64, headers: &[(&str, &str)]) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        sequence: offset as i32,
        timestamp: 1_700_000_000_000 + offset,
        key: Some(Bytes::from_static(b"key")),
        value: Some(Bytes::from(vec![b'v'; 20])),
        headers: headers
            .iter()
            .map(|(k, v)| (s(k), Some(Bytes::from(v.to_string()))))
            .collect(),
    }
}

/// One record batch of `records` (consecutive offsets).
fn batch(records: &[Record], compression: Compression) -> Bytes {
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression,
    };
    RecordBatchEncoder::encode(&mut buf, records, &options).unwrap();
    buf.freeze()
}

/// `n` messages from `first`; those in `traced` carry a traceparent (and `Other: x`).
fn messages(first: i64, n: i64, traced: &[(i64, &str)]) -> Vec<Record> {
    (first..first + n)
        .map(|o| match traced.iter().find(|(t, _)| *t == o) {
            Some((_, tp)) => record(o, &[("Other", "x"), ("TraceParent", tp)]),
            None => record(o, &[("other", "y")]),
        })
        .collect()
}

/// A topic of a test conversation: its partitions and their records.
#[derive(Clone)]
struct TopicSpec {
    name: &'static str,
    id: [u8; 16],
    partitions: Vec<(i32, Option<Bytes>)>,
}

/// Two topics: "orders" (partition 0: one batch of 3 messages, the second traced; partition
/// 1: two batches, 2 and 1 messages, the last traced) and "payments" (partition 0: no
/// records).
fn topics() -> Vec<TopicSpec> {
    let p1 = [
        batch(&messages(0, 2, &[]), Compression::None),
        batch(&messages(2, 1, &[(2, TRACEPARENT_2)]), Compression::None),
    ]
    .concat();
    vec![
        TopicSpec {
            name: "orders",
            id: ORDERS_ID,
            partitions: vec![
                (
                    0,
                    Some(batch(
                        &messages(0, 3, &[(1, TRACEPARENT)]),
                        Compression::None,
                    )),
                ),
                (1, Some(Bytes::from(p1))),
            ],
        },
        TopicSpec {
            name: "payments",
            id: PAYMENTS_ID,
            partitions: vec![(0, None)],
        },
    ]
}

fn produce_request_body(version: i16, acks: i16, topics: &[TopicSpec]) -> ProduceRequest {
    ProduceRequest::default()
        .with_transactional_id((version >= 3).then(|| TransactionalId(s("tx-1"))))
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(
            topics
                .iter()
                .map(|t| {
                    let data = TopicProduceData::default().with_partition_data(
                        t.partitions
                            .iter()
                            .map(|(i, r)| {
                                PartitionProduceData::default()
                                    .with_index(*i)
                                    .with_records(r.clone())
                            })
                            .collect(),
                    );
                    if version >= 13 {
                        data.with_topic_id(Uuid::from_bytes(t.id))
                    } else {
                        data.with_name(TopicName(s(t.name)))
                    }
                })
                .collect(),
        )
}

fn produce_request(version: i16, id: i32, acks: i16, topics: &[TopicSpec]) -> Vec<u8> {
    let body = produce_request_body(version, acks, topics);
    request(ApiKey::Produce, version, id, Some("producer-1"), &body)
}

/// Produce response: each partition's base offset is 100 × (partition + 1); "payments"
/// fails with error 3 (unknown topic).
fn produce_response(version: i16, id: i32, topics: &[TopicSpec]) -> Vec<u8> {
    let body = ProduceResponse::default().with_responses(
        topics
            .iter()
            .map(|t| {
                let data = TopicProduceResponse::default().with_partition_responses(
                    t.partitions
                        .iter()
                        .map(|(i, _)| {
                            let error = if t.name == "payments" { 3 } else { 0 };
                            PartitionProduceResponse::default()
                                .with_index(*i)
                                .with_error_code(error)
                                .with_base_offset(if error == 0 {
                                    100 * i64::from(*i + 1)
                                } else {
                                    -1
                                })
                        })
                        .collect(),
                );
                if version >= 13 {
                    data.with_topic_id(Uuid::from_bytes(t.id))
                } else {
                    data.with_name(TopicName(s(t.name)))
                }
            })
            .collect(),
    );
    response(ApiKey::Produce, version, id, &body)
}

fn fetch_request(version: i16, id: i32, topics: &[TopicSpec]) -> Vec<u8> {
    let body = FetchRequest::default()
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(52_428_800)
        .with_topics(
            topics
                .iter()
                .map(|t| {
                    let topic = FetchTopic::default().with_partitions(
                        t.partitions
                            .iter()
                            .map(|(i, _)| {
                                FetchPartition::default()
                                    .with_partition(*i)
                                    .with_fetch_offset(0)
                                    .with_partition_max_bytes(1_048_576)
                            })
                            .collect(),
                    );
                    if version >= 13 {
                        topic.with_topic_id(Uuid::from_bytes(t.id))
                    } else {
                        topic.with_topic(TopicName(s(t.name)))
                    }
                })
                .collect(),
        );
    let body = if version >= 7 {
        body.with_session_id(7).with_session_epoch(1)
    } else {
        body
    };
    request(ApiKey::Fetch, version, id, Some("consumer-1"), &body)
}

/// Fetch response: each partition's high watermark is 10 × (partition + 1) and its records
/// those of the spec; "payments" has error 1 (offset out of range).
fn fetch_response(version: i16, id: i32, topics: &[TopicSpec]) -> Vec<u8> {
    let body = FetchResponse::default().with_responses(
        topics
            .iter()
            .map(|t| {
                let data = FetchableTopicResponse::default().with_partitions(
                    t.partitions
                        .iter()
                        .map(|(i, records)| {
                            PartitionData::default()
                                .with_partition_index(*i)
                                .with_error_code(if t.name == "payments" { 1 } else { 0 })
                                .with_high_watermark(10 * i64::from(*i + 1))
                                .with_records(records.clone())
                        })
                        .collect(),
                );
                if version >= 13 {
                    data.with_topic_id(Uuid::from_bytes(t.id))
                } else {
                    data.with_topic(TopicName(s(t.name)))
                }
            })
            .collect(),
    );
    response(ApiKey::Fetch, version, id, &body)
}

fn metadata_response(version: i16, id: i32, topics: &[TopicSpec]) -> Vec<u8> {
    let body = MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(1))
                .with_host(s("broker-1"))
                .with_port(9092),
        ])
        .with_topics(
            topics
                .iter()
                .map(|t| {
                    let topic = MetadataResponseTopic::default()
                        .with_name(Some(TopicName(s(t.name))))
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|(i, _)| {
                                    MetadataResponsePartition::default()
                                        .with_partition_index(*i)
                                        .with_leader_id(BrokerId(1))
                                        .with_replica_nodes(vec![BrokerId(1)])
                                        .with_isr_nodes(vec![BrokerId(1)])
                                })
                                .collect(),
                        );
                    if version >= 10 {
                        topic.with_topic_id(Uuid::from_bytes(t.id))
                    } else {
                        topic
                    }
                })
                .collect(),
        );
    response(ApiKey::Metadata, version, id, &body)
}

fn metadata_request(version: i16, id: i32) -> Vec<u8> {
    let body = MetadataRequest::default().with_topics(Some(vec![
        MetadataRequestTopic::default().with_name(Some(TopicName(s("orders")))),
    ]));
    request(ApiKey::Metadata, version, id, Some("consumer-1"), &body)
}

fn api_versions_request(version: i16, id: i32) -> Vec<u8> {
    let body = if version >= 3 {
        ApiVersionsRequest::default()
            .with_client_software_name(s("kspan-test"))
            .with_client_software_version(s("1.0"))
    } else {
        ApiVersionsRequest::default()
    };
    request(ApiKey::ApiVersions, version, id, Some("client"), &body)
}

// ---- Recorded conversations ----

/// A recorded conversation: (writer, bytes) per TCP segment (record_kafka.py).
fn fixture(text: &str) -> Vec<(Side, Vec<u8>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (side, hex) = l.split_once(' ').unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let side = match side {
                "C" => Side::Client,
                "S" => Side::Broker,
                other => panic!("bad side {other}"),
            };
            (side, bytes)
        })
        .collect()
}

const FIXTURES: [(&str, &str); 9] = [
    (
        "confluent_produce",
        include_str!("fixtures/confluent_produce.txt"),
    ),
    (
        "confluent_fetch",
        include_str!("fixtures/confluent_fetch.txt"),
    ),
    (
        "confluent_group",
        include_str!("fixtures/confluent_group.txt"),
    ),
    ("gzip_produce", include_str!("fixtures/gzip_produce.txt")),
    (
        "snappy_produce",
        include_str!("fixtures/snappy_produce.txt"),
    ),
    ("lz4_produce", include_str!("fixtures/lz4_produce.txt")),
    ("zstd_produce", include_str!("fixtures/zstd_produce.txt")),
    ("kcat_produce", include_str!("fixtures/kcat_produce.txt")),
    ("kcat_fetch", include_str!("fixtures/kcat_fetch.txt")),
];

fn recorded(name: &str) -> Vec<(Side, Vec<u8>)> {
    let (_, text) = FIXTURES.iter().find(|(n, _)| *n == name).unwrap();
    fixture(text)
}

// ---- Expected payloads, from the crate's record batch decoder ----

/// What the parser should report of a records field: decoded with the crate.
fn oracle_records(bytes: &Bytes) -> super::KafkaRecords {
    let sets = RecordBatchDecoder::decode_all(&mut bytes.clone()).unwrap();
    let records: Vec<&Record> = sets.iter().flat_map(|s| &s.records).collect();
    let messages = records
        .iter()
        .filter_map(|r| {
            let context: Vec<(String, String)> = r
                .headers
                .iter()
                .filter(|(k, _)| {
                    let k = k.to_ascii_lowercase();
                    k == "traceparent" || k == "tracestate" || k == "b3" || k.starts_with("x-b3-")
                })
                .map(|(k, v)| {
                    let v = v.as_ref().unwrap();
                    (
                        k.to_ascii_lowercase(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect();
            (!context.is_empty()).then_some(super::KafkaMessage {
                offset: r.offset,
                context_headers: context,
            })
        })
        .collect();
    super::KafkaRecords {
        count: records.len() as u64,
        batches: sets.len() as u32,
        bytes: bytes.len() as u64,
        first_offset: records.first().map(|r| r.offset),
        last_offset: records.last().map(|r| r.offset),
        messages,
        cut: false,
    }
}

/// The topics of a Produce exchange of `topics` (answered by `produce_response`).
fn produce_expected(topics: &[TopicSpec], version: i16, answered: bool) -> Vec<super::KafkaTopic> {
    topics
        .iter()
        .map(|t| super::KafkaTopic {
            name: Some(t.name.into()),
            id: (version >= 13).then_some(t.id),
            partitions: t
                .partitions
                .iter()
                .map(|(i, records)| {
                    let mut records = records.as_ref().map(oracle_records).unwrap_or_default();
                    let failed = t.name == "payments";
                    let base = if failed { -1 } else { 100 * i64::from(*i + 1) };
                    if answered && !failed {
                        let shift = base - records.first_offset.unwrap_or(0);
                        records.first_offset = records.first_offset.map(|o| o + shift);
                        records.last_offset = records.last_offset.map(|o| o + shift);
                        for m in &mut records.messages {
                            m.offset += shift;
                        }
                    }
                    super::KafkaPartition {
                        index: *i,
                        error_code: if answered && failed { 3 } else { 0 },
                        base_offset: answered.then_some(base),
                        high_watermark: None,
                        records,
                    }
                })
                .collect(),
        })
        .collect()
}

/// The topics of a Fetch exchange of `topics` (answered by `fetch_response`); `named`: the
/// topic names are known (versions before 13, or learnt from Metadata).
fn fetch_expected(topics: &[TopicSpec], version: i16, named: bool) -> Vec<super::KafkaTopic> {
    topics
        .iter()
        .map(|t| super::KafkaTopic {
            name: named.then(|| t.name.into()),
            id: (version >= 13).then_some(t.id),
            partitions: t
                .partitions
                .iter()
                .map(|(i, records)| super::KafkaPartition {
                    index: *i,
                    error_code: if t.name == "payments" { 1 } else { 0 },
                    base_offset: None,
                    high_watermark: Some(10 * i64::from(*i + 1)),
                    records: records.as_ref().map(oracle_records).unwrap_or_default(),
                })
                .collect(),
        })
        .collect()
}

fn payload(api: KafkaApi, version: i16, id: i32, topics: Vec<super::KafkaTopic>) -> KafkaPayload {
    let produce = api == KafkaApi::Produce;
    KafkaPayload {
        api,
        api_version: version,
        correlation_id: id,
        client_id: Some(if produce { "producer-1" } else { "consumer-1" }.into()),
        group_id: None,
        acks: produce.then_some(-1),
        transactional_id: produce.then(|| "tx-1".into()),
        topics,
        request_cut: false,
        response: true,
        response_cut: false,
        error_code: if produce { 3 } else { 1 },
        entries_dropped: false,
    }
}

/// The Metadata exchange that names the topics, for versions that name them by id: request
/// and response, as (side, bytes).
fn metadata_exchange(version: i16, id: i32, topics: &[TopicSpec]) -> Vec<(Side, Vec<u8>)> {
    let metadata = if version % 2 == 0 { 12 } else { 13 };
    vec![
        (Side::Client, metadata_request(metadata, id)),
        (Side::Broker, metadata_response(metadata, id, topics)),
    ]
}

// ---- Detection ----

/// xorshift64: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn detect_requests() {
    let topics = topics();
    let mut yes: Vec<Vec<u8>> = Vec::new();
    for v in 3..=13 {
        yes.push(produce_request(v, 1, -1, &topics));
    }
    for v in 4..=18 {
        yes.push(fetch_request(v, 1, &topics));
    }
    for v in 0..=13 {
        yes.push(metadata_request(v, 1));
    }
    for v in 0..=4 {
        yes.push(api_versions_request(v, 1));
    }
    let join = JoinGroupRequest::default()
        .with_group_id(GroupId(s("g1")))
        .with_protocol_type(s("consumer"));
    yes.push(request(ApiKey::JoinGroup, 5, 7, Some("c"), &join));
    yes.push(request(ApiKey::JoinGroup, 9, 7, Some("c"), &join));
    // A null client id.
    yes.push(request(
        ApiKey::Metadata,
        4,
        1,
        None,
        &MetadataRequest::default(),
    ));
    // Only the first bytes of a large request.
    yes.push(produce_request(9, 1, -1, &topics)[..40].to_vec());
    for data in &yes {
        assert!(detect(data, Direction::Egress), "{data:02x?}");
        assert!(detect(data, Direction::Ingress), "{data:02x?}");
    }
    // Every client's first write of the recordings (its ApiVersions request), and the body of
    // a request whose size was read apart.
    for (name, text) in FIXTURES {
        let conversation = fixture(text);
        let first = &conversation[0];
        assert_eq!(first.0, Side::Client);
        assert!(detect(&first.1, Direction::Egress), "{name}");
        assert!(detect(&first.1[4..], Direction::Ingress), "{name}");
        // No broker write looks like a request.
        for (side, bytes) in &conversation {
            if *side == Side::Broker {
                assert!(!detect(bytes, Direction::Ingress), "{name}: {bytes:02x?}");
                assert!(
                    !detect(&bytes[4..], Direction::Ingress),
                    "{name}: {bytes:02x?}"
                );
            }
        }
    }
}

#[test]
fn detect_rejects_other_protocols_and_random_bytes() {
    let topics = topics();
    let mut unknown_key = produce_request(9, 1, -1, &topics);
    unknown_key[4..6].copy_from_slice(&999i16.to_be_bytes());
    let mut newer_version = produce_request(13, 1, -1, &topics);
    newer_version[6..8].copy_from_slice(&14i16.to_be_bytes());
    let mut negative_id = produce_request(9, 1, -1, &topics);
    negative_id[8..12].copy_from_slice(&(-5i32).to_be_bytes());
    let mut binary_client_id = api_versions_request(3, 1);
    binary_client_id[14] = 0x01;
    // A topics count past the frame's end.
    let mut bad_body = metadata_request(4, 1);
    let at = bad_body.len() - 1 - 4 - 2 - 6 - 4;
    bad_body[at..at + 4].copy_from_slice(&1000i32.to_be_bytes());
    // Bytes after a whole ApiVersions v3 body.
    let mut trailing = api_versions_request(3, 1);
    trailing.push(0);
    let len = trailing.len() as u32 - 4;
    trailing[..4].copy_from_slice(&len.to_be_bytes());
    let tls_client_hello: Vec<u8> = [
        vec![
            0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
        ],
        vec![0x5a; 32],
    ]
    .concat();
    let no: Vec<Vec<u8>> = vec![
        vec![],
        vec![0; 4],
        vec![0, 0, 0, 20],
        vec![0; 64],
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"POST /api HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        // HTTP/2 SETTINGS, HEADERS, DATA, WINDOW_UPDATE frames.
        [
            &[0, 0, 18, 4, 0, 0, 0, 0, 0][..],
            &[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0, 0, 5, 0, 0x40, 0, 0],
        ]
        .concat(),
        [
            &[0, 0, 12, 1, 5, 0, 0, 0, 1][..],
            &[
                0x82, 0x86, 0x84, 0x41, 0x8a, 8, 0x9d, 0x5c, 0x0b, 0x81, 0x70, 0xdc,
            ],
        ]
        .concat(),
        [&[0, 0, 5, 0, 1, 0, 0, 0, 1][..], b"hello"].concat(),
        vec![0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0x0f, 0, 1],
        tls_client_hello,
        vec![
            0x17, 0x03, 0x03, 0x00, 0x20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        ],
        unknown_key,
        newer_version,
        negative_id,
        binary_client_id,
        bad_body,
        trailing,
        // Produce v2: older than the crate's schemas.
        request(
            ApiKey::Produce,
            2,
            1,
            Some("c"),
            &ApiVersionsRequest::default(),
        ),
    ];
    for data in &no {
        assert!(!detect(data, Direction::Egress), "{data:02x?}");
        assert!(!detect(data, Direction::Ingress), "{data:02x?}");
    }
    // Random bytes, and random bytes after a plausible size.
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut detected = 0;
    for i in 0..20_000 {
        let len = 9 + rng.below(120) as usize;
        let mut data = rng.bytes(len);
        if i % 2 == 0 {
            let size = 10 + rng.below(4096) as u32;
            data[..4].copy_from_slice(&size.to_be_bytes());
        }
        detected += usize::from(detect(&data, Direction::Ingress));
    }
    assert_eq!(detected, 0);
}

// ---- Produce and Fetch across versions ----

/// Produce at every version the crate knows, as client and as broker: the request start,
/// the response start and the exchange, checked against the crate's record decoder.
#[test]
fn produce_every_version() {
    let topics = topics();
    for version in 3..=13 {
        for role in [Role::Client, Role::Server] {
            let mut conversation = Vec::new();
            if version >= 13 {
                conversation.extend(metadata_exchange(version, 1, &topics));
            }
            conversation.push((Side::Client, produce_request(version, 2, -1, &topics)));
            conversation.push((Side::Broker, produce_response(version, 2, &topics)));
            let o = run(&conversation, role);
            assert_eq!(o.counts, ParserCounts::default(), "v{version}");
            assert!(!o.gave_up);
            let request_k = conversation.len() as u64 - 1;
            let request_time = match direction(Side::Client, role) {
                Direction::Egress => start(request_k),
                Direction::Ingress => end(request_k),
            };
            let request_tid = match direction(Side::Client, role) {
                Direction::Egress => TX_TID,
                Direction::Ingress => RX_TID,
            };
            assert_eq!(
                o.starts,
                [RequestStart {
                    role,
                    id: 2,
                    id_on_wire: true,
                    multiplexed: role == Role::Server,
                    tid: request_tid,
                    start_ns: request_time,
                    method: "produce".into(),
                    target: "orders,payments".into(),
                    context_headers: vec![("traceparent".into(), TRACEPARENT.into())],
                }],
                "v{version}"
            );
            assert_eq!(o.responses_started, [2]);
            assert_eq!(o.exchanges.len(), 1);
            let e = &o.exchanges[0];
            assert_eq!(
                (e.role, e.id, e.start_ns, e.end_ns, e.request_tid, e.error),
                (role, 2, request_time, end(request_k + 1), request_tid, None)
            );
            assert_eq!(e.response_tid, RX_TID + TX_TID - request_tid);
            let expected = payload(
                KafkaApi::Produce,
                version,
                2,
                produce_expected(&topics, version, true),
            );
            assert_eq!(kafka(e), &expected, "v{version}");
            // Offsets are the broker's.
            let orders = &kafka(e).topics[0].partitions;
            assert_eq!(orders[0].records.messages[0].offset, 101);
            assert_eq!(
                (
                    orders[1].records.first_offset,
                    orders[1].records.last_offset
                ),
                (Some(200), Some(202))
            );
            assert_eq!(kafka(e).records(), 6);
        }
    }
}

/// Fetch at every version the crate knows, as client and as broker; v13+ name topics by
/// id, which the Metadata exchange before them resolves.
#[test]
fn fetch_every_version() {
    let topics = topics();
    for version in 4..=18 {
        for role in [Role::Client, Role::Server] {
            let mut conversation = Vec::new();
            if version >= 13 {
                conversation.extend(metadata_exchange(version, 1, &topics));
            }
            conversation.push((Side::Client, fetch_request(version, 2, &topics)));
            conversation.push((Side::Broker, fetch_response(version, 2, &topics)));
            let o = run(&conversation, role);
            assert_eq!(o.counts, ParserCounts::default(), "v{version}");
            assert_eq!(o.starts.len(), 1);
            let start = &o.starts[0];
            assert_eq!(
                (start.id, start.method.as_str(), start.target.as_str()),
                (2, "fetch", "orders,payments")
            );
            assert!(start.context_headers.is_empty());
            assert_eq!(o.responses_started, [2]);
            assert_eq!(o.exchanges.len(), 1);
            let e = &o.exchanges[0];
            assert_eq!((e.id, e.error), (2, None));
            let expected = payload(
                KafkaApi::Fetch,
                version,
                2,
                fetch_expected(&topics, version, true),
            );
            assert_eq!(kafka(e), &expected, "v{version}");
            assert_eq!(kafka(e).records(), 6);
            assert_eq!(
                kafka(e).topics[0].partitions[1].records.messages,
                [super::KafkaMessage {
                    offset: 2,
                    context_headers: vec![("traceparent".into(), TRACEPARENT_2.into())],
                }]
            );
        }
    }
}

/// Fetch v13+ whose topic ids no Metadata response named: the topics have no name, and each
/// body that met an unknown id counts once in `desynchronised`.
#[test]
fn unknown_topic_ids_are_counted() {
    let topics = topics();
    let conversation = vec![
        (Side::Client, fetch_request(16, 2, &topics)),
        (Side::Broker, fetch_response(16, 2, &topics)),
    ];
    let o = run(&conversation, Role::Client);
    assert_eq!(
        o.counts,
        ParserCounts {
            desynchronised: 2,
            ..ParserCounts::default()
        }
    );
    assert_eq!(o.starts[0].target, "");
    let expected = payload(KafkaApi::Fetch, 16, 2, fetch_expected(&topics, 16, false));
    assert_eq!(kafka(&o.exchanges[0]), &expected);
    // The parser's map, once a Metadata response named them.
    let mut h = Harness::new(Role::Client);
    for (side, bytes) in metadata_exchange(13, 1, &topics) {
        h.syscall(side, &bytes);
    }
    let names = h.parser.topic_names();
    assert_eq!(names.len(), 2);
    assert_eq!(names.get(&ORDERS_ID).map(|n| n.as_str()), Some("orders"));
}

/// A Fetch response without records still ends an exchange (records 0).
#[test]
fn empty_fetch_response() {
    let spec = vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: vec![(0, None)],
    }];
    let o = run(
        &[
            (Side::Client, fetch_request(12, 5, &spec)),
            (
                Side::Broker,
                response(ApiKey::Fetch, 12, 5, &FetchResponse::default()),
            ),
        ],
        Role::Client,
    );
    assert_eq!(o.counts, ParserCounts::default());
    let k = kafka(&o.exchanges[0]);
    assert_eq!((k.records(), k.topics.len(), k.error_code), (0, 0, 0));
}

// ---- Recorded clients ----

#[test]
fn recorded_confluent_producer() {
    for role in [Role::Client, Role::Server] {
        let o = run(&recorded("confluent_produce"), role);
        assert_eq!(o.counts, ParserCounts::default());
        assert_eq!(o.starts.len(), 1);
        let start = &o.starts[0];
        assert_eq!(
            (start.method.as_str(), start.target.as_str(), start.role),
            ("produce", "orders", role)
        );
        assert_eq!(
            start.context_headers,
            [("traceparent".to_string(), TRACEPARENT.to_string())]
        );
        let [e] = &o.exchanges[..] else {
            panic!("{:?}", o.exchanges)
        };
        assert_eq!((e.id, e.error), (start.id, None));
        let k = kafka(e);
        assert_eq!((k.api, k.api_version), (KafkaApi::Produce, 10));
        assert_eq!(k.client_id.as_deref(), Some("producer-none"));
        assert_eq!(k.acks, Some(-1));
        let p = &k.topics[0].partitions[0];
        assert_eq!(
            (p.error_code, p.base_offset, p.records.count),
            (0, Some(0), 1)
        );
        assert_eq!(p.records.messages[0].offset, 0);
        assert_eq!(
            p.records.messages[0].context_headers,
            [("traceparent".to_string(), TRACEPARENT.to_string())]
        );
    }
}

/// librdkafka's consumer: Metadata v13 gives the topic id of "orders", FindCoordinator names
/// group "g1", and the first Fetch v16 returns the message with its traceparent.
#[test]
fn recorded_confluent_consumer() {
    for role in [Role::Client, Role::Server] {
        let o = run(&recorded("confluent_fetch"), role);
        assert_eq!(o.counts, ParserCounts::default());
        assert!(o.starts.iter().all(|s| s.method == "fetch"));
        let fetched: Vec<_> = o.exchanges.iter().filter(|e| e.error.is_none()).collect();
        assert!(!fetched.is_empty());
        let first = kafka(fetched[0]);
        assert_eq!((first.api, first.api_version), (KafkaApi::Fetch, 16));
        assert_eq!(first.group_id.as_deref(), Some("g1"));
        assert_eq!(first.topics[0].name.as_deref(), Some("orders"));
        assert!(first.topics[0].id.is_some());
        assert_eq!(first.records(), 1);
        let message = first
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .flat_map(|p| &p.records.messages)
            .next()
            .unwrap();
        assert_eq!(
            message.context_headers,
            [("traceparent".to_string(), TRACEPARENT.to_string())]
        );
        // The last Fetch (long polling) was in flight at the close.
        let last = o.exchanges.last().unwrap();
        assert_eq!(last.error, Some(ExchangeError::ConnectionClosed));
        assert!(!kafka(last).response);
    }
}

/// The group coordinator's connection: JoinGroup, SyncGroup, Heartbeat, OffsetFetch,
/// OffsetCommit, LeaveGroup: no exchange, the group remembered.
#[test]
fn recorded_group_connection() {
    let mut h = Harness::new(Role::Client);
    for (side, bytes) in recorded("confluent_group") {
        h.syscall(side, &bytes);
    }
    assert_eq!(h.parser.group_id(), Some("g1"));
    let o = outcome(h);
    assert_eq!(o.counts, ParserCounts::default());
    assert!(o.starts.is_empty() && o.exchanges.is_empty());
}

/// Topic names and the consumer group are shared by the parsers of one pipeline: a client
/// learns topic ids on one connection (Metadata) and names its group on the coordinator's, and
/// fetches by id on another. The group is per process; topic ids serve every process.
#[test]
fn names_and_groups_cross_connections() {
    let topics = topics();
    let context = crate::protocols::ParserContext::standalone(40);
    let mut metadata = Harness::new(Role::Client);
    metadata.parser = KafkaParser::with_context(&context);
    for (side, bytes) in metadata_exchange(13, 1, &topics) {
        metadata.syscall(side, &bytes);
    }
    let mut group = Harness::new(Role::Client);
    group.parser = KafkaParser::with_context(&context);
    for (side, bytes) in recorded("confluent_group") {
        group.syscall(side, &bytes);
    }
    let fetch_on = |pid: u32| {
        let mut h = Harness::new(Role::Client);
        h.parser = KafkaParser::with_context(&crate::protocols::ParserContext {
            pid,
            shared: context.shared.clone(),
        });
        h.client(&fetch_request(16, 2, &topics));
        h.broker(&fetch_response(16, 2, &topics));
        outcome(h)
    };
    let o = fetch_on(40);
    assert_eq!(o.counts, ParserCounts::default(), "every id resolved");
    let fetched = kafka(&o.exchanges[0]);
    assert_eq!(
        fetched.topic_names().collect::<Vec<_>>(),
        ["orders", "payments"]
    );
    assert_eq!(fetched.group_id.as_deref(), Some("g1"));
    // Another process: the same topic names, not the group.
    let o = fetch_on(41);
    let fetched = kafka(&o.exchanges[0]);
    assert_eq!(fetched.topic_names().count(), 2);
    assert_eq!(fetched.group_id, None);
    // The process exits: its group is forgotten.
    context.shared.kafka.forget_process(40);
    assert_eq!(context.shared.kafka.group(40), None);
}

/// librdkafka producers with each compression codec: 5 messages in one compressed batch,
/// each with its traceparent.
#[test]
fn recorded_compressed_producers() {
    for (name, codec) in [
        ("gzip_produce", Compression::Gzip),
        ("snappy_produce", Compression::Snappy),
        ("lz4_produce", Compression::Lz4),
        ("zstd_produce", Compression::Zstd),
    ] {
        let conversation = recorded(name);
        // The batch is compressed with that codec (the crate decodes the request).
        let produce = conversation
            .iter()
            .find(|(side, b)| *side == Side::Client && b[4..6] == [0, 0])
            .unwrap();
        let mut body = Bytes::from(produce.1[4..].to_vec());
        let header = RequestHeader::decode(&mut body, 2).unwrap();
        let request = ProduceRequest::decode(&mut body, header.request_api_version).unwrap();
        let mut records = request.topic_data[0].partition_data[0]
            .records
            .clone()
            .unwrap();
        let set = RecordBatchDecoder::decode(&mut records).unwrap();
        assert_eq!(set.compression, codec, "{name}");
        for role in [Role::Client, Role::Server] {
            let o = run(&conversation, role);
            assert_eq!(o.counts, ParserCounts::default(), "{name}");
            let [e] = &o.exchanges[..] else {
                panic!("{name}: {:?}", o.exchanges)
            };
            let p = &kafka(e).topics[0].partitions[0];
            assert_eq!(p.records.count, 5);
            let offsets: Vec<i64> = p.records.messages.iter().map(|m| m.offset).collect();
            assert_eq!(offsets, [0, 1, 2, 3, 4], "{name}");
            for (i, m) in p.records.messages.iter().enumerate() {
                let expected = format!("{}{i}-01", &TRACEPARENT[..TRACEPARENT.len() - 4]);
                assert_eq!(m.context_headers, [("traceparent".to_string(), expected)]);
            }
            assert_eq!(
                o.starts[0].context_headers[0].1,
                format!("{}0-01", &TRACEPARENT[..TRACEPARENT.len() - 4])
            );
        }
    }
}

/// kcat (librdkafka 2.0.2): Produce v7, then Metadata v4 and Fetch v11.
#[test]
fn recorded_kcat() {
    for role in [Role::Client, Role::Server] {
        let o = run(&recorded("kcat_produce"), role);
        assert_eq!(o.counts, ParserCounts::default());
        let [e] = &o.exchanges[..] else {
            panic!("{:?}", o.exchanges)
        };
        let k = kafka(e);
        assert_eq!(
            (k.api_version, k.client_id.as_deref()),
            (7, Some("rdkafka"))
        );
        assert_eq!(k.topics[0].name.as_deref(), Some("kc"));
        assert_eq!(k.topics[0].partitions[0].records.messages.len(), 1);

        let o = run(&recorded("kcat_fetch"), role);
        assert_eq!(o.counts, ParserCounts::default());
        let fetched = kafka(&o.exchanges[0]);
        assert_eq!(fetched.api_version, 11);
        assert_eq!(fetched.records(), 1);
        let message = fetched
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .flat_map(|p| &p.records.messages)
            .next()
            .unwrap();
        assert_eq!(message.context_headers[0].1, TRACEPARENT);
    }
}

// ---- Framing: pipelining, splits, truncation ----

/// A conversation of pipelined requests: Metadata, Produce v9 and Fetch v12 in one write,
/// their responses in one read.
fn pipelined_conversation() -> Vec<(Side, Vec<u8>)> {
    let topics = topics();
    vec![
        (Side::Client, api_versions_request(3, 1)),
        (
            Side::Client,
            [
                metadata_request(12, 2),
                produce_request(9, 3, -1, &topics),
                fetch_request(12, 4, &topics),
            ]
            .concat(),
        ),
        (
            Side::Broker,
            [
                metadata_response(12, 2, &topics),
                produce_response(9, 3, &topics),
                fetch_response(12, 4, &topics),
            ]
            .concat(),
        ),
    ]
}

/// What the exchanges of a run were, without times and threads.
fn summary(o: &Outcome) -> Vec<(u64, Option<ExchangeError>, KafkaPayload)> {
    o.exchanges
        .iter()
        .map(|e| (e.id, e.error, kafka(e).clone()))
        .collect()
}

#[test]
fn pipelined_requests_and_responses() {
    let topics = topics();
    for role in [Role::Client, Role::Server] {
        let o = run(&pipelined_conversation(), role);
        assert_eq!(o.counts, ParserCounts::default());
        let ids: Vec<u64> = o.starts.iter().map(|s| s.id).collect();
        assert_eq!(ids, [3, 4]);
        assert_eq!(o.responses_started, [3, 4]);
        assert_eq!(
            summary(&o),
            [
                (
                    3,
                    None,
                    payload(KafkaApi::Produce, 9, 3, produce_expected(&topics, 9, true))
                ),
                (
                    4,
                    None,
                    payload(KafkaApi::Fetch, 12, 4, fetch_expected(&topics, 12, true))
                ),
            ]
        );
    }
}

/// Requests and responses split at every byte (two reads or writes) give the same exchanges,
/// and so does feeding every byte alone.
#[test]
fn split_at_every_byte() {
    let conversation = pipelined_conversation();
    for role in [Role::Client, Role::Server] {
        let whole = run(&conversation, role);
        for part in 1..conversation.len() {
            let bytes = &conversation[part].1;
            for at in 1..bytes.len() {
                let mut split = conversation.clone();
                let (side, bytes) = split.remove(part);
                split.insert(part, (side, bytes[..at].to_vec()));
                split.insert(part + 1, (side, bytes[at..].to_vec()));
                let o = run(&split, role);
                assert_eq!(o.counts, whole.counts, "part {part} at {at}");
                assert_eq!(summary(&o), summary(&whole), "part {part} at {at}");
                assert_eq!(o.responses_started, whole.responses_started);
                let starts = |o: &Outcome| -> Vec<RequestStart> {
                    // Times and threads differ with the split.
                    o.starts
                        .iter()
                        .map(|s| RequestStart {
                            tid: 0,
                            start_ns: 0,
                            ..s.clone()
                        })
                        .collect()
                };
                assert_eq!(starts(&o), starts(&whole));
            }
        }
        // Every byte alone, after the first request (detection needs a request's first bytes
        // in one chunk).
        let bytewise: Vec<(Side, Vec<u8>)> = conversation[..1]
            .iter()
            .cloned()
            .chain(
                conversation[1..]
                    .iter()
                    .flat_map(|(side, bytes)| bytes.iter().map(|b| (*side, vec![*b]))),
            )
            .collect();
        let o = run(&bytewise, role);
        assert_eq!(summary(&o), summary(&whole));
        assert_eq!(o.counts, whole.counts);
    }
}

/// A topic whose partition 0 holds one batch of `n` messages, those at `traced` with a
/// traceparent.
fn big_topic(n: i64, traced: &[(i64, &str)], compression: Compression) -> Vec<TopicSpec> {
    vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: vec![(0, Some(batch(&messages(0, n, traced), compression)))],
    }]
}

/// A Produce request larger than the capture: its captured prefix gives the topic, the
/// batch header (so all 2000 messages are counted) and the first records' contexts; the
/// uncaptured rest is skipped by count and the response pairs.
#[test]
fn produce_request_larger_than_the_capture() {
    let spec = big_topic(
        2000,
        &[(1, TRACEPARENT), (1999, TRACEPARENT_2)],
        Compression::None,
    );
    let request = produce_request(9, 7, -1, &spec);
    let capture = REGISTRATION.capture_bytes.unwrap() as usize;
    assert!(request.len() > 4 * capture);
    for role in [Role::Client, Role::Server] {
        let o = run(
            &[
                (Side::Client, request.clone()),
                (Side::Broker, produce_response(9, 7, &spec)),
            ],
            role,
        );
        assert_eq!(o.counts, ParserCounts::default());
        assert_eq!(o.starts[0].context_headers[0].1, TRACEPARENT);
        let [e] = &o.exchanges[..] else {
            panic!("{:?}", o.exchanges)
        };
        let k = kafka(e);
        assert!(k.request_cut && !k.response_cut);
        let records = &k.topics[0].partitions[0].records;
        assert_eq!(records.count, 2000);
        assert_eq!(
            (records.first_offset, records.last_offset),
            (Some(100), Some(2099))
        );
        assert!(records.cut);
        // Only the first records were captured.
        assert_eq!(records.messages.len(), 1);
        assert_eq!(records.messages[0].offset, 101);
    }
}

/// The same request captured to every length: never an error; paired whenever its header was
/// captured; the response always framed.
#[test]
fn requests_cut_at_every_length() {
    let spec = big_topic(300, &[(0, TRACEPARENT)], Compression::None);
    let request = produce_request(9, 7, -1, &spec);
    let answer = produce_response(9, 7, &spec);
    let lengths = (0..400).chain((400..request.len()).step_by(97));
    for captured in lengths {
        let mut h = Harness::new(Role::Client);
        // Detection needs a request's first bytes: a first request, whole.
        h.client(&api_versions_request(3, 1));
        h.chunk(Side::Client, &request[..captured], request.len() as u64);
        h.broker(&response(
            ApiKey::ApiVersions,
            3,
            1,
            &ApiVersionsResponseBody::default(),
        ));
        h.broker(&answer);
        let o = outcome(h);
        assert_eq!(o.counts.parse_errors, 0, "{captured}");
        assert!(!o.gave_up);
        // Size, api key, version, correlation id, client id.
        let header = 4 + 8 + 2 + "producer-1".len() + 1;
        if captured < header {
            assert!(o.exchanges.is_empty(), "{captured}");
            assert_eq!(o.counts.desynchronised, 1);
        } else {
            assert_eq!(o.counts.desynchronised, 0);
            let [e] = &o.exchanges[..] else {
                panic!("{captured}: {:?}", o.exchanges)
            };
            assert_eq!((e.id, e.error), (7, None));
            let k = kafka(e);
            assert!(k.response && k.request_cut == (captured < request.len()));
            let count: u64 = k.records();
            assert!(count == 0 || count == 300, "{captured}");
        }
    }
}

/// Stand-in for ApiVersionsResponse in tests that only need its frame.
type ApiVersionsResponseBody = kafka_protocol::messages::ApiVersionsResponse;

/// A Fetch response larger than the capture: counted from the batch header, its first
/// messages' contexts kept, the topics after the cut unknown.
#[test]
fn fetch_response_larger_than_the_capture() {
    let mut spec = big_topic(
        2000,
        &[(0, TRACEPARENT), (1999, TRACEPARENT_2)],
        Compression::None,
    );
    spec.push(TopicSpec {
        name: "payments",
        id: PAYMENTS_ID,
        partitions: vec![(0, None)],
    });
    for role in [Role::Client, Role::Server] {
        let o = run(
            &[
                (Side::Client, fetch_request(11, 3, &spec)),
                (Side::Broker, fetch_response(11, 3, &spec)),
                // The connection goes on.
                (Side::Client, fetch_request(11, 4, &spec[1..])),
                (Side::Broker, fetch_response(11, 4, &spec[1..])),
            ],
            role,
        );
        assert_eq!(o.counts, ParserCounts::default());
        let ids: Vec<u64> = o.exchanges.iter().map(|e| e.id).collect();
        assert_eq!(ids, [3, 4]);
        let k = kafka(&o.exchanges[0]);
        assert!(k.response_cut && !k.request_cut);
        assert_eq!(k.topics.len(), 1);
        let records = &k.topics[0].partitions[0].records;
        assert_eq!(
            (records.count, records.last_offset, records.cut),
            (2000, Some(1999), true)
        );
        assert_eq!(records.messages.len(), 1);
        assert_eq!(
            kafka(&o.exchanges[1]).topics[0].name.as_deref(),
            Some("payments")
        );
    }
}

/// A frame fully captured over several syscalls but larger than the frame buffer: the
/// buffer stops at 64 KiB (the rest is counted) and is freed after the frame.
#[test]
fn frame_buffer_is_bounded() {
    let spec = big_topic(4000, &[(0, TRACEPARENT)], Compression::None);
    let request = produce_request(9, 7, -1, &spec);
    assert!(request.len() > 2 * MAX_FRAME_PREFIX);
    let mut h = Harness::new(Role::Client);
    for part in request.chunks(4000) {
        h.chunk(Side::Client, part, part.len() as u64);
        assert!(
            h.parser
                .footprint()
                .1
                .iter()
                .all(|&c| c <= MAX_FRAME_PREFIX)
        );
    }
    h.broker(&produce_response(9, 7, &spec));
    assert!(h.parser.footprint().1.iter().all(|&c| c <= 4096));
    let o = outcome(h);
    assert_eq!(o.counts, ParserCounts::default());
    let k = kafka(&o.exchanges[0]);
    assert!(k.request_cut);
    assert_eq!(k.records(), 4000);
}

/// A syscall whose uncaptured bytes hold a frame boundary loses framing (counted once); the
/// next syscall that starts a frame resumes it. Requests lost are not reported; responses
/// to them are skipped.
#[test]
fn framing_lost_in_uncaptured_bytes_resumes() {
    let topics = topics();
    let big = big_topic(2000, &[], Compression::None);
    for role in [Role::Client, Role::Server] {
        let mut h = Harness::new(role);
        // Requests 1 (large) and 2 in one write captured partly: 2 is lost.
        let write = [
            produce_request(9, 1, -1, &big),
            produce_request(9, 2, -1, &topics),
        ]
        .concat();
        h.chunk(Side::Client, &write[..1000], write.len() as u64);
        assert_eq!(h.counts().desynchronised, 1);
        h.client(&produce_request(9, 3, -1, &topics));
        // Responses 1 (captured partly, response 2 in its uncaptured bytes), then 3.
        let read = [
            produce_response(9, 1, &big),
            produce_response(9, 2, &topics),
        ]
        .concat();
        h.chunk(Side::Broker, &read[..10], read.len() as u64);
        h.broker(&produce_response(9, 3, &topics));
        let o = outcome(h);
        assert_eq!(
            o.counts,
            ParserCounts {
                desynchronised: 2,
                ..ParserCounts::default()
            }
        );
        let ids: Vec<u64> = o.starts.iter().map(|s| s.id).collect();
        assert_eq!(ids, [1, 3]);
        let ended: Vec<(u64, Option<ExchangeError>)> =
            o.exchanges.iter().map(|e| (e.id, e.error)).collect();
        assert_eq!(ended, [(1, None), (3, None)]);
        assert!(kafka(&o.exchanges[0]).response_cut);
    }
}

/// Readers that read a frame's size alone (Java clients and brokers): a broker joined at
/// such a read follows the connection from its next request.
#[test]
fn size_read_alone() {
    let topics = topics();
    let first = api_versions_request(3, 1);
    assert!(!detect(&first[..4], Direction::Ingress));
    assert!(detect(&first[4..], Direction::Ingress));
    let produce = produce_request(9, 2, -1, &topics);
    let fetch = fetch_request(12, 3, &topics);
    let mut h = Harness::new(Role::Server);
    h.client(&first[..4]);
    h.client(&first[4..]);
    assert_eq!(h.parser.role(), Some(Role::Server));
    h.broker(&response(
        ApiKey::ApiVersions,
        3,
        1,
        &ApiVersionsResponseBody::default(),
    ));
    for request in [&produce, &fetch] {
        h.client(&request[..4]);
        h.client(&request[4..]);
    }
    let responses = [
        produce_response(9, 2, &topics),
        fetch_response(12, 3, &topics),
    ];
    for response in &responses {
        h.broker(response);
    }
    let o = outcome(h);
    assert_eq!(o.counts, ParserCounts::default());
    let ids: Vec<(u64, Option<ExchangeError>)> =
        o.exchanges.iter().map(|e| (e.id, e.error)).collect();
    assert_eq!(ids, [(2, None), (3, None)]);
    // The request started with the size's syscall (the 4th call: a read, at its end).
    assert_eq!(o.exchanges[0].start_ns, end(4));
    // The client side of the same reads: responses read size first.
    let mut h = Harness::new(Role::Client);
    h.client(&produce);
    h.broker(&responses[0][..4]);
    h.broker(&responses[0][4..]);
    let o = outcome(h);
    assert_eq!(o.exchanges[0].error, None);
}

/// librdkafka's mock broker reads a request's size and header fixed part (12 bytes) apart from
/// the rest: detected on the 12 bytes, parsed whole.
#[test]
fn header_fixed_part_read_alone() {
    let topics = topics();
    let first = api_versions_request(3, 1);
    assert!(detect(&first[..12], Direction::Ingress));
    // 12 bytes that are not a request's start.
    assert!(!detect(
        b"\x00\x00\x00\x40\x7f\x00\x00\x03\x00\x00\x00\x01",
        Direction::Ingress
    ));
    assert!(!detect(
        b"\x00\x00\x00\x40\x00\x00\x00\x03\xff\x00\x00\x01",
        Direction::Ingress
    ));
    let produce = produce_request(9, 2, -1, &topics);
    let fetch = fetch_request(12, 3, &topics);
    let mut h = Harness::new(Role::Server);
    h.client(&first[..12]);
    h.client(&first[12..]);
    assert_eq!(h.parser.role(), Some(Role::Server));
    h.broker(&response(
        ApiKey::ApiVersions,
        3,
        1,
        &ApiVersionsResponseBody::default(),
    ));
    for request in [&produce, &fetch] {
        h.client(&request[..12]);
        h.client(&request[12..]);
    }
    h.broker(&produce_response(9, 2, &topics));
    h.broker(&fetch_response(12, 3, &topics));
    let o = outcome(h);
    assert_eq!(o.counts, ParserCounts::default());
    let ids: Vec<(u64, Option<ExchangeError>)> =
        o.exchanges.iter().map(|e| (e.id, e.error)).collect();
    assert_eq!(ids, [(2, None), (3, None)]);
    assert_eq!(kafka(&o.exchanges[0]).topics.len(), topics.len());
}

/// A parser that joins a connection mid-stream ignores what comes before a request starts a
/// chunk, and a response direction that starts mid-frame until a response to a request it saw.
#[test]
fn joined_mid_stream() {
    let topics = topics();
    let old_response = fetch_response(12, 40, &topics);
    let old_request = fetch_request(12, 41, &topics);
    for role in [Role::Client, Role::Server] {
        let mut h = Harness::new(role);
        h.broker(&old_response[..30]);
        h.client(&old_request[20..]);
        assert_eq!(h.parser.role(), None);
        h.client(&produce_request(9, 42, -1, &topics));
        assert_eq!(h.parser.role(), Some(role));
        // The end of an older response, then the response to 41 (not seen), then to 42.
        h.broker(&old_response[30..]);
        h.broker(&fetch_response(12, 41, &topics));
        h.broker(&produce_response(9, 42, &topics));
        let o = outcome(h);
        assert_eq!(o.counts, ParserCounts::default());
        let ids: Vec<(u64, Option<ExchangeError>)> =
            o.exchanges.iter().map(|e| (e.id, e.error)).collect();
        assert_eq!(ids, [(42, None)]);
    }
}

// ---- Record batches ----

const CODECS: [Compression; 4] = [
    Compression::Gzip,
    Compression::Snappy,
    Compression::Lz4,
    Compression::Zstd,
];

/// Batches compressed by the crate with each codec: their messages' contexts are read.
#[test]
fn compressed_batches() {
    for codec in CODECS {
        let spec = big_topic(50, &[(0, TRACEPARENT), (49, TRACEPARENT_2)], codec);
        let expected = payload(KafkaApi::Produce, 9, 7, produce_expected(&spec, 9, true));
        let o = run(
            &[
                (Side::Client, produce_request(9, 7, -1, &spec)),
                (Side::Broker, produce_response(9, 7, &spec)),
            ],
            Role::Client,
        );
        assert_eq!(o.counts, ParserCounts::default(), "{codec:?}");
        let k = kafka(&o.exchanges[0]);
        assert_eq!(k, &{
            let mut e = expected.clone();
            e.error_code = 0;
            e
        });
        let offsets: Vec<i64> = k.topics[0].partitions[0]
            .records
            .messages
            .iter()
            .map(|m| m.offset)
            .collect();
        assert_eq!(offsets, [100, 149], "{codec:?}");
        // In a Fetch response too.
        let o = run(
            &[
                (Side::Client, fetch_request(12, 8, &spec)),
                (Side::Broker, fetch_response(12, 8, &spec)),
            ],
            Role::Client,
        );
        assert_eq!(o.counts, ParserCounts::default(), "{codec:?}");
        assert_eq!(
            kafka(&o.exchanges[0]).topics,
            fetch_expected(&spec, 12, true),
            "{codec:?}"
        );
    }
}

/// A compressed batch cut by the capture: counted from its header; gzip, a stream,
/// decompresses its captured part into the first messages.
#[test]
fn compressed_batch_cut_by_the_capture() {
    for codec in CODECS {
        let spec = vec![TopicSpec {
            name: "orders",
            id: ORDERS_ID,
            partitions: vec![(
                0,
                Some(batch(
                    &(0..400)
                        .map(|o| {
                            // Values that barely compress: the batch is larger than the capture.
                            let traced: &[(&str, &str)] = if o % 10 == 0 {
                                &[("traceparent", TRACEPARENT)]
                            } else {
                                &[]
                            };
                            let mut r = record(o, traced);
                            let mut rng = Rng(o as u64 + 1);
                            r.value = Some(Bytes::from(rng.bytes(100)));
                            r
                        })
                        .collect::<Vec<_>>(),
                    codec,
                )),
            )],
        }];
        let request = produce_request(9, 7, -1, &spec);
        let capture = REGISTRATION.capture_bytes.unwrap() as usize;
        assert!(request.len() > capture, "{codec:?}");
        let o = run(
            &[
                (Side::Client, request),
                (Side::Broker, produce_response(9, 7, &spec)),
            ],
            Role::Client,
        );
        assert_eq!(o.counts, ParserCounts::default(), "{codec:?}");
        let records = &kafka(&o.exchanges[0]).topics[0].partitions[0].records;
        assert_eq!((records.count, records.cut), (400, true), "{codec:?}");
        let contexts = records.messages.len();
        match codec {
            Compression::Gzip => assert!(contexts >= 2, "{codec:?}: {contexts}"),
            _ => assert!(contexts <= 40, "{codec:?}: {contexts}"),
        }
    }
}

/// A batch that decompresses past the budget: counted, decompressed up to the budget (its
/// first messages), the bound counted in `limits_hit`.
#[test]
fn decompression_is_bounded() {
    const { assert!(DECOMPRESS_BUDGET < 3000 * 600) };
    for codec in CODECS {
        let records: Vec<Record> = (0..3000)
            .map(|o| {
                let traced = o == 0 || o == 2999;
                let mut r = record(
                    o,
                    if traced {
                        &[("traceparent", TRACEPARENT)]
                    } else {
                        &[]
                    },
                );
                r.value = Some(Bytes::from(vec![b'z'; 600]));
                r
            })
            .collect();
        let spec = vec![TopicSpec {
            name: "orders",
            id: ORDERS_ID,
            partitions: vec![(0, Some(batch(&records, codec)))],
        }];
        let request = produce_request(9, 7, -1, &spec);
        assert!(request.len() < 200_000, "{codec:?}: {}", request.len());
        // Written in syscalls captured whole: the frame's first 64 KiB are decoded.
        let mut h = Harness::new(Role::Client);
        for part in request.chunks(8192) {
            h.chunk(Side::Client, part, part.len() as u64);
        }
        h.broker(&produce_response(9, 7, &spec));
        let o = outcome(h);
        assert_eq!(
            o.counts,
            ParserCounts {
                limits_hit: 1,
                ..ParserCounts::default()
            },
            "{codec:?}"
        );
        let k = kafka(&o.exchanges[0]);
        assert!(k.entries_dropped);
        let records = &k.topics[0].partitions[0].records;
        assert_eq!(records.count, 3000);
        assert!(records.cut);
        let offsets: Vec<i64> = records.messages.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, [100], "{codec:?}");
    }
}

/// Fetch responses may end with a partial batch (the broker cuts at its byte limit): not
/// counted, not an error. Control batches (transaction markers) are not messages.
#[test]
fn partial_last_batch_and_control_batches() {
    let whole = batch(&messages(0, 3, &[(2, TRACEPARENT)]), Compression::None);
    let next = batch(&messages(3, 3, &[]), Compression::None);
    let mut control = record(6, &[]);
    control.control = true;
    control.key = Some(Bytes::from_static(&[0, 0, 0, 0]));
    let control = batch(&[control], Compression::None);
    let records = [&whole[..], &control[..], &next[..next.len() / 2]].concat();
    let spec = vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: vec![(0, Some(Bytes::from(records)))],
    }];
    let o = run(
        &[
            (Side::Client, fetch_request(11, 1, &spec)),
            (Side::Broker, fetch_response(11, 1, &spec)),
        ],
        Role::Client,
    );
    assert_eq!(o.counts, ParserCounts::default());
    let records = &kafka(&o.exchanges[0]).topics[0].partitions[0].records;
    assert_eq!(
        (
            records.count,
            records.batches,
            records.last_offset,
            records.cut
        ),
        (3, 1, Some(2), false)
    );
    assert_eq!(records.messages.len(), 1);
}

/// Records whose fields break their own lengths are a malformed batch: counted in
/// `parse_errors`, the exchange still reported (the frame is sound).
#[test]
fn malformed_batch_is_counted() {
    let mut bad = batch(&messages(0, 3, &[]), Compression::None).to_vec();
    // The first record's length varint, past the batch's end.
    bad[61] = 0x7e;
    let spec = vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: vec![(0, Some(Bytes::from(bad)))],
    }];
    let o = run(
        &[
            (Side::Client, produce_request(9, 1, -1, &spec)),
            (Side::Broker, produce_response(9, 1, &spec)),
        ],
        Role::Client,
    );
    assert_eq!(
        o.counts,
        ParserCounts {
            parse_errors: 1,
            ..ParserCounts::default()
        }
    );
    assert!(!o.gave_up);
    assert_eq!(o.exchanges[0].error, None);
    assert_eq!(kafka(&o.exchanges[0]).records(), 3);
}

// ---- Exchanges without responses, closes, bounds ----

/// Produce with acks 0 has no response: its exchange ends with the request, reported once the
/// older Produce and Fetch requests finished (the pipeline retires older requests when one
/// finishes), not held by other api keys.
#[test]
fn produce_without_acks() {
    let topics = topics();
    for role in [Role::Client, Role::Server] {
        let mut h = Harness::new(role);
        h.client(&fetch_request(12, 1, &topics));
        h.client(&produce_request(9, 2, 0, &topics));
        let produced_at = end(2);
        assert!(h.exchanges().is_empty());
        h.broker(&fetch_response(12, 1, &topics));
        let ended: Vec<(u64, u64, bool)> = h
            .exchanges()
            .iter()
            .map(|e| (e.id, e.end_ns, kafka(e).response))
            .collect();
        assert_eq!(ended, [(1, end(3), true), (2, produced_at, false)]);
        h.client(&metadata_request(12, 3));
        h.client(&produce_request(9, 4, 0, &topics));
        let ended: Vec<(u64, Option<ExchangeError>)> =
            h.exchanges().iter().map(|e| (e.id, e.error)).collect();
        assert_eq!(ended, [(4, None)]);
        let o = outcome(h);
        assert_eq!(o.counts, ParserCounts::default());
        assert!(o.exchanges.is_empty());
        assert_eq!(o.starts.len(), 3);
    }
}

/// At the close, requests in flight end with `ConnectionClosed`, a response being received
/// first (it answers the oldest); acks-0 Produce requests sent whole end without error.
#[test]
fn close_ends_requests_in_flight() {
    let topics = topics();
    let mut h = Harness::new(Role::Client);
    h.client(&produce_request(9, 1, -1, &topics));
    h.client(&fetch_request(12, 2, &topics));
    h.client(&produce_request(9, 3, 0, &topics));
    let response = produce_response(9, 1, &topics);
    h.broker(&response[..20]);
    assert_eq!(h.responses_started(), [1]);
    let closed_at = h.close();
    let ended: Vec<(u64, u64, Option<ExchangeError>, bool)> = h
        .exchanges()
        .iter()
        .map(|e| (e.id, e.end_ns, e.error, kafka(e).response))
        .collect();
    assert_eq!(
        ended,
        [
            (1, closed_at, Some(ExchangeError::ConnectionClosed), true),
            (2, closed_at, Some(ExchangeError::ConnectionClosed), false),
            (3, end(3), None, false),
        ]
    );
    // The parser starts afresh.
    assert_eq!(h.parser.role(), None);
    assert_eq!(h.parser.footprint().0, 0);
}

/// At most 256 requests in flight: past that a request is counted in `limits_hit` and not
/// followed (no request start), and its response is skipped.
#[test]
fn requests_in_flight_are_bounded() {
    let topics = topics();
    let mut h = Harness::new(Role::Client);
    for id in 0..300 {
        h.client(&metadata_request(12, id));
    }
    h.client(&produce_request(9, 300, -1, &topics));
    assert_eq!(h.parser.footprint().0, MAX_IN_FLIGHT);
    assert_eq!(h.counts().limits_hit, 300 - MAX_IN_FLIGHT as u64 + 1);
    assert!(h.starts().is_empty());
    // The responses of the first ones free room.
    let metadata = metadata_response(12, 0, &topics);
    for id in 0..256i32 {
        let mut frame = metadata.clone();
        frame[4..8].copy_from_slice(&id.to_be_bytes());
        h.broker(&frame);
    }
    assert_eq!(h.parser.footprint().0, 0);
    h.client(&produce_request(9, 301, -1, &topics));
    h.broker(&produce_response(9, 301, &topics));
    assert_eq!(h.exchanges().len(), 1);
    assert_eq!(h.counts().parse_errors, 0);
}

/// Per exchange: at most 64 topics, 256 partitions and 64 messages with context; past that
/// `entries_dropped` is set and `limits_hit` counts once per body.
#[test]
fn entries_are_bounded() {
    let many_topics: Vec<TopicSpec> = (0..70)
        .map(|i| TopicSpec {
            name: Box::leak(format!("t{i}").into_boxed_str()),
            id: [i as u8; 16],
            partitions: vec![(0, None)],
        })
        .collect();
    let many_partitions = vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: (0..300).map(|i| (i, None)).collect(),
    }];
    let traced: Vec<(i64, &str)> = (0..100).map(|o| (o, TRACEPARENT)).collect();
    let many_messages = big_topic(100, &traced, Compression::None);
    for (spec, topics, partitions, messages) in [
        (many_topics, MAX_TOPICS, MAX_TOPICS, 0),
        (many_partitions, 1, MAX_PARTITIONS, 0),
        (many_messages, 1, 1, MAX_MESSAGES),
    ] {
        let o = run(
            &[
                (Side::Client, fetch_request(12, 1, &spec)),
                (Side::Broker, fetch_response(12, 1, &spec)),
            ],
            Role::Client,
        );
        assert_eq!(o.counts.parse_errors, 0);
        let k = kafka(&o.exchanges[0]);
        assert!(k.entries_dropped);
        assert_eq!(k.topics.len(), topics);
        let kept: Vec<&super::KafkaPartition> =
            k.topics.iter().flat_map(|t| &t.partitions).collect();
        assert_eq!(kept.len(), partitions);
        let contexts: usize = kept.iter().map(|p| p.records.messages.len()).sum();
        assert_eq!(contexts, messages);
        // Request and response each hit a bound (the request has no records).
        assert_eq!(o.counts.limits_hit, if messages > 0 { 1 } else { 2 });
    }
}

/// Versions newer than the crate's schemas are framed and paired, not decoded.
#[test]
fn newer_versions_are_skipped() {
    let topics = topics();
    let mut request = produce_request(13, 2, -1, &topics);
    request[6..8].copy_from_slice(&99i16.to_be_bytes());
    let mut h = Harness::new(Role::Client);
    h.client(&produce_request(9, 1, -1, &topics));
    h.client(&request);
    h.client(&produce_request(9, 3, -1, &topics));
    h.broker(&produce_response(9, 1, &topics));
    h.broker(&produce_response(13, 2, &topics));
    h.broker(&produce_response(9, 3, &topics));
    let o = outcome(h);
    assert_eq!(o.counts, ParserCounts::default());
    let ids: Vec<(u64, Option<ExchangeError>)> =
        o.exchanges.iter().map(|e| (e.id, e.error)).collect();
    assert_eq!(ids, [(1, None), (3, None)]);
}

/// The consumer group named by group requests is carried by later exchanges.
#[test]
fn group_id_from_group_requests() {
    let topics = topics();
    let find = FindCoordinatorRequest::default()
        .with_key(s("g-find"))
        .with_key_type(0);
    let find_v4 = FindCoordinatorRequest::default()
        .with_key_type(0)
        .with_coordinator_keys(vec![s("g-find4")]);
    let find_txn = FindCoordinatorRequest::default()
        .with_key(s("txn"))
        .with_key_type(1);
    let join = JoinGroupRequest::default()
        .with_group_id(GroupId(s("g-join")))
        .with_protocol_type(s("consumer"));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            request(ApiKey::FindCoordinator, 2, 1, Some("c"), &find),
            "g-find",
        ),
        (
            request(ApiKey::FindCoordinator, 4, 1, Some("c"), &find_v4),
            "g-find4",
        ),
        (request(ApiKey::JoinGroup, 5, 1, Some("c"), &join), "g-join"),
        (request(ApiKey::JoinGroup, 9, 1, Some("c"), &join), "g-join"),
    ];
    for (group_request, group) in cases {
        let mut h = Harness::new(Role::Client);
        h.client(&group_request);
        // A transaction coordinator lookup names no group.
        h.client(&request(
            ApiKey::FindCoordinator,
            2,
            2,
            Some("c"),
            &find_txn,
        ));
        h.client(&fetch_request(12, 3, &topics));
        h.broker(&fetch_response(12, 3, &topics));
        let o = outcome(h);
        assert_eq!(o.counts, ParserCounts::default());
        assert_eq!(kafka(&o.exchanges[0]).group_id.as_deref(), Some(group));
    }
}

// ---- Violations ----

/// Bytes that break the protocol after framing was confirmed: `parse_errors` once, and the
/// parser gives up (what follows is ignored).
#[test]
fn garbage_gives_up() {
    let topics = topics();
    let mut unknown_key = produce_request(9, 2, -1, &topics);
    unknown_key[4..6].copy_from_slice(&500i16.to_be_bytes());
    let mut bad_count = produce_request(9, 2, -1, &topics);
    // The topics count (compact array) right after acks and timeout: past the frame's end.
    let at = 4 + 8 + 2 + "producer-1".len() + 1 + 5 + 2 + 4;
    bad_count[at] = 0x7f;
    let mut bad_response = fetch_response(11, 2, &topics);
    bad_response[4 + 4 + 4 + 2 + 4..][..4].copy_from_slice(&5000i32.to_be_bytes());
    let mut random = Rng(7);
    let cases: Vec<(Side, Vec<u8>)> = vec![
        (Side::Client, vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        (Side::Client, vec![0, 0, 0, 2, 1, 2]),
        (Side::Client, random.bytes(200)),
        (Side::Client, unknown_key),
        (Side::Client, bad_count),
        (Side::Broker, vec![0, 0, 0, 0]),
        (Side::Broker, vec![0x80, 0, 0, 0]),
        (Side::Broker, bad_response),
    ];
    for (side, garbage) in cases {
        for role in [Role::Client, Role::Server] {
            // Both directions confirmed first.
            let mut h = Harness::new(role);
            h.client(&fetch_request(11, 1, &topics));
            h.broker(&fetch_response(11, 1, &topics));
            h.client(&fetch_request(11, 2, &topics));
            h.syscall(side, &garbage);
            assert!(h.parser.gave_up(), "{side:?} {garbage:02x?}");
            assert_eq!(h.counts().parse_errors, 1, "{garbage:02x?}");
            h.client(&fetch_request(11, 3, &topics));
            h.broker(&fetch_response(11, 2, &topics));
            assert_eq!(h.counts().parse_errors, 1);
        }
    }
}

// ---- Robustness ----

/// Random chunks, frames with random fields, recorded and generated conversations with
/// random corruption, random uncaptured lengths: no panic, and the bounds hold.
#[test]
fn no_panic_on_random_input() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut samples: Vec<Vec<u8>> = FIXTURES
        .iter()
        .flat_map(|(_, text)| fixture(text))
        .map(|(_, bytes)| bytes)
        .collect();
    samples.extend(pipelined_conversation().into_iter().map(|(_, b)| b));
    for codec in CODECS {
        let spec = big_topic(20, &[(3, TRACEPARENT)], codec);
        samples.push(produce_request(9, 1, -1, &spec));
        samples.push(fetch_response(16, 1, &spec));
    }
    let mut totals = (0, 0, 0);
    for round in 0..4000 {
        let role = if round % 2 == 0 {
            Role::Client
        } else {
            Role::Server
        };
        let mut h = Harness::new(role);
        // Often a real start, so that framing is followed past detection.
        if round % 3 != 0 {
            h.client(&api_versions_request(3, 1));
        }
        for _ in 0..(1 + rng.below(10)) {
            let mut data: Vec<u8> = match rng.below(4) {
                0 => {
                    let len = rng.below(300) as usize;
                    rng.bytes(len)
                }
                1 => {
                    // A frame with a random header and body.
                    let len = rng.below(200) as usize;
                    let mut f = ((len + 8) as u32).to_be_bytes().to_vec();
                    f.extend((rng.below(80) as i16).to_be_bytes());
                    f.extend((rng.below(20) as i16).to_be_bytes());
                    f.extend((rng.below(4) as i32).to_be_bytes());
                    f.extend(rng.bytes(len));
                    f
                }
                _ => samples[rng.below(samples.len() as u64) as usize].clone(),
            };
            for _ in 0..rng.below(4) {
                if !data.is_empty() {
                    let i = rng.below(data.len() as u64) as usize;
                    data[i] = rng.next() as u8;
                }
            }
            let cut = rng.below(data.len() as u64 + 1) as usize;
            let full_len = data.len() as u64 + rng.below(3) * rng.below(70_000);
            let side = if rng.below(2) == 0 {
                Side::Client
            } else {
                Side::Broker
            };
            h.chunk(side, &data[..cut], full_len.max(cut as u64));
            let (in_flight, buffers) = h.parser.footprint();
            assert!(in_flight <= MAX_IN_FLIGHT);
            assert!(buffers.iter().all(|&c| c <= MAX_FRAME_PREFIX));
        }
        let o = outcome(h);
        assert!(o.starts.len() <= 100);
        assert!(o.exchanges.len() <= o.starts.len());
        totals.0 += o.exchanges.len();
        totals.1 += o.counts.parse_errors as usize;
        totals.2 += usize::from(o.gave_up);
    }
    // The rounds exercise exchanges as well as errors.
    assert!(
        totals.0 > 100 && totals.1 > 100 && totals.2 > 100,
        "{totals:?}"
    );
}

/// Context headers are bounded in bytes per exchange too (long values).
#[test]
fn context_bytes_are_bounded() {
    let long = "x".repeat(1000);
    let traced: Vec<(i64, &str)> = (0..40).map(|o| (o, long.as_str())).collect();
    let spec = big_topic(40, &traced, Compression::None);
    // Written in syscalls captured whole (the request is larger than one capture).
    let mut h = Harness::new(Role::Client);
    for part in produce_request(9, 1, -1, &spec).chunks(8192) {
        h.chunk(Side::Client, part, part.len() as u64);
    }
    h.broker(&produce_response(9, 1, &spec));
    let o = outcome(h);
    let k = kafka(&o.exchanges[0]);
    assert!(!k.request_cut);
    let messages = &k.topics[0].partitions[0].records.messages;
    let bytes: usize = messages
        .iter()
        .flat_map(|m| &m.context_headers)
        .map(|(n, v)| n.len() + v.len())
        .sum();
    assert!(bytes <= super::records::MAX_CONTEXT_BYTES);
    assert_eq!(
        messages.len(),
        super::records::MAX_CONTEXT_BYTES / (1000 + 11)
    );
    assert!(k.entries_dropped);
    assert_eq!(o.counts.limits_hit, 1);
}

/// Counts read off the wire are checked against the bytes behind them before anything is
/// sized from them (the crate's decoders allocate first: a Metadata request whose topic count
/// says 54 million would ask for gigabytes, upstream kafka-protocol-rs PR #152).
#[test]
fn wire_counts_are_checked_before_use() {
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_correlation_id(2)
        .with_client_id(Some(s("c")))
        .encode(&mut body, 1)
        .unwrap();
    body.extend_from_slice(&[0x03, 0x3c, 0x0c, 0x00, 0xb6]);
    let frame = sized(body);
    assert!(!detect(&frame, Direction::Egress));
    let mut h = Harness::new(Role::Client);
    h.client(&metadata_request(4, 1));
    h.client(&frame);
    // Not a violation yet: Metadata request bodies are only checked by detection...
    assert!(!h.parser.gave_up());
    // ...but a Produce request's are, as every response body decoded.
    let mut produce = produce_request(7, 3, -1, &topics());
    let at = 4 + 8 + 2 + "producer-1".len() + 2 + "tx-1".len() + 2 + 4;
    produce[at..at + 4].copy_from_slice(&0x033c_0c00i32.to_be_bytes());
    h.client(&produce);
    assert!(h.parser.gave_up());
    assert_eq!(h.counts().parse_errors, 1);
    // A batch header whose record count exceeds its offsets: malformed, not counted.
    let mut bad = batch(&messages(0, 3, &[]), Compression::None).to_vec();
    bad[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
    let spec = vec![TopicSpec {
        name: "orders",
        id: ORDERS_ID,
        partitions: vec![(0, Some(Bytes::from(bad)))],
    }];
    let o = run(
        &[(Side::Client, produce_request(9, 1, -1, &spec))],
        Role::Client,
    );
    assert_eq!(o.counts.parse_errors, 1);
    assert_eq!(kafka(&o.exchanges[0]).records(), 0);
}

/// Metadata responses at every version: framed and decoded without error; v10+ teach topic
/// ids.
#[test]
fn metadata_every_version() {
    let topics = topics();
    for version in 0..=13 {
        let mut h = Harness::new(Role::Client);
        h.client(&metadata_request(version, 1));
        h.broker(&metadata_response(version, 1, &topics));
        // Still in step.
        h.client(&produce_request(9, 2, -1, &topics));
        h.broker(&produce_response(9, 2, &topics));
        assert_eq!(h.counts(), ParserCounts::default(), "v{version}");
        let learnt = h.parser.topic_names().len();
        assert_eq!(learnt, if version >= 10 { 2 } else { 0 }, "v{version}");
        assert_eq!(h.exchanges().len(), 1);
    }
}

/// What the agent's memory budget asks of the parser: a request frame split across reads is a
/// partial message holding its captured bytes; complete, it is not.
#[test]
fn a_partial_frame_is_reported_with_its_memory() {
    let request = produce_request(9, 7, 1, &topics());
    let mut h = Harness::new(Role::Client);
    let half = request.len() / 2;
    h.client(&request[..half]);
    assert!(h.parser.holds_partial());
    assert!(h.parser.memory_bytes() >= half - 4);
    h.client(&request[half..]);
    assert!(!h.parser.holds_partial());
}
