//! The route table: path patterns (axum's syntax) matched to routes, each a policy with its
//! id and its parsed tag templates.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use http::Method;

use super::template::TagTemplate;
use super::RoutePolicy;
use crate::error::ConfigError;
use crate::stats::RouteCounters;

#[derive(Clone, Debug)]
pub(crate) struct Route {
    pub(crate) id: Arc<str>,
    pub(crate) policy: RoutePolicy,
    templates: Vec<TagTemplate>,
    clear_templates: Vec<TagTemplate>,
    clear_on_templates: Vec<(Method, Vec<TagTemplate>)>,
    /// What the route did (shared by the layer's services, made afresh for each layer).
    pub(crate) counters: Arc<RouteCounters>,
}

impl Route {
    /// The route's tags, filled from the path parameters; invalid ones are skipped and logged.
    pub(crate) fn tags(&self, params: &matchit::Params<'_, '_>) -> Vec<String> {
        self.render(&self.templates, params)
    }

    /// The tags a mutation with `method` clears.
    pub(crate) fn clear_tags(
        &self,
        method: &Method,
        params: &matchit::Params<'_, '_>,
    ) -> Vec<String> {
        match self.clear_on_templates.iter().find(|(m, _)| m == method) {
            Some((_, templates)) => self.render(templates, params),
            None => self.render(&self.clear_templates, params),
        }
    }

    fn render(&self, templates: &[TagTemplate], params: &matchit::Params<'_, '_>) -> Vec<String> {
        templates
            .iter()
            .filter_map(|t| {
                let tag = t.render(params);
                if tag.is_none() {
                    tracing::warn!(route = %self.id, "skipping a tag that rendered invalid");
                }
                tag
            })
            .collect()
    }
}

/// Maps path patterns (axum's syntax: `/events/{id}`, `/files/{*path}`) to policies.
///
/// ```
/// use std::time::Duration;
/// use tower_cache_aside::{RoutePolicy, RouteTable};
///
/// let table = RouteTable::new()
///     .route("/events", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events"]))
///     .route("/events/{id}", RoutePolicy::ttl(Duration::from_secs(300)).tags(["events", "event:{id}"]))
///     .route("/health", RoutePolicy::never())
///     .fallback(RoutePolicy::never());
/// ```
#[derive(Clone)]
pub struct RouteTable {
    router: matchit::Router<usize>,
    routes: Vec<Arc<Route>>,
    fallback: Arc<Route>,
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteTable")
            .field("routes", &self.routes)
            .field("fallback", &self.fallback)
            .finish()
    }
}

pub(crate) struct Matched<'t, 'p> {
    pub(crate) route: &'t Arc<Route>,
    pub(crate) params: matchit::Params<'t, 'p>,
}

impl RouteTable {
    /// An empty table whose fallback is [`RoutePolicy::from_response`].
    pub fn new() -> Self {
        RouteTable {
            router: matchit::Router::new(),
            routes: Vec::new(),
            fallback: Arc::new(
                build_route("", RoutePolicy::from_response(), "default").expect("a valid default"),
            ),
        }
    }

