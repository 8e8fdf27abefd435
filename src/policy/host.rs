//! Host and authority normalisation: the one place a destination name becomes a [`Dest`].
//!
//! Grammar accepted (everything else is an error naming the input):
//! - a DNS name: ASCII only (IDNs in punycode `xn--…`), case-folded to lowercase, one trailing
//!   dot dropped, labels of 1–63 bytes from `[a-z0-9-]` not starting or ending with `-`
//!   (underscores are rejected: they are not valid in host names), total ≤ 253 bytes;
//! - an IPv4 literal, only as a canonical dotted quad (`1.2.3.4`). A name whose last label is
//!   all digits or `0x…` hex is otherwise rejected, so the legacy spellings that `inet_aton`
//!   turns into addresses (`127.1`, `2130706433`, `0177.0.0.1`, `0x7f.1`) never reach a resolver;
//! - an IPv6 literal, in brackets in an authority (`[::1]:443`); zone ids are rejected (`%`).
//!   IPv4-mapped IPv6 literals stay IPv6 (address vetting looks inside them).
//!
//! Non-ASCII input is rejected before any other look at the bytes, so no IDNA mapping (U+3002
//! as a dot, U+200B dropped) can ever apply. `@` (userinfo) and `%` (escapes, zone ids) are
//! rejected anywhere in the input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest input quoted back in an error message (hosts are not secrets, but logs are finite).
const SHOWN_MAX_CHARS: usize = 200;
/// Longest DNS name in presentation form, without the trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Why a host, authority or host pattern was refused. Every message quotes the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// Nothing to parse.
    #[error("empty host")]
    Empty,
    /// A byte ≥ 0x80 anywhere; IDNs must be given in punycode.
    #[error("host {input:?} contains non-ASCII characters (give IDNs in punycode, `xn--…`)")]
    NonAscii { input: String },
    /// `%` anywhere: percent-encoding or an IPv6 zone id.
    #[error("host {input:?} contains '%' (percent-encoding and IPv6 zone ids are not accepted)")]
    Percent { input: String },
    /// `@` anywhere: userinfo is never accepted in an authority.
    #[error("host {input:?} contains '@' (userinfo is not accepted)")]
    Userinfo { input: String },
    /// A character outside the host grammar.
    #[error("host {input:?} contains invalid character {ch:?}")]
    InvalidChar { input: String, ch: char },
    /// `a..b`, `.a`, or more than one trailing dot.
    #[error("host {input:?} has an empty label")]
    EmptyLabel { input: String },
    /// A label longer than 63 bytes.
    #[error("host {input:?} has a label longer than 63 characters")]
    LabelTooLong { input: String },
    /// A label starting or ending with `-`.
    #[error("host {input:?} has a label starting or ending with '-'")]
    LabelHyphen { input: String },
    /// A name longer than 253 bytes.
    #[error("host {input:?} is longer than 253 characters")]
    TooLong { input: String },
    /// Numeric-looking but not a canonical dotted-quad IPv4 address.
    #[error("host {input:?} looks like a numeric IPv4 address but is not a canonical dotted quad (like 192.0.2.1)")]
    AmbiguousIpv4 { input: String },
    /// Bracketed (or colon-containing) text that is not an IPv6 address.
    #[error("host {input:?} is not a valid IPv6 address")]
    InvalidIpv6 { input: String },
    /// More than one `:` without brackets.
    #[error("authority {input:?} has an IPv6 address without brackets (write [addr]:port)")]
    UnbracketedIpv6 { input: String },
    /// No port where one is required (the CONNECT target).
    #[error("authority {input:?} has no port")]
    MissingPort { input: String },
    /// Port not 1–65535 in plain decimal.
    #[error("authority {input:?} has an invalid port: {reason}")]
    InvalidPort { input: String, reason: &'static str },
    /// An allowlist / `allowed_hosts` pattern was refused.
    #[error("invalid host pattern {pattern:?}: {reason}")]
    InvalidPattern { pattern: String, reason: String },
}

