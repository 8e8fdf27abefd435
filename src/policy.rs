//! Destination policy: host normalisation, host patterns, egress and secret decisions, address vetting.
//!
//! Everything here is pure (no I/O, no async) so the proxy and the admin API share one
//! definition of "which host is this" and "may this go there":
//!
//! - [`host`]: the one normaliser every host passes through at the edge ([`parse_authority`],
//!   [`normalise_host`]) producing a [`Dest`].
//! - [`pattern`]: allowlist / `allowed_hosts` patterns ([`parse_pattern`]) compiled into a
//!   [`HostMatcher`].
//! - [`vet`]: the resolved-address table ([`classify`]) and [`AddressPolicy`].
//! - this file: the two decisions, [`egress_allowed`] and [`secret_allowed`] (with its host
//!   rules alone, [`secret_host_matches`], for plain HTTP).

mod host;
mod pattern;
mod vet;

pub use host::{normalise_host, parse_authority, Dest, Host, HostError, Scheme};
pub use pattern::{default_port_allowed, parse_pattern, HostMatcher, HostPattern};
pub use vet::{classify, AddressPolicy, NonPublic, VetError};

/// Store egress decision: may the sandbox reach `dest` at all?
///
/// `None` (the store's `egress_allowlist` is `null`) allows every host **on the default ports
/// only** — the ports a pattern without a port allows ([`default_port_allowed`]: 443, and 80
/// for plain HTTP) — so "any public host" never means "any port": `null` behaves exactly like
/// the allowlist `["*"]`. `Some` allows only what the matcher matches, so an empty list allows
/// nothing. This is a host decision only: the resolved addresses still go through
/// [`AddressPolicy::vet`].
pub fn egress_allowed(allowlist: Option<&HostMatcher>, dest: &Dest, scheme: Scheme) -> bool {
    match allowlist {
        None => default_port_allowed(dest.port, scheme),
        Some(m) => m.matches(dest, scheme),
    }
}

/// Secret eligibility: may a secret be unsealed in a request to `dest`?
///
/// True only when `dest` matches the store allowlist (when set) AND the secret's
/// `allowed_hosts` (when set). Invariants:
/// - both `None` → `false` (a secret with no restriction at all is never unsealed anywhere);
/// - [`Scheme::Http`] → `false`: secrets are never unsealed over plaintext HTTP, whatever
///   the patterns say (DESIGN §3). Callers deciding whether to *scrub* a response should not
///   reuse this function for plaintext requests.
pub fn secret_allowed(
    store_allowlist: Option<&HostMatcher>,
    secret_hosts: Option<&HostMatcher>,
    dest: &Dest,
    scheme: Scheme,
) -> bool {
    scheme != Scheme::Http && secret_host_matches(store_allowlist, secret_hosts, dest, scheme)
}

