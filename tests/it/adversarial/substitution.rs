//! Substitution: only this sandbox's own tokens are unsealed, only in the locations their
//! secret opted into, only for allowed hosts, in one pass — and wherever a token is split.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::{assert_upstream_untouched, connect_status, exchange, get_api, tls_tunnel, API};
use crate::proxy_explicit::{setup, Spec};
use crate::support::proxy_client::{self as pc, basic, SandboxCreds};

const ALL: &[&str] = &["header", "query", "body"];

#[tokio::test]
async fn another_sandboxs_token_is_ordinary_bytes() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-mine-0401", None, Some(ALL))];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let t = e.h.store("t", Some(&["api.example.test"])).await;
    e.h.secret(&t, "KEY", "sk-adv-theirs-0402", None, Some(ALL))
        .await;
    let theirs = SandboxCreds::from_answer(&e.h.sandbox("t").await).token("KEY");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let uri = format!("/echo?k={theirs}");
    let req = pc::post(
        &uri,
        "api.example.test",
        &[("x-api-key", &theirs)],
        theirs.clone(),
    );
    let a = pc::send1(&mut c, req).await;
    assert_eq!(a.status, StatusCode::OK);
    let r = &e.echo.requests()[0];
    assert_eq!(r.header("x-api-key").unwrap(), theirs);
    assert_eq!(r.body, theirs.as_bytes());
    assert!(r.uri.contains(&theirs));
    assert!(!e.echo.received_bytes_contain(b"sk-adv-theirs-0402"));
    assert!(!e.h.audit_log().contains("\"unsealed\":[\"KEY\"]"));
}

#[tokio::test]
async fn forged_tokens_are_ordinary_bytes() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-forged-0403", None, Some(ALL))];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let real = e.sb.token("KEY");
    let hex = &real["osb_sealed_".len()..];
    let mut flipped = hex.as_bytes().to_vec();
    flipped[31] = if flipped[31] == b'0' { b'1' } else { b'0' };
    let forged = [
        format!("osb_sealed_{}", "0123456789abcdef".repeat(2)),
        format!("osb_sealed_{}", hex.to_uppercase()),
        format!("osb_sealed_{}", &hex[..31]),
        format!("osb_sealed_{}", String::from_utf8(flipped).unwrap()),
        format!("OSB_SEALED_{hex}"),
        format!("osb-sealed-{hex}"),
        format!("osb_sealed_%{}", &hex[1..]),
    ];
    for f in &forged {
        let a = get_api(&e, "/echo", &[("x-api-key", f)]).await;
        assert_eq!(a.status, StatusCode::OK, "{f}");
    }
    let reqs = e.echo.requests();
    for (r, f) in reqs.iter().zip(&forged) {
        assert_eq!(r.header("x-api-key").as_deref(), Some(f.as_str()));
    }
    assert!(!e.echo.received_bytes_contain(b"sk-adv-forged-0403"));
}

/// Writes `parts` as separate TLS records (flush + pause between them).
async fn write_records(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    parts: &[&[u8]],
) {
    for p in parts {
        tls.write_all(p).await.unwrap();
        tls.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn token_split_across_tls_records_is_unsealed() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-records-0404", None, None)];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let tok = e.sb.token("KEY");
    // Small (buffered, exact Content-Length) and large (streamed) bodies; cut inside the
    // prefix, at its end and inside the hex part.
    for (size, cut) in [
        (128usize, 3usize),
        (128, 11),
        (128, 30),
        (100_000, 5),
        (100_000, 11),
        (100_000, 42),
    ] {
        e.echo.clear();
        let mut body = vec![b'.'; size];
        let at = size / 2;
        body[at..at + tok.len()].copy_from_slice(tok.as_bytes());
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        );
        let mut tls = tls_tunnel(&e, API, "api.example.test").await;
        let split = at + cut;
        write_records(&mut tls, &[head.as_bytes(), &body[..split], &body[split..]]).await;
        let text = exchange(&mut tls, b"", Duration::from_secs(10)).await;
        assert_eq!(super::status_of(&text), 200, "size {size} cut {cut}");
        let r = &e.echo.requests()[0];
        let mut expected = body[..at].to_vec();
        expected.extend_from_slice(b"sk-adv-records-0404");
        expected.extend_from_slice(&body[at + tok.len()..]);
        assert!(r.body == expected, "size {size} cut {cut}");
    }
}

