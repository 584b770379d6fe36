//! HPACK (RFC 7541) header block decoding that survives a lost dynamic table.
//!
//! One [`Decoder`] per direction. Its dynamic table is the list of the most recent insertions
//! it saw, newest first, and a flag saying whether older entries it never saw may still be in
//! the encoder's table (`tail_unknown`). That model is exact on a connection seen from its
//! start, and never wrong after a loss, because of how the table works: entries are only ever
//! inserted at the front and evicted at the back, so dynamic index 62 + k always names the
//! (k+1)-th most recent successful insertion. Whatever the table size (unknown after a loss), a
//! reference the encoder makes to position k < (insertions seen since the loss) is therefore
//! exactly the k-th entry of the list. An insertion that was too large for the encoder's table
//! emptied it (§4.4): the entries after it are the only ones the encoder can reference, and
//! they come first in the list, so the stale ones behind are never reached. A reference past
//! the known entries while the tail is unknown yields [`Field::Unknown`]: the caller treats
//! the header as missing, never guessed.
//!
//! The tail becomes known again when it provably cannot hold anything: after a table size
//! update, when the known entries plus the smallest possible entry (32 bytes) exceed the size,
//! or when an insertion larger than the size empties the table.
//!
//! Sizes: an entry whose name is unknown (its literal referred to an unknown name) counts its
//! value and overhead only, a lower bound, so that evictions decided from these sizes never
//! drop an entry the encoder still holds. At most [`MAX_TABLE_SIZE`] bytes of entries are kept
//! whatever the encoder's table size, and 4096 (the initial size) while the size is unknown;
//! older entries are forgotten (and become unknown).
//!
//! Not loona-hpack's `Decoder`: it fails a whole block on the first reference it can't resolve
//! (stopping before the block's later insertions, so its table is wrong from then on), and its
//! Huffman decoding costs about 26 µs per string. loona-hpack stays as the tests' encoder and
//! reference decoder.

use std::collections::VecDeque;

use super::huffman;

/// Most bytes of dynamic table kept per direction (HPACK sizes: name + value + 32 per entry).
pub(super) const MAX_TABLE_SIZE: usize = 64 * 1024;
/// The table size before any size update (SETTINGS_HEADER_TABLE_SIZE's initial value).
const INITIAL_TABLE_SIZE: usize = 4096;
/// HPACK's per-entry overhead (§4.1).
const ENTRY_OVERHEAD: usize = 32;
/// Largest integer accepted in a representation; larger ones make the block malformed.
const MAX_INTEGER: u64 = u32::MAX as u64;

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// One header field of a block, as far as the decoder can know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field<'a> {
    Known {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// Its name (and maybe value) is in a dynamic-table entry the decoder never saw.
    Unknown,
}

/// What decoding one block did besides yielding fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Outcome {
    /// Fields yielded as [`Field::Unknown`].
    pub unknown_fields: u32,
    /// This block revealed a loss not reported before (a reference past the known entries).
    pub newly_lost: bool,
    /// The block broke HPACK's encoding rules; decoding stopped there and the table state is
    /// lost (reported: `newly_lost` is not set for it).
    pub malformed: bool,
    /// A table size update asked for more than [`MAX_TABLE_SIZE`].
    pub over_limit: bool,
}

/// A dynamic-table entry: name (when known) and value in one allocation.
struct Entry {
    bytes: Box<[u8]>,
    /// Length of the name at the start of `bytes`; None when the name is unknown.
    name_len: Option<usize>,
}

impl Entry {
    fn name(&self) -> Option<&[u8]> {
        self.name_len.map(|n| &self.bytes[..n])
    }

    fn value(&self) -> &[u8] {
        &self.bytes[self.name_len.unwrap_or(0)..]
    }

    /// HPACK size (a lower bound when the name is unknown).
    fn size(&self) -> usize {
        self.bytes.len() + ENTRY_OVERHEAD
    }
}

