//! The live tables the data path reads per request: route configurations and clusters by name,
//! each swapped whole so a request sees one consistent version.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::model::{ListenerConfig, RouteConfig};
use crate::upstream::ClusterRuntime;

pub type RouteTable = HashMap<String, Arc<RouteConfig>>;
pub type ClusterTable = HashMap<String, Arc<ClusterRuntime>>;
/// Listeners with `bind_to_port: false`, by address: they receive connections handed over by a
/// `use_original_dst` listener.
pub type HandoffTable = HashMap<SocketAddr, Arc<ListenerConfig>>;

#[derive(Debug, Default)]
pub struct Registry {
    pub routes: ArcSwap<RouteTable>,
    pub clusters: ArcSwap<ClusterTable>,
    pub handoff_listeners: ArcSwap<HandoffTable>,
}

impl Registry {
    pub fn route_config(&self, name: &str) -> Option<Arc<RouteConfig>> {
        self.routes.load().get(name).cloned()
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.clusters.load().get(name).cloned()
    }

    /// The hand-off listener for `destination`: its exact address, else the wildcard address
    /// (0.0.0.0 or ::) on the same port.
    pub fn listener_for(&self, destination: SocketAddr) -> Option<Arc<ListenerConfig>> {
        let table = self.handoff_listeners.load();
        if table.is_empty() {
            return None;
        }
        let wildcard = match destination {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), destination.port()),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), destination.port()),
        };
        table.get(&destination).or_else(|| table.get(&wildcard)).cloned()
    }
}
