//! The database URL: parsed once, shown only with its password replaced, and with the TLS it
//! asks for.
//!
//! Invariants: the only ways to turn a [`DatabaseUrl`] into text are `Display` and `Debug`, and
//! both print [`DatabaseUrl::redacted`]; the full text (with the password) is only handed to the
//! driver ([`DatabaseUrl::pg_config`]) and is wiped from memory on drop. `sslmode=require` means
//! TLS with a verified certificate (chain to the web PKI roots or to `[store] ca_files`, name =
//! the URL's host); `disable` and `prefer` (the driver's default) connect without TLS.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

/// A PostgreSQL connection string (`postgres://user:pass@host:port/db?…` or the key=value form
/// `host=… user=… password=…`). Never printed with its password.
#[derive(Clone)]
pub struct DatabaseUrl {
    full: Zeroizing<String>,
    redacted: String,
    /// Set when the URL says `sslmode=require`.
    tls: Option<MakeRustlsConnect>,
}

impl DatabaseUrl {
    /// Parses `text` with the driver's own parser, so what is accepted here is what connects.
    ///
    /// # Errors
    /// A message naming the problem, never quoting the text (it may hold a password).
    pub fn parse(text: String) -> Result<Self, String> {
        let full = Zeroizing::new(text);
        let config = match tokio_postgres::Config::from_str(&full) {
            Ok(c) => c,
            Err(_) if libpq_verify_mode(&full) => {
                return Err("sslmode=verify-ca and verify-full are libpq's names: say \
                            sslmode=require, which verifies the server's certificate chain and \
                            host name"
                    .into())
            }
            Err(e) => {
                return Err(format!(
                    "not a PostgreSQL connection string ({})",
                    redact_err(&e)
                ))
            }
        };
        let redacted = redact(&full);
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(verified_tls(&[])?),
            _ => None,
        };
        Ok(DatabaseUrl {
            full,
            redacted,
            tls,
        })
    }

    /// Also trusts the CA certificates in `ca_files` (PEM) for the server's certificate.
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate; files given while the URL does not
    /// say `sslmode=require` (they would be ignored, and the connection would not be TLS).
    pub fn with_ca_files(mut self, ca_files: &[PathBuf]) -> Result<Self, String> {
        if ca_files.is_empty() {
            return Ok(self);
        }
        if self.tls.is_none() {
            return Err(CA_FILES_WITHOUT_TLS.into());
        }
        self.tls = Some(verified_tls(ca_files)?);
        Ok(self)
    }

    /// Whether the URL says `sslmode=require`.
    pub fn requires_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS connector, when the URL says `sslmode=require`.
    pub(crate) fn tls(&self) -> Option<MakeRustlsConnect> {
        self.tls.clone()
    }

    /// The form for logs and errors: the password (if any) replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Whether the text carries a password (then the file holding it must be private).
    pub fn has_password(&self) -> bool {
        self.pg_config().get_password().is_some()
    }

    /// The driver configuration.
    pub(crate) fn pg_config(&self) -> tokio_postgres::Config {
        tokio_postgres::Config::from_str(&self.full).expect("checked by DatabaseUrl::parse")
    }
}

/// Equal when the whole text is (a changed password is a change).
impl PartialEq for DatabaseUrl {
    fn eq(&self, other: &Self) -> bool {
        *self.full == *other.full
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted)
    }
}

/// Whether `text` asks for libpq's `verify-ca`/`verify-full`, which the driver does not know
/// (its own `require` verifies both; an outside pass got only "invalid connection string").
fn libpq_verify_mode(text: &str) -> bool {
    let t: String = text
        .to_ascii_lowercase()
        .chars()
        .filter(|c| !c.is_whitespace() && !matches!(c, '\'' | '"'))
        .collect();
    ["sslmode=verify-ca", "sslmode=verify-full"]
        .iter()
        .any(|m| t.contains(m))
}

/// Why `[store] ca_files` without `sslmode=require` is refused: they would be ignored, and the
/// connection would not be TLS.
pub const CA_FILES_WITHOUT_TLS: &str =
    "store.ca_files is set, but the database URL does not say sslmode=require";

