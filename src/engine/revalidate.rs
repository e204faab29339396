//! Revalidation (RFC 9111 §4.3): a stale entry with a validator is checked with the origin
//! by a conditional request instead of being fetched again. A `304` from the origin makes a
//! fresh entry of the stored one, its headers updated from the `304` (§4.3.4), without the
//! body crossing again; anything else is an ordinary miss.
//!
//! Only entries the lookup returned are revalidated, and the lookup returns none that a
//! clear made dead: a validator never brings a cleared entry back.

use http::header::{
    HeaderName, AGE, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, LAST_MODIFIED, SET_COOKIE, TRANSFER_ENCODING, VARY,
};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::conditional::DIGEST_ETAG_PREFIX;
use crate::compress;
use crate::entry::{Entry, Lifetimes};
use crate::policy::{decide, CacheHint, Decision, Route};
use crate::store::Fence;
use crate::tags::{push_tags, take_entry_tags};

/// The `ETag` the origin gave the entry: not one the layer made (a digest tag), and
/// without the suffix the layer added to a representation it compressed.
fn origin_etag(entry: &Entry) -> Option<HeaderValue> {
    let etag = entry.headers.get(ETAG)?;
    let etag = compress::origin_etag(etag, &entry.headers);
    let ours = etag.as_bytes().starts_with(DIGEST_ETAG_PREFIX.as_bytes());
    (!ours).then_some(etag)
}

/// Whether the origin can be asked about the entry: it has an `ETag` from the origin or a
/// `Last-Modified`.
pub(crate) fn has_validator(entry: &Entry) -> bool {
    entry.headers.contains_key(LAST_MODIFIED) || origin_etag(entry).is_some()
}

/// Makes `headers` (a request's) ask whether `entry` is still current: `If-None-Match`
/// with the origin's `ETag` and `If-Modified-Since` with its `Last-Modified`, whichever it
/// has (an origin that knows only dates answers the second).
pub(crate) fn ask_about(headers: &mut HeaderMap, entry: &Entry) {
    if let Some(etag) = origin_etag(entry) {
        headers.insert(IF_NONE_MATCH, etag);
    }
    if let Some(lm) = entry.headers.get(LAST_MODIFIED) {
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
    if not_modified.headers.contains_key(SET_COOKIE) {
        return None;
    }
    let mut headers = stale.headers.clone();
    // What describes the stored bytes stays as stored (RFC 9111 §3.2 lets a cache keep
    // them): their length, their coding, and the tag and `Vary` of a representation the
    // layer compressed (the origin's `304` speaks of its identity bytes).
    let skip: [&HeaderName; 8] = [
        &CONTENT_LENGTH,
        &TRANSFER_ENCODING,
        &CONNECTION,
        &SET_COOKIE,
        &AGE,
        &CONTENT_ENCODING,
        &ETAG,
        &VARY,
    ];
    let mut replaced: Vec<&HeaderName> = Vec::new();
    for (name, value) in &not_modified.headers {
        if skip.contains(&name) {
            continue;
        }
        if !replaced.contains(&name) {
            headers.remove(name);
            replaced.push(name);
        }
        headers.append(name.clone(), value.clone());
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
    // Tags the `304` names join the entry's: a clear of them must reach it too.
    let mut tags = stale.tags.clone();
    if let Some(hint) = hint {
        push_tags(&mut tags, hint.tags.iter().map(String::as_str), "CacheHint");
    }
    take_entry_tags(&mut not_modified.headers.clone(), &mut tags);
    let mut entry = Entry::new(stale.status, headers, fence, tags, lifetimes);
    entry.body = stale.body.clone();
    entry.trailers = stale.trailers.clone();
    Some(entry)
}
