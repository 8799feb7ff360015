//! A cluster node: one quicx server registered in etcd, recording which devices it holds and
//! reaching devices held by other nodes.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicUsize, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use quicx::{
    Bytes, CallOptions, Client, ClientTls, CloseCode, Codec, Metadata, Server, ServerEvent,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    ClusterError, ClusterEvent, EtcdOptions,
    durable::{ClusterDurable, ClusterDurableLimits, ClusterDurableStats},
    etcd::{Change, Session, follow},
    keys::{self, NodeRecord, PresenceRecord, ServiceRecord, to_json},
    routing::{
        self, BroadcastRequest, CallRequest, DeviceFailure, PushRequest, ROUTING_SERVICE, Routed,
        SECRET_METADATA_KEY,
    },
};

/// One service a node registers for XClients to discover ([`EtcdDiscovery`](crate::EtcdDiscovery)).
#[derive(Debug, Clone)]
pub struct ServiceEntry {
    name: String,
    weight: u32,
    group: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl ServiceEntry {
    /// The service `name` with weight 1, no group, no metadata.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            weight: 1,
            group: None,
            metadata: BTreeMap::new(),
        }
    }

    /// The weight weighted selection gives this node.
    #[must_use]
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The group (clients may select one group only).
    #[must_use]
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// A metadata pair XClients see on the endpoint.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// How a node joins the cluster.
///
/// ```
/// use quicx_cluster::{ClusterOptions, EtcdOptions, ServiceEntry};
/// let options = ClusterOptions::new(
///     "node-1",
///     EtcdOptions::new(["http://127.0.0.1:2379"]),
///     quicx::ClientTls::new(),
///     "a-long-random-cluster-secret",
/// )
/// .service(ServiceEntry::new("Arith").weight(2));
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    name: String,
    etcd: EtcdOptions,
    tls: ClientTls,
    secret: Arc<str>,
    advertise: Option<SocketAddr>,
    server_name: String,
    services: Vec<ServiceEntry>,
    route_timeout: Duration,
    durable_ack_timeout: Duration,
    durable_limits: ClusterDurableLimits,
}

/// The shortest cluster secret a node accepts.
pub const MIN_SECRET_LEN: usize = 16;

impl ClusterOptions {
    /// A node named `name` (unique in the cluster, no `/`), on `etcd`, reaching other nodes with
    /// `tls` (which must trust their certificates), authenticating routing requests with
    /// `secret` (the same on every node, at least [`MIN_SECRET_LEN`] bytes; keep it as secret as
    /// a private key: it lets its holder push to any device).
    pub fn new(
        name: impl Into<String>,
        etcd: EtcdOptions,
        tls: ClientTls,
        secret: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            etcd,
            tls,
            secret: secret.into().into(),
            advertise: None,
            server_name: "localhost".into(),
            services: Vec::new(),
            route_timeout: Duration::from_secs(5),
            durable_ack_timeout: Duration::from_secs(60),
            durable_limits: ClusterDurableLimits::default(),
        }
    }

    /// The address other nodes and XClients reach this node at (default: the server's bound
    /// address, which is right on loopback and wrong behind NAT or on `0.0.0.0`).
    #[must_use]
    pub fn advertise(mut self, addr: SocketAddr) -> Self {
        self.advertise = Some(addr);
        self
    }

    /// The name this node's certificate carries (default `localhost`).
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Registers a service for XClients to discover.
    #[must_use]
    pub fn service(mut self, service: ServiceEntry) -> Self {
        self.services.push(service);
        self
    }

    /// How long the node that holds a device waits for its acknowledgement of a durable
    /// message before it tries again later (default 60 s; with a device in manual-ack mode, how
    /// long its application may take). Zero means the default.
    #[must_use]
    pub fn durable_ack_timeout(mut self, timeout: Duration) -> Self {
        self.durable_ack_timeout = if timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            timeout
        };
        self
    }

    /// The bounds of the durable messages this node accepts
    /// ([`ClusterNode::send_durable`]; default [`ClusterDurableLimits::default`]). Give every
    /// node the same.
    #[must_use]
    pub fn durable_limits(mut self, limits: ClusterDurableLimits) -> Self {
        self.durable_limits = limits;
        self
    }

    /// How long a routed push or call may take end to end, unless the call's own options say
    /// otherwise (default 5 s).
    #[must_use]
    pub fn route_timeout(mut self, timeout: Duration) -> Self {
        self.route_timeout = timeout;
        self
    }
}

/// A quicx server as one node of a cluster on etcd.
///
/// - **Registry**: the node's services (for [`EtcdDiscovery`](crate::EtcdDiscovery)) and its
///   routing address are put under the node's lease, kept alive every third of its TTL. A lost
///   lease is re-granted and everything put again; keys written while etcd was away are put
///   again when it is back.
/// - **Presence**: every identity bound on the server is recorded (`identity → node`) under the
///   lease. A device that connects to another node moves there; this node then closes its
///   stale connection (close code `TAKEN_OVER`, so the old instance does not reconnect).
/// - **Routing**: [`send_to_client`](Self::send_to_client), [`call_client`](Self::call_client)
///   and [`broadcast`](Self::broadcast) reach devices on any node: local ones directly, others
///   through the node that holds them (one quicx connection per node, the cluster secret on
///   every request). Lookups come from a cache the etcd watch keeps current: no etcd request
///   per push.
///
/// Dropping the last handle stops its background tasks and stops renewing its lease: its keys
/// disappear within the TTL, as if it had crashed. [`shutdown`](Self::shutdown) deregisters at
/// once.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    inner: Arc<NodeInner>,
}

