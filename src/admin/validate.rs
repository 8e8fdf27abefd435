//! Input validation for the admin API: store names, secret names, values, patterns, locations.

use super::ApiError;
use crate::policy;
use crate::secret::Location;

/// Largest secret value accepted.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Store names: 1–128 characters, no control characters (nor the invisible bidirectional
/// formatting characters that make a name display as another in a terminal), not blank.
pub fn store_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() {
        return Err(ApiError::bad_request(
            "store name must not be empty or only whitespace",
        ));
    }
    if name.chars().count() > 128 {
        return Err(ApiError::bad_request(
            "store name must be 1 to 128 characters",
        ));
    }
    if name.trim() != name {
        return Err(ApiError::bad_request(
            "store name must not start or end with whitespace",
        ));
    }
    if uuid::Uuid::try_parse(name).is_ok() {
        // `secret_store` takes a name or an id: a name shaped like an id would be ambiguous.
        return Err(ApiError::bad_request(
            "store name must not have the form of a store id (a UUID)",
        ));
    }
    if name.chars().any(|c| c.is_control() || invisible(c)) {
        return Err(ApiError::bad_request(
            "store name must not contain control, bidirectional or invisible formatting characters",
        ));
    }
    if name.chars().any(odd_space) {
        return Err(ApiError::bad_request(
            "store name must not contain spaces other than the plain space U+0020 (no-break, \
             em, ideographic or blank-pattern spaces look the same in a list)",
        ));
    }
    if !unicode_normalization::is_nfc(name) {
        // "café" typed as e + U+0301 would be a second store that looks like the first.
        return Err(ApiError::bad_request(
            "store name must be in Unicode NFC form (composed characters: é, not e + U+0301)",
        ));
    }
    Ok(())
}

/// Characters that render as nothing, so two names that differ only by them look the same:
/// bidirectional controls, zero-width spaces and joiners, the word joiner and invisible
/// operators, the BOM, the soft hyphen, fillers and tag characters.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}'
        | '\u{ffa0}' | '\u{fff0}'..='\u{fff8}' | '\u{e0000}'..='\u{e0fff}')
}

/// Spaces that print as the plain space (or as nothing) but are not it (Unicode `Zs` but
/// U+0020, the line and paragraph separators U+2028/U+2029, and the braille blank U+2800): two
/// names that differ only by them look the same in `store list`.
fn odd_space(c: char) -> bool {
    matches!(
        c,
        '\u{00a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202f}'
                | '\u{205f}'
                | '\u{2800}'
                | '\u{3000}'
    )
}

/// `text` quoted for an error message if it is shorter than [`QUOTED_UNDER`] characters, else
/// only its length: a name and a value swapped by a caller (`set_secret(store, VALUE, NAME)`),
/// or a value used as a JSON key, must not come back in the error (and from there go into
/// client logs); values that short get a warning when set (too guessable).
pub fn quoted_if_short(text: &str) -> String {
    let n = text.chars().count();
    match n < QUOTED_UNDER {
        true => format!("'{}'", text.escape_default()),
        false => format!("({n} characters, not repeated: it could be a value)"),
    }
}

/// See [`quoted_if_short`]: the length under which the admin API warns that a value is short.
pub const QUOTED_UNDER: usize = 16;

/// Secret names are environment-variable names: `[A-Za-z_][A-Za-z0-9_]*`, at most 128 bytes.
pub fn secret_name(name: &str) -> Result<(), ApiError> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok || !rest_ok || name.len() > 128 {
        return Err(ApiError::bad_request(format!(
            "secret name {} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at \
             most 128 characters)",
            quoted_if_short(name)
        )));
    }
    if looks_like_credential(name) {
        // The name goes into every sandbox's environment, the audit log and `secret list` in
        // clear: a credential passed as the name by mistake must stop here, unrepeated.
        return Err(ApiError::bad_request(format!(
            "secret name {} looks like a credential, not a variable name (a known token \
             prefix, or a run of 24 or more mixed-case letters and digits): were the name and \
             the value swapped? Names are variable names such as ANTHROPIC_API_KEY",
            quoted_if_short(name)
        )));
    }
    if crate::sandbox::lifecycle::set_by_sealgate(name) {
        return Err(ApiError::bad_request(format!(
            "secret name {name} is a variable sealgate sets itself in sandboxes (proxy_env, or \
             isolated sandboxes' commands): the two would overwrite each other; choose another name"
        )));
    }
    Ok(())
}

