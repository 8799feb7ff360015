//! Durable pushes: messages for an identity kept in an embedded, crash-safe store (redb) until
//! the device acknowledges them, delivered in send order whenever the identity is bound.
//!
//! On the wire (`docs/PROTOCOL.md` §4), on a `quicx/2` connection a delivery run is one durable
//! stream: records back to back, each with `quicx-msg-id` (increasing per store) in its
//! metadata, acknowledged cumulatively by the client. On a `quicx/1` connection each message is
//! a push with receipt whose metadata also carries `quicx-msg-prev` (the id sent before it in
//! the same run, `0` for the first); the receipt is the acknowledgement. Either way clients
//! deliver in order and drop ids they already acknowledged.

use crate::sync::Lock;
use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::Path,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::{Connection, Error, Metadata, Result, connection::registry::Registry};

/// Metadata key: a durable message's id.
pub const MSG_ID_KEY: &str = "quicx-msg-id";
/// Metadata key: the id of the durable message sent before this one in the same run (`0`: none).
pub const MSG_PREV_KEY: &str = "quicx-msg-prev";
/// Metadata key: the id space of a durable message (see [`msg_space`]). A client keeps order
/// and duplicates per space (per server address without one), at most
/// 1,024 spaces (it forgets the least recently used), and refuses a message whose space name is
/// longer than 256 bytes.
pub const MSG_SPACE_KEY: &str = "quicx-msg-space";

/// The id space ([`MSG_SPACE_KEY`]) of `identity`'s durable messages from the store or cluster
/// named `base`: the first 64 bits of the SHA-256 of `base`, a NUL byte and `identity`, in hex
/// (16 characters: short, as every durable message carries it). Ids are shared by every
/// identity of a store, and one client may carry several identities over time (a handler's
/// `bind_client_id` after a login): a space per identity keeps what it acknowledged for one
/// from hiding the other's messages.
pub fn msg_space(base: &str, identity: &str) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(base.as_bytes());
    digest.update(&[0]);
    digest.update(identity.as_bytes());
    crate::trace::hex(&digest.finish().as_ref()[..MSG_SPACE_LEN / 2])
}

/// The length of every id space [`msg_space`] makes.
const MSG_SPACE_LEN: usize = 16;

/// Metadata key, present (`1`) when the message was sent before and not acknowledged.
pub const MSG_REDELIVERED_KEY: &str = "quicx-msg-redelivered";

/// Every identity with a queue, and the highest id acknowledged in it (cumulatively): messages
/// at or below it are no longer pending, whether or not they were removed from the queue yet.
const QUEUES: TableDefinition<'_, &str, u64> = TableDefinition::new("queues");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The layout before per-identity queues: all messages in one table, moved into the queues
/// when such a store is opened.
const LEGACY_MESSAGES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("messages");
/// Acknowledged messages one queue that still holds pending ones may keep, past which they
/// are removed one by one (a queue whose every message is acknowledged is dropped whole, which
/// deletes no keys one by one): by count, and by bytes.
const MAX_ACKED_LEFT: u64 = 65_536;
const MAX_ACKED_LEFT_BYTES: u64 = 64 << 20;
/// Acknowledged messages removed one by one per transaction at most (a compaction is spread
/// over the following acknowledgements, so no commit stalls the senders long).
const COMPACT_PER_COMMIT: usize = 4096;
/// Legacy messages moved into queues per transaction when a store is migrated.
const MIGRATE_PER_COMMIT: usize = 10_000;

/// The name of `identity`'s queue table: its messages by id.
fn queue_name(identity: &str) -> String {
    format!("queue/{identity}")
}

fn queue_table(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}

/// `identity`'s queue in a read transaction, `None` when it has none.
fn read_queue(
    txn: &redb::ReadTransaction,
    identity: &str,
) -> Result<Option<redb::ReadOnlyTable<u64, &'static [u8]>>> {
    match txn.open_table(queue_table(&queue_name(identity))) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(store_error(e)),
    }
}

/// Messages sent at once to one device before their acknowledgements come back.
const WINDOW: usize = 32;
/// Most ids remembered as sent-but-unacknowledged (for the redelivered mark).
const MAX_ATTEMPTED: usize = 100_000;
/// Messages read from the store at a time.
const BATCH: usize = 1024;
/// Bytes read from the store at a time (past one message), so that large messages are not
/// all held at once.
const READ_BYTES: usize = 4 << 20;
/// Messages in flight on a durable stream (v2) before acknowledgements come back.
const STREAM_WINDOW: usize = 4096;
/// How often a durable stream with nothing awaiting acknowledgement looks again (the writer
/// may have sent meanwhile).
const RECHECK: Duration = Duration::from_millis(200);
/// Messages read from the store and written to a durable stream at a time.
const STREAM_BATCH: usize = 1024;
/// Bytes a durable record adds to a message's stored bytes, about (lengths, the delivery keys
/// with a 20-digit id and the redelivered mark): what a batch's buffer reserves per record.
const RECORD_EXTRA: usize = 112;

/// What a server does when a durable message would exceed a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Refuse the new message: [`Error::StoreFull`]. The default.
    #[default]
    Refuse,
    /// Drop the identity's oldest messages until the new one fits, and count them
    /// ([`Stats::durable_overflowed`](crate::Stats::durable_overflowed)). A message larger than
    /// the per-identity byte bound is still refused.
    DropOldest,
}

/// How often the durable store forces what it committed onto the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fsync {
    /// Every commit is on the disk (fsync) before [`Server::send_durable`](crate::Server::send_durable)
    /// returns: nothing accepted is lost, even when the machine loses power. The default. Sends
    /// that wait together share one commit, so many senders still make many messages per fsync.
    #[default]
    EveryCommit,
    /// Commits reach the disk together, at most this long apart and when the server shuts
    /// down, and a crash (of the process or the machine) loses the messages accepted since the
    /// last flush, as an MQTT broker with an autosave interval does. `send_durable` returns
    /// once the store took its message (its id assigned, the bounds checked, as an MQTT broker
    /// acknowledges a QoS 1 message once it is in its memory); the message is committed within
    /// about a millisecond, and listed and delivered from then on (a commit failing then, an
    /// I/O error, loses it as a crash would, and is logged). For rates a device fleet needs
    /// and one fsync per commit cannot reach (one sender waiting for each send: about 2,500
    /// messages/s with fsync on this project's test machine). Acknowledgements are flushed the
    /// same way: after a crash a message acknowledged in the last interval is sent again (and
    /// dropped by the device as a duplicate). A zero interval is
    /// [`EveryCommit`](Self::EveryCommit).
    Interval(Duration),
}

/// Bounds of the durable store.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DurableLimits {
    /// Pending messages per identity (default 10,000).
    pub per_identity_messages: u64,
    /// Pending payload and header bytes per identity (default 16 MiB).
    pub per_identity_bytes: u64,
    /// Pending messages in all (default 1,000,000).
    pub total_messages: u64,
    /// Pending bytes in all (default 1 GiB).
    pub total_bytes: u64,
    /// What a message over a bound does (default [`Overflow::Refuse`]).
    pub overflow: Overflow,
    /// How long a server waits for a device's acknowledgement before it tries again later
    /// (default 60 s; in manual-ack mode this is how long the device application may take).
    pub ack_timeout: Duration,
    /// How often commits are forced onto the disk (default [`Fsync::EveryCommit`]).
    pub fsync: Fsync,
}

impl Default for DurableLimits {
    fn default() -> Self {
        Self {
            per_identity_messages: 10_000,
            per_identity_bytes: 16 << 20,
            total_messages: 1_000_000,
            total_bytes: 1 << 30,
            overflow: Overflow::Refuse,
            ack_timeout: Duration::from_secs(60),
            fsync: Fsync::EveryCommit,
        }
    }
}

impl DurableLimits {
    /// Sets the overflow policy.
    #[must_use]
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// Sets the per-identity bounds.
    #[must_use]
    pub fn per_identity(mut self, messages: u64, bytes: u64) -> Self {
        self.per_identity_messages = messages;
        self.per_identity_bytes = bytes;
        self
    }

    /// Sets the bounds over all identities.
    #[must_use]
    pub fn total(mut self, messages: u64, bytes: u64) -> Self {
        self.total_messages = messages;
        self.total_bytes = bytes;
        self
    }

    /// Sets how often commits are forced onto the disk.
    #[must_use]
    pub fn fsync(mut self, fsync: Fsync) -> Self {
        self.fsync = fsync;
        self
    }

    /// Sets the acknowledgement timeout (zero means the default, 60 s).
    #[must_use]
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = if timeout.is_zero() {
            Self::default().ack_timeout
        } else {
            timeout
        };
        self
    }
}

/// The backlog of one identity: what waits in the store for it
/// ([`Server::durable_backlog`](crate::Server::durable_backlog)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DurableBacklog {
    /// The client identity the messages wait for.
    pub identity: String,
    /// Messages pending for it (expired ones the sweeper has not dropped yet included).
    pub messages: u64,
    /// Their stored bytes, payload and header, as [`DurableLimits`] counts them.
    pub bytes: u64,
}

/// A message waiting in the store for its device ([`Server::durable_pending`](crate::Server::durable_pending)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PendingMessage {
    /// Its id (what the device sees under `quicx-msg-id`).
    pub id: u64,
    /// The service path it is pushed to.
    pub service_path: String,
    /// The method.
    pub service_method: String,
    /// Payload bytes.
    pub size: usize,
    /// When it expires (it is then dropped, never delivered).
    pub expires_at: SystemTime,
}

impl PendingMessage {
    /// A pending message as a store lists it (for stores other than the server's own, such as
    /// a cluster's).
    pub fn new(
        id: u64,
        service_path: String,
        service_method: String,
        size: usize,
        expires_at: SystemTime,
    ) -> Self {
        Self {
            id,
            service_path,
            service_method,
            size,
            expires_at,
        }
    }
}

/// A message as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    service_path: String,
    service_method: String,
    metadata: Metadata,
    /// Bytes, not a sequence of u8s (the same postcard encoding, written at once).
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
    /// Unix milliseconds.
    expires_ms: u64,
}

/// A stored message decoded in place (the same postcard bytes as [`Stored`]): its strings and
/// payload borrowed from what was read, so that a delivery allocates nothing per message but
/// the stored metadata's pairs (none when the sender gave none).
#[derive(Debug, Deserialize)]
struct StoredRef<'a> {
    service_path: &'a str,
    service_method: &'a str,
    metadata: Metadata,
    payload: &'a [u8],
    expires_ms: u64,
}

