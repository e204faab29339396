//! Invalidation on mutations: [`InvalidateLayer`] and its [`Invalidate`] service clear the
//! tags a POST, PUT, PATCH or DELETE names, after the inner service answered and before the
//! response goes out, so a client that got the response reads its own write.
//!
//! # Which tags
//! - the matched route's clear tags for the method ([`RoutePolicy::clears`](crate::RoutePolicy::clears),
//!   [`clears_on`](crate::RoutePolicy::clears_on); by default the route's own tags), filled
//!   from the path parameters;
//! - the target URI's entries (RFC 9111 §4.4), and those of a same-origin `Location` or
//!   `Content-Location` in the response (unless [`clear_uri(false)`](crate::RoutePolicy::clear_uri));
//! - tags the handler emitted: an [`InvalidateTags`](crate::InvalidateTags) response extension
//!   and the `Cache-Group-Invalidation` header (RFC 9875).
//!
//! # On which statuses
//! Every response except 1xx and 4xx clears, and so does an error from the inner service: a
//! 2xx or 3xx means the write happened, and a 5xx or an error may follow a partial write,
//! so stale data must not survive it. A 4xx rejected the request before any write.
//!
//! # When the store cannot be reached
//! The clear is deferred and retried in the background (merged into a purge if too many pile
//! up), and until it lands this instance serves nothing from the store: it never serves
//! data older than a mutation it answered.

mod deferred;
mod layer;
mod service;

pub(crate) use deferred::Deferred;
pub use layer::InvalidateLayer;
pub use service::Invalidate;
