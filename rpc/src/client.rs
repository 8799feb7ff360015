//! A client of one server: calls, pushes received, services the server can call back, and
//! automatic reconnection.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    CallOptions, ClientEvent, ClientTls, Connection, DisconnectReason, Error, Metadata, PushSender,
    RawReply, Result, Service, Stats, TransportOptions, config,
    connection::{
        self,
        side::{Hooks, Role, Side, SideTimeouts},
    },
    error::NotConnected,
    io::{IoRuntime, Placement},
    service::Services,
    wire::CloseCode,
};

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    tls: ClientTls,
    server_name: Option<String>,
    transport: TransportOptions,
    call_timeout: Option<Duration>,
    connect_timeout: Duration,
    push: Option<PushSender>,
    services: Services,
    client_id: Option<String>,
    hello_metadata: Metadata,
    reconnect: bool,
    max_backoff: Duration,
    events: broadcast::Sender<ClientEvent>,
    endpoint: Option<ClientEndpoint>,
    placement: Placement,
    hooks: Hooks,
    manual_ack: bool,
}

/// A client-side UDP socket that many clients can share: a fleet simulator or a gateway with
/// thousands of connections needs one socket, not thousands.
///
/// ```
/// # #[tokio::main] async fn main() -> quicx::Result<()> {
/// let shared = quicx::ClientEndpoint::bind("127.0.0.1:0".parse().unwrap())?;
/// let builder = quicx::Client::builder().endpoint(&shared);
/// # let _ = builder; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    /// The sockets, each with the thread that drives it: one, or one per client I/O thread.
    sockets: Arc<[(IoRuntime, quinn::Endpoint)]>,
    /// Turns for clients that run on no socket's thread.
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl ClientEndpoint {
    /// Binds the shared socket(s) on `addr` with 4 MiB socket buffers. Must run inside a tokio
    /// runtime.
    ///
    /// - On a current_thread runtime: one socket, driven on it.
    /// - On a multi-thread runtime with port 0 (any): one socket per client I/O thread of the
    ///   process (one per core), each on its own ephemeral port and driven by its thread; the
    ///   clients beyond the first 64 (see [`Placement::Auto`]) are spread over the threads in
    ///   turn and connect through their thread's socket, so a connection's packets are read,
    ///   decrypted and handled on one thread. A broadcast to a fleet of 10,000 such clients took
    ///   326-380 ms against 369-416 ms through one socket (2 cores, `BENCHMARKS.md`).
    /// - With a fixed port: one socket, driven by one client I/O thread.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let threads = if addr.port() == 0 {
            IoRuntime::for_shared_endpoints()?
        } else {
            vec![IoRuntime::for_shared_endpoint()?]
        };
        let buffer = TransportOptions::default().socket_buffer_size;
        let sockets = threads
            .into_iter()
            .map(|io| {
                let endpoint = {
                    let _io = io.enter();
                    config::endpoint(addr, buffer)?
                };
                Ok((io, endpoint))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            sockets: sockets.into(),
            next: Arc::default(),
        })
    }

    /// The local address (of the first socket when there is one per thread).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sockets[0].1.local_addr()?)
    }

    /// The local addresses of every socket.
    pub fn local_addrs(&self) -> Result<Vec<SocketAddr>> {
        self.sockets
            .iter()
            .map(|(_, endpoint)| Ok(endpoint.local_addr()?))
            .collect()
    }

    /// The socket for a connection driven by `driver`: the one its thread drives, else the
    /// sockets in turn.
    fn socket_for(&self, driver: &IoRuntime) -> quinn::Endpoint {
        if let Some((_, endpoint)) = self
            .sockets
            .iter()
            .find(|(io, _)| io.id() != 0 && io.id() == driver.id())
        {
            return endpoint.clone();
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % self.sockets.len();
        self.sockets[turn].1.clone()
    }
}

impl ClientBuilder {
    /// Where the connection is driven (default [`Placement::Auto`]).
    #[must_use]
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// Connects through a shared [`ClientEndpoint`] instead of a socket of its own.
    #[must_use]
    pub fn endpoint(mut self, endpoint: &ClientEndpoint) -> Self {
        self.endpoint = Some(endpoint.clone());
        self
    }

