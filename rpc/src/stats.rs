//! Counters a user can read.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) calls_sent: AtomicU64,
    pub(crate) call_errors: AtomicU64,
    pub(crate) calls_served: AtomicU64,
    pub(crate) call_handler_errors: AtomicU64,
    pub(crate) pushes_sent: AtomicU64,
    pub(crate) push_errors: AtomicU64,
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
}

/// A snapshot of a server's or client's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls this side made (forward calls on a client, reverse calls on a server).
    pub calls_sent: u64,
    /// Calls this side made that ended in an error.
    pub call_errors: u64,
    /// Calls this side's handlers served.
    pub calls_served: u64,
    /// Served calls answered with an error status.
    pub call_handler_errors: u64,
    /// Pushes handed to QUIC.
    pub pushes_sent: u64,
    /// Pushes that failed.
    pub push_errors: u64,
    /// Connections accepted (servers) or established (clients), over the lifetime.
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Hellos refused because their identity could not be verified, and calls refused by the
    /// call authorizer (servers).
    pub auth_failures: u64,
    /// Request bytes buffered now before their handlers run, over all connections (servers;
    /// bounded by [`AbuseLimits::buffered_bytes_total`](crate::AbuseLimits::buffered_bytes_total)).
    pub buffered_request_bytes: u64,
    /// Durable messages pending in the store, over all identities (servers with a store).
    pub durable_pending: u64,
    /// Their stored bytes, payload and header, as
    /// [`DurableLimits`](crate::DurableLimits) counts them.
    pub durable_pending_bytes: u64,
    /// Identities with at least one durable message pending
    /// ([`Server::durable_backlog`](crate::Server::durable_backlog) names the largest).
    pub durable_pending_identities: u64,
    /// Durable messages acknowledged by their devices (and removed). Each message counts once
    /// in one of `durable_delivered`, `durable_expired`, `durable_overflowed` or a cancel:
    /// one that expired, overflowed or was cancelled after it went out and before its
    /// acknowledgement came is not counted here again.
    pub durable_delivered: u64,
    /// Of those, messages sent more than once before their acknowledgement.
    pub durable_redelivered: u64,
    /// Durable messages dropped because their TTL passed.
    pub durable_expired: u64,
    /// Durable messages dropped to make room ([`Overflow::DropOldest`](crate::Overflow::DropOldest)).
    pub durable_overflowed: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self, open_connections: u64) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            calls_sent: get(&self.calls_sent),
            call_errors: get(&self.call_errors),
            calls_served: get(&self.calls_served),
            call_handler_errors: get(&self.call_handler_errors),
            pushes_sent: get(&self.pushes_sent),
            push_errors: get(&self.push_errors),
            connections: get(&self.connections_accepted),
            open_connections,
            auth_failures: get(&self.auth_failures),
            buffered_request_bytes: 0,
            durable_pending: 0,
            durable_pending_bytes: 0,
            durable_pending_identities: 0,
            durable_delivered: 0,
            durable_redelivered: 0,
            durable_expired: 0,
            durable_overflowed: 0,
        }
    }
}
