//! Interceptors: code that runs around every call a side serves ([`Interceptor`]) or makes
//! ([`CallInterceptor`]), and on every connection.
//!
//! quicx builds its own cross-cutting features on these two traits — the per-call authorizer
//! ([`CallAuthorizer`](crate::CallAuthorizer)), call rates ([`AbuseLimits`](crate::AbuseLimits)),
//! [metrics](crate::metrics) and trace propagation ([`trace`](crate::trace)) — and an application
//! adds its own with [`ServerBuilder::interceptor`](crate::ServerBuilder::interceptor) and
//! [`ClientBuilder::call_interceptor`](crate::ClientBuilder::call_interceptor).
//!
//! **Why not `tower::Service`?** A tower layer wraps the call in a `Service` whose future is
//! boxed once per layer and per call (the handler's future type differs per method), and needs
//! `poll_ready` and a clone of the service per call. quicx's hooks are plain synchronous methods
//! on a shared `Arc`: an installed interceptor costs one virtual call before and one after the
//! handler, no allocation (measured in `BENCHMARKS.md`). What a tower layer typically does around
//! an RPC — refuse, time, count, tag — needs no ownership of the handler's future; timeouts and
//! cancellation are already the framework's (deadlines, [`Context::cancelled`]).

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};

use crate::{Connection, Context, Error, Metadata, Refusal, ServiceError};

/// How a served call ended, as its [`Interceptor::after_call`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct CallOutcome {
    /// `0` for success, else the status code of the reply ([`status`](crate::status);
    /// [`status::name`](crate::status::name) gives a label).
    pub status: u32,
    /// From when the request was read to when the reply was ready (or the call was refused).
    pub elapsed: Duration,
}

/// Code that runs on every connection a server accepts and around every call a side serves
/// (forward calls on a server; reverse calls on a client).
///
/// Every method has a default that does nothing. They run on the connection's I/O thread, in the
/// order the interceptors were installed (`after_call` in reverse order), and must be quick: no
/// blocking, no I/O (hand slow work to a channel or a task).
///
/// Why not `tower::Layer`/`Service`: a layer wraps each call's future (boxed once per layer and
/// per call, since every method's future type differs) and needs `poll_ready` and a service
/// clone per call. These hooks are plain methods on a shared `Arc`: one virtual call before and
/// one after the handler, no allocation. Deadlines and cancellation, which tower layers often
/// add, are already the framework's.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use quicx::{CallOutcome, Context, Interceptor, ServiceError};
///
/// /// Refuses calls without an `x-tenant` metadata entry and counts slow calls.
/// #[derive(Default)]
/// struct Tenants { slow: AtomicU64 }
///
/// impl Interceptor for Tenants {
///     fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
///         match ctx.metadata().get("x-tenant") {
///             Some(_) => Ok(()),
///             None => Err(ServiceError::new(1001, "x-tenant missing")),
///         }
///     }
///     fn after_call(&self, _ctx: &Context, outcome: &CallOutcome) {
///         if outcome.elapsed.as_millis() > 100 {
///             self.slow.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// # let _ = quicx::Server::builder().interceptor(Tenants::default());
/// ```
pub trait Interceptor: Send + Sync + 'static {
    /// A server accepted a connection (TLS done, before any stream is served). A refusal closes
    /// it at once with [`CloseCode::PROTOCOL_VIOLATION`](crate::CloseCode::PROTOCOL_VIOLATION)
    /// and the refusal's message as the reason. Not called on clients.
    fn on_connect(&self, conn: &Connection) -> Result<(), Refusal> {
        let _ = conn;
        Ok(())
    }

    /// Before a call's handler runs. An error answers the call with its code and message (the
    /// caller gets the matching [`Error`]: `UNAUTHENTICATED` is
    /// [`Error::Unauthenticated`], `PERMISSION_DENIED` [`Error::PermissionDenied`],
    /// `RATE_LIMITED` [`Error::RateLimited`], an application code [`Error::Remote`]); the
    /// handler and the later interceptors do not run, and `after_call` still runs for every
    /// interceptor that was asked.
    fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
        let _ = ctx;
        Ok(())
    }

    /// After the call ended: the handler's reply (or error) is known, or the call was refused or
    /// cancelled. Runs before the reply is written.
    fn after_call(&self, ctx: &Context, outcome: &CallOutcome) {
        let _ = (ctx, outcome);
    }

    /// A server's connection closed (for any reason). Not called on clients.
    fn on_disconnect(&self, conn: &Connection) {
        let _ = conn;
    }
}

/// A call this side is about to make, as [`CallInterceptor::before_call`] sees it: it may add
/// metadata (copied only when one does).
#[derive(Debug)]
pub struct OutgoingCall<'a> {
    service_path: &'a str,
    service_method: &'a str,
    /// Asked only when an interceptor wants the address (quinn locks the connection for it).
    quic: &'a quinn::Connection,
    metadata: Cow<'a, Metadata>,
}

impl<'a> OutgoingCall<'a> {
    pub(crate) fn new(
        service_path: &'a str,
        service_method: &'a str,
        quic: &'a quinn::Connection,
        metadata: Cow<'a, Metadata>,
    ) -> Self {
        Self {
            service_path,
            service_method,
            quic,
            metadata,
        }
    }

    /// The metadata if it is owned: it was given owned, or an interceptor changed it.
    pub(crate) fn into_owned_metadata(self) -> Option<Metadata> {
        match self.metadata {
            Cow::Owned(m) => Some(m),
            Cow::Borrowed(_) => None,
        }
    }

