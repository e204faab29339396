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
//! per-user), `Vary: *`, or a `Vary` on a header the route does not declare is never stored.
//!
//! # Statuses
//! The route's list ([`DEFAULT_STATUSES`] unless set) is stored with the route's TTL; any
//! other final status only when its response states its own lifetime, and only while the
//! route did not set its list itself (see [`RoutePolicy::statuses`]). 206 and 304 never.

mod hints;
mod rfc9111;
mod route_policy;
mod routes;
mod template;

pub use hints::{CacheHint, InvalidateTags};
pub(crate) use rfc9111::{decide, extra_vary_names, Decision, Uncacheable, MAX_VARY_NAMES};
pub(crate) use route_policy::Freshness;
pub use route_policy::{RoutePolicy, Scope, DEFAULT_STATUSES};
pub(crate) use routes::Route;
pub use routes::RouteTable;