impl StoredRef<'_> {
    /// `metadata` with the delivery keys set (as [`Metadata::insert`] would).
    fn metadata_with(&self, extra: &[(&str, &str)]) -> Metadata {
        let mut metadata = self.metadata.clone();
        for (k, v) in extra {
            metadata.insert(*k, *v);
        }
        metadata
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn store_error(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

/// Counts of one identity's pending messages.
#[derive(Debug, Default, Clone, Copy)]
struct Size {
    messages: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Sizes {
    by_identity: HashMap<String, Size>,
    total: Size,
}

impl Sizes {
    fn add(&mut self, identity: &str, bytes: u64) {
        let s = self.by_identity.entry(identity.to_owned()).or_default();
        s.messages += 1;
        s.bytes += bytes;
        self.total.messages += 1;
        self.total.bytes += bytes;
    }

    /// Forgets everything counted for `identity`.
    fn forget(&mut self, identity: &str) {
        if let Some(s) = self.by_identity.remove(identity) {
            self.total.messages = self.total.messages.saturating_sub(s.messages);
            self.total.bytes = self.total.bytes.saturating_sub(s.bytes);
        }
    }

    /// Sets the store's gauges to these sizes.
    fn record(&self) {
        use crate::metrics::names;
        metrics::gauge!(names::DURABLE_PENDING).set(self.total.messages as f64);
        metrics::gauge!(names::DURABLE_PENDING_BYTES).set(self.total.bytes as f64);
        metrics::gauge!(names::DURABLE_PENDING_IDENTITIES).set(self.by_identity.len() as f64);
    }

    /// The `limit` identities with the most pending messages, most first (ties: most bytes,
    /// then by name). One pass over the identities, keeping `limit` of them.
    fn largest(&self, limit: usize) -> Vec<DurableBacklog> {
        // Names borrowed while ranking; only the `limit` kept are copied.
        let mut heap =
            std::collections::BinaryHeap::with_capacity(limit.saturating_add(1).min(1024));
        if limit > 0 {
            for (identity, size) in &self.by_identity {
                let entry = (
                    std::cmp::Reverse((size.messages, size.bytes)),
                    identity.as_str(),
                );
                if heap.len() < limit {
                    heap.push(entry);
                } else if heap.peek().is_some_and(|worst| entry < *worst) {
                    heap.pop();
                    heap.push(entry);
                }
            }
        }
        heap.into_sorted_vec()
            .into_iter()
            .map(
                |(std::cmp::Reverse((messages, bytes)), identity)| DurableBacklog {
                    identity: identity.to_owned(),
                    messages,
                    bytes,
                },
            )
            .collect()
    }

    fn sub(&mut self, identity: &str, bytes: u64) {
        if let Some(s) = self.by_identity.get_mut(identity) {
            s.messages = s.messages.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(bytes);
            if s.messages == 0 {
                self.by_identity.remove(identity);
            }
        }
        self.total.messages = self.total.messages.saturating_sub(1);
        self.total.bytes = self.total.bytes.saturating_sub(bytes);
    }
}

/// Counters of the durable store.
#[derive(Debug, Default)]
pub(crate) struct DurableCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) overflowed: AtomicU64,
}

/// A change to make in one write transaction.
enum Op {
    Append {
        identity: String,
        /// The encoded message (encoded by the sender, not on the writer thread).
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<u64>>,
    },
    Remove {
        identity: String,
        ids: Vec<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Everything up to `upto` was acknowledged; `redelivered` lists (in id order) the
    /// acknowledged ids that were sent more than once.
    Ack {
        identity: String,
        upto: u64,
        redelivered: Vec<u64>,
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// The store: redb on disk, one writer thread that commits whatever is waiting in one
/// transaction (group commit: each append waits for a durable commit, concurrent appends share
/// it; under `Fsync::Interval`, appends are answered as they are applied, see `DEFER`), and the
/// sizes kept in memory for the bounds.
pub(crate) struct Store {
    /// `None` once closed.
    db: Mutex<Option<Arc<Database>>>,
    writer: Mutex<Option<std::sync::mpsc::Sender<Op>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    sizes: Arc<Mutex<Sizes>>,
    pub(crate) counters: Arc<DurableCounters>,
    /// The identities commits stored messages for, until delivery starts for them
    /// ([`Durable::start_kicks`]).
    kicks: Arc<Kicks>,
    /// The store's name in id spaces (`quicx-msg-space`, see [`msg_space`]): a random number
    /// drawn when the store file was created, in hex.
    space_base: String,
}

/// Message ids are reserved on the disk this many at a time (one fsynced commit per block), so
/// that ids handed out in commits a crash loses (`Fsync::Interval`) are never handed out again
/// after a restart: a device that saw them would take the new messages for duplicates.
const ID_BLOCK: u64 = 1 << 20;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pending", &self.pending_total())
            .finish()
    }
}

impl Drop for Store {
    /// A store dropped without `close` (its server dropped without a shutdown) still ends the
    /// task that starts deliveries.
    fn drop(&mut self) {
        self.kicks.close();
    }
}

impl Store {
    /// Opens (or creates) the store at `path`. A file that is not a redb database, or one redb
    /// cannot repair, is [`Error::Store`] with redb's reason; never a panic.
    pub(crate) fn open(path: &Path, limits: DurableLimits) -> Result<Self> {
        // redb 2.6 asserts (panics) on some damaged files, a truncated one among them, instead of
        // returning an error: turn that into the error it should be.
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Database::create(path)));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => {
                return Err(Error::Store(format!("cannot open {}: {e}", path.display())));
            }
            Err(panic) => {
                return Err(Error::Store(format!(
                    "cannot open {}: the file is damaged (truncated or overwritten?): {}",
                    path.display(),
                    crate::service::panic_message(&*panic)
                )));
            }
        };
        let (store_id, reserved) = {
            let txn = db.begin_write().map_err(store_error)?;
            txn.open_table(QUEUES).map_err(store_error)?;
            let ids = {
                let mut meta = txn.open_table(META).map_err(store_error)?;
                let get = |meta: &redb::Table<'_, &str, u64>, key| {
                    meta.get(key).map(|v| v.map(|v| v.value()))
                };
                let store_id = match get(&meta, "store_id").map_err(store_error)? {
                    Some(id) => id,
                    None => {
                        let id = rand::random::<u64>();
                        meta.insert("store_id", id).map_err(store_error)?;
                        id
                    }
                };
                // Every id handed out before is below the reservation (see `ID_BLOCK`),
                // whatever a crash took back of `next_id`.
                let reserved = get(&meta, "reserved_ids")
                    .map_err(store_error)?
                    .unwrap_or(0);
                let next = get(&meta, "next_id").map_err(store_error)?.unwrap_or(1);
                if reserved > next {
                    meta.insert("next_id", reserved).map_err(store_error)?;
                }
                (store_id, reserved.max(next))
            };
            txn.commit().map_err(store_error)?;
            ids
        };
        migrate_legacy(&db)?;
        let (sizes, acked_left) = recount(&db)?;
        sizes.record();
        let db = Arc::new(db);
        let sizes = Arc::new(Mutex::new(sizes));
        let counters = Arc::new(DurableCounters::default());
        let (writer, ops) = std::sync::mpsc::channel();
        let kicks = Arc::new(Kicks::default());
        let parts = WriterParts {
            db: db.clone(),
            ops,
            sizes: sizes.clone(),
            counters: counters.clone(),
            limits,
            kicks: kicks.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("quicx-durable".into())
            .spawn(move || write_loop(&parts, acked_left, reserved))?;
        Ok(Self {
            db: Mutex::new(Some(db)),
            writer: Mutex::new(Some(writer)),
            thread: Mutex::new(Some(thread)),
            sizes,
            counters,
            kicks,
            space_base: format!("{store_id:016x}"),
        })
    }

    fn closed() -> Error {
        Error::Store("the store is closed (the server shut down)".into())
    }

    fn db(&self) -> Result<Arc<Database>> {
        self.db.locked().clone().ok_or_else(Self::closed)
    }

    /// Closes the store: the writer commits what is queued and stops, and the file is released
    /// once reads in progress end (blocking: run it off the async threads).
    fn close(&self) {
        drop(self.writer.locked().take());
        if let Some(thread) = self.thread.locked().take() {
            let _ = thread.join();
        }
        drop(self.db.locked().take());
        self.kicks.close();
    }

    async fn op(&self, make: impl FnOnce(oneshot::Sender<Result<u64>>) -> Op) -> Result<u64> {
        committed(&mut self.submit(make)?).await
    }

    /// Stores a message; returns its id once the writer answers (see `submit_append`).
    #[cfg(test)]
    async fn append(&self, identity: &str, message: Stored) -> Result<u64> {
        committed(&mut self.submit_append(identity, &message)?).await
    }

    /// Hands an operation to the writer; the receiver gets its result once committed (an
    /// append under `Fsync::Interval`: once applied, see `DEFER`).
    fn submit(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<u64>>) -> Op,
    ) -> Result<oneshot::Receiver<Result<u64>>> {
        let (tx, rx) = oneshot::channel();
        let writer = self.writer.locked().clone().ok_or_else(Self::closed)?;
        writer
            .send(make(tx))
            .map_err(|_| Error::Store("the store's writer stopped".into()))?;
        Ok(rx)
    }

    /// Hands a message to the writer; the receiver gets its id once it is committed (on the
    /// disk under `Fsync::EveryCommit`), or under `Fsync::Interval` once the writer applied it
    /// in a transaction that commits within `DEFER`.
    fn submit_append(
        &self,
        identity: &str,
        message: &Stored,
    ) -> Result<oneshot::Receiver<Result<u64>>> {
        let identity = identity.to_owned();
        let bytes = postcard::to_allocvec(message).map_err(store_error)?;
        self.submit(|reply| Op::Append {
            identity,
            bytes,
            reply,
        })
    }

    /// Removes messages; returns how many were there.
    async fn remove(&self, identity: &str, ids: Vec<u64>) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let identity = identity.to_owned();
        self.op(|reply| Op::Remove {
            identity,
            ids,
            reply,
        })
        .await
    }

    /// Marks everything of `identity` up to `upto` acknowledged; returns how many messages that
    /// were pending it covers. Those are counted as delivered (and, of them, the ids in
    /// `redelivered` as redelivered): a message that expired, overflowed or was
    /// cancelled after it went out is not pending any more and not counted again.
    async fn ack(&self, identity: &str, upto: u64, redelivered: Vec<u64>) -> Result<u64> {
        let identity = identity.to_owned();
        self.op(|reply| Op::Ack {
            identity,
            upto,
            redelivered,
            reply,
        })
        .await
    }

    /// Up to `limit` messages of `identity` with ids above `after`, in id order, and no more
    /// than `READ_BYTES` of them past the first.
    fn read_after(&self, identity: &str, after: u64, limit: usize) -> Result<Page> {
        let mut page = Page::default();
        let txn = self.db()?.begin_read().map_err(store_error)?;
        let queues = txn.open_table(QUEUES).map_err(store_error)?;
        let Some(acked) = queues
            .get(identity)
            .map_err(store_error)?
            .map(|v| v.value())
        else {
            return Ok(page);
        };
        let Some(table) = read_queue(&txn, identity)? else {
            return Ok(page);
        };
        let mut raw = Vec::new();
        let start = after.max(acked).saturating_add(1);
        for entry in table.range(start..).map_err(store_error)? {
            let (k, v) = entry.map_err(store_error)?;
            let (id, bytes) = (k.value(), v.value());
            page.last = Some(id);
            match postcard::from_bytes::<StoredRef<'_>>(bytes) {
                Ok(m) => {
                    if raw.capacity() == 0 {
                        let want = bytes.len().saturating_mul(limit);
                        raw.reserve(want.min(READ_BYTES).max(bytes.len()));
                    }
                    let at = raw.len()..raw.len() + bytes.len();
                    raw.extend_from_slice(bytes);
                    page.messages.push(RawMessage {
                        id,
                        expires_ms: m.expires_ms,
                        at,
                    });
                }
                Err(e) => {
                    tracing::error!("durable message {id} of {identity} is corrupt: {e}");
                    page.corrupt.push(id);
                }
            }
            if page.messages.len() + page.corrupt.len() >= limit || raw.len() >= READ_BYTES {
                break;
            }
        }
        page.raw = raw.into();
        Ok(page)
    }

    async fn read_after_async(
        self: &Arc<Self>,
        identity: &str,
        after: u64,
        limit: usize,
    ) -> Result<Page> {
        let (store, identity) = (self.clone(), identity.to_owned());
        tokio::task::spawn_blocking(move || store.read_after(&identity, after, limit))
            .await
            .map_err(store_error)?
    }

    pub(crate) fn pending_total(&self) -> u64 {
        self.sizes.locked().total.messages
    }

    /// Pending messages and bytes over all identities, and how many identities have some.
    pub(crate) fn pending_sizes(&self) -> (u64, u64, u64) {
        let sizes = self.sizes.locked();
        (
            sizes.total.messages,
            sizes.total.bytes,
            sizes.by_identity.len() as u64,
        )
    }

    /// The `limit` identities with the most pending messages, most first.
    pub(crate) fn largest_backlogs(&self, limit: usize) -> Vec<DurableBacklog> {
        self.sizes.locked().largest(limit)
    }

    pub(crate) fn pending_of(&self, identity: &str) -> u64 {
        self.sizes
            .locked()
            .by_identity
            .get(identity)
            .map_or(0, |s| s.messages)
    }
}

/// What the writer thread works with.
struct WriterParts {
    db: Arc<Database>,
    ops: std::sync::mpsc::Receiver<Op>,
    sizes: Arc<Mutex<Sizes>>,
    counters: Arc<DurableCounters>,
    limits: DurableLimits,
    /// After each commit, the identities it stored messages for (their delivery runs start
    /// from what is committed).
    kicks: Arc<Kicks>,
}

/// Identities whose messages were committed and whose delivery has not been started for them
/// yet: a set (as many entries at most as identities with messages pending, however many
/// commits come while nobody takes them), and a wake-up for the task that takes them.
#[derive(Default)]
struct Kicks {
    due: Mutex<HashSet<String>>,
    ready: tokio::sync::Notify,
    /// Set when the store closes: the task ends.
    closed: std::sync::atomic::AtomicBool,
}

impl Kicks {
    fn add(&self, identities: impl IntoIterator<Item = String>) {
        self.due.locked().extend(identities);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.ready.notify_one();
    }
}