    /// TLS settings (default: [`ClientTls::new`], the Mozilla root set).
    #[must_use]
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = tls;
        self
    }

    /// The name the server certificate must carry (default: the host part of the address given
    /// to [`connect`](Self::connect)).
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// All transport settings at once.
    #[must_use]
    pub fn transport(mut self, transport: TransportOptions) -> Self {
        self.transport = transport;
        self
    }

    /// Default timeout of every call (default 30 s; `None` waits forever).
    #[must_use]
    pub fn call_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 5 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Makes this a bidirectional client: pushed messages go to `sender` (a channel from
    /// [`push_channel`](crate::push_channel), or a function from
    /// [`push_handler`](crate::push_handler)). Pushes that arrive before the first call are
    /// delivered too.
    #[must_use]
    pub fn push_channel(mut self, sender: PushSender) -> Self {
        self.push = Some(sender);
        self
    }

    /// Registers a service the server can call on this client (a reverse call).
    #[must_use]
    pub fn register(self, service_path: impl Into<String>, service: Service) -> Self {
        self.services.register(service_path, service);
        self
    }

    /// Adds an interceptor around every call this client makes (see
    /// [`CallInterceptor`](crate::CallInterceptor)); they run in the order added, after the
    /// built-in metrics.
    #[must_use]
    pub fn call_interceptor(mut self, interceptor: impl crate::CallInterceptor) -> Self {
        self.hooks.call_interceptors.push(Arc::new(interceptor));
        self
    }

    /// Adds an interceptor around every reverse call this client serves (see
    /// [`Interceptor`](crate::Interceptor); its connection hooks do not run on clients).
    #[must_use]
    pub fn interceptor(mut self, interceptor: impl crate::Interceptor) -> Self {
        self.hooks.interceptors.push(Arc::new(interceptor));
        self
    }

    /// Durable messages ([`Server::send_durable`](crate::Server::send_durable)) are acknowledged
    /// by the application with [`PushMessage::ack`](crate::PushMessage::ack) once it processed
    /// them, not when they enter the push channel (the default). A device that crashes before
    /// acking gets the message again when it reconnects. The next durable message is delivered
    /// only once the one before it was acknowledged (in order, one at a time); a message dropped
    /// without an ack comes again, after about a second, before any later one.
    #[must_use]
    pub fn manual_ack(mut self, enabled: bool) -> Self {
        self.manual_ack = enabled;
        self
    }

    /// Whether this client records [metrics](crate::metrics) (default on).
    #[must_use]
    pub fn metrics(mut self, enabled: bool) -> Self {
        self.hooks.metrics = enabled;
        self
    }

    /// Starts a new W3C trace for each call made outside a trace scope, so every call carries a
    /// `traceparent` (default off: calls carry one only inside
    /// [`trace::scope`](crate::trace::scope) or a traced handler). See [`trace`](crate::trace).
    #[must_use]
    pub fn trace_calls(mut self, enabled: bool) -> Self {
        self.hooks.trace_calls = enabled;
        self
    }

    /// Declares this client's identity (a device id) when connecting, and again after every
    /// reconnect: the server's registry then finds this client by it.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The token this client presents with its hello (and again on every reconnect), for the
    /// server's [`Authenticator`](crate::Authenticator) to verify its client id. Sent as hello
    /// metadata [`TOKEN_METADATA_KEY`](crate::TOKEN_METADATA_KEY), inside TLS.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.hello_metadata
            .insert(crate::TOKEN_METADATA_KEY, token.into());
        self
    }

    /// Metadata sent with the hello (only sent when a client id is set or metadata is given).
    #[must_use]
    pub fn hello_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.hello_metadata.insert(key, value);
        self
    }

    /// Whether to reconnect after the connection is lost (default `true`), with exponential
    /// backoff from 50 ms up to `max_backoff` (default 2 s). A client whose identity another
    /// verified connection took over (close code `TAKEN_OVER`) never reconnects: it has been
    /// replaced.
    #[must_use]
    pub fn reconnect(mut self, enabled: bool) -> Self {
        self.reconnect = enabled;
        self
    }

    /// The longest wait between reconnect attempts.
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// Subscribes to connection events. Subscribe before [`connect`](Self::connect) to see the
    /// first `Connected`.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Connects to `addr` (`"host:port"` or a socket address) and returns when the connection is
    /// up and, if an identity was set, the server has bound it.
    ///
    /// # Errors
    /// [`Error::Handshake`] if the server is not trusted, does not speak `quicx/1` or refuses;
    /// [`Error::ConnectTimeout`] if nothing answered within the connect timeout;
    /// [`Error::HelloRefused`] if the server refused the declared identity.
    pub async fn connect(self, addr: &str) -> Result<Client> {
        let resolved = tokio::net::lookup_host(addr)
            .await?
            .next()
            .ok_or_else(|| Error::Config(format!("`{addr}` resolved to nothing")))?;
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        self.connect_addr(resolved, &server_name).await
    }

    /// Connects to a socket address, checking the certificate against `server_name`.
    pub async fn connect_addr(self, addr: SocketAddr, server_name: &str) -> Result<Client> {
        let mut client_config = quinn::ClientConfig::new(Arc::new(self.tls.quinn_config()?));
        client_config.transport_config(self.transport.quinn_transport(true)?);
        let driver = IoRuntime::for_client(self.placement)?;
        let (endpoint, owns_endpoint) = match self.endpoint {
            Some(shared) => (shared.socket_for(&driver), false),
            None => {
                let _io = driver.enter();
                (
                    client_endpoint(addr, self.transport.socket_buffer_size)?,
                    true,
                )
            }
        };
        let side = Arc::new(Side::new(
            Role::Client {
                push_sink: self.push,
                inbox: Arc::default(),
                manual_ack: self.manual_ack,
            },
            self.services,
            &self.transport,
            SideTimeouts {
                push: Duration::from_secs(10),
                call: self.call_timeout,
            },
            Vec::new(),
            self.hooks,
        ));
        let session = Session {
            client_id: self.client_id,
            hello_metadata: self.hello_metadata,
            reconnect: self.reconnect,
            max_backoff: self.max_backoff,
            connect_timeout: self.connect_timeout,
        };
        let connect_timeout = session.connect_timeout;
        Client::start(
            Link {
                endpoint,
                owns_endpoint,
                client_config,
                driver,
            },
            side,
            session,
            self.events,
            (addr, server_name),
            connect_timeout,
        )
        .await
    }
}

