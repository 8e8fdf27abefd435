//! Real clients through the explicit proxy using only the sandbox's `proxy_env`: curl (h1 and
//! h2), Python requests, httpx and the official anthropic SDK.

use std::collections::HashMap;

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