#[tokio::test]
async fn token_split_across_h2_data_frames_and_h1_chunks_is_unsealed() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-frames-0405", None, None)];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let tok = e.sb.token("KEY");
    let text = format!("a={tok}&b={tok}");
    for cuts in [vec![3usize], vec![2, 13, 14], vec![20, 46, 47, 48]] {
        let mut chunks = Vec::new();
        let mut last = 0;
        for c in cuts.iter().copied().chain([text.len()]) {
            chunks.push(Bytes::copy_from_slice(&text.as_bytes()[last..c]));
            last = c;
        }
        for h2 in [false, true] {
            e.echo.clear();
            let uri = "https://api.example.test/echo";
            let a = if h2 {
                let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
                pc::send2(&mut c, pc::post_chunked(uri, "", &[], chunks.clone())).await
            } else {
                let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
                let req = pc::post_chunked(uri, "api.example.test", &[], chunks.clone());
                pc::send1(&mut c, req).await
            };
            assert_eq!(a.status, StatusCode::OK, "h2={h2} cuts={cuts:?}");
            assert_eq!(
                String::from_utf8_lossy(&e.echo.requests()[0].body),
                "a=sk-adv-frames-0405&b=sk-adv-frames-0405",
                "h2={h2} cuts={cuts:?}"
            );
        }
    }
}

#[tokio::test]
async fn tokens_outside_their_locations_travel_sealed() {
    let secrets: &[Spec] = &[
        ("HDR", "sk-adv-hdr-0406", None, Some(&["header"])),
        ("QRY", "sk-adv-qry-0407", None, Some(&["query"])),
        ("BODY", "sk-adv-body-0408", None, Some(&["body"])),
    ];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let (h, q, b) = (e.sb.token("HDR"), e.sb.token("QRY"), e.sb.token("BODY"));
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let uri = format!("/echo/{h}/{q}?h={h}&b={b}");
    let auth = basic("u", &b);
    let req = pc::post(
        &uri,
        "api.example.test",
        &[("x-q", &q), ("x-b", &b), ("authorization", &auth)],
        format!("h={h}&q={q}"),
    );
    assert_eq!(pc::send1(&mut c, req).await.status, StatusCode::OK);
    let r = &e.echo.requests()[0];
    assert_eq!(r.uri, uri, "path never unsealed; query only for QRY");
    assert_eq!(r.header("x-q").unwrap(), q);
    assert_eq!(r.header("x-b").unwrap(), b);
    assert_eq!(r.header("authorization").unwrap(), auth);
    assert_eq!(r.body, format!("h={h}&q={q}").as_bytes());
    for v in ["sk-adv-hdr-0406", "sk-adv-qry-0407", "sk-adv-body-0408"] {
        assert!(!e.echo.received_bytes_contain(v.as_bytes()), "{v} unsealed");
    }
}

