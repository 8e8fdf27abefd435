//! Header and query-string substitution: whole values, `Authorization: Basic` decoded first.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, PROXY_AUTHORIZATION};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use zeroize::Zeroizing;

use super::{contains_token_prefix, substitute_slice, Denied, OnDisallowed, Report, TokenLookup};
use crate::secret::Location;
use crate::token::TOKEN_LEN;

/// Decodes Basic credentials with or without padding (clients differ); re-encoding is padded.
pub(super) const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Unseals tokens in every header value except `Host` (Location::Header), following the rules
/// of the module docs.
///
/// `Authorization` / `Proxy-Authorization: Basic <b64>` (scheme case-insensitive) is decoded,
/// substituted and re-encoded; each changed one adds `(b64 real, b64 sealed)` to
/// `report.basic_forms`. A Basic payload that is not base64 is treated like any other value.
/// Values without `osb_sealed_` are neither copied nor touched; substituted values are marked
/// sensitive (never indexed by HPACK). A substituted value that is not a valid header value
/// (the secret holds a control character) stays sealed.
///
/// # Errors
/// [`Denied`] for a disallowed token under [`OnDisallowed::Block`]; headers already processed
/// may have been changed (the request is refused anyway).
pub fn substitute_headers(
    headers: &mut HeaderMap,
    lookup: &dyn TokenLookup,
    mode: OnDisallowed,
    report: &mut Report,
) -> Result<(), Denied> {
    for (name, value) in headers.iter_mut() {
        if name == HOST {
            continue;
        }
        if let Some(new) = substitute_value(name, value.as_bytes(), lookup, mode, report)? {
            *value = new;
        }
    }
    Ok(())
}

/// One header value: `Some(new)` when it changed.
fn substitute_value(
    name: &HeaderName,
    raw: &[u8],
    lookup: &dyn TokenLookup,
    mode: OnDisallowed,
    report: &mut Report,
) -> Result<Option<HeaderValue>, Denied> {
    if name == AUTHORIZATION || name == PROXY_AUTHORIZATION {
        if let Some(basic) = Basic::parse(raw) {
            return basic.substitute(lookup, mode, report);
        }
    }
    substitute_plain(raw, lookup, mode, report)
}

fn substitute_plain(
    raw: &[u8],
    lookup: &dyn TokenLookup,
    mode: OnDisallowed,
    report: &mut Report,
) -> Result<Option<HeaderValue>, Denied> {
    // A value shorter than one whole token cannot hold one (most header values are).
    if raw.len() < TOKEN_LEN || !contains_token_prefix(raw) {
        return Ok(None);
    }
    let mark = report.unsealed_mark();
    let new = substitute_slice(raw, Location::Header, lookup, mode, report, verbatim)?;
    Ok(new.and_then(|buf| sensitive_value(buf, report, mark)))
}

/// The new header value, or `None` (and the `unsealed` entries since `mark` withdrawn) if the
/// bytes are not a valid header value.
fn sensitive_value(buf: Vec<u8>, report: &mut Report, mark: (usize, usize)) -> Option<HeaderValue> {
    match HeaderValue::from_maybe_shared(Bytes::from(buf)) {
        Ok(mut value) => {
            value.set_sensitive(true);
            Some(value)
        }
        Err(_) => {
            report.rollback_unsealed(mark);
            None
        }
    }
}

fn verbatim(value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(value);
}

/// Unsealed Basic credentials (`user:password`) longer than this are refused (the request
/// counts as over its budget, [`Report::over_budget`]): their base64 form is scrubbed from the
/// response by an automaton built for the request, whose cost a sandbox must not be able to
/// inflate with a large secret. Real Basic credentials are far shorter.
pub const MAX_BASIC_CREDENTIALS: usize = 4096;

/// Distinct unsealed Basic credentials one request may carry; one more and the request counts
/// as over its budget (refused, nothing sent). Each is searched for in the whole answer
/// ([`super::scrubber::Scrubber::extras`]: one linear pass per form), and their user names are
/// the sandbox's to vary. A real request has one `Authorization` and perhaps a
/// `Proxy-Authorization` for a proxy beyond the origin.
pub const MAX_BASIC_FORMS: usize = 4;

/// A decoded `Basic` credentials header: `scheme_and_space` is kept verbatim.
struct Basic<'a> {
    scheme_and_space: &'a [u8],
    encoded: &'a [u8],
    decoded: Zeroizing<Vec<u8>>,
}

