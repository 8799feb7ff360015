//! XClient: calls a service whose servers a discovery lists, through a selector and a fail mode.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{StreamExt, future::join_all, stream::FuturesUnordered};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::{
    CallOptions, Client, ClientEvent, ClientOption, Error, FailMode, Metadata, PushSender,
    RawReply, Result, SelectMode, Service, Stats,
    client::{Link, Session, client_endpoint},
    connection::Shared,
    discovery::{Discovery, Endpoint, Endpoints},
    io::IoThread,
    selector::{Candidate, SelectInfo, Selector},
    service::Services,
};

/// Builds an [`XClient`].
#[derive(Debug)]
pub struct XClientBuilder<D> {
    service_path: String,
    discovery: D,
    fail_mode: FailMode,
    select_mode: SelectMode,
    option: ClientOption,
    push: Option<PushSender>,
    services: Services,
}

impl<D: Discovery + Send + Sync + 'static> XClientBuilder<D> {
    /// The fail mode (default [`FailMode::Failfast`]).
    #[must_use]
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.fail_mode = mode;
        self
    }

    /// The select mode (default [`SelectMode::RandomSelect`]).
    #[must_use]
    pub fn select_mode(mut self, mode: SelectMode) -> Self {
        self.select_mode = mode;
        self
    }

    /// Options: TLS, retries, timeouts, group.
    #[must_use]
    pub fn option(mut self, option: ClientOption) -> Self {
        self.option = option;
        self
    }

    /// Makes the XClient bidirectional: it connects to every endpoint at once, stays connected,
    /// and delivers every server's pushes to `sender`, each tagged with the server it came from.
    #[must_use]
    pub fn push_channel(mut self, sender: PushSender) -> Self {
        self.push = Some(sender);
        self
    }

    /// Registers a service every server can call on this client (reverse calls).
    #[must_use]
    pub fn register(self, service_path: impl Into<String>, service: Service) -> Self {
        self.services.register(service_path, service);
        self
    }

    /// Builds the XClient. Connections are opened lazily (eagerly for a bidirectional one). Must
    /// run inside a tokio runtime.
    pub fn build(self) -> Result<XClient<D>> {
        let option = self.option;
        let mut client_config = quinn::ClientConfig::new(Arc::new(option.tls.quinn_config()?));
        let bidirectional = self.push.is_some();
        client_config.transport_config(option.transport.quinn_transport(bidirectional)?);
        // One UDP socket for the connections to every endpoint; IPv6 sockets are dual-stack.
        let io = IoThread::caller();
        let driver = IoThread::for_client(option.placement)?;
        let entered = driver.enter();
        let endpoint = client_endpoint(
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            option.transport.socket_buffer_size,
        )
        .or_else(|_| {
            client_endpoint(
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
                option.transport.socket_buffer_size,
            )
        })?;
        drop(entered);
        let shared = Arc::new(Shared::new(
            self.services,
            &option.transport,
            self.push,
            Duration::from_secs(10),
            option.call_timeout,
            None,
            io,
        ));
        let session = Session {
            client_id: option.client_id.clone(),
            hello_metadata: Metadata::new(),
            reconnect: bidirectional,
            max_backoff: Duration::from_secs(2),
            connect_timeout: option.connect_timeout,
        };
        let inner = Arc::new(XInner {
            service_path: self.service_path,
            fail_mode: self.fail_mode,
            selector: self.select_mode.selector(),
            bidirectional,
            link: Link {
                endpoint,
                owns_endpoint: false,
                client_config,
                driver,
            },
            shared,
            session,
            events: broadcast::channel(256).0,
            state: Mutex::new(Vec::new()),
            option,
            closed: CancellationToken::new(),
            discovery: self.discovery,
        });
        let mut watch = Discovery::watch(&inner.discovery);
        let initial = watch.borrow_and_update().clone();
        inner.apply(&initial);
        let weak = Arc::downgrade(&inner);
        let closed = inner.closed.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { break },
                    () = closed.cancelled() => break,
                }
                let list = watch.borrow_and_update().clone();
                let Some(inner) = weak.upgrade() else { break };
                inner.apply(&list);
            }
        });
        Ok(XClient { inner })
    }
}

/// A client of a whole service (rpcx's `XClient`): a [`Discovery`] lists the servers, a
/// [`SelectMode`] picks one per call, a [`FailMode`] decides what a failure does.
///
/// One connection per endpoint, opened on first use, shared by all calls, and opened again
/// after it dies. When discovery changes, new endpoints are used and removed ones are drained
/// (calls in flight finish) and closed. Cloning is cheap.
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
pub struct XClient<D> {
    inner: Arc<XInner<D>>,
}

