//! The server: accepts connections, serves calls, keeps a registry of clients, pushes.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
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
        side::{Role, Side, SideTimeouts},
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
}

impl ServerBuilder {
    /// Where the endpoint, connections and handlers run (default [`Placement::Auto`]: a
    /// dedicated I/O thread).
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
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
        let registry = Arc::new(Registry::new(4096));
        let side = Arc::new(Side::new(
            Role::Server {
                registry: registry.clone(),
            },
            Services::default(),
            &self.transport,
            SideTimeouts {
                push: self.push_timeout,
                call: self.call_timeout,
            },
            IoRuntime::for_server(self.placement)?,
        ));
        Ok(Server {
            inner: Arc::new(ServerInner {
                side,
                registry,
                quinn_config,
                stable_keys,
                socket_buffer_size: self.transport.socket_buffer_size,
                max_connections: self.max_connections,
                admitted: std::sync::atomic::AtomicUsize::new(0),
                endpoint: Mutex::new(None),
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
    registry: Arc<Registry>,
    quinn_config: quinn::ServerConfig,
    /// Stable across restarts with the same key: see [`config::StableKeys`].
    stable_keys: config::StableKeys,
    socket_buffer_size: usize,
    max_connections: usize,
    /// Connections accepted and not yet closed, handshakes included.
    admitted: std::sync::atomic::AtomicUsize,
    endpoint: Mutex<Option<quinn::Endpoint>>,
    stop_accepting: CancellationToken,
    stopped: CancellationToken,
    /// The shutdown in progress, once one started: `Some(drained)` when it is complete.
    shutdown: Mutex<Option<watch::Receiver<Option<bool>>>>,
}

impl Drop for ServerInner {
    fn drop(&mut self) {
        // A server dropped without ever serving (or after shutdown) releases its I/O thread.
        self.side.io.stop();
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
        }
    }

    /// Registers a service under `service_path` (rpcx's `RegisterName`), replacing any service of
    /// that path. Takes effect for calls that arrive afterwards, also while serving.
    pub fn register(&self, service_path: impl Into<String>, service: Service) {
        self.inner.side.services.register(service_path, service);
    }

    /// Binds `addr` and starts accepting in the background; returns the bound address (useful
    /// with port 0). Call [`shutdown`](Self::shutdown) to stop.
    pub async fn bind(&self, addr: impl tokio::net::ToSocketAddrs) -> Result<SocketAddr> {
        let addr = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| Error::Config("the listen address resolved to nothing".into()))?;
        let io = self.inner.side.io.clone();
        let endpoint = {
            // The socket and the endpoint driver belong to the I/O thread.
            let _io = io.enter();
            config::endpoint(
                addr,
                self.inner.socket_buffer_size,
                Some((
                    self.inner.quinn_config.clone(),
                    self.inner.stable_keys.clone(),
                )),
            )?
        };
        let local = endpoint.local_addr()?;
        {
            let mut slot = self
                .inner
                .endpoint
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if slot.is_some() {
                return Err(Error::Config("the server is already listening".into()));
            }
            *slot = Some(endpoint.clone());
        }
        io.spawn(self.clone().accept_loop(endpoint, local));
        tracing::info!(%local, "quicx server listening");
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
            .endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|e| e.local_addr().ok())
    }

    async fn accept_loop(self, endpoint: quinn::Endpoint, local: SocketAddr) {
        loop {
            let incoming = tokio::select! {
                () = self.inner.stop_accepting.cancelled() => break,
                incoming = endpoint.accept() => incoming,
            };
            let Some(incoming) = incoming else { break };
            // Counts handshakes in progress too, so simultaneous connects cannot overshoot.
            if self.inner.admitted.load(Ordering::Acquire) >= self.inner.max_connections {
                tracing::warn!(
                    "connection limit reached: refusing {}",
                    incoming.remote_address()
                );
                incoming.refuse();
                continue;
            }
            self.inner.admitted.fetch_add(1, Ordering::AcqRel);
            let server = self.clone();
            tokio::spawn(async move {
                server.clone().handle_incoming(incoming, local).await;
                server.inner.admitted.fetch_sub(1, Ordering::AcqRel);
            });
        }
        // Shutting down: refuse whatever still arrives until the endpoint closes.
        while let Some(incoming) = endpoint.accept().await {
            incoming.refuse();
        }
    }

    async fn handle_incoming(self, incoming: quinn::Incoming, local: SocketAddr) {
        let remote = incoming.remote_address();
        let quic = match incoming.await {
            Ok(quic) => quic,
            Err(e) => {
                tracing::debug!(%remote, "handshake failed: {e}");
                return;
            }
        };
        let side = &self.inner.side;
        let conn = Connection::new(quic, side.clone(), local);
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
    /// events behind gets `RecvError::Lagged` with the number it missed.
    pub fn events(&self) -> broadcast::Receiver<ServerEvent> {
        self.inner.registry.events.subscribe()
    }

    /// Counters: calls served, pushes sent, connections.
    pub fn stats(&self) -> Stats {
        self.inner
            .side
            .counters
            .snapshot(self.inner.registry.len() as u64)
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
        // One task on the I/O thread queues every push; only the waits run concurrently.
        let io = first.io().clone();
        let targets = conns.clone();
        let results = io
            .run(async move {
                join_all(
                    targets
                        .iter()
                        .map(|conn| conn.push_here(frame.clone(), timeout)),
                )
                .await
            })
            .await?;
        Ok(conns
            .into_iter()
            .zip(results)
            .map(|(conn, result)| PushResult { conn, result })
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
            let mut started = self
                .inner
                .shutdown
                .lock()
                .unwrap_or_else(|p| p.into_inner());
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
        let endpoint = self
            .inner
            .endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(endpoint) = endpoint {
            endpoint.close(CloseCode::SHUTDOWN.into(), b"server shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        self.inner.stopped.cancel();
        side.io.stop();
        drained
    }
}
