//! HPACK's Huffman code (RFC 7541 §5.2 and Appendix B), decoding only.
//!
//! Not loona-hpack's decoder: that one builds a table of hash maps for every string it decodes
//! (about 26 µs per string, measured) and then walks it bit by bit. This one decodes from
//! tables built at compile time from the code lengths alone (the code is canonical: codes of
//! one length are consecutive and follow the symbol order), with a 256-entry table for the
//! codes of at most 8 bits, which are most of what headers hold. No allocation beyond the
//! output buffer the caller passes.

/// Code length in bits of each symbol (0..=255, then EOS), from RFC 7541 Appendix B.
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];

const EOS: u16 = 256;
const MAX_LEN: usize = 30;
/// Codes up to this many bits are found with one lookup.
const FAST_BITS: u32 = 8;

struct Tables {
    /// Symbols in canonical order: by code length, then by symbol.
    sorted: [u16; 257],
    /// Per length: the first code of that length (right-aligned), how many codes have it, and
    /// where its symbols start in `sorted`.
    first: [u32; MAX_LEN + 1],
    count: [u16; MAX_LEN + 1],
    offset: [u16; MAX_LEN + 1],
    /// The next 8 bits → (symbol, code length) when a code of at most 8 bits starts them;
    /// length 0 otherwise.
    fast: [(u16, u8); 1 << FAST_BITS],
}

const fn build() -> Tables {
    let mut t = Tables {
        sorted: [0; 257],
        first: [0; MAX_LEN + 1],
        count: [0; MAX_LEN + 1],
        offset: [0; MAX_LEN + 1],
        fast: [(0, 0); 1 << FAST_BITS],
    };
    let mut n = 0;
    let mut len = 1;
    while len <= MAX_LEN {
        t.offset[len] = n as u16;
        let mut sym = 0;
        while sym < 257 {
            if LENGTHS[sym] as usize == len {
                t.sorted[n] = sym as u16;
                t.count[len] += 1;
                n += 1;
            }
            sym += 1;
        }
        len += 1;
    }
    // Canonical codes: each code is the previous one plus one, shifted left by the length
    // difference.
    let mut code: u32 = 0;
    let mut prev_len = LENGTHS[t.sorted[0] as usize] as u32;
    let mut k = 0;
    while k < 257 {
        let sym = t.sorted[k] as usize;
        let len = LENGTHS[sym] as u32;
        if k > 0 {
            code = (code + 1) << (len - prev_len);
        }
        prev_len = len;
        if t.offset[len as usize] as usize == k {
            t.first[len as usize] = code;
        }
        if len <= FAST_BITS {
            let shift = FAST_BITS - len;
            let base = (code << shift) as usize;
            let mut i = 0;
            while i < (1 << shift) {
                t.fast[base + i] = (sym as u16, len as u8);
                i += 1;
            }
        }
        k += 1;
    }
    t
}

static TABLES: Tables = build();

/// The symbol whose code starts the 32 bits of `window` (left-aligned), and its length.
#[inline]
fn lookup(window: u32) -> (u16, u32) {
    let (sym, len) = TABLES.fast[(window >> (32 - FAST_BITS)) as usize];
    if len != 0 {
        return (sym, u32::from(len));
    }
    let mut len = FAST_BITS as usize + 1;
    while len <= MAX_LEN {
        let code = window >> (32 - len);
        // After the shorter lengths failed, `code >= first[len]` (canonical order); a length
        // without codes has count 0 and never matches.
        let index = code.wrapping_sub(TABLES.first[len]);
        if index < u32::from(TABLES.count[len]) {
            return (
                TABLES.sorted[TABLES.offset[len] as usize + index as usize],
                len as u32,
            );
        }
        len += 1;
    }
    // Unreachable: the code is complete, every 30-bit pattern starts with a code.
    (EOS, 32)
}