/// A normalised host: lowercase ASCII DNS name (no trailing dot) or an IP literal.
///
/// Invariant: built only by [`normalise_host`] / [`parse_authority`] (or from an `IpAddr`), so a
/// `Name` always satisfies the grammar in the module docs and is never numeric-looking.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, e.g. `api.example.com`.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl Host {
    /// The form used for SNI, certificate checks and DNS: the name, or the IP text without
    /// brackets (`::1`).
    pub fn as_str_for_sni(&self) -> String {
        match self {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Host {
    /// The name, `1.2.3.4`, or `[::1]` (the form used inside an authority).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Normalised destination: host + explicit port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    pub host: Host,
    pub port: u16,
}

impl Dest {
    /// `api.x.com:443`, `192.0.2.1:80`, `[::1]:8443`. Re-parses to the same `Dest`.
    pub fn authority(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The scheme a request travels with; decides whether a port-less pattern also allows port 80.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Https,
    Http,
}

impl Scheme {
    /// 443 or 80: the `default_port` to give [`parse_authority`] for a `Host` header.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Https => 443,
            Scheme::Http => 80,
        }
    }
}

/// Strict authority parser for the CONNECT target, `Host` / `:authority` and absolute-form URIs.
///
/// `host`, `host:port`, `[v6]`, `[v6]:port`. With `default_port = None` a port is required
/// (CONNECT); otherwise a missing port takes the default. `http::uri::Authority` is deliberately
/// not used: it accepts `user@host`, `:+443`, `:0443` and loses `:65536`.
///
/// # Errors
/// Any [`HostError`] except `InvalidPattern`; the message quotes the input.
pub fn parse_authority(input: &str, default_port: Option<u16>) -> Result<Dest, HostError> {
    precheck(input)?;
    let (host_part, port_part) = split_host_port(input)?;
    let host = parse_host_part(host_part, false)?;
    let port = match port_part {
        Some(p) => parse_port(input, p)?,
        None => default_port.ok_or_else(|| HostError::MissingPort {
            input: shown(input),
        })?,
    };
    Ok(Dest { host, port })
}

/// Normalises a bare host: an SNI value, a DNS name, or an IP literal (`[v6]` or bare `v6`).
///
/// # Errors
/// Any [`HostError`] except the port and pattern variants; the message quotes the input.
pub fn normalise_host(input: &str) -> Result<Host, HostError> {
    precheck(input)?;
    parse_host_part(input, true)
}

/// Checks that apply to the whole input before anything else: non-ASCII first, then `@`, `%`.
pub(super) fn precheck(input: &str) -> Result<(), HostError> {
    if !input.is_ascii() {
        return Err(HostError::NonAscii {
            input: shown(input),
        });
    }
    if input.contains('@') {
        return Err(HostError::Userinfo {
            input: shown(input),
        });
    }
    if input.contains('%') {
        return Err(HostError::Percent {
            input: shown(input),
        });
    }
    if input.is_empty() {
        return Err(HostError::Empty);
    }
    Ok(())
}

/// Splits `host[:port]` / `[v6][:port]` without interpreting either side.
/// `Some("")` is returned for a trailing `:` so the port check can refuse it.
pub(super) fn split_host_port(input: &str) -> Result<(&str, Option<&str>), HostError> {
    if input.starts_with('[') {
        let close = input.find(']').ok_or_else(|| HostError::InvalidIpv6 {
            input: shown(input),
        })?;
        let (host, after) = input.split_at(close + 1);
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(invalid_char(input, after)),
        };
    }
    match input.split_once(':') {
        None => Ok((input, None)),
        Some((_, port)) if port.contains(':') => Err(HostError::UnbracketedIpv6 {
            input: shown(input),
        }),
        Some((host, port)) => Ok((host, Some(port))),
    }
}

/// Parses the host side of an authority (or a bare host when `bare_v6` allows `::1`).
pub(super) fn parse_host_part(input: &str, bare_v6: bool) -> Result<Host, HostError> {
    if let Some(inner) = input.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| HostError::InvalidIpv6 {
                input: shown(input),
            })?;
        return parse_ipv6(input, inner);
    }
    if bare_v6 && input.contains(':') {
        return parse_ipv6(input, input);
    }
    parse_name_or_ipv4(input)
}

