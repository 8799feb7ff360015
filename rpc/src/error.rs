//! The error type of every fallible quicx operation.

use std::{fmt, net::SocketAddr, time::Duration};

use crate::wire::{FrameError, StreamCode, status};

/// Everything that can go wrong in a quicx call, push or connection.
///
/// One variant per failure a caller handles differently; each says when it happens. Errors that
/// the *remote* side reported travel on the wire as numeric codes (see `docs/PROTOCOL.md`) and
/// are turned back into the matching variant here, so a caller can `match` on them without
/// parsing strings. Transport failures keep quinn's typed cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer has no service registered under this path (status code `UNKNOWN_SERVICE`).
    #[error("unknown service `{service_path}`")]
    UnknownService {
        /// The service path that was asked for.
        service_path: String,
    },
    /// The service exists but has no method of this name (status code `UNKNOWN_METHOD`).
    #[error("unknown method `{service_method}` on service `{service_path}`")]
    UnknownMethod {
        /// The service path that was asked for.
        service_path: String,
        /// The method that was asked for.
        service_method: String,
    },
    /// A payload could not be decoded: the arguments on the remote side (status code
    /// `DECODE_ERROR`), or the reply here. The message is the codec's.
    #[error("decode failed: {0}")]
    Decode(String),
    /// A value could not be encoded (arguments here, or the reply on the remote side, status code
    /// `ENCODE_ERROR`). The message is the codec's.
    #[error("encode failed: {0}")]
    Encode(String),
    /// A frame went past a size limit: checked here before sending, or by the peer, which then
    /// reset the stream with `HEADER_TOO_LARGE` / `PAYLOAD_TOO_LARGE`.
    #[error("{what} too large{}", limit.map(|l| format!(" (limit {l} bytes)")).unwrap_or_default())]
    TooLarge {
        /// Which part of the frame was too large.
        what: FramePart,
        /// The limit that was exceeded, when known on this side.
        limit: Option<u64>,
    },
    /// The call's deadline passed before a reply came: here (the stream was reset and the remote
    /// handler cancelled, or the remote's answer `DEADLINE_EXCEEDED` came once it had passed),
    /// or on the remote side first, which answered with status `DEADLINE_EXCEEDED`.
    #[error("deadline exceeded{}", if *remote { " on the remote side" } else { "" })]
    DeadlineExceeded {
        /// `true` when the remote answered `DEADLINE_EXCEEDED` before the caller's own deadline
        /// passed (a deadline of the remote's own). A quicx remote counts the caller's timeout
        /// from when it has read the request, so its deadline never passes first: its answer,
        /// read at or after the caller's deadline, is `remote: false`.
        remote: bool,
    },
    /// Connecting (QUIC handshake and, with a client id, the hello) took longer than the connect
    /// timeout, or than what was left of the call's deadline.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// A push could not be handed to QUIC within the push timeout: the client applied
    /// backpressure (its channel was full) or stopped answering.
    #[error("push timed out after {0:?}")]
    PushTimeout(Duration),
    /// The peer stopped answering liveness probes while calls waited for it, so this side closed
    /// the connection without waiting for the idle timeout (close code `PEER_UNRESPONSIVE`).
    #[error("the peer stopped answering for {0:?}: connection closed")]
    PeerUnresponsive(Duration),
    /// The peer cancelled the stream (reset code `CANCELLED`).
    #[error("cancelled by the peer")]
    Cancelled,
    /// The remote handler returned an error, with its code and message.
    #[error("remote error {code}: {message}")]
    Remote {
        /// Application error code (see [`ServiceError`]).
        code: u32,
        /// Human readable message.
        message: String,
    },
    /// The remote handler panicked or failed inside quicx (status code `INTERNAL`, or reset code
    /// `INTERNAL`); the message is the remote's.
    #[error("internal error on the remote side: {0}")]
    Internal(String),
    /// The remote side refused the call because it is shutting down (status or reset code
    /// `SHUTTING_DOWN`, or connection close `SHUTDOWN`).
    #[error("the remote side is shutting down")]
    ShuttingDown,
    /// A push that asked for a receipt was dropped by the client: its full-channel policy, or
    /// its push handler panicked (status code `PUSH_DROPPED`).
    #[error("push dropped by the client: its channel was full or its push handler panicked")]
    PushDropped,
    /// A push reached a client that has no push channel (status or reset code `PUSH_REJECTED`).
    #[error("push rejected: the client does not receive pushes")]
    PushRejected,
    /// The server refused the client's hello (status code `HELLO_REFUSED`), for example an
    /// empty client id. The message is the server's.
    #[error("hello refused by the server: {0}")]
    HelloRefused(String),
    /// The server could not verify the identity this client declared: no credentials, wrong
    /// ones, or no verified source configured (status code `UNAUTHENTICATED`). The message is
    /// the server's.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The credentials are valid but not for the identity claimed, e.g. a certificate for
    /// another device (status code `PERMISSION_DENIED`). The message is the server's.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The peer refused the stream because it holds too many request bytes that wait to be read
    /// (its memory budget, per connection or in all; reset code `BUSY`). Nothing ran; retry
    /// later or elsewhere.
    #[error("the peer is over its memory budget for buffered requests")]
    Overloaded,
    /// The server refused the call because the caller is over a call rate (per connection or
    /// per identity; status code `RATE_LIMITED`). The handler did not run; retry later.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// The operation needs the other role: only a server pushes ([`Connection::send_message`]
    /// on a client's connection fails with this at once).
    ///
    /// [`Connection::send_message`]: crate::Connection::send_message
    #[error("{0} is not possible from this side of the connection")]
    WrongSide(&'static str),
    /// The peer sent something that is not valid quicx protocol, or rejected what this side sent.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The connection was closed or lost while the operation ran, or before it started.
    #[error("connection lost: {0}")]
    ConnectionLost(#[source] quinn::ConnectionError),
    /// There is no connection to use.
    #[error("not connected: {0}")]
    NotConnected(NotConnected),
    /// The QUIC/TLS handshake failed: certificate not trusted, wrong server name, no common ALPN,
    /// connection refused.
    #[error("handshake failed: {0}")]
    Handshake(#[source] HandshakeError),
    /// TLS material could not be loaded or a TLS configuration is invalid.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No endpoint could be selected for this service path (empty discovery, all filtered out).
    #[error("no endpoint available for `{0}`")]
    NoEndpoints(String),
    /// A discovery backend failed.
    #[error(transparent)]
    Discovery(#[from] quicx_discovery::DiscoveryError),
    /// An I/O error (binding a socket, reading a file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The durable store failed: it could not be opened (not a store, or damaged beyond what the
    /// database repairs), or a write could not be committed.
    #[error("durable store: {0}")]
    Store(String),
    /// A durable message was refused: it would exceed a bound of the store
    /// ([`DurableLimits`](crate::DurableLimits)) under [`Overflow::Refuse`](crate::Overflow::Refuse).
    #[error("durable store full: {0}")]
    StoreFull(String),
}

/// Which part of a frame went past a limit ([`Error::TooLarge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramePart {
    /// The header (service names, metadata).
    Header,
    /// The payload (the encoded arguments, reply or message).
    Payload,
}

impl fmt::Display for FramePart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::Payload => "payload",
        })
    }
}

