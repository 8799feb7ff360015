//! The server: accepts connections, serves calls, keeps a registry of clients, pushes.

use crate::sync::Lock;
use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    Connection, DevCertificate, DisconnectReason, Error, Metadata, Result, ServerEvent, ServerTls,
    Service, Stats, TransportOptions, config,
    connection::{
        self,
        registry::Registry,
        side::{Hooks, Role, Side, SideTimeouts},
    },
    error::NotConnected,
    io::{IoRuntime, Placement},
    service::Services,
    wire::CloseCode,
};

/// Builds a [`Server`].
///
/// ```
/// # fn main() -> quicx::Result<()> {
/// let dev = quicx::DevCertificate::localhost()?;
/// let server = quicx::Server::builder()
///     .tls(quicx::ServerTls::from_dev(&dev))
///     .transport(quicx::TransportOptions::default().idle_timeout(std::time::Duration::from_secs(5)))
///     .build()?;
/// # let _ = server;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ServerBuilder {
    tls: Option<ServerTls>,
    transport: TransportOptions,
    push_timeout: Duration,
    call_timeout: Option<Duration>,
    max_connections: usize,
    placement: Placement,
    io_threads: Option<usize>,
    identity: crate::auth::IdentityPolicy,
    abuse: crate::AbuseLimits,
    hooks: Hooks,
    durable: Option<(std::path::PathBuf, crate::DurableLimits)>,
}

impl ServerBuilder {
    /// Adds an interceptor around every call this server serves and every connection it
    /// accepts (see [`Interceptor`](crate::Interceptor)). Interceptors run in the order they
    /// were added, after the built-in ones (metrics, call rates, the call authorizer).
    #[must_use]
    pub fn interceptor(mut self, interceptor: impl crate::Interceptor) -> Self {
        self.hooks.interceptors.push(Arc::new(interceptor));
        self
    }

    /// Adds an interceptor around every reverse call this server makes (see
    /// [`CallInterceptor`](crate::CallInterceptor)).
    #[must_use]
    pub fn call_interceptor(mut self, interceptor: impl crate::CallInterceptor) -> Self {
        self.hooks.call_interceptors.push(Arc::new(interceptor));
        self
    }

