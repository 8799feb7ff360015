//! mDNS discovery (mdns-sd): servers announce `_quicx._udp.local.` with their service name in a
//! TXT record; clients browse and keep only the service they asked for.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::watch;

use crate::{Discovery, DiscoveryError, Endpoint, Endpoints};

/// The DNS-SD service type every quicx server announces.
pub const SERVICE_TYPE: &str = "_quicx._udp.local.";

const TXT_SERVICE: &str = "service";
const TXT_SERVER_NAME: &str = "server_name";
const TXT_WEIGHT: &str = "weight";
const TXT_GROUP: &str = "group";

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
/// Dropping it stops the daemon.
pub struct MdnsDiscovery {
    service_name: String,
    tx: Arc<watch::Sender<Endpoints>>,
    daemon: ServiceDaemon,
    initial_wait: std::time::Duration,
}

impl fmt::Debug for MdnsDiscovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsDiscovery")
            .field("service_name", &self.service_name)
            .field("endpoints", &self.tx.borrow().len())
            .finish()
    }
}

impl MdnsDiscovery {
    /// Browses for servers announcing `service_name`.
    pub fn new(service_name: &str, options: &MdnsOptions) -> Result<Self, DiscoveryError> {
        let daemon = start_daemon(options)?;
        let events = daemon.browse(SERVICE_TYPE).map_err(mdns_err)?;
        let tx = Arc::new(watch::Sender::new(Endpoints::default()));
        let publish = tx.clone();
        let wanted = service_name.to_owned();
        std::thread::Builder::new()
            .name("quicx-mdns-browse".into())
            .spawn(move || {
                let mut found: HashMap<String, Endpoint> = HashMap::new();
                while let Ok(event) = events.recv() {
                    let changed = match event {
                        ServiceEvent::ServiceResolved(info) => {
                            if info.get_property_val_str(TXT_SERVICE) != Some(wanted.as_str()) {
                                continue;
                            }
                            match endpoint_of(&info) {
                                Some(e) => found.insert(info.get_fullname().to_owned(), e.clone()) != Some(e),
                                None => false,
                            }
                        }
                        ServiceEvent::ServiceRemoved(_, fullname) => found.remove(&fullname).is_some(),
                        ServiceEvent::SearchStopped(_) => break,
                        _ => false,
                    };
                    if changed {
                        let mut list: Vec<Endpoint> = found.values().cloned().collect();
                        list.sort();
                        tracing::debug!(service = %wanted, endpoints = list.len(), "mDNS endpoints changed");
                        publish.send_replace(Arc::new(list));
                    }
                }
            })
            .map_err(mdns_err)?;
        Ok(Self {
            service_name: service_name.to_owned(),
            tx,
            daemon,
            initial_wait: std::time::Duration::from_secs(2),
        })
    }
}

impl MdnsDiscovery {
    /// How long [`endpoints`](crate::LocalDiscovery::endpoints) waits for a first answer when
    /// none has arrived yet.
    #[must_use]
    pub fn with_initial_wait(mut self, wait: std::time::Duration) -> Self {
        self.initial_wait = wait;
        self
    }
}

fn endpoint_of(info: &mdns_sd::ResolvedService) -> Option<Endpoint> {
    let mut addresses: Vec<IpAddr> = info
        .get_addresses()
        .iter()
        .map(|a| a.to_ip_addr())
        .collect();
    // Prefer IPv4, then the lowest address, so the choice is stable across answers.
    addresses.sort_by_key(|a| (a.is_ipv6(), *a));
    let ip = addresses.first()?;
    let address = match ip {
        IpAddr::V4(v4) => format!("{v4}:{}", info.get_port()),
        IpAddr::V6(v6) => format!("[{v6}]:{}", info.get_port()),
    };
    let mut metadata = BTreeMap::new();
    for p in info.get_properties().iter() {
        if ![TXT_SERVICE, TXT_SERVER_NAME, TXT_WEIGHT, TXT_GROUP].contains(&p.key()) {
            metadata.insert(p.key().to_owned(), p.val_str().to_owned());
        }
    }
    Some(Endpoint {
        address,
        server_name: info.get_property_val_str(TXT_SERVER_NAME).map_or_else(
            || info.get_hostname().trim_end_matches('.').to_owned(),
            str::to_owned,
        ),
        weight: info
            .get_property_val_str(TXT_WEIGHT)
            .and_then(|w| w.parse().ok())
            .unwrap_or(1),
        group: info.get_property_val_str(TXT_GROUP).map(str::to_owned),
        metadata,
    })
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
}

/// Announces quicx servers on the LAN.
pub struct MdnsAdvertiser {
    daemon: ServiceDaemon,
}

impl fmt::Debug for MdnsAdvertiser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MdnsAdvertiser").finish_non_exhaustive()
    }
}

impl MdnsAdvertiser {
    /// Starts an mDNS daemon for announcing.
    pub fn new(options: &MdnsOptions) -> Result<Self, DiscoveryError> {
        Ok(Self {
            daemon: start_daemon(options)?,
        })
    }

    /// Announces a server until the returned registration is withdrawn or dropped.
    pub fn advertise(&self, a: &Announcement) -> Result<MdnsRegistration, DiscoveryError> {
        let mut props: Vec<(String, String)> = vec![
            (TXT_SERVICE.into(), a.service_name.clone()),
            (TXT_SERVER_NAME.into(), a.server_name.clone()),
            (TXT_WEIGHT.into(), a.weight.to_string()),
        ];
        if let Some(group) = &a.group {
            props.push((TXT_GROUP.into(), group.clone()));
        }
        props.extend(a.metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
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
        self.daemon.register(info).map_err(mdns_err)?;
        Ok(MdnsRegistration {
            daemon: self.daemon.clone(),
            fullname: Some(fullname),
        })
    }
}

impl Drop for MdnsAdvertiser {
    fn drop(&mut self) {
        // Registrations hold their own handle; the daemon stops once withdrawals are sent.
        let _ = self.daemon.shutdown();
    }
}

/// A live announcement. [`withdraw`](Self::withdraw) (or dropping it) sends the goodbye so
/// browsers remove the endpoint at once.
pub struct MdnsRegistration {
    daemon: ServiceDaemon,
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
    /// Withdraws the announcement and waits (up to 1 s) until the daemon has sent the goodbye.
    pub async fn withdraw(mut self) {
        if let Some(name) = self.fullname.take() {
            if let Ok(rx) = self.daemon.unregister(&name) {
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv_async()).await;
            }
        }
    }
}

impl Drop for MdnsRegistration {
    fn drop(&mut self) {
        if let Some(name) = self.fullname.take() {
            let _ = self.daemon.unregister(&name);
        }
    }
}
