//! Reading and hashing request bodies for body-keyed routes (cacheable `POST`s such as gRPC
//! unary calls): [`BodyDigestLayer`], its [`BodyDigest`] service and the [`BufferedBody`] it
//! hands on. The layer sits outside [`CacheLayer`](crate::CacheLayer): it reads the body of a
//! `POST` to a route that opted in (up to that route's limit), puts a [`RequestBodyDigest`]
//! in the request extensions for the cache key, and passes the same bytes on. Bodies over the
//! limit, or that fail, are passed on as they come, with no digest (and so uncached).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

use crate::policy::RouteTable;
use crate::service_future::PassthroughOrBoxed;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The SHA-256 of a request body, put in the request extensions by [`BodyDigest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestBodyDigest(pub(crate) [u8; 32]);

/// Makes [`BodyDigest`] services; from [`CacheLayer::body_digest_layer`](crate::CacheLayer::body_digest_layer).
#[derive(Clone, Debug)]
#[must_use]
pub struct BodyDigestLayer {
    routes: Arc<RouteTable>,
}

impl BodyDigestLayer {
    pub(crate) fn new(routes: RouteTable) -> Self {
        BodyDigestLayer {
            routes: Arc::new(routes),
        }
    }
}

impl<S> Layer<S> for BodyDigestLayer {
    type Service = BodyDigest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDigest {
            inner,
            routes: self.routes.clone(),
        }
    }
}

/// Reads and hashes the bodies of body-keyed `POST`s: up to the route's limit, it puts a
/// [`RequestBodyDigest`] in the request extensions for the cache key and passes the same
/// bytes on as a [`BufferedBody`]; bodies over the limit, or that fail, go on as they came,
/// with no digest (and so uncached).
#[derive(Clone, Debug)]
pub struct BodyDigest<S> {
    inner: S,
    routes: Arc<RouteTable>,
}

impl<S, B> Service<Request<B>> for BodyDigest<S>
where
    S: Service<Request<BufferedBody<B>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = PassthroughOrBoxed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = (req.method() == Method::POST)
            .then(|| self.routes.find(req.uri().path()).route.policy.body_key)
            .flatten();
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = limit.filter(|l| declared.is_none_or(|d| d <= *l as u64));
        let Some(limit) = limit else {
            return PassthroughOrBoxed::passthrough(
                self.inner.call(req.map(BufferedBody::passthrough)),
            );
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        PassthroughOrBoxed::boxed(async move {
            let (mut parts, body) = req.into_parts();
            let body = read_body(body, limit).await;
            if let Some(digest) = body.digest {
                parts.extensions.insert(RequestBodyDigest(digest));
            }
            inner.call(Request::from_parts(parts, body.body)).await
        })
    }
}

struct Read<B> {
    body: BufferedBody<B>,
    digest: Option<[u8; 32]>,
}

/// Reads up to `limit` bytes: the whole body with its digest, or what was read followed by
/// the rest, undigested.
async fn read_body<B>(mut body: B, limit: usize) -> Read<B>
where
    B: Body + Unpin + Send,
    B::Error: Into<BoxError>,
{
    let mut chunks = VecDeque::new();
    let mut size = 0;
    let mut hash = Sha256::new();
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                return Read {
                    body: BufferedBody {
                        kind: Kind::Failed {
                            prefix: chunks,
                            error: Some(e.into()),
                        },
                    },
                    digest: None,
                }
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    size += data.len();
                    hash.update(&data);
                    chunks.push_back(data);
                    if size > limit {
                        let body = BufferedBody {
                            kind: Kind::Prefixed {
                                prefix: chunks,
                                rest: body,
                            },
                        };
                        return Read { body, digest: None };
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        // Request trailers (rare) select the response too.
                        for (name, value) in &t {
                            hash.update((name.as_str().len() as u64).to_le_bytes());
                            hash.update(name.as_str());
                            hash.update((value.len() as u64).to_le_bytes());
                            hash.update(value.as_bytes());
                        }
                        trailers = Some(t);
                    }
                }
            },
        }
    }
    Read {
        body: BufferedBody {
            kind: Kind::Full { chunks, trailers },
        },
        digest: Some(hash.finalize().into()),
    }
}

pin_project! {
    /// A request body as [`BodyDigest`] passes it on: read whole, read in part and then
    /// streamed, or untouched.
    pub struct BufferedBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Full { chunks: VecDeque<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: VecDeque<Bytes>, #[pin] rest: B },
        Failed { prefix: VecDeque<Bytes>, error: Option<BoxError> },
        Passthrough { #[pin] inner: B },
    }
}

impl<B> BufferedBody<B> {
    fn passthrough(inner: B) -> Self {
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
