//! Structured audit events: one JSON line per proxied request and per admin change.
//!
//! Invariant: events carry secret *names*, hosts and decisions — never a value.
//!
//! Lines are serialised on the caller and handed to one writer thread through a bounded queue
//! ([`QUEUE_LINES`]). The first line after a quiet spell is written at once; while lines keep
//! coming the thread wakes every [`FLUSH_AFTER`], appends what was queued to its buffer and
//! writes it with one `write_all` (sooner when the buffer reaches [`BATCH_BYTES`], on
//! [`Audit::flush`] and when the last handle is dropped). Under load a line therefore reaches
//! the file up to `FLUSH_AFTER` after it was recorded. Rules:
//! - the proxy never waits on the disk: a full queue drops the line and counts it
//!   ([`Audit::dropped`], the `audit_dropped` metric, a warning from the writer);
//! - a clean stop loses nothing: [`Audit::flush`] returns once every line queued before it is
//!   written, and dropping the last handle drains the queue and joins the thread;
//! - lines keep their submission order (one queue, one writer), and each batch ends on a
//!   line boundary, so a reader never sees half a line. The file is opened `O_APPEND`.
//!
//! Memory: at most `QUEUE_LINES` queued lines (a request line is ~300 bytes: ~2.5 MiB at
//! worst) plus one batch buffer of `BATCH_BYTES` and whatever one line overshoots it by.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use time::OffsetDateTime;

mod tail;
pub use tail::tail;

/// Lines the queue holds before [`Audit`] starts dropping them.
pub const QUEUE_LINES: usize = 8192;
/// A batch this large is written at once.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Seconds between two warnings of a full queue from the sending side.
pub const FULL_WARNING_EVERY: u64 = 10;
/// A line waits at most this long in the writer's buffer.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// Where audit lines go: a handle on the writer thread.
pub struct Audit {
    /// None only while dropping.
    tx: Option<SyncSender<Msg>>,
    writer: Option<JoinHandle<()>>,
    dropped: Counter,
    path: Option<PathBuf>,
    /// When a full queue was last warned about from the sending side (seconds since start).
    full_warned: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
}

/// What the writer thread is told.
enum Msg {
    /// One whole line, newline included; `true` for a proxied request (the kind that comes in
    /// floods and is batched), `false` for the rare admin and command events.
    Line(Vec<u8>, bool),
    /// Write the buffer, then answer.
    Flush(SyncSender<()>),
    /// Write the buffer to the old sink, then switch to this one.
    Reopen(Box<dyn Write + Send>),
}

/// The most bytes of `path` an audit line keeps (then `…`): a sandbox chooses its paths, and
/// refusals cost it nothing, so whole paths let one sandbox write ~70 MB/s of audit log with
/// 30 KB paths (outside review, 2026-12-04).
pub const MAX_PATH_BYTES: usize = 256;
/// The same for the method and the destination as the sandbox wrote them.
pub const MAX_NAME_BYTES: usize = 300;
/// The same for a refusal's rule (it may quote what the sandbox sent, a `Host` for one).
pub const MAX_RULE_BYTES: usize = 1024;

/// One proxied request (or refused connection). Fields the sandbox writes are cut to a few
/// hundred bytes in the line ([`MAX_PATH_BYTES`], [`MAX_NAME_BYTES`], [`MAX_RULE_BYTES`]).
#[derive(Debug, Serialize, Default)]
pub struct RequestEvent<'a> {
    /// Sandbox id (None when identification failed).
    pub sandbox: Option<&'a str>,
    /// "explicit" or "transparent".
    pub mode: &'a str,
    /// Destination `host:port`.
    #[serde(serialize_with = "cut_name")]
    pub host: &'a str,
    /// HTTP method (or CONNECT).
    #[serde(serialize_with = "cut_name")]
    pub method: &'a str,
    /// Path without the query.
    #[serde(serialize_with = "cut_path")]
    pub path: &'a str,
    /// "allow", "deny" or "error".
    pub decision: &'a str,
    /// Error code from DESIGN.md §5, when refused.
    pub code: Option<&'a str>,
    /// The rule behind a refusal, in words (e.g. "store allowlist", "secret allowed_hosts").
    #[serde(serialize_with = "cut_rule")]
    pub rule: Option<String>,
    /// Secret names unsealed.
    pub unsealed: Vec<&'a str>,
    /// Secret names refused or left sealed for this host.
    pub refused: Vec<&'a str>,
    /// Response status sent to the sandbox.
    pub status: u16,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
    /// Response body bytes sent to the sandbox.
    pub bytes_down: u64,
    /// Milliseconds from request head to response head.
    pub duration_ms: u64,
}

