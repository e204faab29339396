//! What may be cached and for how long: the route table, per-route policies, handler
//! annotations ([`CacheHint`]) and the HTTP cacheability rules of RFC 9111 for a shared cache.
//!
//! # Precedence of a response's freshness lifetime
//! 1. A [`CacheHint`] the handler put in the response extensions (`ttl`, or `no_store`).
//! 2. `Cache-Control: s-maxage`, then `max-age`, then `Expires` minus `Date`.
//! 3. The TTL of the matched route, else of the table's fallback policy.
//!
//! HTTP's prohibitions always win, whatever the route or the hint says: a response with
//! `Set-Cookie`, `Cache-Control: no-store` or `no-cache`, `private` (unless the route is
//! per-user), `Vary: *`, a `Vary` on a header the route does not declare, or a status outside
//! the route's list is never stored.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{AGE, CACHE_CONTROL, DATE, EXPIRES, SET_COOKIE, VARY};
use http::request::Parts;
use http::{HeaderMap, HeaderName, Method};

use crate::error::ConfigError;

/// The longest tag accepted, in bytes (as Fastly and Cloudflare allow).
pub const MAX_TAG_LEN: usize = 1024;

/// Statuses a shared cache may store without explicit freshness (RFC 9110 §15.1), less 206:
/// the layer passes `Range` requests through, so partial content is never stored.
pub const DEFAULT_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Is `tag` acceptable as a cache tag: 1 to [`MAX_TAG_LEN`] bytes of visible ASCII.
pub fn is_valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= MAX_TAG_LEN && tag.bytes().all(|b| b.is_ascii_graphic())
}

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
    pub(crate) statuses: Vec<u16>,
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) id: Option<String>,
    pub(crate) clears: Option<Vec<String>>,
    pub(crate) clears_on: Vec<(Method, Vec<String>)>,
    pub(crate) clear_uri: bool,
    pub(crate) body_key: Option<usize>,
    pub(crate) grpc: bool,
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
            vary: Vec::new(),
            id: None,
            clears: None,
            clears_on: Vec::new(),
            clear_uri: true,
            body_key: None,
            grpc: false,
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
    /// `max-age`, `Expires`, or a [`CacheHint`] TTL), like a standard shared HTTP cache.
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

    /// The response statuses that may be stored (default: [`DEFAULT_STATUSES`]).
    #[must_use]
    pub fn statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.statuses = statuses.into_iter().collect();
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

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    pub(crate) must_revalidate: bool,
}

impl CacheControl {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // Unreadable directives: assume the strictest reading.
                cc.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                // An unparsable delta-seconds makes the response stale (RFC 9111 §1.2.2).
                let secs = || arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "max-age" => cc.max_age = Some(secs()),
                    "s-maxage" => cc.s_maxage = Some(secs()),
                    "stale-while-revalidate" => cc.stale_while_revalidate = Some(secs()),
                    "stale-if-error" => cc.stale_if_error = Some(secs()),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// What the layer does with a response it fetched on a miss.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Store {
        lifetime: Duration,
        initial_age_s: u32,
        stale_while_revalidate: Duration,
        stale_if_error: Duration,
    },
    Skip(&'static str),
}

