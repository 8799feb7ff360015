//! What a handler knows about the call it serves.

use crate::sync::Lock;
use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::{Connection, Metadata, trace::TraceContext};

/// The context of one call, handed to every handler (rpcx's `ctx`).
///
/// It carries the calling connection (the handle a server later pushes to, or calls back), the
/// request metadata and the deadline, and lets the handler set reply metadata. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct Context {
    inner: Arc<CallInfo>,
}

#[derive(Debug)]
struct CallInfo {
    conn: Connection,
    service_path: String,
    service_method: String,
    metadata: Metadata,
    deadline: Option<Instant>,
    cancel: CancellationToken,
    trace: Option<TraceContext>,
    reply_metadata: Mutex<Metadata>,
    /// The handler the call runs (for its per-method metrics).
    method: crate::service::Handler,
}

impl Context {
    pub(crate) fn new(
        conn: Connection,
        (service_path, service_method): (String, String),
        metadata: Metadata,
        deadline: Option<Instant>,
        cancel: CancellationToken,
        trace: Option<TraceContext>,
        method: crate::service::Handler,
    ) -> Self {
        Self {
            inner: Arc::new(CallInfo {
                conn,
                service_path,
                service_method,
                metadata,
                deadline,
                cancel,
                trace,
                reply_metadata: Mutex::new(Metadata::new()),
                method,
            }),
        }
    }

    /// This call's place in a trace, when the caller sent a W3C `traceparent`: the server's
    /// own span, a child of the caller's (see [`trace`](crate::trace)). Async handlers run inside
    /// it, so calls they make continue the trace; a blocking handler passes it on with
    /// [`trace::scope`](crate::trace::scope) if it makes calls from an async block.
    pub fn trace(&self) -> Option<TraceContext> {
        self.inner.trace
    }

    pub(crate) fn method(&self) -> &crate::service::Handler {
        &self.inner.method
    }

    /// The connection the call arrived on (rpcx's `server.RemoteConnContextKey`). Keep a clone to
    /// push to this client or call it back later.
    pub fn conn(&self) -> &Connection {
        &self.inner.conn
    }

    /// The service path of the call (`"Arith"`).
    pub fn service_path(&self) -> &str {
        &self.inner.service_path
    }

    /// The method name of the call (`"Mul"`).
    pub fn service_method(&self) -> &str {
        &self.inner.service_method
    }

    /// The request metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.inner.metadata
    }

    /// When the caller stops waiting, if it set a timeout. quicx cancels the handler at that point.
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.deadline
    }

    /// Resolves when the call is cancelled: the caller timed out or went away, the deadline
    /// passed, or the server shut down. The handler's future is also dropped at that point; this
    /// lets work spawned by the handler stop too.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.cancel.cancelled()
    }

    /// Whether the call was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Adds a pair to the response metadata.
    pub fn set_reply_metadata(&self, key: impl Into<String>, value: impl Into<String>) {
        self.inner.reply_metadata.locked().insert(key, value);
    }

    pub(crate) fn take_reply_metadata(&self) -> Metadata {
        std::mem::take(&mut *self.inner.reply_metadata.locked())
    }
}
