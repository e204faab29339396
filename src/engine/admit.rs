//! Whether a miss's response may be stored, and the entry it becomes: the RFC 9111
//! decision, the size limit, the tags, and (once the body has ended) the checks that keep a
//! broken body out of the store.

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, CONTENT_LENGTH, ETAG};
use http::response::Parts;
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;

use super::body::{CacheBody, Tee};
use super::conditional::digest_etag;
use super::flights::{FlightGuard, Landed};
use super::status::{Miss, Status};
use super::{vary, Engine};
use crate::compress::{add_vary_accept_encoding, compressible, mark_compressed, Encoding};
use crate::entry::{Entry, Lifetimes};
use crate::key::EntryKey;
use crate::policy::{decide, extra_vary_names, CacheHint, Decision, Route, Uncacheable};
use crate::stats::{count, count_route};
use crate::store::{Fence, Store};
use crate::tags::{push_tags, take_entry_tags};

/// A response admitted for storing, waiting for its body to end.
struct Admitted {
    key: EntryKey,
    /// The entry without its body.
    entry: Entry,
    /// The `Content-Length` the response declared, which the body must match.
    declared_len: Option<u64>,
    /// A gRPC route: only a call whose status trailer says it succeeded is stored.
    grpc: bool,
    /// Give the entry a digest `ETag` when it has none.
    etag: bool,
    /// How long the store keeps it past its stale windows, for revalidation.
    keep: Duration,
    /// The coding to store the body in, when it compresses.
    compress: Option<Encoding>,
    /// For a variant: the URL's own key and the marker to store there.
    marker: Option<(EntryKey, bytes::Bytes)>,
    flight: Option<FlightGuard>,
    /// When the origin was asked (the entry's origin time runs to the body's end).
    asked_at_ms: u64,
}

/// Where a miss's response may go: the key it was looked up under, the URL's own key, and
/// the request's headers (a response may turn out to vary on some of them); and when the
/// origin was asked, so that the entry records how long it took.
pub(crate) struct MissKeys {
    pub(crate) key: EntryKey,
    pub(crate) primary: EntryKey,
    pub(crate) request: HeaderMap,
    pub(crate) asked_at_ms: u64,
}

/// Where an admitted response is stored: its key, and the marker for a variant.
type Placement = (EntryKey, Option<(EntryKey, bytes::Bytes)>);

impl<St: Store> Engine<St> {
    /// Marks a miss's response and, when it may be stored, wraps its body so that a copy
    /// is filled once the body has ended.
    pub(crate) fn miss_response<B>(
        self: &Arc<Self>,
        res: Response<B>,
        keys: MissKeys,
        route: &Route,
        tags: Vec<String>,
        fence: Option<Fence>,
        flight: Option<FlightGuard>,
    ) -> Response<CacheBody<B>>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Send + 'static,
    {
        count_route!(self.stats.inner, route.counters, misses);
        let (mut parts, body) = res.into_parts();
        let admitted = match fence {
            Some(fence) => self.admit(&mut parts, &body, route, tags, fence),
            None => Err(Miss::StoreUnavailable),
        };
        let mut flight = flight;
        let asked_at_ms = keys.asked_at_ms;
        let placed = admitted.and_then(|(entry, declared_len)| {
            let placement = self.place(keys, route, &entry, &mut flight)?;
            Ok((entry, declared_len, placement))
        });
        let (entry, declared_len, (key, marker)) = match placed {
            Ok(placed) => placed,
            Err(miss) => {
                self.refused(miss, flight);
                self.mark(&mut parts.headers, Status::Miss(miss));
                return Response::from_parts(parts, CacheBody::passthrough(body));
            }
        };
        self.mark(&mut parts.headers, Status::Miss(Miss::Stored));
        let admitted = Admitted {
            key,
            marker,
            entry,
            declared_len,
            grpc: route.policy.grpc,
            etag: route.policy.etag && !route.policy.grpc,
            keep: route.policy.keep,
            compress: route.policy.compress,
            flight,
            asked_at_ms,
        };
        let engine = self.clone();
        let tee = Tee::new(
            self.max_body_bytes,
            self.stats.clone(),
            Box::new(move |body, trailers| engine.complete(admitted, body, trailers)),
        );
        // As long as requests waiting on this key would wait (10 s when nobody waits).
        let patience = if self.stampede_wait.is_zero() {
            Duration::from_secs(10)
        } else {
            self.stampede_wait
        };
        Response::from_parts(parts, CacheBody::filling(body, tee, patience))
    }

