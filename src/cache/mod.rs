//! The cache-aside middleware: [`CacheLayer`], the [`Cache`] service, its [`ResponseFuture`]
//! and the [`CacheBody`] it answers with.
//!
//! On GET, the layer derives the key and looks it up: a fresh entry is answered without
//! calling the inner service; a miss calls it once, streams the body to the client and, when
//! the response may be stored and fits the size limit, fills the store in the background.
//! HEAD is answered from the GET entry on a hit and never stored. Other methods pass through.
//!
//! This module adapts the engine (`crate::engine`) to tower; the decisions are made there.

mod future;
mod layer;
mod service;

pub use crate::engine::{CacheBody, DEFAULT_MAX_BODY_BYTES};
pub use future::ResponseFuture;
pub use layer::CacheLayer;
pub use service::Cache;
