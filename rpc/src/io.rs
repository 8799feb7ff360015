//! Where work runs: I/O threads (`IoRuntime`), each a current_thread runtime that drives QUIC
//! endpoints and connections, and the handler pool (`HandlerPool`), a work-stealing runtime for
//! handlers that proved slow.
//!
//! quinn's connection driver and the tasks that read and write its streams wake each other for
//! every packet. On a multi-thread runtime those wake-ups cross threads and each call costs about
//! 1.5 UDP packets; on one thread 10-20 calls share a packet and the CPU cost per call falls
//! several times (BENCHMARKS.md has the numbers). So a quicx server runs **one I/O thread per
//! core**, each with its own endpoint on a `SO_REUSEPORT` socket of the same port (Linux; one
//! thread elsewhere): the kernel hands each packet to the socket its destination connection id
//! names (`config::ShardCid`; the address hash where that cannot be set up, see
//! `ServerBuilder::io_threads`), so each connection, its streams and its short handlers live on
//! one thread whatever address its packets come from, and connections spread over all cores.
//! A handler whose polls hold its I/O thread longer than [`INLINE_BUDGET`] twice within 1,024
//! polls marks its method slow: the method's later calls run on the handler pool, so one slow method never
//! stalls the other connections of its thread (it comes back once its polls stay short; see
//! `PollStats` in `service.rs`). Reverse calls and pushes with receipt issued from application
//! tasks are handed to the thread that owns the connection; a plain push is written by the task
//! that sends it (it waits for no reply, and handing each push over made it about 10× slower),
//! with its timer on that thread's clock.
//!
//! Clients ([`Placement::Auto`]): on a current_thread runtime everything already shares one
//! thread, so the connection is driven there. On a multi-thread runtime the first
//! [`AUTO_CALLER_CLIENTS`] live clients of the process are driven on that runtime too, as a
//! task beside the callers (no thread hand-off per call: a single caller waiting on each reply
//! made 13-14k calls/s against 10k from an I/O thread, on 2 cores); clients beyond them (a
//! gateway, a fleet simulator) are driven by the process's client I/O threads (one per core,
//! assigned in turn), so thousands of handshakes never queue in the application's runtime ahead
//! of its first clients' calls. Each call's stream is driven by the task that awaits it
//! (handing every call to another thread cost more than it saved: c=64 fell from 187k to 67k
//! calls/s).

use crate::sync::Lock;
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

/// Where a server's or client's QUIC I/O runs: the endpoints, the connection drivers, the tasks
/// that serve what the peer opens (and, on a server, the handlers that proved short).
///
/// Measured on 2 cores, 32 B echo calls (BENCHMARKS.md has the tables): dedicated I/O threads
/// let 10-20 calls share a UDP packet under load and more than double calls/s at 64-256
/// concurrent callers when the application runs a multi-thread runtime; they cost latency when a
/// single caller waits for each reply (two more thread wake-ups per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Placement {
    /// Servers: one dedicated I/O thread per core (see
    /// [`ServerBuilder::io_threads`](crate::ServerBuilder::io_threads)). Clients: the caller's
    /// runtime if it is a current_thread runtime (everything then shares one thread already);
    /// on a multi-thread runtime, the caller's runtime for the process's first 64 live clients
    /// (a client keeps its place, reconnects included, until it is closed or dropped), and one
    /// of the I/O threads (one per core) all clients of the process share for the ones beyond
    /// (and for a client made by a handler running on quicx's handler pool). Measured on
    /// 2 cores: a single caller waiting on each reply makes 13-14k calls/s on the caller's
    /// runtime against 10k from an I/O thread; a process opening 3,000 connections at once kept
    /// a first client's calls at p50 6-7 ms during the storm, against 19-41 ms with every client
    /// on the I/O threads and 126 ms with every client on the caller's runtime (BENCHMARKS.md).
    #[default]
    Auto,
    /// The runtime of the task that binds or connects, however many clients there are: the
    /// handshakes of a process opening thousands of connections at once then share the
    /// application's workers with its calls (p50 126 ms for a first client's calls during such
    /// a storm on 2 cores; BENCHMARKS.md).
    CallerRuntime,
    /// Dedicated I/O threads: a server's own (one per core by default), or the ones all clients
    /// of the process share.
    IoThread,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// How many shared client I/O threads this process started (one per core, once any client
