//! The forms a real value takes when it comes back transformed in a common, reversible way:
//! what the response scrubber looks for besides the value itself.
//!
//! An upstream that echoes rarely echoes raw bytes. It reflects a URL (percent-encoded, as
//! sealgate's own query substitution wrote it), a form field, a JSON string, or something
//! base64-encoded (an `Authorization: Basic` header it stored, a blob holding the value). Each
//! form below is as reversible as the value itself, so each is scrubbed:
//!
//! | form | written by | replaced with |
//! |---|---|---|
//! | percent-encoding, RFC 3986 unreserved kept, upper- or lowercase hex | sealgate's query substitution, most URL builders | the token |
//! | `application/x-www-form-urlencoded` (space as `+`, `*` kept) | HTML forms, Java's `URLEncoder`, sealgate's form bodies | the token |
//! | the same keeping `~` and not `*` / keeping neither | Python's `urlencode`, Go's `url.QueryEscape` / PHP's `urlencode` | the token |
//! | sealgate's query and form encodings (and Python's/Go's), percent-encoded again (`%2F` as `%252F`; also by encoders that escape `~`), and the query form a third time; values up to 256 bytes | a URL reflected inside another (a login redirect's `next=`, an OAuth `redirect_uri` carrying one) | the token |
//! | `encodeURIComponent` (`!'()*` kept) | browsers, Node | the token |
//! | percent-encoding keeping `/` | Python's `urllib.parse.quote` (its default) | the token |
//! | percent-encoding keeping `$&+:=@` | Go's `url.PathEscape` | the token |
//! | percent-encoding keeping every URI delimiter but `%` | JavaScript's `encodeURI` | the token |
//! | JSON string escaping: minimal (`\"`, `\\`), `\/` with `\uXXXX` (PHP), `\uXXXX` (Python), `\u003c` for `<>&` (Go), the same and `\u003d`/`\u0027` for `='` (Gson), uppercase `\u0022`/`\u002B` for `"'+<>&` and `` ` `` with non-ASCII escaped (.NET's System.Text.Json), and each of them escaped again minimally (a JSON body echoed inside JSON) | every JSON API | the token |
//! | HTML escaping of `&<>"'`, with `&#x27;` (Python's `html.escape`), `&#39;` with `&quot;` (Ruby's `CGI.escapeHTML`), `&apos;` (XML), only `&<>` (text escapers), `&#x3D;`/`&#x60;` and `&#x2F;` (Handlebars, mustache.js), `&#034;`/`&#039;` (JSTL), `&quot;` alone (commons-text), `&#39;`/`&#34;` (Go's `html.EscapeString`), `&#039;` (PHP's `htmlspecialchars`), `+` as `&#43;` (Go's `html/template`), or `&#x27;`, `&#x2B;` and non-ASCII as `&#xXXXX;` (.NET's `HtmlEncoder`, Razor) | error pages, templates | the token |
//! | base64 (standard and URL-safe alphabet) at each of the three byte alignments, of the value and of its query form | Basic auth, tokens and blobs holding the value, session cookies holding a URL | the token's base64 at the same alignment |
//!
//! # Base64 at any alignment
//!
//! A value inside base64-encoded data starts at some byte offset; only the offset mod 3
//! changes its encoding. For each of the three, the characters that depend on the value's
//! bytes alone (not on the bytes around it) are the same wherever it appears, so they are a
//! pattern like any other. What stays is at most one character at each end, which holds
//! four bits of the value at most. A core shorter than [`MIN_BASE64_CORE`] is not used: it
//! would match unrelated base64 (images, keys) too often.
//!
//! Only forms that differ from the value are returned, and none for a value longer than
//! [`MAX_FORMS_VALUE_LEN`]. Every form is a [`SecretValue`]
//! (zeroized on drop) and is built in a buffer sized before writing, so no reallocation leaves
//! a copy behind.

use base64::alphabet::{Alphabet, STANDARD, URL_SAFE};
use base64::engine::general_purpose::NO_PAD;
use base64::engine::GeneralPurpose;
use base64::Engine as _;
use bytes::Bytes;
use zeroize::Zeroizing;

use crate::secret::SecretValue;

