//! gRPC message framing (gRPC, gRPC-Web, Connect streaming): 1 flag byte, a 4-byte big-endian
//! length, the message. [`MessageFrames`] splits a response body into its messages, so that
//! the scrubber can finish each one (a message has no end marker of its own, and a tail held
//! back across a message boundary would stall a streaming call), and decodes compressed
//! messages, which no scrubber can read as they come (a gzip stream).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use super::binary::MESSAGE_CODINGS;

/// How compressed messages of a framed body are encoded (the response's `grpc-encoding`, or
/// Connect's `connect-content-encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageCoding {
    /// `gzip` (every member of it).
    Gzip,
    /// `deflate` (zlib-wrapped, as gRPC defines it).
    Deflate,
    /// Absent, `identity`, or a coding sealgate does not decode (`snappy`, `zstd`, …): a
    /// compressed message cannot be read.
    Unreadable,
}

impl MessageCoding {
    /// The coding named in `h` (the first field that names one).
    pub fn of(h: &HeaderMap) -> MessageCoding {
        let named = MESSAGE_CODINGS.iter().find_map(|n| h.get(n));
        match named.map(|v| v.as_bytes().trim_ascii()) {
            Some(v) if v.eq_ignore_ascii_case(b"gzip") => MessageCoding::Gzip,
            Some(v) if v.eq_ignore_ascii_case(b"deflate") => MessageCoding::Deflate,
            _ => MessageCoding::Unreadable,
        }
    }
}

/// Why a framed body cannot be scrubbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A compressed message in a coding sealgate does not decode, or corrupt.
    #[error("the upstream sent a compressed gRPC message that cannot be decoded to be scrubbed")]
    Undecodable,
    /// A compressed message larger than the limit, before or after decoding.
    #[error("the upstream sent a compressed gRPC message over upstream.max_grpc_message_bytes")]
    TooLarge,
    /// Compressed messages in flight and decoded ones already hold [`HELD_MESSAGES`] × the
    /// limit across the daemon.
    #[error(
        "too many compressed or decoded gRPC messages are held for their clients across the daemon"
    )]
    Busy,
    /// This sandbox's compressed messages in flight and decoded ones already hold
    /// [`HELD_MESSAGES_PER_SANDBOX`] × the limit.
    #[error("too many compressed or decoded gRPC messages are held for this sandbox's clients")]
    SandboxBusy,
    /// The body ended (or its trailers came) inside a message: a compressed message or a
    /// header that was held back is lost, so the stream must not end as if it were whole.
    #[error("the upstream ended a gRPC stream inside a message")]
    Truncated,
}

/// Decoded messages, at the size limit each, that the daemon holds at once before it resets
/// further compressed streams ([`FrameError::Busy`]): a client that stops reading leaves its
/// decoded message in the h2 send queue, so without a bound a few kilobytes of gzip per stream
/// pinned megabytes (an outside test took the daemon from 25 MiB to over 1 GiB).
pub const HELD_MESSAGES: usize = 16;

/// Decoded messages, at the size limit each, that one sandbox's streams hold at once before
/// its further compressed streams are reset ([`FrameError::SandboxBusy`]): a quarter of the
/// daemon's, so a sandbox that stops reading its streams cannot take the whole daemon-wide
/// bound and have every other sandbox's compressed answers reset (an outside test held it
/// with 16 unread streams of one tunnel).
pub const HELD_MESSAGES_PER_SANDBOX: usize = 4;

/// Bytes of compressed messages in flight and of decoded ones not yet dropped, daemon-wide.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// `n` bytes counted against the daemon-wide count `held` and a sandbox's count `own`, given
/// back to both when dropped.
struct Charge {
    n: usize,
    held: &'static AtomicUsize,
    own: Arc<AtomicUsize>,
}