    /// Adds a route.
    ///
    /// # Panics
    /// When the pattern is invalid or conflicts with another, a tag names a parameter the
    /// pattern lacks, or the policy is otherwise invalid (the message says which). Use
    /// [`RouteTable::try_route`] to get the error instead.
    #[track_caller]
    pub fn route(self, pattern: &str, policy: RoutePolicy) -> Self {
        match self.try_route(pattern, policy) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    /// Adds a route, or says why it cannot be added.
    pub fn try_route(mut self, pattern: &str, policy: RoutePolicy) -> Result<Self, ConfigError> {
        let default_id = default_route_id(pattern);
        let route = build_route(pattern, policy, &default_id)?;
        if self.routes.iter().any(|r| r.id == route.id) {
            return Err(ConfigError::new(format!(
                "route id `{}` is used twice; give `{pattern}` its own with RoutePolicy::id",
                route.id
            )));
        }
        self.router
            .insert(pattern, self.routes.len())
            .map_err(|e| ConfigError::new(format!("route `{pattern}` cannot be added: {e}")))?;
        self.routes.push(Arc::new(route));
        Ok(self)
    }

    /// The policy for paths no route matches (default: [`RoutePolicy::from_response`]).
    ///
    /// # Panics
    /// When the policy is invalid or uses tag placeholders (the fallback has no parameters).
    #[track_caller]
    pub fn fallback(mut self, policy: RoutePolicy) -> Self {
        match build_route("", policy, "default") {
            Ok(r) => self.fallback = Arc::new(r),
            Err(e) => panic!("{e}"),
        }
        self
    }

    /// The table with `encoding` for every route (and the fallback) that has none.
    pub(crate) fn with_compression(&self, encoding: crate::compress::Encoding) -> RouteTable {
        let apply = |route: &Arc<Route>| {
            if route.policy.compress.is_some() {
                return route.clone();
            }
            let mut route = Route::clone(route);
            route.policy.compress = Some(encoding);
            route
                .policy
                .vary
                .retain(|h| h != http::header::ACCEPT_ENCODING);
            Arc::new(route)
        };
        RouteTable {
            router: self.router.clone(),
            routes: self.routes.iter().map(apply).collect(),
            fallback: apply(&self.fallback),
        }
    }

    /// The table with new counters for every route: a layer's figures are its own, even
    /// when another layer was given the same table.
    pub(crate) fn counted_afresh(&self) -> RouteTable {
        let fresh = |route: &Arc<Route>| {
            let mut route = Route::clone(route);
            route.counters = Arc::new(RouteCounters::new(
                route.id.clone(),
                route.counters.pattern(),
            ));
            Arc::new(route)
        };
        RouteTable {
            router: self.router.clone(),
            routes: self.routes.iter().map(fresh).collect(),
            fallback: fresh(&self.fallback),
        }
    }

    /// Every route's counters, in the table's order, the fallback's last.
    pub(crate) fn counters(&self) -> impl Iterator<Item = Arc<RouteCounters>> + '_ {
        let all = self.routes.iter().chain(std::iter::once(&self.fallback));
        all.map(|r| r.counters.clone())
    }

    pub(crate) fn find<'t, 'p>(&'t self, path: &'p str) -> Matched<'t, 'p> {
        match self.router.at(path) {
            Ok(m) => Matched {
                route: &self.routes[*m.value],
                params: m.params,
            },
            Err(_) => Matched {
                route: &self.fallback,
                params: matchit::Params::new(),
            },
        }
    }
}

/// Most `{parameters}` a route pattern may have (the router refuses more than 25, by
/// panicking: refused here with an error first).
const MAX_ROUTE_PARAMS: usize = 16;

fn build_route(
    pattern: &str,
    mut policy: RoutePolicy,
    default_id: &str,
) -> Result<Route, ConfigError> {
    if policy.compress.is_some() {
        // The layer negotiates the coding itself: no entry per `Accept-Encoding`.
        policy.vary.retain(|h| h != http::header::ACCEPT_ENCODING);
    }
    if let Some(e) = &policy.error {
        return Err(e.clone());
    }
    if pattern.matches('{').count() > MAX_ROUTE_PARAMS {
        return Err(ConfigError::new(format!(
            "route `{pattern}` has more than {MAX_ROUTE_PARAMS} parameters (or braces); split it"
        )));
    }
    let id = policy.id.clone().unwrap_or_else(|| default_id.to_owned());
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ConfigError::new(format!(
            "route id `{id}` is not valid: use 1 to 64 letters, digits, `_`, `-` or `.`"
        )));
    }
    let params = pattern_params(pattern);
    let parse_all = |tags: &[String]| {
        tags.iter()
            .map(|t| TagTemplate::parse(t, &params, pattern))
            .collect::<Result<Vec<_>, _>>()
    };
    let templates = parse_all(&policy.tags)?;
    let clear_templates = match &policy.clears {
        Some(tags) => parse_all(tags)?,
        None => templates.clone(),
    };
    let clear_on_templates = policy
        .clears_on
        .iter()
        .map(|(m, tags)| Ok((m.clone(), parse_all(tags)?)))
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let id: Arc<str> = Arc::from(id);
    Ok(Route {
        counters: Arc::new(RouteCounters::new(id.clone(), pattern)),
        id,
        policy,
        templates,
        clear_templates,
        clear_on_templates,
    })
}

fn pattern_params(pattern: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        out.insert(name.trim_start_matches('*').to_owned());
        rest = &rest[open + close + 1..];
    }
    out
}

