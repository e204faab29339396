//! The record of the most requested keys: each instance counts its looked-up requests per
//! key, keeps the top ones with what it takes to ask for them again, and adds its counts to
//! the store's record now and then. A new or restarted instance warms from that record; a
//! clear on a route that asks for it fetches the hottest entries it made dead again.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::HOST;
use http::request::Parts;
use http::{HeaderName, HeaderValue};

use super::Engine;
use crate::key::EntryKey;
use crate::lock::{lock, read, write};
use crate::policy::{Route, Scope};
use crate::stats::Striped;
use crate::store::Store;

/// Shards of the table: requests on two cores rarely wait for each other's shard.
const SHARDS: usize = 8;
/// The largest request recorded, encoded (larger ones are not worth warming, and a record
/// is never cut short: that would be another request).
const MAX_RECORDED: usize = 4096;
/// Entries looked at to find one to drop when a shard is full: the least requested of a
/// few, so that a scan of new URLs costs the same per request however large the record.
const EVICTION_SAMPLE: usize = 8;

/// Marks a request a [`Warmer`](crate::Warmer) sends: it is not counted in the record (what
/// was warmed would stay on top of it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Warming;
/// Most entries refreshed after one clear.
pub(crate) const MAX_REFRESH: usize = 32;

/// How to ask for one entry again: its request, without credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The user a per-user entry belongs to (as the route's scope named them).
    pub(crate) user: Option<String>,
    /// The `Host` header, when the request had one.
    pub(crate) host: Option<HeaderValue>,
    /// Path and query.
    pub(crate) target: String,
    /// The request headers the route's key varies by.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
}

impl Recorded {
    /// The request to record for `parts`, or `None` when it is not worth it or must not be:
    /// too large, or keyed by a header that carries credentials (`credentials`, and
    /// `Proxy-Authorization`), which the record would keep and send again.
    fn of(route: &Route, parts: &Parts, credentials: &[HeaderName]) -> Option<Recorded> {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let vary = &route.policy.vary;
        let secret = |name: &HeaderName| {
            credentials.contains(name) || name == http::header::PROXY_AUTHORIZATION
        };
        if vary.iter().any(secret) || vary.len() > 16 {
            return None;
        }
        let user = match &route.policy.scope {
            Scope::PerUser(name) => name(parts),
            _ => None,
        };
        let headers: Vec<(HeaderName, HeaderValue)> = vary
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(|v| (name.clone(), v.clone()))
            })
            .collect();
        // The request's host as the key has it: `Host`, else the URI's authority (HTTP/2).
        let host = match parts.headers.get(HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let size = target.len()
            + user.as_ref().map_or(0, String::len)
            + host.as_ref().map_or(0, HeaderValue::len)
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if size > MAX_RECORDED || headers.len() > u8::MAX as usize {
            return None;
        }
        Some(Recorded {
            user,
            host,
            target: target.to_owned(),
            headers,
        })
    }

    /// `H1`, then each field as `u16 length, bytes` (`0xFFFF` for none), the headers last
    /// behind their count.
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(16 + self.target.len());
        out.put_slice(b"H1");
        let field = |out: &mut BytesMut, v: Option<&[u8]>| match v {
            Some(v) => {
                out.put_u16_le(v.len().min(0xFFFE) as u16);
                out.put_slice(&v[..v.len().min(0xFFFE)]);
            }
            None => out.put_u16_le(0xFFFF),
        };
        field(&mut out, self.user.as_deref().map(str::as_bytes));
        field(&mut out, self.host.as_ref().map(HeaderValue::as_bytes));
        field(&mut out, Some(self.target.as_bytes()));
        out.put_u8(self.headers.len() as u8);
        for (name, value) in &self.headers {
            field(&mut out, Some(name.as_str().as_bytes()));
            field(&mut out, Some(value.as_bytes()));
        }
        out.freeze()
    }

    /// Reads what [`encode`](Self::encode) wrote; `None` for anything else.
    pub(crate) fn decode(buf: &[u8]) -> Option<Recorded> {
        let mut rest = buf.strip_prefix(b"H1")?;
        let mut field = || -> Option<Option<&[u8]>> {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let len = u16::from_le_bytes(*len);
            if len == 0xFFFF {
                rest = tail;
                return Some(None);
            }
            let (v, tail) = tail.split_at_checked(len as usize)?;
            rest = tail;
            Some(Some(v))
        };
        let text = |v: &[u8]| std::str::from_utf8(v).ok().map(str::to_owned);
        let user = match field()? {
            Some(v) => Some(text(v)?),
            None => None,
        };
        let host = match field()? {
            Some(v) => Some(HeaderValue::from_bytes(v).ok()?),
            None => None,
        };
        let target = text(field()??)?;
        if !target.starts_with('/') || target.parse::<http::Uri>().is_err() {
            return None;
        }
        let (&n, tail) = rest.split_first()?;
        rest = tail;
        let mut headers = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut field = || -> Option<&[u8]> {
                let (len, tail) = rest.split_first_chunk::<2>()?;
                let (v, tail) = tail.split_at_checked(u16::from_le_bytes(*len) as usize)?;
                rest = tail;
                Some(v)
            };
            let name = HeaderName::from_bytes(field()?).ok()?;
            let value = HeaderValue::from_bytes(field()?).ok()?;
            headers.push((name, value));
        }
        rest.is_empty().then_some(Recorded {
            user,
            host,
            target,
            headers,
        })
    }

    /// The request that asks for the entry again (without the user's credentials: see
    /// [`Warmer::per_user`](crate::Warmer::per_user)).
    pub(crate) fn request(&self) -> http::request::Builder {
        let mut req = http::Request::get(self.target.as_str());
        if let Some(host) = &self.host {
            req = req.header(HOST, host.clone());
        }
        for (name, value) in &self.headers {
            req = req.header(name.clone(), value.clone());
        }
        req
    }
}

