//! gRPC (DESIGN.md §6): grpcio's client against grpcio's server (C-core on both sides, its own
//! h2 and HPACK), through sealgate in explicit mode (`https_proxy` of `proxy_env`) and in
//! transparent mode (`sealgate sandbox exec`). The client trusts the sandbox CA only through
//! `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH` (C-core reads neither `SSL_CERT_FILE` nor the system
//! store), so each cell also checks that `proxy_env` names it.
//!
//! Checked per mode: metadata unsealed; a token inside a message travels sealed (its length
//! would break the message's framing); answers that echo the value reach the client as valid
//! gRPC (same-length scrubbing keeps every length prefix right); a server-streaming call keeps
//! streaming; a Trailers-Only error has its status message scrubbed; a server that compresses
//! although sealgate sent `grpc-accept-encoding: identity` (grpcio does when the handler asks)
//! has its message decoded and scrubbed; another host's secret is refused before the origin
//! sees anything.

use serde_json::Value;

use super::matrix::{versions, Matrix, Outcome};
use super::{ensure, python_cmd, sh_quote, Mode, Want, World, BODY_KEY, KEY};

/// The client: every call's result as one `name=<json>` line.
const CLIENT: &str = r#"
import grpc, json, os, sys, time
host = sys.argv[1]
ch = grpc.secure_channel(host + ':443', grpc.ssl_channel_credentials())
md = [('authorization', 'Bearer ' + os.environ['KEY'])]
def out(k, v): print('%s=%s' % (k, json.dumps(v)), flush=True)
def err(e): return {'code': e.code().name, 'details': e.details()}
out('tokens', {k: os.environ[k] for k in ('KEY', 'BODY_KEY')})
def unary(method, name):
    try:
        body = ('token ' + os.environ['BODY_KEY']).encode()
        r, call = ch.unary_unary(method).with_call(body, metadata=md, timeout=20)
        trailers = dict(call.trailing_metadata())
        out(name, {'reply': r.decode('latin-1'), 'trailer': trailers.get('x-echo-auth', '')})
    except grpc.RpcError as e:
        out(name, err(e))
