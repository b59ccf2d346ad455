//! Frames: a length prefix and a fixed header, then the body. Checking whether a buffer holds
//! a whole frame is separate from parsing it: an incomplete frame is a normal state.

use bytes::{BufMut, BytesMut};

use crate::wire::Writer;

/// The `u32` length prefix of every frame.
pub const LENGTH_BYTES: usize = 4;
/// Request header, length prefix included.
pub const REQUEST_HEADER_BYTES: usize = 16;
/// Response header, length prefix included.
pub const RESPONSE_HEADER_BYTES: usize = 12;
/// First byte after the length of every request.
pub const REQUEST_MAGIC: u8 = b'S';
/// Version of the request and response headers.
pub const HEADER_VERSION: u8 = 1;

/// Request flag bits.
pub mod flags {
    /// The client expects no response (produce with `acks=0`).
    pub const NO_RESPONSE: u16 = 1 << 0;
    /// Every bit this version defines.
    pub const KNOWN: u16 = NO_RESPONSE;
}

/// Why bytes are not a frame. The connection cannot be resynchronised after any of these: the
/// broker closes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {length} is shorter than the header")]
    TooShort { length: u32 },
    #[error("frame length {length} exceeds the limit of {max} bytes")]
    TooLarge { length: u32, max: usize },
    #[error("bad request magic {0:#04x}")]
    BadMagic(u8),
    #[error("unsupported header version {0}")]
    UnsupportedHeaderVersion(u8),
    #[error("unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: u16,
    pub api_version: u16,
    pub flags: u16,
    pub correlation_id: u32,
}

impl RequestHeader {
    pub fn expects_response(&self) -> bool {
        self.flags & flags::NO_RESPONSE == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    pub correlation_id: u32,
    /// A frame-level error ([`crate::ErrorCode`]); when not 0 there is no body.
    pub error: u16,
    pub flags: u16,
}

fn frame_len(buf: &[u8], header_bytes: usize, max: usize) -> Result<Option<usize>, FrameError> {
    if buf.len() < LENGTH_BYTES {
        return Ok(None);
    }
    let length = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    if (length as usize) < header_bytes - LENGTH_BYTES {
        return Err(FrameError::TooShort { length });
    }
    let total = length as usize + LENGTH_BYTES;
    if total > max {
        return Err(FrameError::TooLarge { length, max });
    }
    Ok((buf.len() >= total).then_some(total))
}

/// `Ok(Some(n))` when `buf` starts with a whole request frame of `n` bytes, `Ok(None)` when more
/// bytes are needed, an error when the length prefix is impossible.
pub fn request_frame_len(buf: &[u8], frame_bytes_max: usize) -> Result<Option<usize>, FrameError> {
    frame_len(buf, REQUEST_HEADER_BYTES, frame_bytes_max)
}

/// As [`request_frame_len`], for responses.
pub fn response_frame_len(buf: &[u8], frame_bytes_max: usize) -> Result<Option<usize>, FrameError> {
    frame_len(buf, RESPONSE_HEADER_BYTES, frame_bytes_max)
}

/// Parses the header of a whole request frame.
pub fn decode_request_header(frame: &[u8]) -> Result<RequestHeader, FrameError> {
    assert!(frame.len() >= REQUEST_HEADER_BYTES, "checked by request_frame_len");
    if frame[4] != REQUEST_MAGIC {
        return Err(FrameError::BadMagic(frame[4]));
    }
    if frame[5] != HEADER_VERSION {
        return Err(FrameError::UnsupportedHeaderVersion(frame[5]));
    }
    let u16_at = |at: usize| u16::from_le_bytes([frame[at], frame[at + 1]]);
    let header = RequestHeader {
        api_key: u16_at(6),
        api_version: u16_at(8),
        flags: u16_at(10),
        correlation_id: u32::from_le_bytes(frame[12..16].try_into().expect("4 bytes")),
    };
    if header.flags & !flags::KNOWN != 0 {
        return Err(FrameError::UnknownFlags(header.flags & !flags::KNOWN));
    }
    Ok(header)
}

/// Parses the header of a whole response frame.
pub fn decode_response_header(frame: &[u8]) -> ResponseHeader {
    assert!(frame.len() >= RESPONSE_HEADER_BYTES, "checked by response_frame_len");
    ResponseHeader {
        correlation_id: u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes")),
        error: u16::from_le_bytes([frame[8], frame[9]]),
        flags: u16::from_le_bytes([frame[10], frame[11]]),
    }
}

/// Encodes a whole request frame.
pub fn encode_request(header: &RequestHeader, body: impl FnOnce(&mut Writer)) -> BytesMut {
    let mut writer = Writer::with_buffer(BytesMut::with_capacity(256));
    writer.u32(0).u8(REQUEST_MAGIC).u8(HEADER_VERSION);
    writer.u16(header.api_key).u16(header.api_version).u16(header.flags).u32(header.correlation_id);
    body(&mut writer);
    let mut buf = writer.buf;
    let length = (buf.len() - LENGTH_BYTES) as u32;
    buf[..4].copy_from_slice(&length.to_le_bytes());
    buf
}

/// Writes a response header for a body of `body_len` bytes.
pub fn put_response_header(buf: &mut BytesMut, header: &ResponseHeader, body_len: usize) {
    buf.put_u32_le((RESPONSE_HEADER_BYTES - LENGTH_BYTES + body_len) as u32);
    buf.put_u32_le(header.correlation_id);
    buf.put_u16_le(header.error);
    buf.put_u16_le(header.flags);
}

/// A response frame with no body, carrying a frame-level error.
pub fn encode_error_response(correlation_id: u32, error: crate::ErrorCode) -> BytesMut {
    let mut buf = BytesMut::with_capacity(RESPONSE_HEADER_BYTES);
    put_response_header(&mut buf, &ResponseHeader { correlation_id, error: error.code(), flags: 0 }, 0);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frames_round_trip_and_incomplete_is_not_an_error() {
        let header =
            RequestHeader { api_key: 4, api_version: 1, flags: flags::NO_RESPONSE, correlation_id: 77 };
        let frame = encode_request(&header, |w| {
            w.str("hello");
        });
        assert_eq!(request_frame_len(&frame, 1 << 20), Ok(Some(frame.len())));
        for cut in 0..frame.len() {
            assert_eq!(request_frame_len(&frame[..cut], 1 << 20), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode_request_header(&frame), Ok(header));
        assert!(!header.expects_response());
        let mut bad = frame.clone();
        bad[4] = b'X';
        assert_eq!(decode_request_header(&bad), Err(FrameError::BadMagic(b'X')));
        assert!(matches!(request_frame_len(&frame, 10), Err(FrameError::TooLarge { .. })));
        assert!(matches!(request_frame_len(&[1, 0, 0, 0], 100), Err(FrameError::TooShort { length: 1 })));
    }
}
