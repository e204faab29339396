//! [`RoutePolicy`]: how one route is cached, and [`Scope`]: whose entry a response is.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, Method, StatusCode};

use crate::error::ConfigError;

/// Statuses a shared cache may store without explicit freshness (RFC 9110 §15.1), less 206:
/// the layer passes `Range` requests through, so partial content is never stored.
pub const DEFAULT_STATUSES: [StatusCode; 11] = [
    StatusCode::OK,
    StatusCode::NON_AUTHORITATIVE_INFORMATION,
    StatusCode::NO_CONTENT,
    StatusCode::MULTIPLE_CHOICES,
    StatusCode::MOVED_PERMANENTLY,
    StatusCode::PERMANENT_REDIRECT,
    StatusCode::NOT_FOUND,
    StatusCode::METHOD_NOT_ALLOWED,
    StatusCode::GONE,
    StatusCode::URI_TOO_LONG,
    StatusCode::NOT_IMPLEMENTED,
];

type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Whose response a cached entry is, and so who may be served it.
///
/// Put the cache layer inside your authentication layer, so that the extensions a per-user
/// function reads are already set when the cache sees the request.
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::{RoutePolicy, Scope};
///
/// #[derive(Clone)]
/// struct UserId(u64); // put in the request extensions by your auth layer
///
/// let per_user = RoutePolicy::ttl(Duration::from_secs(60))
///     .scope(Scope::per_user(|parts| parts.extensions.get::<UserId>().map(|u| u.0.to_string())));
/// let for_everyone = RoutePolicy::ttl(Duration::from_secs(600)).scope(Scope::Public);
/// ```
#[derive(Clone, Default)]
pub enum Scope {
    /// One entry for everyone. Requests carrying `Authorization` or `Cookie` bypass the cache
    /// (they might see something personal). This is the default.
    #[default]
    Shared,
    /// One entry for everyone, including requests with credentials: declare this only for
    /// routes whose response does not depend on who asks.
    Public,
    /// One entry per user. The function names the user from the request (for example a user
    /// id that an authentication layer put in the extensions). A request with credentials for
    /// which it returns `None` bypasses the cache; one without credentials shares an
    /// anonymous entry. `Cache-Control: private` responses are stored on such routes.
    PerUser(Arc<ScopeFn>),
}

impl Scope {
    /// A per-user scope from a function of the request.
    pub fn per_user<F>(f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Scope::PerUser(Arc::new(f))
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Shared => "Shared",
            Scope::Public => "Public",
            Scope::PerUser(_) => "PerUser(..)",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// Never looked up, never stored.
    Never,
    /// Stored only when the response itself gives a lifetime (hint or headers).
    FromResponse,
    /// Stored for this long unless the response says otherwise.
    Ttl(Duration),
}

/// How one route is cached: TTL, tags, scope, statuses kept and declared `Vary` headers.
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::RoutePolicy;
///
/// let policy = RoutePolicy::ttl(Duration::from_secs(300))
///     .tags(["events", "event:{id}"])
///     .statuses([200, 404])
///     .vary(["accept-language"]);
/// ```
#[derive(Clone, Debug)]
pub struct RoutePolicy {
    pub(crate) freshness: Freshness,
    pub(crate) tags: Vec<String>,
    pub(crate) scope: Scope,
    pub(crate) statuses: Vec<StatusCode>,
    /// Whether `statuses` was set: then it is the whole list, explicit freshness or not.
    pub(crate) statuses_chosen: bool,
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) id: Option<String>,
    pub(crate) clears: Option<Vec<String>>,
    pub(crate) clears_on: Vec<(Method, Vec<String>)>,
    pub(crate) clear_uri: bool,
    pub(crate) body_key: Option<usize>,
    pub(crate) grpc: bool,
    pub(crate) etag: bool,
    pub(crate) keep: Duration,
    /// Fetch the hottest entries a clear made dead again, in the background.
    pub(crate) refresh_after_clear: bool,
    pub(crate) compress: Option<crate::compress::Encoding>,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    pub(crate) error: Option<ConfigError>,
}