/// The driver's TLS connector over [`crate::tls_roots::client_tls`], offering ALPN
/// `postgresql` (PostgreSQL 17 requires it with `sslnegotiation=direct`; older servers ignore
/// it).
fn verified_tls(ca_files: &[PathBuf]) -> Result<MakeRustlsConnect, String> {
    let config =
        crate::tls_roots::client_tls(ca_files).map_err(|e| format!("store.ca_files: {e}"))?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

/// The driver's parse errors name the offending parameter, not its value; keep only the kind.
fn redact_err(e: &tokio_postgres::Error) -> String {
    let text = e.to_string();
    text.split(':')
        .next()
        .unwrap_or("invalid")
        .trim()
        .to_owned()
}

/// Replaces the password of a URL (`scheme://user:PASS@…`) or of a key=value string
/// (`password=PASS` / `password='PASS'`) and any `password=` query parameter with `***`.
fn redact(text: &str) -> String {
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        redact_url(text)
    } else {
        redact_key_value(text)
    }
}

/// Everything up to the *last* `@` of the text after `://` is hidden after the user name,
/// wherever it stands. tokio-postgres ends the user information at the first `@`, but a
/// password with an unencoded `@` (`sg:Cfg@Leak@db`) would then show its tail as part of the
/// "host": hiding up to the last `@` covers both readings (at worst it hides more), and a
/// password holding `/` or `?` stays inside too. Example: `postgres://sg:Ab/cd@db/x` →
/// `postgres://sg:***@db/x`.
fn redact_url(text: &str) -> String {
    let (scheme, rest) = text.split_once("://").expect("caller checked the scheme");
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some((userinfo, hosts_and_tail)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            (format!("{user}{hidden}@"), hosts_and_tail)
        }
        None => (String::new(), rest),
    };
    let tail = match rest.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_query(query)),
        None => rest.to_owned(),
    };
    format!("{scheme}://{userinfo}{tail}")
}

/// Query keys shown with their values, spelled exactly so; every other key's value is shown as
/// `***`. Matching `password` alone missed `pass%77ord`, which the driver decodes to `password`
/// (outside pass): an allowlist hides whatever spelling a key may take.
const SHOWN_QUERY_KEYS: &[&str] = &[
    "application_name",
    "channel_binding",
    "connect_timeout",
    "dbname",
    "host",
    "hostaddr",
    "keepalives",
    "keepalives_idle",
    "load_balance_hosts",
    "options",
    "port",
    "sslmode",
    "sslnegotiation",
    "target_session_attrs",
    "tcp_user_timeout",
    "user",
];

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if !SHOWN_QUERY_KEYS.contains(&k) => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// key=value form, read with the driver's grammar: a keyword (up to whitespace or `=`), `=`,
/// then a value, single-quoted or bare, where a backslash escapes the next character in
/// both. Only the keys of [`SHOWN_QUERY_KEYS`] keep their values. A scan for `password` that
/// stopped a bare value at the first space showed the rest of `password=A\ B` (outside
/// re-check).
fn redact_key_value(text: &str) -> String {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let Some(after_eq) = rest[key_end..].trim_start().strip_prefix('=') else {
            out.push(format!("{key}=***"));
            break;
        };
        let value = after_eq.trim_start();
        let (raw, next) = split_value(value);
        if SHOWN_QUERY_KEYS.contains(&key) {
            out.push(format!("{key}={raw}"));
        } else {
            out.push(format!("{key}=***"));
        }
        rest = next.trim_start();
    }
    out.join(" ")
}