    /// Whether this server records [metrics](crate::metrics) (default on: without an installed
    /// recorder they cost a few hundred nanoseconds of CPU per call and go nowhere; see BENCHMARKS.md).
    #[must_use]
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.hooks.metrics = enabled;
        self
    }

    /// Keeps durable messages ([`Server::send_durable`]) in an embedded, crash-safe database
    /// (redb) at `path`, created if missing, within `limits` (which also say how often commits
    /// are forced onto the disk: [`Fsync`](crate::Fsync)). A server restarted on the same
    /// file delivers what was pending. The file is locked while the server runs and released
    /// when [`Server::shutdown`] returns. [`build`](Self::build) fails with [`Error::Store`] if the
    /// file is not a store or is damaged beyond what the database repairs.
    #[must_use]
    pub fn durable_store(
        mut self,
        path: impl Into<std::path::PathBuf>,
        limits: crate::DurableLimits,
    ) -> Self {
        self.durable = Some((path.into(), limits));
        self
    }

    /// Limits against abusive clients: call rates per connection and per identity, connections
    /// per source address (all off by default; see [`AbuseLimits`](crate::AbuseLimits)).
    #[must_use]
    pub fn abuse_limits(mut self, limits: crate::AbuseLimits) -> Self {
        self.abuse = limits;
        self
    }

    /// Where the endpoints, connections and handlers run (default [`Placement::Auto`]:
    /// dedicated I/O threads, one per core).
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Verifies the identities clients declare in their hello (a token, a signature, a lookup):
    /// the server binds a hello's id — and lets it take over a connection that holds it — only
    /// when this returns it (or, under mTLS, when it is the certificate's name). See
    /// [`Authenticator`](crate::Authenticator).
    #[must_use]
    pub fn authenticator(mut self, authenticator: crate::Authenticator) -> Self {
        self.identity.authenticator = Some(authenticator);
        self
    }

    /// Checks every call before its handler runs (see [`CallAuthorizer`](crate::CallAuthorizer)).
    #[must_use]
    pub fn authorize_calls(mut self, authorizer: crate::CallAuthorizer) -> Self {
        self.identity.authorize_calls = Some(authorizer);
        self
    }

    /// **Insecure**: binds whatever identity a hello declares without verifying it, so any
    /// client that trusts the server's certificate can claim any device id and take over that
    /// device's pushes and reverse calls. For tests and closed networks only; by default a hello
    /// id binds only from mTLS or an [`authenticator`](Self::authenticator).
    #[must_use]
    pub fn insecure_accept_unverified_client_ids(mut self) -> Self {
        self.identity.accept_unverified = true;
        self
    }

    /// How many I/O threads (default: one per core). Each has its own endpoint on the server's
    /// port (`SO_REUSEPORT`, Linux; elsewhere one thread), and drives its connections, their
    /// streams and their short handlers. On Linux the kernel hands each packet to the thread its
    /// destination connection id names (up to 256 threads; the sockets' receive offload is
    /// turned off for it): a new connection reaches a thread picked by the random id its client
    /// chose, so connections spread over the threads even when many share one address (a
    /// gateway, a load balancer), and a client whose address changes (NAT rebinding) keeps its
    /// connection and thread. A new connection that reaches a thread with more connections than
    /// another (by more than a sixteenth of that one's; connections on their way there count)
    /// is sent a QUIC Retry whose connection id names the other thread, so connections stay
    /// spread by count; it costs that client one round trip, a client is moved at most once,
    /// and a full server moves no one. Beyond 256 threads, or where the kernel refuses the
    /// steering program (logged), the kernel's hash of the client's address picks the thread: a
    /// rebinding client may then reach another thread, which answers with a stateless reset,
    /// and the client reconnects at once. A stateless reset that a client sends the server
    /// reaches the connection's thread only by chance (one in `n`): otherwise the server
    /// notices the client is gone at the liveness probe or the idle timeout.
    #[must_use]
    pub fn io_threads(mut self, n: usize) -> Self {
        self.io_threads = Some(n.max(1));
        self
    }

    /// The server's TLS identity (required).
    #[must_use]
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Uses a generated development certificate ([`DevCertificate`]).
    #[must_use]
    pub fn dev_certificate(self, dev: &DevCertificate) -> Self {
        self.tls(ServerTls::from_dev(dev))
    }

    /// All transport settings at once.
    #[must_use]
    pub fn transport(mut self, transport: TransportOptions) -> Self {
        self.transport = transport;
        self
    }

    /// How long `send_message` may wait for the client (stream credit, flow control) before it
    /// fails with [`Error::PushTimeout`]. Default 10 s.
    #[must_use]
    pub fn push_timeout(mut self, timeout: Duration) -> Self {
        self.push_timeout = timeout;
        self
    }

    /// Default timeout of reverse calls (server to client). Default 30 s.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Connections accepted at once (default 100,000); more are refused at the handshake.
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// Builds the server. It does not listen until [`Server::serve`] or [`Server::bind`].
    pub fn build(self) -> Result<Server> {
        let tls = self.tls.ok_or_else(|| {
            Error::Config(
                "a server needs TLS: ServerBuilder::tls(ServerTls::from_pem_files(..)) or \
                 ::dev_certificate(&DevCertificate::localhost()?)"
                    .into(),
            )
        })?;
        let mut quinn_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quinn_config()?));
        quinn_config.transport_config(self.transport.quinn_transport(false)?);
        let stable_keys = config::StableKeys::derive(tls.private_key_der());
        let threads = if config::SHARDED_PORTS {
            self.io_threads.unwrap_or_else(crate::io::cores)
        } else {
            1
        };
        let io = IoRuntime::for_server(self.placement, threads)?;
        let registry = Arc::new(Registry::new(4096));
        let limiters = Arc::new(crate::limits::Limiters::new(&self.abuse));
        let durable = match &self.durable {
            Some((path, limits)) => Some(crate::durable::Durable::open(
                path,
                *limits,
                self.transport.limits,
                &registry,
            )?),
            None => None,
        };
        let side = Arc::new(Side::new(
            Role::Server {
                registry: registry.clone(),
                identity: self.identity,
                limiters: limiters.clone(),
                durable,
            },
            Services::default(),
            &self.transport,
            SideTimeouts {
                push: self.push_timeout,
                call: self.call_timeout,
            },
            io.clone(),
            self.hooks,
        ));
        Ok(Server {
            inner: Arc::new(ServerInner {
                side,
                limiters,
                registry,
                quinn_config,
                stable_keys,
                socket_buffer_size: self.transport.socket_buffer_size,
                max_connections: self.max_connections,
                admitted: std::sync::atomic::AtomicUsize::new(0),
                thread_loads: ThreadLoads::new(io.len()),
                io,
                endpoints: Mutex::new(Vec::new()),
                stop_accepting: CancellationToken::new(),
                stopped: CancellationToken::new(),
                shutdown: Mutex::new(None),
            }),
        })
    }
}

