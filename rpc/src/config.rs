//! Transport settings shared by servers and clients, and UDP socket setup.

use std::{cell::Cell, net::SocketAddr, sync::Arc, time::Duration};

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
    cid: Arc<ring::hmac::Key>,
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
            let digest = ring::digest::digest(&ring::digest::SHA256, &material);
            Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                digest.as_ref(),
            ))
        };
        Self {
            reset: derive(b"quicx stateless reset key v1"),
            cid: derive(b"quicx connection id key v2"),
        }
    }

    /// The endpoint config of I/O thread `shard` of a server's shared port: its connection ids
    /// name it (see [`ShardCid`]).
    fn endpoint_config(&self, shard: Shard) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(self.reset.clone());
        let key = self.cid.clone();
        config.cid_generator(move || {
            Box::new(ShardCid {
                key: key.clone(),
                shard,
            })
        });
        config
    }
}

/// Which of a server's I/O threads (its endpoints on one shared port) an endpoint is: `index`
/// of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl Shard {
    /// Whether packets can be steered by connection id to this many shards: the first byte of
    /// a connection id names the shard, so at most 256 of them (one needs no steering).
    fn steerable(self) -> bool {
        SHARDED_PORTS && (2..=256).contains(&self.count)
    }
}

/// Connection ids of 8 bytes: the first names the I/O thread that issued them (`byte % count
/// == index`, the rest of it random), the next four are random, the last three an HMAC of the
/// first five under the server's stable key (so garbage is told from ids this server issued,
/// also after a restart, without a lookup). 32 random bits besides the thread: a thread that
/// an attacker loads with every connection still finds free ids at once. The server's sockets
/// steer each packet by the first byte (`steer_by_connection_id`), so a connection's packets
/// reach the thread that owns it whatever address they come from: a client behind a NAT that
/// rebinds, and clients that share few addresses (a gateway, a load balancer), are not tied to
/// the kernel's hash of their address. An observer learns which of the server's threads a
/// connection is on, and nothing more that links two ids of one connection.
#[derive(Debug, Clone)]
struct ShardCid {
    key: Arc<ring::hmac::Key>,
    shard: Shard,
}

/// Bytes of a [`ShardCid`] that are signed (the shard byte and four random ones) ...
const CID_NONCE: usize = 5;
/// ... and its length.
const CID_LEN: usize = 8;

impl ShardCid {
    fn signature(&self, nonce: &[u8]) -> [u8; CID_LEN - CID_NONCE] {
        let tag = ring::hmac::sign(&self.key, nonce);
        let mut signature = [0; CID_LEN - CID_NONCE];
        signature.copy_from_slice(&tag.as_ref()[..CID_LEN - CID_NONCE]);
        signature
    }
}

impl quinn_proto::ConnectionIdGenerator for ShardCid {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use rand::RngExt;
        let mut bytes = [0u8; CID_LEN];
        let mut rng = rand::rng();
        rng.fill(&mut bytes[..CID_NONCE]);
        if self.shard.steerable() {
            // Uniform over the bytes with `byte % count == index`: this thread's, or the one
            // a Retry being sent from this thread moves its connection to (`retry_to`).
            let count = self.shard.count;
            let index = RETRY_TO
                .with(Cell::take)
                .filter(|&to| to < count)
                .unwrap_or(self.shard.index);
            let byte = rng.random_range(0..256 / count) * count + index;
            bytes[0] = u8::try_from(byte).expect("below 256: count <= 256 and index < count");
        }
        let signature = self.signature(&bytes[..CID_NONCE]);
        bytes[CID_NONCE..].copy_from_slice(&signature);
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn validate(
        &self,
        cid: &quinn_proto::ConnectionId,
    ) -> std::result::Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CID_LEN && cid[CID_NONCE..] == self.signature(&cid[..CID_NONCE]) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

thread_local! {
    /// The I/O thread the connection id that `retry_to` is generating must name, while it runs
    /// (a thread-local: the id is generated in the same synchronous call, on this thread, so no
    /// other endpoint's or connection's id can take it, whatever runtime drives them).
    static RETRY_TO: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Answers a new connection's first Initial with a QUIC Retry (RFC 9000 §8.1.2) whose
/// connection id names I/O thread `to` of the server's shared port: the client sends its
/// Initial again with that id, which the port's steering program hands to that thread's socket
/// (and that thread's endpoint takes the Retry's token: the endpoints share one
/// `quinn::ServerConfig`, so one token key). Costs the client one round trip. Gives the
/// incoming connection back (`RetryError::into_incoming`) if it cannot be retried.
pub(crate) fn retry_to(incoming: quinn::Incoming, to: usize) -> Result<(), quinn::RetryError> {
    /// Clears the target however `retry` ends (quinn refused before generating the id, or a
    /// panic): left set, it would name another thread in this thread's next connection id.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            RETRY_TO.with(|cell| cell.set(None));
        }
    }
    RETRY_TO.with(|cell| cell.set(Some(to)));
    let _clear = Clear;
    incoming.retry()
}

