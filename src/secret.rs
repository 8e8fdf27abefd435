//! Secret bytes that cannot be printed and are wiped when dropped.
//!
//! Invariant: no code path formats a [`SecretValue`]; `Debug` prints `[redacted]` and there is
//! no `Display`. Reading the bytes requires an explicit [`SecretValue::expose`] call, which keeps
//! every place that touches a real value greppable.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

/// A real secret value (an API key, a CA private key). Cheap to clone: the bytes are shared and
/// zeroized when the last clone is dropped.
#[derive(Clone)]
pub struct SecretValue(Arc<Zeroizing<Vec<u8>>>);

impl SecretValue {
    /// Wraps `bytes`, taking ownership so no unzeroized copy is left behind by this call.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Arc::new(Zeroizing::new(bytes)))
    }

    /// The raw bytes. Call sites must never log, format or return them to a sandbox.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty value.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for SecretValue {
    /// Constant-time comparison, so equality checks do not leak a prefix through timing.
    fn eq(&self, other: &Self) -> bool {
        ct_eq(self.expose(), other.expose())
    }
}

impl Eq for SecretValue {}

/// True for the bytes no secret value may hold: every C0 control (`0x00`–`0x1F`) but HTAB,
/// and DEL. The admin API refuses values with them (a header cannot carry them), and none of
/// the forms the scrubber also looks for (`subst::forms`: percent, JSON, HTML, base64) can
/// produce one, so a streamed answer may be cut at any of them without splitting a value.
pub fn refused_in_value(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Compares two byte strings in time independent of where they differ (length may leak).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let v = SecretValue::new(b"sk-live-123".to_vec());
        assert_eq!(format!("{v:?}"), "[redacted]");
        assert_eq!(v.expose(), b"sk-live-123");
    }

    #[test]
    fn location_names_are_their_serde_spelling() {
        for l in [Location::Header, Location::Query, Location::Body] {
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
    }
}

/// Where in a request a secret's token may be unsealed (DESIGN.md §3 "Where").
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// Any request header value (including decoded `Authorization: Basic`), never `Host`.
    Header,
    /// The URI query string (opt-in only).
    Query,
    /// The request body (streaming, not inside compressed encodings).
    Body,
}

impl Location {
    /// The default `locations` of a secret: `["header", "body"]`.
    pub const DEFAULT: [Location; 2] = [Location::Header, Location::Body];

    /// The API's spelling (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Header => "header",
            Location::Query => "query",
            Location::Body => "body",
        }
    }
}

/// A small set of [`Location`]s, stored as bits for the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Locations(u8);

impl Locations {
    /// The set holding exactly `locs`.
    pub fn from_slice(locs: &[Location]) -> Self {
        Locations(locs.iter().fold(0, |acc, l| acc | Self::bit(*l)))
    }

    /// True if `loc` is in the set.
    pub fn contains(self, loc: Location) -> bool {
        self.0 & Self::bit(loc) != 0
    }

    /// The members, in the order header, query, body.
    pub fn to_vec(self) -> Vec<Location> {
        [Location::Header, Location::Query, Location::Body]
            .into_iter()
            .filter(|l| self.contains(*l))
            .collect()
    }

    fn bit(loc: Location) -> u8 {
        match loc {
            Location::Header => 1,
            Location::Query => 2,
            Location::Body => 4,
        }
    }
}
