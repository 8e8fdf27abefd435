//! Body data held in memory, gathered into pieces: frames under [`PIECE`] bytes are copied
//! together, larger ones are kept as they came.
//!
//! Why (review h42b): hyper hands an HTTP/1.1 chunked body over one frame per chunk, and an
//! h2 body one per DATA frame; held one `Bytes` per frame, a body sent in one-byte chunks cost
//! 32 bytes of bookkeeping per byte of data (1 MiB of data: 32–64 MiB, which the budget of
//! held bodies counts as 1 MiB), each frame also pinning the read buffer it was cut from.
//!
//! Invariants: bytes come out in the order they went in, each once; every piece but the last
//! holds at least [`PIECE`] bytes or is one frame as it came, so a body of `n` bytes is at
//! most `n / PIECE + frames of at least PIECE + 1` pieces, and the memory held is the data
//! plus at most one piece's spare capacity.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Frames smaller than this are copied into the piece being filled; a piece is closed once
/// it holds this much.
pub const PIECE: usize = 16 * 1024;

/// Held body data, in order.
#[derive(Default)]
pub struct Pieces {
    /// Closed pieces, oldest first.
    done: VecDeque<Bytes>,
    /// The piece being filled with small frames.
    tail: BytesMut,
    /// Bytes held, in `done` and `tail`.
    len: u64,
}

impl Pieces {
    /// Appends `data` (copied if it is small, kept as it is otherwise).
    pub fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len() as u64;
        if data.len() >= PIECE {
            self.close_tail();
            self.done.push_back(data);
            return;
        }
        self.tail.extend_from_slice(&data);
        if self.tail.len() >= PIECE {
            self.close_tail();
        }
    }

    fn close_tail(&mut self) {
        if !self.tail.is_empty() {
            let piece = self.tail.split().freeze();
            self.done.push_back(piece);
        }
    }

    /// Takes the oldest piece.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        if self.done.is_empty() {
            self.close_tail();
        }
        let piece = self.done.pop_front()?;
        self.len -= piece.len() as u64;
        Some(piece)
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every piece, in order.
    pub fn into_vec(mut self) -> Vec<Bytes> {
        self.close_tail();
        self.done.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 one-byte frames make a handful of pieces, the bytes in order; a large frame is
    /// kept as it came (no copy), between the small ones around it.
    #[test]
    fn tiny_frames_are_gathered_and_large_ones_kept() {
        let mut p = Pieces::default();
        for i in 0..100_000u32 {
            p.push(Bytes::from(vec![(i % 251) as u8]));
        }
        let large = Bytes::from(vec![7u8; 3 * PIECE]);
        p.push(large.clone());
        p.push(Bytes::from_static(b"end"));
        p.push(Bytes::new());
        assert_eq!(p.len(), 100_000 + 3 * PIECE as u64 + 3);
        let pieces = p.into_vec();
        assert!(
            pieces.len() <= 100_000 / PIECE + 3,
            "{} pieces",
            pieces.len()
        );
        assert!(
            pieces.iter().any(|x| x.as_ptr() == large.as_ptr()),
            "copied"
        );
        let all: Vec<u8> = pieces.concat();
        assert!(all[..100_000]
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8));
        assert_eq!(&all[all.len() - 3..], b"end");
    }

    /// Popping hands the pieces out oldest first, the unfilled one last, and counts down.
    #[test]
    fn pieces_pop_in_order() {
        let mut p = Pieces::default();
        p.push(Bytes::from_static(b"ab"));
        p.push(Bytes::from(vec![1u8; PIECE]));
        p.push(Bytes::from_static(b"cd"));
        assert_eq!(p.pop_front().as_deref(), Some(&b"ab"[..]));
        assert_eq!(p.pop_front().map(|x| x.len()), Some(PIECE));
        assert_eq!(p.len(), 2);
        assert_eq!(p.pop_front().as_deref(), Some(&b"cd"[..]));
        assert!(p.is_empty());
        assert_eq!(p.pop_front(), None);
    }
}
