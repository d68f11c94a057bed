//! Text that came from the other end of the tunnel, made safe to store, log
//! and show.
//!
//! An agent's Hello (instance name, version, pinned URL), its
//! `Error` frames (message and hint reach callers' JSON bodies and logs) and
//! `Drain` reasons, and on the agent a broker's `Welcome`, `Drain` reasons
//! and request methods and paths in log lines, are all peer input. Without
//! care a peer could forge log lines (a newline in the text log format), hide
//! or rewrite text on an operator's terminal (ANSI escapes, bidi overrides),
//! and flood every log line of a session (a 1 MiB instance name repeated in
//! each). [`text`] fixes all three in one pass:
//!
//! - **printable only**: control characters (C0 including newline, carriage
//!   return, tab and ESC; DEL; C1), the line and paragraph separators
//!   (U+2028, U+2029) and the bidirectional marks, embeddings, overrides and
//!   isolates (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069) are
//!   each replaced by U+FFFD `�`, so the reader sees that something was
//!   there;
//! - **bounded**: at most `max_bytes` bytes of UTF-8; longer text is cut on
//!   a character boundary and ends with `…` (the marker counts towards the
//!   bound), so a cut is visible.
//!
//! The bounds per field are the constants below; which fields are refused
//! rather than cleaned is decided where they are read (see
//! `docs/architecture.md`, "Peer input").

use std::borrow::Cow;

/// Agent instance name (Hello), as stored, logged and shown by the API.
pub const MAX_INSTANCE_BYTES: usize = 128;
/// Agent version (Hello).
pub const MAX_VERSION_BYTES: usize = 64;
/// A URL a peer sends (pinned GitLab URL, Welcome's GitLab URL); a longer one
/// is refused, not cut, since a cut URL names another place.
pub const MAX_URL_BYTES: usize = 2048;
/// `Error.message` of a tunnel frame (reaches callers' JSON bodies).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// `Error.hint` of a tunnel frame (reaches callers' JSON bodies).
pub const MAX_ERROR_HINT_BYTES: usize = 1024;
/// `Drain.reason` and other short peer-chosen explanations.
pub const MAX_REASON_BYTES: usize = 256;
/// A request method in a log line.
pub const MAX_METHOD_BYTES: usize = 32;
/// A request path in a log line.
pub const MAX_PATH_BYTES: usize = 256;

/// Replaces an unsafe character.
pub const REPLACEMENT: char = '\u{FFFD}';
/// Ends a text that was cut.
pub const TRUNCATED: &str = "…";

/// Whether `c` must not reach a log line or a terminal as is.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with unsafe characters replaced and cut to `max_bytes` (see the
/// module documentation). Borrows when `s` is already clean and short.
pub fn text(s: &str, max_bytes: usize) -> Cow<'_, str> {
    if s.len() <= max_bytes && !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max_bytes));
    for c in s.chars() {
        let c = if is_unsafe(c) { REPLACEMENT } else { c };
        if out.len() + c.len_utf8() > max_bytes {
            // Leave room for the marker (when it fits at all), cutting on a
            // character boundary.
            let marker = if max_bytes >= TRUNCATED.len() {
                TRUNCATED
            } else {
                ""
            };
            let mut cut = (max_bytes - marker.len()).min(out.len());
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str(marker);
            return Cow::Owned(out);
        }
        out.push(c);
    }
    Cow::Owned(out)
}

/// [`text`] as an owned string.
pub fn owned(s: &str, max_bytes: usize) -> String {
    text(s, max_bytes).into_owned()
}

/// Whether a cleaned name says anything: at least one letter or digit.
pub fn is_meaningful(s: &str) -> bool {
    s.chars().any(char::is_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clean_short_text_is_borrowed() {
        assert!(matches!(text("agent-7", 128), Cow::Borrowed("agent-7")));
    }

    #[test]
    fn control_characters_and_bidi_are_replaced() {
        assert_eq!(text("a\nb\x1b[31mc\u{202e}d\t", 64), "a�b�[31mc�d�");
        assert_eq!(text("line\u{2028}sep", 64), "line�sep");
        assert_eq!(text("\u{85}", 64), "�");
    }

    #[test]
    fn long_text_is_cut_visibly_within_the_bound() {
        let t = owned(&"x".repeat(1000), 16);
        assert_eq!(t, format!("{}…", "x".repeat(13)));
        assert_eq!(t.len(), 16);
        // Multi-byte characters are never split.
        let t = owned(&"é".repeat(100), 10);
        assert!(t.len() <= 10 && t.ends_with('…'), "{t}");
        assert_eq!(text("abcdef", 2), "ab");
    }

    #[test]
    fn meaningful_names_have_a_letter_or_digit() {
        assert!(is_meaningful("pod-1"));
        assert!(!is_meaningful("��� -"));
        assert!(!is_meaningful(""));
    }

    proptest! {
        #[test]
        fn prop_sanitised_text_is_bounded_and_printable(s in any::<String>(), max in 0usize..300) {
            let t = text(&s, max);
            prop_assert!(t.len() <= max);
            prop_assert!(!t.chars().any(is_unsafe));
            // Clean text that fits is kept as is.
            if s.len() <= max && !s.chars().any(is_unsafe) {
                prop_assert_eq!(t.as_ref(), s.as_str());
            }
        }
    }
}