/// What was wrong with the protocol ([`Error::Protocol`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer sent a frame this side could not parse (it was answered with
    /// `MALFORMED_FRAME`).
    #[error("malformed frame from the peer: {0}")]
    Malformed(String),
    /// The peer reset the stream with `MALFORMED_FRAME`: it could not parse what this side sent.
    #[error("the peer rejected a frame as malformed")]
    RejectedAsMalformed,
    /// The peer reset the stream with `UNEXPECTED_STREAM`: it takes no stream of this kind here.
    #[error("the peer does not accept this stream")]
    UnexpectedStream,
    /// The peer answered with a frame of the wrong kind.
    #[error("expected a response frame, got kind {0:#04x}")]
    UnexpectedFrame(u8),
    /// The peer does not know the codec of the request (status `UNSUPPORTED_CODEC`).
    #[error("{0}")]
    UnsupportedCodec(String),
    /// The peer reset a stream with a code this version does not define.
    #[error("stream reset with unknown code {0}")]
    UnknownStreamCode(u64),
}

/// Why there is no connection to use ([`Error::NotConnected`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotConnected {
    /// The client (or XClient) was closed by the application.
    #[error("the client was closed")]
    Closed,
    /// The connection was lost and the client does not reconnect.
    #[error("the connection was lost and reconnect is off")]
    ReconnectOff,
    /// The client is reconnecting to this server and did not make it in time.
    #[error("reconnecting to {0}")]
    Reconnecting(SocketAddr),
    /// No client is bound to this identity on the server.
    #[error("no client bound to `{0}`")]
    NoClient(String),
    /// A connection attempt to this endpoint failed a moment ago (shared by the callers that
    /// waited for it); the endpoint is cooling down.
    #[error("connecting to {endpoint} failed: {cause}")]
    ConnectFailed {
        /// The endpoint's address.
        endpoint: String,
        /// The attempt's error, as text (it belongs to the caller that made the attempt).
        cause: String,
    },
}

/// Why a handshake failed ([`Error::Handshake`]).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The connection could not be started (invalid server name or address, endpoint stopping).
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// The peer refused or the TLS handshake failed (untrusted certificate, no common ALPN).
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
}

