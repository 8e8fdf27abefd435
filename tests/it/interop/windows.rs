//! h2 flow control against a stock nginx: what an origin may send ahead of a sandbox that does
//! not read is sealgate's upstream window (`[upstream] h2_stream_window_bytes`), and what a
//! sandbox is offered for its uploads is `[proxy]`'s (ARCHITECTURE.md, "h2 windows").

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::{ensure, eventually, Want, World};
use crate::support::h2raw::{
    frame, hpack_get, opening_windows, read_frame, settings, DATA, HEADERS, INITIAL_WINDOW_SIZE,
    PREFACE,
};
use crate::support::proxy_client as pc;

const BIG: &str = "/static/256m.bin?window=zero";

/// A sandbox that opens no window on its stream (`SETTINGS_INITIAL_WINDOW_SIZE` 0) asks nginx
/// over h2 for 256 MiB and holds the stream 2 s. sealgate offers it the `[proxy]` windows,
/// sends it the head and no byte of the body; nginx, once sealgate resets the stream, logged
/// at most sealgate's upstream stream window (1 MiB) sent (hyper's default window let it send
/// 2 MiB, which the daemon held, about twice that in memory, for as long as the sandbox
/// liked), and a smaller configured window is what it meets then.
#[tokio::test]
async fn nginx_sends_a_sandbox_that_reads_nothing_only_sealgates_window() {
    if !super::have(&[("nginx", &["-v"])]) {
        return;
    }
    for (toml, window) in [
        ("", 1u64 << 20),
        ("h2_stream_window_bytes = 65536\n", 65_536),
    ] {
        let w = World::start(Want {
            upstream_toml: toml,
            ..Want::default()
        })
        .await;
        let sent = sent_to_a_zero_window(&w).await;
        assert!(
            sent > 0 && sent <= window + (64 << 10),
            "[upstream] {toml:?}: nginx sent {sent} bytes ahead of a sandbox reading nothing"
        );
    }
}

/// Runs the zero-window stream through `w` and returns the body bytes nginx logged as sent.
async fn sent_to_a_zero_window(w: &World) -> u64 {
    let tcp = pc::connect(w.h.proxy, Some(&w.sb.proxy_auth()), "nginx-h2.test:443")
        .await
        .unwrap();
    let mut tls = pc::tls(tcp, &w.sb.ca_pem, "nginx-h2.test", &[b"h2"])
        .await
        .unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(settings(&[(INITIAL_WINDOW_SIZE, 0)]));
    out.extend(frame(HEADERS, 0x5, 1, &hpack_get("nginx-h2.test", BIG)));
    tls.write_all(&out).await.unwrap();
    let offered = tokio::time::timeout(Duration::from_secs(5), opening_windows(&mut tls, 8))
        .await
        .expect("sealgate's SETTINGS and window update");
    assert_eq!(
        offered,
        (Some(256 << 10), 1 << 20),
        "the [proxy] windows offered to the sandbox"
    );
    let (mut heads, mut data) = (0, 0);
    let until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(f)) = tokio::time::timeout_at(until.into(), read_frame(&mut tls)).await {
        heads += usize::from(f.ty == HEADERS && f.stream == 1);
        data += if f.ty == DATA { f.payload.len() } else { 0 };
    }
    assert_eq!(
        (heads, data),
        (1, 0),
        "the head, and no body byte past a zero window"
    );
    drop(tls);
    let mut sent = 0;
    eventually(|| {
        let hits = w.nginx.hits_for(BIG);
        ensure(!hits.is_empty(), || "nginx logged no request".into())?;
        sent = hits[0].get("sent").parse().unwrap_or(0);
        Ok(())
    })
    .await
    .expect("nginx logs the stream once sealgate resets it");
    sent
}
