//! HTTP/1 request-framing guard: reads every request head itself, before hyper does, and
//! refuses ambiguous framing (request smuggling) with the uniform error.
//!
//! # Why
//!
//! hyper 1.x's h1 server is lenient where a proxy must not be (DESIGN.md §7): given both
//! `Content-Length` and `Transfer-Encoding` it silently drops the length and decodes chunked, and
//! it folds repeated equal `Content-Length` fields into one, so the request a service sees no
//! longer shows the ambiguity. Two parties that disagree about where a message ends is exactly
//! request smuggling, so the framing has to be judged on the bytes.
//!
//! # How
//!
//! [`Framing`] is a pure state machine over the client's bytes. It parses each head with the
//! parser hyper uses (`httparse`, `proxy.max_header_fields` fields, hyper's own limit set to
//! the same number) and tracks message
//! boundaries — `Content-Length` bodies, chunked bodies (chunk-size lines, data, CRLFs,
//! trailers) — so it always knows where the next head starts. [`H1Guard`] is the thin
//! `AsyncRead` adapter between the client stream and hyper that drives it:
//!
//! - a head is held back until it is complete and checked; hyper sees none of it before;
//! - body bytes pass straight through (no copy while a read stays inside a body);
//! - the first chunk-size line of a chunked body is checked before its head is released, so a
//!   broken first chunk (huge or malformed size) refuses the request before anything is
//!   forwarded — except with `Expect`, where the client waits for hyper's `100 Continue`. A bad
//!   *later* chunk fails the read (every read from then on, after what the read released
//!   before the break): the body ends in an error, the request is a 400, hyper closes the
//!   connection and the upstream sees one truncated request at most, never a second message;
//! - after `CONNECT` or a request carrying `Upgrade` the bytes may become another protocol and
//!   the guard stops inspecting. hyper keeps parsing h1 only if that request is *not*
//!   upgraded, so the service must answer such a request with `Connection: close` unless it
//!   upgrades ([`close_unless_upgraded`]): hyper then never parses a head the guard did not see;
//! - the h2 connection preface switches the guard off (h2 frames carry their own lengths);
//! - held bytes are on a clock: a head (or chunk-size line) not complete within
//!   `header_read_timeout` fails the read. hyper's own header timeout cannot see a head that is
//!   held back — and under hyper-util's auto (h1/h2) server it is not even armed before the
//!   first byte arrives, which the guard is withholding — so the guard enforces it, and hyper's
//!   is off (it would also run while a keep-alive connection waits for its next request,
//!   which is `idle_timeout`'s business).
//!
//! A refused head never reaches hyper. The guard hands hyper a synthetic request instead,
//! carrying a per-connection random nonce and the refusal, and stops reading. The service
//! recognises the nonce ([`GuardTag::mark`]) — a sandbox cannot forge it — and answers with the
//! uniform error; the synthetic request says `Connection: close`, so hyper closes after it.
//! Earlier pipelined requests are served normally first.
//!
//! # Rules (RFC 9112 §6; stricter than hyper)
//!
//! | the head has …                                                          | answer |
//! |-------------------------------------------------------------------------|--------|
//! | both `Content-Length` and `Transfer-Encoding`                            | 400    |
//! | two or more `Content-Length` fields (even equal), or one not 1–19 digits | 400    |
//! | two or more `Transfer-Encoding` fields, or one other than `chunked`     | 400    |
//! | `Transfer-Encoding` on HTTP/1.0                                          | 400    |
//! | a bare LF, or anything `httparse` refuses (obs-fold, NUL, bad tokens)   | 400    |
//! | more than `max_header_bytes`, or more than `max_header_fields` fields    | 431    |
//! | a chunk size of 17+ hex digits or above `i64::MAX`, a bad chunk line     | 400 (first chunk) / connection closed (later) |
//!
//! # Memory usage
//!
//! At most `max_header_bytes` of head or trailers plus one chunk-size line
//! ([`MAX_CHUNK_LINE`] bytes) is held per connection, and at most `KEEP_IDLE` bytes of
//! buffer capacity while the connection waits on the client with nothing held (an idle
//! keep-alive connection).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::refusal::{Code, Refusal};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Header fields per head unless configured (`proxy.max_header_fields`; hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions and CRLF included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest chunk size: above this, parsers that store sizes signed see a negative number.
const MAX_CHUNK_SIZE: u64 = i64::MAX as u64;
/// Request header naming the nonce on a synthetic request.
const MARK_NONCE: &str = "x-sealgate-guard";
/// The first byte of a TLS handshake record (a ClientHello sent where a request was due).
const TLS_HANDSHAKE: u8 = 0x16;

/// Request header carrying the refusal status (`400` / `431`) on a synthetic request.
const MARK_STATUS: &str = "x-sealgate-guard-status";
/// Request header carrying the refusal reason on a synthetic request.
const MARK_REASON: &str = "x-sealgate-guard-reason";

/// Why the stream was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reject {
    /// `BadRequest` or `HeadersTooLarge`.
    pub code: Code,
    /// A fixed sentence for the sandbox and the audit log.
    pub reason: &'static str,
    /// True once the message's head was released to hyper (the error is mid-body).
    pub mid_message: bool,
}

impl Reject {
    fn bad(reason: &'static str) -> Self {
        Reject {
            code: Code::BadRequest,
            reason,
            mid_message: false,
        }
    }

    fn too_large(reason: &'static str) -> Self {
        Reject {
            code: Code::HeadersTooLarge,
            reason,
            mid_message: false,
        }
    }