impl Charge {
    /// Counts `to` bytes in all (no less than now), within the bounds for messages of at most
    /// `max` bytes.
    ///
    /// # Errors
    /// [`FrameError::SandboxBusy`] or [`FrameError::Busy`] past either; the count is unchanged.
    fn grow_to(&mut self, to: usize, max: usize) -> Result<(), FrameError> {
        let by = to.saturating_sub(self.n);
        let mine = self.own.fetch_add(by, Ordering::AcqRel);
        if mine + by > HELD_MESSAGES_PER_SANDBOX.saturating_mul(max) {
            self.own.fetch_sub(by, Ordering::AcqRel);
            return Err(FrameError::SandboxBusy);
        }
        let before = self.held.fetch_add(by, Ordering::AcqRel);
        if before + by > HELD_MESSAGES.saturating_mul(max) {
            self.held.fetch_sub(by, Ordering::AcqRel);
            self.own.fetch_sub(by, Ordering::AcqRel);
            return Err(FrameError::Busy);
        }
        self.n += by;
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.n, Ordering::AcqRel);
        self.own.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// A decoded message on its way to the client, counted until it is dropped.
struct Held {
    bytes: Vec<u8>,
    _charge: Charge,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// What [`MessageFrames::push`] passes on.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Plain bytes of messages, in order.
    Data(Bytes),
    /// The end of a message.
    End,
}

/// Splits a stream of messages into plain bytes and message ends, across arbitrary chunk
/// splits, and passes compressed messages on decoded.
///
/// An uncompressed message streams through as it arrives, in slices of the input (a header
/// split across chunks is the only copy). A message with its compressed flag (bit 0) set is
/// held until complete, decoded, and passed on with the flag cleared and its decoded length: a
/// message whose flag is clear is not compressed, whatever `grpc-encoding` says (gRPC's wire
/// format), so every client reads it as is. gRPC-Web trailer frames (bit 7) and Connect's
/// end-of-stream message (bit 1) keep their other flags.
///
/// # Invariant
/// Nothing of a compressed message is passed on before it was decoded whole: every byte
/// passed on is plain, so a scrubber downstream sees each value as the client will.
///
/// # Memory usage
/// While a compressed message is in flight: its bytes (at most `max`; counted as its buffer
/// is allocated: a first reserve of at most 64 KiB, then the whole announced length once that
/// is outgrown) and, while decoding, at most about twice `max` for the decoded message. A
/// decoded message stays allocated until the client has taken it. Compressed messages in
/// flight and decoded ones together are bounded to [`HELD_MESSAGES_PER_SANDBOX`] × `max` per
/// sandbox and [`HELD_MESSAGES`] × `max` across the daemon; past either a compressed message
/// resets its stream. Decoding runs inline, so a message of `max` bytes costs that much
/// inflate time on the worker that polls it.
pub struct MessageFrames {
    coding: MessageCoding,
    max: usize,
    /// The daemon-wide count of message bytes held ([`HELD`]; tests pass their own).
    held: &'static AtomicUsize,
    /// The count of message bytes held for the sandbox whose response this is.
    own: Arc<AtomicUsize>,
    /// Bytes of the current message still to come.
    left: usize,
    /// A header split across chunks (`have` of 5 bytes so far; none passed on yet).
    header: [u8; 5],
    have: usize,
    /// The current message, when it is compressed, with the charge of its announced length.
    packed: Option<(BytesMut, Charge)>,
}

/// Never prints a message's bytes (a held message may hold a value, compressed).
impl fmt::Debug for MessageFrames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageFrames")
            .field("coding", &self.coding)
            .field("max", &self.max)
            .field("left", &self.left)
            .field("holding", &self.packed.as_ref().map_or(0, |(p, _)| p.len()))
            .finish_non_exhaustive()
    }
}

/// The compressed flag of a message header.
const COMPRESSED: u8 = 0x01;

/// The header length.
const HEADER: usize = 5;

/// The most a compressed message's buffer reserves before its bytes arrive.
const RESERVE: usize = 64 * 1024;

impl MessageFrames {
    /// A stream whose compressed messages are in `coding`, none larger than `max` bytes
    /// (compressed or decoded), counted against a sandbox of its own.
    pub fn new(coding: MessageCoding, max: usize) -> Self {
        Self::for_sandbox(coding, max, Arc::default())
    }

