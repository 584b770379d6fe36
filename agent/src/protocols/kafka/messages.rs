//! Request and response bodies, decoded from a frame's captured prefix: the fields the parser
//! keeps, every other field skipped by its schema (the crate's message definitions, version by
//! version). A decoder fills its output as it goes, so when the captured bytes end (`Stop::Cut`)
//! what came before stands.

use compact_str::CompactString;
use kafka_protocol::messages::ApiKey;

use super::payload::{KafkaPartition, KafkaPayload, KafkaRecords, KafkaTopic, TopicNames};
use super::records::{self, RecordsCtx};
use super::wire::{Decoded, Reader, Stop};
use crate::protocols::http::limited_string;

/// Most topics kept per exchange.
pub(super) const MAX_TOPICS: usize = 64;
/// Most partitions kept per exchange (all topics).
pub(super) const MAX_PARTITIONS: usize = 256;
/// Most messages with context headers kept per exchange.
pub const MAX_MESSAGES: usize = 64;

/// A request header (v1 and v2: every api key the crate knows has a client id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RequestHeader<'a> {
    pub key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub client_id: Option<&'a [u8]>,
}

impl RequestHeader<'_> {
    /// The crate knows this version's schema.
    pub(super) fn supported(&self) -> bool {
        let range = self.key.valid_versions();
        (range.min..=range.max).contains(&self.version)
    }

    /// The body uses the flexible encoding (compact strings and arrays, tagged fields).
    pub(super) fn flexible(&self) -> bool {
        self.key.request_header_version(self.version) >= 2
    }
}

/// Reads a request header; an unknown api key is invalid.
pub(super) fn request_header<'a>(r: &mut Reader<'a>) -> Decoded<RequestHeader<'a>> {
    let key = ApiKey::try_from(r.i16()?).map_err(|()| Stop::Invalid)?;
    let version = r.i16()?;
    let correlation_id = r.i32()?;
    let header_version = key.request_header_version(version);
    let client_id = if header_version >= 1 {
        r.string(false)?
    } else {
        None
    };
    r.tagged_fields(header_version >= 2)?;
    Ok(RequestHeader {
        key,
        version,
        correlation_id,
        client_id,
    })
}

/// The response body of `key` at `version` uses the flexible encoding. Its header is v1 then,
/// except ApiVersions' (always v0, so that any client reads its error).
pub(super) fn response_flexible(key: ApiKey, version: i16) -> bool {
    key.request_header_version(version) >= 2
}

/// Reads a response header (its correlation id was read already).
pub(super) fn response_header_rest(r: &mut Reader<'_>, key: ApiKey, version: i16) -> Decoded<()> {
    r.tagged_fields(key.response_header_version(version) >= 1)
}

/// What decoding a Produce or Fetch body may use and report.
#[derive(Debug)]
pub(super) struct Ctx<'n> {
    pub records: RecordsCtx,
    pub names: &'n TopicNames,
    pub partitions_left: usize,
    /// A topic or partition was not kept (bounds).
    pub dropped: bool,
    /// A topic id was not in `names`.
    pub unknown_ids: bool,
}

impl<'n> Ctx<'n> {
    pub(super) fn new(names: &'n TopicNames, budget: usize, messages_left: usize) -> Self {
        Ctx {
            records: RecordsCtx::new(budget, messages_left),
            names,
            partitions_left: MAX_PARTITIONS,
            dropped: false,
            unknown_ids: false,
        }
    }
}

/// A topic named (`by_id` false) or identified (`by_id`): (name, id).
fn topic_ref(
    r: &mut Reader<'_>,
    by_id: bool,
    flexible: bool,
    ctx: &mut Ctx<'_>,
) -> Decoded<(Option<CompactString>, Option<[u8; 16]>)> {
    if by_id {
        let id = r.uuid()?;
        let name = ctx.names.get(&id).cloned();
        if name.is_none() {
            ctx.unknown_ids = true;
        }
        Ok((name, Some(id)))
    } else {
        Ok((r.string(flexible)?.map(limited_string), None))
    }
}

/// Appends a topic if the bound allows; true if it was kept (then it is the last one).
fn push_topic(
    topics: &mut Vec<KafkaTopic>,
    (name, id): (Option<CompactString>, Option<[u8; 16]>),
    ctx: &mut Ctx<'_>,
) -> bool {
    if topics.len() >= MAX_TOPICS {
        ctx.dropped = true;
        return false;
    }
    topics.push(KafkaTopic {
        name,
        id,
        partitions: Vec::new(),
    });
    true
}