/// Prefixes of credential formats whose characters are all valid in a variable name (GitHub,
/// Stripe, npm, Hugging Face, DigitalOcean, Shopify), each followed by at least 16 letters and
/// digits.
const CREDENTIAL_PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "sk_live_",
    "sk_test_",
    "rk_live_",
    "rk_test_",
    "npm_",
    "hf_",
    "dop_v1_",
    "shpat_",
    "shpss_",
    "shpca_",
];

/// True if `name` has the shape of a credential rather than of a variable name: a
/// [`CREDENTIAL_PREFIXES`] prefix followed by a run of 16 or more letters and digits of at
/// least two kinds (lower case, upper case, digits: random tokens mix them, and
/// `npm_configuserconfig` is one lower-case word), an AWS access key id (`AKIA`/`ASIA` and 16
/// of `A-Z2-7`, a digit among them, nothing more), or a run of 24 or more letters and digits
/// with two or more each of lower case, upper case and digits (variable names are words
/// joined by `_`; random tokens are not). Invariant: names made of single-case words, as
/// `ANTHROPIC_API_KEY` or `npm_config_registry`, never match.
pub fn looks_like_credential(name: &str) -> bool {
    let prefixed = CREDENTIAL_PREFIXES.iter().any(|p| {
        name.strip_prefix(p).is_some_and(|rest| {
            let run = rest.split(|c: char| !c.is_ascii_alphanumeric()).next();
            run.is_some_and(|r| r.len() >= 16 && kinds(r) >= 2)
        })
    });
    prefixed || aws_key_id(name) || name.split('_').any(random_looking)
}

/// How many of lower case, upper case and digits `run` holds (0–3).
fn kinds(run: &str) -> usize {
    let has = |f: fn(&u8) -> bool| usize::from(run.bytes().any(|b| f(&b)));
    has(u8::is_ascii_lowercase) + has(u8::is_ascii_uppercase) + has(u8::is_ascii_digit)
}

/// `AKIA`/`ASIA` and exactly 16 base32 characters (`A-Z2-7`), at least one a digit.
fn aws_key_id(name: &str) -> bool {
    let rest = name
        .strip_prefix("AKIA")
        .or_else(|| name.strip_prefix("ASIA"));
    rest.is_some_and(|r| {
        r.len() == 16
            && r.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
            && r.bytes().any(|b| b.is_ascii_digit())
    })
}

/// A run of 24 or more ASCII letters and digits with at least two of each kind (lower case,
/// upper case, digit) in it: a camel-case word with one number in it is a name.
fn random_looking(run: &str) -> bool {
    let count = |f: fn(&u8) -> bool| run.bytes().filter(f).count();
    run.len() >= 24
        && run.bytes().all(|b| b.is_ascii_alphanumeric())
        && count(u8::is_ascii_lowercase) >= 2
        && count(u8::is_ascii_uppercase) >= 2
        && count(u8::is_ascii_digit) >= 2
}

/// Variables every isolated sandbox's command starts with, or that the dynamic loader reads:
/// a secret of such a name replaces it with the secret's token (see [`shadows_process_var`]).
const PROCESS_VARS: &[&str] = &[
    "PATH", "HOME", "LANG", "TMPDIR", "USER", "LOGNAME", "SHELL", "PWD",
];

/// True if a secret named `name` would replace a variable processes rely on (its token as
/// `PATH` leaves a command unable to find any program): accepted, with a warning.
pub fn shadows_process_var(name: &str) -> bool {
    PROCESS_VARS.contains(&name) || name.starts_with("LD_")
}

/// Secret values: 1 byte to 64 KiB, no control characters except horizontal tab. Every
/// failure is 400 `invalid_secret_value`; messages never quote the value.
///
/// Refused: every C0 control (`0x00`–`0x1F`) but HTAB, and DEL (`0x7F`). A header value may
/// not contain them (RFC 9110 §5.5; `http::HeaderValue` refuses them), so such a value could
/// never be unsealed into a header — it would be accepted here and then silently travel
/// sealed. HTAB is allowed: RFC 9110 permits it inside field values, `HeaderValue` accepts it,
/// query unsealing percent-encodes it and bodies carry any byte. (A tab at either *end* of a
/// value would be trimmed by header parsers as whitespace around the field value; the
/// substitution itself keeps it.)
pub fn secret_value(value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(invalid_value("secret value must not be empty"));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(invalid_value("secret value is larger than 64 KiB"));
    }
    if value.bytes().any(crate::secret::refused_in_value) {
        return Err(invalid_value(
            "secret value must not contain control characters (CR, LF, NUL, any other C0 \
             control except tab, or DEL)",
        ));
    }
    Ok(())
}

