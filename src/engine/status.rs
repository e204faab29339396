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
        use std::io::Write;
        let fallback = |_| HeaderValue::from_static("tower-cache-aside");
        // Formatted on the stack and copied once into an exactly sized buffer: one
        // allocation (a `Vec` with spare capacity would need a second for `Bytes`).
        let mut buf = [0u8; 160];
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
        headers.append(&CACHE_STATUS, self.status_value(status));
        if self.x_cache {
            headers.insert(&X_CACHE, HeaderValue::from_static(status.x_cache()));
        }
    }
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
}
