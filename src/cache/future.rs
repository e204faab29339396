use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{HeaderMap, Response};
use pin_project_lite::pin_project;

use crate::engine::CacheBody;

type Boxed<B, E> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;
type Annotate = Box<dyn FnOnce(&mut HeaderMap) + Send>;

pin_project! {
    /// The future of [`Cache`](crate::cache::Cache).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        // Requests the cache does not touch: no allocation, no store call (only the tag
        // headers meant for the cache are taken off).
        Passthrough { #[pin] fut: F },
        // Requests that bypass the cache: the inner response, with status headers added.
        Annotated { #[pin] fut: F, annotate: Option<Annotate> },
        // Lookups: the hit path and the miss path (see `Cache::call`), in a `cache.request`
        // span. The span lives here rather than in the boxed future, which it would push
        // past the allocator's small sizes on every hit.
        Cached { fut: Boxed<B, E>, span: tracing::Span },
        // A hit answered in `Cache::call`, before any future was needed.
        Ready { res: Option<Response<CacheBody<B>>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(fut: F) -> Self {
        ResponseFuture {
            state: State::Passthrough { fut },
        }
    }

    pub(crate) fn annotated(
        fut: F,
        annotate: impl FnOnce(&mut HeaderMap) + Send + 'static,
    ) -> Self {
        ResponseFuture {
            state: State::Annotated {
                fut,
                annotate: Some(Box::new(annotate)),
            },
        }
    }

    pub(crate) fn ready(res: Response<CacheBody<B>>) -> Self {
        ResponseFuture {
            state: State::Ready { res: Some(res) },
        }
    }

    pub(crate) fn boxed(fut: Boxed<B, E>, span: tracing::Span) -> Self {
        ResponseFuture {
            state: State::Cached { fut, span },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Passthrough { fut } => {
                let mut res = ready!(fut.poll(cx))?;
                crate::tags::strip_cache_only(res.headers_mut());
                Poll::Ready(Ok(res.map(CacheBody::passthrough)))
            }
            StateProj::Annotated { fut, annotate } => {
                let mut res = ready!(fut.poll(cx))?;
                if let Some(a) = annotate.take() {
                    a(res.headers_mut());
                }
                Poll::Ready(Ok(res.map(CacheBody::passthrough)))
            }
            StateProj::Cached { fut, span } => {
                let _entered = span.enter();
                fut.as_mut().poll(cx)
            }
            StateProj::Ready { res } => Poll::Ready(Ok(res
                .take()
                .expect("ResponseFuture polled after it completed"))),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}
