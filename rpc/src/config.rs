//! Transport settings shared by servers and clients, and UDP socket setup.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use crate::{Error, Limits, Result};

/// QUIC transport settings, the one place for them: [`ServerBuilder::transport`],
/// [`ClientBuilder::transport`] and [`ClientOption::transport`] all take this. The defaults suit
/// both backend services and device fleets: a dead peer is noticed within `idle_timeout` (15 s),
/// or within 1.5 s while calls wait on it; keep-alives every 5 s hold NAT bindings open; up to
/// 1,024 concurrent calls per connection never queue behind the stream limit.
///
/// ```
/// use std::time::Duration;
/// let transport = quicx::TransportOptions::default()
///     .idle_timeout(Duration::from_secs(30))
///     .keep_alive_interval(Some(Duration::from_secs(10)));
/// let builder = quicx::Server::builder().transport(transport);
/// # let _ = builder;
/// ```
///
/// [`ServerBuilder::transport`]: crate::ServerBuilder::transport
/// [`ClientBuilder::transport`]: crate::ClientBuilder::transport
/// [`ClientOption::transport`]: crate::ClientOption::transport
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// Send a keep-alive when the connection was quiet this long. `None` disables keep-alives.
    pub keep_alive_interval: Option<Duration>,
    /// Close the connection when nothing was heard from the peer this long. The effective value is
    /// the smaller of both sides'.
    pub idle_timeout: Duration,
    /// Concurrent calls the peer may have open towards this side (bidirectional streams), at
    /// most. A connection starts at [`initial_concurrent_calls`](Self::initial_concurrent_calls)
    /// and is raised to this as soon as three quarters of that are in use, so idle connections
    /// stay small (quinn keeps state for every stream the peer may open) and busy ones never
    /// queue behind the limit.
    pub max_concurrent_calls: u32,
    /// The concurrent-call limit a connection starts with (default 64).
    pub initial_concurrent_calls: u32,
    /// Concurrent pushes the server may have open towards this side (unidirectional streams; only
    /// meaningful on clients), at most. A connection starts at
    /// [`initial_concurrent_pushes`](Self::initial_concurrent_pushes) and is raised to this once
    /// three quarters of that many pushes arrive within 100 ms: quinn keeps state for every
    /// stream the peer may open (about 35 bytes each: a raised connection holds about 250 KB
    /// more), and a server pushing fast waits a round trip for every new allowance, so a busy connection gets room (measured on 2 cores, with
    /// the client on the application's runtime: 0.49M pushes/s at 1,024, 0.7-0.9M at 4,096 and
    /// more).
    pub max_concurrent_pushes: u32,
    /// The concurrent-push limit a connection starts with (default 1,024).
    pub initial_concurrent_pushes: u32,
    /// Requested UDP send and receive buffer size. Large buffers keep a busy server from dropping
    /// datagrams (broadcasts to thousands of clients); the kernel may cap it.
    pub socket_buffer_size: usize,
    /// Frame size limits.
    pub limits: Limits,
    /// While a call (or push with receipt) waits on a connection and nothing arrives from the
    /// peer, probe it; close the connection when it stays silent this long (never less than six
    /// round trips), so calls fail over in about a second instead of waiting for the idle
    /// timeout or their deadline. `None` turns the probes off. Default 1.5 s.
    pub unresponsive_timeout: Option<Duration>,
    /// How long the peer may take to send one whole frame (a request, a push) once it opened
    /// its stream. A stream still unfinished then is reset with `CANCELLED` and everything it
    /// buffered is released: a peer that sends 3 bytes and stalls holds nothing past this. On a
    /// durable stream (`quicx/2`) each record, and the stream's end, must come within this of
    /// the client asking for it.
    /// Default 60 s (an 8 MiB request over a 1 Mbit/s link needs about 70 s: raise it for slow
    /// links with large payloads).
    pub frame_timeout: Duration,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            keep_alive_interval: Some(Duration::from_secs(5)),
            idle_timeout: Duration::from_secs(15),
            max_concurrent_calls: 1024,
            initial_concurrent_calls: 64,
            max_concurrent_pushes: 8192,
            initial_concurrent_pushes: 1024,
            socket_buffer_size: 4 * 1024 * 1024,
            limits: Limits::default(),
            unresponsive_timeout: Some(Duration::from_millis(1500)),
            frame_timeout: Duration::from_secs(60),
        }
    }
}

impl TransportOptions {
    /// Keep-alive interval (default 5 s); `None` disables keep-alives.
    #[must_use]
    pub fn keep_alive_interval(mut self, interval: Option<Duration>) -> Self {
        self.keep_alive_interval = interval;
        self
    }

    /// Idle timeout (default 15 s): a peer that sends nothing this long is considered gone.
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Concurrent calls the peer may have open towards this side (default 1,024).
    #[must_use]
    pub fn max_concurrent_calls(mut self, n: u32) -> Self {
        self.max_concurrent_calls = n;
        self
    }

    /// Concurrent pushes the server may have open towards this client, at most (default 8,192;
    /// when it is reached: the field of the same name).
    #[must_use]
    pub fn max_concurrent_pushes(mut self, n: u32) -> Self {
        self.max_concurrent_pushes = n;
        self
    }