/// The shortest base64 core scrubbed (characters): a value of 16 bytes or more (the length
/// under which the admin API warns) has all three. 20 characters are 120 bits of the value:
/// unrelated base64 matches one only if the value itself is that guessable. (It was 24, and
/// an outside review had a stored Basic header of a 16-byte key come back in clear.)
pub const MIN_BASE64_CORE: usize = 20;

/// Values longer than this get no transformed forms (the value itself is still scrubbed): the
/// forms are up to three times a value's length each, and every sandbox holding the secret
/// keeps them in its scrubber.
pub const MAX_FORMS_VALUE_LEN: usize = 4 * 1024;

/// Every transformed form of `value` (see the module docs) paired with what replaces it, the
/// value itself excluded: `(form, replacement)`. `token` is the value's sealed token.
pub fn echo_forms(value: &SecretValue, token: &[u8]) -> Vec<(SecretValue, Bytes)> {
    let v = value.expose();
    let mut forms: Vec<(SecretValue, Bytes)> = Vec::new();
    if v.len() > MAX_FORMS_VALUE_LEN {
        return forms;
    }
    let mut add = |form: Zeroizing<Vec<u8>>, with: Bytes| {
        if form.as_slice() != v && !forms.iter().any(|(f, _)| f.expose() == form.as_slice()) {
            forms.push((SecretValue::new(form.to_vec()), with));
        }
    };
    let token_bytes = Bytes::copy_from_slice(token);
    for style in PercentStyle::ALL {
        add(percent(v, style), token_bytes.clone());
    }
    // A URL sealgate wrote (or a form body), reflected inside another URL — a login redirect's
    // `next=`, an OAuth `return_to` — is percent-encoded again: `%2F` becomes `%252F`, and the
    // runs between are the value in clear (outside pass: Django's `redirect_to_login`).
    // Up to three levels for sealgate's own query form (an OAuth redirect_uri carrying a
    // `next=`: outside re-check); the outer encoders that also escape `~` (URLSearchParams,
    // PHP's and Java's) count too.
    if v.len() <= MAX_URL_FORMS_VALUE_LEN {
        for inner in TWICE_INNER {
            let once = percent(v, inner);
            if once.as_slice() == v {
                continue;
            }
            for outer in [PercentStyle::Unreserved, PercentStyle::FormPhp] {
                let twice = percent(&once, outer);
                if matches!(
                    (inner, outer),
                    (PercentStyle::Unreserved, PercentStyle::Unreserved)
                ) {
                    add(percent(&twice, outer), token_bytes.clone());
                }
                add(twice, token_bytes.clone());
            }
        }
    }
    for style in JsonStyle::ALL {
        if let Some(form) = json(v, style) {
            add(form, token_bytes.clone());
        }
    }
    // A JSON body echoed inside a JSON answer (httpbin's `data`): escaped, then escaped
    // again by the outer encoder.
    for style in JsonStyle::ALL {
        if let Some(twice) = json(v, style).and_then(|once| json(&once, JsonStyle::MINIMAL)) {
            add(twice, token_bytes.clone());
        }
    }
    for style in HtmlStyle::ALL {
        add(html(v, style), token_bytes.clone());
    }
    // Base64 of the value, and of the URL form sealgate writes into queries (a session cookie
    // holding the request's URL: outside pass).
    let query_form = percent(v, PercentStyle::Unreserved);
    let url_form = query_form.as_slice() != v && v.len() <= MAX_URL_FORMS_VALUE_LEN;
    let sources: &[&[u8]] = if !url_form {
        &[v]
    } else {
        &[v, query_form.as_slice()]
    };
    for source in sources {
        for alphabet in [&STANDARD, &URL_SAFE] {
            for offset in 0..3 {
                let core = base64_core(source, offset, alphabet);
                if core.len() >= MIN_BASE64_CORE {
                    let with = base64_core(token, offset, alphabet);
                    add(core, Bytes::from(with.to_vec()));
                }
            }
        }
    }
    forms
}

/// The forms whose percent-encoding again is scrubbed: what sealgate writes into queries and
/// form bodies, and what the common form encoders write.
const TWICE_INNER: [PercentStyle; 3] = [
    PercentStyle::Unreserved,
    PercentStyle::Form,
    PercentStyle::FormUnreserved,
];

