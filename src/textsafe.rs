//! Text that reaches a technician's terminal: record ids, kinds, origins, node ids,
//! refusal reasons, EMR messages, field names — much of it written by a peer, an
//! EMR or a file on a USB stick — is printed through [`safe`] (one line) or
//! [`safe_lines`] (keeps line breaks) by every human, non-JSON output.
//!
//! Invariant: what these functions return contains no C0 control character (other
//! than `\n` for `safe_lines`), no DEL, no C1 control character and no Unicode
//! bidirectional override or isolate, so a value can neither send terminal escape
//! sequences (colours, cursor moves, title changes, hyperlinks, clipboard writes)
//! nor forge or reorder lines of output. They are rendered visibly instead:
//! `\x1b`, `\r`, `\t`, `\n`, `\x7f`, `\u{9b}`, `\u{202e}`. Backslashes are left
//! alone, so ordinary text (Windows paths, regexes) reads as written.
//!
//! JSON output needs none of this: serde_json already escapes control characters.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must not reach a terminal as it is.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

fn escape(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    let keep = |c: char| !is_unsafe(c) || (keep_newlines && c == '\n');
    if s.chars().all(keep) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if keep(c) {
            out.push(c);
            continue;
        }
        let _ = match c {
            '\n' => write!(out, "\\n"),
            '\r' => write!(out, "\\r"),
            '\t' => write!(out, "\\t"),
            c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
            c => write!(out, "\\u{{{:x}}}", c as u32),
        };
    }
    Cow::Owned(out)
}

/// `s` on one line with every control character made visible (`\x1b`, `\n`, …).
pub fn safe(s: &str) -> Cow<'_, str> {
    escape(s, false)
}

/// Like [`safe`], but keeps line breaks (multi-line messages such as a list of
/// configuration problems).
pub fn safe_lines(s: &str) -> Cow<'_, str> {
    escape(s, true)
}

/// Any displayable value (a path, a version vector, an error) made safe on one line.
pub fn safe_display(v: impl std::fmt::Display) -> String {
    let s = v.to_string();
    match safe(&s) {
        Cow::Borrowed(_) => s,
        Cow::Owned(o) => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        let s = "Patient/abc-123 — Ünïcode ok, C:\\path";
        assert!(matches!(safe(s), Cow::Borrowed(_)));
        assert_eq!(safe(s), s);
    }

    #[test]
    fn escape_sequences_and_line_forgery_are_made_visible() {
        assert_eq!(safe("\x1b[31mred\x1b[0m"), "\\x1b[31mred\\x1b[0m");
        assert_eq!(safe("a\nFAKE LINE\r"), "a\\nFAKE LINE\\r");
        assert_eq!(safe("\u{9b}2J\u{7f}"), "\\u{9b}2J\\x7f");
        assert_eq!(safe("abc\u{202e}cba"), "abc\\u{202e}cba");
        assert_eq!(safe_lines("one\ntwo\x07"), "one\ntwo\\x07");
        assert_eq!(safe_display(format_args!("x{}", '\x1b')), "x\\x1b");
    }

    #[test]
    fn nothing_unsafe_survives_any_input() {
        for cp in (0u32..0x3000).chain([0x202a, 0x202e, 0x2066, 0x2069]) {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let s = format!("a{c}b");
            assert!(!safe(&s).chars().any(is_unsafe), "U+{cp:04x}");
            assert!(
                !safe_lines(&s).chars().any(|c| is_unsafe(c) && c != '\n'),
                "U+{cp:04x}"
            );
        }
    }
}