/// The writer thread: commits every operation waiting, in one transaction at a time.
fn write_loop(parts: &WriterParts, mut acked_left: Sizes, mut reserved: u64) {
    let WriterParts {
        db,
        ops,
        sizes,
        counters,
        limits,
        kicks,
    } = parts;
    // With `Fsync::Interval`, when the oldest commit not yet on the disk was made.
    let mut unsynced_since: Option<std::time::Instant> = None;
    let mut last_appends = 1;
    // The next message id, as the last commit left it (read from the store after a failure).
    let mut next_id: Option<u64> = None;
    // An operation taken but left for the next transaction.
    let mut carried: Option<Op> = None;
    loop {
        let next = match (limits.fsync, unsynced_since) {
            _ if carried.is_some() => carried.take(),
            (Fsync::Interval(every), Some(since)) => {
                match ops.recv_timeout(every.saturating_sub(since.elapsed())) {
                    Ok(op) => Some(op),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        flush(db);
                        return;
                    }
                }
            }
            _ => match recv_soon(ops) {
                Ok(op) => Some(op),
                Err(_) => return,
            },
        };
        let Some(first) = next else {
            // Nothing came within the interval: put what is committed onto the disk.
            flush(db);
            unsynced_since = None;
            continue;
        };
        let durable = match limits.fsync {
            Fsync::EveryCommit => true,
            Fsync::Interval(every) if every.is_zero() => true,
            Fsync::Interval(every) => unsynced_since.is_some_and(|s| s.elapsed() >= every),
        };
        let started = std::time::Instant::now();
        let linger_until = started + LINGER;
        // Replies that wait for the commit, and how many appends were answered before it.
        let mut replies = Vec::new();
        let mut answered_early = 0u64;
        // The id after the last one answered early.
        let mut handed_out = 0;
        let mut appends = 0usize;
        let mut stored_for: Vec<String> = Vec::new();
        let mut tally = AckTally::default();
        let mut reserving = None;
        let mut committing_next = 0;
        let outcome = (|| -> Result<()> {
            let mut txn = db.begin_write().map_err(store_error)?;
            let mut next = match next_id {
                Some(next) => next,
                None => txn
                    .open_table(META)
                    .map_err(store_error)?
                    .get("next_id")
                    .map_err(store_error)?
                    .map_or(1, |v| v.value()),
            };
            // The ids this commit may hand out beyond the reservation: reserve the next block,
            // on the disk with them.
            let most = MAX_BATCH as u64;
            reserving = (next + most > reserved).then_some(next + most + ID_BLOCK);
            let flushes = durable || reserving.is_some();
            txn.set_durability(if flushes {
                redb::Durability::Immediate
            } else {
                // On the disk with the next durable commit; pages are freed by that one too.
                redb::Durability::None
            });
            // A commit that does not reach the disk promises no more than the store's memory
            // does (`Fsync::Interval`): its appends are answered as they are applied, and it
            // takes more for up to `DEFER` (see there).
            let early = !flushes;
            {
                let mut queues = txn.open_table(QUEUES).map_err(store_error)?;
                let mut meta = txn.open_table(META).map_err(store_error)?;
                if let Some(upto) = reserving {
                    meta.insert("reserved_ids", upto).map_err(store_error)?;
                }
                let mut w = Writing {
                    txn: &txn,
                    queues: &mut queues,
                    sizes,
                    acked_left: &mut acked_left,
                    counters,
                    limits,
                    open: HashMap::new(),
                    tally: &mut tally,
                };
                let mut only_appends = true;
                let mut op = first;
                for taken in 1.. {
                    match op {
                        Op::Append {
                            identity,
                            bytes,
                            reply,
                        } => {
                            appends += 1;
                            let result = w.append(&identity, &bytes, next);
                            if result.is_ok() {
                                next += 1;
                                if stored_for.last() != Some(&identity) {
                                    stored_for.push(identity);
                                }
                                if early {
                                    answered_early += 1;
                                    handed_out = next;
                                }
                            }
                            if early {
                                let _ = reply.send(result);
                            } else {
                                replies.push((reply, result));
                            }
                        }
                        Op::Remove {
                            identity,
                            ids,
                            reply,
                        } => {
                            only_appends = false;
                            let removed = w.remove(&identity, &ids);
                            failing(&mut replies, reply, removed)?;
                        }
                        Op::Ack {
                            identity,
                            upto,
                            redelivered,
                            reply,
                        } => {
                            only_appends = false;
                            let acked = w.ack(&identity, upto, &redelivered);
                            failing(&mut replies, reply, acked)?;
                        }
                    }
                    if taken == MAX_BATCH {
                        break;
                    }
                    // Everything waiting; for a commit that fsyncs, the appends still coming
                    // of as many as the previous commit took (`LINGER`); for one answered
                    // early, appends coming while it is young (`DEFER`).
                    let wait_until = if durable && appends < last_appends {
                        linger_until
                    } else if early && only_appends {
                        (std::time::Instant::now() + DEFER_IDLE).min(started + DEFER)
                    } else {
                        started
                    };
                    match recv_until(ops, wait_until) {
                        // Once a transaction answered appends early it takes nothing else: an
                        // acknowledgement or removal failing in it would take back messages
                        // their senders were told are stored.
                        Some(more) if answered_early > 0 && !matches!(more, Op::Append { .. }) => {
                            carried = Some(more);
                            break;
                        }
                        Some(more) => op = more,
                        None => break,
                    }
                }
                meta.insert("next_id", next).map_err(store_error)?;
                committing_next = next;
            }
            txn.commit().map_err(store_error)
        })();
        last_appends = appends;
        match outcome {
            Ok(()) => {
                next_id = Some(committing_next);
                if let Some(upto) = reserving {
                    reserved = upto;
                }
                if durable || reserving.is_some() {
                    unsynced_since = None;
                } else {
                    unsynced_since.get_or_insert_with(std::time::Instant::now);
                }
                sizes.locked().record();
                tally.record();
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
                if !stored_for.is_empty() {
                    kicks.add(stored_for);
                }
            }
            Err(e) => {
                tracing::error!("durable store commit failed: {e}");
                if answered_early > 0 {
                    tracing::error!(
                        "{answered_early} durable messages accepted (Fsync::Interval) before \
                         the failed commit are lost"
                    );
                }
                // The next id stays as the last commit left it (or as a failure before this one
                // raised it), but ids answered early are never handed out again: their senders
                // hold them (to cancel, say), although their messages are lost. They are below
                // the reservation on the disk (see `reserving`).
                if answered_early > 0 {
                    next_id = Some(handed_out);
                }
                // What this transaction changed in memory is now wrong: count again.
                if let Ok((fresh, left)) = recount(db) {
                    fresh.record();
                    *sizes.locked() = fresh;
                    acked_left = left;
                }
                tally.uncount(counters);
                // Those applied and the one the failure stopped at alike; what was not taken
                // yet goes into the next transaction.
                for (reply, _) in replies {
                    let _ = reply.send(Err(Error::Store(e.to_string())));
                }
            }
        }
    }
}

/// Keeps an operation's reply for the end of its transaction; the operation's error fails the
/// transaction (and every reply kept gets the commit's error).
fn failing(
    replies: &mut Vec<(oneshot::Sender<Result<u64>>, Result<u64>)>,
    reply: oneshot::Sender<Result<u64>>,
    result: Result<u64>,
) -> Result<()> {
    match result {
        Ok(n) => {
            replies.push((reply, Ok(n)));
            Ok(())
        }
        Err(e) => {
            replies.push((reply, Ok(0)));
            Err(e)
        }
    }
}

/// The most operations one commit takes.
const MAX_BATCH: usize = 1024;

/// How long a commit that fsyncs waits for as many appends as the previous one took. Senders
/// answered by one commit send their next messages one after another: without the wait, the
/// first few made a commit of their own and the rest the next one (64 senders in flight measured
/// commits of 24 and 40 in turn, two fsyncs per round), each commit paying a whole fsync. A
/// sender alone waits for nobody (the previous commit took one append); when fewer come than
/// before, one commit waits this long and the next expects fewer. Appends only: a delivery
/// run's acknowledgement comes whenever the device sends it, and nobody waits on a commit for
/// the next one. The wait yields the core instead of sleeping: a sleeping writer would be woken
/// once per arriving append (30-50 µs each on a VM).
const LINGER: Duration = Duration::from_micros(200);

/// How long a commit that does not reach the disk (`Fsync::Interval`), whose appends are
/// answered as they are applied, stays open for more appends: a sender waiting for each send
/// sends its next one within a few µs of its answer, and a commit per message (about 70 µs
/// of redb's work on this project's test machine, disk or not) would bound it to one message
/// per commit. What it holds is delivered (and listed) once committed, so this is also what a
/// delivery to a connected device may wait.
const DEFER: Duration = Duration::from_millis(1);

/// How long such a commit waits for the next append before it commits: a sender that sends
/// nothing more is not held up for all of `DEFER`.
const DEFER_IDLE: Duration = Duration::from_micros(50);

/// How long the writer keeps looking for the next operation before it sleeps: a sender that
/// waits for each commit sends its next one within a few tens of µs, and finding it awake saves
/// the thread wake-up (30-50 µs on a VM) that would otherwise come on top.
const STAY_AWAKE: Duration = Duration::from_micros(100);

/// The next operation if one comes by `until`, looked for yielding the core in between (not
/// sleeping: a wake-up costs more than the wait); `None` at once once the channel is closed.
fn recv_until(ops: &std::sync::mpsc::Receiver<Op>, until: std::time::Instant) -> Option<Op> {
    loop {
        match ops.try_recv() {
            Ok(op) => return Some(op),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if std::time::Instant::now() >= until {
                    return None;
                }
                std::thread::yield_now();
            }
        }
    }
}

/// The next operation: looked for (yielding the core) for `STAY_AWAKE`, then waited for.
fn recv_soon(
    ops: &std::sync::mpsc::Receiver<Op>,
) -> std::result::Result<Op, std::sync::mpsc::RecvError> {
    if let Some(op) = recv_until(ops, std::time::Instant::now() + STAY_AWAKE) {
        return Ok(op);
    }
    ops.recv()
}

/// An empty durable commit: everything committed before it is on the disk when it returns.
fn flush(db: &Database) {
    let flushed = db.begin_write().map_err(store_error).and_then(|mut txn| {
        txn.set_durability(redb::Durability::Immediate);
        txn.commit().map_err(store_error)
    });
    if let Err(e) = flushed {
        tracing::error!("durable store flush failed: {e}");
    }
}

/// One read of a queue: the messages' stored bytes, back to back in one buffer (one allocation
/// per read, not several per message: measured, the per-message allocations of a read made by
/// a blocking thread and freed by an I/O thread cost a 1 KiB drain 12-25%, the allocator
/// returning and faulting in the same memory at every read).
#[derive(Debug, Default)]
struct Page {
    /// The stored bytes of `messages`.
    raw: Bytes,
    /// The messages read, in id order.
    messages: Vec<RawMessage>,
    /// Ids whose stored bytes do not decode (skipped, to be removed).
    corrupt: Vec<u64>,
    /// The highest id read, corrupt or not (where the next read starts).
    last: Option<u64>,
}

/// A message of a [`Page`]: its id, expiry and where its stored bytes are.
#[derive(Debug, Clone)]
struct RawMessage {
    id: u64,
    expires_ms: u64,
    at: std::ops::Range<usize>,
}

impl Page {
    /// `m` decoded in place (it decoded when read).
    fn stored(&self, m: &RawMessage) -> StoredRef<'_> {
        postcard::from_bytes(&self.raw[m.at.clone()]).expect("decoded when read")
    }
}

/// Counts what is pending per identity, and what is acknowledged but still in its queue.
fn recount(db: &Database) -> Result<(Sizes, Sizes)> {
    let mut sizes = Sizes::default();
    let mut acked_left = Sizes::default();
    let txn = db.begin_read().map_err(store_error)?;
    let queues = txn.open_table(QUEUES).map_err(store_error)?;
    for entry in queues.iter().map_err(store_error)? {
        let (k, v) = entry.map_err(store_error)?;
        let (identity, acked) = (k.value(), v.value());
        let Some(table) = read_queue(&txn, identity)? else {
            continue;
        };
        for entry in table.iter().map_err(store_error)? {
            let (id, v) = entry.map_err(store_error)?;
            let bytes = v.value().len() as u64;
            if id.value() > acked {
                sizes.add(identity, bytes);
            } else {
                acked_left.add(identity, bytes);
            }
        }
    }
    Ok((sizes, acked_left))
}