#[tokio::test]
async fn secret_value_containing_another_token_is_not_resubstituted() {
    let secrets: &[Spec] = &[
        ("OUTER", "sk-adv-outer-placeholder", None, Some(ALL)),
        ("INNER", "sk-adv-inner-0409", None, Some(ALL)),
    ];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let (outer, inner) = (e.sb.token("OUTER"), e.sb.token("INNER"));
    // Rotate OUTER to a value that embeds INNER's token (applies to the running sandbox).
    let value = format!("wrap-{inner}-wrap");
    e.h.register_secret(&value);
    let (s, v) =
        e.h.api(
            Method::PUT,
            &format!("/v1/stores/{}/secrets/OUTER", e.store),
            Some(json!({"value": value, "allowed_hosts": null, "locations": ALL})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let uri = format!("/echo?o={outer}");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let req = pc::post(
        &uri,
        "api.example.test",
        &[("x-api-key", &outer)],
        outer.clone(),
    );
    assert_eq!(pc::send1(&mut c, req).await.status, StatusCode::OK);
    let r = &e.echo.requests()[0];
    assert_eq!(r.header("x-api-key").unwrap(), value, "header: one pass");
    assert_eq!(r.body, value.as_bytes(), "body: one pass");
    assert_eq!(r.uri, format!("/echo?o={value}"), "query: one pass");
    assert!(!e.echo.received_bytes_contain(b"sk-adv-inner-0409"));
}

#[tokio::test]
async fn tokens_in_connect_target_host_and_authority_are_never_unsealed() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-hostpos-0410", None, Some(ALL))];
    let e = setup(None, secrets).await;
    let tok = e.sb.token("KEY");
    for target in [format!("{tok}:443"), format!("{tok}.example.test:443")] {
        assert_eq!(connect_status(&e, &target).await.0, 400, "{target}");
    }
    let mut tls = tls_tunnel(&e, API, "api.example.test").await;
    let req =
        format!("GET /echo HTTP/1.1\r\nHost: {tok}.example.test\r\nConnection: close\r\n\r\n");
    let text = exchange(&mut tls, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(super::status_of(&text), 400, "{text}");
    let mut c = pc::h2(e.h.proxy, &e.sb, API).await;
    let a = pc::send2(
        &mut c,
        pc::get(&format!("https://{tok}.example.test/echo"), "", &[]),
    )
    .await;
    assert!(a.status.is_client_error(), "{}", a.status);
    assert_upstream_untouched(&e);
    assert!(!e.h.audit_log().contains("\"unsealed\":[\"KEY\"]"));
}

#[tokio::test]
async fn denied_token_late_in_a_streamed_body_never_sends_its_value() {
    let secrets: &[Spec] = &[(
        "KEY",
        "sk-adv-late-0411",
        Some(&["other.example.test"]),
        None,
    )];
    let e = setup(Some(&["api.example.test", "other.example.test"]), secrets).await;
    let tok = e.sb.token("KEY");
    let mut body = vec![b'x'; 300_000];
    body[250_000..250_000 + tok.len()].copy_from_slice(tok.as_bytes());
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let chunks: Vec<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
    let req = pc::post_chunked("/echo", "api.example.test", &[], chunks);
    let a = pc::send1(&mut c, req).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text());
    assert_eq!(a.code().as_deref(), Some("secret_host_denied"));
    assert!(!e.echo.received_bytes_contain(b"sk-adv-late-0411"));
    for r in e.echo.requests() {
        assert!(
            r.body.len() < 250_000,
            "bytes after the denied token were forwarded"
        );
    }
}

/// A body in a content coding travels sealed (DESIGN.md §3 "Where": "not inside compressed
/// encodings") whichever `Content-Encoding` field names the coding: `identity` then `gzip`
/// had the value written into the gzip member (outside review). A request with two
/// `Content-Type` fields is refused: the first decided how the value was written, the origin
/// may read the other.
#[tokio::test]
async fn every_content_encoding_field_counts_and_one_media_type_is_required() {
    let secrets: &[Spec] = &[("KEY", "sk-adv-coded-0451", None, Some(ALL))];
    let e = setup(Some(&["api.example.test"]), secrets).await;
    let token = e.sb.token("KEY");
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let coded = [
        ("content-encoding", "identity"),
        ("content-encoding", "gzip"),
    ];
    let req = pc::post("/echo", "api.example.test", &coded, token.clone());
    let a = pc::send1(&mut c, req).await;
    assert_eq!(a.status, StatusCode::OK);
    let r = &e.echo.requests()[0];
    assert_eq!(r.body, token.as_bytes(), "the coded body went sealed");
    assert!(!e.echo.received_bytes_contain(b"sk-adv-coded-0451"));

    let e = setup(Some(&["api.example.test"]), secrets).await;
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let two = [
        ("content-type", "text/plain"),
        ("content-type", "application/json"),
    ];
    let req = pc::post("/echo", "api.example.test", &two, e.sb.token("KEY"));
    let a = pc::send1(&mut c, req).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(
        a.text().contains("Content-Type headers that disagree"),
        "{}",
        a.text()
    );
    assert_upstream_untouched(&e);
    let mut c = pc::h1(e.h.proxy, &e.sb, API).await;
    let same = [
        ("content-type", "text/plain"),
        ("content-type", "text/plain"),
    ];
    let req = pc::post("/echo", "api.example.test", &same, "x");
    assert_eq!(
        pc::send1(&mut c, req).await.status,
        StatusCode::OK,
        "repeats pass"
    );
}
