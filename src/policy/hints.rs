//! What a handler tells the layer in its response extensions: [`CacheHint`] for the entry,
//! [`InvalidateTags`] for a mutation's clears.

use std::time::Duration;

/// A handler's own caching instructions, put in the response extensions.
///
/// ```
/// use std::time::Duration;
/// use http::Response;
/// use tower_cache_aside::CacheHint;
///
/// let mut res = Response::new("hello");
/// res.extensions_mut().insert(CacheHint::ttl(Duration::from_secs(30)).tag("greeting"));
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CacheHint {
    pub(crate) ttl: Option<Duration>,
    pub(crate) tags: Vec<String>,
    pub(crate) no_store: bool,
}

impl CacheHint {
    /// Store this response for `ttl` (overrides the route and `Cache-Control`).
    pub fn ttl(ttl: Duration) -> Self {
        CacheHint {
            ttl: Some(ttl),
            ..Default::default()
        }
    }

    /// Do not store this response.
    pub fn no_store() -> Self {
        CacheHint {
            no_store: true,
            ..Default::default()
        }
    }

    /// Adds a tag to the stored entry (in addition to the route's tags).
    #[must_use]
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
}

/// Tags a handler asks to clear after its mutation, put in the response extensions: for
/// effects wider than its route's own tags (the `Cache-Group-Invalidation` header of
/// RFC 9875 does the same).
///
/// ```
/// use http::Response;
/// use tower_cache_aside::InvalidateTags;
///
/// let mut res = Response::new("permissions updated");
/// res.extensions_mut().insert(InvalidateTags::new(["user:42", "dashboard"]));
/// ```
#[derive(Clone, Debug, Default)]
pub struct InvalidateTags(pub(crate) Vec<String>);

impl InvalidateTags {
    /// Tags to clear.
    pub fn new<I, T>(tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        InvalidateTags(tags.into_iter().map(Into::into).collect())
    }
}
