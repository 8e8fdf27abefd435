//! Length-carrying binary bodies: which content types carry their own lengths, and a checker
//! of the gRPC message framing (gRPC, gRPC-Web, Connect streaming).
//!
//! A real value replaced by its 43-byte token inside such a body would make every enclosing
//! length wrong (the 5-byte gRPC message prefix, a protobuf field's varint, a msgpack string
//! header), so the receiver would misparse or hang. So in these bodies:
//! - responses are scrubbed at the same length ([`super::ScrubStream::same_length`]): each
//!   value becomes its token cut or padded to the value's length, and every length stays right;
//! - request tokens are not unsealed: they travel sealed (the proxy's `prepare_body`).
//!
//! A gRPC message whose compressed flag is set is a gzip (or other) stream that no scrubber can
//! read; [`MessageFrames`] decodes such a message whole and passes it on uncompressed, or ends
//! the stream when it cannot (an unknown coding, over the size limit) before any byte of it is
//! passed on.

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

/// How a body's content type carries lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// Length-prefixed messages (`application/grpc`, `application/grpc+proto`,
    /// `application/grpc-web`, `application/grpc-web+proto`, `application/connect+proto`, …):
    /// compressed messages decoded ([`MessageFrames`]), then scrubbed at the same length.
    Framed,
    /// The same messages, base64-encoded (`application/grpc-web-text`): a value inside cannot
    /// be recognised, so such a response is refused where responses are scrubbed.
    Base64Framed,
    /// Formats with length fields of their own (protobuf, msgpack, CBOR): scrubbed at the same
    /// length.
    Lengths,
}

impl Binary {
    /// The kind of the body whose `Content-Type` is in `h`, or `None` for every other type
    /// (text, JSON, octet streams: scrubbed and unsealed as usual).
    pub fn of(h: &HeaderMap) -> Option<Binary> {
        let ct = h.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
        let essence = ct.split(';').next().unwrap_or("").trim();
        Binary::of_essence(&essence.to_ascii_lowercase())
    }

    fn of_essence(t: &str) -> Option<Binary> {
        let (family, _suffix) = t.split_once('+').unwrap_or((t, ""));
        match family {
            "application/grpc-web-text" => Some(Binary::Base64Framed),
            "application/grpc" | "application/grpc-web" | "application/connect" => {
                // `application/connect` alone is not a type; `application/connect+json` is.
                (family != "application/connect" || t.contains('+')).then_some(Binary::Framed)
            }
            "application/proto"
            | "application/protobuf"
            | "application/x-protobuf"
            | "application/x-google-protobuf"
            | "application/vnd.google.protobuf"
            | "application/msgpack"
            | "application/x-msgpack"
            | "application/vnd.msgpack"
            | "application/cbor" => Some(Binary::Lengths),
            _ => None,
        }
    }
}

/// How compressed messages of a framed body are encoded (the response's `grpc-encoding`, or
/// Connect's `connect-content-encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageCoding {
    /// `gzip`.
    Gzip,
    /// `deflate` (zlib-wrapped, as gRPC defines it).
    Deflate,
    /// Absent, `identity`, or a coding sealgate does not decode (`snappy`, `zstd`, …): a
    /// compressed message cannot be read.
    Unreadable,
}

impl MessageCoding {
    /// The coding named in `h`.
    pub fn of(h: &HeaderMap) -> MessageCoding {
        let named = ["grpc-encoding", "connect-content-encoding"]
            .iter()
            .find_map(|n| h.get(*n))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        match named.as_deref() {
            Some("gzip") => MessageCoding::Gzip,
            Some("deflate") => MessageCoding::Deflate,
            _ => MessageCoding::Unreadable,
        }
    }
}

/// Why a framed body cannot be scrubbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A compressed message in a coding sealgate does not decode, or one that does not decode.
    #[error("the upstream sent a compressed gRPC message that cannot be decoded to be scrubbed")]
    Undecodable,
    /// A compressed message larger than the limit, before or after decoding.
    #[error("the upstream sent a compressed gRPC message over upstream.max_grpc_message_bytes")]
    TooLarge,
}