#[derive(Debug)]
struct NodeInner {
    name: String,
    server: quicx::WeakServer,
    prefix: String,
    session: Arc<Session>,
    secret: Arc<str>,
    tls: ClientTls,
    route_timeout: Duration,
    state: Arc<Shared>,
    peers: tokio::sync::Mutex<HashMap<String, (String, Client)>>,
    /// Per peer node, the queue of pushes its batcher sends.
    batchers: Mutex<HashMap<String, Batcher>>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        // The last handle is gone: stop renewing the lease (its keys expire with it).
        self.session.halt();
    }
}

/// Which prefix a watch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Presence,
    Nodes,
    Durable,
}

/// What the watch keeps current and the event tasks read.
struct Shared {
    name: String,
    prefix: String,
    session: Arc<Session>,
    durable: Arc<ClusterDurable>,
    etcd: etcd_client::Client,
    /// Device → the node that holds it (every node, this one included).
    presence: RwLock<HashMap<String, PresenceRecord>>,
    /// Node → where it takes routed requests.
    nodes: RwLock<HashMap<String, NodeRecord>>,
    /// Devices this node recorded, with the etcd revision of its record (`None` while the put
    /// is on its way; zero or negative when it failed: minus the session's heal revision then):
    /// a record of another node with a later revision moves the device away.
    mine: Mutex<HashMap<String, Option<i64>>>,
    events: broadcast::Sender<ClusterEvent>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.name)
            .field("devices", &read(&self.presence).len())
            .field("nodes", &read(&self.nodes).len())
            .finish()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

use crate::lock;

impl ClusterNode {
    /// Joins the cluster with `server`, which must already be bound ([`Server::bind`]): it
    /// registers only once it accepts connections.
    ///
    /// Registers the routing service on the server, records the identities already bound, and
    /// starts following etcd.
    ///
    /// # When it returns
    /// Once the node's keys are in etcd and the cluster's presence and nodes were read; or with
    /// [`ClusterError::EtcdUnreachable`] if etcd did not answer within its request timeout (the
    /// node is then not started), [`ClusterError::Config`] if the server is not bound.
    pub async fn start(server: &Server, options: ClusterOptions) -> Result<Self, ClusterError> {
        let bound = server.local_addr().ok_or_else(|| {
            ClusterError::Config("bind the server before starting its node".into())
        })?;
        if options.name.is_empty() || options.name.contains('/') {
            return Err(ClusterError::Config(format!(
                "node name `{}` must be non-empty, without `/`",
                options.name
            )));
        }
        // Routing requests authenticate with it: an empty one would let anyone through.
        if options.secret.len() < MIN_SECRET_LEN {
            return Err(ClusterError::Config(format!(
                "the cluster secret must be at least {MIN_SECRET_LEN} bytes"
            )));
        }
        let advertise = options.advertise.unwrap_or(bound);
        let prefix = options.etcd.prefix.clone();
        let client = options.etcd.connect().await?;
        let session = Session::new(client.clone(), options.etcd.clone());
        let node_record = NodeRecord {
            address: advertise.to_string(),
            server_name: options.server_name.clone(),
        };
        session
            .put(keys::node(&prefix, &options.name), to_json(&node_record))
            .await;
        for s in &options.services {
            let record = ServiceRecord {
                address: advertise.to_string(),
                server_name: options.server_name.clone(),
                weight: s.weight,
                group: s.group.clone(),
                metadata: s.metadata.clone(),
                node: options.name.clone(),
            };
            session
                .put(
                    keys::service(&prefix, &s.name, &options.name),
                    to_json(&record),
                )
                .await;
        }
        server.register(
            ROUTING_SERVICE,
            routing::service(server, options.secret.clone()),
        );
        let stop = CancellationToken::new();
        let state = Arc::new(Shared {
            name: options.name.clone(),
            prefix: prefix.clone(),
            session: session.clone(),
            durable: Arc::new(ClusterDurable::new(
                &prefix,
                &options.name,
                options.durable_ack_timeout,
                options.durable_limits,
                stop.clone(),
            )),
            etcd: client.clone(),
            presence: RwLock::default(),
            nodes: RwLock::default(),
            mine: Mutex::default(),
            events: broadcast::Sender::new(4096),
        });
        // Follow the server's identities before reading the ones bound already, so none is
        // missed in between.
        let server_events = server.events();
        let mut bound = HashMap::new();
        for conn in server.connections() {
            if let Some(id) = conn.client_id() {
                bound.insert(conn.id(), id.clone());
                record_presence(&session, &state, &prefix, &id, conn.id()).await;
                state.durable.kick(&state.etcd, &server.downgrade(), &id);
            }
        }
        tokio::spawn(session.clone().run());
        if !session.registered(options.etcd.request_timeout * 2).await {
            session.revoke().await;
            stop.cancel();
            return Err(ClusterError::EtcdUnreachable(format!(
                "could not register in {:?} within {:?}",
                options.etcd.endpoints,
                options.etcd.request_timeout * 2
            )));
        }
        // Three watches: presence and nodes (small values, in the caches), and the durable
        // messages' keys (their payloads stay in etcd until a delivery reads them).
        let mut firsts = Vec::new();
        for scope in [Scope::Presence, Scope::Nodes, Scope::Durable] {
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            firsts.push(first_rx);
            let watched = match scope {
                Scope::Presence => keys::presences(&prefix),
                Scope::Nodes => keys::nodes(&prefix),
                Scope::Durable => format!("{prefix}/durable/"),
            };
            tokio::spawn(follow(
                client.clone(),
                watched,
                stop.clone(),
                {
                    let state = state.clone();
                    let server = server.downgrade();
                    let prefix = prefix.clone();
                    move |change| state.apply(&prefix, scope, change, &server)
                },
                Some(first_tx),
                scope == Scope::Durable,
            ));
        }
        let first_rx = futures_util::future::try_join_all(firsts);
        tokio::spawn(track_identities(
            server_events,
            bound,
            server.downgrade(),
            session.clone(),
            state.clone(),
            prefix.clone(),
            stop.clone(),
        ));
        if tokio::time::timeout(options.etcd.request_timeout, first_rx)
            .await
            .is_err()
        {
            session.revoke().await;
            stop.cancel();
            return Err(ClusterError::EtcdUnreachable(
                "could not read the cluster's presence".into(),
            ));
        }
        tracing::info!(node = %options.name, %advertise, "joined the cluster");
        let cluster_events = state.events.subscribe();
        let node = Self {
            inner: Arc::new(NodeInner {
                name: options.name,
                server: server.downgrade(),
                prefix,
                session,
                secret: options.secret,
                tls: options.tls,
                route_timeout: options.route_timeout,
                state,
                peers: tokio::sync::Mutex::default(),
                batchers: Mutex::default(),
                stop: stop.clone(),
                _stop_on_drop: stop.clone().drop_guard(),
            }),
        };
        tokio::spawn(prune_departed(
            Arc::downgrade(&node.inner),
            cluster_events,
            stop,
        ));
        Ok(node)
    }