/// `text` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn cut(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

fn cut_path<S: serde::Serializer>(v: &&str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&cut(v, MAX_PATH_BYTES))
}

fn cut_name<S: serde::Serializer>(v: &&str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&cut(v, MAX_NAME_BYTES))
}

fn cut_rule<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(rule) => s.serialize_str(&cut(rule, MAX_RULE_BYTES)),
        None => s.serialize_none(),
    }
}

/// One admin change.
#[derive(Debug, Serialize)]
pub struct AdminEvent<'a> {
    /// e.g. "store.create", "secret.set", "sandbox.delete".
    pub action: &'a str,
    /// Store id, when relevant.
    pub store: Option<&'a str>,
    /// Store name, on `store.create` only: an unconfirmed creation has no id to name it by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_name: Option<&'a str>,
    /// Secret name, when relevant.
    pub secret: Option<&'a str>,
    /// Sandbox id, when relevant.
    pub sandbox: Option<&'a str>,
    /// Who: "admin-token" (the only principal today) plus the peer address.
    pub actor: String,
    /// `"unknown"` for a change the store could not confirm (the database did not answer in
    /// time: it may have been applied); absent for a change that was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

impl<'a> AdminEvent<'a> {
    /// A sandbox's end that no admin call made: `actor` is `expiry` or `start`.
    pub fn sandbox_end(action: &'a str, sandbox: &'a str, actor: &str) -> Self {
        AdminEvent {
            action,
            store: None,
            store_name: None,
            secret: None,
            sandbox: Some(sandbox),
            actor: actor.into(),
            outcome: None,
        }
    }
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
    /// The sandbox's memory limit killed a process while it ran.
    pub oom_killed: bool,
    /// Wall time.
    pub duration_ms: u64,
}

/// One line: `{"ts":"<RFC 3339>","kind":"<kind>",<the event's fields>}` and a line break.
/// Written by hand around the event's own object: `#[serde(flatten)]` sent every field through
/// serde's map path, and the timestamp through a `String` and an escaping pass (~3,000
/// instructions of the ~6,000 a request's line cost). `None` when the event does not
/// serialise as a JSON object or the time cannot be written (the line is dropped, as before).
fn line<T: Serialize>(ts: OffsetDateTime, kind: &str, event: &T) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(384);
    bytes.extend_from_slice(b"{\"ts\":\"");
    ts.format_into(&mut bytes, &time::format_description::well_known::Rfc3339)
        .ok()?;
    bytes.extend_from_slice(b"\",\"kind\":");
    serde_json::to_writer(&mut bytes, kind).ok()?;
    let at = bytes.len();
    serde_json::to_writer(&mut bytes, event).ok()?;
    // The event's `{` becomes the comma after `kind`; an empty event, `{}`, leaves `}`.
    match bytes.get(at..at + 2)? {
        b"{}" => {
            bytes.truncate(at);
            bytes.push(b'}');
        }
        [b'{', _] => bytes[at] = b',',
        _ => return None,
    }
    bytes.push(b'\n');
    Some(bytes)
}

impl Audit {
    /// Opens the sink (appending to `path`, or stdout) and starts the writer thread.
    ///
    /// # Errors
    /// The file cannot be opened, or the thread cannot be started.
    pub fn open(path: Option<PathBuf>) -> std::io::Result<Audit> {
        Audit::open_counted(path, Counter::default())
    }

