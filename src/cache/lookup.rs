//! Before anything is awaited, what to do with a request (`plan`); then the one store
//! round trip that decides hit, stale or miss (`lookup`).

use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) use crate::store::Fence;

use http::header::RANGE;
use http::request::Parts;
use http::{HeaderMap, Method};

use super::layer::Shared;
use crate::entry::{now_ms, Entry, Staleness};
use crate::key::{derive_key, EntryKey, ScopeKey};
use crate::policy::{Freshness, Route, Scope};
use crate::stats::count;
use crate::store::Store;
use crate::tags::{request_host, uri_tag};

/// Whether a request says it has a body (a `Content-Length` other than 0, or any
/// `Transfer-Encoding`).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0")
}

/// What to do with one request, decided before anything is awaited.
pub(crate) enum Plan {
    /// Not ours: another method or an uncached route. Untouched.
    Skip,
    /// A cacheable route, but this request must not share an entry.
    Bypass(&'static str),
    Lookup {
        key: EntryKey,
        route: Arc<Route>,
    },
}

/// What the lookup step found.
// Lives for one step on the stack; boxing the entry would allocate on every hit.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Found {
    Hit(Entry),
    /// Past its freshness but within a stale window (RFC 5861).
    Stale {
        entry: Entry,
        fence: Fence,
    },
    Miss {
        fence: Fence,
    },
    /// The store failed or the breaker is open: serve from the origin, do not fill.
    Unavailable,
}

impl<St: Store> Shared<St> {
    pub(crate) fn plan(&self, parts: &Parts) -> Plan {
        let matched = self.routes.find(parts.uri.path());
        let route = matched.route;
        // A POST is looked up only on a body-keyed route, once its body was read and hashed.
        let body = match parts.method {
            Method::GET | Method::HEAD => None,
            Method::POST if route.policy.body_key.is_some() => {
                match parts
                    .extensions
                    .get::<crate::body_digest::RequestBodyDigest>()
                {
                    Some(d) => Some(d.0),
                    None => return Plan::Skip,
                }
            }
            _ => return Plan::Skip,
        };
        if route.policy.freshness == Freshness::Never {
            return Plan::Skip;
        }
        if parts.headers.contains_key(RANGE) {
            return Plan::Bypass("range");
        }
        // A GET or HEAD with a body: the key does not cover it, and a handler may read it.
        if body.is_none() && has_body(&parts.headers) {
            return Plan::Bypass("request-body");
        }
        let has_credentials = self
            .credential_headers
            .iter()
            .any(|h| parts.headers.contains_key(h));
        let user;
        let scope = match &route.policy.scope {
            Scope::Shared if has_credentials => return Plan::Bypass("credentials"),
            Scope::Shared | Scope::Public => ScopeKey::Shared,
            Scope::PerUser(name_user) => {
                user = name_user(parts);
                match &user {
                    Some(u) => ScopeKey::User(u),
                    None if has_credentials => return Plan::Bypass("unknown-user"),
                    None => ScopeKey::Anonymous,
                }
            }
        };
        let key = derive_key(
            &route.id,
            parts,
            &route.policy.vary,
            &self.query_filter,
            scope,
            body.as_ref(),
        );
        Plan::Lookup {
            key,
            route: route.clone(),
        }
    }

    /// The tags an entry for this request carries: its route's, filled from the path, and
    /// its URI's. Only misses need them, so hits never pay for rendering them.
    pub(crate) fn entry_tags(&self, headers: &HeaderMap, uri: &http::Uri) -> Vec<String> {
        let matched = self.routes.find(uri.path());
        let mut tags = matched.route.tags(&matched.params);
        tags.push(uri_tag(request_host(headers, uri), uri.path()));
        tags
    }

    pub(crate) async fn lookup(&self, key: &EntryKey, now_ms: u64) -> Found {
        let counters = &self.stats.inner;
        if self.deferred.pending() {
            // A clear has not reached the store yet: what it holds may predate a mutation.
            count!(counters, pending_clear_skips);
            return Found::Unavailable;
        }
        if !counters.breaker.allow() {
            count!(counters, breaker_skips);
            return Found::Unavailable;
        }
        let lookup = match self.store.lookup(key).await {
            Ok(l) => l,
            Err(e) => {
                count!(counters, store_errors);
                counters.breaker.failure();
                tracing::debug!(error = %e, %key, "cache lookup failed; passing through");
                return Found::Unavailable;
            }
        };
        counters.breaker.success();
        let fence = || lookup.fence;
        let Some(bytes) = lookup.value else {
            return Found::Miss { fence: fence() };
        };
        match Entry::decode(bytes) {
            Ok(entry) => match entry.staleness(now_ms) {
                Staleness::Fresh => Found::Hit(entry),
                Staleness::Revalidate | Staleness::IfError => Found::Stale {
                    entry,
                    fence: fence(),
                },
                Staleness::Dead => Found::Miss { fence: fence() },
            },
            Err(e) => {
                count!(counters, decode_errors);
                tracing::warn!(%key, reason = e.0, "unreadable cache entry; treating as a miss");
                Found::Miss { fence: fence() }
            }
        }
    }

    /// Polls the store for an entry another instance (holding the lease) is fetching, at
    /// most `wait`; takes it only if no clear happened since our own lookup.
    pub(crate) async fn await_remote_fill(
        &self,
        key: &EntryKey,
        fence: Fence,
        wait: Duration,
    ) -> Option<Entry> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.lookup(key, now_ms()).await {
                Found::Hit(entry) if entry.fence.is_at_or_after(fence) => return Some(entry),
                Found::Unavailable => return None,
                _ => {}
            }
        }
        None
    }
}
