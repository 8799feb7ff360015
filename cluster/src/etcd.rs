//! The etcd side: connecting, a lease that holds a node's keys (kept alive, re-granted and the
//! keys put again after a loss), and following a prefix with a watch.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{ClusterError, lock};

/// Where etcd is and how a node uses it.
///
/// ```
/// use std::time::Duration;
/// let etcd = quicx_cluster::EtcdOptions::new(["http://127.0.0.1:2379"])
///     .prefix("/fleet")
///     .lease_ttl(Duration::from_secs(3));
/// # let _ = etcd;
/// ```
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub(crate) endpoints: Vec<String>,
    pub(crate) prefix: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

impl EtcdOptions {
    /// etcd's client URLs (`http://host:2379`). Defaults: prefix `/quicx`, lease TTL 3 s,
    /// requests time out after 2 s, connects after 1 s.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/quicx".into(),
            lease_ttl: Duration::from_secs(3),
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        }
    }

    /// The key prefix every quicx key lives under (default `/quicx`), so one etcd can hold
    /// several clusters.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().trim_end_matches('/').to_owned();
        self
    }

    /// The TTL of a node's lease (default 3 s, at least 1 s): how long after a node dies (or
    /// loses etcd) its services and devices stay listed. The lease is renewed every third of it.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// How long one etcd request may take (default 2 s). A hung etcd then fails requests
    /// instead of holding them.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub(crate) fn lease_secs(&self) -> i64 {
        self.lease_ttl.as_secs().max(1) as i64
    }

    /// Connects (lazily: etcd is dialled on the first request) with timeouts and HTTP/2
    /// keep-alives, so a dead or hung etcd fails requests and breaks streams within seconds.
    pub(crate) async fn connect(&self) -> Result<Client, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        Client::connect(&self.endpoints, Some(options))
            .await
            .map_err(ClusterError::etcd)
    }
}

/// The largest reply this crate decodes from etcd (the client's default is 4 MiB): a durable
/// read of 256 messages of 64 KiB, or the first read of the presence of some 45,000 devices,
/// is more than that, and a reply over the limit fails the same way at every retry.
pub(crate) const REPLY_LIMIT: usize = 256 << 20;

/// A KV client of `client` that decodes replies up to [`REPLY_LIMIT`].
pub(crate) fn kv(client: &Client) -> etcd_client::KvClient {
    client.kv_client().max_decoding_message_size(REPLY_LIMIT)
}

/// How long to wait before retrying etcd after a failure: 100 ms doubling to 1 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// A node's keys under one lease: what it wants in etcd (`desired`) is put again whenever the
/// lease is re-granted or the connection to etcd comes back, so an etcd outage or a lost lease
/// heals by itself.
pub(crate) struct Session {
    client: Client,
    options: EtcdOptions,
    desired: Mutex<BTreeMap<String, String>>,
    /// The lease the keys are under now; `None` while there is none.
    lease: watch::Sender<Option<i64>>,
    stop: CancellationToken,
    /// Set by [`revoke`](Self::revoke) (not by [`halt`](Self::halt)): a lease granted while it
    /// runs is revoked too.
    revoking: std::sync::atomic::AtomicBool,
    /// The etcd revision at which every wanted key was last put again (0: not yet).
    healed_at: std::sync::atomic::AtomicI64,
    /// Wanted keys that are not in etcd with their value: a put missed (no lease yet, or it
    /// failed while the lease lived on), or a device's presence another node held when this
    /// one put it back. Put again every keep-alive period by [`repair`](Self::repair).
    missed: Mutex<std::collections::BTreeSet<String>>,
    /// Deletes that failed (key, the value it held): tried again at each keep-alive tick, so
    /// a device that left is not listed here until this node's lease ends.
    failed_removals: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("lease", &*self.lease.borrow())
            .field("keys", &self.desired().len())
            .finish()
    }
}

impl Session {
    pub(crate) fn new(client: Client, options: EtcdOptions) -> Arc<Self> {
        Arc::new(Self {
            client,
            options,
            desired: Mutex::default(),
            lease: watch::Sender::new(None),
            stop: CancellationToken::new(),
            revoking: std::sync::atomic::AtomicBool::new(false),
            healed_at: std::sync::atomic::AtomicI64::new(0),
            missed: Mutex::default(),
            failed_removals: Mutex::default(),
        })
    }

