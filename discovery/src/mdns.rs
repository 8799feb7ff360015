//! mDNS discovery (mdns-sd): servers announce `_quicx._udp.local.` with their service name in a
//! TXT record; clients browse and keep only the service they asked for.
//!
//! Record lifetimes are mdns-sd's (0.21): SRV, A and AAAA records carry a TTL of 120 s, PTR and
//! TXT records 4500 s, and mdns-sd offers no public way to change them. A browser drops a server
//! when its SRV record expires, so a server that crashes (sends no goodbye) stays listed for up
//! to 120 s; one that withdraws cleanly disappears within about a second. A caller that fails to
//! reach a crashed server shortens that with [`Discovery::report_unreachable`]: the browser asks
//! the network to confirm the server's records (RFC 6762 §10.4, "cache flush on failure
//! indication") and drops it when nobody answers, about [`MDNS_VERIFY_TIMEOUT`] later.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::watch;

use crate::{Discovery, DiscoveryError, Endpoint, Endpoints};

/// The DNS-SD service type every quicx server announces.
pub const SERVICE_TYPE: &str = "_quicx._udp.local.";

// The TXT keys quicx gives a meaning to. TXT keys are case-insensitive (RFC 6763 §6.4): compare
// them with `eq_ignore_ascii_case`, never with `==`.
const TXT_SERVICE: &str = "service";
const TXT_SERVER_NAME: &str = "server_name";
const TXT_WEIGHT: &str = "weight";
const TXT_GROUP: &str = "group";

/// mdns-sd 0.21 sends a goodbye (the records with TTL 0) when a service is unregistered and
/// repeats it once, this many milliseconds afterwards (`exec_command_unregister` in its
/// `service_daemon.rs`). The repeat is a timer inside the daemon: shutting the daemon down
/// before it fires cancels it.
const GOODBYE_REPEAT_MS: u64 = 120;
/// How long after an unregister both goodbyes are surely out: the repeat plus slack for the
/// daemon thread to wake up and send it.
const GOODBYES_SENT_AFTER: Duration = Duration::from_millis(GOODBYE_REPEAT_MS + 100);

/// How long a browser waits for a server reported unreachable to confirm its records before it
/// drops them (the `timeout` of mdns-sd's `ServiceDaemon::verify`).
///
/// mdns-sd 0.21 queries the instance's SRV record and its host's A and AAAA records at once and
/// again 1 s later (a fixed resend in its `exec_command_verify`), and moves the expiry of the
/// cached SRV and address records to `now + timeout`; any answer restores their TTL, otherwise
/// they expire then and browsers get `ServiceRemoved`. It enforces no minimum, but below 1 s the
/// resend never goes out (the records are gone by then) and RFC 6762 §10.4 asks for two or more
/// queries. 2 s sends both and leaves a live responder a full second to answer the second, which
/// is also enough when its answer to the first was held back by the one-second-per-record
/// multicast rate limit (RFC 6762 §6) that mdns-sd's responder applies. The RFC's 10 s (mdns-sd's
/// `VERIFY_TIMEOUT_DEFAULT`) is meant for a hint from anywhere; here it follows a failed
/// connection attempt, and a crashed server should leave the list in seconds.
pub const MDNS_VERIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// The least time between two verifications of one instance, however often it is reported:
/// longer than [`MDNS_VERIFY_TIMEOUT`], so at most one is in flight, and it caps the queries that a
/// flood of reports about a server that answers mDNS but not QUIC sends (three questions, twice,
/// per instance every 5 s).
const VERIFY_INTERVAL: Duration = Duration::from_secs(5);

/// Which network interfaces the mDNS daemon uses.
///
/// Note: the daemon joins the multicast group on the interfaces it is allowed when it starts.
/// Restricting it here limits where it sends and listens afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Interfaces {
    /// Every interface that is up (the mdns-sd default).
    #[default]
    All,
    /// Only the interfaces with these names (`eth0`, `wlan0`, ...).
    Named(Vec<String>),
    /// Only IPv4 loopback (tests, demos, one-machine setups).
    LoopbackOnly,
}

/// Settings shared by [`MdnsDiscovery`] and [`MdnsAdvertiser`].
#[derive(Debug, Clone)]
pub struct MdnsOptions {
    /// Interface selection.
    pub interfaces: Interfaces,
    /// UDP port of mDNS (5353 unless you run a private setup).
    pub port: u16,
}

impl Default for MdnsOptions {
    fn default() -> Self {
        Self {
            interfaces: Interfaces::All,
            port: 5353,
        }
    }
}

impl MdnsOptions {
    /// Loopback only.
    pub fn loopback() -> Self {
        Self {
            interfaces: Interfaces::LoopbackOnly,
            ..Self::default()
        }
    }
}

fn mdns_err(e: impl fmt::Display) -> DiscoveryError {
    DiscoveryError::Mdns(e.to_string())
}

