//! What every connection of one side (a server, or a client) shares, and which role that side
//! plays.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::registry::Registry;
use crate::{PushSender, TransportOptions, service::Services, stats::Counters, wire::Limits};

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
    },
    /// A client: opens one connection per server, receives pushes (if it has a channel) and
    /// pushes with receipt, says hello.
    Client {
        /// Where pushes go; `None` refuses them with `PUSH_REJECTED`.
        push_sink: Option<PushSender>,
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
    pub(crate) shutting_down: AtomicBool,
    /// Every call handler task, for draining at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Cancelled when the side shuts down its handlers for good.
    pub(crate) shutdown: CancellationToken,
    pub(crate) counters: Counters,
    /// A server's I/O threads (empty on clients), to compare their load.
    pub(crate) io_threads: Vec<crate::io::IoRuntime>,
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
    ) -> Self {
        Self {
            role,
            services,
            limits: transport.limits,
            push_timeout: timeouts.push,
            call_timeout: timeouts.call,
            frame_timeout: transport.frame_timeout,
            unresponsive_timeout: transport.unresponsive_timeout,
            call_limits: (transport.starting_calls(), transport.max_concurrent_calls),
            shutting_down: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            io_threads,
        }
    }

    /// The server's limiters, on a server.
    pub(crate) fn limiters(&self) -> Option<&crate::limits::Limiters> {
        match &self.role {
            Role::Server { limiters, .. } => Some(limiters),
            Role::Client { .. } => None,
        }
    }

    /// The server's per-call authorizer, if one is installed.
    pub(crate) fn call_authorizer(&self) -> Option<&crate::CallAuthorizer> {
        match &self.role {
            Role::Server { identity, .. } => identity.authorize_calls.as_ref(),
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