/// needed them).
static CLIENT_THREADS_STARTED: AtomicUsize = AtomicUsize::new(0);

/// How long one poll of a handler may hold its I/O thread. A method whose handler took longer
/// twice within 1,024 polls (long CPU work, blocking calls) runs its later calls on the handler
/// pool. Shorter work stays
/// inline: handing each call to the pool costs two cross-thread wake-ups, and measured on 2 cores
/// with a 100 µs handler (4 connections) the inline path made 12-13k calls/s against 9k pooled.
pub(crate) const INLINE_BUDGET: std::time::Duration = std::time::Duration::from_millis(1);

/// The cores of this machine (at least 1).
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

thread_local! {
    /// The id of the I/O thread this thread is, or 0.
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread is a worker of the handler pool.
    static IN_HANDLER_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Where one side's I/O runs: a dedicated I/O thread, or (`dedicated: None`) the runtime of the
/// caller, where work runs inline. Cloning is cheap; a thread runs until [`IoRuntime::stop`].
#[derive(Debug, Clone)]
pub(crate) struct IoRuntime {
    /// `None`: the caller's runtime, where work runs inline.
    dedicated: Option<Dedicated>,
    /// A client that [`Placement::Auto`] put on the caller's multi-thread runtime holds one of
    /// the process's [`AUTO_CALLER_CLIENTS`] places there until every clone is dropped.
    _place: Option<std::sync::Arc<CallerPlace>>,
}

/// How many clients of a process [`Placement::Auto`] drives on the caller's multi-thread
/// runtime; the ones after them, while these live, go to the shared client I/O threads.
pub(crate) const AUTO_CALLER_CLIENTS: usize = 64;

/// Clients of this process holding a place on the caller's runtime.
static AUTO_ON_CALLER: AtomicUsize = AtomicUsize::new(0);

/// One of the [`AUTO_CALLER_CLIENTS`] places, given back when its client closes or when
/// dropped, whichever comes first.
#[derive(Debug)]
struct CallerPlace {
    given_back: std::sync::atomic::AtomicBool,
}

impl CallerPlace {
    /// A place, if one is free.
    fn take() -> Option<Self> {
        AUTO_ON_CALLER
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < AUTO_CALLER_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self {
                given_back: std::sync::atomic::AtomicBool::new(false),
            })
    }

    /// Gives the place back (only the first call does).
    fn give_back(&self) {
        if !self.given_back.swap(true, Ordering::AcqRel) {
            AUTO_ON_CALLER.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for CallerPlace {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[derive(Debug, Clone)]
struct Dedicated {
    handle: tokio::runtime::Handle,
    id: usize,
    stop: std::sync::Arc<std::sync::Mutex<Option<oneshot::Sender<()>>>>,
    load: std::sync::Arc<Load>,
}

/// How busy an I/O thread was lately: the share of wall time its runtime spent running tasks,
/// sampled at most every [`LOAD_WINDOW`].
#[derive(Debug)]
struct Load {
    /// (when, busy total then) of the last sample.
    last: std::sync::Mutex<(std::time::Instant, Duration)>,
    /// The share, in thousandths, over the last window.
    permille: AtomicUsize,
}

/// How often an I/O thread's load is sampled.
const LOAD_WINDOW: Duration = Duration::from_millis(20);

/// The calling thread's CPU time and voluntary context switches (Linux: `CLOCK_THREAD_CPUTIME_ID`
/// and `getrusage(RUSAGE_THREAD)`, two system calls), to tell a handler poll that held its thread
/// (ran, or blocked: sleeping, waiting on a lock or the disk) from one the OS preempted (the thread
/// was ready and another ran: on a busy machine a 100 µs handler's poll now and then spans another
/// thread's time slice, which made methods look slow and sent their calls to the pool for good).
/// Elsewhere `now` gives `None` and polls count as measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadClock {
    cpu: Duration,
    voluntary_switches: std::ffi::c_long,
}

impl ThreadClock {
    /// The calling thread's clock now, where the OS tells it.
    pub(crate) fn now() -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            use nix::sys::resource::{UsageWho, getrusage};
            // getrusage's CPU times lag up to a scheduler tick for a running thread; this clock
            // is exact.
            let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
            let usage = getrusage(UsageWho::RUSAGE_THREAD).ok()?;
            Some(Self {
                cpu: Duration::from(cpu),
                voluntary_switches: usage.voluntary_context_switches(),
            })
        }
        #[cfg(not(target_os = "linux"))]
        None
    }

    /// The CPU time the calling thread ran since `self` was read on it, if it never blocked in
    /// between (no voluntary context switch); `None` if it did, or if the clock cannot be read.
    pub(crate) fn ran_without_blocking(self) -> Option<Duration> {
        let now = Self::now()?;
        (now.voluntary_switches == self.voluntary_switches)
            .then(|| now.cpu.saturating_sub(self.cpu))
    }
}

/// A method whose polls average at least this long (each counted at most 4 × this; see
/// `PollStats` in `service.rs`) is *heavy*: while its I/O thread is overloaded, its calls go to
/// the handler pool, where idle cores take them.
pub(crate) const HEAVY_POLL: Duration = Duration::from_micros(50);

/// An I/O thread busier than this (thousandths of wall time) sheds heavy handlers to the pool
/// while a sibling has spare time ...
const OVERLOADED_PERMILLE: usize = 800;

/// ... that is, is at least this much less busy. Since new connections are spread by count
/// (`ThreadLoads::least_loaded` in `server.rs`), threads with equal connections differ only by the
/// noise of their 20 ms windows, and shedding then costs more than it balances: with 4 connections
/// of 100 µs handlers on 2 threads, a margin of 150 shed about 12% of the calls and ran at
/// 0.83-0.89× tarpc, 400 at 0.91-0.92×, no shedding at 0.90-1.02×. It stays for connections of
/// unequal work.
const SPARE_MARGIN_PERMILLE: usize = 400;

/// Whether a thread this busy (thousandths) sheds heavy handlers while a sibling is that busy.
fn sheds_to(own: usize, sibling: usize) -> bool {
    own > OVERLOADED_PERMILLE && sibling + SPARE_MARGIN_PERMILLE < own
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
                load: std::sync::Arc::new(Load {
                    last: std::sync::Mutex::new((std::time::Instant::now(), Duration::ZERO)),
                    permille: AtomicUsize::new(0),
                }),
            }),
            _place: None,
        })
    }

    /// The I/O threads of a server with this placement: `threads` dedicated ones, or the
    /// caller's runtime.
    pub(crate) fn for_server(placement: Placement, threads: usize) -> Result<Vec<Self>> {
        match placement {
            Placement::Auto | Placement::IoThread => (0..threads.max(1))
                .map(|i| Self::start(&format!("quicx-server-io-{i}")))
                .collect(),
            Placement::CallerRuntime => Ok(vec![Self::caller()]),
        }
    }

    /// Where a client with this placement establishes and drives its connection. Must run
    /// inside a tokio runtime.
    pub(crate) fn for_client(placement: Placement) -> Result<Self> {
        match placement {
            Placement::Auto if Self::on_current_thread_runtime() => Ok(Self::caller()),
            // A client made by a handler that proved slow: not on the pool its runtime is,
            // where slow handlers would hold up its connection.
            Placement::Auto if IN_HANDLER_POOL.with(Cell::get) => Self::shared_client(),
            Placement::Auto => match CallerPlace::take() {
                Some(place) => Ok(Self {
                    dedicated: None,
                    _place: Some(std::sync::Arc::new(place)),
                }),
                None => Self::shared_client(),
            },
            Placement::IoThread => Self::shared_client(),
            Placement::CallerRuntime => Ok(Self::caller()),
        }
    }

    /// Where a [`ClientEndpoint`](crate::ClientEndpoint) (a socket shared by many clients,
    /// as fleet simulators and gateways use) is driven: the caller's runtime if it is a
    /// current_thread one, else a shared client I/O thread.
    pub(crate) fn for_shared_endpoint() -> Result<Self> {
        if Self::on_current_thread_runtime() {
            Ok(Self::caller())
        } else {
            Self::shared_client()
        }
    }

    /// Where the sockets of a [`ClientEndpoint`](crate::ClientEndpoint) bound to any port are
    /// driven: the caller's runtime if it is a current_thread one, else every shared client I/O
    /// thread, one socket each (a connection then lives on the thread that reads its packets).
    pub(crate) fn for_shared_endpoints() -> Result<Vec<Self>> {
        if Self::on_current_thread_runtime() {
            Ok(vec![Self::caller()])
        } else {
            Ok(Self::shared_clients()?.clone())
        }
    }

    fn on_current_thread_runtime() -> bool {
        tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
    }

    /// One of the I/O threads the clients of this process share (one per core, started once by
    /// the first caller however many race for them, running for the life of the process),
    /// assigned in turn.
    pub(crate) fn shared_client() -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let shared = Self::shared_clients()?;
        let next = NEXT.fetch_add(1, Ordering::Relaxed) % shared.len();
        Ok(shared[next].clone())
    }

    /// The process's client I/O threads, started by the first caller.
    fn shared_clients() -> Result<std::sync::MutexGuard<'static, Vec<Self>>> {
        static SHARED: std::sync::Mutex<Vec<IoRuntime>> = std::sync::Mutex::new(Vec::new());
        let mut shared = SHARED.locked();
        if shared.is_empty() {
            for i in 0..cores() {
                shared.push(Self::start(&format!("quicx-client-io-{i}"))?);
            }
            CLIENT_THREADS_STARTED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(shared)
    }

    /// Whether this I/O thread was busy more than 80% of the time lately while one of
    /// `siblings` was at least 40 points less busy (never for the caller's runtime): then heavy
    /// handlers go to the
    /// pool instead, so connections that the kernel happened to put on one thread do not leave
    /// other cores idle. Threads equally busy keep their handlers inline (the hand-over costs
    /// more than it saves).
    pub(crate) fn overloaded_among(&self, siblings: &[Self]) -> bool {
        let own = self.load_permille();
        own > OVERLOADED_PERMILLE
            && siblings
                .iter()
                .any(|s| s.id() != self.id() && sheds_to(own, s.load_permille()))
    }

    /// The share of the last window this thread spent running tasks, in thousandths.
    fn load_permille(&self) -> usize {
        let Some(d) = &self.dedicated else {
            return 0;
        };
        let now = std::time::Instant::now();
        if let Ok(mut last) = d.load.last.try_lock() {
            let elapsed = now.duration_since(last.0);
            if elapsed >= LOAD_WINDOW {
                let busy = d.handle.metrics().worker_total_busy_duration(0);
                let share = busy.saturating_sub(last.1).as_secs_f64() / elapsed.as_secs_f64();
                d.load
                    .permille
                    .store((share * 1000.0) as usize, Ordering::Relaxed);
                *last = (now, busy);
            }
        }
        d.load.permille.load(Ordering::Relaxed)
    }

    /// Gives back the caller-runtime place this client held, if any (it closed for good: the
    /// next client may take it).
    pub(crate) fn give_back_place(&self) {
        if let Some(place) = &self._place {
            place.give_back();
        }
    }

    /// A number that tells I/O threads apart (0 for the caller's runtime).
    pub(crate) fn id(&self) -> usize {
        self.dedicated.as_ref().map_or(0, |d| d.id)
    }

    /// Work runs on whatever runtime calls in (clients: a call's stream is driven by the task
    /// that awaits it, so no hand-over is paid per call).
    pub(crate) fn caller() -> Self {
        Self {
            dedicated: None,
            _place: None,
        }
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
    /// Dropping the returned future cancels `fut`. Fails with
    /// `ConnectionLost(LocallyClosed)` when the I/O thread stopped (its server shut down)
    /// before `fut` finished, and with `Internal` if `fut` panicked.
    ///
    /// Not an `async fn`: one would hold `fut` twice (as its argument and as what it awaits),
    /// and a call's future nests several of these.
    pub(crate) fn run<F>(&self, fut: F) -> impl Future<Output = Result<F::Output>> + use<F>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        use futures_util::{FutureExt, future::Either};
        match self.elsewhere() {
            None => Either::Left(fut.map(Ok)),
            Some(handle) => Either::Right(run_there(handle, move || fut)),
        }
    }

    /// [`run`](Self::run) for the future `make` builds, built where it runs: the returned
    /// future holds `make` (what the work needs), not the work's future, which lives in the
    /// I/O thread's task. Same contract as `run`.
    pub(crate) fn run_built<M, F>(
        &self,
        make: M,
    ) -> impl Future<Output = Result<F::Output>> + use<M, F>
    where
        M: FnOnce() -> F + Send + 'static,
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        use futures_util::{FutureExt, future::Either};
        match self.elsewhere() {
            // Here already: built now, boxed so that the caller's future stays small.
            None => Either::Left(Box::pin(make()).map(Ok)),
            Some(handle) => Either::Right(run_there(handle, make)),
        }
    }

    /// The I/O thread's runtime, when the caller is not on it (`None`: run here).
    fn elsewhere(&self) -> Option<tokio::runtime::Handle> {
        self.dedicated
            .as_ref()
            .filter(|_| !self.is_current())
            .map(|d| d.handle.clone())
    }

    /// `fut` bounded by `limit` (see [`within`]), driven by the task that awaits it, wherever
    /// that runs; the timer, when one is needed, is this I/O thread's (the caller's runtime
    /// for [`caller`](Self::caller)). An application task that pushes through a connection
    /// driven here so needs no timer of its own runtime.
    pub(crate) fn within<F: Future>(&self, limit: Duration, fut: F) -> Within<'_, F> {
        within_on(self.dedicated.as_ref().map(|d| &d.handle), limit, fut)
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
            if let Some(tx) = stop.locked().take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Runs the future `make` builds as a task on `handle` (built there, at the first poll);
