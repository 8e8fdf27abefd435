//! Hostile and unusual responses (issue 12): an upstream that received a real value sends it
//! back through every channel it controls — the h1 reason phrase, header names, stacked
//! codings however spelled, trailers, unknown coding names — or forges sealgate's own
//! `x-sealgate-error`; and responses with a coding but no body (empty 200, 204, 304, `HEAD`,
//! also from a real nginx) arrive intact. The value is checked in any ASCII case: hyper
//! lowercases header names, so a lowercased value is how a name would leak it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::daemon::{Harness, Opts};
use crate::support::hostile::{self, Head, Hostile};
use crate::support::pki::TestPki;
use crate::support::proxy_client::{self as pc, ReqBody, SandboxCreds};

/// Mixed case on purpose: a header name can only carry it lowercased.
const VALUE: &str = "sk-Adv-Resp-0601";
const HOST: &str = "api.example.test";
const API: &str = "api.example.test:443";

struct Env {
    h: Harness,
    sb: SandboxCreds,
    /// The upstream (a [`Hostile`] or an [`Nginx`]), kept running as long as the daemon.
    _up: Box<dyn std::any::Any + Send>,
}

impl Env {
    fn token(&self) -> String {
        self.sb.token("KEY")
    }
}

/// A daemon whose `KEY` (header location) may be unsealed for `HOST`, which is `addr`.
async fn env_on(pki: Arc<TestPki>, addr: SocketAddr, up: Box<dyn std::any::Any + Send>) -> Env {
    let mut opts = Opts::default();
    opts.resolve.push((HOST.into(), addr));
    let h = Harness::try_start(opts, Some(pki))
        .await
        .expect("daemon starts");
    let store = h.store("s", Some(&[HOST])).await;
    h.secret(&store, "KEY", VALUE, None, Some(&["header"]))
        .await;
    let sb = SandboxCreds::from_answer(&h.sandbox("s").await);
    Env { h, sb, _up: up }
}

async fn env_h1(answer: impl Fn(&Head) -> Vec<u8> + Send + Sync + 'static) -> Env {
    let pki = Arc::new(TestPki::new());
    let up = Hostile::h1(pki.server_config(&[HOST], &[b"http/1.1"]), answer).await;
    env_on(pki, up.addr, Box::new(up)).await
}

async fn env_h2(
    answer: impl Fn(&Head) -> Response<hostile::H2Body> + Send + Sync + 'static,
) -> Env {
    let pki = Arc::new(TestPki::new());
    let up = Hostile::h2(pki.server_config(&[HOST], &[b"h2"]), answer).await;
    env_on(pki, up.addr, Box::new(up)).await
}

/// The unsealed value as the upstream received it.
fn real(head: &Head) -> String {
    head.header("x-api-key").unwrap_or_default().to_owned()
}

/// Fails if `bytes` (something the sandbox received) hold the value in any ASCII case.
fn assert_no_value(what: &str, bytes: &[u8]) {
    let lower = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    assert!(
        !lower.contains(&VALUE.to_ascii_lowercase()),
        "{what}: the real value reached the sandbox: {lower}"
    );
}

fn assert_fields_clean(what: &str, fields: &HeaderMap) {
    for (n, v) in fields {
        assert_no_value(&format!("{what} name"), n.as_str().as_bytes());
        assert_no_value(&format!("{what} {n}"), v.as_bytes());
    }
}

/// A response read to its end; a body that fails is an error, never an empty body.
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

async fn got(resp: Result<Response<Incoming>, hyper::Error>) -> Result<Got, String> {
    let (parts, body) = resp.map_err(|e| format!("no response: {e}"))?.into_parts();
    let collected = body
        .collect()
        .await
        .map_err(|e| format!("{} then a broken body: {e}", parts.status))?;
    let got = Got {
        status: parts.status,
        headers: parts.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    };
    assert_fields_clean("header", &got.headers);
    assert_fields_clean(
        "trailer",
        got.trailers.as_ref().unwrap_or(&HeaderMap::new()),
    );
    assert_no_value("body", &got.body);
    Ok(got)
}

fn request(
    e: &Env,
    method: &str,
    path: &str,
    h2: bool,
    extra: &[(&str, &str)],
) -> Request<ReqBody> {
    let mut b = Request::builder().method(method);
    b = if h2 {
        b.uri(format!("https://{HOST}{path}"))
    } else {
        b.uri(path).header("host", HOST)
    };
    b = b.header("x-api-key", e.token());
    for (n, v) in extra {
        b = b.header(*n, *v);
    }
    b.body(pc::full(Bytes::new())).unwrap()
}

/// One request on a fresh h1 (`h2 = false`) or h2 connection through the proxy.
async fn fetch(
    e: &Env,
    method: &str,
    path: &str,
    h2: bool,
    extra: &[(&str, &str)],
) -> Result<Got, String> {
    let req = request(e, method, path, h2, extra);
    if h2 {
        let mut c: http2::SendRequest<ReqBody> = pc::h2(e.h.proxy, &e.sb, API).await;
        c.ready().await.map_err(|err| err.to_string())?;
        got(c.send_request(req).await).await
    } else {
        let mut c: http1::SendRequest<ReqBody> = pc::h1(e.h.proxy, &e.sb, API).await;
        c.ready().await.map_err(|err| err.to_string())?;
        got(c.send_request(req).await).await
    }
}