    /// The nodes this node holds a routing connection to now (it connects on the first routed
    /// request and lets go when the node leaves the cluster).
    pub async fn connected_peers(&self) -> Vec<String> {
        let mut peers: Vec<String> = self.inner.peers.lock().await.keys().cloned().collect();
        peers.sort();
        peers
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node that holds `client_id` now, as this node's cache knows it (no etcd request).
    pub fn locate(&self, client_id: &str) -> Option<String> {
        if self.server().and_then(|s| s.client(client_id)).is_some() {
            return Some(self.inner.name.clone());
        }
        read(&self.inner.state.presence)
            .get(client_id)
            .map(|p| p.node.clone())
    }

    /// The nodes in the cluster now (this one included).
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<String> = read(&self.inner.state.nodes).keys().cloned().collect();
        nodes.sort();
        nodes
    }

    /// Devices connecting, leaving and moving anywhere in the cluster, and nodes joining and
    /// leaving, as this node's etcd watch sees them. A subscriber more than 4,096 events behind
    /// gets `RecvError::Lagged`.
    pub fn events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.state.events.subscribe()
    }

    fn server(&self) -> Option<Server> {
        self.inner.server.upgrade()
    }

    /// Pushes to `client_id` wherever it is connected (see [`Connection::send_message`]
    /// for what "sent" means): directly if here, else through its node.
    ///
    /// # Errors
    /// [`ClusterError::Offline`] if no node holds it, [`ClusterError::NodeUnreachable`] if its
    /// node cannot be reached (or did not answer within the route timeout),
    /// [`ClusterError::Device`] if the device (or its connection) failed. A device that left
    /// the node the cache names a moment ago is looked up in etcd once and followed.
    ///
    /// # Cancel safety
    /// Dropping the future may leave the push on its way: once handed to the owning node it is
    /// sent whether or not anyone waits for the answer.
    ///
    /// [`Connection::send_message`]: quicx::Connection::send_message
    pub async fn send_to_client(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<(), ClusterError> {
        self.push(
            client_id,
            service_path,
            service_method,
            metadata,
            data.as_ref(),
            false,
        )
        .await
    }

    /// [`send_to_client`](Self::send_to_client) that returns once the device's application
    /// received the push (see [`Connection::send_message_with_receipt`](quicx::Connection::send_message_with_receipt)).
    pub async fn send_to_client_with_receipt(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<(), ClusterError> {
        self.push(
            client_id,
            service_path,
            service_method,
            metadata,
            data.as_ref(),
            true,
        )
        .await
    }

    async fn push(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: &[u8],
        receipt: bool,
    ) -> Result<(), ClusterError> {
        let request = |metadata: Metadata| PushRequest {
            client_id: client_id.to_owned(),
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata,
            data: data.to_vec(),
            receipt,
        };
        if let Some(server) = self.local(client_id) {
            return routing::push_here(&server, request(metadata))
                .await
                .map_err(|f| self.device_error(client_id, &self.inner.name, f));
        }
        let node = self.owner(client_id).await?;
        let routed = self.batched_push(&node, request(metadata.clone())).await?;
        match routed {
            Err(f) if f.offline => {
                // The device left that node a moment ago and the cache has not seen where it
                // went: ask etcd once and follow it (nothing was delivered on the first node).
                match self.fresh_owner(client_id).await.filter(|n| *n != node) {
                    Some(fresh) => self
                        .batched_push(&fresh, request(metadata))
                        .await?
                        .map_err(|f| self.device_error(client_id, &fresh, f)),
                    // It may have come here.
                    None => match self.local(client_id) {
                        Some(server) => routing::push_here(&server, request(metadata))
                            .await
                            .map_err(|f| self.device_error(client_id, &self.inner.name, f)),
                        None => Err(self.device_error(client_id, &node, f)),
                    },
                }
            }
            other => other.map_err(|f| self.device_error(client_id, &node, f)),
        }
    }

    /// Routes a push through `node`'s batcher: pushes that wait together go in one request
    /// (`PushBatch`); a push alone goes at once, so batching adds no latency.
    async fn batched_push(
        &self,
        node: &str,
        request: PushRequest,
    ) -> Result<Routed<()>, ClusterError> {
        let (queue, in_flight) = {
            let mut batchers = lock(&self.inner.batchers);
            match batchers.get(node) {
                Some((q, n)) if !q.is_closed() => (q.clone(), n.clone()),
                _ => {
                    let (tx, rx) = mpsc::channel(4096);
                    let in_flight = Arc::new(AtomicUsize::new(0));
                    tokio::spawn(run_batcher(
                        Arc::downgrade(&self.inner),
                        node.to_owned(),
                        rx,
                        in_flight.clone(),
                    ));
                    batchers.insert(node.to_owned(), (tx.clone(), in_flight.clone()));
                    (tx, in_flight)
                }
            }
        };
        // Nothing on its way to that node: send this one now, from this task (no hand-over,
        // no added latency). Pushes that come while requests are in flight wait for the
        // batcher and share requests.
        if in_flight
            .compare_exchange(0, 1, AtomicOrdering::AcqRel, AtomicOrdering::Relaxed)
            .is_ok()
        {
            // Counted down even if this future is dropped mid-way.
            struct Done(Arc<AtomicUsize>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, AtomicOrdering::AcqRel);
                }
            }
            let _done = Done(in_flight);
            return self.route(node, "Push", &request, None).await;
        }
        let (tx, rx) = oneshot::channel();
        queue
            .send((request, tx))
            .await
            .map_err(|_| ClusterError::Config("node stopped".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(ClusterError::Config("node stopped".into())))
    }

    /// Calls `service_path.service_method` on the device `client_id` wherever it is connected (a
    /// reverse call), with postcard-encoded `args`.
    ///
    /// # Errors
    /// As [`send_to_client`](Self::send_to_client); a handler error of the device is
    /// [`ClusterError::Device`] with its code. A device that left the node the cache names a
    /// moment ago is looked up in etcd once and followed.
    ///
    /// # Cancel safety
    /// Dropping the future cancels the hop to the owning node; whether the device's handler
    /// started is unknown (as for any quicx call).
    pub async fn call_client<A, R>(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        args: &A,
    ) -> Result<R, ClusterError>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let payload = Codec::Postcard.encode(args)?;
        let reply = self
            .call_client_raw(
                client_id,
                service_path,
                service_method,
                &payload,
                &CallOptions::new(),
            )
            .await?;
        Ok(routing::decode(&reply)?)
    }

    /// [`call_client`](Self::call_client) with payload bytes encoded in `options.codec`, and the
    /// reply's bytes. `options.timeout` bounds the whole routed call (default: the route
    /// timeout).
    pub async fn call_client_raw(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<Bytes, ClusterError> {
        let timeout = options.timeout.unwrap_or(self.inner.route_timeout);
        let request = CallRequest {
            client_id: client_id.to_owned(),
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata: options.metadata.clone(),
            payload: payload.to_vec(),
            codec: options.codec.to_wire(),
            timeout_ms: CallOptions::wire_timeout_ms(timeout),
        };
        if let Some(server) = self.local(client_id) {
            return routing::call_here(&server, request)
                .await
                .map(Bytes::from)
                .map_err(|f| self.device_error(client_id, &self.inner.name, f));
        }
        let node = self.owner(client_id).await?;
        // The hop gets a little longer than the device call, so the device's own deadline
        // answers first.
        let hop = timeout + Duration::from_millis(250);
        let mut node = node;
        let mut routed: Routed<Vec<u8>> = self.route(&node, "Call", &request, Some(hop)).await?;
        if matches!(&routed, Err(f) if f.offline) {
            // The device left that node a moment ago and the cache has not seen where it went:
            // ask etcd once and follow it.
            if let Some(fresh) = self.fresh_owner(client_id).await.filter(|n| *n != node) {
                routed = self.route(&fresh, "Call", &request, Some(hop)).await?;
                node = fresh;
            } else if let Some(server) = self.local(client_id) {
                // It came here.
                return routing::call_here(&server, request)
                    .await
                    .map(Bytes::from)
                    .map_err(|f| self.device_error(client_id, &self.inner.name, f));
            }
        }
        routed
            .map(Bytes::from)
            .map_err(|f| self.device_error(client_id, &node, f))
    }

    /// Pushes one message to every device of the cluster: this node's directly, every other
    /// node's through it, all at once. Returns one result per device (in no particular order);
    /// the devices of a node that cannot be reached get [`ClusterError::NodeUnreachable`].
    /// Each push is bounded by `timeout`; the whole broadcast takes about that long at most.
    pub async fn broadcast(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Vec<(String, Result<(), ClusterError>)> {
        let request = BroadcastRequest {
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata,
            data: data.as_ref().to_vec(),
            timeout_ms: CallOptions::wire_timeout_ms(timeout),
        };
        let others: Vec<String> = read(&self.inner.state.nodes)
            .keys()
            .filter(|n| **n != self.inner.name)
            .cloned()
            .collect();
        let local = async {
            match self.server() {
                Some(server) => routing::broadcast_here(&server, request.clone())
                    .await
                    .into_iter()
                    .map(|(id, r)| {
                        (
                            id.clone(),
                            r.map_err(|f| self.device_error(&id, &self.inner.name, f)),
                        )
                    })
                    .collect(),
                None => Vec::new(),
            }
        };
        let remote = join_all(others.iter().map(|node| {
            let request = &request;
            async move {
                let routed: Result<Vec<(String, Routed<()>)>, ClusterError> = self
                    .route(
                        node,
                        "Broadcast",
                        request,
                        Some(timeout + Duration::from_secs(1)),
                    )
                    .await;
                match routed {
                    Ok(results) => results
                        .into_iter()
                        .map(|(id, r)| (id.clone(), r.map_err(|f| self.device_error(&id, node, f))))
                        .collect::<Vec<_>>(),
                    Err(e) => self
                        .devices_on(node)
                        .into_iter()
                        .map(|id| (id, Err(e.clone())))
                        .collect(),
                }
            }
        }));
        let (mut results, remote): (Vec<_>, Vec<_>) = tokio::join!(local, remote);
        results.extend(remote.into_iter().flatten());
        results
    }

    /// The devices the presence cache places on `node`.
    fn devices_on(&self, node: &str) -> Vec<String> {
        read(&self.inner.state.presence)
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn local(&self, client_id: &str) -> Option<Server> {
        let server = self.server()?;
        server.client(client_id).is_some().then_some(server)
    }

    /// The node that holds `client_id`, other than this one.
    async fn owner(&self, client_id: &str) -> Result<String, ClusterError> {
        if let Some(p) = read(&self.inner.state.presence).get(client_id) {
            if p.node != self.inner.name {
                return Ok(p.node.clone());
            }
        }
        // Not in the cache (or the cache still says here): the watch may lag a record written
        // a moment ago, so ask etcd once before answering offline. Only this path costs an
        // etcd request; a known device never does.
        self.fresh_owner(client_id)
            .await
            .ok_or_else(|| ClusterError::Offline {
                client_id: client_id.to_owned(),
            })
    }

    /// The node etcd records for `client_id` now (one etcd request), other than this one.
    async fn fresh_owner(&self, client_id: &str) -> Option<String> {
        let key = keys::presence(&self.inner.prefix, client_id);
        let fresh = self.inner.state.etcd.clone().get(key, None).await.ok()?;
        let value = fresh.kvs().first()?.value().to_vec();
        let record = serde_json::from_slice::<PresenceRecord>(&value).ok()?;
        (record.node != self.inner.name).then_some(record.node)
    }

    fn device_error(&self, client_id: &str, node: &str, f: DeviceFailure) -> ClusterError {
        if f.offline {
            return ClusterError::Offline {
                client_id: client_id.to_owned(),
            };
        }
        ClusterError::Device {
            client_id: client_id.to_owned(),
            node: node.to_owned(),
            kind: f.kind,
            code: f.code,
            message: f.message,
        }
    }

    /// Calls the routing service of `node`.
    async fn route<Q: Serialize, R: DeserializeOwned>(
        &self,
        node: &str,
        method: &str,
        request: &Q,
        timeout: Option<Duration>,
    ) -> Result<R, ClusterError> {
        let unreachable = |source: quicx::Error| ClusterError::NodeUnreachable {
            node: node.to_owned(),
            source: Arc::new(source),
        };
        let client = self.peer(node).await.map_err(unreachable)?;
        let options = CallOptions::new()
            .metadata(SECRET_METADATA_KEY, &*self.inner.secret)
            .timeout(timeout.unwrap_or(self.inner.route_timeout));
        client
            .call_with(ROUTING_SERVICE, method, request, &options)
            .await
            .map_err(unreachable)
    }

    /// The connection to `node`, opened on first use and kept (it reconnects by itself).
    async fn peer(&self, node: &str) -> Result<Client, quicx::Error> {
        let record = read(&self.inner.state.nodes)
            .get(node)
            .cloned()
            .ok_or_else(|| {
                quicx::Error::NoEndpoints(format!("node `{node}` is not in the cluster"))
            })?;
        if let Some((address, client)) = self.inner.peers.lock().await.get(node) {
            if *address == record.address {
                return Ok(client.clone());
            }
        }
        // Connect without the lock: a slow or dead node must not hold up routing to the others.
        let addr: SocketAddr = record.address.parse().map_err(|_| {
            quicx::Error::Config(format!(
                "node `{node}` has a bad address {}",
                record.address
            ))
        })?;
        let client = Client::builder()
            .tls(self.inner.tls.clone())
            .connect_timeout(Duration::from_secs(2))
            .connect_addr(addr, &record.server_name)
            .await?;
        let mut peers = self.inner.peers.lock().await;
        match peers.get(node) {
            // Another task connected meanwhile: keep one connection per node.
            Some((address, existing)) if *address == record.address => {
                let existing = existing.clone();
                drop(peers);
                client.close().await;
                Ok(existing)
            }
            _ if read(&self.inner.state.nodes)
                .get(node)
                .is_none_or(|now| now.address != record.address) =>
            {
                // The node left (or moved) while we connected: do not keep a connection to it.
                drop(peers);
                client.close().await;
                Err(quicx::Error::NoEndpoints(format!(
                    "node `{node}` left the cluster"
                )))
            }
            _ => {
                peers.insert(node.to_owned(), (record.address, client.clone()));
                Ok(client)
            }
        }
    }

    /// Leaves the cluster, then shuts the server down: revokes the node's lease first (its
    /// services and devices disappear from etcd at once, so XClients and other nodes stop
    /// using it), then [`Server::shutdown`] with `drain`. Returns what that returns.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        self.inner.session.revoke().await;
        self.inner.stop.cancel();
        for (_, (_, client)) in self.inner.peers.lock().await.drain() {
            client.close().await;
        }
        match self.server() {
            Some(server) => server.shutdown(drain).await,
            None => true,
        }
    }

    /// Stores a durable message for `client_id` in etcd, where it survives the loss of this
    /// node, and delivers it through whichever node holds the device (at once if one does; else
    /// when it next connects to any node). In order per device, each once (see
    /// [`Server::send_durable`](quicx::Server::send_durable) for the guarantees); at most
    /// [`MAX_DURABLE_PAYLOAD`](crate::MAX_DURABLE_PAYLOAD) bytes, within the node's
    /// [`ClusterDurableLimits`] (per device exact, in all as this node's watch shows the
    /// cluster).
    ///
    /// # When it returns
    /// Once etcd committed it, with its id; [`ClusterError::DurableFull`] over a bound under
    /// [`Overflow::Refuse`](quicx::Overflow::Refuse) (under
    /// [`Overflow::DropOldest`](quicx::Overflow::DropOldest) the device's oldest messages are
    /// dropped in the same etcd transaction, and counted in
    /// [`ClusterDurableStats::overflowed`]), [`ClusterError::EtcdUnreachable`] if etcd did not
    /// take it (or answered too slowly: it may then be stored without the caller learning its
    /// id; find it with [`durable_messages`](Self::durable_messages)). Sends to one device
    /// through one node are written by one task, up to 64 to an etcd transaction; a write
    /// reads the device's keys from etcd only when another node wrote to the device meanwhile,
    /// and before it refuses or drops anything. Dropping the future does not withdraw the
    /// message: it may still be stored.
    pub async fn send_durable(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<u64, ClusterError> {
        let state = &self.inner.state;
        let mut etcd = state.etcd.clone();
        let id = state
            .durable
            .store(
                &mut etcd,
                client_id,
                (service_path, service_method),
                metadata,
                data.as_ref(),
                ttl,
            )
            .await?;
        if self.server().and_then(|s| s.client(client_id)).is_some() {
            state.durable.kick(&etcd, &self.inner.server, client_id);
        }
        // A revision times `ID_SPAN` plus a place: never negative.
        Ok(id.unsigned_abs())
    }

    /// The durable messages pending in etcd for `client_id`, oldest first (expired ones
    /// excluded; `id` is what the device sees under `quicx-msg-id`).
    ///
    /// Returns once etcd answered every page (256 messages each);
    /// [`ClusterError::EtcdUnreachable`] if it did not answer within its request timeout.
    /// Dropping the future only stops the reads.
    pub async fn durable_messages(
        &self,
        client_id: &str,
    ) -> Result<Vec<quicx::PendingMessage>, ClusterError> {
        let state = &self.inner.state;
        state.durable.list(&mut state.etcd.clone(), client_id).await
    }

    /// Cancels the pending durable message `id` of `client_id`; whether it was still pending.
    /// A message a delivery run has already sent may still arrive.
    ///
    /// Returns once etcd deleted it (or found nothing); [`ClusterError::EtcdUnreachable`] if
    /// etcd did not answer (it may then be cancelled or not: list to know). Dropping the future
    /// after the delete went out does not take the delete back.
    pub async fn cancel_durable(&self, client_id: &str, id: u64) -> Result<bool, ClusterError> {
        // No message has an id above `i64::MAX` (etcd revisions are `i64`).
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let state = &self.inner.state;
        state
            .durable
            .cancel(&mut state.etcd.clone(), client_id, id)
            .await
    }

    /// The cluster's durable messages as this node sees them (pending, from its watch of etcd)
    /// and what this node did with them (delivered, expired, dropped to make room). Also
    /// exported as metrics: `quicx_cluster_durable_pending`, `_pending_bytes` and
    /// `_pending_devices` (gauges), and the `quicx_durable_delivered_total`, `_expired_total`
    /// and `_overflowed_total` counters a server's own store counts in too. Returns at once,
    /// from memory: no etcd request.
    pub fn durable_stats(&self) -> ClusterDurableStats {
        self.inner.state.durable.stats()
    }

    /// How many durable messages wait in etcd for `client_id`.
    pub async fn durable_pending(&self, client_id: &str) -> Result<i64, ClusterError> {
        let state = &self.inner.state;
        state
            .durable
            .pending(&mut state.etcd.clone(), client_id)
            .await
    }

    /// The key prefix this node lives under.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }
}

/// The queue of one peer node's batcher, and how many requests are on their way to that node.
type Batcher = (mpsc::Sender<QueuedPush>, Arc<AtomicUsize>);

/// A push waiting for its node's batcher, and where its result goes.
type QueuedPush = (
    PushRequest,
    oneshot::Sender<Result<Routed<()>, ClusterError>>,
);

/// Most pushes in one routed batch, and batches in flight to one node.
const MAX_BATCH: usize = 256;
const BATCHES_IN_FLIGHT: usize = 8;

/// Lets go of what this node keeps for a peer node once that node has left the cluster: its
/// batcher (which ends when its queue closes) and its routing connection (closed, so it stops
/// reconnecting to a node that is gone). A lagging event stream prunes every peer the node
/// table no longer has.
async fn prune_departed(
    node: Weak<NodeInner>,
    mut events: broadcast::Receiver<ClusterEvent>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            // A stopped node touches etcd no more, however many events wait.
            biased;
            () = stop.cancelled() => return,
            e = events.recv() => e,
        };
        let departed: Vec<String> = match event {
            Ok(ClusterEvent::NodeDown { node }) => vec![node],
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let Some(inner) = node.upgrade() else { return };
                let mut known: Vec<String> = inner.peers.lock().await.keys().cloned().collect();
                known.extend(lock(&inner.batchers).keys().cloned());
                known
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let closing = {
            let Some(inner) = node.upgrade() else { return };
            let mut closing = Vec::new();
            for name in departed {
                if read(&inner.state.nodes).contains_key(&name) {
                    // Back (or never gone): keep what we have.
                    continue;
                }
                lock(&inner.batchers).remove(&name);
                if let Some((_, client)) = inner.peers.lock().await.remove(&name) {
                    closing.push(client);
                }
            }
            closing
        };
        for client in closing {
            client.close().await;
        }
    }
}

/// Sends the pushes queued for `node` in batches until the node handle is gone.
async fn run_batcher(
    node: Weak<NodeInner>,
    name: String,
    mut rx: mpsc::Receiver<QueuedPush>,
    in_flight: Arc<AtomicUsize>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(inner) = node.upgrade() else { return };
        let name = name.clone();
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, AtomicOrdering::AcqRel);
        tokio::spawn(async move {
            let node = ClusterNode { inner };
            let (requests, replies): (Vec<PushRequest>, Vec<_>) = batch.into_iter().unzip();
            let routed: Result<Vec<Routed<()>>, ClusterError> =
                node.route(&name, "PushBatch", &requests, None).await;
            match routed {
                Ok(results) if results.len() == replies.len() => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(_) => {
                    let e =
                        ClusterError::Config("a node answered a batch with the wrong count".into());
                    replies
                        .into_iter()
                        .for_each(|r| drop(r.send(Err(e.clone()))));
                }
                Err(e) => replies
                    .into_iter()
                    .for_each(|r| drop(r.send(Err(e.clone())))),
            }
            in_flight.fetch_sub(1, AtomicOrdering::AcqRel);
            drop(permit);
        });
    }
}