fn parse_ipv6(input: &str, inner: &str) -> Result<Host, HostError> {
    inner
        .parse::<Ipv6Addr>()
        .map(|ip| Host::Ip(IpAddr::V6(ip)))
        .map_err(|_| HostError::InvalidIpv6 {
            input: shown(input),
        })
}

/// A DNS name or a canonical dotted-quad IPv4 address.
///
/// Example: `API.Example.COM.` → `Name("api.example.com")`; `10.0.0.1` → `Ip(10.0.0.1)`;
/// `10.0.0.01` → `AmbiguousIpv4`.
pub(super) fn parse_name_or_ipv4(input: &str) -> Result<Host, HostError> {
    let trimmed = input.strip_suffix('.').unwrap_or(input);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    if trimmed.len() > MAX_NAME_LEN {
        return Err(HostError::TooLong {
            input: shown(input),
        });
    }
    let name = trimmed.to_ascii_lowercase();
    let mut last_label = "";
    for label in name.split('.') {
        check_label(input, label)?;
        last_label = label;
    }
    if is_numeric_label(last_label) {
        return parse_canonical_ipv4(input, &name);
    }
    Ok(Host::Name(name))
}

fn check_label(input: &str, label: &str) -> Result<(), HostError> {
    if label.is_empty() {
        return Err(HostError::EmptyLabel {
            input: shown(input),
        });
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(HostError::LabelTooLong {
            input: shown(input),
        });
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(invalid_char(input, &bad.to_string()));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(HostError::LabelHyphen {
            input: shown(input),
        });
    }
    Ok(())
}

/// A label `inet_aton` would read as a number: all decimal digits, or `0x` + hex digits.
/// (The WHATWG URL "ends in a number" rule.)
fn is_numeric_label(label: &str) -> bool {
    let all = |s: &str, f: fn(&u8) -> bool| s.as_bytes().iter().all(f);
    match label.strip_prefix("0x") {
        Some(hex) => all(hex, u8::is_ascii_hexdigit),
        None => all(label, u8::is_ascii_digit),
    }
}

/// Accepts only the canonical spelling: re-printing the parsed address gives the same text.
fn parse_canonical_ipv4(input: &str, name: &str) -> Result<Host, HostError> {
    match name.parse::<Ipv4Addr>() {
        Ok(ip) if ip.to_string() == name => Ok(Host::Ip(IpAddr::V4(ip))),
        _ => Err(HostError::AmbiguousIpv4 {
            input: shown(input),
        }),
    }
}

/// Decimal 1–65535, digits only, no sign, no leading zero.
pub(super) fn parse_port(input: &str, port: &str) -> Result<u16, HostError> {
    let reason = if port.is_empty() {
        "empty"
    } else if !port.bytes().all(|b| b.is_ascii_digit()) {
        "not a decimal number"
    } else if port.starts_with('0') {
        "leading zero or port 0"
    } else {
        match port.parse::<u16>() {
            Ok(n) => return Ok(n),
            Err(_) => "greater than 65535",
        }
    };
    Err(HostError::InvalidPort {
        input: shown(input),
        reason,
    })
}

fn invalid_char(input: &str, rest: &str) -> HostError {
    HostError::InvalidChar {
        input: shown(input),
        ch: rest.chars().next().unwrap_or(' '),
    }
}