/// Appends a partition to the last topic if it was kept and the bound allows.
fn push_partition<'t>(
    topics: &'t mut [KafkaTopic],
    topic_kept: bool,
    partition: KafkaPartition,
    ctx: &mut Ctx<'_>,
) -> Option<&'t mut KafkaPartition> {
    if !topic_kept || ctx.partitions_left == 0 {
        ctx.dropped = true;
        return None;
    }
    ctx.partitions_left -= 1;
    let topic = topics.last_mut()?;
    topic.partitions.push(partition);
    topic.partitions.last_mut()
}

/// ProduceRequest (v3+): acks, transactional id, topics, partitions and their records.
pub(super) fn produce_request(
    r: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    payload: &mut KafkaPayload,
    ctx: &mut Ctx<'_>,
) -> Decoded<()> {
    payload.transactional_id = r.string(flexible)?.map(limited_string);
    payload.acks = Some(r.i16()?);
    r.i32()?; // timeout
    r.each(flexible, |r| {
        let topic = topic_ref(r, version >= 13, flexible, ctx)?;
        let kept = push_topic(&mut payload.topics, topic, ctx);
        r.each(flexible, |r| {
            let index = r.i32()?;
            let records = r.bytes_field(flexible)?;
            let partition = KafkaPartition {
                index,
                ..KafkaPartition::default()
            };
            if let Some(p) = push_partition(&mut payload.topics, kept, partition, ctx)
                && let Some(records) = records
            {
                records::scan(records, &mut p.records, &mut ctx.records);
            }
            r.tagged_fields(flexible)
        })?;
        r.tagged_fields(flexible)
    })?;
    r.tagged_fields(flexible)
}

/// ProduceResponse: each partition's error code and base offset, into the request's partitions
/// (whose record offsets become the broker's).
pub(super) fn produce_response(
    r: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    payload: &mut KafkaPayload,
) -> Decoded<()> {
    r.each(flexible, |r| {
        let topic = if version >= 13 {
            let id = r.uuid()?;
            payload.topics.iter().position(|t| t.id == Some(id))
        } else {
            let name = r.string(flexible)?;
            payload
                .topics
                .iter()
                .position(|t| t.name.as_deref().map(str::as_bytes) == name)
        };
        r.each(flexible, |r| {
            let index = r.i32()?;
            let error_code = r.i16()?;
            let base_offset = r.i64()?;
            r.i64()?; // log append time
            if version >= 5 {
                r.i64()?; // log start offset
            }
            if version >= 8 {
                r.each(flexible, |r| {
                    r.i32()?; // batch index
                    r.string(flexible)?; // its error message
                    r.tagged_fields(flexible)
                })?;
                r.string(flexible)?; // error message
            }
            if payload.error_code == 0 {
                payload.error_code = error_code;
            }
            if let Some(p) = topic.and_then(|t| {
                payload.topics[t]
                    .partitions
                    .iter_mut()
                    .find(|p| p.index == index)
            }) {
                p.error_code = error_code;
                p.base_offset = Some(base_offset);
                rebase(&mut p.records, base_offset);
            }
            r.tagged_fields(flexible)
        })?;
        r.tagged_fields(flexible)
    })?;
    r.i32()?; // throttle time
    r.tagged_fields(flexible)
}

/// The producer's offsets (from its batches' base offsets, 0 for the first) become the
/// broker's: the first message is at `base_offset`.
fn rebase(records: &mut KafkaRecords, base_offset: i64) {
    if base_offset < 0 {
        return;
    }
    let Some(shift) = base_offset.checked_sub(records.first_offset.unwrap_or(0)) else {
        return;
    };
    let moved = |o: i64| o.checked_add(shift).unwrap_or(o);
    records.first_offset = records.first_offset.map(moved);
    records.last_offset = records.last_offset.map(moved);
    for message in &mut records.messages {
        message.offset = moved(message.offset);
    }
}