/// A quicx server (rpcx's `server.Server`): register services, serve them, and reach connected
/// clients.
///
/// ```no_run
/// use quicx::{Context, DevCertificate, Server, Service};
///
/// # async fn run() -> quicx::Result<()> {
/// let server = Server::builder().dev_certificate(&DevCertificate::localhost()?).build()?;
/// server.register(
///     "Arith",
///     Service::new().method("Mul", |_ctx: Context, (a, b): (i64, i64)| async move { Ok(a * b) }),
/// );
/// server.serve("127.0.0.1:8972").await
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    side: Arc<Side>,
    limiters: Arc<crate::limits::Limiters>,
    registry: Arc<Registry>,
    quinn_config: quinn::ServerConfig,
    /// Stable across restarts with the same key: see [`config::StableKeys`].
    stable_keys: config::StableKeys,
    socket_buffer_size: usize,
    max_connections: usize,
    /// Connections accepted and not yet closed, handshakes included.
    admitted: std::sync::atomic::AtomicUsize,
    /// The same per I/O thread, and the connections moving to each: where a new connection is
    /// placed.
    thread_loads: ThreadLoads,
    /// The I/O threads, one endpoint each once bound.
    io: Vec<IoRuntime>,
    endpoints: Mutex<Vec<quinn::Endpoint>>,
    stop_accepting: CancellationToken,
    stopped: CancellationToken,
    /// The shutdown in progress, once one started: `Some(drained)` when it is complete.
    shutdown: Mutex<Option<watch::Receiver<Option<bool>>>>,
}

impl Drop for ServerInner {
    fn drop(&mut self) {
        // A server dropped without ever serving (or after shutdown) releases its I/O threads.
        for io in &self.io {
            io.stop();
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr())
            .field("connections", &self.inner.registry.len())
            .finish()
    }
}

/// The outcome of one push within a broadcast.
#[derive(Debug)]
pub struct PushResult {
    /// The client the push went to.
    pub conn: Connection,
    /// What happened.
    pub result: Result<()>,
}

