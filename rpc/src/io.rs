//! Where QUIC I/O runs (`IoRuntime`): a dedicated single-threaded runtime, or the caller's.
//!
//! quinn's connection driver and the tasks that read and write its streams wake each other for
//! every packet. On a multi-thread runtime those wake-ups cross threads and each call costs about
//! 1.5 UDP packets; on one thread 10-20 calls share a packet and the CPU cost per call falls
//! several times (BENCHMARKS.md has the numbers). So a quicx server runs its endpoint, its
//! connections, their streams and the handlers on one I/O thread, whatever runtime the
//! application uses; pushes and reverse calls issued from application tasks are handed to that
//! thread. Clients ([`Placement::Auto`]): on a current_thread runtime everything already shares
//! one thread, so the connection is driven there; on a multi-thread runtime the connection
//! drivers run on one I/O thread shared by all clients of the process, while each call's stream
//! is driven by the task that awaits it (handing every call to another thread cost more than it
//! saved: c=64 fell from 187k to 67k calls/s).

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::Poll,
    time::Duration,
};

use tokio::sync::oneshot;

use crate::{Error, Result};

/// Where a server's or client's QUIC I/O runs: the endpoint, the connection drivers, the tasks
/// that serve what the peer opens (and, on a server, the handlers).
///
/// Measured on 2 cores, 32 B echo calls (BENCHMARKS.md has the tables):
/// a dedicated I/O thread lets 10-20 calls share a UDP packet under load and more than doubles
/// calls/s at 64-256 concurrent callers when the application runs a multi-thread runtime; it
/// costs latency when a single caller waits for each reply (two more thread wake-ups per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Placement {
    /// Servers: a dedicated I/O thread. Clients: the caller's runtime if it is a current_thread
    /// runtime (everything then shares one thread already), else the I/O thread all clients of
    /// the process share.
    #[default]
    Auto,
    /// The runtime of the task that binds or connects. Best single-caller latency on a
    /// multi-thread runtime; lower throughput under concurrency.
    CallerRuntime,
    /// A dedicated I/O thread: one per server, one shared by all clients of the process.
    IoThread,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// How many shared client I/O threads this process started (one, once any client needed it).
static CLIENT_THREADS_STARTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The id of the I/O thread this thread is, or 0.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Where one side's I/O runs: a dedicated I/O thread, or (`dedicated: None`) the runtime of the
/// caller, where work runs inline. Cloning is cheap; a thread runs until [`IoRuntime::stop`].
#[derive(Debug, Clone)]
pub(crate) struct IoRuntime {
    /// `None`: the caller's runtime, where work runs inline.
    dedicated: Option<Dedicated>,
}

#[derive(Debug, Clone)]
struct Dedicated {
    handle: tokio::runtime::Handle,
    id: usize,
    stop: std::sync::Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>,
}

impl IoRuntime {
    /// Starts a new I/O thread that runs until [`stop`](Self::stop).
    pub(crate) fn start(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                CURRENT.with(|c| c.set(id));
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
                // Give tasks that are closing connections a moment, then drop the runtime.
                runtime.shutdown_timeout(std::time::Duration::from_millis(100));
            })?;
        Ok(Self {
            dedicated: Some(Dedicated {
                handle,
                id,
                stop: std::sync::Arc::new(std::sync::Mutex::new(Some(stop_tx))),
            }),
        })
    }

    /// Where a server with this placement runs its I/O.
    pub(crate) fn for_server(placement: Placement) -> Result<Self> {
        match placement {
            Placement::Auto | Placement::IoThread => Self::start("quicx-server-io"),
            Placement::CallerRuntime => Ok(Self::caller()),
        }
    }

    /// Where a client with this placement establishes and drives its connections. Must run
    /// inside a tokio runtime.
    pub(crate) fn for_client(placement: Placement) -> Result<Self> {
        let current_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        match placement {
            Placement::Auto if current_thread => Ok(Self::caller()),
            Placement::Auto | Placement::IoThread => Self::shared_client(),
            Placement::CallerRuntime => Ok(Self::caller()),
        }
    }

    /// The I/O thread the clients of this process share for their connection drivers. Started
    /// once, by the first caller, however many race for it; it runs for the life of the process.
    pub(crate) fn shared_client() -> Result<Self> {
        static SHARED: std::sync::Mutex<Option<IoRuntime>> = std::sync::Mutex::new(None);
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(io) = shared.as_ref() {
            return Ok(io.clone());
        }
        let io = Self::start("quicx-client-io")?;
        CLIENT_THREADS_STARTED.fetch_add(1, Ordering::Relaxed);
        *shared = Some(io.clone());
        Ok(io)
    }

    /// Work runs on whatever runtime calls in (clients: a call's stream is driven by the task
    /// that awaits it, so no hand-over is paid per call).
    pub(crate) fn caller() -> Self {
        Self { dedicated: None }
    }

    /// Whether work already runs where it should: on the caller's runtime, or on this thread.
    pub(crate) fn is_current(&self) -> bool {
        self.dedicated
            .as_ref()
            .is_none_or(|d| CURRENT.with(|c| c.get() == d.id))
    }

    /// Enters the I/O runtime's context: sockets and tasks created meanwhile belong to it.
    pub(crate) fn enter(&self) -> Option<tokio::runtime::EnterGuard<'_>> {
        self.dedicated.as_ref().map(|d| d.handle.enter())
    }

    /// Runs `fut` on the I/O thread and returns its output; directly when already on it.
    /// Dropping the returned future cancels `fut`.
    pub(crate) async fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Some(dedicated) = self.dedicated.as_ref().filter(|_| !self.is_current()) else {
            return Ok(fut.await);
        };
        let mut task = AbortOnDrop(dedicated.handle.spawn(fut));
        (&mut task.0)
            .await
            .map_err(|e| Error::Internal(format!("quicx I/O task failed: {e}")))
    }

    /// Spawns `fut` on the I/O thread.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.dedicated {
            Some(d) => drop(d.handle.spawn(fut)),
            None => drop(tokio::spawn(fut)),
        }
    }

    /// Stops the thread (servers, after shutdown).
    pub(crate) fn stop(&self) {
        if let Some(stop) = self.dedicated.as_ref().map(|d| &d.stop) {
            if let Some(tx) = stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Aborts a task when dropped: a caller that stops waiting cancels the work.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The deadline passed (see [`within`]).
#[derive(Debug)]
pub(crate) struct Elapsed;

/// `fut` bounded by `limit`, like `tokio::time::timeout`, but the timer is created only if `fut`
/// is not ready at once: the common case of a push or frame that completes in one poll pays no
/// clock read and no timer-wheel entry.
pub(crate) async fn within<F: Future>(limit: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many first callers at once start one shared client thread, not several.
    #[test]
    fn the_shared_client_thread_starts_once() {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    IoRuntime::shared_client().map(|io| io.dedicated.map(|d| d.id))
                })
            })
            .collect();
        let ids: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "{ids:?}"
        );
        assert_eq!(CLIENT_THREADS_STARTED.load(Ordering::Relaxed), 1);
    }
}
