//! Endpoint discovery for quicx: where the servers of a service are.
//!
//! A [`Discovery`] hands out the current list of [`Endpoint`]s of one service and lets a client
//! watch the list change. Three come with the crate:
//!
//! - [`Peer2PeerDiscovery`]: one fixed server (rpcx's `NewPeer2PeerDiscovery("tcp@"+addr, "")`);
//! - [`MultipleServersDiscovery`]: a static list you can update at run time;
//! - [`MdnsDiscovery`]: servers announcing themselves on the LAN with [`MdnsAdvertiser`]
//!   (`_quicx._udp.local.`, filtered by service name).
//!
//! This crate knows nothing of the RPC layer; `quicx::XClient` consumes any [`Discovery`].
//!
//! ```
//! use quicx_discovery::{Discovery, Endpoint, MultipleServersDiscovery, Peer2PeerDiscovery};
//!
//! let p2p = Peer2PeerDiscovery::new("quic@127.0.0.1:8972").unwrap();
//! assert_eq!(p2p.watch().borrow()[0].address, "127.0.0.1:8972");
//! assert!(Peer2PeerDiscovery::new("quic@nowhere").is_err());
//!
//! let list = MultipleServersDiscovery::new(vec![
//!     Endpoint::parse("quic@10.0.0.1:8972").unwrap().with_weight(3),
//!     Endpoint::parse("10.0.0.2:8972").unwrap(),
//! ]);
//! let mut watch = list.watch();
//! list.update(vec![Endpoint::parse("10.0.0.3:8972").unwrap()]);
//! assert!(watch.has_changed().unwrap());
//! assert_eq!(watch.borrow_and_update()[0].address, "10.0.0.3:8972");
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

use std::{collections::BTreeMap, fmt, sync::Arc};

use tokio::sync::watch;

mod mdns;
#[cfg(feature = "sandbox")]
pub mod sandbox;

pub use mdns::{
    Announcement, Interfaces, MDNS_VERIFY_TIMEOUT, MdnsAdvertiser, MdnsDiscovery, MdnsOptions,
    MdnsRegistration, SERVICE_TYPE,
};

/// Errors of discovery backends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// An endpoint address could not be parsed.
    #[error("invalid endpoint address `{address}`: {reason}")]
    InvalidAddress {
        /// What was given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The mDNS daemon failed.
    #[error("mDNS: {0}")]
    Mdns(String),
}

/// One server of a service: where it is and how to weigh it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// `host:port` (an IP address or a DNS name; IPv6 in brackets).
    pub address: String,
    /// The name the server's certificate must carry; defaults to the host part of `address`.
    pub server_name: String,
    /// Relative weight for weighted selection (default 1).
    pub weight: u32,
    /// Group (rpcx's `group` metadata); clients may select one group only.
    pub group: Option<String>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Endpoint {
    /// Parses `quic@host:port` or `host:port`.
    pub fn parse(spec: &str) -> Result<Self, DiscoveryError> {
        let invalid = |reason: &str| DiscoveryError::InvalidAddress {
            address: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let address = match spec.split_once('@') {
            Some(("quic" | "udp", rest)) => rest,
            Some((network, _)) => {
                return Err(invalid(&format!(
                    "network `{network}` is not supported: quicx speaks `quic`"
                )));
            }
            None => spec,
        };
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| invalid("expected host:port"))?;
        port.parse::<u16>()
            .map_err(|_| invalid("the port is not a number from 0 to 65535"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        Ok(Self {
            address: address.to_owned(),
            server_name: host.to_owned(),
            weight: 1,
            group: None,
            metadata: BTreeMap::new(),
        })
    }

    /// Sets the weight.
    #[must_use]
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the group.
    #[must_use]
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the certificate name to expect.
    #[must_use]
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Adds a metadata pair.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quic@{}", self.address)
    }
}

/// The shared list of endpoints a discovery publishes.
pub type Endpoints = Arc<Vec<Endpoint>>;

/// Where the servers of a service are.
///
/// Implementations publish their list through a `tokio::sync::watch` channel:
/// [`endpoints`](LocalDiscovery::endpoints) returns the list (waiting briefly for a first answer
/// where the backend needs one, as mDNS does), and [`watch`](LocalDiscovery::watch) sees every
/// later change. A caller that fails to reach an endpoint tells the backend with
/// [`report_unreachable`](LocalDiscovery::report_unreachable), so a backend that can check
/// (mDNS) drops a server that is gone sooner than its records would expire. `Discovery` is the
/// `Send` variant (made with `trait_variant`) that `XClient` takes; implement that one. Call it
/// as `Discovery::endpoints(&d)` where both traits are in scope.
#[trait_variant::make(Discovery: Send)]
pub trait LocalDiscovery {
    /// The endpoints known now. May be empty.
    async fn endpoints(&self) -> Endpoints;

    /// A receiver that sees every later change of the list.
    fn watch(&self) -> watch::Receiver<Endpoints>;

    /// A caller could not reach `endpoint` (connection attempt failed, or the peer stopped
    /// answering). Backends that can check (mDNS) verify it and drop it from the list if it is
    /// gone; the default does nothing.
    ///
    /// It returns at once (any check runs in the background) and may be called often, from
    /// many callers, for the same endpoint: backends rate-limit their checks.
    fn report_unreachable(&self, endpoint: &Endpoint) {
        let _ = endpoint;
    }
}

/// Waits until `discovery` knows at least one endpoint or `timeout` passes; returns the list.
pub async fn wait_for_endpoints<D: Discovery>(
    discovery: &D,
    timeout: std::time::Duration,
) -> Endpoints {
    let mut rx = discovery.watch();
    let _ = tokio::time::timeout(timeout, rx.wait_for(|e| !e.is_empty())).await;
    rx.borrow().clone()
}

/// One fixed server (rpcx's peer-to-peer discovery).
#[derive(Debug)]
pub struct Peer2PeerDiscovery {
    tx: watch::Sender<Endpoints>,
}

impl Peer2PeerDiscovery {
    /// `quic@host:port` (or `host:port`); fails with [`DiscoveryError::InvalidAddress`] on
    /// anything else.
    pub fn new(spec: &str) -> Result<Self, DiscoveryError> {
        Ok(Self::from_endpoint(Endpoint::parse(spec)?))
    }

    /// A discovery for one endpoint built by hand.
    pub fn from_endpoint(endpoint: Endpoint) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(vec![endpoint])),
        }
    }
}