/// Moves the messages of a store with the layout before per-identity queues (one table keyed
/// by identity and id) into queues, `MIGRATE_PER_COMMIT` per transaction, each moved message
/// removed from the old table in the same transaction: a migration cut short (a crash) goes on
/// where it stopped at the next open. The old table is deleted once empty.
fn migrate_legacy(db: &Database) -> Result<()> {
    let present = match db
        .begin_read()
        .map_err(store_error)?
        .open_table(LEGACY_MESSAGES)
    {
        Ok(legacy) => legacy.len().map_err(store_error)?,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(store_error(e)),
    };
    tracing::info!("durable store: moving {present} messages into per-identity queues");
    loop {
        let txn = db.begin_write().map_err(store_error)?;
        let moved = {
            let mut legacy = txn.open_table(LEGACY_MESSAGES).map_err(store_error)?;
            let mut queues = txn.open_table(QUEUES).map_err(store_error)?;
            let mut chunk = Vec::new();
            for entry in legacy.iter().map_err(store_error)?.take(MIGRATE_PER_COMMIT) {
                let (k, v) = entry.map_err(store_error)?;
                let (identity, id) = k.value();
                chunk.push((identity.to_owned(), id, v.value().to_vec()));
            }
            // Sorted by identity: one queue open at a time.
            let mut current: Option<(&str, Queue<'_>)> = None;
            for (identity, id, bytes) in &chunk {
                if current.as_ref().is_none_or(|(who, _)| who != identity) {
                    if queues
                        .get(identity.as_str())
                        .map_err(store_error)?
                        .is_none()
                    {
                        queues.insert(identity.as_str(), 0).map_err(store_error)?;
                    }
                    let queue = txn
                        .open_table(queue_table(&queue_name(identity)))
                        .map_err(store_error)?;
                    current = Some((identity, queue));
                }
                if let Some((_, queue)) = current.as_mut() {
                    queue.insert(*id, bytes.as_slice()).map_err(store_error)?;
                }
                legacy
                    .remove((identity.as_str(), *id))
                    .map_err(store_error)?;
            }
            chunk.len()
        };
        if moved == 0 {
            txn.delete_table(LEGACY_MESSAGES).map_err(store_error)?;
        }
        txn.commit().map_err(store_error)?;
        if moved == 0 {
            tracing::info!("durable store: moved into per-identity queues");
            return Ok(());
        }
    }
}

/// One write transaction's view for the operations it applies.
struct Writing<'a, 't> {
    txn: &'t redb::WriteTransaction,
    queues: &'a mut redb::Table<'t, &'static str, u64>,
    /// Locked per operation, not for the transaction: a transaction that waits for more
    /// appends (`DEFER`) must not hold `Stats` and the delivery runs' `pending_of` meanwhile.
    sizes: &'a Mutex<Sizes>,
    /// Per identity, the acknowledged messages still in its queue.
    acked_left: &'a mut Sizes,
    counters: &'a DurableCounters,
    limits: &'a DurableLimits,
    /// Queues opened in this transaction, with their acknowledged-up-to id (opening one is a
    /// lookup and its close a write of the table's root: once per transaction, not per
    /// operation).
    open: HashMap<String, (u64, Queue<'t>)>,
    /// The messages this transaction's acknowledgements cover.
    tally: &'a mut AckTally,
}

/// Messages acknowledged in one transaction.
#[derive(Default)]
struct AckTally {
    delivered: u64,
    redelivered: u64,
}

impl AckTally {
    /// Counts acknowledged messages in the store's counters (read by `Stats`) at once, and
    /// here, to take back or to record once the transaction ends.
    fn count(&mut self, counters: &DurableCounters, delivered: u64, redelivered: u64) {
        self.delivered += delivered;
        self.redelivered += redelivered;
        counters.delivered.fetch_add(delivered, Ordering::Relaxed);
        counters
            .redelivered
            .fetch_add(redelivered, Ordering::Relaxed);
    }

    /// Takes them back: their transaction failed.
    fn uncount(&self, counters: &DurableCounters) {
        counters
            .delivered
            .fetch_sub(self.delivered, Ordering::Relaxed);
        counters
            .redelivered
            .fetch_sub(self.redelivered, Ordering::Relaxed);
    }

    /// Counts them in the metrics (monotonic: only once committed).
    fn record(&self) {
        if self.delivered > 0 {
            metrics::counter!(crate::metrics::names::DURABLE_DELIVERED).increment(self.delivered);
        }
        if self.redelivered > 0 {
            metrics::counter!(crate::metrics::names::DURABLE_REDELIVERED)
                .increment(self.redelivered);
        }
    }
}

type Queue<'t> = redb::Table<'t, u64, &'static [u8]>;

impl<'t> Writing<'_, 't> {
    /// `identity`'s acknowledged-up-to id, if it has a queue.
    fn acked(&self, identity: &str) -> Result<Option<u64>> {
        if let Some((acked, _)) = self.open.get(identity) {
            return Ok(Some(*acked));
        }
        Ok(self
            .queues
            .get(identity)
            .map_err(store_error)?
            .map(|v| v.value()))
    }

    /// `identity`'s queue, which has an entry in `queues`.
    fn queue(&mut self, identity: &str) -> Result<&mut Queue<'t>> {
        if !self.open.contains_key(identity) {
            let acked = self.acked(identity)?.unwrap_or(0);
            let queue = self
                .txn
                .open_table(queue_table(&queue_name(identity)))
                .map_err(store_error)?;
            self.open.insert(identity.to_owned(), (acked, queue));
        }
        Ok(&mut self.open.get_mut(identity).expect("opened above").1)
    }

    /// Stores a message as `id` (when the bounds let it in).
    fn append(&mut self, identity: &str, bytes: &[u8], id: u64) -> Result<u64> {
        let size = bytes.len() as u64;
        let acked = match self.acked(identity)? {
            Some(acked) => acked,
            None => {
                self.queues.insert(identity, 0).map_err(store_error)?;
                0
            }
        };
        self.queue(identity)?;
        let (counters, limits) = (self.counters, self.limits);
        let queue = &mut self.open.get_mut(identity).expect("opened above").1;
        let mut sizes = self.sizes.locked();
        if let Err(e) = admit(queue, acked, &mut sizes, counters, limits, identity, size) {
            drop(sizes);
            self.settle(identity)?;
            return Err(e);
        }
        queue.insert(id, bytes).map_err(store_error)?;
        sizes.add(identity, size);
        drop(sizes);
        self.compact_for_room()?;
        Ok(id)
    }

    /// Whether the store holds more than its total bytes bound, pending and acknowledged
    /// messages together.
    fn over_total(&self) -> bool {
        self.sizes.locked().total.bytes + self.acked_left.total.bytes > self.limits.total_bytes
    }

    /// While the store holds more than its total bytes bound, removes acknowledged messages,
    /// from the queues holding the most of them first (whether or not their devices are here to
    /// settle them), until it is back under the bound or `COMPACT_PER_COMMIT` are removed: a
    /// message admitted for one identity makes room by compacting others' leftovers, however
    /// few each queue holds.
    fn compact_for_room(&mut self) -> Result<()> {
        if !self.over_total() {
            return Ok(());
        }
        // Usually the queue with the most leftovers makes all the room needed: no list of
        // every queue for that.
        let largest = self.queues_with_leftovers().max_by_key(|(_, bytes)| *bytes);
        let Some((identity, _)) = largest.map(|(i, b)| (i.to_owned(), b)) else {
            return Ok(());
        };
        let mut budget =
            COMPACT_PER_COMMIT - self.compact_within(&identity, COMPACT_PER_COMMIT, true)?;
        if budget == 0 || !self.over_total() {
            return Ok(());
        }
        let mut queues: Vec<(String, u64)> = self
            .queues_with_leftovers()
            .map(|(identity, bytes)| (identity.to_owned(), bytes))
            .collect();
        queues.sort_unstable_by_key(|q| std::cmp::Reverse(q.1));
        for (identity, _) in queues {
            if budget == 0 || !self.over_total() {
                break;
            }
            budget -= self.compact_within(&identity, budget, true)?;
        }
        Ok(())
    }

    /// The identities whose queues hold acknowledged messages, with those messages' bytes.
    fn queues_with_leftovers(&self) -> impl Iterator<Item = (&str, u64)> {
        self.acked_left
            .by_identity
            .iter()
            .filter(|(_, left)| left.messages > 0)
            .map(|(identity, left)| (identity.as_str(), left.bytes))
    }

    /// Removes the pending messages `ids`; how many were pending.
    fn remove(&mut self, identity: &str, ids: &[u64]) -> Result<u64> {
        let Some(acked) = self.acked(identity)? else {
            return Ok(0);
        };
        let mut removed = 0;
        for &id in ids.iter().filter(|&&id| id > acked) {
            let bytes = self
                .queue(identity)?
                .remove(id)
                .map_err(store_error)?
                .map(|v| v.value().len() as u64);
            if let Some(bytes) = bytes {
                self.sizes.locked().sub(identity, bytes);
                removed += 1;
            }
        }
        if removed > 0 {
            self.settle(identity)?;
        }
        Ok(removed)
    }

    /// Everything of `identity` up to `upto` is acknowledged: one write of the mark, not one
    /// removal per message. How many pending messages that covered.
    fn ack(&mut self, identity: &str, upto: u64, redelivered: &[u64]) -> Result<u64> {
        let Some(acked) = self.acked(identity)?.filter(|&acked| acked < upto) else {
            return Ok(0);
        };
        let mut sizes = Vec::new();
        let mut covered_redelivered = 0;
        for entry in self
            .queue(identity)?
            .range(acked + 1..=upto)
            .map_err(store_error)?
        {
            let (k, v) = entry.map_err(store_error)?;
            sizes.push(v.value().len() as u64);
            if redelivered.binary_search(&k.value()).is_ok() {
                covered_redelivered += 1;
            }
        }
        {
            // Counted as delivered under the lock that takes them out of the pending sizes:
            // `Stats` never shows a message neither pending nor delivered (a failed commit
            // recounts the sizes and takes these back).
            let mut pending = self.sizes.locked();
            for &bytes in &sizes {
                pending.sub(identity, bytes);
                self.acked_left.add(identity, bytes);
            }
            self.tally
                .count(self.counters, sizes.len() as u64, covered_redelivered);
        }
        self.queues.insert(identity, upto).map_err(store_error)?;
        if let Some((acked, _)) = self.open.get_mut(identity) {
            *acked = upto;
        }
        self.settle(identity)?;
        Ok(sizes.len() as u64)
    }

    /// Drops `identity`'s queue whole when nothing in it is pending any more (which deletes no
    /// keys one by one). A queue that stays non-empty has its acknowledged messages removed one
    /// by one, `COMPACT_PER_COMMIT` per transaction, while they exceed `MAX_ACKED_LEFT` or
    /// `MAX_ACKED_LEFT_BYTES`, or while the store holds more than its total bytes bound,
    /// pending and acknowledged together (appends then compact the queue with the most
    /// acknowledged messages, see `compact_for_room`). A queue being drained does not get there
    /// by itself (what it holds does not grow as it drains) and is dropped whole at its end.
    fn settle(&mut self, identity: &str) -> Result<()> {
        let Some(acked) = self.acked(identity)? else {
            return Ok(());
        };
        let pending = self
            .queue(identity)?
            .range(acked.saturating_add(1)..)
            .map_err(store_error)?
            .next()
            .is_some();
        if !pending {
            // Closed first: an open table cannot be deleted.
            self.open.remove(identity);
            self.txn
                .delete_table(queue_table(&queue_name(identity)))
                .map_err(store_error)?;
            self.queues.remove(identity).map_err(store_error)?;
            self.acked_left.forget(identity);
            return Ok(());
        }
        let left = self
            .acked_left
            .by_identity
            .get(identity)
            .copied()
            .unwrap_or_default();
        if left.messages > MAX_ACKED_LEFT
            || left.bytes > MAX_ACKED_LEFT_BYTES
            || (left.messages > 0 && self.over_total())
        {
            self.compact(identity)?;
        }
        Ok(())
    }

    /// Removes `identity`'s oldest acknowledged messages, `COMPACT_PER_COMMIT` at most.
    fn compact(&mut self, identity: &str) -> Result<()> {
        self.compact_within(identity, COMPACT_PER_COMMIT, false)
            .map(drop)
    }

    /// Removes `identity`'s oldest acknowledged messages, `limit` at most, and (`for_room`)
    /// only while the store is over its total bytes bound; how many it removed.
    fn compact_within(&mut self, identity: &str, limit: usize, for_room: bool) -> Result<usize> {
        let Some(acked) = self.acked(identity)? else {
            return Ok(0);
        };
        let mut held = self.sizes.locked().total.bytes + self.acked_left.total.bytes;
        let bound = self.limits.total_bytes;
        let mut doomed = Vec::new();
        for entry in self
            .queue(identity)?
            .range(..=acked)
            .map_err(store_error)?
            .take(limit)
        {
            if for_room && held <= bound {
                break;
            }
            let (id, v) = entry.map_err(store_error)?;
            let bytes = v.value().len() as u64;
            held = held.saturating_sub(bytes);
            doomed.push((id.value(), bytes));
        }
        let queue = self.queue(identity)?;
        for (id, _) in &doomed {
            queue.remove(*id).map_err(store_error)?;
        }
        let removed = doomed.len();
        for (_, bytes) in doomed {
            self.acked_left.sub(identity, bytes);
        }
        Ok(removed)
    }
}

/// Makes room for a message of `bytes` for `identity` under the bounds, or refuses it.
fn admit(
    queue: &mut Queue<'_>,
    acked: u64,
    sizes: &mut Sizes,
    counters: &DurableCounters,
    limits: &DurableLimits,
    identity: &str,
    bytes: u64,
) -> Result<()> {
    let fits = |sizes: &Sizes| {
        let mine = sizes.by_identity.get(identity).copied().unwrap_or_default();
        mine.messages < limits.per_identity_messages
            && mine.bytes + bytes <= limits.per_identity_bytes
            && sizes.total.messages < limits.total_messages
            && sizes.total.bytes + bytes <= limits.total_bytes
    };
    if fits(sizes) {
        return Ok(());
    }
    let full = |sizes: &Sizes| {
        let mine = sizes.by_identity.get(identity).copied().unwrap_or_default();
        Error::StoreFull(format!(
            "`{identity}` has {} pending messages ({} bytes); the store holds {} ({} bytes)",
            mine.messages, mine.bytes, sizes.total.messages, sizes.total.bytes,
        ))
    };
    if limits.overflow == Overflow::Refuse || bytes > limits.per_identity_bytes {
        return Err(full(sizes));
    }
    // Only this identity's messages may go: if all of them would not make room (the other
    // identities fill the store), refuse without dropping any.
    let fits_alone = {
        let mine = sizes.by_identity.get(identity).copied().unwrap_or_default();
        limits.per_identity_messages > 0
            && sizes.total.messages.saturating_sub(mine.messages) < limits.total_messages
            && sizes.total.bytes.saturating_sub(mine.bytes) + bytes <= limits.total_bytes
    };
    if !fits_alone {
        return Err(full(sizes));
    }
    // Drop this identity's oldest until it fits (other identities' messages are theirs).
    while !fits(sizes) {
        let oldest = queue
            .range(acked.saturating_add(1)..)
            .map_err(store_error)?
            .next()
            .transpose()
            .map_err(store_error)?
            .map(|(k, _)| k.value());
        let Some(id) = oldest else {
            return Err(full(sizes));
        };
        if let Some(v) = queue.remove(id).map_err(store_error)? {
            sizes.sub(identity, v.value().len() as u64);
            counters.overflowed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::names::DURABLE_OVERFLOWED).increment(1);
        }
    }
    Ok(())
}

/// Senders of durable messages in this process waiting for the writer's answer now ([`sent`]).
static WAITING: AtomicUsize = AtomicUsize::new(0);
/// How long a lone waiter polls for its answer before its task parks.
const LONE_WAIT: Duration = Duration::from_micros(400);

/// An operation's result once the writer answered it (see [`Store::submit`]).
async fn committed(rx: &mut oneshot::Receiver<Result<u64>>) -> Result<u64> {
    rx.await
        .unwrap_or_else(|_| Err(Error::Store("the store's writer stopped".into())))
}

