//! Many quicx servers as one, on etcd.
//!
//! - [`EtcdDiscovery`]: an XClient discovery that follows the servers of a service in etcd.
//! - [`ClusterNode`]: a quicx server as one node: its services registered under a lease it
//!   keeps alive, the devices it holds recorded (`identity → node`), and pushes, reverse calls
//!   and broadcasts that reach a device on whichever node holds it.
//!
//! etcd (v3 API) is the only coordination: leases for liveness, a watch for the caches, no
//! protocol of quicx's own. The key layout is in `docs/CLUSTER.md`.
//!
//! ```no_run
//! # async fn run(dev: quicx::DevCertificate) -> Result<(), Box<dyn std::error::Error>> {
//! use quicx_cluster::{ClusterNode, ClusterOptions, EtcdOptions, ServiceEntry};
//!
//! let server = quicx::Server::builder().dev_certificate(&dev).build()?;
//! server.bind("127.0.0.1:8972").await?;
//! let node = ClusterNode::start(
//!     &server,
//!     ClusterOptions::new(
//!         "node-1",
//!         EtcdOptions::new(["http://127.0.0.1:2379"]),
//!         quicx::ClientTls::new().trust(dev.certificate()),
//!         "the-cluster-secret",
//!     )
//!     .service(ServiceEntry::new("Arith")),
//! )
//! .await?;
//! // Reaches device-7 on whichever node it is connected to.
//! node.send_to_client("device-7", "Device", "Blink", quicx::Metadata::new(), b"on").await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

mod discovery;
mod durable;
mod etcd;
mod keys;
mod node;
mod routing;

use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `m`, taking over a lock whose holder panicked (what it guards stays consistent: every
/// update under these locks is a single insert or removal).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use crate::{
    discovery::EtcdDiscovery,
    durable::{
        ClusterDurableLimits, ClusterDurableStats, MAX_DURABLE_PAYLOAD, MAX_DURABLE_PER_DEVICE,
    },
    etcd::EtcdOptions,
    node::{ClusterNode, ClusterOptions, MIN_SECRET_LEN, ServiceEntry},
    routing::{ROUTING_SERVICE, SECRET_METADATA_KEY},
};

/// What can go wrong in the cluster.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No node holds the device: it is not connected anywhere in the cluster (as far as the
    /// presence records say).
    #[error("`{client_id}` is offline: no node holds it")]
    Offline {
        /// The device.
        client_id: String,
    },
    /// The node that holds the device could not be reached (or did not answer in time).
    #[error("node `{node}` is unreachable: {source}")]
    NodeUnreachable {
        /// The node.
        node: String,
        /// What the connection to it reported.
        #[source]
        source: Arc<quicx::Error>,
    },
    /// The device was reached but refused or failed: its push channel was full or missing, its
    /// handler returned an error, its connection broke mid-call.
    #[error("`{client_id}` on node `{node}` failed ({kind}): {message}")]
    Device {
        /// The device.
        client_id: String,
        /// The node it is on.
        node: String,
        /// [`quicx::Error::kind`] of the failure (`remote`, `push_rejected`, ...).
        kind: String,
        /// The status code, when the device's handler answered with one.
        code: Option<u32>,
        /// The message.
        message: String,
    },
    /// etcd did not answer (down, hung, or unreachable).
    #[error("etcd unreachable: {0}")]
    EtcdUnreachable(String),
    /// A local quicx error (encoding, decoding).
    #[error(transparent)]
    Quicx(Arc<quicx::Error>),
    /// A durable message was refused: too large, or over a bound of [`ClusterDurableLimits`].
    #[error("durable message refused: {0}")]
    DurableFull(String),
    /// The node was configured wrongly.
    #[error("cluster configuration: {0}")]
    Config(String),
}

impl ClusterError {
    pub(crate) fn etcd(e: etcd_client::Error) -> Self {
        Self::EtcdUnreachable(e.to_string())
    }
}

impl From<quicx::Error> for ClusterError {
    fn from(e: quicx::Error) -> Self {
        Self::Quicx(Arc::new(e))
    }
}

/// What happens in the cluster, as a node's etcd watch sees it ([`ClusterNode::events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterEvent {
    /// A device was bound on a node (and was nowhere before).
    DeviceConnected {
        /// The device.
        client_id: String,
        /// Its node.
        node: String,
    },
    /// A device was bound on another node than the one that held it.
    DeviceMoved {
        /// The device.
        client_id: String,
        /// The node that held it.
        from: String,
        /// The node that holds it now.
        to: String,
    },
    /// A device left (disconnected, or its node's lease expired).
    DeviceDisconnected {
        /// The device.
        client_id: String,
        /// The node that held it.
        node: String,
    },
    /// A node joined.
    NodeUp {
        /// The node.
        node: String,
    },
    /// A node left (shut down, or its lease expired).
    NodeDown {
        /// The node.
        node: String,
    },
}

#[doc(hidden)]
pub mod testing {
    //! Helpers for tests. Not part of the API.

    /// Deletes every key under `prefix`.
    pub async fn clear(options: &crate::EtcdOptions) -> Result<(), crate::ClusterError> {
        let mut client = options.connect().await?;
        crate::etcd::delete_prefix(&mut client, &format!("{}/", options.prefix)).await
    }
}
