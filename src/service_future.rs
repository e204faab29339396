//! What the futures of [`Invalidate`](crate::invalidate::Invalidate) and
//! [`BodyDigest`](crate::body_digest::BodyDigest) are made of: the inner service's own
//! future for the requests they leave alone (no allocation), or a boxed one for the
//! requests they act on. Each middleware wraps it in its own public `ResponseFuture`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

pin_project! {
    /// The inner future untouched, or a boxed future doing the layer's work around it.
    pub(crate) struct PassthroughOrBoxed<F: Future> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F: Future> {
        Passthrough { #[pin] fut: F },
        Boxed { fut: Pin<Box<dyn Future<Output = F::Output> + Send>> },
    }
}

impl<F: Future> PassthroughOrBoxed<F> {
    pub(crate) fn passthrough(fut: F) -> Self {
        PassthroughOrBoxed {
            state: State::Passthrough { fut },
        }
    }

    pub(crate) fn boxed(fut: impl Future<Output = F::Output> + Send + 'static) -> Self {
        PassthroughOrBoxed {
            state: State::Boxed { fut: Box::pin(fut) },
        }
    }
}

impl<F: Future> Future for PassthroughOrBoxed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project().state.project() {
            StateProj::Passthrough { fut } => fut.poll(cx),
            StateProj::Boxed { fut } => fut.as_mut().poll(cx),
        }
    }
}

impl<F: Future> std::fmt::Debug for PassthroughOrBoxed<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassthroughOrBoxed")
    }
}

/// Declares a middleware's public `ResponseFuture` around [`PassthroughOrBoxed`].
macro_rules! response_future {
    ($(#[$doc:meta])*) => {
        pin_project_lite::pin_project! {
            $(#[$doc])*
            pub struct ResponseFuture<F: std::future::Future> {
                #[pin]
                inner: $crate::service_future::PassthroughOrBoxed<F>,
            }
        }

        impl<F: std::future::Future> ResponseFuture<F> {
            pub(crate) fn passthrough(fut: F) -> Self {
                ResponseFuture {
                    inner: $crate::service_future::PassthroughOrBoxed::passthrough(fut),
                }
            }

            pub(crate) fn boxed(
                fut: impl std::future::Future<Output = F::Output> + Send + 'static,
            ) -> Self {
                ResponseFuture {
                    inner: $crate::service_future::PassthroughOrBoxed::boxed(fut),
                }
            }
        }

        impl<F: std::future::Future> std::future::Future for ResponseFuture<F> {
            type Output = F::Output;

            fn poll(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<F::Output> {
                self.project().inner.poll(cx)
            }
        }

        impl<F: std::future::Future> std::fmt::Debug for ResponseFuture<F> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("ResponseFuture")
            }
        }
    };
}
pub(crate) use response_future;