    fn mid(reason: &'static str) -> Self {
        Reject {
            mid_message: true,
            ..Reject::bad(reason)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Connection start: the bytes could still be the h2 preface.
    Preface,
    /// Collecting a head into `held`.
    Head,
    /// Head (in `held`) is chunked; collecting its first chunk-size line into `line`.
    FirstChunk,
    /// This many body bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// No more inspection (after CONNECT / Upgrade, or h2).
    Passthrough,
    /// Refused; nothing more is accepted.
    Rejected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Collecting a chunk-size line into `line`.
    Size,
    /// This many data bytes left.
    Data(u64),
    /// This many bytes of the CRLF after the data seen.
    DataEnd(usize),
    /// Collecting trailer lines (after the last chunk) until an empty line.
    Trailers,
}

/// What follows a head that passed.
enum Next {
    Body(u64),
    Chunked { check_first: bool },
    Passthrough,
}

/// Buffer capacity the guard keeps while a connection waits on its client (a typical head);
/// larger buffers (a big head, or a POST's head and body in one read) are freed.
const KEEP_IDLE: usize = 2048;

/// The framing state machine (pure: bytes in, releasable bytes out).
///
/// Invariant: bytes are appended to `out` in input order, and a head is appended only after it
/// passed every rule, together with the first chunk-size line when that is checked too.
pub struct Framing {
    state: State,
    /// The head (and first chunk line) not yet released.
    held: Vec<u8>,
    /// The chunk-size or trailer line being collected (mid-body).
    line: Vec<u8>,
    /// In `held` (state `Head`): where the current line starts and how far `\n` was searched.
    line_start: usize,
    scanned: usize,
    /// Trailer bytes seen for the current body.
    trailer_bytes: usize,
    /// Empty lines found before a request line, to release ahead of the head.
    leading_empty_lines: usize,
    max_head: usize,
    max_fields: usize,
}

impl Framing {
    /// A machine for a new connection; heads over `max_head` bytes or [`MAX_HEADERS`] fields
    /// are refused with 431.
    pub fn new(max_head: usize) -> Self {
        Self::with_max_fields(max_head, MAX_HEADERS)
    }

    /// [`Framing::new`] with a header-field limit of `max_fields` (at least 1).
    pub fn with_max_fields(max_head: usize, max_fields: usize) -> Self {
        Framing {
            state: State::Preface,
            held: Vec::new(),
            line: Vec::new(),
            line_start: 0,
            scanned: 0,
            trailer_bytes: 0,
            leading_empty_lines: 0,
            max_head: max_head.max(64),
            max_fields: max_fields.max(1),
        }
    }

    /// Feeds client bytes; whatever may go to hyper now is appended to `out`.
    ///
    /// # Errors
    /// [`Reject`] when the stream breaks a rule of the module docs; the machine then refuses
    /// everything after.
    pub fn feed(&mut self, mut data: &[u8], out: &mut BytesMut) -> Result<(), Reject> {
        while !data.is_empty() {
            let used = self.step_or_reject(data, out)?;
            data = &data[used..];
        }
        Ok(())
    }

    /// [`Framing::feed`] up to the first byte that may pass unexamined
    /// ([`Framing::passthrough_budget`] > 0, e.g. the body after a head); returns how many
    /// bytes of `data` it used. The caller feeds or skips the rest.
    ///
    /// # Errors
    /// As [`Framing::feed`].
    pub fn feed_until_passthrough(
        &mut self,
        mut data: &[u8],
        out: &mut BytesMut,
    ) -> Result<usize, Reject> {
        let total = data.len();
        while !data.is_empty() && self.passthrough_budget() == 0 {
            let used = self.step_or_reject(data, out)?;
            data = &data[used..];
        }
        Ok(total - data.len())
    }

    fn step_or_reject(&mut self, data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        self.step(data, out).inspect_err(|_| {
            self.state = State::Rejected;
            self.held.clear();
            self.line.clear();
        })
    }

    /// True once inspection stopped (after CONNECT, `Upgrade` or the h2 preface).
    pub fn is_passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// True once the machine refused the stream.
    pub fn is_rejected(&self) -> bool {
        self.state == State::Rejected
    }

    /// True between two messages: every byte fed so far belongs to a complete message (or
    /// to empty lines before the next head), nothing is held, and the stream is still
    /// inspected (not after CONNECT, `Upgrade` or the h2 preface, not refused).
    pub fn between_messages(&self) -> bool {
        self.state == State::Head && self.held.is_empty() && self.line.is_empty()
    }

    /// True while bytes are held back (a partial head, chunk-size or trailer line).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty() || !self.line.is_empty()
    }

    /// Frees the collection buffers that grew beyond `keep` bytes while nothing is held. An
    /// idle keep-alive connection keeps `KEEP_IDLE` (a typical head: a busy connection does
    /// not re-grow its buffers on every request); a parked or pass-through one keeps none.
    pub fn release_idle(&mut self, keep: usize) {
        if self.held.is_empty() && self.held.capacity() > keep {
            self.held = Vec::new();
        }
        if self.line.is_empty() && self.line.capacity() > keep {
            self.line = Vec::new();
        }
    }

    /// How many next bytes may skip [`Framing::feed`] (inside a body, or after inspection
    /// stopped); report them with [`Framing::skip`].
    pub fn passthrough_budget(&self) -> u64 {
        if !self.held.is_empty() || !self.line.is_empty() {
            return 0;
        }
        match self.state {
            State::Passthrough => u64::MAX,
            State::Body(n) | State::Chunked(Chunk::Data(n)) => n,
            _ => 0,
        }
    }

    /// Accounts for `n ≤ passthrough_budget()` bytes that went to hyper unexamined.
    pub fn skip(&mut self, n: u64) {
        match self.state {
            State::Body(left) => self.state = body_after(left - n),
            State::Chunked(Chunk::Data(left)) => self.state = chunk_data_after(left - n),
            _ => {}
        }
    }

    fn step(&mut self, data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        match self.state {
            State::Rejected => Err(Reject::bad("request refused earlier on this connection")),
            State::Passthrough => {
                out.extend_from_slice(data);
                Ok(data.len())
            }
            State::Body(left) => {
                let n = take(left, data, out);
                self.state = body_after(left - n as u64);
                Ok(n)
            }
            State::Preface => Ok(self.preface(data, out)),
            State::Head => self.head(data, out),
            State::FirstChunk => self.first_chunk(data, out),
            State::Chunked(c) => self.chunked(c, data, out),
        }
    }

    /// Holds bytes while they match the h2 preface; on the full preface stops inspecting.
    fn preface(&mut self, data: &[u8], out: &mut BytesMut) -> usize {
        let at = self.held.len();
        let n = (H2_PREFACE.len() - at).min(data.len());
        if data[..n] != H2_PREFACE[at..at + n] {
            self.state = State::Head;
            return 0;
        }
        self.held.extend_from_slice(&data[..n]);
        if self.held.len() == H2_PREFACE.len() {
            out.extend_from_slice(&self.held);
            self.held.clear();
            self.state = State::Passthrough;
        }
        n
    }

    /// Collects a head; on its end judges it and moves on. Returns the bytes of `data` used.
    ///
    /// Empty lines before a request line (RFC 9112 §2.2) are released as they are: hyper's
    /// parser skips them too, and so the released bytes are always a prefix of the input.
    fn head(&mut self, mut data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        let total = data.len();
        while self.held.is_empty() && data.starts_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
            data = &data[2..];
        }
        let room = self.max_head + 1 - self.held.len();
        let take = data.len().min(room);
        self.held.extend_from_slice(&data[..take]);
        let end = self.find_head_end();
        for _ in 0..std::mem::take(&mut self.leading_empty_lines) {
            out.extend_from_slice(b"\r\n");
        }
        let Some(end) = end? else {
            if self.held.len() > self.max_head {
                return Err(Reject::too_large(
                    "request header section is larger than proxy.max_header_bytes",
                ));
            }
            return Ok(total - data.len() + take);
        };
        let rest = self.held.len() - end;
        self.held.truncate(end);
        self.line_start = 0;
        self.scanned = 0;
        let next = check_head(&self.held, self.max_fields)?;
        self.after_head(next, out);
        Ok(total - data.len() + take - rest)
    }

