//! Kafka's primitive types, read from a region of a frame of which only a prefix may have been
//! captured.
//!
//! Every length and count is checked against the region's full length (known from the frame's
//! size even where its bytes were not captured) before anything is skipped or allocated, so a
//! count read off the wire never drives an allocation or a loop longer than the bytes behind it.

/// Why decoding stopped before the end of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// The captured bytes ended inside the field: what was decoded before it stands, what
    /// follows is unknown (the frame was cut by the capture or by the frame buffer's bound).
    Cut,
    /// The bytes break the schema: a length or count past the region's end, a negative length
    /// other than null, a varint longer than its type.
    Invalid,
}

pub(super) type Decoded<T> = Result<T, Stop>;

/// A region of `len` bytes, of which the first `data.len()` were captured; reads advance.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    len: usize,
}

impl<'a> Reader<'a> {
    /// A region of `len` bytes whose first bytes are `data` (any captured bytes past `len` are
    /// not part of it).
    pub(super) fn new(data: &'a [u8], len: usize) -> Self {
        Reader {
            data: &data[..data.len().min(len)],
            pos: 0,
            len,
        }
    }

    /// A region captured whole.
    #[cfg(test)]
    pub(super) fn whole(data: &'a [u8]) -> Self {
        Reader::new(data, data.len())
    }

    /// Bytes left in the region, captured or not.
    pub(super) fn remaining(&self) -> usize {
        self.len - self.pos
    }

    /// Every byte of the region was captured.
    pub(super) fn captured_all(&self) -> bool {
        self.data.len() == self.len
    }