impl<D> Clone for XClient<D> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<D> fmt::Debug for XClient<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XClient")
            .field("service_path", &self.inner.service_path)
            .field("fail_mode", &self.inner.fail_mode)
            .field("endpoints", &self.inner.lock().len())
            .finish()
    }
}

struct XInner<D> {
    service_path: String,
    fail_mode: FailMode,
    selector: Arc<dyn Selector>,
    bidirectional: bool,
    link: Link,
    shared: Arc<Shared>,
    session: Session,
    events: broadcast::Sender<ClientEvent>,
    /// The usable endpoints, in discovery order.
    state: Mutex<Vec<Arc<Slot>>>,
    option: ClientOption,
    closed: CancellationToken,
    discovery: D,
}

/// One endpoint and its (lazy) client.
struct Slot {
    endpoint: Endpoint,
    client: Mutex<Option<Client>>,
    connecting: tokio::sync::Mutex<()>,
    health: Mutex<Health>,
    in_flight: AtomicUsize,
}

#[derive(Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

impl Slot {
    fn new(endpoint: Endpoint, client: Option<Client>) -> Self {
        Self {
            endpoint,
            client: Mutex::new(client),
            connecting: tokio::sync::Mutex::new(()),
            health: Mutex::default(),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn client(&self) -> Option<Client> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn rtt(&self) -> Option<Duration> {
        self.client()
            .and_then(|c| c.live_connection())
            .map(|c| c.rtt())
    }

    fn healthy(&self, now: Instant) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down_until.is_none_or(|t| now >= t)
    }

    fn record(&self, result: &Result<RawReply>, cooldown: Duration) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Err(e) if e.is_transport() => {
                health.failures = health.failures.saturating_add(1);
                let factor = 1u32 << (health.failures - 1).min(5);
                health.down_until = Some(Instant::now() + cooldown * factor);
            }
            _ => *health = Health::default(),
        }
    }
}

