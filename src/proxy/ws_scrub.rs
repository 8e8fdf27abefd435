//! WebSocket frames from the upstream, scrubbed (RFC 6455 §5) before the sandbox sees them.
//!
//! DESIGN §3: a real value found in what an upstream sends back is replaced by its token
//! before it reaches the sandbox. After an upgrade the answer goes on as frames, and relayed
//! as bytes they carried a value straight through (an outside review: a plain echo in the
//! first text frame). Where the upgrade's host is scrubbed, the upstream's side is read frame
//! by frame here:
//!
//! - **Data frames** (text, binary, continuation): each message's payload goes through one
//!   [`ScrubStream`], so a value split across frames of a message is still found. What comes
//!   out is written as fragments of the same message (RFC 6455 §5.4 lets an intermediary
//!   refragment when no extension is in use): one per read of the payload, the first with the
//!   message's opcode, the last with FIN once the stream is flushed. Memory: one read buffer
//!   and the stream's held tail, whatever the frame's length.
//! - **Control frames** (close, ping, pong) are scrubbed whole; one that would outgrow the
//!   125 bytes a control frame may carry loses its payload (a close keeps its status code).
//! - **Fail closed**: a frame with RSV bits (an extension such as permessage-deflate, which
//!   sealgate does not offer on scrubbed hosts: `forward::head::whole_responses_only` drops
//!   `Sec-WebSocket-Extensions`), a masked frame, a reserved opcode or a control frame over
//!   125 bytes ends the connection: nothing sealgate cannot read passes.
//!
//! The sandbox's side goes to the upstream as bytes (nothing in frames is unsealed).

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::response_scrub::ScopeGained;
use crate::subst::{Rescope, Rescoped, ScrubStream, Scrubber, Tally};

/// Bytes of payload read (and written as one fragment) at a time.
const READ: usize = 16 * 1024;

/// The largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// Relays `upstream`'s frames to `client`, scrubbed, and `client`'s bytes to `upstream` as
/// they are, until both directions have ended or one fails (a refused frame included). A
/// direction that ends shuts down the write side it fed, and the other goes on, as
/// `copy_bidirectional` does: a client that half-closes after its close frame still gets the
/// upstream's close frame (the relay used to end with the first direction).
///
/// `rescope`, asked before every frame and every read of a payload, gives the scrubber to go
/// on with once the sandbox's values changed (`response_scrub::Scope`): the message in
/// progress goes on with it too. `extras` (the upgrade request's Basic-auth forms,
/// [`Scrubber::extras`]) scrub every frame first, as they do an HTTP answer: a short
/// password's `user:password` form holds no form of the value alone (outside review).
/// `tally` is told, once the upstream's side ended, how many values were replaced.
pub async fn relay<C, U>(
    client: C,
    upstream: U,
    (scrubber, extras): (Arc<Scrubber>, Option<Arc<Scrubber>>),
    rescope: Option<Rescope>,
    tally: Tally,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut c_read, mut c_write) = tokio::io::split(client);
    let (u_read, mut u_write) = tokio::io::split(upstream);
    let down = async {
        let from = BufReader::with_capacity(READ, u_read);
        let with = Following {
            scrubber,
            extras,
            rescope,
            scrubbed: 0,
            tally: Some(tally),
        };
        scrub_frames(from, &mut c_write, with).await?;
        c_write.shutdown().await
    };
    let up = async {
        tokio::io::copy(&mut c_read, &mut u_write).await?;
        u_write.shutdown().await
    };
    tokio::try_join!(down, up).map(drop)
}

/// Relays an upgraded connection whose host's answers are not scrubbed (nothing could be
/// unsealed for it when it opened), as bytes both ways, like `relay` in its half-closes.
/// `gained` is asked before each read from the upstream is passed on: once values may be
/// unsealed for the host, the relay ends with [`ScopeGained`] — its frames were never read,
/// so they cannot be scrubbed from the middle of one.
pub async fn relay_unscrubbed<C, U>(
    client: C,
    upstream: U,
    mut gained: impl FnMut() -> bool,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut c_read, mut c_write) = tokio::io::split(client);
    let (mut u_read, mut u_write) = tokio::io::split(upstream);
    let down = async {
        let mut buf = vec![0; READ];
        loop {
            let n = u_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            if gained() {
                return Err(io::Error::other(ScopeGained));
            }
            c_write.write_all(&buf[..n]).await?;
        }
        c_write.shutdown().await
    };
    let up = async {
        tokio::io::copy(&mut c_read, &mut u_write).await?;
        u_write.shutdown().await
    };
    tokio::try_join!(down, up).map(drop)
}