fn start_daemon(options: &MdnsOptions) -> Result<ServiceDaemon, DiscoveryError> {
    let daemon = ServiceDaemon::new_with_port(options.port).map_err(mdns_err)?;
    match &options.interfaces {
        Interfaces::All => {}
        Interfaces::Named(names) => {
            daemon.disable_interface(IfKind::All).map_err(mdns_err)?;
            let kinds: Vec<IfKind> = names.iter().map(|n| IfKind::Name(n.clone())).collect();
            daemon.enable_interface(kinds).map_err(mdns_err)?;
        }
        Interfaces::LoopbackOnly => {
            daemon.disable_interface(IfKind::All).map_err(mdns_err)?;
            daemon
                .enable_interface(IfKind::LoopbackV4)
                .map_err(mdns_err)?;
        }
    }
    Ok(daemon)
}

/// Finds the servers of one service on the LAN and keeps the list current as they appear and
/// vanish (rpcx's `NewMDNSDiscovery`, but filtered by service name).
///
/// The list starts empty and fills as answers arrive (typically within a second); use
/// [`wait_for_endpoints`](crate::wait_for_endpoints) to wait for the first.
///
/// TXT keys are matched case-insensitively (RFC 6763 §6.4), so a responder announcing
/// `SERVICE=Arith` or `Weight=3` is understood like one announcing `service=Arith`, `weight=3`.
/// TXT keys other than `service`, `server_name`, `weight` and `group` land in
/// [`Endpoint::metadata`], spelled as the responder spelled them.
///
/// A server that crashes sends no goodbye and would stay listed until its records expire (up
/// to 120 s); [`report_unreachable`](Discovery::report_unreachable) asks the network to confirm
/// it and drops it about [`MDNS_VERIFY_TIMEOUT`] later if nobody answers.
///
/// Dropping it stops the daemon.
pub struct MdnsDiscovery {
    service_name: String,
    tx: Arc<watch::Sender<Endpoints>>,
    resolved: Arc<Mutex<Resolved>>,
    daemon: ServiceDaemon,
    initial_wait: Duration,
}

impl fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsDiscovery")
            .field("service_name", &self.service_name)
            .field("endpoints", &self.tx.borrow().len())
            .finish()
    }
}

/// The instances of the wanted service a browser knows, shared by its browse thread (which
/// follows mdns-sd's events) and [`MdnsDiscovery::report_unreachable`] (which maps an endpoint
/// back to the instances that produced it).
#[derive(Debug, Default)]
struct Resolved {
    /// The endpoint of each instance, by instance full name (`arith-1._quicx._udp.local.`).
    endpoints: HashMap<String, Endpoint>,
    /// When each instance was last sent to verification, for the rate limit; entries older than
    /// [`VERIFY_INTERVAL`] are pruned.
    verified_at: HashMap<String, Instant>,
}

impl Resolved {
    /// Records `fullname`'s endpoint; true if the list changed.
    fn insert(&mut self, fullname: &str, endpoint: Endpoint) -> bool {
        self.endpoints.insert(fullname.to_owned(), endpoint.clone()) != Some(endpoint)
    }

    /// Forgets `fullname`; true if the list changed.
    fn remove(&mut self, fullname: &str) -> bool {
        self.verified_at.remove(fullname);
        self.endpoints.remove(fullname).is_some()
    }

    /// The list to publish, sorted.
    fn list(&self) -> Vec<Endpoint> {
        let mut list: Vec<Endpoint> = self.endpoints.values().cloned().collect();
        list.sort();
        list
    }

    /// The instances at `address` to verify at `now`: those not verified in the last
    /// [`VERIFY_INTERVAL`]. Marks them as verified at `now`.
    fn due_for_verification(&mut self, address: &str, now: Instant) -> Vec<String> {
        self.verified_at
            .retain(|_, at| now.saturating_duration_since(*at) < VERIFY_INTERVAL);
        let due: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(name, e)| {
                same_address(&e.address, address) && !self.verified_at.contains_key(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &due {
            self.verified_at.insert(name.clone(), now);
        }
        due
    }
}

/// Whether two `ip:port` strings name the same socket address (`[::1]:1` and
/// `[0:0:0:0:0:0:0:1]:1` do); anything that does not parse must match exactly.
fn same_address(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()),
            (Ok(x), Ok(y)) if x == y
        )
}

fn lock(resolved: &Mutex<Resolved>) -> std::sync::MutexGuard<'_, Resolved> {
    resolved.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MdnsDiscovery {
    /// Browses for servers announcing `service_name`.
    pub fn new(service_name: &str, options: &MdnsOptions) -> Result<Self, DiscoveryError> {
        let daemon = start_daemon(options)?;
        let events = daemon.browse(SERVICE_TYPE).map_err(mdns_err)?;
        let tx = Arc::new(watch::Sender::new(Endpoints::default()));
        let publish = tx.clone();
        let resolved = Arc::new(Mutex::new(Resolved::default()));
        let found = resolved.clone();
        let wanted = service_name.to_owned();
        std::thread::Builder::new()
            .name("quicx-mdns-browse".into())
            .spawn(move || {
                while let Ok(event) = events.recv() {
                    let mut found = lock(&found);
                    let changed = match event {
                        ServiceEvent::ServiceResolved(info) => {
                            let fullname = info.get_fullname();
                            match endpoint_of(&info, &wanted) {
                                Some(e) => found.insert(fullname, e),
                                // Another service, or an instance whose TXT record no longer
                                // names ours.
                                None => found.remove(fullname),
                            }
                        }
                        // A goodbye, an expired SRV record, or a verification nobody answered
                        // (`report_unreachable`).
                        ServiceEvent::ServiceRemoved(_, fullname) => {
                            let removed = found.remove(&fullname);
                            if removed {
                                tracing::debug!(service = %wanted, instance = %fullname, "mDNS instance removed");
                            }
                            removed
                        }
                        ServiceEvent::SearchStopped(_) => break,
                        _ => false,
                    };
                    let list = changed.then(|| found.list());
                    drop(found);
                    if let Some(list) = list {
                        tracing::debug!(service = %wanted, endpoints = list.len(), "mDNS endpoints changed");
                        publish.send_replace(Arc::new(list));
                    }
                }
            })
            .map_err(mdns_err)?;
        Ok(Self {
            service_name: service_name.to_owned(),
            tx,
            resolved,
            daemon,
            initial_wait: Duration::from_secs(2),
        })
    }
}