impl<'a> Basic<'a> {
    /// `Basic <b64>` with any case of `basic`; `None` for other schemes or bad base64.
    fn parse(raw: &'a [u8]) -> Option<Self> {
        let space = memchr::memchr(b' ', raw)?;
        if !raw[..space].eq_ignore_ascii_case(b"basic") {
            return None;
        }
        let start = space + raw[space..].iter().take_while(|b| **b == b' ').count();
        let encoded = raw[start..].trim_ascii_end();
        let decoded = Zeroizing::new(LENIENT.decode(encoded).ok()?);
        Some(Basic {
            scheme_and_space: &raw[..start],
            encoded,
            decoded,
        })
    }

    fn substitute(
        self,
        lookup: &dyn TokenLookup,
        mode: OnDisallowed,
        report: &mut Report,
    ) -> Result<Option<HeaderValue>, Denied> {
        if !contains_token_prefix(&self.decoded) {
            return Ok(None);
        }
        let mark = report.unsealed_mark();
        let Some(real) = substitute_slice(
            &self.decoded,
            Location::Header,
            lookup,
            mode,
            report,
            verbatim,
        )?
        else {
            return Ok(None);
        };
        let real = Zeroizing::new(real);
        if real.len() > MAX_BASIC_CREDENTIALS {
            // Its base64 form must be scrubbed from the response too, compiled per request.
            report.rollback_unsealed(mark);
            report.over_budget = true;
            return Ok(None);
        }
        let real_b64 = STANDARD.encode(&*real);
        if !report.may_note_basic_form(real_b64.as_bytes()) {
            report.rollback_unsealed(mark);
            report.over_budget = true;
            return Ok(None);
        }
        let mut buf = Vec::with_capacity(self.scheme_and_space.len() + real_b64.len());
        buf.extend_from_slice(self.scheme_and_space);
        buf.extend_from_slice(real_b64.as_bytes());
        let value = sensitive_value(buf, report, mark);
        if value.is_some() {
            report.note_basic_form(Bytes::from(real_b64), Bytes::copy_from_slice(self.encoded));
        }
        Ok(value)
    }
}

/// Unseals tokens in the query string of `uri` (Location::Query only): each value is
/// percent-encoded, keeping only RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
/// `Ok(None)` means unchanged. The path is never touched.
///
/// # Errors
/// [`Denied`] for a disallowed token under [`OnDisallowed::Block`].
pub fn substitute_query(
    uri: &Uri,
    lookup: &dyn TokenLookup,
    mode: OnDisallowed,
    report: &mut Report,
) -> Result<Option<Uri>, Denied> {
    let Some(query) = uri.query().filter(|q| contains_token_prefix(q.as_bytes())) else {
        return Ok(None);
    };
    let mark = report.unsealed_mark();
    let new = substitute_slice(
        query.as_bytes(),
        Location::Query,
        lookup,
        mode,
        report,
        percent_encode,
    )?;
    let Some(new) = new else {
        return Ok(None);
    };
    let uri = with_query(uri, &new);
    if uri.is_none() {
        report.rollback_unsealed(mark);
    }
    Ok(uri)
}

/// `uri` with its query replaced (`query` is percent-encoded, so this does not fail in
/// practice; `None` keeps the original).
fn with_query(uri: &Uri, query: &[u8]) -> Option<Uri> {
    let path = uri.path().as_bytes();
    let mut pq = Vec::with_capacity(path.len() + 1 + query.len());
    pq.extend_from_slice(path);
    pq.push(b'?');
    pq.extend_from_slice(query);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::from_maybe_shared(Bytes::from(pq)).ok()?);
    Uri::from_parts(parts).ok()
}

