//! Durable messages of a cluster, kept in etcd so they survive the loss of the node that
//! accepted them: any node the device connects to delivers them.
//!
//! Key: `{prefix}/durable/{hex(client_id)}/{node}-{counter}.{place}.e{expires}.{size}`, where
//! `place` is its place in the etcd transaction that wrote it, `expires` when it expires (ms
//! since the Unix epoch) and `size` the value's length (so a read of the keys alone tells a
//! device's pending bytes and what expired); value: postcard of [`Stored`].
//! Not under any lease: a message stays until acknowledged, cancelled, expired or dropped to
//! make room. Its id (what the device sees under `quicx-msg-id`) is the key's etcd create
//! revision × [`ID_SPAN`] plus its place, so ids grow across the whole cluster and a device
//! drops a message it already acknowledged whichever node sends it again (the messages carry
//! `quicx-msg-space`: the cluster's prefix and the identity).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use std::collections::{HashMap, VecDeque};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};
use futures_util::{StreamExt, stream};
use quicx::{MSG_ID_KEY, MSG_PREV_KEY, MSG_SPACE_KEY, Metadata, Overflow, PendingMessage};
use serde::{Deserialize, Serialize};

use tokio_util::sync::CancellationToken;

use crate::ClusterError;

/// Largest payload of a cluster durable message (etcd values are small by design).
pub const MAX_DURABLE_PAYLOAD: usize = 64 * 1024;
/// The pause before a delivery run that stopped at a failure starts again (while the device
/// stays connected), doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The default bound on messages pending per device in a cluster
/// ([`ClusterDurableLimits::per_device`]).
pub const MAX_DURABLE_PER_DEVICE: i64 = 1_000;
/// Sends to one device that lose a race with another node's send (the device's messages
/// changed between the read and the write) try again this many times.
const STORE_TRIES: usize = 16;

/// Bounds of a cluster's durable messages, which etcd holds (keep them well below etcd's
/// backend quota, `--quota-backend-bytes`, 2 GiB by default: etcd refuses every write, presence
/// records included, once it is full).
///
/// - **Per device** the bounds are exact across the cluster: one task per device and node
///   writes the sends waiting for it, many to an etcd transaction, counting on what its last
///   write left or on the node's watch, and the transaction takes effect only if no other
///   node wrote to the device since what it counted (it compares the revision of the device's
///   keys); else the task reads the device's keys and plans again. Sends to different devices
///   go side by side.
/// - **In all** the bounds are checked against what this node's watch of etcd shows, which
///   trails other nodes' sends by the watch's delay (milliseconds): sends through several nodes
///   at the same moment can overshoot them by as many messages as were in flight.
/// - Bytes are stored bytes: the payload and its header (service, method, metadata).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct ClusterDurableLimits {
    /// Pending messages per device (default [`MAX_DURABLE_PER_DEVICE`], 1,000).
    pub per_device_messages: u64,
    /// Pending bytes per device (default 64 MiB: as many of the largest messages,
    /// [`MAX_DURABLE_PAYLOAD`], as the per-device message bound takes).
    pub per_device_bytes: u64,
    /// Pending messages in the cluster (default 1,000,000).
    pub total_messages: u64,
    /// Pending bytes in the cluster (default 1 GiB, half of etcd's default backend quota).
    pub total_bytes: u64,
    /// What a message over a bound does (default [`Overflow::Refuse`]: [`ClusterError::DurableFull`];
    /// [`Overflow::DropOldest`] drops the device's oldest messages until the new one fits, and
    /// refuses it if even all of them would not make room).
    pub overflow: Overflow,
}

impl Default for ClusterDurableLimits {
    fn default() -> Self {
        Self {
            per_device_messages: MAX_DURABLE_PER_DEVICE as u64,
            per_device_bytes: 64 << 20,
            total_messages: 1_000_000,
            total_bytes: 1 << 30,
            overflow: Overflow::Refuse,
        }
    }
}

impl ClusterDurableLimits {
    /// Sets the per-device bounds.
    #[must_use]
    pub fn per_device(mut self, messages: u64, bytes: u64) -> Self {
        self.per_device_messages = messages;
        self.per_device_bytes = bytes;
        self
    }

    /// Sets the cluster-wide bounds.
    #[must_use]
    pub fn total(mut self, messages: u64, bytes: u64) -> Self {
        self.total_messages = messages;
        self.total_bytes = bytes;
        self
    }

    /// Sets the overflow policy.
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }
}

/// Pending messages and bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Size {
    messages: u64,
    bytes: u64,
}

/// One device's durable messages as the watch shows them.
#[derive(Debug, Default, Clone, Copy)]
struct DeviceView {
    size: Size,
    /// The revision of the last write to the device the watch showed: every write up to it is
    /// counted (and the deletes the watch showed are not).
    last_put: i64,
}

/// The cluster's durable messages as this node's watch of etcd shows them.
#[derive(Debug, Default)]
struct View {
    by_device: HashMap<String, DeviceView>,
    total: Size,
    /// The revision of the latest write the watch showed (any device's).
    latest_put: i64,
}

