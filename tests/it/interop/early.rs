//! Uploads a stock nginx answers before it has them: `client_max_body_size` (413 from the head
//! when the length is declared; mid-body when it is not, as for a body past 1 MiB that
//! sealgate streams without its length because it is scanned for tokens) and `return 200`,
//! which answers and discards the body. Through sealgate's handling of early answers (`forward::orphan`, the
//! lingering of `proxy::linger`) the sandbox gets nginx's answer, as a direct client does, and
//! its next request is served (nothing of the cut uploads holds its connection budget).

use std::time::{Duration, Instant};

use super::matrix::{versions, Matrix};
use super::{ensure, eventually, Mode, Want, World};

#[tokio::test]
async fn uploads_nginx_answers_early_get_its_answer() {
    if !super::have(&[("nginx", &["-v"]), ("curl", &["--version"])]) {
        return;
    }
    let w = World::start(Want::default()).await;
    let big = w.path("4m.bin");
    std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
    let small = w.path("512k.bin");
    std::fs::write(&small, vec![b'y'; 512 << 10]).unwrap();
    let v = versions();
    let mut m = Matrix::new("early_answers");
    // (what, curl's arguments, path, nginx's answer direct)
    let cases = [
        (
            "PUT 4 MiB over client_max_body_size",
            format!("-T {}", big.display()),
            "/dav-capped/big",
            "413",
        ),
        (
            "PUT 512 KiB over client_max_body_size",
            format!("-T {}", small.display()),
            "/dav-capped/small",
            "413",
        ),
        (
            "POST 512 KiB to return 200",
            format!("--data-binary @{}", small.display()),
            "/post",
            "200",
        ),
    ];
    for (host, flag, proto) in [
        ("nginx-h1.test", "--http1.1", "h1"),
        ("nginx-h2.test", "--http2", "h2"),
    ] {
        let server = format!("{} ({proto})", v.nginx);
        for (what, args, path, status) in &cases {
            let started = Instant::now();
            let got = w
                .curl(
                    Mode::Explicit,
                    &format!("{flag} --max-time 30 {args}"),
                    &format!("https://{host}{path}"),
                )
                .await;
            let outcome = got.and_then(|c| {
                ensure(c.status == *status, || {
                    format!("status {} (nginx answers {status}): {}", c.status, c.text())
                })?;
                ensure(started.elapsed() < Duration::from_secs(20), || {
                    format!("took {:?}", started.elapsed())
                })
            });
            m.cell(
                &server,
                &format!("curl {flag}, {what}"),
                "explicit",
                &format!("nginx's early {status} reaches the sandbox"),
                outcome,
            );
        }
        let after = w
            .curl(Mode::Explicit, flag, &format!("https://{host}/echo"))
            .await
            .and_then(|c| ensure(c.status == "200", || format!("status {}", c.status)));
        m.cell(
            &server,
            &format!("curl {flag}, GET after those"),
            "explicit",
            "served",
            after,
        );
    }
    // With the default caps a leak would not show in the GET: the sandbox's request slots
    // must all come back (review h50a).
    let sandbox = w.h.live_sandbox(&w.sb.id);
    let freed = eventually(|| {
        let held = sandbox.requests();
        ensure(held == 0, || format!("{held} request slots still held"))
    })
    .await;
    m.cell(
        &v.nginx,
        "curl, after every upload above",
        "explicit",
        "the cut uploads hold none of the sandbox's request slots",
        freed,
    );
    m.finish();
}
