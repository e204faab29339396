//! Invalidation on mutations: [`InvalidateLayer`] and its [`Invalidate`] service clear the
//! tags a POST, PUT, PATCH or DELETE names, after the inner service answered and before the
//! response goes out, so a client that got the response reads its own write.
//!
//! The rules (which tags, on which statuses, when the store cannot be reached) are on
//! [`InvalidateLayer`].

mod deferred;
mod layer;
mod service;

pub(crate) use deferred::Deferred;
pub use layer::InvalidateLayer;
pub use service::Invalidate;