impl View {
    fn add(&mut self, device: &str, bytes: u64, revision: i64) {
        // The name copied only for a device new to the view.
        if !self.by_device.contains_key(device) {
            self.by_device
                .insert(device.to_owned(), DeviceView::default());
        }
        let d = self.by_device.get_mut(device).expect("inserted above");
        d.size.messages += 1;
        d.size.bytes += bytes;
        d.last_put = d.last_put.max(revision);
        self.latest_put = self.latest_put.max(revision);
        self.total.messages += 1;
        self.total.bytes += bytes;
    }

    fn sub(&mut self, device: &str, bytes: u64) {
        if let Some(d) = self.by_device.get_mut(device) {
            d.size.messages = d.size.messages.saturating_sub(1);
            d.size.bytes = d.size.bytes.saturating_sub(bytes);
            if d.size.messages == 0 {
                self.by_device.remove(device);
            }
        }
        self.total.messages = self.total.messages.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }

    fn record(&self, gauges: &Gauges) {
        gauges.pending.set(self.total.messages as f64);
        gauges.bytes.set(self.total.bytes as f64);
        gauges.devices.set(self.by_device.len() as f64);
    }
}

/// The handles of the cluster's durable gauges, made once (the watch sets them at every
/// durable key it sees).
#[derive(Debug)]
struct Gauges {
    pending: metrics::Gauge,
    bytes: metrics::Gauge,
    devices: metrics::Gauge,
}

impl Gauges {
    fn new() -> Self {
        Self {
            pending: metrics::gauge!(CLUSTER_PENDING),
            bytes: metrics::gauge!(CLUSTER_PENDING_BYTES),
            devices: metrics::gauge!(CLUSTER_PENDING_DEVICES),
        }
    }
}

/// Metric names of the cluster's durable messages (as this node's watch shows them).
const CLUSTER_PENDING: &str = "quicx_cluster_durable_pending";
const CLUSTER_PENDING_BYTES: &str = "quicx_cluster_durable_pending_bytes";
const CLUSTER_PENDING_DEVICES: &str = "quicx_cluster_durable_pending_devices";

/// What one node counted of the cluster's durable messages ([`ClusterNode::durable_stats`](crate::ClusterNode::durable_stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterDurableStats {
    /// Messages pending in the cluster, as this node's watch of etcd shows them.
    pub pending: u64,
    /// Their stored bytes.
    pub pending_bytes: u64,
    /// Devices with at least one message pending.
    pub pending_devices: u64,
    /// Messages this node delivered and removed once acknowledged.
    pub delivered: u64,
    /// Messages this node removed because their TTL passed.
    pub expired: u64,
    /// Messages this node dropped to make room ([`Overflow::DropOldest`]).
    pub overflowed: u64,
}

/// The counters of [`ClusterDurableStats`] this node keeps.
#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    expired: AtomicU64,
    overflowed: AtomicU64,
}

/// Stored bytes of a message whose key does not say (a key written before keys carried the
/// size): counted as the largest a message can be, so a bound is never undercounted.
const UNKNOWN_SIZE: u64 = MAX_DURABLE_PAYLOAD as u64 + 64 * 1024;

/// The stored size a key names.
fn size_of_key(key: &[u8]) -> u64 {
    key_fields(key).2
}

/// One of a device's keys as a read of them tells.
#[derive(Debug, Clone)]
struct StoredKey {
    key: Vec<u8>,
    size: u64,
    expires_ms: u64,
}

/// A device's pending keys, oldest first, and the etcd revision they were read at (or that
/// this node's last write to the device made): valid while no other node wrote to the device
/// since, which a write's transaction checks. Deletes meanwhile (deliveries, expiries, cancels)
/// only make it count too much, so a batch is planned again on a fresh read before anything in
/// it is refused or dropped.
#[derive(Debug)]
struct DeviceKeys {
    revision: i64,
    size: Size,
    /// The keys, oldest first, when they were read (not when the counts come from the watch:
    /// dropping any then takes a read).
    keys: Option<Vec<StoredKey>>,
}

impl DeviceKeys {
    fn size(&self) -> Size {
        self.size
    }

    /// The device's oldest keys that can be dropped, oldest first.
    fn droppable(&self) -> &[StoredKey] {
        self.keys.as_deref().unwrap_or(&[])
    }
}

/// A send waiting for its device's next write.
#[derive(Debug)]
struct Waiting {
    /// The key without its place and size: `{device prefix}{node}-{counter}`.
    name: String,
    value: Vec<u8>,
    expires_ms: u64,
    reply: tokio::sync::oneshot::Sender<Result<i64, ClusterError>>,
}

/// The sends waiting for one device on this node, and whether a task writes them.
#[derive(Debug, Default)]
struct DeviceQueue {
    waiting: VecDeque<Waiting>,
    writing: bool,
}