/// Applies the rules in the module docs to one response.
pub(crate) fn decide(
    policy: &RoutePolicy,
    status: u16,
    headers: &HeaderMap,
    hint: Option<&CacheHint>,
) -> Decision {
    if !policy.statuses.contains(&status) {
        return Decision::Skip("status");
    }
    if headers.contains_key(SET_COOKIE) {
        return Decision::Skip("set-cookie");
    }
    // A trailers-only gRPC response carries its status in the headers.
    if policy.grpc && headers.get("grpc-status").is_some_and(|s| s != "0") {
        return Decision::Skip("grpc-status");
    }
    if hint.is_some_and(|h| h.no_store) {
        return Decision::Skip("handler-no-store");
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Decision::Skip("no-store");
    }
    if cc.no_cache {
        return Decision::Skip("no-cache");
    }
    if cc.private && !matches!(policy.scope, Scope::PerUser(_)) {
        return Decision::Skip("private");
    }
    for value in headers.get_all(VARY) {
        let Ok(value) = value.to_str() else {
            return Decision::Skip("vary");
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Decision::Skip("vary-star");
            }
            if !policy
                .vary
                .iter()
                .any(|v| v.as_str().eq_ignore_ascii_case(name))
            {
                return Decision::Skip("vary-undeclared");
            }
        }
    }
    let lifetime = hint
        .and_then(|h| h.ttl)
        .or(cc.s_maxage.map(Duration::from_secs))
        .or(cc.max_age.map(Duration::from_secs))
        .or_else(|| expires_lifetime(headers))
        .or(match policy.freshness {
            Freshness::Ttl(ttl) => Some(ttl),
            _ => None,
        });
    let Some(lifetime) = lifetime else {
        return Decision::Skip("no-freshness");
    };
    let initial_age_s = headers
        .get(AGE)
        .and_then(|a| a.to_str().ok())
        .and_then(|a| a.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if lifetime <= Duration::from_secs(u64::from(initial_age_s)) {
        return Decision::Skip("stale");
    }
    // RFC 5861: the response's own windows win over the route's; `must-revalidate` and
    // `proxy-revalidate` forbid serving stale at all.
    let (swr, sie) = if cc.must_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (
            cc.stale_while_revalidate
                .map_or(policy.stale_while_revalidate, Duration::from_secs),
            cc.stale_if_error
                .map_or(policy.stale_if_error, Duration::from_secs),
        )
    };
    Decision::Store {
        lifetime,
        initial_age_s,
        stale_while_revalidate: swr,
        stale_if_error: sie,
    }
}

/// `Expires` minus `Date` (or now, without `Date`); an invalid `Expires` means stale.
fn expires_lifetime(headers: &HeaderMap) -> Option<Duration> {
    let expires = headers.get(EXPIRES)?;
    let parse = |v: &http::HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
    };
    let Some(expires) = parse(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(DATE)
        .and_then(parse)
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

/// A tag with `{param}` placeholders, filled from the matched route's path parameters.
#[derive(Clone, Debug)]
pub(crate) struct TagTemplate {
    parts: Vec<TagPart>,
}

#[derive(Clone, Debug)]
enum TagPart {
    Literal(String),
    Param(String),
}

impl TagTemplate {
    fn parse(template: &str, params: &HashSet<String>, pattern: &str) -> Result<Self, ConfigError> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).ok_or_else(|| {
                ConfigError::new(format!("tag `{template}` has an unclosed `{{`"))
            })?;
            if open > 0 {
                parts.push(TagPart::Literal(rest[..open].to_owned()));
            }
            let name = &rest[open + 1..close];
            if !params.contains(name) {
                return Err(ConfigError::new(format!(
                    "tag `{template}` names `{{{name}}}`, which route `{pattern}` does not have; \
                     use one of its path parameters"
                )));
            }
            parts.push(TagPart::Param(name.to_owned()));
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TagPart::Literal(rest.to_owned()));
        }
        let literal_ok = parts.iter().all(|p| match p {
            TagPart::Literal(l) => l.bytes().all(|b| b.is_ascii_graphic()) && !l.contains('}'),
            TagPart::Param(_) => true,
        });
        if parts.is_empty()
            || !literal_ok
            || template.len() > MAX_TAG_LEN
            || template.starts_with('~')
        {
            return Err(ConfigError::new(format!(
                "tag `{template}` is not valid: tags are 1 to {MAX_TAG_LEN} bytes of visible ASCII, not starting with `~`"
            )));
        }
        Ok(TagTemplate { parts })
    }

    fn render(&self, params: &matchit::Params<'_, '_>) -> Option<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TagPart::Literal(l) => out.push_str(l),
                TagPart::Param(name) => {
                    out.push_str(&crate::percent::decode_for_tags(params.get(name)?));
                }
            }
        }
        is_valid_tag(&out).then_some(out)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) id: Arc<str>,
    pub(crate) policy: RoutePolicy,
    templates: Vec<TagTemplate>,
    clear_templates: Vec<TagTemplate>,
    clear_on_templates: Vec<(Method, Vec<TagTemplate>)>,
}

impl Route {
    /// The route's tags, filled from the path parameters; invalid ones are skipped and logged.
    pub(crate) fn tags(&self, params: &matchit::Params<'_, '_>) -> Vec<String> {
        self.render(&self.templates, params)
    }

    /// The tags a mutation with `method` clears.
    pub(crate) fn clear_tags(
        &self,
        method: &Method,
        params: &matchit::Params<'_, '_>,
    ) -> Vec<String> {
        match self.clear_on_templates.iter().find(|(m, _)| m == method) {
            Some((_, templates)) => self.render(templates, params),
            None => self.render(&self.clear_templates, params),
        }
    }

