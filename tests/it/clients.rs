//! Real clients through the explicit proxy using only the sandbox's `proxy_env`: curl (h1 and
//! h2), Python requests, httpx and the official anthropic SDK.

use std::collections::HashMap;
use std::time::Duration;

use crate::proxy_explicit::{setup, Env};

fn sandbox_env(e: &Env) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for key in ["env", "proxy_env"] {
        let v = if key == "env" {
            &e.sb.env
        } else {
            &e.sb.proxy_env
        };
        for (k, v) in v.as_object().unwrap() {
            env.insert(k.clone(), v.as_str().unwrap().to_owned());
        }
    }
    env
}

/// Runs a client with a clean environment plus the sandbox's variables.
async fn run(e: &Env, program: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", e.h.dir.path())
        .envs(sandbox_env(e))
        .output()
        .await
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn python() -> String {
    std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// True if the Python modules import; in CI a missing module is a failure, not a skip.
async fn has_modules(mods: &str) -> bool {
    let ok = tokio::process::Command::new(python())
        .args(["-c", &format!("import {mods}")])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "python modules {mods} missing in CI (scripts/test installs them)"
        );
        eprintln!("SKIP: python modules {mods} not installed (run scripts/test)");
    }
    ok
}

const SECRETS: &[crate::proxy_explicit::Spec<'static>] = &[(
    "ANTHROPIC_API_KEY",
    "sk-ant-real-client-0201",
    Some(&["api.anthropic.com"]),
    Some(&["header"]),
)];

#[tokio::test]
async fn curl_h1_and_h2() {
    let e = setup(Some(&["api.anthropic.com"]), SECRETS).await;
    for flag in ["--http1.1", "--http2"] {
        e.echo.clear();
        let (ok, out, err) = run(&e, "sh", &["-c", &format!("curl -sS {flag} https://api.anthropic.com/echo -H \"x-api-key: $ANTHROPIC_API_KEY\"")]).await;
        assert!(ok, "curl {flag}: {err}");
        assert!(
            !out.contains("sk-ant-real-client-0201"),
            "sandbox saw the real key"
        );
        assert!(out.contains(&e.sb.token("ANTHROPIC_API_KEY")), "{out}");
        let r = &e.echo.requests()[0];
        assert_eq!(
            r.header("x-api-key").as_deref(),
            Some("sk-ant-real-client-0201")
        );
        let _ = flag;
    }
    let (ok, out, _) = run(&e, "sh", &["-c", "echo $ANTHROPIC_API_KEY"]).await;
    assert!(ok && out.trim().starts_with("osb_sealed_"));
}

/// A head over `proxy.max_header_bytes` gets the uniform 431 over h1 and h2 alike (the h2
/// crate alone would reset the stream or end the connection, and curl would retry on new
/// connections). Kept under 64 KiB: nghttp2 itself refuses to send a larger header block.
#[tokio::test]
async fn curl_gets_one_uniform_431_for_an_oversized_head() {
    let opts = crate::support::daemon::Opts {
        proxy_toml: "max_header_bytes = 32768".into(),
        ..Default::default()
    };
    let e = crate::proxy_explicit::setup_with(Some(&["api.anthropic.com"]), SECRETS, opts).await;
    for flag in ["--http1.1", "--http2"] {
        let cmd = format!(
            "curl -sS -o /dev/null -D - {flag} https://api.anthropic.com/echo \
             -H \"x-big: $(head -c 40000 /dev/zero | tr '\\0' a)\""
        );
        let (ok, out, err) = run(&e, "sh", &["-c", &cmd]).await;
        assert!(ok, "curl {flag}: {err}");
        let lower = out.to_ascii_lowercase();
        assert!(
            lower.contains("\nhttp/1.1 431") || lower.contains("\nhttp/2 431"),
            "curl {flag}: {out}"
        );
        assert!(
            lower.contains("x-sealgate-error: request_too_large"),
            "{out}"
        );
        assert!(
            !err.contains("REFUSED_STREAM"),
            "curl {flag} retried: {err}"
        );
    }
    assert!(e.echo.requests().is_empty(), "nothing reached the origin");
}