/// `/events/{id}/logs` → `events_id_logs`; `/` → `root`.
fn default_route_id(pattern: &str) -> String {
    let mut id = String::new();
    for c in pattern.chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
            id.push(c);
        } else if !id.is_empty() && !id.ends_with('_') {
            id.push('_');
        }
    }
    let id = id.trim_end_matches('_');
    let mut id = if id.is_empty() {
        "root".to_owned()
    } else {
        id.to_owned()
    };
    id.truncate(64);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Freshness;
    use std::time::Duration;

    #[test]
    fn too_many_parameters_is_an_error_not_a_panic() {
        let pattern: String = (0..30).map(|i| format!("/{{p{i}}}")).collect();
        let e = RouteTable::new()
            .try_route(&pattern, RoutePolicy::ttl(Duration::from_secs(1)))
            .unwrap_err();
        assert!(e.to_string().contains("parameters"), "{e}");
        let fine: String = (0..16).map(|i| format!("/{{p{i}}}")).collect();
        assert!(RouteTable::new()
            .try_route(&fine, RoutePolicy::ttl(Duration::from_secs(1)))
            .is_ok());
    }

    fn ttl(s: u64) -> RoutePolicy {
        RoutePolicy::ttl(Duration::from_secs(s))
    }

    #[test]
    fn route_table_matches_and_renders_tags() {
        let t = RouteTable::new().route("/events/{id}", ttl(300).tags(["events", "event:{id}"]));
        let m = t.find("/events/42");
        assert_eq!(&*m.route.id, "events_id");
        assert_eq!(
            m.route.tags(&m.params),
            vec!["events".to_owned(), "event:42".to_owned()]
        );
        let m = t.find("/nope");
        assert_eq!(&*m.route.id, "default");
        assert_eq!(m.route.policy.freshness, Freshness::FromResponse);
    }

    #[test]
    fn clear_rules_per_method() {
        let t = RouteTable::new().route(
            "/events/{id}",
            ttl(300)
                .tags(["events", "event:{id}"])
                .clears_on(Method::PATCH, ["event:{id}"])
                .clears_on(Method::POST, Vec::<String>::new()),
        );
        let m = t.find("/events/5");
        assert_eq!(
            m.route.clear_tags(&Method::DELETE, &m.params),
            ["events", "event:5"]
        );
        assert_eq!(m.route.clear_tags(&Method::PATCH, &m.params), ["event:5"]);
        assert!(m.route.clear_tags(&Method::POST, &m.params).is_empty());
        let t = RouteTable::new().route(
            "/users/{id}/permissions",
            RoutePolicy::never().clears(["user:{id}"]),
        );
        let m = t.find("/users/9/permissions");
        assert_eq!(m.route.clear_tags(&Method::PUT, &m.params), ["user:9"]);
        let e = RouteTable::new()
            .try_route("/a/{id}", ttl(1).clears(["x:{nope}"]))
            .unwrap_err();
        assert!(e.to_string().contains("does not have"));
    }

    #[test]
    fn configuration_errors_are_clear() {
        let e = RouteTable::new()
            .try_route("/events/{id}", ttl(1).tags(["event:{nope}"]))
            .unwrap_err();
        assert!(e.to_string().contains("does not have"), "{e}");
        let e = RouteTable::new()
            .try_route("/a", ttl(1).tags(["has space"]))
            .unwrap_err();
        assert!(e.to_string().contains("visible ASCII"), "{e}");
        let e = RouteTable::new()
            .try_route("/a", ttl(1).vary(["bad header"]))
            .unwrap_err();
        assert!(e.to_string().contains("header name"), "{e}");
        let e = RouteTable::new()
            .route("/a/{id}", ttl(1))
            .try_route("/a/{name}", ttl(1).id("other"))
            .unwrap_err();
        assert!(e.to_string().contains("cannot be added"), "{e}");
        let e = RouteTable::new()
            .route("/a/b", ttl(1))
            .try_route("/a_b", ttl(1))
            .unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
    }

    #[test]
    fn default_ids() {
        assert_eq!(default_route_id("/"), "root");
        assert_eq!(default_route_id("/servers/{id}/logs"), "servers_id_logs");
        assert_eq!(default_route_id("/files/{*path}"), "files_path");
    }
}