/// [`committed`] for a sender of a durable message: a sender that waits alone (no other send
/// awaits its answer in the process) polls for the result, yielding to its runtime in between,
/// for up to [`LONE_WAIT`] before its task parks; one sender waiting for each send otherwise
/// pays a thread wake-up per message on top of the commit. With others waiting, they share
/// commits and nobody polls. (Acknowledgements and removals, which run on the connections'
/// threads, never poll.)
async fn sent(rx: &mut oneshot::Receiver<Result<u64>>) -> Result<u64> {
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            WAITING.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let lone = WAITING.fetch_add(1, Ordering::Relaxed) == 0;
    let _waiting = Waiting;
    if lone {
        let until = std::time::Instant::now() + LONE_WAIT;
        loop {
            match rx.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(Error::Store("the store's writer stopped".into()));
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= until || WAITING.load(Ordering::Relaxed) > 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    committed(rx).await
}

/// The server's durable delivery: the store, and one delivery run per bound identity.
pub(crate) struct Durable {
    pub(crate) store: Arc<Store>,
    registry: Weak<Registry>,
    /// Identities with a run going, and whether more arrived since it read the store.
    running: Mutex<HashMap<String, bool>>,
    /// Messages sent once and not acknowledged (for the redelivered mark and count).
    attempted: Arc<Mutex<HashSet<u64>>>,
    limits: DurableLimits,
    /// The frame limits of the server's connections (a message above them is refused).
    frames: crate::wire::Limits,
    /// Whether the sweeper of expired messages runs (started with the first delivery).
    sweeping: std::sync::atomic::AtomicBool,
    /// Whether the task that starts delivery after each commit runs
    /// ([`start_kicks`](Self::start_kicks)).
    kicking: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("store", &self.store)
            .finish()
    }
}

/// A message on its way to a device: its stored bytes (a slice of the read's buffer).
struct Outgoing {
    id: u64,
    redelivered: bool,
    /// Unix milliseconds.
    expires_ms: u64,
    raw: Bytes,
}

/// A page's messages to send, and the ids of those that expired: each to send notes whether
/// it went out before without an acknowledgement (it goes out marked redelivered). The marks
/// are read under `attempted`'s lock, every device's, and nothing else is done under it.
fn outgoing(page: &Page, attempted: &Mutex<HashSet<u64>>) -> (Vec<Outgoing>, Vec<u64>) {
    let now = now_ms();
    let (live, expired): (Vec<&RawMessage>, Vec<&RawMessage>) =
        page.messages.iter().partition(|m| m.expires_ms > now);
    let attempted = attempted.locked();
    let sends = live
        .into_iter()
        .map(|m| Outgoing {
            id: m.id,
            redelivered: attempted.contains(&m.id),
            expires_ms: m.expires_ms,
            raw: page.raw.slice(m.at.clone()),
        })
        .collect();
    (sends, expired.into_iter().map(|m| m.id).collect())
}

impl Outgoing {
    fn stored(&self) -> StoredRef<'_> {
        postcard::from_bytes(&self.raw).expect("decoded when read")
    }

    /// The keys a delivery adds to the stored metadata, in this order: the id (`id`, its
    /// digits), the id space, the redelivered mark when it went out before, and `prev` (on
    /// `quicx/1`). The first `n` of the array.
    fn delivery_keys<'k>(
        &self,
        id: &'k str,
        space: &'k str,
        prev: Option<&'k str>,
    ) -> ([(&'static str, &'k str); 4], usize) {
        let mut keys = [(MSG_ID_KEY, id), (MSG_SPACE_KEY, space), ("", ""), ("", "")];
        let mut n = 2;
        if self.redelivered {
            keys[n] = (MSG_REDELIVERED_KEY, "1");
            n += 1;
        }
        if let Some(prev) = prev {
            keys[n] = (MSG_PREV_KEY, prev);
            n += 1;
        }
        (keys, n)
    }

    /// The message's metadata as it goes out ([`delivery_keys`](Self::delivery_keys) set).
    fn metadata(&self, space: &str, prev: Option<u64>) -> Metadata {
        let (id, prev) = (self.id.to_string(), prev.map(|p| p.to_string()));
        let (keys, n) = self.delivery_keys(&id, space, prev.as_deref());
        self.stored().metadata_with(&keys[..n])
    }

    /// Appends the message as a durable record (v2) to `buf`: the stored metadata with the
    /// delivery keys after it, encoded straight from the stored bytes. `id` is a scratch
    /// string, reused from record to record.
    fn encode_record(
        &self,
        buf: &mut Vec<u8>,
        space: &str,
        id: &mut String,
        limits: &crate::wire::Limits,
    ) -> Result<()> {
        use std::fmt::Write;
        let stored = self.stored();
        id.clear();
        let _ = write!(id, "{}", self.id);
        let (keys, n) = self.delivery_keys(id, space, None);
        let extra = &keys[..n];
        // The delivery keys are the server's: stored metadata that names one (a sender's) is
        // replaced, as `Metadata::insert` would, on the slower path.
        let owned;
        let metadata = if stored
            .metadata
            .iter()
            .any(|(k, _)| extra.iter().any(|(e, _)| *e == k))
        {
            owned = stored.metadata_with(extra);
            crate::wire::MetadataWith {
                base: &owned,
                extra: &[],
            }
        } else {
            crate::wire::MetadataWith {
                base: &stored.metadata,
                extra,
            }
        };
        let header = crate::wire::PushHeaderRef {
            service_path: stored.service_path,
            service_method: stored.service_method,
            metadata: &metadata,
        };
        crate::wire::encode_record(buf, &header, stored.payload, limits)?;
        Ok(())
    }
}

/// Records the acknowledgements of one delivery run in the store: one write of the
/// acknowledged-up-to mark at a time, the acknowledgements that came meanwhile gathered into
/// the next, so that a fast drain makes a few commits rather than one per acknowledgement
/// (each, by default, waits for an fsync). A run sends in id order from the oldest pending
/// message and its acknowledgements cover a prefix of what it sent, so the highest id
/// acknowledged covers every message before it.
struct AckWriter {
    store: Arc<Store>,
    identity: String,
    /// The highest id acknowledged and not yet recorded (0: none).
    gathered: u64,
    /// Of the acknowledged ids not yet recorded, those sent more than once.
    gathered_redelivered: Vec<u64>,
    /// Those of the running write: gathered again if it fails (the next write covers its
    /// range too, the mark being cumulative).
    writing_redelivered: Vec<u64>,
    running: Option<tokio::task::JoinHandle<Result<u64>>>,
    failed: bool,
}

impl AckWriter {
    fn new(store: Arc<Store>, identity: &str) -> Self {
        Self {
            store,
            identity: identity.to_owned(),
            gathered: 0,
            gathered_redelivered: Vec::new(),
            writing_redelivered: Vec::new(),
            running: None,
            failed: false,
        }
    }

    /// Records that everything the run sent up to `upto` is acknowledged (of it, the ids in
    /// `redelivered` were sent more than once): now if no write runs, else with the next one.
    fn add(&mut self, (upto, redelivered): (u64, Vec<u64>)) {
        self.gathered = self.gathered.max(upto);
        self.gathered_redelivered.extend(redelivered);
        if let Some(result) = self
            .running
            .as_mut()
            .filter(|h| h.is_finished())
            .and_then(futures_util::FutureExt::now_or_never)
        {
            self.done(result.map_err(store_error).and_then(|r| r));
        }
        self.start();
    }

    fn start(&mut self) {
        if self.running.is_none() && self.gathered > 0 {
            let (store, who) = (self.store.clone(), self.identity.clone());
            let upto = std::mem::take(&mut self.gathered);
            let mut redelivered = std::mem::take(&mut self.gathered_redelivered);
            // In id order for the writer's lookups (usually empty, so nothing to sort).
            redelivered.sort_unstable();
            self.writing_redelivered.clone_from(&redelivered);
            self.running = Some(tokio::spawn(async move {
                store.ack(&who, upto, redelivered).await
            }));
        }
    }

    fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// The running write's end (pending forever when none runs; cancel safe).
    async fn running(&mut self) -> Result<u64> {
        match &mut self.running {
            Some(handle) => handle.await.map_err(store_error)?,
            None => std::future::pending().await,
        }
    }

    /// The running write ended with `result`: start the next.
    fn done(&mut self, result: Result<u64>) {
        self.running = None;
        let written = std::mem::take(&mut self.writing_redelivered);
        if let Err(e) = result {
            self.gathered_redelivered.extend(written);
            tracing::error!(
                "recording the acknowledgements of {} failed: {e}",
                self.identity
            );
            self.failed = true;
        }
        self.start();
    }

    /// Waits for every write; whether they all committed.
    async fn finish(mut self) -> bool {
        while self.is_running() {
            let result = self.running().await;
            self.done(result);
        }
        !self.failed
    }
}

/// The records of a durable stream sent and not yet acknowledged.
struct Flight {
    /// (id, whether redelivered), in id order.
    unacked: VecDeque<(u64, bool)>,
    /// Since when the oldest of them waits (or the last acknowledgement came).
    since: tokio::time::Instant,
    /// The highest id written to the stream.
    last_sent: u64,
    /// The highest id acknowledged.
    acked: u64,
}

/// How a delivery run ended.
#[derive(Debug, PartialEq, Eq)]
enum RunEnd {
    /// Nothing left to send.
    Done,
    /// The device is gone, or did not acknowledge: try again on its next hello (or soon).
    Stopped,
}

/// The next records of a durable stream, read and encoded on a blocking thread.
struct Encoded {
    /// The records, back to back, as they go on the stream.
    buf: Vec<u8>,
    /// The messages in `buf`, in id order: id and whether it went out before.
    sent: Vec<(u64, bool)>,
    /// Where this read started (after this id).
    from: u64,
    /// The highest id read (where the next read starts).
    last: u64,
    /// When the first of the records expires (Unix ms): a batch read ahead and still
    /// unwritten then is read again, so that an expired message never goes out.
    expires_ms: u64,
    /// Expired and corrupt messages read past, to be removed.
    expired: Vec<u64>,
    corrupt: Vec<u64>,
}

/// Reads the next messages of `identity` after `after` and encodes them as durable records
/// (blocking: a store read). `None` once the store has nothing more. Reads on past pages that
/// hold only expired or corrupt messages, so a batch is never empty.
fn read_records(
    store: &Store,
    attempted: &Mutex<HashSet<u64>>,
    identity: &str,
    space: &str,
    from: u64,
    limits: &crate::wire::Limits,
) -> Result<Option<Encoded>> {
    let (mut expired, mut corrupt) = (Vec::new(), Vec::new());
    let mut after = from;
    loop {
        let mut page = store.read_after(identity, after, STREAM_BATCH)?;
        let Some(last) = page.last else {
            // Nothing more; what was read past is still removed.
            return Ok(
                (!expired.is_empty() || !corrupt.is_empty()).then(|| Encoded {
                    buf: Vec::new(),
                    sent: Vec::new(),
                    from,
                    last: after,
                    expires_ms: u64::MAX,
                    expired,
                    corrupt,
                }),
            );
        };
        after = last;
        corrupt.append(&mut page.corrupt);
        let (sends, gone) = outgoing(&page, attempted);
        expired.extend(gone);
        // A record adds the header's lengths and the delivery keys to the stored bytes.
        let mut buf = Vec::with_capacity(page.raw.len() + RECORD_EXTRA * sends.len());
        let mut id = String::new();
        for m in &sends {
            m.encode_record(&mut buf, space, &mut id, limits)?;
        }
        let sent: Vec<(u64, bool)> = sends.iter().map(|m| (m.id, m.redelivered)).collect();
        let expires_ms = sends.iter().map(|m| m.expires_ms).min().unwrap_or(u64::MAX);
        if !sent.is_empty() {
            return Ok(Some(Encoded {
                buf,
                sent,
                from,
                last,
                expires_ms,
                expired,
                corrupt,
            }));
        }
    }
}