/// Values longer than this get no URL-in-URL forms (percent-encoded again, base64 of the query
/// form): keys and passwords travel in URLs, certificates and service-account files do not,
/// and each form is kept per sandbox (a review: a 4 KiB value's header-name automaton doubled).
pub const MAX_URL_FORMS_VALUE_LEN: usize = 256;

/// `value` as a form field writes it (`application/x-www-form-urlencoded`, space as `+`): what
/// replaces a token in a form body, so the upstream decodes the value and not something else.
pub fn form_field(value: &SecretValue) -> SecretValue {
    SecretValue::new(percent(value.expose(), PercentStyle::Form).to_vec())
}

/// `value` escaped for the inside of a JSON string (`\"`, `\\`, control characters as
/// `\u00XX`, everything else as it is): what replaces a token in a JSON body.
pub fn json_string(value: &SecretValue) -> SecretValue {
    let escaped =
        json(value.expose(), JsonStyle::MINIMAL).expect("the minimal style takes any bytes");
    SecretValue::new(escaped.to_vec())
}

/// Which characters a percent-encoding keeps and how it writes the rest.
#[derive(Clone, Copy)]
enum PercentStyle {
    /// RFC 3986 unreserved kept, uppercase hex (sealgate's query substitution).
    Unreserved,
    /// The same with lowercase hex.
    UnreservedLower,
    /// `application/x-www-form-urlencoded`: alphanumerics and `*-._` kept, space as `+`
    /// (WHATWG, Java's `URLEncoder`, sealgate's form bodies).
    Form,
    /// The same as Python's `urlencode`/`quote_plus` and Go's `url.QueryEscape`/`Values.Encode`
    /// write it: unreserved kept (`~` too, `*` not), space as `+`.
    FormUnreserved,
    /// PHP's `urlencode`: alphanumerics and `-._` kept, space as `+`.
    FormPhp,
    /// JavaScript's `encodeURIComponent`: unreserved and `!'()*` kept.
    UriComponent,
    /// Python's `urllib.parse.quote` with its default `safe="/"`: unreserved and `/` kept.
    PythonQuote,
    /// Go's `url.PathEscape`: unreserved and `$&+:=@` kept.
    GoPathSegment,
    /// JavaScript's `encodeURI`: unreserved, `!'()*` and the URI delimiters `;,/?:@&=+$#` kept.
    Uri,
}

impl PercentStyle {
    const ALL: [PercentStyle; 9] = [
        PercentStyle::Unreserved,
        PercentStyle::UnreservedLower,
        PercentStyle::Form,
        PercentStyle::FormUnreserved,
        PercentStyle::FormPhp,
        PercentStyle::UriComponent,
        PercentStyle::PythonQuote,
        PercentStyle::GoPathSegment,
        PercentStyle::Uri,
    ];

    fn plus_for_space(self) -> bool {
        matches!(
            self,
            PercentStyle::Form | PercentStyle::FormUnreserved | PercentStyle::FormPhp
        )
    }

    fn keeps(self, b: u8) -> bool {
        b.is_ascii_alphanumeric()
            || match self {
                PercentStyle::Unreserved | PercentStyle::UnreservedLower => unreserved_mark(b),
                PercentStyle::Form => matches!(b, b'*' | b'-' | b'.' | b'_'),
                PercentStyle::FormUnreserved => unreserved_mark(b),
                PercentStyle::FormPhp => matches!(b, b'-' | b'.' | b'_'),
                PercentStyle::UriComponent => uri_component_mark(b),
                PercentStyle::PythonQuote => unreserved_mark(b) || b == b'/',
                PercentStyle::GoPathSegment => {
                    unreserved_mark(b) || matches!(b, b'$' | b'&' | b'+' | b':' | b'=' | b'@')
                }
                PercentStyle::Uri => uri_component_mark(b) || b";,/?:@&=+$#".contains(&b),
            }
    }
}

