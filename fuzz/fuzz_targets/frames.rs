//! Every wire decoder: request frames (header, then the body of every API), and every
//! response body a client decodes. Untrusted bytes must give an error, never a panic, and a
//! decoded request must encode back to a frame that decodes to the same request.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use skein_net::frame;
use skein_net::*;

fuzz_target!(|data: &[u8]| {
    // As a request frame, the way the broker reads a connection.
    if let Ok(Some(len)) = frame::request_frame_len(data, 1 << 20) {
        let whole = &data[..len];
        if let Ok(header) = frame::decode_request_header(whole) {
            if let Ok(request) = Request::decode(&header, &whole[frame::REQUEST_HEADER_BYTES..]) {
                let body = Bytes::copy_from_slice(&whole[frame::REQUEST_HEADER_BYTES..]);
                let owned = request.map_records(|range| body.slice(range));
                let again = owned.to_frame_at(header.correlation_id, header.flags, header.api_version);
                let header2 = frame::decode_request_header(&again).expect("re-encoded header");
                let decoded = Request::decode(&header2, &again[frame::REQUEST_HEADER_BYTES..])
                    .expect("re-encoded body");
                assert_eq!(decoded.api_key(), owned.api_key());
            }
        }
    }
    // As a response frame and every response body, the way the client reads one.
    let _ = frame::response_frame_len(data, 1 << 20);
    macro_rules! each {
        ($($t:ty),*) => {$(
            let mut r = Reader::new(data);
            let _ = <$t>::decode(&mut r);
        )*};
    }
    for version in [0, 1] {
        let mut r = Reader::new(data);
        let _ = ApiVersionsResponse::decode(&mut r, version);
        let mut r = Reader::new(data);
        let _ = MetadataResponse::decode(&mut r, version);
    }
    each!(
        TopicResults,
        ProduceResponse,
        ListOffsetsResponse,
        InitProducerIdResponse,
        HeartbeatResponse,
        OffsetCommitResponse,
        OffsetFetchResponse,
        ListGroupsResponse,
        DescribeGroupResponse
    );
    let mut r = Reader::new(data);
    let _ = FetchResponse::decode(&mut r);
});