    /// The entry a response becomes (without its body) and the `Content-Length` it
    /// declared, or why it is not stored. Takes the cache-only tag headers off the response.
    fn admit<B: Body>(
        &self,
        parts: &mut Parts,
        body: &B,
        route: &Route,
        mut tags: Vec<String>,
        fence: Fence,
    ) -> Result<(Entry, Option<u64>), Miss> {
        let hint = parts.extensions.get::<CacheHint>();
        let lifetimes = match decide(&route.policy, parts.status, &parts.headers, hint) {
            Decision::Store {
                lifetime,
                initial_age_s,
                stale_while_revalidate,
                stale_if_error,
            } => Lifetimes {
                lifetime,
                initial_age_s,
                stale_while_revalidate,
                stale_if_error,
            },
            Decision::Skip(why) => return Err(Miss::Uncacheable(why)),
        };
        let declared_len = crate::headers::content_length(&parts.headers);
        let known_len = declared_len.unwrap_or(0).max(body.size_hint().lower());
        if known_len > self.max_body_bytes as u64 {
            return Err(Miss::TooLarge);
        }
        if let Some(hint) = hint {
            push_tags(&mut tags, hint.tags.iter().map(String::as_str), "CacheHint");
        }
        take_entry_tags(&mut parts.headers, &mut tags);
        if route.policy.compress.is_some() && compressible(&parts.headers, usize::MAX) {
            // Hits of this URL depend on the client's `Accept-Encoding`: say so to caches
            // downstream, on this response too.
            add_vary_accept_encoding(&mut parts.headers);
        }
        let headers = storable_headers(&parts.headers);
        let entry = Entry::new(parts.status, headers, fence, tags, lifetimes);
        Ok((entry, declared_len))
    }

    /// Where a response goes: under the URL's own key, or, when it varies on request headers
    /// the route does not key by, under its variant's key with a marker under the URL's.
    /// The requests waiting on another key than the one it goes to are let go at once.
    fn place(
        &self,
        keys: MissKeys,
        route: &Route,
        entry: &Entry,
        flight: &mut Option<FlightGuard>,
    ) -> Result<Placement, Miss> {
        let names = extra_vary_names(&route.policy, &entry.headers).map_err(Miss::Uncacheable)?;
        if names.is_empty() {
            return Ok((keys.primary, None));
        }
        let variant = vary::variant_key(&keys.primary, &names, &keys.request)
            .ok_or(Miss::Uncacheable(Uncacheable::VaryValueTooLong))?;
        let lives = entry.store_ttl().saturating_add(route.policy.keep);
        if !self.variants.admit(&keys.primary, &variant, lives) {
            return Err(Miss::Uncacheable(Uncacheable::TooManyVariants));
        }
        if keys.key != variant {
            if let Some(f) = flight.take() {
                // They waited on the URL's key: whether this variant is theirs, only their
                // own headers say; each joins its own variant's flight.
                drop(f.land(Landed::Varies(names.clone()), Duration::ZERO));
            }
        }
        let marker = vary::encode_marker(&names);
        Ok((variant, Some((keys.primary, marker))))
    }

    /// A response passed on unstored, marked with why.
    pub(crate) fn unstored<B: Body>(
        &self,
        res: Response<B>,
        route: &Route,
        why: Uncacheable,
        flight: Option<FlightGuard>,
    ) -> Response<CacheBody<B>> {
        count_route!(self.stats.inner, route.counters, misses);
        let miss = Miss::Uncacheable(why);
        self.refused(miss, flight);
        let (mut parts, body) = res.into_parts();
        self.mark(&mut parts.headers, Status::Miss(miss));
        Response::from_parts(parts, CacheBody::passthrough(body))
    }

    /// Counts a response that is not stored, and tells the requests waiting on its key.
    fn refused(&self, miss: Miss, flight: Option<FlightGuard>) {
        match miss {
            Miss::Uncacheable(_) => count!(self.stats.inner, uncacheable),
            Miss::TooLarge => count!(self.stats.inner, oversize),
            _ => {}
        }
        let Some(f) = flight else { return };
        match miss {
            // About this request's values, not the URL: the waiters try on their own.
            Miss::Uncacheable(Uncacheable::TooManyVariants | Uncacheable::VaryValueTooLong) => {
                drop(f.land(Landed::Failed, Duration::ZERO));
            }
            // Remembered as hit-for-miss: later misses go to the origin without queueing.
            _ => drop(f.land(Landed::Uncacheable, self.hit_for_miss)),
        }
    }