    fn desired(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        lock(&self.desired)
    }

    /// Waits until the keys are in etcd under a lease, up to `timeout`.
    pub(crate) async fn registered(&self, timeout: Duration) -> bool {
        let mut lease = self.lease.subscribe();
        tokio::time::timeout(timeout, lease.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Wants `key` = `value` in etcd under the lease. Returns the revision of the put, or
    /// `None` if etcd could not take it now (it is put again when etcd is back).
    pub(crate) async fn put(&self, key: String, value: String) -> Option<i64> {
        self.desired().insert(key.clone(), value.clone());
        let Some(lease) = *self.lease.borrow() else {
            // Being granted: the keys it puts may have been read before this one came.
            self.miss([key]);
            return None;
        };
        let mut client = self.client.clone();
        match client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
        {
            Ok(r) => r.header().map(|h| h.revision()),
            Err(e) => {
                tracing::debug!("etcd put failed (put again at the next keep-alive): {e}");
                self.miss([key]);
                None
            }
        }
    }

    /// Stops wanting `key`; deletes it from etcd only while it still holds `value` (another
    /// node may have written it since).
    pub(crate) async fn remove_if(&self, key: &str, value: &str) {
        {
            let mut desired = self.desired();
            if desired.get(key).is_some_and(|v| v == value) {
                desired.remove(key);
            }
        }
        if let Err(e) = self.client.clone().txn(delete_if(key, value)).await {
            tracing::debug!("etcd delete of {key} failed (tried again): {e}");
            lock(&self.failed_removals).insert(key.to_owned(), value.to_owned());
        }
    }

    /// Every `every` while a lease lives, until stopped: puts the missed keys again and tries
    /// the failed deletes again. On a task of its own, so a slow etcd never delays the
    /// keep-alives (a lease that lapsed would drop every key of the node).
    async fn repair(self: Arc<Self>, every: Duration) {
        let mut client = self.client.clone();
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let Some(lease) = *self.lease.borrow() else {
                continue;
            };
            self.retry_removals(&mut client).await;
            let missed = std::mem::take(&mut *lock(&self.missed));
            let keys: Vec<(String, String)> = {
                let desired = self.desired();
                missed
                    .into_iter()
                    .filter_map(|k| desired.get(&k).cloned().map(|v| (k, v)))
                    .collect()
            };
            if keys.is_empty() {
                continue;
            }
            let repaired = match self.put_keys(&mut client, lease, &keys).await {
                Ok((skipped, _)) => {
                    self.miss(skipped);
                    // A device that left while these were on their way: not put back.
                    self.undo_overtaken(&mut client, lease, keys.clone()).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = repaired {
                tracing::debug!("etcd re-put failed (tried again): {e}");
                self.miss(keys.into_iter().map(|(k, _)| k));
            }
        }
    }

    /// Tries the deletes that failed again; keeps the ones that fail again.
    async fn retry_removals(&self, client: &mut Client) {
        let failed = std::mem::take(&mut *lock(&self.failed_removals));
        for (key, value) in failed {
            // Wanted again meanwhile (the device came back): not ours to delete.
            if self.desired().get(&key).is_some_and(|v| *v == value) {
                continue;
            }
            if client.txn(delete_if(&key, &value)).await.is_err() {
                lock(&self.failed_removals).entry(key).or_insert(value);
            }
        }
    }

    /// The etcd revision at which every key this session wanted was last put (again); 0 before
    /// the first time. A key wanted then holds its value at this revision or a later one.
    pub(crate) fn healed_at(&self) -> i64 {
        self.healed_at.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The value this session wants `key` to hold, if it wants it at all.
    pub(crate) fn wanted(&self, key: &str) -> Option<String> {
        self.desired().get(key).cloned()
    }

    /// Stops wanting `key` without touching etcd (its lease still holds it until re-granted).
    pub(crate) fn forget(&self, key: &str) {
        self.desired().remove(key);
    }

    /// Stops keeping the lease alive without revoking it: the keys go when it expires (what a
    /// crash looks like to the cluster).
    pub(crate) fn halt(&self) {
        self.stop.cancel();
    }

    /// Revokes the lease: every key of this node is gone from etcd at once.
    pub(crate) async fn revoke(&self) {
        self.revoking
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.cancel();
        if let Some(lease) = self.lease.send_replace(None) {
            if let Err(e) = self.client.clone().lease_revoke(lease).await {
                tracing::warn!("revoking the node's etcd lease failed (it expires by itself): {e}");
            }
        }
    }

    /// Marks keys as missed (see `missed`).
    fn miss(&self, keys: impl IntoIterator<Item = String>) {
        lock(&self.missed).extend(keys);
    }

    /// Puts `keys` under `lease`, 64 per transaction; returns the presence keys another node
    /// holds (not put). A device's presence goes back only where no other node wrote it
    /// meanwhile (absent, or still this node's): a device that moved to another node while this
    /// one was away from etcd must not be pulled back (the other node would close its live
    /// connection as taken over). Skipped keys are tried again (`missed`): when the other
    /// node's record was a stale one, it deletes it and this node's goes in. Other keys (the
    /// node's own, its services) go back as they are.
    async fn put_keys(
        &self,
        client: &mut Client,
        lease: i64,
        keys: &[(String, String)],
    ) -> Result<(Vec<String>, i64), etcd_client::Error> {
        let presence = crate::keys::presences(&self.options.prefix);
        let mut skipped = Vec::new();
        let mut revision = 0;
        // etcd 3.4 takes up to 128 operations in one transaction (a guarded put counts two).
        for batch in keys.chunks(64) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(k, v)| {
                    let put = || {
                        TxnOp::put(
                            k.as_str(),
                            v.as_str(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                    };
                    if !k.starts_with(&presence) {
                        return put();
                    }
                    let if_ours = Txn::new()
                        .when([Compare::value(k.as_str(), CompareOp::Equal, v.as_str())])
                        .and_then([put()]);
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::version(k.as_str(), CompareOp::Equal, 0)])
                            .and_then([put()])
                            .or_else([TxnOp::txn(if_ours)]),
                    )
                })
                .collect();
            let r = client.txn(Txn::new().and_then(ops)).await?;
            for ((k, _), op) in batch.iter().zip(r.op_responses()) {
                let TxnOpResponse::Txn(absent) = op else {
                    continue;
                };
                let ours = absent.succeeded()
                    || absent
                        .op_responses()
                        .first()
                        .is_some_and(|o| matches!(o, TxnOpResponse::Txn(t) if t.succeeded()));
                if !ours {
                    skipped.push(k.clone());
                }
            }
            if let Some(h) = r.header() {
                revision = revision.max(h.revision());
            }
        }
        Ok((skipped, revision))
    }

    async fn put_all(&self, client: &mut Client, lease: i64) -> Result<(), etcd_client::Error> {
        // What is wanted from here on is in this put, or marks itself missed again.
        lock(&self.missed).clear();
        let desired: Vec<(String, String)> = self
            .desired()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let (skipped, revision) = self.put_keys(client, lease, &desired).await?;
        self.miss(skipped);
        self.undo_overtaken(client, lease, desired).await?;
        // Every key wanted when this began holds its value from here (or is retried).
        self.healed_at
            .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// After `put` (keys and the values put): a key given up (`remove_if`) or given a new value
    /// while those puts were on their way may have been overwritten with the old value: where
    /// it still holds that value, delete it or put the new one.
    async fn undo_overtaken(
        &self,
        client: &mut Client,
        lease: i64,
        put: Vec<(String, String)>,
    ) -> Result<(), etcd_client::Error> {
        let changed: Vec<(String, String, Option<String>)> = {
            let now = self.desired();
            put.into_iter()
                .filter_map(|(k, v)| {
                    let wanted = now.get(&k).cloned();
                    (wanted.as_ref() != Some(&v)).then_some((k, v, wanted))
                })
                .collect()
        };
        for (key, old, wanted) in changed {
            let op = match wanted {
                Some(value) => TxnOp::put(
                    key.as_str(),
                    value.as_str(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                None => TxnOp::delete(key.as_str(), None),
            };
            let txn = Txn::new()
                .when([Compare::value(key.as_str(), CompareOp::Equal, old.as_str())])
                .and_then([op]);
            client.txn(txn).await?;
        }
        Ok(())
    }

    /// Whether the session was stopped while `lease` was being granted or filled; if it was
    /// revoked meanwhile (and so could not see this lease), revokes this one too, so a node that
    /// left is not listed for one more TTL.
    async fn stopped_with(&self, client: &mut Client, lease: i64) -> bool {
        if !self.stop.is_cancelled() {
            return false;
        }
        if self.revoking.load(std::sync::atomic::Ordering::SeqCst) {
            self.lease.send_replace(None);
            if let Err(e) = client.lease_revoke(lease).await {
                tracing::warn!("revoking the node's etcd lease failed (it expires by itself): {e}");
            }
        }
        true
    }

    /// Keeps the lease alive until stopped: grants one, puts every desired key under it, renews
    /// it every third of its TTL; re-grants and puts everything again when it is lost, and puts
    /// everything again when etcd comes back. Never gives up; logs what fails.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut client = self.client.clone();
        let mut backoff = Backoff::new();
        let tick = self.options.lease_ttl / 3;
        tokio::spawn(self.clone().repair(tick));
        'grant: while !self.stop.is_cancelled() {
            let lease = match client.lease_grant(self.options.lease_secs(), None).await {
                Ok(r) => r.id(),
                Err(e) => {
                    tracing::warn!("etcd lease grant failed: {e}");
                    if !backoff.wait(&self.stop).await {
                        return;
                    }
                    continue;
                }
            };
            if self.stopped_with(&mut client, lease).await {
                return;
            }
            let mut heal = true;
            loop {
                if heal {
                    if let Err(e) = self.put_all(&mut client, lease).await {
                        if is_lease_lost(&e) {
                            // Expired while etcd was away: grant a new one, put everything.
                            tracing::warn!("the node's etcd lease was lost: granting a new one");
                            self.lease.send_replace(None);
                            continue 'grant;
                        }
                        tracing::warn!("etcd registration failed: {e}");
                        if !backoff.wait(&self.stop).await {
                            return;
                        }
                        continue;
                    }
                    self.lease.send_replace(Some(lease));
                    if self.stopped_with(&mut client, lease).await {
                        return;
                    }
                }
                let started =
                    tokio::time::timeout(self.options.lease_ttl, client.lease_keep_alive(lease))
                        .await
                        .unwrap_or_else(|_| {
                            Err(etcd_client::Error::LeaseKeepAliveError(
                                "no answer within the lease TTL".into(),
                            ))
                        });
                let (mut keeper, mut stream) = match started {
                    Ok(k) => k,
                    Err(e) => {
                        if is_lease_lost(&e) {
                            tracing::warn!("the node's etcd lease was lost: granting a new one");
                            self.lease.send_replace(None);
                            continue 'grant;
                        }
                        tracing::warn!("etcd unreachable: {e}");
                        if !backoff.wait(&self.stop).await {
                            return;
                        }
                        // Keys put while etcd was away are missing: put everything again.
                        heal = true;
                        continue;
                    }
                };
                backoff.reset();
                loop {
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(tick) => {}
                    }
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(self.options.lease_ttl, stream.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => {
                            tracing::warn!("the node's etcd lease expired: granting a new one");
                            self.lease.send_replace(None);
                            continue 'grant;
                        }
                        _ => break,
                    }
                }
                heal = true;
            }
        }
    }
}

/// Deletes `key` if it still holds `value` (another node may have written it since).
fn delete_if(key: &str, value: &str) -> Txn {
    Txn::new()
        .when([Compare::value(key, CompareOp::Equal, value)])
        .and_then([TxnOp::delete(key, None)])
}

fn is_lease_lost(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::LeaseKeepAliveError(m) if m.contains("not found"))
        || matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease not found"))
}

