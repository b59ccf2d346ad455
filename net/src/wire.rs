//! Primitive encoding: little-endian integers, strings, byte blobs and arrays.
//!
//! Decoding reads a borrowed buffer and returns byte blobs (record batches) as ranges of it, so
//! they are shared or carved out of the frame without a copy. Every read is bounds-checked and
//! fails with a [`DecodeError`] naming the field.

use std::ops::Range;

use bytes::{BufMut, BytesMut};

/// Largest element count accepted for any array, whatever the frame size.
pub const ARRAY_LEN_MAX: u32 = 1 << 20;
/// "Null" for nullable arrays and blobs.
pub const NULL_LEN: u32 = u32::MAX;

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{field}: needs {needed} bytes, {available} left")]
    Truncated { field: &'static str, needed: usize, available: usize },
    #[error("{field}: not UTF-8")]
    Utf8 { field: &'static str },
    #[error("{field}: {count} elements exceed the limit")]
    TooMany { field: &'static str, count: u32 },
    #[error("{field}: invalid value {value}")]
    Invalid { field: &'static str, value: i64 },
    #[error("{0} unexpected bytes after the body")]
    Trailing(usize),
}

/// Builds a body.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: BytesMut,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { buf: BytesMut::new() }
    }

    pub fn with_buffer(buf: BytesMut) -> Writer {
        Writer { buf }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.put_u8(v);
        self
    }
    pub fn i8(&mut self, v: i8) -> &mut Self {
        self.buf.put_i8(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.put_u16_le(v);
        self
    }
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.put_i16_le(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.put_u32_le(v);
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.put_i32_le(v);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.put_u64_le(v);
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.put_i64_le(v);
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(v as u8)
    }
    /// u16 length + UTF-8 bytes. Longer strings are a programmer error.
    pub fn str(&mut self, v: &str) -> &mut Self {
        assert!(v.len() <= u16::MAX as usize, "string field longer than 65535 bytes");
        self.u16(v.len() as u16);
        self.buf.put_slice(v.as_bytes());
        self
    }
    /// u32 length + bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.put_slice(v);
        self
    }
    /// u32 length (`NULL_LEN` for none) + bytes.
    pub fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => self.bytes(v),
            None => self.u32(NULL_LEN),
        }
    }
    /// u32 count, then each element.
    pub fn array<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) -> &mut Self {
        self.u32(items.len() as u32);
        for item in items {
            each(self, item);
        }
        self
    }
}

/// Reads a body from a borrowed buffer. Blobs (record batches) come back as byte ranges of
/// that buffer, so the caller can share or carve them without copying.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, at: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.at
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { field, needed: n, available: self.remaining() });
        }
        let slice = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(slice)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }
    pub fn i8(&mut self, field: &'static str) -> Result<i8, DecodeError> {
        Ok(self.u8(field)? as i8)
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(field, 2)?.try_into().expect("2 bytes")))
    }
    pub fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(self.u16(field)? as i16)
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(field, 4)?.try_into().expect("4 bytes")))
    }
    pub fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(field)? as i32)
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(field, 8)?.try_into().expect("8 bytes")))
    }
    pub fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(field)? as i64)
    }
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::Invalid { field, value: other.into() }),
        }
    }
    pub fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(field)? as usize;
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| DecodeError::Utf8 { field })
    }
    /// A length-prefixed blob, as a range of the buffer.
    pub fn blob(&mut self, field: &'static str) -> Result<Range<usize>, DecodeError> {
        let len = self.u32(field)? as usize;
        let start = self.at;
        self.take(field, len)?;
        Ok(start..start + len)
    }
    /// A length-prefixed blob that may be null (`NULL_LEN`).
    pub fn opt_blob(&mut self, field: &'static str) -> Result<Option<Range<usize>>, DecodeError> {
        let len = self.u32(field)?;
        if len == NULL_LEN {
            return Ok(None);
        }
        let start = self.at;
        self.take(field, len as usize)?;
        Ok(Some(start..start + len as usize))
    }
    /// A u32 count, then `count` elements. The count is checked against the bytes left (each
    /// element takes at least `min_element_bytes`) so a huge count cannot make us allocate.
    pub fn array<T>(
        &mut self,
        field: &'static str,
        min_element_bytes: usize,
        mut each: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u32(field)?;
        if count > ARRAY_LEN_MAX || count as usize * min_element_bytes.max(1) > self.remaining() {
            return Err(DecodeError::TooMany { field, count });
        }
        let mut items = Vec::with_capacity(count as usize);
        for _ in 0..count {
            items.push(each(self)?);
        }
        Ok(items)
    }
    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}