/// RFC 3986's unreserved marks (with the alphanumerics, what every encoder keeps).
fn unreserved_mark(b: u8) -> bool {
    matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What `encodeURIComponent` keeps besides the alphanumerics.
fn uri_component_mark(b: u8) -> bool {
    unreserved_mark(b) || matches!(b, b'!' | b'\'' | b'(' | b')' | b'*')
}

/// How an HTML escaper writes the quotes (both write `&amp;`, `&lt;`, `&gt;`).
#[derive(Clone, Copy)]
enum HtmlStyle {
    /// Python's `html.escape`: `&quot;`, `&#x27;`.
    Python,
    /// Go's `html.EscapeString`: `&#34;`, `&#39;`.
    Go,
    /// Go's `html/template`: as `Go`, and `+` as `&#43;`.
    GoTemplate,
    /// PHP's `htmlspecialchars` (`ENT_QUOTES`, its default since 8.1): `&quot;`, `&#039;`.
    Php,
    /// Ruby's `CGI.escapeHTML` (Rails' ERB): `&quot;`, `&#39;`.
    Ruby,
    /// XML escapers of attributes (Java's `escapeXml`, `saxutils.escape` with entities):
    /// `&quot;`, `&apos;`.
    Xml,
    /// Escapers that leave quotes as they are (`xml.sax.saxutils.escape`,
    /// `html.escape(quote=False)`, text nodes): only `&<>`.
    NoQuotes,
    /// Handlebars: `&quot;`, `&#x27;`, and `` ` `` and `=` as `&#x60;`, `&#x3D;` (base64 padding:
    /// outside re-check).
    Handlebars,
    /// mustache.js: `&quot;`, `&#39;`, `/` as `&#x2F;`, `` ` `` and `=` as `&#x60;`, `&#x3D;`.
    Mustache,
    /// JSTL's `escapeXml`, `<c:out>`: `&#034;`, `&#039;`.
    Jstl,
    /// commons-text `escapeHtml4`: `&quot;`, the apostrophe as it is.
    Html4,
    /// .NET's `HtmlEncoder.Default` (Razor): `&quot;`, `&#x27;`, `+` as `&#x2B;`, every
    /// non-ASCII character as `&#xXXXX;` (uppercase hex of the code point).
    DotNet,
}

impl HtmlStyle {
    const ALL: [HtmlStyle; 12] = [
        HtmlStyle::Python,
        HtmlStyle::Go,
        HtmlStyle::GoTemplate,
        HtmlStyle::Php,
        HtmlStyle::Ruby,
        HtmlStyle::Xml,
        HtmlStyle::NoQuotes,
        HtmlStyle::Handlebars,
        HtmlStyle::Mustache,
        HtmlStyle::Jstl,
        HtmlStyle::Html4,
        HtmlStyle::DotNet,
    ];
}

/// `value` HTML-escaped in `style`.
fn html(value: &[u8], style: HtmlStyle) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() * 10));
    for &b in value {
        match (b, style) {
            (b'&', _) => out.extend_from_slice(b"&amp;"),
            (b'<', _) => out.extend_from_slice(b"&lt;"),
            (b'>', _) => out.extend_from_slice(b"&gt;"),
            (b'"' | b'\'', HtmlStyle::NoQuotes) | (b'\'', HtmlStyle::Html4) => out.push(b),
            (b'=', HtmlStyle::Handlebars | HtmlStyle::Mustache) => out.extend_from_slice(b"&#x3D;"),
            (b'`', HtmlStyle::Handlebars | HtmlStyle::Mustache) => out.extend_from_slice(b"&#x60;"),
            (b'/', HtmlStyle::Mustache) => out.extend_from_slice(b"&#x2F;"),
            (b'"', HtmlStyle::Jstl) => out.extend_from_slice(b"&#034;"),
            (b'\'', HtmlStyle::Jstl) => out.extend_from_slice(b"&#039;"),
            (b'"', HtmlStyle::Python | HtmlStyle::Php | HtmlStyle::DotNet)
            | (b'"', HtmlStyle::Ruby | HtmlStyle::Xml | HtmlStyle::Html4)
            | (b'"', HtmlStyle::Handlebars | HtmlStyle::Mustache) => {
                out.extend_from_slice(b"&quot;");
            }
            (b'"', HtmlStyle::Go | HtmlStyle::GoTemplate) => out.extend_from_slice(b"&#34;"),
            (b'\'', HtmlStyle::Python | HtmlStyle::DotNet | HtmlStyle::Handlebars) => {
                out.extend_from_slice(b"&#x27;");
            }
            (
                b'\'',
                HtmlStyle::Go | HtmlStyle::GoTemplate | HtmlStyle::Ruby | HtmlStyle::Mustache,
            ) => {
                out.extend_from_slice(b"&#39;");
            }
            (b'\'', HtmlStyle::Xml) => out.extend_from_slice(b"&apos;"),
            (b'\'', HtmlStyle::Php) => out.extend_from_slice(b"&#039;"),
            (b'+', HtmlStyle::GoTemplate) => out.extend_from_slice(b"&#43;"),
            (b'+', HtmlStyle::DotNet) => out.extend_from_slice(b"&#x2B;"),
            _ => out.push(b),
        }
    }
    if matches!(style, HtmlStyle::DotNet) {
        return html_references(out);
    }
    out
}

