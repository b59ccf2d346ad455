//! The allocator tuning, in a process of its own (glibc's counters are process-wide, so the
//! library's other tests would disturb them).

use skein_broker::allocator::{self, Tuning};

/// Blocks glibc has `mmap`ed and not yet unmapped.
fn mapped_blocks() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe { libc::mallinfo2() }.hblks
}

#[test]
fn a_frame_sized_block_comes_from_the_heap_and_its_memory_is_reused() {
    if std::env::var("GLIBC_TUNABLES").unwrap_or_default().contains("glibc.malloc.") {
        assert_eq!(allocator::tune(), Tuning::LeftToTheEnvironment);
        return;
    }
    assert_eq!(allocator::tune(), Tuning::Tuned);
    assert_eq!(allocator::tune(), Tuning::Tuned, "a second call changes nothing");
    // An 8 MiB block (the client's largest request by default): glibc's default would mmap
    // it, so each one would be new pages.
    let before = mapped_blocks();
    let first = vec![1u8; 8 << 20];
    assert_eq!(mapped_blocks(), before, "an 8 MiB block was mmaped");
    let address = first.as_ptr() as usize;
    drop(first);
    let second = vec![2u8; 8 << 20];
    assert_eq!(second.as_ptr() as usize, address, "the freed block's memory was not reused");
    // Past the threshold, blocks are still mmaped (and given back when freed).
    let huge = vec![3u8; allocator::MMAP_THRESHOLD_BYTES + (1 << 20)];
    assert_eq!(mapped_blocks(), before + 1, "a block past the threshold is mmaped");
    drop(huge);
    assert_eq!(mapped_blocks(), before);
}
