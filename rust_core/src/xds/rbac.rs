//! envoy.filters.http.rbac → policy::model::RbacFilter; every field that would change a decision
//! and is not implemented is refused with its path, never ignored.

use std::sync::Arc;

use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3 as rbac_filter;
use envoy_types::pb::google::protobuf;

use super::common::{string_matcher, unpack};
use super::route::header_matcher;
use super::{refuse_if, At, FieldError, FieldResult};
use crate::policy::model::{Permission, Policy, Principal, RbacAction, RbacFilter};
use crate::telemetry::metrics::Metrics;

pub(crate) const RBAC_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// Decode one RBAC HTTP filter; None when it has no `rules` (Envoy then enforces nothing).
pub(crate) fn rbac_http_filter(any: &protobuf::Any, metrics: &Metrics) -> FieldResult<Option<RbacFilter>> {
    let config: rbac_filter::Rbac = unpack(any, RBAC_FILTER_TYPE)?;
    refuse_if(config.matcher.is_some(), "matcher")?;
    refuse_if(config.shadow_rules.is_some(), "shadow_rules")?;
    refuse_if(config.shadow_matcher.is_some(), "shadow_matcher")?;
    // rules_stat_prefix, shadow_rules_stat_prefix and track_per_rule_stats only name statistics.
    let Some(rules) = &config.rules else { return Ok(None) };
    rbac_rules(rules, metrics).at("rules").map(Some)
}

fn rbac_rules(rules: &rbac::Rbac, metrics: &Metrics) -> FieldResult<RbacFilter> {
    refuse_if(rules.audit_logging_options.is_some(), "audit_logging_options")?;
    let action = match rbac::rbac::Action::try_from(rules.action) {
        Ok(rbac::rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::rbac::Action::Deny) => RbacAction::Deny,
        Ok(rbac::rbac::Action::Log) => {
            return Err(FieldError::new("action", "LOG is not supported by meshctl yet (refused rather than ignored)"))
        }
        Err(_) => return Err(FieldError::new("action", format!("unknown value {}", rules.action))),
    };
    let mut names: Vec<&String> = rules.policies.keys().collect();
    // Envoy keeps policies in a name-ordered map; the first match names a denial.
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let at = format!("policies[{name:?}]");
        let mut decoded = policy(name, &rules.policies[name]).at(&at)?;
        if action == RbacAction::Deny {
            decoded.denied = metrics.rbac.denied(action.label(), name);
        }
        policies.push(decoded);
    }
    let denied_unmatched = match action {
        RbacAction::Allow => metrics.rbac.denied(action.label(), ""),
        RbacAction::Deny => Arc::default(),
    };
    Ok(RbacFilter { action, policies, denied_unmatched })
}

fn policy(name: &str, p: &rbac::Policy) -> FieldResult<Policy> {
    refuse_if(p.condition.is_some(), "condition")?;
    refuse_if(p.checked_condition.is_some(), "checked_condition")?;
    refuse_if(p.cel_config.is_some(), "cel_config")?;
    if p.permissions.is_empty() {
        return Err(FieldError::new("permissions", "a policy needs at least one permission"));
    }
    if p.principals.is_empty() {
        return Err(FieldError::new("principals", "a policy needs at least one principal"));
    }
    let permissions = p.permissions.iter().enumerate().map(|(i, x)| permission(x).at(format!("permissions[{i}]"))).collect::<FieldResult<_>>()?;
    let principals = p.principals.iter().enumerate().map(|(i, x)| principal(x).at(format!("principals[{i}]"))).collect::<FieldResult<_>>()?;
    Ok(Policy { name: name.to_string(), permissions, principals, denied: Arc::default() })
}

