//! `grpc-timeout` values: parsing never panics, accepts exactly 1 to 8 ASCII digits and a
//! unit, and what we encode parses back to no more than the original (within 1e-7 of it).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tower_abort::TimeoutFormat;

fuzz_target!(|data: &[u8]| {
    let parsed = TimeoutFormat::Grpc.parse(data);
    let well_formed = matches!(data.split_last(), Some((unit, digits))
        if b"HMSmun".contains(unit)
            && (1..=8).contains(&digits.len())
            && digits.iter().all(u8::is_ascii_digit));
    assert_eq!(parsed.is_ok(), well_formed, "{data:?} -> {parsed:?}");
    let Ok(d) = parsed else { return };
    assert!(d <= Duration::from_secs(99_999_999 * 3600));

    let encoded = TimeoutFormat::Grpc.encode(d);
    assert!(encoded.len() <= 9, "{encoded:?}");
    let back = TimeoutFormat::Grpc
        .parse(encoded.as_bytes())
        .expect("what we send, we accept");
    if d.is_zero() {
        // Zero goes out as one unit, never as "no time" or "no deadline".
        assert_eq!(back, Duration::from_nanos(1));
    } else {
        assert!(back <= d, "{d:?} encoded as {encoded:?} grew to {back:?}");
        assert!((d - back).as_secs_f64() <= d.as_secs_f64() * 1e-7 + 1e-9);
    }
});
