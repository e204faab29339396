//! The HTTP rules a shared cache applies to one response (RFC 9111, RFC 5861): the
//! `Cache-Control` directives it acts on and the decision to store or not, with the lifetime.
//! The precedence is in the `policy` module docs.
//!
//! (Over 500 lines with its tests, which are most of it: each rule's cases sit with it.)

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderName, ACCEPT_ENCODING, AGE, CACHE_CONTROL, DATE, EXPIRES, SET_COOKIE, VARY,
};
use http::HeaderMap;

use super::{CacheHint, Freshness, RoutePolicy, Scope};

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
    pub(crate) must_understand: bool,
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
                    "must-understand" => cc.must_understand = true,
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

/// Why a response is not stored: the `detail` of its `Cache-Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Uncacheable {
    /// The status is not in the route's list.
    Status,
    /// The response sets a cookie.
    SetCookie,
    /// A gRPC call that failed (`grpc-status` other than 0).
    GrpcStatus,
    /// The handler said [`CacheHint::no_store`].
    HandlerNoStore,
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: no-cache` (it would need revalidating on every use).
    NoCache,
    /// `Cache-Control: private` on a route that is not per-user.
    Private,
    /// A `Vary` header that is not readable text.
    VaryUnreadable,
    /// `Vary: *`.
    VaryStar,
    /// `Vary` on more request headers than a variant is keyed by.
    VaryUndeclared,
    /// More variants of one URL than an instance stores.
    TooManyVariants,
    /// A request header the response varies on is too long to key a variant by.
    VaryValueTooLong,
    /// No lifetime from the hint, the headers or the route.
    NoFreshness,
    /// Already older (`Age`) than its lifetime.
    Stale,
}

impl Uncacheable {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Uncacheable::Status => "status",
            Uncacheable::SetCookie => "set-cookie",
            Uncacheable::GrpcStatus => "grpc-status",
            Uncacheable::HandlerNoStore => "handler-no-store",
            Uncacheable::NoStore => "no-store",
            Uncacheable::NoCache => "no-cache",
            Uncacheable::Private => "private",
            Uncacheable::VaryUnreadable => "vary",
            Uncacheable::VaryStar => "vary-star",
            Uncacheable::VaryUndeclared => "vary-undeclared",
            Uncacheable::TooManyVariants => "too-many-variants",
            Uncacheable::VaryValueTooLong => "vary-value-too-long",
            Uncacheable::NoFreshness => "no-freshness",
            Uncacheable::Stale => "stale",
        }
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
    Skip(Uncacheable),
}

/// Applies the rules in the module docs to one response.
pub(crate) fn decide(
    policy: &RoutePolicy,
    status: http::StatusCode,
    headers: &HeaderMap,
    hint: Option<&CacheHint>,
) -> Decision {
    let cc = CacheControl::parse(headers);
    if !storable_status(policy, status, &cc, headers, hint) {
        return Decision::Skip(Uncacheable::Status);
    }
    if headers.contains_key(SET_COOKIE) {
        return Decision::Skip(Uncacheable::SetCookie);
    }
    // A trailers-only gRPC response carries its status in the headers.
    if policy.grpc && headers.get("grpc-status").is_some_and(|s| s != "0") {
        return Decision::Skip(Uncacheable::GrpcStatus);
    }
    if hint.is_some_and(|h| h.no_store) {
        return Decision::Skip(Uncacheable::HandlerNoStore);
    }
    // `must-understand`: a cache that knows the status's rules may store it despite
    // `no-store` (RFC 9111 §5.2.2.3); `storable_status` refused the statuses it does not.
    if cc.no_store && !cc.must_understand {
        return Decision::Skip(Uncacheable::NoStore);
    }
    if cc.no_cache {
        return Decision::Skip(Uncacheable::NoCache);
    }
    if cc.private && !matches!(policy.scope, Scope::PerUser(_)) {
        return Decision::Skip(Uncacheable::Private);
    }
    // Headers the route does not key by make the response a variant of its URL (stored
    // under a key with their values, see `engine::vary`); `*`, or too many, is not stored.
    if let Err(why) = extra_vary_names(policy, headers) {
        return Decision::Skip(why);
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
        return Decision::Skip(Uncacheable::NoFreshness);
    };
    let Some(initial_age_s) = initial_age(headers) else {
        return Decision::Skip(Uncacheable::Stale);
    };
    if lifetime <= Duration::from_secs(u64::from(initial_age_s)) {
        return Decision::Skip(Uncacheable::Stale);
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

/// The `Age` a response arrived with, in seconds: 0 without one; `None` (stale, never
/// stored) when it is not a non-negative integer (`abc`, `-1`, `1.5`, `7200;x=y`) or comes
/// on several header lines. A list on one line (`Age: 7200, 0`, as a combined header
/// arrives) counts its first member (RFC 9111 §5.1). Treating a broken `Age` as stale
/// rather than as 0 keeps an old response from passing for a fresh one.
fn initial_age(headers: &HeaderMap) -> Option<u32> {
    let mut lines = headers.get_all(AGE).iter();
    let Some(line) = lines.next() else {
        return Some(0);
    };
    if lines.next().is_some() {
        return None;
    }
    let first = line.to_str().ok()?.split(',').next()?.trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Larger than u32 seconds (136 years): older than any lifetime.
    first.parse::<u32>().ok().or(Some(u32::MAX))
}

/// The most request headers a response may vary on beyond the route's declared ones.
pub(crate) const MAX_VARY_NAMES: usize = 4;

/// The request headers a response varies on that the route does not key by itself: sorted,
/// lower-case, without duplicates. Empty for most responses.
pub(crate) fn extra_vary_names(
    policy: &RoutePolicy,
    headers: &HeaderMap,
) -> Result<Vec<HeaderName>, Uncacheable> {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        let Ok(value) = value.to_str() else {
            return Err(Uncacheable::VaryUnreadable);
        };
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(Uncacheable::VaryStar);
            }
            // A name a marker can hold (one byte of length).
            let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) else {
                return Err(Uncacheable::VaryUnreadable);
            };
            if name.as_str().len() > 255 {
                return Err(Uncacheable::VaryUndeclared);
            }
            let declared = policy.vary.contains(&name)
                || (policy.compress.is_some() && name == ACCEPT_ENCODING);
            if !declared && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.len() > MAX_VARY_NAMES {
        return Err(Uncacheable::VaryUndeclared);
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// Whether a response with this status may be stored (RFC 9111 §3): a status in the
/// route's list; or, unless the route chose its list itself, any final status whose response
/// states its own lifetime (`s-maxage`, `max-age`, `Expires`, a hint's TTL), such as a 302
/// or a 503 that says how long it holds. Never a 206 (ranges pass through) or a 304. With
/// `must-understand`, only the statuses whose caching rules the cache knows.
fn storable_status(
    policy: &RoutePolicy,
    status: http::StatusCode,
    cc: &CacheControl,
    headers: &HeaderMap,
    hint: Option<&CacheHint>,
) -> bool {
    use http::StatusCode;
    let final_status = status.as_u16() >= 200
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED;
    if !final_status || (cc.must_understand && status.canonical_reason().is_none()) {
        return false;
    }
    if policy.statuses.contains(&status) {
        return true;
    }
    // A server error is kept only when it says so to shared caches in particular
    // (`s-maxage`, a hint): a blanket `max-age` that some layer puts on every response must
    // not turn a passing 500 into a minute of cached errors.
    let explicit = if status.is_server_error() {
        hint.is_some_and(|h| h.ttl.is_some()) || cc.s_maxage.is_some()
    } else {
        hint.is_some_and(|h| h.ttl.is_some())
            || cc.s_maxage.is_some()
            || cc.max_age.is_some()
            || headers.contains_key(EXPIRES)
    };
    explicit && !policy.statuses_chosen
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    use crate::headers::map as headers;

    fn code(n: u16) -> http::StatusCode {
        http::StatusCode::from_u16(n).unwrap()
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
        assert_eq!(decide(&p, code(200), &headers(&[]), None), store(300));
        assert_eq!(
            decide(
                &p,
                code(200),
                &headers(&[("cache-control", "max-age=10")]),
                None
            ),
            store(10)
        );
        assert_eq!(
            decide(
                &p,
                code(200),
                &headers(&[("cache-control", "max-age=10, s-maxage=20")]),
                None
            ),
            store(20)
        );
        let hint = CacheHint::ttl(Duration::from_secs(5));
        assert_eq!(
            decide(
                &p,
                code(200),
                &headers(&[("cache-control", "s-maxage=20")]),
                Some(&hint)
            ),
            store(5)
        );
        assert_eq!(
            decide(
                &p,
                code(200),
                &headers(&[("cache-control", "max-age=oops")]),
                None
            ),
            Decision::Skip(Uncacheable::Stale)
        );
        let h = headers(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
        ]);
        assert_eq!(decide(&p, code(200), &h, None), store(60));
        assert_eq!(
            decide(
                &RoutePolicy::from_response(),
                code(200),
                &headers(&[]),
                None
            ),
            Decision::Skip(Uncacheable::NoFreshness)
        );
        assert_eq!(
            decide(
                &p,
                code(200),
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
        let windows = |h: &[(&str, &str)]| match decide(&p, code(200), &headers(h), None) {
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
    fn statuses_with_their_own_lifetime_are_stored_unless_the_route_chose_its_list() {
        let p = ttl(300);
        let max_age = headers(&[("cache-control", "max-age=30")]);
        for status in [302, 307, 400] {
            assert!(
                matches!(
                    decide(&p, code(status), &max_age, None),
                    Decision::Store { lifetime, .. } if lifetime == Duration::from_secs(30)
                ),
                "{status}"
            );
            // Without a lifetime of its own, the route's TTL does not make it storable.
            assert_eq!(
                decide(&p, code(status), &headers(&[]), None),
                Decision::Skip(Uncacheable::Status)
            );
        }
        // A server error only with a lifetime meant for shared caches.
        for status in [500, 503] {
            assert_eq!(
                decide(&p, code(status), &max_age, None),
                Decision::Skip(Uncacheable::Status)
            );
            let s_maxage = headers(&[("cache-control", "s-maxage=30")]);
            assert!(matches!(
                decide(&p, code(status), &s_maxage, None),
                Decision::Store { .. }
            ));
        }
        let hint = CacheHint::ttl(Duration::from_secs(9));
        assert!(matches!(
            decide(&p, code(503), &headers(&[]), Some(&hint)),
            Decision::Store { .. }
        ));
        let expires = headers(&[
            ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("expires", "Sun, 06 Nov 1994 08:50:37 GMT"),
        ]);
        assert!(matches!(
            decide(&p, code(302), &expires, None),
            Decision::Store { .. }
        ));
        // A list the route chose is the whole list.
        let chosen = ttl(300).statuses([200]);
        assert_eq!(
            decide(&chosen, code(500), &max_age, None),
            Decision::Skip(Uncacheable::Status)
        );
        for never in [206, 304, 101] {
            assert_eq!(
                decide(&p, code(never), &max_age, None),
                Decision::Skip(Uncacheable::Status),
                "{never}"
            );
        }
    }

    #[test]
    fn must_understand_overrides_no_store_for_known_statuses_only() {
        let p = ttl(300);
        let h = headers(&[("cache-control", "must-understand, no-store, max-age=60")]);
        assert!(matches!(
            decide(&p, code(200), &h, None),
            Decision::Store { .. }
        ));
        assert_eq!(
            decide(&p, code(299), &h, None),
            Decision::Skip(Uncacheable::Status)
        );
        let plain = headers(&[("cache-control", "no-store, max-age=60")]);
        assert_eq!(
            decide(&p, code(200), &plain, None),
            Decision::Skip(Uncacheable::NoStore)
        );
    }

    #[test]
    fn an_age_list_counts_its_first_member() {
        // As a combined header arrives (RFC 9111 §5.1): 7200 s old, not 0.
        let h = headers(&[("age", "7200, 0"), ("cache-control", "max-age=3600")]);
        assert_eq!(
            decide(&ttl(300), code(200), &h, None),
            Decision::Skip(Uncacheable::Stale)
        );
        let h = headers(&[("age", "10, 99999"), ("cache-control", "max-age=3600")]);
        assert!(matches!(
            decide(&ttl(300), code(200), &h, None),
            Decision::Store {
                initial_age_s: 10,
                ..
            }
        ));
        // A broken Age is stale, not 0.
        for age in [
            "abc",
            "-7200",
            "7200.0",
            "7200;foo=bar",
            "",
            "99999999999999",
        ] {
            let h = headers(&[("age", age), ("cache-control", "max-age=3600")]);
            assert_eq!(
                decide(&ttl(300), code(200), &h, None),
                Decision::Skip(Uncacheable::Stale),
                "{age}"
            );
        }
        let mut two = headers(&[("age", "0"), ("cache-control", "max-age=3600")]);
        two.append(AGE, http::HeaderValue::from_static("0"));
        assert_eq!(
            decide(&ttl(300), code(200), &two, None),
            Decision::Skip(Uncacheable::Stale)
        );
    }

    #[test]
    fn extra_names_leave_out_what_the_route_declares() {
        let policy = RoutePolicy::ttl(std::time::Duration::from_secs(1)).vary(["accept-language"]);
        let h = headers(&[
            ("vary", "Accept-Language, X-Tenant"),
            ("vary", "x-tenant, Origin"),
        ]);
        let names = extra_vary_names(&policy, &h).unwrap();
        assert_eq!(
            names,
            [
                HeaderName::from_static("origin"),
                HeaderName::from_static("x-tenant")
            ]
        );
        assert!(matches!(
            extra_vary_names(&policy, &headers(&[("vary", "a, b, c, d, e")])),
            Err(Uncacheable::VaryUndeclared)
        ));
        assert!(matches!(
            extra_vary_names(&policy, &headers(&[("vary", "*")])),
            Err(Uncacheable::VaryStar)
        ));
    }

    #[test]
    fn prohibitions_win() {
        let p = ttl(300);
        let hint = CacheHint::ttl(Duration::from_secs(5));
        for (h, why) in [
            (("set-cookie", "a=b"), Uncacheable::SetCookie),
            (("cache-control", "no-store"), Uncacheable::NoStore),
            (("cache-control", "No-Cache"), Uncacheable::NoCache),
            (
                ("cache-control", "private, max-age=60"),
                Uncacheable::Private,
            ),
            (("vary", "*"), Uncacheable::VaryStar),
            (("vary", "a, b, c, d, e"), Uncacheable::VaryUndeclared),
        ] {
            assert_eq!(
                decide(&p, code(200), &headers(&[h]), Some(&hint)),
                Decision::Skip(why),
                "{h:?}"
            );
        }
        assert_eq!(
            decide(&p, code(500), &headers(&[]), None),
            Decision::Skip(Uncacheable::Status)
        );
        assert_eq!(
            decide(&p, code(206), &headers(&[]), None),
            Decision::Skip(Uncacheable::Status)
        );
        assert_eq!(
            decide(&p, code(200), &headers(&[]), Some(&CacheHint::no_store())),
            Decision::Skip(Uncacheable::HandlerNoStore)
        );
        let per_user = ttl(300).per_user(|_| None);
        assert!(matches!(
            decide(
                &per_user,
                code(200),
                &headers(&[("cache-control", "private")]),
                None
            ),
            Decision::Store { .. }
        ));
        let varying = ttl(300).vary(["Accept-Encoding"]);
        assert!(matches!(
            decide(
                &varying,
                code(200),
                &headers(&[("vary", "Accept-Encoding")]),
                None
            ),
            Decision::Store { .. }
        ));
    }
}