/// Makes the kernel hand each datagram that reaches the server's shared port to the socket
/// (in the order they were bound) named by the first byte of its destination connection id,
/// modulo `count`: byte 1 of a short-header packet, byte 6 of a long-header one (after the
/// first byte, the version and the id's length). A client's first packets carry an id it chose
/// at random, so new connections spread evenly over the threads whatever their addresses; every
/// later packet carries an id the owning thread issued ([`ShardCid`]). A datagram too short to
/// hold the byte goes to the first socket. Set on any socket of the group, it applies to all.
/// The program sees one datagram of each batch the kernel's receive offload (UDP GRO) merges,
/// and such a batch (datagrams of one client address, which may belong to several connections)
/// goes to one socket: [`endpoint`] turns GRO off on steered sockets.
#[cfg(target_os = "linux")]
fn steer_by_connection_id(socket: &impl std::os::fd::AsFd, count: usize) -> std::io::Result<()> {
    use nix::libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD, BPF_RET,
        sock_filter, sock_fprog,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: u16::try_from(code).unwrap_or_default(),
        jt,
        jf,
        k,
    };
    let count = u32::try_from(count).map_err(std::io::Error::other)?;
    let mut program = [
        // A = first byte; long header (0x80 set)?
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JSET | BPF_K, 0, 2, 0x80),
        // Long header: A = first byte of the destination connection id.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 6),
        op(BPF_JMP | BPF_JA, 0, 0, 1),
        // Short header: the same, right after the first byte.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 1),
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, count),
        op(BPF_RET | BPF_A, 0, 0, 0),
    ];
    let fprog = sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::AttachReusePortCbpf,
        &fprog,
    )
    .map_err(std::io::Error::from)
}

/// Whether several sockets can share a port, each packet going to one of them (`SO_REUSEPORT`:
/// Linux).
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

/// Builds a client's quinn endpoint on `addr`.
pub(crate) fn endpoint(addr: SocketAddr, buffer: usize) -> Result<quinn::Endpoint> {
    build_endpoint(addr, buffer, None).map(|(endpoint, _)| endpoint)
}

/// Builds the endpoint of I/O thread `shard` of a server: with its stable keys, on the shared
/// port, its packets steered to it by connection id where the kernel allows (see
/// `steer_by_connection_id`). Also returns whether they are: only then can a Retry move a
/// connection to another thread ([`retry_to`]).
pub(crate) fn server_endpoint(
    addr: SocketAddr,
    buffer: usize,
    config: quinn::ServerConfig,
    keys: StableKeys,
    shard: Shard,
) -> Result<(quinn::Endpoint, bool)> {
    build_endpoint(addr, buffer, Some((config, keys, shard)))
}

fn build_endpoint(
    addr: SocketAddr,
    buffer: usize,
    server: Option<(quinn::ServerConfig, StableKeys, Shard)>,
) -> Result<(quinn::Endpoint, bool)> {
    let shard = server.as_ref().map(|(_, _, shard)| *shard);
    let socket = bind_socket(addr, buffer, shard.is_some() && SHARDED_PORTS)?;
    // Each socket sets the program again as the group grows; indices past the sockets bound so
    // far fall back to the kernel's hash until the last one joins. A kernel without it (before
    // Linux 4.5) keeps the hash: connections still work, a rebinding client may be reset.
    #[cfg(target_os = "linux")]
    let steered = match shard.filter(|s| s.steerable()) {
        Some(shard) => match steer_by_connection_id(&socket, shard.count) {
            Ok(()) => Some(socket.try_clone()?),
            Err(e) => {
                tracing::warn!(
                    "packets cannot be steered by connection id ({e}): the kernel's hash of \
                     the client's address picks the I/O thread"
                );
                None
            }
        },
        None => None,
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| Error::Config("quicx needs a tokio runtime".into()))?;
    let (config, server) = match server {
        Some((server, keys, shard)) => (keys.endpoint_config(shard), Some(server)),
        None => (quinn::EndpointConfig::default(), None),
    };
    let endpoint = quinn::Endpoint::new(config, server, socket, runtime)?;
    #[cfg(target_os = "linux")]
    let is_steered = steered.is_some();
    #[cfg(not(target_os = "linux"))]
    let is_steered = false;
    // quinn turns the socket's receive offload on; a steered socket must not merge datagrams
    // of different connections (see `steer_by_connection_id`).
    #[cfg(target_os = "linux")]
    if let Some(socket) = steered {
        if let Err(e) =
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::UdpGroSegment, &false)
        {
            tracing::warn!(
                "UDP receive offload stays on ({e}): datagrams of one client address may \
                 reach one I/O thread together"
            );
        }
    }
    Ok((endpoint, is_steered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_proto::ConnectionIdGenerator as _;

    fn key(n: u8) -> Arc<ring::hmac::Key> {
        Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[n; 32]))
    }

    #[test]
    fn connection_ids_name_their_shard_and_are_told_from_garbage() {
        for count in [2, 3, 4, 7, 64, 255, 256] {
            for index in [0, count / 2, count - 1] {
                let mut g = ShardCid {
                    key: key(7),
                    shard: Shard { index, count },
                };
                let mut first_bytes = std::collections::HashSet::new();
                let mut bad_accepted = 0;
                for _ in 0..200 {
                    let cid = g.generate_cid();
                    assert_eq!(cid.len(), CID_LEN);
                    assert_eq!(usize::from(cid[0]) % count, index, "{count}/{index}");
                    assert!(g.validate(&cid).is_ok());
                    let mut bad = cid[..].to_vec();
                    bad[1] ^= 1;
                    // A 24-bit check: one corrupted id in 16 million passes.
                    if g.validate(&quinn_proto::ConnectionId::new(&bad)).is_ok() {
                        bad_accepted += 1;
                    }
                    first_bytes.insert(cid[0]);
                }
                assert!(bad_accepted <= 1, "{bad_accepted} corrupted ids passed");
                // The rest of the first byte stays random (where there is room for it).
                if count <= 64 {
                    assert!(first_bytes.len() > 1, "{count}/{index}: {first_bytes:?}");
                }
            }
        }
        // Another server's key does not validate this one's ids.
        let mut ours = ShardCid {
            key: key(7),
            shard: Shard { index: 0, count: 2 },
        };
        let theirs = ShardCid {
            key: key(8),
            ..ours.clone()
        };
        assert!(theirs.validate(&ours.generate_cid()).is_err());
    }
}
