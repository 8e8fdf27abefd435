//! Which bodies count their own bytes, by their headers.
//!
//! A real value replaced by its 43-byte token inside such a body (or a token by its value)
//! would make every enclosing length wrong — the 5-byte gRPC message prefix, a protobuf field's
//! varint, a msgpack string header — so the receiver would misparse or hang. In these bodies:
//! - responses are scrubbed at the same length ([`super::ScrubStream::same_length`]), and gRPC
//!   messages are read one by one ([`super::MessageFrames`]);
//! - request tokens are never unsealed ([`super::SealedOnly`]): they travel sealed.

use http::{HeaderMap, HeaderName};

/// How a body carries its own lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// Length-prefixed messages (`application/grpc`, `application/grpc+proto`,
    /// `application/grpc-web`, `application/grpc-web+proto`, `application/connect+proto`, …,
    /// or any body whose headers name a gRPC or Connect message coding): compressed messages
    /// decoded ([`super::MessageFrames`]), then scrubbed at the same length.
    Framed,
    /// The same messages, base64-encoded (`application/grpc-web-text`): a value inside cannot
    /// be recognised, so such a response is refused where responses are scrubbed.
    Base64Framed,
    /// Formats with length fields of their own (protobuf, msgpack, CBOR): scrubbed at the same
    /// length.
    Lengths,
}

/// Media types by their part before any `+suffix`: `(type, kind, a suffix is required)`.
const TYPES: &[(&str, Binary, bool)] = &[
    ("application/grpc-web-text", Binary::Base64Framed, false),
    ("application/grpc", Binary::Framed, false),
    ("application/grpc-web", Binary::Framed, false),
    // `application/connect` alone is not a type; `application/connect+json` is.
    ("application/connect", Binary::Framed, true),
    ("application/proto", Binary::Lengths, false),
    ("application/protobuf", Binary::Lengths, false),
    ("application/x-protobuf", Binary::Lengths, false),
    ("application/x-google-protobuf", Binary::Lengths, false),
    ("application/vnd.google.protobuf", Binary::Lengths, false),
    ("application/msgpack", Binary::Lengths, false),
    ("application/x-msgpack", Binary::Lengths, false),
    ("application/vnd.msgpack", Binary::Lengths, false),
    ("application/cbor", Binary::Lengths, false),
];

/// Fields by which a `POST` asks to be served as another method (Google's JSON APIs honour
/// `X-HTTP-Method-Override`): no gRPC or Connect client sends them, and a `POST` carrying one
/// can read a stored object back (the last re-check, from GCS's documentation).
/// Names, not strings: a `&str` name is parsed and hashed on every lookup.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Headers naming how gRPC (and gRPC-Web) or Connect messages are compressed.
pub(super) const MESSAGE_CODINGS: [HeaderName; 2] = [
    HeaderName::from_static("grpc-encoding"),
    HeaderName::from_static("connect-content-encoding"),
];

impl Binary {
    /// The kind of the body with headers `h`, or `None` for every other body (text, JSON,
    /// octet streams: scrubbed and unsealed as usual). The first `Content-Type` decides,
    /// except that a body whose headers name a message coding other than `identity` is read
    /// as messages whatever its type says (unless base64): a client may decode messages by
    /// that coding alone.
    ///
    /// # Cost
    /// No allocation: a few case-insensitive comparisons.
    pub fn of(h: &HeaderMap) -> Option<Binary> {
        let by_type = h
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| of_type(v.as_bytes()));
        if by_type != Some(Binary::Base64Framed) && names_a_message_coding(h) {
            return Some(Binary::Framed);
        }
        by_type
    }
}

impl Binary {
    /// True if a request with headers `h` is gRPC, gRPC-Web or Connect-streaming messages by
    /// its `Content-Type` (the caller checks it is a `POST` too): only answers to such requests
    /// are read as messages. Every gRPC client sends one of these types; a message coding
    /// alone does not count here.
    ///
    /// # Cost
    /// One lookup of a standard field (this runs on every request).
    pub fn asks_for_messages(h: &HeaderMap) -> bool {
        let typed = h
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| of_type(v.as_bytes()))
            .is_some_and(|k| k != Binary::Lengths);
        typed && !METHOD_OVERRIDES.iter().any(|n| h.contains_key(n))
    }
}

