//! `parse_range` never panics, and whatever it returns is a valid answer for the length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_zerocopy::range::{parse_range, RangeOutcome};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let len = u64::from_le_bytes(data[..8].try_into().unwrap()) >> (data[0] % 64);
    let max = usize::from(data[8] & 0x1f) + 1;
    // Half the inputs get the unit for free, so the fuzzer spends its time on the range list.
    let mut header = Vec::with_capacity(data.len());
    if data[8] & 0x80 != 0 {
        header.extend_from_slice(b"bytes=");
    }
    header.extend_from_slice(&data[9..]);
    match parse_range(&header, len, max) {
        RangeOutcome::Satisfiable(ranges) => {
            assert!(!ranges.is_empty());
            assert!(ranges.len() <= max);
            for r in &ranges {
                assert!(r.start < r.end, "{r:?}");
                assert!(r.end <= len, "{r:?} beyond {len}");
            }
            // Coalesced: no two ranges overlap or touch.
            let mut sorted = ranges.clone();
            sorted.sort_by_key(|r| r.start);
            for w in sorted.windows(2) {
                assert!(w[0].end < w[1].start, "{:?} and {:?} overlap", w[0], w[1]);
            }
        }
        RangeOutcome::Unsatisfiable | RangeOutcome::Ignore => {}
    }
});
