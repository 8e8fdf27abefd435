//! Which codings an upstream applied to a response body, however it spelled them.
//!
//! The bytes on the wire are `Transfer-Encoding` codings over `Content-Encoding` codings over
//! the representation (RFC 9110 §8.4, RFC 9112 §6.1). Both are lists, in the order applied,
//! split over any number of fields: `Content-Encoding: gzip, br` is `Content-Encoding: gzip`
//! followed by `Content-Encoding: br`. hyper has already removed a *final* `chunked`; every
//! other transfer coding is still on the body. So for
//!
//! ```text
//! Content-Encoding: gzip
//! Content-Encoding: br
//! Transfer-Encoding: gzip, chunked
//! ```
//!
//! the body hyper hands us is `gzip(br(gzip(representation)))` and [`Codings::applied`] is
//! `[Gzip, Brotli, Gzip]`: the decoder is built from the last entry inwards.
//!
//! Rule: every coding is decoded or the response is refused. `identity` and empty list
//! elements are skipped; anything else sealgate cannot decode — an unknown name, a coding with
//! parameters, `chunked` anywhere but last in `Transfer-Encoding` — makes the list
//! [`CodingError::Unsupported`]; more than the configured number of listed codings
//! (`identity` included, so the parse itself is bounded) is [`CodingError::TooMany`].

use http::header::{self, HeaderMap};

/// A coding sealgate decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// `gzip`, `x-gzip`.
    Gzip,
    /// `deflate` (RFC 9110: zlib-wrapped).
    Zlib,
    /// `raw-deflate` (non-standard, seen in the wild).
    RawDeflate,
    /// `br`.
    Brotli,
    /// `zstd`.
    Zstd,
}

impl Coding {
    /// `Ok(None)` for `identity` (and an empty element), `Err` for what cannot be decoded.
    fn parse(name: &str) -> Result<Option<Coding>, CodingError> {
        let known = [
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("deflate", Coding::Zlib),
            ("raw-deflate", Coding::RawDeflate),
            ("br", Coding::Brotli),
            ("zstd", Coding::Zstd),
        ];
        if name.is_empty() || name.eq_ignore_ascii_case("identity") {
            return Ok(None);
        }
        known
            .iter()
            .find(|(n, _)| name.eq_ignore_ascii_case(n))
            .map(|&(_, c)| Some(c))
            .ok_or(CodingError::Unsupported)
    }
}

/// Why a response's codings cannot be decoded. Carries nothing the upstream wrote: the names
/// are the upstream's bytes and may be anything, a real value included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodingError {
    /// A coding sealgate cannot decode.
    #[error("a content or transfer coding sealgate cannot decode")]
    Unsupported,
    /// More codings than `upstream.max_response_codings`.
    #[error("more stacked codings than upstream.max_response_codings allows")]
    TooMany,
}

/// The codings on a response body, in the order they were applied.
///
/// # Memory usage
/// Allocates only when the response lists a coding other than `identity` or a final
/// `chunked`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Codings {
    applied: Vec<Coding>,
    listed: usize,
}

impl Codings {
    /// The codings of a response with headers `h`: `Content-Encoding` then `Transfer-Encoding`
    /// (read this before hop-by-hop headers are stripped). At most `max` may be listed.
    ///
    /// # Errors
    /// See the module docs.
    pub fn of(h: &HeaderMap, max: usize) -> Result<Codings, CodingError> {
        let mut c = Codings::default();
        for name in list(h, &header::CONTENT_ENCODING) {
            c.push(name, max)?;
        }
        let mut chunked = false;
        for name in list(h, &header::TRANSFER_ENCODING) {
            if chunked {
                return Err(CodingError::Unsupported);
            }
            chunked = name.eq_ignore_ascii_case("chunked");
            if !chunked {
                c.push(name, max)?;
            }
        }
        Ok(c)
    }

    /// The codings in the order applied (decode from the last one).
    pub fn applied(&self) -> &[Coding] {
        &self.applied
    }