impl MdnsDiscovery {
    /// How long [`endpoints`](crate::LocalDiscovery::endpoints) waits for a first answer when
    /// none has arrived yet.
    #[must_use]
    pub fn with_initial_wait(mut self, wait: Duration) -> Self {
        self.initial_wait = wait;
        self
    }
}

/// The endpoint a resolved instance describes, if it is a server of `wanted`.
fn endpoint_of(info: &mdns_sd::ResolvedService, wanted: &str) -> Option<Endpoint> {
    let txt = Txt::from_pairs(info.get_properties().iter().map(|p| (p.key(), p.val_str())));
    txt.endpoint(
        wanted,
        info.get_addresses().iter().map(|a| a.to_ip_addr()),
        info.get_port(),
        info.get_hostname(),
    )
}

/// What one instance's TXT record tells quicx: the pure part of turning an mDNS answer into an
/// [`Endpoint`], so it can be tested without a daemon.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Txt {
    service: Option<String>,
    server_name: Option<String>,
    weight: Option<String>,
    group: Option<String>,
    /// Every other key, spelled as announced.
    metadata: BTreeMap<String, String>,
}

impl Txt {
    /// Reads `(key, value)` pairs in record order. Keys are case-insensitive (RFC 6763 §6.4):
    /// `SERVICE`, `Service` and `service` are one key, and of a key given more than once only
    /// the first occurrence counts, whatever its case.
    fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut txt = Self::default();
        let mut seen = HashSet::new();
        for (key, value) in pairs {
            if !seen.insert(key.to_ascii_lowercase()) {
                continue;
            }
            let slot = if key.eq_ignore_ascii_case(TXT_SERVICE) {
                &mut txt.service
            } else if key.eq_ignore_ascii_case(TXT_SERVER_NAME) {
                &mut txt.server_name
            } else if key.eq_ignore_ascii_case(TXT_WEIGHT) {
                &mut txt.weight
            } else if key.eq_ignore_ascii_case(TXT_GROUP) {
                &mut txt.group
            } else {
                txt.metadata.insert(key.to_owned(), value.to_owned());
                continue;
            };
            *slot = Some(value.to_owned());
        }
        txt
    }

    /// The endpoint at `port` on `addresses` (IPv4 preferred, then the lowest address, so the
    /// choice is stable across answers); `None` if the record is not for `wanted` (service
    /// names are compared exactly: only keys are case-insensitive) or there is no address.
    /// Without `server_name` the certificate name is `hostname`; a missing or unreadable weight
    /// is 1.
    fn endpoint(
        self,
        wanted: &str,
        addresses: impl IntoIterator<Item = IpAddr>,
        port: u16,
        hostname: &str,
    ) -> Option<Endpoint> {
        if self.service.as_deref() != Some(wanted) {
            return None;
        }
        let ip = addresses.into_iter().min_by_key(|a| (a.is_ipv6(), *a))?;
        let address = match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        };
        Some(Endpoint {
            address,
            server_name: self
                .server_name
                .unwrap_or_else(|| hostname.trim_end_matches('.').to_owned()),
            weight: self.weight.and_then(|w| w.parse().ok()).unwrap_or(1),
            group: self.group,
            metadata: self.metadata,
        })
    }
}

impl Discovery for MdnsDiscovery {
    /// The servers found so far; if none yet, waits up to the initial wait (default 2 s) for
    /// the first answer.
    async fn endpoints(&self) -> Endpoints {
        crate::wait_for_endpoints(self, self.initial_wait).await
    }

    fn watch(&self) -> watch::Receiver<Endpoints> {
        self.tx.subscribe()
    }

