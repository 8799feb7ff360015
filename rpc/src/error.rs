//! The error type of every fallible quicx operation.

use std::fmt;

use crate::wire::{code, status};

/// Everything that can go wrong in a quicx call, push or connection.
///
/// Every variant says when it happens. Errors that the *remote* side reported travel on the wire as
/// numeric codes (see `docs/PROTOCOL.md`) and are turned back into the matching variant here, so a
/// caller can `match` on them without parsing strings.
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
    /// `DECODE_ERROR`), or the reply here.
    #[error("decode failed: {0}")]
    Decode(String),
    /// A value could not be encoded (arguments here, or the reply on the remote side, status code
    /// `ENCODE_ERROR`).
    #[error("encode failed: {0}")]
    Encode(String),
    /// A frame went past a size limit: checked here before sending, or by the peer, which then
    /// reset the stream with `HEADER_TOO_LARGE` / `PAYLOAD_TOO_LARGE`.
    #[error("{what} too large{}", limit.map(|l| format!(" (limit {l} bytes)")).unwrap_or_default())]
    TooLarge {
        /// Which part of the frame was too large: `"header"` or `"payload"`.
        what: &'static str,
        /// The limit that was exceeded, when known on this side.
        limit: Option<u64>,
    },
    /// The call's deadline passed before a reply came (here, or on the remote side, status code
    /// `DEADLINE_EXCEEDED`). The stream was reset, and the remote handler was cancelled.
    #[error("deadline exceeded")]
    Timeout,
    /// The peer cancelled the stream (reset code `CANCELLED`).
    #[error("cancelled by the peer")]
    Cancelled,
    /// The remote handler returned an error, with its code and message.
    #[error("remote error {code}: {message}")]
    Remote {
        /// Application error code (see [`ServiceError`](crate::ServiceError)).
        code: u32,
        /// Human readable message.
        message: String,
    },
    /// The remote handler panicked (status code `INTERNAL`).
    #[error("internal error on the remote side: {0}")]
    Internal(String),
    /// The remote side refused the call because it is shutting down (status or reset code
    /// `SHUTTING_DOWN`).
    #[error("the remote side is shutting down")]
    ShuttingDown,
    /// A push that asked for a receipt was dropped by the client's full-channel policy
    /// (status code `PUSH_DROPPED`).
    #[error("push dropped by the client: its channel was full")]
    PushDropped,
    /// A push reached a client that has no push channel (status or reset code `PUSH_REJECTED`).
    #[error("push rejected: the client does not receive pushes")]
    PushRejected,
    /// The peer sent something that is not valid quicx protocol (reset code `MALFORMED_FRAME`).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection was closed or lost while the operation ran, or before it started.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// There is no connection to use (a client is reconnecting and did not make it in time, or was
    /// closed).
    #[error("not connected: {0}")]
    NotConnected(String),
    /// The QUIC/TLS handshake failed: certificate not trusted, wrong server name, no common ALPN,
    /// connection refused.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// TLS material could not be loaded or a TLS configuration is invalid.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No endpoint could be selected (empty discovery, all filtered out).
    #[error("no endpoint available for `{0}`")]
    NoEndpoints(String),
    /// A discovery backend failed.
    #[error(transparent)]
    Discovery(#[from] quicx_discovery::DiscoveryError),
    /// An I/O error (binding a socket, reading a file).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether the error came from the transport (connection lost, timeout, handshake, refused
    /// stream) rather than from the remote handler. Fail modes retry only these.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Timeout
                | Self::ConnectionLost(_)
                | Self::NotConnected(_)
                | Self::Handshake(_)
                | Self::ShuttingDown
                | Self::Cancelled
                | Self::Io(_)
        )
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
            status::DEADLINE_EXCEEDED => Self::Timeout,
            status::INTERNAL => Self::Internal(message),
            status::SHUTTING_DOWN => Self::ShuttingDown,
            status::PUSH_DROPPED => Self::PushDropped,
            status::PUSH_REJECTED => Self::PushRejected,
            status::UNSUPPORTED_CODEC => Self::Protocol(message),
            _ => Self::Remote { code, message },
        }
    }

    /// Builds the error that matches a stream reset or stop code sent by the peer.
    pub(crate) fn from_stream_code(stream_code: u64) -> Self {
        match stream_code {
            code::CANCELLED => Self::Cancelled,
            code::MALFORMED_FRAME => Self::Protocol("the peer rejected a malformed frame".into()),
            code::HEADER_TOO_LARGE => Self::TooLarge {
                what: "header",
                limit: None,
            },
            code::PAYLOAD_TOO_LARGE => Self::TooLarge {
                what: "payload",
                limit: None,
            },
            code::SHUTTING_DOWN => Self::ShuttingDown,
            code::UNEXPECTED_STREAM => {
                Self::Protocol("the peer does not accept this stream".into())
            }
            code::PUSH_REJECTED => Self::PushRejected,
            code::INTERNAL => Self::Internal("stream reset by the peer".into()),
            other => Self::Protocol(format!(
                "stream reset by the peer with unknown code {other}"
            )),
        }
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as C;
        match e {
            C::TransportError(ref t) if is_handshake_code(u64::from(t.code)) => {
                Self::Handshake(e.to_string())
            }
            C::ConnectionClosed(ref c) if is_handshake_code(u64::from(c.error_code)) => {
                Self::Handshake(e.to_string())
            }
            C::ApplicationClosed(ref c) if u64::from(c.error_code) == code::CLOSE_SHUTDOWN => {
                Self::ShuttingDown
            }
            C::TimedOut => Self::ConnectionLost("idle timeout: the peer stopped answering".into()),
            other => Self::ConnectionLost(other.to_string()),
        }
    }
}

/// TLS alerts (`CRYPTO_ERROR`, 0x100-0x1ff) and `CONNECTION_REFUSED` (0x2) end a handshake.
fn is_handshake_code(transport_code: u64) -> bool {
    transport_code == 0x2 || (0x100..0x200).contains(&transport_code)
}

impl From<quinn::ConnectError> for Error {
    fn from(e: quinn::ConnectError) -> Self {
        Self::Handshake(e.to_string())
    }
}

impl From<quinn::ReadError> for Error {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(c) => Self::from_stream_code(c.into_inner()),
            quinn::ReadError::ConnectionLost(c) => c.into(),
            other => Self::ConnectionLost(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for Error {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(c) => Self::from_stream_code(c.into_inner()),
            quinn::WriteError::ConnectionLost(c) => c.into(),
            other => Self::ConnectionLost(other.to_string()),
        }
    }
}

impl From<quinn::ClosedStream> for Error {
    fn from(e: quinn::ClosedStream) -> Self {
        Self::ConnectionLost(e.to_string())
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
