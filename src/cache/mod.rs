//! The cache-aside middleware: [`CacheLayer`], the [`Cache`] service, its [`ResponseFuture`]
//! and the [`CacheBody`] it answers with.
//!
//! On GET, the layer derives the key and looks it up: a fresh entry is answered without
//! calling the inner service; a miss calls it once, streams the body to the client and, when
//! the response may be stored and fits the size limit, fills the store in the background.
//! HEAD is answered from the GET entry on a hit and never stored. Other methods pass through.

mod body;
mod fill;
mod flights;
mod future;
mod layer;
mod lookup;
mod respond;
mod service;

pub use body::CacheBody;
pub use future::ResponseFuture;
pub(crate) use layer::Shared;
pub use layer::{CacheLayer, DEFAULT_MAX_BODY_BYTES};
#[cfg(feature = "serde")]
pub(crate) use lookup::{Fence, Found};
pub use service::Cache;