    /// Verifies the instances announcing `endpoint` (matched by `address`) as RFC 6762 §10.4
    /// describes: mdns-sd queries their SRV and address records, twice, 1 s apart, and flushes
    /// them if no answer comes within [`MDNS_VERIFY_TIMEOUT`] (2 s); the endpoint then leaves the
    /// list. A server that answers stays listed (one whose answers are all lost is dropped too,
    /// and listed again when its records are next seen on the network, for example in an answer
    /// to another browser). Each instance is verified at most once every 5 s, however often it
    /// is reported; endpoints this discovery does not list are ignored. Returns at once.
    fn report_unreachable(&self, endpoint: &Endpoint) {
        let due = lock(&self.resolved).due_for_verification(&endpoint.address, Instant::now());
        if due.is_empty() {
            tracing::debug!(
                service = %self.service_name,
                %endpoint,
                "mDNS: unreachable endpoint not listed, or verified recently"
            );
        }
        for fullname in due {
            match self.daemon.verify(fullname.clone(), MDNS_VERIFY_TIMEOUT) {
                Ok(()) => tracing::debug!(
                    service = %self.service_name,
                    %endpoint,
                    instance = %fullname,
                    "mDNS: verifying an unreachable endpoint"
                ),
                Err(e) => {
                    tracing::debug!(
                        service = %self.service_name,
                        %endpoint,
                        instance = %fullname,
                        error = %e,
                        "mDNS: cannot verify an unreachable endpoint"
                    );
                    // Not sent: let the next report try again.
                    lock(&self.resolved).verified_at.remove(&fullname);
                }
            }
        }
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// What a server announces.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// The service name clients browse for (`"Arith"`).
    pub service_name: String,
    /// This server's instance name, unique on the LAN (`"arith-1"`).
    pub instance_name: String,
    /// The UDP port the quicx server listens on.
    pub port: u16,
    /// The name the server's certificate carries (clients check it).
    pub server_name: String,
    /// Weight for weighted selection.
    pub weight: u32,
    /// Group.
    pub group: Option<String>,
    /// Free-form metadata (TXT records).
    ///
    /// TXT keys are case-insensitive (RFC 6763 §6.4): a key that matches `service`,
    /// `server_name`, `weight` or `group` in any case is not announced (the field of the same
    /// name is), and of keys that differ only in case only the first (in map order) is
    /// announced. Both are logged as warnings.
    pub metadata: BTreeMap<String, String>,
    /// Addresses to announce; empty announces the addresses of the enabled interfaces.
    pub addresses: Vec<IpAddr>,
}

impl Announcement {
    /// An announcement with weight 1, no group, no metadata, automatic addresses, and
    /// `localhost` as certificate name.
    pub fn new(service_name: &str, instance_name: &str, port: u16) -> Self {
        Self {
            service_name: service_name.to_owned(),
            instance_name: instance_name.to_owned(),
            port,
            server_name: "localhost".to_owned(),
            weight: 1,
            group: None,
            metadata: BTreeMap::new(),
            addresses: Vec::new(),
        }
    }

    /// The TXT record: the well-known keys, then the metadata minus the keys that would clash
    /// with them or with each other (RFC 6763 §6.4 keeps only the first of a repeated key).
    fn txt_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = vec![
            (TXT_SERVICE.to_owned(), self.service_name.clone()),
            (TXT_SERVER_NAME.to_owned(), self.server_name.clone()),
            (TXT_WEIGHT.to_owned(), self.weight.to_string()),
        ];
        if let Some(group) = &self.group {
            pairs.push((TXT_GROUP.to_owned(), group.clone()));
        }
        let mut seen: HashSet<String> = [TXT_SERVICE, TXT_SERVER_NAME, TXT_WEIGHT, TXT_GROUP]
            .into_iter()
            .map(str::to_owned)
            .collect();
        for (key, value) in &self.metadata {
            if seen.insert(key.to_ascii_lowercase()) {
                pairs.push((key.clone(), value.clone()));
            } else {
                tracing::warn!(
                    instance = %self.instance_name,
                    key = %key,
                    "mDNS metadata key not announced: TXT keys are case-insensitive and it \
                     clashes with a quicx key or another metadata key"
                );
            }
        }
        pairs
    }
}

/// Announces quicx servers on the LAN.
///
/// Dropping it withdraws every announcement still live, as
/// [`MdnsRegistration::withdraw`] does, and stops the daemon. That blocks the dropping thread
/// for up to about a quarter of a second while the goodbyes go out; in async code, withdraw
/// the registrations first.
pub struct MdnsAdvertiser {
    shared: Arc<Advertising>,
}

/// What an advertiser and its registrations share.
struct Advertising {
    daemon: ServiceDaemon,
    state: Mutex<AdvertisingState>,
}

#[derive(Debug, Default)]
struct AdvertisingState {
    /// Full names of the services registered and not yet unregistered.
    live: HashSet<String>,
    /// When the goodbyes of the last unregister will all have been sent.
    goodbyes_sent_at: Option<Instant>,
}

impl Advertising {
    fn state(&self) -> std::sync::MutexGuard<'_, AdvertisingState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unregisters `fullname` if it is still live; returns the daemon's answer.
    fn unregister(&self, fullname: &str) -> Option<mdns_sd::Receiver<mdns_sd::UnregisterStatus>> {
        let mut state = self.state();
        if !state.live.remove(fullname) {
            return None;
        }
        let rx = self.daemon.unregister(fullname).ok()?;
        state.goodbyes_sent_by(Instant::now() + GOODBYES_SENT_AFTER);
        Some(rx)
    }
}

impl AdvertisingState {
    fn goodbyes_sent_by(&mut self, at: Instant) {
        self.goodbyes_sent_at = Some(self.goodbyes_sent_at.map_or(at, |t| t.max(at)));
    }
}