impl Discovery for Peer2PeerDiscovery {
    async fn endpoints(&self) -> Endpoints {
        self.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Endpoints> {
        self.tx.subscribe()
    }
}

/// A static list of servers, updatable at run time (rpcx's `MultipleServersDiscovery`).
/// Cloning shares the list.
#[derive(Debug, Clone)]
pub struct MultipleServersDiscovery {
    tx: Arc<watch::Sender<Endpoints>>,
}

impl MultipleServersDiscovery {
    /// A discovery of `endpoints`.
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(Arc::new(endpoints))),
        }
    }

    /// Parses every `quic@host:port` of `specs`.
    pub fn from_addresses<I, S>(specs: I) -> Result<Self, DiscoveryError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints = specs
            .into_iter()
            .map(|s| Endpoint::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(endpoints))
    }

    /// The list now.
    pub fn current(&self) -> Endpoints {
        self.tx.borrow().clone()
    }

    /// Replaces the list; every watcher sees the change.
    pub fn update(&self, endpoints: Vec<Endpoint>) {
        self.tx.send_replace(Arc::new(endpoints));
    }
}

impl Discovery for MultipleServersDiscovery {
    async fn endpoints(&self) -> Endpoints {
        self.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Endpoints> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let e = Endpoint::parse("quic@[::1]:8972").unwrap();
        assert_eq!(e.address, "[::1]:8972");
        assert_eq!(e.server_name, "::1");
        let e = Endpoint::parse("server.local:1").unwrap();
        assert_eq!(e.server_name, "server.local");
        assert_eq!(e.to_string(), "quic@server.local:1");
        for bad in ["tcp@1.2.3.4:5", "1.2.3.4", "1.2.3.4:99999", ":80", "quic@"] {
            assert!(
                matches!(
                    Endpoint::parse(bad),
                    Err(DiscoveryError::InvalidAddress { .. })
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn static_list_updates_reach_watchers() {
        let d = MultipleServersDiscovery::from_addresses(["quic@127.0.0.1:1"]).unwrap();
        let mut rx = Discovery::watch(&d);
        let shared = d.clone();
        let waiter = tokio::spawn(async move {
            rx.changed().await.unwrap();
            rx.borrow().len()
        });
        shared.update(vec![
            Endpoint::parse("127.0.0.1:2").unwrap(),
            Endpoint::parse("127.0.0.1:3").unwrap(),
        ]);
        assert_eq!(waiter.await.unwrap(), 2);
        assert_eq!(Discovery::endpoints(&d).await.len(), 2);
        let got = wait_for_endpoints(&d, std::time::Duration::from_millis(10)).await;
        assert_eq!(got.len(), 2);
    }

    #[tokio::test]
    async fn report_unreachable_defaults_to_nothing() {
        let e = Endpoint::parse("127.0.0.1:1").unwrap();
        let d = MultipleServersDiscovery::new(vec![e.clone()]);
        // Through the `Send` variant, the local one, and a generic `D: Discovery`.
        Discovery::report_unreachable(&d, &e);
        LocalDiscovery::report_unreachable(&d, &e);
        fn report<D: Discovery>(d: &D, e: &Endpoint) {
            d.report_unreachable(e);
        }
        report(&d, &e);
        assert_eq!(d.current().as_slice(), [e]);
    }
}
