//! The endpoints of an XClient: their connections (opened lazily, one attempt at a time), their
//! health (cool-downs after failures), and picking one for a call.

use crate::sync::Lock;
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::Core;
use crate::{
    Client, Error, Result,
    discovery::{Endpoint, Endpoints},
    error::NotConnected,
    failmode::no_endpoint,
    io::IoRuntime,
    selector::{Candidate, SelectInfo},
};

/// A connection attempt in flight; its outcome once it is known (the error as text: it
/// belongs to the task that made the attempt).
/// The longest an endpoint cools down, however long `endpoint_cooldown` and its doublings.
const MAX_COOLDOWN: Duration = Duration::from_secs(24 * 3600);

type Attempt = watch::Receiver<Option<Result<Client, Arc<Error>>>>;

/// Clears a member's connection attempt when the task that makes it ends, panics included (the
/// callers waiting on it then see the attempt gone, and the next caller starts another).
struct ClearAttempt(Arc<Member>);

impl Drop for ClearAttempt {
    fn drop(&mut self) {
        *self.0.connecting.locked() = None;
    }
}

/// One endpoint and its lazily opened client.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) endpoint: Endpoint,
    client: Mutex<Option<Client>>,
    /// The connection attempt in flight, if any: every caller that needs this endpoint meanwhile
    /// waits for that one attempt instead of starting its own.
    connecting: Mutex<Option<Attempt>>,
    health: Mutex<Health>,
    pub(super) in_flight: AtomicUsize,
    /// A bidirectional XClient's loop that connects this endpoint runs (one at a time).
    retrying: std::sync::atomic::AtomicBool,
}

/// Failures of one endpoint: a breaker that opens for a cool-down after each failure episode.
#[derive(Debug, Default, Clone, Copy)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

