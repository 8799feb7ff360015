//! What every connection of one side (a server, or a client) shares, and which role that side
//! plays.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::registry::Registry;
use crate::{
    PushSender, TransportOptions,
    intercept::{CallInterceptor, CallInterceptors, Interceptor, Interceptors},
    service::Services,
    stats::Counters,
    wire::Limits,
};

/// The role a side plays. Matched once where behaviour differs; nothing is inferred from which
/// options happen to be set.
#[derive(Debug)]
pub(crate) enum Role {
    /// A server: accepts connections, keeps the registry of its clients, answers hellos,
    /// pushes.
    Server {
        /// The clients connected now and their identities.
        registry: Arc<Registry>,
        /// Which hello identities may bind.
        identity: crate::auth::IdentityPolicy,
        /// Call rates and connections per address.
        limiters: Arc<crate::limits::Limiters>,
        /// Durable messages, when the server has a store.
        durable: Option<Arc<crate::durable::Durable>>,
    },
    /// A client: opens one connection per server, receives pushes (if it has a channel) and
    /// pushes with receipt, says hello.
    Client {
        /// Where pushes go; `None` refuses them with `PUSH_REJECTED`.
        push_sink: Option<PushSender>,
        /// Order and duplicates of durable messages.
        inbox: Arc<crate::durable::Inbox>,
        /// Whether the application acknowledges durable messages itself.
        manual_ack: bool,
    },
}

/// What every connection of one side shares: its role, services, limits, timeouts, handler
/// tracking and counters.
#[derive(Debug)]
pub(crate) struct Side {
    pub(crate) role: Role,
    pub(crate) services: Services,
    pub(crate) limits: Limits,
    /// Bound on `send_message` (open stream + hand over the frame).
    pub(crate) push_timeout: Duration,
    /// Default timeout of calls made from this side.
    pub(crate) call_timeout: Option<Duration>,
    /// Bound on reading one incoming frame.
    pub(crate) frame_timeout: Duration,
    /// Close a connection whose peer answers no liveness probe for this long while calls wait.
    pub(crate) unresponsive_timeout: Option<Duration>,
    /// Concurrent-call limit: where a connection starts, and the most it is raised to.
    pub(crate) call_limits: (u32, u32),
    /// Concurrent-push limit (clients): where a connection starts, and the most it is raised to.
    pub(crate) push_limits: (u32, u32),
    pub(crate) shutting_down: AtomicBool,
    /// Every call handler task, for draining at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the side shuts down its handlers for good.
    pub(crate) shutdown: CancellationToken,
    pub(crate) counters: Counters,
    /// A server's I/O threads (empty on clients), to compare their load.
    pub(crate) io_threads: Vec<crate::io::IoRuntime>,
    /// Around the calls this side serves and its connections (servers).
    pub(crate) interceptors: Interceptors,
    /// Around the calls this side makes.
    pub(crate) call_interceptors: CallInterceptors,
    /// Whether connection, handshake and push events are recorded as metrics.
    pub(crate) metrics: bool,
    /// Where they are recorded.
    series: crate::metrics::EventSeries,
    /// Whether calls made outside a trace scope start a new trace.
    pub(crate) trace_calls: bool,
}

/// What a side runs around its calls and connections.
#[derive(Clone)]
pub(crate) struct Hooks {
    /// The application's interceptors of served calls, in installation order.
    pub(crate) interceptors: Vec<Arc<dyn Interceptor>>,
    /// The application's interceptors of calls made.
    pub(crate) call_interceptors: Vec<Arc<dyn CallInterceptor>>,
    /// Record metrics (calls, connections, handshakes, pushes).
    pub(crate) metrics: bool,
    /// Start a trace for calls made outside any trace scope.
    pub(crate) trace_calls: bool,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("interceptors", &self.interceptors.len())
            .field("call_interceptors", &self.call_interceptors.len())
            .field("metrics", &self.metrics)
            .field("trace_calls", &self.trace_calls)
            .finish()
    }
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            interceptors: Vec::new(),
            call_interceptors: Vec::new(),
            metrics: true,
            trace_calls: false,
        }
    }
}

impl Hooks {
    /// The chains this side runs: metrics first (so it sees refused calls too), then the
    /// built-in checks the role brings, then the application's.
    fn chains(self, role: &Role) -> (Interceptors, CallInterceptors) {
        let mut served: Vec<Arc<dyn Interceptor>> = Vec::new();
        let mut made: Vec<Arc<dyn CallInterceptor>> = Vec::new();
        if self.metrics {
            served.push(Arc::new(crate::metrics::ServerCallMetrics::new()));
            made.push(Arc::new(crate::metrics::ClientCallMetrics::new()));
        }
        if let Role::Server {
            identity, limiters, ..
        } = role
        {
            if limiters.limits_calls() {
                served.push(Arc::new(crate::intercept::CallRates));
            }
            if let Some(authorizer) = &identity.authorize_calls {
                served.push(Arc::new(authorizer.clone()));
            }
        }
        served.extend(self.interceptors);
        made.extend(self.call_interceptors);
        (Interceptors::new(served), CallInterceptors::new(made))
    }
}

/// The timeouts of one side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SideTimeouts {
    pub(crate) push: Duration,
    pub(crate) call: Option<Duration>,
}

impl Side {
    pub(crate) fn new(
        role: Role,
        services: Services,
        transport: &TransportOptions,
        timeouts: SideTimeouts,
        io_threads: Vec<crate::io::IoRuntime>,
        hooks: Hooks,
    ) -> Self {
        let (metrics, trace_calls) = (hooks.metrics, hooks.trace_calls);
        let (interceptors, call_interceptors) = hooks.chains(&role);
        Self {
            role,
            services,
            limits: transport.limits,
            push_timeout: timeouts.push,
            call_timeout: timeouts.call,
            frame_timeout: transport.frame_timeout,
            unresponsive_timeout: transport.unresponsive_timeout,
            call_limits: (transport.starting_calls(), transport.max_concurrent_calls),
            push_limits: (transport.starting_pushes(), transport.max_concurrent_pushes),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            io_threads,
            interceptors,
            call_interceptors,
            metrics,
            series: crate::metrics::EventSeries::default(),
            trace_calls,
        }
    }

    /// Counts a refused hello or call (unauthenticated or denied).
    pub(crate) fn auth_failure(&self) {
        self.counters
            .auth_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.record(crate::metrics::Event::AuthFailure);
    }

    /// Records a metrics event if this side records metrics.
    pub(crate) fn record(&self, event: crate::metrics::Event) {
        if self.metrics {
            self.series.record(event);
        }
    }

    /// The server's limiters, on a server.
    pub(crate) fn limiters(&self) -> Option<&crate::limits::Limiters> {
        match &self.role {
            Role::Server { limiters, .. } => Some(limiters),
            Role::Client { .. } => None,
        }
    }

    /// The server's durable store, if it has one.
    pub(crate) fn durable(&self) -> Option<&Arc<crate::durable::Durable>> {
        match &self.role {
            Role::Server { durable, .. } => durable.as_ref(),
            Role::Client { .. } => None,
        }
    }

    /// The server's registry, on a server.
    pub(crate) fn registry(&self) -> Option<&Arc<Registry>> {
        match &self.role {
            Role::Server { registry, .. } => Some(registry),
            Role::Client { .. } => None,
        }
    }
}