    /// The concurrent-push limit a client's connection starts with (default 1,024), raised to
    /// the maximum when the server pushes fast.
    #[must_use]
    pub fn initial_concurrent_pushes(mut self, n: u32) -> Self {
        self.initial_concurrent_pushes = n;
        self
    }

    /// Frame size limits.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long a silent peer may leave calls waiting before its connection is closed (default
    /// 1.5 s); `None` turns the liveness probes off.
    #[must_use]
    pub fn unresponsive_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.unresponsive_timeout = timeout;
        self
    }

    /// How long the peer may take to send one whole frame (default 60 s).
    #[must_use]
    pub fn frame_timeout(mut self, timeout: Duration) -> Self {
        self.frame_timeout = timeout;
        self
    }

    /// The concurrent-call limit a connection starts with.
    pub(crate) fn starting_calls(&self) -> u32 {
        self.initial_concurrent_calls.min(self.max_concurrent_calls)
    }

    /// The concurrent-push limit a connection starts with.
    pub(crate) fn starting_pushes(&self) -> u32 {
        self.initial_concurrent_pushes
            .min(self.max_concurrent_pushes)
    }

    /// The quinn transport config. `accept_pushes` is false on servers: clients open no
    /// unidirectional streams.
    pub(crate) fn quinn_transport(
        &self,
        accept_pushes: bool,
    ) -> Result<Arc<quinn::TransportConfig>> {
        let mut t = quinn::TransportConfig::default();
        t.keep_alive_interval(self.keep_alive_interval);
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(self.idle_timeout)
                .map_err(|e| Error::Config(format!("idle timeout: {e}")))?,
        ));
        t.max_concurrent_bidi_streams(self.starting_calls().into());
        t.max_concurrent_uni_streams(if accept_pushes {
            self.starting_pushes().into()
        } else {
            0u32.into()
        });
        // DATAGRAM frames carry only liveness probes, whose content is ignored and never read:
        // a small buffer bounds what a peer can park here (quinn's default is 1.25 MB per
        // connection) and drops the oldest.
        t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
        t.datagram_send_buffer_size(DATAGRAM_BUFFER);
        Ok(Arc::new(t))
    }
}

/// Bytes of DATAGRAM frames buffered per connection and direction.
const DATAGRAM_BUFFER: usize = 1024;

/// A server endpoint's keys that must survive a restart, derived from its private key: the
/// stateless-reset key and the key of its connection-id checksum. A server restarted on the same
/// port with the same key recognises the connection ids it issued before (quinn drops packets
/// whose id fails the checksum) and computes the same reset tokens, so the clients of the process
/// that died learn at their next packet that their connection is gone (and reconnect at once)
/// instead of waiting for the idle timeout. Derived with a one-way function, so they reveal
/// nothing about the private key.
#[derive(Clone)]
pub(crate) struct StableKeys {
    reset: Arc<ring::hmac::Key>,
    cid: u64,
}

impl std::fmt::Debug for StableKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StableKeys")
    }
}

impl StableKeys {
    pub(crate) fn derive(private_key_der: &[u8]) -> Self {
        let derive = |label: &[u8]| {
            let mut material = label.to_vec();
            material.extend_from_slice(private_key_der);
            ring::digest::digest(&ring::digest::SHA256, &material)
        };
        let reset = derive(b"quicx stateless reset key v1");
        let cid = derive(b"quicx connection id key v1");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&cid.as_ref()[..8]);
        Self {
            reset: Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                reset.as_ref(),
            )),
            cid: u64::from_le_bytes(cid_key),
        }
    }

    fn endpoint_config(&self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(self.reset.clone());
        let cid = self.cid;
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid))
        });
        config
    }
}

/// Whether several sockets can share a port with the kernel spreading peers over them
/// (`SO_REUSEPORT` load balancing: Linux).
pub(crate) const SHARDED_PORTS: bool = cfg!(target_os = "linux");

/// Binds a UDP socket with the requested buffer sizes, for a quinn endpoint; with `shared_port`,
/// one of several sockets of a server's port (`SO_REUSEPORT`).
pub(crate) fn bind_socket(
    addr: SocketAddr,
    buffer: usize,
    shared_port: bool,
) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Best effort: dual-stack where the platform allows it.
        let _ = socket.set_only_v6(false);
    }
    #[cfg(target_os = "linux")]
    if shared_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = shared_port;
    if buffer > 0 {
        // The kernel caps these at net.core.{r,w}mem_max; failures are not fatal.
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&addr.into())?;
    tracing::debug!(
        %addr,
        recv_buffer = socket.recv_buffer_size().unwrap_or(0),
        send_buffer = socket.send_buffer_size().unwrap_or(0),
        "bound UDP socket"
    );
    Ok(socket.into())
}

/// Builds a quinn endpoint on `addr`; a server's with its stable keys, on a shared port.
pub(crate) fn endpoint(
    addr: SocketAddr,
    buffer: usize,
    server: Option<(quinn::ServerConfig, StableKeys)>,
) -> Result<quinn::Endpoint> {
    let socket = bind_socket(addr, buffer, server.is_some() && SHARDED_PORTS)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| Error::Config("quicx needs a tokio runtime".into()))?;
    let (config, server) = match server {
        Some((server, keys)) => (keys.endpoint_config(), Some(server)),
        None => (quinn::EndpointConfig::default(), None),
    };
    Ok(quinn::Endpoint::new(config, server, socket, runtime)?)
}
