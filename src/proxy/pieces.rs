//! Body data held in memory, gathered into pieces: frames under [`PIECE`] bytes are copied
//! together, larger ones are kept as they came (and so is a small frame with no other small
//! one beside it: a small body in one frame, the common case, is not copied).
//!
//! Why (review h42b): hyper hands an HTTP/1.1 chunked body over one frame per chunk, and an
//! h2 body one per DATA frame; held one `Bytes` per frame, a body sent in one-byte chunks cost
//! 32 bytes of bookkeeping per byte of data (1 MiB of data: 32–64 MiB, which the budget of
//! held bodies counts as 1 MiB), each frame also pinning the read buffer it was cut from.
//!
//! Invariants: bytes come out in the order they went in, each once. A piece is a frame as it
//! came (one of at least [`PIECE`] bytes, or a small one with no small frame beside it) or
//! small frames copied together up to `PIECE`; so a body of `n` bytes with `k` frames of at
//! least `PIECE` is at most `n / PIECE + 2k + 1` pieces, and the memory held is the data plus
//! the spare capacity of the piece being filled.

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
    /// The piece being filled with small frames, when more than one came.
    tail: BytesMut,
    /// The one small frame after the closed pieces, as it came (`tail` is then empty).
    lone: Option<Bytes>,
    /// Bytes held, in `done`, `lone` and `tail`.
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
        match self.lone.take() {
            Some(lone) => self.tail.extend_from_slice(&lone),
            None if self.tail.is_empty() => {
                self.lone = Some(data);
                return;
            }
            None => {}
        }
        self.tail.extend_from_slice(&data);
        if self.tail.len() >= PIECE {
            self.close_tail();
        }
    }

    /// Closes the piece being filled, if any.
    fn close_tail(&mut self) {
        if let Some(lone) = self.lone.take() {
            self.done.push_back(lone);
        } else if !self.tail.is_empty() {
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

    /// A small body in one frame is kept as it came.
    #[test]
    fn one_small_frame_is_not_copied() {
        let mut p = Pieces::default();
        let only = Bytes::from(vec![3u8; 100]);
        p.push(only.clone());
        let pieces = p.into_vec();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].as_ptr(), only.as_ptr());
    }

    /// Popping hands the pieces out oldest first, the unfilled one last, and counts down.
    #[test]
    fn pieces_pop_in_order() {
        let mut p = Pieces::default();
        p.push(Bytes::from_static(b"ab"));
        p.push(Bytes::from(vec![1u8; PIECE]));
        p.push(Bytes::from_static(b"cd"));
        p.push(Bytes::from_static(b"e"));
        assert_eq!(p.pop_front().as_deref(), Some(&b"ab"[..]));
        assert_eq!(p.pop_front().map(|x| x.len()), Some(PIECE));
        assert_eq!(p.len(), 3);
        assert_eq!(p.pop_front().as_deref(), Some(&b"cde"[..]));
        assert!(p.is_empty());
        assert_eq!(p.pop_front(), None);
    }
}
