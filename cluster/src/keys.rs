//! The key layout in etcd (documented in `docs/CLUSTER.md`). Values are JSON, so `etcdctl`
//! shows them and other languages read them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `{prefix}/services/{service}/` — the servers of one service.
pub(crate) fn services(prefix: &str, service: &str) -> String {
    format!("{prefix}/services/{service}/")
}

/// `{prefix}/services/{service}/{node}` — one node serving `service`.
pub(crate) fn service(prefix: &str, service: &str, node: &str) -> String {
    format!("{prefix}/services/{service}/{node}")
}

/// `{prefix}/nodes/` — every node.
pub(crate) fn nodes(prefix: &str) -> String {
    format!("{prefix}/nodes/")
}

/// `{prefix}/nodes/{node}` — where a node takes routed requests.
pub(crate) fn node(prefix: &str, node: &str) -> String {
    format!("{prefix}/nodes/{node}")
}

/// `{prefix}/presence/` — every connected device.
pub(crate) fn presences(prefix: &str) -> String {
    format!("{prefix}/presence/")
}

/// `{prefix}/presence/{client_id}` — the node a device is connected to.
pub(crate) fn presence(prefix: &str, client_id: &str) -> String {
    format!("{prefix}/presence/{client_id}")
}

/// A server of a service, as XClients discover it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServiceRecord {
    pub(crate) address: String,
    pub(crate) server_name: String,
    pub(crate) weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) node: String,
}

/// Where a node takes routed requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub(crate) address: String,
    pub(crate) server_name: String,
}

/// Which node holds a device, on which of its connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PresenceRecord {
    pub(crate) node: String,
    pub(crate) conn: u64,
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}