    /// The captured bytes not read yet.
    pub(super) fn captured_rest(&self) -> &'a [u8] {
        &self.data[self.pos.min(self.data.len())..]
    }

    pub(super) fn bytes(&mut self, n: usize) -> Decoded<&'a [u8]> {
        if n > self.remaining() {
            return Err(Stop::Invalid);
        }
        let end = self.pos + n;
        if end > self.data.len() {
            return Err(Stop::Cut);
        }
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    pub(super) fn skip(&mut self, n: usize) -> Decoded<()> {
        if n > self.remaining() {
            return Err(Stop::Invalid);
        }
        self.pos += n;
        Ok(())
    }

    /// The next `n` bytes as a region of their own (captured as far as this one is); this one
    /// continues after them.
    pub(super) fn sub(&mut self, n: usize) -> Decoded<Reader<'a>> {
        if n > self.remaining() {
            return Err(Stop::Invalid);
        }
        let start = self.pos.min(self.data.len());
        let end = (self.pos + n).min(self.data.len());
        self.pos += n;
        Ok(Reader {
            data: &self.data[start..end],
            pos: 0,
            len: n,
        })
    }

    fn array<const N: usize>(&mut self) -> Decoded<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Decoded<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub(super) fn i8(&mut self) -> Decoded<i8> {
        Ok(i8::from_be_bytes(self.array()?))
    }

    pub(super) fn i16(&mut self) -> Decoded<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(super) fn i32(&mut self) -> Decoded<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(super) fn i64(&mut self) -> Decoded<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    pub(super) fn uuid(&mut self) -> Decoded<[u8; 16]> {
        self.array()
    }

    /// Unsigned LEB128 of at most `max_bytes` bytes whose value fits `bits` bits.
    fn unsigned_varint(&mut self, max_bytes: u32, bits: u32) -> Decoded<u64> {
        let mut value: u64 = 0;
        for i in 0..max_bytes {
            let b = self.u8()?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if bits < 64 && value >> bits != 0 {
                    return Err(Stop::Invalid);
                }
                return Ok(value);
            }
        }
        Err(Stop::Invalid)
    }

    /// UNSIGNED_VARINT (lengths and counts of flexible versions).
    pub(super) fn uvarint(&mut self) -> Decoded<u32> {
        // Fits 32 bits: checked by unsigned_varint.
        Ok(self.unsigned_varint(5, 32)? as u32)
    }

    /// VARINT (zig-zag, record fields).
    pub(super) fn varint(&mut self) -> Decoded<i32> {
        let u = self.unsigned_varint(5, 32)? as u32;
        Ok((u >> 1) as i32 ^ -((u & 1) as i32))
    }

    /// VARLONG (zig-zag, record fields).
    pub(super) fn varlong(&mut self) -> Decoded<i64> {
        let u = self.unsigned_varint(10, 64)?;
        Ok((u >> 1) as i64 ^ -((u & 1) as i64))
    }

    /// A length that may be null: None for null; Invalid for other negative values.
    fn length(&mut self, flexible: bool, wide: bool) -> Decoded<Option<usize>> {
        if flexible {
            // COMPACT_*: length + 1, 0 for null.
            return Ok(match self.uvarint()? {
                0 => None,
                n => Some(n as usize - 1),
            });
        }
        let n = if wide {
            self.i32()?
        } else {
            i32::from(self.i16()?)
        };
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(Stop::Invalid),
            n => Ok(Some(n as usize)),
        }
    }

    /// NULLABLE_STRING / COMPACT_NULLABLE_STRING (a non-null STRING reads the same).
    pub(super) fn string(&mut self, flexible: bool) -> Decoded<Option<&'a [u8]>> {
        match self.length(flexible, false)? {
            None => Ok(None),
            Some(n) => self.bytes(n).map(Some),
        }
    }

    /// NULLABLE_BYTES / COMPACT_NULLABLE_BYTES (records fields): the bytes as a region.
    pub(super) fn bytes_field(&mut self, flexible: bool) -> Decoded<Option<Reader<'a>>> {
        match self.length(flexible, true)? {
            None => Ok(None),
            Some(n) => self.sub(n).map(Some),
        }
    }

    /// Element count of an ARRAY / COMPACT_ARRAY (None for null). A count larger than the bytes
    /// left is invalid: every element takes at least one byte.
    pub(super) fn array_len(&mut self, flexible: bool) -> Decoded<Option<usize>> {
        let n = self.length(flexible, true)?;
        if n.is_some_and(|n| n > self.remaining()) {
            return Err(Stop::Invalid);
        }
        Ok(n)
    }

    /// An array's elements, each read by `element`, which must read at least one byte (so the
    /// loop ends with the captured bytes however large the count).
    pub(super) fn each(
        &mut self,
        flexible: bool,
        mut element: impl FnMut(&mut Self) -> Decoded<()>,
    ) -> Decoded<()> {
        for _ in 0..self.array_len(flexible)?.unwrap_or(0) {
            element(self)?;
        }
        Ok(())
    }

    /// TAGGED_FIELDS of a flexible version (nothing otherwise): skipped.
    pub(super) fn tagged_fields(&mut self, flexible: bool) -> Decoded<()> {
        if !flexible {
            return Ok(());
        }
        let n = self.uvarint()? as usize;
        if n > self.remaining() {
            return Err(Stop::Invalid);
        }
        for _ in 0..n {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.skip(size)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_cut_and_invalid() {
        let mut r = Reader::new(&[0, 1, 0, 0], 6);
        assert_eq!(r.i16(), Ok(1));
        assert_eq!(r.i32(), Err(Stop::Cut));
        let mut r = Reader::new(&[0, 1, 0, 0], 6);
        assert_eq!(r.i64(), Err(Stop::Invalid));
        // Null and negative lengths.
        assert_eq!(Reader::whole(&[0xff, 0xff]).string(false), Ok(None));
        assert_eq!(
            Reader::whole(&[0xff, 0xfe]).string(false),
            Err(Stop::Invalid)
        );
        assert_eq!(Reader::whole(&[0]).string(true), Ok(None));
        assert_eq!(
            Reader::whole(&[3, b'a', b'b']).string(true),
            Ok(Some(&b"ab"[..]))
        );
        // A count past the region's end, captured or not.
        assert_eq!(
            Reader::new(&[0, 0, 0, 9], 12).array_len(false),
            Err(Stop::Invalid)
        );
        assert_eq!(Reader::new(&[0, 0, 0, 8], 12).array_len(false), Ok(Some(8)));
        assert_eq!(Reader::whole(&[0xff; 4]).array_len(false), Ok(None));
        // Varints: zig-zag, and too long.
        assert_eq!(Reader::whole(&[1]).varint(), Ok(-1));
        assert_eq!(Reader::whole(&[0x96, 0x01]).varint(), Ok(75));
        assert_eq!(Reader::whole(&[0xff; 5]).uvarint(), Err(Stop::Invalid));
        assert_eq!(
            Reader::whole(&[0xff, 0xff, 0xff, 0xff, 0x0f]).uvarint(),
            Ok(u32::MAX)
        );
        assert_eq!(
            Reader::whole(&[0xff, 0xff, 0xff, 0xff, 0x1f]).uvarint(),
            Err(Stop::Invalid)
        );
        assert_eq!(Reader::new(&[0x80], 5).uvarint(), Err(Stop::Cut));
        assert_eq!(Reader::whole(&[0x80]).uvarint(), Err(Stop::Invalid));
        let max = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(Reader::whole(&max).varlong(), Ok(i64::MAX));
    }

    #[test]
    fn sub_regions_keep_the_captured_part() {
        let mut r = Reader::new(&[1, 2, 3, 4], 10);
        r.skip(1).unwrap();
        let mut s = r.sub(5).unwrap();
        assert_eq!(s.remaining(), 5);
        assert!(!s.captured_all());
        assert_eq!(s.captured_rest(), &[2, 3, 4]);
        assert_eq!(s.bytes(3), Ok(&[2, 3, 4][..]));
        assert_eq!(s.u8(), Err(Stop::Cut));
        assert_eq!(r.remaining(), 4);
        assert_eq!(r.u8(), Err(Stop::Cut));
        assert_eq!(r.sub(5).map(|_| ()), Err(Stop::Invalid));
    }
}