    /// Scans `held` for the empty line ending the head; rejects a bare LF on the way, and a
    /// request line that starts with a TLS handshake record's 0x16 at once (no method does;
    /// however the bytes are split, and after leading empty lines too).
    fn find_head_end(&mut self) -> Result<Option<usize>, Reject> {
        self.refuse_tls()?;
        let mut from = self.scanned;
        while let Some(off) = memchr::memchr(b'\n', &self.held[from..]) {
            let i = from + off;
            if i == 0 || self.held[i - 1] != b'\r' {
                return Err(Reject::bad("bare LF in request head"));
            }
            from = i + 1;
            if i + 1 - self.line_start != 2 {
                self.line_start = i + 1;
                continue;
            }
            if self.line_start > 0 {
                return Ok(Some(i + 1));
            }
            // An empty line before any request line (its CR came in an earlier read).
            self.held.drain(..2);
            self.leading_empty_lines += 1;
            from = 0;
            self.refuse_tls()?;
        }
        self.scanned = self.held.len();
        Ok(None)
    }

    /// A request line (`line_start` 0: none of it ended yet) that starts with 0x16 is a TLS
    /// client talking to a plain-HTTP port.
    fn refuse_tls(&self) -> Result<(), Reject> {
        if self.line_start != 0 || self.held.first() != Some(&TLS_HANDSHAKE) {
            return Ok(());
        }
        Err(Reject::bad(
            "a TLS handshake where an HTTP request head was expected (TLS to a plain-HTTP \
             port: a proxy URL must be http://, over which the client sends CONNECT and then \
             TLS; or TLS again inside a tunnel that already is)",
        ))
    }

    fn after_head(&mut self, next: Next, out: &mut BytesMut) {
        self.trailer_bytes = 0;
        match next {
            Next::Chunked { check_first: true } => {
                self.state = State::FirstChunk;
                return;
            }
            Next::Chunked { check_first: false } => self.state = State::Chunked(Chunk::Size),
            Next::Body(n) => self.state = body_after(n),
            Next::Passthrough => self.state = State::Passthrough,
        }
        out.extend_from_slice(&self.held);
        self.held.clear();
    }

    /// Collects the first chunk-size line; the head is released only if it is valid.
    fn first_chunk(&mut self, data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        let (used, done) = collect_line(&mut self.line, data, MAX_CHUNK_LINE, false)?;
        if !done {
            return Ok(used);
        }
        let size = chunk_size(&self.line).map_err(Reject::bad)?;
        out.extend_from_slice(&self.held);
        out.extend_from_slice(&self.line);
        self.held.clear();
        self.line.clear();
        self.state = State::Chunked(chunk_after_size(size));
        Ok(used)
    }

    fn chunked(&mut self, c: Chunk, data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        match c {
            Chunk::Size => {
                let (used, done) = collect_line(&mut self.line, data, MAX_CHUNK_LINE, true)?;
                if done {
                    let size = chunk_size(&self.line).map_err(Reject::mid)?;
                    self.release_line(out);
                    self.state = State::Chunked(chunk_after_size(size));
                }
                Ok(used)
            }
            Chunk::Data(left) => {
                let n = take(left, data, out);
                self.state = chunk_data_after(left - n as u64);
                Ok(n)
            }
            Chunk::DataEnd(seen) => {
                // Release the matching part byte by byte, so how reads are cut never changes
                // what was released before a refusal.
                let n = (2 - seen).min(data.len());
                let ok = data[..n]
                    .iter()
                    .zip(&b"\r\n"[seen..])
                    .take_while(|(a, b)| a == b)
                    .count();
                out.extend_from_slice(&data[..ok]);
                if ok < n {
                    return Err(Reject::mid("chunk data not followed by CRLF"));
                }
                self.state = State::Chunked(if seen + n == 2 {
                    Chunk::Size
                } else {
                    Chunk::DataEnd(seen + n)
                });
                Ok(n)
            }
            Chunk::Trailers => self.trailers(data, out),
        }
    }

