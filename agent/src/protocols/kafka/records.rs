//! Record batches (the `records` field of Produce requests and Fetch responses): message counts
//! and offsets from the batch headers, trace-context headers from the records, decompressed
//! within a budget.
//!
//! Magic v2 batches are decoded; legacy message sets (magic 0 and 1, only in Fetch responses of
//! old logs) are counted one message per entry (a compressed wrapper counts as one), without
//! headers (they have none). CRCs are not checked: a batch is only read, and a corrupt one gives
//! wrong counts or headers at worst, never a wrong frame boundary.

use std::io::Read;

use super::payload::{KafkaMessage, KafkaRecords};
use super::wire::{Decoded, Reader, Stop};
use crate::protocols::http::limited_string;

/// Trace-context headers kept from records (matched case-insensitively, kept lower-cased).
const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];
/// Most context headers kept per message.
const MAX_MESSAGE_HEADERS: usize = 8;
/// Most bytes of context header names and values kept per exchange (about 100 messages'
/// traceparent and tracestate): with the bound on messages, what an exchange in flight holds.
pub(super) const MAX_CONTEXT_BYTES: usize = 16 * 1024;
/// Bytes before a batch's or legacy entry's magic byte: base offset, length, epoch or CRC.
const LOG_OVERHEAD: usize = 12;
/// Largest zstd window accepted: the decoder allocates the window up front (a frame may ask
/// for 128 MiB); producers' levels up to 19 use at most 8 MiB.
const MAX_ZSTD_WINDOW: u64 = 8 << 20;
/// xerial snappy-java framing, used by Kafka producers: magic, then version and compatible
/// version (4 bytes each), then blocks of (u32 length, raw snappy block).
const SNAPPY_XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const SNAPPY_XERIAL_HEADER: usize = 16;

/// What decoding records may use and report, shared by the record fields of one frame.
#[derive(Debug)]
pub(super) struct RecordsCtx {
    /// Decompressed bytes this chunk may still produce.
    pub budget: usize,
    /// Messages with context still kept for the exchange.
    pub messages_left: usize,
    /// Bytes of their context headers still kept.
    pub context_bytes_left: usize,
    /// A bound was hit (the decompression budget, messages with context).
    pub limited: bool,
    /// Malformed batches (never a reason to give up: the frame's framing is sound).
    pub malformed: u64,
}

impl RecordsCtx {
    pub(super) fn new(budget: usize, messages_left: usize) -> Self {
        RecordsCtx {
            budget,
            messages_left,
            context_bytes_left: MAX_CONTEXT_BYTES,
            limited: false,
            malformed: 0,
        }
    }
}

/// Scans one partition's records field into `out`. Record batches are read until the field's
/// end or the end of its captured bytes; a last batch longer than what is left of the field
/// (Fetch responses may end with a partial batch, which consumers drop) is not counted.
pub(super) fn scan(mut r: Reader<'_>, out: &mut KafkaRecords, ctx: &mut RecordsCtx) {
    out.bytes = out.bytes.saturating_add(r.remaining() as u64);
    while r.remaining() >= LOG_OVERHEAD {
        match batch(&mut r, out, ctx) {
            Ok(true) => {}
            Ok(false) => return,
            Err(Stop::Cut) => {
                out.cut = true;
                return;
            }
            Err(Stop::Invalid) => {
                ctx.malformed += 1;
                out.cut = true;
                return;
            }
        }
    }
}

/// One batch (or legacy entry); false when it is a partial last one.
fn batch(r: &mut Reader<'_>, out: &mut KafkaRecords, ctx: &mut RecordsCtx) -> Decoded<bool> {
    let base_offset = r.i64()?;
    let length = r.i32()?;
    let Ok(length) = usize::try_from(length) else {
        return Err(Stop::Invalid);
    };
    if length > r.remaining() {
        return Ok(false);
    }
    let mut b = r.sub(length)?;
    b.i32()?; // partition leader epoch (v2), CRC (v0, v1)
    match b.i8()? {
        2 => batch_v2(base_offset, b, out, ctx)?,
        0 | 1 => {
            out.count = out.count.saturating_add(1);
            out.batches = out.batches.saturating_add(1);
            out.first_offset.get_or_insert(base_offset);
            out.last_offset = Some(base_offset);
        }
        _ => return Err(Stop::Invalid),
    }
    Ok(true)
}

