//! The live tables the data path reads per request: route configurations and clusters by name,
//! each swapped whole so a request sees one consistent version.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::model::RouteConfig;
use crate::upstream::ClusterRuntime;

pub type RouteTable = HashMap<String, Arc<RouteConfig>>;
pub type ClusterTable = HashMap<String, Arc<ClusterRuntime>>;

#[derive(Debug, Default)]
pub struct Registry {
    pub routes: ArcSwap<RouteTable>,
    pub clusters: ArcSwap<ClusterTable>,
}

impl Registry {
    pub fn route_config(&self, name: &str) -> Option<Arc<RouteConfig>> {
        self.routes.load().get(name).cloned()
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterRuntime>> {
        self.clusters.load().get(name).cloned()
    }
}
