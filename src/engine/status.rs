//! The status headers: `Cache-Status` (RFC 9211) and `X-Cache`, both written from one
//! [`Status`], so the two can never disagree.

use std::fmt;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::plan::Bypass;
use super::Engine;
use crate::policy::Uncacheable;

pub(crate) static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How one request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// A fresh entry, `ttl` seconds left.
    Hit { ttl: u64 },
    /// A waiter got what its flight's leader fetched.
    Collapsed,
    /// A stale entry the origin confirmed with a `304`.
    Revalidated,
    /// A stale entry, `stale_for` seconds past its lifetime.
    Stale { why: Stale, stale_for: i64 },
    /// The origin answered.
    Miss(Miss),
    /// A request the cache did not look up.
    Bypass(Bypass),
}

/// Why a stale entry was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stale {
    /// Served while one request refreshes it (RFC 5861).
    WhileRevalidate,
    /// Served because the origin failed (RFC 5861).
    IfError,
}

/// What became of a miss's response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Miss {
    /// Streamed to the client and copied to the store.
    Stored,
    /// Not stored, for this reason.
    Uncacheable(Uncacheable),
    /// Its body is over the size limit.
    TooLarge,
    /// A HEAD request: no body to store.
    Head,
    /// The store could not be asked (down, breaker open, a clear still deferred).
    StoreUnavailable,
}

impl Stale {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stale::WhileRevalidate => "stale-while-revalidate",
            Stale::IfError => "stale-if-error",
        }
    }
}

impl Miss {
    /// Why it was not stored; `None` when it was.
    fn detail(self) -> Option<&'static str> {
        match self {
            Miss::Stored => None,
            Miss::Uncacheable(why) => Some(why.as_str()),
            Miss::TooLarge => Some("too-large"),
            Miss::Head => Some("head"),
            Miss::StoreUnavailable => Some("store-unavailable"),
        }
    }
}

impl Status {
    /// The `X-Cache` value.
    pub(crate) fn x_cache(self) -> &'static str {
        match self {
            Status::Hit { .. } | Status::Collapsed | Status::Revalidated => "HIT",
            Status::Stale { .. } => "STALE",
            Status::Miss(_) => "MISS",
            Status::Bypass(_) => "BYPASS",
        }
    }
}

/// The `Cache-Status` parameters after the cache's name.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Status::Hit { ttl } => write!(f, "hit; ttl={ttl}"),
            Status::Collapsed => f.write_str("fwd=miss; collapsed"),
            Status::Revalidated => f.write_str("fwd=stale; fwd-status=304"),
            Status::Stale { why, stale_for } => {
                write!(f, "hit; ttl=-{stale_for}; detail={}", why.as_str())
            }
            Status::Miss(miss) => match miss.detail() {
                None => f.write_str("fwd=miss; stored"),
                Some(detail) => write!(f, "fwd=miss; detail={detail}"),
            },
            Status::Bypass(why) => write!(f, "fwd=bypass; detail={}", why.as_str()),
        }
    }
}

impl<St> Engine<St> {
    /// `{name}; {status}` as a header value.
    fn status_value(&self, status: Status) -> HeaderValue {
        match status {
            // Every hit: one of the values this thread made lately (see `hit_values`).
            Status::Hit { ttl } => hit_values(&self.status_name, ttl, || self.format(status)),
            _ => self.format(status),
        }
    }

    fn format(&self, status: Status) -> HeaderValue {
        use std::io::Write;
        let fallback = |_| HeaderValue::from_static("tower-cache-aside");
        // Formatted on the stack and copied once into an exactly sized buffer: one
        // allocation (a `Vec` with spare capacity would need a second for `Bytes`).
        let mut buf = [0u8; 160];
        if let Status::Hit { ttl } = status {
            // Written without the formatting machinery.
            if let Some(n) = hit_value(&mut buf, &self.status_name, ttl) {
                return HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(fallback);
            }
        }
        let mut w = std::io::Cursor::new(&mut buf[..]);
        if w.write_all(self.status_name.as_bytes()).is_ok() && write!(w, "; {status}").is_ok() {
            let n = w.position() as usize;
            return HeaderValue::from_bytes(&buf[..n]).unwrap_or_else(fallback);
        }
        // A long status name: format on the heap.
        let mut v = Vec::with_capacity(self.status_name.len() + 48);
        v.extend_from_slice(self.status_name.as_bytes());
        let _ = write!(v, "; {status}");
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).unwrap_or_else(fallback)
    }

    /// Writes the status headers, and takes off the tag headers meant for the cache alone.
    pub(crate) fn mark(&self, headers: &mut HeaderMap, status: Status) {
        crate::tags::strip_cache_only(headers);
        self.mark_stored(headers, status);
    }

    /// Writes the status headers on a stored entry's (which never holds the tag headers
    /// meant for the cache: they are taken off before it is stored, and when it is read).
    pub(crate) fn mark_stored(&self, headers: &mut HeaderMap, status: Status) {
        headers.append(&CACHE_STATUS, self.status_value(status));
        if self.x_cache {
            headers.insert(&X_CACHE, HeaderValue::from_static(status.x_cache()));
        }
    }
}