/// `escaped` with every non-ASCII character written as `&#xXXXX;` (unchanged if it is not
/// UTF-8: no HTML encoder writes such text).
fn html_references(escaped: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    let Ok(text) = std::str::from_utf8(&escaped) else {
        return escaped;
    };
    if text.is_ascii() {
        return escaped;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(escaped.len() * 4));
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c as u8);
        } else {
            let reference = Zeroizing::new(format!("&#x{:X};", u32::from(c)));
            out.extend_from_slice(reference.as_bytes());
        }
    }
    out
}

/// `value` percent-encoded in `style`.
fn percent(value: &[u8], style: PercentStyle) -> Zeroizing<Vec<u8>> {
    let hex: &[u8; 16] = match style {
        PercentStyle::UnreservedLower => b"0123456789abcdef",
        _ => b"0123456789ABCDEF",
    };
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() * 3));
    for &b in value {
        if style.keeps(b) {
            out.push(b);
        } else if b == b' ' && style.plus_for_space() {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 0xf)]]);
        }
    }
    out
}

/// How a JSON encoder escapes inside a string.
#[derive(Clone, Copy)]
struct JsonStyle {
    /// `/` as `\/` (PHP).
    slash: bool,
    /// Non-ASCII as `\uXXXX`, lowercase hex, UTF-16 surrogate pairs (PHP, Python).
    ascii: bool,
    /// `<`, `>`, `&` as `\u003c`, `\u003e`, `\u0026` (Go).
    html: bool,
    /// With `html`, also `=` and `'` as `\u003d`, `\u0027` (Gson's default).
    gson: bool,
    /// .NET's System.Text.Json default encoder: `"'+<>&` and `` ` `` as `\u0022`, `\u002B`, …
    /// and every `\uXXXX` in uppercase hex (with `ascii`).
    dotnet: bool,
}

impl JsonStyle {
    /// `\"`, `\\` and control characters only (serde_json, JavaScript).
    const MINIMAL: JsonStyle = JsonStyle {
        slash: false,
        ascii: false,
        html: false,
        gson: false,
        dotnet: false,
    };

    const ALL: [JsonStyle; 6] = [
        JsonStyle::MINIMAL,
        JsonStyle {
            slash: true,
            ascii: true,
            ..JsonStyle::MINIMAL
        },
        JsonStyle {
            ascii: true,
            ..JsonStyle::MINIMAL
        },
        JsonStyle {
            html: true,
            ..JsonStyle::MINIMAL
        },
        JsonStyle {
            html: true,
            gson: true,
            ..JsonStyle::MINIMAL
        },
        JsonStyle {
            ascii: true,
            dotnet: true,
            ..JsonStyle::MINIMAL
        },
    ];
}

/// `value` as the inside of a JSON string in `style`; `None` when `style` escapes non-ASCII
/// and `value` is not UTF-8 (no JSON encoder writes such a string).
fn json(value: &[u8], style: JsonStyle) -> Option<Zeroizing<Vec<u8>>> {
    let text = if style.ascii {
        Some(std::str::from_utf8(value).ok()?)
    } else {
        None
    };
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() * 12));
    let Some(text) = text else {
        value.iter().for_each(|&b| json_byte(b, style, &mut out));
        return Some(out);
    };
    for c in text.chars() {
        if c.is_ascii() {
            json_byte(c as u8, style, &mut out);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                push_unicode_escape(*unit, style, &mut out);
            }
        }
    }
    Some(out)
}