/// One frame's head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    len: u64,
}

/// The scrubbers frames go through: the request's extras (fixed), then the host's,
/// following the sandbox's values; and how many values they replaced, told to `tally` when
/// the frames end (however they end).
struct Following {
    scrubber: Arc<Scrubber>,
    extras: Option<Arc<Scrubber>>,
    rescope: Option<Rescope>,
    scrubbed: usize,
    tally: Option<Tally>,
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(tally) = self.tally.take() {
            tally(self.scrubbed);
        }
    }
}

impl Following {
    /// Takes up the scrubber `rescope` gives after a change, for `message` too; an error
    /// once the frames cannot be scrubbed any more ([`Rescoped::End`]).
    fn follow(&mut self, message: Option<&mut Message>) -> io::Result<()> {
        let now = match self.rescope.as_mut().and_then(|r| r()) {
            None => return Ok(()),
            Some(Rescoped::End) => {
                return Err(io::Error::other(crate::subst::BodyError::ScopeLost))
            }
            Some(Rescoped::Use(now)) => now,
        };
        if Arc::ptr_eq(&now, &self.scrubber) {
            return Ok(());
        }
        if let Some(m) = message {
            m.stream.rescope(now.clone());
        }
        self.scrubber = now;
        Ok(())
    }

    /// A new message's streams.
    fn message(&self, opcode: u8) -> Message {
        Message {
            extras: self.extras.clone().map(ScrubStream::new),
            stream: ScrubStream::new(self.scrubber.clone()),
            opcode,
            started: false,
            counted: 0,
        }
    }

    /// Counts what `m` replaced since it was last counted.
    fn count(&mut self, m: &mut Message) {
        let now = m.replacements();
        self.scrubbed += now - m.counted;
        m.counted = now;
    }

    /// A control frame's payload through the extras, then the host's scrubber.
    fn scrub_control(&mut self, opcode: u8, payload: Bytes) -> Bytes {
        let payload = match &self.extras {
            Some(x) => scrub_control(x, opcode, payload, &mut self.scrubbed),
            None => payload,
        };
        scrub_control(&self.scrubber, opcode, payload, &mut self.scrubbed)
    }
}

/// The message being relayed: its streams (the request's extras first, then the host's),
/// its opcode, and whether a fragment went out.
struct Message {
    extras: Option<ScrubStream>,
    stream: ScrubStream,
    opcode: u8,
    started: bool,
    /// Replacements already counted ([`Following::count`]).
    counted: usize,
}

impl Message {
    /// Values both streams replaced so far.
    fn replacements(&self) -> usize {
        self.stream.replacements() + self.extras.as_ref().map_or(0, ScrubStream::replacements)
    }

    /// `chunk` through both streams; what they let out goes onto `out`.
    fn push(&mut self, chunk: Bytes, out: &mut Vec<Bytes>) {
        match &mut self.extras {
            None => self.stream.push(chunk, out),
            Some(x) => {
                let mut between = Vec::new();
                x.push(chunk, &mut between);
                between.into_iter().for_each(|b| self.stream.push(b, out));
            }
        }
    }

    /// Ends both streams, the extras' first.
    fn finish(&mut self, out: &mut Vec<Bytes>) {
        if let Some(x) = &mut self.extras {
            let mut between = Vec::new();
            x.finish(&mut between);
            between.into_iter().for_each(|b| self.stream.push(b, out));
        }
        self.stream.finish(out);
    }
}

/// Reads frames from `from` and writes them, scrubbed, to `to` until `from` ends.
///
/// # Errors
/// I/O errors, and [`io::ErrorKind::InvalidData`] for a frame that is refused (see the
/// module docs).
async fn scrub_frames<R, W>(mut from: R, to: &mut W, mut with: Following) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut message: Option<Message> = None;
    while let Some(head) = read_head(&mut from).await? {
        refuse_unreadable(&head)?;
        if head.opcode >= CLOSE {
            let payload = read_exact(&mut from, head.len as usize).await?;
            with.follow(message.as_mut())?;
            let payload = with.scrub_control(head.opcode, payload);
            write_frame(to, true, head.opcode, &[payload]).await?;
            if head.opcode == CLOSE {
                return Ok(());
            }
            continue;
        }
        let m = match (head.opcode, message.take()) {
            (CONTINUATION, Some(m)) => m,
            (TEXT | BINARY, None) => with.message(head.opcode),
            _ => return Err(refused("a data frame out of sequence")),
        };
        message = relay_data(&mut from, to, m, &head, &mut with).await?;
    }
    Ok(())
}

