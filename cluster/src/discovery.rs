//! `EtcdDiscovery`: the servers of a service as etcd lists them, followed with a watch.

use std::{collections::BTreeMap, sync::Arc};

use quicx_discovery::{Discovery, Endpoint, Endpoints};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    ClusterError, EtcdOptions,
    etcd::{Change, follow},
    keys::{self, ServiceRecord},
};

/// The servers of one service, from etcd (rpcx-etcd's `EtcdV3Discovery`): every node that
/// registered the service under its lease, followed with a watch. A crashed node disappears when
/// its lease expires (within the lease TTL); a node that shuts down gracefully disappears at
/// once. While etcd is unreachable the last known list stays in force and the watch resumes
/// when etcd is back.
///
/// Each endpoint carries the node's name in its metadata under `node`.
///
/// ```no_run
/// # async fn run(tls: quicx::ClientTls) -> Result<(), Box<dyn std::error::Error>> {
/// use quicx_cluster::{EtcdDiscovery, EtcdOptions};
/// let etcd = EtcdOptions::new(["http://127.0.0.1:2379"]);
/// let discovery = EtcdDiscovery::connect(&etcd, "Arith").await?;
/// let xclient = quicx::XClient::builder("Arith", discovery)
///     .option(quicx::ClientOption::with_tls(tls))
///     .build()?;
/// let c: i64 = xclient.call("Mul", &(6, 7)).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EtcdDiscovery {
    tx: watch::Sender<Endpoints>,
    _stop: Arc<DropGuard>,
}

impl EtcdDiscovery {
    /// Connects to etcd and reads the service's servers.
    ///
    /// # When it returns
    /// Once the first list was read (it may be empty), or with [`ClusterError::EtcdUnreachable`]
    /// if etcd did not answer within its request timeout. The watch then runs in the background
    /// until the discovery is dropped.
    pub async fn connect(options: &EtcdOptions, service: &str) -> Result<Self, ClusterError> {
        let client = options.connect().await?;
        let tx = watch::Sender::new(Endpoints::default());
        let stop = CancellationToken::new();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let prefix = keys::services(&options.prefix, service);
        let publish = tx.clone();
        let mut known: BTreeMap<String, Endpoint> = BTreeMap::new();
        let apply = move |change: Change| {
            match change {
                Change::Reset(kvs) => {
                    known = kvs
                        .into_iter()
                        .filter_map(|(k, v, _)| Some((k, endpoint(&v)?)))
                        .collect();
                }
                Change::Put { key, value, .. } => match endpoint(&value) {
                    Some(e) => {
                        known.insert(key, e);
                    }
                    None => {
                        tracing::warn!("ignoring a malformed service record at {key}");
                        known.remove(&key);
                    }
                },
                Change::Delete { key, .. } => {
                    known.remove(&key);
                }
            }
            let list: Vec<Endpoint> = known.values().cloned().collect();
            publish.send_if_modified(|current| {
                if **current == list {
                    return false;
                }
                *current = Arc::new(list);
                true
            });
        };
        tokio::spawn(follow(
            client,
            prefix,
            stop.clone(),
            apply,
            Some(first_tx),
            false,
        ));
        match tokio::time::timeout(options.request_timeout, first_rx).await {
            Ok(Ok(())) => Ok(Self {
                tx,
                _stop: Arc::new(stop.drop_guard()),
            }),
            _ => {
                stop.cancel();
                Err(ClusterError::EtcdUnreachable(format!(
                    "no answer from {:?} within {:?}",
                    options.endpoints, options.request_timeout
                )))
            }
        }
    }
}

fn endpoint(value: &str) -> Option<Endpoint> {
    let record: ServiceRecord = serde_json::from_str(value).ok()?;
    let mut e = Endpoint::parse(&record.address)
        .ok()?
        .with_server_name(record.server_name)
        .with_weight(record.weight.max(1));
    e.group = record.group;
    e.metadata = record.metadata;
    e.metadata.insert("node".into(), record.node);
    Some(e)
}

impl Discovery for EtcdDiscovery {
    async fn endpoints(&self) -> Endpoints {
        self.tx.borrow().clone()
    }

    fn watch(&self) -> watch::Receiver<Endpoints> {
        self.tx.subscribe()
    }
}
