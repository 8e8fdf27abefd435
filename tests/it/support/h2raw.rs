//! Raw h2 frames for tests that must say what a well-behaved client would not (floods, zero
//! windows) or read what a library hides (the peer's SETTINGS and window updates).
#![allow(dead_code)] // shared by many tests; each test binary module uses a different subset

use tokio::io::{AsyncRead, AsyncReadExt};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types used by the tests.
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const SETTINGS: u8 = 4;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
/// `SETTINGS_INITIAL_WINDOW_SIZE`.
pub const INITIAL_WINDOW_SIZE: u16 = 4;

/// One raw h2 frame.
pub fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A SETTINGS frame of `(id, value)` pairs.
pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

/// HPACK for `GET https://{authority}{path}` (static-table names, literal values; each
/// under 127 bytes, which a one-byte length holds).
pub fn hpack_get(authority: &str, path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, path.len() as u8];
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, authority.len() as u8]);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// One frame as read: type, flags, stream and payload.
pub struct Frame {
    pub ty: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A SETTINGS frame's value for `id` (not an ACK).
    pub fn setting(&self, id: u16) -> Option<u32> {
        if self.ty != SETTINGS || self.flags & 1 == 1 {
            return None;
        }
        self.payload.chunks_exact(6).find_map(|p| {
            (u16::from_be_bytes([p[0], p[1]]) == id)
                .then(|| u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
        })
    }

    /// A WINDOW_UPDATE frame's increment.
    pub fn increment(&self) -> Option<u32> {
        (self.ty == WINDOW_UPDATE && self.payload.len() == 4).then(|| {
            u32::from_be_bytes([
                self.payload[0],
                self.payload[1],
                self.payload[2],
                self.payload[3],
            ]) & 0x7fff_ffff
        })
    }
}

/// Reads one frame; `None` when the stream ends or fails first.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        ty: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// What a peer announced at the start of its connection: its first SETTINGS frame's initial
/// stream window and the connection window its WINDOW_UPDATEs on stream 0 added to h2's
/// 65,535. Reads until both came or `frames` frames were read or the stream ended; a peer
/// that keeps h2's initial connection window sends no update, so callers bound the wait.
pub async fn opening_windows<R: AsyncRead + Unpin>(r: &mut R, frames: usize) -> (Option<u32>, u64) {
    let (mut stream_window, mut connection, mut updated) = (None, 65_535u64, false);
    for _ in 0..frames {
        let Some(f) = read_frame(r).await else { break };
        if stream_window.is_none() {
            stream_window = f.setting(INITIAL_WINDOW_SIZE);
        }
        if f.stream == 0 {
            if let Some(inc) = f.increment() {
                connection += u64::from(inc);
                updated = true;
            }
        }
        if stream_window.is_some() && updated {
            break;
        }
    }
    (stream_window, connection)
}