/// dropping the returned future aborts the task. See [`IoRuntime::run`].
async fn run_there<M, F>(handle: tokio::runtime::Handle, make: M) -> Result<F::Output>
where
    M: FnOnce() -> F + Send + 'static,
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut task = AbortOnDrop(handle.spawn(async move { make().await }));
    (&mut task.0).await.map_err(io_task_failed)
}

/// The error of a task on an I/O thread that did not finish.
fn io_task_failed(e: tokio::task::JoinError) -> Error {
    if e.is_cancelled() {
        // The I/O thread stopped (its server shut down): what ran there was closed.
        Error::ConnectionLost(quinn::ConnectionError::LocallyClosed)
    } else {
        Error::Internal(format!("quicx I/O task failed: {e}"))
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
pub(crate) fn within<F: Future>(limit: Duration, fut: F) -> Within<'static, F> {
    within_on(None, limit, fut)
}

/// [`within`] with its timer on `clock`'s runtime (`None`: the caller's).
fn within_on<F: Future>(
    clock: Option<&tokio::runtime::Handle>,
    limit: Duration,
    fut: F,
) -> Within<'_, F> {
    Within {
        fut,
        timer: None,
        clock,
        limit,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`within`]: `fut` held once, in place. An `async fn` wrapper holds it
    /// twice (its argument, then what it awaits), and a call's future nests several: with one,
    /// `Client::call_raw`'s future was 5,112 bytes and `XClient::call_raw`'s 49,528; with this
    /// (and `IoRuntime::run` made the same way, `run_built` for the round trip), 1,384 and
    /// 5,752 (`-Zprint-type-sizes`).
    pub(crate) struct Within<'c, F> {
        #[pin]
        fut: F,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        clock: Option<&'c tokio::runtime::Handle>,
        limit: Duration,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let (clock, limit) = (*this.clock, *this.limit);
        let timer = this.timer.get_or_insert_with(|| {
            let _clock = clock.map(tokio::runtime::Handle::enter);
            Box::pin(tokio::time::sleep(limit))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The work-stealing runtime that runs handlers which proved slow (see [`INLINE_BUDGET`]), and
/// heavy ones shed off an overloaded I/O thread: one worker per core, shared by every server of the process, started on first use.
pub(crate) fn handler_pool() -> Result<tokio::runtime::Handle> {
    static POOL: std::sync::Mutex<Option<tokio::runtime::Runtime>> = std::sync::Mutex::new(None);
    static HANDLE: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    // Every pooled call asks: no lock once the pool runs.
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let mut pool = POOL.locked();
    if let Some(runtime) = pool.as_ref() {
        return Ok(runtime.handle().clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores())
        .thread_name("quicx-handler")
        .on_thread_start(|| IN_HANDLER_POOL.with(|p| p.set(true)))
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    *pool = Some(runtime);
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heavy handlers leave an overloaded thread only for a sibling clearly less busy: two
    /// equally loaded threads whose 20 ms windows differ by noise keep their handlers.
    #[test]
    fn heavy_handlers_shed_only_to_a_sibling_forty_points_less_busy() {
        assert!(!sheds_to(950, 700), "noise between two busy threads");
        assert!(!sheds_to(950, 550));
        assert!(sheds_to(950, 540));
        assert!(sheds_to(1000, 0));
        assert!(!sheds_to(800, 0), "not overloaded");
    }

    /// A thread that sleeps blocked; one that spins ran (its CPU time, at most the wall time).
    #[cfg(target_os = "linux")]
    #[test]
    fn the_thread_clock_tells_blocking_from_running() {
        let clock = ThreadClock::now().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(clock.ran_without_blocking(), None);
        let clock = ThreadClock::now().unwrap();
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(3) {
            std::hint::spin_loop();
        }
        let ran = clock
            .ran_without_blocking()
            .expect("spinning does not block");
        assert!(ran > Duration::ZERO && ran <= started.elapsed(), "{ran:?}");
    }

    #[test]
    fn auto_drives_the_first_clients_on_a_multi_thread_caller_runtime_and_the_rest_on_io_threads() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let _rt = rt.enter();
        // Other tests of this process may hold places too: take them until one is refused.
        let mut held = Vec::new();
        let refused = loop {
            let io = IoRuntime::for_client(Placement::Auto).unwrap();
            if io.dedicated.is_some() {
                break io;
            }
            assert!(
                io._place.is_some(),
                "an Auto client on the caller's runtime holds a place"
            );
            held.push(io);
            assert!(
                held.len() <= AUTO_CALLER_CLIENTS,
                "more than {AUTO_CALLER_CLIENTS} places"
            );
        };
        assert!(refused._place.is_none());
        // A clone shares its client's place; the place comes back when the last one goes.
        let clone = held.last().unwrap().clone();
        held.pop();
        assert!(
            IoRuntime::for_client(Placement::Auto)
                .unwrap()
                .dedicated
                .is_some()
        );
        drop(clone);
        let again = IoRuntime::for_client(Placement::Auto).unwrap();
        assert!(again.dedicated.is_none() && again._place.is_some());
        // A client that closes gives its place back at once, and its drop later gives nothing
        // back a second time.
        again.give_back_place();
        again.give_back_place();
        let next = IoRuntime::for_client(Placement::Auto).unwrap();
        assert!(
            next._place.is_some(),
            "the closed client's place goes to the next"
        );
        let is_refused = || {
            IoRuntime::for_client(Placement::Auto)
                .unwrap()
                .dedicated
                .is_some()
        };
        assert!(is_refused(), "one place came back, not two");
        drop(again);
        assert!(is_refused(), "the closed client's drop frees nothing more");
        drop(next);
        // Explicit placements and shared endpoints do not take places.
        drop(held);
        let before = AUTO_ON_CALLER.load(Ordering::Acquire);
        assert!(
            IoRuntime::for_client(Placement::CallerRuntime)
                .unwrap()
                ._place
                .is_none()
        );
        assert!(
            IoRuntime::for_client(Placement::IoThread)
                .unwrap()
                .dedicated
                .is_some()
        );
        assert!(
            IoRuntime::for_shared_endpoint()
                .unwrap()
                .dedicated
                .is_some()
        );
        assert!(AUTO_ON_CALLER.load(Ordering::Acquire) <= before);
        // Nor does a client made on the handler pool: it goes to an I/O thread.
        let on_pool = handler_pool().unwrap().spawn(async {
            IoRuntime::for_client(Placement::Auto)
                .map(|io| (io.dedicated.is_some(), io._place.is_some()))
        });
        assert_eq!(rt.block_on(on_pool).unwrap().unwrap(), (true, false));
    }

    /// Many first callers at once start one set of shared client threads, not several.
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
        assert!(ids.iter().all(Option::is_some), "{ids:?}");
        // One set of threads, one per core, assigned in turn.
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), cores().min(8), "{ids:?}");
        assert_eq!(CLIENT_THREADS_STARTED.load(Ordering::Relaxed), 1);
    }
}