/// Turns a stream of gRPC-style messages (1 flag byte, a 4-byte big-endian length, the
/// message) into the same messages uncompressed, across arbitrary chunk splits.
///
/// An uncompressed message streams through as it arrives (its header once whole). A message
/// with its compressed flag (bit 0) set is held until complete, decoded, and passed on with the
/// flag cleared and its decoded length: a message whose flag is clear is not compressed,
/// whatever `grpc-encoding` says (gRPC's wire format), so every client reads it as is.
/// gRPC-Web trailer frames (bit 7) and Connect's end-of-stream message (bit 1) keep their flags.
///
/// # Invariant
/// Nothing of a compressed message is passed on before it was decoded whole: every byte
/// passed on is plain, so a scrubber downstream sees each value as the client will.
///
/// # Memory usage
/// At most `max` bytes of a compressed message plus at most `max` bytes of its decoding, per
/// stream, and only while such a message is in flight.
#[derive(Debug)]
pub struct MessageFrames {
    coding: MessageCoding,
    max: usize,
    /// Bytes of the current message still to come.
    left: usize,
    /// The header being read (`have` of 5 bytes so far).
    header: [u8; 5],
    have: usize,
    /// The current message's bytes, when it is compressed.
    packed: Option<BytesMut>,
}

/// The compressed flag of a message header.
const COMPRESSED: u8 = 0x01;

impl MessageFrames {
    /// A stream whose compressed messages are in `coding`, none larger than `max` bytes
    /// (compressed or decoded).
    pub fn new(coding: MessageCoding, max: usize) -> Self {
        MessageFrames {
            coding,
            max,
            left: 0,
            header: [0; 5],
            have: 0,
            packed: None,
        }
    }

    /// Takes the next `chunk`, pushing what is plain onto `out`.
    ///
    /// # Errors
    /// A compressed message that is too large or cannot be decoded; nothing of it was pushed,
    /// and the stream must end.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        while !chunk.is_empty() {
            if self.left > 0 {
                let part = chunk.split_to(chunk.len().min(self.left));
                self.left -= part.len();
                self.message_bytes(part, out)?;
                continue;
            }
            let take = (5 - self.have).min(chunk.len());
            self.header[self.have..self.have + take].copy_from_slice(&chunk[..take]);
            self.have += take;
            chunk.advance(take);
            if self.have == 5 {
                self.message_header(out)?;
            }
        }
        Ok(())
    }

    fn message_header(&mut self, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        self.have = 0;
        let [flags, a, b, c, d] = self.header;
        self.left = u32::from_be_bytes([a, b, c, d]) as usize;
        if flags & COMPRESSED == 0 {
            out.push(Bytes::copy_from_slice(&self.header));
            return Ok(());
        }
        if self.left > self.max {
            return Err(FrameError::TooLarge);
        }
        self.packed = Some(BytesMut::with_capacity(self.left));
        if self.left == 0 {
            self.unpack(out)?;
        }
        Ok(())
    }

    fn message_bytes(&mut self, part: Bytes, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        let Some(packed) = &mut self.packed else {
            out.push(part);
            return Ok(());
        };
        packed.extend_from_slice(&part);
        if self.left == 0 {
            self.unpack(out)?;
        }
        Ok(())
    }

    /// Decodes the complete compressed message and pushes it as an uncompressed one.
    fn unpack(&mut self, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        let packed = self.packed.take().unwrap_or_default();
        let plain = decode(self.coding, &packed, self.max)?;
        let len = u32::try_from(plain.len()).map_err(|_| FrameError::TooLarge)?;
        let mut header = [self.header[0] & !COMPRESSED, 0, 0, 0, 0];
        header[1..].copy_from_slice(&len.to_be_bytes());
        out.push(Bytes::copy_from_slice(&header));
        out.push(Bytes::from(plain));
        Ok(())
    }
}

