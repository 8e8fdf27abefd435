//! Explicit mode (the sandbox's `HTTPS_PROXY`): curl (h1 and h2), Python `requests`,
//! `httpx`, `websockets`, and the `anthropic` and `openai` SDKs against every origin, and the
//! response shapes real servers produce.

use super::matrix::{versions, Matrix, Outcome};
use super::{
    ensure, eventually, python_cmd, sh_quote, Mode, Server, Want, World, ANTHROPIC_KEY, KEY,
    OPENAI_KEY, QUERY_KEY,
};

/// An origin host and how it is labelled in the matrix.
#[derive(Clone, Copy)]
pub struct Origin {
    pub server: Server,
    pub host: &'static str,
    /// Protocol sealgate speaks to it (`1.1` or `2`).
    pub upstream: &'static str,
    pub what: &'static str,
}

pub const NGINX_H2: Origin = Origin {
    server: Server::Nginx,
    host: "nginx-h2.test",
    upstream: "2",
    what: "h2",
};
pub const NGINX_H1: Origin = Origin {
    server: Server::Nginx,
    host: "nginx-h1.test",
    upstream: "1.1",
    what: "h1 only",
};
pub const CADDY: Origin = Origin {
    server: Server::Caddy,
    host: "caddy.test",
    upstream: "2",
    what: "h1+h2",
};
pub const NODE_H1: Origin = Origin {
    server: Server::Node,
    host: "node-h1.test",
    upstream: "1.1",
    what: "https",
};
pub const NODE_H2: Origin = Origin {
    server: Server::Node,
    host: "node-h2.test",
    upstream: "2",
    what: "http2",
};
pub const HYPERCORN: Origin = Origin {
    server: Server::Hypercorn,
    host: "hypercorn.test",
    upstream: "2",
    what: "h1+h2",
};

impl Origin {
    /// The matrix's server column.
    pub fn label(&self) -> String {
        let v = versions();
        let name = match self.server {
            Server::Nginx => v.nginx.clone(),
            Server::Caddy => v.caddy.clone(),
            Server::Node => v.node.clone(),
            Server::Hypercorn => v.py("hypercorn").replace("hypercorn", "Hypercorn"),
        };
        format!("{name} ({})", self.what)
    }
}

/// A unique `x-cell` value: how a cell finds its request in an origin's records.
pub fn cell_id(parts: &[&str]) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id: String = parts
        .join("-")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    id.push_str(&format!("-{n}"));
    id
}

/// The echo checks: the client saw only sealed values; the origin got the real key over the
/// expected protocol with exactly one authority, `host`.
pub async fn echo_checks(w: &World, o: Origin, cell: &str, client_saw: &str) -> Outcome {
    ensure(!client_saw.contains(KEY), || {
        "the client saw the real key".into()
    })?;
    ensure(client_saw.contains("osb_sealed_"), || {
        format!(
            "the echo did not come back scrubbed: {}",
            &client_saw[..client_saw.len().min(300)]
        )
    })?;
    let s = w.seen_eventually(o.server, cell).await?;
    ensure(s.key == KEY, || {
        "the origin did not get the real key".into()
    })?;
    ensure(s.version == o.upstream, || {
        format!("upstream spoke HTTP/{}", s.version)
    })?;
    ensure(s.authority == o.host, || {
        format!("origin saw authority {:?}", s.authority)
    })?;
    ensure(!s.extra_host, || "Host beside :authority".into())
}

/// curl `flag` GET /echo with the sealed key.
pub async fn curl_echo(w: &World, mode: Mode, o: Origin, flag: &str) -> Outcome {
    let cell = cell_id(&[o.host, flag, mode.name()]);
    let args = format!("{flag} -H \"x-api-key: $KEY\" -H 'x-cell: {cell}'");
    let c = w
        .curl(mode, &args, &format!("https://{}/echo", o.host))
        .await?;
    ensure(c.status == "200", || {
        format!("status {} {}", c.status, c.text())
    })?;
    let want = if flag == "--http2" { "2" } else { "1.1" };
    ensure(c.version == want, || {
        format!("curl spoke HTTP/{}", c.version)
    })?;
    // nginx's echo has a length; scrubbed (the key's token is longer than the key), it is
    // read whole and keeps its exact new one.
    let length = format!("content-length: {}", c.body.len());
    ensure(
        o.server != Server::Nginx || c.headers.contains(&length),
        || format!("wanted {length}: {}", c.headers),
    )?;
    echo_checks(w, o, &cell, &c.text()).await
}

