//! The admin API's bearer token: checked on every call, re-read from its file on a reload.
//!
//! Invariants: a check compares, in constant time, against the token current at that moment;
//! a reload replaces the token whole or keeps it — a file that is missing, empty, not a regular
//! file or open to group or others keeps the running token, and the reload says why; a token
//! from `SEALGATE_ADMIN_TOKEN` has no file and is never replaced. The token is never logged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use axum::http::{header, HeaderMap};

use crate::secret::SecretValue;

/// Tokens shorter than this get a warning (the generated one has 64 hex characters).
const SHORT: usize = 32;
/// A token file larger than this is refused (a token is one line; the CLI reads as much).
const MAX_FILE: u64 = 64 * 1024;

/// The token and the file it came from (None: `SEALGATE_ADMIN_TOKEN`).
pub struct AdminToken {
    current: RwLock<SecretValue>,
    file: Option<PathBuf>,
    /// How many times the token was replaced: a connection trusted under an older generation
    /// is trusted no more ([`super::slots`]).
    generation: AtomicU64,
}

/// What a reload did with the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenReload {
    /// The file holds the running token.
    Unchanged,
    /// The file held another token, which replaced the running one: the old one opens nothing.
    Replaced,
    /// The token came from `SEALGATE_ADMIN_TOKEN`; a restart is the only way to change it.
    FromEnvironment,
}

impl TokenReload {
    /// The word the reload answer and the log carry.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenReload::Unchanged => "unchanged",
            TokenReload::Replaced => "replaced",
            TokenReload::FromEnvironment => "from_environment",
        }
    }
}

impl AdminToken {
    /// A token and where it came from.
    pub fn new(token: SecretValue, file: Option<PathBuf>) -> Self {
        Self {
            current: RwLock::new(token),
            file,
            generation: AtomicU64::new(0),
        }
    }

    /// The file the token is read from (None when it came from the environment).
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The running token (a cheap handle; tests and the start-up need it, never a log).
    pub fn current(&self) -> SecretValue {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether `headers` carry the running token as a bearer token (constant time).
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        self.matched(headers).is_some()
    }

    /// The generation of the running token when `headers` carry it (read together with the
    /// token, so a request matched under a replaced token never gets the new generation).
    pub fn matched(&self, headers: &HeaderMap) -> Option<u64> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        token_matches(&current, headers).then(|| self.generation.load(Ordering::Acquire))
    }

    /// The running token's generation (0 at start, one more at each replacement).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads the file and, when it holds another token, makes that the running one.
    ///
    /// # Errors
    /// As [`AdminToken::stage`]: the running token stays.
    pub fn reload(&self) -> Result<TokenReload, String> {
        self.stage().map(|staged| self.install(staged))
    }

    /// Reads the token the file holds now, without using it yet (a reload checks every part
    /// before it applies any). `None` when the token came from the environment.
    ///
    /// # Errors
    /// The file is missing, empty, unreadable, not a regular file or open to group or others;
    /// the message says why.
    pub fn stage(&self) -> Result<Option<SecretValue>, String> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        match read_file(path) {
            Ok(Some(t)) => Ok(Some(t)),
            Ok(None) => Err(format!(
                "{} is missing: write the new token into it (0600) before reloading",
                path.display()
            )),
            Err(e) => Err(format!("admin token: {e}")),
        }
    }

    /// Makes a [`AdminToken::stage`]d token the running one.
    pub fn install(&self, staged: Option<SecretValue>) -> TokenReload {
        let Some(new) = staged else {
            return TokenReload::FromEnvironment;
        };
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if crate::secret::ct_eq(current.expose(), new.expose()) {
            return TokenReload::Unchanged;
        }
        *current = new;
        self.generation.fetch_add(1, Ordering::AcqRel);
        TokenReload::Replaced
    }
}

/// Whether `headers` carry `token` as a bearer token (compared in constant time), in their one
/// `Authorization` field: with two, the first decided, where another parser in front of the
/// API may read the last (the proxy refuses two `Proxy-Authorization` fields the same way;
/// outside pass h47a).
pub fn token_matches(token: &SecretValue, headers: &HeaderMap) -> bool {
    let mut fields = headers.get_all(header::AUTHORIZATION).iter();
    let (first, second) = (fields.next(), fields.next());
    let presented = first
        .filter(|_| second.is_none())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The auth scheme is case-insensitive (RFC 9110 §11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start());
    // An empty token never matches (a start refuses one; this holds whoever built the state).
    !token.expose().is_empty() && crate::secret::ct_eq(presented.as_bytes(), token.expose())
}