unary('/interop.Echo/Unary', 'unary')
unary('/interop.Echo/Gzip', 'gzip')
if host == 'grpc.test':
    try:
        t0, got = time.monotonic(), []
        for m in ch.unary_stream('/interop.Echo/Stream')(b'', metadata=md, timeout=20):
            got.append([time.monotonic() - t0, m.decode('latin-1')])
        out('stream', {'messages': got})
    except grpc.RpcError as e:
        out('stream', err(e))
    try:
        ch.unary_unary('/interop.Echo/Deny')(b'', metadata=md, timeout=20)
        out('deny', {'code': 'OK'})
    except grpc.RpcError as e:
        out('deny', err(e))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_reaches_grpcio_in_both_modes() {
    if !crate::transparent::netns_ready() {
        return;
    }
    if !super::have(&[(&super::python(), &["-c", "import grpc"])]) {
        return;
    }
    let w = World::start(Want {
        grpc: true,
        transparent: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("grpc");
    for mode in [Mode::Explicit, Mode::Transparent] {
        grpc_cells(&w, mode, &mut m).await;
    }
    m.finish();
}

async fn grpc_cells(w: &World, mode: Mode, m: &mut Matrix) {
    let server = "grpcio server (C-core)";
    let client = versions().py("grpcio");
    let r = run_client(w, mode, "grpc.test").await;
    let calls = [
        (
            "unary",
            "unary: metadata unsealed, token in the message sealed, echo scrubbed to valid gRPC",
        ),
        ("gzip", "a server compressing anyway: decoded, scrubbed"),
        (
            "stream",
            "server streaming keeps streaming, every message scrubbed",
        ),
        (
            "deny",
            "Trailers-Only PERMISSION_DENIED, status message scrubbed",
        ),
    ];
    for (call, checks) in calls {
        let outcome = match &r {
            Ok(r) => check_call(w, call, &r.var("tokens"), &r.var(call)),
            Err(e) => Err(e.clone()),
        };
        m.cell(server, &client, mode.name(), checks, outcome);
    }
    let before = w.grpc.as_ref().unwrap().hits().len();
    let refused = run_client(w, mode, "clean-grpc.test").await;
    let outcome = refused.and_then(|r| refused_elsewhere(w, before, &r.var("unary")));
    let checks = "a token of a secret not allowed there: refused, the origin sees nothing";
    m.cell(
        &format!("{server} as clean-grpc.test"),
        &client,
        mode.name(),
        checks,
        outcome,
    );
}

async fn run_client(w: &World, mode: Mode, host: &str) -> Result<super::Ran, String> {
    let script = format!("{} -c {} {host}", python_cmd(mode), sh_quote(CLIENT));
    let r = w.run(mode, &script).await;
    r.ok()?;
    Ok(r)
}

fn parse(line: &str) -> Result<Value, String> {
    serde_json::from_str(line).map_err(|e| format!("no result ({e}): {line:?}"))
}

/// `tokens`: the client's own sealed tokens (transparent mode runs its own sandbox).
fn check_call(w: &World, call: &str, tokens: &str, line: &str) -> Outcome {
    let tokens = parse(tokens)?;
    let got = parse(line)?;
    ensure(!line.contains(KEY), || {
        format!("the real value reached the client: {line}")
    })?;
    let token = tokens["KEY"].as_str().unwrap_or("?");
    let sealed_auth = format!("Bearer {token}");
    match call {
        "unary" | "gzip" => {
            let body_token = tokens["BODY_KEY"].as_str().unwrap_or("?");
            unary_checks(w, call, &got, &sealed_auth, body_token)
        }
        "stream" => stream_checks(&got),
        "deny" => {
            ensure(got["code"] == "PERMISSION_DENIED", || format!("{got}"))?;
            let want = format!("key refused: {sealed_auth}");
            ensure(got["details"] == want.as_str(), || {
                format!("details {got}, want {want}")
            })
        }
        _ => unreachable!(),
    }
}

/// The origin saw the real value in metadata and the sealed body token; the client got a valid
/// message (its JSON parses) with the echoed value masked at its own length, and the trailing
/// metadata scrubbed to the token.
fn unary_checks(
    w: &World,
    call: &str,
    got: &Value,
    sealed_auth: &str,
    body_token: &str,
) -> Outcome {
    let reply = got["reply"]
        .as_str()
        .ok_or_else(|| format!("call failed: {got}"))?;
    let reply: Value = serde_json::from_str(reply)
        .map_err(|e| format!("the message is not intact ({e}): {reply:?}"))?;
    let echoed = reply["auth"].as_str().unwrap_or("");
    let real = format!("Bearer {KEY}");
    ensure(
        echoed.len() == real.len() && echoed.starts_with("Bearer osb_sealed_"),
        || format!("echoed value {echoed:?}: want the token at the value's length"),
    )?;
    ensure(got["trailer"] == sealed_auth, || format!("trailer {got}"))?;
    let method = if call == "gzip" { "Gzip" } else { "Unary" };
    let hit = last_hit(w, method)?;
    ensure(hit["metadata"]["authorization"][0] == real.as_str(), || {
        format!("origin saw {}", hit["metadata"])
    })?;
    ensure(
        hit["body"] == format!("token {body_token}").as_str(),
        || {
            format!(
                "origin's message {}: want the body token sealed",
                hit["body"]
            )
        },
    )?;
    ensure(
        !hit["body"].as_str().unwrap_or("").contains(BODY_KEY),
        || "the body token was unsealed inside a gRPC message".into(),
    )
}

/// Three messages, each intact and scrubbed, the last at least 300 ms after the first (the
/// origin sends them 200 ms apart: nothing waited for the end of the stream).
fn stream_checks(got: &Value) -> Outcome {
    let msgs = got["messages"]
        .as_array()
        .ok_or_else(|| format!("call failed: {got}"))?;
    ensure(msgs.len() == 3, || {
        format!("{} messages: {got}", msgs.len())
    })?;
    for m in msgs {
        let text = m[1].as_str().unwrap_or("");
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("message not intact ({e}): {text:?}"))?;
        ensure(
            v["auth"]
                .as_str()
                .is_some_and(|a| a.starts_with("Bearer osb_sealed_")),
            || format!("message {text}"),
        )?;
    }
    let spread = msgs[2][0].as_f64().unwrap_or(0.0) - msgs[0][0].as_f64().unwrap_or(0.0);
    ensure(spread >= 0.3, || {
        format!("messages arrived together ({spread:.3} s apart)")
    })
}

/// The client got PERMISSION_DENIED (sealgate's 403 `secret_host_denied`, which gRPC maps
/// from the HTTP status) and the origin recorded no call since `before`.
fn refused_elsewhere(w: &World, before: usize, line: &str) -> Outcome {
    let got = parse(line)?;
    ensure(got["code"] == "PERMISSION_DENIED", || format!("{got}"))?;
    let after = w.grpc.as_ref().unwrap().hits().len();
    ensure(after == before, || {
        format!("the origin recorded {} call(s)", after - before)
    })
}

fn last_hit(w: &World, method: &str) -> Result<Value, String> {
    w.grpc
        .as_ref()
        .unwrap()
        .hits()
        .into_iter()
        .rev()
        .find(|h| h["method"] == method)
        .ok_or_else(|| format!("the origin recorded no {method} call"))
}