    fn render(&self, templates: &[TagTemplate], params: &matchit::Params<'_, '_>) -> Vec<String> {
        templates
            .iter()
            .filter_map(|t| {
                let tag = t.render(params);
                if tag.is_none() {
                    tracing::warn!(route = %self.id, "skipping a tag that rendered invalid");
                }
                tag
            })
            .collect()
    }
}

/// Maps path patterns (axum's syntax: `/events/{id}`, `/files/{*path}`) to policies.
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::{RoutePolicy, RouteTable};
///
/// let table = RouteTable::new()
///     .route("/events", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events"]))
///     .route("/events/{id}", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]))
///     .route("/health", RoutePolicy::never())
///     .fallback(RoutePolicy::never());
/// ```
#[derive(Clone)]
pub struct RouteTable {
    router: matchit::Router<usize>,
    routes: Vec<Arc<Route>>,
    fallback: Arc<Route>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.routes)
            .field("fallback", &self.fallback)
            .finish()
    }
}

pub(crate) struct Matched<'t, 'p> {
    pub(crate) route: &'t Arc<Route>,
    pub(crate) params: matchit::Params<'t, 'p>,
}

impl RouteTable {
    /// An empty table whose fallback is [`RoutePolicy::from_response`].
    pub fn new() -> Self {
        RouteTable {
            router: matchit::Router::new(),
            routes: Vec::new(),
            fallback: Arc::new(
                build_route("", RoutePolicy::from_response(), "default").expect("a valid default"),
            ),
        }
    }

    /// Adds a route.
    ///
    /// # Panics
    /// When the pattern is invalid or conflicts with another, a tag names a parameter the
    /// pattern lacks, or the policy is otherwise invalid (the message says which). Use
    /// [`RouteTable::try_route`] to get the error instead.
    #[track_caller]
    pub fn route(self, pattern: &str, policy: RoutePolicy) -> Self {
        match self.try_route(pattern, policy) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// Adds a route, or says why it cannot be added.
    pub fn try_route(mut self, pattern: &str, policy: RoutePolicy) -> Result<Self, ConfigError> {
        let default_id = default_route_id(pattern);
        let route = build_route(pattern, policy, &default_id)?;
        if self.routes.iter().any(|r| r.id == route.id) {
            return Err(ConfigError::new(format!(
                "route id `{}` is used twice; give `{pattern}` its own with RoutePolicy::id",
                route.id
            )));
        }
        self.router
            .insert(pattern, self.routes.len())
            .map_err(|e| ConfigError::new(format!("route `{pattern}` cannot be added: {e}")))?;
        self.routes.push(Arc::new(route));
        Ok(self)
    }

    /// The policy for paths no route matches (default: [`RoutePolicy::from_response`]).
    ///
    /// # Panics
    /// When the policy is invalid or uses tag placeholders (the fallback has no parameters).
    #[track_caller]
    pub fn fallback(mut self, policy: RoutePolicy) -> Self {
        match build_route("", policy, "default") {
            Ok(r) => self.fallback = Arc::new(r),
            Err(e) => panic!("{e}"),
        }
        self
    }

    pub(crate) fn find<'t, 'p>(&'t self, path: &'p str) -> Matched<'t, 'p> {
        match self.router.at(path) {
            Ok(m) => Matched {
                route: &self.routes[*m.value],
                params: m.params,
            },
            Err(_) => Matched {
                route: &self.fallback,
                params: matchit::Params::new(),
            },
        }
    }
}

/// Most `{parameters}` a route pattern may have (the router refuses more than 25, by
/// panicking: refused here with an error first).
const MAX_ROUTE_PARAMS: usize = 16;

fn build_route(pattern: &str, policy: RoutePolicy, default_id: &str) -> Result<Route, ConfigError> {
    if let Some(e) = &policy.error {
        return Err(e.clone());
    }
    if pattern.matches('{').count() > MAX_ROUTE_PARAMS {
        return Err(ConfigError::new(format!(
            "route `{pattern}` has more than {MAX_ROUTE_PARAMS} parameters (or braces); split it"
        )));
    }
    let id = policy.id.clone().unwrap_or_else(|| default_id.to_owned());
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ConfigError::new(format!(
            "route id `{id}` is not valid: use 1 to 64 letters, digits, `_`, `-` or `.`"
        )));
    }
    let params = pattern_params(pattern);
    let parse_all = |tags: &[String]| {
        tags.iter()
            .map(|t| TagTemplate::parse(t, &params, pattern))
            .collect::<Result<Vec<_>, _>>()
    };
    let templates = parse_all(&policy.tags)?;
    let clear_templates = match &policy.clears {
        Some(tags) => parse_all(tags)?,
        None => templates.clone(),
    };
    let clear_on_templates = policy
        .clears_on
        .iter()
        .map(|(m, tags)| Ok((m.clone(), parse_all(tags)?)))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    Ok(Route {
        id: Arc::from(id),
        policy,
        templates,
        clear_templates,
        clear_on_templates,
    })
}