/// A change under a followed prefix.
#[derive(Debug)]
pub(crate) enum Change {
    /// Everything under the prefix now (after a (re)sync): key, value and the revision of the
    /// key's last write.
    Reset(Vec<(String, String, i64)>),
    /// A key was written.
    Put {
        key: String,
        value: String,
        /// The etcd revision of the write.
        revision: i64,
    },
    /// A key was deleted.
    Delete { key: String },
}

/// Keys per read of a snapshot: a prefix holding a large fleet's presence is read in pages
/// at one revision, so neither etcd nor this process builds one huge reply.
const SNAPSHOT_PAGE: i64 = 1000;

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix);
/// `[0]` (every key from the start key on, in etcd's terms) when the prefix is empty or all
/// `0xff` bytes.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key under `prefix` (key, value, last write's revision) as of one revision, read
/// [`SNAPSHOT_PAGE`] keys at a time, and that revision. Fails if a read fails, including when etcd
/// compacted that revision away between two pages (the caller reads again).
async fn snapshot(
    client: &Client,
    prefix: &str,
    keys_only: bool,
) -> Result<(i64, Vec<(String, String, i64)>), etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    // etcd names the first key `[0]`, as an empty key is refused.
    let mut from = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.as_bytes().to_vec()
    };
    // 0: the latest, for the first page; the pages after it read that page's revision.
    let mut revision = 0;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(SNAPSHOT_PAGE);
        if keys_only {
            options = options.with_keys_only();
        }
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let r = kv(client).get(from.clone(), Some(options)).await?;
        if revision == 0 {
            // The pages after the first read its revision: without one they could not.
            revision = r
                .header()
                .map(|h| h.revision())
                .filter(|&rev| rev > 0)
                .ok_or_else(|| {
                    etcd_client::Error::InvalidArgs("etcd replied without a revision".into())
                })?;
        }
        kvs.extend(r.kvs().iter().filter_map(|kv| {
            Some((
                kv.key_str().ok()?.to_owned(),
                kv.value_str().unwrap_or_default().to_owned(),
                kv.mod_revision(),
            ))
        }));
        match r.kvs().last() {
            Some(last) if r.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, kvs)),
        }
    }
}

