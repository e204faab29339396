//! Invalidation on mutations: [`InvalidateLayer`] and its [`Invalidate`] service clear the
//! tags a POST, PUT, PATCH, DELETE (or any method not known to be safe) names, after the
//! inner service answered and before the response goes out, so a client that got the
//! response reads its own write.
//!
//! The rules (which tags, on which statuses, when the store cannot be reached) are on
//! [`InvalidateLayer`].

mod layer;
mod service;

pub use layer::InvalidateLayer;
pub use service::Invalidate;

crate::service_future::response_future! {
    /// The future of [`Invalidate`]: the inner future untouched for requests that clear
    /// nothing, else the inner call followed by the clear.
}