impl fmt::Debug for MdnsAdvertiser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsAdvertiser")
            .field("live", &self.shared.state().live.len())
            .finish_non_exhaustive()
    }
}

impl MdnsAdvertiser {
    /// Starts an mDNS daemon for announcing.
    pub fn new(options: &MdnsOptions) -> Result<Self, DiscoveryError> {
        Ok(Self {
            shared: Arc::new(Advertising {
                daemon: start_daemon(options)?,
                state: Mutex::default(),
            }),
        })
    }

    /// Announces a server until the returned registration is withdrawn or dropped, or this
    /// advertiser is dropped.
    pub fn advertise(&self, a: &Announcement) -> Result<MdnsRegistration, DiscoveryError> {
        let props = a.txt_pairs();
        let host = format!("{}.local.", a.instance_name);
        let addresses: Vec<String> = a.addresses.iter().map(ToString::to_string).collect();
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &a.instance_name,
            &host,
            addresses.join(",").as_str(),
            a.port,
            props.as_slice(),
        )
        .map_err(mdns_err)?;
        let info = if a.addresses.is_empty() {
            info.enable_addr_auto()
        } else {
            info
        };
        let fullname = info.get_fullname().to_owned();
        let mut state = self.shared.state();
        self.shared.daemon.register(info).map_err(mdns_err)?;
        state.live.insert(fullname.clone());
        drop(state);
        Ok(MdnsRegistration {
            shared: self.shared.clone(),
            fullname: Some(fullname),
        })
    }

    /// Unregisters every live announcement and blocks until the goodbyes of every
    /// announcement withdrawn so far (both of each) have been sent.
    fn withdraw_all(&self) {
        let live: Vec<String> = self.shared.state().live.iter().cloned().collect();
        for fullname in live {
            let _ = self.shared.unregister(&fullname);
        }
        let pending = self.shared.state().goodbyes_sent_at;
        let Some(sent_at) = pending.filter(|t| *t > Instant::now()) else {
            return;
        };
        // The daemon runs its commands in order: once it answers this, it has run every
        // unregister sent before, and each repeat is due at most GOODBYE_REPEAT_MS later.
        if let Ok(status) = self.shared.daemon.status() {
            let _ = status.recv_timeout(Duration::from_secs(1));
        }
        let sent_at = sent_at.max(Instant::now() + GOODBYES_SENT_AFTER);
        std::thread::sleep(sent_at.saturating_duration_since(Instant::now()));
    }
}