/// One byte inside a JSON string in `style` (non-ASCII bytes pass as they are); tab and the
/// other control characters with a short escape get it, as every encoder writes them.
fn json_byte(b: u8, style: JsonStyle, out: &mut Vec<u8>) {
    match b {
        b'"' | b'\'' | b'+' | b'<' | b'>' | b'&' | b'`' if style.dotnet => {
            push_unicode_escape(u16::from(b), style, out);
        }
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'/' if style.slash => out.extend_from_slice(b"\\/"),
        b'<' | b'>' | b'&' if style.html => push_unicode_escape(u16::from(b), style, out),
        b'=' | b'\'' if style.gson => push_unicode_escape(u16::from(b), style, out),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0..=0x1f => push_unicode_escape(u16::from(b), style, out),
        _ => out.push(b),
    }
}

/// `\uXXXX`, in lowercase hex (uppercase in the .NET style).
fn push_unicode_escape(unit: u16, style: JsonStyle, out: &mut Vec<u8>) {
    let hex: &[u8; 16] = match style.dotnet {
        true => b"0123456789ABCDEF",
        false => b"0123456789abcdef",
    };
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        out.push(hex[usize::from((unit >> shift) & 0xf)]);
    }
}

/// The characters of base64(`offset` bytes, then `value`) that depend on `value`'s bytes
/// only: the same wherever `value` starts at that offset (mod 3) inside base64-encoded data.
fn base64_core(value: &[u8], offset: usize, alphabet: &Alphabet) -> Zeroizing<Vec<u8>> {
    let engine = GeneralPurpose::new(alphabet, NO_PAD);
    let mut input = Zeroizing::new(Vec::with_capacity(offset + value.len()));
    input.resize(offset, 0);
    input.extend_from_slice(value);
    let mut encoded = Zeroizing::new(vec![0u8; input.len().div_ceil(3) * 4]);
    let n = engine
        .encode_slice(&*input, &mut encoded[..])
        .expect("buffer sized for the encoding");
    // Character i covers bits 6i..6i+6; the first whole one after the offset's bits, up to
    // the last that ends inside the value.
    let first = (8 * offset).div_ceil(6);
    let end = (8 * input.len()) / 6;
    let end = end.min(n).max(first);
    Zeroizing::new(encoded[first..end].to_vec())
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};

    use super::*;

    fn forms_of(value: &str) -> Vec<Vec<u8>> {
        echo_forms(&SecretValue::new(value.into()), b"osb_sealed_x")
            .into_iter()
            .map(|(f, _)| f.expose().to_vec())
            .collect()
    }

    fn has(forms: &[Vec<u8>], form: &str) -> bool {
        forms.iter().any(|f| f == form.as_bytes())
    }

    #[test]
    fn percent_forms_are_the_ones_encoders_write() {
        let f = forms_of("a/b+c= d*é");
        assert!(has(&f, "a%2Fb%2Bc%3D%20d%2A%C3%A9"), "query substitution");
        assert!(has(&f, "a%2fb%2bc%3d%20d%2a%c3%a9"), "lowercase hex");
        assert!(has(&f, "a%2Fb%2Bc%3D+d*%C3%A9"), "form-urlencoded");
        assert!(has(&f, "a%2Fb%2Bc%3D%20d*%C3%A9"), "encodeURIComponent");
        assert!(has(&f, "a/b%2Bc%3D%20d%2A%C3%A9"), "Python quote");
        assert!(has(&f, "a%2Fb+c=%20d%2A%C3%A9"), "Go PathEscape");
        assert!(has(&f, "a/b+c=%20d*%C3%A9"), "encodeURI");
        // Python's quote_plus/urlencode (Go's QueryEscape writes the same), PHP's urlencode.
        let f = forms_of("pw h35a~Secret*Pass/+=01");
        assert!(has(&f, "pw+h35a~Secret%2APass%2F%2B%3D01"), "Python, Go");
        assert!(has(&f, "pw+h35a%7ESecret%2APass%2F%2B%3D01"), "PHP");
    }

    #[test]
    fn a_query_form_encoded_again_is_a_form() {
        // Django's redirect_to_login: urlencode({"next": "/p?sig=a%2Fb%2Bc%3D"}, safe="/").
        let f = forms_of("a/b+c=0123");
        assert!(
            has(&f, "a%252Fb%252Bc%253D0123"),
            "sealgate's query form, twice"
        );
        assert!(has(&f, "a%25252Fb%25252Bc%25253D0123"), "three levels");
        let f = forms_of("a b/c");
        assert!(has(&f, "a%2Bb%252Fc"), "a form field, twice");
        let f = forms_of("a~b/c");
        assert!(
            has(&f, "a%7Eb%252Fc"),
            "URLSearchParams over the query form"
        );
        let long = format!("{}/x", "k".repeat(MAX_URL_FORMS_VALUE_LEN));
        assert!(
            forms_of(&long)
                .iter()
                .all(|f| !f.windows(3).any(|w| w == b"%25")),
            "no URL-in-URL forms for a long value"
        );
        let plain = forms_of("sk-live-0123456789abcdefghij");
        assert!(
            plain.iter().all(|f| !f.contains(&b'%')),
            "a value percent-encoding leaves alone has no twice form"
        );
    }

    #[test]
    fn the_query_forms_base64_is_a_form() {
        // A session cookie holding the URL sealgate wrote: base64 of `…sig=<query form>…`.
        let value = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY+x=";
        let f = forms_of(value);
        for prefix in ["", "x", "xy"] {
            let cookie = URL_SAFE_NO_PAD.encode(format!(
                "{prefix}{{\"next\":\"/p?sig=wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY%2Bx%3D\"}}"
            ));
            assert!(
                f.iter()
                    .any(|form| cookie.as_bytes().windows(form.len()).any(|w| w == form)),
                "offset {}: {cookie}",
                prefix.len()
            );
        }
    }

    #[test]
    fn html_forms_are_the_ones_escapers_write() {
        let f = forms_of("p&<w>\"'");
        assert!(has(&f, "p&amp;&lt;w&gt;&quot;&#x27;"), "Python html.escape");
        assert!(has(&f, "p&amp;&lt;w&gt;&#34;&#39;"), "Go html.EscapeString");
        let f = forms_of("k+e'y");
        assert!(has(&f, "k&#43;e&#39;y"), "Go html/template");
        assert!(has(&f, "k+e&#039;y"), "PHP htmlspecialchars");
        let f = forms_of("k+e'y\"é");
        assert!(has(&f, "k&#x2B;e&#x27;y&quot;&#xE9;"), ".NET HtmlEncoder");
        let f = forms_of("qt\"Quote'd<&>");
        assert!(
            has(&f, "qt&quot;Quote&#39;d&lt;&amp;&gt;"),
            "Ruby CGI.escapeHTML"
        );
        assert!(has(&f, "qt&quot;Quote&apos;d&lt;&amp;&gt;"), "XML");
        assert!(
            has(&f, "qt\"Quote'd&lt;&amp;&gt;"),
            "html.escape(quote=False)"
        );
        assert!(
            has(&f, "qt&#034;Quote&#039;d&lt;&amp;&gt;"),
            "JSTL escapeXml"
        );
        assert!(
            has(&f, "qt&quot;Quote'd&lt;&amp;&gt;"),
            "commons-text escapeHtml4"
        );
        // Base64 padding and slashes in templates.
        let f = forms_of("ab/cd+ef`gh'==");
        assert!(has(&f, "ab/cd+ef&#x60;gh&#x27;&#x3D;&#x3D;"), "Handlebars");
        assert!(
            has(&f, "ab&#x2F;cd+ef&#x60;gh&#39;&#x3D;&#x3D;"),
            "mustache.js"
        );
    }

    #[test]
    fn json_forms_are_the_ones_encoders_write() {
        let v = "p\"w\\/<é😀\tx";
        let f = forms_of(v);
        let minimal = serde_json::to_string(v).unwrap();
        assert!(has(&f, &minimal[1..minimal.len() - 1]), "serde_json");
        assert!(has(&f, r#"p\"w\\\/<\u00e9\ud83d\ude00\tx"#), "PHP");
        assert!(has(&f, r#"p\"w\\/<\u00e9\ud83d\ude00\tx"#), "Python");
        assert!(has(&f, "p\\\"w\\\\/\\u003cé😀\\tx"), "Go");
        let g = forms_of("k=e'y<");
        assert!(has(&g, r"k\u003de\u0027y\u003c"), "Gson");
        let d = forms_of("a+b/c=\"'<é`");
        assert!(
            has(&d, r"a\u002Bb/c=\u0022\u0027\u003C\u00E9\u0060"),
            ".NET System.Text.Json"
        );
        let twice = serde_json::to_string(&minimal).unwrap();
        let twice = &twice[1..twice.len() - 1];
        assert!(
            has(&f, &twice[2..twice.len() - 2]),
            "serde_json twice: {twice}"
        );
        // Python: json.dumps({"req": json.dumps(p)}): ASCII escapes, then escaped again.
        let python = r#"p\"w\\/<\u00e9\ud83d\ude00\tx"#;
        let again = serde_json::to_string(python).unwrap();
        assert!(has(&f, &again[1..again.len() - 1]), "Python twice: {again}");
    }

    #[test]
    fn a_plain_value_has_only_its_base64_forms() {
        let value = "sk-live-0123456789abcdefghij";
        let f = forms_of(value);
        assert!(!f.is_empty());
        for form in &f {
            assert!(
                form.iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/-_".contains(b)),
                "only base64 cores: {}",
                String::from_utf8_lossy(form)
            );
        }
    }

    #[test]
    fn a_base64_core_is_found_at_every_offset_with_any_surroundings() {
        let value = b"sk-live-0123456789abcdefghijklmnop";
        let f = forms_of(std::str::from_utf8(value).unwrap());
        for prefix in ["", "u", "us", "user:", "Bearer x y z "] {
            for suffix in ["", "!", "!!", "\n"] {
                let data = [prefix.as_bytes(), value, suffix.as_bytes()].concat();
                for encoded in [B64.encode(&data), URL_SAFE_NO_PAD.encode(&data)] {
                    assert!(
                        f.iter()
                            .any(|form| memchr::memmem::find(encoded.as_bytes(), form).is_some()),
                        "{prefix:?}+value+{suffix:?} as {encoded}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_long_value_has_no_forms() {
        let long = "a/".repeat(MAX_FORMS_VALUE_LEN / 2 + 1);
        assert!(forms_of(&long).is_empty());
    }

    #[test]
    fn a_short_value_has_no_base64_forms() {
        assert!(forms_of("short-key-1").is_empty());
    }

    #[test]
    fn base64_cores_are_replaced_by_the_tokens_core_at_the_same_offset() {
        let value = SecretValue::new(b"sk-live-0123456789abcdefghijklmnop".to_vec());
        let token = b"osb_sealed_0123456789abcdef0123456789abcdef";
        let whole = B64.encode(value.expose());
        let forms = echo_forms(&value, token);
        let (_, with) = forms
            .iter()
            .find(|(f, _)| whole.as_bytes().starts_with(f.expose()))
            .expect("the offset-0 core");
        assert!(B64.encode(token).as_bytes().starts_with(with));
    }

    proptest::proptest! {
        /// Whatever surrounds a value of 16 bytes or more, and in either alphabet, one of its
        /// base64 forms is inside the encoding.
        #[test]
        fn some_base64_form_is_inside_any_encoding_of_data_holding_the_value(
            value in proptest::collection::vec(proptest::prelude::any::<u8>(), 16..80),
            prefix in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..7),
            suffix in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
        ) {
            let forms = echo_forms(&SecretValue::new(value.clone()), b"osb_sealed_x");
            let data = [prefix, value, suffix].concat();
            for encoded in [B64.encode(&data), URL_SAFE_NO_PAD.encode(&data)] {
                let inside = forms
                    .iter()
                    .any(|(f, _)| memchr::memmem::find(encoded.as_bytes(), f.expose()).is_some());
                proptest::prop_assert!(inside, "{}", encoded);
            }
        }
    }
}
