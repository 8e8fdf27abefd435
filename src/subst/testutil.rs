//! Test fixtures shared by the substitution tests: a map lookup with one secret per rule.

use std::collections::HashMap;
use std::sync::Arc;

use super::{SecretRef, TokenLookup};
use crate::secret::{Location, Locations, SecretValue};
use crate::token::Token;

/// A deterministic well-formed token.
pub(crate) fn tok(n: u8) -> Token {
    let mixed = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    let s = format!("osb_sealed_{mixed:032x}");
    Token::parse(s.as_bytes()).expect("well-formed")
}

/// One secret per rule of the module table, keyed by its token.
pub(crate) struct Fixture {
    map: HashMap<Token, SecretRef>,
    /// header + body, allowed.
    pub allowed: Token,
    /// body only, allowed.
    pub body_only: Token,
    /// header only, allowed.
    pub header_only: Token,
    /// query only, allowed; the value needs percent-encoding.
    pub query_only: Token,
    /// header + body, not allowed for the destination.
    pub denied: Token,
    /// everywhere, allowed; the value contains the `allowed` token.
    pub nested: Token,
    /// header + body, allowed, empty value.
    pub empty: Token,
}

impl Fixture {
    pub(crate) fn tokens(&self) -> [Token; 7] {
        [
            self.allowed,
            self.body_only,
            self.header_only,
            self.query_only,
            self.denied,
            self.nested,
            self.empty,
        ]
    }
}

impl TokenLookup for Fixture {
    fn get(&self, token: &Token) -> Option<&SecretRef> {
        self.map.get(token)
    }
}

/// Lets `Arc<Fixture>` stand where `Arc<dyn TokenLookup>` is expected.
pub(crate) fn as_dyn(f: &Arc<Fixture>) -> Arc<dyn TokenLookup> {
    f.clone()
}

fn secret(name: &str, value: &[u8], locs: &[Location], allowed: bool) -> SecretRef {
    SecretRef {
        name: Arc::from(name),
        value: SecretValue::new(value.to_vec()),
        locations: Locations::from_slice(locs),
        allowed,
    }
}

/// The standard fixture with the `allowed` secret's value replaced by `value`.
pub(crate) fn with_allowed_value(value: &[u8]) -> Fixture {
    let mut f = Arc::into_inner(fixture()).expect("fresh fixture");
    let entry = secret("ALLOWED", value, &[Location::Header, Location::Body], true);
    f.map.insert(f.allowed, entry);
    f
}

/// The standard fixture.
pub(crate) fn fixture() -> Arc<Fixture> {
    use Location::{Body, Header, Query};
    let f = Fixture {
        map: HashMap::new(),
        allowed: tok(1),
        body_only: tok(2),
        header_only: tok(3),
        query_only: tok(4),
        denied: tok(5),
        nested: tok(6),
        empty: tok(7),
    };
    let nested_value = format!("pre{}post", f.allowed);
    let entries = [
        (
            f.allowed,
            secret("ALLOWED", b"sk-live-ALLOWED", &[Header, Body], true),
        ),
        (
            f.body_only,
            secret("BODY_ONLY", b"body-secret", &[Body], true),
        ),
        (
            f.header_only,
            secret("HEADER_ONLY", b"hdr:secret", &[Header], true),
        ),
        (
            f.query_only,
            secret("QUERY_ONLY", b"a b&c=d/~._-\xc3\xa9", &[Query], true),
        ),
        (
            f.denied,
            secret("DENIED", b"denied-value", &[Header, Body, Query], false),
        ),
        (
            f.nested,
            secret(
                "NESTED",
                nested_value.as_bytes(),
                &[Header, Body, Query],
                true,
            ),
        ),
        (f.empty, secret("EMPTY", b"", &[Header, Body], true)),
    ];
    let mut f = f;
    f.map.extend(entries);
    Arc::new(f)
}

/// `data` gzip-compressed.
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` zlib-compressed (HTTP's and gRPC's `deflate`).
pub(crate) fn zlib(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One gRPC message: `flags`, the big-endian length, `body`.
pub(crate) fn grpc_message(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![flags];
    m.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    m.extend_from_slice(body);
    m
}
