//! [`BodyDigest`]: reads a body-keyed `POST`'s body, up to its route's limit, and hashes it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{Method, Request};
use http_body::Body;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tower_service::Service;

use super::body::{BufferedBody, Kind};
use super::{BoxError, ResponseFuture};
use crate::key::RequestBodyDigest;
use crate::policy::RouteTable;

/// Reads and hashes the bodies of body-keyed `POST`s: up to the route's limit, it puts a
/// digest in the request extensions for the cache key and passes the same
/// bytes on as a [`BufferedBody`]; bodies over the limit, or that fail, go on as they came,
/// with no digest (and so uncached).
#[derive(Clone, Debug)]
pub struct BodyDigest<S> {
    pub(super) inner: S,
    pub(super) routes: Arc<RouteTable>,
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
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limit = (req.method() == Method::POST)
            .then(|| self.routes.find(req.uri().path()).route.policy.body_key)
            .flatten();
        let declared = crate::headers::content_length(req.headers());
        let limit = limit.filter(|l| declared.is_none_or(|d| d <= *l as u64));
        let Some(limit) = limit else {
            return ResponseFuture::passthrough(
                self.inner.call(req.map(BufferedBody::passthrough)),
            );
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(async move {
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
