//! Request-path confinement: turns a URI path into a relative path that cannot leave the root.
//!
//! This is the lexical half of confinement; the other half (symlinks) is enforced when the file
//! is opened (see [`SymlinkPolicy`](crate::SymlinkPolicy)).

use std::fmt;

/// A request path that passed every lexical check: only normal components, no `..`, no
/// separators or NUL inside a component, valid UTF-8, and no Windows device names.
///
/// It holds the decoded components joined with `/` (one string: a request costs one
/// allocation, whatever its depth).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SafePath {
    relative: String,
    trailing_slash: bool,
}

impl SafePath {
    /// The components, in order; none for the root itself.
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = &str> + '_ {
        // Components are never empty, so only the root's empty string yields an empty piece.
        self.relative.split('/').filter(|s| !s.is_empty())
    }

    /// Whether this is the root itself (no components).
    pub fn is_root(&self) -> bool {
        self.relative.is_empty()
    }

    /// Whether the request path ended in `/` (a directory was asked for).
    pub fn has_trailing_slash(&self) -> bool {
        self.trailing_slash
    }

    /// Whether any component starts with `.` (a hidden file or directory).
    pub fn is_hidden(&self) -> bool {
        self.relative.starts_with('.') || self.relative.contains("/.")
    }

    /// The same path, as asked for without a trailing `/`.
    pub(crate) fn without_trailing_slash(mut self) -> Self {
        self.trailing_slash = false;
        self
    }

    /// The components joined with `/`, relative to the root; empty for the root.
    pub fn relative(&self) -> &str {
        &self.relative
    }
}

/// Why a request path was refused. Every variant maps to `400 Bad Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// A `..` component, literal or percent-encoded.
    ParentDir,
    /// A malformed percent escape.
    BadEscape,
    /// An encoded `/` (`%2F`), a backslash, or a `:` (drive letters, NTFS streams) in a component.
    Separator,
    /// A NUL byte or another control character.
    Control,
    /// A component that is not valid UTF-8 after decoding.
    NotUtf8,
    /// A Windows device name (`CON`, `NUL`, `COM1`, `LPT1.txt`, …).
    DeviceName,
    /// The path did not start with `/`, or was longer than allowed.
    Malformed,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::ParentDir => "path contains a parent-directory component",
            PathError::BadEscape => "path contains a malformed percent escape",
            PathError::Separator => "path component contains a separator",
            PathError::Control => "path contains a control character",
            PathError::NotUtf8 => "path is not valid UTF-8",
            PathError::DeviceName => "path names a Windows device",
            PathError::Malformed => "path is malformed",
        })
    }
}

impl std::error::Error for PathError {}

/// Longest request path accepted, in bytes (before decoding).
const MAX_PATH_LEN: usize = 4096;

/// Checks and decodes the path part of a request URI (without the query).
///
/// Empty components (`//`) and `.` are dropped, so `//etc/passwd` is `etc/passwd` under the root.
///
/// ```
/// use tower_zerocopy::path::{parse_path, PathError};
///
/// let p = parse_path("/docs/a%20b.txt").unwrap();
/// assert_eq!(p.relative(), "docs/a b.txt");
/// assert_eq!(parse_path("/docs/%2e%2e/secret"), Err(PathError::ParentDir));
/// assert_eq!(parse_path("/a\\b"), Err(PathError::Separator));
/// ```
pub fn parse_path(path: &str) -> Result<SafePath, PathError> {
    if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
        return Err(PathError::Malformed);
    }
    let trailing_slash = path.ends_with('/');
    let mut relative = String::with_capacity(path.len());
    // Only a component with an escape needs a buffer of its own.
    let mut decoded = Vec::new();
    for raw in path.split('/') {
        let segment = if raw.contains('%') {
            decoded.clear();
            percent_decode(raw.as_bytes(), &mut decoded)?;
            check_bytes(&decoded)?;
            std::str::from_utf8(&decoded).map_err(|_| PathError::NotUtf8)?
        } else {
            // Undecoded, it is a slice of a `str`, so valid UTF-8 and free of `/`.
            check_bytes(raw.as_bytes())?;
            raw
        };
        match segment {
            "" | "." => continue,
            ".." => return Err(PathError::ParentDir),
            _ => {}
        }
        // Windows strips trailing dots and spaces, so "..." or ".. " can mean "..".
        let stripped = segment.trim_end_matches(['.', ' ']);
        if stripped.is_empty() || stripped == "." || stripped == ".." {
            return Err(PathError::ParentDir);
        }
        if is_windows_device(stripped) {
            return Err(PathError::DeviceName);
        }
        if !relative.is_empty() {
            relative.push('/');
        }
        relative.push_str(segment);
    }
    Ok(SafePath {
        relative,
        trailing_slash,
    })
}

