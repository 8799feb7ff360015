//! Fail modes and the options of an [`XClient`](crate::XClient).

use std::time::Duration;

use crate::{ClientTls, Placement, TransportOptions};

/// What an [`XClient`](crate::XClient) does when a call fails at the transport level
/// (connection lost, timeout, refused, handshake failure: [`Error::is_transport`]). A handler's
/// own error ([`Error::Remote`] and the other statuses) is returned at once in every mode, never
/// retried.
///
/// [`Error::is_transport`]: crate::Error::is_transport
/// [`Error::Remote`]: crate::Error::Remote
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailMode {
    /// One attempt; the first error is returned.
    #[default]
    Failfast,
    /// Retry the same endpoint, up to [`ClientOption::retries`] more times.
    Failtry,
    /// Try another endpoint each time, up to [`ClientOption::retries`] more times.
    Failover,
    /// If no reply came within [`ClientOption::backup_latency`], send the call to a second
    /// endpoint as well; the first successful reply wins.
    Failbackup,
}

/// Options of an [`XClient`](crate::XClient) (rpcx's `client.Option`).
#[derive(Debug)]
pub struct ClientOption {
    /// TLS: which servers to trust.
    pub tls: ClientTls,
    /// QUIC transport settings.
    pub transport: TransportOptions,
    /// Extra attempts for `Failtry` and `Failover` (default 3: up to 4 attempts in all).
    pub retries: u32,
    /// Pause between attempts (default 10 ms).
    pub retry_interval: Duration,
    /// How long connecting to one endpoint may take (default 3 s).
    pub connect_timeout: Duration,
    /// Timeout of each attempt of a call (default 10 s).
    pub call_timeout: Option<Duration>,
    /// `Failbackup`: how long to wait before sending the backup call (default 10 ms).
    pub backup_latency: Duration,
    /// Only use endpoints of this group.
    pub group: Option<String>,
    /// The identity this client declares to every server it connects to.
    pub client_id: Option<String>,
    /// After a transport failure an endpoint is avoided for this long, doubling with each
    /// further failure up to 32×, and reset by the next success (a breaker that closes again,
    /// unlike rpcx's). Default 1 s.
    pub endpoint_cooldown: Duration,
    /// Where the connections are driven.
    pub placement: Placement,
}

impl Default for ClientOption {
    fn default() -> Self {
        Self {
            tls: ClientTls::new(),
            transport: TransportOptions::default(),
            retries: 3,
            retry_interval: Duration::from_millis(10),
            connect_timeout: Duration::from_secs(3),
            call_timeout: Some(Duration::from_secs(10)),
            backup_latency: Duration::from_millis(10),
            group: None,
            client_id: None,
            endpoint_cooldown: Duration::from_secs(1),
            placement: Placement::Auto,
        }
    }
}

impl ClientOption {
    /// Default options trusting `tls`.
    pub fn with_tls(tls: ClientTls) -> Self {
        Self {
            tls,
            ..Self::default()
        }
    }
}
