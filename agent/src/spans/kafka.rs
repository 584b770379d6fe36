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
use super::{
    AttributeValue, Attributes, Resource, Span, SpanIds, SpanKind, SpanLink, SpanStatus,
};
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
    pub fn record(&mut self, topic: &CompactString, partition: i32, first: i64, last: i64, link: SpanLink) {
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
        self.ranges.entry(key).or_default().insert(first, (last, link));
        self.order.push_back((topic.clone(), partition, first));
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
        let mut with_context = 0u64;
        for message in &records.messages {
            if let Some(extracted) = tracecontext::extract(&message.context_headers) {
                with_context += 1;
                links.add(SpanLink {
                    trace_id: extracted.parent.trace_id,
                    span_id: extracted.parent.span_id,
                });
            }
        }
        let has_context = |offset: i64| {
            records
                .messages
                .iter()
                .any(|m| m.offset == offset && tracecontext::extract(&m.context_headers).is_some())
        };
        let messages = (last - first + 1) as u64;
        let mut covered = 0u64;
        let key = (CompactString::from(topic), partition.index);
        if let Some(ranges) = self.ranges.get(&key) {
            // Ranges starting before `first` may reach into it: start from the last one that
            // starts at or before it.
            let from = ranges.range(..=first).next_back().map_or(first, |(f, _)| *f);
            for (&range_first, &(range_last, link)) in ranges.range(from..=last) {
                let lo = range_first.max(first);
                let hi = range_last.min(last);
                if hi < lo {
                    continue;
                }
                let overlap = (hi - lo + 1) as u64;
                let contexts = records
                    .messages
                    .iter()
                    .filter(|m| (lo..=hi).contains(&m.offset) && has_context(m.offset))
                    .count() as u64;
                covered += overlap - contexts.min(overlap);
                if contexts < overlap {
                    links.add(link);
                }
            }
        }
        messages.saturating_sub(covered + with_context)
    }
}

/// A span's links, deduplicated and bounded.
struct Links {
    links: Vec<SpanLink>,
    dropped: u64,
}

impl Links {
    fn add(&mut self, link: SpanLink) {
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

/// True while a client's fetch has header-less messages whose producer span is not known yet:
/// the producer may be traced and its response event not drained yet (its thread was
/// preempted before its syscall's exit while the consumer already read the message). The
/// pipeline holds such a span for a bounded time.
pub fn waits_for_producers(exchange: &Exchange, kafka: &KafkaPayload, produced: &ProducedMessages) -> bool {
    if exchange.role != Role::Client || kafka.api != KafkaApi::Fetch {
        return false;
    }
    kafka.topics.iter().any(|topic| {
        let Some(name) = topic.name.as_deref() else {
            return false;
        };
        topic.partitions.iter().any(|p| {
            let mut scratch = Links {
                links: Vec::new(),
                dropped: 0,
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
            put("messaging.destination.name", AttributeValue::Str(name.clone()));
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
            put("messaging.consumer.group.name", AttributeValue::Str(group.clone()));
        }
        if let Some(client_id) = &kafka.client_id {
            put("messaging.client.id", AttributeValue::Str(client_id.clone()));
        }
        if let Some(error_type) = error_type {
            put("error.type", AttributeValue::Str(error_type));
        }
        put("server.address", AttributeValue::Str(address_string(server.ip())));
        put("server.port", AttributeValue::Int(server.port().into()));
        put("network.peer.address", AttributeValue::Str(address_string(remote.ip())));
        put("network.peer.port", AttributeValue::Int(remote.port().into()));
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
        return (SpanStatus::Error, Some(CompactString::const_new(error.as_str())));
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
    let Some(error) = code.err() else {
        return format_compact!("{code}");
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