    /// As [`Audit::open`], counting dropped lines in `dropped` (the metrics registry's
    /// `audit_dropped` counter: the metric is the count, nothing is copied at scrape time).
    ///
    /// # Errors
    /// As [`Audit::open`].
    pub fn open_counted(path: Option<PathBuf>, dropped: Counter) -> std::io::Result<Audit> {
        let sink: Box<dyn Write + Send> = match &path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(open_append(p)?),
        };
        Audit::with_sink(sink, path, QUEUE_LINES, dropped)
    }

    /// Starts the writer thread on `sink` with a queue of `queue_lines`.
    fn with_sink(
        sink: Box<dyn Write + Send>,
        path: Option<PathBuf>,
        queue_lines: usize,
        dropped: Counter,
    ) -> std::io::Result<Audit> {
        let (tx, rx) = mpsc::sync_channel(queue_lines);
        let writer = Writer {
            sink,
            buf: Vec::with_capacity(BATCH_BYTES),
            dropped: dropped.clone(),
            dropped_reported: 0,
            torn: false,
        };
        let handle = std::thread::Builder::new()
            .name("sealgate-audit".into())
            .spawn(move || writer.run(&rx))?;
        Ok(Audit {
            tx: Some(tx),
            writer: Some(handle),
            dropped,
            path,
            full_warned: std::sync::atomic::AtomicU64::new(u64::MAX),
            started: std::time::Instant::now(),
        })
    }

    /// Reopens the file (after logrotate moved it; SIGHUP). Lines queued before the call go
    /// to the old file, later ones to the new.
    ///
    /// # Errors
    /// The file cannot be opened; the old handle is kept then.
    pub fn reopen(&self) -> std::io::Result<()> {
        if let Some(p) = &self.path {
            let f = open_append(p)?;
            self.send(Msg::Reopen(Box::new(f)));
        }
        Ok(())
    }

    /// Blocks until every line queued before the call is written (a few milliseconds at
    /// most; for shutdown, reopen and tests — not for the request path).
    pub fn flush(&self) {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        self.send(Msg::Flush(done_tx));
        let _ = done_rx.recv();
    }

    /// The audit log's file, for messages ("stdout" when it has none).
    pub fn shown_path(&self) -> String {
        self.path
            .as_ref()
            .map_or_else(|| "stdout".into(), |p| p.display().to_string())
    }

    /// Lines dropped because the queue was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
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

    /// Serialises the line here and queues it; never waits for the writer.
    fn write<T: Serialize>(&self, kind: &str, event: &T) {
        let Some(bytes) = line(OffsetDateTime::now_utc(), kind, event) else {
            return;
        };
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.try_send(Msg::Line(bytes, kind == "request")));
        if !matches!(sent, Some(Ok(()))) {
            self.dropped.inc();
            self.warn_full();
        }
    }

    /// Warns that lines are being dropped, at most every [`FULL_WARNING_EVERY`] seconds: the
    /// writer warns too, but only once its write returns — never while the sink is stalled
    /// (outside pass: a reader that stopped kept the log silent while lines were dropped).
    fn warn_full(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.started.elapsed().as_secs();
        let last = self.full_warned.load(Relaxed);
        let due = last == u64::MAX || now >= last + FULL_WARNING_EVERY;
        if due
            && self
                .full_warned
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            tracing::warn!(
                total = self.dropped.get(),
                path = %self.shown_path(),
                "audit queue full: the audit log is not taking lines (a full or stalled disk, \
                 or a reader that stopped); lines are being dropped"
            );
        }
    }

    /// Queues a control message, waiting for room (control messages are never dropped).
    fn send(&self, msg: Msg) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(msg);
        }
        self.wake();
    }

    /// Wakes the writer if it sleeps between batches.
    fn wake(&self) {
        if let Some(h) = &self.writer {
            h.thread().unpark();
        }
    }
}

