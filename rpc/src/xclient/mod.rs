//! XClient: calls a service whose servers a discovery lists, through a selector and a fail mode.
//!
//! - `mod.rs` (this file): the [`XClient`] API and how one call runs;
//! - `builder.rs`: [`XClientBuilder`] and [`ClientOption`];
//! - `endpoints.rs`: the endpoints, their connections and health, and picking one.

mod builder;
mod endpoints;

use crate::sync::Lock;
use std::{
    borrow::Cow,
    fmt,
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{StreamExt, future::join_all, stream::FuturesUnordered};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

pub use self::builder::{ClientOption, XClientBuilder};
use self::{
    builder::{DynDiscovery, Erased},
    endpoints::{Member, Members},
};
use crate::{
    CallOptions, ClientEvent, Error, FailMode, PushSender, RawReply, Result, SelectMode, Stats,
    client::{Link, Session},
    connection::{call::Reply, side::Side},
    discovery::{Discovery, Endpoint},
    failmode::Policy,
    io::within,
    selector::{SelectInfo, Selector},
    service::Services,
};

/// A client of a whole service (rpcx's `XClient`): a [`Discovery`] lists the servers, a
/// [`SelectMode`] picks one per call, a [`FailMode`] decides what a failure does.
///
/// One connection per endpoint, opened on first use (one attempt at a time, however many
/// callers need it), shared by all calls, and opened again after it dies. When discovery
/// changes, new endpoints are used and removed ones are drained (calls in flight finish) and
/// closed. Cloning is cheap.
///
/// # Failure recovery
/// A server that dies with calls in flight is noticed in about a second (liveness probes, see
/// [`TransportOptions::unresponsive_timeout`](crate::TransportOptions::unresponsive_timeout));
/// those calls then fail over under `Failover`/`Failbackup`. The dead endpoint cools down and is
/// reconnected in the background while others serve; no call waits on it while another
/// endpoint is connected.
///
/// ```no_run
/// use quicx::{ClientOption, ClientTls, FailMode, SelectMode, XClient};
/// use quicx::discovery::Peer2PeerDiscovery;
///
/// # async fn run(cert: rustls::pki_types::CertificateDer<'static>) -> quicx::Result<()> {
/// let d = Peer2PeerDiscovery::new("quic@127.0.0.1:8972")?;
/// let option = ClientOption::with_tls(ClientTls::new().trust(cert));
/// let xclient = XClient::new("Arith", FailMode::Failtry, SelectMode::RandomSelect, d, option)?;
/// let product: i64 = xclient.call("Mul", &(10i64, 20i64)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct XClient {
    inner: Arc<Core>,
}

impl fmt::Debug for XClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XClient")
            .field("service_path", &self.inner.service_path)
            .field("fail_mode", &self.inner.fail_mode)
            .field("endpoints", &self.inner.members.len())
            .finish()
    }
}

/// Everything one XClient holds.
struct Core {
    weak: Weak<Self>,
    service_path: String,
    fail_mode: FailMode,
    policy: Policy,
    selector: Arc<dyn Selector>,
    bidirectional: bool,
    link: Link,
    side: Arc<Side>,
    session: Session,
    events: broadcast::Sender<ClientEvent>,
    members: Members,
    option: ClientOption,
    closed: CancellationToken,
    discovery: Box<dyn DynDiscovery>,
    /// Held while a list is read from the discovery and applied (by the watch task, or a call
    /// waiting for a first answer): the last to apply applies the newest list.
    applying: std::sync::Mutex<()>,
    /// Lists the watch task applied (under `applying`).
    watched: std::sync::atomic::AtomicU64,
}

/// Decrements a member's in-flight count when dropped.
struct InFlight<'a>(&'a Member);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The deadline of one XClient call, shared by its connects and attempts.
#[derive(Debug, Clone, Copy)]
struct Deadline(Option<tokio::time::Instant>);