    fn trailers(&mut self, data: &[u8], out: &mut BytesMut) -> Result<usize, Reject> {
        let room = self.max_head.saturating_sub(self.trailer_bytes).max(2);
        let (used, done) = collect_line(&mut self.line, data, room, true)?;
        if !done {
            return Ok(used);
        }
        self.trailer_bytes += self.line.len();
        let last = self.line == b"\r\n";
        self.release_line(out);
        if last {
            self.state = State::Head;
        }
        Ok(used)
    }

    fn release_line(&mut self, out: &mut BytesMut) {
        out.extend_from_slice(&self.line);
        self.line.clear();
    }
}

fn take(left: u64, data: &[u8], out: &mut BytesMut) -> usize {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
    out.extend_from_slice(&data[..n]);
    n
}

fn body_after(left: u64) -> State {
    if left == 0 {
        State::Head
    } else {
        State::Body(left)
    }
}

fn chunk_data_after(left: u64) -> State {
    State::Chunked(if left == 0 {
        Chunk::DataEnd(0)
    } else {
        Chunk::Data(left)
    })
}

fn chunk_after_size(size: u64) -> Chunk {
    if size == 0 {
        Chunk::Trailers
    } else {
        Chunk::Data(size)
    }
}

/// Appends `data` up to and including the first LF to `line`. Returns (bytes used, complete).
fn collect_line(
    line: &mut Vec<u8>,
    data: &[u8],
    max: usize,
    mid: bool,
) -> Result<(usize, bool), Reject> {
    let fail = |reason| {
        if mid {
            Reject::mid(reason)
        } else {
            Reject::bad(reason)
        }
    };
    let (used, done) = match memchr::memchr(b'\n', data) {
        Some(i) => (i + 1, true),
        None => (data.len(), false),
    };
    if line.len() + used > max {
        return Err(fail("chunk-size or trailer line too long"));
    }
    line.extend_from_slice(&data[..used]);
    if done && (line.len() < 2 || line[line.len() - 2] != b'\r') {
        return Err(fail("bare LF in chunked body"));
    }
    Ok((used, done))
}

/// Parses `chunk-size [ BWS ; chunk-ext ] CRLF` (RFC 9112 §7.1).
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    let body = &line[..line.len() - 2];
    let digits = body.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err("chunk size is not a hexadecimal number");
    }
    if digits > 16 {
        return Err("chunk size too large");
    }
    let text = std::str::from_utf8(&body[..digits]).map_err(|_| "chunk size is not hex")?;
    let size = u64::from_str_radix(text, 16).map_err(|_| "chunk size too large")?;
    if size > MAX_CHUNK_SIZE {
        return Err("chunk size too large");
    }
    let ext = &body[digits..];
    let ext = &ext[ext.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    let printable = ext.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t');
    if !(ext.is_empty() || ext[0] == b';' && printable) {
        return Err("malformed chunk extension");
    }
    Ok(size)
}

/// Judges one complete head (ending in the empty line) by the rules of the module docs.
fn check_head(head: &[u8], max_fields: usize) -> Result<Next, Reject> {
    let mut stack = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut heap = Vec::new();
    let fields: &mut [httparse::Header<'_>] = if max_fields <= MAX_HEADERS {
        &mut stack[..max_fields]
    } else {
        heap.resize(max_fields, httparse::EMPTY_HEADER);
        &mut heap
    };
    let mut req = httparse::Request::new(fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err(Reject::bad("malformed request head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::too_large(
                "more header fields than proxy.max_header_fields",
            ))
        }
        Err(e) => return Err(Reject::bad(parse_reason(e))),
    }
    // hyper parses the target as a `Uri` and answers one it cannot parse with a bare 400 of
    // its own (no JSON, no `x-sealgate-error`; outside pass: `CONNECT exa%mple.test:443`,
    // `host:443:99`, raw UTF-8): refused here, the uniform way.
    if req.path.is_some_and(|t| http::Uri::try_from(t).is_err()) {
        return Err(Reject::bad("malformed request target"));
    }
    let mut f = Fields::default();
    for h in req.headers.iter() {
        f.note(h)?;
    }
    f.next(req.method == Some("CONNECT"), req.version == Some(0))
}

fn parse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "malformed header field name (obs-fold or bad character)",
        httparse::Error::HeaderValue => "invalid byte in a header field value",
        httparse::Error::NewLine => "malformed line ending in request head",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::Token => "malformed request method",
        _ => "malformed request head",
    }
}

/// The framing-relevant fields of one head.
#[derive(Default)]
struct Fields {
    content_lengths: usize,
    length: u64,
    transfer_encodings: usize,
    chunked: bool,
    upgrade: bool,
    expect: bool,
}

impl Fields {
    fn note(&mut self, h: &httparse::Header<'_>) -> Result<(), Reject> {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            self.content_lengths += 1;
            self.length = content_length(h.value)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encodings += 1;
            self.chunked = trim(h.value).eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("upgrade") {
            self.upgrade = true;
        } else if name.eq_ignore_ascii_case("expect") {
            self.expect = true;
        }
        Ok(())
    }

    fn next(&self, connect: bool, http10: bool) -> Result<Next, Reject> {
        let te = self.transfer_encodings > 0;
        if te && self.content_lengths > 0 {
            return Err(Reject::bad(
                "both Content-Length and Transfer-Encoding (request smuggling)",
            ));
        }
        if self.content_lengths > 1 {
            return Err(Reject::bad("multiple Content-Length fields"));
        }
        if self.transfer_encodings > 1 {
            return Err(Reject::bad("multiple Transfer-Encoding fields"));
        }
        if te && !self.chunked {
            return Err(Reject::bad(
                "Transfer-Encoding other than exactly \"chunked\"",
            ));
        }
        if te && http10 {
            return Err(Reject::bad("Transfer-Encoding on HTTP/1.0"));
        }
        Ok(if connect || self.upgrade {
            Next::Passthrough
        } else if te {
            Next::Chunked {
                check_first: !self.expect,
            }
        } else {
            Next::Body(self.length)
        })
    }
}