impl Drop for Audit {
    /// Closes the queue; the writer drains it, writes its buffer and ends; then joins it.
    fn drop(&mut self) {
        self.tx.take();
        self.wake();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    sink: Box<dyn Write + Send>,
    buf: Vec<u8>,
    dropped: Counter,
    dropped_reported: u64,
    /// The last write stopped inside a line: the next write ends it first.
    torn: bool,
}

impl Writer {
    /// Runs until every sender is gone and the queue is drained.
    ///
    /// Idle, it blocks on the queue and writes the first line that arrives at once; then it
    /// sleeps [`FLUSH_AFTER`], takes everything queued meanwhile and writes it, until an
    /// interval brings nothing. While busy
    /// the senders never wake it (a line is a lock-free push, not a futex wake and a context
    /// switch per request); [`Audit::flush`], reopen and drop wake it early with `unpark`.
    fn run(mut self, rx: &Receiver<Msg>) {
        while let Ok(first) = rx.recv() {
            // After a quiet spell the first line is written at once (a reader such as the
            // README demo finds it as soon as the request is answered); batching starts with
            // the next one, and only after a request line (admin and command events are rare:
            // they never open a batching interval that would delay the request after them).
            let batch = matches!(first, Msg::Line(_, true));
            self.handle(first);
            self.write_out();
            if !batch {
                continue;
            }
            loop {
                std::thread::park_timeout(FLUSH_AFTER);
                let (taken, open) = self.drain(rx);
                self.write_out();
                if !open {
                    return;
                }
                if taken == 0 {
                    break;
                }
            }
        }
        self.write_out();
    }

    /// Writes `buf` after ending a line an earlier failure cut; on failure, how many bytes of
    /// `buf` went out.
    fn write_buf(&mut self) -> Result<(), (usize, std::io::Error)> {
        if self.torn {
            self.sink.write_all(b"\n").map_err(|e| (0, e))?;
            self.torn = false;
        }
        let mut written = 0;
        while written < self.buf.len() {
            match self.sink.write(&self.buf[written..]) {
                Ok(0) => return Err((written, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((written, e)),
            }
        }
        self.sink.flush().map_err(|e| (written, e))
    }

    /// Handles everything queued now: (messages taken, whether any sender is left).
    fn drain(&mut self, rx: &Receiver<Msg>) -> (usize, bool) {
        let mut taken = 0;
        loop {
            match rx.try_recv() {
                Ok(m) => {
                    self.handle(m);
                    taken += 1;
                }
                Err(TryRecvError::Empty) => return (taken, true),
                Err(TryRecvError::Disconnected) => return (taken, false),
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Line(l, _) => {
                self.buf.extend_from_slice(&l);
                if self.buf.len() >= BATCH_BYTES {
                    self.write_out();
                }
            }
            Msg::Flush(done) => {
                self.write_out();
                let _ = done.send(());
            }
            Msg::Reopen(sink) => {
                self.write_out();
                self.sink = sink;
                self.torn = false; // a new file starts with no cut line to end
            }
        }
    }

    /// Writes the buffer (whole lines) and reports new drops. Lines a failed write lost (a
    /// full disk) count as dropped; a line cut short by it is ended before the next write, so
    /// it stays a line of its own and the next one is whole (an outside test found 17 of 30
    /// lines lost uncounted, and a cut line glued to the next into unreadable JSON).
    fn write_out(&mut self) {
        if !self.buf.is_empty() {
            if let Err((written, e)) = self.write_buf() {
                let lines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count() as u64;
                let lost = lines(&self.buf) - lines(&self.buf[..written]);
                self.dropped.inc_by(lost);
                self.dropped_reported += lost; // warned here, not as a full queue
                self.torn |= written > 0 && self.buf[written - 1] != b'\n';
                tracing::warn!(error = %e, lines = lost, "audit write failed: lines lost");
            }
            self.buf.clear();
            if self.buf.capacity() > 4 * BATCH_BYTES {
                self.buf.shrink_to(BATCH_BYTES);
            }
        }
        let dropped = self.dropped.get();
        if dropped > self.dropped_reported {
            tracing::warn!(
                dropped = dropped - self.dropped_reported,
                total = dropped,
                "audit queue full: lines dropped"
            );
            self.dropped_reported = dropped;
        }
    }
}

/// Opens `p` for appending, created 0600 if missing.
///
/// Invariant: never blocks. A FIFO (a log shipper's pipe) opens only while a process reads
/// it — without one, opening for writing would wait for a reader, and a start would hang
/// before its first log line — so the open is non-blocking, a reader-less FIFO is a clear
/// error, and the descriptor is made blocking again for the writer thread (a slow reader then
/// fills the bounded queue, whose overflow is counted, never the proxy).
fn open_append(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let f = crate::fsutil::private_file()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENXIO) => std::io::Error::new(
                e.kind(),
                "a FIFO that no process has open for reading (start its reader first)",
            ),
            _ => e,
        })?;
    // SAFETY: fcntl on a descriptor this function owns; F_GETFL/F_SETFL take no pointers.
    let cleared = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !cleared {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn fifo(dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("audit.fifo");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    }

    /// A FIFO nobody reads is refused at once, naming why (it hung the start before); one
    /// with a reader gets the lines, written by a blocking descriptor.
    #[test]
    fn a_fifo_audit_path_needs_a_reader_and_never_hangs_the_open() {
        use std::io::Read as _;
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path());
        let began = Instant::now();
        let err = Audit::open(Some(path.clone()))
            .err()
            .expect("no reader: refused");
        assert!(began.elapsed() < Duration::from_secs(1));
        assert!(
            err.to_string().contains("no process has open for reading"),
            "{err}"
        );

        let reader_path = path.clone();
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            std::fs::File::open(reader_path)
                .unwrap()
                .read_to_string(&mut text)
                .unwrap();
            text
        });
        let audit = loop {
            match Audit::open(Some(path.clone())) {
                Ok(a) => break a,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        audit.admin(&event(1));
        drop(audit);
        assert!(reader.join().unwrap().contains("\"actor\":\"n1\""));
    }

    fn event(i: usize) -> AdminEvent<'static> {
        AdminEvent {
            action: "test",
            store: None,
            store_name: None,
            secret: None,
            sandbox: None,
            actor: format!("n{i}"),
            outcome: None,
        }
    }

