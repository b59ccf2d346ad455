//! Variable-length integers used inside record batches.
//!
//! * unsigned values: LEB128 (7 bits per byte, least significant group first, high bit set on
//!   every byte but the last), at most 10 bytes for a `u64`;
//! * signed values: zig-zag mapped to unsigned first (`0 → 0, -1 → 1, 1 → 2, …`), then LEB128.
//!
//! Decoding never panics: a truncated or over-long varint is an error.

use bytes::BufMut;

/// Why a varint could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    /// The input ended before the last byte of the varint (high bit still set).
    #[error("varint truncated")]
    Truncated,
    /// More than 10 bytes, or bits beyond 64.
    #[error("varint longer than 64 bits")]
    Overflow,
}

/// Largest encoded size of a `u64` varint.
pub const VARINT_BYTES_MAX: usize = 10;

/// Appends `value` as an unsigned LEB128 varint.
#[inline]
pub fn put_uvarint(buf: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// Appends `value` as a zig-zag varint.
#[inline]
pub fn put_varint(buf: &mut impl BufMut, value: i64) {
    put_uvarint(buf, zigzag_encode(value));
}

/// Number of bytes `put_uvarint(value)` writes.
#[inline]
pub fn uvarint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Number of bytes `put_varint(value)` writes.
#[inline]
pub fn varint_len(value: i64) -> usize {
    uvarint_len(zigzag_encode(value))
}

#[inline]
fn zigzag_encode(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

#[inline]
fn zigzag_decode(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Reads an unsigned varint from the front of `input`, returning the value and the bytes used.
#[inline]
pub fn get_uvarint(input: &[u8]) -> Result<(u64, usize), VarintError> {
    let mut value: u64 = 0;
    for (index, &byte) in input.iter().enumerate() {
        if index == VARINT_BYTES_MAX {
            return Err(VarintError::Overflow);
        }
        let group = u64::from(byte & 0x7f);
        if index == VARINT_BYTES_MAX - 1 && group > 1 {
            return Err(VarintError::Overflow);
        }
        value |= group << (7 * index);
        if byte & 0x80 == 0 {
            return Ok((value, index + 1));
        }
    }
    Err(VarintError::Truncated)
}

/// Reads a zig-zag varint from the front of `input`.
#[inline]
pub fn get_varint(input: &[u8]) -> Result<(i64, usize), VarintError> {
    let (raw, used) = get_uvarint(input)?;
    Ok((zigzag_decode(raw), used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        let mut out = Vec::new();
        put_uvarint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        out.clear();
        put_varint(&mut out, -1);
        assert_eq!(out, [0x01]);
        assert_eq!(get_uvarint(&[0x80]), Err(VarintError::Truncated));
        assert_eq!(get_uvarint(&[0xff; 11]), Err(VarintError::Overflow));
        assert_eq!(
            get_uvarint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(VarintError::Overflow)
        );
        assert_eq!(get_uvarint(&[]), Err(VarintError::Truncated));
    }

    proptest! {
        #[test]
        fn unsigned_round_trip(value: u64) {
            let mut out = Vec::new();
            put_uvarint(&mut out, value);
            prop_assert_eq!(out.len(), uvarint_len(value));
            prop_assert_eq!(get_uvarint(&out), Ok((value, out.len())));
        }

        #[test]
        fn signed_round_trip(value: i64) {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            prop_assert_eq!(out.len(), varint_len(value));
            prop_assert_eq!(get_varint(&out), Ok((value, out.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = get_uvarint(&bytes);
            let _ = get_varint(&bytes);
        }
    }
}
