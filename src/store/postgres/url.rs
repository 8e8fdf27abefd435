//! The database URL: parsed once, shown only with its password replaced.
//!
//! Invariant: the only ways to turn a [`DatabaseUrl`] into text are `Display` and `Debug`, and
//! both print [`DatabaseUrl::redacted`]; the full text (with the password) is only handed to the
//! driver ([`DatabaseUrl::pg_config`]) and is wiped from memory on drop.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

/// A PostgreSQL connection string (`postgres://user:pass@host:port/db?…` or the key=value form
/// `host=… user=… password=…`). Never printed with its password.
#[derive(Clone)]
pub struct DatabaseUrl {
    full: Zeroizing<String>,
    redacted: String,
}

impl DatabaseUrl {
    /// Parses `text` with the driver's own parser, so what is accepted here is what connects.
    ///
    /// # Errors
    /// A message naming the problem, never quoting the text (it may hold a password).
    pub fn parse(text: String) -> Result<Self, String> {
        let full = Zeroizing::new(text);
        if let Err(e) = tokio_postgres::Config::from_str(&full) {
            return Err(format!(
                "not a PostgreSQL connection string ({})",
                redact_err(&e)
            ));
        }
        let redacted = redact(&full);
        Ok(DatabaseUrl { full, redacted })
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

/// The user information ends at the *first* `@` of the text after `://`, wherever it stands:
/// that is how tokio-postgres reads it, so a password holding `/`, `?` or `@`-free base64 is
/// still inside what we hide. Example: `postgres://sg:Ab/cd@db/x` → `postgres://sg:***@db/x`.
fn redact_url(text: &str) -> String {
    let (scheme, rest) = text.split_once("://").expect("caller checked the scheme");
    let (userinfo, rest) = match rest.split_once('@') {
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

fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k == "password" => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// key=value form: values may be single-quoted with `\'` escapes.
fn redact_key_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("password") {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let after_key = after["password".len()..].trim_start();
        let Some(value) = after_key.strip_prefix('=') else {
            out.push_str("password");
            rest = &after["password".len()..];
            continue;
        };
        out.push_str("password=***");
        rest = skip_value(value.trim_start());
    }
    out.push_str(rest);
    out
}

/// The text after one key=value value (quoted or bare).
fn skip_value(value: &str) -> &str {
    if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '\'' if !escaped => return &quoted[i + 1..],
                _ => escaped = false,
            }
        }
        return "";
    }
    let end = value.find(char::is_whitespace).unwrap_or(value.len());
    &value[end..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(text: &str) -> String {
        DatabaseUrl::parse(text.to_owned()).unwrap().to_string()
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

    /// tokio-postgres takes the credentials up to the first `@` of the whole text, so a
    /// password holding `/` or `?` (base64 often does) must be hidden all the same.
    #[test]
    fn passwords_with_slash_or_question_mark_are_redacted() {
        for (url, want) in [
            ("postgres://sg:Ab/cd@db/x", "postgres://sg:***@db/x"),
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