impl Member {
    fn new(endpoint: Endpoint, client: Option<Client>) -> Self {
        Self {
            endpoint,
            client: Mutex::new(client),
            connecting: Mutex::new(None),
            health: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            retrying: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn client(&self) -> Option<Client> {
        self.client.locked().clone()
    }

    /// The client, if its connection is up now.
    pub(super) fn live_client(&self) -> Option<Client> {
        self.client().filter(Client::is_connected)
    }

    fn rtt(&self) -> Option<Duration> {
        self.live_client()
            .and_then(|c| c.live_connection())
            .map(|c| c.rtt())
    }

    fn cooling_down(&self, now: Instant) -> bool {
        let health = self.health.locked();
        health.down_until.is_some_and(|t| now < t)
    }

    fn failed_before(&self) -> bool {
        self.health.locked().failures > 0
    }

    fn connecting(&self) -> bool {
        self.connecting.locked().is_some()
    }

    /// Records the outcome of an attempt. A transport failure opens the breaker for the
    /// cool-down, doubled per failure episode up to 32×; failures that arrive while it is open
    /// (other callers failing on the same dead server) do not count again. A success closes it.
    pub(super) fn record(&self, failed: bool, cooldown: Duration) {
        let mut health = self.health.locked();
        if !failed {
            *health = Health::default();
            return;
        }
        let now = Instant::now();
        if health.down_until.is_some_and(|t| now < t) {
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let factor = 1u32 << (health.failures - 1).min(5);
        // Saturated, so that a cool-down meant as "for ever" (`Duration::MAX`) cannot overflow.
        let wait = cooldown.saturating_mul(factor).min(MAX_COOLDOWN);
        health.down_until = Some(now + wait);
    }

    /// The cool-down left, for tests and logs.
    #[cfg(test)]
    fn down_for(&self) -> Option<Duration> {
        let health = self.health.locked();
        health
            .down_until
            .map(|t| t.saturating_duration_since(Instant::now()))
    }
}

/// The usable endpoints, in discovery order.
#[derive(Debug, Default)]
pub(super) struct Members(Mutex<Vec<Arc<Member>>>);

impl Members {
    pub(super) fn all(&self) -> Vec<Arc<Member>> {
        self.0.locked().clone()
    }

    pub(super) fn len(&self) -> usize {
        self.0.locked().len()
    }

    pub(super) fn take_all(&self) -> Vec<Arc<Member>> {
        self.0.locked().drain(..).collect()
    }

    /// Takes a new list: keeps members (and their connections) of endpoints still listed, adds
    /// new ones; returns the removed ones.
    pub(super) fn replace(&self, wanted: &[&Endpoint]) -> Vec<Arc<Member>> {
        let mut members = self.0.locked();
        let mut old: HashMap<String, Arc<Member>> = members
            .drain(..)
            .map(|m| (m.endpoint.address.clone(), m))
            .collect();
        // One member per address, the first listed: two connections to one server would take
        // each other's identity over (mDNS lists a server restarted under a new instance name
        // twice for a while).
        let mut seen = std::collections::HashSet::new();
        for &endpoint in wanted {
            if !seen.insert(endpoint.address.as_str()) {
                continue;
            }
            let member = match old.remove(&endpoint.address) {
                Some(member) if member.endpoint == *endpoint => member,
                // New metadata (a weight, a group) for the same server: its connection and its
                // breaker carry over, so a server that is down stays avoided.
                Some(member) => {
                    let fresh = Member::new(endpoint.clone(), member.client());
                    *fresh.health.locked() = *member.health.locked();
                    Arc::new(fresh)
                }
                None => Arc::new(Member::new(endpoint.clone(), None)),
            };
            members.push(member);
        }
        old.into_values().collect()
    }
}

impl Core {
    /// Picks an endpoint for an attempt, avoiding `tried`.
    ///
    /// Preference: endpoints not cooling down; among those, while any has a live connection,
    /// endpoints that failed before and have none are not picked — they are reconnected in the
    /// background instead (one attempt at a time), so no call waits on a server that was just
    /// dead. With nothing better, any endpoint not tried.
    pub(super) fn pick(&self, info: &SelectInfo<'_>, tried: &[Arc<Member>]) -> Result<Arc<Member>> {
        let now = Instant::now();
        let open: Vec<Arc<Member>> = self
            .members
            .all()
            .into_iter()
            .filter(|m| !tried.iter().any(|t| Arc::ptr_eq(t, m)))
            .collect();
        let healthy: Vec<Arc<Member>> = open
            .iter()
            .filter(|m| !m.cooling_down(now))
            .cloned()
            .collect();
        let any_live = healthy.iter().any(|m| m.live_client().is_some());
        let pool: Vec<Arc<Member>> = if any_live {
            let (recovering, ready): (Vec<_>, Vec<_>) = healthy
                .into_iter()
                .partition(|m| m.live_client().is_none() && (m.failed_before() || m.connecting()));
            for member in recovering {
                self.reconnect_in_background(member);
            }
            ready
        } else if healthy.is_empty() {
            open
        } else {
            healthy
        };
        if pool.is_empty() {
            return Err(no_endpoint(&self.service_path));
        }
        let candidates: Vec<Candidate<'_>> = pool
            .iter()
            .map(|m| Candidate {
                endpoint: &m.endpoint,
                rtt: m.rtt(),
            })
            .collect();
        let i = self.selector.select(&candidates, info).min(pool.len() - 1);
        Ok(pool[i].clone())
    }

    fn reconnect_in_background(&self, member: Arc<Member>) {
        // A bidirectional member's client reconnects by itself (its supervisor): nothing to
        // start, and a task per pick would pile up while the server stays down.
        if member.connecting() || (self.bidirectional && member.client().is_some()) {
            return;
        }
        let Some(inner) = self.weak.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let _ = inner
                .client_for(&member, inner.option.connect_timeout)
                .await;
        });
    }

    /// The member's client, connecting first if it has none, within `within`. One connection
    /// attempt per endpoint at a time: callers arriving meanwhile wait for it (up to `within`)
    /// and share its outcome. The attempt itself runs on as a task of its own, so a caller that
    /// gives up does not cancel it for the others.
    pub(super) async fn client_for(
        &self,
        member: &Arc<Member>,
        within: Duration,
    ) -> Result<Client> {
        if let Some(client) = member.client() {
            if client.is_connected() {
                return Ok(client);
            }
            if self.bidirectional {
                // Its own supervisor is reconnecting; wait for it as for a connect.
                return match tokio::time::timeout(within, client.connection()).await {
                    Ok(connected) => connected.map(|_| client),
                    Err(_) => Err(Error::ConnectTimeout(within)),
                };
            }
        }
        if self.closed.is_cancelled() {
            return Err(Error::NotConnected(NotConnected::Closed));
        }
        // Only a listed member connects: an endpoint discovery removed is drained, never
        // connected again (a retry of a call that picked it would open a connection nobody
        // closes); a member replaced for new metadata (a weight) connects as its replacement.
        let current = self
            .members
            .all()
            .into_iter()
            .find(|m| m.endpoint.address == member.endpoint.address);
        let member = match current {
            None => return Err(Error::NotConnected(NotConnected::Closed)),
            Some(current) if !Arc::ptr_eq(&current, member) => {
                return Box::pin(self.client_for(&current, within)).await;
            }
            Some(_) => member,
        };
        let mut attempt = {
            let mut connecting = member.connecting.locked();
            match connecting.as_ref() {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *connecting = Some(rx.clone());
                    let inner = self
                        .weak
                        .upgrade()
                        .ok_or(Error::NotConnected(NotConnected::Closed))?;
                    let member = member.clone();
                    tokio::spawn(async move {
                        let _clear = ClearAttempt(member.clone());
                        let result = inner.connect(&member).await;
                        // A refusal (credentials, hello) comes from a server that is up.
                        let failed = result.as_ref().is_err_and(Error::is_transport);
                        let shared = match result {
                            Ok(client) => {
                                *member.client.locked() = Some(client.clone());
                                Ok(client)
                            }
                            Err(e) => {
                                tracing::debug!(endpoint = %member.endpoint, "connect failed: {e}");
                                if e.is_transport() {
                                    // mDNS verifies the announcement and forgets a crashed server.
                                    inner.discovery.report_unreachable(&member.endpoint);
                                }
                                Err(Arc::new(e))
                            }
                        };
                        drop(_clear);
                        let _ = tx.send(Some(shared));
                        // Last: a caller that gave up waiting meanwhile does not count against
                        // the endpoint, and this outcome is the one that stands.
                        member.record(failed, inner.option.endpoint_cooldown);
                    });
                    rx
                }
            }
        };
        let outcome = tokio::time::timeout(within, attempt.wait_for(Option::is_some)).await;
        match outcome {
            Ok(Ok(done)) => match done.as_ref() {
                Some(Ok(client)) => Ok(client.clone()),
                // A refusal (credentials, hello, configuration) reaches every caller as itself:
                // fail modes do not retry it elsewhere. A transport failure is shared as text.
                Some(Err(cause)) => Err(cause.copy_of_refusal().unwrap_or_else(|| {
                    Error::NotConnected(NotConnected::ConnectFailed {
                        endpoint: member.endpoint.address.clone(),
                        cause: cause.to_string(),
                    })
                })),
                None => Err(Error::ConnectTimeout(within)),
            },
            Ok(Err(_)) => Err(Error::NotConnected(NotConnected::Closed)),
            Err(_) => Err(Error::ConnectTimeout(within)),
        }
    }

