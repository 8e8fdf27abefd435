//! Structured audit events: one JSON line per proxied request and per admin change.
//!
//! Invariant: events carry secret *names*, hosts and decisions — never a value. Each event is
//! one whole line written with a single `write_all`, so concurrent events never interleave: the
//! file is opened `O_APPEND`, and Linux applies each `write(2)` to a regular file atomically at
//! the end of the file; stdout is written under its own lock. The `RwLock` around the sink is
//! taken for reading on the request path (writers run in parallel, nobody waits on another's
//! syscall) and for writing only by [`Audit::reopen`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::RwLock;

use serde::Serialize;
use time::OffsetDateTime;

/// Where audit lines go.
pub struct Audit {
    sink: RwLock<Sink>,
    path: Option<PathBuf>,
}

enum Sink {
    Stdout,
    File(std::fs::File),
}

/// One proxied request (or refused connection).
#[derive(Debug, Serialize, Default)]
pub struct RequestEvent<'a> {
    /// Sandbox id (None when identification failed).
    pub sandbox: Option<&'a str>,
    /// "explicit" or "transparent".
    pub mode: &'a str,
    /// Destination `host:port`.
    pub host: String,
    /// HTTP method (or CONNECT).
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// "allow", "deny" or "error".
    pub decision: &'a str,
    /// Error code from DESIGN.md §5, when refused.
    pub code: Option<&'a str>,
    /// The rule behind a refusal, in words (e.g. "store allowlist", "secret allowed_hosts").
    pub rule: Option<String>,
    /// Secret names unsealed.
    pub unsealed: Vec<String>,
    /// Secret names refused or left sealed for this host.
    pub refused: Vec<String>,
    /// Response status sent to the sandbox.
    pub status: u16,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
    /// Response body bytes sent to the sandbox.
    pub bytes_down: u64,
    /// Milliseconds from request head to response head.
    pub duration_ms: u64,
}

/// One admin change.
#[derive(Debug, Serialize)]
pub struct AdminEvent<'a> {
    /// e.g. "store.create", "secret.set", "sandbox.delete".
    pub action: &'a str,
    /// Store id, when relevant.
    pub store: Option<&'a str>,
    /// Secret name, when relevant.
    pub secret: Option<&'a str>,
    /// Sandbox id, when relevant.
    pub sandbox: Option<&'a str>,
    /// Who: "admin-token" (the only principal today) plus the peer address.
    pub actor: String,
}

/// One command run in an isolated sandbox (never its environment).
#[derive(Debug, Serialize)]
pub struct CommandEvent<'a> {
    /// Sandbox id.
    pub sandbox: &'a str,
    /// The command line, cut to 256 bytes.
    pub cmd: &'a str,
    /// Exit code (124 after a timeout).
    pub exit_code: i32,
    /// The timeout ended it.
    pub timed_out: bool,
    /// Output was cut at `max_output_bytes`.
    pub truncated: bool,
    /// Wall time.
    pub duration_ms: u64,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(with = "time::serde::rfc3339")]
    ts: OffsetDateTime,
    kind: &'a str,
    #[serde(flatten)]
    event: &'a T,
}

impl Audit {
    /// Opens the sink (appending to `path`, or stdout).
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: Option<PathBuf>) -> std::io::Result<Audit> {
        let sink = match &path {
            None => Sink::Stdout,
            Some(p) => Sink::File(open_append(p)?),
        };
        Ok(Audit {
            sink: RwLock::new(sink),
            path,
        })
    }

    /// Reopens the file (after logrotate moved it; SIGHUP).
    ///
    /// # Errors
    /// The file cannot be opened; the old handle is kept then.
    pub fn reopen(&self) -> std::io::Result<()> {
        if let Some(p) = &self.path {
            let f = open_append(p)?;
            *self.sink.write().unwrap_or_else(|e| e.into_inner()) = Sink::File(f);
        }
        Ok(())
    }

    /// Records a proxied request.
    pub fn request(&self, e: &RequestEvent<'_>) {
        self.write("request", e);
    }

    /// Records an admin change.
    pub fn admin(&self, e: &AdminEvent<'_>) {
        self.write("admin", e);
    }

    /// Records a command run in an isolated sandbox.
    pub fn command(&self, e: &CommandEvent<'_>) {
        self.write("command", e);
    }

    fn write<T: Serialize>(&self, kind: &str, event: &T) {
        let line = Line {
            ts: OffsetDateTime::now_utc(),
            kind,
            event,
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else {
            return;
        };
        bytes.push(b'\n');
        let sink = self.sink.read().unwrap_or_else(|e| e.into_inner());
        let res = match &*sink {
            Sink::Stdout => std::io::stdout().lock().write_all(&bytes),
            Sink::File(file) => {
                let mut f: &std::fs::File = file;
                f.write_all(&bytes)
            }
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "audit write failed");
        }
    }
}

fn open_append(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    crate::fsutil::private_file()
        .create(true)
        .append(true)
        .open(p)
}

/// Prints the audit file and, with `follow`, keeps printing lines as they are appended
/// (reopening the file when it is rotated or truncated).
///
/// # Errors
/// The file cannot be read.
pub async fn tail(path: &std::path::Path, follow: bool) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut pos = 0u64;
    loop {
        let mut f =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let len = f.metadata()?.len();
        if len < pos {
            pos = 0;
        }
        f.seek(SeekFrom::Start(pos))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        std::io::stdout().write_all(&buf[..complete])?;
        pos += complete as u64;
        if !follow {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