    /// Like [`MessageFrames::new`], its decoded messages counted in `own`, the count of the
    /// sandbox whose response this is (shared by all its streams).
    pub fn for_sandbox(coding: MessageCoding, max: usize, own: Arc<AtomicUsize>) -> Self {
        MessageFrames {
            coding,
            max,
            held: &HELD,
            own,
            left: 0,
            header: [0; HEADER],
            have: 0,
            packed: None,
        }
    }

    /// Takes the next `chunk`, pushing plain bytes and message ends onto `out`.
    ///
    /// # Errors
    /// A compressed message that is too large or cannot be decoded; nothing of it was pushed,
    /// and the stream must end.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<Piece>) -> Result<(), FrameError> {
        // `chunk[run..at]` is plain and not yet pushed.
        let (mut at, mut run) = (0, 0);
        while at < chunk.len() {
            if self.left > 0 {
                let n = (chunk.len() - at).min(self.left);
                self.left -= n;
                if let Some((packed, charge)) = &mut self.packed {
                    // Room for the whole message once its first reserve is outgrown, counted
                    // before it is taken (`self.left` is what remains after this slice).
                    if packed.len() + n > packed.capacity() {
                        let whole = packed.len() + n + self.left;
                        charge.grow_to(whole, self.max)?;
                        packed.reserve(whole - packed.len());
                    }
                    packed.extend_from_slice(&chunk[at..at + n]);
                    at += n;
                    run = at;
                } else {
                    at += n;
                }
                if self.left == 0 {
                    self.message_end(&chunk, &mut run, at, out)?;
                }
                continue;
            }
            if self.have == 0 && chunk.len() - at >= HEADER {
                let header: [u8; HEADER] = chunk[at..at + HEADER].try_into().unwrap_or_default();
                if header[0] & COMPRESSED != 0 {
                    push_run(&chunk, &mut run, at, out);
                    run = at + HEADER;
                }
                at += HEADER;
                self.message_start(header)?;
            } else {
                // A header split across chunks: held until whole, then pushed as a copy.
                push_run(&chunk, &mut run, at, out);
                let take = (HEADER - self.have).min(chunk.len() - at);
                self.header[self.have..self.have + take].copy_from_slice(&chunk[at..at + take]);
                (self.have, at, run) = (self.have + take, at + take, at + take);
                if self.have < HEADER {
                    continue;
                }
                self.have = 0;
                if self.header[0] & COMPRESSED == 0 {
                    out.push(Piece::Data(Bytes::copy_from_slice(&self.header)));
                }
                self.message_start(self.header)?;
            }
            if self.left == 0 {
                self.message_end(&chunk, &mut run, at, out)?;
            }
        }
        push_run(&chunk, &mut run, at, out);
        Ok(())
    }

    /// True while a message (or its header) has begun and not ended.
    pub fn in_message(&self) -> bool {
        self.have > 0 || self.left > 0
    }

    /// The end of the body (or its trailers): fine only between messages.
    ///
    /// # Errors
    /// [`FrameError::Truncated`] inside a message. A plain message's bytes were passed on as
    /// they came, but a held header or compressed message never will be: ending the stream
    /// cleanly would hand the client a stream with a message silently missing.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.in_message() {
            return Err(FrameError::Truncated);
        }
        Ok(())
    }

    /// A whole header was read (and a plain one passed on or kept in the current run).
    fn message_start(&mut self, header: [u8; HEADER]) -> Result<(), FrameError> {
        let [flags, a, b, c, d] = header;
        self.header = header;
        self.left = u32::from_be_bytes([a, b, c, d]) as usize;
        if flags & COMPRESSED == 0 {
            return Ok(());
        }
        if self.left > self.max {
            return Err(FrameError::TooLarge);
        }
        // Counted as its buffer is allocated: the upstream decides how long the bytes stay
        // buffered, and a stream stalled just short of its end held them uncounted. A header
        // alone takes only the first reserve, not the length it announces.
        let first = self.left.min(RESERVE);
        let charge = self.charge(first)?;
        self.packed = Some((BytesMut::with_capacity(first), charge));
        Ok(())
    }

    /// The current message is complete at `at`.
    fn message_end(
        &mut self,
        chunk: &Bytes,
        run: &mut usize,
        at: usize,
        out: &mut Vec<Piece>,
    ) -> Result<(), FrameError> {
        match self.packed.take() {
            Some(packed) => self.unpack(packed, out)?,
            None => push_run(chunk, run, at, out),
        }
        out.push(Piece::End);
        Ok(())
    }

    /// Pushes the complete compressed message `packed` as an uncompressed one; its charge is
    /// given back before the decoded message is counted.
    fn unpack(
        &self,
        (packed, charge): (BytesMut, Charge),
        out: &mut Vec<Piece>,
    ) -> Result<(), FrameError> {
        let plain = decode(self.coding, &packed, self.max)?;
        drop((packed, charge));
        let len = u32::try_from(plain.len()).map_err(|_| FrameError::TooLarge)?;
        let mut header = [self.header[0] & !COMPRESSED, 0, 0, 0, 0];
        header[1..].copy_from_slice(&len.to_be_bytes());
        let plain = self.hold(plain)?;
        out.push(Piece::Data(Bytes::copy_from_slice(&header)));
        out.push(Piece::Data(plain));
        Ok(())
    }

    /// `plain` counted against its sandbox's and the daemon-wide bound until it is dropped.
    fn hold(&self, plain: Vec<u8>) -> Result<Bytes, FrameError> {
        let charge = self.charge(plain.len())?;
        Ok(Bytes::from_owner(Held {
            bytes: plain,
            _charge: charge,
        }))
    }

    /// `n` bytes counted against the sandbox's and the daemon-wide bound.
    ///
    /// # Errors
    /// [`FrameError::SandboxBusy`] or [`FrameError::Busy`] past either; nothing is counted then.
    fn charge(&self, n: usize) -> Result<Charge, FrameError> {
        let mut c = Charge {
            n: 0,
            held: self.held,
            own: self.own.clone(),
        };
        c.grow_to(n, self.max)?;
        Ok(c)
    }
}

