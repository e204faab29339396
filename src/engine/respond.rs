//! A stored entry answered as a response: its headers with `Age` and `Content-Length`, the
//! status headers, and its body (none for HEAD); or a `304 Not Modified` when the client
//! already has it (see `conditional`).

use http::header::{AGE, CONTENT_ENCODING, CONTENT_LENGTH};
use http::{HeaderValue, Response, StatusCode};
use http_body::Body;

use super::body::CacheBody;
use super::conditional::not_modified_headers;
use super::status::{Stale, Status, CACHE_STATUS, X_CACHE};
use super::{Asked, Engine, Want};
use crate::compress;
use crate::entry::Entry;
use crate::stats::count;

/// How a stored entry came to be served; its figures (ttl, staleness) come from the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    Fresh,
    /// A waiter got what its flight's leader fetched.
    Collapsed,
    /// The origin confirmed a stale entry.
    Revalidated,
    Stale(Stale),
}

impl<St> Engine<St> {
    /// Answers from a stored entry.
    pub(crate) fn hit_response<B: Body>(
        &self,
        entry: Entry,
        asked: &Asked,
        now_ms: u64,
        served: Served,
    ) -> Response<CacheBody<B>> {
        // Paths that could not ask the origin instead (a stale entry, a flight's) send what
        // is stored when it cannot be represented; `serve` checks fresh hits first.
        let entry = represent(entry, asked.accept_encoding.as_ref(), self.max_body_bytes)
            .unwrap_or_else(|stored| *stored);
        self.answer(entry, asked, now_ms, served)
    }

    /// Answers from an entry already in the client's coding.
    pub(crate) fn answer<B: Body>(
        &self,
        entry: Entry,
        asked: &Asked,
        now_ms: u64,
        served: Served,
    ) -> Response<CacheBody<B>> {
        let age = entry.age_secs(now_ms);
        let status = match served {
            Served::Fresh => Status::Hit {
                ttl: entry.remaining(now_ms).map_or(0, |d| d.as_secs()),
            },
            Served::Collapsed => Status::Collapsed,
            Served::Revalidated => Status::Revalidated,
            Served::Stale(why) => Status::Stale {
                why,
                stale_for: (age as i64).saturating_sub((entry.lifetime_ms / 1000) as i64),
            },
        };
        let not_modified = asked
            .conditions
            .as_ref()
            .is_some_and(|c| c.not_modified(entry.status, &entry.headers, entry.stored_at_ms));
        let (status_code, mut headers) = if not_modified {
            count!(self.stats.inner, not_modified);
            (
                StatusCode::NOT_MODIFIED,
                not_modified_headers(&entry.headers),
            )
        } else {
            (entry.status, entry.headers)
        };
        if !not_modified && !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        }
        // Most hits are under a second old: skip formatting (and allocating) the common case.
        let age = match age {
            0 => HeaderValue::from_static("0"),
            n => HeaderValue::from(n),
        };
        headers.insert(AGE, age);
        match served {
            // Read back from the store: no tag headers meant for the cache (see `decode`).
            Served::Fresh => self.mark_stored(&mut headers, status),
            // Entries made here (a flight's, a revalidated one) are checked again.
            _ => self.mark(&mut headers, status),
        }
        let body = match asked.want {
            _ if not_modified => CacheBody::not_modified(),
            Want::Body => CacheBody::stored(entry.body, entry.trailers),
            Want::HeadersOnly => CacheBody::stored(bytes::Bytes::new(), None),
        };
        let mut res = Response::new(body);
        *res.status_mut() = status_code;
        *res.headers_mut() = headers;
        res
    }

    /// A miss's response turned into a `304` for a client whose copy matches it. The body
    /// is dropped: its reader task still finishes the copy for the store, within the size
    /// limit and the time the flight waits (nothing here holds more of it).
    pub(crate) fn not_modified_miss<B: Body>(
        &self,
        res: Response<CacheBody<B>>,
    ) -> Response<CacheBody<B>> {
        count!(self.stats.inner, not_modified);
        let (parts, body) = res.into_parts();
        drop(body);
        let mut headers = not_modified_headers(&parts.headers);
        for name in [&CACHE_STATUS, &X_CACHE] {
            for value in parts.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let mut out = Response::new(CacheBody::not_modified());
        *out.status_mut() = StatusCode::NOT_MODIFIED;
        *out.headers_mut() = headers;
        out
    }
}

/// The entry as this client takes it: a body stored compressed is decompressed for a
/// client that does not accept its coding (see `compress`), up to `limit` bytes. `Err` with
/// the entry as stored when that cannot be done (a coding the client refuses and the layer
/// cannot undo, or bytes that do not decompress): `serve` sends such requests to the origin.
pub(crate) fn represent(
    mut entry: Entry,
    accept: Option<&HeaderValue>,
    limit: usize,
) -> Result<Entry, Box<Entry>> {
    let Some(coding) = entry.headers.get(CONTENT_ENCODING) else {
        return Ok(entry);
    };
    if !compress::varies_on_accept_encoding(&entry.headers) {
        return Ok(entry);
    }
    match compress::negotiate(coding, accept, &entry.headers) {
        compress::Served::AsStored => Ok(entry),
        compress::Served::Unservable => Err(Box::new(entry)),
        compress::Served::Identity(encoding) => match encoding.decompress(&entry.body, limit) {
            Some(body) => {
                compress::identity_headers(&mut entry.headers, encoding, body.len());
                entry.body = body;
                Ok(entry)
            }
            None => {
                tracing::warn!("a stored body does not decompress within the size limit");
                Err(Box::new(entry))
            }
        },
    }
}

/// Whether this client takes the entry as stored ([`represent`] has nothing to undo): what
/// a hit answered inside `Cache::call` must be, so that decompressing never runs there.
pub(crate) fn as_stored(entry: &Entry, accept: Option<&HeaderValue>) -> bool {
    entry.headers.get(CONTENT_ENCODING).is_none_or(|coding| {
        !compress::varies_on_accept_encoding(&entry.headers)
            || compress::negotiate(coding, accept, &entry.headers) == compress::Served::AsStored
    })
}

/// Whether a stored entry can be served to this client at all without asking the origin:
/// not when its coding is one the client refuses and the layer cannot undo (unknown, or
/// `no-transform`).
pub(crate) fn servable(entry: &Entry, accept: Option<&HeaderValue>) -> bool {
    entry.headers.get(CONTENT_ENCODING).is_none_or(|coding| {
        !compress::varies_on_accept_encoding(&entry.headers)
            || compress::negotiate(coding, accept, &entry.headers) != compress::Served::Unservable
    })
}