impl Drop for MdnsAdvertiser {
    fn drop(&mut self) {
        // Shutting the daemon down cancels goodbye repeats still pending: let them go out first.
        self.withdraw_all();
        if let Ok(stopped) = self.shared.daemon.shutdown() {
            let _ = stopped.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// A live announcement. [`withdraw`](Self::withdraw) (or dropping it) sends the goodbye so
/// browsers remove the endpoint at once.
pub struct MdnsRegistration {
    shared: Arc<Advertising>,
    fullname: Option<String>,
}

impl fmt::Debug for MdnsRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsRegistration")
            .field("fullname", &self.fullname)
            .finish()
    }
}

impl MdnsRegistration {
    /// Withdraws the announcement: sends the goodbye (the records with TTL 0), which makes
    /// browsers drop the endpoint about a second later, and returns once it has been sent.
    ///
    /// The goodbye goes out twice, 120 ms apart, on every interface and IP family the
    /// announcement is on: that is mdns-sd's own repeat (0.21, `exec_command_unregister` in
    /// its `service_daemon.rs`); its public API has no way to send a third, as python-zeroconf
    /// does. If both are lost, browsers keep the endpoint until its records expire (120 s).
    /// This waits for the repeat (about 0.25 s in all, at most 1.25 s) because stopping the
    /// daemon (dropping the [`MdnsAdvertiser`]) cancels a repeat not yet sent.
    ///
    /// Dropping the registration withdraws it too, without waiting; the advertiser, when
    /// dropped, still waits for the repeat.
    pub async fn withdraw(mut self) {
        let Some(name) = self.fullname.take() else {
            return;
        };
        let Some(answer) = self.shared.unregister(&name) else {
            return;
        };
        let answer = tokio::time::timeout(Duration::from_secs(1), answer.recv_async()).await;
        if let Ok(Ok(mdns_sd::UnregisterStatus::OK)) = answer {
            // The daemon answers right after the first goodbye; the repeat follows.
            let sent_at = Instant::now() + GOODBYES_SENT_AFTER;
            self.shared.state().goodbyes_sent_by(sent_at);
            tokio::time::sleep_until(sent_at.into()).await;
        }
    }
}

impl Drop for MdnsRegistration {
    fn drop(&mut self) {
        if let Some(name) = self.fullname.take() {
            let _ = self.shared.unregister(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCALHOST: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];

    fn endpoint(pairs: &[(&str, &str)]) -> Option<Endpoint> {
        Txt::from_pairs(pairs.iter().copied()).endpoint("Arith", LOCALHOST, 8972, "host.local.")
    }

    #[test]
    fn txt_keys_are_case_insensitive_and_stay_out_of_metadata() {
        let lower = endpoint(&[
            ("service", "Arith"),
            ("server_name", "arith.example"),
            ("weight", "5"),
            ("group", "blue"),
            ("version", "1.2"),
        ])
        .unwrap();
        let mixed = endpoint(&[
            ("SERVICE", "Arith"),
            ("Server_Name", "arith.example"),
            ("WEIGHT", "5"),
            ("Group", "blue"),
            ("version", "1.2"),
        ])
        .unwrap();
        assert_eq!(mixed, lower);
        assert_eq!(
            mixed,
            Endpoint::parse("127.0.0.1:8972")
                .unwrap()
                .with_server_name("arith.example")
                .with_weight(5)
                .with_group("blue")
                .with_metadata("version", "1.2")
        );
        // Unknown keys stay in the metadata, spelled as announced.
        let e = endpoint(&[("Service", "Arith"), ("Version", "2")]).unwrap();
        assert_eq!(e.metadata, BTreeMap::from([("Version".into(), "2".into())]));
    }

    #[test]
    fn txt_keeps_the_first_of_a_repeated_key_in_any_case() {
        let e = endpoint(&[
            ("service", "Arith"),
            ("WEIGHT", "3"),
            ("weight", "9"),
            ("Version", "1"),
            ("version", "2"),
            ("SERVICE", "Other"),
        ])
        .unwrap();
        assert_eq!(e.weight, 3);
        assert_eq!(e.metadata, BTreeMap::from([("Version".into(), "1".into())]));
    }

    #[test]
    fn txt_filters_by_exact_service_name() {
        assert!(endpoint(&[("service", "Other")]).is_none());
        assert!(
            endpoint(&[("SERVICE", "arith")]).is_none(),
            "values keep their case"
        );
        assert!(endpoint(&[("version", "1")]).is_none(), "no service key");
        let txt = Txt::from_pairs([("service", "Arith")]);
        assert!(
            txt.endpoint("Arith", [], 1, "h.local.").is_none(),
            "no address"
        );
    }

    #[test]
    fn txt_defaults_and_address_choice() {
        let txt = Txt::from_pairs([("Service", "Arith"), ("Weight", "lots")]);
        let v6: IpAddr = "fe80::1".parse().unwrap();
        let a: IpAddr = "192.168.1.20".parse().unwrap();
        let b: IpAddr = "10.0.0.7".parse().unwrap();
        let e = txt
            .clone()
            .endpoint("Arith", [v6, a, b], 9, "box.local.")
            .unwrap();
        assert_eq!(e.address, "10.0.0.7:9");
        assert_eq!(e.server_name, "box.local");
        assert_eq!(e.weight, 1, "an unreadable weight counts as 1");
        assert_eq!(e.group, None);
        let e = txt.endpoint("Arith", [v6], 9, "box.local.").unwrap();
        assert_eq!(e.address, "[fe80::1]:9");
    }

    #[test]
    fn announcement_txt_round_trips_and_drops_clashing_metadata() {
        let mut a = Announcement::new("Arith", "arith-1", 8972);
        a.server_name = "arith.example".into();
        a.weight = 7;
        a.group = Some("lab".into());
        a.metadata.insert("Weight".into(), "100".into());
        a.metadata.insert("VERSION".into(), "1.2".into());
        a.metadata.insert("version".into(), "9.9".into());
        a.metadata.insert("region".into(), "eu".into());
        let pairs = a.txt_pairs();
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "service",
                "server_name",
                "weight",
                "group",
                "VERSION",
                "region"
            ]
        );
        let e = Txt::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .endpoint("Arith", LOCALHOST, a.port, "arith-1.local.")
            .unwrap();
        assert_eq!(e.server_name, "arith.example");
        assert_eq!(e.weight, 7);
        assert_eq!(e.group.as_deref(), Some("lab"));
        assert_eq!(
            e.metadata,
            BTreeMap::from([
                ("VERSION".into(), "1.2".into()),
                ("region".into(), "eu".into())
            ])
        );
    }