fn invalid_value(message: impl Into<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid_secret_value",
        message,
    )
}

/// Validates and canonicalises host patterns (DESIGN.md §3). `field` names the JSON field.
pub fn patterns(field: &str, list: Option<Vec<String>>) -> Result<Option<Vec<String>>, ApiError> {
    patterns_hiding(field, list, false)
}

/// A secret body's `allowed_hosts`: [`patterns`], except that a refused pattern is named by
/// its place and length, not repeated, unless it is short ([`quoted_if_short`]): a value put
/// in the wrong field — the body's own, or the real key with `value` and `allowed_hosts`
/// swapped — came back whole in the 400 and so in the client's logs (outside pass and its
/// re-check; unknown fields and locations were already not repeated).
pub fn secret_patterns(list: Option<Vec<String>>) -> Result<Option<Vec<String>>, ApiError> {
    patterns_hiding("allowed_hosts", list, true)
}

fn patterns_hiding(
    field: &str,
    list: Option<Vec<String>>,
    hide: bool,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(list) = list else { return Ok(None) };
    if list.len() > 10_000 {
        return Err(ApiError::bad_request(format!(
            "{field}: at most 10000 patterns"
        )));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, raw) in list.iter().enumerate() {
        let p = policy::parse_pattern(raw).map_err(|e| match hide {
            true if raw.chars().count() >= QUOTED_UNDER => ApiError::bad_request(format!(
                "{field}[{i}] {} is not a valid host pattern (a host name, `*.` and a \
                 suffix, or `*`, each with an optional `:port`): was a value put in the wrong \
                 field?",
                quoted_if_short(raw)
            )),
            _ => ApiError::bad_request(format!("{field}: {e}")),
        })?;
        let canonical = p.to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(Some(out))
}

/// Locations: default `["header", "body"]`; must not be empty; duplicates dropped.
pub fn locations(list: Option<Vec<Location>>) -> Result<Vec<Location>, ApiError> {
    let Some(mut list) = list else {
        return Ok(Location::DEFAULT.to_vec());
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(
            "locations must name at least one of \"header\", \"query\", \"body\"",
        ));
    }
    list.sort();
    list.dedup();
    Ok(list)
}