    fn lines(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The line as `#[serde(flatten)]` wrote it before [`line`]: the oracle.
    #[derive(Serialize)]
    struct Flattened<'a, T: Serialize> {
        #[serde(with = "time::serde::rfc3339")]
        ts: OffsetDateTime,
        kind: &'a str,
        #[serde(flatten)]
        event: &'a T,
    }

    fn flattened<T: Serialize>(ts: OffsetDateTime, kind: &str, event: &T) -> Vec<u8> {
        let mut v = serde_json::to_vec(&Flattened { ts, kind, event }).unwrap();
        v.push(b'\n');
        v
    }

    #[test]
    fn a_line_is_written_as_the_flattened_struct_was() {
        let ts = OffsetDateTime::now_utc();
        let request = RequestEvent {
            sandbox: Some("sbx_x"),
            mode: "explicit",
            host: "api.example.com:443",
            method: "GET",
            path: "/v1/\"quoted\"\u{7}é",
            decision: "allow",
            code: None,
            rule: Some("r".repeat(3000)),
            unsealed: vec!["A", "B"],
            refused: vec![],
            status: 200,
            bytes_up: 1,
            bytes_down: 2,
            duration_ms: 3,
        };
        assert_eq!(
            line(ts, "request", &request),
            Some(flattened(ts, "request", &request))
        );
        let admin = event(7);
        assert_eq!(
            line(ts, "admin", &admin),
            Some(flattened(ts, "admin", &admin))
        );
        #[derive(Serialize)]
        struct Empty {}
        assert_eq!(
            line(ts, "x", &Empty {}),
            Some(flattened(ts, "x", &Empty {}))
        );
        let sub_second = OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(1_500);
        assert_eq!(
            line(sub_second, "admin", &admin),
            Some(flattened(sub_second, "admin", &admin))
        );
        assert_eq!(line(ts, "x", &7u8), None, "not an object");
    }