    #[test]
    fn verification_maps_addresses_to_instances_and_is_rate_limited() {
        let mut r = Resolved::default();
        let at = |a: &str| Endpoint::parse(a).unwrap();
        assert!(r.insert("a._quicx._udp.local.", at("10.0.0.1:1")));
        assert!(
            !r.insert("a._quicx._udp.local.", at("10.0.0.1:1")),
            "no change"
        );
        assert!(r.insert("b._quicx._udp.local.", at("10.0.0.1:1")));
        assert!(r.insert("c._quicx._udp.local.", at("[::1]:2")));
        let t0 = Instant::now();
        let mut due = r.due_for_verification("10.0.0.1:1", t0);
        due.sort();
        assert_eq!(due, ["a._quicx._udp.local.", "b._quicx._udp.local."]);
        // Reported again, by anyone, while verifying: nothing new.
        assert!(r.due_for_verification("10.0.0.1:1", t0).is_empty());
        let soon = t0 + VERIFY_INTERVAL - Duration::from_millis(1);
        assert!(r.due_for_verification("10.0.0.1:1", soon).is_empty());
        // Addresses compare as socket addresses; unknown ones verify nothing.
        assert_eq!(
            r.due_for_verification("[0:0:0:0:0:0:0:1]:2", t0),
            ["c._quicx._udp.local."]
        );
        assert!(r.due_for_verification("10.0.0.1:2", t0).is_empty());
        assert!(r.due_for_verification("nowhere", t0).is_empty());
        // A removed instance that comes back is verified afresh.
        assert!(r.remove("a._quicx._udp.local."));
        assert!(!r.remove("a._quicx._udp.local."));
        assert_eq!(r.list(), [at("10.0.0.1:1"), at("[::1]:2")]);
        r.insert("a._quicx._udp.local.", at("10.0.0.1:1"));
        assert_eq!(
            r.due_for_verification("10.0.0.1:1", soon),
            ["a._quicx._udp.local."]
        );
        // Once the interval has passed, again; stale marks are pruned.
        let later = t0 + VERIFY_INTERVAL;
        assert_eq!(
            r.due_for_verification("10.0.0.1:1", later),
            ["b._quicx._udp.local."]
        );
        assert_eq!(r.verified_at.len(), 2, "{:?}", r.verified_at);
    }

    /// Tests with a real daemon, inside a private network namespace holding only `lo` (never on
    /// the machine's interfaces). Built with the `sandbox` feature (as `cargo test --workspace`
    /// does); skipped, loudly, where namespaces cannot be created.
    #[cfg(feature = "sandbox")]
    mod sandboxed {
        use super::*;

        fn in_private_namespace(test: impl std::future::Future<Output = ()>) {
            if let Err(reason) = crate::sandbox::enter_private_network_namespace() {
                eprintln!(
                    "SKIPPED: cannot create a private network namespace ({reason}); this mDNS \
                     test would otherwise multicast on the machine's real interfaces. Run it as \
                     root."
                );
                return;
            }
            // Built after unshare, on this thread: the runtime lives in the namespace too.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(test);
        }

        fn counters(daemon: &ServiceDaemon) -> (i64, i64) {
            let metrics = daemon
                .get_metrics()
                .unwrap()
                .recv_timeout(Duration::from_secs(1))
                .unwrap();
            let get = |k: &str| metrics.get(k).copied().unwrap_or(0);
            (get("unregister"), get("unregister-resend"))
        }

        fn announcement(instance: &str, port: u16) -> Announcement {
            let mut a = Announcement::new("Arith", instance, port);
            a.addresses = LOCALHOST.to_vec();
            a
        }

        #[test]
        fn withdraw_returns_after_both_goodbyes() {
            in_private_namespace(async {
                let advertiser = MdnsAdvertiser::new(&MdnsOptions::loopback()).unwrap();
                let registration = advertiser
                    .advertise(&announcement("arith-1", 9001))
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                registration.withdraw().await;
                let (goodbyes, repeats) = counters(&advertiser.shared.daemon);
                assert_eq!(goodbyes, 1);
                assert!(repeats >= 1, "the repeated goodbye is out: {repeats}");
            });
        }

        #[test]
        fn dropping_the_advertiser_sends_every_goodbye_twice_first() {
            in_private_namespace(async {
                let advertiser = MdnsAdvertiser::new(&MdnsOptions::loopback()).unwrap();
                let dropped = advertiser
                    .advertise(&announcement("arith-1", 9001))
                    .unwrap();
                let _live = advertiser
                    .advertise(&announcement("arith-2", 9002))
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                // Dropping a registration, then the advertiser at once, used to stop the daemon
                // before the goodbye repeat; a registration still live got a single goodbye.
                drop(dropped);
                advertiser.withdraw_all();
                let (goodbyes, repeats) = counters(&advertiser.shared.daemon);
                assert_eq!(goodbyes, 2);
                assert!(repeats >= 2, "both goodbyes repeated: {repeats}");
                assert!(advertiser.shared.state().live.is_empty());
                let started = Instant::now();
                drop(advertiser);
                assert!(started.elapsed() < Duration::from_secs(1));
            });
        }

        /// Tells [`crashed_server_child`] that it runs as the child of
        /// [`report_unreachable_drops_a_crashed_server`], in that test's namespace.
        const CRASH_CHILD_ENV: &str = "QUICX_MDNS_CRASH_CHILD";
        const CRASHED_PORT: u16 = 9201;
        const LIVE_PORT: u16 = 9202;

        /// Not a test: the advertiser [`report_unreachable_drops_a_crashed_server`] runs in a
        /// child process (this test binary, filtered to this test) and kills with SIGKILL, so
        /// that it sends no goodbye. Does nothing unless that test started it.
        #[test]
        #[ignore = "the child process of report_unreachable_drops_a_crashed_server"]
        fn crashed_server_child() {
            if std::env::var_os(CRASH_CHILD_ENV).is_none() {
                eprintln!("nothing to do: run by report_unreachable_drops_a_crashed_server");
                return;
            }
            // The child inherits the parent's private namespace; never advertise elsewhere.
            let links = std::process::Command::new("ip")
                .args(["-o", "link", "show"])
                .output()
                .expect("ip");
            let links = String::from_utf8_lossy(&links.stdout);
            let names: Vec<&str> = links
                .lines()
                .filter_map(|l| l.split(':').nth(1).map(str::trim))
                .collect();
            assert_eq!(names, ["lo"], "only in a private namespace");
            let advertiser = MdnsAdvertiser::new(&MdnsOptions::loopback()).unwrap();
            let _registration = advertiser
                .advertise(&announcement("crash-1", CRASHED_PORT))
                .unwrap();
            // Until killed; the bound only matters if the parent died without killing it.
            std::thread::sleep(Duration::from_secs(60));
        }