/// One stripe's sightings, on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Pending(Mutex<crate::Map<[u8; 32], u64>>);

struct Slot {
    /// Requests seen (halved at each flush, so that the record follows what is hot now).
    count: u64,
    /// Requests seen since the last flush: what the store's record gets.
    unflushed: u64,
    recorded: Arc<Recorded>,
    /// The tags the entry carries, for refreshing it after a clear (routes that ask).
    refresh_tags: Option<Arc<[String]>>,
}

/// Runs requests through the cached service again: a [`Warmer`](crate::Warmer) registered
/// with [`Warmer::refresh_after_clears`](crate::Warmer::refresh_after_clears).
pub(crate) trait Refresh: Send + Sync {
    fn refresh(&self, requests: Vec<Arc<Recorded>>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Clears waiting for their refresh: one refresh runs at a time, taking every clear that
/// landed meanwhile, so a burst of writes costs one pass over the record, not one each.
#[derive(Default)]
struct Refreshing {
    running: bool,
    tags: HashSet<String>,
}

/// One layer's record.
pub(crate) struct Hot {
    capacity: usize,
    flush_every: Duration,
    shards: [Mutex<crate::Map<[u8; 32], Slot>>; SHARDS],
    /// Sightings of recorded keys not yet added to their slots, one map per thread stripe:
    /// a hit counts under its own core's lock, so two cores serving one hot key do not
    /// pass its shard's lock back and forth. Added to the slots before anything reads them.
    pending: Striped<Pending>,
    last_settle_ms: AtomicU64,
    last_flush_ms: AtomicU64,
    flushing: AtomicBool,
    refresher: RwLock<Option<Arc<dyn Refresh>>>,
    refreshing: Mutex<Refreshing>,
}

impl Hot {
    pub(crate) fn new(capacity: usize, flush_every: Duration) -> Self {
        Hot {
            capacity,
            flush_every,
            shards: Default::default(),
            pending: Striped::default(),
            last_settle_ms: AtomicU64::new(0),
            last_flush_ms: AtomicU64::new(crate::entry::now_ms()),
            flushing: AtomicBool::new(false),
            refresher: RwLock::new(None),
            refreshing: Mutex::default(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn flush_every(&self) -> Duration {
        self.flush_every
    }

    pub(crate) fn set_refresher(&self, refresher: Arc<dyn Refresh>) {
        *write(&self.refresher) = Some(refresher);
    }

    fn shard(&self, key: &EntryKey) -> &Mutex<crate::Map<[u8; 32], Slot>> {
        &self.shards[key.digest()[0] as usize % SHARDS]
    }

    /// Adds the sightings counted on every stripe to their slots (a key dropped from the
    /// record meanwhile loses them).
    fn settle(&self) {
        for stripe in self.pending.all() {
            let counts: Vec<([u8; 32], u64)> = lock(&stripe.0).drain().collect();
            self.add(counts);
        }
    }

    /// Whether 100 ms have passed since the last settling before an eviction (and if so,
    /// this caller settles).
    fn settle_due(&self) -> bool {
        let now = crate::entry::now_ms();
        let last = self.last_settle_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= 100
            && self
                .last_settle_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn add(&self, counts: Vec<([u8; 32], u64)>) {
        for (key, n) in counts {
            if n == 0 {
                continue;
            }
            if let Some(slot) = lock(&self.shards[key[0] as usize % SHARDS]).get_mut(&key) {
                slot.count += n;
                slot.unflushed += n;
            }
        }
    }

    /// The most requested keys this instance knows, most requested first.
    pub(crate) fn top(&self, limit: usize) -> Vec<(Arc<Recorded>, u64)> {
        self.settle();
        let mut all: Vec<(Arc<Recorded>, u64)> = self
            .shards
            .iter()
            .flat_map(|s| {
                let shard = lock(s);
                shard
                    .values()
                    .map(|slot| (slot.recorded.clone(), slot.count))
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.1));
        all.truncate(limit);
        all
    }

    /// The hottest recorded entries carrying any of `tags`, on routes that refresh after a
    /// clear.
    fn cleared(&self, tags: &HashSet<String>) -> Vec<Arc<Recorded>> {
        self.settle();
        let mut hit: Vec<(Arc<Recorded>, u64)> = Vec::new();
        for s in &self.shards {
            for slot in lock(s).values() {
                let Some(carried) = &slot.refresh_tags else {
                    continue;
                };
                if carried.iter().any(|t| tags.contains(t)) {
                    hit.push((slot.recorded.clone(), slot.count));
                }
            }
        }
        hit.sort_by_key(|e| std::cmp::Reverse(e.1));
        hit.into_iter().take(MAX_REFRESH).map(|(r, _)| r).collect()
    }

    /// Takes the counts since the last flush, and halves every count.
    fn take_unflushed(&self) -> Vec<([u8; 32], Bytes, u64)> {
        self.settle();
        let mut out = Vec::new();
        for s in &self.shards {
            let mut shard = lock(s);
            for (key, slot) in shard.iter_mut() {
                if slot.unflushed > 0 {
                    let n = std::mem::take(&mut slot.unflushed);
                    out.push((*key, slot.recorded.encode(), n));
                }
                slot.count /= 2;
            }
            shard.retain(|_, slot| slot.count > 0 || slot.unflushed > 0);
        }
        out
    }

    /// Counts that could not reach the store wait for the next flush.
    fn put_back(&self, counts: Vec<([u8; 32], Bytes, u64)>) {
        for (key, _, n) in counts {
            if let Some(slot) = lock(&self.shards[key[0] as usize % SHARDS]).get_mut(&key) {
                slot.unflushed += n;
            }
        }
    }
}

/// Lets the next flush run, however this one ended (a dropped future included).
struct Flushing<'a>(&'a AtomicBool);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<St: Store> Engine<St> {
    /// Counts a looked-up request in the record (and adds the record to the store's when
    /// it is time).
    pub(crate) fn seen(self: &Arc<Self>, key: &EntryKey, route: &Route, parts: &Parts, now: u64) {
        let hot = &self.hot;
        if hot.capacity == 0
            || !matches!(parts.method, http::Method::GET | http::Method::HEAD)
            || parts.extensions.get::<Warming>().is_some()
        {
            return;
        }
        let counted_here = match lock(&hot.pending.local().0).get_mut(key.digest()) {
            Some(n) => {
                *n += 1;
                true
            }
            None => false,
        };
        if !counted_here {
            // First sight on this stripe since the counts were last settled.
            let counted = match lock(hot.shard(key)).get_mut(key.digest()) {
                Some(slot) => {
                    slot.count += 1;
                    slot.unflushed += 1;
                    true
                }
                None => false,
            };
            if !counted {
                self.record(key, route, parts);
            }
            let full = {
                let mut pending = lock(&hot.pending.local().0);
                pending.entry(*key.digest()).or_insert(0);
                pending.len() >= hot.capacity.div_ceil(SHARDS).max(64)
            };
            if full {
                hot.settle();
            }
        }
        let last = hot.last_flush_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= crate::entry::millis(hot.flush_every)
            && hot
                .last_flush_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let engine = self.clone();
                rt.spawn(async move { engine.flush_hot().await });
            }
        }
    }

    /// Adds a key the record does not hold yet (made outside the lock: the scope function
    /// and the tags are the app's code).
    fn record(&self, key: &EntryKey, route: &Route, parts: &Parts) {
        let hot = &self.hot;
        let Some(recorded) = Recorded::of(route, parts, &self.credential_headers) else {
            return;
        };
        let refresh_tags = route
            .policy
            .refresh_after_clear
            .then(|| Arc::from(self.entry_tags(&parts.headers, &parts.uri)));
        let mut shard = lock(hot.shard(key));
        if let Some(slot) = shard.get_mut(key.digest()) {
            // Another request recorded it meanwhile.
            slot.count += 1;
            slot.unflushed += 1;
            return;
        }
        if shard.len() >= hot.capacity.div_ceil(SHARDS) {
            // Counts still on the stripes decide which goes: settled first (outside this
            // shard's lock, which settling takes), at most every 100 ms (a scan of new URLs
            // would settle on every request).
            if hot.settle_due() {
                drop(shard);
                hot.settle();
                shard = lock(hot.shard(key));
                if let Some(slot) = shard.get_mut(key.digest()) {
                    slot.count += 1;
                    slot.unflushed += 1;
                    return;
                }
            }
        }
        if shard.len() >= hot.capacity.div_ceil(SHARDS) {
            // Full: the least requested of a few goes.
            let coldest = (shard.iter())
                .take(EVICTION_SAMPLE)
                .min_by_key(|(_, s)| s.count)
                .map(|(k, _)| *k);
            if let Some(k) = coldest {
                shard.remove(&k);
            }
        }
        let slot = Slot {
            count: 1,
            unflushed: 1,
            recorded: Arc::new(recorded),
            refresh_tags,
        };
        shard.insert(*key.digest(), slot);
    }

    /// Adds this instance's counts since the last flush to the store's record; counts the
    /// store did not take wait for the next flush.
    pub(crate) async fn flush_hot(&self) -> Result<usize, crate::error::StoreError> {
        let hot = &self.hot;
        if hot.flushing.swap(true, Ordering::AcqRel) {
            return Ok(0);
        }
        let _flushing = Flushing(&hot.flushing);
        let taken = hot.take_unflushed();
        if taken.is_empty() {
            return Ok(0);
        }
        let counts: Vec<(Bytes, u64)> = taken.iter().map(|(_, r, n)| (r.clone(), *n)).collect();
        let n = counts.len();
        match self.store.record_hot(counts, hot.capacity).await {
            Ok(()) => Ok(n),
            Err(e) => {
                tracing::debug!(error = %e, "could not add to the store's record of hot keys");
                hot.put_back(taken);
                Err(e)
            }
        }
    }

    /// After a clear landed: the hottest entries it made dead, on routes that ask for it,
    /// are fetched again in the background, by one task at a time that also takes the
    /// clears landing meanwhile.
    pub(crate) fn refresh_cleared(&self, tags: &[String]) {
        let Some(refresher) = read(&self.hot.refresher).clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        {
            let mut state = lock(&self.hot.refreshing);
            state.tags.extend(tags.iter().cloned());
            if state.running {
                return;
            }
            state.running = true;
        }
        let hot = self.hot.clone();
        rt.spawn(async move {
            loop {
                let tags = {
                    let mut state = lock(&hot.refreshing);
                    if state.tags.is_empty() {
                        state.running = false;
                        return;
                    }
                    std::mem::take(&mut state.tags)
                };
                let requests = hot.cleared(&tags);
                if !requests.is_empty() {
                    refresher.refresh(requests).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_requests_round_trip_and_garbage_is_refused() {
        let r = Recorded {
            user: Some("42".into()),
            host: Some(HeaderValue::from_static("example.com")),
            target: "/events?page=2".into(),
            headers: vec![(
                HeaderName::from_static("accept-language"),
                HeaderValue::from_static("fr"),
            )],
        };
        let bytes = r.encode();
        assert_eq!(Recorded::decode(&bytes), Some(r.clone()));
        let anonymous = Recorded {
            user: None,
            host: None,
            headers: vec![],
            ..r
        };
        assert_eq!(Recorded::decode(&anonymous.encode()), Some(anonymous));
        for cut in 0..bytes.len() {
            assert_eq!(Recorded::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        for garbage in [
            &b"H1\xff\xff\xff\xff\x04\x00abcd\x00"[..],
            b"",
            b"H2",
            b"\xff\xff",
        ] {
            assert_eq!(Recorded::decode(garbage), None, "{garbage:?}");
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert_eq!(Recorded::decode(&trailing), None);
    }
}