impl Server {
    /// A builder with default settings.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            tls: None,
            transport: TransportOptions::default(),
            push_timeout: Duration::from_secs(10),
            call_timeout: Some(Duration::from_secs(30)),
            max_connections: 100_000,
            placement: Placement::Auto,
            io_threads: None,
            identity: crate::auth::IdentityPolicy::default(),
            abuse: crate::AbuseLimits::default(),
            hooks: Hooks::default(),
            durable: None,
        }
    }

    /// Registers a service under `service_path` (rpcx's `RegisterName`), replacing any service of
    /// that path. Takes effect for calls that arrive afterwards, also while serving.
    pub fn register(&self, service_path: impl Into<String>, service: Service) {
        self.inner.side.services.register(service_path, service);
    }

    /// Binds `addr` and starts accepting in the background; returns the bound address (useful
    /// with port 0). Call [`shutdown`](Self::shutdown) to stop.
    ///
    /// # Errors
    /// [`Error::Io`] if the address is taken (also by sockets that share ports, so a second
    /// server cannot silently split a running server's traffic), [`Error::Config`] if this server
    /// already listens or was shut down.
    pub async fn bind(&self, addr: impl tokio::net::ToSocketAddrs) -> Result<SocketAddr> {
        let addr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| Error::Config("the listen address resolved to nothing".into()))?;
        let mut endpoints = self.inner.endpoints.locked();
        if !endpoints.is_empty() {
            return Err(Error::Config("the server is already listening".into()));
        }
        // Checked under the lock `shutdown` takes to close the endpoints: a bind either comes
        // before (its endpoints are closed) or is refused.
        if self.inner.stop_accepting.is_cancelled() {
            return Err(Error::Config("the server was shut down".into()));
        }
        // A plain bind first: it fails if anything holds the port, sharing sockets included;
        // the sockets that share the port are bound right after it is released.
        let local = std::net::UdpSocket::bind(addr)?.local_addr()?;
        let mut bound = Vec::with_capacity(self.inner.io.len());
        let count = self.inner.io.len();
        for (index, io) in self.inner.io.iter().enumerate() {
            // The socket and the endpoint driver belong to the I/O thread. Bound in order: the
            // kernel numbers the sockets of the port as they join, and packets are steered to
            // them by those numbers (`config::Shard`).
            let _io = io.enter();
            bound.push(config::server_endpoint(
                local,
                self.inner.socket_buffer_size,
                self.inner.quinn_config.clone(),
                self.inner.stable_keys.clone(),
                config::Shard { index, count },
            )?);
        }
        // New connections can be moved between threads only if every socket steers by
        // connection id (else the Retried Initial comes back to the same socket).
        let rebalance = count > 1 && bound.iter().all(|(_, steered)| *steered);
        let bound: Vec<quinn::Endpoint> = bound.into_iter().map(|(e, _)| e).collect();
        for (thread, (endpoint, io)) in bound.iter().zip(&self.inner.io).enumerate() {
            io.spawn(self.clone().accept_loop(
                endpoint.clone(),
                local,
                io.clone(),
                AcceptOn { thread, rebalance },
            ));
        }
        *endpoints = bound;
        if let Some(durable) = self.inner.side.durable() {
            // Where the server's connections are driven (the caller's runtime under
            // `Placement::CallerRuntime`), not where the first sender runs.
            durable.start_kicks(&self.inner.io[0]);
        }
        tracing::info!(%local, threads = self.inner.io.len(), "quicx server listening");
        Ok(local)
    }

    /// Binds `addr` and serves until [`shutdown`](Self::shutdown) completes.
    pub async fn serve(self, addr: impl tokio::net::ToSocketAddrs) -> Result<()> {
        self.bind(addr).await?;
        self.inner.stopped.cancelled().await;
        Ok(())
    }

    /// The bound address, once listening.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner
            .endpoints
            .locked()
            .first()
            .and_then(|e| e.local_addr().ok())
    }

    /// Accepts on one endpoint, on its I/O thread; its connections live on that thread.
    async fn accept_loop(
        self,
        endpoint: quinn::Endpoint,
        local: SocketAddr,
        io: IoRuntime,
        shard: AcceptOn,
    ) {
        loop {
            let incoming = tokio::select! {
                () = self.inner.stop_accepting.cancelled() => break,
                incoming = endpoint.accept() => incoming,
            };
            let Some(mut incoming) = incoming else { break };
            let max = self.inner.max_connections;
            let loads = &self.inner.thread_loads;
            // A new connection on a thread with more connections than another goes there,
            // once: a Retried client comes back with a Retry token, which cannot be retried
            // again (it stops counting as moving once admitted here, or refused). Not when the
            // server is full: the client would wait a round trip for a refusal.
            let returning = !incoming.may_retry();
            if !returning && shard.rebalance && self.inner.admitted.load(Ordering::Acquire) < max {
                if let Some(to) = loads.least_loaded(shard.thread) {
                    // Counted before the Retry goes out: on loopback the client can be back on
                    // the other thread before this one goes on.
                    loads.moving_to(to);
                    match config::retry_to(incoming, to) {
                        Ok(()) => {
                            self.inner
                                .side
                                .record(crate::metrics::Event::Handshake("moved"));
                            continue;
                        }
                        Err(back) => {
                            loads.arrived(to);
                            incoming = back.into_incoming();
                        }
                    }
                }
            }
            // Counts handshakes in progress too, and takes the place in one step, so
            // simultaneous connects on several I/O threads cannot overshoot.
            let placed =
                self.inner
                    .admitted
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < max).then_some(n + 1)
                    });
            if placed.is_err() {
                tracing::warn!(
                    "connection limit reached: refusing {}",
                    incoming.remote_address()
                );
                // Counted before the refusal goes out: a client that saw it finds it counted.
                self.inner
                    .side
                    .record(crate::metrics::Event::Handshake("refused"));
                incoming.refuse();
                if returning {
                    loads.arrived(shard.thread);
                }
                continue;
            }
            let ip = incoming.remote_address().ip();
            if !self.inner.limiters.admit(ip) {
                self.inner.admitted.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!("connection or handshake limit of {ip} reached: refusing");
                // Counted before the refusal goes out: a client that saw it finds it counted.
                self.inner
                    .side
                    .record(crate::metrics::Event::Handshake("refused"));
                incoming.refuse();
                if returning {
                    loads.arrived(shard.thread);
                }
                continue;
            }
            let server = self.clone();
            let io = io.clone();
            loads.admitted[shard.thread].fetch_add(1, Ordering::AcqRel);
            if returning {
                // After counting it as admitted: never counted nowhere in between.
                loads.arrived(shard.thread);
            }
            // Given back however the task ends (or if it never runs): a panic in an interceptor
            // must not keep the place (after `max_connections` of them, every handshake was
            // refused).
            let place = Admitted {
                server: server.clone(),
                ip,
                thread: shard.thread,
            };
            tokio::spawn(async move {
                let _place = place;
                server.handle_incoming(incoming, local, io).await;
            });
        }
        // Shutting down: refuse whatever still arrives until the endpoint closes.
        while let Some(incoming) = endpoint.accept().await {
            incoming.refuse();
        }
    }

    async fn handle_incoming(self, incoming: quinn::Incoming, local: SocketAddr, io: IoRuntime) {
        let remote = incoming.remote_address();
        let quic = match incoming.await {
            Ok(quic) => quic,
            Err(e) => {
                tracing::debug!(%remote, "handshake failed: {e}");
                self.inner
                    .side
                    .record(crate::metrics::Event::Handshake("failed"));
                return;
            }
        };
        let side = &self.inner.side;
        let conn = Connection::new(quic, side.clone(), local, io);
        if let Err(refusal) = side.interceptors.on_connect(&conn) {
            let message = match &refusal {
                crate::Refusal::Unauthenticated(m) | crate::Refusal::PermissionDenied(m) => m,
            };
            tracing::debug!(conn = conn.id(), %remote, "connection refused by an interceptor: {message}");
            side.record(crate::metrics::Event::Handshake("refused"));
            conn.close_with(CloseCode::PROTOCOL_VIOLATION, message.as_bytes());
            side.interceptors.on_disconnect(&conn);
            return;
        }
        side.record(crate::metrics::Event::Handshake("ok"));
        side.counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        self.inner.registry.add(&conn);
        if let Some(cn) = conn.peer_identity().and_then(|p| p.common_name.clone()) {
            conn.bind_client_id(cn);
        }
        tracing::debug!(conn = conn.id(), %remote, "client connected");
        connection::serve(conn.clone()).await;
        let reason = DisconnectReason::from_quinn(&conn.quic().closed().await);
        tracing::debug!(conn = conn.id(), %remote, ?reason, "client disconnected");
        self.inner.registry.remove(&conn, reason);
        side.interceptors.on_disconnect(&conn);
    }

    /// Every connected client.
    pub fn connections(&self) -> Vec<Connection> {
        self.inner.registry.all()
    }

    /// The connection with this [`Connection::id`].
    pub fn connection(&self, id: u64) -> Option<Connection> {
        self.inner.registry.get(id)
    }

    /// The newest connection bound to this client identity (see
    /// [`Connection::bind_client_id`]).
    pub fn client(&self, client_id: &str) -> Option<Connection> {
        self.inner.registry.by_client_id(client_id)
    }

    /// Subscribes to connect, bind and disconnect events. A subscriber that falls more than 4,096
    /// events behind gets `RecvError::Lagged` with the number it missed. The events end
    /// (`RecvError::Closed`) when a [`shutdown`](Self::shutdown) finishes, after the
    /// `Disconnected` events of the connections it closed; a subscription taken after that is
    /// closed at once.
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.inner.registry.subscribe()
    }

    /// Counters: calls served, pushes sent, connections, refusals, buffered request bytes.
    pub fn stats(&self) -> Stats {
        let mut stats = self
            .inner
            .side
            .counters
            .snapshot(self.inner.registry.len() as u64);
        stats.buffered_request_bytes = self.inner.limiters.buffered.used() as u64;
        if let Some(d) = self.inner.side.durable() {
            let c = &d.store.counters;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            (
                stats.durable_pending,
                stats.durable_pending_bytes,
                stats.durable_pending_identities,
            ) = d.store.pending_sizes();
            stats.durable_delivered = get(&c.delivered);
            stats.durable_redelivered = get(&c.redelivered);
            stats.durable_expired = get(&c.expired);
            stats.durable_overflowed = get(&c.overflowed);
        }
        stats
    }

    /// Pushes a message to one client (rpcx's `SendMessage(conn, servicePath, serviceMethod,
    /// metadata, data)`). See [`Connection::send_message`] for the contract.
    pub async fn send_message(
        &self,
        conn: &Connection,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        conn.send_message(service_path, service_method, metadata, data)
            .await
    }

    /// Pushes a message to the client bound to `client_id`; [`Error::NotConnected`] if there is
    /// none.
    pub async fn send_to_client(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        let conn = self
            .client(client_id)
            .ok_or_else(|| Error::NotConnected(NotConnected::NoClient(client_id.to_owned())))?;
        conn.send_message(service_path, service_method, metadata, data)
            .await
    }

    /// Stores a durable message for the client identity `client_id` and delivers it whenever
    /// that identity is bound: at once if it is connected now, else when it next says hello
    /// (to this server, or to a server restarted on the same store). Messages of one identity
    /// arrive in the order they were sent, each once (the client drops what it already
    /// acknowledged); a message is removed when the client acknowledges it. It expires after
    /// `ttl` if still pending.
    ///
    /// # When it returns
    /// Once the message is stored, not when it is delivered; with its id. Under
    /// [`Fsync::EveryCommit`](crate::Fsync::EveryCommit) (the default) its commit is on the
    /// disk and survives any crash; under [`Fsync::Interval`](crate::Fsync::Interval) the store
    /// took it, commits it within about a millisecond and puts it on the disk within the
    /// interval (a crash before then loses it). [`Error::TooLarge`] at once if the payload or the
    /// header (with the id the server adds) is above the frame limits, so it could never be
    /// delivered; [`Error::StoreFull`] if it would exceed a bound under
    /// [`Overflow::Refuse`](crate::Overflow::Refuse), [`Error::Store`] if the commit failed (under
    /// `Fsync::Interval` a commit failing after the answer is logged, and loses the message as a
    /// crash would) or the server shut down, [`Error::Config`] if the server has no
    /// [`durable_store`](ServerBuilder::durable_store).
    ///
    /// # Cancel safety
    /// Dropping the future after the message was queued for the store does not withdraw it: it
    /// may be stored (and delivered) without the caller learning its id. Find it with
    /// [`durable_pending`](Self::durable_pending).
    pub async fn send_durable(
        &self,
        client_id: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        ttl: Duration,
    ) -> Result<u64> {
        self.durable()?
            .send(
                client_id,
                service_path,
                service_method,
                metadata,
                data.as_ref(),
                ttl,
            )
            .await
    }

    /// The durable messages pending for `client_id`, oldest first (expired ones excluded).
    pub async fn durable_pending(&self, client_id: &str) -> Result<Vec<crate::PendingMessage>> {
        self.durable()?.pending(client_id).await
    }

    /// The `limit` identities with the most durable messages pending, most first (ties: most
    /// bytes, then by name), from the counts the store keeps in memory: no disk read. With
    /// [`Stats::durable_pending_identities`](crate::Stats::durable_pending_identities), what an
    /// operator looks at to find the devices that stay away (`quicx durable ADDR`).
    ///
    /// Returns at once: empty when nothing is pending, [`Error::Config`] if the server has no
    /// [`durable_store`](ServerBuilder::durable_store). Counts may trail a commit that is
    /// running (they change with it).
    pub fn durable_backlog(&self, limit: usize) -> Result<Vec<crate::DurableBacklog>> {
        Ok(self.durable()?.store.largest_backlogs(limit))
    }

    /// Cancels a pending durable message; whether it was still pending. A message a delivery
    /// run has already read (it reads a batch ahead of the one it writes) may still arrive.
    pub async fn cancel_durable(&self, client_id: &str, id: u64) -> Result<bool> {
        self.durable()?.cancel(client_id, id).await
    }

    fn durable(&self) -> Result<&Arc<crate::durable::Durable>> {
        self.inner.side.durable().ok_or_else(|| {
            Error::Config("this server has no durable store (ServerBuilder::durable_store)".into())
        })
    }

    /// Pushes one message to every connected client. See [`broadcast_to`](Self::broadcast_to).
    pub async fn broadcast(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Vec<PushResult>> {
        self.broadcast_to(
            self.connections(),
            service_path,
            service_method,
            metadata,
            data,
            timeout,
        )
        .await
    }

    /// Pushes one message to each of `conns`, concurrently, each within `timeout`, and returns one
    /// result per client in the order given. A slow or dead client fails with its own error
    /// ([`Error::PushTimeout`], [`Error::ConnectionLost`]) and never holds up the others: the whole
    /// broadcast takes at most about `timeout`.
    ///
    /// The frame is encoded once; an encoding error (too large) is returned before anything is
    /// sent.
    pub async fn broadcast_to(
        &self,
        conns: impl IntoIterator<Item = Connection>,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Vec<PushResult>> {
        let conns: Vec<Connection> = conns.into_iter().collect();
        let Some(first) = conns.first() else {
            return Ok(Vec::new());
        };
        let frame = first.push_frame(service_path, service_method, metadata, data.as_ref())?;
        // One task per I/O thread queues the pushes of the connections it drives; only the
        // waits (credit, timeouts) run concurrently.
        let mut by_thread: Vec<(IoRuntime, Vec<usize>)> = Vec::new();
        for (i, conn) in conns.iter().enumerate() {
            match by_thread
                .iter_mut()
                .find(|(io, _)| io.id() == conn.io().id())
            {
                Some((_, members)) => members.push(i),
                None => by_thread.push((conn.io().clone(), vec![i])),
            }
        }
        let batches = by_thread.into_iter().map(|(io, members)| {
            let targets: Vec<Connection> = members.iter().map(|&i| conns[i].clone()).collect();
            let frame = frame.clone();
            async move {
                let results = io
                    .run(async move {
                        join_all(
                            targets
                                .iter()
                                .map(|conn| conn.push_here(frame.clone(), timeout)),
                        )
                        .await
                    })
                    .await;
                (members, results)
            }
        });
        let mut results: Vec<Option<Result<()>>> = conns.iter().map(|_| None).collect();
        for (members, outcome) in join_all(batches).await {
            match outcome {
                Ok(each) => {
                    for (i, result) in members.into_iter().zip(each) {
                        results[i] = Some(result);
                    }
                }
                Err(e) => {
                    // The I/O thread stopped (shutdown): each push's connection was closed.
                    for i in members {
                        results[i] = Some(Err(match &e {
                            Error::ConnectionLost(c) => Error::ConnectionLost(c.clone()),
                            other => Error::Internal(other.to_string()),
                        }));
                    }
                }
            }
        }
        Ok(conns
            .into_iter()
            .zip(results)
            .map(|(conn, result)| PushResult {
                conn,
                result: result.unwrap_or_else(|| Err(Error::Internal("push not run".into()))),
            })
            .collect())
    }

    /// Shuts down gracefully.
    ///
    /// # What happens
    /// 1. New connections are refused and new calls on open connections are refused with
    ///    [`Error::ShuttingDown`] on the caller's side;
    /// 2. calls in flight may finish for up to `drain`;
    /// 3. handlers still running are cancelled (callers get [`Error::ShuttingDown`]), every
    ///    connection is closed with close code `SHUTDOWN`, the endpoint is closed (waiting up to
    ///    2 s for the peers to be told), the I/O thread stops, and [`serve`](Self::serve) returns.
    ///
    /// Returns `true` if every in-flight call finished within `drain`.
    ///
    /// # Cancel safety
    /// The shutdown runs in a task of its own: dropping this future does not stop it half-way
    /// (the server still ends up fully shut down). Calling `shutdown` again, or from several
    /// tasks, waits for the same shutdown; a later `drain` is ignored.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        let mut done = {
            let mut started = self.inner.shutdown.locked();
            match started.as_ref() {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *started = Some(rx.clone());
                    let server = self.clone();
                    tokio::spawn(async move {
                        let drained = server.shut_down(drain).await;
                        let _ = tx.send(Some(drained));
                    });
                    rx
                }
            }
        };
        match done.wait_for(Option::is_some).await {
            Ok(drained) => drained.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// The steps of [`shutdown`](Self::shutdown), run once, in their own task.
    async fn shut_down(&self, drain: Duration) -> bool {
        let side = &self.inner.side;
        side.shutting_down.store(true, Ordering::Release);
        self.inner.stop_accepting.cancel();
        side.tracker.close();
        let drained = tokio::time::timeout(drain, side.tracker.wait())
            .await
            .is_ok();
        side.shutdown.cancel();
        for conn in self.connections() {
            conn.close_with(CloseCode::SHUTDOWN, b"server shutdown");
        }
        let endpoints = self.inner.endpoints.locked().clone();
        for endpoint in &endpoints {
            endpoint.close(CloseCode::SHUTDOWN.into(), b"server shutdown");
        }
        let idle = join_all(endpoints.iter().map(quinn::Endpoint::wait_idle));
        let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
        // The closed connections leave the registry on their I/O threads (still running):
        // their `Disconnected` events go out before the events end.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.registry.emptied()).await;
        self.inner.registry.end_events();
        if let Some(durable) = side.durable() {
            // Release the store file now, not when the last handle to the server goes.
            durable.close().await;
        }
        self.inner.stopped.cancel();
        for io in &self.inner.io {
            io.stop();
        }
        drained
    }
}