/// Records that `client_id` is bound here on connection `conn`.
async fn record_presence(
    session: &Session,
    state: &Shared,
    prefix: &str,
    client_id: &str,
    conn: u64,
) {
    lock(&state.mine).insert(client_id.to_owned(), None);
    let record = PresenceRecord {
        node: state.name.clone(),
        conn,
    };
    let revision = session
        .put(keys::presence(prefix, client_id), to_json(&record))
        .await;
    if let Some(entry) = lock(&state.mine).get_mut(client_id) {
        // A failed put (etcd away) is marked with the session's last heal, negated: a heal
        // after it puts the record back (see the presence snapshot in `apply`).
        *entry = revision.or(Some(-session.healed_at()));
    }
}

/// Removes this node's presence record of `client_id` (held by connection `conn`), unless the
/// server has the identity bound again (by another connection) or another node wrote it since.
async fn release_presence(
    session: &Session,
    state: &Shared,
    prefix: &str,
    server: &quicx::WeakServer,
    client_id: &str,
    conn: u64,
) {
    let Some(server) = server.upgrade() else {
        return;
    };
    if server.client(client_id).is_some() {
        // Another connection holds the identity here now.
        return;
    }
    drop(server);
    lock(&state.mine).remove(client_id);
    let record = PresenceRecord {
        node: state.name.clone(),
        conn,
    };
    session
        .remove_if(&keys::presence(prefix, client_id), &to_json(&record))
        .await;
}