/// Relays one data frame's payload through its message's stream; the message, unless this
/// frame ended it.
async fn relay_data<R, W>(
    from: &mut R,
    to: &mut W,
    mut m: Message,
    head: &Head,
    with: &mut Following,
) -> io::Result<Option<Message>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = head.len;
    let mut out = Vec::new();
    while left > 0 {
        let n = left.min(READ as u64) as usize;
        let chunk = read_exact(from, n).await?;
        left -= n as u64;
        with.follow(Some(&mut m))?;
        m.push(chunk, &mut out);
        with.count(&mut m);
        write_fragment(to, &mut m, false, &mut out).await?;
    }
    if !head.fin {
        return Ok(Some(m));
    }
    with.follow(Some(&mut m))?;
    m.finish(&mut out);
    with.count(&mut m);
    write_fragment(to, &mut m, true, &mut out).await?;
    Ok(None)
}

/// Writes what the stream let out (`out`, emptied) as the message's next fragment; nothing if
/// there is nothing and this is not the last.
async fn write_fragment<W: AsyncWrite + Unpin>(
    to: &mut W,
    m: &mut Message,
    fin: bool,
    out: &mut Vec<Bytes>,
) -> io::Result<()> {
    if out.is_empty() && !fin {
        return Ok(());
    }
    let opcode = if m.started { CONTINUATION } else { m.opcode };
    m.started = true;
    write_frame(to, fin, opcode, out).await?;
    out.clear();
    Ok(())
}

/// A control frame's payload scrubbed; emptied (a close: down to its status code) if the
/// tokens would make it outgrow [`MAX_CONTROL`]. Adds what it replaced to `count`.
fn scrub_control(scrubber: &Scrubber, opcode: u8, payload: Bytes, count: &mut usize) -> Bytes {
    let Some((scrubbed, n)) = scrubber.scrub(&payload) else {
        return payload;
    };
    *count += n;
    if scrubbed.len() <= MAX_CONTROL {
        return Bytes::from(scrubbed);
    }
    match opcode {
        CLOSE if payload.len() >= 2 => payload.slice(..2),
        _ => Bytes::new(),
    }
}

/// Ends the relay for a frame sealgate cannot read (see the module docs).
fn refuse_unreadable(head: &Head) -> io::Result<()> {
    if head.rsv != 0 {
        return Err(refused(
            "a frame with RSV bits (an extension) on a scrubbed host",
        ));
    }
    if head.masked {
        return Err(refused("a masked frame from the server"));
    }
    match head.opcode {
        CONTINUATION | TEXT | BINARY => Ok(()),
        CLOSE | PING | PONG if head.len <= MAX_CONTROL as u64 && head.fin => Ok(()),
        CLOSE | PING | PONG => Err(refused("a fragmented or oversized control frame")),
        _ => Err(refused("a reserved opcode")),
    }
}

fn refused(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("websocket frame refused: {why}"),
    )
}

/// The next frame's head; `None` at a clean end between frames.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Head>> {
    let mut two = [0u8; 2];
    match r.read_exact(&mut two[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut two[1..]).await?;
    let len = match two[1] & 0x7f {
        126 => u64::from(r.read_u16().await?),
        127 => r.read_u64().await?,
        n => u64::from(n),
    };
    let masked = two[1] & 0x80 != 0;
    if masked {
        // Refused by the caller before the payload is read; read to keep the head whole.
        let mut key = [0u8; 4];
        r.read_exact(&mut key).await?;
    }
    Ok(Some(Head {
        fin: two[0] & 0x80 != 0,
        rsv: (two[0] >> 4) & 0x7,
        opcode: two[0] & 0x0f,
        masked,
        len,
    }))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(n);
    r.read_exact(&mut buf).await?;
    Ok(buf.freeze())
}