/// A `Content-Type` value without its parameters or surrounding whitespace (`type/subtype`).
pub(super) fn essence(ct: &[u8]) -> &[u8] {
    ct.split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

fn of_type(ct: &[u8]) -> Option<Binary> {
    let essence = essence(ct);
    let (family, suffixed) = match essence.iter().position(|&b| b == b'+') {
        Some(at) => (&essence[..at], true),
        None => (essence, false),
    };
    TYPES
        .iter()
        .find(|(name, _, needs_suffix)| {
            family.eq_ignore_ascii_case(name.as_bytes()) && (suffixed || !needs_suffix)
        })
        .map(|(_, kind, _)| *kind)
}

fn names_a_message_coding(h: &HeaderMap) -> bool {
    MESSAGE_CODINGS
        .iter()
        .flat_map(|n| h.get_all(n))
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_ask_for_messages_by_their_type_alone() {
        let asks = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            Binary::asks_for_messages(&h)
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web+json",
        ] {
            assert!(asks(ct), "{ct}");
        }
        assert!(asks("application/connect+proto") && asks("application/grpc-web-text"));
        for ct in [
            "application/json",
            "application/proto",
            "application/octet-stream",
        ] {
            assert!(!asks(ct), "{ct}");
        }
        let mut h = HeaderMap::new();
        h.insert("grpc-encoding", "gzip".parse().unwrap());
        assert!(
            !Binary::asks_for_messages(&h),
            "a coding alone is not a type"
        );
        h.insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        assert!(Binary::asks_for_messages(&h));
        h.insert("x-http-method-override", "GET".parse().unwrap());
        assert!(!Binary::asks_for_messages(&h), "a POST served as a GET");
    }

    fn kind(fields: &[(&str, &str)]) -> Option<Binary> {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Binary::of(&h)
    }

    #[test]
    fn content_types_are_classified_by_their_essence() {
        let ct = |t: &str| kind(&[("content-type", t)]);
        assert_eq!(ct("application/grpc"), Some(Binary::Framed));
        assert_eq!(
            ct("Application/GRPC+proto; charset=x"),
            Some(Binary::Framed)
        );
        assert_eq!(ct(" application/grpc ;x=1"), Some(Binary::Framed));
        assert_eq!(ct("application/grpc-web+proto"), Some(Binary::Framed));
        assert_eq!(ct("application/connect+json"), Some(Binary::Framed));
        assert_eq!(ct("application/connect"), None);
        assert_eq!(
            ct("application/grpc-web-text+proto"),
            Some(Binary::Base64Framed)
        );
        assert_eq!(ct("application/x-protobuf"), Some(Binary::Lengths));
        assert_eq!(ct("application/proto"), Some(Binary::Lengths));
        assert_eq!(ct("application/msgpack"), Some(Binary::Lengths));
        assert_eq!(ct("application/json"), None);
        assert_eq!(ct("application/grpcx"), None);
        assert_eq!(ct("text/plain"), None);
        assert_eq!(kind(&[]), None);
    }

    #[test]
    fn a_named_message_coding_makes_any_body_framed() {
        let plain = ("content-type", "text/plain");
        assert_eq!(
            kind(&[plain, ("grpc-encoding", "gzip")]),
            Some(Binary::Framed)
        );
        assert_eq!(
            kind(&[("connect-content-encoding", "snappy")]),
            Some(Binary::Framed)
        );
        assert_eq!(kind(&[plain, ("grpc-encoding", " Identity ")]), None);
        let second = [("grpc-encoding", "identity"), ("grpc-encoding", "gzip")];
        assert_eq!(kind(&second), Some(Binary::Framed));
        let typed = [
            ("content-type", "application/x-protobuf"),
            ("grpc-encoding", "gzip"),
        ];
        assert_eq!(kind(&typed), Some(Binary::Framed));
        let text = [
            ("content-type", "application/grpc-web-text"),
            ("grpc-encoding", "gzip"),
        ];
        assert_eq!(kind(&text), Some(Binary::Base64Framed));
    }
}