/// The host rules of [`secret_allowed`] without its plaintext rule: does `dest` match the
/// store allowlist (when set) AND the secret's `allowed_hosts` (when set)? Both `None` →
/// `false`. Over plain HTTP this decides whether a token travels sealed (true: the secret's
/// host, never unsealed over plaintext) or is refused like a token sent to any other host.
pub fn secret_host_matches(
    store_allowlist: Option<&HostMatcher>,
    secret_hosts: Option<&HostMatcher>,
    dest: &Dest,
    scheme: Scheme,
) -> bool {
    if store_allowlist.is_none() && secret_hosts.is_none() {
        return false;
    }
    let within = |m: Option<&HostMatcher>| m.is_none_or(|m| m.matches(dest, scheme));
    egress_allowed(store_allowlist, dest, scheme) && within(secret_hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[&str]) -> HostMatcher {
        let owned: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        HostMatcher::compile(&owned).expect("valid patterns")
    }

    fn dest(s: &str) -> Dest {
        parse_authority(s, None).expect("valid authority")
    }

    #[test]
    fn egress_null_allowlist_allows_any_host_on_default_ports_only() {
        assert!(egress_allowed(
            None,
            &dest("anything.example:443"),
            Scheme::Https
        ));
        assert!(egress_allowed(
            None,
            &dest("anything.example:80"),
            Scheme::Http
        ));
        for (authority, scheme) in [
            ("anything.example:8443", Scheme::Https),
            ("anything.example:80", Scheme::Https),
            ("anything.example:22", Scheme::Https),
            ("anything.example:8080", Scheme::Http),
        ] {
            assert!(
                !egress_allowed(None, &dest(authority), scheme),
                "{authority}"
            );
        }
        let star = matcher(&["*"]);
        for (authority, scheme) in [
            ("a.example:443", Scheme::Https),
            ("a.example:80", Scheme::Http),
            ("a.example:80", Scheme::Https),
            ("a.example:8443", Scheme::Https),
        ] {
            let d = dest(authority);
            assert_eq!(
                egress_allowed(None, &d, scheme),
                egress_allowed(Some(&star), &d, scheme),
                "null and [\"*\"] agree on {authority}"
            );
        }
    }

    #[test]
    fn egress_empty_allowlist_allows_nothing() {
        let empty = matcher(&[]);
        assert!(empty.is_empty());
        assert!(!egress_allowed(
            Some(&empty),
            &dest("api.x.com:443"),
            Scheme::Https
        ));
    }

    #[test]
    fn egress_follows_allowlist() {
        let m = matcher(&["api.x.com"]);
        assert!(egress_allowed(
            Some(&m),
            &dest("api.x.com:443"),
            Scheme::Https
        ));
        assert!(egress_allowed(
            Some(&m),
            &dest("api.x.com:80"),
            Scheme::Http
        ));
        assert!(!egress_allowed(
            Some(&m),
            &dest("api.x.com:80"),
            Scheme::Https
        ));
        assert!(!egress_allowed(
            Some(&m),
            &dest("other.x.com:443"),
            Scheme::Https
        ));
    }

    #[test]
    fn plain_http_never_unseals_but_its_host_rules_are_those_of_port_80() {
        let m = matcher(&["api.x.com"]);
        let d = dest("api.x.com:80");
        assert!(!secret_allowed(None, Some(&m), &d, Scheme::Http));
        assert!(secret_host_matches(None, Some(&m), &d, Scheme::Http));
        assert!(secret_host_matches(Some(&m), None, &d, Scheme::Http));
        assert!(!secret_host_matches(None, Some(&m), &d, Scheme::Https));
        assert!(!secret_host_matches(
            None,
            Some(&m),
            &dest("evil.com:80"),
            Scheme::Http
        ));
        assert!(!secret_host_matches(None, None, &d, Scheme::Http));
    }

    #[test]
    fn secret_with_no_restriction_is_never_unsealed() {
        assert!(!secret_allowed(
            None,
            None,
            &dest("api.x.com:443"),
            Scheme::Https
        ));
    }

    #[test]
    fn secret_needs_both_lists_when_both_set() {
        let store = matcher(&["*.x.com"]);
        let secret = matcher(&["api.x.com"]);
        let d = dest("api.x.com:443");
        assert!(secret_allowed(
            Some(&store),
            Some(&secret),
            &d,
            Scheme::Https
        ));
        let other = dest("www.x.com:443");
        assert!(!secret_allowed(
            Some(&store),
            Some(&secret),
            &other,
            Scheme::Https
        ));
        let narrow_store = matcher(&["www.x.com"]);
        assert!(!secret_allowed(
            Some(&narrow_store),
            Some(&secret),
            &d,
            Scheme::Https
        ));
    }

    #[test]
    fn secret_with_one_list_uses_that_list() {
        let m = matcher(&["api.x.com"]);
        let d = dest("api.x.com:443");
        assert!(secret_allowed(Some(&m), None, &d, Scheme::Https));
        assert!(secret_allowed(None, Some(&m), &d, Scheme::Https));
        assert!(!secret_allowed(
            None,
            Some(&m),
            &dest("evil.com:443"),
            Scheme::Https
        ));
    }

    #[test]
    fn secret_with_empty_list_is_never_unsealed() {
        let empty = matcher(&[]);
        let d = dest("api.x.com:443");
        assert!(!secret_allowed(Some(&empty), None, &d, Scheme::Https));
        assert!(!secret_allowed(None, Some(&empty), &d, Scheme::Https));
    }

    #[test]
    fn secret_never_unsealed_over_plain_http() {
        let m = matcher(&["api.x.com", "api.x.com:8080"]);
        assert!(!secret_allowed(
            Some(&m),
            Some(&m),
            &dest("api.x.com:80"),
            Scheme::Http
        ));
        assert!(!secret_allowed(
            Some(&m),
            None,
            &dest("api.x.com:8080"),
            Scheme::Http
        ));
    }
}