/// A client-side QUIC endpoint on an ephemeral port of `addr`'s family.
pub(crate) fn client_endpoint(addr: SocketAddr, buffer: usize) -> Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    config::endpoint(bind, buffer)
}

/// The QUIC endpoint a client connects through, and with which configuration.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub(crate) endpoint: quinn::Endpoint,
    /// Whether the endpoint is this client's alone (an XClient shares one among its clients).
    pub(crate) owns_endpoint: bool,
    pub(crate) client_config: quinn::ClientConfig,
    /// Where connections are established and driven.
    pub(crate) driver: IoRuntime,
}

/// How a client behaves on its connection: identity, reconnects, timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) client_id: Option<String>,
    pub(crate) hello_metadata: Metadata,
    pub(crate) reconnect: bool,
    pub(crate) max_backoff: Duration,
    pub(crate) connect_timeout: Duration,
}

/// A client of one server (rpcx's `client.Client`), over one QUIC connection that carries any
/// number of concurrent calls.
///
/// ```no_run
/// # async fn run(cert: rustls::pki_types::CertificateDer<'static>) -> quicx::Result<()> {
/// let client = quicx::Client::builder()
///     .tls(quicx::ClientTls::new().trust(cert))
///     .connect("localhost:8972")
///     .await?;
/// let product: i64 = client.call("Arith", "Mul", &(10i64, 20i64)).await?;
/// assert_eq!(product, 200);
/// # Ok(())
/// # }
/// ```
///
/// After the connection is lost the client reconnects in the background (see
/// [`ClientBuilder::reconnect`]); calls made meanwhile wait for the new connection up to the
/// connect timeout.
///
/// Dropping the last clone closes the connection (as [`close`](Self::close) does, without
/// waiting).
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
    _last_handle: Arc<CloseOnDrop>,
}

/// Closes the client when the last user handle goes; the supervisor holds only `ClientInner`.
struct CloseOnDrop(Arc<ClientInner>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.closed.cancel();
        close_for_good(&self.0, b"client dropped");
    }
}

struct ClientInner {
    link: Link,
    server_addr: SocketAddr,
    server_name: String,
    side: Arc<Side>,
    current: watch::Sender<Option<Connection>>,
    events: broadcast::Sender<ClientEvent>,
    closed: CancellationToken,
    session: Session,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.server_addr)
            .field("connected", &self.inner.current.borrow().is_some())
            .finish()
    }
}

