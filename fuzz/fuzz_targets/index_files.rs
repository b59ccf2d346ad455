//! The on-disk metadata of a partition: segment headers, offset and time index files, and the
//! recovery checkpoint. Damaged files must be refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_storage::files::{decode_indexes, Checkpoint, SegmentHeader};

fuzz_target!(|data: &[u8]| {
    let _ = SegmentHeader::decode(data, 0);
    let _ = Checkpoint::decode(data);
    // Split the input into an offset index and a time index.
    let cut = data.first().map_or(0, |b| *b as usize * data.len() / 256);
    let (offsets, times) = data.split_at(cut.min(data.len()));
    let _ = decode_indexes(offsets, times, 0);
    let _ = decode_indexes(data, data, 0);
});