/// HPACK decoder of one direction.
pub(super) struct Decoder {
    /// Insertions seen, newest first.
    entries: VecDeque<Entry>,
    /// Sum of the entries' sizes.
    size: usize,
    /// The encoder's table size when known (initial value, or the last size update seen since
    /// the last loss).
    max_size: Option<usize>,
    /// The encoder's table may hold entries older than `entries`, never seen.
    tail_unknown: bool,
    /// The current loss was reported (by the caller when it caused it, or by a block that
    /// revealed it); reset when the table is known again.
    loss_reported: bool,
    /// Decoded Huffman strings (reused).
    name_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

/// Never prints the table: it holds header values (credentials, cookies).
impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("entries", &self.entries.len())
            .field("size", &self.size)
            .field("max_size", &self.max_size)
            .field("tail_unknown", &self.tail_unknown)
            .finish()
    }
}

/// Huffman buffers larger than this are freed after their block.
const KEPT_BUFFER_CAPACITY: usize = 4096;

/// A string's location in the block and its encoding.
#[derive(Clone, Copy)]
struct StringRef {
    start: usize,
    end: usize,
    huffman: bool,
}

/// Where a table index points.
#[derive(Clone, Copy)]
enum Slot {
    /// 0-based index in the static table.
    Static(usize),
    /// Position in `entries`.
    Dynamic(usize),
    Unknown,
}

impl Decoder {
    /// A decoder for a connection seen from its start: empty table of 4096 bytes.
    pub(super) fn new() -> Self {
        Decoder {
            entries: VecDeque::new(),
            size: 0,
            max_size: Some(INITIAL_TABLE_SIZE),
            tail_unknown: false,
            loss_reported: false,
            name_buf: Vec::new(),
            value_buf: Vec::new(),
        }
    }

    /// The encoder's table is unknown from here on (header block bytes were lost, or the
    /// direction was joined after its start). `reported`: the caller counted this loss; if
    /// not, the first block that meets an unknown entry reports it.
    pub(super) fn lose_state(&mut self, reported: bool) {
        self.entries.clear();
        self.size = 0;
        self.max_size = None;
        self.tail_unknown = true;
        self.loss_reported = reported;
    }

    /// Heap bytes held: the dynamic table (its HPACK size bounds its entries' bytes) and the
    /// Huffman buffers.
    pub(super) fn memory_bytes(&self) -> usize {
        self.size
            + self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.name_buf.capacity()
            + self.value_buf.capacity()
    }

    /// The dynamic table is known entirely (no loss, or it was provably refilled since).
    #[cfg(test)]
    pub(super) fn in_sync(&self) -> bool {
        !self.tail_unknown
    }

