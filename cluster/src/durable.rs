//! Durable messages of a cluster, kept in etcd so they survive the loss of the node that
//! accepted them: any node the device connects to delivers them.
//!
//! Key: `{prefix}/durable/{hex(client_id)}/{node}-{counter}`; value: postcard of [`Stored`].
//! Not under any lease: a message stays until acknowledged, cancelled or expired. Its id (what
//! the device sees under `quicx-msg-id`) is the key's etcd create revision, so ids grow across
//! the whole cluster and a device drops a message it already acknowledged whichever node sends
//! it again (the messages carry `quicx-msg-space`: the cluster's prefix and the identity).

use std::{
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
            expires_ms: now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
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
    /// order whatever stream arrives first). Each receipt may take the acknowledgement timeout
    /// from the one before it (a device acknowledging by hand takes them one at a time). The
    /// first failure ends the run, and the pushes after it are cancelled (the device would only
    /// hold them for the one that failed). Acknowledged, expired and corrupt messages leave
    /// etcd while the receipts come, one transaction at a time with whatever was acknowledged
    /// meanwhile; a failed delete ends the run (the next run sends those again, and the device
    /// drops what it already acknowledged).
    async fn deliver(
        &self,
        mut client: Client,
        server: &quicx::WeakServer,
        client_id: &str,
    ) -> bool {
        let Some(conn) = server.upgrade().and_then(|s| s.client(client_id)) else {
            return true;
        };
        // The last message read (the next read starts after it: one a delete missed waits for
        // the next run), and the last one sent (the next one names it).
        let (mut read_up_to, mut sent_before) = (0i64, 0i64);
        loop {
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_min_create_revision(read_up_to + 1)
                .with_limit(READ_BATCH);
            let found = match crate::etcd::kv(&client)
                .get(self.device_prefix(client_id), Some(options))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("reading durable messages of {client_id} from etcd: {e}");
                    return conn.is_closed();
                }
            };
            let Some(last) = found.kvs().last().map(|kv| kv.create_revision()) else {
                return true;
            };
            // Per identity: a client re-bound to another identity acknowledged ids of the first
            // that may be above this one's.
            let space = quicx::msg_space(&self.space, client_id);
            // Keys to delete: what was acknowledged, and what can never be delivered.
            let mut gone = Vec::new();
            let mut sends = Vec::with_capacity(found.kvs().len());
            for kv in found.kvs() {
                let key = kv.key().to_vec();
                match postcard::from_bytes::<Stored>(kv.value()) {
                    Err(_) => {
                        tracing::error!(
                            "a durable message of {client_id} in etcd is corrupt: dropped"
                        );
                        gone.push(key);
                    }
                    Ok(stored) if stored.expires_ms <= now_ms() => gone.push(key),
                    Ok(mut stored) => {
                        let id = kv.create_revision();
                        let mut metadata = std::mem::take(&mut stored.metadata);
                        metadata.insert(MSG_ID_KEY, id.to_string());
                        metadata.insert(MSG_PREV_KEY, sent_before.to_string());
                        metadata.insert(MSG_SPACE_KEY, space.clone());
                        sent_before = id;
                        sends.push((key, stored, metadata));
                    }
                }
            }
            let whole_window = self.ack_timeout.saturating_mul(WINDOW as u32 + 1);
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
                                whole_window,
                            )
                            .await;
                        (key, sent)
                    }
                })
                .buffered(WINDOW);
            let mut stopped = None;
            // Deletes go on while receipts come: one transaction at a time, taking whatever
            // was acknowledged meanwhile (one message when they come slowly, many when fast).
            let mut deleting: Option<futures_util::future::BoxFuture<'static, bool>> = None;
            // The next receipt is due this long after the one before (deletes finishing
            // meanwhile do not move it).
            let mut due = tokio::time::Instant::now() + self.ack_timeout;
            loop {
                if deleting.is_none() && !gone.is_empty() {
                    let (mut etcd, keys) = (client.clone(), std::mem::take(&mut gone));
                    deleting = Some(Box::pin(async move { delete_all(&mut etcd, keys).await }));
                }
                tokio::select! {
                    biased;
                    deleted = async { deleting.as_mut().expect("checked").await }, if deleting.is_some() => {
                        deleting = None;
                        if !deleted {
                            stopped = Some("deleting delivered messages from etcd failed".into());
                            break;
                        }
                    }
                    next = tokio::time::timeout_at(due, results.next()) => match next {
                        Ok(Some((key, Ok(())))) => {
                            gone.push(key);
                            due = tokio::time::Instant::now() + self.ack_timeout;
                        }
                        Ok(Some((_, Err(e)))) => {
                            stopped = Some(e.to_string());
                            break;
                        }
                        Ok(None) => break,
                        Err(_) => {
                            stopped = Some(format!("no receipt within {:?}", self.ack_timeout));
                            break;
                        }
                    },
                }
            }
            drop(results);
            let mut deleted = match deleting {
                Some(deleting) => deleting.await,
                None => true,
            };
            deleted &= delete_all(&mut client, std::mem::take(&mut gone)).await;
            if let Some(why) = stopped {
                tracing::debug!("cluster durable delivery to {client_id} stopped: {why}");
                return conn.is_closed();
            }
            if !deleted {
                return conn.is_closed();
            }
            read_up_to = last;
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

/// Deletes `keys` from etcd, `DELETES_PER_TXN` to a transaction, one by one where a
/// transaction is refused (an etcd that takes fewer operations per transaction). False when
/// some stay: they are sent again by a later run, and a device that acknowledged them drops
/// them as duplicates.
async fn delete_all(client: &mut Client, keys: Vec<Vec<u8>>) -> bool {
    let mut all = true;
    for chunk in keys.chunks(DELETES_PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|key| TxnOp::delete(key.clone(), None))
            .collect();
        if let Err(e) = client.txn(Txn::new().and_then(ops)).await {
            tracing::debug!("deleting delivered durable messages from etcd in one go: {e}");
            for key in chunk {
                if let Err(e) = client.delete(key.clone(), None).await {
                    tracing::warn!("deleting a delivered durable message from etcd: {e}");
                    all = false;
                }
            }
        }
    }
    all
}