fn content_length(value: &[u8]) -> Result<u64, Reject> {
    let v = trim(value);
    let digits = !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit);
    let parsed = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
    match parsed {
        Some(n) if digits => Ok(n),
        _ => Err(Reject::bad("malformed Content-Length")),
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    let end = v.len()
        - v.iter()
            .rev()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
    &v[start..end.max(start)]
}

// ---------------------------------------------------------------------------------------------
// The service side: recognising synthetic requests, closing after non-upgraded upgrades.

/// The per-connection nonce shared by an [`H1Guard`] and its service, and what the guard
/// last saw of the framing.
///
/// The nonce is drawn when the first synthetic request is built, not with the connection:
/// almost no connection is ever refused, and two `getrandom` calls per proxied connection
/// (the CONNECT connection's and the intercepted one's) were a fifth of the proxy's
/// `getrandom` calls with a new TLS connection per request. Until then no request is ours:
/// a sandbox that sends the nonce header first finds nothing to match.
pub struct GuardTag {
    nonce: OnceLock<String>,
    /// After the guard's last read: hyper has been handed every byte the guard released, and
    /// those end at a message boundary ([`Framing::between_messages`]).
    between: AtomicBool,
}

/// A request-extension carrying the guard's refusal (set by [`GuardTag::mark`]; a sandbox
/// cannot set extensions).
#[derive(Clone, Debug)]
pub struct FramingRefused(pub Refusal);

impl GuardTag {
    /// A fresh tag; its 128-bit random nonce is drawn on first use.
    pub fn new() -> Arc<Self> {
        Arc::new(GuardTag {
            nonce: OnceLock::new(),
            between: AtomicBool::new(false),
        })
    }

    /// True when, after the guard's last read, hyper held every released byte and those
    /// ended at a message boundary: hyper's reading is then between two requests once it has
    /// processed what it read (see `serve`'s parking).
    pub fn between_messages(&self) -> bool {
        self.between.load(Ordering::Relaxed)
    }

    /// The request hyper is handed in place of a refused head.
    fn synthetic(&self, r: &Reject) -> Vec<u8> {
        format!(
            "GET /.sealgate/refused HTTP/1.1\r\nhost: sealgate.invalid\r\n{MARK_NONCE}: {}\r\n\
             {MARK_STATUS}: {}\r\n{MARK_REASON}: {}\r\nconnection: close\r\n\r\n",
            self.nonce.get_or_init(|| crate::random::random_hex(16)),
            r.code.status().as_u16(),
            r.reason
        )
        .into_bytes()
    }

    /// If `req` is this connection's synthetic request, attaches [`FramingRefused`] to it.
    pub fn mark<B>(&self, req: &mut Request<B>) {
        let h = req.headers();
        let ours = h
            .get(MARK_NONCE)
            .zip(self.nonce.get())
            .is_some_and(|(v, nonce)| v.as_bytes() == nonce.as_bytes());
        if !ours {
            return;
        }
        let status = h.get(MARK_STATUS).map(HeaderValue::as_bytes);
        let code = if status == Some(b"431") {
            Code::HeadersTooLarge
        } else {
            Code::BadRequest
        };
        let reason = h
            .get(MARK_REASON)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("malformed request")
            .to_owned();
        let r = Refusal::new(code, format!("request framing refused: {reason}"));
        req.extensions_mut().insert(FramingRefused(r));
    }
}

/// Whether hyper would upgrade the connection after this request (CONNECT, or `Upgrade` on
/// HTTP/1.x), which is where the guard stops inspecting.
pub fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && (req.method() == Method::CONNECT || req.headers().contains_key(header::UPGRADE))
}