/// The input as quoted in error messages: at most [`SHOWN_MAX_CHARS`] characters.
pub(super) fn shown(input: &str) -> String {
    match input.char_indices().nth(SHOWN_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &input[..cut]),
        None => input.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> Host {
        Host::Name(s.to_owned())
    }

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().expect("test ip"))
    }

    fn auth(s: &str) -> Result<Dest, HostError> {
        parse_authority(s, None)
    }

    fn dest(host: Host, port: u16) -> Dest {
        Dest { host, port }
    }

    // ---- names ----

    #[test]
    fn case_and_trailing_dot_variants_are_equal() {
        for s in [
            "api.example.com",
            "API.Example.COM",
            "api.example.com.",
            "Api.Example.Com.",
        ] {
            assert_eq!(normalise_host(s), Ok(name("api.example.com")), "{s}");
        }
    }

    #[test]
    fn only_one_trailing_dot_is_dropped() {
        assert!(matches!(
            normalise_host("example.com.."),
            Err(HostError::EmptyLabel { .. })
        ));
    }

    #[test]
    fn empty_inputs_are_rejected() {
        for s in ["", "."] {
            assert_eq!(normalise_host(s), Err(HostError::Empty), "{s:?}");
        }
        assert!(matches!(auth(":443"), Err(HostError::Empty)));
    }

    #[test]
    fn empty_labels_are_rejected() {
        for s in [".example.com", "a..b", "..", "a.b.."] {
            assert!(
                matches!(normalise_host(s), Err(HostError::EmptyLabel { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn label_and_name_lengths() {
        let ok63 = format!("{}.com", "a".repeat(63));
        assert!(normalise_host(&ok63).is_ok());
        let bad64 = format!("{}.com", "a".repeat(64));
        assert!(matches!(
            normalise_host(&bad64),
            Err(HostError::LabelTooLong { .. })
        ));
        // 4 labels of 63 + 3 dots = 255 > 253; 253 exactly is fine.
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(matches!(
            normalise_host(&long),
            Err(HostError::TooLong { .. })
        ));
        let exact = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "a".repeat(61));
        assert_eq!(exact.len(), 253);
        assert!(normalise_host(&exact).is_ok());
        assert!(normalise_host(&format!("{exact}.")).is_ok());
    }

    #[test]
    fn label_characters() {
        assert_eq!(
            normalise_host("xn--bcher-kva.example"),
            Ok(name("xn--bcher-kva.example"))
        );
        assert_eq!(normalise_host("a-b.c0m"), Ok(name("a-b.c0m")));
        for s in [
            "a_b.com", "a b.com", "a/b", "a?b", "a#b", "a\\b", "a*b.com", "a\tb", "a\0b",
        ] {
            assert!(
                matches!(normalise_host(s), Err(HostError::InvalidChar { .. })),
                "{s:?}"
            );
        }
        for s in ["-a.com", "a-.com", "a.-com"] {
            assert!(
                matches!(normalise_host(s), Err(HostError::LabelHyphen { .. })),
                "{s}"
            );
        }
    }

    #[test]
    fn non_ascii_is_rejected_first() {
        // U+3002 ideographic full stop (IDNA maps it to '.'), U+200B zero width space
        // (IDNA drops it), fullwidth letters, and a non-ASCII byte next to other faults.
        for s in [
            "example\u{3002}com",
            "exa\u{200B}mple.com",
            "ｅｘａｍｐｌｅ.com",
            "bücher.example",
            "user@bücher.example:99999",
            "%e2.example\u{00A0}",
        ] {
            assert!(
                matches!(normalise_host(s), Err(HostError::NonAscii { .. })),
                "{s:?}"
            );
            assert!(
                matches!(
                    parse_authority(s, Some(443)),
                    Err(HostError::NonAscii { .. })
                ),
                "{s:?}"
            );
        }
    }

    #[test]
    fn non_ascii_error_shows_invisible_characters() {
        let err = normalise_host("exa\u{200B}mple.com")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\\u{200b}"), "{err}");
    }

    #[test]
    fn percent_and_userinfo_are_rejected() {
        for s in [
            "ex%61mple.com",
            "%2e",
            "[fe80::1%25eth0]:443",
            "[fe80::1%eth0]",
        ] {
            assert!(
                matches!(
                    parse_authority(s, Some(443)),
                    Err(HostError::Percent { .. })
                ),
                "{s}"
            );
        }
        for s in [
            "user@host.com",
            "user:pw@host.com:443",
            "@host.com",
            "host.com@evil.com",
            "[::1]@x",
        ] {
            assert!(
                matches!(
                    parse_authority(s, Some(443)),
                    Err(HostError::Userinfo { .. })
                ),
                "{s}"
            );
            assert!(
                matches!(normalise_host(s), Err(HostError::Userinfo { .. })),
                "{s}"
            );
        }
    }

    // ---- IPv4 ----

    #[test]
    fn canonical_ipv4_is_an_ip() {
        assert_eq!(normalise_host("192.0.2.1"), Ok(ip("192.0.2.1")));
        assert_eq!(normalise_host("0.0.0.0"), Ok(ip("0.0.0.0")));
        assert_eq!(normalise_host("255.255.255.255"), Ok(ip("255.255.255.255")));
        assert_eq!(normalise_host("192.0.2.1."), Ok(ip("192.0.2.1")));
    }

    #[test]
    fn legacy_ipv4_spellings_are_rejected() {
        for s in [
            "0x7f.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0177.0.0.1",
            "127.0.0.01",
            "0x7f000001",
            "0X7F.0.0.1",
            "127.0.0.0x1",
            "1.2.3.4.5",
            "256.0.0.1",
            "example.123",
            "example.0x",
            "example.0xff",
            "0",
            "0x",
        ] {
            assert!(
                matches!(normalise_host(s), Err(HostError::AmbiguousIpv4 { .. })),
                "{s}: {:?}",
                normalise_host(s)
            );
        }
    }

    #[test]
    fn numeric_labels_not_last_are_names() {
        assert_eq!(
            normalise_host("127.0.0.1.nip.io"),
            Ok(name("127.0.0.1.nip.io"))
        );
        assert_eq!(normalise_host("0x7f.example"), Ok(name("0x7f.example")));
        assert_eq!(normalise_host("1e100.net"), Ok(name("1e100.net")));
        // Hex-looking TLD without the 0x prefix is not numeric for inet_aton.
        assert_eq!(normalise_host("example.ff"), Ok(name("example.ff")));
    }

    // ---- IPv6 ----

    #[test]
    fn ipv6_literals() {
        assert_eq!(normalise_host("[::1]"), Ok(ip("::1")));
        assert_eq!(normalise_host("::1"), Ok(ip("::1")));
        assert_eq!(normalise_host("[2001:DB8::A]"), Ok(ip("2001:db8::a")));
        // Mapped stays IPv6.
        assert_eq!(
            normalise_host("[::ffff:127.0.0.1]"),
            Ok(ip("::ffff:127.0.0.1"))
        );
        for s in ["[::1", "[1.2.3.4]", "[example.com]", "[]", "[:::]", "1:2"] {
            assert!(
                matches!(normalise_host(s), Err(HostError::InvalidIpv6 { .. })),
                "{s}: {:?}",
                normalise_host(s)
            );
        }
    }

    #[test]
    fn display_forms() {
        assert_eq!(ip("::1").to_string(), "[::1]");
        assert_eq!(ip("::1").as_str_for_sni(), "::1");
        assert_eq!(ip("10.0.0.1").to_string(), "10.0.0.1");
        assert_eq!(ip("10.0.0.1").as_str_for_sni(), "10.0.0.1");
        assert_eq!(name("a.b").as_str_for_sni(), "a.b");
        assert_eq!(dest(name("api.x.com"), 443).authority(), "api.x.com:443");
        assert_eq!(dest(ip("::1"), 8443).authority(), "[::1]:8443");
        assert_eq!(dest(ip("::1"), 8443).to_string(), "[::1]:8443");
    }

    // ---- authorities and ports ----

    #[test]
    fn authorities_parse() {
        assert_eq!(auth("API.x.com:443"), Ok(dest(name("api.x.com"), 443)));
        assert_eq!(auth("api.x.com.:8443"), Ok(dest(name("api.x.com"), 8443)));
        assert_eq!(auth("[::1]:8443"), Ok(dest(ip("::1"), 8443)));
        assert_eq!(auth("10.0.0.1:1"), Ok(dest(ip("10.0.0.1"), 1)));
        assert_eq!(auth("x.com:65535"), Ok(dest(name("x.com"), 65535)));
        assert_eq!(
            parse_authority("x.com", Some(443)),
            Ok(dest(name("x.com"), 443))
        );
        assert_eq!(parse_authority("[::1]", Some(80)), Ok(dest(ip("::1"), 80)));
        assert_eq!(
            parse_authority("x.com:8080", Some(80)),
            Ok(dest(name("x.com"), 8080))
        );
    }

    #[test]
    fn scheme_default_ports() {
        assert_eq!(Scheme::Https.default_port(), 443);
        assert_eq!(Scheme::Http.default_port(), 80);
    }

    #[test]
    fn connect_target_requires_a_port() {
        for s in ["x.com", "[::1]", "10.0.0.1"] {
            assert!(matches!(auth(s), Err(HostError::MissingPort { .. })), "{s}");
        }
    }

    #[test]
    fn bad_ports_are_rejected() {
        for s in [
            "x.com:",
            "x.com:0",
            "x.com:0443",
            "x.com:+443",
            "x.com:-1",
            "x.com:65536",
            "x.com:99999999999999999999",
            "x.com:44 3",
            "x.com: 443",
            "x.com:443 ",
            "x.com:0x1bb",
            "[::1]:",
            "[::1]:0443",
            "x.com:４４３",
        ] {
            let r = parse_authority(s, Some(443));
            assert!(
                matches!(
                    r,
                    Err(HostError::InvalidPort { .. }) | Err(HostError::NonAscii { .. })
                ),
                "{s}: {r:?}"
            );
        }
    }

    #[test]
    fn malformed_authorities_are_rejected() {
        assert!(matches!(
            auth("::1:443"),
            Err(HostError::UnbracketedIpv6 { .. })
        ));
        assert!(matches!(
            auth("x.com:443:1"),
            Err(HostError::UnbracketedIpv6 { .. })
        ));
        assert!(matches!(
            auth("[::1]x:443"),
            Err(HostError::InvalidChar { ch: 'x', .. })
        ));
        assert!(matches!(
            auth("[::1]]:443"),
            Err(HostError::InvalidChar { ch: ']', .. })
        ));
        assert!(matches!(
            auth("[::1:443"),
            Err(HostError::InvalidIpv6 { .. })
        ));
        assert!(matches!(
            auth("x.com/path:443"),
            Err(HostError::InvalidChar { ch: '/', .. })
        ));
        assert!(matches!(
            auth("127.1:443"),
            Err(HostError::AmbiguousIpv4 { .. })
        ));
        assert!(matches!(
            auth("[127.0.0.1]:443"),
            Err(HostError::InvalidIpv6 { .. })
        ));
    }

    #[test]
    fn errors_quote_the_input() {
        let e = auth("bad_host.example:443").unwrap_err().to_string();
        assert!(
            e.contains("\"bad_host.example\"") && e.contains("'_'"),
            "{e}"
        );
        let e = auth("x.com:0443").unwrap_err().to_string();
        assert!(
            e.contains("x.com:0443") && e.contains("leading zero"),
            "{e}"
        );
        let long = "a".repeat(5000);
        let e = normalise_host(&long).unwrap_err().to_string();
        assert!(e.len() < 400, "{}", e.len());
    }

    // ---- properties ----

    fn authority_like() -> impl Strategy<Value = String> {
        proptest::string::string_regex(r"[a-zA-Z0-9.:\[\]\-_@%*/x ]{0,40}").expect("regex")
    }

    proptest! {
        #[test]
        fn parse_authority_never_panics(s in any::<String>()) {
            let _ = parse_authority(&s, None);
            let _ = parse_authority(&s, Some(443));
            let _ = normalise_host(&s);
        }

        #[test]
        fn parsed_dest_round_trips(s in authority_like(), default in proptest::option::of(1u16..)) {
            if let Ok(d) = parse_authority(&s, default) {
                prop_assert_eq!(parse_authority(&d.to_string(), None), Ok(d.clone()));
                prop_assert_eq!(normalise_host(&d.host.to_string()), Ok(d.host.clone()));
                prop_assert_eq!(normalise_host(&d.host.as_str_for_sni()), Ok(d.host.clone()));
            }
        }

        #[test]
        fn ip_dests_round_trip(ip in any::<IpAddr>(), port in 1u16..) {
            let d = Dest { host: Host::Ip(ip), port };
            prop_assert_eq!(parse_authority(&d.authority(), None), Ok(d.clone()));
        }

        #[test]
        fn generated_names_round_trip(
            labels in proptest::collection::vec("[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", 1..5),
            port in 1u16..,
        ) {
            let s = format!("{}:{port}", labels.join("."));
            if let Ok(d) = parse_authority(&s, None) {
                prop_assert_eq!(parse_authority(&d.authority(), None), Ok(d.clone()));
                if let Host::Name(n) = &d.host {
                    prop_assert_eq!(n, &labels.join(".").to_ascii_lowercase());
                }
            }
        }
    }
}
