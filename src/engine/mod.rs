//! The engine: every decision the cache makes, behind the middlewares that adapt it to tower.
//!
//! [`Engine`] is the state one [`CacheLayer`](crate::CacheLayer) and everything it made
//! share (its store, route table, counters, breaker, flights and deferred clears). The
//! adapters (`cache/`, `invalidate/`, `body_digest/`, `handle`) call it and never the
//! reverse. One step per file, in the order a request meets them:
//!
//! - `plan`: before anything is awaited, skip, bypass (and why) or look up under which key;
//! - `lookup`: the one store round trip that says hit, stale or miss (and the breaker, and
//!   clears still deferred);
//! - `serve`: a looked-up request top to bottom: hit, stale while refreshed, or the miss
//!   path; a URL whose responses vary is looked up again under its variant's key (`vary`);
//! - `miss`: the origin call, once per key (`flights`), with stale-if-error, refreshes and
//!   revalidation of stale entries (`revalidate`);
//! - `admit`: whether a miss's response may be stored, the entry it becomes and where;
//! - `body`: the response body, streaming to the client while a copy is kept for the fill;
//! - `fill`: the fenced write to the store, in the background;
//! - `respond`: a stored entry answered as a response, in the client's coding, or as a
//!   `304` (`conditional`);
//! - `status`: the `Cache-Status` and `X-Cache` headers, from one [`Status`];
//! - `clear`: tag clears and purges, deferred and retried when the store is away.
//!
//! Below it: `policy` (what may be stored), `key`, `tags`, `entry`, `store`, `stats` and
//! `breaker` (whether to talk to the store at all).

/// The route id `get_or_fill` keys its values under: one no route can have (route ids are
/// letters, digits, `_`, `-` and `.`), so a value's key never equals a request's.
pub(crate) const VALUES_ROUTE: &str = "@data";

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use crate::breaker::Breaker;
use crate::key::QueryFilter;
use crate::policy::RouteTable;
use crate::stats::{CacheStats, RouteCounters};

mod admit;
mod body;
mod clear;
mod conditional;
mod fill;
mod flights;
mod hot;
// Only the admin service (feature `serde`) inspects.
#[cfg(feature = "serde")]
mod inspect;
mod lookup;
mod miss;
mod plan;
mod respond;
mod revalidate;
mod serve;
mod status;
mod vary;

pub use body::CacheBody;
pub use clear::RecentClear;
pub(crate) use clear::{Clear, Deferred, Recent};
pub(crate) use hot::{Hot, Recorded, Refresh, Warming, MAX_REFRESH};
#[cfg(feature = "serde")]
pub(crate) use inspect::Inspection;
pub(crate) use lookup::{Begun, Found};
pub(crate) use miss::OriginCall;
pub(crate) use plan::{Bypass, Plan};
pub(crate) use respond::as_stored;
pub(crate) use status::{Status, CACHE_STATUS};

/// How many of the most requested keys each layer records, by default.
pub(crate) const DEFAULT_HOT_KEYS: usize = 1024;
/// The most keys a record may keep (each flush rewrites the store's record: its cost on the
/// server grows with it).
pub(crate) const MAX_HOT_KEYS: usize = 65_536;
/// How often each instance adds its counts to the store's record, by default.
pub(crate) const DEFAULT_HOT_FLUSH: Duration = Duration::from_secs(30);

/// Default largest body stored (larger ones stream through unstored).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// What one layer and everything it made share. The builder (`CacheLayer`) edits a copy
/// before the first service is made; afterwards it is read-only but for its atomics and
/// locks.
#[derive(Clone)]
pub(crate) struct Engine<St> {
    pub(crate) store: St,
    pub(crate) routes: RouteTable,
    pub(crate) query_filter: QueryFilter,
    pub(crate) max_body_bytes: usize,
    pub(crate) status_name: Arc<str>,
    pub(crate) x_cache: bool,
    pub(crate) mark_everything: bool,
    pub(crate) credential_headers: Vec<HeaderName>,
    pub(crate) stats: CacheStats,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) deferred: Arc<Deferred>,
    pub(crate) flights: Arc<flights::Flights>,
    pub(crate) variants: Arc<vary::Variants>,
    pub(crate) stampede_wait: Duration,
    pub(crate) hit_for_miss: Duration,
    pub(crate) lease: Option<Duration>,
    /// Compression for routes that set none (`CacheLayer::compress`).
    pub(crate) compress: Option<crate::compress::Encoding>,
    /// The counters of `CacheHandle::get_or_fill`'s values, a route of their own.
    pub(crate) values: Arc<RouteCounters>,
    /// The record of the most requested keys.
    pub(crate) hot: Arc<hot::Hot>,
    /// This instance's latest clears.
    pub(crate) recent: Arc<Recent>,
}

impl<St> Engine<St> {
    /// The defaults every builder option documents.
    pub(crate) fn new(store: St) -> Self {
        let breaker = Arc::new(Breaker::new(5, Duration::from_secs(1)));
        let engine = Engine {
            store,
            routes: RouteTable::new(),
            query_filter: QueryFilter::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            status_name: Arc::from("tower-cache-aside"),
            x_cache: true,
            mark_everything: false,
            credential_headers: vec![http::header::AUTHORIZATION, http::header::COOKIE],
            stats: CacheStats::new(breaker.clone()),
            breaker,
            deferred: Arc::default(),
            flights: Arc::default(),
            variants: Arc::default(),
            stampede_wait: Duration::from_secs(10),
            hit_for_miss: Duration::from_secs(30),
            lease: None,
            compress: None,
            values: Arc::new(RouteCounters::new(Arc::from("get_or_fill"), "")),
            hot: Arc::new(hot::Hot::new(DEFAULT_HOT_KEYS, DEFAULT_HOT_FLUSH)),
            recent: Arc::default(),
        };
        engine.count_routes();
        engine
    }

    /// Sets the route table, with counters of its own.
    pub(crate) fn set_routes(&mut self, routes: RouteTable) {
        self.routes = routes.counted_afresh();
        self.count_routes();
    }

    /// Points the stats at the current routes' counters.
    fn count_routes(&self) {
        let mut all: Vec<_> = self.routes.counters().collect();
        all.push(self.values.clone());
        self.stats.inner.set_routes(all);
    }
}

/// Whether a request wants the body or only the headers (HEAD): a HEAD is answered from the
/// GET entry but never fills it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
    Body,
    HeadersOnly,
}

/// What a client asked for besides the resource: the body or only the headers, and the
/// validators of a copy it already has.
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    pub(crate) want: Want,
    pub(crate) conditions: Option<conditional::Conditions>,
    /// For entries stored compressed: which codings the client takes.
    pub(crate) accept_encoding: Option<http::HeaderValue>,
    /// When the request came in (milliseconds since the Unix epoch): read once, for the
    /// lookup's freshness and the record of hot keys alike.
    pub(crate) at_ms: u64,
}

impl Asked {
    /// What `parts` ask, received at `at_ms` (milliseconds since the Unix epoch).
    pub(crate) fn of(parts: &http::request::Parts, at_ms: u64) -> Self {
        let want = if parts.method == http::Method::HEAD {
            Want::HeadersOnly
        } else {
            Want::Body
        };
        // A 304 answers only GET and HEAD (RFC 9110 §13.1.2); a body-keyed POST gets it all.
        let conditions = match parts.method {
            http::Method::GET | http::Method::HEAD => conditional::Conditions::of(&parts.headers),
            _ => None,
        };
        Asked {
            want,
            conditions,
            accept_encoding: crate::compress::accept_encoding(&parts.headers),
            at_ms,
        }
    }
}