    /// One connection attempt to a member, within the connect timeout.
    async fn connect(&self, member: &Member) -> Result<Client> {
        // The name's lookup counts against the connect timeout too: a slow resolver must not
        // keep the endpoint's attempt (and the callers waiting on it) open past it.
        let timeout = self.option.connect_timeout;
        let started = std::time::Instant::now();
        let addr = tokio::time::timeout(
            timeout,
            tokio::net::lookup_host(member.endpoint.address.as_str()),
        )
        .await
        .map_err(|_| Error::ConnectTimeout(timeout))??
        .next()
        .ok_or_else(|| Error::Config(format!("`{}` resolved to nothing", member.endpoint)))?;
        // Each endpoint's connection placed on its own (`Placement::Auto`: the caller's runtime
        // for the process's first clients, then the client I/O threads in turn).
        let mut link = self.link.clone();
        if let Ok(driver) = IoRuntime::for_client(self.option.placement) {
            link.driver = driver;
        }
        Client::start(
            link,
            self.side.clone(),
            self.session.clone(),
            self.events.clone(),
            (addr, &member.endpoint.server_name),
            timeout.saturating_sub(started.elapsed()),
        )
        .await
    }

    /// Takes a new endpoint list from discovery: new endpoints are used; removed ones are
    /// drained (calls in flight finish) and closed.
    pub(super) fn apply(self: &Arc<Self>, endpoints: &Endpoints) {
        let wanted: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| {
                self.option
                    .group
                    .as_ref()
                    .is_none_or(|g| e.group.as_ref() == Some(g))
            })
            .collect();
        let removed = self.members.replace(&wanted);
        for member in removed {
            // Calls in flight finish, each within its own timeout (a call's `CallOptions`
            // may give it longer than the XClient's call timeout), for 10 minutes at most.
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(600);
                while member.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(client) = member.client() {
                    client.close().await;
                }
            });
        }
        if self.bidirectional {
            // Connected to every endpoint without a call (pushes may be all it gets): one that
            // does not answer yet (starting, restarting) is tried again, 100 ms apart and
            // doubling to 5 s, while it is listed and the XClient is open. Once connected, the
            // client's own supervisor keeps it so.
            for member in self.members.all() {
                if member.retrying.swap(true, Ordering::AcqRel) {
                    continue;
                }
                // Weak: an XClient dropped without `close` ends its loops too.
                let core = Arc::downgrade(self);
                tokio::spawn(async move {
                    let mut backoff = Duration::from_millis(100);
                    loop {
                        let Some(inner) = core.upgrade() else { break };
                        let connected = inner
                            .client_for(&member, inner.option.connect_timeout)
                            .await;
                        let listed = inner.members.all().iter().any(|m| Arc::ptr_eq(m, &member));
                        if connected.is_ok() || inner.closed.is_cancelled() || !listed {
                            break;
                        }
                        let closed = inner.closed.clone();
                        drop(inner);
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = closed.cancelled() => break,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    member.retrying.store(false, Ordering::Release);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_episode_counts_once_whatever_the_number_of_callers() {
        let member = Member::new(Endpoint::parse("quic@127.0.0.1:1").unwrap(), None);
        let cooldown = Duration::from_secs(1);
        // Eight callers fail on the same dead server at once: one episode, 1 s of cool-down.
        for _ in 0..8 {
            member.record(true, cooldown);
        }
        let down = member.down_for().unwrap();
        assert!(down <= cooldown && down > cooldown / 2, "{down:?}");
        // A success closes the breaker and forgets the failures.
        member.record(false, cooldown);
        assert!(!member.failed_before());
        assert!(!member.cooling_down(Instant::now()));
    }

    #[test]
    fn an_address_listed_twice_is_one_member() {
        let members = Members::default();
        let a = Endpoint::parse("quic@127.0.0.1:1").unwrap();
        let b = Endpoint::parse("quic@127.0.0.1:2").unwrap();
        assert!(members.replace(&[&a, &a, &b]).is_empty());
        let all = members.all();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].endpoint, a);
        assert_eq!(all[1].endpoint, b);
    }

    #[test]
    fn later_episodes_double_the_cool_down() {
        let member = Member::new(Endpoint::parse("quic@127.0.0.1:1").unwrap(), None);
        let cooldown = Duration::from_millis(1);
        member.record(true, cooldown);
        std::thread::sleep(Duration::from_millis(2));
        member.record(true, cooldown);
        let health = member.health.lock().unwrap();
        assert_eq!(health.failures, 2);
    }

    #[test]
    fn a_member_replaced_for_new_metadata_keeps_its_cool_down() {
        let members = Members::default();
        let a = Endpoint::parse("quic@127.0.0.1:1").unwrap();
        assert!(members.replace(&[&a]).is_empty());
        members.all()[0].record(true, Duration::from_secs(60));
        let heavier = a.clone().with_weight(5);
        // The old member is replaced, not removed: nothing to drain.
        assert!(members.replace(&[&heavier]).is_empty());
        let now = members.all();
        assert_eq!(now[0].endpoint, heavier);
        assert!(
            now[0].cooling_down(Instant::now()),
            "the breaker carried over"
        );
    }

    #[test]
    fn a_cool_down_meant_as_for_ever_is_capped_not_an_overflow() {
        let member = Member::new(Endpoint::parse("quic@127.0.0.1:1").unwrap(), None);
        member.record(true, Duration::MAX);
        let down = member.down_for().unwrap();
        assert!(down <= MAX_COOLDOWN && down > MAX_COOLDOWN / 2, "{down:?}");
    }
}