/// A message's id: its key's create revision times this, plus its place in the transaction
/// that wrote it (a node writes up to [`BATCH`] messages of one device in one transaction).
pub(crate) const ID_SPAN: i64 = 1024;
/// Messages of one device in one etcd transaction (with the drops they cause, at most etcd's
/// default `--max-txn-ops`, 128).
const BATCH: usize = 64;
/// Stored bytes of one transaction's messages (etcd's default `--max-request-bytes` is
/// 1.5 MiB).
const BATCH_BYTES: u64 = 1 << 20;

/// What a key's name tells of its message: its place in the transaction that wrote it, when
/// it expires (Unix ms) and its stored size. Names are `{node}-{counter}.{place}.e{expires}.{size}`;
/// keys written before they carried all of it give place 0, never expiring, and
/// [`UNKNOWN_SIZE`].
fn key_fields(key: &[u8]) -> (i64, u64, u64) {
    let name = key.rsplit(|&b| b == b'/').next().unwrap_or_default();
    let name = std::str::from_utf8(name).unwrap_or_default();
    let mut parts = name.rsplit('.');
    let Some(size) = parts.next().and_then(|s| s.parse().ok()) else {
        return (0, u64::MAX, UNKNOWN_SIZE);
    };
    let mut next = parts.next();
    let expires = match next.and_then(|e| e.strip_prefix('e')?.parse().ok()) {
        Some(expires) => {
            next = parts.next();
            expires
        }
        None => u64::MAX,
    };
    // A place, unless this is the node name's own last dot-separated part.
    let place = match (next, parts.next()) {
        (Some(place), Some(_)) => place.parse().unwrap_or(0),
        _ => 0,
    };
    (place, expires, size)
}

/// The place in its transaction a key names.
fn place_of_key(key: &[u8]) -> i64 {
    key_fields(key).0
}

/// The id of a stored message (what the device sees under `quicx-msg-id`).
fn id_of(kv: &etcd_client::KeyValue) -> i64 {
    kv.create_revision() * ID_SPAN + place_of_key(kv.key())
}

/// What a batch's messages get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Written at this place of the transaction.
    Kept(usize),
    /// Given this place (and so an id) and dropped at once to make room for later ones of
    /// the same batch ([`Overflow::DropOldest`]).
    DroppedAt(usize),
    Refused,
}

/// How a batch is written: each message's fate, and how many of the device's oldest keys go.
#[derive(Debug)]
struct Plan {
    fates: Vec<Fate>,
    /// The device's expired messages that go (indexes into its keys, oldest first).
    expired: Vec<usize>,
    /// Its messages dropped to make room (indexes into its keys, oldest first).
    drops: Vec<usize>,
    /// The device's messages once it is written.
    after: Size,
}
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
    limits: ClusterDurableLimits,
    /// Sends waiting for their device's next write, per device.
    sending: Mutex<HashMap<String, DeviceQueue>>,
    view: Mutex<View>,
    gauges: Gauges,
    /// `{prefix}/durable/`: where every durable key is.
    durable_root: String,
    counters: Arc<Counters>,
}