        /// The child process running [`crashed_server_child`]; killed (SIGKILL) when dropped.
        struct CrashedServer(std::process::Child);

        impl CrashedServer {
            fn spawn() -> Self {
                let child = std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "mdns::tests::sandboxed::crashed_server_child",
                        "--exact",
                        "--ignored",
                        "--nocapture",
                    ])
                    .env(CRASH_CHILD_ENV, "1")
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                Self(child)
            }

            /// SIGKILL: the process ends at once, its daemon sends nothing more.
            fn kill(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        impl Drop for CrashedServer {
            fn drop(&mut self) {
                self.kill();
            }
        }

        #[test]
        fn report_unreachable_drops_a_crashed_server() {
            in_private_namespace(async {
                let options = MdnsOptions::loopback();
                // Spawned after unshare, from this thread: the child is in this namespace.
                let mut crashed = CrashedServer::spawn();
                let advertiser = MdnsAdvertiser::new(&options).unwrap();
                let _live = advertiser
                    .advertise(&announcement("live-1", LIVE_PORT))
                    .unwrap();
                let discovery = MdnsDiscovery::new("Arith", &options).unwrap();
                let mut watch = Discovery::watch(&discovery);
                let crashed_at = format!("127.0.0.1:{CRASHED_PORT}");
                let live_at = format!("127.0.0.1:{LIVE_PORT}");
                let addresses = |list: &[Endpoint]| -> Vec<String> {
                    list.iter().map(|e| e.address.clone()).collect()
                };
                let both = [crashed_at.clone(), live_at.clone()];
                let found = tokio::time::timeout(
                    Duration::from_secs(10),
                    watch.wait_for(|list| addresses(list) == both),
                )
                .await
                .map(|r| r.is_ok());
                assert!(
                    found == Ok(true),
                    "both servers found: {:?} (child: {:?})",
                    watch.borrow(),
                    crashed.0.try_wait()
                );
                let listed = Discovery::endpoints(&discovery).await;
                let (crashed_endpoint, live_endpoint) = (listed[0].clone(), listed[1].clone());

                crashed.kill();
                tokio::time::sleep(Duration::from_secs(1)).await;
                assert_eq!(
                    addresses(&watch.borrow_and_update()),
                    both,
                    "no goodbye came from the killed server"
                );

                let reported = Instant::now();
                // Many callers at once; the live server is reported too (a false alarm).
                for _ in 0..100 {
                    Discovery::report_unreachable(&discovery, &crashed_endpoint);
                    Discovery::report_unreachable(&discovery, &live_endpoint);
                }
                tokio::time::timeout(
                    Duration::from_secs(10),
                    watch.wait_for(|list| addresses(list) == [live_at.clone()]),
                )
                .await
                .expect("the crashed server is dropped after verification")
                .unwrap();
                let gone_after = reported.elapsed();
                eprintln!(
                    "mDNS: a crashed server left the list {:.0} ms after report_unreachable",
                    gone_after.as_secs_f64() * 1e3
                );
                assert!(
                    gone_after >= MDNS_VERIFY_TIMEOUT - Duration::from_millis(100),
                    "dropped by the verification, not before: {gone_after:?}"
                );
                // The live server answered the verification: still listed once it is over.
                tokio::time::sleep_until((reported + MDNS_VERIFY_TIMEOUT * 2).into()).await;
                assert_eq!(
                    addresses(&Discovery::endpoints(&discovery).await),
                    [live_at]
                );
            });
        }

        #[test]
        fn another_responders_capitalised_txt_keys() {
            in_private_namespace(async {
                let options = MdnsOptions::loopback();
                let responder = MdnsAdvertiser::new(&options).unwrap();
                let props = [
                    ("SERVICE", "Arith"),
                    ("Server_Name", "arith.example"),
                    ("WEIGHT", "4"),
                    ("Group", "lab"),
                    ("Version", "1.2"),
                ];
                let info = ServiceInfo::new(
                    SERVICE_TYPE,
                    "foreign-1",
                    "foreign-1.local.",
                    "127.0.0.1",
                    9100,
                    &props[..],
                )
                .unwrap();
                responder.shared.daemon.register(info).unwrap();
                let discovery = MdnsDiscovery::new("Arith", &options).unwrap();
                let found = crate::wait_for_endpoints(&discovery, Duration::from_secs(10)).await;
                assert_eq!(
                    found.as_slice(),
                    [Endpoint::parse("127.0.0.1:9100")
                        .unwrap()
                        .with_server_name("arith.example")
                        .with_weight(4)
                        .with_group("lab")
                        .with_metadata("Version", "1.2")]
                );
            });
        }
    }
}