impl RoutePolicy {
    fn with(freshness: Freshness) -> Self {
        RoutePolicy {
            freshness,
            tags: Vec::new(),
            scope: Scope::Shared,
            statuses: DEFAULT_STATUSES.to_vec(),
            statuses_chosen: false,
            vary: Vec::new(),
            id: None,
            clears: None,
            clears_on: Vec::new(),
            clear_uri: true,
            body_key: None,
            grpc: false,
            etag: true,
            keep: Duration::from_secs(10),
            refresh_after_clear: false,
            compress: None,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            error: None,
        }
    }

    /// Cache responses for `ttl` unless the response sets its own lifetime.
    pub fn ttl(ttl: Duration) -> Self {
        if ttl.is_zero() {
            return Self::with(Freshness::FromResponse);
        }
        Self::with(Freshness::Ttl(ttl))
    }

    /// Cache a response only when it gives its own lifetime (`Cache-Control: s-maxage` or
    /// `max-age`, `Expires`, or a [`CacheHint`](crate::CacheHint) TTL), like a standard shared HTTP cache.
    /// This is the default for routes the table does not name.
    pub fn from_response() -> Self {
        Self::with(Freshness::FromResponse)
    }

    /// Never cache this route: no lookup, no fill.
    pub fn never() -> Self {
        Self::with(Freshness::Never)
    }

    /// Adds tags. A tag may name path parameters of the route: `event:{id}`.
    #[must_use]
    pub fn tags<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Sets who may be served an entry (see [`Scope`]).
    #[must_use]
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// One entry per user, named by `f` (shorthand for [`Scope::per_user`]).
    #[must_use]
    pub fn per_user<F>(self, f: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.scope(Scope::per_user(f))
    }

    /// Stores bodies compressed with `encoding` (opt-in; see also
    /// [`CacheLayer::compress`](crate::CacheLayer::compress) for every route). A text-like
    /// body of at least [`MIN_COMPRESS_BYTES`](crate::MIN_COMPRESS_BYTES) is compressed once,
    /// when filled; each hit is served in the client's best accepted coding: the stored
    /// bytes as they are, or decompressed for a client that accepts none, with
    /// `Vary: Accept-Encoding`, `Content-Length` and a representation's own `ETag` right.
    /// Bodies the handler compressed itself are stored as they are and served the same way.
    /// `Accept-Encoding` is then never part of the key: one entry serves every client.
    #[must_use]
    pub fn compress(mut self, encoding: crate::compress::Encoding) -> Self {
        self.compress = Some(encoding);
        self
    }

    /// How long an entry with a validator (`ETag` or `Last-Modified`) stays stored after
    /// its freshness and stale windows have passed (default 10 s, as Varnish's default
    /// grace; Varnish calls this `keep`). A request that finds it then does not fetch it again: it asks the origin
    /// with `If-None-Match` / `If-Modified-Since`, and a `304` makes the stored response
    /// fresh again without its body crossing. Worth it for large bodies from handlers that
    /// answer conditional requests (tower-http's `ServeDir`, a handler checking
    /// `If-None-Match`). Entries in their stale windows are revalidated the same way.
    #[must_use]
    pub fn keep(mut self, keep: Duration) -> Self {
        self.keep = keep;
        self
    }

    /// After a clear made this route's entries dead, fetch the hottest of them again in the
    /// background (default off), so that the next reader hits instead of waiting for the
    /// origin. Needs a [`Warmer`](crate::Warmer) registered with
    /// [`Warmer::refresh_after_clears`](crate::Warmer::refresh_after_clears). The instance
    /// that made the clear does it, from its record of the most requested keys; each entry
    /// is fetched through the cached service, so its flight (and lease, when configured)
    /// keeps it to one origin call.
    #[must_use]
    pub fn refresh_after_clear(mut self, on: bool) -> Self {
        self.refresh_after_clear = on;
        self
    }

    /// Whether a stored response that has no `ETag` gets a strong one made from its body's
    /// digest (default on), so that clients can revalidate with `If-None-Match` and get a
    /// `304`. The tag is the same on every instance and after restarts. Turn it off for a
    /// route whose clients must see no validator the handler did not send.
    #[must_use]
    pub fn etag(mut self, on: bool) -> Self {
        self.etag = on;
        self
    }