fn batch_v2(
    base_offset: i64,
    mut b: Reader<'_>,
    out: &mut KafkaRecords,
    ctx: &mut RecordsCtx,
) -> Decoded<()> {
    b.i32()?; // CRC
    let attributes = b.i16()?;
    let last_offset_delta = b.i32()?;
    b.skip(8 + 8 + 8 + 2 + 4)?; // timestamps, producer id and epoch, base sequence
    let Ok(record_count) = u32::try_from(b.i32()?) else {
        return Err(Stop::Invalid);
    };
    // Offsets in a batch increase from its base offset: a count past the last offset delta is
    // a corrupt header (not checked by CRC here), which would inflate message counts.
    if i64::from(record_count) > i64::from(last_offset_delta) + 1 {
        return Err(Stop::Invalid);
    }
    if attributes & 0x20 != 0 {
        // A control batch (transaction marker): no messages.
        return Ok(());
    }
    out.count = out.count.saturating_add(u64::from(record_count));
    out.batches = out.batches.saturating_add(1);
    out.first_offset.get_or_insert(base_offset);
    out.last_offset = Some(base_offset.saturating_add(i64::from(last_offset_delta)));
    let codec = attributes & 0x7;
    if codec == 0 {
        return records(b, base_offset, record_count, out, ctx);
    }
    if ctx.budget == 0 {
        ctx.limited = true;
        out.cut = true;
        return Ok(());
    }
    let input = b.captured_rest();
    let Some((output, whole)) = decompress(codec, input, b.captured_all(), ctx) else {
        return Err(Stop::Invalid);
    };
    // Decompressed whole: a record past its end is malformed. Otherwise the output is a prefix
    // of the records, whose end is unknown.
    let len = if whole { output.len() } else { usize::MAX };
    let result = records(
        Reader::new(&output, len),
        base_offset,
        record_count,
        out,
        ctx,
    );
    if !whole {
        out.cut = true;
    }
    match result {
        // The prefix ended inside a record.
        Err(Stop::Cut) if !whole => Ok(()),
        other => other,
    }
}

/// Up to `count` records: the context headers of each.
fn records(
    mut r: Reader<'_>,
    base_offset: i64,
    count: u32,
    out: &mut KafkaRecords,
    ctx: &mut RecordsCtx,
) -> Decoded<()> {
    for _ in 0..count {
        let Ok(length) = usize::try_from(r.varint()?) else {
            return Err(Stop::Invalid);
        };
        let mut rec = r.sub(length)?;
        rec.i8()?; // attributes
        rec.varlong()?; // timestamp delta
        let offset_delta = rec.varint()?;
        for _ in 0..2 {
            // Key, value: skipped.
            let n = rec.varint()?;
            if n >= 0 {
                rec.skip(n as usize)?;
            } else if n < -1 {
                return Err(Stop::Invalid);
            }
        }
        let Ok(headers) = usize::try_from(rec.varint()?) else {
            return Err(Stop::Invalid);
        };
        if headers > rec.remaining() {
            return Err(Stop::Invalid);
        }
        let mut context: Vec<(String, String)> = Vec::new();
        for _ in 0..headers {
            let Ok(key_len) = usize::try_from(rec.varint()?) else {
                return Err(Stop::Invalid);
            };
            let key = rec.bytes(key_len)?;
            let value = match rec.varint()? {
                -1 => None,
                n if n < 0 => return Err(Stop::Invalid),
                n => Some(rec.bytes(n as usize)?),
            };
            if let (Some(name), Some(value)) = (context_name(key), value)
                && context.len() < MAX_MESSAGE_HEADERS
            {
                context.push((name.to_string(), limited_string(value).into()));
            }
        }
        if !context.is_empty() {
            let bytes: usize = context.iter().map(|(n, v)| n.len() + v.len()).sum();
            if ctx.messages_left == 0 || bytes > ctx.context_bytes_left {
                ctx.limited = true;
            } else {
                ctx.messages_left -= 1;
                ctx.context_bytes_left -= bytes;
                out.messages.push(KafkaMessage {
                    offset: base_offset.saturating_add(i64::from(offset_delta)),
                    context_headers: context,
                });
            }
        }
    }
    Ok(())
}

