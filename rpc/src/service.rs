//! Services: named sets of methods, each an async handler.

use crate::sync::ReadWrite;
use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::{Codec, Context, ServiceError, wire::status};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type HandlerFn =
    dyn Fn(Context, Codec, Bytes) -> BoxFuture<Result<Bytes, ServiceError>> + Send + Sync;

/// The message a panic carried (`panic!("...")`), for the caller's `INTERNAL` status.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "handler panicked".to_owned())
}

/// One registered method: its erased handler, and where its calls run.
pub(crate) struct Method {
    run: Box<HandlerFn>,
    /// What its handlers' polls took lately: whether its calls run inline or on the pool.
    polls: PollStats,
    /// This method's call metrics, registered on its first call.
    pub(crate) series: std::sync::OnceLock<crate::metrics::ServedSeries>,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Method")
            .field("slow", &self.is_slow())
            .field("heavy", &self.is_heavy())
            .finish_non_exhaustive()
    }
}

impl Method {
    fn new(run: Box<HandlerFn>) -> Self {
        Self {
            run,
            polls: PollStats::default(),
            series: std::sync::OnceLock::new(),
        }
    }

    /// Starts a call of this method.
    pub(crate) fn call(
        &self,
        ctx: Context,
        codec: Codec,
        payload: Bytes,
    ) -> BoxFuture<Result<Bytes, ServiceError>> {
        (self.run)(ctx, codec, payload)
    }

    /// Whether calls run on the handler pool.
    pub(crate) fn is_slow(&self) -> bool {
        self.polls.slow.load(Ordering::Relaxed)
    }

    /// Whether the method's work is heavy enough to be worth moving off a busy I/O thread.
    pub(crate) fn is_heavy(&self) -> bool {
        self.polls.is_heavy()
    }

    /// Whether this method's polls are checked for preemption (see `PollStats`).
    pub(crate) fn checks_preemption(&self) -> bool {
        self.polls.checks_preemption()
    }

    /// Records how long one poll of a handler took, inline or on the pool. Returns what changed:
    /// `Some(true)` when the method just became slow, `Some(false)` when it just came back.
    pub(crate) fn record_poll(&self, took: std::time::Duration) -> Option<bool> {
        self.polls.record(took)
    }
}

/// What a method's handler polls took lately, kept so that a poll that looked long only
/// because the OS preempted its thread (on a busy machine a poll of a trivial handler now and
/// then spans a time slice of another thread) does not move the method. Where the OS tells
/// (Linux), a poll is checked once its method has overrun once: one that did not block and ran
/// for less than the budget counts for the CPU time it ran, however long it took (see
/// [`ThreadClock`](crate::io::ThreadClock)); the first overrun of a method is counted as
/// measured, so a method is never checked until it overruns.
///
/// - **slow** (its calls run on the handler pool) after two polls over the inline budget
///   ([`INLINE_BUDGET`](crate::io::INLINE_BUDGET)) within [`STRIKE`] polls of each other; a
///   handler that blocks or runs long does that on every call, so it moves after its second
///   call;
/// - **back inline** after [`HEAL`] polls in a row within the budget on the pool: a method
///   that was slow once (a cold cache, a preempted poll twice) does not pay the hand-over
///   forever. So a wrong move costs 512 pooled calls, and the window can be wide: a method
///   that blocks on one call in 1,000 (a blocking cache miss) still moves, though between two
///   blocks it may come back and then hold its thread once more; one that blocks less often
///   than once in 1,024 polls stays inline, and each of its overruns holds its I/O thread
///   (register such code with [`blocking_method`](Service::blocking_method));
/// - **heavy** (moved off an overloaded I/O thread, see
///   [`overloaded_among`](crate::io::IoRuntime::overloaded_among)) while the moving average of
///   its polls, each counted at most [`AVERAGE_CAP`], is at least
///   [`HEAVY_POLL`](crate::io::HEAVY_POLL): about three preempted polls in a row are needed
///   for a trivial handler to look heavy, and a handler doing 100 µs of work looks heavy
///   after a few calls.
///
/// Updated with plain loads and stores (calls of one method on several threads may lose an
/// update, which only delays a decision by a poll) and written only when a value changes, so a
/// method called from every I/O thread does not bounce a cache line per call.
#[derive(Debug, Default)]
struct PollStats {
    slow: AtomicBool,
    /// Evidence of overruns: +`STRIKE` per poll over the budget, -1 per poll within it.
    strikes: AtomicU32,
    /// While slow: polls in a row within the budget.
    streak: AtomicU32,
    /// Moving average (weight 1/8) of the polls, in eighths of a µs, each counted at most
    /// `AVERAGE_CAP`.
    average: AtomicU32,
}