impl ClientInner {
    /// Opens a connection, starts serving what the server opens on it, and says hello, all
    /// within `timeout` ([`Error::ConnectTimeout`] past it).
    async fn establish(&self, timeout: Duration) -> Result<Connection> {
        let result = self.establish_within(timeout).await;
        let side = &self.side;
        side.record(crate::metrics::Event::ClientHandshake(if result.is_ok() {
            "ok"
        } else {
            "failed"
        }));
        if result.is_ok() {
            side.record(crate::metrics::Event::ClientConnected);
        }
        result
    }

    /// [`establish`](Self::establish) without the metrics.
    async fn establish_within(&self, timeout: Duration) -> Result<Connection> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connecting = self.link.endpoint.connect_with(
            self.link.client_config.clone(),
            self.server_addr,
            &self.server_name,
        )?;
        let quic = tokio::time::timeout_at(deadline, connecting)
            .await
            .map_err(|_| Error::ConnectTimeout(timeout))??;
        // Calls and pushes run on the caller's runtime: the task that awaits a call drives its
        // stream (no hand-over per call).
        let conn = Connection::new(
            quic,
            self.side.clone(),
            self.server_addr,
            IoRuntime::caller(),
        );
        self.side
            .counters
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection::serve(conn.clone()));
        // Closed unless handed out: a connect dropped during its hello (a caller's own
        // timeout, a client closed while it reconnects) must not leave a connection that the
        // serving task and keep-alives would hold open for ever (the server may have bound
        // the identity to it already).
        let mut unkept = CloseUnlessKept(Some(conn.clone()));
        let session = &self.session;
        if session.client_id.is_some() || !session.hello_metadata.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let said = connection::hello(
                &conn,
                session.client_id.clone(),
                session.hello_metadata.clone(),
                left,
            )
            .await
            .map_err(|e| match e {
                Error::DeadlineExceeded { remote: false } => Error::ConnectTimeout(timeout),
                other => other,
            });
            said?;
        }
        unkept.0 = None;
        Ok(conn)
    }
}

/// Closes a connection being established unless it was kept (`.0` taken out).
struct CloseUnlessKept(Option<Connection>);

impl Drop for CloseUnlessKept {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            conn.close();
        }
    }
}

/// The client was closed (or its last handle dropped): closes the connection it still shows,
/// if `close` (or the drop) did not take it first (a reconnect that ended just after). The
/// supervisor's connection is always the one shown until then.
fn close_for_good(inner: &ClientInner, reason: &[u8]) {
    if let Some(current) = inner.current.send_replace(None) {
        current.close_with(CloseCode::NORMAL, reason);
    }
}

async fn supervise(inner: Arc<ClientInner>, mut conn: Connection) {
    loop {
        let closed = tokio::select! {
            // A client closed by `close` also sees its connection closed: one `Disconnected`
            // event, the one `close` sends.
            biased;
            () = inner.closed.cancelled() => {
                // `close` (or the last handle's drop) took and closed what it found; what is
                // still shown (set just after) is closed here.
                close_for_good(&inner, b"client closed");
                inner.side.record(crate::metrics::Event::ClientDisconnected);
                return;
            }
            e = conn.quic().closed() => e,
        };
        inner.current.send_replace(None);
        inner.side.record(crate::metrics::Event::ClientDisconnected);
        let reason = DisconnectReason::from_quinn(&closed);
        tracing::debug!(?reason, "connection lost");
        // Another connection verified for this identity (a newer instance of this device) took
        // it over: reconnecting would take it back, and the two would take turns for ever.
        let taken_over = matches!(
            &reason,
            DisconnectReason::ClosedByPeer { code, .. } if *code == CloseCode::TAKEN_OVER.value()
        );
        let _ = inner.events.send(ClientEvent::Disconnected {
            server: inner.server_addr,
            reason,
        });
        if taken_over {
            tracing::info!("identity taken over by another connection: not reconnecting");
            inner.closed.cancel();
            return;
        }
        if !inner.session.reconnect || inner.closed.is_cancelled() {
            return;
        }
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0u32;
        conn = loop {
            attempts += 1;
            let attempt = tokio::select! {
                r = inner.establish(inner.session.connect_timeout) => r,
                () = inner.closed.cancelled() => return,
            };
            match attempt {
                Ok(c) => break c,
                Err(e) => {
                    tracing::debug!(attempts, "reconnect failed: {e}");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = inner.closed.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(inner.session.max_backoff);
                }
            }
        };
        inner.current.send_replace(Some(conn.clone()));
        if inner.closed.is_cancelled() {
            // Closed while the reconnect ended: `close` may have found no connection to close.
            close_for_good(&inner, b"client closed");
            inner.side.record(crate::metrics::Event::ClientDisconnected);
            return;
        }
        let _ = inner.events.send(ClientEvent::Reconnected {
            server: inner.server_addr,
            attempts,
        });
    }
}