/// Refuses separators inside a component (checked first), then control characters.
fn check_bytes(segment: &[u8]) -> Result<(), PathError> {
    let separator = |b: &u8| matches!(b, b'/' | b'\\' | b':');
    let control = |b: &u8| *b < 0x20 || *b == 0x7f;
    // One pass for the usual clean component; the error is then named in order.
    if !segment.iter().any(|b| separator(b) || control(b)) {
        return Ok(());
    }
    if segment.iter().any(separator) {
        return Err(PathError::Separator);
    }
    Err(PathError::Control)
}

fn percent_decode(raw: &[u8], out: &mut Vec<u8>) -> Result<(), PathError> {
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hi = hex_val(hex[0]).ok_or(PathError::BadEscape)?;
            let lo = hex_val(hex[1]).ok_or(PathError::BadEscape)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_windows_device(segment: &str) -> bool {
    let stem = segment
        .split('.')
        .next()
        .unwrap_or(segment)
        .trim_end_matches(' ');
    // Every reserved name starts with one of these letters (most components do not).
    if !matches!(
        stem.as_bytes().first().map(u8::to_ascii_uppercase),
        Some(b'A' | b'C' | b'L' | b'N' | b'P')
    ) {
        return false;
    }
    const RESERVED: [&str; 7] = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"];
    if RESERVED.iter().any(|r| stem.eq_ignore_ascii_case(r)) {
        return true;
    }
    let Some(prefix) = stem.get(..3) else {
        return false;
    };
    if !prefix.eq_ignore_ascii_case("COM") && !prefix.eq_ignore_ascii_case("LPT") {
        return false;
    }
    let number = &stem[3..];
    (number.len() == 1 && number.as_bytes()[0].is_ascii_digit())
        || matches!(number, "¹" | "²" | "³")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        let p = parse_path("//a/./b//c.txt").unwrap();
        assert_eq!(p.relative(), "a/b/c.txt");
        assert!(!p.has_trailing_slash());
        assert!(parse_path("/dir/").unwrap().has_trailing_slash());
        assert!(parse_path("/").unwrap().is_root());
        assert_eq!(parse_path("/").unwrap().segments().count(), 0);
        assert_eq!(
            parse_path("/a/%62/c")
                .unwrap()
                .segments()
                .collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(parse_path("/.well-known/x").unwrap().is_hidden());
        assert_eq!(parse_path("/caf%C3%A9").unwrap().relative(), "café");
        assert_eq!(
            parse_path("/console.txt").unwrap().relative(),
            "console.txt"
        );
    }

    #[test]
    fn rejects() {
        let cases: &[(&str, PathError)] = &[
            ("/..", PathError::ParentDir),
            ("/a/../../etc/passwd", PathError::ParentDir),
            ("/%2e%2e/x", PathError::ParentDir),
            ("/%2E%2E/x", PathError::ParentDir),
            ("/.%2e/x", PathError::ParentDir),
            ("/.../x", PathError::ParentDir),
            ("/.. /x", PathError::ParentDir),
            ("/a%2f..%2fb", PathError::Separator),
            ("/a%5c..%5cb", PathError::Separator),
            ("/..\\x", PathError::Separator),
            ("/C:/Windows/win.ini", PathError::Separator),
            ("/file.txt::$DATA", PathError::Separator),
            ("/a%00.txt", PathError::Control),
            ("/a%0a", PathError::Control),
            ("/%", PathError::BadEscape),
            ("/%zz", PathError::BadEscape),
            ("/%c0%ae%c0%ae/x", PathError::NotUtf8),
            ("/CON", PathError::DeviceName),
            ("/nul.txt", PathError::DeviceName),
            ("/com1", PathError::DeviceName),
            ("/LPT9.log", PathError::DeviceName),
            ("relative", PathError::Malformed),
        ];
        for (path, want) in cases {
            assert_eq!(parse_path(path), Err(*want), "{path:?}");
        }
    }
}