impl Durable {
    pub(crate) fn open(
        path: &Path,
        limits: DurableLimits,
        frames: crate::wire::Limits,
        registry: &Arc<Registry>,
    ) -> Result<Arc<Self>> {
        let store = Arc::new(Store::open(path, limits)?);
        let durable = Arc::new(Self {
            store,
            registry: Arc::downgrade(registry),
            running: Mutex::default(),
            attempted: Arc::default(),
            limits,
            frames,
            sweeping: std::sync::atomic::AtomicBool::new(false),
            kicking: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(durable)
    }

    /// Stores a message for `identity` (returns once it is committed, or under
    /// `Fsync::Interval` once the store took it; see [`Fsync`]); the writer's commit starts its
    /// delivery if the identity is bound.
    pub(crate) async fn send(
        self: &Arc<Self>,
        identity: &str,
        service_path: &str,
        service_method: &str,
        metadata: Metadata,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<u64> {
        // What could never be delivered is refused now, not retried until it expires: the
        // header as it goes out, with the largest values of the keys the server adds.
        let mut probe = metadata.clone();
        for key in [MSG_ID_KEY, MSG_PREV_KEY] {
            probe.insert(key, u64::MAX.to_string());
        }
        probe.insert(MSG_REDELIVERED_KEY, "1");
        // Every space has the same length.
        probe.insert(MSG_SPACE_KEY, "0".repeat(MSG_SPACE_LEN));
        let header = crate::wire::PushHeaderRef {
            service_path,
            service_method,
            metadata: &probe,
        };
        crate::wire::check_payload(payload.len(), &self.frames)?;
        crate::wire::encode_record(&mut Vec::new(), &header, &[], &self.frames)?;
        let message = Stored {
            service_path: service_path.to_owned(),
            service_method: service_method.to_owned(),
            metadata,
            payload: payload.to_vec(),
            expires_ms: now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        };
        // Delivery starts from the writer's commit (`start_kicks`), whether or not this future
        // is still there to see it.
        sent(&mut self.store.submit_append(identity, &message)?).await
    }

    /// Starts, on `io` (the server's first I/O thread, or for `Placement::CallerRuntime` the
    /// runtime that binds the server; once, when the server binds), the task that starts
    /// delivery for the identities each commit stored messages for: a connected device gets
    /// them at once, not at its next hello. Until then commits only note them (a server that
    /// does not listen has no device to deliver to). The task ends when the store closes or
    /// the server is gone.
    pub(crate) fn start_kicks(self: &Arc<Self>, io: &crate::io::IoRuntime) {
        if self.kicking.swap(true, Ordering::Relaxed) {
            return;
        }
        let (durable, kicks) = (Arc::downgrade(self), self.store.kicks.clone());
        io.spawn(async move {
            loop {
                kicks.ready.notified().await;
                if kicks.closed.load(Ordering::Relaxed) {
                    return;
                }
                let due = std::mem::take(&mut *kicks.due.locked());
                let Some(durable) = durable.upgrade() else {
                    return;
                };
                for identity in &due {
                    durable.kick(identity);
                }
            }
        });
    }

    /// The id space of `identity`'s messages from this store ([`msg_space`]).
    fn space(&self, identity: &str) -> String {
        msg_space(&self.store.space_base, identity)
    }

    /// Starts a delivery run for `identity` (if it is bound), or tells the one going that more
    /// arrived.
    pub(crate) fn kick(self: &Arc<Self>, identity: &str) {
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        if self.store.pending_of(identity) == 0 {
            return;
        }
        let mut running = self.running.locked();
        if let Some(more) = running.get_mut(identity) {
            *more = true;
            return;
        }
        // Offline: its next hello kicks (a run now would only find it gone).
        let Some(conn) = self.connection(identity) else {
            return;
        };
        running.insert(identity.to_owned(), false);
        // Where the device's connection is driven: its stream's writes need no hand-over.
        conn.io().spawn(self.clone().run(identity.to_owned()));
    }

    async fn run(self: Arc<Self>, identity: String) {
        loop {
            let used = self.connection(&identity).map(|c| c.id());
            let end = self.deliver(&identity).await;
            {
                let mut running = self.running.locked();
                let more = running.get(&identity).copied().unwrap_or(false);
                if end == RunEnd::Done && more {
                    running.insert(identity.clone(), false);
                    continue;
                }
                // A run that stopped because its connection was taken over goes on at once on
                // the new one (not a second later), on the thread that drives it.
                let moved = end == RunEnd::Stopped
                    && self
                        .connection(&identity)
                        .is_some_and(|c| Some(c.id()) != used);
                running.remove(&identity);
                if moved {
                    drop(running);
                    self.kick(&identity);
                    return;
                }
            }
            if end == RunEnd::Stopped {
                // Still bound (the device refused or was slow)? Try again in a second.
                let durable = Arc::downgrade(&self);
                let identity = identity.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Some(d) = durable.upgrade() {
                        if d.connection(&identity).is_some() {
                            d.kick(&identity);
                        }
                    }
                });
            }
            return;
        }
    }

    /// Whether `identity` still finds `conn` (a run for it goes on).
    fn still_bound(&self, identity: &str, conn: &Connection) -> bool {
        self.connection(identity)
            .is_some_and(|c| c.id() == conn.id())
    }

    fn connection(&self, identity: &str) -> Option<Connection> {
        self.registry
            .upgrade()?
            .by_client_id(identity)
            .filter(|c| !c.is_closed())
    }

    /// Sends everything pending for `identity`, in id order, on a durable stream (`quicx/2`)
    /// or `WINDOW` pushes with receipt at a time (`quicx/1`), removing each message its
    /// acknowledgement came back for.
    async fn deliver(&self, identity: &str) -> RunEnd {
        let Some(conn) = self.connection(identity) else {
            return RunEnd::Stopped;
        };
        if conn.protocol_version() >= 2 {
            return self.deliver_stream(identity, &conn).await;
        }
        let (mut after, mut prev) = (0u64, 0u64);
        let mut acks = AckWriter::new(self.store.clone(), identity);
        loop {
            // The identity moved to another connection: the next run sends the rest there.
            if !self.still_bound(identity, &conn) {
                return if acks.finish().await {
                    RunEnd::Done
                } else {
                    RunEnd::Stopped
                };
            }
            let sends = match self.next_sends(identity, &mut after, BATCH).await {
                Ok(Some(sends)) => sends,
                Ok(None) => {
                    return if acks.finish().await {
                        RunEnd::Done
                    } else {
                        RunEnd::Stopped
                    };
                }
                Err(e) => {
                    tracing::error!("reading durable messages of {identity} failed: {e}");
                    acks.finish().await;
                    return RunEnd::Stopped;
                }
            };
            let space = self.space(identity);
            let sends: Vec<_> = sends
                .into_iter()
                .map(|m| {
                    let metadata = m.metadata(&space, Some(prev));
                    prev = m.id;
                    (m, metadata)
                })
                .collect();
            // A push may wait at the client for the ones before it (an application acknowledging
            // by hand takes them one at a time): its own bound covers the window, and the run's
            // bound is the acknowledgement timeout from one receipt to the next.
            let timeout = self.limits.ack_timeout;
            let whole_window = timeout.saturating_mul(WINDOW as u32 + 1);
            let mut results = stream::iter(sends)
                .map(|(m, metadata)| {
                    let conn = conn.clone();
                    self.attempted([m.id]);
                    async move {
                        let stored = m.stored();
                        let r = conn
                            .push_with_receipt_within(
                                stored.service_path,
                                stored.service_method,
                                metadata,
                                stored.payload,
                                whole_window,
                            )
                            .await;
                        ((m.id, m.redelivered), r)
                    }
                })
                .buffered(WINDOW);
            let mut acked = Vec::new();
            let mut failed = None;
            // In id order; the first failure ends the run (the messages after it would only
            // wait at the client for the one that failed): the rest are cancelled.
            loop {
                let (sent, r) = match tokio::time::timeout(timeout, results.next()).await {
                    Ok(Some(next)) => next,
                    Ok(None) => break,
                    Err(_) => {
                        failed = Some(Error::DeadlineExceeded { remote: false });
                        break;
                    }
                };
                match r {
                    Ok(()) => acked.push(sent),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            drop(results);
            // Recorded while the next batch goes out (the next read starts after the last id).
            acks.add(self.acked(&acked));
            if let Some(e) = failed {
                tracing::debug!("durable delivery to {identity} stopped: {e}");
                acks.finish().await;
                return RunEnd::Stopped;
            }
        }
    }

    /// The next messages to send to `identity` after id `after` (moved past what was read),
    /// at most `limit` per store read: `None` once the store has nothing more. Expired
    /// messages are removed on the way, so a batch is never empty.
    async fn next_sends(
        &self,
        identity: &str,
        after: &mut u64,
        limit: usize,
    ) -> Result<Option<Vec<Outgoing>>> {
        loop {
            let mut page = self.store.read_after_async(identity, *after, limit).await?;
            let Some(last) = page.last else {
                return Ok(None);
            };
            *after = last;
            self.remove_corrupt(identity, std::mem::take(&mut page.corrupt))
                .await;
            let sends = self.prepare(identity, page).await;
            if !sends.is_empty() {
                return Ok(Some(sends));
            }
        }
    }

    /// Turns messages read from the store into messages to send: drops (and removes) the
    /// expired ones and notes which of the rest went out before without an acknowledgement
    /// (they go out marked redelivered).
    async fn prepare(&self, identity: &str, page: Page) -> Vec<Outgoing> {
        let (sends, expired) = outgoing(&page, &self.attempted);
        self.remove_expired(identity, expired).await;
        sends
    }

    /// Remembers that `ids` went out (once they really did), for the redelivered mark.
    fn attempted(&self, ids: impl IntoIterator<Item = u64>) {
        let mut attempted = self.attempted.locked();
        for id in ids {
            if attempted.len() >= MAX_ATTEMPTED {
                // Ids of messages that expired or overflowed after an attempt: only the
                // redelivered mark is lost by forgetting them.
                attempted.clear();
            }
            attempted.insert(id);
        }
    }

    /// Forgets the attempts of acknowledged messages (id, whether redelivered, in id order);
    /// the highest id (0 for none) and the redelivered ids, for the [`AckWriter`] (which
    /// counts them once the store recorded them).
    fn acked(&self, acked: &[(u64, bool)]) -> (u64, Vec<u64>) {
        let mut attempted = self.attempted.locked();
        for (id, _) in acked {
            attempted.remove(id);
        }
        let redelivered = acked
            .iter()
            .filter(|(_, r)| *r)
            .map(|(id, _)| *id)
            .collect();
        (acked.last().map_or(0, |(id, _)| *id), redelivered)
    }

    /// The outcome of a [`read_records`] job: removes what it read past (expired messages are
    /// counted, corrupt ones logged), then the records, `None` when there were none.
    async fn records_read(
        &self,
        identity: &str,
        job: tokio::task::JoinHandle<Result<Option<Encoded>>>,
    ) -> Result<Option<Encoded>> {
        let Some(mut read) = job.await.map_err(store_error)?? else {
            return Ok(None);
        };
        self.remove_corrupt(identity, std::mem::take(&mut read.corrupt))
            .await;
        self.remove_expired(identity, std::mem::take(&mut read.expired))
            .await;
        Ok((!read.sent.is_empty()).then_some(read))
    }

    /// Removes messages whose stored bytes do not decode: never deliverable, they would hold
    /// the queue forever.
    async fn remove_corrupt(&self, identity: &str, corrupt: Vec<u64>) {
        if !corrupt.is_empty() {
            let n = self.store.remove(identity, corrupt).await.unwrap_or(0);
            tracing::error!("removed {n} corrupt durable messages of {identity}");
        }
    }

    /// Removes expired messages read on the way, and counts them.
    async fn remove_expired(&self, identity: &str, expired: Vec<u64>) {
        if expired.is_empty() {
            return;
        }
        {
            let mut attempted = self.attempted.locked();
            for id in &expired {
                attempted.remove(id);
            }
        }
        let n = self.store.remove(identity, expired).await.unwrap_or(0);
        self.store.counters.expired.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(crate::metrics::names::DURABLE_EXPIRED).increment(n);
    }

    /// A delivery run on one durable stream (`quicx/2`, `docs/PROTOCOL.md` §4): records go out
    /// `STREAM_BATCH` per write while fewer than `STREAM_WINDOW` wait for their acknowledgement;
    /// each cumulative acknowledgement is recorded in the store (group-committed with whatever
    /// else the store's writer has queued). Ends `Done` once the store had nothing more and
    /// everything sent was acknowledged; `Stopped` when the device refuses a message, the
    /// stream or connection fails, or no acknowledgement comes for `ack_timeout`.
    async fn deliver_stream(&self, identity: &str, conn: &Connection) -> RunEnd {
        // Records are read and encoded on a blocking thread, the next batch while the one before
        // is written: the connection's I/O thread only writes them.
        let limits = conn.limits();
        let space = self.space(identity);
        let read = |after: u64| {
            let (store, attempted) = (self.store.clone(), self.attempted.clone());
            let (identity, space) = (identity.to_owned(), space.clone());
            tokio::task::spawn_blocking(move || {
                read_records(&store, &attempted, &identity, &space, after, &limits)
            })
        };
        // Something to send first: a stream is never opened for nothing.
        let first = match self.records_read(identity, read(0)).await {
            Ok(Some(first)) => first,
            Ok(None) => return RunEnd::Done,
            Err(e) => {
                tracing::error!("reading durable messages of {identity} failed: {e}");
                return RunEnd::Stopped;
            }
        };
        let timeout = self.limits.ack_timeout;
        let opened = crate::io::within(timeout, conn.open_durable_stream()).await;
        let (mut send, mut recv) = match opened {
            Ok(Ok(streams)) => streams,
            Ok(Err(e)) => {
                tracing::debug!("durable delivery to {identity} stopped: {e}");
                return RunEnd::Stopped;
            }
            Err(_) => {
                tracing::debug!("{identity} granted no stream within {timeout:?}");
                return RunEnd::Stopped;
            }
        };
        let window = tokio::sync::Semaphore::new(STREAM_WINDOW);
        let flight = Mutex::new(Flight {
            unacked: VecDeque::new(),
            since: tokio::time::Instant::now(),
            last_sent: 0,
            acked: 0,
        });
        let writer = async {
            let mut next = Some(first);
            let mut ahead = None;
            loop {
                let permits = window
                    .acquire_many(STREAM_BATCH as u32)
                    .await
                    .map_err(store_error)?;
                let batch = match next.take() {
                    Some(batch) => batch,
                    // The identity moved to another connection (a re-bind, a takeover): what
                    // went out is acknowledged or not, and the next run sends the rest there.
                    None if !self.still_bound(identity, conn) => {
                        send.finish()?;
                        return Ok(());
                    }
                    None => {
                        let job = ahead
                            .take()
                            .expect("a read is ahead of every batch but the first");
                        match self.records_read(identity, job).await? {
                            Some(batch) => batch,
                            None => {
                                send.finish()?;
                                return Ok::<_, Error>(());
                            }
                        }
                    }
                };
                // Read ahead of its window: if a message expired since, read it again (the
                // expired one is then removed, never sent).
                let batch = if batch.expires_ms <= now_ms() {
                    if let Some(job) = ahead.take() {
                        job.abort();
                    }
                    match self.records_read(identity, read(batch.from)).await? {
                        Some(batch) => batch,
                        None => {
                            send.finish()?;
                            return Ok(());
                        }
                    }
                } else {
                    batch
                };
                ahead = Some(read(batch.last));
                permits.forget();
                window.add_permits(STREAM_BATCH - batch.sent.len());
                {
                    let mut flight = flight.locked();
                    if flight.unacked.is_empty() {
                        flight.since = tokio::time::Instant::now();
                    }
                    flight.last_sent = batch.sent.last().map_or(flight.last_sent, |m| m.0);
                    flight.unacked.extend(batch.sent.iter().copied());
                }
                send.write_chunk(batch.buf.into()).await?;
                // Those acknowledged while the write waited for flow control are gone already:
                // only the others can come again.
                let acked = flight.locked().acked;
                self.attempted(batch.sent.iter().map(|m| m.0).filter(|id| *id > acked));
            }
        };
        let mut writer = Box::pin(writer);
        let mut writer_done = false;
        let (mut partial, mut have, mut highest) = ([0u8; 8], 0usize, 0u64);
        let mut acks = AckWriter::new(self.store.clone(), identity);
        let end = loop {
            let waiting_since = {
                let flight = flight.locked();
                (!flight.unacked.is_empty()).then_some(flight.since)
            };
            // With nothing due now, the writer may send (and then wait on flow control or the
            // window) inside this very select: look again soon, so that the timer and the
            // probe below start for what it sent.
            let ack_deadline = waiting_since.map_or_else(
                || tokio::time::Instant::now() + timeout.min(RECHECK),
                |t| t + timeout,
            );
            // While acknowledgements are due, a silent device is noticed as a waiting call's
            // peer would be (the liveness probe closes the connection).
            let _probing = waiting_since.and_then(|_| conn.waiting());
            tokio::select! {
                r = &mut writer, if !writer_done => {
                    writer_done = true;
                    if let Err(e) = r {
                        tracing::debug!("durable delivery to {identity} stopped: {e}");
                        break RunEnd::Stopped;
                    }
                    if flight.locked().unacked.is_empty() {
                        break RunEnd::Done;
                    }
                }
                chunk = recv.read_chunk(64 * 1024, true) => {
                    let chunk = match chunk {
                        Ok(Some(chunk)) => chunk.bytes,
                        Ok(None) | Err(_) => {
                            tracing::debug!("durable stream to {identity} ended before its acks");
                            break RunEnd::Stopped;
                        }
                    };
                    // Cumulative acknowledgements, 8 bytes each: the highest counts, none may
                    // name an id not sent yet, stale ones are ignored.
                    let last_sent = flight.locked().last_sent;
                    let mut bogus = None;
                    for &byte in chunk.iter() {
                        partial[have] = byte;
                        have += 1;
                        if have == 8 {
                            let ack = u64::from_be_bytes(partial);
                            have = 0;
                            if ack > last_sent {
                                bogus = Some(ack);
                                break;
                            }
                            highest = highest.max(ack);
                        }
                    }
                    if let Some(ack) = bogus {
                        tracing::debug!("{identity} acknowledged {ack}, which was not sent");
                        let _ = recv.stop(crate::wire::StreamCode::MALFORMED_FRAME.into());
                        break RunEnd::Stopped;
                    }
                    let acked: Vec<(u64, bool)> = {
                        let mut flight = flight.locked();
                        let n = flight.unacked.partition_point(|(id, _)| *id <= highest);
                        if n == 0 {
                            // Nothing new: the acknowledgement timer goes on.
                            continue;
                        }
                        flight.since = tokio::time::Instant::now();
                        flight.acked = highest;
                        flight.unacked.drain(..n).collect()
                    };
                    window.add_permits(acked.len());
                    acks.add(self.acked(&acked));
                    if writer_done && flight.locked().unacked.is_empty() {
                        break RunEnd::Done;
                    }
                }
                r = acks.running(), if acks.is_running() => acks.done(r),
                () = tokio::time::sleep_until(ack_deadline) => {
                    if waiting_since.is_some() {
                        tracing::debug!("{identity} did not acknowledge within {timeout:?}");
                        break RunEnd::Stopped;
                    }
                }
            }
        };
        drop(writer);
        if end == RunEnd::Stopped {
            let _ = send.reset(crate::wire::StreamCode::CANCELLED.into());
            let _ = recv.stop(crate::wire::StreamCode::CANCELLED.into());
        }
        if !acks.finish().await {
            return RunEnd::Stopped;
        }
        end
    }

    /// The messages pending for `identity`, oldest first.
    pub(crate) async fn pending(self: &Arc<Self>, identity: &str) -> Result<Vec<PendingMessage>> {
        let (mut all, mut after) = (Vec::new(), 0);
        let now = now_ms();
        loop {
            let page = self.store.read_after_async(identity, after, BATCH).await?;
            let Some(last) = page.last else { break };
            after = last;
            for m in page.messages.iter().filter(|m| m.expires_ms > now) {
                let stored = page.stored(m);
                all.push(PendingMessage {
                    id: m.id,
                    service_path: stored.service_path.to_owned(),
                    service_method: stored.service_method.to_owned(),
                    size: stored.payload.len(),
                    expires_at: UNIX_EPOCH
                        .checked_add(Duration::from_millis(m.expires_ms))
                        .unwrap_or(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX))),
                });
            }
        }
        Ok(all)
    }

    /// Closes the store (at server shutdown) so that the file can be opened again at once.
    pub(crate) async fn close(&self) {
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
    }

    /// Cancels a pending message; whether it was pending.
    pub(crate) async fn cancel(&self, identity: &str, id: u64) -> Result<bool> {
        let cancelled = self.store.remove(identity, vec![id]).await? > 0;
        // Only the owner's cancel forgets that the message went out (a cancel naming another
        // identity leaves its redelivered mark alone).
        if cancelled {
            self.attempted.locked().remove(&id);
        }
        Ok(cancelled)
    }

    /// Drops every expired message.
    async fn sweep_once(self: &Arc<Self>) -> Result<()> {
        let store = self.store.clone();
        let now = now_ms();
        let expired: Vec<(String, u64)> = tokio::task::spawn_blocking(move || {
            let txn = store.db()?.begin_read().map_err(store_error)?;
            let queues = txn.open_table(QUEUES).map_err(store_error)?;
            let mut out = Vec::new();
            for entry in queues.iter().map_err(store_error)? {
                let (k, v) = entry.map_err(store_error)?;
                let (identity, acked) = (k.value(), v.value());
                let Some(table) = read_queue(&txn, identity)? else {
                    continue;
                };
                for entry in table
                    .range(acked.saturating_add(1)..)
                    .map_err(store_error)?
                {
                    let (id, v) = entry.map_err(store_error)?;
                    if postcard::from_bytes::<StoredRef<'_>>(v.value())
                        .is_ok_and(|m| m.expires_ms <= now)
                    {
                        out.push((identity.to_owned(), id.value()));
                    }
                }
            }
            Ok::<_, Error>(out)
        })
        .await
        .map_err(store_error)??;
        let mut by_identity: HashMap<String, Vec<u64>> = HashMap::new();
        for (identity, id) in expired {
            by_identity.entry(identity).or_default().push(id);
        }
        for (identity, ids) in by_identity {
            let n = self.store.remove(&identity, ids).await?;
            self.store.counters.expired.fetch_add(n, Ordering::Relaxed);
            metrics::counter!(crate::metrics::names::DURABLE_EXPIRED).increment(n);
        }
        Ok(())
    }
}

/// Drops expired messages every few seconds, while the server lives.
async fn sweep(durable: Weak<Durable>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(d) = durable.upgrade() else { return };
        if let Err(e) = d.sweep_once().await {
            tracing::warn!("sweeping expired durable messages failed: {e}");
        }
    }
}