/// Writes one unmasked frame (a server's) whose payload is `pieces`, in one write.
async fn write_frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    fin: bool,
    opcode: u8,
    pieces: &[Bytes],
) -> io::Result<()> {
    let len: usize = pieces.iter().map(Bytes::len).sum();
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(if fin { 0x80 } else { 0 } | opcode);
    match len {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    pieces.iter().for_each(|p| frame.extend_from_slice(p));
    to.write_all(&frame).await?;
    to.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretValue;

    const VALUE: &[u8] = b"sk-ws-scrub-test-value-0123456789";
    const TOKEN: &[u8] = b"osb_sealed_wsscrubtesttoken00000000000000000";

    fn scrubber() -> Arc<Scrubber> {
        let pairs = vec![(SecretValue::new(VALUE.to_vec()), Bytes::from_static(TOKEN))];
        Scrubber::new(pairs).unwrap()
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` (the upstream's bytes) through the scrubber; the frames the client got,
    /// as (fin, opcode, payload), and how the relay ended.
    async fn relayed(input: Vec<u8>) -> (Vec<(bool, u8, Vec<u8>)>, io::Result<()>) {
        let (frames, ended, _) = relayed_with(input, None).await;
        (frames, ended)
    }

    /// [`relayed`], the request's `extras` scrubbing first.
    /// The frames `input` became, how the relay ended and how many values the tally was told.
    async fn relayed_with(
        input: Vec<u8>,
        extras: Option<Arc<Scrubber>>,
    ) -> (Vec<(bool, u8, Vec<u8>)>, io::Result<()>, usize) {
        let mut out = Vec::new();
        let told = Arc::new(std::sync::Mutex::new(None));
        let to = told.clone();
        let with = Following {
            scrubber: scrubber(),
            extras,
            rescope: None,
            scrubbed: 0,
            tally: Some(Box::new(move |n| *to.lock().unwrap() = Some(n))),
        };
        let ended = scrub_frames(&input[..], &mut out, with).await;
        let told = told
            .lock()
            .unwrap()
            .expect("the tally is told when the frames end");
        let mut frames = Vec::new();
        let mut r = &out[..];
        while let Some(h) = read_head(&mut r).await.unwrap() {
            let p = read_exact(&mut r, h.len as usize).await.unwrap();
            frames.push((h.fin, h.opcode, p.to_vec()));
        }
        (frames, ended, told)
    }

    /// The client half-closes after its close frame: the upstream's answering close frame,
    /// sent after that, still reaches it (scrubbed), and the relay then ends.
    #[tokio::test]
    async fn a_close_after_the_client_half_closed_still_reaches_it() {
        let (client, mut sandbox) = tokio::io::duplex(4096);
        let (upstream, mut origin) = tokio::io::duplex(4096);
        let tally = Box::new(|_| {});
        let relay = tokio::spawn(relay(client, upstream, (scrubber(), None), None, tally));
        let close = frame(true, CLOSE, b"\x03\xe8bye");
        sandbox.write_all(&close).await.unwrap();
        sandbox.shutdown().await.unwrap();
        let mut got = vec![0; close.len()];
        origin.read_exact(&mut got).await.unwrap();
        assert_eq!(got, close, "the sandbox's close frame went up as it was");
        let mut rest = Vec::new();
        origin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "then the upstream's read side ended");
        let mut answer = b"\x03\xe8".to_vec();
        answer.extend_from_slice(VALUE);
        origin
            .write_all(&frame(true, CLOSE, &answer))
            .await
            .unwrap();
        origin.shutdown().await.unwrap();
        let mut down = Vec::new();
        sandbox.read_to_end(&mut down).await.unwrap();
        let mut expected = b"\x03\xe8".to_vec();
        expected.extend_from_slice(TOKEN);
        assert_eq!(down, frame(true, CLOSE, &expected));
        relay.await.unwrap().unwrap();
    }

    /// Messages reassembled from frames: (opcode, payload).
    fn messages(frames: &[(bool, u8, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut open = false;
        for (fin, op, p) in frames {
            if *op >= CLOSE {
                out.push((*op, p.clone()));
                continue;
            }
            if open {
                let last = out.iter_mut().rev().find(|(o, _)| *o < CLOSE).unwrap();
                last.1.extend_from_slice(p);
            } else {
                assert_ne!(
                    *op, CONTINUATION,
                    "a message must not start with a continuation"
                );
                out.push((*op, p.clone()));
            }
            open = !fin;
        }
        out
    }

    fn with_value(before: &[u8], after: &[u8]) -> Vec<u8> {
        [before, VALUE, after].concat()
    }

    #[tokio::test]
    async fn a_value_in_a_text_frame_reaches_the_client_as_its_token() {
        let input = frame(true, TEXT, &with_value(b"key=", b"!"));
        let (frames, ended) = relayed(input).await;
        ended.unwrap();
        assert_eq!(messages(&frames), [(TEXT, [b"key=", TOKEN, b"!"].concat())]);
    }

    /// A short password's Basic form (`user:password` in base64) holds no form of the value
    /// alone: only the request's extras find it, in data and control frames alike.
    #[tokio::test]
    async fn the_upgrade_requests_basic_forms_are_scrubbed_from_every_frame() {
        use base64::Engine as _;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let (real, sealed) = (b64(b"bob:pw-12-bytes"), b64(b"bob:osb_sealed_pw"));
        let pair = [(Bytes::from(real.clone()), Bytes::from(sealed.clone()))];
        let extras = scrubber().extras(&pair);
        let whole = format!("auth: Basic {real} and v");
        let (one, two) = whole.as_bytes().split_at(17);
        let mut input = frame(false, TEXT, one);
        input.extend(frame(true, PING, real.as_bytes()));
        input.extend(frame(true, CONTINUATION, two));
        let (frames, ended, scrubbed) = relayed_with(input, extras).await;
        ended.unwrap();
        assert_eq!(
            scrubbed, 2,
            "the ping's form and the message's, counted once each"
        );
        let text = format!("auth: Basic {sealed} and v");
        assert_eq!(
            messages(&frames),
            [
                (PING, sealed.clone().into_bytes()),
                (TEXT, text.into_bytes())
            ]
        );
    }

    #[tokio::test]
    async fn a_value_split_across_fragments_and_a_ping_between_is_scrubbed() {
        let whole = with_value(b"a", b"z");
        let (one, two) = whole.split_at(12);
        let mut input = frame(false, BINARY, one);
        input.extend(frame(true, PING, &with_value(b"p", b"")));
        input.extend(frame(true, CONTINUATION, two));
        input.extend(frame(true, TEXT, b"after"));
        let (frames, ended, scrubbed) = relayed_with(input, None).await;
        ended.unwrap();
        assert_eq!(scrubbed, 2, "the ping's and the split message's");
        let got = messages(&frames);
        assert_eq!(
            got,
            [
                // The message's first fragment is all held (no line end in it, shorter than
                // the window), so the ping went out first.
                (PING, [b"p", TOKEN].concat()),
                (BINARY, [b"a", TOKEN, b"z"].concat()),
                (TEXT, b"after".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn a_frame_larger_than_a_read_is_relayed_in_fragments_scrubbed_across_them() {
        let mut payload = vec![b'x'; READ - 10];
        payload.extend_from_slice(VALUE);
        payload.extend(vec![b'y'; 100]);
        let (frames, ended) = relayed(frame(true, BINARY, &payload)).await;
        ended.unwrap();
        assert!(frames.len() >= 2, "refragmented");
        let got = messages(&frames);
        let want = [&vec![b'x'; READ - 10][..], TOKEN, &[b'y'; 100]].concat();
        assert_eq!(got, [(BINARY, want)]);
    }

    #[tokio::test]
    async fn a_close_reason_holding_a_value_is_scrubbed_or_cut_to_its_code() {
        let short = [&[0x03, 0xe8][..], VALUE].concat();
        let (frames, ended) = relayed(frame(true, CLOSE, &short)).await;
        ended.unwrap();
        assert_eq!(frames, [(true, CLOSE, [&[0x03, 0xe8][..], TOKEN].concat())]);
        let long = [&[0x03, 0xe8][..], &[b'r'; 80][..], VALUE].concat();
        let (frames, _) = relayed(frame(true, CLOSE, &long)).await;
        assert_eq!(
            frames,
            [(true, CLOSE, vec![0x03, 0xe8])],
            "the token would not fit"
        );
    }

    #[tokio::test]
    async fn frames_sealgate_cannot_read_end_the_relay_before_their_payload_passes() {
        let compressed = [vec![0xc1, 5], b"xxxxx".to_vec()].concat(); // RSV1: permessage-deflate
        let masked = [vec![0x81, 0x85, 1, 2, 3, 4], b"xxxxx".to_vec()].concat();
        let reserved = frame(true, 0x3, b"x");
        let big_ping = frame(true, PING, &[b'p'; 126]);
        for input in [compressed, masked, reserved, big_ping] {
            let (frames, ended) = relayed(input).await;
            assert!(frames.is_empty(), "{frames:?}");
            assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
        let orphan = frame(true, CONTINUATION, b"x");
        assert!(
            relayed(orphan).await.1.is_err(),
            "a continuation without a message"
        );
    }
}
