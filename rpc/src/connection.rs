//! One QUIC connection, from either side: forward and reverse calls, pushes, and the loops that
//! serve what the peer opens.

use std::{
    fmt,
    net::SocketAddr,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::FutureExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    Codec, Context, Error, Metadata, PeerIdentity, Result, TransportOptions,
    io::{IoThread, within},
    push::{Delivery, PushMessage, PushSender},
    server::Registry,
    service::{Lookup, Services},
    stats::Counters,
    wire::{
        self, FrameError, HelloHeader, Limits, PushHeader, PushHeaderRef, RawFrame, RequestHeader,
        RequestHeaderRef, ResponseHeader, Status, code, flags, kind, status,
    },
};

/// Options of one call: metadata, timeout, codec.
///
/// ```
/// use std::time::Duration;
/// let opts = quicx::CallOptions::new()
///     .metadata("trace-id", "42")
///     .timeout(Duration::from_secs(2));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// Request metadata.
    pub metadata: Metadata,
    /// How long to wait for the reply. `None` uses the side's default call timeout. The server
    /// learns it too and cancels the handler when it passes.
    pub timeout: Option<Duration>,
    /// Payload codec.
    pub codec: Codec,
    /// Routing key for an [`XClient`](crate::XClient) with
    /// [`SelectMode::ConsistentHash`](crate::SelectMode::ConsistentHash): calls with the same key
    /// go to the same endpoint. Not sent on the wire.
    pub route_key: Option<String>,
}

impl CallOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata pair.
    #[must_use]
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key, value);
        self
    }

    /// Sets the timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the codec.
    #[must_use]
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// Sets the routing key used by consistent hashing.
    #[must_use]
    pub fn route_key(mut self, key: impl Into<String>) -> Self {
        self.route_key = Some(key.into());
        self
    }
}

/// A reply as bytes, with its metadata.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// Response metadata set by the handler.
    pub metadata: Metadata,
    /// The encoded reply.
    pub payload: Bytes,
}

/// What every connection of one side (a server, or a client) shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) services: Services,
    pub(crate) limits: Limits,
    /// Where pushes go (clients with a push channel).
    pub(crate) push_sink: Option<PushSender>,
    /// Bound on `send_message` (open stream + hand over the frame).
    pub(crate) push_timeout: Duration,
    /// Default timeout of calls made from this side.
    pub(crate) call_timeout: Option<Duration>,
    /// Bound on reading one incoming frame.
    pub(crate) frame_timeout: Duration,
    /// Concurrent-call limit: where a connection starts, and the most it is raised to.
    pub(crate) call_limits: (u32, u32),
    pub(crate) shutting_down: AtomicBool,
    /// Every call handler task, for draining at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the side shuts down its handlers for good.
    pub(crate) shutdown: CancellationToken,
    /// The server's registry of clients (server side only).
    pub(crate) registry: Option<Arc<Registry>>,
    pub(crate) counters: Counters,
    /// The thread this side's QUIC I/O runs on.
    pub(crate) io: IoThread,
}