/// Adds `Connection: close` to the answer of an upgrade-capable request that is not upgraded
/// (hyper would otherwise parse the next request on bytes the guard no longer inspects).
pub fn close_unless_upgraded<B>(wanted: bool, connect: bool, resp: &mut Response<B>) {
    let s = resp.status();
    let upgraded = s == StatusCode::SWITCHING_PROTOCOLS || (connect && s.is_success());
    if wanted && !upgraded {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

// ---------------------------------------------------------------------------------------------
// The I/O adapter

/// The limits on a request head, from `[proxy]`.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    /// `max_header_bytes`.
    pub max_head: usize,
    /// `max_header_fields`.
    pub max_fields: usize,
    /// `header_read_timeout`: how long a head may stay incomplete.
    pub hold: Duration,
}

impl HeadLimits {
    /// The limits of `[proxy]`.
    pub fn of(p: &crate::config::ProxyConfig) -> Self {
        HeadLimits {
            max_head: p.max_header_bytes,
            max_fields: p.max_header_fields,
            hold: p.header_read_timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// Wraps the client stream of an h1 (or auto h1/h2) server; see the module docs.
    pub struct H1Guard<S> {
        #[pin]
        inner: S,
        framing: Framing,
        tag: Arc<GuardTag>,
        // Bytes released by the machine, not yet read by hyper.
        ready: BytesMut,
        // How long bytes may be held, and the clock running while they are.
        hold_limit: Duration,
        deadline: Option<Pin<Box<Sleep>>>,
        // A refusal mid-message, failing every read once `ready` is delivered.
        failing: Option<&'static str>,
    }
}

impl<S> H1Guard<S> {
    /// Frees every buffer that holds nothing (a parked connection: quiet, between two
    /// messages), instead of keeping `KEEP_IDLE` bytes for the next head.
    pub fn shrink(&mut self) {
        if self.ready.is_empty() {
            self.ready = BytesMut::new();
        }
        self.framing.release_idle(0);
    }

    /// The guarded stream, for bytes that are never parsed (a lingering close's).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Guards `inner`; heads over `limits.max_head` bytes or `limits.max_fields` fields get
    /// 431; a head still incomplete `limits.hold` after its first byte fails the read
    /// (slowloris).
    pub fn new(inner: S, limits: HeadLimits, tag: Arc<GuardTag>) -> Self {
        H1Guard {
            inner,
            framing: Framing::with_max_fields(limits.max_head, limits.max_fields),
            tag,
            ready: BytesMut::new(),
            hold_limit: limits.hold,
            deadline: None,
            failing: None,
        }
    }
}

/// What [`examine`] did with one read.
enum Fed {
    /// The read may stay in the caller's buffer as it is: its head part was released
    /// unchanged and the rest is body the machine lets pass unexamined (`ready` is empty).
    InPlace,
    /// The released bytes are in `ready` (the read must be taken out of the caller's buffer).
    Released,
    /// The machine refused the stream (the read must be taken out of the caller's buffer).
    Refused(Reject),
}

/// Runs one read (`data`, still in the caller's buffer) through `framing`.
///
/// The head part is examined byte by byte; when the rest of the read is body that may pass
/// unexamined, nothing held bytes from an earlier read (`was_holding` false) and the released
/// bytes are exactly the read's prefix, the read stays where it is (no copy of the body). In
/// every other case the whole read is fed and released into `ready`, as before.
fn examine(framing: &mut Framing, data: &[u8], ready: &mut BytesMut, was_holding: bool) -> Fed {
    let used = match framing.feed_until_passthrough(data, ready) {
        Ok(used) => used,
        Err(r) => return Fed::Refused(r),
    };
    let rest = (data.len() - used) as u64;
    if rest == 0 {
        return Fed::Released;
    }
    if !was_holding && rest <= framing.passthrough_budget() && ready[..] == data[..used] {
        framing.skip(rest);
        ready.clear();
        return Fed::InPlace;
    }
    match framing.feed(&data[used..], ready) {
        Ok(()) => Fed::Released,
        Err(r) => Fed::Refused(r),
    }
}

impl<S: AsyncRead> AsyncRead for H1Guard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = self.as_mut().poll_guarded(cx, buf);
        let this = self.project();
        let between = this.ready.is_empty() && this.framing.between_messages();
        this.tag.between.store(between, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncRead> H1Guard<S> {
    fn poll_guarded(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = *this.failing {
                // Every read from now on (hyper can take the first error while it still holds
                // an undelivered frame, and then waits on the body for ever: the request
                // stalled to 408 after `response_timeout_secs`).
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
            }
            if this.framing.is_rejected() {
                // The synthetic request was delivered; hyper answers it and closes. Nothing
                // more is read from the client.
                return Poll::Pending;
            }
            if !this.framing.is_holding() {
                *this.deadline = None;
            } else {
                let limit = *this.hold_limit;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head incomplete at proxy.header_read_timeout_secs",
                    )));
                }
            }
            let before = buf.filled().len();
            let Poll::Ready(read) = this.inner.as_mut().poll_read(cx, buf) else {
                // Waiting on the client (an idle keep-alive connection, most of the time):
                // `ready` is empty here, so hand back what the last read grew beyond a head —
                // everything once inspection stopped (a CONNECT tunnel's outer connection).
                let keep = if this.framing.is_passthrough() {
                    0
                } else {
                    KEEP_IDLE
                };
                // A `ready` read to its end reports no capacity while its allocation stays:
                // `try_reclaim` takes the allocation back into view (nothing to move) and
                // says whether it holds more than `keep`.
                if keep == 0 || this.ready.try_reclaim(keep + 1) {
                    *this.ready = BytesMut::new();
                }
                this.framing.release_idle(keep);
                return Poll::Pending;
            };
            read?;
            let got = buf.filled().len() - before;
            if got == 0 {
                return Poll::Ready(Ok(()));
            }
            if got as u64 <= this.framing.passthrough_budget() {
                this.framing.skip(got as u64);
                return Poll::Ready(Ok(()));
            }
            let was_holding = this.framing.is_holding();
            let fed = examine(
                this.framing,
                &buf.filled()[before..],
                this.ready,
                was_holding,
            );
            if matches!(fed, Fed::InPlace) {
                return Poll::Ready(Ok(()));
            }
            buf.set_filled(before);
            if let Fed::Refused(r) = fed {
                if r.mid_message {
                    // What the read released before the break goes first (a head and the
                    // chunks before a bad one, all in one read, were dropped with the
                    // connection: no answer, no audit line; outside pass h42a).
                    *this.failing = Some(r.reason);
                    continue;
                }
                tracing::debug!(reason = r.reason, "request framing refused");
                this.ready.extend_from_slice(&this.tag.synthetic(&r));
            }
        }
    }
}