impl Error {
    /// A copy of a refusal that does not come from the transport (the server refused the
    /// hello or the credentials, or the configuration is wrong), for the callers that waited
    /// on one connection attempt; `None` for the other kinds.
    pub(crate) fn copy_of_refusal(&self) -> Option<Self> {
        Some(match self {
            Self::HelloRefused(m) => Self::HelloRefused(m.clone()),
            Self::Unauthenticated(m) => Self::Unauthenticated(m.clone()),
            Self::PermissionDenied(m) => Self::PermissionDenied(m.clone()),
            Self::RateLimited(m) => Self::RateLimited(m.clone()),
            Self::Config(m) => Self::Config(m.clone()),
            Self::Tls(m) => Self::Tls(m.clone()),
            Self::Protocol(p) => Self::Protocol(p.clone()),
            Self::Internal(m) => Self::Internal(m.clone()),
            _ => return None,
        })
    }

    /// Whether the error came from the transport (connection lost, deadline, handshake, refused
    /// stream) rather than from the remote handler. Fail modes retry only these.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::DeadlineExceeded { .. }
                | Self::ConnectTimeout(_)
                | Self::PeerUnresponsive(_)
                | Self::ConnectionLost(_)
                | Self::NotConnected(_)
                | Self::Handshake(_)
                | Self::ShuttingDown
                | Self::Overloaded
                | Self::Cancelled
                | Self::Io(_)
        )
    }

    /// A short, stable, snake_case name of the error's kind (`"unauthenticated"`,
    /// `"deadline_exceeded"`, `"remote"`, ...): for metric labels and one-line reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownService { .. } => "unknown_service",
            Self::UnknownMethod { .. } => "unknown_method",
            Self::Decode(_) => "decode_error",
            Self::Encode(_) => "encode_error",
            Self::TooLarge { .. } => "too_large",
            Self::DeadlineExceeded { .. } => "deadline_exceeded",
            Self::ConnectTimeout(_) => "connect_timeout",
            Self::PushTimeout(_) => "push_timeout",
            Self::PeerUnresponsive(_) => "peer_unresponsive",
            Self::Cancelled => "cancelled",
            Self::Remote { .. } => "remote",
            Self::Internal(_) => "internal",
            Self::ShuttingDown => "shutting_down",
            Self::PushDropped => "push_dropped",
            Self::PushRejected => "push_rejected",
            Self::HelloRefused(_) => "hello_refused",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::PermissionDenied(_) => "permission_denied",
            Self::Overloaded => "overloaded",
            Self::RateLimited(_) => "rate_limited",
            Self::WrongSide(_) => "wrong_side",
            Self::Protocol(_) => "protocol",
            Self::ConnectionLost(_) => "connection_lost",
            Self::NotConnected(_) => "not_connected",
            Self::Handshake(_) => "handshake",
            Self::Tls(_) => "tls",
            Self::Config(_) => "config",
            Self::NoEndpoints(_) => "no_endpoints",
            Self::Discovery(_) => "discovery",
            Self::Io(_) => "io",
            Self::Store(_) => "store",
            Self::StoreFull(_) => "store_full",
        }
    }

    /// Builds the error that matches a status code and message from a response frame.
    pub(crate) fn from_status(
        code: u32,
        message: String,
        service_path: &str,
        service_method: &str,
    ) -> Self {
        match code {
            status::UNKNOWN_SERVICE => Self::UnknownService {
                service_path: service_path.to_owned(),
            },
            status::UNKNOWN_METHOD => Self::UnknownMethod {
                service_path: service_path.to_owned(),
                service_method: service_method.to_owned(),
            },
            status::DECODE_ERROR => Self::Decode(message),
            status::ENCODE_ERROR => Self::Encode(message),
            status::DEADLINE_EXCEEDED => Self::DeadlineExceeded { remote: true },
            status::INTERNAL => Self::Internal(message),
            status::SHUTTING_DOWN => Self::ShuttingDown,
            status::PUSH_DROPPED => Self::PushDropped,
            status::PUSH_REJECTED => Self::PushRejected,
            status::UNSUPPORTED_CODEC => ProtocolError::UnsupportedCodec(message).into(),
            status::HELLO_REFUSED => Self::HelloRefused(message),
            status::UNAUTHENTICATED => Self::Unauthenticated(message),
            status::PERMISSION_DENIED => Self::PermissionDenied(message),
            status::RATE_LIMITED => Self::RateLimited(message),
            _ => Self::Remote { code, message },
        }
    }

    /// Builds the error that matches a stream reset or stop code sent by the peer.
    pub(crate) fn from_stream_code(stream_code: StreamCode) -> Self {
        match stream_code {
            StreamCode::CANCELLED => Self::Cancelled,
            StreamCode::MALFORMED_FRAME => ProtocolError::RejectedAsMalformed.into(),
            StreamCode::HEADER_TOO_LARGE => Self::TooLarge {
                what: FramePart::Header,
                limit: None,
            },
            StreamCode::PAYLOAD_TOO_LARGE => Self::TooLarge {
                what: FramePart::Payload,
                limit: None,
            },
            StreamCode::SHUTTING_DOWN => Self::ShuttingDown,
            StreamCode::UNEXPECTED_STREAM => ProtocolError::UnexpectedStream.into(),
            StreamCode::PUSH_REJECTED => Self::PushRejected,
            StreamCode::INTERNAL => Self::Internal("stream reset by the peer".into()),
            StreamCode::BUSY => Self::Overloaded,
            other => ProtocolError::UnknownStreamCode(other.value()).into(),
        }
    }
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Malformed(m) => ProtocolError::Malformed(m).into(),
            FrameError::HeaderTooLarge { limit } => Self::TooLarge {
                what: FramePart::Header,
                limit,
            },
            FrameError::PayloadTooLarge { limit } => Self::TooLarge {
                what: FramePart::Payload,
                limit,
            },
            FrameError::Encode(m) => Self::Encode(m),
            FrameError::OverBudget => Self::Overloaded,
            FrameError::Read(e) => e.into(),
        }
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as C;
        match e {
            C::TransportError(ref t) if is_handshake_code(u64::from(t.code)) => {
                Self::Handshake(e.into())
            }
            C::ConnectionClosed(ref c) if is_handshake_code(u64::from(c.error_code)) => {
                Self::Handshake(e.into())
            }
            C::ApplicationClosed(ref c)
                if u64::from(c.error_code) == crate::wire::CloseCode::SHUTDOWN.value() =>
            {
                Self::ShuttingDown
            }
            other => Self::ConnectionLost(other),
        }
    }
}