/// Raw h1 bytes through a tunnel; everything the sandbox reads until the connection closes.
async fn raw_h1(e: &Env, path: &str) -> String {
    let tcp = pc::connect(e.h.proxy, Some(&e.sb.proxy_auth()), API)
        .await
        .expect("CONNECT accepted");
    let mut tls = pc::tls(tcp, &e.sb.ca_pem, HOST, &[b"http/1.1"])
        .await
        .expect("TLS with the sandbox CA");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {HOST}\r\nx-api-key: {}\r\nConnection: close\r\n\r\n",
        e.token()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `script` under `sh -c` with only the sandbox's variables (proxy, CA, sealed env).
async fn sandbox_sh(e: &Env, script: &str) -> (String, String) {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args(["-c", script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", e.h.dir.path());
    for vars in [&e.sb.env, &e.sb.proxy_env] {
        for (k, v) in vars.as_object().unwrap() {
            cmd.env(k, v.as_str().unwrap());
        }
    }
    let out = cmd.output().await.expect("sh runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn gzip_n(data: &[u8], layers: usize) -> Vec<u8> {
    (0..layers).fold(data.to_vec(), |d, _| gzip(&d))
}

/// `data` as one chunk of a chunked body, then the last chunk with `trailers` (raw lines).
fn chunked(data: &[u8], trailers: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(format!("\r\n0\r\n{trailers}\r\n").as_bytes());
    out
}

/// A raw h1 response: `head` lines (without the status line's CRLF), blank line, `body`.
fn h1_bytes(status_line: &str, head: &[String], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{status_line}\r\n").into_bytes();
    for line in head {
        out.extend_from_slice(format!("{line}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn text(value: &str) -> String {
    format!("the value: {value}\n")
}

// ---------------------------------------------------------------------------------------------
// Reason phrase, header names, x-sealgate-error

#[tokio::test]
async fn reason_phrase_naming_the_value_is_scrubbed_for_h1_clients() {
    let e = env_h1(|head| {
        let status = format!("HTTP/1.1 200 {}", real(head));
        h1_bytes(&status, &["content-length: 2".into()], b"ok")
    })
    .await;
    let raw = raw_h1(&e, "/").await;
    let status_line = raw.lines().next().unwrap_or_default();
    assert_no_value("raw h1 status line", status_line.as_bytes());
    assert_eq!(status_line, format!("HTTP/1.1 200 {}", e.token()), "{raw}");
    // A small answer of known length is read whole and keeps an exact length.
    assert!(
        raw.contains("\r\ncontent-length: 2\r\n") && raw.contains("\r\n\r\nok"),
        "the body arrives: {raw}"
    );
    let (out, err) = sandbox_sh(
        &e,
        &format!("curl -sSi --http1.1 https://{HOST}/ -H \"x-api-key: $KEY\""),
    )
    .await;
    assert_no_value("curl -si --http1.1", out.as_bytes());
    let status = format!("HTTP/1.1 200 {}", e.token());
    assert!(
        out.lines().any(|l| l.trim_end() == status),
        "curl shows the scrubbed phrase: {out}\n{err}"
    );
}

#[tokio::test]
async fn header_names_naming_the_value_are_dropped_for_h1_and_h2_clients() {
    let e = env_h1(|head| {
        let v = real(head);
        let lines = [
            format!("X-{v}: 1"),
            format!("{v}: 2"),
            format!("x-keep: {v}"),
            "content-length: 2".into(),
        ];
        h1_bytes("HTTP/1.1 200 OK", &lines, b"ok")
    })
    .await;
    for h2 in [false, true] {
        let a = fetch(&e, "GET", "/", h2, &[]).await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["x-keep"], e.token().as_str(), "h2 {h2}");
        assert_eq!(&a.body[..], b"ok");
    }
}

/// An h2 origin: `/` is a gzip body with trailers and names made of the value; `/empty` a
/// gzip answer without a body (`END_STREAM` on the headers); `HEAD` a gzip answer with a length.
fn h2_answer(head: &Head) -> Response<hostile::H2Body> {
    let v = real(head);
    let gzip_field = |resp: &mut Response<hostile::H2Body>| {
        let value = HeaderValue::from_static("gzip");
        resp.headers_mut().insert("content-encoding", value);
    };
    if head.method == "HEAD" || head.path == "/empty" {
        let none = http_body_util::Empty::new().boxed();
        let mut resp = Response::new(none);
        gzip_field(&mut resp);
        if head.method == "HEAD" {
            let length = HeaderValue::from_static("1234");
            resp.headers_mut().insert("content-length", length);
        }
        return resp;
    }
    let name = HeaderName::from_bytes(format!("x-{v}").as_bytes()).unwrap();
    let mut trailers = HeaderMap::new();
    trailers.insert(name.clone(), HeaderValue::from_static("t"));
    trailers.insert("x-echo", HeaderValue::from_str(&v).unwrap());
    let body = hostile::body(gzip(text(&v).as_bytes()), Some(trailers));
    let mut resp = Response::new(body);
    gzip_field(&mut resp);
    resp.headers_mut()
        .insert(name, HeaderValue::from_static("h"));
    resp.headers_mut()
        .insert("x-keep", HeaderValue::from_str(&v).unwrap());
    resp
}

#[tokio::test]
async fn h2_upstream_names_trailers_and_bodiless_gzip_answers() {
    let e = env_h2(h2_answer).await;
    for h2 in [false, true] {
        let te = [("te", "trailers")];
        let extra: &[(&str, &str)] = if h2 { &[] } else { &te };
        let a = fetch(&e, "GET", "/", h2, extra).await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers["x-keep"], e.token().as_str());
        assert_eq!(a.body, text(&e.token()), "h2 {h2}: decoded and scrubbed");
        if h2 {
            let t = a.trailers.expect("h2 client gets the trailers");
            assert_eq!(t["x-echo"], e.token().as_str());
            assert_eq!(t.len(), 1, "{t:?}");
        }
        let a = fetch(&e, "GET", "/empty", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("empty h2 {h2}: {err}"));
        assert_eq!((a.status, a.body.len()), (StatusCode::OK, 0), "h2 {h2}");
        let a = fetch(&e, "HEAD", "/", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("HEAD h2 {h2}: {err}"));
        assert!(a.headers.get("content-length").is_none(), "HEAD h2 {h2}");
    }
}

/// An h2 origin that sends a body and trailers holding the value on answers that have no body
/// (204, 304, and the answer to HEAD). hyper's h1 server drops such a body; its h2 server
/// would pass DATA and trailers on unscrubbed, so sealgate drops them for every client.
fn bodiless_with_a_body(head: &Head) -> Response<hostile::H2Body> {
    let v = real(head);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-t", HeaderValue::from_str(&v).unwrap());
    let body = hostile::body(text(&v).into_bytes(), Some(trailers));
    let mut resp = Response::new(body);
    *resp.status_mut() = match head.path.as_str() {
        "/204" => StatusCode::NO_CONTENT,
        "/304" => StatusCode::NOT_MODIFIED,
        _ => StatusCode::OK,
    };
    resp
}

#[tokio::test]
async fn bodies_and_trailers_on_bodiless_h2_answers_never_reach_the_sandbox() {
    let e = env_h2(bodiless_with_a_body).await;
    for h2 in [true, false] {
        for (method, path) in [("GET", "/204"), ("GET", "/304"), ("HEAD", "/head")] {
            let te = [("te", "trailers")];
            let extra: &[(&str, &str)] = if h2 { &[] } else { &te };
            // `got` fails on the value in any header, trailer or body byte.
            let a = fetch(&e, method, path, h2, extra)
                .await
                .unwrap_or_else(|err| panic!("{method} {path} h2 {h2}: {err}"));
            assert!(a.body.is_empty(), "{method} {path} h2 {h2}: {:?}", a.body);
            assert!(
                a.trailers.as_ref().is_none_or(HeaderMap::is_empty),
                "{method} {path} h2 {h2}: {:?}",
                a.trailers
            );
        }
    }
}

#[tokio::test]
async fn an_upstreams_own_x_sealgate_error_is_stripped() {
    let e = env_h1(|_| {
        let lines = [
            "x-sealgate-error: egress_denied".into(),
            "X-Sealgate-Error: secret_host_denied".into(),
            "content-type: application/json".into(),
            "content-length: 2".into(),
        ];
        h1_bytes("HTTP/1.1 403 Forbidden", &lines, b"{}")
    })
    .await;
    for h2 in [false, true] {
        let a = fetch(&e, "GET", "/", h2, &[]).await.unwrap();
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(
            a.headers.get("x-sealgate-error").is_none(),
            "h2 {h2}: the upstream's header looks like sealgate's refusal"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Codings: every layer is decoded, however spelled, or the answer is 502

/// The raw answer for each stacked-codings route; the body always decodes to `text(value)`.
fn stacked(head: &Head) -> Vec<u8> {
    let t = text(&real(head)).into_bytes();
    let (cl, lines, body): (bool, Vec<&str>, Vec<u8>) = match head.path.as_str() {
        "/ce-fields" => (
            true,
            vec!["content-encoding: gzip", "content-encoding: gzip"],
            gzip_n(&t, 2),
        ),
        "/ce-list" => (
            true,
            vec!["Content-Encoding: GZIP, identity,gzip"],
            gzip_n(&t, 2),
        ),
        "/te" => (
            false,
            vec!["transfer-encoding: gzip, chunked"],
            chunked(&gzip(&t), ""),
        ),
        "/ce-te" => (
            false,
            vec![
                "content-encoding: gzip",
                "transfer-encoding: gzip",
                "transfer-encoding: chunked",
            ],
            chunked(&gzip_n(&t, 2), ""),
        ),
        "/te-close" => (
            false,
            vec!["transfer-encoding: gzip", "connection: close"],
            gzip(&t),
        ),
        "/four" => (
            true,
            vec![
                "content-encoding: gzip, gzip",
                "content-encoding: gzip, gzip",
            ],
            gzip_n(&t, 4),
        ),
        other => panic!("no route {other}"),
    };
    let mut head_lines: Vec<String> = lines.into_iter().map(String::from).collect();
    if cl {
        head_lines.push(format!("content-length: {}", body.len()));
    }
    h1_bytes("HTTP/1.1 200 OK", &head_lines, &body)
}

#[tokio::test]
async fn stacked_codings_are_all_decoded_however_spelled() {
    let e = env_h1(stacked).await;
    for path in [
        "/ce-fields",
        "/ce-list",
        "/te",
        "/ce-te",
        "/te-close",
        "/four",
    ] {
        for h2 in [false, true] {
            let a = fetch(&e, "GET", path, h2, &[])
                .await
                .unwrap_or_else(|err| panic!("{path} h2 {h2}: {err}"));
            assert_eq!(a.status, StatusCode::OK, "{path}");
            assert!(a.headers.get("content-encoding").is_none(), "{path}");
            assert_eq!(
                a.body,
                text(&e.token()),
                "{path} h2 {h2}: every layer decoded"
            );
        }
    }
}

/// Answers that cannot be decoded completely.
fn undecodable(head: &Head) -> Vec<u8> {
    let v = real(head);
    let t = text(&v).into_bytes();
    let (status, lines, body): (&str, Vec<String>, Vec<u8>) = match head.path.as_str() {
        "/five" => (
            "200 OK",
            vec!["content-encoding: gzip, gzip, gzip, gzip, gzip".into()],
            gzip_n(&t, 5),
        ),
        "/named" => ("200 OK", vec![format!("content-encoding: {v}")], gzip(&t)),
        "/compress" => (
            "200 OK",
            vec!["content-encoding: gzip, compress".into()],
            gzip(&t),
        ),
        "/chunked-first" => (
            "200 OK",
            vec![
                "transfer-encoding: chunked, gzip".into(),
                "connection: close".into(),
            ],
            gzip(&chunked(&t, "")),
        ),
        "/partial" => (
            "206 Partial Content",
            vec![
                "content-encoding: gzip".into(),
                "content-range: bytes 0-9/100".into(),
            ],
            gzip(&t),
        ),
        other => panic!("no route {other}"),
    };
    let mut lines = lines;
    if !lines.iter().any(|l| l.starts_with("transfer-encoding")) {
        lines.push(format!("content-length: {}", body.len()));
    }
    h1_bytes(&format!("HTTP/1.1 {status}"), &lines, &body)
}

#[tokio::test]
async fn codings_that_cannot_all_be_decoded_are_refused_with_502() {
    let e = env_h1(undecodable).await;
    for path in ["/five", "/named", "/compress", "/chunked-first", "/partial"] {
        for h2 in [false, true] {
            let a = fetch(&e, "GET", path, h2, &[])
                .await
                .unwrap_or_else(|err| panic!("{path} h2 {h2}: {err}"));
            assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{path}: {:?}", a.body);
            assert_eq!(
                a.headers["x-sealgate-error"], "upstream_unreachable",
                "{path}"
            );
        }
    }
    let audit = e.h.audit_log().to_ascii_lowercase();
    assert!(
        !audit.contains(&VALUE.to_ascii_lowercase()),
        "value in the audit log"
    );
}

// ---------------------------------------------------------------------------------------------
// Responses with a coding and no body; trailers

/// `HEAD` and the 304 announce the length of an echo of the value, gzipped.
fn bodiless(head: &Head) -> Vec<u8> {
    let gz = "content-encoding: gzip".to_string();
    let echo = format!(
        "content-length: {}",
        gzip(text(&real(head)).as_bytes()).len()
    );
    match (head.method.as_str(), head.path.as_str()) {
        ("HEAD", _) => h1_bytes("HTTP/1.1 200 OK", &[gz, echo], b""),
        (_, "/empty-length") => h1_bytes("HTTP/1.1 200 OK", &[gz, "content-length: 0".into()], b""),
        (_, "/empty-chunked") => h1_bytes(
            "HTTP/1.1 200 OK",
            &[gz, "transfer-encoding: chunked".into()],
            b"0\r\n\r\n",
        ),
        (_, "/204") => h1_bytes("HTTP/1.1 204 No Content", &[gz], b""),
        (_, "/304") => h1_bytes(
            "HTTP/1.1 304 Not Modified",
            &[gz, echo, "etag: \"e1\"".into()],
            b"",
        ),
        (_, other) => panic!("no route {other}"),
    }
}

/// They arrive without the compressed body's `Content-Length`, which measured an echo of the
/// value unscrubbed and compressed (a compression oracle over many guesses).
#[tokio::test]
async fn responses_with_a_coding_and_no_body_arrive_intact() {
    let e = env_h1(bodiless).await;
    for h2 in [false, true] {
        for (path, status) in [
            ("/empty-length", StatusCode::OK),
            ("/empty-chunked", StatusCode::OK),
            ("/204", StatusCode::NO_CONTENT),
            ("/304", StatusCode::NOT_MODIFIED),
        ] {
            let a = fetch(&e, "GET", path, h2, &[])
                .await
                .unwrap_or_else(|err| panic!("{path} h2 {h2}: {err}"));
            assert_eq!(a.status, status, "{path} h2 {h2}");
            assert!(a.body.is_empty(), "{path}");
            if path == "/304" {
                let length = a.headers.get("content-length");
                assert!(length.is_none(), "304 h2 {h2}: {length:?}");
            }
        }
        let a = fetch(&e, "HEAD", "/", h2, &[])
            .await
            .expect("HEAD answered");
        assert_eq!(a.status, StatusCode::OK, "HEAD h2 {h2}");
        let length = a.headers.get("content-length");
        assert!(
            length.is_none(),
            "HEAD h2 {h2}: the echo's length {length:?}"
        );
        // It says what the GET gives: decoded (a HEAD that said gzip beside a decoded GET
        // misled clients; outside re-check).
        assert!(a.headers.get("content-encoding").is_none(), "HEAD h2 {h2}");
    }
}

#[tokio::test]
async fn trailers_survive_decoding_and_are_scrubbed() {
    let e = env_h1(|head| {
        let v = real(head);
        let lines = [
            "content-encoding: gzip".to_string(),
            "transfer-encoding: chunked".into(),
            format!("trailer: x-echo, grpc-status, x-{v}"),
        ];
        let trailers = format!("x-echo: {v}\r\ngrpc-status: 0\r\nx-{v}: 1\r\n");
        h1_bytes(
            "HTTP/1.1 200 OK",
            &lines,
            &chunked(&gzip(text(&v).as_bytes()), &trailers),
        )
    })
    .await;
    for h2 in [false, true] {
        let a = fetch(&e, "GET", "/", h2, &[("te", "trailers")])
            .await
            .unwrap_or_else(|err| panic!("h2 {h2}: {err}"));
        assert_eq!(a.body, text(&e.token()), "h2 {h2}");
        let t = a
            .trailers
            .unwrap_or_else(|| panic!("h2 {h2}: trailers dropped"));
        assert_eq!(t["x-echo"], e.token().as_str(), "h2 {h2}");
        assert_eq!(t["grpc-status"], "0", "h2 {h2}");
        assert_eq!(t.len(), 2, "h2 {h2}: {t:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Lengths

/// An answer of `n` bytes naming the value once at its start (`n` at least the text's length).
fn sized(v: &str, n: usize) -> Vec<u8> {
    let mut body = text(v).into_bytes();
    body.resize(n.max(body.len()), b'.');
    body
}

/// Scrubbing changes an answer's length. A small answer of known length (at most 64 KiB, no
/// coding) is read whole and sent with its exact `Content-Length` (streamed, it had none:
/// curl over h2, answered early during an upload, waited out its timeout for want of one); a
/// larger one streams without it; one that ends short of its length is a 502, not a short
/// body under a length.
#[tokio::test]
async fn small_answers_keep_an_exact_length_and_large_ones_stream() {
    let e = env_h1(|head| {
        let v = real(head);
        let (body, declared) = match head.path.as_str() {
            "/small" => (sized(&v, 64 * 1024), 64 * 1024),
            "/large" => (sized(&v, 64 * 1024 + 1), 64 * 1024 + 1),
            "/chunked" => {
                // A small length beside chunked framing: read chunked (as hyper does), so
                // streamed; read whole by the header, it was held without bound.
                let body = chunked(&sized(&v, 300 * 1024), "");
                let head = [
                    "transfer-encoding: chunked".into(),
                    "content-length: 5".into(),
                ];
                return h1_bytes("HTTP/1.1 200 OK", &head, &body);
            }
            _ => (sized(&v, 100), 200), // "/short": the origin closes half way
        };
        h1_bytes(
            "HTTP/1.1 200 OK",
            &[format!("content-length: {declared}")],
            &body,
        )
    })
    .await;
    let grown = e.token().len() - VALUE.len();
    for h2 in [false, true] {
        let a = fetch(&e, "GET", "/small", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("h2 {h2}: {err}"));
        assert_eq!(a.body, sized(&e.token(), 64 * 1024 + grown), "h2 {h2}");
        assert_eq!(
            a.headers.get("content-length").map(|v| v.to_str().unwrap()),
            Some((64 * 1024 + grown).to_string().as_str()),
            "h2 {h2}: the scrubbed length"
        );
        let a = fetch(&e, "GET", "/large", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("h2 {h2}: {err}"));
        assert_eq!(a.body.len(), 64 * 1024 + 1 + grown, "h2 {h2}");
        assert_eq!(a.headers.get("content-length"), None, "h2 {h2}: streamed");
        let a = fetch(&e, "GET", "/chunked", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("h2 {h2}: {err}"));
        assert_eq!(a.body, sized(&e.token(), 300 * 1024 + grown), "h2 {h2}");
        assert_eq!(a.headers.get("content-length"), None, "h2 {h2}: streamed");
        let a = fetch(&e, "GET", "/short", h2, &[])
            .await
            .unwrap_or_else(|err| panic!("h2 {h2}: {err}"));
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "h2 {h2}");
        assert_eq!(
            a.headers["x-sealgate-error"], "upstream_unreachable",
            "h2 {h2}"
        );
    }
    let audit = e.h.audit_log();
    assert!(
        audit.contains("failed part way through its answer"),
        "{audit}"
    );
}

/// A small answer whose origin sends it slowly (its head and 1 KiB, then the rest 3 s
/// later) is not held for its end: after a second it streams on, without a length, so its
/// client sees the head and reads at the origin's pace (held, Python `requests`' read
/// timeout fired on such an answer: outside check). The head must come well before the end:
/// the second's hold plus a fresh upstream handshake left 250 ms of a 1.5 s bound under load
/// (review h39a), so the end is 3 s away and the bound 2.5 s.
#[tokio::test]
async fn a_small_answer_sent_slowly_streams_on_after_a_second() {
    let pki = Arc::new(TestPki::new());
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&[HOST], &[b"http/1.1"]));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let Ok(mut tls) = acceptor.accept(s).await else {
                continue;
            };
            let mut buf = vec![0u8; 8192];
            let n = tls.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let v = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("x-api-key: "))
                .map(|l| l["x-api-key: ".len()..].to_owned())
                .unwrap_or_default();
            let body = sized(&v, 4096);
            let answer = h1_bytes("HTTP/1.1 200 OK", &["content-length: 4096".into()], &[]);
            let _ = tls.write_all(&answer).await;
            let _ = tls.write_all(&body[..1024]).await;
            let _ = tls.flush().await;
            tokio::time::sleep(Duration::from_millis(3000)).await;
            let _ = tls.write_all(&body[1024..]).await;
            let _ = tls.shutdown().await;
        }
    });
    let e = env_on(pki, addr, Box::new(AbortOnDrop(origin))).await;
    let mut c: http1::SendRequest<ReqBody> = pc::h1(e.h.proxy, &e.sb, API).await;
    let started = std::time::Instant::now();
    let resp = c.send_request(request(&e, "GET", "/", false, &[])).await;
    let head_after = started.elapsed();
    let a = got(resp).await.expect("answered");
    assert_eq!(a.headers.get("content-length"), None, "streamed on");
    let grown = e.token().len() - VALUE.len();
    assert_eq!(a.body.len(), 4096 + grown);
    assert!(
        head_after < Duration::from_millis(2500),
        "the head waited for the end: {head_after:?}"
    );
}

/// Aborts its task when dropped (an origin's accept loop kept with the daemon).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A real origin: nginx serving a pre-compressed file (gzip_static)

/// nginx on a free loopback port serving `www/` over TLS with `gzip_static on` (a `.gz` beside a
/// file is sent as is) and `gzip on` for every type (other files compressed on the fly);
/// killed on drop.
struct Nginx {
    addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

async fn nginx(pki: &TestPki, files: &[(&str, &[u8])]) -> Nginx {
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    for (name, data) in files {
        std::fs::write(www.join(name), data).unwrap();
    }
    let (cert, key) = pki.leaf_pem(&[HOST]);
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let port = crate::support::ports::free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\nevents {{}}\nhttp {{\n access_log off;\n\
         client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;\n\
         uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;\n\
         server {{ listen 127.0.0.1:{port} ssl; server_name {HOST};\n\
          ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
          root {d}/www; default_type text/plain;\n\
          gzip_static on; gzip on; gzip_types *; gzip_min_length 1; }}\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = tokio::process::Command::new("nginx")
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .kill_on_drop(true)
        .spawn()
        .expect("nginx is installed (scripts/test installs it)");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
        assert!(
            std::time::Instant::now() < deadline,
            "nginx did not listen on {addr} within 20 s:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Nginx {
        addr,
        _child: child,
        _dir: dir,
    }
}

#[tokio::test]
async fn head_and_get_of_gzip_answers_from_nginx() {
    let pki = Arc::new(TestPki::new());
    let page = b"hello from nginx\n".repeat(20);
    let gz = gzip(&page);
    let files: &[(&str, &[u8])] = &[
        ("static.txt", &page),
        ("static.txt.gz", &gz),
        ("fly.txt", &page),
    ];
    let origin = nginx(&pki, files).await;
    let e = env_on(pki, origin.addr, Box::new(origin)).await;
    let accept = [("accept-encoding", "gzip")];
    for h2 in [false, true] {
        for path in ["/static.txt", "/fly.txt"] {
            for _ in 0..3 {
                let a = fetch(&e, "HEAD", path, h2, &accept)
                    .await
                    .unwrap_or_else(|err| panic!("HEAD {path} h2 {h2}: {err}"));
                assert_eq!(a.status, StatusCode::OK, "HEAD {path} h2 {h2}");
                assert!(a.headers.get("content-encoding").is_none(), "{path}");
            }
            let a = fetch(&e, "GET", path, h2, &accept).await.unwrap();
            assert_eq!(a.status, StatusCode::OK);
            assert!(a.headers.get("content-encoding").is_none());
            assert_eq!(a.body, page, "GET {path} h2 {h2}: decoded");
        }
        // nginx is asked for no coding (a compressed answer's shape is an oracle on an echoed
        // value): it answers the plain file, and its plain length stays, asked gzip or not.
        let length = page.len().to_string();
        for ae in [&accept[..], &[]] {
            let a = fetch(&e, "HEAD", "/static.txt", h2, ae).await.unwrap();
            assert_eq!(a.headers["content-length"], length.as_str(), "HEAD {ae:?}");
        }
    }
}

/// Byte ranges would hand the sandbox a stored value in pieces no scrubber recognises (`bytes=
/// 0-12` and `13-`, or both in one multipart answer): where responses are scrubbed, sealgate
/// forwards no `Range`, and stock nginx answers the whole file, scrubbed.
#[tokio::test]
async fn byte_ranges_cannot_carry_a_value_past_the_scrubber() {
    let pki = Arc::new(TestPki::new());
    let stored = format!("stored: {VALUE}\n");
    let files: &[(&str, &[u8])] = &[("stored.txt", stored.as_bytes())];
    let origin = nginx(&pki, files).await;
    let e = env_on(pki, origin.addr, Box::new(origin)).await;
    let whole = format!("stored: {}\n", e.token());
    for h2 in [false, true] {
        for range in ["bytes=0-12", "bytes=13-", "bytes=0-12,13-100", "bytes=-5"] {
            let extra = [("range", range), ("if-range", "\"any\"")];
            let a = fetch(&e, "GET", "/stored.txt", h2, &extra)
                .await
                .unwrap_or_else(|err| panic!("{range} h2 {h2}: {err}"));
            assert_eq!(a.status, StatusCode::OK, "{range} h2 {h2}");
            assert_eq!(
                String::from_utf8_lossy(&a.body),
                whole,
                "{range} h2 {h2}: the whole file, scrubbed"
            );
        }
    }
}

/// A download from stock nginx still running when its sandbox is deleted ends there, on h1
/// and h2 (an outside test had a 1 GiB download run on for 22 s after the delete): at most
/// what sat in buffers arrives after it, and the body ends in an error, not as if complete.
#[tokio::test]
async fn a_download_from_nginx_ends_when_its_sandbox_is_deleted() {
    use http_body_util::BodyExt;
    const SIZE: usize = 64 << 20;
    let pki = Arc::new(TestPki::new());
    let big = vec![b'x'; SIZE];
    let origin = nginx(&pki, &[("big.bin", &big[..])]).await;
    let e = env_on(pki, origin.addr, Box::new(origin)).await;
    for h2 in [false, true] {
        let sb = SandboxCreds::from_answer(&e.h.sandbox("s").await);
        let req = pc::get("/big.bin", HOST, &[]);
        let resp = if h2 {
            let mut c = pc::h2(e.h.proxy, &sb, API).await;
            c.ready().await.unwrap();
            c.send_request(req).await.unwrap()
        } else {
            let mut c = pc::h1(e.h.proxy, &sb, API).await;
            c.ready().await.unwrap();
            c.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut got = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
        let path = format!("/v1/sandboxes/{}", sb.id);
        let (s, v) = e.h.api(http::Method::DELETE, &path, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        let failed = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => got += f.data_ref().map_or(0, |d| d.len()),
                    Err(_) => return true,
                }
            }
            false
        })
        .await
        .expect("the download ends");
        assert!(failed, "h2 {h2}: ended in an error");
        assert!(got < SIZE, "h2 {h2}: {got} of {SIZE} bytes arrived");
    }
}

/// One gRPC message: flags, big-endian length, bytes.
fn grpc_message(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![flags];
    m.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A gRPC origin that echoes the value in every way its framing allows: plain, gzip-compressed
/// (which it was asked not to send), in a coding sealgate cannot read, as a compression bomb
/// past `upstream.max_grpc_message_bytes`, and base64-encoded (gRPC-Web-text).
fn grpc_echo(head: &Head) -> Response<hostile::H2Body> {
    use base64::Engine as _;
    let v = real(head).into_bytes();
    let asked = head.header("grpc-accept-encoding").unwrap_or("").to_owned();
    let (ct, coding, body) = match head.path.as_str() {
        "/plain" => ("application/grpc", "identity", grpc_message(0, &v)),
        // The request's `Authorization: Basic` form, echoed compressed: the per-request
        // scrubber (run first) must see it decoded.
        "/basic" => {
            let auth = head.header("authorization").unwrap_or_default().as_bytes();
            ("application/grpc", "gzip", grpc_message(1, &gzip(auth)))
        }
        // Labelled as text, but naming a message coding: a lax client would decode it.
        "/mislabelled" => ("text/plain", "gzip", grpc_message(1, &gzip(&v))),
        "/gzip" => ("application/grpc", "gzip", grpc_message(1, &gzip(&v))),
        "/snappy" => ("application/grpc", "snappy", grpc_message(1, &v)),
        // A whole message, then one cut short before the trailers say all is well.
        "/cut" => {
            let cut = grpc_message(1, &gzip(&v));
            let cut = &cut[..cut.len() - 3];
            let whole = grpc_message(1, &gzip(&v));
            ("application/grpc", "gzip", [&whole[..], cut].concat())
        }
        "/bomb" => {
            let big = [&v[..], &vec![b'0'; 5 << 20]].concat();
            (
                "application/grpc+proto",
                "gzip",
                grpc_message(1, &gzip(&big)),
            )
        }
        _ => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(grpc_message(0, &v));
            ("application/grpc-web-text", "identity", b64.into_bytes())
        }
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut resp = Response::new(hostile::body(body, Some(trailers)));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static(ct));
    h.insert("grpc-encoding", HeaderValue::from_static(coding));
    h.insert("x-asked", HeaderValue::from_str(&asked).unwrap());
    resp
}

/// Every data frame the sandbox got before the body ended or failed, and whether it failed.
async fn read_until_error(resp: Response<Incoming>) -> (Vec<u8>, bool) {
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(f)) => seen.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Some(Err(_)) => return (seen, true),
            None => return (seen, false),
        }
    }
}

#[tokio::test]
async fn grpc_messages_reach_the_sandbox_scrubbed_at_their_length_or_not_at_all() {
    let e = env_h2(grpc_echo).await;
    let grpc = [
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "identity,deflate,gzip"),
    ];
    // The value comes back as the token cut to the value's length: every prefix stays right.
    let mask = &e.token()[..VALUE.len()];
    for path in ["/plain", "/gzip"] {
        let a = fetch(&e, "POST", path, true, &grpc).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(
            a.headers["x-asked"], "identity",
            "{path}: asked for plain messages"
        );
        assert_eq!(a.body, grpc_message(0, mask.as_bytes()), "{path}");
        assert_eq!(a.trailers.unwrap()["grpc-status"], "0", "{path}");
    }
    // A coding sealgate cannot read, or a message decoding past the limit: the stream is reset
    // before any byte of that message (h2 may drop the queued response head with it).
    // Cut short inside a compressed message: never a clean end with the message missing (the
    // whole message before it may pass).
    for path in ["/snappy", "/bomb", "/cut"] {
        let mut c: http2::SendRequest<ReqBody> = pc::h2(e.h.proxy, &e.sb, API).await;
        c.ready().await.unwrap();
        let resp = match c.send_request(request(&e, "POST", path, true, &grpc)).await {
            Ok(resp) => resp,
            Err(err) => {
                let reset = std::error::Error::source(&err)
                    .and_then(|s| s.downcast_ref::<h2::Error>())
                    .and_then(h2::Error::reason);
                assert_eq!(reset, Some(h2::Reason::INTERNAL_ERROR), "{path}: {err:?}");
                continue;
            }
        };
        let (seen, failed) = read_until_error(resp).await;
        assert!(failed, "{path}: the body ended normally");
        let may_pass = match path {
            "/cut" => grpc_message(0, mask.as_bytes()),
            _ => Vec::new(),
        };
        assert!(
            may_pass.starts_with(&seen),
            "{path}: {} bytes passed",
            seen.len()
        );
    }
    // The operator learns why (the sandbox only sees a reset).
    let logs = crate::support::daemon::logs_text();
    for why in [
        "cannot be decoded to be scrubbed",
        "over upstream.max_grpc_message_bytes",
        "ended a gRPC stream inside a message",
    ] {
        let line = logs
            .lines()
            .find(|l| l.contains("stream reset") && l.contains(why));
        assert!(
            line.is_some_and(|l| l.contains(HOST)),
            "no log line for {why:?}"
        );
    }
    // Mislabelled: still read as messages, decoded and scrubbed.
    let a = fetch(&e, "POST", "/mislabelled", true, &grpc)
        .await
        .unwrap();
    assert_eq!(a.body, grpc_message(0, mask.as_bytes()));
    // The Basic form of the value, compressed: decoded before the per-request scrubber.
    let basic = pc::basic("user", &e.token());
    let mut with_basic = grpc.to_vec();
    with_basic.push(("authorization", &basic));
    let a = fetch(&e, "POST", "/basic", true, &with_basic)
        .await
        .unwrap();
    let real = pc::basic("user", VALUE);
    let body = String::from_utf8_lossy(&a.body[5..]).into_owned();
    assert_eq!(body.len(), real.len(), "{body}");
    assert!(body.starts_with("Basic ") && body != real, "{body}");
    assert_eq!(a.body[0], 0, "passed on uncompressed");
    // Base64 messages cannot be scrubbed: refused with 502 before anything is sent.
    let mut c: http2::SendRequest<ReqBody> = pc::h2(e.h.proxy, &e.sb, API).await;
    c.ready().await.unwrap();
    let resp = c.send_request(request(&e, "POST", "/web-text", true, &grpc));
    let a = got(resp.await).await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.headers["x-sealgate-error"], "upstream_unreachable");
}