/// `packed` decoded, refusing more than `max` bytes of output (a compression bomb costs at most
/// that).
fn decode(coding: MessageCoding, packed: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    use std::io::Read as _;
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut plain = Vec::new();
    let read = match coding {
        MessageCoding::Gzip => flate2::read::GzDecoder::new(packed)
            .take(limit)
            .read_to_end(&mut plain),
        MessageCoding::Deflate => flate2::read::ZlibDecoder::new(packed)
            .take(limit)
            .read_to_end(&mut plain),
        MessageCoding::Unreadable => return Err(FrameError::Undecodable),
    };
    read.map_err(|_| FrameError::Undecodable)?;
    if plain.len() > max {
        return Err(FrameError::TooLarge);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(flags: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![flags];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn content_types_are_classified_by_their_essence() {
        let kind = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            Binary::of(&h)
        };
        assert_eq!(kind("application/grpc"), Some(Binary::Framed));
        assert_eq!(
            kind("Application/GRPC+proto; charset=x"),
            Some(Binary::Framed)
        );
        assert_eq!(kind("application/grpc-web+proto"), Some(Binary::Framed));
        assert_eq!(kind("application/connect+json"), Some(Binary::Framed));
        assert_eq!(kind("application/connect"), None);
        assert_eq!(
            kind("application/grpc-web-text+proto"),
            Some(Binary::Base64Framed)
        );
        assert_eq!(kind("application/x-protobuf"), Some(Binary::Lengths));
        assert_eq!(kind("application/proto"), Some(Binary::Lengths));
        assert_eq!(kind("application/msgpack"), Some(Binary::Lengths));
        assert_eq!(kind("application/json"), None);
        assert_eq!(kind("application/grpcx"), None);
        assert_eq!(kind("text/plain"), None);
        assert_eq!(Binary::of(&HeaderMap::new()), None);
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `stream` through fresh frames, cut at `cuts`: the joined output, or the error.
    fn run(
        coding: MessageCoding,
        max: usize,
        stream: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<u8>, (FrameError, Vec<u8>)> {
        let mut f = MessageFrames::new(coding, max);
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            let chunk = Bytes::copy_from_slice(&stream[at..cut]);
            at = cut;
            if let Err(e) = f.push(chunk, &mut out) {
                return Err((e, out.concat()));
            }
        }
        Ok(out.concat())
    }

    #[test]
    fn plain_messages_pass_unchanged_across_every_split() {
        let stream = [
            msg(0, b"hello"),
            msg(0x80, b"grpc-status: 0\r\n"),
            msg(2, b"{}"),
            msg(0, b""),
        ]
        .concat();
        for cut in 0..=stream.len() {
            for cut2 in cut..=stream.len() {
                let got = run(MessageCoding::Unreadable, 8, &stream, &[cut, cut2]);
                assert_eq!(got.unwrap(), stream, "cuts {cut}/{cut2}");
            }
        }
    }

    #[test]
    fn compressed_messages_come_out_decoded_with_the_flag_cleared() {
        let value = b"{\"auth\": \"sk-real-value\"}";
        let stream = [
            msg(0, b"first"),
            msg(1, &gzip(value)),
            msg(0x80, b"t: 1\r\n"),
        ]
        .concat();
        let want = [msg(0, b"first"), msg(0, value), msg(0x80, b"t: 1\r\n")].concat();
        for cut in 0..=stream.len() {
            let got = run(MessageCoding::Gzip, 1024, &stream, &[cut]);
            assert_eq!(got.unwrap(), want, "cut {cut}");
        }
        let zlib = {
            use std::io::Write as _;
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(value).unwrap();
            e.finish().unwrap()
        };
        let got = run(MessageCoding::Deflate, 1024, &msg(1, &zlib), &[]);
        assert_eq!(got.unwrap(), msg(0, value));
    }

    #[test]
    fn a_compressed_message_that_cannot_be_read_passes_nothing_of_itself() {
        let packed = msg(1, &gzip(b"sk-real-value"));
        let stream = [msg(0, b"ok"), packed.clone()].concat();
        for coding in [MessageCoding::Unreadable, MessageCoding::Deflate] {
            let (err, passed) = run(coding, 1024, &stream, &[9]).unwrap_err();
            assert_eq!(err, FrameError::Undecodable, "{coding:?}");
            assert_eq!(passed, msg(0, b"ok"), "{coding:?}");
        }
        // A bomb: 1 MiB of zeros decodes past a 64 KiB limit; so does a message too long to hold.
        let bomb = msg(1, &gzip(&vec![0u8; 1 << 20]));
        assert!(bomb.len() < 64 * 1024);
        let (err, passed) = run(MessageCoding::Gzip, 64 * 1024, &bomb, &[]).unwrap_err();
        assert_eq!((err, passed.len()), (FrameError::TooLarge, 0));
        let mut long = vec![1u8];
        long.extend_from_slice(&(64 * 1024 + 1u32).to_be_bytes());
        let (err, _) = run(MessageCoding::Gzip, 64 * 1024, &long, &[]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge);
    }
}