impl ClusterDurable {
    pub(crate) fn new(
        prefix: &str,
        node: &str,
        ack_timeout: Duration,
        limits: ClusterDurableLimits,
        stop: CancellationToken,
    ) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            node: node.to_owned(),
            counter: AtomicU64::new(start),
            running: Mutex::default(),
            stop,
            ack_timeout,
            space: format!("cluster{prefix}"),
            limits,
            sending: Mutex::default(),
            view: Mutex::default(),
            gauges: Gauges::new(),
            durable_root: format!("{prefix}/durable/"),
            counters: Arc::default(),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch read every durable key anew.
    pub(crate) fn view_reset<'a>(&self, keys: impl IntoIterator<Item = (&'a str, i64)>) {
        let mut fresh = View::default();
        for (key, revision) in keys {
            if let Some(device) = self.device_of(key) {
                fresh.add(&device, size_of_key(key.as_bytes()), revision);
            }
        }
        fresh.record(&self.gauges);
        *self.view() = fresh;
    }

    /// The watch saw a durable message written.
    pub(crate) fn view_put(&self, device: &str, key: &str, revision: i64) {
        let mut view = self.view();
        view.add(device, size_of_key(key.as_bytes()), revision);
        view.record(&self.gauges);
    }

    /// The watch saw a durable message removed.
    pub(crate) fn view_delete(&self, key: &str) {
        if let Some(device) = self.device_of(key) {
            let mut view = self.view();
            view.sub(&device, size_of_key(key.as_bytes()));
            view.record(&self.gauges);
        }
    }

    pub(crate) fn stats(&self) -> ClusterDurableStats {
        let view = self.view();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClusterDurableStats {
            pending: view.total.messages,
            pending_bytes: view.total.bytes,
            pending_devices: view.by_device.len() as u64,
            delivered: get(&self.counters.delivered),
            expired: get(&self.counters.expired),
            overflowed: get(&self.counters.overflowed),
        }
    }

    fn device_prefix(&self, client_id: &str) -> String {
        format!("{}{}/", self.durable_root, hex(client_id))
    }

    /// The device a durable key is for.
    pub(crate) fn device_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.durable_root)?;
        unhex(rest.split('/').next()?)
    }

    /// Stores a message in etcd; its id once committed (etcd commits are durable on a
    /// quorum). Sends to one device through this node are written by one task, many to a
    /// transaction (see [`ClusterDurableLimits`]). Dropping the future does not withdraw the
    /// message: it may still be stored.
    pub(crate) async fn store(
        self: &Arc<Self>,
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
        let stored = Stored {
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata,
            payload: payload.to_vec(),
            expires_ms: now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        };
        let value =
            postcard::to_allocvec(&stored).map_err(|e| ClusterError::Config(e.to_string()))?;
        let size = value.len() as u64;
        let limits = self.limits;
        if size > limits.per_device_bytes || size > limits.total_bytes {
            return Err(ClusterError::DurableFull(format!(
                "a message of {size} stored bytes is above the bounds (per device {}, in all {})",
                limits.per_device_bytes, limits.total_bytes
            )));
        }
        let name = format!(
            "{}{}-{:020}",
            self.device_prefix(client_id),
            self.node,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let expires_ms = stored.expires_ms;
        let (reply, stored) = tokio::sync::oneshot::channel();
        let start = {
            let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            let queue = sending.entry(client_id.to_owned()).or_default();
            queue.waiting.push_back(Waiting {
                name,
                value,
                expires_ms,
                reply,
            });
            !std::mem::replace(&mut queue.writing, true)
        };
        if start {
            let (me, client, id) = (self.clone(), client.clone(), client_id.to_owned());
            tokio::spawn(async move { me.write_queue(client, id).await });
        }
        stored.await.unwrap_or_else(|_| {
            Err(ClusterError::EtcdUnreachable(
                "the node stopped before the message was written".into(),
            ))
        })
    }

    /// Writes the sends waiting for `client_id`, up to [`BATCH`] to a transaction, until none
    /// is left. One task per device and node, so a device's writes through a node never race
    /// each other; a write by another node in between makes the transaction fail and the batch
    /// is planned again on a new read.
    async fn write_queue(self: Arc<Self>, mut client: Client, client_id: String) {
        // Should this task end without emptying the queue (a panic), the sends waiting in it
        // fail at once instead of waiting for a writer that is gone, and the next send starts
        // a new one.
        struct Abandon<'a>(&'a ClusterDurable, &'a str, bool);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if !self.2 {
                    return;
                }
                let mut sending = self.0.sending.lock().unwrap_or_else(|e| e.into_inner());
                sending.remove(self.1);
            }
        }
        let mut abandon = Abandon(&self, &client_id, true);
        let prefix = self.device_prefix(&client_id);
        // The device's keys after the last write, while this task writes its sends.
        let mut known = None;
        loop {
            let batch: Vec<Waiting> = {
                let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = sending.get_mut(&client_id) else {
                    abandon.2 = false;
                    return;
                };
                let mut bytes = 0;
                let mut batch = Vec::new();
                while let Some(next) = queue.waiting.front() {
                    let size = next.value.len() as u64;
                    if batch.len() == BATCH || (!batch.is_empty() && bytes + size > BATCH_BYTES) {
                        break;
                    }
                    bytes += size;
                    batch.extend(queue.waiting.pop_front());
                }
                if batch.is_empty() {
                    abandon.2 = false;
                    sending.remove(&client_id);
                    return;
                }
                batch
            };
            let (replies, left) = self
                .write_batch(&mut client, &client_id, &prefix, known.take(), &batch)
                .await;
            known = left;
            for (waiting, result) in batch.into_iter().zip(replies) {
                let _ = waiting.reply.send(result);
            }
        }
    }

    /// Writes one batch in one transaction: what each send gets, and the device's keys after
    /// it (`None` when unknown).
    async fn write_batch(
        &self,
        client: &mut Client,
        client_id: &str,
        prefix: &str,
        mut known: Option<DeviceKeys>,
        batch: &[Waiting],
    ) -> (Vec<Result<i64, ClusterError>>, Option<DeviceKeys>) {
        let all = |e: ClusterError| batch.iter().map(|_| Err(e.clone())).collect::<Vec<_>>();
        let sizes: Vec<u64> = batch.iter().map(|w| w.value.len() as u64).collect();
        // The first try counts on what the last write through this node left, or else on
        // the watch (no read of etcd: the transaction's comparison catches what either
        // missed); a try after anything failed, and one a refusal or a drop is decided on,
        // reads the device's keys.
        for attempt in 0..STORE_TRIES {
            let (keys, fresh) = match known.take() {
                Some(keys) => (keys, false),
                None if attempt == 0 => (self.keys_from_view(client_id), false),
                None => match self.read_keys(client, prefix).await {
                    Ok(keys) => (keys, true),
                    Err(e) => return (all(e), None),
                },
            };
            let plan = self.plan(client_id, &keys, &sizes);
            let cuts =
                !plan.drops.is_empty() || plan.fates.iter().any(|f| !matches!(f, Fate::Kept(_)));
            if cuts && !fresh {
                // Refusing or dropping on keys that may be stale: read again first.
                continue;
            }
            let names: Vec<Option<Vec<u8>>> = batch
                .iter()
                .zip(&plan.fates)
                .zip(&sizes)
                .map(|((w, fate), size)| match fate {
                    Fate::Kept(place) => {
                        Some(format!("{}.{place}.e{}.{size}", w.name, w.expires_ms).into_bytes())
                    }
                    _ => None,
                })
                .collect();
            if names.iter().all(Option::is_none) {
                let refused = plan
                    .fates
                    .iter()
                    .map(|_| Err(self.full(client_id, &keys)))
                    .collect();
                return (refused, Some(keys));
            }
            let mut ops: Vec<TxnOp> = batch
                .iter()
                .zip(&names)
                .filter_map(|(w, name)| Some(TxnOp::put(name.clone()?, w.value.clone(), None)))
                .collect();
            let puts = ops.len();
            // Expired messages of the device first, then those dropped to make room.
            let old = keys.droppable();
            ops.extend(
                plan.expired
                    .iter()
                    .chain(&plan.drops)
                    .map(|&i| TxnOp::delete(old[i].key.clone(), None)),
            );
            // Nothing written to the device since `keys` was read (deletes do not move the
            // keys that are left).
            let unchanged = Compare::mod_revision(
                prefix.as_bytes().to_vec(),
                CompareOp::Less,
                keys.revision + 1,
            )
            .with_prefix();
            let reply = match client.txn(Txn::new().when([unchanged]).and_then(ops)).await {
                Ok(reply) => reply,
                Err(e) => return (all(ClusterError::etcd(e)), None),
            };
            if !reply.succeeded() {
                // Another node wrote to the device: read again.
                continue;
            }
            let revision = reply.header().map_or(0, |h| h.revision());
            let deleted: Vec<u64> = reply
                .op_responses()
                .iter()
                .skip(puts)
                .map(|r| match r {
                    TxnOpResponse::Delete(d) => d.deleted() as u64,
                    _ => 0,
                })
                .collect();
            let dropped_here = plan
                .fates
                .iter()
                .filter(|f| matches!(f, Fate::DroppedAt(_)))
                .count() as u64;
            let expired: u64 = deleted.iter().take(plan.expired.len()).sum();
            let dropped = deleted.iter().skip(plan.expired.len()).sum::<u64>() + dropped_here;
            self.counters.add(Gone::Expired, expired);
            self.counters.add(Gone::Overflowed, dropped);
            let mut left = keys;
            if let Some(keys) = &mut left.keys {
                let gone: std::collections::HashSet<usize> =
                    plan.expired.iter().chain(&plan.drops).copied().collect();
                let mut i = 0;
                keys.retain(|_| {
                    i += 1;
                    !gone.contains(&(i - 1))
                });
                keys.extend(batch.iter().zip(&names).zip(&sizes).filter_map(
                    |((w, name), size)| {
                        Some(StoredKey {
                            key: name.clone()?,
                            size: *size,
                            expires_ms: w.expires_ms,
                        })
                    },
                ));
            }
            left.size = plan.after;
            left.revision = revision;
            let results = plan
                .fates
                .iter()
                .map(|fate| match fate {
                    Fate::Kept(place) | Fate::DroppedAt(place) => {
                        Ok(revision * ID_SPAN + *place as i64)
                    }
                    Fate::Refused => Err(self.full(client_id, &left)),
                })
                .collect();
            return (results, Some(left));
        }
        (
            all(ClusterError::DurableFull(format!(
                "`{client_id}`'s messages kept changing under {STORE_TRIES} tries: send again"
            ))),
            None,
        )
    }

    /// A device's pending keys, oldest first, at the revision of the read (linearizable: what
    /// a write then refuses or drops is counted on the cluster's latest state).
    async fn read_keys(
        &self,
        client: &mut Client,
        prefix: &str,
    ) -> Result<DeviceKeys, ClusterError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        let reply = crate::etcd::kv(client)
            .get(prefix, Some(options))
            .await
            .map_err(ClusterError::etcd)?;
        let mut keys: Vec<(i64, StoredKey)> = reply
            .kvs()
            .iter()
            .map(|kv| {
                let (_, expires_ms, size) = key_fields(kv.key());
                let key = kv.key().to_vec();
                (
                    id_of(kv),
                    StoredKey {
                        key,
                        size,
                        expires_ms,
                    },
                )
            })
            .collect();
        keys.sort_unstable_by_key(|(id, _)| *id);
        Ok(DeviceKeys {
            revision: reply.header().map_or(0, |h| h.revision()),
            size: Size {
                messages: keys.len() as u64,
                bytes: keys.iter().map(|(_, k)| k.size).sum(),
            },
            keys: Some(keys.into_iter().map(|(_, k)| k).collect()),
        })
    }

    /// A device's pending messages as the watch shows them, valid as of the last write to it
    /// the watch showed (a write's comparison then fails if the watch missed a later one).
    ///
    /// The watch applies the keys of one write one by one, so the device's last write is
    /// counted whole only once the watch showed a later write (one etcd revision is never split
    /// between watch replies, and they come in revision order): until then the count is valid
    /// only up to the revision before, and the comparison fails (the writer then reads) if that
    /// last write touched the device.
    fn keys_from_view(&self, client_id: &str) -> DeviceKeys {
        let view = self.view();
        let device = view.by_device.get(client_id).copied().unwrap_or_default();
        let revision = if device.last_put >= view.latest_put {
            device.last_put - 1
        } else {
            device.last_put
        };
        DeviceKeys {
            revision: revision.max(0),
            size: device.size,
            keys: None,
        }
    }

    /// The other devices' pending messages, as the watch shows them.
    fn others(&self, client_id: &str) -> Size {
        let view = self.view();
        let seen = view
            .by_device
            .get(client_id)
            .map(|d| d.size)
            .unwrap_or_default();
        Size {
            messages: view.total.messages.saturating_sub(seen.messages),
            bytes: view.total.bytes.saturating_sub(seen.bytes),
        }
    }

    /// Whether a device holding `mine` may take one more message of `size` bytes.
    fn fits(&self, others: Size, mine: Size, size: u64) -> bool {
        let limits = self.limits;
        mine.messages < limits.per_device_messages
            && mine.bytes + size <= limits.per_device_bytes
            && others.messages + mine.messages < limits.total_messages
            && others.bytes + mine.bytes + size <= limits.total_bytes
    }

    /// The refusal of a message to a device holding `keys`.
    fn full(&self, client_id: &str, keys: &DeviceKeys) -> ClusterError {
        let (limits, mine, others) = (self.limits, keys.size(), self.others(client_id));
        ClusterError::DurableFull(format!(
            "`{client_id}` has {} pending messages of {} bytes (at most {} and {} per device; \
             {} and {} in all, {} and {} pending for other devices)",
            mine.messages,
            mine.bytes,
            limits.per_device_messages,
            limits.per_device_bytes,
            limits.total_messages,
            limits.total_bytes,
            others.messages,
            others.bytes
        ))
    }

    /// What a batch of messages of `sizes` bytes, in send order, does to a device holding
    /// `keys`: each kept while it fits; over a bound, refused ([`Overflow::Refuse`]), or the
    /// oldest messages (the device's, then this batch's) dropped until it fits
    /// ([`Overflow::DropOldest`]; refused if even all of them would not make room, or if
    /// more would go than one transaction takes). The device's expired messages go first,
    /// whatever the policy (when its keys were read: not on counts from the watch).
    fn plan(&self, client_id: &str, keys: &DeviceKeys, sizes: &[u64]) -> Plan {
        let others = self.others(client_id);
        let old = keys.droppable();
        let now = now_ms();
        // At most 128 operations to a transaction: the puts, then deletes.
        let room_for_deletes = 128usize.saturating_sub(sizes.len());
        let expired: Vec<usize> = (0..old.len())
            .filter(|&i| old[i].expires_ms <= now)
            .take(room_for_deletes / 2)
            .collect();
        let mut held = keys.size();
        for &i in &expired {
            held.messages = held.messages.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(old[i].size);
        }
        // What may be dropped to make room, oldest first.
        let live: Vec<usize> = (0..old.len())
            .filter(|i| expired.binary_search(i).is_err())
            .collect();
        let room_for_drops = room_for_deletes - expired.len();
        let mut drops = 0;
        // This batch's messages kept so far, oldest first: (index in the batch, size).
        let mut kept: VecDeque<(usize, u64)> = VecDeque::new();
        let mut fates = vec![Fate::Refused; sizes.len()];
        let mut place = 0;
        for (i, &size) in sizes.iter().enumerate() {
            if self.fits(others, held, size) {
                fates[i] = Fate::Kept(place);
                place += 1;
                held.messages += 1;
                held.bytes += size;
                kept.push_back((i, size));
                continue;
            }
            if self.limits.overflow == Overflow::Refuse {
                continue;
            }
            // Would dropping everything droppable make room?
            let mut trial = (held, drops, 0usize);
            let mut room = false;
            loop {
                let (h, d, k) = trial;
                if self.fits(others, h, size) {
                    room = true;
                    break;
                }
                let next = if d < live.len() {
                    old[live[d]].size
                } else if k < kept.len() {
                    kept[k].1
                } else {
                    break;
                };
                let (nd, nk) = if d < live.len() {
                    (d + 1, k)
                } else {
                    (d, k + 1)
                };
                if nd > room_for_drops {
                    break;
                }
                trial = (
                    Size {
                        messages: h.messages - 1,
                        bytes: h.bytes.saturating_sub(next),
                    },
                    nd,
                    nk,
                );
            }
            if !room {
                continue;
            }
            let (h, d, k) = trial;
            held = h;
            drops = d;
            for (j, _) in kept.drain(..k) {
                if let Fate::Kept(p) = fates[j] {
                    fates[j] = Fate::DroppedAt(p);
                }
            }
            fates[i] = Fate::Kept(place);
            place += 1;
            held.messages += 1;
            held.bytes += size;
            kept.push_back((i, size));
        }
        Plan {
            fates,
            expired,
            drops: live[..drops].to_vec(),
            after: held,
        }
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
            let (page, last) = match self.read_page(&client, client_id, read_up_to).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!("reading durable messages of {client_id} from etcd: {e}");
                    return conn.is_closed();
                }
            };
            if page.is_empty() {
                return true;
            }
            // Per identity: a client re-bound to another identity acknowledged ids of the first
            // that may be above this one's.
            let space = quicx::msg_space(&self.space, client_id);
            // Keys to delete: what was acknowledged, and what can never be delivered.
            let mut gone = Vec::new();
            let mut sends = Vec::with_capacity(page.len());
            for kv in &page {
                let key = kv.key().to_vec();
                match postcard::from_bytes::<Stored>(kv.value()) {
                    Err(_) => {
                        tracing::error!(
                            "a durable message of {client_id} in etcd is corrupt: dropped"
                        );
                        gone.push((key, Gone::Corrupt));
                    }
                    Ok(stored) if stored.expires_ms <= now_ms() => {
                        gone.push((key, Gone::Expired));
                    }
                    Ok(mut stored) => {
                        let id = id_of(kv);
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
                    let counters = self.counters.clone();
                    deleting = Some(Box::pin(async move {
                        delete_all(&mut etcd, keys, &counters).await
                    }));
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
                            gone.push((key, Gone::Delivered));
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
            deleted &= delete_all(&mut client, std::mem::take(&mut gone), &self.counters).await;
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

    /// Up to [`READ_BATCH`] of a device's messages written after revision `after`, in id
    /// order, and the last revision they hold, read whole: when more follow, the rest of the
    /// last revision's messages (one transaction's may straddle the page's end) is read too.
    async fn read_page(
        &self,
        client: &Client,
        client_id: &str,
        after: i64,
    ) -> Result<(Vec<etcd_client::KeyValue>, i64), etcd_client::Error> {
        let prefix = self.device_prefix(client_id);
        let mut kv = crate::etcd::kv(client);
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_min_create_revision(after + 1)
            .with_limit(READ_BATCH);
        let found = kv.get(prefix.clone(), Some(options)).await?;
        let mut page = found.kvs().to_vec();
        let Some(last) = page.last().map(etcd_client::KeyValue::create_revision) else {
            return Ok((page, after));
        };
        if found.more() {
            let whole = GetOptions::new()
                .with_prefix()
                .with_min_create_revision(last)
                .with_max_create_revision(last);
            let rest = kv.get(prefix, Some(whole)).await?;
            page.retain(|kv| kv.create_revision() != last);
            page.extend(rest.kvs().iter().cloned());
        }
        page.sort_unstable_by_key(id_of);
        Ok((page, last))
    }

    /// The messages pending for `client_id`, oldest first (expired ones excluded), read from
    /// etcd in pages.
    pub(crate) async fn list(
        &self,
        client: &mut Client,
        client_id: &str,
    ) -> Result<Vec<PendingMessage>, ClusterError> {
        let (mut all, mut after) = (Vec::new(), 0i64);
        let now = now_ms();
        loop {
            let (kvs, last) = self
                .read_page(client, client_id, after)
                .await
                .map_err(ClusterError::etcd)?;
            if kvs.is_empty() {
                return Ok(all);
            }
            for kv in &kvs {
                let Ok(stored) = postcard::from_bytes::<Stored>(kv.value()) else {
                    continue;
                };
                if stored.expires_ms <= now {
                    continue;
                }
                all.push(PendingMessage::new(
                    id_of(kv) as u64,
                    stored.service_path,
                    stored.service_method,
                    stored.payload.len(),
                    UNIX_EPOCH + Duration::from_millis(stored.expires_ms),
                ));
            }
            after = last;
        }
    }

    /// Cancels the message `id` of `client_id`; whether it was pending. One a delivery run
    /// has already sent may still arrive.
    pub(crate) async fn cancel(
        &self,
        client: &mut Client,
        client_id: &str,
        id: i64,
    ) -> Result<bool, ClusterError> {
        let found = client
            .get(
                self.device_prefix(client_id),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_min_create_revision(id.div_euclid(ID_SPAN))
                        .with_max_create_revision(id.div_euclid(ID_SPAN)),
                ),
            )
            .await
            .map_err(ClusterError::etcd)?;
        let mut cancelled = false;
        for kv in found.kvs().iter().filter(|kv| id_of(kv) == id) {
            let deleted = client
                .delete(kv.key().to_vec(), None)
                .await
                .map_err(ClusterError::etcd)?
                .deleted();
            cancelled |= deleted > 0;
        }
        Ok(cancelled)
    }
}

/// Why a durable message leaves etcd.
#[derive(Debug, Clone, Copy)]
enum Gone {
    Delivered,
    Expired,
    /// Dropped to make room ([`Overflow::DropOldest`]).
    Overflowed,
    Corrupt,
}

impl Counters {
    /// Counts `n` messages that left etcd for one reason, in [`ClusterDurableStats`] and in
    /// the metrics.
    fn add(&self, gone: Gone, n: u64) {
        use quicx::metrics::names;
        let (counter, name) = match gone {
            Gone::Delivered => (&self.delivered, names::DURABLE_DELIVERED),
            Gone::Expired => (&self.expired, names::DURABLE_EXPIRED),
            Gone::Overflowed => (&self.overflowed, names::DURABLE_OVERFLOWED),
            Gone::Corrupt => return,
        };
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(name).increment(n);
        }
    }

    /// Counts messages that left etcd, each for its reason.
    fn count(&self, gone: impl IntoIterator<Item = Gone>) {
        let (mut delivered, mut expired) = (0, 0);
        for g in gone {
            match g {
                Gone::Delivered => delivered += 1,
                Gone::Expired => expired += 1,
                Gone::Overflowed => self.add(g, 1),
                Gone::Corrupt => {}
            }
        }
        self.add(Gone::Delivered, delivered);
        self.add(Gone::Expired, expired);
    }
}