/// An origin whose `/big` is one gzip message decoding to 4 MiB (the smallest
/// `max_grpc_message_bytes`, so 16 of them are the daemon-wide bound) and `/small` one of a
/// few bytes.
fn grpc_sizes(head: &Head) -> Response<hostile::H2Body> {
    let plain = match head.path.as_str() {
        "/big" => vec![b'a'; 4 << 20],
        _ => b"small".to_vec(),
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = grpc_message(1, &gzip(&plain));
    let mut resp = Response::new(hostile::body(body, Some(trailers)));
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("grpc-encoding", HeaderValue::from_static("gzip"));
    resp
}

/// An h2 connection through the proxy whose streams take 1 KiB each and are never read: the
/// decoded messages sent to it stay in sealgate's send queue.
async fn h2_never_reading(e: &Env, sb: &SandboxCreds) -> http2::SendRequest<ReqBody> {
    let tcp = pc::connect(e.h.proxy, Some(&sb.proxy_auth()), API)
        .await
        .expect("CONNECT accepted");
    let tls = pc::tls(tcp, &sb.ca_pem, HOST, &[b"h2"]).await.unwrap();
    let (send, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1 << 20)
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// One sandbox that never reads its streams holds at most its share of the decoded gRPC
/// messages the daemon keeps (4 of 16): another sandbox's compressed answers still arrive.
/// Found from outside: 16 unread streams of one tunnel took the daemon-wide bound and every
/// other sandbox's compressed answer, even of 5 bytes, was reset.
#[tokio::test]
async fn one_sandbox_holds_only_its_share_of_decoded_grpc_messages() {
    let e = env_h2(grpc_sizes).await;
    let other = SandboxCreds::from_answer(&e.h.sandbox("s").await);
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let mut hog = h2_never_reading(&e, &e.sb).await;
    let mut kept = Vec::new();
    for _ in 0..16 {
        hog.ready().await.unwrap();
        let req = request(&e, "POST", "/big", true, &grpc);
        if let Ok(resp) = hog.send_request(req).await {
            kept.push(resp);
        }
    }
    let mut c = pc::h2(e.h.proxy, &other, API).await;
    c.ready().await.unwrap();
    let req = Request::builder()
        .method("POST")
        .uri(format!("https://{HOST}/small"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(pc::full(Bytes::new()))
        .unwrap();
    let a = got(c.send_request(req).await).await;
    let a = a.unwrap_or_else(|err| panic!("the other sandbox's answer: {err}"));
    assert_eq!(a.body, grpc_message(0, b"small"));
    let logs = crate::support::daemon::logs_text();
    assert!(
        logs.lines().any(|l| l.contains("stream reset")
            && l.contains("held for this sandbox's clients")
            && l.contains(&e.sb.id)),
        "the hog met its own bound"
    );
    drop(kept);
}

/// `[upstream] max_response_header_bytes` (64 KiB): an HTTP/1.1 origin's head under it
/// passes, one far over it is a 502 with its code. It is hyper's client buffer, which had grown
/// to ~400 KiB on large answers, twice over for an answer the sandbox did not read (outside
/// review: 256 unread answers of one sandbox, +250 MB).
#[tokio::test]
async fn an_origin_head_over_max_response_header_bytes_is_a_502() {
    let e = env_h1(|head| {
        let n: usize = head.path.trim_start_matches("/pad/").parse().unwrap();
        let pad = "a".repeat(n);
        format!("HTTP/1.1 200 OK\r\nx-pad: {pad}\r\ncontent-length: 2\r\n\r\nok").into_bytes()
    })
    .await;
    let fits = fetch(&e, "GET", "/pad/60000", false, &[]).await.unwrap();
    assert_eq!((fits.status, &fits.body[..]), (StatusCode::OK, &b"ok"[..]));
    // hyper checks the size when a read leaves the head unfinished, so a head ends up to
    // about twice the limit (its last read may be as large); this one cannot.
    let over = fetch(&e, "GET", "/pad/300000", false, &[]).await.unwrap();
    assert_eq!(over.status, StatusCode::BAD_GATEWAY);
    assert!(
        over.headers.contains_key("x-sealgate-error"),
        "{:?}",
        over.headers
    );
    let said = String::from_utf8_lossy(&over.body);
    assert!(
        said.contains("upstream.max_response_header_bytes"),
        "{said}"
    );
}

/// A loopback TLS listener for an origin a test writes byte by byte (`http/1.1` for `HOST`).
async fn raw_origin(
    pki: &TestPki,
) -> (
    tokio::net::TcpListener,
    tokio_rustls::TlsAcceptor,
    SocketAddr,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&[HOST], &[b"http/1.1"]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, acceptor, addr)
}

/// Reads one request head; false when the connection ended first.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            return false;
        }
        head.push(b[0]);
    }
    true
}