/// An overrun's weight, and the number of polls within the budget that forget it.
const STRIKE: u32 = 1024;
/// Polls in a row within the budget that bring a slow method back inline.
const HEAL: u32 = 512;
/// The most one poll adds to the moving average: 4 × `HEAVY_POLL`.
const AVERAGE_CAP: std::time::Duration = std::time::Duration::from_micros(200);

impl PollStats {
    /// Whether polls are checked for preemption ([`ThreadClock`](crate::io::ThreadClock)):
    /// while an overrun is remembered (the next one would move the method) or the method is
    /// slow (an overrun there restarts its way back). No overrun lately: nothing is checked.
    fn checks_preemption(&self) -> bool {
        self.slow.load(Ordering::Relaxed) || self.strikes.load(Ordering::Relaxed) > 0
    }

    fn is_heavy(&self) -> bool {
        self.average.load(Ordering::Relaxed) >= 8 * crate::io::HEAVY_POLL.as_micros() as u32
    }

    fn record(&self, took: std::time::Duration) -> Option<bool> {
        let sample = took.min(AVERAGE_CAP).as_micros() as u32;
        let average = self.average.load(Ordering::Relaxed);
        let next = average - average / 8 + sample;
        if next != average {
            self.average.store(next, Ordering::Relaxed);
        }
        let slow = self.slow.load(Ordering::Relaxed);
        if took > crate::io::INLINE_BUDGET {
            if slow {
                if self.streak.load(Ordering::Relaxed) != 0 {
                    self.streak.store(0, Ordering::Relaxed);
                }
                return None;
            }
            let strikes = self.strikes.load(Ordering::Relaxed) + STRIKE;
            if strikes > STRIKE {
                self.strikes.store(0, Ordering::Relaxed);
                self.streak.store(0, Ordering::Relaxed);
                self.slow.store(true, Ordering::Relaxed);
                return Some(true);
            }
            self.strikes.store(strikes, Ordering::Relaxed);
        } else if slow {
            let streak = self.streak.load(Ordering::Relaxed) + 1;
            if streak >= HEAL {
                self.streak.store(0, Ordering::Relaxed);
                // A short poll racing the move to the pool may have left strikes behind.
                self.strikes.store(0, Ordering::Relaxed);
                self.slow.store(false, Ordering::Relaxed);
                return Some(false);
            }
            self.streak.store(streak, Ordering::Relaxed);
        } else {
            let strikes = self.strikes.load(Ordering::Relaxed);
            if strikes > 0 {
                self.strikes.store(strikes - 1, Ordering::Relaxed);
            }
        }
        None
    }
}

/// A named set of methods (rpcx's service). Register it on a [`Server`](crate::Server) under a
/// service path, or on a [`Client`](crate::Client) so the server can call it back.
///
/// A method is an async fn or closure taking the [`Context`] and the decoded arguments, returning
/// the reply or a [`ServiceError`]:
///
/// ```
/// use quicx::{Context, Service, ServiceError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Args { a: i64, b: i64 }
///
/// async fn div(_ctx: Context, args: Args) -> Result<i64, ServiceError> {
///     if args.b == 0 {
///         return Err(ServiceError::new(4000, "divide by zero"));
///     }
///     Ok(args.a / args.b)
/// }
///
/// let arith = Service::new()
///     .method("Mul", |_ctx: Context, args: Args| async move { Ok(args.a * args.b) })
///     .method("Div", div);
/// assert!(arith.has_method("Div"));
/// ```
///
/// # Where handlers run, and what an async handler must not do
/// On a server, a call's handler first runs on the I/O thread that owns the connection (no
/// hand-over: trivial handlers cost least there). If polls of a method's handler hold that thread
/// longer than 1 ms twice within 1,024 polls — long CPU work, a blocking call — the method is
/// marked slow and its later calls run on a work-stealing pool with one worker per core, so other
/// connections go on. (One long poll alone moves nothing: on a busy machine the OS preempting
/// the thread in the middle of a trivial handler looks the same.) A slow method whose polls then
/// stay under 1 ms for 512 polls in a row on the pool runs inline again. The first two such calls still hold
/// their I/O thread for as long as they block: an async handler must not block
/// (`std::thread::sleep`, blocking I/O or locks held across long waits). Register blocking code
/// with [`blocking_method`](Self::blocking_method), which runs it on a blocking thread from the
/// first call.
#[derive(Clone, Default)]
pub struct Service {
    methods: HashMap<String, Arc<Method>>,
}