/// Reads an existing token file, trimmed: `Ok(None)` when there is none (a link to a missing
/// file is an error: replacing it would drop the operator's link).
///
/// # Errors
/// `InvalidData` with the reason for an empty file, a link to a missing file, or a mode open
/// to group or others (the token widens any store's allowlist, which lets a secret without
/// `allowed_hosts` go to any host: a 0644 token was used silently, found from outside); the
/// open's or read's error, with the path, otherwise (a FIFO or device is "not a regular file").
pub fn read_file(path: &Path) -> std::io::Result<Option<SecretValue>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let read = crate::fsutil::open_regular(path).and_then(|f| {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::Read::take(f, MAX_FILE + 1), &mut text)?;
        if text.len() as u64 > MAX_FILE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "is larger than {} KiB: a token is one line",
                    MAX_FILE / 1024
                ),
            ));
        }
        Ok(text)
    });
    let text = match read {
        Ok(text) => zeroize::Zeroizing::new(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() => {
            return Err(invalid(format!(
                "{} is a link to a missing file: point it at the token file, or remove it to \
                 have a token generated",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("reading {}: {e}", path.display()),
            ))
        }
    };
    // An empty token would match a request with no `Authorization` at all.
    if text.trim().is_empty() {
        return Err(invalid(format!(
            "{} is empty: write a long random token into it (openssl rand -hex 32), or delete \
             it (the next start generates one)",
            path.display()
        )));
    }
    if let Some(why) = unsendable(text.trim()) {
        return Err(invalid(format!(
            "{} holds {why}, which no client can send in an Authorization header: write one \
             line of visible ASCII (openssl rand -hex 32)",
            path.display()
        )));
    }
    refuse_open_mode(path).map_err(invalid)?;
    warn_short(text.trim(), &path.display().to_string());
    Ok(Some(SecretValue::new(text.trim().as_bytes().to_vec())))
}

/// Why `token` (trimmed) cannot be sent as a header value: a line break or other control
/// character (`openssl rand -base64 64` wraps its output), or a byte outside ASCII. A reload
/// took such a token and shut the API to everyone (outside re-check).
pub fn unsendable(token: &str) -> Option<&'static str> {
    if token.bytes().any(|b| b == b'\n' || b == b'\r') {
        Some("a line break")
    } else if token.bytes().any(|b| b.is_ascii_control()) {
        Some("a control character")
    } else if !token.is_ascii() {
        Some("a character outside ASCII")
    } else {
        None
    }
}

fn refuse_open_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(format!(
        "{0} has mode {mode:03o}; it must not be accessible by group or others (run `chmod \
         600 {0}`); refusing to use it",
        path.display()
    ))
}

/// The admin token guards every secret: a short one (any local process, proxy-only sandboxes
/// included, can try tokens against the loopback API) is worth a warning. Never logs the token.
pub fn warn_short(token: &str, from: &str) {
    if token.len() < SHORT {
        tracing::warn!(
            source = %from,
            length = token.len(),
            "the admin token is shorter than {SHORT} characters: use a long random one (the generated token has 64)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_reload_replaces_the_token_from_its_file_and_the_old_one_opens_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let old = "a".repeat(64);
        let new = "b".repeat(64);
        write(&path, &format!("{old}\n"), 0o600);
        let t = AdminToken::new(read_file(&path).unwrap().unwrap(), Some(path.clone()));
        assert!(t.matches(&bearer(&old)));
        assert_eq!(t.reload(), Ok(TokenReload::Unchanged));
        write(&path, &format!("{new}\n"), 0o600);
        assert_eq!(t.generation(), 0);
        assert_eq!(t.reload(), Ok(TokenReload::Replaced));
        assert!(t.matches(&bearer(&new)));
        assert!(!t.matches(&bearer(&old)));
        assert_eq!(t.matched(&bearer(&new)), Some(1));
        assert_eq!(t.reload(), Ok(TokenReload::Unchanged));
        assert_eq!(t.generation(), 1, "only a replacement counts");
    }

    #[test]
    fn a_bad_file_keeps_the_running_token_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let old = "c".repeat(64);
        write(&path, &old, 0o600);
        let t = AdminToken::new(read_file(&path).unwrap().unwrap(), Some(path.clone()));
        write(&path, "  \n", 0o600);
        assert!(t.reload().unwrap_err().contains("is empty"));
        write(&path, &"f".repeat(65 * 1024), 0o600);
        assert!(t.reload().unwrap_err().contains("larger than 64 KiB"));
        write(
            &path,
            &format!("{}\n{}\n", "g".repeat(64), "h".repeat(24)),
            0o600,
        );
        assert!(t.reload().unwrap_err().contains("a line break"));
        write(&path, &format!("{}é\n", "g".repeat(64)), 0o600);
        assert!(t.reload().unwrap_err().contains("outside ASCII"));
        write(
            &path,
            &format!("{}\t{}\n", "g".repeat(32), "h".repeat(32)),
            0o600,
        );
        assert!(t.reload().unwrap_err().contains("control character"));
        write(&path, &"d".repeat(64), 0o644);
        assert!(t.reload().unwrap_err().contains("mode 644"));
        std::fs::remove_file(&path).unwrap();
        assert!(t.reload().unwrap_err().contains("is missing"));
        assert!(t.matches(&bearer(&old)), "the running token stays");
    }

    #[test]
    fn an_empty_token_matches_nothing_not_even_a_missing_header() {
        let header = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(header::AUTHORIZATION, v.parse().unwrap());
            }
            h
        };
        let empty = SecretValue::new(Vec::new());
        for presented in [None, Some("Bearer "), Some("Bearer"), Some("Basic x")] {
            assert!(!token_matches(&empty, &header(presented)), "{presented:?}");
        }
        let t = SecretValue::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let lower = header(Some("bearer 0123456789abcdef0123456789abcdef"));
        assert!(token_matches(&t, &lower));
        assert!(!token_matches(&t, &header(None)));
    }

    /// Two `Authorization` fields open nothing, in either order, even with the token in both.
    #[test]
    fn two_authorization_fields_match_nothing() {
        let t = SecretValue::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let right = "Bearer 0123456789abcdef0123456789abcdef";
        for pair in [
            [right, "Bearer wrong"],
            ["Bearer wrong", right],
            [right, right],
        ] {
            let mut h = HeaderMap::new();
            for v in pair {
                h.append(header::AUTHORIZATION, v.parse().unwrap());
            }
            assert!(!token_matches(&t, &h), "{pair:?}");
        }
        assert!(token_matches(
            &t,
            &bearer("0123456789abcdef0123456789abcdef")
        ));
    }

    #[test]
    fn a_token_from_the_environment_is_never_replaced() {
        let t = AdminToken::new(SecretValue::new(b"e".repeat(64)), None);
        assert_eq!(t.reload(), Ok(TokenReload::FromEnvironment));
        assert!(t.matches(&bearer(&"e".repeat(64))));
    }
}
