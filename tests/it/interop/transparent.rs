//! Transparent mode (`sealgate sandbox exec`: a network namespace, no proxy variables):
//! curl (h1, h2), git, Node `fetch` and Python clients against nginx, Caddy and Node.
//! Needs root (namespaces, iptables): with `CI` set it fails without them, else it skips.
//!
//! exec runs each script as `[sandbox] run_as` in bwrap with private `/home/user` and `/tmp`
//! and only the sandbox's environment: scripts carry their programs inline (`node -e`,
//! `python -c`, the interpreter named by path) and print what they got as `name=value` lines.

use super::explicit::{
    anthropic_cell, cell_id, echo_checks, py_echo, Origin, CADDY, NGINX_H1, NGINX_H2, NODE_H2,
};
use super::matrix::{versions, Matrix, Outcome};
use super::regress::{git_checks, git_script};
use super::{ensure, sh_quote, Mode, Want, World};

/// Every curl echo of the matrix in one `exec` (a namespace costs about a second); each body
/// lands in the sandbox's work dir and is printed, newlines folded, as `CELL.body=`.
async fn curl_cells(w: &World, m: &mut Matrix) {
    let mut script = String::new();
    let mut cells = Vec::new();
    for o in [NGINX_H2, NGINX_H1, CADDY, NODE_H2] {
        for flag in ["--http1.1", "--http2"] {
            let cell = cell_id(&[o.host, flag, "transparent"]);
            script.push_str(&format!(
                "printf '{cell}.status=%s\\n' \"$(curl -sS {flag} -H \"x-api-key: $KEY\" -H 'x-cell: {cell}' \
                 -o {cell}.body -w '%{{http_code}}/%{{http_version}}' https://{}/echo)\"\n\
                 printf '{cell}.body=%s\\n' \"$(tr '\\n' ' ' < {cell}.body)\"\n",
                o.host
            ));
            cells.push((o, flag, cell));
        }
    }
    let r = w.exec(&script).await;
    for (o, flag, cell) in cells {
        let outcome = curl_cell(w, &r, o, flag, &cell).await;
        let client = format!("{} {flag}", versions().curl);
        let checked = "GET /echo: real key at origin, one authority, echo scrubbed";
        m.cell(&o.label(), &client, "transparent", checked, outcome);
    }
}

async fn curl_cell(w: &World, r: &super::Ran, o: Origin, flag: &str, cell: &str) -> Outcome {
    let want = if flag == "--http2" {
        "200/2"
    } else {
        "200/1.1"
    };
    let got = r.var(&format!("{cell}.status"));
    ensure(got == want, || {
        let body = r.var(&format!("{cell}.body"));
        format!(
            "status/version {got:?}, want {want}; body {body:?}: {}",
            r.stderr.trim()
        )
    })?;
    echo_checks(w, o, cell, &r.var(&format!("{cell}.body"))).await
}

const NODE_FETCH: &str = r#"
const targets = JSON.parse(process.argv[1]);
(async () => {
  for (const [url, cell] of targets) {
    try {
      const r = await fetch(url, { headers: { 'x-api-key': process.env.KEY, 'x-cell': cell } });
      const body = (await r.text()).replace(/\n/g, ' ');
      console.log(`${cell}.status=${r.status}`);
      console.log(`${cell}.body=${body}`);
    } catch (e) {
      console.log(`${cell}.status=error ${e.cause || e}`);
    }
  }
})();
"#;

/// Node's `fetch` (undici, no proxy support in Node 20: transparent mode needs none); the
/// script is inline (`node -e`: its first argument is `process.argv[1]`).
async fn node_fetch_cells(w: &World, m: &mut Matrix) {
    let origins = [NGINX_H2, CADDY, NODE_H2];
    let targets: Vec<(String, String, Origin)> = origins
        .iter()
        .map(|o| {
            (
                format!("https://{}/echo", o.host),
                cell_id(&[o.host, "fetch"]),
                *o,
            )
        })
        .collect();
    let arg: Vec<(&str, &str)> = targets
        .iter()
        .map(|(u, c, _)| (u.as_str(), c.as_str()))
        .collect();
    let arg = serde_json::to_string(&arg).unwrap();
    let r = w
        .exec(&format!(
            "node -e {} {}",
            sh_quote(NODE_FETCH),
            sh_quote(&arg)
        ))
        .await;
    for (_, cell, o) in &targets {
        let outcome = async {
            let status = r.var(&format!("{cell}.status"));
            let body = r.var(&format!("{cell}.body"));
            ensure(status == "200", || {
                format!("status {status}; body {body:?}: {}", r.stderr.trim())
            })?;
            echo_checks(w, *o, cell, &body).await
        }
        .await;
        let client = format!("{} fetch", versions().node);
        m.cell(
            &o.label(),
            &client,
            "transparent",
            "GET /echo: real key at origin, echo scrubbed",
            outcome,
        );
    }
}

/// Python clients and the anthropic SDK in the namespace (one `exec` each).
async fn python_cells(w: &World, m: &mut Matrix) {
    let v = versions();
    for (client, label) in [
        ("requests", v.py("requests")),
        ("httpx-h2", format!("{} http2=True", v.py("httpx"))),
    ] {
        let outcome = py_echo(w, Mode::Transparent, NGINX_H2, client).await;
        let checked = "GET /echo: real key at origin, echo scrubbed";
        m.cell(&NGINX_H2.label(), &label, "transparent", checked, outcome);
    }
    let outcome = anthropic_cell(w, Mode::Transparent, "x-api-key").await;
    m.cell(
        &format!("{} (h2) as api.anthropic.com", v.nginx),
        &v.py("anthropic"),
        "transparent",
        "messages.create, key as x-api-key",
        outcome,
    );
}

#[tokio::test]
async fn transparent_clients_reach_nginx_caddy_and_node() {
    if !crate::transparent::netns_ready() {
        return;
    }
    if !super::have(&[
        ("nginx", &["-v"]),
        ("caddy", &["version"]),
        ("node", &["--version"]),
        ("git", &["--version"]),
    ]) {
        return;
    }
    let w = World::start(Want {
        caddy: true,
        node: true,
        transparent: true,
        ..Want::default()
    })
    .await;
    let mut m = Matrix::new("transparent");
    curl_cells(&w, &mut m).await;
    let r = w
        .exec(&git_script("git.test", "HTTP/2", "clone-transparent"))
        .await;
    let outcome = git_checks(&w, &r, "git.test", "clone-transparent").await;
    m.cell(
        &format!("{} (h1 only) + git-http-backend", versions().nginx),
        &format!("{} http.version=HTTP/2", versions().git),
        "transparent",
        "clone + push, sealed password unsealed into Basic auth, one `Host: git.test`",
        outcome,
    );
    node_fetch_cells(&w, &mut m).await;
    python_cells(&w, &mut m).await;
    m.finish();
}