/// TLS alerts (`CRYPTO_ERROR`, 0x100-0x1ff) and `CONNECTION_REFUSED` (0x2) end a handshake.
fn is_handshake_code(transport_code: u64) -> bool {
    transport_code == 0x2 || (0x100..0x200).contains(&transport_code)
}

impl From<quinn::ConnectError> for Error {
    fn from(e: quinn::ConnectError) -> Self {
        Self::Handshake(e.into())
    }
}

impl From<quinn::ReadError> for Error {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(c) => Self::from_stream_code(StreamCode::from_value(c.into())),
            quinn::ReadError::ConnectionLost(c) => c.into(),
            // A stream this side already closed, or 0-RTT data rejected: the stream is gone.
            _ => Self::ConnectionLost(quinn::ConnectionError::LocallyClosed),
        }
    }
}

impl From<quinn::WriteError> for Error {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(c) => {
                Self::from_stream_code(StreamCode::from_value(c.into()))
            }
            quinn::WriteError::ConnectionLost(c) => c.into(),
            _ => Self::ConnectionLost(quinn::ConnectionError::LocallyClosed),
        }
    }
}

impl From<quinn::ClosedStream> for Error {
    fn from(_: quinn::ClosedStream) -> Self {
        Self::ConnectionLost(quinn::ConnectionError::LocallyClosed)
    }
}

/// The error a handler returns: an application code and a message, delivered to the caller as
/// [`Error::Remote`].
///
/// Any `std::error::Error` converts into it with `?` (code [`ServiceError::APPLICATION`]), so a
/// handler can propagate errors of nested calls and libraries directly.
///
/// ```
/// use quicx::ServiceError;
/// let e = ServiceError::new(4001, "divide by zero");
/// assert_eq!(e.code(), 4001);
/// ```
pub struct ServiceError {
    code: u32,
    message: String,
}

impl ServiceError {
    /// The code of errors converted from a plain `std::error::Error`.
    pub const APPLICATION: u32 = status::APPLICATION;

    /// An error with an application-chosen code. Codes below 1000 are reserved for quicx's own
    /// statuses (see `docs/PROTOCOL.md`); use 1000 and above.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The numeric code.
    pub fn code(&self) -> u32 {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status that answers a refusal of the authenticator or the call authorizer.
    pub(crate) fn from_refusal(refusal: crate::Refusal) -> Self {
        match refusal {
            crate::Refusal::Unauthenticated(m) => Self::new(status::UNAUTHENTICATED, m),
            crate::Refusal::PermissionDenied(m) => Self::new(status::PERMISSION_DENIED, m),
        }
    }

    pub(crate) fn status(code: u32, message: impl Into<String>) -> Self {
        Self::new(code, message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for ServiceError {
    fn from(e: E) -> Self {
        Self::new(status::APPLICATION, e.to_string())
    }
}

impl fmt::Debug for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceError")
            .field("code", &self.code)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error {}: {}", self.code, self.message)
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