impl Deadline {
    fn after(timeout: Option<Duration>) -> Self {
        Self(timeout.map(|t| tokio::time::Instant::now() + t))
    }

    /// Time left; `None` without a deadline.
    fn left(self) -> Option<Duration> {
        self.0
            .map(|d| d.saturating_duration_since(tokio::time::Instant::now()))
    }
}

impl Core {
    /// One attempt on one endpoint, within what is left of the deadline: connect if needed
    /// (within the connect timeout too), then call. Counted in the member's in-flight calls;
    /// its outcome in the member's health.
    async fn attempt(
        &self,
        member: &Arc<Member>,
        method: &str,
        payload: &Bytes,
        options: &CallOptions,
        deadline: Deadline,
        reply: Reply,
    ) -> Result<RawReply> {
        member.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(member);
        let connect_within = deadline.left().map_or(self.option.connect_timeout, |l| {
            l.min(self.option.connect_timeout)
        });
        // Whether this attempt's own timeout (not the call's deadline) bounds it.
        let mut attempt_bound = false;
        let result = async {
            let client = self.client_for(member, connect_within).await?;
            let conn = client.connection().await?;
            let timeout = match (deadline.left(), self.option.attempt_timeout) {
                (Some(left), Some(attempt)) => {
                    attempt_bound = attempt <= left;
                    Some(left.min(attempt))
                }
                (left, attempt) => {
                    attempt_bound = left.is_none() && attempt.is_some();
                    left.or(attempt)
                }
            };
            let options = CallOptions {
                timeout,
                ..options.clone()
            };
            conn.request_raw(&self.service_path, method, payload.clone(), &options, reply)
                .await
        }
        .await;
        let failed = match &result {
            // The connection attempt this caller waited on records its own outcome.
            Err(Error::ConnectTimeout(_)) => None,
            // The caller's deadline passed, not the endpoint's: no verdict on the endpoint.
            Err(Error::DeadlineExceeded { remote: false }) if !attempt_bound => None,
            Err(e) => Some(e.is_transport()),
            Ok(_) => Some(false),
        };
        if let Some(failed) = failed {
            member.record(failed, self.option.endpoint_cooldown);
        }
        if matches!(result, Err(Error::PeerUnresponsive(_))) {
            self.discovery.report_unreachable(&member.endpoint);
        }
        result
    }

    /// Runs one call under the fail mode, within the call's deadline.
    async fn invoke(
        &self,
        method: &str,
        payload: &Bytes,
        options: &CallOptions,
    ) -> Result<RawReply> {
        let info = SelectInfo {
            service_path: &self.service_path,
            service_method: method,
            args: &payload[..],
            key: options.route_key.as_deref(),
        };
        let timeout = options.timeout.or(self.option.call_timeout);
        let deadline = Deadline::after(timeout);
        let run = self.policy.run(
            |tried: &[Arc<Member>]| self.pick(&info, tried),
            |member: Arc<Member>| async move {
                self.attempt(&member, method, payload, options, deadline, Reply::Wanted)
                    .await
            },
        );
        match timeout {
            Some(t) => within(t, run)
                .await
                .unwrap_or(Err(Error::DeadlineExceeded { remote: false })),
            None => run.await,
        }
    }
}