#[tokio::test]
async fn curl_reaches_every_server_over_h1_and_h2() {
    if !super::have(&[
        ("nginx", &["-v"]),
        ("caddy", &["version"]),
        ("node", &["--version"]),
    ]) {
        return;
    }
    let w = World::start(Want {
        caddy: true,
        node: true,
        hypercorn: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("explicit_curl");
    for o in [NGINX_H2, NGINX_H1, CADDY, NODE_H1, NODE_H2, HYPERCORN] {
        for flag in ["--http1.1", "--http2"] {
            let outcome = curl_echo(&w, Mode::Explicit, o, flag).await;
            let client = format!("{} {flag}", versions().curl);
            let checked = "GET /echo: real key at origin, one authority, echo scrubbed";
            m.cell(&o.label(), &client, "explicit", checked, outcome);
        }
    }
    m.finish();
    // Each server's echo left the operator's trace: one log line per scrubbed answer naming
    // the sandbox and the host (`ops::values_scrubbed_…` checks the counts).
    let logs = crate::support::daemon::logs_text();
    for o in [NGINX_H2, NGINX_H1, CADDY, NODE_H1, NODE_H2, HYPERCORN] {
        let host = format!("host={}:", o.host);
        let traced = logs
            .lines()
            .any(|l| l.contains("were scrubbed") && l.contains(&w.sb.id) && l.contains(&host));
        assert!(traced, "no scrub trace for {}", o.host);
    }
    w.h.assert_logs_clean();
}

// ---- response shapes ------------------------------------------------------------------------

/// One response shape checked with curl against one host.
async fn shape(w: &World, mode: Mode, host: &str, flag: &str, name: &str) -> Outcome {
    let url = |p: &str| format!("https://{host}{p}");
    let cell = cell_id(&[host, flag, name]);
    let tag = format!("{flag} -H 'x-cell: {cell}'");
    match name {
        "Content-Length" => {
            let c = w.curl(mode, &tag, &url("/static/hello.txt")).await?;
            ensure(
                c.status == "200" && c.text() == "hello from nginx\n",
                || format!("{c:?}"),
            )?;
            // A scrubbed answer may change length: a small one is read whole and keeps an
            // exact length (nothing to scrub here: the same 17 bytes), as an unscrubbed one.
            ensure(c.headers.contains("content-length: 17"), || {
                c.headers.clone()
            })
        }
        "HEAD" => {
            let len = std::fs::metadata(w.nginx.dir.join("www/static/text.txt"))
                .unwrap()
                .len();
            let c = w
                .curl(mode, &format!("{tag} -I"), &url("/static/text.txt"))
                .await?;
            ensure(c.status == "200" && c.size == 0, || format!("{c:?}"))?;
            ensure(
                c.headers.contains(&format!("content-length: {len}")),
                || format!("HEAD lost its Content-Length: {}", c.headers),
            )
        }
        "204" => {
            let c = w.curl(mode, &tag, &url("/nocontent")).await?;
            ensure(c.status == "204" && c.body.is_empty(), || format!("{c:?}"))
        }
        "304" => {
            let ims = "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT";
            let c = w
                .curl(
                    mode,
                    &format!("{tag} -H '{ims}'"),
                    &url("/static/hello.txt"),
                )
                .await?;
            ensure(c.status == "304" && c.body.is_empty(), || format!("{c:?}"))
        }
        "gzip" => {
            let file = w.nginx.dir.join("www/static/text.txt");
            let want = std::fs::read(file).unwrap();
            let c = w
                .curl(
                    mode,
                    &format!("{tag} --compressed"),
                    &url("/static/text.txt"),
                )
                .await?;
            ensure(c.status == "200", || format!("{c:?}"))?;
            ensure(c.body == want, || {
                format!("decoded body: {} bytes, want {}", c.body.len(), want.len())
            })
        }
        "trailers" => {
            // Hypercorn sends trailers only to requests with `TE: trailers`.
            let c = w
                .curl(mode, &format!("{tag} -H 'TE: trailers'"), &url("/trailers"))
                .await?;
            ensure(c.status == "200" && c.text() == "with trailers", || {
                format!("{c:?}")
            })?;
            ensure(c.headers.contains("x-checksum: sha-interop-1"), || {
                format!("no trailer reached the client: {}", c.headers)
            })
        }
        _ => unreachable!("unknown shape {name}"),
    }
}

/// curl uploads 300 KiB with `Expect: 100-continue`: nginx (DAV PUT) stores exactly those
/// bytes; Node reports their length and hash. Over HTTP/1.1 sealgate's `100 Continue` comes at
/// once (curl waits 1 s for one that never comes); over h2 it cannot come (hyper's h2 server
/// sends no interim answer, hyperium/hyper#2743: docs/operations.md), so curl waits its 1 s.
async fn expect_upload(w: &World, mode: Mode, host: &str, flag: &str) -> Outcome {
    let cell = cell_id(&[host, flag, "expect"]);
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let file = w.path(&format!("{cell}.bin"));
    std::fs::write(&file, &data).unwrap();
    let args = format!(
        "{flag} -H 'x-cell: {cell}' -H 'Expect: 100-continue' -T {}",
        file.display()
    );
    if host.starts_with("node") {
        return node_upload(w, mode, host, &format!("{args} -X POST"), &data).await;
    }
    let c = w
        .curl(mode, &args, &format!("https://{host}/dav/{cell}.bin"))
        .await?;
    ensure(c.status == "201" || c.status == "204", || format!("{c:?}"))?;
    ensure(flag != "--http1.1" || c.seconds < 0.9, || {
        format!("curl waited {:.2} s for 100 Continue", c.seconds)
    })?;
    let s = w.seen_eventually(Server::Nginx, &cell).await?;
    ensure(s.expect == "100-continue", || {
        format!("origin got Expect {:?}", s.expect)
    })?;
    ensure(w.nginx.dav_file(&format!("{cell}.bin")) == data, || {
        "origin stored other bytes".into()
    })
}

/// curl sends `data` (curl `args` upload it) to Node's `/upload` on `host`, which answers the
/// length and SHA-256 of the body it read.
async fn node_upload(w: &World, mode: Mode, host: &str, args: &str, data: &[u8]) -> Outcome {
    let c = w
        .curl(mode, args, &format!("https://{host}/upload"))
        .await?;
    ensure(c.status == "200", || format!("{c:?}"))?;
    let v: serde_json::Value = serde_json::from_slice(&c.body).map_err(|e| e.to_string())?;
    ensure(v["bytes"] == data.len(), || {
        format!("origin got {}", v["bytes"])
    })?;
    ensure(v["sha256"] == sha256_hex(data), || {
        "origin got other bytes".into()
    })
}

/// A GET with a 300 KiB body (streamed through the body engine, so of unknown length) reaches
/// Node's HTTP/1.1 server whole: hyper's h1 client sends such a GET body only when marked
/// chunked, and had dropped it.
async fn get_with_body(w: &World, mode: Mode, flag: &str) -> Outcome {
    let cell = cell_id(&["node-h1.test", flag, "get-body"]);
    let data: Vec<u8> = (0..300 * 1024u32).map(|i| (i % 251) as u8).collect();
    let file = w.path(&format!("{cell}.bin"));
    std::fs::write(&file, &data).unwrap();
    let args = format!("{flag} -H 'x-cell: {cell}' -X GET -T {}", file.display());
    node_upload(w, mode, "node-h1.test", &args, &data).await
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Node's `https` server answers without a length: the client gets the chunked body whole.
async fn chunked(w: &World, mode: Mode, flag: &str) -> Outcome {
    let c = w.curl(mode, flag, "https://node-h1.test/chunked").await?;
    ensure(
        c.status == "200" && c.text() == "part-1;part-2;part-3",
        || format!("{c:?}"),
    )
}

/// `TE: trailers` from an h2 client reaches an h2 origin (gRPC needs it).
async fn te_trailers(w: &World, mode: Mode) -> Outcome {
    let cell = cell_id(&["te"]);
    let args = format!("--http2 -H 'TE: trailers' -H 'x-cell: {cell}'");
    let c = w.curl(mode, &args, "https://node-h2.test/echo").await?;
    ensure(c.status == "200", || format!("{c:?}"))?;
    let s = w.seen_eventually(Server::Node, &cell).await?;
    ensure(s.te == "trailers", || format!("origin got TE {:?}", s.te))
}

/// nginx echoes its request URI, which holds the query key as sealgate percent-encoded it:
/// the sandbox (curl) gets the token back, not the encoded value.
#[tokio::test]
async fn a_query_value_nginx_echoes_percent_encoded_comes_back_as_the_token() {
    if !super::have(&[("nginx", &["-v"])]) {
        return;
    }
    let w = World::start(Want::default()).await;
    for flag in ["--http1.1", "--http2"] {
        let args = format!("{flag} -G --data-raw \"sig=$QUERY_KEY\" --data-raw n=1");
        let c = w
            .curl(Mode::Explicit, &args, "https://nginx-h2.test/echo-uri")
            .await
            .expect("curl runs");
        assert_eq!(c.status, "200", "nginx got the encoded value: {}", c.text());
        let body = c.text();
        assert!(
            body.starts_with("/echo-uri?sig=osb_sealed_") && body.ends_with("&n=1"),
            "{body}"
        );
        assert!(
            !body.contains("wJalrXUtnFEMI") && !body.contains(QUERY_KEY),
            "{body}"
        );
    }
}

/// Against stock nginx (h2): the requests one curl sends over one tunnel — the first one
/// teaches sealgate that the origin speaks h2 — reach nginx on one connection (nginx's
/// `$connection`), not two (`upstream::LiveH2`; the second came from the h2-only client).
#[tokio::test]
async fn requests_after_nginx_answered_over_h2_stay_on_its_connection() {
    if !super::have(&[("nginx", &["-v"])]) {
        return;
    }
    let w = World::start(Want::default()).await;
    let cell = cell_id(&["one-connection"]);
    let url = "https://nginx-h2.test/echo-uri";
    let script = format!(
        "curl -sS --http1.1 -H 'x-cell: {cell}' -o /dev/null -o /dev/null -o /dev/null \
         -o /dev/null {url} {url} {url} {url}"
    );
    w.run(Mode::Explicit, &script)
        .await
        .ok()
        .expect("curl runs");
    let mut conns = Vec::new();
    super::eventually(|| {
        let hits = w.nginx.hits();
        conns = hits
            .iter()
            .filter(|h| h.get("cell") == cell)
            .map(|h| (h.get("proto").to_owned(), h.get("conn").to_owned()))
            .collect();
        match conns.len() {
            4 => Ok(()),
            n => Err(format!("nginx logged {n} of 4 requests")),
        }
    })
    .await
    .expect("nginx logged the requests");
    assert!(conns.iter().all(|c| c.0 == "HTTP/2.0"), "{conns:?}");
    assert!(conns.iter().all(|c| c.1 == conns[0].1), "{conns:?}");
}

/// Hypercorn's `/reflect` gives the request URL (the query key in it as sealgate
/// percent-encoded it) back the ways stock frameworks do, through Python's own encoders: a
/// login redirect's `next=` (encoded again: `%2F` as `%252F`, the runs between in clear), a
/// session cookie holding the URL in base64, a form encoder, text and XML escapers. No run of
/// the value's characters reaches the sandbox (outside pass: Django's `redirect_to_login`).
#[tokio::test]
async fn a_query_value_a_framework_reflects_in_other_forms_comes_back_as_the_token() {
    let want = Want {
        hypercorn: true,
        ..Want::default()
    };
    let w = World::start(want).await;
    let runs = ["wjalrxutnfemi", "k7mdeng", "bpxrficyinteropkey"];
    for flag in ["--http1.1", "--http2"] {
        let args = format!("{flag} -G --data-raw \"sig=$QUERY_KEY\"");
        let c = w
            .curl(Mode::Explicit, &args, "https://hypercorn.test/reflect")
            .await
            .expect("curl runs");
        assert_eq!(c.status, "302", "{c:?}");
        let got: serde_json::Value = serde_json::from_slice(&c.body).expect("JSON");
        // The cookie's base64 no longer decodes as a whole where a core was replaced (another
        // length): every 4-character group at each alignment is decoded on its own.
        let session = got["session"].as_str().unwrap_or_default();
        let decoded = lenient_base64(session).to_lowercase();
        let seen = format!("{}{}{decoded}", c.headers, c.text().to_lowercase());
        for run in runs {
            assert!(!seen.contains(run), "{run} in {seen}");
        }
        assert!(got["next"]
            .as_str()
            .unwrap_or_default()
            .contains("osb_sealed_"));
    }
}

/// What `s` (URL-safe base64) says, each 4-character group decoded on its own, at each of the
/// four alignments, joined by newlines (a group that does not decode is left out).
fn lenient_base64(s: &str) -> String {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = String::new();
    for start in 0..4.min(s.len()) {
        let bytes: Vec<u8> = s.as_bytes()[start..]
            .chunks_exact(4)
            .filter_map(|g| engine.decode(g).ok())
            .flatten()
            .collect();
        out.push_str(&String::from_utf8_lossy(&bytes));
        out.push('\n');
    }
    out
}

/// The suites sealgate chooses and offers (`tls_provider`), as the two OpenSSLs at its ends
/// see them: curl offers TLS_AES_256_GCM_SHA384 first and still gets AES-128-GCM from the
/// leaf; nginx follows its client's order and picks AES-128-GCM on the upstream connection.
#[tokio::test]
async fn curl_and_nginx_both_get_aes_128_gcm() {
    if !super::have(&[("nginx", &["-v"]), ("curl", &["--version"])]) {
        return;
    }
    let w = World::start(Want::default()).await;
    let r = w
        .sh("curl -sS -v --http1.1 -o /dev/null -H 'x-cell: aes128' \
             -w 'status=%{http_code}\n' https://nginx-h2.test/echo 2>&1")
        .await;
    r.ok().expect("curl runs");
    assert_eq!(r.var("status"), "200", "{}", r.stdout);
    let suite = r
        .stdout
        .lines()
        .find(|l| l.contains("SSL connection using"))
        .unwrap_or_else(|| panic!("curl -v names its suite: {}", r.stdout));
    assert!(suite.contains("TLS_AES_128_GCM_SHA256"), "{suite}");
    eventually(|| {
        let hits = w.nginx.hits_for("/echo");
        let hit = hits
            .iter()
            .rev()
            .find(|h| h.get("cell") == "aes128")
            .ok_or_else(|| "nginx logged no request of this test".to_owned())?;
        let cipher = hit.get("cipher");
        ensure(
            cipher == "TLS_AES_128_GCM_SHA256" || cipher.contains("-AES128-GCM-"),
            || format!("sealgate's upstream got {cipher} over {}", hit.get("tls")),
        )
    })
    .await
    .expect("nginx saw AES-128-GCM");
}

#[tokio::test]
async fn curl_sees_every_response_shape() {
    if !super::have(&[
        ("nginx", &["-v"]),
        ("caddy", &["version"]),
        ("node", &["--version"]),
    ]) {
        return;
    }
    let w = World::start(Want {
        caddy: true,
        node: true,
        hypercorn: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("explicit_shapes");
    shapes_matrix(&w, Mode::Explicit, &mut m).await;
    m.finish();
}

/// The shape cells, also run in transparent mode.
pub async fn shapes_matrix(w: &World, mode: Mode, m: &mut Matrix) {
    let v = versions();
    let nginx = |what: &str| format!("{} ({what})", v.nginx);
    for flag in ["--http1.1", "--http2"] {
        let client = format!("{} {flag}", v.curl);
        // clean-*: no secret may be unsealed there (answers pass unscrubbed); nginx-h2.test:
        // scrubbed (the harden-resp fixes apply to these).
        for (host, label) in [
            ("clean-nginx.test", nginx("h2, not scrubbed")),
            ("clean-nginx-h1.test", nginx("h1 only, not scrubbed")),
            ("nginx-h2.test", nginx("h2, scrubbed")),
        ] {
            for name in ["Content-Length", "HEAD", "204", "304", "gzip"] {
                let outcome = shape(w, mode, host, flag, name).await;
                m.cell(&label, &client, mode.name(), name, outcome);
            }
            let outcome = expect_upload(w, mode, host, flag).await;
            m.cell(
                &label,
                &client,
                mode.name(),
                "PUT 300 KiB with Expect: 100-continue",
                outcome,
            );
        }
        if flag == "--http2" {
            for (host, label) in [
                ("clean-nginx.test", nginx("h2, not scrubbed")),
                ("nginx-h2.test", nginx("h2, scrubbed")),
                ("clean-node.test", NODE_H2.label() + ", not scrubbed"),
                ("hypercorn.test", HYPERCORN.label()),
            ] {
                let outcome = shape(w, mode, host, flag, "trailers").await;
                m.cell(&label, &client, mode.name(), "trailers over h2", outcome);
            }
            let outcome = te_trailers(w, mode).await;
            m.cell(
                &NODE_H2.label(),
                &client,
                mode.name(),
                "TE: trailers forwarded",
                outcome,
            );
        }
        if mode == Mode::Explicit {
            let outcome = chunked(w, mode, flag).await;
            m.cell(
                &NODE_H1.label(),
                &client,
                mode.name(),
                "chunked body",
                outcome,
            );
            let outcome = expect_upload(w, mode, "node-h1.test", flag).await;
            m.cell(
                &NODE_H1.label(),
                &client,
                mode.name(),
                "POST 300 KiB with Expect: 100-continue",
                outcome,
            );
            let outcome = get_with_body(w, mode, flag).await;
            m.cell(
                &NODE_H1.label(),
                &client,
                mode.name(),
                "GET with a 300 KiB body",
                outcome,
            );
            for (name, host) in [
                ("HEAD", "clean-caddy.test"),
                ("HEAD", "caddy.test"),
                ("204", "caddy.test"),
                ("gzip", "clean-caddy.test"),
                ("gzip", "caddy.test"),
            ] {
                let outcome = caddy_shape(w, mode, host, flag, name).await;
                m.cell(
                    &CADDY.label(),
                    &client,
                    mode.name(),
                    &format!("{name} ({host})"),
                    outcome,
                );
            }
        }
    }
}

/// The `Accept-Encoding` Caddy saw on the request carrying `x-cell: cell` (its log is written
/// a moment after the answer).
async fn caddy_accept_encoding(w: &World, cell: &str) -> Result<String, String> {
    let caddy = w.caddy.as_ref().ok_or("no Caddy")?;
    let mut asked = String::new();
    super::eventually(|| {
        let hits = caddy.hits();
        let hit = hits
            .iter()
            .rev()
            .find(|h| super::header_of(&h["request"]["headers"], "x-cell") == cell)
            .ok_or_else(|| format!("Caddy logged no request for {cell}"))?;
        asked = super::header_of(&hit["request"]["headers"], "accept-encoding");
        Ok(())
    })
    .await?;
    Ok(asked)
}

async fn caddy_shape(w: &World, mode: Mode, host: &str, flag: &str, name: &str) -> Outcome {
    let file = w.dir.path().join("caddy/www/static/text.txt");
    let want = std::fs::read(file).unwrap();
    let url = format!("https://{host}/static/text.txt");
    match name {
        "HEAD" => {
            let c = w.curl(mode, &format!("{flag} -I"), &url).await?;
            ensure(c.status == "200" && c.size == 0, || format!("{c:?}"))?;
            ensure(
                c.headers
                    .contains(&format!("content-length: {}", want.len())),
                || format!("HEAD lost its Content-Length: {}", c.headers),
            )
        }
        "204" => {
            let c = w
                .curl(mode, flag, &format!("https://{host}/nocontent"))
                .await?;
            ensure(c.status == "204" && c.body.is_empty(), || format!("{c:?}"))
        }
        _ => {
            let cell = format!("gzip-{host}-{}-{flag}", mode.name());
            let args = format!("{flag} --compressed -H 'x-cell: {cell}'");
            let c = w.curl(mode, &args, &url).await?;
            // Caddy prefers zstd, and curl offers it: on a clean host the body comes as sent.
            let clean = host.starts_with("clean-");
            ensure(
                !clean || c.headers.contains("content-encoding: zstd"),
                || c.headers.clone(),
            )?;
            ensure(c.body == want, || format!("decoded {} bytes", c.body.len()))?;
            // On a scrubbed host sealgate asks for no coding at all (a decoded answer's
            // boundaries told how well it compressed: a prefix oracle on an echoed value).
            let asked = caddy_accept_encoding(w, &cell).await?;
            ensure(clean || asked == "identity", || {
                format!("{host} was asked for {asked:?}")
            })
        }
    }
}

// ---- Python clients -------------------------------------------------------------------------

const PY_ECHO: &str = r#"
import os, sys, httpx, requests
url, cell, client = sys.argv[1], sys.argv[2], sys.argv[3]
h = {"x-api-key": os.environ["KEY"], "x-cell": cell}
if client == "requests":
    r = requests.get(url, headers=h, timeout=20)
    print("version=1.1")
else:
    with httpx.Client(http2=(client == "httpx-h2"), timeout=20) as c:
        r = c.get(url, headers=h)
        print("version=" + r.http_version.replace("HTTP/", ""))
print("status=%d" % r.status_code)
print("body=" + r.text.replace("\n", " "))
"#;

pub async fn py_echo(w: &World, mode: Mode, o: Origin, client: &str) -> Outcome {
    let cell = cell_id(&[o.host, client]);
    let script = format!(
        "{} -c {} https://{}/echo {cell} {client}",
        python_cmd(mode),
        sh_quote(PY_ECHO),
        o.host
    );
    let r = w.run(mode, &script).await;
    r.ok()?;
    ensure(r.var("status") == "200", || {
        format!("status {}: {}", r.var("status"), r.stdout)
    })?;
    let want = if client == "httpx-h2" { "2" } else { "1.1" };
    ensure(r.var("version") == want, || {
        format!("client spoke HTTP/{}", r.var("version"))
    })?;
    echo_checks(w, o, &cell, &r.var("body")).await
}

const PY_SSE: &str = r#"
import os, sys, time, httpx
url = sys.argv[1]
t0 = time.monotonic()
times, events = [], []
with httpx.Client(timeout=20) as c:
    with c.stream("GET", url, headers={"x-api-key": os.environ["KEY"]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic() - t0)
                events.append(line[6:])
print("status=%d" % r.status_code)
print("events=" + ",".join(events))
print("first=%.3f" % times[0])
print("last=%.3f" % times[-1])
"#;

/// SSE keeps streaming: the first event arrives long before the last (the origin spaces five
/// events 300 ms apart); on a scrubbed host the echoed key comes back sealed.
async fn py_sse(w: &World, mode: Mode, host: &str) -> Outcome {
    let script_path = w.path("py_sse.py");
    std::fs::write(&script_path, PY_SSE).unwrap();
    let r = w
        .run(
            mode,
            &format!("\"$PY\" {} https://{host}/sse", script_path.display()),
        )
        .await;
    r.ok()?;
    ensure(r.var("status") == "200", || r.stdout.clone())?;
    let events = r.var("events");
    ensure(events.split(',').count() == 5, || {
        format!("events: {events}")
    })?;
    ensure(!events.contains(KEY), || {
        "the client saw the real key".into()
    })?;
    if host == "node-h1.test" {
        ensure(events.contains("key=osb_sealed_"), || {
            format!("echoed key not sealed: {events}")
        })?;
    }
    let first: f64 = r.var("first").parse().unwrap_or(f64::MAX);
    let last: f64 = r.var("last").parse().unwrap_or(0.0);
    ensure(last - first > 0.8, || {
        format!("events arrived together: first {first}s, last {last}s")
    })
}

const PY_WS: &str = r#"
import os, sys
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=20, additional_headers={"x-api-key": os.environ["KEY"]}) as ws:
    print("greeting=" + ws.recv(timeout=20))
    ws.send("hello over sealgate")
    print("echo=" + ws.recv(timeout=20))
    ws.send(b"\x00\x01binary")
    print("binary=" + ws.recv(timeout=20).hex())
"#;

/// A WebSocket echo through the tunnel (`websockets` uses the proxy from the environment).
async fn py_websocket(w: &World, mode: Mode) -> Outcome {
    let script_path = w.path("py_ws.py");
    std::fs::write(&script_path, PY_WS).unwrap();
    let r = w
        .run(
            mode,
            &format!(
                "\"$PY\" {} wss://node-h1.test/ws?greet",
                script_path.display()
            ),
        )
        .await;
    r.ok()?;
    // Node hands the unsealed key back in its first frame: the sandbox reads its token.
    let greeting = format!("key={}", w.sb.token("KEY"));
    ensure(r.var("greeting") == greeting, || r.stdout.clone())?;
    ensure(r.var("echo") == "hello over sealgate", || r.stdout.clone())?;
    ensure(r.var("binary") == "000162696e617279", || r.stdout.clone())
}

#[tokio::test]
async fn python_clients_reach_every_server() {
    if !super::have(&[
        ("nginx", &["-v"]),
        ("caddy", &["version"]),
        ("node", &["--version"]),
    ]) {
        return;
    }
    if !super::have(&[(
        &super::python(),
        &["-c", "import requests, httpx, h2, websockets, hypercorn"],
    )]) {
        return;
    }
    let w = World::start(Want {
        caddy: true,
        node: true,
        hypercorn: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("explicit_python");
    python_matrix(&w, Mode::Explicit, &mut m).await;
    m.finish();
}

/// The Python cells, also run in transparent mode.
pub async fn python_matrix(w: &World, mode: Mode, m: &mut Matrix) {
    let v = versions();
    for o in [NGINX_H2, NGINX_H1, CADDY, NODE_H2, HYPERCORN] {
        for client in ["requests", "httpx", "httpx-h2"] {
            let outcome = py_echo(w, mode, o, client).await;
            let label = match client {
                "requests" => v.py("requests"),
                "httpx" => v.py("httpx"),
                _ => format!("{} http2=True", v.py("httpx")),
            };
            m.cell(
                &o.label(),
                &label,
                mode.name(),
                "GET /echo: real key at origin, echo scrubbed",
                outcome,
            );
        }
    }
    for (o, host) in [(NODE_H1, "node-h1.test"), (HYPERCORN, "hypercorn.test")] {
        let outcome = py_sse(w, mode, host).await;
        m.cell(
            &o.label(),
            &v.py("httpx"),
            mode.name(),
            "SSE keeps streaming (5 events over 1.2 s)",
            outcome,
        );
    }
    let outcome = py_websocket(w, mode).await;
    m.cell(
        &NODE_H1.label(),
        &v.py("websockets"),
        mode.name(),
        "WebSocket echo (text + binary); the key handed back in a frame arrives as its token",
        outcome,
    );
}

// ---- SDKs -----------------------------------------------------------------------------------

const PY_ANTHROPIC: &str = r#"
import os, sys, anthropic
cell, how = sys.argv[1], sys.argv[2]
key = os.environ.pop("ANTHROPIC_API_KEY")
headers = {"x-cell": cell}
if how == "bearer":
    kw = {"auth_token": key}
elif how == "x-api-key":
    headers["x-api-key"] = key
    kw = {}
else:
    kw = {"api_key": key}
client = anthropic.Anthropic(max_retries=0, timeout=20, default_headers=headers, **kw)
raw = client.messages.with_raw_response.create(model="claude-test", max_tokens=8,
    messages=[{"role": "user", "content": "hi"}])
msg = raw.parse()
print("status=%d" % raw.status_code)
print("text=" + msg.content[0].text)
"#;

const PY_OPENAI: &str = r#"
import os, sys, openai
cell, key = sys.argv[1], os.environ[sys.argv[2]]
client = openai.OpenAI(api_key=key, max_retries=0, timeout=20, default_headers={"x-cell": cell})
try:
    raw = client.chat.completions.with_raw_response.create(model="gpt-test",
        messages=[{"role": "user", "content": "hi"}])
    print("status=%d" % raw.status_code)
    print("text=" + raw.parse().choices[0].message.content)
except openai.APIStatusError as e:
    print("status=%d" % e.status_code)
    print("code=" + e.response.headers.get("x-sealgate-error", ""))
"#;

pub async fn anthropic_cell(w: &World, mode: Mode, how: &str) -> Outcome {
    let cell = cell_id(&["anthropic", how]);
    let script = format!(
        "{} -c {} {cell} {how}",
        python_cmd(mode),
        sh_quote(PY_ANTHROPIC)
    );
    let r = w.run(mode, &script).await;
    r.ok()?;
    ensure(r.var("status") == "200" && r.var("text") == "hi", || {
        r.stdout.clone()
    })?;
    let s = w.seen_eventually(Server::Nginx, &cell).await?;
    ensure(s.authority == "api.anthropic.com", || {
        format!("authority {:?}", s.authority)
    })?;
    ensure(s.version == "2", || format!("upstream HTTP/{}", s.version))?;
    let bearer = format!("Bearer {ANTHROPIC_KEY}");
    match how {
        "bearer" => ensure(s.auth == bearer, || {
            "origin did not get the real Bearer key".into()
        }),
        "x-api-key" => ensure(s.key == ANTHROPIC_KEY, || {
            "origin did not get the real x-api-key".into()
        }),
        // api_key=: this SDK version chose the header; the real key must be in it.
        _ => ensure(s.key == ANTHROPIC_KEY || s.auth == bearer, || {
            "origin did not get the real key".into()
        }),
    }
}

async fn openai_cell(w: &World, mode: Mode, secret: &str) -> Outcome {
    let cell = cell_id(&["openai", secret]);
    let path = w.path("py_openai.py");
    std::fs::write(&path, PY_OPENAI).unwrap();
    let r = w
        .run(mode, &format!("\"$PY\" {} {cell} {secret}", path.display()))
        .await;
    r.ok()?;
    if secret == "ANTHROPIC_API_KEY" {
        // Another secret's token to api.openai.com: refused before anything is sent.
        ensure(
            r.var("status") == "403" && r.var("code") == "secret_host_denied",
            || r.stdout.clone(),
        )?;
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        return ensure(w.seen(Server::Caddy, &cell).is_none(), || {
            "the origin saw a refused request".into()
        });
    }
    ensure(r.var("status") == "200" && r.var("text") == "hi", || {
        r.stdout.clone()
    })?;
    let s = w.seen_eventually(Server::Caddy, &cell).await?;
    ensure(s.authority == "api.openai.com", || {
        format!("authority {:?}", s.authority)
    })?;
    ensure(s.auth == format!("Bearer {OPENAI_KEY}"), || {
        "origin did not get the real key".into()
    })
}

#[tokio::test]
async fn anthropic_and_openai_sdks_reach_nginx_and_caddy() {
    if !super::have(&[("nginx", &["-v"]), ("caddy", &["version"])]) {
        return;
    }
    if !super::have(&[(&super::python(), &["-c", "import anthropic, openai"])]) {
        return;
    }
    let w = World::start(Want {
        caddy: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("explicit_sdks");
    sdk_matrix(&w, Mode::Explicit, &mut m).await;
    m.finish();
}

/// The SDK cells.
pub async fn sdk_matrix(w: &World, mode: Mode, m: &mut Matrix) {
    let v = versions();
    let nginx = format!("{} (h2) as api.anthropic.com", v.nginx);
    for (how, checked) in [
        (
            "api-key",
            "messages.create(api_key=…): the SDK's own header",
        ),
        ("x-api-key", "messages.create, key as x-api-key"),
        (
            "bearer",
            "messages.create, key as Authorization: Bearer (auth_token)",
        ),
    ] {
        let outcome = anthropic_cell(w, mode, how).await;
        m.cell(&nginx, &v.py("anthropic"), mode.name(), checked, outcome);
    }
    let caddy = format!("{} as api.openai.com", CADDY.label());
    let outcome = openai_cell(w, mode, "OPENAI_API_KEY").await;
    m.cell(
        &caddy,
        &v.py("openai"),
        mode.name(),
        "chat.completions.create, Bearer key",
        outcome,
    );
    let outcome = openai_cell(w, mode, "ANTHROPIC_API_KEY").await;
    m.cell(
        &caddy,
        &v.py("openai"),
        mode.name(),
        "another secret's token: 403 secret_host_denied, origin sees nothing",
        outcome,
    );
}

const PY_KEEPALIVE: &str = r#"
import os, sys, time, requests
url, cell = sys.argv[1], sys.argv[2]
h = {"x-api-key": os.environ["KEY"], "x-cell": cell}
with requests.Session() as s:
    statuses = [s.get(url, timeout=20).status_code]
    time.sleep(2.6)
    r = s.get(url, headers=h, timeout=20)
    statuses.append(r.status_code)
    time.sleep(2.6)
    statuses.append(s.post(url, headers=h, data=b"x" * 20000, timeout=20).status_code)
    managers = s.get_adapter(url).proxy_manager.values()
    conns = sum(m.pools[k].num_connections for m in managers for k in m.pools.keys())
print("statuses=" + ",".join(map(str, statuses)))
print("conns=%d" % conns)
print("body=" + r.text.replace("\n", " "))
"#;

/// Parking, seen from a client sealgate did not write: Python `requests` keeps one tunnel
/// through the explicit proxy to nginx and sends a GET, a GET with the sealed key and a 20 KB
/// POST 2.6 s apart — each after the connection has parked (quiet for 2 s) — over that one
/// connection.
#[tokio::test]
async fn python_requests_keep_alive_across_parking() {
    if !super::have(&[("nginx", &["-v"])])
        || !super::have(&[(&super::python(), &["-c", "import requests"])])
    {
        return;
    }
    let w = World::start(Want::default()).await;
    let cell = cell_id(&[NGINX_H1.host, "requests-keepalive"]);
    let script = format!(
        "{} -c {} https://{}/echo {cell}",
        python_cmd(Mode::Explicit),
        sh_quote(PY_KEEPALIVE),
        NGINX_H1.host
    );
    let r = w.run(Mode::Explicit, &script).await;
    r.ok().unwrap();
    assert_eq!(r.var("statuses"), "200,200,200", "{}", r.stdout);
    assert_eq!(r.var("conns"), "1", "requests opened more than one tunnel");
    echo_checks(&w, NGINX_H1, &cell, &r.var("body"))
        .await
        .unwrap();
}
