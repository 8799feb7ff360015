//! Durable messages of a cluster, kept in etcd so they survive the loss of the node that
//! accepted them: any node the device connects to delivers them.
//!
//! Key: `{prefix}/durable/{hex(client_id)}/{node}-{counter}`; value: postcard of [`Stored`].
//! Not under any lease: a message stays until acknowledged, cancelled or expired. Its id (what
//! the device sees under `quicx-msg-id`) is the key's etcd create revision, so ids grow across
//! the whole cluster and a device drops a message it already acknowledged whichever node sends
//! it again (the messages carry `quicx-msg-space`).

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use futures_util::{StreamExt, stream};
use quicx::{MSG_ID_KEY, MSG_PREV_KEY, MSG_SPACE_KEY, Metadata};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use crate::ClusterError;

/// Largest payload of a cluster durable message (etcd values are small by design).
pub const MAX_DURABLE_PAYLOAD: usize = 64 * 1024;
/// The pause before a delivery run that stopped at a failure starts again (while the device
/// stays connected), doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Most messages pending per device in a cluster.
pub const MAX_DURABLE_PER_DEVICE: i64 = 1_000;
/// Messages read from etcd at a time by a delivery run.
const READ_BATCH: i64 = 256;
/// Pushes with receipt in flight to one device during a delivery run.
const WINDOW: usize = 32;
/// Deletes per etcd transaction (etcd's default `--max-txn-ops` is 128).
const DELETES_PER_TXN: usize = 128;

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    service_path: String,
    service_method: String,
    metadata: Metadata,
    payload: Vec<u8>,
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if s.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// The durable messages of one node's cluster.
#[derive(Debug)]
pub(crate) struct ClusterDurable {
    prefix: String,
    node: String,
    counter: AtomicU64,
    /// Devices being delivered to by this node now: whether more arrived meanwhile, and how to
    /// wake a run that waits to retry.
    running: Mutex<std::collections::HashMap<String, (bool, Arc<tokio::sync::Notify>)>>,
    /// The node's stop: runs end, and nothing more is read or deleted in etcd.
    stop: CancellationToken,
    /// How long a delivery waits for the device's acknowledgement.
    ack_timeout: Duration,
    space: String,
}

