//! Answers that outlive their request: an event stream or a WebSocket opened before the
//! sandbox's values changed (a rotation, a host added to a secret's `allowed_hosts`). An
//! upstream that echoes later requests onto such an answer — a request inspector's live view,
//! a chat socket — must not hand back a value unsealed after it opened (an outside review saw
//! both the rotated value and a value newly allowed on the host arrive in clear: the answer's
//! scrubber was fixed when its request started). A scrubbed answer goes on with the new
//! values; one that was not scrubbed ends once values may be unsealed for its host.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;

use crate::proxy_explicit::{setup, Env};
use crate::support::proxy_client as pc;

const API: &str = "api.example.test:443";
const OTHER: &str = "other.example.test:443";
const V1: &str = "sk-open-answer-v1-7201";
const V2: &str = "sk-open-answer-v2-7202";

async fn env() -> Env {
    setup(
        Some(&["api.example.test", "other.example.test"]),
        &[("KEY", V1, Some(&["api.example.test"]), Some(&["header"]))],
    )
    .await
}

async fn put_key(e: &Env, value: &str, hosts: &[&str]) {
    let (s, v) =
        e.h.api(
            Method::PUT,
            &format!("/v1/stores/{}/secrets/KEY", e.store),
            Some(json!({"value": value, "allowed_hosts": hosts, "locations": ["header"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// Opens `/tail?n=<n>` on `target` and waits until the origin has it (so the answer's
/// decisions were made before anything the test changes next).
async fn open_tail(e: &Env, target: &str, n: usize) -> tokio::task::JoinHandle<(Bytes, bool)> {
    let host = target.rsplit_once(':').unwrap().0.to_owned();
    let before = e.echo.requests().len();
    let mut c = pc::h1(e.h.proxy, &e.sb, target).await;
    let answer = tokio::spawn(async move {
        c.ready().await.unwrap();
        let req = pc::get(&format!("/tail?n={n}"), &host, &[]);
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        read_all(resp.into_body()).await
    });
    while e.echo.requests().len() == before {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    answer
}

/// The body's bytes as they came, and whether it ended with an error.
async fn read_all(mut body: Incoming) -> (Bytes, bool) {
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => return (got.into(), true),
        }
    }
    (got.into(), false)
}

async fn send_token(e: &Env, target: &str) {
    let host = target.rsplit_once(':').unwrap().0;
    let mut c = pc::h1(e.h.proxy, &e.sb, target).await;
    let token = e.sb.token("KEY");
    let a = pc::send1(&mut c, pc::get("/echo", host, &[("x-api-key", &token)])).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
}

/// The `x-api-key` the origin received last.
fn last_key(e: &Env) -> Option<String> {
    e.echo.requests().last().and_then(|r| r.header("x-api-key"))
}

/// What `tail` delivered (it must end within 10 s), and whether it ended in an error.
async fn ended(tail: tokio::task::JoinHandle<(Bytes, bool)>) -> (String, bool) {
    let (got, failed) = tokio::time::timeout(Duration::from_secs(10), tail)
        .await
        .expect("the stream ends, not left open")
        .unwrap();
    (String::from_utf8_lossy(&got).into_owned(), failed)
}

#[tokio::test]
async fn a_stream_opened_before_a_rotation_scrubs_the_new_value() {
    let e = env().await;
    let tail = open_tail(&e, API, 2).await;
    send_token(&e, API).await;
    put_key(&e, V2, &["api.example.test"]).await;
    send_token(&e, API).await;
    assert_eq!(last_key(&e).as_deref(), Some(V2));
    let (got, failed) = ended(tail).await;
    assert!(!failed, "{got}");
    let token = e.sb.token("KEY");
    assert_eq!(got, format!("data: {token}\n\ndata: {token}\n\n"));
}

#[tokio::test]
async fn an_unscrubbed_stream_ends_once_its_host_may_receive_a_value() {
    let e = env().await;
    let tail = open_tail(&e, OTHER, 3).await;
    put_key(&e, V1, &["api.example.test", "other.example.test"]).await;
    send_token(&e, OTHER).await;
    assert_eq!(last_key(&e).as_deref(), Some(V1));
    let (got, failed) = ended(tail).await;
    assert!(failed, "{got}");
    assert!(!got.contains(V1), "{got}");
    // The next answer from that host is scrubbed.
    let mut c = pc::h1(e.h.proxy, &e.sb, OTHER).await;
    let a = pc::send1(
        &mut c,
        pc::get("/echo", "other.example.test", &[("x-stored", V1)]),
    )
    .await;
    assert!(!a.text().contains(V1), "{}", a.text());
}

/// A WebSocket to `target`'s `/ws` echo.
async fn websocket(
    e: &Env,
    target: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let host = target.rsplit_once(':').unwrap().0;
    let tls = crate::adversarial::tls_tunnel(e, target, host).await;
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{host}/ws"), tls)
        .await
        .expect("websocket handshake");
    ws
}

/// The echo of `text`, or None once the connection ended (within 5 s).
async fn echoed<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> Option<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::Text(text.into())).await.ok()?;
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    match next.expect("an answer or an end within 5 s") {
        Some(Ok(Message::Text(t))) => Some(t.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn a_websocket_opened_before_a_rotation_scrubs_the_new_value() {
    let e = env().await;
    let mut ws = websocket(&e, API).await;
    let token = e.sb.token("KEY");
    assert_eq!(
        echoed(&mut ws, &format!("a {V1}")).await,
        Some(format!("a {token}"))
    );
    put_key(&e, V2, &["api.example.test"]).await;
    assert_eq!(
        echoed(&mut ws, &format!("b {V2}")).await,
        Some(format!("b {token}"))
    );
    assert_eq!(
        echoed(&mut ws, &format!("c {V1}")).await,
        Some(format!("c {token}"))
    );
}

#[tokio::test]
async fn an_unscrubbed_websocket_ends_once_its_host_may_receive_a_value() {
    let e = env().await;
    let mut ws = websocket(&e, OTHER).await;
    assert_eq!(echoed(&mut ws, "before").await.as_deref(), Some("before"));
    put_key(&e, V1, &["api.example.test", "other.example.test"]).await;
    assert_eq!(echoed(&mut ws, &format!("after {V1}")).await, None);
}

/// An answer still streaming when its sandbox is deleted ends at its next chunk: an event
/// stream and a download went on to their end, for minutes, after the delete (found from
/// outside), where the sandbox's WebSockets and uploads stopped at once.
#[tokio::test]
async fn an_answer_ends_once_its_sandbox_is_deleted() {
    let e = env().await;
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    c.ready().await.unwrap();
    // 500 ms apart: the delete lands before the next two chunks even on a loaded machine
    // (review h49a: at 200 ms it had ~600 ms).
    let req = pc::get("/slow?ms=500&chunks=25", "api.example.test", &[]);
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    let id = e.sb.id.clone();
    let (s, v) =
        e.h.api(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
            .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let started = std::time::Instant::now();
    let (got, failed) = tokio::time::timeout(Duration::from_secs(10), read_all(body))
        .await
        .expect("the answer ends");
    assert!(failed, "ended in an error, not as if complete");
    assert!(
        got.len() <= 2048,
        "{} more bytes after the delete",
        got.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
