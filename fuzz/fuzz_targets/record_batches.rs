//! The record batch decoder: header rules, CRC, and every record inside (varints, keys,
//! values, headers). Untrusted bytes give an error, never a panic; a batch that validates
//! yields exactly `record_count` records at consecutive offsets.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use skein_storage::batch::{self, Batch, BatchSplitter};

fuzz_target!(|data: &[u8]| {
    let _ = batch::BatchHeader::parse(data, 1 << 20);
    if let Ok(header) = batch::validate(data, 1 << 20) {
        let (whole, _) = Batch::from_bytes(Bytes::copy_from_slice(data), 1 << 20).expect("validated");
        let mut count = 0u64;
        for record in whole.records() {
            match record {
                Ok(record) => {
                    assert_eq!(record.offset, header.base_offset + count);
                    count += 1;
                }
                Err(_) => return,
            }
        }
        assert_eq!(count, u64::from(header.record_count));
    }
    // A stream of batches, the way the client reads a fetch response.
    for batch in BatchSplitter::new(Bytes::copy_from_slice(data), 1 << 20) {
        let Ok(batch) = batch else { break };
        for record in batch.records() {
            if record.is_err() {
                break;
            }
        }
    }
});