    #[test]
    fn a_clean_stop_writes_every_line_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(path.clone())).unwrap();
        for i in 0..10_000 {
            audit.admin(&event(i));
        }
        drop(audit);
        let got = lines(&path);
        assert_eq!(got.len(), 10_000);
        for (i, l) in got.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["actor"], format!("n{i}"));
        }
    }

    /// What a sandbox writes is cut in the line: a 30 KB path made ~30 KB lines, ~70 MB/s of
    /// audit log from one sandbox's free refusals.
    #[test]
    fn fields_the_sandbox_writes_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(path.clone())).unwrap();
        let long = format!("/{}é", "a".repeat(30_000));
        let rule = format!("Host {} does not match", "h".repeat(30_000));
        audit.request(&RequestEvent {
            host: &long,
            method: &long,
            path: &long,
            rule: Some(rule),
            ..Default::default()
        });
        drop(audit);
        let line = &lines(&path)[0];
        assert!(line.len() < 2500, "{} bytes", line.len());
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let path_field = v["path"].as_str().unwrap();
        assert!(path_field.ends_with('…') && path_field.len() <= MAX_PATH_BYTES + 3);
        assert!(v["rule"].as_str().unwrap().starts_with("Host hhh"));
        assert_eq!(cut("/é", 2), "/…", "never inside a character");
        assert_eq!(cut("/short", MAX_PATH_BYTES), "/short");
    }

    #[test]
    fn flush_writes_what_was_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(path.clone())).unwrap();
        audit.admin(&event(1));
        audit.flush();
        assert_eq!(lines(&path).len(), 1);
        assert_eq!(audit.dropped(), 0);
    }

    #[test]
    fn the_timer_writes_a_lone_line_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(Some(path.clone())).unwrap();
        audit.admin(&event(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while lines(&path).is_empty() && Instant::now() < deadline {
            std::thread::sleep(FLUSH_AFTER / 5);
        }
        assert_eq!(lines(&path).len(), 1, "written within FLUSH_AFTER");
    }

    #[test]
    fn reopen_sends_later_lines_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let moved = dir.path().join("audit.log.1");
        let audit = Audit::open(Some(path.clone())).unwrap();
        audit.admin(&event(1));
        audit.flush();
        std::fs::rename(&path, &moved).unwrap();
        audit.admin(&event(2));
        audit.reopen().unwrap();
        audit.admin(&event(3));
        drop(audit);
        assert_eq!(lines(&moved).len(), 2, "queued before reopen: old file");
        assert_eq!(lines(&path).len(), 1);
    }

    /// A sink that blocks every write until the gate opens.
    struct Gated {
        gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
        out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.gate;
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
            self.out.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A disk with `room` bytes left: past them every write fails with ENOSPC.
    struct Full {
        room: Arc<std::sync::Mutex<usize>>,
        out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            let n = b.len().min(*room);
            *room -= n;
            self.out.lock().unwrap().extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_full_disk_loses_are_counted_and_a_cut_line_does_not_spoil_the_next() {
        let room = Arc::new(std::sync::Mutex::new(100));
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Full {
            room: room.clone(),
            out: out.clone(),
        };
        let audit = Audit::with_sink(Box::new(sink), None, 64, Counter::default()).unwrap();
        for i in 0..10 {
            audit.admin(&event(i));
        }
        audit.flush();
        *room.lock().unwrap() = usize::MAX;
        for i in 10..12 {
            audit.admin(&event(i));
        }
        audit.flush();
        let dropped = audit.dropped();
        drop(audit);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let whole: Vec<&str> = text
            .lines()
            .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
            .collect();
        let cut = text.lines().count() - whole.len();
        assert!(cut <= 1, "{text}");
        assert_eq!(
            whole.len() as u64 + dropped,
            12,
            "every line written or counted: {text}"
        );
        assert!(whole.iter().any(|l| l.contains("\"n10\"")), "{text}");
        assert!(whole.iter().any(|l| l.contains("\"n11\"")), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_stuck_disk_never_blocks_the_caller_and_drops_are_counted() {
        let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Gated {
            gate: gate.clone(),
            out: out.clone(),
        };
        let audit = Audit::with_sink(Box::new(sink), None, 16, Counter::default()).unwrap();
        // The writer takes the first lines and blocks writing them after FLUSH_AFTER.
        audit.admin(&event(0));
        std::thread::sleep(FLUSH_AFTER * 3);
        let start = Instant::now();
        for i in 1..=1000 {
            audit.admin(&event(i));
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the caller waited"
        );
        assert!(audit.dropped() >= 1000 - 16, "dropped {}", audit.dropped());
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let dropped = audit.dropped();
        drop(audit);
        let written = out
            .lock()
            .unwrap()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count();
        assert_eq!(
            written as u64 + dropped,
            1001,
            "every line written or counted"
        );
    }
}
