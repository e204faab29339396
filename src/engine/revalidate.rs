//! Revalidation (RFC 9111 §4.3): a stale entry with a validator is checked with the origin
//! by a conditional request instead of being fetched again. A `304` from the origin makes a
//! fresh entry of the stored one, its headers updated from the `304` (§4.3.4), without the
//! body crossing again; anything else is an ordinary miss.
//!
//! Only entries the lookup returned are revalidated, and the lookup returns none that a
//! clear made dead: a validator never brings a cleared entry back.

use http::header::{
    HeaderName, CONNECTION, CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
    SET_COOKIE, TRANSFER_ENCODING,
};
use http::{HeaderMap, StatusCode};

use crate::entry::{Entry, Lifetimes};
use crate::policy::{decide, CacheHint, Decision, Route};
use crate::store::Fence;

/// Whether the entry can be revalidated: it has an `ETag` or a `Last-Modified`.
pub(crate) fn has_validator(entry: &Entry) -> bool {
    entry.headers.contains_key(ETAG) || entry.headers.contains_key(LAST_MODIFIED)
}

/// Makes `headers` (a request's) ask whether `entry` is still current: `If-None-Match`
/// with its `ETag`, else `If-Modified-Since` with its `Last-Modified`.
pub(crate) fn ask_about(headers: &mut HeaderMap, entry: &Entry) {
    if let Some(etag) = entry.headers.get(ETAG) {
        headers.insert(IF_NONE_MATCH, etag.clone());
    } else if let Some(lm) = entry.headers.get(LAST_MODIFIED) {
        headers.insert(IF_MODIFIED_SINCE, lm.clone());
    }
}

/// The entry a `304` makes of the stored one: the stored status, body and trailers, its
/// headers updated with the `304`'s, a lifetime decided anew on those headers, and the
/// fence of the lookup that found it stale. `None` when the updated response may no longer
/// be stored (the `304` says `no-store`, sets a cookie...).
pub(crate) fn refreshed(
    stale: &Entry,
    not_modified: &http::response::Parts,
    route: &Route,
    fence: Fence,
) -> Option<Entry> {
    debug_assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    let mut headers = stale.headers.clone();
    let skip: [&HeaderName; 4] = [
        &CONTENT_LENGTH,
        &TRANSFER_ENCODING,
        &CONNECTION,
        &SET_COOKIE,
    ];
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in &not_modified.headers {
        if skip.contains(&name) || name == http::header::AGE {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
    }
    if not_modified.headers.contains_key(SET_COOKIE) {
        return None;
    }
    let hint = not_modified.extensions.get::<CacheHint>();
    let Decision::Store {
        lifetime,
        initial_age_s,
        stale_while_revalidate,
        stale_if_error,
    } = decide(&route.policy, stale.status, &headers, hint)
    else {
        return None;
    };
    let lifetimes = Lifetimes {
        lifetime,
        initial_age_s,
        stale_while_revalidate,
        stale_if_error,
    };
    let mut entry = Entry::new(stale.status, headers, fence, stale.tags.clone(), lifetimes);
    entry.body = stale.body.clone();
    entry.trailers = stale.trailers.clone();
    Some(entry)
}