/// Decrements a slot's in-flight count when dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<D> XInner<D> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<D: Discovery + Send + Sync + 'static> XInner<D> {
    /// Takes a new endpoint list from discovery: keeps slots (and their connections) of
    /// endpoints still listed, adds new ones, drains and closes removed ones.
    fn apply(self: &Arc<Self>, endpoints: &Endpoints) {
        let wanted: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| {
                self.option
                    .group
                    .as_ref()
                    .is_none_or(|g| e.group.as_ref() == Some(g))
            })
            .collect();
        let removed = {
            let mut state = self.lock();
            let mut old: HashMap<String, Arc<Slot>> = state
                .drain(..)
                .map(|s| (s.endpoint.address.clone(), s))
                .collect();
            for endpoint in wanted {
                let slot = match old.remove(&endpoint.address) {
                    Some(slot) if slot.endpoint == *endpoint => slot,
                    Some(slot) => Arc::new(Slot::new(endpoint.clone(), slot.client())),
                    None => Arc::new(Slot::new(endpoint.clone(), None)),
                };
                state.push(slot);
            }
            old.into_values().collect::<Vec<_>>()
        };
        for slot in removed {
            let drain = self.option.call_timeout.unwrap_or(Duration::from_secs(10));
            tokio::spawn(async move {
                let deadline = Instant::now() + drain;
                while slot.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if let Some(client) = slot.client() {
                    client.close().await;
                }
            });
        }
        if self.bidirectional {
            for slot in self.lock().iter().cloned() {
                let inner = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = inner.client_for(&slot).await {
                        tracing::debug!(endpoint = %slot.endpoint, "connect failed: {e}");
                    }
                });
            }
        }
    }

    /// The slot's client, connecting first if there is none (one attempt at a time).
    async fn client_for(&self, slot: &Slot) -> Result<Client> {
        if let Some(client) = slot.client() {
            if client.is_connected() {
                return Ok(client);
            }
            if self.bidirectional {
                // Its own supervisor is reconnecting; do not wait for it here.
                return Err(Error::NotConnected(format!(
                    "{} is reconnecting",
                    slot.endpoint
                )));
            }
        }
        let _one_at_a_time = slot.connecting.lock().await;
        if let Some(client) = slot.client() {
            if client.is_connected() {
                return Ok(client);
            }
        }
        if self.closed.is_cancelled() {
            return Err(Error::NotConnected("the XClient was closed".into()));
        }
        let addr = tokio::net::lookup_host(slot.endpoint.address.as_str())
            .await?
            .next()
            .ok_or_else(|| Error::Config(format!("`{}` resolved to nothing", slot.endpoint)))?;
        let client = Client::start(
            self.link.clone(),
            self.shared.clone(),
            self.session.clone(),
            self.events.clone(),
            addr,
            &slot.endpoint.server_name,
        )
        .await?;
        *slot.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.clone());
        Ok(client)
    }

    /// Picks a slot, avoiding `exclude` and (while any other is available) endpoints in their
    /// cool-down after a failure.
    fn select(&self, info: &SelectInfo<'_>, exclude: &[Arc<Slot>]) -> Result<Arc<Slot>> {
        let state = self.lock();
        let now = Instant::now();
        let open: Vec<&Arc<Slot>> = state
            .iter()
            .filter(|s| !exclude.iter().any(|x| Arc::ptr_eq(x, s)))
            .collect();
        let healthy: Vec<&Arc<Slot>> = open.iter().copied().filter(|s| s.healthy(now)).collect();
        let pool = if healthy.is_empty() { open } else { healthy };
        if pool.is_empty() {
            return Err(Error::NoEndpoints(self.service_path.clone()));
        }
        let candidates: Vec<Candidate<'_>> = pool
            .iter()
            .map(|s| Candidate {
                endpoint: &s.endpoint,
                rtt: s.rtt(),
            })
            .collect();
        let i = self.selector.select(&candidates, info).min(pool.len() - 1);
        Ok(pool[i].clone())
    }

    async fn call_slot(
        &self,
        slot: &Slot,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        self.send_slot(slot, method, payload, options, false).await
    }

    /// One attempt on one endpoint, counted in its in-flight calls and its health.
    async fn send_slot(
        &self,
        slot: &Slot,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
        oneway: bool,
    ) -> Result<RawReply> {
        slot.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&slot.in_flight);
        let result = async {
            let client = self.client_for(slot).await?;
            let conn = client.live_connection().ok_or_else(|| {
                Error::NotConnected(format!("{} is not connected", slot.endpoint))
            })?;
            conn.send_raw(&self.service_path, method, payload, options, oneway)
                .await
        }
        .await;
        slot.record(&result, self.option.endpoint_cooldown);
        result
    }

    /// Runs one call under the fail mode.
    async fn invoke(
        &self,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        let info = SelectInfo {
            service_path: &self.service_path,
            service_method: method,
            args: payload,
            key: options.route_key.as_deref(),
        };
        let retries = self.option.retries;
        match self.fail_mode {
            FailMode::Failfast => {
                let slot = self.select(&info, &[])?;
                self.call_slot(&slot, method, payload, options).await
            }
            FailMode::Failtry => {
                let slot = self.select(&info, &[])?;
                let mut attempt = 0;
                loop {
                    let result = self.call_slot(&slot, method, payload, options).await;
                    match result {
                        Err(e) if e.is_transport() && attempt < retries => {
                            tracing::debug!(attempt, endpoint = %slot.endpoint, "retrying: {e}");
                            attempt += 1;
                            tokio::time::sleep(self.option.retry_interval).await;
                        }
                        other => return other,
                    }
                }
            }
            FailMode::Failover => {
                let mut tried: Vec<Arc<Slot>> = Vec::new();
                let mut attempt = 0;
                loop {
                    let slot = match self.select(&info, &tried) {
                        Ok(slot) => slot,
                        Err(_) if !tried.is_empty() => {
                            // Every endpoint failed once: start over.
                            tried.clear();
                            self.select(&info, &tried)?
                        }
                        Err(e) => return Err(e),
                    };
                    let result = self.call_slot(&slot, method, payload, options).await;
                    match result {
                        Err(e) if e.is_transport() && attempt < retries => {
                            tracing::debug!(attempt, endpoint = %slot.endpoint, "failing over: {e}");
                            attempt += 1;
                            tried.push(slot);
                            tokio::time::sleep(self.option.retry_interval).await;
                        }
                        other => return other,
                    }
                }
            }
            FailMode::Failbackup => {
                let first = self.select(&info, &[])?;
                let primary = self.call_slot(&first, method, payload, options);
                tokio::pin!(primary);
                tokio::select! {
                    result = &mut primary => return result,
                    () = tokio::time::sleep(self.option.backup_latency) => {}
                }
                let Ok(second) = self.select(&info, std::slice::from_ref(&first)) else {
                    return primary.await;
                };
                let backup = self.call_slot(&second, method, payload, options);
                tokio::pin!(backup);
                tokio::select! {
                    result = &mut primary => if result.is_ok() { result } else { backup.await },
                    result = &mut backup => if result.is_ok() { result } else { primary.await },
                }
            }
        }
    }
}

