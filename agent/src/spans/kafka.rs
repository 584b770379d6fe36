//! Kafka span builder (OpenTelemetry messaging semantic conventions, Kafka flavour), and the
//! table that links a consumer's messages to the producer spans that wrote them.
//!
//! - A Produce exchange of a client is one PRODUCER span per topic it wrote, `send {topic}`.
//! - A Fetch exchange of a client is one CONSUMER span per topic that returned records,
//!   `poll {topic}`; topics that returned none make no span, only a metrics point
//!   ([`Export::MetricsOnly`]: empty long polls are most fetches of an idle consumer).
//! - The broker's side (a traced broker process) is one SERVER span per topic, named the same.
//! - A topic named by id that no Metadata response resolved gets no name (`send`, `poll`, no
//!   `messaging.destination.name`): never `*`.
//!
//! Links (CONSUMER spans only): a message that carries a trace context (a `traceparent` header
//! from a producer with its own SDK) links to that context; a message without one links to the
//! PRODUCER span that wrote it, when the producer is traced on this host: PRODUCER spans record
//! the offsets the broker gave their messages ([`ProducedMessages`]), CONSUMER spans look up
//! the offsets they received. At most [`MAX_LINKS`] links per span.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use compact_str::{CompactString, format_compact};
use rustc_hash::FxHashMap;

use super::http::address_string;
use super::{AttributeValue, Attributes, Resource, Span, SpanIds, SpanKind, SpanLink, SpanStatus};
use crate::clock::Clock;
use crate::protocols::kafka::{KafkaApi, KafkaPartition, KafkaPayload, KafkaTopic};
use crate::protocols::{Exchange, Role};
use crate::tracecontext;

/// Links per CONSUMER span, at most (the OpenTelemetry SDKs' default link limit); the rest are
/// counted in [`ProducedMessages::links_dropped`].
pub const MAX_LINKS: usize = 128;

/// Whether a built span is exported or only counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    Span,
    /// An empty fetch: its duration counts in `messaging.client.operation.duration`.
    MetricsOnly,
}

/// Offsets → the PRODUCER span that wrote them, per (topic, partition): filled as PRODUCER
/// spans are emitted, read by CONSUMER spans. Bounded: the oldest ranges go first.
#[derive(Debug, Default)]
pub struct ProducedMessages {
    /// First offset → (last offset, producer span), per (topic, partition).
    ranges: FxHashMap<(CompactString, i32), BTreeMap<i64, (i64, SpanLink)>>,
    /// Insertion order, for eviction.
    order: VecDeque<(CompactString, i32, i64)>,
    /// Ranges evicted before a consumer asked for them, and links past [`MAX_LINKS`].
    pub links_dropped: u64,
}

impl ProducedMessages {
    /// Produce requests remembered, at most (a few MiB).
    pub const MAX_RANGES: usize = 32768;

    /// The producer span `link` wrote offsets `first..=last` of `topic`'s `partition`.
    pub fn record(
        &mut self,
        topic: &CompactString,
        partition: i32,
        first: i64,
        last: i64,
        link: SpanLink,
    ) {
        if self.order.len() >= Self::MAX_RANGES
            && let Some((t, p, f)) = self.order.pop_front()
            && let Some(partition_ranges) = self.ranges.get_mut(&(t.clone(), p))
        {
            partition_ranges.remove(&f);
            if partition_ranges.is_empty() {
                self.ranges.remove(&(t, p));
            }
        }
        let key = (topic.clone(), partition);
        self.ranges
            .entry(key)
            .or_default()
            .insert(first, (last, link));
        self.order.push_back((topic.clone(), partition, first));
    }

    /// A traced producer wrote to this partition (and is still remembered).
    fn knows(&self, topic: &str, partition: i32) -> bool {
        self.ranges
            .contains_key(&(CompactString::from(topic), partition))
    }