/// A handle that does not keep the server alive ([`Server::downgrade`]). Services registered on
/// the server that need the server itself (the admin service, a cluster's routing service) hold
/// one, so server → services → handler → server is no reference cycle.
#[derive(Clone)]
pub struct WeakServer(std::sync::Weak<ServerInner>);

impl fmt::Debug for WeakServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakServer")
    }
}

impl WeakServer {
    /// The server, unless every [`Server`] handle to it is gone (then `None`).
    pub fn upgrade(&self) -> Option<Server> {
        self.0.upgrade().map(|inner| Server { inner })
    }
}

impl Server {
    /// A handle that does not keep this server alive.
    pub fn downgrade(&self) -> WeakServer {
        WeakServer(Arc::downgrade(&self.inner))
    }
}

/// Which I/O thread an accept loop runs on, and whether it may move new connections to others.
#[derive(Debug, Clone, Copy)]
struct AcceptOn {
    thread: usize,
    rebalance: bool,
}

/// How many connections each I/O thread holds, and how many were sent a Retry towards it and
/// have not come back yet (so that the new connections of one round trip do not all move to
/// the same thread). Each move counts until its client comes back or for [`MOVE_WINDOW`] (a
/// client that gave up, a spoofed address), at most [`MOVES_KEPT`] per thread.
struct ThreadLoads {
    /// Connections admitted and not yet closed, handshakes included.
    admitted: Box<[AtomicUsize]>,
    /// When each Retry sent towards the thread whose client has not come back went out, oldest
    /// first.
    moving: Box<[Mutex<std::collections::VecDeque<std::time::Instant>>]>,
}