impl Client {
    /// Opens the first connection within `connect_timeout` and starts the supervisor that
    /// reconnects.
    pub(crate) async fn start(
        link: Link,
        side: Arc<Side>,
        session: Session,
        events: broadcast::Sender<ClientEvent>,
        (addr, server_name): (SocketAddr, &str),
        connect_timeout: Duration,
    ) -> Result<Self> {
        let inner = Arc::new(ClientInner {
            link,
            server_addr: addr,
            server_name: server_name.to_owned(),
            side,
            current: watch::channel(None).0,
            events,
            closed: CancellationToken::new(),
            session,
        });
        let io = inner.link.driver.clone();
        let starting = inner.clone();
        // Made before the first connection: a caller that stops waiting for `connect` (or an
        // error) drops it, which stops the supervisor and closes what it holds.
        let last_handle = Arc::new(CloseOnDrop(inner.clone()));
        io.run(async move {
            let conn = starting.establish(connect_timeout).await?;
            starting.current.send_replace(Some(conn.clone()));
            let _ = starting
                .events
                .send(ClientEvent::Connected { server: addr });
            tokio::spawn(
                supervise(starting, conn)
                    .instrument(tracing::debug_span!("client", server = %addr)),
            );
            Ok::<_, Error>(())
        })
        .await??;
        Ok(Self {
            _last_handle: last_handle,
            inner,
        })
    }