impl XClient {
    /// An XClient for `service_path` (rpcx's `NewXClient`).
    pub fn new<D: Discovery + Send + Sync + 'static>(
        service_path: impl Into<String>,
        fail_mode: FailMode,
        select_mode: SelectMode,
        discovery: D,
        option: ClientOption,
    ) -> Result<Self> {
        Self::builder(service_path, discovery)
            .fail_mode(fail_mode)
            .select_mode(select_mode)
            .option(option)
            .build()
    }

    /// A bidirectional XClient (rpcx's `NewBidirectionalXClient`): pushes from every server go
    /// to `push`.
    pub fn bidirectional<D: Discovery + Send + Sync + 'static>(
        service_path: impl Into<String>,
        fail_mode: FailMode,
        select_mode: SelectMode,
        discovery: D,
        option: ClientOption,
        push: PushSender,
    ) -> Result<Self> {
        Self::builder(service_path, discovery)
            .fail_mode(fail_mode)
            .select_mode(select_mode)
            .option(option)
            .push_channel(push)
            .build()
    }

    /// A builder, with any [`Discovery`].
    pub fn builder<D: Discovery + Send + Sync + 'static>(
        service_path: impl Into<String>,
        discovery: D,
    ) -> XClientBuilder {
        XClientBuilder {
            service_path: service_path.into(),
            discovery: Box::new(Erased(Arc::new(discovery))),
            fail_mode: FailMode::default(),
            select_mode: SelectMode::default(),
            option: ClientOption::default(),
            push: None,
            services: Services::default(),
            hooks: crate::connection::side::Hooks::default(),
        }
    }

    /// Waits, at most `limit` (the call's timeout), for the discovery's first answer if no
    /// endpoint is known yet (mDNS and similar backends may not have answered); returns how
    /// long it waited.
    async fn await_endpoints(&self, limit: Option<Duration>) -> Duration {
        if self.inner.members.len() != 0 {
            return Duration::ZERO;
        }
        let started = std::time::Instant::now();
        let watched = self.inner.watched.load(Ordering::Acquire);
        let answer = self.inner.discovery.endpoints();
        let list = match limit {
            Some(t) => within(t, answer).await.ok(),
            None => Some(answer.await),
        };
        if let Some(list) = list {
            let _applying = self.inner.applying.locked();
            // Not if the watch task applied a list since this call asked: that is the
            // discovery's newer view (an empty one included). Else the newest list published.
            if self.inner.watched.load(Ordering::Acquire) == watched {
                let latest = self.inner.discovery.watch().borrow().clone();
                let list = if latest.is_empty() { list } else { latest };
                if !list.is_empty() {
                    self.inner.apply(&list);
                }
            }
        }
        started.elapsed()
    }

    /// [`await_endpoints`](Self::await_endpoints) within the call's timeout, and the call's
    /// options with what is left of it.
    async fn endpoints_for<'o>(&self, options: &'o CallOptions) -> Cow<'o, CallOptions> {
        let timeout = options.timeout.or(self.inner.option.call_timeout);
        let waited = self.await_endpoints(timeout).await;
        match timeout {
            Some(t) if !waited.is_zero() => Cow::Owned(CallOptions {
                timeout: Some(t.saturating_sub(waited)),
                ..options.clone()
            }),
            _ => Cow::Borrowed(options),
        }
    }

    /// Calls `method` of the service (rpcx's `xclient.Call`) under the fail mode.
    ///
    /// # When it returns
    /// With the first reply, or the last error once the fail mode gives up. The call timeout
    /// ([`ClientOption::call_timeout`], or [`CallOptions::timeout`]) bounds the whole call:
    /// connecting, every attempt and the pauses between them ([`Error::DeadlineExceeded`]).
    /// With no endpoint at all it fails with [`Error::NoEndpoints`] (after waiting for a
    /// discovery's first answer, as mDNS needs).
    ///
    /// # Cancel safety
    /// Dropping the future cancels the attempts in flight (their streams are reset and the
    /// handlers cancelled). A connection attempt it started goes on for the other callers.
    pub async fn call<A, R>(&self, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(method, args, &CallOptions::default()).await
    }

    /// [`call`](Self::call) with metadata, timeout, codec and routing key; same contract.
    pub async fn call_with<A, R>(&self, method: &str, args: &A, options: &CallOptions) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let payload = options.codec.encode(args)?;
        let options = self.endpoints_for(options).await;
        let reply = self.inner.invoke(method, &payload, &options).await?;
        options.codec.decode(&reply.payload)
    }

    /// A call with payload bytes the caller encoded; same contract as [`call`](Self::call).
    pub async fn call_raw(
        &self,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        let options = self.endpoints_for(options).await;
        let payload = Bytes::copy_from_slice(payload);
        self.inner.invoke(method, &payload, &options).await
    }

    /// Calls `method` on every endpoint at once (rpcx's `Broadcast`) and returns each
    /// endpoint's result, one attempt each, each within the call timeout.
    pub async fn broadcast<A, R>(
        &self,
        method: &str,
        args: &A,
    ) -> Result<Vec<(Endpoint, Result<R>)>>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let options = CallOptions::default();
        let payload: Bytes = options.codec.encode(args)?;
        self.await_endpoints(self.inner.option.call_timeout).await;
        let members = self.inner.members.all();
        if members.is_empty() {
            return Err(Error::NoEndpoints(self.inner.service_path.clone()));
        }
        let deadline = Deadline::after(self.inner.option.call_timeout);
        let results = join_all(members.iter().map(|m| {
            self.inner
                .attempt(m, method, &payload, &options, deadline, Reply::Wanted)
        }))
        .await;
        Ok(members
            .iter()
            .zip(results)
            .map(|(m, r)| {
                (
                    m.endpoint.clone(),
                    r.and_then(|reply| options.codec.decode(&reply.payload)),
                )
            })
            .collect())
    }

    /// Calls `method` on every endpoint at once and returns the first success (rpcx's `Fork`);
    /// if all fail, the last error.
    ///
    /// # When it returns
    /// At the first success: the calls still in flight to the other endpoints are cancelled
    /// then (their streams reset, their handlers cancelled), so a handler with side effects may
    /// have run on several servers. Otherwise once every endpoint failed.
    pub async fn fork<A, R>(&self, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let options = CallOptions::default();
        let payload: Bytes = options.codec.encode(args)?;
        self.await_endpoints(self.inner.option.call_timeout).await;
        let members = self.inner.members.all();
        let deadline = Deadline::after(self.inner.option.call_timeout);
        let mut pending: FuturesUnordered<_> = members
            .iter()
            .map(|m| {
                self.inner
                    .attempt(m, method, &payload, &options, deadline, Reply::Wanted)
            })
            .collect();
        let mut last = Error::NoEndpoints(self.inner.service_path.clone());
        while let Some(result) = pending.next().await {
            match result {
                Ok(reply) => return options.codec.decode(&reply.payload),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A oneway call to one endpoint chosen by the selector: one attempt (no fail mode, since no
    /// reply says whether it worked); returns once the request is handed to QUIC (see
    /// [`Connection::oneway`](crate::Connection::oneway) for what that guarantees).
    pub async fn oneway<A: Serialize + ?Sized>(&self, method: &str, args: &A) -> Result<()> {
        let options = CallOptions::default();
        let payload = options.codec.encode(args)?;
        self.await_endpoints(self.inner.option.call_timeout).await;
        let info = SelectInfo {
            service_path: &self.inner.service_path,
            service_method: method,
            args: &payload[..],
            key: None,
        };
        let member = self.inner.pick(&info, &[])?;
        let deadline = Deadline::after(self.inner.option.call_timeout);
        self.inner
            .attempt(&member, method, &payload, &options, deadline, Reply::None)
            .await
            .map(drop)
    }

    /// The endpoints in use now (after the group filter).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner
            .members
            .all()
            .iter()
            .map(|m| m.endpoint.clone())
            .collect()
    }

    /// Connection events of every endpoint.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.inner.events.subscribe()
    }

    /// Counters over all endpoints.
    pub fn stats(&self) -> Stats {
        let open = self
            .inner
            .members
            .all()
            .iter()
            .filter(|m| m.live_client().is_some())
            .count();
        self.inner.side.counters.snapshot(open as u64)
    }

    /// Closes every connection (waiting until each close was sent, up to 1 s) and stops
    /// following discovery.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        for member in self.inner.members.take_all() {
            if let Some(client) = member.client() {
                client.close().await;
            }
        }
        let idle = self.inner.link.endpoint.wait_idle();
        let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
    }
}