/// How long a Retry counts towards its thread's load without its client coming back.
const MOVE_WINDOW: Duration = Duration::from_secs(2);

/// The most moves counted per thread (a flood of Initials from spoofed addresses each gets a
/// Retry; the oldest then stop counting first).
const MOVES_KEPT: usize = 4096;

impl ThreadLoads {
    fn new(threads: usize) -> Self {
        Self {
            admitted: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
            moving: (0..threads).map(|_| Mutex::default()).collect(),
        }
    }

    /// `thread`'s connections and moves towards it that still count at `now`.
    fn load(&self, thread: usize, now: std::time::Instant) -> usize {
        let mut moving = self.moving[thread].locked();
        while moving
            .front()
            .is_some_and(|&sent| now >= sent + MOVE_WINDOW)
        {
            moving.pop_front();
        }
        self.admitted[thread].load(Ordering::Acquire) + moving.len()
    }

    /// The I/O thread a new connection that reached thread `own` should move to, if any: the
    /// one with the fewest connections, moving ones included (the first of equals), when `own`
    /// has more than it plus a sixteenth of it. Exact balance while threads hold few
    /// connections (4 connections of 100 µs handlers placed 3 and 1 on 2 threads ran at 0.6× of
    /// 2 and 2); with many, the slack keeps the random spread of new connections (by the ids
    /// their clients chose) from costing a Retry (a round trip) each. Counts connections, not
    /// their work: it cannot know which connection will be busy.
    fn least_loaded(&self, own: usize) -> Option<usize> {
        let now = std::time::Instant::now();
        let loads: Vec<usize> = (0..self.admitted.len())
            .map(|i| self.load(i, now))
            .collect();
        let (least, &min) = loads.iter().enumerate().min_by_key(|&(_, l)| *l)?;
        (least != own && loads[own] > min + min / 16).then_some(least)
    }

