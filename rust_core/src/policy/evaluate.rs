//! RBAC evaluation as Envoy's RBAC filters do it: filters in order; a DENY filter denies when any
//! of its policies matches, an ALLOW filter denies when none does; the first denial wins.

use std::sync::atomic::Ordering::Relaxed;

use super::model::{Permission, Policy, Principal, RbacAction, RbacFilter, RbacFilters};
use crate::http::routing::{header_matches, RequestView};

/// What RBAC reads of one request besides the request head.
pub struct RequestFacts<'a> {
    /// Method, normalized path and query, authority, scheme and headers.
    pub request: &'a RequestView<'a>,
    /// The port the connection was addressed to.
    pub destination_port: u16,
    /// The verified peer identity (SPIFFE URI) of an mTLS connection; None without one.
    pub principal: Option<&'a str>,
}

/// A denial: which kind of filter refused, and the matching DENY policy's name ("" for ALLOW).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial<'a> {
    pub action: RbacAction,
    pub policy: &'a str,
}

impl RbacFilters {
    /// Run every filter; counts the outcome (denied per action and policy, or allowed).
    pub fn check<'s>(&'s self, facts: &RequestFacts<'_>) -> Result<(), Denial<'s>> {
        if self.filters.is_empty() {
            return Ok(());
        }
        for filter in &self.filters {
            filter.check(facts)?;
        }
        self.allowed.fetch_add(1, Relaxed);
        Ok(())
    }
}

impl RbacFilter {
    fn check<'s>(&'s self, facts: &RequestFacts<'_>) -> Result<(), Denial<'s>> {
        let matched = self.policies.iter().find(|policy| policy_matches(policy, facts));
        match (self.action, matched) {
            (RbacAction::Deny, Some(policy)) => {
                policy.denied.fetch_add(1, Relaxed);
                Err(Denial { action: RbacAction::Deny, policy: &policy.name })
            }
            (RbacAction::Allow, None) => {
                self.denied_unmatched.fetch_add(1, Relaxed);
                Err(Denial { action: RbacAction::Allow, policy: "" })
            }
            _ => Ok(()),
        }
    }
}

pub fn policy_matches(policy: &Policy, facts: &RequestFacts<'_>) -> bool {
    policy.permissions.iter().any(|p| permission_matches(p, facts))
        && policy.principals.iter().any(|p| principal_matches(p, facts))
}

fn permission_matches(permission: &Permission, facts: &RequestFacts<'_>) -> bool {
    match permission {
        Permission::Any => true,
        Permission::And(all) => all.iter().all(|p| permission_matches(p, facts)),
        Permission::Or(any) => any.iter().any(|p| permission_matches(p, facts)),
        Permission::Not(inner) => !permission_matches(inner, facts),
        Permission::UrlPath(matcher) => {
            let path_and_query = facts.request.path_and_query;
            matcher.matches(path_and_query.split_once('?').map_or(path_and_query, |(path, _)| path))
        }
        Permission::Header(matcher) => header_matches(matcher, facts.request),
        Permission::DestinationPort(port) => facts.destination_port == *port,
    }
}