    /// The service called.
    pub fn service_path(&self) -> &str {
        self.service_path
    }

    /// The method called.
    pub fn service_method(&self) -> &str {
        self.service_method
    }

    /// The server (or, for a reverse call, the client) called.
    pub fn remote(&self) -> SocketAddr {
        self.quic.remote_address()
    }

    /// The request metadata so far.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Sets a metadata entry on this request (replacing the first entry with that key).
    pub fn insert_metadata(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.metadata.to_mut().insert(key, value);
    }
}

/// Code that runs around every call a side makes (forward calls from a client, reverse calls
/// from a server): add metadata (a token, a trace context), refuse locally, observe the result.
///
/// Runs on the calling task, in installation order (`after_call` in reverse order); must be
/// quick.
pub trait CallInterceptor: Send + Sync + 'static {
    /// Before the request is encoded. An error fails the call at once with that error; nothing
    /// is sent.
    fn before_call(&self, call: &mut OutgoingCall<'_>) -> Result<(), Error> {
        let _ = call;
        Ok(())
    }

    /// After the call ended, with its result and how long it took (encoding to reply). A call
    /// whose future the caller dropped before it ended is reported as [`Error::Cancelled`]
    /// (status `cancelled` in the metrics) when it is dropped.
    fn after_call(
        &self,
        service_path: &str,
        service_method: &str,
        result: Result<(), &Error>,
        elapsed: Duration,
    ) {
        let _ = (service_path, service_method, result, elapsed);
    }
}

/// The interceptors of one side, in installation order.
#[derive(Clone, Default)]
pub(crate) struct Interceptors(Arc<[Arc<dyn Interceptor>]>);

impl std::fmt::Debug for Interceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Interceptors({})", self.0.len())
    }
}

impl Interceptors {
    pub(crate) fn new(list: Vec<Arc<dyn Interceptor>>) -> Self {
        Self(list.into())
    }

    /// Runs `before_call` in order; on a refusal, returns it with how many interceptors were
    /// asked (those get `after_call`).
    pub(crate) fn before_call(&self, ctx: &Context) -> Result<(), (ServiceError, usize)> {
        for (i, interceptor) in self.0.iter().enumerate() {
            interceptor.before_call(ctx).map_err(|e| (e, i + 1))?;
        }
        Ok(())
    }

    /// Runs `after_call` in reverse order on the first `asked` interceptors.
    pub(crate) fn after_call(&self, asked: usize, ctx: &Context, outcome: &CallOutcome) {
        for interceptor in self.0[..asked].iter().rev() {
            interceptor.after_call(ctx, outcome);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn on_connect(&self, conn: &Connection) -> Result<(), Refusal> {
        self.0.iter().try_for_each(|i| i.on_connect(conn))
    }

    pub(crate) fn on_disconnect(&self, conn: &Connection) {
        self.0.iter().rev().for_each(|i| i.on_disconnect(conn));
    }
}

/// The call interceptors of one side, in installation order.
#[derive(Clone, Default)]
pub(crate) struct CallInterceptors(Arc<[Arc<dyn CallInterceptor>]>);

impl std::fmt::Debug for CallInterceptors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CallInterceptors({})", self.0.len())
    }
}

impl CallInterceptors {
    pub(crate) fn new(list: Vec<Arc<dyn CallInterceptor>>) -> Self {
        Self(list.into())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn before_call(&self, call: &mut OutgoingCall<'_>) -> Result<(), Error> {
        self.0.iter().try_for_each(|i| i.before_call(call))
    }

    pub(crate) fn after_call(
        &self,
        service_path: &str,
        service_method: &str,
        result: Result<(), &Error>,
        elapsed: Duration,
    ) {
        for interceptor in self.0.iter().rev() {
            interceptor.after_call(service_path, service_method, result, elapsed);
        }
    }
}

/// The per-call authorizer, as an interceptor.
impl Interceptor for crate::CallAuthorizer {
    fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
        self.check(ctx).map_err(ServiceError::from_refusal)
    }
}

/// Call rates per connection and per identity ([`AbuseLimits`](crate::AbuseLimits)), as an
/// interceptor: installed first when a rate is configured.
#[derive(Debug)]
pub(crate) struct CallRates;

impl Interceptor for CallRates {
    fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
        ctx.conn()
            .within_call_rates()
            .map_err(|message| ServiceError::new(crate::status::RATE_LIMITED, message))
    }
}

/// A shared interceptor (the application keeps a handle to read what it recorded).
impl<T: Interceptor + ?Sized> Interceptor for Arc<T> {
    fn on_connect(&self, conn: &Connection) -> Result<(), Refusal> {
        (**self).on_connect(conn)
    }

    fn before_call(&self, ctx: &Context) -> Result<(), ServiceError> {
        (**self).before_call(ctx)
    }

    fn after_call(&self, ctx: &Context, outcome: &CallOutcome) {
        (**self).after_call(ctx, outcome);
    }

    fn on_disconnect(&self, conn: &Connection) {
        (**self).on_disconnect(conn);
    }
}

/// A shared call interceptor.
impl<T: CallInterceptor + ?Sized> CallInterceptor for Arc<T> {
    fn before_call(&self, call: &mut OutgoingCall<'_>) -> Result<(), Error> {
        (**self).before_call(call)
    }

    fn after_call(
        &self,
        service_path: &str,
        service_method: &str,
        result: Result<(), &Error>,
        elapsed: Duration,
    ) {
        (**self).after_call(service_path, service_method, result, elapsed);
    }
}