    /// Links for the messages of `records` in `topic`'s `partition` (header contexts, and the
    /// producer spans of the messages without one), appended to `links` without duplicates.
    /// Returns how many messages have neither (producer not traced, or not seen yet).
    fn link_partition(&self, topic: &str, partition: &KafkaPartition, links: &mut Links) -> u64 {
        let records = &partition.records;
        let (Some(first), Some(last)) = (records.first_offset, records.last_offset) else {
            return 0;
        };
        if last < first {
            return 0;
        }
        // Offsets of the messages whose context parses, each parsed once.
        let mut context_offsets = [0i64; MAX_CONTEXTS];
        let mut with_context = 0usize;
        for message in &records.messages {
            if with_context == MAX_CONTEXTS {
                break;
            }
            if let Some(extracted) = tracecontext::extract(&message.context_headers) {
                context_offsets[with_context] = message.offset;
                with_context += 1;
                links.add(SpanLink {
                    trace_id: extracted.parent.trace_id,
                    span_id: extracted.parent.span_id,
                });
            }
        }
        let context_offsets = &mut context_offsets[..with_context];
        context_offsets.sort_unstable();
        let contexts_within = |lo: i64, hi: i64| {
            (context_offsets.partition_point(|&o| o <= hi)
                - context_offsets.partition_point(|&o| o < lo)) as u64
        };
        let with_context = with_context as u64;
        let messages = (last - first + 1) as u64;
        let mut covered = 0u64;
        let key = (CompactString::from(topic), partition.index);
        if let Some(ranges) = self.ranges.get(&key) {
            // Ranges starting before `first` may reach into it: start from the last one that
            // starts at or before it.
            let from = ranges
                .range(..=first)
                .next_back()
                .map_or(first, |(f, _)| *f);
            for (&range_first, &(range_last, link)) in ranges.range(from..=last) {
                let lo = range_first.max(first);
                let hi = range_last.min(last);
                if hi < lo {
                    continue;
                }
                let overlap = (hi - lo + 1) as u64;
                let contexts = contexts_within(lo, hi);
                covered += overlap - contexts.min(overlap);
                if contexts < overlap {
                    links.add(link);
                }
            }
        }
        messages.saturating_sub(covered + with_context)
    }
}

/// Messages with a trace context per partition, at most: what the parser keeps per exchange.
const MAX_CONTEXTS: usize = crate::protocols::kafka::MAX_MESSAGES;

/// A span's links, deduplicated and bounded.
struct Links {
    links: Vec<SpanLink>,
    dropped: u64,
    /// False when only counting what is missing (nothing is kept).
    keep: bool,
}

impl Links {
    fn add(&mut self, link: SpanLink) {
        if !self.keep {
            return;
        }
        if self.links.contains(&link) {
            return;
        }
        if self.links.len() >= MAX_LINKS {
            self.dropped += 1;
            return;
        }
        self.links.push(link);
    }
}

/// True while a client's fetch has header-less messages whose producer span is not known yet,
/// in a partition a traced producer wrote to before: that producer's response event may not be
/// drained yet (its thread preempted before its syscall's exit while the consumer already read
/// the message). The pipeline holds such a span for a bounded time. Partitions no traced
/// producer wrote to are not waited for, so consumers of untraced producers are not delayed;
/// the price is that the first message of a partition can miss its link when the consumer
/// reads it before the producer's response is drained.
pub fn waits_for_producers(
    exchange: &Exchange,
    kafka: &KafkaPayload,
    produced: &ProducedMessages,
) -> bool {
    if exchange.role != Role::Client || kafka.api != KafkaApi::Fetch {
        return false;
    }
    kafka.topics.iter().any(|topic| {
        let Some(name) = topic.name.as_deref() else {
            return false;
        };
        topic.partitions.iter().any(|p| {
            if p.records.count == 0 || !produced.knows(name, p.index) {
                return false;
            }
            let mut scratch = Links {
                links: Vec::new(),
                dropped: 0,
                keep: false,
            };
            produced.link_partition(name, p, &mut scratch) > 0
        })
    })
}