/// sealgate's own answers to `HEAD` are heads over h1 and h2 alike: over h2 its JSON body went
/// out as DATA on the HEAD stream, and curl ended with PROTOCOL_ERROR instead of showing the
/// refusal (found from outside).
#[tokio::test]
async fn curl_head_gets_sealgates_refusal_over_h1_and_h2() {
    let secrets: &[crate::proxy_explicit::Spec<'static>] = &[
        SECRETS[0],
        (
            "ELSEWHERE_KEY",
            "sk-elsewhere-real-client-0202",
            Some(&["nowhere.example.test"]),
            Some(&["header"]),
        ),
    ];
    let e = setup(Some(&["api.anthropic.com"]), secrets).await;
    for flag in ["--http1.1", "--http2"] {
        let cmd = format!(
            "curl -sS -I {flag} https://api.anthropic.com/echo -H \"x-api-key: $ELSEWHERE_KEY\""
        );
        let (ok, out, err) = run(&e, "sh", &["-c", &cmd]).await;
        assert!(ok, "curl {flag}: {err}");
        let lower = out.to_ascii_lowercase();
        assert!(
            lower.contains("\nhttp/1.1 403") || lower.contains("\nhttp/2 403"),
            "curl {flag}: {out}"
        );
        assert!(
            lower.contains("x-sealgate-error: secret_host_denied"),
            "{out}"
        );
    }
    assert!(e.echo.requests().is_empty(), "nothing reached the origin");
}

#[tokio::test]
async fn python_requests_and_httpx() {
    let e = setup(Some(&["api.anthropic.com"]), SECRETS).await;
    if !has_modules("requests, httpx").await {
        return;
    }
    let script = r#"
import os, requests, httpx
k = os.environ["ANTHROPIC_API_KEY"]
r = requests.get("https://api.anthropic.com/echo", headers={"x-api-key": k}, timeout=10)
print("requests", r.status_code, "sk-ant-real" in r.text)
with httpx.Client(timeout=10) as c:
    r = c.get("https://api.anthropic.com/echo", headers={"x-api-key": k})
    print("httpx", r.status_code, "sk-ant-real" in r.text)
"#;
    let (ok, out, err) = run(&e, &python(), &["-c", script]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("requests 200 False") && out.contains("httpx 200 False"),
        "{out}\n{err}"
    );
    let reqs = e.echo.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs
        .iter()
        .all(|r| r.header("x-api-key").as_deref() == Some("sk-ant-real-client-0201")));
}

