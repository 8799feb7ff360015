//! Services: named sets of methods, each an async handler.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
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
    /// Set once a call's handler held its I/O thread longer than the inline budget: its calls
    /// then run on the handler pool.
    slow: AtomicBool,
    /// Whether the last timed poll took at least [`HEAVY_POLL`](crate::io::HEAVY_POLL): such
    /// calls leave an overloaded I/O thread for the pool.
    heavy: AtomicBool,
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
            slow: AtomicBool::new(false),
            heavy: AtomicBool::new(false),
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
        self.slow.load(Ordering::Relaxed)
    }

    /// Moves this method's later calls to the handler pool.
    pub(crate) fn mark_slow(&self) {
        self.slow.store(true, Ordering::Relaxed);
    }

    /// Whether the method's work is heavy enough to be worth moving off a busy I/O thread.
    pub(crate) fn is_heavy(&self) -> bool {
        self.heavy.load(Ordering::Relaxed)
    }

    /// Records how long one poll took.
    pub(crate) fn record_poll(&self, took: std::time::Duration) {
        let heavy = took >= crate::io::HEAVY_POLL;
        if self.heavy.load(Ordering::Relaxed) != heavy {
            self.heavy.store(heavy, Ordering::Relaxed);
        }
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
/// hand-over: trivial handlers cost least there). If one poll of a method's handler holds that
/// thread longer than 1 ms — long CPU work, a blocking call — the method is marked slow and its later
/// calls run on a work-stealing pool with one worker per core, so other connections go on. The
/// first such call still holds its I/O thread for as long as it blocks: an async handler must
/// not block (`std::thread::sleep`, blocking I/O or locks held across long waits). Register
/// blocking code with [`blocking_method`](Self::blocking_method), which runs it on a blocking
/// thread from the first call.
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
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.into(), Arc::new(service));
    }

    pub(crate) fn lookup(&self, path: &str, method: &str) -> Lookup {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(path) {
            None => Lookup::UnknownService,
            Some(service) => match service.handler(method) {
                Some(h) => Lookup::Found(h),
                None => Lookup::UnknownMethod,
            },
        }
    }
}
