//! The one mapping from admin failures to HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::isolation::IsolationError;
use crate::sandbox::SandboxError;
use crate::store::{Missing, StoreError};

/// An admin API failure: status, machine code, human message (never a secret value).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 404 for a path the API does not have: its own code, so a client can tell a wrong base
    /// URL from a missing store, secret or sandbox (the SDK's idempotent deletes took it for
    /// "already gone").
    pub fn no_such_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "no_such_route", "no such route")
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token",
        )
    }

    /// Any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut res = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: a 401 names the scheme it wants.
            res.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"sealgate-admin\""),
            );
        }
        res
    }
}

/// `what` (`store 'x'`) with each id or name that could be a value replaced by its length
/// ([`shown`]): an id or name the caller gave and that was not found comes back only when it
/// is short or shaped like an id — a value passed where the store id goes (arguments swapped)
/// came back whole in the 404 and so in client logs (the last re-check). Each name is taken
/// whole from [`Missing`], never re-read from a message (a name holding `'` did: a review).
pub fn unrepeated_names(what: &Missing) -> String {
    let named = format!("{} {}", what.kind, shown(&what.name, true));
    match &what.store {
        Some(store) => format!("{named} in store {}", shown(store, true)),
        None => named,
    }
}

/// `text` (quoted if `quote`) when it is short, a UUID (store ids) or a sandbox id; else its
/// length, saying it is not repeated.
fn shown(text: &str, quote: bool) -> String {
    let sandbox_id = text.len() == 28
        && text.starts_with("sbx_")
        && text[4..].bytes().all(|b| b.is_ascii_hexdigit());
    let n = text.chars().count();
    match uuid::Uuid::try_parse(text).is_ok() || sandbox_id || n < super::validate::QUOTED_UNDER {
        true if quote => format!("'{}'", text.escape_default()),
        true => text.escape_default().to_string(),
        false => format!("({n} characters, not repeated: it could be a value)"),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => {
                ApiError::not_found(format!("{} not found", unrepeated_names(&what)))
            }
            StoreError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Database(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure
                ) =>
            {
                tracing::error!(error = %e, "admin write refused: the database's disk is full or failing");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "{e}: the disk holding data_dir is full or failing (free space, or \
                         check it); running sandboxes keep working, retry then"
                    ),
                )
            }
            StoreError::Database(rusqlite::Error::SqliteFailure(f, _))
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
                ) =>
            {
                // A page the start did not read (outside re-check: "internal store error",
                // and the log named neither the file nor the way out).
                // A disk that fails its reads reads the same way (an outside pass shut an ext4
                // file system down under the daemon: every call said "restore it from a
                // backup"), and restoring onto a failing disk loses the writes since.
                tracing::error!(error = %e, "admin call refused: the database file reads as damaged; check the disk (kernel log), then restore it from a backup");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_corrupt",
                    format!(
                        "{e}: the database file in data_dir reads as damaged: check the \
                         disk holding data_dir (I/O errors in the kernel log read the same way); \
                         if it is sound, restore the file from a backup (docs/operations.md, \
                         Backups); running sandboxes keep working"
                    ),
                )
            }
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "admin call refused: store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "{e}; nothing was changed, and running sandboxes keep working: retry \
                         when the database answers"
                    ),
                )
            }
            StoreError::Unconfirmed(_) => {
                tracing::warn!(error = %e, "admin change unconfirmed: the database stopped answering after it was sent");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    format!(
                        "{e}; running sandboxes keep working. This change may have been \
                         applied all the same (it was sent, and the database did not confirm \
                         it): read it back before retrying"
                    ),
                )
            }
            StoreError::WrongMasterKey(_) => {
                // At run time: the key-check record no longer opens with this node's key (a
                // rotation elsewhere, or an edit by hand); a write checks it first. It was the
                // bare 500 `internal` while every read said why (outside pass).
                tracing::error!(error = %e, "admin write refused: this node's master key does not open the database's key check");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_corrupt",
                    "this node's master key no longer opens the database's key check (was the \
                     key rotated while it ran, or the record edited by hand?); nothing was \
                     changed; see docs/operations.md, \"A row that fails its checks\"",
                )
            }
            StoreError::Corrupt(_) => {
                // Names the row and the check it failed, never a value.
                tracing::error!(error = %e, "admin call refused: a stored row fails its checks");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_corrupt",
                    format!(
                        "{e}; see docs/operations.md, \"A row that fails its checks\" (the \
                         store's running sandboxes unseal nothing from their next re-read of it)"
                    ),
                )
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal store error",
                )
            }
        }
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match e {
            SandboxError::NotFound(id) => {
                ApiError::not_found(format!("sandbox {} not found", shown(&id, false)))
            }
            // Its own code: not "already gone" to a client that deletes idempotently (the
            // SDK's kill() took it for that, and with delete_secret_store=True deleted the
            // store of a sandbox still running on another node: review).
            SandboxError::OnAnotherNode { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "on_another_node", e.to_string())
            }
            SandboxError::BadRequest(m) => ApiError::bad_request(m),
            SandboxError::Registry(r) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", r.to_string())
            }
            SandboxError::Store(s) => s.into(),
            // At run time only a failed write of a record in data_dir (a full disk).
            SandboxError::PendingDeletions(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
            SandboxError::NotDurable { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            ),
            // The certificate directory's disk (full, read-only, gone): nothing was kept.
            SandboxError::CertFile { path, source } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!(
                    "cannot write the sandbox's CA certificate to {} ({source}): free space \
                     on that disk or check cert_dir; nothing was created",
                    path.display()
                ),
            ),
            other => {
                tracing::error!(error = %other, "sandbox failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal sandbox error",
                )
            }
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::from_rejection(&e, e.body_text())
    }
}