    /// The response statuses that may be stored, as numbers. By default the statuses of
    /// [`DEFAULT_STATUSES`] are stored with the route's TTL, and any other final status
    /// (a 302, a 503...) when its response states its own lifetime (`max-age`, `s-maxage`,
    /// `Expires`, a [`CacheHint`](crate::CacheHint) TTL), as RFC 9111 allows. Once set,
    /// only the listed statuses are stored, whatever the response says. A number that is not
    /// a status code (outside 100–999) makes the route invalid.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_cache_aside::{RoutePolicy, DEFAULT_STATUSES};
    ///
    /// // The defaults, and 500 as well.
    /// let policy = RoutePolicy::ttl(Duration::from_secs(5))
    ///     .statuses(DEFAULT_STATUSES.map(|s| s.as_u16()).into_iter().chain([500]));
    /// ```
    #[must_use]
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.statuses.clear();
        self.statuses_chosen = true;
        for code in statuses {
            match StatusCode::from_u16(code) {
                Ok(s) => self.statuses.push(s),
                Err(_) => {
                    self.error.get_or_insert(ConfigError::new(format!(
                        "`{code}` is not a status code: use 100 to 999 in RoutePolicy::statuses"
                    )));
                }
            }
        }
        self
    }

    /// Request headers that select the response: their values become part of the key, and
    /// responses may `Vary` on them. A response that varies on any other header is not stored.
    #[must_use]
    pub fn vary<I, T>(mut self, headers: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        for h in headers {
            match HeaderName::from_bytes(h.as_ref().trim().as_bytes()) {
                Ok(name) => self.vary.push(name),
                Err(_) => {
                    self.error.get_or_insert(ConfigError::new(format!(
                        "`{}` is not a valid header name in RoutePolicy::vary",
                        h.as_ref()
                    )));
                }
            }
        }
        self
    }

    /// The tags a successful POST, PUT, PATCH or DELETE on this route clears (by default the
    /// route's own [`tags`](RoutePolicy::tags)). Templates name path parameters: `event:{id}`.
    #[must_use]
    pub fn clears<I, T>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.clears = Some(tags.into_iter().map(Into::into).collect());
        self
    }

    /// The tags a mutation with this method clears, instead of [`clears`](RoutePolicy::clears):
    /// narrow (`[]`) or widen one method's reach.
    #[must_use]
    pub fn clears_on<I, T>(mut self, method: Method, tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.clears_on.retain(|(m, _)| *m != method);
        self.clears_on
            .push((method, tags.into_iter().map(Into::into).collect()));
        self
    }

    /// Whether a mutation also clears the cached entries of its own URI (RFC 9111 §4.4; on
    /// by default). The URI is host and path: every query variant and every user's entry.
    #[must_use]
    pub fn clear_uri(mut self, on: bool) -> Self {
        self.clear_uri = on;
        self
    }

    /// For this long after an entry goes stale, serve it at once and refresh it in the
    /// background, one request per key (RFC 5861 `stale-while-revalidate`; a response's own
    /// directive wins). Default: off.
    #[must_use]
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = window;
        self
    }

    /// For this long after an entry goes stale, serve it when the inner service fails (a 5xx
    /// or an error) instead of the failure (RFC 5861 `stale-if-error`; a response's own
    /// directive wins). Default: off.
    #[must_use]
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window;
        self
    }

    /// Treats `POST` on this route as an idempotent read: cached, keyed by a SHA-256 of the
    /// request body as well, and never a mutation. Needs [`CacheLayer::body_digest_layer`](crate::CacheLayer::body_digest_layer)
    /// outside the cache layer, which reads bodies of at most `max_bytes` (larger ones pass
    /// through uncached).
    #[must_use]
    pub fn keyed_by_body(mut self, max_bytes: usize) -> Self {
        self.body_key = Some(max_bytes);
        self
    }

    /// A unary gRPC method whose result may be cached: keyed by its request message (at most
    /// 64 KiB) and by the compression the client accepts (`grpc-accept-encoding`: a reply
    /// compressed for one client must not reach one that cannot read it), and stored only
    /// when it succeeded (`grpc-status: 0`, usually a trailer, which is stored and replayed).
    #[must_use]
    pub fn grpc(mut self) -> Self {
        self.body_key = Some(64 * 1024);
        self.grpc = true;
        let accepts = HeaderName::from_static("grpc-accept-encoding");
        if !self.vary.contains(&accepts) {
            self.vary.push(accepts);
        }
        self
    }

    /// Names the route in store keys (`{namespace}:{schema}:e:{id}:{digest}`); by default it
    /// is derived from the pattern. Letters, digits, `_`, `-` and `.` only.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}