    /// A builder with default settings.
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            tls: ClientTls::new(),
            server_name: None,
            transport: TransportOptions::default(),
            call_timeout: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(5),
            push: None,
            services: Services::default(),
            client_id: None,
            hello_metadata: Metadata::new(),
            reconnect: true,
            max_backoff: Duration::from_secs(2),
            events: broadcast::channel(256).0,
            endpoint: None,
            placement: Placement::Auto,
            hooks: Hooks::default(),
            manual_ack: false,
        }
    }

    /// The current connection; waits for a reconnect in progress up to the connect timeout.
    pub async fn connection(&self) -> Result<Connection> {
        if let Some(conn) = self.live_connection() {
            return Ok(conn);
        }
        if self.inner.closed.is_cancelled() {
            return Err(Error::NotConnected(NotConnected::Closed));
        }
        if !self.inner.session.reconnect {
            return Err(Error::NotConnected(NotConnected::ReconnectOff));
        }
        let mut rx = self.inner.current.subscribe();
        let wait = rx.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed()));
        match tokio::time::timeout(self.inner.session.connect_timeout, wait).await {
            Ok(Ok(conn)) => Ok(conn.clone().expect("checked by wait_for")),
            _ => Err(Error::NotConnected(NotConnected::Reconnecting(
                self.inner.server_addr,
            ))),
        }
    }

    /// Calls `service_path.service_method` with postcard-encoded `args` (rpcx's `Call`).
    /// See [`Connection::call`] for the contract.
    pub async fn call<A, R>(&self, service_path: &str, service_method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let conn = self.connection().await?;
        conn.call(service_path, service_method, args).await
    }

    /// A call with metadata, timeout and codec.
    pub async fn call_with<A, R>(
        &self,
        service_path: &str,
        service_method: &str,
        args: &A,
        options: &CallOptions,
    ) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let conn = self.connection().await?;
        conn.call_with(service_path, service_method, args, options)
            .await
    }

    /// A oneway call: returns once the request is handed to QUIC; no reply comes back. See
    /// [`Connection::oneway`]: a oneway call followed at once by [`close`](Self::close) may be
    /// lost.
    pub async fn oneway<A: Serialize + ?Sized>(
        &self,
        service_path: &str,
        service_method: &str,
        args: &A,
    ) -> Result<()> {
        let conn = self.connection().await?;
        conn.oneway(service_path, service_method, args).await
    }

    /// A call with raw payload bytes.
    pub async fn call_raw(
        &self,
        service_path: &str,
        service_method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        let conn = self.connection().await?;
        conn.call_raw(service_path, service_method, payload, options)
            .await
    }

    /// The server's address.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.server_addr
    }

    /// This client's declared identity.
    pub fn client_id(&self) -> Option<&str> {
        self.inner.session.client_id.as_deref()
    }

    /// Subscribes to connection events from now on.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner.events.subscribe()
    }

    /// Counters of this client.
    pub fn stats(&self) -> Stats {
        let open = u64::from(self.is_connected());
        self.inner.side.counters.snapshot(open)
    }

    /// Whether the client has a live connection right now.
    pub fn is_connected(&self) -> bool {
        self.live_connection().is_some_and(|c| !c.is_closed())
    }

    /// The current connection if it is up, without waiting.
    ///
    /// Lock-free on the call path: the supervisor clears the current connection as soon as it
    /// closes (a call that races it fails at once with [`Error::ConnectionLost`]), so there is
    /// no need to take quinn's connection lock on every call to ask.
    pub(crate) fn live_connection(&self) -> Option<Connection> {
        self.inner.current.borrow().clone()
    }

    /// Closes the connection with close code `NORMAL` and stops reconnecting. Calls in flight
    /// fail with [`Error::ConnectionLost`].
    ///
    /// # When it returns
    /// Once the close was sent to the server (up to 1 s), whether the client owns its socket or
    /// shares a [`ClientEndpoint`]: a process may exit right after and the server still sees
    /// the disconnect at once. At once when there is no connection (the client was
    /// reconnecting: its server is gone or unreachable). Dropping the last handle instead closes without waiting, so a
    /// process that exits at once may leave the server waiting for its idle timeout.
    pub async fn close(&self) {
        // Taken before the supervisor hears of the close (it would take it otherwise, and this
        // would neither flush its CONNECTION_CLOSE nor report it).
        let conn = self.inner.current.send_replace(None);
        self.inner.closed.cancel();
        // Closed for good: a place on the caller's runtime goes to the next client.
        self.inner.link.driver.give_back_place();
        if let Some(conn) = &conn {
            if self.inner.link.owns_endpoint {
                conn.close_with(CloseCode::NORMAL, b"client closed");
            } else {
                conn.close_and_flush(CloseCode::NORMAL, b"client closed", Duration::from_secs(1))
                    .await;
            }
            let _ = self.inner.events.send(ClientEvent::Disconnected {
                server: self.inner.server_addr,
                reason: DisconnectReason::ClosedLocally,
            });
        }
        // Wait until the CONNECTION_CLOSE left our own endpoint. Without a connection (the
        // client was reconnecting to a server that is gone) there is nothing to deliver: a
        // handshake in progress would hold `wait_idle` for its whole drain (about 1 s).
        if self.inner.link.owns_endpoint && conn.is_some() {
            let idle = self.inner.link.endpoint.wait_idle();
            let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client driven by a client I/O thread gets that thread's socket, every time; a client
    /// on no socket's thread gets the sockets in turn.
    #[test]
    fn a_client_uses_its_own_threads_socket_and_others_take_turns() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let shared = ClientEndpoint::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            assert_eq!(shared.sockets.len(), crate::io::cores());
            let addr = |e: quinn::Endpoint| e.local_addr().unwrap();
            for (io, endpoint) in shared.sockets.iter() {
                assert_ne!(io.id(), 0, "driven by a client I/O thread");
                for _ in 0..3 {
                    assert_eq!(addr(shared.socket_for(io)), addr(endpoint.clone()));
                }
            }
            // A thread handed out for a client is one of them.
            let io = IoRuntime::shared_client().unwrap();
            let own = shared
                .sockets
                .iter()
                .find(|(i, _)| i.id() == io.id())
                .map(|(_, e)| addr(e.clone()))
                .expect("a socket on every client I/O thread");
            assert_eq!(addr(shared.socket_for(&io)), own);
            let caller = IoRuntime::caller();
            let turns: Vec<_> = (0..2 * shared.sockets.len())
                .map(|_| addr(shared.socket_for(&caller)))
                .collect();
            let expected: Vec<_> = shared
                .sockets
                .iter()
                .chain(shared.sockets.iter())
                .map(|(_, e)| addr(e.clone()))
                .collect();
            assert_eq!(turns, expected);
        });
    }
}