/// An origin that answers `200` chunked and then sends a chunk size that never ends (`000…`):
/// hyper's client parses it at full speed and no back-pressure slows it, since no byte reaches
/// the sandbox — 200 such answers took another sandbox's p99 from 13 ms to 4.9 s (outside
/// pass). sealgate reads at most about a MiB of such framing per answer, then ends it: the
/// origin's writes fail well before the 60 MiB it would send, and the answer ends at once.
#[tokio::test]
async fn a_chunk_size_line_without_end_is_cut_after_about_a_mib() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pki = Arc::new(TestPki::new());
    let (listener, acceptor, addr) = raw_origin(&pki).await;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let origin = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        if !read_head(&mut tls).await {
            return;
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
        tls.write_all(answer.as_bytes()).await.unwrap();
        let zeros = [b'0'; 16 * 1024];
        for _ in 0..(60 * 64) {
            if tls.write_all(&zeros).await.is_err() {
                return;
            }
            counter.fetch_add(zeros.len() as u64, Ordering::Relaxed);
        }
    });
    let e = env_on(pki, addr, Box::new(())).await;
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(20), fetch(&e, "GET", "/", false, &[]))
        .await
        .expect("the answer ends");
    assert!(
        got.is_err()
            || got
                .as_ref()
                .is_ok_and(|g| g.status == StatusCode::BAD_GATEWAY),
        "{:?}",
        got.map(|g| g.status)
    );
    tokio::time::timeout(Duration::from_secs(10), origin)
        .await
        .expect("the origin's connection was closed")
        .unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent < 8 << 20, "the origin got {sent} bytes of framing in");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// The allowance a big answer earned ends with it: `100` heads sent for ever before the next