/// A client's view of the durable messages of each id space (a store or cluster and an
/// identity, or a server without a named space): what it delivered (in order) and
/// acknowledged, to deliver in order and drop duplicates. The `server` parameters below name
/// a space.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    state: Mutex<Spaces>,
    changed: Notify,
}

/// The longest id space name (`quicx-msg-space`) a client accepts; a message naming a longer
/// one is refused.
pub(crate) const MAX_SPACE_LEN: usize = 256;

/// How many id spaces a client keeps; past them it forgets the one used least recently (a
/// message of that space that comes again after it was acknowledged is then delivered again).
pub(crate) const MAX_SPACES: usize = 1024;

/// The state of `space`, made if new (forgetting the space used least recently when
/// [`MAX_SPACES`] are kept), marked as just used.
fn space_state<'a>(spaces: &'a mut Spaces, space: &str) -> &'a mut InboxState {
    spaces.uses += 1;
    let now = spaces.uses;
    let state = &mut spaces.by_name;
    if !state.contains_key(space) {
        if state.len() >= MAX_SPACES {
            let oldest = state
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                state.remove(&oldest);
            }
        }
        state.insert(space.to_owned(), InboxState::default());
    }
    let s = state.get_mut(space).expect("present: inserted above");
    s.used = now;
    s
}

/// The id spaces a client knows.
#[derive(Debug, Default)]
struct Spaces {
    by_name: HashMap<String, InboxState>,
    /// Uses so far, across spaces (the clock of `InboxState::used`).
    uses: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct InboxState {
    /// When this space was last used (a count of uses across spaces).
    used: u64,
    /// The connection `delivered` is about.
    conn: u64,
    /// The last id handed to the application on that connection (in order).
    delivered: u64,
    /// The highest id acknowledged to this server (any connection).
    acked: u64,
}

/// What a client does with a durable message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Already acknowledged: acknowledge again, do not deliver.
    Duplicate,
    /// Its turn: deliver it.
    Deliver,
}