#[tokio::test]
async fn anthropic_sdk_reaches_the_api_with_the_real_key() {
    let e = setup(Some(&["api.anthropic.com"]), SECRETS).await;
    if !has_modules("anthropic").await {
        return;
    }
    let script = r#"
import anthropic
client = anthropic.Anthropic(max_retries=0, timeout=10)
raw = client.messages.with_raw_response.create(model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
print("status", raw.status_code, "sk-ant-real" in raw.http_response.text)
"#;
    let (ok, out, err) = run(&e, &python(), &["-c", script]).await;
    assert!(ok, "{err}");
    assert!(out.contains("status 200 False"), "{out}\n{err}");
    let r = &e.echo.requests()[0];
    assert!(r.uri.starts_with("/v1/messages"), "{}", r.uri);
    // Depending on its version the SDK sends the key as `x-api-key` or `Authorization: Bearer`.
    let sent = [r.header("x-api-key"), r.header("authorization")];
    assert!(
        sent.iter()
            .flatten()
            .any(|v| v.ends_with("sk-ant-real-client-0201")),
        "real key not delivered: {sent:?}"
    );
    assert!(r.body.starts_with(b"{"), "JSON body forwarded");
}

/// A TLS origin for `name` (ALPN `alpn`) on a loopback port, `serve` running on each
/// connection it accepts.
async fn tls_origin<F, Fut>(
    pki: &crate::support::pki::TestPki,
    name: &str,
    alpn: &[&[u8]],
    serve: F,
) -> std::net::SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&[name], alpn));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (a, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = a.accept(s).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// An HTTP/1.1 origin for `name` that answers 413 with a length as soon as it has read a
/// little of the request (its head), as nginx does past `client_max_body_size`, then reads
/// and drops the rest for up to 30 s.
async fn origin_that_answers_early(
    pki: &crate::support::pki::TestPki,
    name: &str,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls_origin(pki, name, &[b"http/1.1"], |mut tls| async move {
        let mut buf = vec![0u8; 65536];
        let _ = tls.read(&mut buf).await;
        let answer = "HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/plain\r\n\
                      content-length: 13\r\nconnection: close\r\n\r\nbody too big\n";
        let _ = tls.write_all(answer.as_bytes()).await;
        let _ = tls.flush().await;
        let drain = async { while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
    })
    .await
}

/// An upstream that refuses an upload early (413 with a length, while the client is still
/// sending) reaches curl at once over h1 and h2, also where answers are scrubbed. Scrubbed,
/// the answer had lost its length, and curl 7.88 over h2, still uploading, waited for the
/// answer's end until its 90 s timeout in 7 of 12 tries (outside re-check); a small answer of
/// known length now keeps an exact one.
#[tokio::test]
async fn an_upload_refused_early_by_a_scrubbed_host_reaches_curl_at_once() {
    let pki = std::sync::Arc::new(crate::support::pki::TestPki::new());
    let early = origin_that_answers_early(&pki, "api.anthropic.com").await;
    let opts = crate::support::daemon::Opts {
        resolve: vec![("api.anthropic.com".into(), early)],
        ..Default::default()
    };
    let h = crate::support::daemon::Harness::try_start(opts, Some(pki))
        .await
        .unwrap();
    let store = h.store("s", Some(&["api.anthropic.com"])).await;
    h.secret(
        &store,
        "KEY",
        "sk-early-answer-0204",
        Some(&["api.anthropic.com"]),
        Some(&["header"]),
    )
    .await;
    let e = env_of(h).await;
    for flag in ["--http1.1", "--http2", "--http2", "--http2"] {
        let started = std::time::Instant::now();
        let (out, err) =
            curl_upload(&e, &format!("-H \"x-api-key: $KEY\" {flag}"), SLOW_UPLOAD).await;
        assert!(
            out.contains("http=413") && out.contains("content-length: 13"),
            "curl {flag}: {out}\n{err}"
        );
        // The writer's ~10 s at most (curl may read the answer only when its upload ends).
        let took = started.elapsed();
        assert!(took < Duration::from_secs(15), "curl {flag} took {took:?}");
        eprintln!("curl {flag}: {took:?}");
    }
}

/// An origin that takes TLS connections for `name` (ALPN `alpn`), reads a little of each
/// (the head) and then stops reading (and never answers) for a minute.
async fn origin_that_stops_reading(
    pki: &crate::support::pki::TestPki,
    name: &str,
    alpn: &[&[u8]],
) -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    tls_origin(pki, name, alpn, |mut tls| async move {
        let _ = tls.read(&mut [0u8; 4096]).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
    .await
}

/// A sandbox of store "s" on `h` (the [`Env`]'s echo origin unused).
async fn env_of(h: crate::support::daemon::Harness) -> Env {
    let sb = crate::support::proxy_client::SandboxCreds::from_answer(&h.sandbox("s").await);
    Env {
        h,
        echo: crate::support::echo::Echo::start_plain().await,
        sb,
        store: "s".into(),
    }
}

/// A body for [`curl_upload`] that goes on for ~10 s (the writer stops once curl has gone:
/// its `head` fails on the closed pipe).
const SLOW_UPLOAD: &str =
    "for i in $(seq 100); do head -c 30000 /dev/zero || exit; sleep 0.1; done";

/// curl uploading through `e`'s sandbox from a pipe that goes on for ~10 s (`body` is a shell
/// command list writing the body); the status, the `x-sealgate-error` and curl's error.
async fn curl_upload(e: &Env, flag: &str, body: &str) -> (String, String) {
    let cmd = format!(
        "({body}) | curl -sS -D - -o /dev/null -w 'http=%{{http_code}}\\n' {flag} -T - https://api.anthropic.com/upload"
    );
    let (_, out, err) = run(e, "sh", &["-c", &cmd]).await;
    (out.to_ascii_lowercase(), err)
}

/// Python requests PUTting `mib` MiB to `host` through `e`'s sandbox, with the sandbox's
/// variable `key` (a token) as `x-api-key`: "status CODE ERROR-CODE", or "failed …".
async fn requests_upload(e: &Env, host: &str, mib: u32, key: Option<&str>) -> String {
    let key = key.map_or("None".to_owned(), |k| format!("os.environ[{k:?}]"));
    let script = format!(
        r#"
import os, requests
key = {key}
try:
    r = requests.put("https://{host}/upload", data=b"x" * ({mib} << 20),
                     headers={{"x-api-key": key}} if key else {{}}, timeout=8)
    print("status", r.status_code, r.headers.get("x-sealgate-error"))
except Exception as e:
    print("failed", type(e).__name__, e)
"#
    );
    let (_, out, err) = run(e, &python(), &["-c", &script]).await;
    format!("{out}{err}")
}

/// An upload sealgate ends mid-way shows the client sealgate's answer over h1 as over h2: the
/// 504 of an upstream that stopped reading, the 403 of a token its secret may not carry
/// there. hyper closed the h1 connection with the rest of the body unread, the kernel reset
/// it, and curl, still writing, showed "Send failure: Broken pipe" and never the answer
/// (found from outside); the rest is now read and dropped until the client closes
/// (`proxy::linger`). A body stuck with the task writing to an upstream that stopped reading
/// is taken back after the 504, or Python `requests`, which writes its whole body before it
/// reads, timed out writing (outside re-check).
#[tokio::test]
async fn an_upload_cut_mid_way_shows_the_client_sealgates_answer() {
    let pki = std::sync::Arc::new(crate::support::pki::TestPki::new());
    // Over h2 the upstream's flow control stops the upload at once; an HTTP/1.1 upstream
    // takes megabytes into socket buffers first (the timeout counts from the last byte).
    let h2 = origin_that_stops_reading(&pki, "api.anthropic.com", &[b"h2", b"http/1.1"]).await;
    let h1 = origin_that_stops_reading(&pki, "api.example.test", &[b"http/1.1"]).await;
    let opts = crate::support::daemon::Opts {
        upstream_toml: "response_timeout_secs = 1\n".into(),
        resolve: vec![
            ("api.anthropic.com".into(), h2),
            ("api.example.test".into(), h1),
        ],
        ..Default::default()
    };
    let h = crate::support::daemon::Harness::try_start(opts, Some(pki))
        .await
        .unwrap();
    h.store("s", Some(&["api.anthropic.com", "api.example.test"]))
        .await;
    let e = env_of(h).await;
    // requests writes its whole body before it reads: the body, stuck with the task writing
    // to the HTTP/1.1 upstream, is taken back after the 504 and drained.
    if has_modules("requests").await {
        let out = requests_upload(&e, "api.example.test", 20, None).await;
        assert!(
            out.contains("status 504 upstream_timeout"),
            "requests: {out}"
        );
    }
    for flag in ["--http1.1", "--http2"] {
        let (out, err) = curl_upload(&e, flag, SLOW_UPLOAD).await;
        assert!(
            out.contains("http=504") && out.contains("x-sealgate-error: upstream_timeout"),
            "curl {flag}: {out}\n{err}"
        );
    }

    let secrets: &[crate::proxy_explicit::Spec<'static>] = &[(
        "ELSEWHERE_KEY",
        "sk-elsewhere-upload-0203",
        Some(&["nowhere.example.test"]),
        Some(&["header", "body"]),
    )];
    let e = setup(Some(&["api.anthropic.com"]), secrets).await;
    // Refused at the head, before the body is read: requests sends its 8 MiB body anyway
    // (no Expect), curl over h2 streams its upload.
    if has_modules("requests").await {
        let out = requests_upload(&e, "api.anthropic.com", 8, Some("ELSEWHERE_KEY")).await;
        assert!(
            out.contains("status 403 secret_host_denied"),
            "requests: {out}"
        );
    }
    let head = "-H \"x-api-key: $ELSEWHERE_KEY\" --http2";
    let (out, err) = curl_upload(&e, head, SLOW_UPLOAD).await;
    assert!(
        out.contains("http=403") && out.contains("x-sealgate-error: secret_host_denied"),
        "curl h2, refused at the head: {out}\n{err}"
    );
    let body =
        format!("head -c 300000 /dev/zero; sleep 0.5; printf %s \"$ELSEWHERE_KEY\"; {SLOW_UPLOAD}");
    for flag in ["--http1.1", "--http2"] {
        let (out, err) = curl_upload(&e, flag, &body).await;
        assert!(
            out.contains("http=403") && out.contains("x-sealgate-error: secret_host_denied"),
            "curl {flag}: {out}\n{err}"
        );
    }
    e.h.assert_logs_clean();
}

/// A head the framing guard refuses (request smuggling) is answered with 400 even while the
/// client goes on writing the body it announced: Python's `sendall` of head and 4 MiB body
/// failed with a reset and never read the answer (hyper ends the connection after the
/// refusal; `serve::linger` now drops the rest until the client closes).
#[tokio::test]
async fn a_refused_head_is_answered_while_its_body_is_still_coming() {
    let e = setup(Some(&["api.anthropic.com"]), SECRETS).await;
    let script = r#"
import os, socket, ssl, urllib.parse
p = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
s = socket.create_connection((p.hostname, p.port), timeout=20)
auth = (urllib.parse.unquote(p.username) + ":" + urllib.parse.unquote(p.password)).encode()
import base64
s.sendall(b"CONNECT api.anthropic.com:443 HTTP/1.1\r\nHost: api.anthropic.com:443\r\n"
          b"Proxy-Authorization: Basic " + base64.b64encode(auth) + b"\r\n\r\n")
assert b" 200 " in s.recv(4096)
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
t = ctx.wrap_socket(s, server_hostname="api.anthropic.com")
body = b"x" * (4 << 20)
head = (b"POST /upload HTTP/1.1\r\nHost: api.anthropic.com\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % len(body))
try:
    t.sendall(head + body)
    answer = b""
    while b"\r\n\r\n" not in answer:
        more = t.recv(65536)
        if not more:
            break
        answer += more
    print(answer.split(b"\r\n")[0].decode())
except Exception as err:
    print("failed", type(err).__name__, err)
"#;
    let (_, out, err) = run(&e, &python(), &["-c", script]).await;
    assert!(out.contains("HTTP/1.1 400"), "{out}\n{err}");
    assert!(e.echo.requests().is_empty(), "nothing reached the origin");
}