/// FetchRequest (v4+): the topics and partitions asked for.
pub(super) fn fetch_request(
    r: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    payload: &mut KafkaPayload,
    ctx: &mut Ctx<'_>,
) -> Decoded<()> {
    if version <= 14 {
        r.i32()?; // replica id
    }
    r.skip(4 + 4 + 4 + 1)?; // max wait, min bytes, max bytes, isolation level
    if version >= 7 {
        r.skip(4 + 4)?; // session id and epoch
    }
    r.each(flexible, |r| {
        let topic = topic_ref(r, version >= 13, flexible, ctx)?;
        let kept = push_topic(&mut payload.topics, topic, ctx);
        r.each(flexible, |r| {
            let index = r.i32()?;
            if version >= 9 {
                r.i32()?; // current leader epoch
            }
            r.i64()?; // fetch offset
            if version >= 12 {
                r.i32()?; // last fetched epoch
            }
            if version >= 5 {
                r.i64()?; // log start offset
            }
            r.i32()?; // partition max bytes
            let partition = KafkaPartition {
                index,
                ..KafkaPartition::default()
            };
            push_partition(&mut payload.topics, kept, partition, ctx);
            r.tagged_fields(flexible)
        })?;
        r.tagged_fields(flexible)
    })?;
    if version >= 7 {
        // Forgotten topics.
        r.each(flexible, |r| {
            if version >= 13 {
                r.uuid()?;
            } else {
                r.string(flexible)?;
            }
            r.each(flexible, |r| r.i32().map(drop))?;
            r.tagged_fields(flexible)
        })?;
    }
    if version >= 11 {
        r.string(flexible)?; // rack id
    }
    r.tagged_fields(flexible)
}

/// FetchResponse (v4+): what was fetched replaces the request's topics: partitions with error
/// code, high watermark and records.
pub(super) fn fetch_response(
    r: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    payload: &mut KafkaPayload,
    ctx: &mut Ctx<'_>,
) -> Decoded<()> {
    payload.topics.clear();
    r.i32()?; // throttle time
    if version >= 7 {
        payload.error_code = r.i16()?;
        r.i32()?; // session id
    }
    r.each(flexible, |r| {
        let topic = topic_ref(r, version >= 13, flexible, ctx)?;
        let kept = push_topic(&mut payload.topics, topic, ctx);
        r.each(flexible, |r| {
            let index = r.i32()?;
            let error_code = r.i16()?;
            let high_watermark = r.i64()?;
            r.i64()?; // last stable offset
            if version >= 5 {
                r.i64()?; // log start offset
            }
            // Aborted transactions.
            r.each(flexible, |r| {
                r.skip(8 + 8)?;
                r.tagged_fields(flexible)
            })?;
            if version >= 11 {
                r.i32()?; // preferred read replica
            }
            let records = r.bytes_field(flexible)?;
            if payload.error_code == 0 {
                payload.error_code = error_code;
            }
            let partition = KafkaPartition {
                index,
                error_code,
                high_watermark: Some(high_watermark),
                ..KafkaPartition::default()
            };
            if let Some(p) = push_partition(&mut payload.topics, kept, partition, ctx)
                && let Some(records) = records
            {
                records::scan(records, &mut p.records, &mut ctx.records);
            }
            r.tagged_fields(flexible)
        })?;
        r.tagged_fields(flexible)
    })?;
    r.tagged_fields(flexible)
}

/// MetadataResponse: topic ids (v10+) and names into `names`. Returns false if a new id did
/// not fit.
pub(super) fn metadata_response(
    r: &mut Reader<'_>,
    version: i16,
    flexible: bool,
    names: &mut TopicNames,
) -> Decoded<bool> {
    let mut fits = true;
    if version >= 3 {
        r.i32()?; // throttle time
    }
    r.each(flexible, |r| {
        r.i32()?; // node id
        r.string(flexible)?; // host
        r.i32()?; // port
        if version >= 1 {
            r.string(flexible)?; // rack
        }
        r.tagged_fields(flexible)
    })?;
    if version >= 2 {
        r.string(flexible)?; // cluster id
    }
    if version >= 1 {
        r.i32()?; // controller id
    }
    r.each(flexible, |r| {
        r.i16()?; // error code
        let name = r.string(flexible)?;
        let id = if version >= 10 { r.uuid()? } else { [0; 16] };
        if let Some(name) = name
            && id != [0; 16]
        {
            fits &= names.insert(id, limited_string(name));
        }
        if version >= 1 {
            r.i8()?; // is internal
        }
        r.each(flexible, |r| {
            r.skip(2 + 4 + 4)?; // error code, partition index, leader id
            if version >= 7 {
                r.i32()?; // leader epoch
            }
            r.each(flexible, |r| r.i32().map(drop))?; // replicas
            r.each(flexible, |r| r.i32().map(drop))?; // in-sync replicas
            if version >= 5 {
                r.each(flexible, |r| r.i32().map(drop))?; // offline replicas
            }
            r.tagged_fields(flexible)
        })?;
        if version >= 8 {
            r.i32()?; // topic authorized operations
        }
        r.tagged_fields(flexible)
    })?;
    if (8..=10).contains(&version) {
        r.i32()?; // cluster authorized operations
    }
    if version >= 13 {
        r.i16()?; // error code
    }
    r.tagged_fields(flexible)?;
    Ok(fits)
}