/// Follows every key under `prefix` until `stop`: a snapshot, then the changes, in revision
/// order. While etcd is unreachable nothing is reported (the last known state stands); when it
/// comes back the watch resumes from the last revision seen (or resyncs with a new snapshot if
/// that revision was compacted). `first` is told once the first snapshot was applied.
pub(crate) async fn follow(
    client: Client,
    prefix: String,
    stop: CancellationToken,
    mut apply: impl FnMut(Change) + Send,
    first: Option<tokio::sync::oneshot::Sender<()>>,
    keys_only: bool,
) {
    let mut first = first;
    let mut backoff = Backoff::new();
    let mut next: Option<i64> = None;
    while !stop.is_cancelled() {
        let start = match next {
            Some(rev) => rev,
            None => match snapshot(&client, &prefix, keys_only).await {
                Ok((rev, kvs)) => {
                    apply(Change::Reset(kvs));
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                    rev + 1
                }
                Err(e) => {
                    tracing::debug!("etcd get {prefix} failed: {e}");
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let options = WatchOptions::new()
            .with_prefix()
            // No previous values: etcd reads each one back from its store (a range per event),
            // which made the 3,333 deletes of a dead node's lease arrive about a second late.
            .with_start_revision(start);
        let mut stream = match client
            .watch_client()
            .max_decoding_message_size(REPLY_LIMIT)
            .watch(prefix.as_str(), Some(options))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("etcd watch {prefix} failed: {e}");
                next = Some(start);
                if !backoff.wait(&stop).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        next = Some(start);
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                m = stream.message() => m,
            };
            match message {
                Ok(Some(r)) => {
                    if r.canceled() {
                        // Compacted past what we saw: start over with a snapshot.
                        next = None;
                        break;
                    }
                    for event in r.events() {
                        let Some(kv) = event.kv() else { continue };
                        next = Some(kv.mod_revision() + 1);
                        let Ok(key) = kv.key_str() else { continue };
                        let key = key.to_owned();
                        match event.event_type() {
                            EventType::Put => {
                                let value = kv.value_str().unwrap_or_default().to_owned();
                                let revision = kv.mod_revision();
                                apply(Change::Put {
                                    key,
                                    value,
                                    revision,
                                });
                            }
                            EventType::Delete => {
                                apply(Change::Delete { key });
                            }
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        if !backoff.wait(&stop).await {
            return;
        }
    }
}

/// Deletes every key under `prefix` (tests and tools).
pub(crate) async fn delete_prefix(client: &mut Client, prefix: &str) -> Result<(), ClusterError> {
    client
        .delete(prefix, Some(DeleteOptions::new().with_prefix()))
        .await
        .map(drop)
        .map_err(ClusterError::etcd)
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_at_its_last_byte_that_can_grow() {
        assert_eq!(prefix_end(b"/q/presence/"), b"/q/presence0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }
}
