// Shared by the Rust peers (included with `#[path]`, so each peer stays one binary).

/// The `ms` query parameter: absent → `default`; unparsable or above `max` → `Err` (answer 400).
pub(crate) fn ms_param(query: Option<&str>, default: u64, max: u64) -> Result<u64, String> {
    let Some(q) = query else {
        return Ok(default);
    };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("ms=") {
            return match v.parse::<u64>() {
                Ok(ms) if ms <= max => Ok(ms),
                Ok(ms) => Err(format!("ms={ms} is above the maximum {max}")),
                Err(_) => Err(format!("ms={v:?} is not a number of milliseconds")),
            };
        }
    }
    Ok(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ms() {
        assert_eq!(ms_param(None, 200, 1000), Ok(200));
        assert_eq!(ms_param(Some("x=1&ms=50"), 200, 1000), Ok(50));
        assert!(ms_param(Some("ms=abc"), 200, 1000).is_err());
        assert!(ms_param(Some("ms=1001"), 200, 1000).is_err());
        assert_eq!(ms_param(Some("other=1"), 7, 1000), Ok(7));
    }
}
