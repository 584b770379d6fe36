//! What a Kafka exchange carries out of the parser (Produce and Fetch only), and the topic id →
//! name map that Fetch v13+ and Produce v13 need.

use compact_str::CompactString;
use rustc_hash::FxHashMap;

/// The Kafka APIs whose exchanges leave the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaApi {
    Produce,
    Fetch,
}

impl KafkaApi {
    /// Lower-case name, the request's `method` (e.g. for `messaging.operation.name`).
    pub fn as_str(&self) -> &'static str {
        match self {
            KafkaApi::Produce => "produce",
            KafkaApi::Fetch => "fetch",
        }
    }

    /// The api key on the wire.
    pub fn key(&self) -> i16 {
        match self {
            KafkaApi::Produce => 0,
            KafkaApi::Fetch => 1,
        }
    }
}

/// A Produce or Fetch exchange's protocol part.
///
/// Produce: topics, partitions and records come from the request (what was produced); the
/// response adds each partition's error code and base offset, and the records' offsets are then
/// the broker's (see [`KafkaRecords`]). Fetch: topics come from the request until the response
/// arrives, then from the response (what was fetched), with their records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaPayload {
    pub api: KafkaApi,
    pub api_version: i16,
    pub correlation_id: i32,
    /// The request header's client id (lossy UTF-8, at most 1 KiB).
    pub client_id: Option<CompactString>,
    /// The consumer group this connection's client named last (JoinGroup, SyncGroup,
    /// Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch, FindCoordinator for a group,
    /// ConsumerGroupHeartbeat), when the exchange's request was parsed.
    pub group_id: Option<CompactString>,
    /// Produce: the request's `acks` (0: the broker sends no response, and the exchange ends
    /// with the request).
    pub acks: Option<i16>,
    /// Produce: the request's transactional id.
    pub transactional_id: Option<CompactString>,
    pub topics: Vec<KafkaTopic>,
    /// Not every byte of the request was decoded (not captured, or past the parser's 64 KiB
    /// of a frame): topics, partitions and message counts are lower bounds.
    pub request_cut: bool,
    /// The response's frame was seen (its correlation id at least).
    pub response: bool,
    /// Not every byte of the response was decoded (as `request_cut`).
    pub response_cut: bool,
    /// The response's top-level error code (Fetch v7+) if not 0, else the first partition
    /// error code that is not 0, else 0. 0 as well when there is no response.
    pub error_code: i16,
    /// Some topics, partitions or message contexts were not kept (the parser's bounds: 64
    /// topics, 256 partitions, 64 messages with context and 16 KiB of their headers per
    /// exchange; 1 MiB of decompressed records per chunk).
    pub entries_dropped: bool,
}

impl KafkaPayload {
    /// Messages produced (Produce) or fetched (Fetch): the record counts of the batch headers
    /// seen, control batches excluded.
    pub fn records(&self) -> u64 {
        self.topics
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.records.count)
            .fold(0, u64::saturating_add)
    }

    /// Names of the topics whose name is known, in order.
    pub fn topic_names(&self) -> impl Iterator<Item = &str> {
        self.topics.iter().filter_map(|t| t.name.as_deref())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaTopic {
    /// None when the request or response named the topic by id only (v13+) and no Metadata
    /// response seen on the connection gave its name.
    pub name: Option<CompactString>,
    /// The topic id (Produce v13+, Fetch v13+); None for versions that name topics.
    pub id: Option<[u8; 16]>,
    pub partitions: Vec<KafkaPartition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaPartition {
    pub index: i32,
    /// From the response; 0 when there is none.
    pub error_code: i16,
    /// Produce response: offset of the partition's first produced message (-1 on error).
    pub base_offset: Option<i64>,
    /// Fetch response: the partition's high watermark.
    pub high_watermark: Option<i64>,
    /// Produce: what the request carried; Fetch: what the response carried.
    pub records: KafkaRecords,
}

/// A partition's record batches: counts from the batch headers (even of batches whose records
/// were not captured), context headers from the records that were decoded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaRecords {
    /// Messages (the record count of each batch seen; control batches excluded).
    pub count: u64,
    /// Record batches seen (control batches excluded).
    pub batches: u32,
    /// Size of the records field on the wire.
    pub bytes: u64,
    /// Offset of the first message and of the last one. Fetch: the log's offsets. Produce: the
    /// broker's once its response gave the base offset, else as the producer wrote them
    /// (relative, from 0).
    pub first_offset: Option<i64>,
    pub last_offset: Option<i64>,
    /// Messages that carry trace-context headers, with their offsets (as above).
    pub messages: Vec<KafkaMessage>,
    /// Not every batch was seen (bytes not captured, a batch not decoded): counts are lower
    /// bounds, and messages with context may be missing.
    pub cut: bool,
}

/// A message (record) that carries trace-context headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaMessage {
    pub offset: i64,
    /// Trace-context headers only (traceparent, tracestate, b3, x-b3-*), names lower-cased,
    /// values lossy UTF-8 of at most 1 KiB.
    pub context_headers: Vec<(String, String)>,
}

/// Topic ids → names, from Metadata responses (v10+ give ids): Fetch v13+ and Produce v13 name
/// topics by id only. Kept per connection for now; the type is what a shared map would be.
#[derive(Clone, Debug, Default)]
pub struct TopicNames {
    names: FxHashMap<[u8; 16], CompactString>,
}

impl TopicNames {
    /// Most ids kept (a Metadata response for every topic of a large cluster stops adding
    /// there).
    pub const MAX: usize = 1024;

    /// Learns (or renames) topic `id`. False when the map is full and `id` is new.
    pub fn insert(&mut self, id: [u8; 16], name: CompactString) -> bool {
        if let Some(known) = self.names.get_mut(&id) {
            *known = name;
            return true;
        }
        if self.names.len() >= Self::MAX {
            return false;
        }
        self.names.insert(id, name);
        true
    }

    pub fn get(&self, id: &[u8; 16]) -> Option<&CompactString> {
        self.names.get(id)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}