fn principal_matches(principal: &Principal, facts: &RequestFacts<'_>) -> bool {
    match principal {
        Principal::Any => true,
        Principal::And(all) => all.iter().all(|p| principal_matches(p, facts)),
        Principal::Or(any) => any.iter().any(|p| principal_matches(p, facts)),
        Principal::Not(inner) => !principal_matches(inner, facts),
        Principal::Authenticated(name) => match (facts.principal, name) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(peer), Some(matcher)) => matcher.matches(peer),
        },
        Principal::Header(matcher) => header_matches(matcher, facts.request),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use http::{HeaderMap, HeaderValue, Method};

    use super::*;
    use crate::model::matcher::{full_match_regex, StringMatch, StringMatcher};
    use crate::model::route::{HeaderMatcher, HeaderRule};

    fn exact(s: &str) -> StringMatcher {
        StringMatcher { pattern: StringMatch::Exact(s.into()), ignore_case: false }
    }
    fn prefix(s: &str) -> StringMatcher {
        StringMatcher { pattern: StringMatch::Prefix(s.into()), ignore_case: false }
    }
    fn header(name: &str, rule: HeaderRule, invert: bool) -> HeaderMatcher {
        HeaderMatcher { name: name.into(), rule, invert, treat_missing_as_empty: false }
    }
    fn policy(name: &str, permissions: Vec<Permission>, principals: Vec<Principal>) -> Policy {
        Policy { name: name.into(), permissions, principals, denied: Arc::default() }
    }
    fn filter(action: RbacAction, mut policies: Vec<Policy>) -> RbacFilter {
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        RbacFilter { action, policies, denied_unmatched: Arc::default() }
    }

    struct Request {
        method: Method,
        path: &'static str,
        headers: HeaderMap,
        port: u16,
        principal: Option<&'static str>,
    }

    impl Request {
        fn new(path: &'static str) -> Self {
            Request { method: Method::GET, path, headers: HeaderMap::new(), port: 8080, principal: None }
        }
        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn from(mut self, principal: &'static str) -> Self {
            self.principal = Some(principal);
            self
        }
        fn check<'f>(&self, filters: &'f RbacFilters) -> Result<(), Denial<'f>> {
            let view = RequestView {
                method: &self.method,
                path_and_query: self.path,
                authority: "svc",
                scheme: "http",
                headers: &self.headers,
            };
            filters.check(&RequestFacts { request: &view, destination_port: self.port, principal: self.principal })
        }
    }

    /// Istio's shape: a DENY filter on `/admin*` first, then an ALLOW filter by principal or header.
    fn mesh_filters() -> RbacFilters {
        let deny = filter(
            RbacAction::Deny,
            vec![policy("ns[default]-policy[no-admin]-rule[0]", vec![Permission::UrlPath(prefix("/admin"))], vec![Principal::Any])],
        );
        let allow = filter(
            RbacAction::Allow,
            vec![
                policy(
                    "ns[default]-policy[by-principal]-rule[0]",
                    vec![Permission::Any],
                    vec![Principal::Authenticated(Some(StringMatcher {
                        pattern: StringMatch::Regex(full_match_regex("spiffe://[^/]+/ns/front/sa/[^/]+").unwrap()),
                        ignore_case: false,
                    }))],
                ),
                policy(
                    "ns[default]-policy[by-header]-rule[0]",
                    vec![Permission::Header(header(":method", HeaderRule::String(exact("GET")), false))],
                    vec![Principal::Header(header("x-caller", HeaderRule::String(exact("trusted")), false))],
                ),
            ],
        );
        RbacFilters { filters: vec![deny, allow], allowed: Arc::default() }
    }

    #[test]
    fn deny_first_then_allow() {
        let filters = mesh_filters();
        let denied_admin = Denial { action: RbacAction::Deny, policy: "ns[default]-policy[no-admin]-rule[0]" };
        let unmatched = Denial { action: RbacAction::Allow, policy: "" };
        assert_eq!(Request::new("/admin").from("spiffe://cluster.local/ns/front/sa/web").check(&filters), Err(denied_admin.clone()));
        assert_eq!(Request::new("/admin/x?y").header("x-caller", "trusted").check(&filters), Err(denied_admin));
        assert_eq!(Request::new("/data").check(&filters), Err(unmatched.clone()));
        assert_eq!(Request::new("/data").from("spiffe://cluster.local/ns/back/sa/web").check(&filters), Err(unmatched.clone()));
        assert_eq!(Request::new("/data").from("spiffe://cluster.local/ns/front/sa/web").check(&filters), Ok(()));
        assert_eq!(Request::new("/data").header("x-caller", "trusted").check(&filters), Ok(()));
        let mut post = Request::new("/data").header("x-caller", "trusted");
        post.method = Method::POST;
        assert_eq!(post.check(&filters), Err(unmatched));
        // Case matters in paths: /ADMIN is another resource, judged by the ALLOW filter.
        assert_eq!(Request::new("/ADMIN").header("x-caller", "trusted").check(&filters), Ok(()));
        assert_eq!(filters.allowed.load(Relaxed), 3);
        assert_eq!(filters.filters[0].policies[0].denied.load(Relaxed), 2);
        assert_eq!(filters.filters[1].denied_unmatched.load(Relaxed), 3);
    }

    #[test]
    fn url_path_ignores_the_query() {
        let filters = RbacFilters {
            filters: vec![filter(RbacAction::Deny, vec![policy("p", vec![Permission::UrlPath(exact("/a"))], vec![Principal::Any])])],
            allowed: Arc::default(),
        };
        assert!(Request::new("/a?x=1").check(&filters).is_err());
        assert!(Request::new("/a/").check(&filters).is_ok());
        let ignore_case = StringMatcher { pattern: StringMatch::Prefix("/admin".into()), ignore_case: true };
        let filters = RbacFilters {
            filters: vec![filter(RbacAction::Deny, vec![policy("p", vec![Permission::UrlPath(ignore_case)], vec![Principal::Any])])],
            allowed: Arc::default(),
        };
        assert!(Request::new("/ADMIN").check(&filters).is_err());
    }

    #[test]
    fn combinators_ports_and_presence() {
        let permission = Permission::And(vec![
            Permission::Or(vec![Permission::DestinationPort(8080), Permission::DestinationPort(9090)]),
            Permission::Not(Box::new(Permission::Header(header("x-debug", HeaderRule::Present(true), false)))),
        ]);
        let principal = Principal::And(vec![
            Principal::Authenticated(None),
            Principal::Not(Box::new(Principal::Authenticated(Some(exact("spiffe://cluster.local/ns/a/sa/bad"))))),
        ]);
        let filters = RbacFilters {
            filters: vec![filter(RbacAction::Allow, vec![policy("p", vec![permission], vec![principal])])],
            allowed: Arc::default(),
        };
        let good = "spiffe://cluster.local/ns/a/sa/good";
        assert!(Request::new("/").from(good).check(&filters).is_ok());
        assert!(Request::new("/").check(&filters).is_err(), "no mTLS, no principal");
        assert!(Request::new("/").from("spiffe://cluster.local/ns/a/sa/bad").check(&filters).is_err());
        assert!(Request::new("/").from(good).header("x-debug", "1").check(&filters).is_err());
        let mut other_port = Request::new("/").from(good);
        other_port.port = 7070;
        assert!(other_port.check(&filters).is_err());
    }

    #[test]
    fn inverted_header_match_and_absent_header() {
        // Envoy: an absent header fails even an inverted match.
        let inverted = header("x-env", HeaderRule::String(exact("prod")), true);
        let filters = RbacFilters {
            filters: vec![filter(RbacAction::Deny, vec![policy("p", vec![Permission::Header(inverted)], vec![Principal::Any])])],
            allowed: Arc::default(),
        };
        assert!(Request::new("/").header("x-env", "dev").check(&filters).is_err());
        assert!(Request::new("/").header("x-env", "prod").check(&filters).is_ok());
        assert!(Request::new("/").check(&filters).is_ok());
    }

    #[test]
    fn empty_policy_sets() {
        // Envoy: an ALLOW filter with no policy denies everything; a DENY one allows everything.
        let allow_none = RbacFilters { filters: vec![filter(RbacAction::Allow, vec![])], allowed: Arc::default() };
        assert!(Request::new("/").check(&allow_none).is_err());
        let deny_none = RbacFilters { filters: vec![filter(RbacAction::Deny, vec![])], allowed: Arc::new(AtomicU64::new(0)) };
        assert!(Request::new("/").check(&deny_none).is_ok());
        let none = RbacFilters::default();
        assert!(Request::new("/").check(&none).is_ok());
        assert_eq!(none.allowed.load(Relaxed), 0, "no RBAC filter, nothing counted");
    }
}