/// The consumer group a request names, for the api keys that name one first (or, for
/// FindCoordinator, a group coordinator's key).
pub(super) fn group_id<'a>(
    r: &mut Reader<'a>,
    key: ApiKey,
    version: i16,
    flexible: bool,
) -> Decoded<Option<&'a [u8]>> {
    let first_of_array = |r: &mut Reader<'a>| match r.array_len(flexible)? {
        Some(n) if n > 0 => r.string(flexible),
        _ => Ok(None),
    };
    match key {
        ApiKey::JoinGroup
        | ApiKey::SyncGroup
        | ApiKey::Heartbeat
        | ApiKey::LeaveGroup
        | ApiKey::OffsetCommit
        | ApiKey::ConsumerGroupHeartbeat => r.string(flexible),
        ApiKey::OffsetFetch if version <= 7 => r.string(flexible),
        // v8+: groups, each with its id first.
        ApiKey::OffsetFetch => first_of_array(r),
        ApiKey::FindCoordinator if version <= 3 => {
            let coordinator_key = r.string(flexible)?;
            // Key type 0: a group (1: a transactional id); v0 looks up groups only.
            let key_type = if version >= 1 { r.i8()? } else { 0 };
            Ok(coordinator_key.filter(|_| key_type == 0))
        }
        ApiKey::FindCoordinator => {
            if r.i8()? != 0 {
                return Ok(None);
            }
            first_of_array(r)
        }
        _ => Ok(None),
    }
}

/// Decodes the body of the requests whose schema detection checks (so that a response, or
/// bytes of another protocol, that happen to start like a request header are told apart).
/// Ok(true) when the whole body was decoded, Ok(false) when it was cut or not checked to its
/// end.
pub(super) fn check_request_body(r: &mut Reader<'_>, header: &RequestHeader<'_>) -> Decoded<bool> {
    let flexible = header.flexible();
    let version = header.version;
    let names = TopicNames::default();
    let mut payload = empty_payload();
    let mut ctx = Ctx::new(&names, 0, 0);
    let decoded = match header.key {
        ApiKey::Produce => produce_request(r, version, flexible, &mut payload, &mut ctx),
        ApiKey::Fetch => fetch_request(r, version, flexible, &mut payload, &mut ctx),
        ApiKey::Metadata => metadata_request(r, version, flexible),
        ApiKey::ApiVersions if version >= 3 => {
            // Client software name and version: short printable strings.
            for _ in 0..2 {
                if !r.string(true)?.is_some_and(printable) {
                    return Err(Stop::Invalid);
                }
            }
            r.tagged_fields(true)
        }
        ApiKey::ApiVersions => Ok(()),
        // Only the group id is read: the rest of the body is not checked.
        key => group_id(r, key, version, flexible).and(Err(Stop::Cut)),
    };
    match decoded {
        Ok(()) => Ok(true),
        Err(Stop::Cut) => Ok(false),
        Err(Stop::Invalid) => Err(Stop::Invalid),
    }
}

/// MetadataRequest: skipped by its schema (detection checks it).
fn metadata_request(r: &mut Reader<'_>, version: i16, flexible: bool) -> Decoded<()> {
    r.each(flexible, |r| {
        if version >= 10 {
            r.uuid()?;
        }
        r.string(flexible)?;
        r.tagged_fields(flexible)
    })?;
    if version >= 4 {
        r.i8()?; // allow auto topic creation
    }
    if (8..=10).contains(&version) {
        r.i8()?; // include cluster authorized operations
    }
    if version >= 8 {
        r.i8()?; // include topic authorized operations
    }
    r.tagged_fields(flexible)
}

/// Printable ASCII (client ids and software names in practice), at most 255 bytes.
pub(super) fn printable(s: &[u8]) -> bool {
    s.len() <= 255 && s.iter().all(|&b| (0x20..0x7f).contains(&b))
}

/// A payload with nothing decoded yet.
pub(super) fn empty_payload() -> KafkaPayload {
    KafkaPayload {
        api: super::payload::KafkaApi::Produce,
        api_version: 0,
        correlation_id: 0,
        client_id: None,
        group_id: None,
        acks: None,
        transactional_id: None,
        topics: Vec::new(),
        request_cut: false,
        response: false,
        response_cut: false,
        error_code: 0,
        entries_dropped: false,
    }
}