impl Inbox {
    /// Waits (at most `limit`) until the message `id` that follows `prev` may be delivered on
    /// connection `conn` to `server`.
    pub(crate) async fn admit(
        &self,
        server: &str,
        conn: u64,
        id: u64,
        prev: u64,
        limit: Duration,
    ) -> Option<Admission> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            {
                let mut state = self.state.locked();
                let s = space_state(&mut state, server);
                if s.conn != conn {
                    *s = InboxState {
                        conn,
                        delivered: s.acked,
                        ..*s
                    };
                }
                if id <= s.acked {
                    return Some(Admission::Duplicate);
                }
                // What was acknowledged was handed to the application (on some connection): a
                // message after it may follow, although an older connection's task raised
                // `acked` after this connection started.
                if prev == 0 || prev <= s.delivered.max(s.acked) {
                    return Some(Admission::Deliver);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// `id` was handed to the application on `conn`.
    pub(crate) fn delivered(&self, server: &str, conn: u64, id: u64) {
        let mut state = self.state.locked();
        let s = space_state(&mut state, server);
        if s.conn == conn {
            s.delivered = s.delivered.max(id);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether `id` was acknowledged to `server` before (on any connection).
    pub(crate) fn is_acked(&self, server: &str, id: u64) -> bool {
        self.state
            .locked()
            .by_name
            .get(server)
            .is_some_and(|s| id <= s.acked)
    }

    /// `id` was acknowledged.
    pub(crate) fn acked(&self, server: &str, id: u64) {
        let mut state = self.state.locked();
        let s = space_state(&mut state, server);
        s.acked = s.acked.max(id);
    }
}

/// Acknowledges a durable message in manual-ack mode ([`PushMessage::ack`](crate::PushMessage::ack)).
#[derive(Debug, Clone)]
pub(crate) struct Acker(Arc<Mutex<Option<oneshot::Sender<()>>>>);

impl PartialEq for Acker {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Acker {}

impl Acker {
    pub(crate) fn new() -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    pub(crate) fn ack(&self) -> bool {
        self.0.locked().take().is_some_and(|tx| tx.send(()).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use redb::TableHandle;

    use super::*;

    #[test]
    fn the_largest_backlogs_come_most_first_ties_by_bytes_then_name() {
        let mut sizes = Sizes::default();
        for (who, n, bytes) in [
            ("c", 2, 10),
            ("a", 2, 10),
            ("b", 2, 30),
            ("d", 5, 1),
            ("e", 1, 99),
        ] {
            for _ in 0..n {
                sizes.add(who, bytes);
            }
        }
        let order = |limit| -> Vec<String> {
            sizes
                .largest(limit)
                .into_iter()
                .map(|b| b.identity)
                .collect()
        };
        assert_eq!(order(10), ["d", "b", "a", "c", "e"]);
        assert_eq!(order(3), ["d", "b", "a"]);
        assert!(order(0).is_empty());
        let top = &sizes.largest(1)[0];
        assert_eq!((top.messages, top.bytes), (5, 5));
    }

    #[test]
    fn an_inbox_keeps_at_most_max_spaces_and_forgets_the_least_recently_used() {
        let inbox = Inbox::default();
        inbox.acked("kept", 5);
        for i in 0..MAX_SPACES {
            inbox.acked(&format!("s{i}"), 1);
            inbox.acked("kept", 5);
        }
        assert_eq!(inbox.state.locked().by_name.len(), MAX_SPACES);
        assert!(inbox.is_acked("kept", 5), "used last: kept");
        assert!(!inbox.is_acked("s0", 1), "used least recently: forgotten");
        assert!(inbox.is_acked("s1", 1));
    }

    #[test]
    fn a_msg_space_is_short_stable_and_tells_stores_and_identities_apart() {
        let space = msg_space("0123", "device-7");
        assert_eq!(space.len(), MSG_SPACE_LEN);
        assert_eq!(space, msg_space("0123", "device-7"), "stable");
        assert_ne!(space, msg_space("0123", "device-8"));
        assert_ne!(space, msg_space("0124", "device-7"));
        // The separator keeps the two parts apart.
        assert_ne!(msg_space("ab", "c"), msg_space("a", "bc"));
        assert_eq!(msg_space("cluster/q", &"x".repeat(1000)).len(), 16);
    }

    /// A store file in a fresh directory, removed on drop.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("quicx-durable-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn file(&self) -> std::path::PathBuf {
            self.0.join("store.redb")
        }

        /// Opens (again) the store in this directory.
        fn open(&self, limits: DurableLimits) -> Store {
            Store::open(&self.file(), limits).unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `message(n)` with a 1,000-byte payload.
    fn big(n: u64) -> Stored {
        Stored {
            payload: vec![n as u8; 1000],
            ..message(n)
        }
    }

    fn message(n: u64) -> Stored {
        Stored {
            service_path: "Device".into(),
            service_method: "Cmd".into(),
            metadata: Metadata::new(),
            payload: n.to_be_bytes().to_vec(),
            expires_ms: u64::MAX,
        }
    }

    /// Appends `make(n)` for each `n` of `ns` to `identity`'s queue; their ids.
    async fn append_all(
        store: &Store,
        identity: &str,
        ns: std::ops::Range<u64>,
        make: fn(u64) -> Stored,
    ) -> Vec<u64> {
        let mut ids = Vec::new();
        for n in ns {
            ids.push(store.append(identity, make(n)).await.unwrap());
        }
        ids
    }

    /// Closes a store (blocking, so off the test's async thread).
    async fn close(store: Store) {
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }

    /// A record encoded from the stored bytes is the record of the message with the delivery
    /// keys inserted into its metadata, also when the stored metadata names one of them.
    #[test]
    fn a_record_encoded_in_place_is_the_record_of_the_message_with_its_keys() {
        let limits = crate::wire::Limits::default();
        for (user, redelivered) in [
            (Metadata::new(), false),
            (Metadata::new().with("k", "v"), true),
            (Metadata::new().with(MSG_ID_KEY, "9").with("k", "v"), false),
            (Metadata::new().with(MSG_REDELIVERED_KEY, "0"), true),
        ] {
            let stored = Stored {
                service_path: "Device".into(),
                service_method: "Cmd".into(),
                metadata: user.clone(),
                payload: vec![7; 100],
                expires_ms: 5,
            };
            let out = Outgoing {
                id: 42,
                redelivered,
                expires_ms: stored.expires_ms,
                raw: postcard::to_allocvec(&stored).unwrap().into(),
            };
            let (mut got, mut scratch) = (Vec::new(), String::new());
            out.encode_record(&mut got, "00ff", &mut scratch, &limits)
                .unwrap();
            let mut metadata = user;
            metadata
                .insert(MSG_ID_KEY, "42")
                .insert(MSG_SPACE_KEY, "00ff");
            if redelivered {
                metadata.insert(MSG_REDELIVERED_KEY, "1");
            }
            let header = crate::wire::PushHeaderRef {
                service_path: "Device",
                service_method: "Cmd",
                metadata: &metadata,
            };
            let mut want = Vec::new();
            crate::wire::encode_record(&mut want, &header, &stored.payload, &limits).unwrap();
            assert_eq!(got, want);
            assert_eq!(out.metadata("00ff", None), metadata);
        }
    }

    fn ids(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.id).collect()
    }

    fn queue_keys(store: &Store, identity: &str) -> Vec<u64> {
        let txn = store.db().unwrap().begin_read().unwrap();
        read_queue(&txn, identity)
            .unwrap()
            .map_or_else(Vec::new, |table| {
                table
                    .iter()
                    .unwrap()
                    .map(|e| e.unwrap().0.value())
                    .collect()
            })
    }

    #[tokio::test]
    async fn acknowledged_messages_stay_acknowledged_across_a_reopen() {
        let dir = Dir::new("reopen");
        let store = dir.open(DurableLimits::default());
        let sent = append_all(&store, "d", 0..10, message).await;
        assert_eq!(store.ack("d", sent[3], Vec::new()).await.unwrap(), 4);
        // Acknowledged, not yet removed: neither pending nor cancellable.
        assert_eq!(store.pending_of("d"), 6);
        assert_eq!(store.remove("d", vec![sent[1]]).await.unwrap(), 0);
        assert_eq!(queue_keys(&store, "d").len(), 10);
        assert_eq!(ids(&store.read_after("d", 0, 100).unwrap()), sent[4..]);
        close(store).await;

        let store = dir.open(DurableLimits::default());
        assert_eq!(store.pending_of("d"), 6);
        assert_eq!(store.pending_total(), 6);
        assert_eq!(ids(&store.read_after("d", 0, 100).unwrap()), sent[4..]);
        // A stale acknowledgement changes nothing; the last one drops the queue whole.
        assert_eq!(store.ack("d", sent[2], Vec::new()).await.unwrap(), 0);
        assert_eq!(store.ack("d", sent[9], Vec::new()).await.unwrap(), 6);
        assert_eq!(store.pending_total(), 0);
        assert!(queue_keys(&store, "d").is_empty());
        // The identity starts a new queue.
        let next = store.append("d", message(10)).await.unwrap();
        assert!(next > sent[9]);
        assert_eq!(ids(&store.read_after("d", 0, 100).unwrap()), [next]);
        close(store).await;
    }

    #[tokio::test]
    async fn a_queue_that_never_empties_does_not_keep_its_acknowledged_messages() {
        // 50 pending at most; each round 40 more (of 1 KB) come and all but the newest 10 are
        // acknowledged, so the queue never empties (and is never dropped whole). The store's
        // total bound is 400 KB: acknowledged messages are removed while pending and
        // acknowledged ones together exceed it.
        let dir = Dir::new("backstop");
        let limits = DurableLimits::default()
            .per_identity(50, 1 << 30)
            .total(1_000, 400_000);
        let store = dir.open(limits);
        let mut sent = Vec::new();
        let mut longest = 0;
        for round in 0..120u64 {
            for n in 0..40 {
                sent.push(store.append("d", big(round * 40 + n)).await.unwrap());
            }
            store
                .ack("d", sent[sent.len() - 11], Vec::new())
                .await
                .unwrap();
            longest = longest.max(queue_keys(&store, "d").len());
        }
        // 4,790 acknowledged: without the bound all of them would still be in the queue.
        // Counted after each acknowledgement: at most 400 KB of messages of over 1,000 bytes.
        assert!(longest <= 400, "{longest}");
        assert_eq!(store.pending_of("d"), 10);
        assert_eq!(
            ids(&store.read_after("d", 0, 100).unwrap()),
            sent[sent.len() - 10..]
        );
        close(store).await;
    }

    #[tokio::test]
    async fn messages_for_one_device_make_room_by_compacting_what_another_left_acknowledged() {
        // Device a got 300 messages of 1 KB and acknowledged 200 before it went away: its queue
        // keeps them (it is never settled again while a is away). Device b's messages then push
        // the store past its 400 KB bound, pending and acknowledged together: a's acknowledged
        // ones make the room.
        let dir = Dir::new("room");
        let limits = DurableLimits::default()
            .per_identity(1_000, 1 << 30)
            .total(10_000, 400_000);
        let store = dir.open(limits);
        let sent = append_all(&store, "a", 0..300, big).await;
        assert_eq!(store.ack("a", sent[199], Vec::new()).await.unwrap(), 200);
        assert_eq!(
            queue_keys(&store, "a").len(),
            300,
            "below the bound: nothing compacted"
        );
        for n in 0..250 {
            store.append("b", big(n)).await.unwrap();
        }
        // Pending: a's 100 and b's 250; what a had acknowledged is gone but what fits.
        let a_left = queue_keys(&store, "a").len();
        assert!(a_left <= 100 + 60, "{a_left}");
        assert_eq!(store.pending_of("a"), 100);
        assert_eq!(ids(&store.read_after("a", 0, 1000).unwrap()), sent[200..]);
        assert_eq!(store.pending_of("b"), 250);
        close(store).await;
    }

    /// The bytes of every message (pending or acknowledged) the queues of `identities` hold.
    fn stored_bytes(store: &Store, identities: &[String]) -> u64 {
        let txn = store.db().unwrap().begin_read().unwrap();
        identities
            .iter()
            .filter_map(|identity| read_queue(&txn, identity).unwrap())
            .flat_map(|table| {
                table
                    .iter()
                    .unwrap()
                    .map(|e| e.unwrap().1.value().len() as u64)
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    #[tokio::test]
    async fn many_queues_with_a_few_small_leftovers_each_make_room_for_big_messages_at_once() {
        // 200 devices each got 3 small messages and acknowledged 2 before they went away, so
        // each queue keeps 2 small leftovers. Then another device's 1 KB messages push the
        // store past its bound: each of them must make all its room at once, from as many
        // queues as it takes (one queue's leftovers are a few tens of bytes).
        let dir = Dir::new("many-leftovers");
        const BOUND: u64 = 30_000;
        let store = dir.open(
            DurableLimits::default()
                .per_identity(1_000, 1 << 30)
                .total(100_000, BOUND),
        );
        let mut identities: Vec<String> = (0..200).map(|d| format!("d{d}")).collect();
        for identity in &identities {
            let sent = append_all(&store, identity, 0..3, message).await;
            assert_eq!(store.ack(identity, sent[1], Vec::new()).await.unwrap(), 2);
        }
        identities.push("b".into());
        let before = stored_bytes(&store, &identities);
        assert!(before < BOUND, "{before}");
        for n in 0..20 {
            store.append("b", big(n)).await.unwrap();
            let held = stored_bytes(&store, &identities);
            assert!(held <= BOUND, "after b's message {n}: {held} bytes held");
        }
        assert_eq!(store.pending_of("b"), 20);
        for identity in &identities[..200] {
            assert_eq!(store.pending_of(identity), 1, "{identity}");
            assert_eq!(store.read_after(identity, 0, 10).unwrap().messages.len(), 1);
        }
        close(store).await;
    }

    #[tokio::test]
    async fn a_store_in_the_single_table_layout_is_moved_into_queues() {
        // More than one migration transaction's worth, and a queue a migration cut short had
        // already started: everything ends up pending once, in order.
        let dir = Dir::new("legacy");
        let n = MIGRATE_PER_COMMIT as u64 + 50;
        {
            let db = Database::create(dir.file()).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut legacy = txn.open_table(LEGACY_MESSAGES).unwrap();
                for id in 2..=n {
                    let identity = if id % 2 == 0 { "a" } else { "b" };
                    let bytes = postcard::to_allocvec(&message(id)).unwrap();
                    legacy.insert((identity, id), bytes.as_slice()).unwrap();
                }
                txn.open_table(QUEUES).unwrap().insert("b", 0).unwrap();
                let bytes = postcard::to_allocvec(&message(1)).unwrap();
                txn.open_table(queue_table(&queue_name("b")))
                    .unwrap()
                    .insert(1, bytes.as_slice())
                    .unwrap();
                txn.open_table(META)
                    .unwrap()
                    .insert("next_id", n + 1)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = dir.open(DurableLimits::default());
        assert_eq!(store.pending_total(), n);
        let mut all = Vec::new();
        for identity in ["a", "b"] {
            let mut after = 0;
            loop {
                let page = store.read_after(identity, after, 1024).unwrap();
                let Some(last) = page.last else { break };
                after = last;
                all.extend(
                    page.messages
                        .iter()
                        .map(|m| (identity, m.id, page.stored(m).payload.to_vec())),
                );
            }
        }
        assert_eq!(all.len() as u64, n);
        for (identity, id, payload) in &all {
            assert_eq!(*identity, if id % 2 == 0 { "a" } else { "b" });
            assert_eq!(payload, &id.to_be_bytes());
        }
        assert!(all.windows(2).all(|w| w[0].0 != w[1].0 || w[0].1 < w[1].1));
        assert_eq!(store.append("a", message(0)).await.unwrap(), n + 1);
        let txn = store.db().unwrap().begin_read().unwrap();
        let legacy_left = txn
            .list_tables()
            .unwrap()
            .any(|t| t.name() == LEGACY_MESSAGES.name());
        assert!(!legacy_left, "the old table is gone");
        drop(txn);
        close(store).await;
    }

    #[tokio::test]
    async fn acknowledgements_over_cancelled_and_dropped_messages_count_each_once() {
        let dir = Dir::new("gaps");
        let limits = DurableLimits::default()
            .per_identity(6, 1 << 20)
            .overflow(Overflow::DropOldest);
        let store = dir.open(limits);
        let mut sent = append_all(&store, "d", 0..6, message).await;
        // Cancel the third, acknowledge up to the fourth (over the gap).
        assert_eq!(store.remove("d", vec![sent[2]]).await.unwrap(), 1);
        assert_eq!(store.ack("d", sent[3], Vec::new()).await.unwrap(), 3);
        assert_eq!(store.pending_of("d"), 2);
        // Room for 4 more before the oldest pending (not an acknowledged one) is dropped.
        for n in 6..11 {
            sent.push(store.append("d", message(n)).await.unwrap());
        }
        assert_eq!(store.pending_of("d"), 6);
        assert_eq!(ids(&store.read_after("d", 0, 100).unwrap()), sent[5..]);
        let s = store.counters.overflowed.load(Ordering::Relaxed);
        assert_eq!(s, 1);
        close(store).await;
        let store = dir.open(limits);
        assert_eq!(store.pending_of("d"), 6);
        assert_eq!(store.pending_total(), 6);
        close(store).await;
    }

    #[tokio::test]
    async fn an_acknowledgement_counts_only_what_it_took_from_pending() {
        let dir = Dir::new("tally");
        let store = dir.open(DurableLimits::default());
        let sent = append_all(&store, "d", 0..4, message).await;
        // The second and third went out twice; the second expired (or was cancelled) before
        // the device's acknowledgement of all four came back.
        assert_eq!(store.remove("d", vec![sent[1]]).await.unwrap(), 1);
        let covered = store
            .ack("d", sent[3], vec![sent[1], sent[2]])
            .await
            .unwrap();
        assert_eq!(covered, 3);
        let c = &store.counters;
        assert_eq!(c.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(c.redelivered.load(Ordering::Relaxed), 1);
        // The same acknowledgement again covers nothing.
        assert_eq!(store.ack("d", sent[3], vec![sent[2]]).await.unwrap(), 0);
        assert_eq!(c.delivered.load(Ordering::Relaxed), 3);
        assert_eq!(c.redelivered.load(Ordering::Relaxed), 1);
        close(store).await;
    }

    #[tokio::test]
    async fn a_corrupt_message_is_reported_and_read_past() {
        let dir = Dir::new("corrupt");
        let store = dir.open(DurableLimits::default());
        let sent = append_all(&store, "d", 0..3, message).await;
        {
            let txn = store.db().unwrap().begin_write().unwrap();
            txn.open_table(queue_table(&queue_name("d")))
                .unwrap()
                .insert(sent[1], &[0xff_u8, 0xff, 0xff][..])
                .unwrap();
            txn.commit().unwrap();
        }
        // A read that holds only the corrupt one still moves past it.
        let page = store.read_after("d", sent[0], 1).unwrap();
        assert!(page.messages.is_empty());
        assert_eq!((page.corrupt, page.last), (vec![sent[1]], Some(sent[1])));
        let page = store.read_after("d", 0, 100).unwrap();
        assert_eq!(ids(&page), [sent[0], sent[2]]);
        assert_eq!(page.last, Some(sent[2]));
        assert_eq!(store.remove("d", vec![sent[1]]).await.unwrap(), 1);
        assert_eq!(store.pending_of("d"), 2);
        close(store).await;
    }
}