impl<S: AsyncWrite> AsyncWrite for H1Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A request carrying `headers`, as hyper hands it to the service.
    fn request_with(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/.sealgate/refused");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    /// The header lines of a synthetic request's text.
    fn headers_of(synthetic: &[u8]) -> Vec<(String, String)> {
        let text = std::str::from_utf8(synthetic).unwrap();
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn a_nonce_header_before_any_refusal_is_not_ours() {
        let tag = GuardTag::new();
        let mut req = request_with(&[(MARK_NONCE, ""), (MARK_STATUS, "400")]);
        tag.mark(&mut req);
        assert!(req.extensions().get::<FramingRefused>().is_none());
        let mut req = request_with(&[(MARK_NONCE, "00000000000000000000000000000000")]);
        tag.mark(&mut req);
        assert!(req.extensions().get::<FramingRefused>().is_none());
    }

    #[test]
    fn only_the_synthetic_requests_nonce_marks() {
        let tag = GuardTag::new();
        let synthetic = tag.synthetic(&Reject::too_large("head too large"));
        let headers = headers_of(&synthetic);
        let nonce = &headers.iter().find(|(k, _)| k == MARK_NONCE).unwrap().1;
        assert_eq!(nonce.len(), 32, "128 bits as hex");
        assert_eq!(
            tag.synthetic(&Reject::bad("x")),
            tag.synthetic(&Reject::bad("x")),
            "one nonce per connection"
        );
        let as_pairs: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut req = request_with(&as_pairs);
        tag.mark(&mut req);
        let refused = req.extensions().get::<FramingRefused>().expect("marked");
        assert_eq!(refused.0.code, Code::HeadersTooLarge);
        let mut wrong = request_with(&[(MARK_NONCE, &nonce.replace(&nonce[..1], "x"))]);
        tag.mark(&mut wrong);
        assert!(wrong.extensions().get::<FramingRefused>().is_none());
        let other = GuardTag::new();
        let mut req = request_with(&as_pairs);
        other.mark(&mut req);
        assert!(
            req.extensions().get::<FramingRefused>().is_none(),
            "another connection's nonce"
        );
    }

    /// Feeds `input` in pieces cut at `cuts`; returns (released bytes, first rejection).
    fn run(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Reject>) {
        let mut f = Framing::new(1024);
        let mut out = BytesMut::new();
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(last, input.len());
            if let Err(r) = f.feed(&input[last..c], &mut out) {
                return (out.to_vec(), Some(r));
            }
            last = c;
        }
        (out.to_vec(), None)
    }

    /// Like [`run`], through the adapter's per-read logic ([`examine`]) instead of `feed`.
    fn run_reads(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Reject>) {
        let mut f = Framing::new(1024);
        let (mut out, mut ready) = (Vec::new(), BytesMut::new());
        let mut last = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            let c = c.clamp(last, input.len());
            let read = &input[last..c];
            last = c;
            if read.is_empty() {
                continue;
            }
            if read.len() as u64 <= f.passthrough_budget() {
                f.skip(read.len() as u64);
                out.extend_from_slice(read);
                continue;
            }
            let was_holding = f.is_holding();
            match examine(&mut f, read, &mut ready, was_holding) {
                Fed::InPlace => out.extend_from_slice(read),
                Fed::Released => out.extend_from_slice(&ready.split()),
                Fed::Refused(r) => {
                    out.extend_from_slice(&ready);
                    return (out, Some(r));
                }
            }
        }
        (out, None)
    }

    fn refused(input: &str) -> Reject {
        let (out, r) = run(input.as_bytes(), &[]);
        let r = r.unwrap_or_else(|| panic!("accepted: {input:?}"));
        assert!(
            r.mid_message || out.is_empty(),
            "bytes released before refusal"
        );
        r
    }

    fn passes(input: &str) {
        let (out, r) = run(input.as_bytes(), &[]);
        assert_eq!(r, None, "{input:?}");
        assert_eq!(out, input.as_bytes());
    }

    const GET: &str = "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";

    #[test]
    fn plain_requests_pass_unchanged() {
        passes(GET);
        passes("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        passes("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n");
        passes("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04anything");
        passes("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01binary\n\n");
    }

    /// Regression (fuzz): an empty line whose CR and LF arrive in two reads, followed by a
    /// refused head, releases the same bytes as the unsplit stream.
    #[test]
    fn split_empty_line_before_a_refused_head() {
        let input = b"\r\nGET / HTTP/1.1\n\r\n";
        assert_eq!(run(input, &[1]), run(input, &[]));
        assert_eq!(run(input, &[]).0, b"\r\n");
    }

    /// Targets hyper cannot parse as a `Uri` get the uniform 400, not hyper's bare one.
    #[test]
    fn targets_that_are_no_uri_are_refused() {
        for target in ["exa%mple.test:443", "a.test:443:99", "caf\u{e9}.test:443"] {
            let r = refused(&format!("CONNECT {target} HTTP/1.1\r\nHost: a\r\n\r\n"));
            assert_eq!(
                (r.code, r.reason),
                (Code::BadRequest, "malformed request target")
            );
        }
        passes("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        passes("GET http://a.test/x?y=%41 HTTP/1.1\r\nHost: a.test\r\n\r\n");
    }

    #[test]
    fn cl_te_in_either_order_is_refused() {
        for h in [
            "Content-Length: 4\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 4",
        ] {
            let r = refused(&format!(
                "POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n\r\n0\r\n\r\n"
            ));
            assert_eq!(r.code, Code::BadRequest);
            assert!(r.reason.contains("both"), "{}", r.reason);
        }
    }

    #[test]
    fn length_and_encoding_variants_are_refused() {
        for h in [
            "Content-Length: 3\r\nContent-Length: 3",
            "Content-Length: 3\r\nContent-Length: 4",
            "Content-Length: +3",
            "Content-Length: 3, 3",
            "Content-Length: 0x3",
            "Content-Length: 99999999999999999999",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding:\tchunked\x0b",
            "Transfer-Encoding : chunked",
            " Transfer-Encoding: chunked",
            "X: a\r\n Transfer-Encoding: chunked",
            "X: a\x00b",
        ] {
            refused(&format!("POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n\r\n"));
        }
        refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    }

    #[test]
    fn bare_lf_anywhere_in_a_head_is_refused() {
        refused("GET / HTTP/1.1\nHost: a\r\n\r\n");
        refused("GET / HTTP/1.1\r\nHost: a\n\n");
        refused("\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    /// A client that speaks TLS to the plain proxy port (wget2, `curl -x https://…`) is told
    /// so at once, not "bare LF" (or nothing until the header timeout, for a ClientHello
    /// without a 0x0a byte in it).
    #[test]
    fn a_tls_client_hello_is_named() {
        let hello = [
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ];
        for cuts in [vec![], vec![1], vec![3]] {
            let (_, r) = run(&hello, &cuts);
            let r = r.expect("refused");
            assert!(r.reason.contains("TLS handshake"), "{}", r.reason);
        }
    }

    #[test]
    fn leading_empty_lines_pass_through() {
        let input = format!("\r\n\r\n{GET}\r\n{GET}");
        for cuts in [vec![], vec![1], vec![1, 3], vec![2, 3, 36, 37]] {
            let (out, r) = run(input.as_bytes(), &cuts);
            assert_eq!(r, None);
            assert_eq!(out, input.as_bytes(), "cuts {cuts:?}");
        }
    }

    /// A CONNECT head that came in two reads is released from `ready`; once the tunnel waits
    /// on its client, none of that allocation is kept (a read that consumed `ready` leaves
    /// its capacity at 0 while the allocation stays: it was kept for the tunnel's life).
    #[tokio::test]
    async fn a_waiting_pass_through_connection_keeps_no_head_buffer() {
        let (mut client, server) = tokio::io::duplex(4096);
        let limits = HeadLimits {
            max_head: 16 * 1024,
            max_fields: 100,
            hold: Duration::from_secs(5),
        };
        let mut guard = Box::pin(H1Guard::new(server, limits, GuardTag::new()));
        let head = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n";
        let (one, two) = head.split_at(20);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        client.write_all(one).await.unwrap();
        for part in [two, b"tls"] {
            let n = tokio::time::timeout(Duration::from_millis(50), guard.read(&mut buf)).await;
            assert!(n.is_err(), "waits for more");
            client.write_all(part).await.unwrap();
            let n = guard.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [&head[..], b"tls"].concat());
        let n = tokio::time::timeout(Duration::from_millis(50), guard.read(&mut buf)).await;
        assert!(n.is_err(), "waits on the client");
        assert!(!guard.ready.try_reclaim(1), "the head's buffer is freed");
    }

    #[test]
    fn oversized_heads_get_431() {
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(refused(&big).code, Code::HeadersTooLarge);
        let many: String = (0..101).map(|i| format!("X{i}: 1\r\n")).collect();
        let r = refused(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
        assert_eq!(r.code, Code::HeadersTooLarge);
    }

    #[test]
    fn bad_first_chunk_holds_the_head_back() {
        let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        for chunk in [
            "fffffffffffffffff\r\n",
            "8000000000000000\r\n",
            "zz\r\n",
            "5\n",
            "5 x\r\n",
            "-5\r\n",
        ] {
            let r = refused(&format!("{head}{chunk}hello\r\n0\r\n\r\n"));
            assert!(!r.mid_message, "{chunk:?}");
        }
        let (out, r) = run(format!("{head}5\r").as_bytes(), &[]);
        assert!(
            out.is_empty() && r.is_none(),
            "head waits for its first chunk line"
        );
    }

    #[test]
    fn expect_continue_releases_the_head_at_once() {
        let head = "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, r) = run(head.as_bytes(), &[]);
        assert_eq!((out.as_slice(), r), (head.as_bytes(), None));
    }

    #[test]
    fn bad_later_chunk_fails_mid_message() {
        let input = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\nfffffffffffffffffff\r\n";
        assert!(refused(input).mid_message);
        let input = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\naXX";
        assert!(refused(input).mid_message);
    }

    /// Regression (cargo-fuzz `h1_framing`): a CR then a wrong byte after chunk data releases
    /// the same bytes whether or not a read boundary falls between them.
    #[test]
    fn broken_crlf_after_chunk_data_is_cut_independent() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\x01";
        let whole = run(input, &[]);
        assert!(whole.1.is_some_and(|r| r.mid_message));
        assert_eq!(run(input, &[input.len() - 1]), whole);
    }

    #[test]
    fn smuggled_second_request_inside_a_body_is_not_a_head() {
        // A CL body that *looks* like a request with CL+TE is just body bytes.
        let inner = "GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        passes(&format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{inner}",
            inner.len()
        ));
    }

    #[test]
    fn budget_and_skip_follow_bodies() {
        let mut f = Framing::new(1024);
        let mut out = BytesMut::new();
        f.feed(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", &mut out)
            .unwrap();
        assert_eq!(f.passthrough_budget(), 10);
        f.skip(10);
        assert_eq!(f.passthrough_budget(), 0);
        f.feed(GET.as_bytes(), &mut out).unwrap();
        f.feed(b"CONNECT a:1 HTTP/1.1\r\n\r\n", &mut out).unwrap();
        assert_eq!(f.passthrough_budget(), u64::MAX);
    }

    /// Requests built from valid and hostile parts.
    fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
        let part = prop_oneof![
            Just(GET.to_owned()),
            Just("POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_owned()),
            Just(format!(
                "POST / HTTP/1.1\r\nContent-Length: 64\r\n\r\n{}",
                "b".repeat(64)
            )),
            Just(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                    .to_owned()
            ),
            Just(
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                    .to_owned()
            ),
            Just("\r\n".to_owned()),
            Just("GET / HTTP/1.1\nX: y\r\n\r\n".to_owned()),
            "[ -~\r\n]{0,20}",
        ];
        prop::collection::vec(part, 0..6).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Where reads are cut never changes what is released or refused.
        #[test]
        fn chunking_does_not_change_the_verdict(
            input in stream_strategy(),
            cuts in prop::collection::vec(0..400usize, 0..10),
        ) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let whole = run(&input, &[]);
            let split = run(&input, &cuts);
            prop_assert_eq!(whole.1, split.1);
            prop_assert_eq!(whole.0, split.0);
        }

        /// The adapter's per-read path (reads inside a body skipped, a read's body part left
        /// in place after its head) releases exactly what feeding every byte releases, and
        /// refuses the same way.
        #[test]
        fn the_in_place_read_path_releases_what_feeding_releases(
            input in stream_strategy(),
            cuts in prop::collection::vec(0..400usize, 0..10),
        ) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            prop_assert_eq!(run_reads(&input, &cuts), run(&input, &cuts));
        }

        /// Nothing is invented, dropped or reordered: the released bytes are a prefix of the
        /// input.
        #[test]
        fn output_is_a_prefix_of_input(input in prop::collection::vec(any::<u8>(), 0..300)) {
            let (out, _) = run(&input, &[]);
            prop_assert!(input.starts_with(&out));
        }
    }
}