impl Shared {
    pub(crate) fn new(
        services: Services,
        transport: &TransportOptions,
        push_sink: Option<PushSender>,
        push_timeout: Duration,
        call_timeout: Option<Duration>,
        registry: Option<Arc<Registry>>,
        io: IoThread,
    ) -> Self {
        Self {
            services,
            limits: transport.limits,
            push_sink,
            push_timeout,
            call_timeout,
            frame_timeout: Duration::from_secs(60),
            call_limits: (transport.starting_calls(), transport.max_concurrent_calls),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            registry,
            counters: Counters::default(),
            io,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A handle to one connection (rpcx's `net.Conn` in `server.RemoteConnContextKey`).
///
/// On a server it stands for one connected client: a handler gets it from
/// [`Context::conn`], or the server looks it up ([`Server::client`](crate::Server::client)), and
/// it can push messages to the client ([`send_message`](Self::send_message)) and call services
/// the client registered ([`call`](Self::call)). Cloning is cheap; all clones are the same
/// connection.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    id: u64,
    quic: quinn::Connection,
    server_addr: SocketAddr,
    shared: Arc<Shared>,
    client_id: Mutex<Option<String>>,
    peer_identity: Option<PeerIdentity>,
    /// Calls the peer has open on this connection now.
    calls_in_flight: AtomicU32,
    /// Whether the concurrent-call limit was raised to its maximum.
    call_limit_raised: AtomicBool,
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
    pub(crate) fn new(
        quic: quinn::Connection,
        shared: Arc<Shared>,
        server_addr: SocketAddr,
    ) -> Self {
        let peer_identity = PeerIdentity::from_connection(&quic);
        Self {
            inner: Arc::new(ConnInner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                quic,
                server_addr,
                shared,
                client_id: Mutex::new(None),
                peer_identity,
                calls_in_flight: AtomicU32::new(0),
                call_limit_raised: AtomicBool::new(false),
            }),
        }
    }

    /// A process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.inner.id
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
        self.inner
            .client_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Binds this connection to an application identity. On a server, the registry then finds
    /// it by that id ([`Server::client`](crate::Server::client)); an older connection bound to
    /// the same id is replaced, so pushes reach the newest one.
    pub fn bind_client_id(&self, id: impl Into<String>) {
        let id = id.into();
        *self
            .inner
            .client_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
        if let Some(registry) = &self.inner.shared.registry {
            registry.bind(id, self);
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
        self.inner.quic.close_reason().map(Error::from)
    }

    /// Resolves when the connection closes, with the reason.
    pub async fn closed(&self) -> Error {
        self.inner.quic.closed().await.into()
    }

    /// Closes the connection at once with `CLOSE_NORMAL`; calls in flight fail with
    /// [`Error::ConnectionLost`].
    pub fn close(&self) {
        self.inner
            .quic
            .close(code::CLOSE_NORMAL.try_into().unwrap_or_default(), b"closed");
    }

    pub(crate) fn close_with(&self, close_code: u64, reason: &[u8]) {
        self.inner.quic.close(
            quinn::VarInt::from_u64(close_code).unwrap_or_default(),
            reason,
        );
    }

    pub(crate) fn quic(&self) -> &quinn::Connection {
        &self.inner.quic
    }

    pub(crate) fn set_client_id_local(&self, id: Option<String>) {
        *self
            .inner
            .client_id
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// Address of the server end of this connection (the peer on a client, the local side on a
    /// server).
    pub(crate) fn server_addr(&self) -> SocketAddr {
        self.inner.server_addr
    }

    // ---------------------------------------------------------------- calls

    /// Calls `service_path.service_method` on the peer with postcard-encoded `args` and decodes the
    /// reply. From a server this is a reverse call to a client that registered the service.
    ///
    /// Returns when the reply arrived, or with an error: the remote handler's
    /// ([`Error::Remote`]), a protocol status ([`Error::UnknownService`], ...), or a transport
    /// failure. Dropping the future resets the stream with `CANCELLED`, and the remote handler is
    /// cancelled.
    pub async fn call<A, R>(&self, service_path: &str, service_method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(service_path, service_method, args, &CallOptions::default())
            .await
    }

    /// [`call`](Self::call) with metadata, timeout and codec.
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
        let reply = self
            .call_encoded(service_path, service_method, args, options, false)
            .await?;
        options
            .codec
            .decode(&reply.map(|r| r.payload).unwrap_or_default())
    }

    /// A oneway call: sends the request and returns once it is handed to QUIC; the handler runs
    /// but no reply (not even an error) comes back.
    pub async fn oneway<A>(&self, service_path: &str, service_method: &str, args: &A) -> Result<()>
    where
        A: Serialize + ?Sized,
    {
        self.call_encoded(
            service_path,
            service_method,
            args,
            &CallOptions::default(),
            true,
        )
        .await
        .map(drop)
    }

    /// A call with raw payload bytes; returns the raw reply and its metadata.
    pub async fn call_raw(
        &self,
        service_path: &str,
        service_method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        self.send_raw(service_path, service_method, payload, options, false)
            .await
    }

    /// Sends already encoded arguments; a oneway call returns an empty reply once the request is
    /// handed to QUIC.
    pub(crate) async fn send_raw(
        &self,
        service_path: &str,
        service_method: &str,
        payload: &[u8],
        options: &CallOptions,
        oneway: bool,
    ) -> Result<RawReply> {
        let header = self.request_header(service_path, service_method, options, oneway);
        let frame = wire::encode_frame(kind::REQUEST, &header, payload, &self.inner.shared.limits)?;
        let target = (service_path, service_method);
        self.exchange(frame, target, options, oneway)
            .await
            .map(|r| {
                r.unwrap_or_else(|| RawReply {
                    metadata: Metadata::new(),
                    payload: Bytes::new(),
                })
            })
    }

    fn request_header<'a>(
        &self,
        service_path: &'a str,
        service_method: &'a str,
        options: &'a CallOptions,
        oneway: bool,
    ) -> RequestHeaderRef<'a> {
        let timeout = options.timeout.or(self.inner.shared.call_timeout);
        RequestHeaderRef {
            service_path,
            service_method,
            metadata: &options.metadata,
            timeout_ms: timeout.map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64),
            flags: if oneway { flags::ONEWAY } else { 0 },
            codec: options.codec.to_wire(),
        }
    }