/// Pushes `chunk[run..at]` if it is not empty, and moves `run` to `at`.
fn push_run(chunk: &Bytes, run: &mut usize, at: usize, out: &mut Vec<Piece>) {
    if at > *run {
        out.push(Piece::Data(chunk.slice(*run..at)));
    }
    *run = at;
}

/// `packed` decoded whole, refusing more than `max` bytes of output (a compression bomb costs
/// at most that) and any byte after the compressed data.
fn decode(coding: MessageCoding, packed: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    use std::io::Read as _;
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut plain = Vec::new();
    match coding {
        MessageCoding::Gzip => {
            // Every member, as Go's and Java's clients read them; trailing garbage fails.
            let mut d = flate2::read::MultiGzDecoder::new(packed);
            (&mut d).take(limit).read_to_end(&mut plain)
        }
        MessageCoding::Deflate => {
            let mut d = flate2::read::ZlibDecoder::new(packed);
            let read = (&mut d).take(limit).read_to_end(&mut plain);
            // Bytes after the zlib stream (not when the limit stopped the read early).
            let trailing = d.total_in() < packed.len() as u64 && plain.len() <= max;
            read.and_then(|n| match trailing {
                true => Err(std::io::ErrorKind::InvalidData.into()),
                false => Ok(n),
            })
        }
        MessageCoding::Unreadable => return Err(FrameError::Undecodable),
    }
    .map_err(|_| FrameError::Undecodable)?;
    if plain.len() > max {
        return Err(FrameError::TooLarge);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use proptest::prelude::*;

    use super::*;
    use crate::subst::testutil::{grpc_message, gzip, zlib};

    /// The plain bytes passed on, and the output offset of every message end.
    type Passed = (Vec<u8>, Vec<usize>);

    /// `stream` through fresh frames, cut at `cuts`: what was passed on, or the error and the
    /// bytes passed before it.
    fn run(
        coding: MessageCoding,
        max: usize,
        stream: &[u8],
        cuts: &[usize],
    ) -> Result<Passed, (FrameError, Vec<u8>)> {
        let mut f = MessageFrames::new(coding, max);
        let (mut out, mut at) = (Vec::new(), 0);
        let mut result = Ok(());
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            result =
                result.and_then(|()| f.push(Bytes::copy_from_slice(&stream[at..cut]), &mut out));
            at = cut;
        }
        result = result.and_then(|()| f.finish());
        let (mut bytes, mut ends) = (Vec::new(), Vec::new());
        for p in out {
            match p {
                Piece::Data(b) => bytes.extend_from_slice(&b),
                Piece::End => ends.push(bytes.len()),
            }
        }
        result
            .map(|()| (bytes.clone(), ends))
            .map_err(|e| (e, bytes))
    }

    #[test]
    fn plain_messages_pass_unchanged_with_their_ends_across_every_split() {
        let msgs = [
            grpc_message(0, b"hello"),
            grpc_message(0x80, b"grpc-status: 0\r\n"),
            grpc_message(2, b"{}"),
            grpc_message(0, b""),
        ];
        let stream = msgs.concat();
        let ends: Vec<usize> = msgs
            .iter()
            .scan(0, |n, m| {
                *n += m.len();
                Some(*n)
            })
            .collect();
        for cut in 0..=stream.len() {
            for cut2 in cut..=stream.len() {
                let got = run(MessageCoding::Unreadable, 8, &stream, &[cut, cut2]);
                assert_eq!(
                    got.unwrap(),
                    (stream.clone(), ends.clone()),
                    "cuts {cut}/{cut2}"
                );
            }
        }
    }

    #[test]
    fn compressed_messages_come_out_decoded_with_the_flag_cleared() {
        let value = b"{\"auth\": \"sk-real-value\"}";
        let stream = [
            grpc_message(0, b"first"),
            grpc_message(1, &gzip(value)),
            grpc_message(0x81, &gzip(b"t: 1\r\n")),
        ]
        .concat();
        let want = [
            grpc_message(0, b"first"),
            grpc_message(0, value),
            grpc_message(0x80, b"t: 1\r\n"),
        ]
        .concat();
        for cut in 0..=stream.len() {
            let (got, ends) = run(MessageCoding::Gzip, 1024, &stream, &[cut]).unwrap();
            assert_eq!(
                (got.as_slice(), ends.len()),
                (want.as_slice(), 3),
                "cut {cut}"
            );
        }
        let (got, _) = run(
            MessageCoding::Deflate,
            1024,
            &grpc_message(1, &zlib(value)),
            &[],
        )
        .unwrap();
        assert_eq!(got, grpc_message(0, value));
        // Two gzip members are one message, as Go's and Java's clients read it.
        let members = [gzip(b"sk-real"), gzip(b"-value")].concat();
        let (got, _) = run(MessageCoding::Gzip, 1024, &grpc_message(1, &members), &[]).unwrap();
        assert_eq!(got, grpc_message(0, b"sk-real-value"));
    }

    #[test]
    fn a_compressed_message_that_cannot_be_read_passes_nothing_of_itself() {
        let stream = [
            grpc_message(0, b"ok"),
            grpc_message(1, &gzip(b"sk-real-value")),
        ]
        .concat();
        for coding in [MessageCoding::Unreadable, MessageCoding::Deflate] {
            for cut in 0..=stream.len() {
                let (err, passed) = run(coding, 1024, &stream, &[cut]).unwrap_err();
                assert_eq!(err, FrameError::Undecodable, "{coding:?} cut {cut}");
                assert_eq!(passed, grpc_message(0, b"ok"), "{coding:?} cut {cut}");
            }
        }
        let trailing = [zlib(b"sk-real-value"), b"sk-real-value".to_vec()].concat();
        let got = run(
            MessageCoding::Deflate,
            1024,
            &grpc_message(1, &trailing),
            &[],
        );
        assert_eq!(got.unwrap_err().0, FrameError::Undecodable);
        let garbage = [gzip(b"sk-real-value"), b"sk-real-value".to_vec()].concat();
        let got = run(MessageCoding::Gzip, 1024, &grpc_message(1, &garbage), &[]);
        assert_eq!(got.unwrap_err().0, FrameError::Undecodable);
    }

    #[test]
    fn messages_past_the_limit_are_refused_before_or_after_decoding() {
        // A bomb: 1 MiB of zeros decodes past a 64 KiB limit; so does a message too long to hold.
        let bomb = grpc_message(1, &gzip(&vec![0u8; 1 << 20]));
        assert!(bomb.len() < 64 * 1024);
        let (err, passed) = run(MessageCoding::Gzip, 64 * 1024, &bomb, &[]).unwrap_err();
        assert_eq!((err, passed.len()), (FrameError::TooLarge, 0));
        let mut long = vec![1u8];
        long.extend_from_slice(&(64 * 1024 + 1u32).to_be_bytes());
        let (err, _) = run(MessageCoding::Gzip, 64 * 1024, &long, &[]).unwrap_err();
        assert_eq!(err, FrameError::TooLarge);
        // A plain message is never held, so it has no limit.
        let big = grpc_message(0, &vec![b'x'; 100 * 1024]);
        assert!(run(MessageCoding::Gzip, 64 * 1024, &big, &[7]).is_ok());
    }

    #[test]
    fn decoded_messages_held_at_once_are_bounded_and_given_back_when_dropped() {
        let held: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let m = grpc_message(1, &gzip(&[b'x'; 1000]));
        let push = |own: &Arc<AtomicUsize>, out: &mut Vec<Piece>| {
            let mut f = MessageFrames::for_sandbox(MessageCoding::Gzip, 1000, own.clone());
            f.held = held;
            f.push(Bytes::copy_from_slice(&m), out)
        };
        let sandboxes: Vec<Arc<AtomicUsize>> = (0..5).map(|_| Arc::default()).collect();
        let mut kept = Vec::new();
        for own in &sandboxes[..4] {
            for _ in 0..HELD_MESSAGES_PER_SANDBOX {
                push(own, &mut kept).unwrap();
            }
            let mut out = Vec::new();
            assert_eq!(push(own, &mut out), Err(FrameError::SandboxBusy));
            assert!(out.is_empty(), "nothing of the refused message");
        }
        assert_eq!(held.load(Ordering::Acquire), HELD_MESSAGES * 1000);
        let mut out = Vec::new();
        assert_eq!(push(&sandboxes[4], &mut out), Err(FrameError::Busy));
        assert!(out.is_empty(), "nothing of the refused message");
        assert_eq!(
            sandboxes[4].load(Ordering::Acquire),
            0,
            "its try given back"
        );
        drop(kept);
        assert_eq!(held.load(Ordering::Acquire), 0);
        assert!(sandboxes.iter().all(|o| o.load(Ordering::Acquire) == 0));
        push(&sandboxes[0], &mut out).unwrap();
    }

    #[test]
    fn compressed_messages_in_flight_are_counted_as_their_buffers_grow() {
        let held: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let own: Arc<AtomicUsize> = Arc::default();
        let stream = || {
            let mut f = MessageFrames::for_sandbox(MessageCoding::Gzip, 1000, own.clone());
            f.held = held;
            f
        };
        // A header announcing 1000 compressed bytes, and a stream that stalls after it.
        let header = Bytes::from_static(&[COMPRESSED, 0, 0, 0x03, 0xe8]);
        let mut out = Vec::new();
        let mut stalled: Vec<MessageFrames> = Vec::new();
        for _ in 0..HELD_MESSAGES_PER_SANDBOX {
            let mut f = stream();
            f.push(header.clone(), &mut out).unwrap();
            stalled.push(f);
        }
        assert_eq!(
            own.load(Ordering::Acquire),
            HELD_MESSAGES_PER_SANDBOX * 1000
        );
        assert_eq!(
            stream().push(header.clone(), &mut out),
            Err(FrameError::SandboxBusy)
        );
        drop(stalled);
        assert_eq!(own.load(Ordering::Acquire), 0);
        assert_eq!(held.load(Ordering::Acquire), 0);
        // A long message: its first reserve at the header, the whole of it once outgrown.
        let mut f = MessageFrames::for_sandbox(MessageCoding::Gzip, 200_000, own.clone());
        f.held = held;
        let mut long = vec![COMPRESSED];
        long.extend_from_slice(&150_000u32.to_be_bytes());
        f.push(Bytes::from(long), &mut out).unwrap();
        assert_eq!(own.load(Ordering::Acquire), RESERVE);
        f.push(Bytes::from(vec![0u8; RESERVE]), &mut out).unwrap();
        assert_eq!(
            own.load(Ordering::Acquire),
            RESERVE,
            "within the first reserve"
        );
        f.push(Bytes::from(vec![0u8; 10]), &mut out).unwrap();
        assert_eq!(own.load(Ordering::Acquire), 150_000);
        assert_eq!(held.load(Ordering::Acquire), 150_000);
        drop(f);
        assert_eq!(own.load(Ordering::Acquire), 0);
        assert_eq!(held.load(Ordering::Acquire), 0);
        // A whole message: its compressed charge is given back, its decoded bytes counted.
        let m = grpc_message(1, &gzip(&[b'x'; 900]));
        let mut f = stream();
        let mut kept = Vec::new();
        f.push(Bytes::copy_from_slice(&m), &mut kept).unwrap();
        assert_eq!(own.load(Ordering::Acquire), 900);
        drop((f, kept));
        assert_eq!(own.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_stream_that_ends_inside_a_message_fails_at_its_end() {
        let whole = grpc_message(0, b"ok");
        let packed = grpc_message(1, &gzip(b"sk-real-value"));
        let plain = grpc_message(0, b"sk-real-value");
        for (coding, last) in [
            (MessageCoding::Gzip, &packed),
            (MessageCoding::Gzip, &plain),
        ] {
            // Every cut inside the last message: a held header, a held compressed message, or
            // part of a plain one.
            for keep in 1..last.len() {
                let stream = [&whole[..], &last[..keep]].concat();
                let (err, passed) = run(coding, 1024, &stream, &[keep / 2]).unwrap_err();
                assert_eq!(err, FrameError::Truncated, "kept {keep}");
                assert!(passed.starts_with(&whole), "kept {keep}");
                if last[0] & COMPRESSED != 0 {
                    assert_eq!(
                        passed, whole,
                        "nothing of the compressed message, kept {keep}"
                    );
                }
            }
            let stream = [&whole[..], &last[..]].concat();
            assert!(run(coding, 1024, &stream, &[3]).is_ok());
        }
        assert!(run(MessageCoding::Gzip, 1024, b"", &[]).is_ok());
    }

    #[test]
    fn debug_never_shows_a_held_message() {
        let mut f = MessageFrames::new(MessageCoding::Deflate, 1024);
        let level0 = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::none());
            e.write_all(b"sk-real-value").unwrap();
            e.finish().unwrap()
        };
        let m = grpc_message(1, &level0);
        f.push(Bytes::copy_from_slice(&m[..m.len() - 1]), &mut Vec::new())
            .unwrap();
        let shown = format!("{f:?}");
        assert!(
            !shown.contains("sk-real") && !shown.contains("115, 107"),
            "{shown}"
        );
        assert!(shown.contains("holding"), "{shown}");
    }

    proptest! {
        /// Against the naive oracle: any mix of plain, compressed and trailer messages, cut
        /// anywhere, comes out as the messages decoded and uncompressed, each end marked where
        /// the message ends.
        #[test]
        fn matches_decoding_the_whole_stream_at_once(
            msgs in prop::collection::vec((any::<bool>(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..40)), 0..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let mut stream = Vec::new();
            let (mut want, mut ends) = (Vec::new(), Vec::new());
            for (compressed, trailer, body) in &msgs {
                let flags = if *trailer { 0x80 } else { 0 };
                if *compressed {
                    stream.extend(grpc_message(flags | 1, &gzip(body)));
                } else {
                    stream.extend(grpc_message(flags, body));
                }
                want.extend(grpc_message(flags, body));
                ends.push(want.len());
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            let got = run(MessageCoding::Gzip, 4096, &stream, &cuts).unwrap();
            prop_assert_eq!(got, (want, ends));
        }
    }
}