/// Deletes `keys` from etcd, `DELETES_PER_TXN` to a transaction, one by one where a
/// transaction is refused (an etcd that takes fewer operations per transaction), and counts
/// what left. False when some stay: they are sent again by a later run, and a device that
/// acknowledged them drops them as duplicates.
async fn delete_all(client: &mut Client, keys: Vec<(Vec<u8>, Gone)>, counters: &Counters) -> bool {
    let mut all = true;
    for chunk in keys.chunks(DELETES_PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(key, _)| TxnOp::delete(key.clone(), None))
            .collect();
        match client.txn(Txn::new().and_then(ops)).await {
            Ok(_) => counters.count(chunk.iter().map(|(_, g)| *g)),
            Err(e) => {
                tracing::debug!("deleting delivered durable messages from etcd in one go: {e}");
                for (key, gone) in chunk {
                    match client.delete(key.clone(), None).await {
                        Ok(_) => counters.count([*gone]),
                        Err(e) => {
                            tracing::warn!("deleting a delivered durable message from etcd: {e}");
                            all = false;
                        }
                    }
                }
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_counts_a_write_whole_only_once_a_later_one_shows() {
        let durable = ClusterDurable::new(
            "/q",
            "a",
            Duration::from_secs(1),
            ClusterDurableLimits::default(),
            CancellationToken::new(),
        );
        let key = |device: &str, n: u32| format!("/q/durable/{}/b-{n:020}.{n}.10", hex(device));
        // Two of a write's keys at revision 7 shown so far: a writer may count on them only up
        // to revision 6 (the comparison then fails if the write at 7 touched the device).
        durable.view_put("d", &key("d", 0), 7);
        durable.view_put("d", &key("d", 1), 7);
        let counted = durable.keys_from_view("d");
        assert_eq!((counted.revision, counted.size.messages), (6, 2));
        // A later write (another device's) shows that revision 7 is whole.
        durable.view_put("e", &key("e", 0), 8);
        let counted = durable.keys_from_view("d");
        assert_eq!(
            (counted.revision, counted.size.messages, counted.size.bytes),
            (7, 2, 20)
        );
        // A device the watch never showed: nothing counted, nothing may exist.
        assert_eq!(durable.keys_from_view("f").revision, 0);
        // Deletes lower the counts, not the revision.
        durable.view_delete(&key("d", 0));
        let counted = durable.keys_from_view("d");
        assert_eq!((counted.revision, counted.size.messages), (7, 1));
    }

    #[test]
    fn keys_name_their_place_expiry_and_size() {
        let key = b"/q/durable/6465/node-1.eu-00000000000000000042.7.e1765000000000.130";
        assert_eq!(key_fields(key), (7, 1_765_000_000_000, 130));
        assert_eq!(size_of_key(key), 130);
        assert_eq!(place_of_key(key), 7);
        // Keys written before they carried an expiry, a place, or a size.
        assert_eq!(
            key_fields(b"/q/durable/6465/n.eu-00000000000000000042.7.130"),
            (7, u64::MAX, 130)
        );
        assert_eq!(
            key_fields(b"/q/durable/6465/node-00000000000000000042.130"),
            (0, u64::MAX, 130)
        );
        assert_eq!(
            key_fields(b"/q/durable/6465/node-00000000000000000042"),
            (0, u64::MAX, UNKNOWN_SIZE)
        );
    }
}