    async fn call_encoded<A: Serialize + ?Sized>(
        &self,
        service_path: &str,
        service_method: &str,
        args: &A,
        options: &CallOptions,
        oneway: bool,
    ) -> Result<Option<RawReply>> {
        let header = self.request_header(service_path, service_method, options, oneway);
        let frame =
            wire::encode_frame_with(kind::REQUEST, &header, &self.inner.shared.limits, |buf| {
                options.codec.encode_into(args, buf)
            })?;
        self.exchange(frame, (service_path, service_method), options, oneway)
            .await
    }

    /// Sends one request frame and reads the response, under the call's timeout: inline on a
    /// client, handed to the I/O thread on a server.
    async fn exchange(
        &self,
        frame: Bytes,
        (service_path, service_method): (&str, &str),
        options: &CallOptions,
        oneway: bool,
    ) -> Result<Option<RawReply>> {
        let timeout = options.timeout.or(self.inner.shared.call_timeout);
        let io = &self.inner.shared.io;
        let result = if io.is_current() {
            self.exchange_timed(frame, service_path, service_method, timeout, oneway)
                .await
        } else {
            let conn = self.clone();
            let (path, method) = (service_path.to_owned(), service_method.to_owned());
            io.run(async move {
                conn.exchange_timed(frame, &path, &method, timeout, oneway)
                    .await
            })
            .await
            .and_then(|r| r)
        };
        let counters = &self.inner.shared.counters;
        counters.calls_sent.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            counters.call_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn exchange_timed(
        &self,
        frame: Bytes,
        service_path: &str,
        service_method: &str,
        timeout: Option<Duration>,
        oneway: bool,
    ) -> Result<Option<RawReply>> {
        let span = tracing::debug_span!(
            "call",
            service = %service_path,
            method = %service_method,
            conn = self.inner.id
        );
        let fut = self
            .exchange_inner(frame, service_path, service_method, oneway)
            .instrument(span);
        match timeout {
            Some(t) => within(t, fut).await.unwrap_or(Err(Error::Timeout)),
            None => fut.await,
        }
    }

    async fn exchange_inner(
        &self,
        frame: Bytes,
        service_path: &str,
        service_method: &str,
        oneway: bool,
    ) -> Result<Option<RawReply>> {
        let (send, recv) = self.inner.quic.open_bi().await?;
        let mut streams = CallStreams {
            send,
            recv,
            armed: true,
        };
        streams.send.write_chunk(frame).await?;
        streams.send.finish()?;
        if oneway {
            streams.armed = false;
            return Ok(None);
        }
        let raw = wire::read_frame(&mut streams.recv, &self.inner.shared.limits)
            .await
            .map_err(|e| {
                if let Some(c) = e.stream_code() {
                    let _ = streams
                        .recv
                        .stop(quinn::VarInt::from_u64(c).unwrap_or_default());
                }
                Error::from(e)
            })?;
        streams.armed = false;
        if raw.kind != kind::RESPONSE {
            return Err(Error::Protocol(format!(
                "expected a response frame, got kind {:#04x}",
                raw.kind
            )));
        }
        let response: ResponseHeader = raw.header().map_err(Error::from)?;
        match response.status {
            Status::Ok => Ok(Some(RawReply {
                metadata: response.metadata,
                payload: raw.payload,
            })),
            Status::Error { code, message } => Err(Error::from_status(
                code,
                message,
                service_path,
                service_method,
            )),
        }
    }

    // ---------------------------------------------------------------- pushes

    /// Pushes one message to the peer (rpcx's `server.SendMessage`), on a new unidirectional
    /// stream.
    ///
    /// # When it returns
    /// Once the whole message is handed to QUIC (queued for sending and within flow control), not
    /// when the client read it; use [`send_message_with_receipt`](Self::send_message_with_receipt)
    /// for that. Pushes sent one after another from one task reach the client's channel in order.
    ///
    /// # Errors
    /// - [`Error::ConnectionLost`] at once if the connection is closed or lost (the server also
    ///   drops it from its registry);
    /// - [`Error::Timeout`] if the client applies backpressure (its channel is full) for longer
    ///   than the push timeout; the partly sent stream is reset and the client never sees a part;
    /// - [`Error::TooLarge`] if the message is above the payload limit.
    ///
    /// A push never delays call replies on the same connection: each rides its own stream.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes resets the stream; the client discards the
    /// partial message.
    pub async fn send_message(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        let frame = self.push_frame(service_path, service_method, metadata, data.as_ref())?;
        self.send_push_frame(frame, self.inner.shared.push_timeout)
            .await
    }

    /// [`send_message`](Self::send_message) with a postcard-encoded value (decode it with
    /// [`PushMessage::decode`]).
    pub async fn send_message_typed<T: Serialize + ?Sized>(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        value: &T,
    ) -> Result<()> {
        let data = Codec::Postcard.encode(value)?;
        self.send_message(service_path, service_method, metadata, data)
            .await
    }

    pub(crate) fn push_frame(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: &[u8],
    ) -> Result<Bytes> {
        let header = PushHeaderRef {
            service_path,
            service_method,
            metadata: &metadata,
        };
        wire::encode_frame(kind::PUSH, &header, data, &self.inner.shared.limits)
    }

    /// Sends an already encoded push frame on a new unidirectional stream, within `timeout`,
    /// on the I/O thread.
    pub(crate) async fn send_push_frame(&self, frame: Bytes, timeout: Duration) -> Result<()> {
        let io = &self.inner.shared.io;
        if io.is_current() {
            return self.push_on_io(frame, timeout).await;
        }
        let conn = self.clone();
        io.run(async move { conn.push_on_io(frame, timeout).await })
            .await
            .and_then(|r| r)
    }

    /// The push itself; runs on the I/O thread.
    pub(crate) async fn push_on_io(&self, frame: Bytes, timeout: Duration) -> Result<()> {
        let push = async {
            // Fails at once if the connection is gone.
            let send = self.inner.quic.open_uni().await?;
            let mut send = ResetOnDrop(Some(send));
            let stream = send.0.as_mut().expect("present until disarmed");
            stream.write_chunk(frame).await?;
            stream.finish()?;
            send.0 = None;
            Ok(())
        };
        let result = within(timeout, push).await.unwrap_or(Err(Error::Timeout));
        if let Err(e) = &result {
            tracing::debug!(conn = self.inner.id, "push failed: {e}");
        }
        let counters = &self.inner.shared.counters;
        match &result {
            Ok(()) => counters.pushes_sent.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.push_errors.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    pub(crate) fn io(&self) -> &IoThread {
        &self.inner.shared.io
    }

    /// Pushes one message and waits until the client put it into its push channel: on a
    /// bidirectional stream, answered by the client with a response frame.
    ///
    /// # Errors
    /// As [`send_message`](Self::send_message), plus [`Error::PushDropped`] when the client's
    /// [`FullPolicy::Drop`](crate::FullPolicy::Drop) dropped it and [`Error::PushRejected`] when
    /// the client has no push channel. [`Error::Timeout`] covers the whole exchange.
    pub async fn send_message_with_receipt(
        &self,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        let frame = self.push_frame(service_path, service_method, metadata, data.as_ref())?;
        let options = CallOptions {
            timeout: Some(self.inner.shared.push_timeout),
            ..CallOptions::default()
        };
        self.exchange(frame, (service_path, service_method), &options, false)
            .await
            .map(drop)
    }
}

/// The two halves of a call's stream; resets both with `CANCELLED` if dropped while armed.
struct CallStreams {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    armed: bool,
}

impl Drop for CallStreams {
    fn drop(&mut self) {
        if self.armed {
            let cancelled = quinn::VarInt::from_u64(code::CANCELLED).unwrap_or_default();
            let _ = self.send.reset(cancelled);
            let _ = self.recv.stop(cancelled);
        }
    }
}

/// A send stream that is reset with `CANCELLED` if dropped before it was taken out.
struct ResetOnDrop(Option<quinn::SendStream>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(s) = &mut self.0 {
            let _ = s.reset(quinn::VarInt::from_u64(code::CANCELLED).unwrap_or_default());
        }
    }
}

fn varint(c: u64) -> quinn::VarInt {
    quinn::VarInt::from_u64(c).unwrap_or_default()
}

/// Rejects a stream: resets what we would send, stops what the peer sends.
fn reject(send: Option<&mut quinn::SendStream>, recv: &mut quinn::RecvStream, stream_code: u64) {
    if let Some(send) = send {
        let _ = send.reset(varint(stream_code));
    }
    let _ = recv.stop(varint(stream_code));
}

// -------------------------------------------------------------------- serving the peer

/// Serves everything the peer opens on `conn` until the connection ends: calls (and, on a
/// server, hellos; on a client, receipt pushes) on bidirectional streams; pushes on
/// unidirectional ones (clients only).
pub(crate) async fn serve(conn: Connection) {
    let shared = conn.inner.shared.clone();
    let uni = shared.push_sink.is_some() || shared.registry.is_none();
    let pushes = async {
        if uni {
            accept_pushes(&conn).await;
        }
    };
    let (initial, max) = shared.call_limits;
    let calls = async {
        while let Ok((send, recv)) = conn.inner.quic.accept_bi().await {
            let in_flight = conn.inner.calls_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            if in_flight >= initial - initial / 4
                && max > initial
                && !conn.inner.call_limit_raised.swap(true, Ordering::Relaxed)
            {
                // Busy: let the peer open up to the maximum, so calls never queue behind the
                // limit; idle connections keep the small starting limit (and quinn's state for
                // it).
                conn.inner.quic.set_max_concurrent_bi_streams(max.into());
            }
            let conn = conn.clone();
            shared.tracker.spawn(async move {
                serve_bi(conn.clone(), send, recv).await;
                conn.inner.calls_in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        }
    };
    tokio::join!(pushes, calls);
}

async fn serve_bi(conn: Connection, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let shared = &conn.inner.shared;
    if shared.shutting_down.load(Ordering::Acquire) {
        return reject(Some(&mut send), &mut recv, code::SHUTTING_DOWN);
    }
    let raw = match within(
        shared.frame_timeout,
        wire::read_frame(&mut recv, &shared.limits),
    )
    .await
    {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => {
            tracing::debug!(conn = conn.id(), "bad incoming frame: {e:?}");
            if let Some(c) = e.stream_code() {
                reject(Some(&mut send), &mut recv, c);
            }
            return;
        }
        Err(_) => return reject(Some(&mut send), &mut recv, code::CANCELLED),
    };
    match raw.kind {
        kind::REQUEST => serve_request(&conn, send, recv, raw).await,
        kind::HELLO if shared.registry.is_some() => serve_hello(&conn, send, raw).await,
        kind::PUSH if shared.registry.is_none() => serve_receipt_push(&conn, send, raw).await,
        _ => reject(Some(&mut send), &mut recv, code::UNEXPECTED_STREAM),
    }
}

async fn respond(
    send: &mut quinn::SendStream,
    status: Status,
    metadata: Metadata,
    payload: &[u8],
    limits: &Limits,
) {
    let header = ResponseHeader { status, metadata };
    match wire::encode_frame(kind::RESPONSE, &header, payload, limits) {
        Ok(frame) => {
            if send.write_chunk(frame).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(Error::TooLarge { .. }) => {
            let _ = send.reset(varint(code::PAYLOAD_TOO_LARGE));
        }
        Err(_) => {
            let _ = send.reset(varint(code::INTERNAL));
        }
    }
}

fn error_status(code: u32, message: impl Into<String>) -> Status {
    Status::Error {
        code,
        message: message.into(),
    }
}

async fn serve_request(
    conn: &Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raw: RawFrame,
) {
    let shared = &conn.inner.shared;
    let limits = &shared.limits;
    let header: RequestHeader = match raw.header() {
        Ok(h) => h,
        Err(_) => return reject(Some(&mut send), &mut recv, code::MALFORMED_FRAME),
    };
    let oneway = header.flags & flags::ONEWAY != 0;
    let Some(codec) = Codec::from_wire(header.codec) else {
        let status = error_status(
            status::UNSUPPORTED_CODEC,
            format!("unsupported codec {}", header.codec),
        );
        return respond(&mut send, status, Metadata::new(), &[], limits).await;
    };
    let handler = match shared
        .services
        .lookup(&header.service_path, &header.service_method)
    {
        Lookup::Found(h) => h,
        Lookup::UnknownService => {
            let status = error_status(
                status::UNKNOWN_SERVICE,
                format!("unknown service `{}`", header.service_path),
            );
            return respond(&mut send, status, Metadata::new(), &[], limits).await;
        }
        Lookup::UnknownMethod => {
            let status = error_status(
                status::UNKNOWN_METHOD,
                format!(
                    "unknown method `{}` on service `{}`",
                    header.service_method, header.service_path
                ),
            );
            return respond(&mut send, status, Metadata::new(), &[], limits).await;
        }
    };
    let deadline =
        (header.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(header.timeout_ms));
    // The call's own token (no registration with a shared parent, which would lock on every
    // call): cancelled when this task ends early — caller gone, deadline, shutdown (all
    // selected below) — or is dropped.
    let cancel = CancellationToken::new();
    let _cancel_on_exit = cancel.clone().drop_guard();
    let span = tracing::debug_span!(
        "serve",
        service = %header.service_path,
        method = %header.service_method,
        conn = conn.id()
    );
    let ctx = Context::new(
        conn.clone(),
        header.service_path,
        header.service_method,
        header.metadata,
        deadline,
        cancel.clone(),
    );
    let handler = AssertUnwindSafe(handler(ctx.clone(), codec, raw.payload))
        .catch_unwind()
        .instrument(span);
    shared.counters.calls_served.fetch_add(1, Ordering::Relaxed);
    if oneway {
        let _ = send.finish();
        drop(send);
        tokio::select! {
            _ = handler => {}
            () = shared.shutdown.cancelled() => {}
        }
        return;
    }
    let stopped = send.stopped();
    let deadline_passed = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    // Biased, handler first: a handler that finishes in its first poll never arms the deadline
    // timer or registers for the stream's stop notification.
    let status_and_payload = tokio::select! {
        biased;
        result = handler => match result {
            Ok(Ok(payload)) => (Status::Ok, payload),
            Ok(Err(e)) => (error_status(e.code(), e.message()), Bytes::new()),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".to_owned());
                tracing::error!(conn = conn.id(), "handler panicked: {message}");
                (error_status(status::INTERNAL, message), Bytes::new())
            }
        },
        () = deadline_passed => {
            cancel.cancel();
            (error_status(status::DEADLINE_EXCEEDED, "deadline exceeded"), Bytes::new())
        }
        _ = stopped => {
            // The caller gave up (timeout, dropped future) or the connection is gone.
            cancel.cancel();
            let _ = send.reset(varint(code::CANCELLED));
            return;
        }
        () = shared.shutdown.cancelled() => {
            let _ = send.reset(varint(code::SHUTTING_DOWN));
            return;
        }
    };
    if !matches!(status_and_payload.0, Status::Ok) {
        shared
            .counters
            .call_handler_errors
            .fetch_add(1, Ordering::Relaxed);
    }
    let (status, payload) = status_and_payload;
    respond(
        &mut send,
        status,
        ctx.take_reply_metadata(),
        &payload,
        limits,
    )
    .await;
    if shared.shutting_down.load(Ordering::Acquire) {
        // Draining: stay tracked until the client has the reply, so closing the connection
        // afterwards cannot discard it.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
}

async fn serve_hello(conn: &Connection, mut send: quinn::SendStream, raw: RawFrame) {
    let limits = &conn.inner.shared.limits;
    let hello: HelloHeader = match raw.header() {
        Ok(h) => h,
        Err(_) => {
            let _ = send.reset(varint(code::MALFORMED_FRAME));
            return;
        }
    };
    let status = match hello.client_id {
        Some(id) if id.is_empty() => error_status(status::HELLO_REFUSED, "empty client id"),
        Some(id) => {
            conn.bind_client_id(id);
            Status::Ok
        }
        None => Status::Ok,
    };
    respond(&mut send, status, Metadata::new(), &[], limits).await;
}

async fn serve_receipt_push(conn: &Connection, mut send: quinn::SendStream, raw: RawFrame) {
    let limits = conn.inner.shared.limits;
    let status = match push_message(conn, raw) {
        Err(_) => {
            let _ = send.reset(varint(code::MALFORMED_FRAME));
            return;
        }
        Ok(msg) => match &conn.inner.shared.push_sink {
            None => error_status(status::PUSH_REJECTED, "this client receives no pushes"),
            Some(sink) => match sink.deliver(msg).await {
                Delivery::Delivered => Status::Ok,
                Delivery::Dropped => error_status(status::PUSH_DROPPED, "push channel full"),
                Delivery::Closed => error_status(status::PUSH_REJECTED, "push channel closed"),
            },
        },
    };
    respond(&mut send, status, Metadata::new(), &[], &limits).await;
}

fn push_message(conn: &Connection, raw: RawFrame) -> Result<PushMessage, FrameError> {
    let header: PushHeader = raw.header()?;
    Ok(PushMessage {
        service_path: header.service_path,
        service_method: header.service_method,
        metadata: header.metadata,
        payload: raw.payload,
        server: conn.server_addr(),
    })
}

/// Reads pushes in the order the server opened their streams and hands each to the push channel.
/// Under backpressure this loop waits, which stops QUIC from granting the server new streams.
async fn accept_pushes(conn: &Connection) {
    let shared = &conn.inner.shared;
    loop {
        let Ok(mut recv) = conn.inner.quic.accept_uni().await else {
            break;
        };
        let Some(sink) = &shared.push_sink else {
            reject(None, &mut recv, code::PUSH_REJECTED);
            continue;
        };
        let raw = match within(
            shared.frame_timeout,
            wire::read_frame(&mut recv, &shared.limits),
        )
        .await
        {
            Ok(Ok(raw)) if raw.kind == kind::PUSH => raw,
            Ok(Ok(_)) => {
                reject(None, &mut recv, code::UNEXPECTED_STREAM);
                continue;
            }
            Ok(Err(e)) => {
                tracing::debug!(conn = conn.id(), "bad push frame: {e:?}");
                if let Some(c) = e.stream_code() {
                    reject(None, &mut recv, c);
                }
                continue;
            }
            Err(_) => {
                reject(None, &mut recv, code::CANCELLED);
                continue;
            }
        };
        match push_message(conn, raw) {
            Ok(msg) => {
                if sink.deliver(msg).await == Delivery::Dropped {
                    tracing::debug!(conn = conn.id(), "push dropped: channel full");
                }
            }
            Err(e) => tracing::debug!(conn = conn.id(), "bad push header: {e:?}"),
        }
    }
}

/// Sends a hello declaring `client_id` and waits for the server's answer.
pub(crate) async fn hello(
    conn: &Connection,
    client_id: Option<String>,
    metadata: Metadata,
) -> Result<()> {
    let header = HelloHeader {
        client_id: client_id.clone(),
        metadata,
    };
    let frame = wire::encode_frame(kind::HELLO, &header, &[], &conn.inner.shared.limits)?;
    let options = CallOptions {
        timeout: Some(
            conn.inner
                .shared
                .call_timeout
                .unwrap_or(Duration::from_secs(10)),
        ),
        ..CallOptions::default()
    };
    conn.exchange(frame, ("", "hello"), &options, false).await?;
    conn.set_client_id_local(client_id);
    Ok(())
}