/// Keeps this node's presence records in step with the identities its server binds and loses:
/// a bind records the identity, a disconnect removes it, a connection re-bound to another
/// identity releases its old one, and a lagging event stream is made good by comparing the
/// records with what the server has bound now.
async fn track_identities(
    mut events: broadcast::Receiver<ServerEvent>,
    // The identity each local connection was last bound to, as far as the events told (seeded
    // with the connections bound before the node started).
    mut bound: HashMap<u64, String>,
    server: quicx::WeakServer,
    session: Arc<Session>,
    state: Arc<Shared>,
    prefix: String,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            // A stopped node touches etcd no more, however many events wait.
            biased;
            () = stop.cancelled() => return,
            e = events.recv() => e,
        };
        match event {
            Ok(ServerEvent::Bound { conn, client_id }) => {
                if let Some(old) = bound.insert(conn.id(), client_id.clone()) {
                    if old != client_id {
                        release_presence(&session, &state, &prefix, &server, &old, conn.id()).await;
                    }
                }
                record_presence(&session, &state, &prefix, &client_id, conn.id()).await;
                state.durable.kick(&state.etcd, &server, &client_id);
            }
            Ok(ServerEvent::Disconnected { conn, .. }) => {
                let id = bound.remove(&conn.id()).or_else(|| conn.client_id());
                if let Some(id) = id {
                    release_presence(&session, &state, &prefix, &server, &id, conn.id()).await;
                }
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Missed binds or departures: record every identity bound now and remove the
                // records of identities no longer bound here.
                tracing::warn!("cluster node missed {missed} server events: resyncing presence");
                let Some(strong) = server.upgrade() else {
                    return;
                };
                bound.clear();
                for conn in strong.connections() {
                    if let Some(id) = conn.client_id() {
                        bound.insert(conn.id(), id.clone());
                        record_presence(&session, &state, &prefix, &id, conn.id()).await;
                        // Its `Bound` event may be among the missed: its backlog too.
                        state.durable.kick(&state.etcd, &server, &id);
                    }
                }
                let recorded: Vec<String> = lock(&state.mine).keys().cloned().collect();
                for id in recorded {
                    if strong.client(&id).is_some() {
                        continue;
                    }
                    lock(&state.mine).remove(&id);
                    let key = keys::presence(&prefix, &id);
                    if let Some(value) = session.wanted(&key) {
                        session.remove_if(&key, &value).await;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Shared {
    /// Applies a change under the cluster prefix to the caches; emits events; closes a local
    /// connection whose device moved to another node.
    fn apply(&self, prefix: &str, scope: Scope, change: Change, server: &quicx::WeakServer) {
        let presence_prefix = keys::presences(prefix);
        let nodes_prefix = keys::nodes(prefix);
        match change {
            Change::Reset(kvs) if scope == Scope::Presence => {
                let mut elsewhere = Vec::new();
                *write(&self.presence) = kvs
                    .into_iter()
                    .filter_map(|(k, v, revision)| {
                        let id = k.strip_prefix(&presence_prefix)?.to_owned();
                        let record = serde_json::from_str::<PresenceRecord>(&v).ok()?;
                        if record.node != self.name {
                            elsewhere.push((id.clone(), record.node.clone(), revision));
                        }
                        Some((id, record))
                    })
                    .collect();
                // A device that moved to another node while the watch was down: close our
                // stale connection, as a live watch event would have. Not when our own put
                // failed (etcd was away; its revision is unknown, 0): the snapshot may hold an
                // older record of another node, and healing the lease puts ours back.
                for (id, node, revision) in elsewhere {
                    {
                        let mut mine = lock(&self.mine);
                        if let Some(Some(ours)) = mine.get_mut(&id) {
                            if *ours <= 0 {
                                // Our put failed. Only a heal after that failure put the record
                                // back, at a revision it tells; until then ours stands.
                                let healed = self.session.healed_at();
                                if healed <= -*ours {
                                    continue;
                                }
                                *ours = healed;
                            }
                        }
                    }
                    self.moved_away(&id, &node, revision, server);
                }
            }
            Change::Reset(kvs) if scope == Scope::Nodes => {
                let fresh: HashMap<String, NodeRecord> = kvs
                    .into_iter()
                    .filter_map(|(k, v, _)| {
                        let node = k.strip_prefix(&nodes_prefix)?.to_owned();
                        Some((node, serde_json::from_str::<NodeRecord>(&v).ok()?))
                    })
                    .collect();
                let before = std::mem::replace(&mut *write(&self.nodes), fresh.clone());
                // Nodes that left or came while the watch was away: as live events would say.
                for node in before.keys().filter(|n| !fresh.contains_key(*n)) {
                    let _ = self
                        .events
                        .send(ClusterEvent::NodeDown { node: node.clone() });
                }
                for node in fresh.keys().filter(|n| !before.contains_key(*n)) {
                    let _ = self
                        .events
                        .send(ClusterEvent::NodeUp { node: node.clone() });
                }
            }
            Change::Reset(kvs) => {
                self.durable
                    .view_reset(kvs.iter().map(|(k, _, revision)| (k.as_str(), *revision)));
                // Durable messages may have arrived while the watch was down: deliver what the
                // local devices have waiting.
                if let Some(server) = server.upgrade() {
                    for conn in server.connections() {
                        if let Some(id) = conn.client_id() {
                            self.durable.kick(&self.etcd, &server.downgrade(), &id);
                        }
                    }
                }
            }
            Change::Put {
                key,
                value,
                revision,
            } => {
                if let Some(device) = self.durable.device_of(&key) {
                    self.durable.view_put(&device, &key, revision);
                    if server.upgrade().and_then(|s| s.client(&device)).is_some() {
                        self.durable.kick(&self.etcd, server, &device);
                    }
                } else if let Some(id) = key.strip_prefix(&presence_prefix) {
                    let Ok(p) = serde_json::from_str::<PresenceRecord>(&value) else {
                        return;
                    };
                    let before = write(&self.presence).insert(id.to_owned(), p.clone());
                    let event = match before {
                        Some(b) if b.node != p.node => Some(ClusterEvent::DeviceMoved {
                            client_id: id.to_owned(),
                            from: b.node,
                            to: p.node.clone(),
                        }),
                        Some(_) => None,
                        None => Some(ClusterEvent::DeviceConnected {
                            client_id: id.to_owned(),
                            node: p.node.clone(),
                        }),
                    };
                    if let Some(e) = event {
                        let _ = self.events.send(e);
                    }
                    if p.node != self.name {
                        self.moved_away(id, &p.node, revision, server);
                    }
                } else if let Some(node) = key.strip_prefix(&nodes_prefix) {
                    if let Ok(n) = serde_json::from_str::<NodeRecord>(&value) {
                        if write(&self.nodes).insert(node.to_owned(), n).is_none() {
                            let _ = self.events.send(ClusterEvent::NodeUp {
                                node: node.to_owned(),
                            });
                        }
                    }
                }
            }
            Change::Delete { key } if scope == Scope::Durable => self.durable.view_delete(&key),
            Change::Delete { key } => {
                if let Some(id) = key.strip_prefix(&presence_prefix) {
                    // Only a record this cache held was ever reported (or readable).
                    if let Some(before) = write(&self.presence).remove(id) {
                        let _ = self.events.send(ClusterEvent::DeviceDisconnected {
                            client_id: id.to_owned(),
                            node: before.node,
                        });
                    }
                } else if let Some(node) = key.strip_prefix(&nodes_prefix) {
                    write(&self.nodes).remove(node);
                    let _ = self.events.send(ClusterEvent::NodeDown {
                        node: node.to_owned(),
                    });
                }
            }
        }
    }

    /// Another node recorded `client_id`: if this node holds an older connection of it, close
    /// that one (the newer record wins; a record of ours still on its way is newer).
    fn moved_away(&self, client_id: &str, to: &str, revision: i64, server: &quicx::WeakServer) {
        let mut mine = lock(&self.mine);
        match mine.get(client_id) {
            // Not ours, or our record is still on its way (it will be the newer one).
            Some(None) | None => return,
            // An older record that the watch delivers late: ours stands.
            Some(Some(ours)) if *ours > 0 && revision <= *ours => return,
            Some(Some(_)) => {}
        }
        mine.remove(client_id);
        drop(mine);
        // Never put our old record back when the lease heals.
        self.session
            .forget(&keys::presence(&self.prefix, client_id));
        if let Some(conn) = server.upgrade().and_then(|s| s.client(client_id)) {
            tracing::info!(%client_id, to, "device moved to another node: closing its old connection");
            conn.close_with_code(CloseCode::TAKEN_OVER, &format!("moved to node {to}"));
        }
    }
}
