//! Text a peer chose, as it goes into the log: client and volume names, message types, error
//! strings that quote a peer's frame. Unauthenticated peers send it, so it is escaped (control
//! characters and newlines cannot forge or break log lines) and cut to
//! [`MAX_LOGGED_CHARS`] characters (a 500 KB name costs a line, not 500 KB). Everything sand
//! logs that a peer could have written goes through [`peer_text`].

use std::fmt::{self, Display, Write};

/// Characters of one peer-supplied text kept in the log.
pub const MAX_LOGGED_CHARS: usize = 128;

/// A peer-supplied text, displayed quoted, escaped as Rust's `escape_debug` does, and cut to
/// [`MAX_LOGGED_CHARS`] characters followed by `…(N bytes)` (its full length).
pub struct PeerText<'a>(&'a str);

pub fn peer_text(text: &str) -> PeerText<'_> {
    PeerText(text)
}

impl Display for PeerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(MAX_LOGGED_CHARS) {
            for escaped in c.escape_debug() {
                f.write_char(escaped)?;
            }
        }
        f.write_char('"')?;
        if chars.next().is_some() {
            write!(f, "…({} bytes)", self.0.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_and_escaped() {
        assert_eq!(peer_text("host1").to_string(), "\"host1\"");
        assert_eq!(
            peer_text("a\nb\r\x1b[0m\0\"").to_string(),
            "\"a\\nb\\r\\u{1b}[0m\\0\\\"\""
        );
    }

    #[test]
    fn long_text_is_cut_and_its_length_given() {
        let long = "é".repeat(1000);
        let shown = peer_text(&long).to_string();
        assert_eq!(
            shown,
            format!("\"{}\"…(2000 bytes)", "é".repeat(MAX_LOGGED_CHARS))
        );
        let exact = "x".repeat(MAX_LOGGED_CHARS);
        assert_eq!(peer_text(&exact).to_string(), format!("\"{exact}\""));
    }
}