fn permission(p: &rbac::Permission) -> FieldResult<Permission> {
    use rbac::permission::Rule;
    let set = |rules: &[rbac::Permission], field: &str| -> FieldResult<Vec<Permission>> {
        if rules.is_empty() {
            return Err(FieldError::new(format!("{field}.rules"), "needs at least one rule"));
        }
        rules.iter().enumerate().map(|(i, r)| permission(r).at(format!("rules[{i}]")).at(field)).collect()
    };
    Ok(match &p.rule {
        Some(Rule::Any(true)) => Permission::Any,
        Some(Rule::Any(false)) => return Err(FieldError::new("any", "must be true when set")),
        Some(Rule::AndRules(s)) => Permission::And(set(&s.rules, "and_rules")?),
        Some(Rule::OrRules(s)) => Permission::Or(set(&s.rules, "or_rules")?),
        Some(Rule::NotRule(inner)) => Permission::Not(Box::new(permission(inner).at("not_rule")?)),
        Some(Rule::UrlPath(m)) => {
            use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule as PathRule;
            match &m.rule {
                Some(PathRule::Path(s)) => Permission::UrlPath(string_matcher(s).at("path").at("url_path")?),
                None => return Err(FieldError::new("url_path.path", "is required")),
            }
        }
        Some(Rule::Header(h)) => Permission::Header(header_matcher(h).at("header")?),
        Some(Rule::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(port) => Permission::DestinationPort(port),
            Err(_) => return Err(FieldError::new("destination_port", format!("{port} is not a port"))),
        },
        Some(Rule::DestinationIp(_)) => return Err(FieldError::unsupported("destination_ip")),
        Some(Rule::DestinationPortRange(_)) => return Err(FieldError::unsupported("destination_port_range")),
        Some(Rule::Metadata(_)) => return Err(FieldError::unsupported("metadata")),
        Some(Rule::RequestedServerName(_)) => return Err(FieldError::unsupported("requested_server_name")),
        Some(Rule::Matcher(_)) => return Err(FieldError::unsupported("matcher")),
        Some(Rule::UriTemplate(_)) => return Err(FieldError::unsupported("uri_template")),
        Some(Rule::SourcedMetadata(_)) => return Err(FieldError::unsupported("sourced_metadata")),
        None => return Err(FieldError::new("", "a permission needs one rule")),
    })
}

fn principal(p: &rbac::Principal) -> FieldResult<Principal> {
    use rbac::principal::Identifier;
    let set = |ids: &[rbac::Principal], field: &str| -> FieldResult<Vec<Principal>> {
        if ids.is_empty() {
            return Err(FieldError::new(format!("{field}.ids"), "needs at least one principal"));
        }
        ids.iter().enumerate().map(|(i, id)| principal(id).at(format!("ids[{i}]")).at(field)).collect()
    };
    Ok(match &p.identifier {
        Some(Identifier::Any(true)) => Principal::Any,
        Some(Identifier::Any(false)) => return Err(FieldError::new("any", "must be true when set")),
        Some(Identifier::AndIds(s)) => Principal::And(set(&s.ids, "and_ids")?),
        Some(Identifier::OrIds(s)) => Principal::Or(set(&s.ids, "or_ids")?),
        Some(Identifier::NotId(inner)) => Principal::Not(Box::new(principal(inner).at("not_id")?)),
        Some(Identifier::Authenticated(a)) => match &a.principal_name {
            Some(m) => Principal::Authenticated(Some(string_matcher(m).at("principal_name").at("authenticated")?)),
            None => Principal::Authenticated(None),
        },
        Some(Identifier::Header(h)) => Principal::Header(header_matcher(h).at("header")?),
        Some(Identifier::SourceIp(_)) => return Err(FieldError::unsupported("source_ip")),
        Some(Identifier::DirectRemoteIp(_)) => return Err(FieldError::unsupported("direct_remote_ip")),
        Some(Identifier::RemoteIp(_)) => return Err(FieldError::unsupported("remote_ip")),
        Some(Identifier::UrlPath(_)) => return Err(FieldError::unsupported("url_path")),
        Some(Identifier::Metadata(_)) => return Err(FieldError::unsupported("metadata")),
        Some(Identifier::FilterState(_)) => return Err(FieldError::unsupported("filter_state")),
        Some(Identifier::SourcedMetadata(_)) => return Err(FieldError::unsupported("sourced_metadata")),
        Some(Identifier::Custom(_)) => return Err(FieldError::unsupported("custom")),
        None => return Err(FieldError::new("", "a principal needs one identifier")),
    })
}