    /// Decodes one complete header block, calling `emit` for each field in order.
    pub(super) fn decode(&mut self, block: &[u8], mut emit: impl FnMut(Field<'_>)) -> Outcome {
        let mut outcome = Outcome::default();
        let result = self.walk(block, &mut emit, &mut outcome);
        if result.is_err() {
            // The rest of the block (and its insertions) can't be read: from here the table
            // is unknown.
            self.lose_state(true);
            outcome.malformed = true;
            outcome.newly_lost = false;
        }
        for buf in [&mut self.name_buf, &mut self.value_buf] {
            buf.clear();
            if buf.capacity() > KEPT_BUFFER_CAPACITY {
                *buf = Vec::new();
            }
        }
        outcome
    }

    fn walk(
        &mut self,
        block: &[u8],
        emit: &mut impl FnMut(Field<'_>),
        outcome: &mut Outcome,
    ) -> Result<(), ()> {
        let mut pos = 0;
        while pos < block.len() {
            let first = block[pos];
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = integer(block, &mut pos, 7)?;
                if index == 0 {
                    return Err(());
                }
                let slot = self.slot(index, outcome);
                match entry(&self.entries, slot) {
                    Some((Some(name), value)) => emit(Field::Known { name, value }),
                    Some((None, _)) | None => {
                        outcome.unknown_fields += 1;
                        emit(Field::Unknown);
                    }
                }
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                let size = integer(block, &mut pos, 5)?;
                if size > MAX_TABLE_SIZE {
                    outcome.over_limit = true;
                }
                self.max_size = Some(size);
                self.evict();
            } else {
                // Literal field (§6.2): with incremental indexing (01), never indexed (0001)
                // or without indexing (0000).
                let indexing = first & 0xc0 == 0x40;
                let prefix = if indexing { 6 } else { 4 };
                let name_index = integer(block, &mut pos, prefix)?;
                // Resolve the name first: an insertion changes the table it may come from.
                self.name_buf.clear();
                let name_known = if name_index == 0 {
                    let name = string(block, &mut pos)?;
                    text(block, name, &mut self.name_buf)?;
                    true
                } else {
                    let slot = self.slot(name_index, outcome);
                    match entry(&self.entries, slot) {
                        Some((Some(name), _)) => {
                            self.name_buf.extend_from_slice(name);
                            true
                        }
                        Some((None, _)) | None => false,
                    }
                };
                let value = string(block, &mut pos)?;
                self.value_buf.clear();
                text(block, value, &mut self.value_buf)?;
                if name_known {
                    emit(Field::Known {
                        name: &self.name_buf,
                        value: &self.value_buf,
                    });
                } else {
                    outcome.unknown_fields += 1;
                    emit(Field::Unknown);
                }
                if indexing {
                    let name_len = name_known.then_some(self.name_buf.len());
                    let mut bytes =
                        Vec::with_capacity(name_len.unwrap_or(0) + self.value_buf.len());
                    if name_known {
                        bytes.extend_from_slice(&self.name_buf);
                    }
                    bytes.extend_from_slice(&self.value_buf);
                    self.insert(Entry {
                        bytes: bytes.into_boxed_slice(),
                        name_len,
                    });
                }
            }
        }
        Ok(())
    }

    /// Where a 1-based index points. A dynamic index past the entries seen is [`Slot::Unknown`]
    /// (and reveals a loss).
    fn slot(&mut self, index: usize, outcome: &mut Outcome) -> Slot {
        if index <= STATIC_TABLE.len() {
            return Slot::Static(index - 1);
        }
        let position = index - STATIC_TABLE.len() - 1;
        if position < self.entries.len() {
            return Slot::Dynamic(position);
        }
        // Past what we saw: the table was lost (joined late, bytes lost) or our assumed table
        // size evicted it too early. Either way it is unknown, not an error.
        if !self.loss_reported {
            self.loss_reported = true;
            outcome.newly_lost = true;
        }
        if !self.tail_unknown {
            self.tail_unknown = true;
            self.max_size = None;
        }
        Slot::Unknown
    }

    fn insert(&mut self, entry: Entry) {
        if let Some(max) = self.max_size
            && entry.size() > max
        {
            // §4.4: an entry larger than the table empties it and is not added.
            self.entries.clear();
            self.size = 0;
            self.table_known();
            return;
        }
        self.size += entry.size();
        self.entries.push_front(entry);
        self.evict();
    }

    /// Evicts what the encoder evicted (oldest first), then forgets what exceeds our own
    /// bound: the encoder's table size up to [`MAX_TABLE_SIZE`], or when its size is unknown
    /// the initial 4096 bytes (few encoders change it; this keeps a connection joined late
    /// from holding 64 KiB per direction).
    fn evict(&mut self) {
        if let Some(max) = self.max_size {
            while self.size > max {
                self.pop_oldest();
            }
            // An entry we never saw would sit behind all of ours (each at least 32 bytes): if
            // even the smallest can't fit, there is none.
            if self.tail_unknown && self.size + ENTRY_OVERHEAD > max {
                self.table_known();
            }
        }
        let bound = self
            .max_size
            .map_or(INITIAL_TABLE_SIZE, |max| max.min(MAX_TABLE_SIZE));
        while self.size > bound {
            self.pop_oldest();
            // The encoder may still hold what we forget.
            if !self.tail_unknown {
                self.tail_unknown = true;
                self.loss_reported = false;
            }
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(entry) = self.entries.pop_back() {
            self.size -= entry.size();
        }
    }

    fn table_known(&mut self) {
        self.tail_unknown = false;
        self.loss_reported = false;
    }
}

/// (name, value) of a slot: None if unknown; the name is None if unknown.
fn entry(entries: &VecDeque<Entry>, slot: Slot) -> Option<(Option<&[u8]>, &[u8])> {
    match slot {
        Slot::Static(i) => Some((Some(STATIC_TABLE[i].0), STATIC_TABLE[i].1)),
        Slot::Dynamic(p) => entries.get(p).map(|e| (e.name(), e.value())),
        Slot::Unknown => None,
    }
}

/// Reads an integer with an N-bit prefix (§5.1) at `*pos`.
fn integer(block: &[u8], pos: &mut usize, prefix_bits: u32) -> Result<usize, ()> {
    let mask = ((1u16 << prefix_bits) - 1) as u8;
    let first = *block.get(*pos).ok_or(())? & mask;
    *pos += 1;
    if first < mask {
        return Ok(usize::from(first));
    }
    let mut value = u64::from(mask);
    let mut shift = 0;
    loop {
        let b = *block.get(*pos).ok_or(())?;
        *pos += 1;
        value += u64::from(b & 0x7f) << shift;
        if value > MAX_INTEGER {
            return Err(());
        }
        if b & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| ());
        }
        shift += 7;
        if shift > 28 {
            return Err(());
        }
    }
}

