//! The configurable deadline header (`TimeoutFormat::Milliseconds` or `Seconds`, chosen by
//! the first byte): parsing never panics, accepts only the documented syntax, and what we
//! encode parses back to the original rounded down to the millisecond (one unit at least).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tower_abort::TimeoutFormat;

fn digits(s: &[u8], max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.iter().all(u8::is_ascii_digit)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let (format, well_formed) = if selector & 1 == 0 {
        (TimeoutFormat::Milliseconds, digits(value, 18))
    } else {
        let well_formed = match value.iter().position(|&b| b == b'.') {
            Some(dot) => digits(&value[..dot], 12) && digits(&value[dot + 1..], 9),
            None => digits(value, 12),
        };
        (TimeoutFormat::Seconds, well_formed)
    };
    let parsed = format.parse(value);
    assert_eq!(parsed.is_ok(), well_formed, "{value:?} -> {parsed:?}");
    let Ok(d) = parsed else { return };

    let encoded = format.encode(d);
    let back = format
        .parse(encoded.as_bytes())
        .expect("what we send, we accept");
    let millis = Duration::from_millis(d.as_millis().max(1) as u64);
    assert_eq!(back, millis, "{d:?} encoded as {encoded:?}");
});