/// One key=value value as written (quoted or bare, backslash escapes kept) and the text after.
fn split_value(value: &str) -> (&str, &str) {
    let quoted = value.starts_with('\'');
    let mut escaped = false;
    for (i, c) in value.char_indices().skip(usize::from(quoted)) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' if quoted => return value.split_at(i + 1),
            c if c.is_whitespace() && !quoted => return value.split_at(i),
            _ => {}
        }
    }
    (value, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str) -> String {
        DatabaseUrl::parse(text.to_owned()).unwrap().to_string()
    }

    fn url(text: &str) -> DatabaseUrl {
        DatabaseUrl::parse(text.to_owned()).unwrap()
    }

    #[test]
    fn libpq_verify_modes_are_refused_naming_require() {
        for text in [
            "host=db user=sg sslmode=verify-full",
            "postgres://sg@db/sealgate?sslmode=verify-ca",
            "host=db user=sg sslmode = verify-full",
            "host=db user=sg sslmode='verify-ca'",
        ] {
            let err = DatabaseUrl::parse(text.to_owned()).err().unwrap();
            assert!(err.contains("say sslmode=require"), "{err}");
        }
    }

    #[test]
    fn only_sslmode_require_means_tls() {
        assert!(url("host=db user=sg sslmode=require").tls().is_some());
        assert!(url("postgres://sg@db/x?sslmode=require").tls().is_some());
        for plain in [
            "host=db user=sg",
            "host=db user=sg sslmode=prefer",
            "host=db user=sg sslmode=disable",
        ] {
            assert!(url(plain).tls().is_none(), "{plain}");
        }
    }

    #[test]
    fn ca_files_need_sslmode_require_and_a_readable_certificate() {
        let err = url("host=db user=sg")
            .with_ca_files(&[PathBuf::from("/etc/ssl/db-ca.pem")])
            .err()
            .unwrap();
        assert!(err.contains("sslmode=require"), "{err}");
        let err = url("host=db user=sg sslmode=require")
            .with_ca_files(&[PathBuf::from("/nonexistent/db-ca.pem")])
            .err()
            .unwrap();
        assert!(
            err.starts_with("store.ca_files: /nonexistent/db-ca.pem"),
            "{err}"
        );
        assert!(url("host=db user=sg").with_ca_files(&[]).is_ok());
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            shown("postgres://sg:s3cret-PW@db.internal:5433/sealgate?sslmode=disable"),
            "postgres://sg:***@db.internal:5433/sealgate?sslmode=disable"
        );
        assert_eq!(
            shown("postgresql://sg@db/sealgate?password=s3cret-PW&application_name=x"),
            "postgresql://sg@db/sealgate?password=***&application_name=x"
        );
        assert_eq!(shown("postgres://db/x"), "postgres://db/x");
    }

    /// The driver decodes query keys: `pass%77ord` sets the password (outside pass), so only
    /// keys known to be harmless keep their values in the shown form.
    #[test]
    fn an_encoded_password_key_is_redacted_too() {
        for key in ["pass%77ord", "%70assword", "%70%61%73%73%77%6f%72%64"] {
            let text = format!("postgres://sg@db/x?{key}=s3cret-PW&sslmode=disable");
            assert_eq!(
                shown(&text),
                format!("postgres://sg@db/x?{key}=***&sslmode=disable")
            );
        }
        let text = "postgres://sg@db/x?pass%77ord=s3cret-PW";
        assert_eq!(
            url(text).pg_config().get_password(),
            Some(&b"s3cret-PW"[..])
        );
        assert_eq!(
            shown("postgres://sg@db/x?application_name=n1&connect_timeout=5"),
            "postgres://sg@db/x?application_name=n1&connect_timeout=5"
        );
    }

    /// tokio-postgres takes the credentials up to the first `@` of the whole text, so a
    /// password holding `/` or `?` (base64 often does) must be hidden all the same.
    #[test]
    fn passwords_with_slash_or_question_mark_are_redacted() {
        for (url, want) in [
            ("postgres://sg:Ab/cd@db/x", "postgres://sg:***@db/x"),
            (
                "postgres://sg:Cfg@Leak_8@db:5432/x",
                "postgres://sg:***@db:5432/x",
            ),
            (
                "postgres://sg:pa?ss@db:5432/x",
                "postgres://sg:***@db:5432/x",
            ),
            (
                "postgres://sg:a/b?c@db/x?password=z9",
                "postgres://sg:***@db/x?password=***",
            ),
        ] {
            let got = shown(url);
            assert_eq!(got, want);
            for secret in ["Ab/cd", "pa?ss", "a/b?c", "z9"] {
                assert!(!got.contains(secret), "{got}");
            }
        }
    }

    #[test]
    fn key_value_passwords_are_redacted() {
        assert_eq!(
            shown("host=/run/pg user=sg password=s3cret-PW dbname=x"),
            "host=/run/pg user=sg password=*** dbname=x"
        );
        assert_eq!(
            shown("host=db password = 'it\\'s s3cret-PW' dbname=x"),
            "host=db password=*** dbname=x"
        );
        // A backslash escapes a space in a bare value: the whole value is hidden.
        assert_eq!(
            shown("host=db password=s3cret\\ PW-tail dbname=x"),
            "host=db password=*** dbname=x"
        );
        assert_eq!(
            url("host=db password=s3cret\\ PW-tail")
                .pg_config()
                .get_password(),
            Some(&b"s3cret PW-tail"[..])
        );
    }

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let url = DatabaseUrl::parse("postgres://sg:s3cret-PW@db/x".into()).unwrap();
        assert!(!format!("{url:?}").contains("s3cret-PW"));
        let err = DatabaseUrl::parse("postgres://sg:s3cret-PW@db/x?bogus_option=1".into())
            .err()
            .unwrap();
        assert!(!err.contains("s3cret-PW"), "{err}");
    }
}