    /// The body has ended within the limit: checks it and fills the store.
    fn complete(
        self: Arc<Self>,
        admitted: Admitted,
        body: bytes::Bytes,
        trailers: Option<HeaderMap>,
    ) {
        let Admitted {
            key,
            mut entry,
            declared_len,
            grpc,
            etag,
            keep,
            compress,
            marker,
            flight,
            asked_at_ms,
        } = admitted;
        if grpc && !grpc_ok(&entry.headers, trailers.as_ref()) {
            self.refused(Miss::Uncacheable(Uncacheable::GrpcStatus), flight);
            return;
        }
        // A body that ended short of (or past) its Content-Length is broken: it reached
        // this client as it is, but is never replayed to others.
        if declared_len.is_some_and(|n| n != body.len() as u64) {
            count!(self.stats.inner, uncacheable);
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
        entry.body = body;
        entry.trailers = trailers.map(Box::new);
        let took = crate::entry::now_ms().saturating_sub(asked_at_ms);
        entry.origin_ms = u32::try_from(took).unwrap_or(u32::MAX);
        if etag && !entry.headers.contains_key(ETAG) {
            entry.headers.insert(ETAG, digest_etag(&entry.body));
        }
        // Stored once here, so that hits need not format it.
        if !entry.headers.contains_key(CONTENT_LENGTH) {
            let len = HeaderValue::from(entry.body.len());
            entry.headers.insert(CONTENT_LENGTH, len);
        }
        if let Some((primary, marker)) = marker {
            self.store_marker(primary, marker, &entry, keep);
        }
        let encoding = compress.filter(|_| compressible(&entry.headers, entry.body.len()));
        let runtime = tokio::runtime::Handle::try_current().ok();
        let slot = encoding
            .and(runtime.as_ref())
            .and_then(|_| CompressionSlot::take());
        let (Some(encoding), Some(runtime), Some(slot)) = (encoding, runtime, slot) else {
            return self.store_entry(key, &entry, keep, flight);
        };
        // The requests waiting on the key get the entry now, as it is; it is compressed off
        // the response's path (the client that fetched it is not kept waiting either) and
        // stored compressed.
        let landing = flight.map(|f| f.land(Landed::Entry(entry.encode()), Duration::ZERO));
        runtime.spawn_blocking(move || {
            compress_entry(&mut entry, encoding);
            drop(slot);
            let encoded = entry.encode();
            self.store_encoded(key, &entry, encoded, keep, landing);
        });
    }
}

/// One of the few compressions that may run at once. Past them an entry is stored as it is:
/// compression shares Tokio's blocking pool with the application's own blocking work, and
/// must not queue behind it or crowd it out.
struct CompressionSlot;

static COMPRESSING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
const MAX_COMPRESSING: usize = 4;

impl CompressionSlot {
    fn take() -> Option<Self> {
        use std::sync::atomic::Ordering::AcqRel;
        let n = COMPRESSING.fetch_add(1, AcqRel);
        if n >= MAX_COMPRESSING {
            COMPRESSING.fetch_sub(1, AcqRel);
            return None;
        }
        Some(CompressionSlot)
    }
}

impl Drop for CompressionSlot {
    fn drop(&mut self) {
        COMPRESSING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Stores the entry's body in `encoding` when that makes it smaller.
fn compress_entry(entry: &mut Entry, encoding: Encoding) {
    if let Some(compressed) = encoding.compress(&entry.body) {
        entry
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(compressed.len()));
        entry.body = compressed;
        mark_compressed(&mut entry.headers, encoding);
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

/// The headers worth storing: no hop-by-hop headers (RFC 9110 §7.6.1), none a proxy
/// authenticates with (RFC 9111 §3.1), no `Age` (recomputed on every hit) and no
/// `Set-Cookie` (never stored anyway).
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: [&str; 11] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "age",
        "proxy-authenticate",
        "proxy-authentication-info",
        "proxy-authorization",
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