/// Builds the spans of a Kafka exchange (one per topic) and hands each to `emit`.
#[allow(clippy::too_many_arguments)]
pub fn kafka_spans(
    exchange: &Exchange,
    kafka: &KafkaPayload,
    ids: SpanIds,
    (local, remote): (SocketAddr, SocketAddr),
    resource: &Arc<Resource>,
    clock: &Clock,
    produced: &mut ProducedMessages,
    emit: &mut dyn FnMut(Span, Export),
) {
    let (kind, server) = match (exchange.role, kafka.api) {
        (Role::Client, KafkaApi::Produce) => (SpanKind::Producer, remote),
        (Role::Client, KafkaApi::Fetch) => (SpanKind::Consumer, remote),
        (Role::Server, _) => (SpanKind::Server, local),
    };
    if kafka.api == KafkaApi::Fetch && !kafka.response && exchange.error.is_some() {
        // A fetch still waiting when its connection closed: a consumer that shut down during
        // a long poll (the usual case) or a broker that failed; nothing says which, so it is
        // neither a span nor an error in the metrics.
        return;
    }
    let (operation_type, operation_name) = match kafka.api {
        KafkaApi::Produce => ("send", "send"),
        KafkaApi::Fetch => ("receive", "poll"),
    };
    let mut first = true;
    for topic in &kafka.topics {
        let messages = topic_messages(topic);
        let export = if kafka.api == KafkaApi::Fetch && messages == 0 {
            Export::MetricsOnly
        } else {
            Export::Span
        };
        if export == Export::MetricsOnly && kind != SpanKind::Consumer {
            continue; // the broker's empty fetches: nothing to say
        }
        // The exchange's ids go to its first span; the others are siblings.
        let span_ids = if first {
            ids
        } else {
            SpanIds {
                span_id: tracecontext::new_span_id(),
                ..ids
            }
        };
        first = false;
        let name = match &topic.name {
            Some(topic) => format_compact!("{operation_name} {topic}"),
            None => CompactString::const_new(operation_name),
        };
        let (status, error_type) = status_of(exchange, kafka, topic);
        let mut attributes = Attributes::with_capacity(16);
        let mut put = |key: &'static str, value: AttributeValue| attributes.push((key, value));
        let s = |v: &str| AttributeValue::Str(CompactString::from(v));
        put("messaging.system", s("kafka"));
        put("messaging.operation.type", s(operation_type));
        put("messaging.operation.name", s(operation_name));
        if let Some(name) = &topic.name {
            put(
                "messaging.destination.name",
                AttributeValue::Str(name.clone()),
            );
        }
        let with_records: Vec<&KafkaPartition> = match kafka.api {
            KafkaApi::Produce => topic.partitions.iter().collect(),
            KafkaApi::Fetch => topic
                .partitions
                .iter()
                .filter(|p| p.records.count > 0)
                .collect(),
        };
        if let [partition] = with_records.as_slice() {
            put(
                "messaging.destination.partition.id",
                AttributeValue::Str(format_compact!("{}", partition.index)),
            );
            if messages == 1
                && let Some(offset) = partition.records.first_offset
                && (kafka.api == KafkaApi::Fetch || partition.base_offset.is_some_and(|b| b >= 0))
            {
                put("messaging.kafka.offset", AttributeValue::Int(offset));
            }
        }
        if messages != 1 {
            // 0 only on metrics-only points (an empty fetch), which are never exported.
            put(
                "messaging.batch.message_count",
                AttributeValue::Int(messages.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(group) = &kafka.group_id
            && kafka.api == KafkaApi::Fetch
        {
            put(
                "messaging.consumer.group.name",
                AttributeValue::Str(group.clone()),
            );
        }
        if let Some(client_id) = &kafka.client_id {
            put(
                "messaging.client.id",
                AttributeValue::Str(client_id.clone()),
            );
        }
        if let Some(error_type) = error_type {
            put("error.type", AttributeValue::Str(error_type));
        }
        put(
            "server.address",
            AttributeValue::Str(address_string(server.ip())),
        );
        put("server.port", AttributeValue::Int(server.port().into()));
        put(
            "network.peer.address",
            AttributeValue::Str(address_string(remote.ip())),
        );
        put(
            "network.peer.port",
            AttributeValue::Int(remote.port().into()),
        );
        let mut span = Span::of_exchange(
            exchange,
            span_ids,
            (name, kind, status, attributes),
            resource,
            clock,
        );
        if kind == SpanKind::Consumer
            && export == Export::Span
            && let Some(name) = topic.name.as_deref()
        {
            let mut links = Links {
                links: Vec::new(),
                dropped: 0,
                keep: true,
            };
            for partition in &with_records {
                produced.link_partition(name, partition, &mut links);
            }
            produced.links_dropped += links.dropped;
            span.links = links.links;
        }
        if kind == SpanKind::Producer
            && let Some(name) = &topic.name
        {
            let link = SpanLink {
                trace_id: span.trace_id,
                span_id: span.span_id,
            };
            for partition in &topic.partitions {
                let records = &partition.records;
                if partition.error_code == 0
                    && partition.base_offset.is_some_and(|b| b >= 0)
                    && let (Some(first), Some(last)) = (records.first_offset, records.last_offset)
                {
                    produced.record(name, partition.index, first, last, link);
                }
            }
        }
        emit(span, export);
    }
}

/// Messages of a topic in this exchange (the batch headers' record counts).
fn topic_messages(topic: &KafkaTopic) -> u64 {
    topic
        .partitions
        .iter()
        .map(|p| p.records.count)
        .fold(0, u64::saturating_add)
}

/// Error when the exchange had no complete response, or a partition of this topic (or the
/// whole response) reported an error code.
fn status_of(
    exchange: &Exchange,
    kafka: &KafkaPayload,
    topic: &KafkaTopic,
) -> (SpanStatus, Option<CompactString>) {
    if let Some(error) = exchange.error {
        return (
            SpanStatus::Error,
            Some(CompactString::const_new(error.as_str())),
        );
    }
    let code = topic
        .partitions
        .iter()
        .map(|p| p.error_code)
        .find(|&c| c != 0)
        .or((kafka.error_code != 0).then_some(kafka.error_code));
    match code {
        Some(code) => (SpanStatus::Error, Some(error_name(code))),
        None => (SpanStatus::Unset, None),
    }
}

/// A Kafka error code as Kafka names it (`UNKNOWN_TOPIC_OR_PARTITION`); the number if unknown.
pub fn error_name(code: i16) -> CompactString {
    use kafka_protocol::error::ParseResponseErrorCode;
    let error = match code.err() {
        Some(kafka_protocol::ResponseError::Unknown(_)) | None => {
            return format_compact!("{code}");
        }
        Some(error) => error,
    };
    // The crate's variants are the names in CamelCase.
    let camel = format_compact!("{error:?}");
    let mut name = CompactString::with_capacity(camel.len() + 8);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::kafka::{KafkaMessage, KafkaRecords};
    use crate::protocols::{ExchangeError, Payload};

    const TRACE: [u8; 16] = [0x0a; 16];
    const HEADER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const HEADER_SPAN: &str = "b7ad6b7169203331";

    fn addresses() -> (SocketAddr, SocketAddr) {
        (
            "127.0.0.1:50000".parse().unwrap(),
            "127.0.0.1:9092".parse().unwrap(),
        )
    }

    fn partition(index: i32, first: i64, count: u64, base: Option<i64>) -> KafkaPartition {
        KafkaPartition {
            index,
            base_offset: base,
            records: KafkaRecords {
                count,
                batches: 1,
                first_offset: Some(first),
                last_offset: Some(first + count as i64 - 1),
                ..KafkaRecords::default()
            },
            ..KafkaPartition::default()
        }
    }

    fn topic(name: Option<&str>, partitions: Vec<KafkaPartition>) -> KafkaTopic {
        KafkaTopic {
            name: name.map(CompactString::from),
            id: None,
            partitions,
        }
    }

    fn payload(api: KafkaApi, topics: Vec<KafkaTopic>) -> KafkaPayload {
        KafkaPayload {
            api,
            api_version: 9,
            correlation_id: 7,
            client_id: Some("rdkafka".into()),
            group_id: Some("g1".into()),
            acks: None,
            transactional_id: None,
            topics,
            request_cut: false,
            response: true,
            response_cut: false,
            error_code: 0,
            entries_dropped: false,
        }
    }

    fn exchange(role: Role, payload: KafkaPayload) -> Exchange {
        Exchange {
            role,
            id: 7,
            start_ns: 1_000,
            end_ns: 2_000,
            request_tid: 1,
            response_tid: 1,
            error: None,
            payload: Payload::Kafka(payload),
        }
    }

    fn ids(span: u8) -> SpanIds {
        SpanIds {
            trace_id: TRACE,
            span_id: [span; 8],
            parent_span_id: Some([0xee; 8]),
        }
    }

    /// Every span built from `exchange`, with its export decision.
    fn build(
        exchange: &Exchange,
        span: u8,
        produced: &mut ProducedMessages,
    ) -> Vec<(Span, Export)> {
        let Payload::Kafka(kafka) = &exchange.payload else {
            unreachable!()
        };
        let resource = Arc::new(Resource {
            attributes: Vec::new(),
        });
        let mut spans = Vec::new();
        kafka_spans(
            exchange,
            kafka,
            ids(span),
            addresses(),
            &resource,
            &Clock::with_offset(0),
            produced,
            &mut |s, e| spans.push((s, e)),
        );
        spans
    }

    fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
        match span.attribute(key) {
            Some(AttributeValue::Str(s)) => Some(s.as_str()),
            _ => None,
        }
    }

    fn int_attr(span: &Span, key: &str) -> Option<i64> {
        match span.attribute(key) {
            Some(AttributeValue::Int(n)) => Some(*n),
            _ => None,
        }
    }

    #[test]
    fn produce_is_one_producer_span_per_topic() {
        let mut produced = ProducedMessages::default();
        let ex = exchange(
            Role::Client,
            payload(
                KafkaApi::Produce,
                vec![
                    topic(Some("orders"), vec![partition(0, 41, 1, Some(41))]),
                    topic(
                        Some("audit"),
                        vec![partition(0, 5, 2, Some(5)), partition(3, 9, 1, Some(9))],
                    ),
                ],
            ),
        );
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(spans.len(), 2);
        let (orders, audit) = (&spans[0].0, &spans[1].0);
        assert_eq!(orders.name, "send orders");
        assert_eq!(orders.kind, SpanKind::Producer);
        assert_eq!(
            orders.span_id, [1; 8],
            "the exchange's ids go to the first span"
        );
        assert_eq!(str_attr(orders, "messaging.system"), Some("kafka"));
        assert_eq!(str_attr(orders, "messaging.operation.type"), Some("send"));
        assert_eq!(str_attr(orders, "messaging.operation.name"), Some("send"));
        assert_eq!(
            str_attr(orders, "messaging.destination.name"),
            Some("orders")
        );
        assert_eq!(
            str_attr(orders, "messaging.destination.partition.id"),
            Some("0")
        );
        assert_eq!(int_attr(orders, "messaging.kafka.offset"), Some(41));
        assert_eq!(int_attr(orders, "messaging.batch.message_count"), None);
        assert_eq!(str_attr(orders, "messaging.client.id"), Some("rdkafka"));
        assert_eq!(str_attr(orders, "messaging.consumer.group.name"), None);
        assert_eq!(str_attr(orders, "server.address"), Some("127.0.0.1"));
        assert_eq!(int_attr(orders, "server.port"), Some(9092));
        assert_eq!(orders.status, SpanStatus::Unset);
        // The second topic: a sibling (same trace and parent, its own id), two partitions.
        assert_eq!(audit.name, "send audit");
        assert_eq!(audit.trace_id, TRACE);
        assert_eq!(audit.parent_span_id, Some([0xee; 8]));
        assert_ne!(audit.span_id, [1; 8]);
        assert_eq!(str_attr(audit, "messaging.destination.partition.id"), None);
        assert_eq!(int_attr(audit, "messaging.batch.message_count"), Some(3));
        assert_eq!(int_attr(audit, "messaging.kafka.offset"), None);
        assert!(spans.iter().all(|(_, e)| *e == Export::Span));
        assert!(spans.iter().all(|(s, _)| s.links.is_empty()));
    }

    #[test]
    fn consumer_links_to_header_contexts_and_to_traced_producers() {
        let mut produced = ProducedMessages::default();
        // Offsets 0 and 2 were produced by traced producers (one span each); 1 carries a
        // traceparent; 3 has neither.
        for (offset, span) in [(0, 10), (2, 12)] {
            let ex = exchange(
                Role::Client,
                payload(
                    KafkaApi::Produce,
                    vec![topic(
                        Some("orders"),
                        vec![partition(0, offset, 1, Some(offset))],
                    )],
                ),
            );
            build(&ex, span, &mut produced);
        }
        let mut fetched = partition(0, 0, 4, None);
        fetched.records.messages.push(KafkaMessage {
            offset: 1,
            context_headers: vec![(
                "traceparent".into(),
                format!("00-{HEADER_TRACE}-{HEADER_SPAN}-01"),
            )],
        });
        let ex = exchange(
            Role::Client,
            payload(KafkaApi::Fetch, vec![topic(Some("orders"), vec![fetched])]),
        );
        let Payload::Kafka(kafka) = &ex.payload else {
            unreachable!()
        };
        // Offset 3's producer is unknown: the span would wait (for a bounded time).
        assert!(waits_for_producers(&ex, kafka, &produced));
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(spans.len(), 1);
        let consumer = &spans[0].0;
        assert_eq!(consumer.name, "poll orders");
        assert_eq!(consumer.kind, SpanKind::Consumer);
        assert_eq!(
            str_attr(consumer, "messaging.operation.type"),
            Some("receive")
        );
        assert_eq!(str_attr(consumer, "messaging.operation.name"), Some("poll"));
        assert_eq!(
            str_attr(consumer, "messaging.consumer.group.name"),
            Some("g1")
        );
        assert_eq!(int_attr(consumer, "messaging.batch.message_count"), Some(4));
        let header = SpanLink {
            trace_id: u128::from_str_radix(HEADER_TRACE, 16)
                .unwrap()
                .to_be_bytes(),
            span_id: u64::from_str_radix(HEADER_SPAN, 16).unwrap().to_be_bytes(),
        };
        let producer = |span: u8| SpanLink {
            trace_id: TRACE,
            span_id: [span; 8],
        };
        assert_eq!(consumer.links, [header, producer(10), producer(12)]);
        // Once offset 3's producer is known, nothing is missing.
        let ex3 = exchange(
            Role::Client,
            payload(
                KafkaApi::Produce,
                vec![topic(Some("orders"), vec![partition(0, 3, 1, Some(3))])],
            ),
        );
        build(&ex3, 13, &mut produced);
        assert!(!waits_for_producers(&ex, kafka, &produced));
    }

    #[test]
    fn a_producer_batch_is_one_link_for_its_messages() {
        let mut produced = ProducedMessages::default();
        let ex = exchange(
            Role::Client,
            payload(
                KafkaApi::Produce,
                vec![topic(
                    Some("orders"),
                    vec![partition(0, 100, 50, Some(100))],
                )],
            ),
        );
        build(&ex, 9, &mut produced);
        // A fetch from the middle of that batch into offsets nobody traced.
        let ex = exchange(
            Role::Client,
            payload(
                KafkaApi::Fetch,
                vec![topic(Some("orders"), vec![partition(0, 120, 40, None)])],
            ),
        );
        let Payload::Kafka(kafka) = &ex.payload else {
            unreachable!()
        };
        assert!(
            waits_for_producers(&ex, kafka, &produced),
            "150..159 unknown"
        );
        // A partition no traced producer wrote to: nothing to wait for.
        let other = exchange(
            Role::Client,
            payload(
                KafkaApi::Fetch,
                vec![topic(Some("orders"), vec![partition(5, 0, 10, None)])],
            ),
        );
        let Payload::Kafka(other_kafka) = &other.payload else {
            unreachable!()
        };
        assert!(!waits_for_producers(&other, other_kafka, &produced));
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(
            spans[0].0.links,
            [SpanLink {
                trace_id: TRACE,
                span_id: [9; 8]
            }]
        );
    }

    #[test]
    fn empty_fetches_are_metrics_only_and_closed_ones_nothing() {
        let mut produced = ProducedMessages::default();
        let empty = || {
            payload(
                KafkaApi::Fetch,
                vec![topic(
                    Some("orders"),
                    vec![KafkaPartition {
                        index: 0,
                        ..KafkaPartition::default()
                    }],
                )],
            )
        };
        let spans = build(&exchange(Role::Client, empty()), 1, &mut produced);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].1, Export::MetricsOnly);
        assert_eq!(
            int_attr(&spans[0].0, "messaging.batch.message_count"),
            Some(0)
        );
        // The broker's side of an empty fetch: nothing.
        assert!(build(&exchange(Role::Server, empty()), 1, &mut produced).is_empty());
        // A long poll cut by the connection's close: nothing either.
        let mut closed = exchange(Role::Client, empty());
        closed.error = Some(ExchangeError::ConnectionClosed);
        if let Payload::Kafka(k) = &mut closed.payload {
            k.response = false;
        }
        assert!(build(&closed, 1, &mut produced).is_empty());
    }

    #[test]
    fn partition_errors_make_error_spans() {
        let mut produced = ProducedMessages::default();
        let mut failed = partition(0, 0, 1, Some(-1));
        failed.error_code = 3;
        let ex = exchange(
            Role::Client,
            payload(KafkaApi::Produce, vec![topic(Some("orders"), vec![failed])]),
        );
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(spans[0].0.status, SpanStatus::Error);
        assert_eq!(
            str_attr(&spans[0].0, "error.type"),
            Some("UNKNOWN_TOPIC_OR_PARTITION")
        );
        assert_eq!(int_attr(&spans[0].0, "messaging.kafka.offset"), None);
        assert_eq!(error_name(-1), "UNKNOWN_SERVER_ERROR");
        assert_eq!(error_name(32000), "32000");
        // Nothing recorded for a failed partition.
        assert!(produced.order.is_empty());
    }

    #[test]
    fn unresolved_topics_have_no_name() {
        let mut produced = ProducedMessages::default();
        let mut unnamed = topic(None, vec![partition(0, 0, 1, None)]);
        unnamed.id = Some([7; 16]);
        let ex = exchange(Role::Client, payload(KafkaApi::Fetch, vec![unnamed]));
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(spans[0].0.name, "poll");
        assert_eq!(str_attr(&spans[0].0, "messaging.destination.name"), None);
        assert!(spans[0].0.links.is_empty());
    }

    #[test]
    fn the_produced_table_and_links_are_bounded() {
        let mut produced = ProducedMessages::default();
        let link = |n: u64| SpanLink {
            trace_id: TRACE,
            span_id: n.to_be_bytes(),
        };
        let topic_name = CompactString::from("t");
        for n in 0..(ProducedMessages::MAX_RANGES as u64 + 10) {
            produced.record(&topic_name, 0, n as i64, n as i64, link(n));
        }
        assert_eq!(produced.order.len(), ProducedMessages::MAX_RANGES);
        assert_eq!(
            produced.ranges[&(topic_name.clone(), 0)].len(),
            ProducedMessages::MAX_RANGES
        );
        // The oldest went first: offset 0 is no longer linked.
        let ex = exchange(
            Role::Client,
            payload(
                KafkaApi::Fetch,
                vec![topic(Some("t"), vec![partition(0, 0, 300, None)])],
            ),
        );
        let spans = build(&ex, 1, &mut produced);
        assert_eq!(spans[0].0.links.len(), MAX_LINKS);
        assert_eq!(spans[0].0.links[0], link(10));
        assert_eq!(produced.links_dropped, 290 - MAX_LINKS as u64);
    }
}