/// How many hit values each thread keeps (by `ttl`, direct-mapped).
const HIT_VALUES: usize = 8;

/// A hit's `Cache-Status` value, with the status name and ttl it was made for.
type HitValue = (std::sync::Arc<str>, u64, HeaderValue);

thread_local! {
    /// The hit values this thread made lately, with the status name they were made for
    /// (held, so that its address names it): a hot entry's value is made once a second
    /// per thread instead of once a hit. A clone shares the value's bytes, which only this
    /// thread's responses touch in the common case.
    static HIT_VALUE_MEMO: std::cell::RefCell<[Option<HitValue>; HIT_VALUES]> =
        const { std::cell::RefCell::new([const { None }; HIT_VALUES]) };
}

/// The `Cache-Status` value of a hit with `ttl` left under `name`, from this thread's memo
/// or `make`.
fn hit_values(
    name: &std::sync::Arc<str>,
    ttl: u64,
    make: impl FnOnce() -> HeaderValue,
) -> HeaderValue {
    let slot = (ttl % HIT_VALUES as u64) as usize;
    let found = HIT_VALUE_MEMO
        .try_with(|memo| match &memo.try_borrow().ok()?[slot] {
            Some((n, t, v)) if *t == ttl && std::sync::Arc::ptr_eq(n, name) => Some(v.clone()),
            _ => None,
        })
        .ok()
        .flatten();
    if let Some(v) = found {
        return v;
    }
    let v = make();
    let _ = HIT_VALUE_MEMO.try_with(|memo| {
        if let Ok(mut memo) = memo.try_borrow_mut() {
            memo[slot] = Some((name.clone(), ttl, v.clone()));
        }
    });
    v
}

/// `{name}; hit; ttl={ttl}` into `buf`; its length, or `None` when it does not fit.
fn hit_value(buf: &mut [u8], name: &str, ttl: u64) -> Option<usize> {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = ttl;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let parts: [&[u8]; 3] = [name.as_bytes(), b"; hit; ttl=", &digits[at..]];
    let mut n = 0;
    for part in parts {
        buf.get_mut(n..n + part.len())?.copy_from_slice(part);
        n += part.len();
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_reads_as_before() {
        let cases = [
            (Status::Hit { ttl: 7 }, "hit; ttl=7", "HIT"),
            (Status::Collapsed, "fwd=miss; collapsed", "HIT"),
            (
                Status::Stale {
                    why: Stale::IfError,
                    stale_for: 3,
                },
                "hit; ttl=-3; detail=stale-if-error",
                "STALE",
            ),
            (Status::Miss(Miss::Stored), "fwd=miss; stored", "MISS"),
            (
                Status::Miss(Miss::Uncacheable(Uncacheable::VaryStar)),
                "fwd=miss; detail=vary-star",
                "MISS",
            ),
            (
                Status::Miss(Miss::TooLarge),
                "fwd=miss; detail=too-large",
                "MISS",
            ),
            (
                Status::Bypass(Bypass::Credentials),
                "fwd=bypass; detail=credentials",
                "BYPASS",
            ),
        ];
        for (status, text, x) in cases {
            assert_eq!(status.to_string(), text);
            assert_eq!(status.x_cache(), x);
        }
    }

    #[test]
    fn a_hit_is_written_as_its_status_reads() {
        for name in [
            "tower-cache-aside",
            "edge",
            &"n".repeat(150),
            &"n".repeat(400),
        ] {
            let mut engine = Engine::new(());
            engine.status_name = std::sync::Arc::from(name);
            for ttl in [0, 7, 10, 299, 86_400, u64::MAX] {
                let status = Status::Hit { ttl };
                assert_eq!(
                    engine.status_value(status).to_str().unwrap(),
                    format!("{name}; {status}")
                );
            }
        }
    }

    #[test]
    fn the_hit_memo_never_mixes_names_or_ttls() {
        // Two layers with names of the same length, on one thread, taking turns; ttls that
        // share a memo slot (0 and 8) and ttls that do not.
        let engines: Vec<Engine<()>> = ["aaa", "bbb"]
            .into_iter()
            .map(|name| {
                let mut e = Engine::new(());
                e.status_name = std::sync::Arc::from(name);
                e
            })
            .collect();
        for round in 0..3 {
            for ttl in [0, 8, 1, 9, 16, 0, 300, 300 + 8] {
                for (e, name) in engines.iter().zip(["aaa", "bbb"]) {
                    assert_eq!(
                        e.status_value(Status::Hit { ttl }).to_str().unwrap(),
                        format!("{name}; hit; ttl={ttl}"),
                        "round {round}"
                    );
                }
            }
        }
        // A layer dropped and another made with a new name: the memo holds the old name,
        // so the new one (wherever it lives) is never taken for it.
        for name in ["x1", "x2", "x3"] {
            let mut e = Engine::new(());
            e.status_name = std::sync::Arc::from(name);
            assert_eq!(
                e.status_value(Status::Hit { ttl: 5 }).to_str().unwrap(),
                format!("{name}; hit; ttl=5")
            );
        }
    }
}