impl Service {
    /// A service with no methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a typed method. Arguments are decoded and the reply encoded with the codec the caller
    /// chose; a decode failure is answered with status `DECODE_ERROR` without running the handler.
    #[must_use]
    pub fn method<A, R, F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Context, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ServiceError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: Context, codec: Codec, payload: Bytes| -> BoxFuture<_> {
            let args = match codec.decode::<A>(&payload) {
                Ok(args) => args,
                Err(e) => {
                    let err = ServiceError::status(status::DECODE_ERROR, e.to_string());
                    return Box::pin(async move { Err(err) });
                }
            };
            let fut = handler(ctx, args);
            Box::pin(async move {
                let reply = fut.await?;
                codec
                    .encode(&reply)
                    .map_err(|e| ServiceError::status(status::ENCODE_ERROR, e.to_string()))
            })
        };
        self.methods
            .insert(name.into(), Arc::new(Method::new(Box::new(erased))));
        self
    }

    /// Adds a synchronous method that may block (a database driver, file I/O, a long
    /// computation): rpcx's handlers, as Go code writes them. Each call runs on a blocking
    /// thread (tokio's `spawn_blocking` pool), never on an I/O thread, so it delays only its own
    /// caller.
    ///
    /// # Cancel safety
    /// A blocking call cannot be interrupted: when the caller gives up (deadline, cancellation,
    /// shutdown) the reply is discarded but the closure runs to its end. Long handlers can check
    /// [`Context::is_cancelled`] to stop early.
    ///
    /// ```
    /// use quicx::{Context, Service};
    /// let files = Service::new().blocking_method("Read", |_ctx: Context, path: String| {
    ///     Ok(std::fs::read(path).unwrap_or_default())
    /// });
    /// assert!(files.has_method("Read"));
    /// ```
    #[must_use]
    pub fn blocking_method<A, R, F>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Context, A) -> Result<R, ServiceError> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        let erased = move |ctx: Context, codec: Codec, payload: Bytes| -> BoxFuture<_> {
            let handler = handler.clone();
            Box::pin(async move {
                let args = codec
                    .decode::<A>(&payload)
                    .map_err(|e| ServiceError::status(status::DECODE_ERROR, e.to_string()))?;
                let reply = tokio::task::spawn_blocking(move || {
                    let reply = handler(ctx, args)?;
                    codec
                        .encode(&reply)
                        .map_err(|e| ServiceError::status(status::ENCODE_ERROR, e.to_string()))
                })
                .await;
                match reply {
                    Ok(reply) => reply,
                    Err(e) if e.is_panic() => {
                        let message = panic_message(&*e.into_panic());
                        Err(ServiceError::status(status::INTERNAL, message))
                    }
                    Err(e) => Err(ServiceError::status(status::INTERNAL, e.to_string())),
                }
            })
        };
        // Only the hand-over to the blocking thread runs on the I/O thread.
        self.methods
            .insert(name.into(), Arc::new(Method::new(Box::new(erased))));
        self
    }

    /// Adds a method that takes and returns raw payload bytes, whatever the codec.
    #[must_use]
    pub fn raw_method<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Context, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, ServiceError>> + Send + 'static,
    {
        let erased = move |ctx: Context, _codec: Codec, payload: Bytes| -> BoxFuture<_> {
            Box::pin(handler(ctx, payload))
        };
        self.methods
            .insert(name.into(), Arc::new(Method::new(Box::new(erased))));
        self
    }

    /// Whether a method of this name is registered.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    pub(crate) fn handler(&self, name: &str) -> Option<Handler> {
        self.methods.get(name).cloned()
    }
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.methods.keys().collect();
        names.sort();
        f.debug_struct("Service").field("methods", &names).finish()
    }
}