impl ApiError {
    /// 413 `request_too_large`: a body over the admin body limit.
    pub fn too_large() -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!(
                "request body is larger than {} bytes",
                super::routes::MAX_BODY_BYTES
            ),
        )
    }

    /// A JSON body rejection with `message`: 413 `request_too_large` over the admin body limit,
    /// 415 `unsupported_media_type` without `Content-Type: application/json`, else 400.
    pub fn from_rejection(e: &axum::extract::rejection::JsonRejection, message: String) -> Self {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            _ => ApiError::bad_request(message),
        }
    }
}

impl From<IsolationError> for ApiError {
    fn from(e: IsolationError) -> Self {
        let msg = e.to_string();
        match e {
            IsolationError::BadRequest(m) => ApiError::bad_request(m),
            IsolationError::NotIsolated(_) => {
                ApiError::new(StatusCode::CONFLICT, "not_isolated", msg)
            }
            IsolationError::CommandsOff => {
                ApiError::new(StatusCode::FORBIDDEN, "commands_disabled", msg)
            }
            IsolationError::TooManyCommands(..) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_commands", msg)
            }
            IsolationError::Sandbox(s) => s.into(),
            IsolationError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            // The daemon's setup, not this request, and not a failure to log per create: the
            // start summary's `isolation:` line says it once.
            IsolationError::Unprivileged(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "isolation_failed", msg)
            }
            IsolationError::RunAs(_)
            | IsolationError::Netns(_)
            | IsolationError::Cgroup(_)
            | IsolationError::Io { .. } => {
                tracing::error!(error = %msg, "sandbox isolation failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "isolation_failed", msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_not_found_come_back_only_when_short_or_shaped_like_ids() {
        let value = "sk-ant-api03-FAKE0123456789abcdefghij";
        let e = ApiError::from(StoreError::NotFound(Missing::store(value)));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(
            !e.message.contains("FAKE") && e.message.contains("not repeated"),
            "{}",
            e.message
        );
        let id = "0b6f4a5e-3c1d-4e8f-9a2b-7c6d5e4f3a21";
        let e = ApiError::from(StoreError::NotFound(Missing::store(id)));
        assert_eq!(e.message, format!("store '{id}' not found"));
        let e = ApiError::from(StoreError::NotFound(Missing::store("dev")));
        assert_eq!(e.message, "store 'dev' not found");
        let sbx = "sbx_0123456789abcdef01234567";
        let e = ApiError::from(SandboxError::NotFound(sbx.into()));
        assert_eq!(e.message, format!("sandbox {sbx} not found"));
        let e = ApiError::from(SandboxError::NotFound(value.into()));
        assert!(!e.message.contains("FAKE"), "{}", e.message);
        // An apostrophe inside a name: the whole name is counted, nothing of it repeated.
        for quoted in [
            "a'sk-live-51HxyzREALSECRETvalue0123",
            "pw'Tr0ub4dor&3-correct-horse'",
        ] {
            let e = ApiError::from(StoreError::NotFound(Missing::store(quoted)));
            assert!(
                !e.message.contains("sk-live") && !e.message.contains("Tr0ub"),
                "{}",
                e.message
            );
            let e = ApiError::from(StoreError::NotFound(Missing::secret("API_KEY", quoted)));
            assert!(
                !e.message.contains("sk-live") && !e.message.contains("Tr0ub"),
                "{}",
                e.message
            );
        }
        let e = ApiError::from(StoreError::NotFound(Missing::secret("K", "dev")));
        assert_eq!(e.message, "secret 'K' in store 'dev' not found");
        let e = ApiError::from(StoreError::NotFound(Missing::store("it's")));
        assert_eq!(
            e.message, "store 'it\\'s' not found",
            "short: shown, escaped"
        );
    }

    #[test]
    fn a_401_names_the_bearer_scheme_and_other_errors_do_not() {
        let res = ApiError::unauthorized().into_response();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            res.headers()[axum::http::header::WWW_AUTHENTICATE],
            "Bearer realm=\"sealgate-admin\""
        );
        let res = ApiError::not_found("x").into_response();
        assert!(!res
            .headers()
            .contains_key(axum::http::header::WWW_AUTHENTICATE));
    }

    /// A damaged database file met at run time (a page the start did not read) says so and
    /// how to recover, instead of "internal store error" (outside re-check).
    #[test]
    fn a_damaged_database_file_is_named_with_the_way_out() {
        let corrupt = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some("database disk image is malformed".into()),
        );
        let e = ApiError::from(StoreError::Database(corrupt));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt")
        );
        assert!(
            e.message.contains("check the disk")
                && e.message.contains("restore the file from a backup"),
            "{}",
            e.message
        );
    }

    /// Only a change that was sent may have been applied; a refused connection changed
    /// nothing, and says so (outside pass: every outage said "it may have been applied").
    #[test]
    fn store_outages_say_whether_the_change_may_have_been_applied() {
        let away = ApiError::from(StoreError::Unavailable("database unreachable".into()));
        assert_eq!(
            (away.status, away.code),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        );
        assert!(
            away.message.contains("nothing was changed"),
            "{}",
            away.message
        );
        let sent = ApiError::from(StoreError::Unconfirmed("no answer within 5s".into()));
        assert_eq!(sent.code, "store_unavailable");
        assert!(
            sent.message.contains("may have been applied"),
            "{}",
            sent.message
        );
        let key = ApiError::from(StoreError::WrongMasterKey("postgres://db/x".into()));
        assert_eq!(
            (key.status, key.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "store_corrupt")
        );
        assert!(key.message.contains("key check"), "{}", key.message);
    }
}
