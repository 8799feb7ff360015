//! One QUIC connection, from either side.
//!
//! - `mod.rs` (this file): the [`Connection`] handle and its identity;
//! - `side.rs`: what all connections of one side share, and its [`Role`](side::Role);
//! - `call.rs`: outgoing calls (forward, reverse, hello) and their options;
//! - `push.rs`: outgoing pushes (server to client);
//! - `serve.rs`: everything the peer opens — dispatch, handlers, hellos, pushes received;
//! - `liveness.rs`: probes a silent peer while calls wait, and closes the connection if it is gone;
//! - `registry.rs`: the server's index of its clients.

pub(crate) mod call;
mod liveness;
mod push;
pub(crate) mod registry;
mod serve;
pub(crate) mod side;

use crate::sync::Lock;
use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

pub use self::call::{CallOptions, RawReply};
pub(crate) use self::{call::hello, serve::serve};
use self::{liveness::Liveness, side::Side};
use crate::{Error, PeerIdentity, io::IoRuntime, wire::CloseCode};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A handle to one connection (rpcx's `net.Conn` in `server.RemoteConnContextKey`).
///
/// On a server it stands for one connected client: a handler gets it from
/// [`Context::conn`](crate::Context::conn), or the server looks it up
/// ([`Server::client`](crate::Server::client)), and it can push messages to the client
/// ([`send_message`](Self::send_message)) and call services the client registered
/// ([`call`](Self::call)). On a client it stands for the connection to the server (calls only:
/// a client cannot push). Cloning is cheap; all clones are the same connection.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    id: u64,
    quic: quinn::Connection,
    server_addr: SocketAddr,
    side: Arc<Side>,
    /// The thread (or runtime) that drives this connection.
    io: IoRuntime,
    client_id: Mutex<Option<String>>,
    peer_identity: Option<PeerIdentity>,
    /// The wire protocol version agreed at the handshake.
    version: u8,
    /// Calls the peer has open on this connection now.
    calls_in_flight: AtomicU32,
    /// Durable pushes with receipt waiting here for the one before them (clients).
    durable_waiting: AtomicU32,
    /// Whether the concurrent-call limit was raised to its maximum.
    call_limit_raised: AtomicBool,
    /// Calls (and pushes with receipt) this side waits on, and the probe that runs meanwhile.
    liveness: Liveness,
    /// The peer's call rate, when the server limits it per connection.
    call_limiter: Option<governor::DefaultDirectRateLimiter>,
    /// Request bytes this connection may have buffered (servers).
    buffered: Option<crate::wire::Budget>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .field("remote", &self.inner.quic.remote_address())
            .field("client_id", &self.client_id())
            .finish()
    }
}

impl PartialEq for Connection {
    fn eq(&self, other: &Self) -> bool {
        self.inner.id == other.inner.id
    }
}

impl Eq for Connection {}