fn percent_encode(value: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::subst::testutil::{fixture, tok, Fixture};

    fn run(f: &Fixture, headers: &mut HeaderMap, mode: OnDisallowed) -> Result<Report, Denied> {
        let mut report = Report::default();
        substitute_headers(headers, f, mode, &mut report)?;
        Ok(report)
    }

    fn map(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_pass))
    }

    #[test]
    fn header_values_are_unsealed_and_marked_sensitive() {
        let f = fixture();
        let mut h = map(&[
            ("x-api-key", f.allowed.to_string()),
            ("x-other", format!("a={} b={}", f.header_only, tok(0x42))),
            ("accept", "text/plain".into()),
        ]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["x-api-key"], "sk-live-ALLOWED");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(
            h["x-other"],
            format!("a=hdr:secret b={}", tok(0x42)).as_str()
        );
        assert!(!h["accept"].is_sensitive());
        assert_eq!(
            r.unsealed,
            vec![Arc::from("ALLOWED"), Arc::from("HEADER_ONLY")]
        );
    }

    #[test]
    fn host_is_never_substituted() {
        let f = fixture();
        let mut h = map(&[("host", f.allowed.to_string())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["host"], f.allowed.as_str());
        assert!(r.is_empty());
    }

    #[test]
    fn repeated_header_values_are_each_substituted() {
        let f = fixture();
        let mut h = map(&[
            ("x-k", f.allowed.to_string()),
            ("x-k", f.header_only.to_string()),
        ]);
        run(&f, &mut h, OnDisallowed::Block).unwrap();
        let all: Vec<_> = h.get_all("x-k").iter().collect();
        assert_eq!(all, ["sk-live-ALLOWED", "hdr:secret"]);
    }

    #[test]
    fn body_only_token_in_a_header_travels_sealed() {
        let f = fixture();
        let mut h = map(&[("x-k", f.body_only.to_string())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["x-k"], f.body_only.as_str());
        assert!(r.is_empty());
    }

    #[test]
    fn block_vs_forward_sealed() {
        let f = fixture();
        let mut h = map(&[("x-k", f.denied.to_string())]);
        let d = run(&f, &mut h, OnDisallowed::Block).unwrap_err();
        assert_eq!((&*d.secret, d.location), ("DENIED", Location::Header));
        assert_eq!(d.to_string(), "secret DENIED may not be sent to this host");
        let r = run(&f, &mut h, OnDisallowed::ForwardSealed).unwrap();
        assert_eq!(h["x-k"], f.denied.as_str());
        assert_eq!(r.refused, vec![Arc::from("DENIED")]);
    }

    #[test]
    fn value_containing_a_token_is_not_substituted_again() {
        let f = fixture();
        let mut h = map(&[("x-k", f.nested.to_string())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["x-k"], format!("pre{}post", f.allowed).as_str());
        assert_eq!(r.unsealed, vec![Arc::from("NESTED")]);
    }

    #[test]
    fn basic_auth_token_in_password() {
        let f = fixture();
        let sealed = basic(&format!("user:{}", f.allowed));
        let mut h = map(&[("authorization", sealed.clone())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        let real = basic("user:sk-live-ALLOWED");
        assert_eq!(h["authorization"], real.as_str());
        assert!(h["authorization"].is_sensitive());
        assert_eq!(r.unsealed, vec![Arc::from("ALLOWED")]);
        assert_eq!(r.basic_forms.len(), 1);
        assert_eq!(r.basic_forms[0].0, &real.as_bytes()["Basic ".len()..]);
        assert_eq!(r.basic_forms[0].1, &sealed.as_bytes()["Basic ".len()..]);
    }

    #[test]
    fn basic_credentials_over_4_kib_stay_sealed_and_the_request_is_over_budget() {
        let f = fixture();
        let tokens = f.allowed.to_string().repeat(300); // 4,505 bytes once unsealed
        let sealed = basic(&format!("user:{tokens}"));
        let mut h = map(&[("authorization", sealed.clone())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["authorization"], sealed.as_str(), "left sealed");
        assert!(r.over_budget && r.unsealed.is_empty() && r.basic_forms.is_empty());
        let fits = basic(&format!("user:{}", f.allowed.to_string().repeat(200)));
        let mut h = map(&[("authorization", fits)]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert!(!r.over_budget && r.basic_forms.len() == 1);
    }

    #[test]
    fn a_request_carries_at_most_four_distinct_basic_credentials() {
        let f = fixture();
        let header = |user: &str| ("authorization", basic(&format!("{user}:{}", f.allowed)));
        let same: Vec<_> = (0..6).map(|_| header("u")).collect();
        let r = run(&f, &mut map(&same), OnDisallowed::Block).unwrap();
        assert!(
            !r.over_budget && r.basic_forms.len() == 1,
            "one form, six times"
        );
        let four: Vec<_> = (0..4).map(|i| header(&format!("u{i}"))).collect();
        let r = run(&f, &mut map(&four), OnDisallowed::Block).unwrap();
        assert!(!r.over_budget && r.basic_forms.len() == MAX_BASIC_FORMS);
        let five: Vec<_> = (0..5).map(|i| header(&format!("u{i}"))).collect();
        let mut h = map(&five);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert!(r.over_budget && r.basic_forms.len() == MAX_BASIC_FORMS);
        let last = h.get_all("authorization").iter().next_back().unwrap();
        assert_eq!(last, five[4].1.as_str(), "the fifth stays sealed");
    }

    #[test]
    fn basic_auth_token_in_user_lowercase_scheme_proxy_authorization() {
        let f = fixture();
        let sealed = STANDARD.encode(format!("{}:pw", f.header_only));
        let mut h = map(&[("proxy-authorization", format!("basic  {sealed}"))]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        let real = STANDARD.encode("hdr:secret:pw");
        assert_eq!(h["proxy-authorization"], format!("basic  {real}").as_str());
        assert_eq!(r.basic_forms[0].1, sealed.as_bytes());
    }

    #[test]
    fn basic_auth_without_padding_is_decoded() {
        let f = fixture();
        let sealed = STANDARD.encode(format!("u:{}", f.allowed));
        let unpadded = sealed.trim_end_matches('=');
        let mut h = map(&[("authorization", format!("BASIC {unpadded}"))]);
        run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(
            h["authorization"],
            format!("BASIC {}", STANDARD.encode("u:sk-live-ALLOWED")).as_str()
        );
    }

    #[test]
    fn non_base64_basic_header_is_left_alone() {
        let f = fixture();
        let mut h = map(&[("authorization", "Basic !!not-base64!!".into())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["authorization"], "Basic !!not-base64!!");
        assert!(r.is_empty());
    }

    #[test]
    fn bearer_and_raw_tokens_in_authorization_are_plain_values() {
        let f = fixture();
        let mut h = map(&[("authorization", format!("Bearer {}", f.allowed))]);
        run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["authorization"], "Bearer sk-live-ALLOWED");
        let mut h = map(&[("authorization", format!("Basic {}", f.allowed))]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["authorization"], "Basic sk-live-ALLOWED");
        assert!(r.basic_forms.is_empty());
    }

    #[test]
    fn basic_auth_with_unknown_token_is_untouched() {
        let f = fixture();
        let v = basic(&format!("u:{}", tok(0x99)));
        let mut h = map(&[("authorization", v.clone())]);
        let r = run(&f, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["authorization"], v.as_str());
        assert!(r.is_empty());
    }

    #[test]
    fn basic_auth_disallowed_is_denied() {
        let f = fixture();
        let mut h = map(&[("authorization", basic(&format!("u:{}", f.denied)))]);
        assert!(run(&f, &mut h, OnDisallowed::Block).is_err());
    }

    #[test]
    fn value_that_is_not_a_header_value_stays_sealed() {
        // A secret holding a control character cannot be sent in a header.
        let bad = crate::subst::testutil::with_allowed_value(b"bad\x01value");
        let mut h = map(&[("x-k", bad.allowed.to_string())]);
        let r = run(&bad, &mut h, OnDisallowed::Block).unwrap();
        assert_eq!(h["x-k"], bad.allowed.as_str());
        assert!(r.unsealed.is_empty());
    }

    fn query(f: &Fixture, uri: &str, mode: OnDisallowed) -> Result<(Option<Uri>, Report), Denied> {
        let mut report = Report::default();
        let out = substitute_query(&uri.parse().unwrap(), f, mode, &mut report)?;
        Ok((out, report))
    }

    #[test]
    fn query_values_are_percent_encoded() {
        let f = fixture();
        let uri = format!("https://h.test/p/{0}?k={0}&x=1", f.query_only);
        let (out, r) = query(&f, &uri, OnDisallowed::Block).unwrap();
        let expected = format!(
            "https://h.test/p/{}?k=a%20b%26c%3Dd%2F~._-%C3%A9&x=1",
            f.query_only
        );
        assert_eq!(out.unwrap().to_string(), expected);
        assert_eq!(r.unsealed, vec![Arc::from("QUERY_ONLY")]);
    }

    #[test]
    fn query_only_unseals_query_secrets() {
        let f = fixture();
        let uri = format!("/p?a={}&b={}", f.allowed, f.nested);
        let (out, r) = query(&f, &uri, OnDisallowed::Block).unwrap();
        let expected = format!("/p?a={}&b=pre{}post", f.allowed, f.allowed);
        assert_eq!(out.unwrap().to_string(), expected);
        assert_eq!(r.unsealed, vec![Arc::from("NESTED")]);
    }

    #[test]
    fn query_unchanged_is_none() {
        let f = fixture();
        assert!(query(&f, "/p?a=1", OnDisallowed::Block)
            .unwrap()
            .0
            .is_none());
        assert!(query(&f, "/p", OnDisallowed::Block).unwrap().0.is_none());
        let uri = format!("/p?a={}", tok(0x77));
        assert!(query(&f, &uri, OnDisallowed::Block).unwrap().0.is_none());
    }

    #[test]
    fn query_block_vs_forward_sealed() {
        let f = fixture();
        let uri = format!("/p?a={}", f.denied);
        let d = query(&f, &uri, OnDisallowed::Block).unwrap_err();
        assert_eq!(d.location, Location::Query);
        let (out, r) = query(&f, &uri, OnDisallowed::ForwardSealed).unwrap();
        assert!(out.is_none());
        assert_eq!(r.refused, vec![Arc::from("DENIED")]);
    }
}