    /// A Retry is being sent towards `thread`.
    fn moving_to(&self, thread: usize) {
        let mut moving = self.moving[thread].locked();
        if moving.len() == MOVES_KEPT {
            moving.pop_front();
        }
        moving.push_back(std::time::Instant::now());
    }

    /// A Retried client came back to `thread` (admitted or refused, it no longer moves), or its
    /// Retry could not be sent: the oldest move towards it stops counting.
    fn arrived(&self, thread: usize) {
        self.moving[thread].locked().pop_front();
    }
}

/// A connection's place under the connection limits, given back when dropped.
struct Admitted {
    server: Server,
    ip: std::net::IpAddr,
    /// The I/O thread it counts on (`ThreadLoads::admitted`).
    thread: usize,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.server.inner.admitted.fetch_sub(1, Ordering::AcqRel);
        self.server.inner.thread_loads.admitted[self.thread].fetch_sub(1, Ordering::AcqRel);
        self.server.inner.limiters.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::ThreadLoads;
    use std::sync::atomic::Ordering;

    fn loads(counts: &[usize]) -> ThreadLoads {
        let loads = ThreadLoads::new(counts.len());
        for (slot, &n) in loads.admitted.iter().zip(counts) {
            slot.store(n, Ordering::Relaxed);
        }
        loads
    }

