//! Answers: a stored entry turned into a response, a miss's response marked and its body
//! wrapped to be stored, and the status headers.

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH};
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;

use super::body::{CacheBody, Tee};
use super::flights::{FlightGuard, Landed};
use super::future::Outcome;
use super::layer::{Shared, CACHE_STATUS, X_CACHE};
use super::lookup::Fence;
use crate::entry::{clamped_ms, now_ms, Entry};
use crate::key::EntryKey;
use crate::policy::{decide, CacheHint, Decision, Route};
use crate::stats::count;
use crate::store::Store;
use crate::tags::{push_tags, take_entry_tags};

impl<St: Store> Shared<St> {
    pub(crate) fn status_value(&self, detail: std::fmt::Arguments<'_>) -> HeaderValue {
        use std::io::Write;
        let fallback = |_| HeaderValue::from_static("tower-cache-aside");
        // Formatted on the stack and copied once into an exactly sized buffer: one
        // allocation (a `Vec` with spare capacity would need a second for `Bytes`).
        let mut buf = [0u8; 160];
        let mut w = std::io::Cursor::new(&mut buf[..]);
        if w.write_all(self.status_name.as_bytes()).is_ok() && write!(w, "; {detail}").is_ok() {
            let n = w.position() as usize;
            return HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(fallback);
        }
        // A long status name: format on the heap.
        let mut v = Vec::with_capacity(self.status_name.len() + 48);
        v.extend_from_slice(self.status_name.as_bytes());
        let _ = write!(v, "; {detail}");
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).unwrap_or_else(fallback)
    }

    pub(crate) fn mark(
        &self,
        headers: &mut HeaderMap,
        outcome: Outcome,
        detail: std::fmt::Arguments<'_>,
    ) {
        crate::tags::strip_cache_only(headers);
        headers.append(&CACHE_STATUS, self.status_value(detail));
        if self.x_cache {
            let v = match outcome {
                Outcome::Hit => "HIT",
                Outcome::Stale => "STALE",
                Outcome::Miss => "MISS",
                Outcome::Bypass => "BYPASS",
            };
            headers.insert(&X_CACHE, HeaderValue::from_static(v));
        }
    }

    /// Answers from a stored entry; `served` says how, for the status headers.
    pub(crate) fn hit_response<B: Body>(
        &self,
        entry: Entry,
        head: bool,
        now_ms: u64,
        served: Served,
    ) -> Response<CacheBody<B>> {
        let age = entry.age_secs(now_ms);
        let ttl = entry.remaining(now_ms).map_or(0, |d| d.as_secs());
        let stale = (age as i64).saturating_sub((entry.lifetime_ms / 1000) as i64);
        let mut headers = entry.headers;
        if !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        }
        // Most hits are under a second old: skip formatting (and allocating) the common case.
        let age = match age {
            0 => HeaderValue::from_static("0"),
            n => HeaderValue::from(n),
        };
        headers.insert(http::header::AGE, age);
        match served {
            Served::Fresh => {
                self.mark(&mut headers, Outcome::Hit, format_args!("hit; ttl={ttl}"));
            }
            Served::Collapsed => self.mark(
                &mut headers,
                Outcome::Hit,
                format_args!("fwd=miss; collapsed"),
            ),
            Served::Stale(why) => {
                self.mark(
                    &mut headers,
                    Outcome::Stale,
                    format_args!("hit; ttl=-{stale}; detail={why}"),
                );
            }
        }
        let body = if head {
            CacheBody::stored(bytes::Bytes::new(), None)
        } else {
            CacheBody::stored(entry.body, entry.trailers)
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status;
        *res.headers_mut() = headers;
        res
    }
}

/// How a stored entry came to be served.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Served {
    Fresh,
    /// A waiter got what its flight's leader fetched.
    Collapsed,
    Stale(&'static str),
}