fn pattern_params(pattern: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        out.insert(name.trim_start_matches('*').to_owned());
        rest = &rest[open + close + 1..];
    }
    out
}

/// `/events/{id}/logs` → `events_id_logs`; `/` → `root`.
fn default_route_id(pattern: &str) -> String {
    let mut id = String::new();
    for c in pattern.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            id.push(c);
        } else if !id.is_empty() && !id.ends_with('_') {
            id.push('_');
        }
    }
    let id = id.trim_end_matches('_');
    let mut id = if id.is_empty() {
        "root".to_owned()
    } else {
        id.to_owned()
    };
    id.truncate(64);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_parameters_is_an_error_not_a_panic() {
        let pattern: String = (0..30).map(|i| format!("/{{p{i}}}")).collect();
        let e = RouteTable::new()
            .try_route(&pattern, RoutePolicy::ttl(Duration::from_secs(1)))
            .unwrap_err();
        assert!(e.to_string().contains("parameters"), "{e}");
        let fine: String = (0..16).map(|i| format!("/{{p{i}}}")).collect();
        assert!(RouteTable::new()
            .try_route(&fine, RoutePolicy::ttl(Duration::from_secs(1)))
            .is_ok());
    }
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ttl(s: u64) -> RoutePolicy {
        RoutePolicy::ttl(Duration::from_secs(s))
    }

    #[test]
    fn lifetime_precedence() {
        let p = ttl(300);
        let store = |l| Decision::Store {
            lifetime: Duration::from_secs(l),
            initial_age_s: 0,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        };
        assert_eq!(decide(&p, 200, &headers(&[]), None), store(300));
        assert_eq!(
            decide(&p, 200, &headers(&[("cache-control", "max-age=10")]), None),
            store(10)
        );
        assert_eq!(
            decide(
                &p,
                200,
                &headers(&[("cache-control", "max-age=10, s-maxage=20")]),
                None
            ),
            store(20)
        );
        let hint = CacheHint::ttl(Duration::from_secs(5));
        assert_eq!(
            decide(
                &p,
                200,
                &headers(&[("cache-control", "s-maxage=20")]),
                Some(&hint)
            ),
            store(5)
        );
        assert_eq!(
            decide(
                &p,
                200,
                &headers(&[("cache-control", "max-age=oops")]),
                None
            ),
            Decision::Skip("stale")
        );
        let h = headers(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
        ]);
        assert_eq!(decide(&p, 200, &h, None), store(60));
        assert_eq!(
            decide(&RoutePolicy::from_response(), 200, &headers(&[]), None),
            Decision::Skip("no-freshness")
        );
        assert_eq!(
            decide(
                &p,
                200,
                &headers(&[("age", "100"), ("cache-control", "max-age=150")]),
                None
            ),
            Decision::Store {
                lifetime: Duration::from_secs(150),
                initial_age_s: 100,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            }
        );
    }

    #[test]
    fn stale_windows() {
        let p = ttl(60)
            .stale_while_revalidate(Duration::from_secs(10))
            .stale_if_error(Duration::from_secs(300));
        let windows = |h: &[(&str, &str)]| match decide(&p, 200, &headers(h), None) {
            Decision::Store {
                stale_while_revalidate,
                stale_if_error,
                ..
            } => (stale_while_revalidate.as_secs(), stale_if_error.as_secs()),
            other => panic!("{other:?}"),
        };
        assert_eq!(windows(&[]), (10, 300));
        assert_eq!(
            windows(&[(
                "cache-control",
                "max-age=5, stale-while-revalidate=30, stale-if-error=86400"
            )]),
            (30, 86400)
        );
        assert_eq!(
            windows(&[("cache-control", "max-age=5, must-revalidate")]),
            (0, 0)
        );
    }

    #[test]
    fn prohibitions_win() {
        let p = ttl(300);
        let hint = CacheHint::ttl(Duration::from_secs(5));
        for (h, why) in [
            (("set-cookie", "a=b"), "set-cookie"),
            (("cache-control", "no-store"), "no-store"),
            (("cache-control", "No-Cache"), "no-cache"),
            (("cache-control", "private, max-age=60"), "private"),
            (("vary", "*"), "vary-star"),
            (("vary", "accept-encoding"), "vary-undeclared"),
        ] {
            assert_eq!(
                decide(&p, 200, &headers(&[h]), Some(&hint)),
                Decision::Skip(why),
                "{h:?}"
            );
        }
        assert_eq!(
            decide(&p, 500, &headers(&[]), None),
            Decision::Skip("status")
        );
        assert_eq!(
            decide(&p, 206, &headers(&[]), None),
            Decision::Skip("status")
        );
        assert_eq!(
            decide(&p, 200, &headers(&[]), Some(&CacheHint::no_store())),
            Decision::Skip("handler-no-store")
        );
        let per_user = ttl(300).per_user(|_| None);
        assert!(matches!(
            decide(
                &per_user,
                200,
                &headers(&[("cache-control", "private")]),
                None
            ),
            Decision::Store { .. }
        ));
        let varying = ttl(300).vary(["Accept-Encoding"]);
        assert!(matches!(
            decide(
                &varying,
                200,
                &headers(&[("vary", "Accept-Encoding")]),
                None
            ),
            Decision::Store { .. }
        ));
    }

    #[test]
    fn route_table_matches_and_renders_tags() {
        let t = RouteTable::new().route("/events/{id}", ttl(300).tags(["events", "event:{id}"]));
        let m = t.find("/events/42");
        assert_eq!(&*m.route.id, "events_id");
        assert_eq!(
            m.route.tags(&m.params),
            vec!["events".to_owned(), "event:42".to_owned()]
        );
        let m = t.find("/nope");
        assert_eq!(&*m.route.id, "default");
        assert_eq!(m.route.policy.freshness, Freshness::FromResponse);
    }

    #[test]
    fn clear_rules_per_method() {
        let t = RouteTable::new().route(
            "/events/{id}",
            ttl(300)
                .tags(["events", "event:{id}"])
                .clears_on(Method::PATCH, ["event:{id}"])
                .clears_on(Method::POST, Vec::<String>::new()),
        );
        let m = t.find("/events/5");
        assert_eq!(
            m.route.clear_tags(&Method::DELETE, &m.params),
            ["events", "event:5"]
        );
        assert_eq!(m.route.clear_tags(&Method::PATCH, &m.params), ["event:5"]);
        assert!(m.route.clear_tags(&Method::POST, &m.params).is_empty());
        let t = RouteTable::new().route(
            "/users/{id}/permissions",
            RoutePolicy::never().clears(["user:{id}"]),
        );
        let m = t.find("/users/9/permissions");
        assert_eq!(m.route.clear_tags(&Method::PUT, &m.params), ["user:9"]);
        let e = RouteTable::new()
            .try_route("/a/{id}", ttl(1).clears(["x:{nope}"]))
            .unwrap_err();
        assert!(e.to_string().contains("does not have"));
    }

    #[test]
    fn configuration_errors_are_clear() {
        let e = RouteTable::new()
            .try_route("/events/{id}", ttl(1).tags(["event:{nope}"]))
            .unwrap_err();
        assert!(e.to_string().contains("does not have"), "{e}");
        let e = RouteTable::new()
            .try_route("/a", ttl(1).tags(["has space"]))
            .unwrap_err();
        assert!(e.to_string().contains("visible ASCII"), "{e}");
        let e = RouteTable::new()
            .try_route("/a", ttl(1).vary(["bad header"]))
            .unwrap_err();
        assert!(e.to_string().contains("header name"), "{e}");
        let e = RouteTable::new()
            .route("/a/{id}", ttl(1))
            .try_route("/a/{name}", ttl(1).id("other"))
            .unwrap_err();
        assert!(e.to_string().contains("cannot be added"), "{e}");
        let e = RouteTable::new()
            .route("/a/b", ttl(1))
            .try_route("/a_b", ttl(1))
            .unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
    }

    #[test]
    fn default_ids() {
        assert_eq!(default_route_id("/"), "root");
        assert_eq!(default_route_id("/servers/{id}/logs"), "servers_id_logs");
        assert_eq!(default_route_id("/files/{*path}"), "files_path");
    }
}
