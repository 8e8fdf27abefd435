//! A response body that keeps something alive for as long as the body is (a request slot
//! released only when the answer has been passed on, or dropped unfinished).

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

pin_project_lite::pin_project! {
    /// `inner`, holding `held` until it is dropped.
    pub struct Held<B, H> {
        #[pin]
        inner: B,
        held: H,
    }
}

impl<B, H> Held<B, H> {
    /// Wraps `inner`; `held` is dropped with the body.
    pub fn new(inner: B, held: H) -> Self {
        Held { inner, held }
    }
}

impl<B: Body, H> Body for Held<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