impl Connection {
    /// Whether a call may start under the server's call rates; the refusal message if not.
    pub(crate) fn within_call_rates(&self) -> std::result::Result<(), &'static str> {
        if let Some(limiter) = &self.inner.call_limiter {
            if limiter.check().is_err() {
                return Err("over this connection's call rate");
            }
        }
        let limiters = self.inner.side.limiters();
        if limiters.is_some_and(|l| !l.allow_identity(|| self.client_id())) {
            return Err("over this identity's call rate");
        }
        Ok(())
    }

    pub(crate) fn new(
        quic: quinn::Connection,
        side: Arc<Side>,
        server_addr: SocketAddr,
        io: IoRuntime,
    ) -> Self {
        let peer_identity = PeerIdentity::from_connection(&quic);
        let version = quic
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .map_or(1, |p| if p == crate::wire::ALPN_V2 { 2 } else { 1 });
        let limiters = side.limiters();
        let call_limiter = limiters.and_then(crate::limits::Limiters::connection_limiter);
        let buffered = limiters.map(crate::limits::Limiters::connection_budget);
        Self {
            inner: Arc::new(ConnInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                quic,
                server_addr,
                side,
                io,
                client_id: Mutex::new(None),
                peer_identity,
                version,
                calls_in_flight: AtomicU32::new(0),
                durable_waiting: AtomicU32::new(0),
                call_limit_raised: AtomicBool::new(false),
                liveness: Liveness::default(),
                call_limiter,
                buffered,
            }),
        }
    }

    /// A process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The wire protocol version this connection speaks: `2` when both ends offered `quicx/2`
    /// at the handshake, `1` with a peer that speaks only `quicx/1` (`docs/PROTOCOL.md` §7).
    /// Version 2 carries durable messages many per stream; everything else is the same.
    pub fn protocol_version(&self) -> u8 {
        self.inner.version
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.quic.remote_address()
    }

    /// The current round-trip time estimate of the QUIC connection.
    pub fn rtt(&self) -> Duration {
        self.inner.quic.rtt()
    }

    /// The application identity bound to this connection (a device id), if any: declared by the
    /// client in its hello, taken from its certificate under mTLS, or bound by a handler.
    pub fn client_id(&self) -> Option<String> {
        self.inner.client_id.locked().clone()
    }

    /// Binds this connection to an application identity: a handler calls it after its own
    /// login logic (quicx binds hello identities only from a verified source; see
    /// [`Authenticator`](crate::Authenticator)). On a server, the registry then finds it by that
    /// id ([`Server::client`](crate::Server::client)); an older connection bound to the same id
    /// is taken over: closed with `TAKEN_OVER` (event
    /// [`ServerEvent::TakenOver`](crate::ServerEvent::TakenOver)), so pushes reach the newest
    /// one; the id this connection held before no longer finds it. On a client it only records
    /// the id.
    pub fn bind_client_id(&self, id: impl Into<String>) {
        let id = id.into();
        match self.inner.side.registry() {
            Some(registry) => {
                let taken = registry.bind(id.clone(), self);
                if let Some(durable) = self.inner.side.durable() {
                    // Bound now: the delivery run finds this connection.
                    durable.kick(&id);
                }
                if let Some(old) = taken {
                    // Told before it is closed: subscribers see `TakenOver` before the old
                    // connection's `Disconnected`.
                    registry.emit(crate::ServerEvent::TakenOver {
                        client_id: id,
                        old: old.clone(),
                        new: self.clone(),
                    });
                    old.close_with(CloseCode::TAKEN_OVER, b"taken over");
                }
            }
            None => self.set_client_id_local(Some(id)),
        }
    }

    /// The verified client certificate's identity, when the server requires or accepts client
    /// certificates (mTLS); on a client, the server's.
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.inner.peer_identity.as_ref()
    }

    /// Whether the connection is closed (by either side, or lost).
    pub fn is_closed(&self) -> bool {
        self.inner.quic.close_reason().is_some()
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.inner.quic.close_reason().map(|e| self.lost(e))
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> Error {
        let e = self.inner.quic.closed().await;
        self.lost(e)
    }

    /// Closes the connection at once with close code `NORMAL`; calls in flight fail with
    /// [`Error::ConnectionLost`]. Data not yet acknowledged by the peer (a oneway call just
    /// handed to QUIC, a push) may be lost.
    pub fn close(&self) {
        self.close_with(CloseCode::NORMAL, b"closed");
    }

    /// Closes the connection now with an application close `code` ([`CloseCode`]) and a reason
    /// the peer sees. A client closed with [`CloseCode::TAKEN_OVER`] does not reconnect (its
    /// identity is held elsewhere); with any other code it reconnects as after a loss. Calls in
    /// flight on either side fail with [`Error::ConnectionLost`](crate::Error::ConnectionLost).
    pub fn close_with_code(&self, code: CloseCode, reason: &str) {
        self.close_with(code, reason.as_bytes());
    }

    pub(crate) fn close_with(&self, code: CloseCode, reason: &[u8]) {
        self.inner.quic.close(code.into(), reason);
    }

    /// Closes with `code`, then waits until a datagram left after the close (the
    /// CONNECTION_CLOSE: a closed connection sends nothing else) or `limit` passed, so a process
    /// may exit without leaving the peer to its idle timeout. For connections on a shared socket,
    /// where waiting for the whole endpoint to go idle is not an option.
    pub(crate) async fn close_and_flush(&self, code: CloseCode, reason: &[u8], limit: Duration) {
        let sent_before = self.inner.quic.stats().udp_tx.datagrams;
        self.close_with(code, reason);
        let deadline = tokio::time::Instant::now() + limit;
        while self.inner.quic.stats().udp_tx.datagrams == sent_before
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The error for a closed connection: [`Error::PeerUnresponsive`] if this side closed it
    /// because its probes went unanswered.
    fn lost(&self, e: quinn::ConnectionError) -> Error {
        match self.inner.liveness.gave_up_after() {
            Some(silent) => Error::PeerUnresponsive(silent),
            None => e.into(),
        }
    }

    pub(crate) fn quic(&self) -> &quinn::Connection {
        &self.inner.quic
    }

    pub(crate) fn set_client_id_local(&self, id: Option<String>) {
        *self.inner.client_id.locked() = id;
    }

    /// Address of the server end of this connection (the peer on a client, the local side on a
    /// server).
    pub(crate) fn server_addr(&self) -> SocketAddr {
        self.inner.server_addr
    }

    /// The frame size limits of this side.
    pub(crate) fn limits(&self) -> crate::wire::Limits {
        self.inner.side.limits
    }

    /// Opens the bidirectional stream of a durable delivery run (`quicx/2`). Waits while the
    /// client's stream limit is reached; fails at once when the connection is gone.
    pub(crate) async fn open_durable_stream(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), crate::Error> {
        Ok(self.inner.quic.open_bi().await?)
    }

    pub(crate) fn io(&self) -> &IoRuntime {
        &self.inner.io
    }
}