/// A store id as the store keeps it: a UUID in any form `uuid` parses (upper case, braces,
/// `urn:uuid:`, no hyphens) becomes the lower-case hyphenated text the store gave it, so a
/// client that changed its case still finds the store (RFC 9562 §4: UUIDs compare without
/// case; outside pass h39c got 404). Anything else is a name or an unknown id, unchanged.
pub fn store_id(id: String) -> String {
    match uuid::Uuid::try_parse(&id) {
        Ok(u) => u.hyphenated().to_string(),
        Err(_) => id,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refused_secret_pattern_is_not_repeated_unless_short() {
        let value = "FAKE-value-0123456789";
        let list = |p: &str| Some(vec!["api.example.com".to_string(), p.to_string()]);
        let swapped = "sk_live_FAKE_0123456789abcdef".to_string(); // `_`: not a host name
        let bad = [
            format!("x.com:{value}"),
            format!("{value}*"),
            format!("https://{value}/"),
            swapped,
        ];
        for bad in bad {
            let err = format!("{:?}", super::secret_patterns(list(&bad)).unwrap_err());
            assert!(!err.contains(&bad) && !err.contains("FAKE"), "{err}");
            assert!(
                err.contains("allowed_hosts[1]") && err.contains("wrong"),
                "{err}"
            );
        }
        let err = format!("{:?}", super::secret_patterns(list("a..b")).unwrap_err());
        assert!(err.contains("a..b"), "a short typo is still quoted: {err}");
        let ok = super::secret_patterns(list("*.example.org")).unwrap();
        assert_eq!(ok.unwrap().len(), 2);
        let err = format!(
            "{:?}",
            super::patterns("egress_allowlist", list("bad_host_name_here.com")).unwrap_err()
        );
        assert!(
            err.contains("bad_host_name_here.com"),
            "a store's allowlist still quotes: {err}"
        );
    }

    #[test]
    fn credentials_passed_as_names_are_refused_without_being_repeated() {
        let credentials = [
            "ghp_REALVALUEh31b16C7e42F292c6912E7710c838347Ae178B4a",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "sk_live_51HxYzAbCdEfGhIjKlMnOpQr",
            "npm_abcdefghijklmnopqrstuvwxyz0123456789",
            "hf_abcdefghijklmnopqrstuvwxyzABCDEFGH",
            "dop_v1_0123456789abcdef0123456789abcdef",
            "AKIAIOSFODNN7EXAMPLE",
            "abcDEF123ghiJKL456mnoPQR789",
            "MY_KEY_aB3dE5gH7jK9mN1pQ3sT5vX7",
        ];
        for c in credentials {
            assert!(super::looks_like_credential(c), "{c}");
            let err = format!("{:?}", super::secret_name(c).unwrap_err());
            assert!(!err.contains(c) && err.contains("swapped"), "{err}");
        }
        let names = [
            "ANTHROPIC_API_KEY",
            "OPENAI_API_KEY",
            "AWS_SECRET_ACCESS_KEY",
            "AKIA_REGION",
            "ASIAPACIFICREGIONKEY",
            "npm_config_registry",
            "github_token",
            "sk_test_mode",
            "AZURE_OPENAI_API_KEY_FOR_PRODUCTION_DEPLOYMENT2",
            "VeryLongCamelCaseName2Ok",
            "hf_transformerscache",
            "npm_configuserconfig",
            "sk_test_webhooksigningsecret",
            "gho_OAUTHCLIENTSECRETNAME",
            "x",
        ];
        for n in names {
            assert!(!super::looks_like_credential(n), "{n}");
            assert!(super::secret_name(n).is_ok(), "{n}");
        }
    }

    use super::*;

    #[test]
    fn env_var_names() {
        assert!(secret_name("ANTHROPIC_API_KEY").is_ok());
        assert!(secret_name("_x1").is_ok());
        for bad in ["", "1ABC", "A-B", "A B", "ÄB", "A=B"] {
            assert!(secret_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_sealgate_sets_are_refused_and_process_names_flagged() {
        for taken in [
            "HTTPS_PROXY",
            "http_proxy",
            "NO_PROXY",
            "SSL_CERT_FILE",
            "GIT_SSL_CAINFO",
            "SEALGATE_SANDBOX_ID",
        ] {
            let e = secret_name(taken).expect_err(taken);
            assert!(format!("{e:?}").contains("sets itself"), "{taken}: {e:?}");
        }
        assert!(secret_name("HTTPS_PROXY_KEY").is_ok());
        for flagged in ["PATH", "HOME", "LD_PRELOAD", "LD_LIBRARY_PATH"] {
            assert!(secret_name(flagged).is_ok(), "{flagged}");
            assert!(shadows_process_var(flagged), "{flagged}");
        }
        assert!(!shadows_process_var("OPENAI_API_KEY"));
        assert!(!shadows_process_var("PATHS"));
    }

    #[test]
    fn store_names_are_never_ambiguous() {
        assert!(store_name("my-agent-secrets").is_ok());
        assert!(store_name("inner space").is_ok());
        assert!(store_name("caf\u{e9}").is_ok());
        for bad in [
            "",
            "  ",
            " padded",
            "padded\t",
            "d6bd8c8d-1f2e-4a3b-9c4d-5e6f7a8b9c0d",
            "D6BD8C8D-1F2E-4A3B-9C4D-5E6F7A8B9C0D",
            "prod\u{200b}",
            "pr\u{2060}od",
            "\u{feff}prod",
            "prod\u{00ad}",
            "prod\u{e0041}",
            "cafe\u{0301}",
            "my\u{00a0}store",
            "my\u{2003}store",
            "my\u{3000}store",
            "my\u{2800}store",
            "my\u{202f}store",
            "my\u{2028}store",
        ] {
            assert!(store_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values() {
        assert!(secret_value("sk-1").is_ok());
        for bad in [
            "", "a\nb", "a\rb", "a\0b", "a\x01b", "a\x1bb", "a\x7fb", "\x1f",
        ] {
            assert!(secret_value(bad).is_err(), "{bad:?}");
        }
        for b in (0u8..0x20).chain([0x7f]) {
            let v = format!("sk-{}", b as char);
            assert_eq!(secret_value(&v).is_err(), b != b'\t', "byte {b:#04x}");
        }
        assert!(secret_value("a\tb").is_ok());
        assert!(secret_value("sk-ünïcode-\u{80}").is_ok());
        assert!(secret_value(&"a".repeat(MAX_VALUE_BYTES + 1)).is_err());
    }
}