/// answer on the same kept-alive connection are cut at about a MiB (re-check: after a 400 MiB
/// answer, 3.37 GB of them went through, a core for 25 s).
#[tokio::test]
async fn interim_heads_after_a_big_answer_get_no_credit_from_it() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let pki = Arc::new(TestPki::new());
    let (listener, acceptor, addr) = raw_origin(&pki).await;
    let flooded = Arc::new(AtomicU64::new(0));
    let counter = flooded.clone();
    let origin = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let big = 8usize << 20;
        for n in 0..2 {
            if !read_head(&mut tls).await {
                return;
            }
            if n == 0 {
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {big}\r\n\r\n");
                tls.write_all(answer.as_bytes()).await.unwrap();
                tls.write_all(&vec![b'x'; big]).await.unwrap();
                continue;
            }
            let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1024);
            for _ in 0..4096 {
                if tls.write_all(&interim).await.is_err() {
                    return;
                }
                counter.fetch_add(interim.len() as u64, Ordering::Relaxed);
            }
        }
    });
    let e = env_on(pki, addr, Box::new(())).await;
    let mut c: http1::SendRequest<ReqBody> = pc::h1(e.h.proxy, &e.sb, API).await;
    let first = got(c.send_request(request(&e, "GET", "/big", false, &[])).await).await;
    // Seen once in a loaded full run ("200 OK then a broken body"), never again: if it comes
    // back, the daemon's warnings say which bound or timer cut the answer.
    let first = first.unwrap_or_else(|err| {
        let logs = crate::support::daemon::logs_text();
        let warned: Vec<_> = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        panic!("the big answer: {err}; the daemons' warnings: {warned:#?}")
    });
    assert_eq!(first.body.len(), 8 << 20);
    c.ready().await.unwrap();
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        c.send_request(request(&e, "GET", "/flood", false, &[])),
    )
    .await
    .expect("the flood is cut");
    let second = got(second).await;
    assert!(
        second
            .as_ref()
            .map_or(true, |g| g.status == StatusCode::BAD_GATEWAY),
        "{:?}",
        second.map(|g| g.status)
    );
    tokio::time::timeout(Duration::from_secs(10), origin)
        .await
        .expect("the origin's connection was closed")
        .unwrap();
    let flooded = flooded.load(Ordering::Relaxed);
    assert!(
        flooded < 8 << 20,
        "{flooded} bytes of interim heads went in"
    );
}