    /// True if the body is not encoded.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }

    fn push(&mut self, name: &str, max: usize) -> Result<(), CodingError> {
        self.listed += 1;
        if self.listed > max {
            return Err(CodingError::TooMany);
        }
        if let Some(c) = Coding::parse(name)? {
            self.applied.push(c);
        }
        Ok(())
    }
}

/// True when any `Content-Encoding` field of `h` names a coding other than `identity` (every
/// field counts: a first field of `identity` followed by `gzip` is a gzip body; a field that
/// is not ASCII counts as a coding). Empty elements name nothing.
pub fn is_coded(h: &HeaderMap) -> bool {
    list(h, &header::CONTENT_ENCODING).any(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
}

/// The trimmed elements of every field `name` (a field that is not ASCII is one element that
/// matches no coding).
fn list<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> impl Iterator<Item = &'a str> {
    h.get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("\u{fffd}").split(','))
        .map(|s| s.trim_matches([' ', '\t']))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::Coding::*;
    use super::*;

    #[test]
    fn any_field_naming_a_coding_makes_a_body_coded() {
        let coded = |fields: &[&str]| {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::CONTENT_ENCODING, HeaderValue::from_str(f).unwrap());
            }
            is_coded(&h)
        };
        assert!(!coded(&[]));
        assert!(!coded(&["identity"]));
        assert!(!coded(&["Identity", " identity ,"]));
        assert!(!coded(&[""]));
        assert!(coded(&["gzip"]));
        assert!(coded(&["identity", "gzip"]), "the second field counts");
        assert!(coded(&["identity, br"]));
        assert!(coded(&["x-unknown"]));
    }

    fn codings(fields: &[(&str, &str)], max: usize) -> Result<Vec<Coding>, CodingError> {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        Codings::of(&h, max).map(|c| c.applied().to_vec())
    }

    const CE: &str = "content-encoding";
    const TE: &str = "transfer-encoding";

    #[test]
    fn every_spelling_of_a_stack_is_the_same_stack() {
        for fields in [
            &[(CE, "gzip, br")][..],
            &[(CE, "gzip"), (CE, "br")],
            &[(CE, "GZIP ,, identity,\tBr")],
            &[(CE, "gzip"), (TE, "br, chunked")],
            &[(TE, "x-gzip"), (TE, "br"), (TE, "chunked")],
        ] {
            assert_eq!(codings(fields, 4), Ok(vec![Gzip, Brotli]), "{fields:?}");
        }
    }

    #[test]
    fn nothing_to_decode() {
        assert_eq!(codings(&[], 4), Ok(vec![]));
        assert_eq!(codings(&[(TE, "chunked")], 4), Ok(vec![]));
        assert_eq!(codings(&[(CE, "identity"), (CE, "")], 4), Ok(vec![]));
        assert!(Codings::default().is_empty());
    }

    #[test]
    fn what_cannot_be_decoded_is_refused() {
        for fields in [
            &[(CE, "compress")][..],
            &[(CE, "gzip;q=1")],
            &[(CE, "gzip"), (CE, "sk-real-value")],
            &[(TE, "chunked, gzip")],
            &[(TE, "chunked"), (TE, "chunked")],
            &[(TE, "gzip;x=1, chunked")],
        ] {
            assert_eq!(
                codings(fields, 4),
                Err(CodingError::Unsupported),
                "{fields:?}"
            );
        }
    }

    #[test]
    fn the_number_of_codings_is_bounded() {
        assert_eq!(codings(&[(CE, "gzip, gzip")], 2), Ok(vec![Gzip, Gzip]));
        assert_eq!(
            codings(&[(CE, "gzip"), (TE, "gzip, chunked")], 1),
            Err(CodingError::TooMany)
        );
        let many = vec!["identity"; 10_000].join(",");
        assert_eq!(codings(&[(CE, &many)], 4), Err(CodingError::TooMany));
    }
}
