//! `parse_path` never panics, and an accepted path has only plain components.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_zerocopy::path::parse_path;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = parse_path(s) {
        for seg in p.segments() {
            assert!(!seg.is_empty() && seg != "." && seg != "..", "{seg:?}");
            assert!(!seg.contains(['/', '\\', '\0', ':']), "{seg:?}");
            assert!(!seg.trim_end_matches(['.', ' ']).is_empty(), "{seg:?}");
        }
        let rel = p.relative();
        assert!(!rel.starts_with('/'));
        assert!(!rel.split('/').any(|c| c == ".."));
    }
});