    fn at(counts: &[usize], own: usize) -> Option<usize> {
        loads(counts).least_loaded(own)
    }

    #[test]
    fn a_new_connection_moves_to_the_thread_with_the_fewest_beyond_a_sixteenth() {
        // Few connections: exact balance.
        assert_eq!(at(&[0, 0], 0), None);
        assert_eq!(at(&[1, 0], 0), Some(1));
        assert_eq!(at(&[1, 1], 1), None);
        assert_eq!(at(&[2, 1, 1, 2], 3), Some(1));
        assert_eq!(at(&[2, 1, 1, 2], 2), None);
        assert_eq!(at(&[15, 14], 0), Some(1));
        // Many: within a sixteenth of the least, a new connection stays.
        assert_eq!(at(&[1_000, 950], 0), None);
        assert_eq!(at(&[1_000, 941], 0), Some(1));
        assert_eq!(at(&[1_000, 990, 900], 0), Some(2));
        assert_eq!(at(&[5_000, 4_750], 0), None);
        assert_eq!(at(&[5_300, 4_700], 0), Some(1));
        // One thread: nowhere to go.
        assert_eq!(at(&[7], 0), None);
    }

    /// Connections of one round trip do not all move to one thread: those on their way count.
    #[test]
    fn connections_moving_to_a_thread_count_until_they_arrive() {
        let l = loads(&[1, 0]);
        assert_eq!(l.least_loaded(0), Some(1));
        l.moving_to(1);
        // 1 and 1 (moving): the next one stays.
        assert_eq!(l.least_loaded(0), None);
        l.admitted[0].store(2, Ordering::Relaxed);
        assert_eq!(l.least_loaded(0), Some(1));
        l.moving_to(1);
        assert_eq!(l.least_loaded(0), None);
        // They arrive and are admitted there: counted once.
        l.admitted[1].store(2, Ordering::Relaxed);
        l.arrived(1);
        l.arrived(1);
        l.arrived(1); // one too many takes nothing
        let now = std::time::Instant::now();
        assert_eq!(l.load(1, now), 2);
        // Each move whose client never comes back stops counting after the window, on its own
        // (a later move does not keep an earlier one alive).
        l.moving_to(0);
        assert_eq!(l.load(0, now), 3);
        l.moving_to(0);
        let later = now + super::MOVE_WINDOW;
        assert_eq!(l.load(0, std::time::Instant::now()), 4);
        assert_eq!(l.load(0, later + std::time::Duration::from_secs(1)), 2);
    }
}