/// Reads a string literal's header (§5.2) at `*pos` and skips its bytes.
fn string(block: &[u8], pos: &mut usize) -> Result<StringRef, ()> {
    let huffman = *block.get(*pos).ok_or(())? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    let start = *pos;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= block.len())
        .ok_or(())?;
    *pos = end;
    Ok(StringRef {
        start,
        end,
        huffman,
    })
}

/// Appends a string literal's octets to `out`, Huffman-decoded if need be.
fn text(block: &[u8], s: StringRef, out: &mut Vec<u8>) -> Result<(), ()> {
    let raw = &block[s.start..s.end];
    if s.huffman {
        huffman::decode(raw, out)
    } else {
        out.extend_from_slice(raw);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<Option<(String, String)>>;

    fn run(decoder: &mut Decoder, block: &[u8]) -> (Fields, Outcome) {
        let mut fields = Vec::new();
        let outcome = decoder.decode(block, |f| {
            fields.push(match f {
                Field::Known { name, value } => Some((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                )),
                Field::Unknown => None,
            })
        });
        (fields, outcome)
    }

    fn known(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(n, v)| Some((n.to_string(), v.to_string())))
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn table(decoder: &Decoder) -> Vec<(String, String)> {
        decoder
            .entries
            .iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(e.name().unwrap()).into_owned(),
                    String::from_utf8_lossy(e.value()).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn integers() {
        let read = |bytes: &[u8], prefix| {
            let mut pos = 0;
            integer(bytes, &mut pos, prefix).map(|v| (v, pos))
        };
        // RFC 7541 C.1.
        assert_eq!(read(&[0x0a], 5), Ok((10, 1)));
        assert_eq!(read(&[0x1f, 0x9a, 0x0a], 5), Ok((1337, 3)));
        assert_eq!(read(&[0x2a], 8), Ok((42, 1)));
        assert_eq!(read(&[0x1f], 5), Err(()));
        assert_eq!(read(&[0x1f, 0x80], 5), Err(()));
        assert_eq!(read(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x0f], 5), Err(()));
        assert_eq!(
            read(&[0x1f, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], 5),
            Err(())
        );
        assert_eq!(read(&[], 5), Err(()));
        // u32::MAX is the largest accepted.
        assert_eq!(
            read(&[0x1f, 0xe0, 0xff, 0xff, 0xff, 0x0f], 5),
            Ok((u32::MAX as usize, 6))
        );
    }

    /// RFC 7541 C.3: requests without Huffman coding, with insertions.
    #[test]
    fn rfc_c3_requests() {
        let mut d = Decoder::new();
        let (f, o) = run(&mut d, &hex("828684410f7777772e6578616d706c652e636f6d"));
        assert_eq!(o, Outcome::default());
        assert_eq!(
            f,
            known(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let (f, _) = run(&mut d, &hex("828684be58086e6f2d6361636865"));
        assert_eq!(
            f,
            known(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let (f, _) = run(
            &mut d,
            &hex("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565"),
        );
        assert_eq!(
            f,
            known(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(
            table(&d),
            [
                ("custom-key".into(), "custom-value".into()),
                ("cache-control".into(), "no-cache".into()),
                (":authority".into(), "www.example.com".into()),
            ]
        );
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.4: the same requests Huffman-coded.
    #[test]
    fn rfc_c4_requests_huffman() {
        let mut d = Decoder::new();
        run(&mut d, &hex("828684418cf1e3c2e5f23a6ba0ab90f4ff"));
        run(&mut d, &hex("828684be5886a8eb10649cbf"));
        let (f, _) = run(
            &mut d,
            &hex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"),
        );
        assert_eq!(f[4], Some(("custom-key".into(), "custom-value".into())));
        assert_eq!(d.size, 164);
    }

    /// RFC 7541 C.6: responses with Huffman coding and evictions in a 256-byte table.
    #[test]
    fn rfc_c6_responses_evictions() {
        let mut d = Decoder::new();
        // Size update to 256 first (C.6 assumes SETTINGS_HEADER_TABLE_SIZE 256).
        let mut first = vec![0x3f, 0xe1, 0x01];
        first.extend(hex(
            "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
        ));
        let (f, _) = run(&mut d, &first);
        assert_eq!(
            f,
            known(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        let (f, _) = run(&mut d, &hex("4883640effc1c0bf"));
        assert_eq!(f[0], Some((":status".into(), "307".into())));
        assert_eq!(
            f[3],
            Some(("location".into(), "https://www.example.com".into()))
        );
        assert_eq!(d.size, 222);
        let (f, _) = run(
            &mut d,
            &hex(
                "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
            ),
        );
        assert_eq!(
            f,
            known(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
            ])
        );
        assert_eq!(d.size, 215);
        assert_eq!(d.entries.len(), 3);
        assert!(d.in_sync());
    }

    #[test]
    fn size_update_to_zero_clears() {
        let mut d = Decoder::new();
        run(&mut d, &[0x40, 0x01, b'a', 0x01, b'b']);
        assert_eq!(d.entries.len(), 1);
        // Size update 0, then a reference to the dropped entry: unknown, and a loss.
        let (f, o) = run(&mut d, &[0x20, 0xbe]);
        assert_eq!(f, vec![None]);
        assert!(o.newly_lost);
        assert!(!d.in_sync());
    }

    #[test]
    fn never_indexed_and_without_indexing() {
        let mut d = Decoder::new();
        // 0x10: never indexed, literal name; 0x0f 0x2b: without indexing, name index 58
        // (user-agent) — index 58 needs the 4-bit prefix continuation (15 + 43).
        let block = [
            &[0x10, 0x03][..],
            b"abc",
            &[0x03],
            b"def",
            &[0x0f, 0x2b, 0x02],
            b"ua",
        ]
        .concat();
        let (f, o) = run(&mut d, &block);
        assert_eq!(f, known(&[("abc", "def"), ("user-agent", "ua")]));
        assert_eq!(o, Outcome::default());
        assert!(d.entries.is_empty());
    }

    #[test]
    fn joined_late() {
        let mut d = Decoder::new();
        d.lose_state(false);
        // Insert x: 1 at 62; refer to 62 (known), 63 (unknown), static 2.
        let (f, o) = run(&mut d, &[0x40, 0x01, b'x', 0x01, b'1', 0xbe, 0xbf, 0x82]);
        assert_eq!(
            f,
            vec![
                Some(("x".into(), "1".into())),
                Some(("x".into(), "1".into())),
                None,
                Some((":method".into(), "GET".into())),
            ]
        );
        assert!(o.newly_lost);
        assert_eq!(o.unknown_fields, 1);
        // A second unknown reference is not a new loss.
        let (f, o) = run(&mut d, &[0xc0]);
        assert_eq!(f, vec![None]);
        assert!(!o.newly_lost);
        // Literal with an unknown indexed name: unknown field, and its insertion shifts the
        // known entry to 63.
        let (f, o) = run(&mut d, &[0x7f, 0x10, 0x01, b'v', 0xbe, 0xbf]);
        assert_eq!(f, vec![None, None, Some(("x".into(), "1".into()))]);
        assert_eq!(o.unknown_fields, 2);
        // A size update whose size can hold nothing more than the known entries makes the
        // table known again.
        run(&mut d, &[0x3f, 0x03, 0x82]); // size 34: keeps only entries of <= 34 bytes
        assert!(d.in_sync());
    }

    #[test]
    fn malformed_blocks() {
        for block in [
            &[0x80][..],               // index 0
            &[0x41],                   // truncated literal
            &[0x40, 0x05, b'a'],       // string past the end
            &[0x40, 0x81, 0x00, 0x00], // Huffman string with bad padding
            &[0x3f],                   // truncated size update
        ] {
            let mut d = Decoder::new();
            let (_, o) = run(&mut d, block);
            assert!(o.malformed, "{block:02x?}");
            assert!(!d.in_sync());
        }
    }

    #[test]
    fn insertion_too_large_empties() {
        let mut d = Decoder::new();
        run(&mut d, &[0x3f, 0x11, 0x40, 0x01, b'a', 0x01, b'b']); // size 48, insert 34 bytes
        assert_eq!(d.entries.len(), 1);
        let mut big = vec![0x40, 0x01, b'c', 0x10];
        big.extend([b'd'; 16]); // 49 bytes > 48
        run(&mut d, &big);
        assert!(d.entries.is_empty());
        assert!(d.in_sync());
    }

    #[test]
    fn memory_bound() {
        let mut d = Decoder::new();
        // Size update to 1 MiB (over our bound), then 100 insertions of ~1 KiB.
        let mut block = vec![0x3f, 0xe1, 0xff, 0x3f];
        let value = vec![b'v'; 1000];
        for i in 0..100u8 {
            block.extend([0x40, 0x01, i, 0x7f, 0xe9, 0x06]); // value length 1000 = 127 + 873
            block.extend(&value);
        }
        let (f, o) = run(&mut d, &block);
        assert!(o.over_limit);
        assert!(!o.malformed);
        assert_eq!(f.len(), 100);
        assert!(d.size <= MAX_TABLE_SIZE);
        assert!(!d.in_sync());
        // The newest is known, the oldest forgotten.
        let (f, _) = run(&mut d, &[0xbe]);
        assert_eq!(f[0].as_ref().unwrap().0.as_bytes(), [99]);
        let (f, o) = run(&mut d, &[0xff, 0x44]); // index 62 + 69: forgotten
        assert_eq!(f, vec![None]);
        assert!(o.newly_lost);
    }

    #[test]
    fn unknown_table_size_keeps_4096_bytes() {
        let mut d = Decoder::new();
        d.lose_state(false);
        let mut block = Vec::new();
        for i in 0..20u8 {
            block.extend([0x40, 0x01, i, 0x7f, 0xe9, 0x06]); // value length 1000
            block.extend([b'v'; 1000]);
        }
        run(&mut d, &block);
        assert!(d.size <= INITIAL_TABLE_SIZE);
        assert_eq!(d.entries.len(), 3);
        // The newest three are known; the fourth is forgotten, never wrong.
        let (f, _) = run(&mut d, &[0xc0, 0xc1]);
        assert_eq!(f[0].as_ref().unwrap().0.as_bytes(), [17]);
        assert_eq!(f[1], None);
    }

    /// Differential test against loona-hpack on blocks its encoder makes (literal names are
    /// indexed, so the dynamic table grows and evicts), and never a panic on garbage.
    #[test]
    fn agrees_with_loona_and_survives_garbage() {
        let mut seed = 0x1234_5678_9abc_def1_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut encoder = loona_hpack::Encoder::new();
        let mut reference = loona_hpack::Decoder::new();
        let mut ours = Decoder::new();
        for _ in 0..500 {
            let n = 1 + next() % 8;
            let headers: Vec<(Vec<u8>, Vec<u8>)> = (0..n)
                .map(|_| {
                    let name = format!("h{}", next() % 40).into_bytes();
                    let value = vec![b'a' + (next() % 26) as u8; (next() % 300) as usize];
                    (name, value)
                })
                .collect();
            let block = encoder.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
            let expected = reference.decode(&block).unwrap();
            let (f, o) = run(&mut ours, &block);
            assert_eq!(o, Outcome::default());
            let got: Vec<(Vec<u8>, Vec<u8>)> = f
                .into_iter()
                .map(|f| {
                    let (n, v) = f.unwrap();
                    (n.into_bytes(), v.into_bytes())
                })
                .collect();
            assert_eq!(got, expected);
        }
        for round in 0..5000 {
            let len = (next() % 64) as usize;
            let block: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut d = Decoder::new();
            if round % 2 == 0 {
                d.lose_state(false);
            }
            run(&mut d, &block);
            run(&mut d, &block);
            // loona-hpack must not panic on it either (RUSTSEC-2023-0085 class).
            let _ = loona_hpack::Decoder::new().decode(&block);
        }
    }
}
