//! One-line, located errors for TOML files an operator edits by hand.
//!
//! Shared by the node config and the routing map so both point at problems the same way:
//! `file:line:column: field.path: what is wrong`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;

/// A 1-based position in a text file; the column counts characters, not bytes, so it
/// matches what an editor shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// Bytes [`Location::of_offset`] has scanned in this process. Locating is a scan from
/// the start of the text, so it must happen for the errors reported and never for each
/// value of a valid file (that made parsing a 5,000-node map quadratic); a complexity
/// test reads this to check it.
static SCANNED: AtomicU64 = AtomicU64::new(0);

/// See [`SCANNED`].
pub fn bytes_scanned() -> u64 {
    SCANNED.load(Relaxed)
}

impl Location {
    /// The position of byte `offset` in `text`. Never panics: an offset past the end is
    /// clamped and one inside a multi-byte character counts as that character.
    pub fn of_offset(text: &str, offset: usize) -> Location {
        let mut end = offset.min(text.len());
        SCANNED.fetch_add(end as u64, Relaxed);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &text[..end];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Something wrong with the contents of a TOML file, located as precisely as the
/// deserializer allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    pub path: PathBuf,
    pub location: Option<Location>,
    /// Dotted path of the offending field (`xdp.mode`, `service[1].worker[0].node`);
    /// empty for syntax errors and problems with the document as a whole.
    pub field: String,
    pub message: String,
}

impl std::error::Error for TomlError {}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(location) = self.location {
            write!(f, ":{location}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl TomlError {
    /// An error about the value at byte range `span` of `text`.
    pub fn at(
        origin: &Path,
        text: &str,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> TomlError {
        TomlError::new(
            origin,
            Some(Location::of_offset(text, span.start)),
            field.into(),
            message.into(),
        )
    }

    fn new(origin: &Path, location: Option<Location>, field: String, message: String) -> Self {
        TomlError {
            path: origin.to_owned(),
            location,
            field,
            // The error must stay on one line for log lines and `check-config` output,
            // whatever the deserializer or a quoted value put in it.
            message: one_line(&message),
        }
    }
}

fn one_line(message: &str) -> String {
    message
        .split(is_line_break)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Unicode's mandatory line breaks: a terminal or a log viewer may start a new line at
/// any of them, not only at '\n' (serde repeats a value as written in "unknown variant"
/// messages, and TOML's "\r" escape is a raw carriage return).
fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Quote a value from the file for an error message, escaping anything that would break
/// the one-line rendering.
pub(crate) fn quoted(value: &str) -> String {
    format!("`{}`", value.escape_debug())
}

/// The file's bytes as text; invalid UTF-8 is reported at the first bad byte.
pub(crate) fn utf8<'a>(bytes: &'a [u8], origin: &Path) -> Result<&'a str, TomlError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let valid = &bytes[..e.valid_up_to()];
        // The prefix is valid by definition; the fallback only avoids an unwrap.
        let prefix = std::str::from_utf8(valid).unwrap_or_default();
        TomlError::new(
            origin,
            Some(Location::of_offset(prefix, prefix.len())),
            String::new(),
            "file is not valid UTF-8".to_owned(),
        )
    })
}

/// Deserialize `text` as a `T`, turning any failure into a located [`TomlError`].
pub(crate) fn from_str<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, TomlError> {
    // An untyped parse first, so a syntax error is reported as one rather than being
    // attributed to whatever field the typed pass happened to be in.
    if let Err(e) = text.parse::<toml::Table>() {
        let location = e.span().map(|s| Location::of_offset(text, s.start));
        let message = format!("TOML syntax error: {}", e.message());
        return Err(TomlError::new(origin, location, String::new(), message));
    }
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let segments = field_segments(e.path());
        let inner = e.into_inner();
        let location = inner.span().map(|s| Location::of_offset(text, s.start));
        let (field, message) = describe(segments, inner.message());
        TomlError::new(origin, location, field, message)
    })
}

enum Part {
    Key(String),
    Index(usize),
}

fn field_segments(path: &serde_path_to_error::Path) -> Vec<Part> {
    path.iter()
        .filter_map(|segment| match segment {
            // toml::Spanned is deserialized as a struct with private field names; they
            // mean nothing to the operator.
            Segment::Map { key } if key.starts_with("$__serde_spanned_private") => None,
            Segment::Map { key } | Segment::Enum { variant: key } => Some(Part::Key(key.clone())),
            Segment::Seq { index } => Some(Part::Index(*index)),
            Segment::Unknown => Some(Part::Key("?".to_owned())),
        })
        .collect()
}

fn render(parts: &[Part]) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Part::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// Field path and message, reworded where serde's phrasing puts the field name in the
/// message instead of the path.
fn describe(mut parts: Vec<Part>, message: &str) -> (String, String) {
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(name) = rest.strip_suffix('`')
    {
        parts.push(Part::Key(name.to_owned()));
        return (render(&parts), "missing field".to_owned());
    }
    if message.starts_with("unknown field `")
        && let Some(Part::Key(name)) = parts.last()
    {
        // The path ends with the unknown key itself; the table it sits in is the useful
        // context, and the top level has no path at all.
        let quoted_name = format!("unknown field `{name}`");
        if let Some(rest) = message.strip_prefix(&quoted_name) {
            parts.pop();
            if parts.is_empty() {
                return (String::new(), format!("{quoted_name} at top level{rest}"));
            }
            return (render(&parts), message.to_owned());
        }
    }
    (render(&parts), message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_is_one_based_and_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 6),
            Location { line: 2, column: 1 }
        );
        // 'é' is two bytes but one column.
        let eq = text.rfind('=').unwrap();
        assert_eq!(
            Location::of_offset(text, eq),
            Location { line: 2, column: 4 }
        );
    }

    #[test]
    fn location_never_panics_on_bad_offsets() {
        let text = "é\n";
        assert_eq!(
            Location::of_offset(text, 1),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 999),
            Location { line: 2, column: 1 }
        );
        assert_eq!(Location::of_offset("", 5), Location { line: 1, column: 1 });
    }

    #[test]
    fn invalid_utf8_is_located_at_the_first_bad_byte() {
        let err = utf8(b"a = 1\nb = \"\xff\"\n", Path::new("/x.toml")).unwrap_err();
        assert_eq!(err.to_string(), "/x.toml:2:6: file is not valid UTF-8");
    }

    #[test]
    fn messages_are_kept_on_one_line() {
        assert_eq!(
            one_line("invalid string\nexpected `\"`\n"),
            "invalid string; expected `\"`"
        );
        assert_eq!(quoted("a\nb"), "`a\\nb`");
    }

    /// Found by fuzzing (fuzz/artifacts/node_config/): `mode = "a\rb"` was reported with
    /// a raw carriage return in the middle of the line.
    #[test]
    fn every_kind_of_line_break_is_kept_off_the_line() {
        for br in [
            "\r", "\r\n", "\u{b}", "\u{c}", "\u{85}", "\u{2028}", "\u{2029}",
        ] {
            let m = one_line(&format!("unknown variant `a{br}b`, expected `auto`"));
            assert_eq!(m, "unknown variant `a; b`, expected `auto`", "{br:?}");
        }
    }
}