impl<St: Store> Shared<St> {
    /// Decides whether a miss's response is stored, and wraps its body accordingly.
    pub(crate) fn miss_response<B>(
        self: &Arc<Self>,
        res: Response<B>,
        key: EntryKey,
        route: &Route,
        mut tags: Vec<String>,
        fence: Option<Fence>,
        flight: Option<FlightGuard>,
    ) -> Response<CacheBody<B>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Send + 'static,
    {
        let counters = &self.stats.inner;
        count!(counters, misses);
        let (mut parts, body) = res.into_parts();
        let Some(fence) = fence else {
            self.mark(
                &mut parts.headers,
                Outcome::Miss,
                format_args!("fwd=miss; detail=store-unavailable"),
            );
            return Response::from_parts(parts, CacheBody::passthrough(body));
        };
        let hint = parts.extensions.get::<CacheHint>();
        let uncacheable = |flight: Option<FlightGuard>| {
            if let Some(f) = flight {
                drop(f.land(Landed::Uncacheable, self.hit_for_miss));
            }
        };
        let (lifetime, initial_age_s, swr, sie) =
            match decide(&route.policy, parts.status.as_u16(), &parts.headers, hint) {
                Decision::Store {
                    lifetime,
                    initial_age_s,
                    stale_while_revalidate,
                    stale_if_error,
                } => (
                    lifetime,
                    initial_age_s,
                    stale_while_revalidate,
                    stale_if_error,
                ),
                Decision::Skip(why) => {
                    uncacheable(flight);
                    count!(counters, uncacheable);
                    self.mark(
                        &mut parts.headers,
                        Outcome::Miss,
                        format_args!("fwd=miss; detail={why}"),
                    );
                    return Response::from_parts(parts, CacheBody::passthrough(body));
                }
            };
        let declared_len = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let known_len = declared_len.unwrap_or(0).max(body.size_hint().lower());
        if known_len > self.max_body_bytes as u64 {
            uncacheable(flight);
            count!(counters, oversize);
            self.mark(
                &mut parts.headers,
                Outcome::Miss,
                format_args!("fwd=miss; detail=too-large"),
            );
            return Response::from_parts(parts, CacheBody::passthrough(body));
        }
        if let Some(hint) = hint {
            push_tags(&mut tags, hint.tags.iter().map(String::as_str), "CacheHint");
        }
        take_entry_tags(&mut parts.headers, &mut tags);
        let entry = Entry {
            status: parts.status,
            headers: storable_headers(&parts.headers),
            body: bytes::Bytes::new(),
            trailers: None,
            stored_at_ms: now_ms(),
            lifetime_ms: clamped_ms(lifetime),
            initial_age_s,
            fence,
            stale_while_revalidate_ms: clamped_ms(swr),
            stale_if_error_ms: clamped_ms(sie),
            tags,
        };
        self.mark(
            &mut parts.headers,
            Outcome::Miss,
            format_args!("fwd=miss; stored"),
        );
        let shared = self.clone();
        let grpc = route.policy.grpc;
        let tee = Tee::new(
            self.max_body_bytes,
            self.stats.clone(),
            Box::new(move |body, trailers| {
                // gRPC: only a call that succeeded is stored; its status is a trailer.
                let grpc_failed = grpc && !grpc_ok(&entry.headers, trailers.as_ref());
                if grpc_failed {
                    count!(shared.stats.inner, uncacheable);
                    if let Some(f) = flight {
                        drop(f.land(Landed::Uncacheable, shared.hit_for_miss));
                    }
                    return;
                }
                // A body that ended short of (or past) its Content-Length is broken: it
                // reaches this client as it is, but is never replayed to others.
                if declared_len.is_some_and(|n| n != body.len() as u64) {
                    count!(shared.stats.inner, uncacheable);
                    tracing::warn!(
                        declared = declared_len,
                        received = body.len(),
                        "response body does not match its Content-Length; not stored"
                    );
                    if let Some(f) = flight {
                        drop(f.land(Landed::Failed, Duration::ZERO));
                    }
                    return;
                }
                let mut entry = Entry {
                    body,
                    trailers: trailers.map(Box::new),
                    ..entry
                };
                // Stored once here, so that hits need not format it.
                if !entry.headers.contains_key(CONTENT_LENGTH) {
                    let len = HeaderValue::from(entry.body.len());
                    entry.headers.insert(CONTENT_LENGTH, len);
                }
                let encoded = entry.encode();
                let landing =
                    flight.map(|f| f.land(Landed::Entry(encoded.clone()), Duration::ZERO));
                shared.spawn_fill(key, encoded, entry.store_ttl(), entry.tags, fence, landing);
            }),
        );
        // As long as requests waiting on this key would wait (10 s when nobody waits).
        let patience = if self.stampede_wait.is_zero() {
            Duration::from_secs(10)
        } else {
            self.stampede_wait
        };
        Response::from_parts(parts, CacheBody::filling(body, tee, patience))
    }
}

/// Whether a gRPC response says it succeeded: `grpc-status: 0` in the trailers, or in the
/// headers of a trailers-only response.
fn grpc_ok(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> bool {
    let status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"));
    status.is_some_and(|s| s == "0")
}

/// The headers worth storing: no hop-by-hop headers (RFC 9110 §7.6.1), no `Age` (recomputed
/// on every hit) and no `Set-Cookie` (never stored anyway).
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "age",
    ];
    let listed: Vec<String> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "set-cookie" || listed.iter().any(|l| l == n) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}
