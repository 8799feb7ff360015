//! Lifecycle events of servers and clients.

use std::net::SocketAddr;

use crate::{Connection, wire::CloseCode};

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer closed the connection with an application close code (see `docs/PROTOCOL.md`).
    ClosedByPeer {
        /// The close code (`CLOSE_NORMAL`, `CLOSE_SHUTDOWN`, ...).
        code: u64,
        /// The reason text the peer gave.
        reason: String,
    },
    /// This side closed it (client `close`, server `shutdown`).
    ClosedLocally,
    /// Nothing was heard from the peer for the idle timeout: it was killed, lost power or its
    /// network went away.
    IdleTimeout,
    /// The connection failed for another transport reason.
    Lost(String),
}

impl DisconnectReason {
    pub(crate) fn from_quinn(e: &quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as C;
        match e {
            C::ApplicationClosed(c) => Self::ClosedByPeer {
                code: c.error_code.into_inner(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            C::LocallyClosed => Self::ClosedLocally,
            C::TimedOut => Self::IdleTimeout,
            other => Self::Lost(other.to_string()),
        }
    }

    /// Whether the server ended the connection because it shut down.
    pub fn is_server_shutdown(&self) -> bool {
        matches!(self, Self::ClosedByPeer { code: c, .. } if *c == CloseCode::SHUTDOWN.value())
    }
}

/// What happens to a server's clients. Subscribe with
/// [`Server::events`](crate::Server::events).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client connected (after the handshake; before any hello).
    Connected(Connection),
    /// A connection was bound to a client identity (hello, mTLS certificate, or a handler).
    Bound {
        /// The connection.
        conn: Connection,
        /// The identity it is now known by.
        client_id: String,
    },
    /// A connection verified for a client identity took it over from an older connection,
    /// which the server then closed (close code `TAKEN_OVER`). A `Bound` event for `new`
    /// precedes it.
    TakenOver {
        /// The identity.
        client_id: String,
        /// The connection that held it (closed just after this event).
        old: Connection,
        /// The connection that holds it now.
        new: Connection,
    },
    /// A client's connection ended; it has left the registry.
    Disconnected {
        /// The connection (closed now).
        conn: Connection,
        /// Why it ended.
        reason: DisconnectReason,
    },
}

/// What happens to a client's connection to its server. Subscribe with
/// [`ClientBuilder::events`](crate::ClientBuilder::events).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The first connection is up.
    Connected {
        /// The server.
        server: SocketAddr,
    },
    /// The connection ended; the client reconnects unless it was closed.
    Disconnected {
        /// The server.
        server: SocketAddr,
        /// Why it ended.
        reason: DisconnectReason,
    },
    /// A new connection is up after a disconnect (and the identity, if any, is declared again).
    Reconnected {
        /// The server.
        server: SocketAddr,
        /// How many attempts it took.
        attempts: u32,
    },
}