impl<D: Discovery + Send + Sync + 'static> XClient<D> {
    /// An XClient for `service_path` (rpcx's `NewXClient`).
    pub fn new(
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
    pub fn bidirectional(
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

    /// A builder.
    pub fn builder(service_path: impl Into<String>, discovery: D) -> XClientBuilder<D> {
        XClientBuilder {
            service_path: service_path.into(),
            discovery,
            fail_mode: FailMode::default(),
            select_mode: SelectMode::default(),
            option: ClientOption::default(),
            push: None,
            services: Services::default(),
        }
    }

    async fn invoke(
        &self,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        if self.inner.lock().is_empty() {
            // mDNS and similar backends may not have answered yet: give them their initial wait.
            let list = Discovery::endpoints(&self.inner.discovery).await;
            if !list.is_empty() {
                self.inner.apply(&list);
            }
        }
        self.inner.invoke(method, payload, options).await
    }

    /// Calls `method` of the service (rpcx's `xclient.Call`) under the fail mode.
    ///
    /// Returns the first reply, or the last error once the fail mode gives up; each attempt is
    /// bounded by the call timeout. Dropping the future cancels the attempts in flight (their
    /// streams are reset and the handlers cancelled). With no endpoint at all it fails with
    /// [`Error::NoEndpoints`] (after waiting for a discovery's first answer, as mDNS needs).
    pub async fn call<A, R>(&self, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.call_with(method, args, &CallOptions::default()).await
    }

    /// A call with metadata, timeout, codec and routing key.
    pub async fn call_with<A, R>(&self, method: &str, args: &A, options: &CallOptions) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let payload = options.codec.encode(args)?;
        let reply = self.invoke(method, &payload, options).await?;
        options.codec.decode(&reply.payload)
    }

    /// A call with raw payload bytes.
    pub async fn call_raw(
        &self,
        method: &str,
        payload: &[u8],
        options: &CallOptions,
    ) -> Result<RawReply> {
        self.invoke(method, payload, options).await
    }

    /// Calls `method` on every endpoint at once (rpcx's `Broadcast`) and returns each
    /// endpoint's result.
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
        let slots: Vec<Arc<Slot>> = self.inner.lock().clone();
        if slots.is_empty() {
            return Err(Error::NoEndpoints(self.inner.service_path.clone()));
        }
        let results = join_all(
            slots
                .iter()
                .map(|slot| self.inner.call_slot(slot, method, &payload, &options)),
        )
        .await;
        Ok(slots
            .iter()
            .zip(results)
            .map(|(slot, r)| {
                (
                    slot.endpoint.clone(),
                    r.and_then(|reply| options.codec.decode(&reply.payload)),
                )
            })
            .collect())
    }

    /// Calls `method` on every endpoint at once and returns the first success (rpcx's `Fork`);
    /// if all fail, the last error.
    pub async fn fork<A, R>(&self, method: &str, args: &A) -> Result<R>
    where
        A: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let options = CallOptions::default();
        let payload: Bytes = options.codec.encode(args)?;
        let slots: Vec<Arc<Slot>> = self.inner.lock().clone();
        let mut pending: FuturesUnordered<_> = slots
            .iter()
            .map(|slot| self.inner.call_slot(slot, method, &payload, &options))
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
    /// reply says whether it worked); returns once the request is handed to QUIC.
    pub async fn oneway<A: Serialize + ?Sized>(&self, method: &str, args: &A) -> Result<()> {
        let options = CallOptions::default();
        let payload = options.codec.encode(args)?;
        let info = SelectInfo {
            service_path: &self.inner.service_path,
            service_method: method,
            args: &payload,
            key: None,
        };
        let slot = self.inner.select(&info, &[])?;
        self.inner
            .send_slot(&slot, method, &payload, &options, true)
            .await
            .map(drop)
    }

    /// The endpoints in use now (after the group filter).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner
            .lock()
            .iter()
            .map(|s| s.endpoint.clone())
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
            .lock()
            .iter()
            .filter(|s| s.client().is_some_and(|c| c.is_connected()))
            .count();
        self.inner.shared.counters.snapshot(open as u64)
    }

    /// Closes every connection and stops following discovery.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let slots: Vec<Arc<Slot>> = self.inner.lock().drain(..).collect();
        for slot in slots {
            if let Some(client) = slot.client() {
                client.close().await;
            }
        }
        let idle = self.inner.link.endpoint.wait_idle();
        let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
    }
}
