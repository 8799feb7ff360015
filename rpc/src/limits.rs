//! Limits against abuse: call rates per connection and per identity (GCRA, the `governor`
//! crate), connections per source address.

use crate::sync::Lock;
use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::wire::Budget;

/// Limits a server applies against abusive clients. The memory budgets are on by default; the
/// rates and the per-address cap are off (a fleet behind one carrier NAT shares an address, and
/// a backend connection may carry 100k+ calls/s); turn on what a deployment needs. The defaults
/// of [`TransportOptions`](crate::TransportOptions) and [`Limits`](crate::Limits) also bound
/// concurrent calls, streams and frame sizes.
///
/// A call over a rate is answered with status `RATE_LIMITED` without running its handler; the
/// caller gets [`Error::RateLimited`](crate::Error::RateLimited) and other clients are not
/// affected. Rates allow bursts of up to one second's worth of calls.
///
/// ```
/// use std::num::NonZeroU32;
/// let limits = quicx::AbuseLimits {
///     calls_per_second_per_connection: NonZeroU32::new(1_000),
///     calls_per_second_per_identity: NonZeroU32::new(2_000),
///     connections_per_ip: Some(64),
///     ..quicx::AbuseLimits::default()
/// };
/// let builder = quicx::Server::builder().abuse_limits(limits);
/// # let _ = builder;
/// ```
#[derive(Debug, Clone)]
pub struct AbuseLimits {
    /// Calls one connection may start per second.
    pub calls_per_second_per_connection: Option<NonZeroU32>,
    /// Calls all connections of one verified client identity may start per second.
    pub calls_per_second_per_identity: Option<NonZeroU32>,
    /// Connections (handshakes included) from one source IP address at once; more are refused
    /// at the handshake.
    pub connections_per_ip: Option<usize>,
    /// New connections one source IP address may start per second (bursts up to one second's
    /// worth); more are refused at the handshake, before any cryptography is spent on them.
    pub handshakes_per_second_per_ip: Option<NonZeroU32>,
    /// Request bytes one connection may have buffered before their handlers run (frames still
    /// arriving, including streams that stall unfinished). Past it, new data is refused: the
    /// stream is reset with `BUSY` and the caller gets [`Error::Overloaded`](crate::Error::Overloaded).
    /// Default 64 MiB.
    pub buffered_bytes_per_connection: usize,
    /// The same budget over all connections of the server. Default 512 MiB.
    pub buffered_bytes_total: usize,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            calls_per_second_per_connection: None,
            calls_per_second_per_identity: None,
            connections_per_ip: None,
            handshakes_per_second_per_ip: None,
            buffered_bytes_per_connection: 64 * 1024 * 1024,
            buffered_bytes_total: 512 * 1024 * 1024,
        }
    }
}

/// The limiters of one server.
#[derive(Debug)]
pub(crate) struct Limiters {
    per_connection: Option<Quota>,
    per_identity: Option<DefaultKeyedRateLimiter<String>>,
    checks: AtomicU64,
    connections_per_ip: Option<usize>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Request bytes buffered by all connections.
    pub(crate) buffered: Budget,
    buffered_per_connection: usize,
}

impl Limiters {
    pub(crate) fn new(limits: &AbuseLimits) -> Self {
        Self {
            per_connection: limits
                .calls_per_second_per_connection
                .map(Quota::per_second),
            per_identity: limits
                .calls_per_second_per_identity
                .map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_second(n))),
            checks: AtomicU64::new(0),
            connections_per_ip: limits.connections_per_ip,
            per_ip: Mutex::default(),
            handshakes: limits
                .handshakes_per_second_per_ip
                .map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_second(n))),
            buffered: Budget::new(limits.buffered_bytes_total),
            buffered_per_connection: limits.buffered_bytes_per_connection,
        }
    }

    /// A new connection's own budget of buffered request bytes.
    pub(crate) fn connection_budget(&self) -> Budget {
        Budget::new(self.buffered_per_connection)
    }

    /// A new connection's own call limiter, if calls are limited per connection.
    /// Whether any call rate is set (per connection or per identity).
    pub(crate) fn limits_calls(&self) -> bool {
        self.per_connection.is_some() || self.per_identity.is_some()
    }

    pub(crate) fn connection_limiter(&self) -> Option<DefaultDirectRateLimiter> {
        self.per_connection.map(DefaultDirectRateLimiter::direct)
    }

    /// Whether a call of the identity `identity()` gives may start now (per-identity rate).
    /// `identity` is asked only when identities are limited: no lock or copy otherwise.
    pub(crate) fn allow_identity(&self, identity: impl FnOnce() -> Option<String>) -> bool {
        let Some(limiter) = &self.per_identity else {
            return true;
        };
        let Some(identity) = identity() else {
            return true;
        };
        // Forget identities idle long enough to be full again, now and then, so the map stays
        // as large as the set of recently active identities.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 65_536 == 65_535 {
            limiter.retain_recent();
        }
        limiter.check_key(&identity).is_ok()
    }

    /// Counts a connection from `ip`; `false` (and nothing counted) past the handshake rate or
    /// the connection cap of its address.
    pub(crate) fn admit(&self, ip: IpAddr) -> bool {
        if let Some(handshakes) = &self.handshakes {
            if self.checks.fetch_add(1, Ordering::Relaxed) % 65_536 == 65_535 {
                handshakes.retain_recent();
            }
            if handshakes.check_key(&ip).is_err() {
                return false;
            }
        }
        let Some(max) = self.connections_per_ip else {
            return true;
        };
        let mut per_ip = self.per_ip.locked();
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    /// A connection from `ip` that [`admit`](Self::admit) counted has ended.
    pub(crate) fn release(&self, ip: IpAddr) {
        if self.connections_per_ip.is_none() {
            return;
        }
        let mut per_ip = self.per_ip.locked();
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}
