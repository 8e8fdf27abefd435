//! Response scrubbing: real values (and the Basic-auth forms this request produced) are
//! replaced with sealed tokens before the sandbox sees them. Compressed bodies are decoded
//! first; SSE keeps streaming (the scrubber only holds back a possible partial match).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap};
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tokio_util::io::{ReaderStream, StreamReader};

use super::respond::{Code, Refusal};
use super::{BoxError, ProxyBody, Tunnel};
use crate::subst::{Report, ScrubBody, Scrubber};

/// Scrubs headers now and wraps the body; drops `Content-Length` (replacements change it) and
/// `Content-Encoding` (the body is decoded).
///
/// # Errors
/// An encoding sealgate cannot decode: the response is refused rather than passed unscrubbed.
pub fn scrub_response(
    t: &Tunnel,
    scrubber: Arc<Scrubber>,
    report: &Report,
    headers: &mut HeaderMap,
    body: ProxyBody,
) -> Result<ProxyBody, Refusal> {
    let scrubber = if report.basic_forms.is_empty() {
        scrubber
    } else {
        scrubber.with_extra(&report.basic_forms)
    };
    scrubber.scrub_headers(headers);
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_ascii_lowercase());
    let body = match encoding.as_deref() {
        None | Some("identity") | Some("") => body,
        Some(enc) => decode(enc, body).ok_or_else(|| {
            Refusal::new(
                Code::UpstreamUnreachable,
                format!(
                    "{} answered with content-encoding {enc}, which cannot be scrubbed",
                    t.dest
                ),
            )
        })?,
    };
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    Ok(ScrubBody::new(body, scrubber)
        .map_err(BoxError::from)
        .boxed_unsync())
}

fn decode(encoding: &str, body: ProxyBody) -> Option<ProxyBody> {
    use async_compression::tokio::bufread::{
        BrotliDecoder, DeflateDecoder, GzipDecoder, ZlibDecoder, ZstdDecoder,
    };
    let stream = BodyStream::new(body)
        .try_filter_map(|f| async move { Ok(f.into_data().ok()) })
        .map_err(std::io::Error::other);
    let reader = StreamReader::new(stream);
    let out: ProxyBody = match encoding {
        "gzip" | "x-gzip" => frames(ReaderStream::new(GzipDecoder::new(reader))),
        // RFC 9110 "deflate" is zlib-wrapped.
        "deflate" => frames(ReaderStream::new(ZlibDecoder::new(reader))),
        "raw-deflate" => frames(ReaderStream::new(DeflateDecoder::new(reader))),
        "br" => frames(ReaderStream::new(BrotliDecoder::new(reader))),
        "zstd" => frames(ReaderStream::new(ZstdDecoder::new(reader))),
        _ => return None,
    };
    Some(out)
}

fn frames<S>(s: S) -> ProxyBody
where
    S: futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    StreamBody::new(s.map_ok(http_body::Frame::data).map_err(BoxError::from)).boxed_unsync()
}
