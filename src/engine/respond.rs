//! A stored entry answered as a response: its headers with `Age` and `Content-Length`, the
//! status headers, and its body (none for HEAD).

use http::header::{AGE, CONTENT_LENGTH};
use http::{HeaderValue, Response};
use http_body::Body;

use super::body::CacheBody;
use super::status::{Stale, Status};
use super::{Engine, Want};
use crate::entry::Entry;

/// How a stored entry came to be served; its figures (ttl, staleness) come from the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    Fresh,
    /// A waiter got what its flight's leader fetched.
    Collapsed,
    Stale(Stale),
}

impl<St> Engine<St> {
    /// Answers from a stored entry.
    pub(crate) fn hit_response<B: Body>(
        &self,
        entry: Entry,
        want: Want,
        now_ms: u64,
        served: Served,
    ) -> Response<CacheBody<B>> {
        let age = entry.age_secs(now_ms);
        let status = match served {
            Served::Fresh => Status::Hit {
                ttl: entry.remaining(now_ms).map_or(0, |d| d.as_secs()),
            },
            Served::Collapsed => Status::Collapsed,
            Served::Stale(why) => Status::Stale {
                why,
                stale_for: (age as i64).saturating_sub((entry.lifetime_ms / 1000) as i64),
            },
        };
        let mut headers = entry.headers;
        if !headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(entry.body.len()));
        }
        // Most hits are under a second old: skip formatting (and allocating) the common case.
        let age = match age {
            0 => HeaderValue::from_static("0"),
            n => HeaderValue::from(n),
        };
        headers.insert(AGE, age);
        self.mark(&mut headers, status);
        let body = match want {
            Want::HeadersOnly => CacheBody::stored(bytes::Bytes::new(), None),
            Want::Body => CacheBody::stored(entry.body, entry.trailers),
        };
        let mut res = Response::new(body);
        *res.status_mut() = entry.status;
        *res.headers_mut() = headers;
        res
    }
}
