//! [`BufferedBody`]: a request body as [`BodyDigest`](super::BodyDigest) passes it on.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::BoxError;

pin_project! {
    /// A request body as [`BodyDigest`] passes it on: read whole, read in part and then
    /// streamed, or untouched.
    pub struct BufferedBody<B> {
        #[pin]
        pub(super) kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    pub(super) enum Kind<B> {
        Full { chunks: VecDeque<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: VecDeque<Bytes>, #[pin] rest: B },
        Failed { prefix: VecDeque<Bytes>, error: Option<BoxError> },
        Passthrough { #[pin] inner: B },
    }
}

impl<B> BufferedBody<B> {
    pub(super) fn passthrough(inner: B) -> Self {
        BufferedBody {
            kind: Kind::Passthrough { inner },
        }
    }
}

impl<B> std::fmt::Debug for BufferedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BufferedBody")
    }
}

impl<B> Body for BufferedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let delegate = |rest: Pin<&mut B>, cx: &mut Context<'_>| {
            rest.poll_frame(cx).map(|f| {
                f.map(|r| {
                    r.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                        .map_err(Into::into)
                })
            })
        };
        match self.project().kind.project() {
            KindProj::Full { chunks, trailers } => match chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
            },
            KindProj::Prefixed { prefix, rest } => match prefix.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None => delegate(rest, cx),
            },
            KindProj::Failed { prefix, error } => match prefix.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None => Poll::Ready(error.take().map(Err)),
            },
            KindProj::Passthrough { inner } => delegate(inner, cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full { chunks, trailers } => chunks.is_empty() && trailers.is_none(),
            Kind::Prefixed { prefix, rest } => prefix.is_empty() && rest.is_end_stream(),
            Kind::Failed { prefix, error } => prefix.is_empty() && error.is_none(),
            Kind::Passthrough { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = |c: &VecDeque<Bytes>| c.iter().map(|b| b.len() as u64).sum::<u64>();
        match &self.kind {
            Kind::Full { chunks, .. } => SizeHint::with_exact(buffered(chunks)),
            Kind::Prefixed { prefix, rest } => {
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + buffered(prefix));
                if let Some(u) = r.upper() {
                    h.set_upper(u + buffered(prefix));
                }
                h
            }
            Kind::Failed { prefix, .. } => SizeHint::with_exact(buffered(prefix)),
            Kind::Passthrough { inner } => inner.size_hint(),
        }
    }
}