/// The services registered on one side, shared with every connection of that side.
#[derive(Clone, Default, Debug)]
pub(crate) struct Services(Arc<RwLock<HashMap<String, Arc<Service>>>>);

/// A registered method.
pub(crate) type Handler = Arc<Method>;

/// The outcome of looking a method up.
pub(crate) enum Lookup {
    Found(Handler),
    UnknownService,
    UnknownMethod,
}

impl Services {
    pub(crate) fn register(&self, path: impl Into<String>, service: Service) {
        self.0.write_locked().insert(path.into(), Arc::new(service));
    }

    pub(crate) fn lookup(&self, path: &str, method: &str) -> Lookup {
        let map = self.0.read_locked();
        match map.get(path) {
            None => Lookup::UnknownService,
            Some(service) => match service.handler(method) {
                Some(h) => Lookup::Found(h),
                None => Lookup::UnknownMethod,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SHORT: Duration = Duration::from_micros(2);
    const OVERRUN: Duration = Duration::from_millis(3);

    fn stats() -> PollStats {
        PollStats::default()
    }

    /// A preempted poll now and then (one overrun, a short run of long polls) moves nothing.
    #[test]
    fn one_overrun_among_short_polls_moves_nothing() {
        let s = stats();
        for _ in 0..10 {
            assert_eq!(s.record(OVERRUN), None);
            for _ in 0..STRIKE {
                assert_eq!(s.record(SHORT), None);
            }
        }
        assert!(!s.slow.load(Ordering::Relaxed));
        // Two long polls in a row (within the budget) count for little in the average.
        for _ in 0..20 {
            s.record(SHORT);
        }
        s.record(Duration::from_micros(900));
        s.record(Duration::from_micros(900));
        assert!(!s.is_heavy(), "{s:?}");
        assert!(!s.slow.load(Ordering::Relaxed));
    }

    /// A handler that overruns on every call moves at its second call, and comes back once its
    /// polls stay short.
    #[test]
    fn repeated_overruns_move_a_method_and_short_polls_bring_it_back() {
        let s = stats();
        assert_eq!(s.record(OVERRUN), None);
        for _ in 0..STRIKE - 1 {
            s.record(SHORT);
        }
        assert_eq!(s.record(OVERRUN), Some(true));
        assert!(s.slow.load(Ordering::Relaxed));
        // On the pool, one overrun starts the count again.
        for _ in 0..HEAL - 1 {
            assert_eq!(s.record(SHORT), None);
        }
        assert_eq!(s.record(OVERRUN), None);
        for _ in 0..HEAL - 1 {
            assert_eq!(s.record(SHORT), None);
        }
        assert_eq!(s.record(SHORT), Some(false));
        assert!(!s.slow.load(Ordering::Relaxed));
        // Back inline with a clean slate: one overrun alone does not move it again.
        assert_eq!(s.record(OVERRUN), None);
    }

    /// Handlers doing about 100 µs of work per poll are heavy after a few calls; ones doing
    /// 20 µs are not, and a heavy method that turns light stops being heavy.
    #[test]
    fn the_average_tells_heavy_work_from_light() {
        let s = stats();
        for _ in 0..20 {
            s.record(Duration::from_micros(100));
        }
        assert!(s.is_heavy(), "{s:?}");
        for _ in 0..20 {
            s.record(Duration::from_micros(20));
        }
        assert!(!s.is_heavy(), "{s:?}");
        // A blocked poll counts at most the cap: light again soon after.
        s.record(Duration::from_secs(1));
        for _ in 0..10 {
            s.record(SHORT);
        }
        assert!(!s.is_heavy(), "{s:?}");
    }
}
