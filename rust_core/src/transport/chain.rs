//! Filter-chain selection from what detection learned, following Envoy's order of precedence:
//! destination port, then server name, then transport protocol, then application protocols.

use crate::model::{ChainMatch, FilterChainConfig, ListenerConfig};

/// What is known about a connection when its chain is chosen.
pub struct ConnectionFacts<'a> {
    /// "tls" or "raw_buffer".
    pub transport_protocol: &'a str,
    /// ALPN offered by a TLS client, or "http/1.1" / "h2c" from plaintext detection.
    pub application_protocols: &'a [String],
    pub server_name: Option<&'a str>,
    pub destination_port: u16,
}

pub fn select_chain<'l>(listener: &'l ListenerConfig, facts: &ConnectionFacts<'_>) -> Option<&'l FilterChainConfig> {
    listener
        .filter_chains
        .iter()
        .filter_map(|chain| specificity(&chain.chain_match, facts).map(|score| (score, chain)))
        // Ties go to the chain listed first.
        .fold(None, |best: Option<((u8, usize, u8, u8), &FilterChainConfig)>, (score, chain)| match best {
            Some((best_score, _)) if best_score >= score => best,
            _ => Some((score, chain)),
        })
        .map(|(_, chain)| chain)
        .or(listener.default_filter_chain.as_ref())
}

/// None if the chain does not match; otherwise how specifically it matches, stage by stage.
fn specificity(m: &ChainMatch, facts: &ConnectionFacts<'_>) -> Option<(u8, usize, u8, u8)> {
    let port = match m.destination_port {
        Some(p) if p == facts.destination_port => 1,
        Some(_) => return None,
        None => 0,
    };
    let server_name = if m.server_names.is_empty() {
        0
    } else {
        let name = facts.server_name?.to_ascii_lowercase();
        // Exact names outrank wildcards; longer wildcards outrank shorter ones.
        m.server_names
            .iter()
            .filter_map(|pattern| match pattern.strip_prefix('*') {
                Some(suffix) if name.len() > suffix.len() && name.ends_with(suffix) => Some(suffix.len() + 1),
                Some(_) => None,
                None if *pattern == name => Some(usize::MAX),
                None => None,
            })
            .max()?
    };
    let transport = match &m.transport_protocol {
        Some(t) if t == facts.transport_protocol => 1,
        Some(_) => return None,
        None => 0,
    };
    let application = if m.application_protocols.is_empty() {
        0
    } else if m.application_protocols.iter().any(|p| facts.application_protocols.contains(p)) {
        1
    } else {
        return None;
    };
    Some((port, server_name, transport, application))
}
