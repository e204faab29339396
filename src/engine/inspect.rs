//! What the cache holds for one request, for operators (the admin service's `inspect`):
//! the route and key the request maps to, and the entry under it, read as a lookup reads it.

use http::request::Parts;
use http::HeaderName;

use super::vary::{read_marker, variant_key, Stored};
use super::{Engine, Plan};
use crate::entry::{now_ms, Entry, Staleness};
use crate::error::StoreError;
use crate::key::EntryKey;
use crate::policy::Scope;
use crate::store::Store;

/// What the cache holds for one request.
#[derive(Debug)]
pub(crate) struct Inspection {
    /// The matched route's id and pattern.
    pub(crate) route: String,
    pub(crate) pattern: String,
    /// Not looked up, and why (`not-cached`, `credentials`, ...).
    pub(crate) bypass: Option<&'static str>,
    /// The key looked up (the variant's, when the URL's responses vary).
    pub(crate) key: Option<String>,
    /// Whose entry: `shared`, `user` or `anonymous` (per-user routes).
    pub(crate) scope: &'static str,
    pub(crate) user: Option<String>,
    /// The request headers the URL's stored responses vary on (undeclared `Vary`).
    pub(crate) varies_on: Vec<HeaderName>,
    /// The entry, when one is current.
    pub(crate) entry: Option<Entry>,
    pub(crate) now_ms: u64,
    /// Why the layer would not use the store now, whatever it holds (`clear-pending`,
    /// `breaker-open`).
    pub(crate) unavailable: Option<&'static str>,
}

impl Inspection {
    /// `fresh`, `stale` (servable while refreshed or on errors), `kept` (past its windows,
    /// kept for revalidation) or `none`.
    pub(crate) fn state(&self) -> &'static str {
        match self.entry.as_ref().map(|e| e.staleness(self.now_ms)) {
            None => "none",
            Some(Staleness::Fresh) => "fresh",
            Some(Staleness::Revalidate | Staleness::IfError) => "stale",
            Some(Staleness::Dead) => "kept",
        }
    }
}

impl<St: Store> Engine<St> {
    /// Reads what the cache holds for a request like `parts`, without counting it, filling
    /// anything or calling the origin.
    pub(crate) async fn inspect(&self, parts: &Parts) -> Result<Inspection, StoreError> {
        let matched = self.routes.find(parts.uri.path());
        let route = matched.route;
        let mut out = Inspection {
            route: route.id.to_string(),
            pattern: route.counters.pattern().to_owned(),
            bypass: None,
            key: None,
            scope: "shared",
            user: None,
            varies_on: Vec::new(),
            entry: None,
            now_ms: now_ms(),
            unavailable: None,
        };
        if self.deferred.pending() {
            out.unavailable = Some("clear-pending");
        } else if self.breaker.is_open() {
            // The store is known to be down: not waited on here either.
            out.unavailable = Some("breaker-open");
        }
        let key = match self.plan(parts) {
            Plan::Lookup { key, .. } => key,
            Plan::Bypass(why, _) => {
                out.bypass = Some(why.as_str());
                return Ok(out);
            }
            Plan::Skip => {
                out.bypass = Some("not-cached");
                return Ok(out);
            }
        };
        if let Scope::PerUser(name) = &route.policy.scope {
            out.user = name(parts);
            out.scope = if out.user.is_some() {
                "user"
            } else {
                "anonymous"
            };
        }
        out.key = Some(key.to_string());
        if out.unavailable == Some("breaker-open") {
            return Ok(out);
        }
        let mut found = self.read(&key).await?;
        let mut looked_up = key.clone();
        if let Read::Marker(names) = found {
            found = match variant_key(&key, &names, &parts.headers) {
                Some(variant) => {
                    let read = self.read(&variant).await?;
                    looked_up = variant;
                    read
                }
                None => Read::Nothing,
            };
            out.varies_on = names;
        }
        out.key = Some(looked_up.to_string());
        if let Read::Entry(entry) = found {
            // Past every window with no validator to revalidate it by: a lookup's miss.
            let dead = entry.staleness(out.now_ms) == Staleness::Dead
                && !super::revalidate::has_validator(&entry);
            if !dead {
                out.entry = Some(*entry);
            }
        }
        Ok(out)
    }

    /// The current value under `key`.
    async fn read(&self, key: &EntryKey) -> Result<Read, StoreError> {
        let Some(bytes) = self.store.lookup(key).await?.value else {
            return Ok(Read::Nothing);
        };
        Ok(match read_marker(&bytes) {
            Stored::Marker(names) => Read::Marker(names),
            Stored::Broken => Read::Nothing,
            Stored::NotMarker => match Entry::decode_with_tags(bytes) {
                Ok(entry) => Read::Entry(Box::new(entry)),
                Err(_) => Read::Nothing,
            },
        })
    }
}

/// A current value: nothing (or nothing readable), a marker of variants, or an entry.
enum Read {
    Nothing,
    Marker(Vec<HeaderName>),
    Entry(Box<Entry>),
}