/// Decodes a Huffman-coded string, appending it to `out`. Err: the EOS symbol inside the
/// string, or padding longer than 7 bits or not made of ones (RFC 7541 §5.2); `out` then holds
/// what was decoded before.
pub(super) fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
    out.reserve(src.len() + src.len() / 2);
    // The next `nbits` bits of input are the low bits of `acc`.
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let mut i = 0;
    loop {
        while nbits <= 48 && i < src.len() {
            acc = (acc << 8) | u64::from(src[i]);
            nbits += 8;
            i += 1;
        }
        if nbits == 0 {
            return Ok(());
        }
        let bits = acc & ((1u64 << nbits) - 1);
        // 32 bits from here, padded with ones past the end of the input (EOS's prefix).
        let window = if nbits >= 32 {
            (bits >> (nbits - 32)) as u32
        } else {
            ((bits << (32 - nbits)) as u32) | (u32::MAX >> nbits)
        };
        let (sym, len) = lookup(window);
        if len > nbits {
            // Past the last code: only up to 7 bits of ones may be left.
            return if nbits < 8 && bits == (1u64 << nbits) - 1 {
                Ok(())
            } else {
                Err(())
            };
        }
        if sym == EOS {
            return Err(());
        }
        out.push(sym as u8);
        nbits -= len;
    }
}

/// Huffman-encodes `src` (tests build header blocks with it).
#[cfg(test)]
pub(super) fn encode(src: &[u8]) -> Vec<u8> {
    let code_of = |sym: u16| -> (u32, u32) {
        let len = LENGTHS[sym as usize] as usize;
        let start = TABLES.offset[len] as usize;
        let rank = TABLES.sorted[start..]
            .iter()
            .position(|&s| s == sym)
            .unwrap();
        (TABLES.first[len] + rank as u32, len as u32)
    };
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut nbits = 0;
    for &b in src {
        let (code, len) = code_of(u16::from(b));
        acc = (acc << len) | u64::from(code);
        nbits += len;
        while nbits >= 8 {
            out.push((acc >> (nbits - 8)) as u8);
            nbits -= 8;
        }
    }
    if nbits > 0 {
        let pad = 8 - nbits;
        out.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(src: &[u8]) -> Result<Vec<u8>, ()> {
        let mut out = Vec::new();
        decode(src, &mut out).map(|()| out)
    }

    #[test]
    fn rfc7541_examples() {
        // RFC 7541 C.4.1, C.4.2, C.4.3, C.6.1.
        let cases: [(&[u8], &[u8]); 6] = [
            (
                &[
                    0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
                ],
                b"www.example.com",
            ),
            (&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], b"no-cache"),
            (
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f],
                b"custom-key",
            ),
            (
                &[0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf],
                b"custom-value",
            ),
            (&[0x64, 0x02], b"302"),
            (&[0xae, 0xc3, 0x77, 0x1a, 0x4b], b"private"),
        ];
        for (src, text) in cases {
            assert_eq!(decoded(src).as_deref(), Ok(text), "{text:?}");
            assert_eq!(encode(text), src, "{text:?}");
        }
        assert_eq!(decoded(&[]), Ok(vec![]));
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decoded(&encode(&all)), Ok(all.clone()));
        for b in 0..=255u8 {
            assert_eq!(decoded(&encode(&[b])), Ok(vec![b]));
        }
    }

    #[test]
    fn invalid_padding_and_eos() {
        // 8 bits of ones after a full code: padding too long.
        let mut long_pad = encode(b"0");
        long_pad.push(0xff);
        assert_eq!(decoded(&long_pad), Err(()));
        // Padding not made of ones: "0" is 00000, then 000 instead of 111.
        assert_eq!(decoded(&[0x00]), Err(()));
        // EOS (30 ones) inside the string.
        assert_eq!(decoded(&[0xff, 0xff, 0xff, 0xff]), Err(()));
        assert_eq!(decoded(&[0x3f, 0xff, 0xff, 0xff, 0xff]), Err(()));
    }

    /// Same verdict and output as loona-hpack's decoder on arbitrary input.
    #[test]
    fn agrees_with_loona_on_random_input() {
        let mut reference = loona_hpack::huffman::HuffmanDecoder::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..3000 {
            let len = (next() % 12) as usize;
            let mut src: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Valid strings, with a random tail byte sometimes.
                let text: Vec<u8> = (0..len).map(|_| next() as u8 % 128).collect();
                src = encode(&text);
                if round % 4 == 0 {
                    src.push(next() as u8);
                }
            }
            let theirs = reference.decode(&src).map_err(|_| ());
            assert_eq!(decoded(&src), theirs, "{src:02x?}");
        }
    }
}