/// An honest object store serves a blob the sandbox stored (its token unsealed into it, as an
/// octet stream) under the type the object's metadata names, here `application/grpc`. Read as
/// gRPC messages, the first message ended inside the value and the value's next five bytes
/// read as the next message's header: the value reached the sandbox whole, in two parts the
/// scrubber could not recognise (outside review). An answer is read as messages only when the
/// request was messages — a `POST` with a message type: to a `GET`, even one that names a gRPC
/// type or coding itself (the re-check's bypass), it is one stream, scrubbed at the same length.
#[tokio::test]
async fn a_grpc_typed_answer_to_a_request_that_was_not_grpc_is_scrubbed_as_one_stream() {
    use http_body_util::BodyExt as _;
    let pki = Arc::new(TestPki::new());
    let (listener, acceptor, addr) = raw_origin(&pki).await;
    // The message ends after "sk-A"; "dv-Re" would be the next header (flag 'd': not
    // compressed, then a length of ~2 GB), the rest of the value and a line end its start.
    let cut = 4;
    assert_eq!(VALUE.as_bytes()[cut] & 1, 0, "an uncompressed flag");
    let payload = [b"xx", &VALUE.as_bytes()[..cut]].concat();
    let mut blob = vec![0u8];
    blob.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    blob.extend_from_slice(&payload);
    blob.extend_from_slice(&VALUE.as_bytes()[cut..]);
    blob.extend_from_slice(b"\n");
    blob.extend_from_slice(&[b'z'; 64 * 1024]);
    let len = blob.len();
    let asks: [&[(&str, &str)]; 3] = [
        &[],
        &[("content-type", "application/grpc")],
        &[
            ("grpc-encoding", "gzip"),
            ("content-type", "application/grpc-web"),
        ],
    ];
    let origin = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        while read_head(&mut tls).await {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ncontent-length: {len}\r\n\r\n"
            );
            tls.write_all(head.as_bytes()).await.unwrap();
            tls.write_all(&blob).await.unwrap();
            tls.flush().await.unwrap();
        }
    });
    let e = env_on(pki, addr, Box::new(())).await;
    let mut c: http1::SendRequest<ReqBody> = pc::h1(e.h.proxy, &e.sb, API).await;
    for extra in asks {
        c.ready().await.unwrap();
        let resp = c
            .send_request(request(&e, "GET", "/store/blob", false, extra))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen.extend_from_slice(&data);
            }
        }
        assert_no_value(&format!("body ({extra:?})"), &seen);
        assert_eq!(seen.len(), len, "the whole blob, at its length ({extra:?})");
    }
    drop(c);
    origin.abort();
}
