//! Before anything is awaited: what to do with one request, and under which key.

use std::sync::Arc;

use http::header::{IF_MATCH, IF_UNMODIFIED_SINCE, RANGE};
use http::request::Parts;
use http::{HeaderMap, Method};

use super::Engine;
use crate::key::{derive_key, EntryKey, ScopeKey};
use crate::policy::{Freshness, Route, Scope};
use crate::tags::{request_host, uri_tag};

/// What to do with one request, decided before anything is awaited.
pub(crate) enum Plan<'a> {
    /// Not ours: another method or an uncached route. Untouched.
    Skip,
    /// A cacheable route, but this request must not share an entry.
    Bypass(Bypass, &'a Arc<Route>),
    /// Borrowed from the route table: a hit answered at once never touches the route's
    /// reference count (a line every core serving the route would write).
    Lookup {
        key: EntryKey,
        route: &'a Arc<Route>,
    },
}

/// Why a request to a cacheable route is not looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// A `Range` request: partial content is never stored.
    Range,
    /// A GET or HEAD with a body: the key does not cover it.
    RequestBody,
    /// `If-Match` or `If-Unmodified-Since`: preconditions for the origin to evaluate.
    Precondition,
    /// Credentials on a route shared by everyone.
    Credentials,
    /// Credentials on a per-user route whose scope function named nobody.
    UnknownUser,
    /// Not a cached route or method (said only with `mark_every_response`).
    NotCached,
}

impl Bypass {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Bypass::Range => "range",
            Bypass::RequestBody => "request-body",
            Bypass::Precondition => "precondition",
            Bypass::Credentials => "credentials",
            Bypass::UnknownUser => "unknown-user",
            Bypass::NotCached => "not-cached",
        }
    }
}

impl<St> Engine<St> {
    pub(crate) fn plan(&self, parts: &Parts) -> Plan<'_> {
        let matched = self.routes.find(parts.uri.path());
        let route = matched.route;
        // A POST is looked up only on a body-keyed route, once its body was read and hashed.
        let body = match parts.method {
            Method::GET | Method::HEAD => None,
            Method::POST if route.policy.body_key.is_some() => {
                match parts.extensions.get::<crate::key::RequestBodyDigest>() {
                    Some(d) => Some(d.0),
                    None => return Plan::Skip,
                }
            }
            _ => return Plan::Skip,
        };
        if route.policy.freshness == Freshness::Never {
            return Plan::Skip;
        }
        if parts.headers.contains_key(RANGE) {
            return Plan::Bypass(Bypass::Range, route);
        }
        // Preconditions the cache does not evaluate: the origin answers them (412 or not).
        if parts.headers.contains_key(IF_MATCH) || parts.headers.contains_key(IF_UNMODIFIED_SINCE) {
            return Plan::Bypass(Bypass::Precondition, route);
        }
        // A GET or HEAD with a body: the key does not cover it, and a handler may read it.
        if body.is_none() && crate::headers::has_body(&parts.headers) {
            return Plan::Bypass(Bypass::RequestBody, route);
        }
        let has_credentials = self
            .credential_headers
            .iter()
            .any(|h| parts.headers.contains_key(h));
        let user;
        let scope = match &route.policy.scope {
            Scope::Shared if has_credentials => return Plan::Bypass(Bypass::Credentials, route),
            Scope::Shared | Scope::Public => ScopeKey::Shared,
            Scope::PerUser(name_user) => {
                user = name_user(parts);
                match &user {
                    Some(u) => ScopeKey::User(u),
                    None if has_credentials => return Plan::Bypass(Bypass::UnknownUser, route),
                    None => ScopeKey::Anonymous,
                }
            }
        };
        let key = derive_key(
            &route.id,
            parts,
            &route.policy.vary,
            &self.query_filter,
            scope,
            body.as_ref(),
        );
        Plan::Lookup { key, route }
    }

    /// The tags an entry for this request carries: its route's, filled from the path, and
    /// its URI's. Only misses need them, so hits never pay for rendering them.
    pub(crate) fn entry_tags(&self, headers: &HeaderMap, uri: &http::Uri) -> Vec<String> {
        let matched = self.routes.find(uri.path());
        let mut tags = matched.route.tags(&matched.params);
        tags.push(uri_tag(request_host(headers, uri), uri.path()));
        tags
    }
}