/// The lower-case name of a trace-context header key.
fn context_name(key: &[u8]) -> Option<&'static str> {
    CONTEXT_HEADERS
        .iter()
        .find(|name| name.as_bytes().eq_ignore_ascii_case(key))
        .copied()
}

/// Decompresses `input` (a batch's records, `complete` if all captured) with codec `codec`,
/// producing at most the budget: (output, whether it is the whole of the records). None when
/// nothing could be decompressed from complete input (a malformed batch) or the codec is
/// unknown.
fn decompress(
    codec: i16,
    input: &[u8],
    complete: bool,
    ctx: &mut RecordsCtx,
) -> Option<(Vec<u8>, bool)> {
    let budget = ctx.budget;
    let mut output = Vec::new();
    let ended = match codec {
        1 => read_bounded(
            flate2::read::MultiGzDecoder::new(input),
            budget,
            &mut output,
        ),
        2 => snappy(input, budget, &mut output),
        3 => read_bounded(
            lz4_flex::frame::FrameDecoder::new(input),
            budget,
            &mut output,
        ),
        4 => match ruzstd::decoding::StreamingDecoder::new_with_max_window_size(
            input,
            MAX_ZSTD_WINDOW,
        ) {
            Ok(decoder) => read_bounded(decoder, budget, &mut output),
            Err(_) => Err(Halt::Error),
        },
        _ => return None,
    };
    if ended == Err(Halt::Budget) {
        output.truncate(budget);
        ctx.limited = true;
    }
    ctx.budget -= output.len().min(ctx.budget);
    if ended == Err(Halt::Error) && complete && output.is_empty() {
        return None;
    }
    Some((output, ended.is_ok() && complete))
}

/// Why decompression stopped before the end of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Halt {
    /// The output reached the budget.
    Budget,
    /// The input ended early (cut) or is malformed.
    Error,
}

/// Reads `reader` to its end into `output`, stopping at `budget` bytes (what was read before
/// an error stays in `output`).
fn read_bounded(reader: impl Read, budget: usize, output: &mut Vec<u8>) -> Result<(), Halt> {
    let limit = u64::try_from(budget).unwrap_or(u64::MAX).saturating_add(1);
    let result = reader.take(limit).read_to_end(output);
    if output.len() > budget {
        return Err(Halt::Budget);
    }
    result.map(|_| ()).map_err(|_| Halt::Error)
}

/// Kafka's snappy: xerial framing (blocks of raw snappy), or one raw snappy block. Each
/// block's decompressed length is read from its header and checked against the budget before
/// anything is allocated for it.
fn snappy(input: &[u8], budget: usize, output: &mut Vec<u8>) -> Result<(), Halt> {
    let mut decoder = snap::raw::Decoder::new();
    let mut block = |data: &[u8], output: &mut Vec<u8>| -> Result<(), Halt> {
        let n = snap::raw::decompress_len(data).map_err(|_| Halt::Error)?;
        let start = output.len();
        if n > budget.saturating_sub(start) {
            return Err(Halt::Budget);
        }
        output.resize(start + n, 0);
        match decoder.decompress(data, &mut output[start..]) {
            Ok(written) => {
                output.truncate(start + written);
                Ok(())
            }
            Err(_) => {
                output.truncate(start);
                Err(Halt::Error)
            }
        }
    };
    if !input.starts_with(SNAPPY_XERIAL_MAGIC) {
        return block(input, output);
    }
    let mut rest = input.get(SNAPPY_XERIAL_HEADER..).ok_or(Halt::Error)?;
    while !rest.is_empty() {
        let (len, after) = rest.split_first_chunk::<4>().ok_or(Halt::Error)?;
        let len = u32::from_be_bytes(*len) as usize;
        let data = after.get(..len).ok_or(Halt::Error)?;
        block(data, output)?;
        rest = &after[len..];
    }
    Ok(())
}