impl ClusterDurable {
    pub(crate) fn new(
        prefix: &str,
        node: &str,
        ack_timeout: Duration,
        stop: CancellationToken,
    ) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            counter: AtomicU64::new(start),
            running: Mutex::default(),
            stop,
            ack_timeout,
            space: format!("cluster{prefix}"),
        }
    }

    fn device_prefix(&self, client_id: &str) -> String {
        format!("{}/durable/{}/", self.prefix, hex(client_id))
    }

    /// The device a durable key is for.
    pub(crate) fn device_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&format!("{}/durable/", self.prefix))?;
        unhex(rest.split('/').next()?)
    }

    /// Stores a message in etcd; its id once committed (etcd commits are durable on a
    /// quorum).
    pub(crate) async fn store(
        &self,
        client: &mut Client,
        client_id: &str,
        (service_path, service_method): (&str, &str),
        metadata: Metadata,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<i64, ClusterError> {
        if payload.len() > MAX_DURABLE_PAYLOAD {
            return Err(ClusterError::DurableFull(format!(
                "a cluster durable message holds at most {MAX_DURABLE_PAYLOAD} bytes, not {}",
                payload.len()
            )));
        }
        let prefix = self.device_prefix(client_id);
        let pending = client
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(ClusterError::etcd)?
            .count();
        if pending >= MAX_DURABLE_PER_DEVICE {
            return Err(ClusterError::DurableFull(format!(
                "`{client_id}` has {pending} pending messages (at most {MAX_DURABLE_PER_DEVICE})"
            )));
        }
        let stored = Stored {
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata,
            payload: payload.to_vec(),
            expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        };
        let value =
            postcard::to_allocvec(&stored).map_err(|e| ClusterError::Config(e.to_string()))?;
        let key = format!(
            "{prefix}{}-{:020}",
            self.node,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let put = client
            .put(key, value, None)
            .await
            .map_err(ClusterError::etcd)?;
        Ok(put.header().map_or(0, |h| h.revision()))
    }

    /// Delivers what is pending for `client_id` if this node holds it, in id order (`WINDOW`
    /// pushes with receipt in flight), deleting the messages whose acknowledgement came back.
    /// Single-flight per device.
    pub(crate) fn kick(
        self: &Arc<Self>,
        client: &Client,
        server: &quicx::WeakServer,
        client_id: &str,
    ) {
        let wake = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            match running.get_mut(client_id) {
                Some((more, wake)) => {
                    *more = true;
                    // A run waiting to retry goes now.
                    wake.notify_one();
                    return;
                }
                None => {
                    let wake = Arc::new(tokio::sync::Notify::new());
                    running.insert(client_id.to_owned(), (false, wake.clone()));
                    wake
                }
            }
        };
        let (me, client, server, id) = (
            self.clone(),
            client.clone(),
            server.clone(),
            client_id.to_owned(),
        );
        tokio::spawn(async move {
            let mut pause = RETRY_FIRST;
            loop {
                let done = tokio::select! {
                    biased;
                    () = me.stop.cancelled() => break,
                    done = me.deliver(client.clone(), &server, &id) => done,
                };
                if !done {
                    // Refused, timed out or etcd failed while the device is still here: try
                    // again after a pause (it grows while the failures go on), the way a
                    // server's own store does, or at once when a new message or bind asks.
                    tokio::select! {
                        biased;
                        () = me.stop.cancelled() => break,
                        // Asked again (a new message, a bind): go now, same pause next time.
                        () = wake.notified() => {}
                        () = tokio::time::sleep(pause) => pause = (pause * 2).min(RETRY_MAX),
                    }
                    continue;
                }
                pause = RETRY_FIRST;
                let mut running = me.running.lock().unwrap_or_else(|e| e.into_inner());
                match running.get_mut(&id) {
                    Some((more, _)) if *more => {
                        *more = false;
                        continue;
                    }
                    _ => {
                        running.remove(&id);
                        return;
                    }
                }
            }
            me.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// One delivery run. True when it is done: nothing (more) pending, or the device is not
    /// here; false when it stopped at a failure while the device is still connected.
    ///
    /// Reads up to `READ_BATCH` messages at a time in id order and sends them as pushes with
    /// receipt, `WINDOW` in flight (each names the one before it, so the device admits them in
    /// order whatever stream arrives first); the first failure ends the run, and the messages
    /// after it are cancelled (the device would only hold them for the one that failed).
    /// Acknowledged, expired and corrupt messages leave etcd `DELETES_PER_TXN` to a
    /// transaction, once per read.
    async fn deliver(
        &self,
        mut client: Client,
        server: &quicx::WeakServer,
        client_id: &str,
    ) -> bool {
        let Some(conn) = server.upgrade().and_then(|s| s.client(client_id)) else {
            return true;
        };
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(READ_BATCH);
        let mut prev = 0i64;
        let mut seen = HashSet::new();
        loop {
            let found = match client
                .get(self.device_prefix(client_id), Some(options.clone()))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("reading durable messages of {client_id} from etcd: {e}");
                    return conn.is_closed();
                }
            };
            let batch: Vec<_> = found
                .kvs()
                .iter()
                .filter(|kv| !seen.contains(kv.key()))
                .map(|kv| (kv.key().to_vec(), kv.create_revision(), kv.value().to_vec()))
                .collect();
            if batch.is_empty() {
                return true;
            }
            // Keys to delete: what was acknowledged, and what can never be delivered.
            let mut gone = Vec::new();
            let mut sends = Vec::with_capacity(batch.len());
            let now = now_ms();
            for (key, id, value) in batch {
                seen.insert(key.clone());
                match postcard::from_bytes::<Stored>(&value) {
                    Err(_) => {
                        tracing::error!(
                            "a durable message of {client_id} in etcd is corrupt: dropped"
                        );
                        gone.push(key);
                    }
                    Ok(stored) if stored.expires_ms <= now => gone.push(key),
                    Ok(mut stored) => {
                        let mut metadata = std::mem::take(&mut stored.metadata);
                        metadata.insert(MSG_ID_KEY, id.to_string());
                        metadata.insert(MSG_PREV_KEY, prev.to_string());
                        metadata.insert(MSG_SPACE_KEY, self.space.clone());
                        prev = id;
                        sends.push((key, stored, metadata));
                    }
                }
            }
            let mut results = stream::iter(sends)
                .map(|(key, stored, metadata)| {
                    let conn = &conn;
                    async move {
                        let sent = conn
                            .send_message_with_receipt_within(
                                &stored.service_path,
                                &stored.service_method,
                                metadata,
                                &stored.payload,
                                self.ack_timeout,
                            )
                            .await;
                        (key, sent)
                    }
                })
                .buffered(WINDOW);
            let mut stopped = None;
            while let Some((key, sent)) = results.next().await {
                match sent {
                    Ok(()) => gone.push(key),
                    Err(e) => {
                        stopped = Some(e);
                        break;
                    }
                }
            }
            drop(results);
            delete_all(&mut client, gone).await;
            if let Some(e) = stopped {
                tracing::debug!("cluster durable delivery to {client_id} stopped: {e}");
                return conn.is_closed();
            }
        }
    }

    /// How many messages are pending for `client_id`.
    pub(crate) async fn pending(
        &self,
        client: &mut Client,
        client_id: &str,
    ) -> Result<i64, ClusterError> {
        Ok(client
            .get(
                self.device_prefix(client_id),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(ClusterError::etcd)?
            .count())
    }
}

/// Deletes `keys` from etcd, `DELETES_PER_TXN` to a transaction. A failure is logged: the
/// messages it leaves are sent again later, and the device drops them as duplicates.
async fn delete_all(client: &mut Client, keys: Vec<Vec<u8>>) {
    for chunk in keys.chunks(DELETES_PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|key| TxnOp::delete(key.clone(), None))
            .collect();
        if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
            tracing::warn!("deleting delivered durable messages from etcd: {e}");
        }
    }
}
